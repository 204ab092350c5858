// epsilon_ratio, epsilon_ratio_of_product and relevance_product on CUDA.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <tuple>

#include "../lrp_epsilon.h"
#include "launch.cuh"

namespace fastattr::cuda {

at::Tensor epsilon_ratio(const at::Tensor& relevance, const at::Tensor& z, double epsilon) {
  check_epsilon(epsilon);
  PairOperands op = prepare_pair(relevance, "relevance", z, "z");
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
          const acc_t zi = static_cast<acc_t>(zs[i]);
          // sign(0) is +1 so that a zero pre-activation is pushed away from zero.
          const acc_t stabilized = zi + (zi < acc_t(0) ? -eps : eps);
          out[i] = static_cast<scalar_t>(static_cast<acc_t>(r[i]) / stabilized);
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
          // The product rounded to scalar_t, as input_relevance leaves it.
          const scalar_t product =
              static_cast<scalar_t>(static_cast<acc_t>(a[i]) * static_cast<acc_t>(c[i]));
          const acc_t zi = static_cast<acc_t>(zp[i]);
          const acc_t stabilized = zi + (zi < acc_t(0) ? -eps : eps);
          out[i] = static_cast<scalar_t>(static_cast<acc_t>(product) / stabilized);
        });
      });
  return ratio;
}

std::tuple<at::Tensor, at::Tensor> relevance_product(const at::Tensor& activations,
                                                     const at::Tensor& contributions) {
  check_batched(activations, "activations");
  PairOperands op = prepare_pair(activations, "activations", contributions, "contributions");
  const c10::cuda::CUDAGuard guard(activations.device());
  at::Tensor relevance = at::empty_like(op.first);
  const auto sum_dtype = at::toOpMathType(activations.scalar_type());
  at::Tensor row_sums = at::empty({activations.size(0)}, activations.options().dtype(sum_dtype));
  const int64_t row = row_numel(activations);
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, activations.scalar_type(), "relevance_product_cuda", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        const scalar_t* a = op.first.const_data_ptr<scalar_t>();
        const scalar_t* c = op.second.const_data_ptr<scalar_t>();
        rowwise_terms(activations.size(0), row, relevance.mutable_data_ptr<scalar_t>(),
                      row_sums.mutable_data_ptr<acc_t>(),
                      [=] __device__(int64_t, int64_t j) -> acc_t {
                        return static_cast<acc_t>(a[j]) * static_cast<acc_t>(c[j]);
                      });
      });
  return {relevance, row_sums};
}

TORCH_LIBRARY_IMPL(fastattr, CUDA, m) {
  m.impl("epsilon_ratio", &epsilon_ratio);
  m.impl("epsilon_ratio_of_product", &epsilon_ratio_of_product);
  m.impl("relevance_product", &relevance_product);
}

}  // namespace fastattr::cuda
