// input_relevance on CUDA: the product at a module's input, element-wise.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "../lrp_epsilon.h"
#include "../lrp_formula.h"
#include "launch.cuh"

namespace fastattr::cuda {

at::Tensor input_relevance(const at::Tensor& activations, const at::Tensor& contributions) {
  constexpr const char* kOp = "fastattr::input_relevance";
  PairOperands op =
      prepare_pair(kOp, activations, "activations", contributions, "contributions");
  const c10::cuda::CUDAGuard guard(activations.device());
  at::Tensor relevance = at::empty_like(op.first);
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, activations.scalar_type(), "input_relevance_cuda", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        const scalar_t* a = op.first.const_data_ptr<scalar_t>();
        const scalar_t* c = op.second.const_data_ptr<scalar_t>();
        scalar_t* out = relevance.mutable_data_ptr<scalar_t>();
        for_each_index(relevance.numel(), [=] __device__(int64_t i) {
          out[i] = input_product<scalar_t, acc_t>(a[i], c[i]);
        });
      });
  return relevance;
}

TORCH_LIBRARY_IMPL(fastattr, CUDA, m) { m.impl("input_relevance", &input_relevance); }

}  // namespace fastattr::cuda
