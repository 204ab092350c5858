// interpolate_points, accumulate_points and point_slopes on CUDA.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "../path_points.h"
#include "launch.cuh"

namespace fastattr::cuda {

at::Tensor interpolate_points(const at::Tensor& inputs, const at::Tensor& baselines,
                              const at::Tensor& rows, const at::Tensor& alphas) {
  PointPathOperands op = prepare_point_path(inputs, baselines, rows, alphas);
  const c10::cuda::CUDAGuard guard(inputs.device());
  if (op.path.numel() == 0) return op.path;
  const at::Tensor rows_on_device = coefficients_to_device(op.rows, inputs.device(), at::kLong);
  const at::Tensor alphas_on_device =
      coefficients_to_device(op.alphas, inputs.device(), at::kDouble);
  const int64_t row = op.row;
  const bool shared = op.baselines.shared;
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, inputs.scalar_type(), "interpolate_points_cuda", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        const scalar_t* x = op.inputs.const_data_ptr<scalar_t>();
        const scalar_t* base = op.baselines.rows.const_data_ptr<scalar_t>();
        const int64_t* example = rows_on_device.const_data_ptr<int64_t>();
        const double* alpha = alphas_on_device.const_data_ptr<double>();
        scalar_t* path = op.path.mutable_data_ptr<scalar_t>();
        for_each_index(op.path.numel(), [=] __device__(int64_t i) {
          const int64_t p = i / row, d = i - p * row;
          const int64_t j = example[p] * row + d;
          const acc_t a = static_cast<acc_t>(alpha[p]);
          const acc_t bv = static_cast<acc_t>(base[shared ? d : j]);
          path[i] = static_cast<scalar_t>(bv + a * (static_cast<acc_t>(x[j]) - bv));
        });
      });
  return op.path;
}

// A thread per element of each accumulator row the points touch, adding that row's points in
// their order: deterministic, without atomics.
template <typename grad_t, typename acc_t>
void accumulate(const at::Tensor& accumulator, const PointAccumulateOperands& op) {
  const at::Tensor weights =
      coefficients_to_device(op.weights, accumulator.device(), accumulator.scalar_type());
  const at::Tensor groups = coefficients_to_device(op.groups.table, accumulator.device(), at::kLong);
  const int64_t count = op.groups.groups, row = op.row;
  const int64_t* starts = groups.const_data_ptr<int64_t>();
  const int64_t* group_rows = starts + count + 1;
  const int64_t* order = group_rows + count;
  const acc_t* w = weights.const_data_ptr<acc_t>();
  const grad_t* g = op.grads.const_data_ptr<grad_t>();
  acc_t* acc = accumulator.mutable_data_ptr<acc_t>();
  for_each_index(count * row, [=] __device__(int64_t i) {
    const int64_t group = i / row, d = i - group * row;
    acc_t* out = acc + group_rows[group] * row + d;
    acc_t sum = *out;
    for (int64_t q = starts[group]; q < starts[group + 1]; ++q) {
      const int64_t p = order[q];
      sum += w[p] * static_cast<acc_t>(g[p * row + d]);
    }
    *out = sum;
  });
}

void accumulate_points(const at::Tensor& accumulator, const at::Tensor& grads,
                       const at::Tensor& rows, const at::Tensor& weights) {
  PointAccumulateOperands op = prepare_point_accumulate(accumulator, grads, rows, weights);
  const c10::cuda::CUDAGuard guard(accumulator.device());
  if (op.row == 0 || op.groups.groups == 0) return;
  const bool double_acc = accumulator.scalar_type() == at::kDouble;
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, grads.scalar_type(), "accumulate_points_cuda", [&] {
        if (double_acc) {
          accumulate<scalar_t, double>(accumulator, op);
        } else {
          accumulate<scalar_t, float>(accumulator, op);
        }
      });
}

// A block per point (grid-striding over the points), reduced in double in a fixed order.
template <typename scalar_t>
__global__ void point_slopes_kernel(int64_t points, int64_t row, bool shared,
                                    const int64_t* example, const scalar_t* g, const scalar_t* x,
                                    const scalar_t* base, double* slope) {
  __shared__ double partial[kThreads];
  for (int64_t p = blockIdx.x; p < points; p += gridDim.x) {
    const int64_t b = example[p];
    double sum = 0;
    for (int64_t d = threadIdx.x; d < row; d += blockDim.x) {
      const double bv = static_cast<double>(base[shared ? d : b * row + d]);
      sum += static_cast<double>(g[p * row + d]) * (static_cast<double>(x[b * row + d]) - bv);
    }
    partial[threadIdx.x] = sum;
    __syncthreads();
    for (int half = kThreads / 2; half > 0; half /= 2) {
      if (threadIdx.x < half) partial[threadIdx.x] += partial[threadIdx.x + half];
      __syncthreads();
    }
    if (threadIdx.x == 0) slope[p] = partial[0];
    // partial[0] is read above before the next point overwrites the buffer.
    __syncthreads();
  }
}

at::Tensor point_slopes(const at::Tensor& grads, const at::Tensor& rows, const at::Tensor& inputs,
                        const at::Tensor& baselines) {
  PointSlopeOperands op = prepare_point_slopes(grads, rows, inputs, baselines);
  const c10::cuda::CUDAGuard guard(inputs.device());
  const int64_t points = op.slopes.numel();
  if (points == 0) return op.slopes;
  const at::Tensor rows_on_device = coefficients_to_device(op.rows, inputs.device(), at::kLong);
  const unsigned int blocks =
      static_cast<unsigned int>(std::min<int64_t>(points, int64_t{1} << 30));
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, grads.scalar_type(), "point_slopes_cuda", [&] {
        point_slopes_kernel<scalar_t><<<blocks, kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
            points, op.row, op.baselines.shared, rows_on_device.const_data_ptr<int64_t>(),
            op.grads.const_data_ptr<scalar_t>(), op.inputs.const_data_ptr<scalar_t>(),
            op.baselines.rows.const_data_ptr<scalar_t>(), op.slopes.mutable_data_ptr<double>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
  return op.slopes;
}

TORCH_LIBRARY_IMPL(fastattr, CUDA, m) {
  m.impl("interpolate_points", &interpolate_points);
  m.impl("accumulate_points", &accumulate_points);
  m.impl("point_slopes", &point_slopes);
}

}  // namespace fastattr::cuda
