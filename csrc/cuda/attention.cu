// The transformer rules' kernels on CUDA: a block per row for the softmax rule and
// layer_norm_relevance (row sums in double, reduced in a fixed order, so results are
// deterministic), a grid-stride loop for relevance_share.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <limits>
#include <optional>
#include <type_traits>

#include "../attention.h"
#include "../lrp_formula.h"
#include "launch.cuh"

namespace fastattr::cuda {
namespace {

// The sum over the block of each thread's `value`, in a fixed order, returned to every thread.
__device__ double block_sum(double value, double* partial) {
  partial[threadIdx.x] = value;
  __syncthreads();
  for (int half = kThreads / 2; half > 0; half /= 2) {
    if (threadIdx.x < half) partial[threadIdx.x] += partial[threadIdx.x + half];
    __syncthreads();
  }
  const double total = partial[0];
  // Every thread has read partial[0] before the next row overwrites the buffer.
  __syncthreads();
  return total;
}

inline unsigned int row_blocks(int64_t rows) {
  // The grid's x dimension is capped; the kernels stride over any further rows.
  return static_cast<unsigned int>(std::min<int64_t>(rows, int64_t{1} << 30));
}

// The sum of r over the row from `first`, in double in a fixed order, to every thread.
template <typename scalar_t>
__device__ double row_total(const scalar_t* r, int64_t first, int64_t length, double* partial) {
  double total = 0;
  for (int64_t j = first + threadIdx.x; j < first + length; j += blockDim.x) {
    total += static_cast<double>(r[j]);
  }
  return block_sum(total, partial);
}

template <typename scalar_t>
__global__ void softmax_relevance_kernel(const scalar_t* x, const scalar_t* s, const scalar_t* r,
                                         scalar_t* out, int64_t rows, int64_t length) {
  using acc_t = at::opmath_type<scalar_t>;
  __shared__ double partial[kThreads];
  for (int64_t row = blockIdx.x; row < rows; row += gridDim.x) {
    const int64_t first = row * length;
    const acc_t sum = static_cast<acc_t>(row_total(r, first, length, partial));
    for (int64_t j = first + threadIdx.x; j < first + length; j += blockDim.x) {
      const acc_t xj = static_cast<acc_t>(x[j]);
      const acc_t value = xj * (static_cast<acc_t>(r[j]) - static_cast<acc_t>(s[j]) * sum);
      out[j] = static_cast<scalar_t>(
          xj == -std::numeric_limits<acc_t>::infinity() ? acc_t(0) : value);
    }
  }
}

at::Tensor softmax_relevance(const at::Tensor& inputs, const at::Tensor& probs,
                             const at::Tensor& relevance, int64_t dim) {
  const SoftmaxOperands op = prepare_softmax(inputs, probs, relevance, dim);
  const c10::cuda::CUDAGuard guard(inputs.device());
  at::Tensor moved = at::empty_like(op.inputs);
  if (op.rows > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(
        at::kHalf, at::kBFloat16, inputs.scalar_type(), "softmax_relevance_cuda", [&] {
          softmax_relevance_kernel<scalar_t>
              <<<row_blocks(op.rows), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
                  op.inputs.const_data_ptr<scalar_t>(), op.probs.const_data_ptr<scalar_t>(),
                  op.relevance.const_data_ptr<scalar_t>(), moved.mutable_data_ptr<scalar_t>(),
                  op.rows, op.length);
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        });
  }
  return softmax_result(moved, op, inputs);
}

template <typename scalar_t>
__global__ void softmax_contribution_kernel(const scalar_t* s, const scalar_t* r, scalar_t* out,
                                            int64_t rows, int64_t length,
                                            at::opmath_type<scalar_t> scale) {
  using acc_t = at::opmath_type<scalar_t>;
  __shared__ double partial[kThreads];
  for (int64_t row = blockIdx.x; row < rows; row += gridDim.x) {
    const int64_t first = row * length;
    const acc_t sum = static_cast<acc_t>(row_total(r, first, length, partial));
    for (int64_t j = first + threadIdx.x; j < first + length; j += blockDim.x) {
      out[j] = static_cast<scalar_t>(
          scale * (static_cast<acc_t>(r[j]) - static_cast<acc_t>(s[j]) * sum));
    }
  }
}

at::Tensor softmax_contribution(const at::Tensor& probs, const at::Tensor& relevance, int64_t dim,
                                double scale) {
  const SoftmaxOperands op = prepare_softmax_contribution(probs, relevance, dim);
  const c10::cuda::CUDAGuard guard(probs.device());
  at::Tensor moved = at::empty_like(op.probs);
  if (op.rows > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(
        at::kHalf, at::kBFloat16, probs.scalar_type(), "softmax_contribution_cuda", [&] {
          softmax_contribution_kernel<scalar_t>
              <<<row_blocks(op.rows), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
                  op.probs.const_data_ptr<scalar_t>(), op.relevance.const_data_ptr<scalar_t>(),
                  moved.mutable_data_ptr<scalar_t>(), op.rows, op.length,
                  static_cast<at::opmath_type<scalar_t>>(scale));
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        });
  }
  return softmax_result(moved, op, probs);
}

template <typename scalar_t>
__device__ at::opmath_type<scalar_t> layer_norm_term(const scalar_t* r, const scalar_t* y,
                                                     const scalar_t* w, int64_t j, int64_t k,
                                                     at::opmath_type<scalar_t> eps) {
  using acc_t = at::opmath_type<scalar_t>;
  const acc_t ratio = stabilized_ratio(static_cast<acc_t>(r[j]), static_cast<acc_t>(y[j]), eps);
  return w == nullptr ? ratio : ratio * static_cast<acc_t>(w[k]);
}

template <typename scalar_t>
__global__ void layer_norm_relevance_kernel(const scalar_t* x, const scalar_t* r,
                                            const scalar_t* y, const at::opmath_type<scalar_t>* rstd,
                                            const scalar_t* w, scalar_t* out, int64_t rows,
                                            int64_t length, at::opmath_type<scalar_t> eps) {
  using acc_t = at::opmath_type<scalar_t>;
  __shared__ double partial[kThreads];
  for (int64_t row = blockIdx.x; row < rows; row += gridDim.x) {
    const int64_t first = row * length;
    // Where v fits the output's dtype exactly, the first pass leaves it there for the second
    // (each thread reads back only what it wrote).
    constexpr bool keep = std::is_same_v<scalar_t, acc_t>;
    double total = 0;
    for (int64_t k = threadIdx.x; k < length; k += blockDim.x) {
      const acc_t v = layer_norm_term(r, y, w, first + k, k, eps);
      if constexpr (keep) out[first + k] = v;
      total += static_cast<double>(v);
    }
    const acc_t mean =
        static_cast<acc_t>(block_sum(total, partial) / static_cast<double>(length));
    const acc_t scale = rstd[row];
    for (int64_t k = threadIdx.x; k < length; k += blockDim.x) {
      const acc_t v = keep ? static_cast<acc_t>(out[first + k])
                           : layer_norm_term(r, y, w, first + k, k, eps);
      out[first + k] =
          static_cast<scalar_t>(static_cast<acc_t>(x[first + k]) * ((v - mean) * scale));
    }
  }
}

at::Tensor layer_norm_relevance(const at::Tensor& inputs, const at::Tensor& relevance,
                                const at::Tensor& outputs, const at::Tensor& rstd,
                                const std::optional<at::Tensor>& weight, double epsilon) {
  const LayerNormOperands op = prepare_layer_norm(inputs, relevance, outputs, rstd, weight);
  const c10::cuda::CUDAGuard guard(inputs.device());
  at::Tensor result = at::empty_like(op.inputs);
  if (op.rows > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(
        at::kHalf, at::kBFloat16, inputs.scalar_type(), "layer_norm_relevance_cuda", [&] {
          using acc_t = at::opmath_type<scalar_t>;
          layer_norm_relevance_kernel<scalar_t>
              <<<row_blocks(op.rows), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
                  op.inputs.const_data_ptr<scalar_t>(), op.relevance.const_data_ptr<scalar_t>(),
                  op.outputs.const_data_ptr<scalar_t>(), op.rstd.const_data_ptr<acc_t>(),
                  op.weight.defined() ? op.weight.const_data_ptr<scalar_t>() : nullptr,
                  result.mutable_data_ptr<scalar_t>(), op.rows, op.length,
                  static_cast<acc_t>(epsilon));
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        });
  }
  return result;
}

at::Tensor relevance_share(const at::Tensor& activations, const at::Tensor& contributions,
                           double share) {
  constexpr const char* kOp = "fastattr::relevance_share";
  PairOperands op =
      prepare_pair(kOp, activations, "activations", contributions, "contributions");
  const c10::cuda::CUDAGuard guard(activations.device());
  at::Tensor relevance = at::empty_like(op.first);
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, activations.scalar_type(), "relevance_share_cuda", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        const scalar_t* a = op.first.const_data_ptr<scalar_t>();
        const scalar_t* c = op.second.const_data_ptr<scalar_t>();
        scalar_t* out = relevance.mutable_data_ptr<scalar_t>();
        const acc_t factor = static_cast<acc_t>(share);
        for_each_index(relevance.numel(), [=] __device__(int64_t i) {
          out[i] = static_cast<scalar_t>(static_cast<acc_t>(a[i]) * static_cast<acc_t>(c[i]) *
                                         factor);
        });
      });
  return relevance;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastattr, CUDA, m) {
  m.impl("softmax_relevance", &softmax_relevance);
  m.impl("softmax_contribution", &softmax_contribution);
  m.impl("layer_norm_relevance", &layer_norm_relevance);
  m.impl("relevance_share", &relevance_share);
}

}  // namespace fastattr::cuda
