// epsilon_ratio, epsilon_ratio_of_product and relevance_product on the CPU.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include <tuple>

#include "../lrp_epsilon.h"
#include "elementwise.h"
#include "rowwise.h"

namespace fastattr::cpu {
namespace {

constexpr int64_t kGrain = int64_t{1} << 15;

at::Tensor epsilon_ratio(const at::Tensor& relevance, const at::Tensor& z, double epsilon) {
  check_epsilon(epsilon);
  PairOperands op = prepare_pair(relevance, "relevance", z, "z");
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
  check_epsilon(epsilon);
  PairOperands op = prepare_pair(activations, "activations", contributions, "contributions");
  const at::Tensor zs = prepare_like(z, "z", activations, "activations");
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

std::tuple<at::Tensor, at::Tensor> relevance_product(const at::Tensor& activations,
                                                     const at::Tensor& contributions) {
  check_batched(activations, "activations");
  PairOperands op = prepare_pair(activations, "activations", contributions, "contributions");
  at::Tensor relevance = at::empty_like(op.first);
  const auto sum_dtype = at::toOpMathType(activations.scalar_type());
  at::Tensor row_sums = at::empty({activations.size(0)}, activations.options().dtype(sum_dtype));
  const int64_t row = row_numel(activations);
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, activations.scalar_type(), "relevance_product_cpu", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        const scalar_t* a = op.first.const_data_ptr<scalar_t>();
        const scalar_t* c = op.second.const_data_ptr<scalar_t>();
        rowwise_terms(activations.size(0), row, relevance.mutable_data_ptr<scalar_t>(),
                      row_sums.mutable_data_ptr<acc_t>(), [&](int64_t, int64_t j) -> acc_t {
                        return static_cast<acc_t>(a[j]) * static_cast<acc_t>(c[j]);
                      });
      });
  return {relevance, row_sums};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastattr, CPU, m) {
  m.impl("epsilon_ratio", &epsilon_ratio);
  m.impl("epsilon_ratio_of_product", &epsilon_ratio_of_product);
  m.impl("relevance_product", &relevance_product);
}

}  // namespace fastattr::cpu
