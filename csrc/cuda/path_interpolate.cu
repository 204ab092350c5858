// interpolate_path on CUDA.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "../path_interpolate.h"
#include "launch.cuh"

namespace fastattr::cuda {

at::Tensor interpolate_path(const at::Tensor& inputs, const at::Tensor& baselines,
                            const at::Tensor& alphas) {
  PathOperands op = prepare_path(inputs, baselines, alphas);
  const c10::cuda::CUDAGuard guard(inputs.device());
  const at::Tensor alphas_on_device =
      coefficients_to_device(op.alphas, inputs.device(), at::kDouble);
  const int64_t block = op.batch * op.row, row = op.row;
  const bool shared = op.baselines.shared;
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, inputs.scalar_type(), "interpolate_path_cuda", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        const scalar_t* x = op.inputs.const_data_ptr<scalar_t>();
        const scalar_t* base = op.baselines.rows.const_data_ptr<scalar_t>();
        const double* alpha = alphas_on_device.const_data_ptr<double>();
        scalar_t* path = op.path.mutable_data_ptr<scalar_t>();
        for_each_index(op.path.numel(), [=] __device__(int64_t i) {
          const int64_t step = i / block, j = i - step * block;
          const acc_t a = static_cast<acc_t>(alpha[step]);
          const acc_t bv = static_cast<acc_t>(base[shared ? j % row : j]);
          path[i] = static_cast<scalar_t>(bv + a * (static_cast<acc_t>(x[j]) - bv));
        });
      });
  return op.path;
}

TORCH_LIBRARY_IMPL(fastattr, CUDA, m) { m.impl("interpolate_path", &interpolate_path); }

}  // namespace fastattr::cuda
