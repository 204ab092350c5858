// epsilon_ratio and epsilon_ratio_of_product on the CPU.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "../lrp_epsilon.h"
#include "elementwise.h"

namespace fastattr::cpu {
namespace {

constexpr int64_t kGrain = int64_t{1} << 15;

at::Tensor epsilon_ratio(const at::Tensor& relevance, const at::Tensor& z, double epsilon) {
  PairOperands op = prepare_pair("fastattr::epsilon_ratio", relevance, "relevance", z, "z");
  at::Tensor ratio = at::empty_like(op.first);
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, relevance.scalar_type(), "epsilon_ratio_cpu", [&] {
        const scalar_t* r = op.first.const_data_ptr<scalar_t>();
        const scalar_t* zs = op.second.const_data_ptr<scalar_t>();
        scalar_t* out = ratio.mutable_data_ptr<scalar_t>();
        at::parallel_for(0, ratio.numel(), kGrain, [&](int64_t begin, int64_t end) {
          epsilon_ratio_range(r, zs, out, begin, end, epsilon);
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
  at::Tensor ratio = at::empty_like(op.first);
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, activations.scalar_type(), "epsilon_ratio_of_product_cpu", [&] {
        const scalar_t* a = op.first.const_data_ptr<scalar_t>();
        const scalar_t* c = op.second.const_data_ptr<scalar_t>();
        const scalar_t* zp = zs.const_data_ptr<scalar_t>();
        scalar_t* out = ratio.mutable_data_ptr<scalar_t>();
        at::parallel_for(0, ratio.numel(), kGrain, [&](int64_t begin, int64_t end) {
          epsilon_ratio_of_product_range(a, c, zp, out, begin, end, epsilon);
        });
      });
  return ratio;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastattr, CPU, m) {
  m.impl("epsilon_ratio", &epsilon_ratio);
  m.impl("epsilon_ratio_of_product", &epsilon_ratio_of_product);
}

}  // namespace fastattr::cpu
