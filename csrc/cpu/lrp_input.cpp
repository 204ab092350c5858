// input_relevance on the CPU: the product at a module's input.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "../lrp_epsilon.h"
#include "elementwise.h"

namespace fastattr::cpu {
namespace {

at::Tensor input_relevance(const at::Tensor& activations, const at::Tensor& contributions) {
  constexpr const char* kOp = "fastattr::input_relevance";
  PairOperands op =
      prepare_pair(kOp, activations, "activations", contributions, "contributions");
  at::Tensor relevance = at::empty_like(op.first);
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, activations.scalar_type(), "input_relevance_cpu", [&] {
        const scalar_t* a = op.first.const_data_ptr<scalar_t>();
        const scalar_t* c = op.second.const_data_ptr<scalar_t>();
        scalar_t* out = relevance.mutable_data_ptr<scalar_t>();
        at::parallel_for(0, relevance.numel(), int64_t{1} << 15, [&](int64_t begin, int64_t end) {
          product_range(a, c, out, begin, end);
        });
      });
  return relevance;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastattr, CPU, m) { m.impl("input_relevance", &input_relevance); }

}  // namespace fastattr::cpu
