// Launch helpers shared by the CUDA kernels: grid-stride element loops and row reductions,
// always on the current stream.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

namespace fastattr::cuda {

constexpr int kThreads = 256;

// A coefficient table (alphas, weights), on the CPU or already on `device`, in `dtype` on
// `device`. A host table's copy goes through pinned memory without blocking: from pageable
// memory it would make the host wait for the stream to drain on every call, serialising
// chunked attribution with the GPU.
inline at::Tensor coefficients_to_device(const at::Tensor& table, at::Device device,
                                         at::ScalarType dtype) {
  if (!table.is_cpu()) return table.to(dtype);
  return table.to(dtype).pin_memory().to(device, dtype, /*non_blocking=*/true);
}

// Enough blocks to fill the device; the grid-stride loop covers the rest.
inline int grid_for(int64_t n) {
  int device = 0, sms = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  const int64_t blocks = (n + kThreads - 1) / kThreads;
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(blocks, int64_t{sms} * 16)));
}

template <typename F>
__global__ void for_each_index_kernel(int64_t n, F f) {
  const int64_t stride = int64_t{blockDim.x} * gridDim.x;
  for (int64_t i = int64_t{blockIdx.x} * blockDim.x + threadIdx.x; i < n; i += stride) f(i);
}

// f(i) for every i in [0, n); consecutive threads take consecutive i, so access is coalesced.
template <typename F>
void for_each_index(int64_t n, const F& f) {
  if (n == 0) return;
  for_each_index_kernel<<<grid_for(n), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(n, f);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// A block per row (grid-striding over the rows): out[j] = term(b, j) and row_sums[b] =
// sum_j term(b, j), accumulated in double as on the CPU and reduced in a fixed order so that
// results are deterministic.
template <typename out_t, typename sum_t, typename Term>
__global__ void rowwise_terms_kernel(int64_t batch, int64_t row, out_t* out, sum_t* row_sums,
                                     Term term) {
  __shared__ double partial[kThreads];
  for (int64_t b = blockIdx.x; b < batch; b += gridDim.x) {
    double sum = 0;
    for (int64_t j = b * row + threadIdx.x; j < (b + 1) * row; j += blockDim.x) {
      const auto value = term(b, j);
      out[j] = static_cast<out_t>(value);
      sum += static_cast<double>(value);
    }
    partial[threadIdx.x] = sum;
    __syncthreads();
    for (int half = kThreads / 2; half > 0; half /= 2) {
      if (threadIdx.x < half) partial[threadIdx.x] += partial[threadIdx.x + half];
      __syncthreads();
    }
    if (threadIdx.x == 0) row_sums[b] = static_cast<sum_t>(partial[0]);
    // partial[0] is read above before the next row overwrites the buffer.
    __syncthreads();
  }
}

template <typename out_t, typename sum_t, typename Term>
void rowwise_terms(int64_t batch, int64_t row, out_t* out, sum_t* row_sums, const Term& term) {
  if (batch == 0) return;
  // The grid's x dimension is capped; the kernel strides over any further rows.
  const int64_t blocks = std::min<int64_t>(batch, int64_t{1} << 30);
  rowwise_terms_kernel<<<static_cast<unsigned int>(blocks), kThreads, 0,
                         c10::cuda::getCurrentCUDAStream()>>>(batch, row, out, row_sums, term);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace fastattr::cuda
