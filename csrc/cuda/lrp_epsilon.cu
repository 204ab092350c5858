// epsilon_ratio and epsilon_ratio_of_product on CUDA, over the formulas of lrp_formula.h.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "../lrp_epsilon.h"
#include "../lrp_formula.h"
#include "launch.cuh"

namespace fastattr::cuda {

at::Tensor epsilon_ratio(const at::Tensor& relevance, const at::Tensor& z, double epsilon) {
  PairOperands op = prepare_pair("fastattr::epsilon_ratio", relevance, "relevance", z, "z");
  const c10::cuda::CUDAGuard guard(relevance.device());
  at::Tensor ratio = at::empty_like(op.first);
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, relevance.scalar_type(), "epsilon_ratio_cuda", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        const scalar_t* r = op.first.const_data_ptr<scalar_t>();
        const scalar_t* zs = op.second.const_data_ptr<scalar_t>();
        scalar_t* out = ratio.mutable_data_ptr<scalar_t>();
        const acc_t eps = static_cast<acc_t>(epsilon);
        for_each_index(ratio.numel(), [=] __device__(int64_t i) {
          out[i] = static_cast<scalar_t>(
              stabilized_ratio(static_cast<acc_t>(r[i]), static_cast<acc_t>(zs[i]), eps));
        });
      });
  return ratio;
}

at::Tensor epsilon_ratio_of_product(const at::Tensor& activations,
                                    const at::Tensor& contributions, const at::Tensor& z,
                                    double epsilon) {
  constexpr const char* kOp = "fastattr::epsilon_ratio_of_product";
  PairOperands op =
      prepare_pair(kOp, activations, "activations", contributions, "contributions");
  const at::Tensor zs = prepare_third(kOp, op, z, "z");
  const c10::cuda::CUDAGuard guard(activations.device());
  at::Tensor ratio = at::empty_like(op.first);
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, activations.scalar_type(), "epsilon_ratio_of_product_cuda", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        const scalar_t* a = op.first.const_data_ptr<scalar_t>();
        const scalar_t* c = op.second.const_data_ptr<scalar_t>();
        const scalar_t* zp = zs.const_data_ptr<scalar_t>();
        scalar_t* out = ratio.mutable_data_ptr<scalar_t>();
        const acc_t eps = static_cast<acc_t>(epsilon);
        for_each_index(ratio.numel(), [=] __device__(int64_t i) {
          out[i] = ratio_of_product<scalar_t, acc_t>(a[i], c[i], zp[i], eps);
        });
      });
  return ratio;
}

TORCH_LIBRARY_IMPL(fastattr, CUDA, m) {
  m.impl("epsilon_ratio", &epsilon_ratio);
  m.impl("epsilon_ratio_of_product", &epsilon_ratio_of_product);
}

}  // namespace fastattr::cuda
