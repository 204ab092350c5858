// kink_flips on CUDA: a thread per (segment, unit); consecutive threads read consecutive units
// of the segment's two rows.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "../kink.h"
#include "launch.cuh"

namespace fastattr::cuda {

at::Tensor kink_flips(const at::Tensor& values, const at::Tensor& tolerance,
                      const at::Tensor& ends_a, const at::Tensor& ends_b) {
  const KinkOperands op = prepare_kink_flips(values, tolerance, ends_a, ends_b);
  const c10::cuda::CUDAGuard guard(values.device());
  const int64_t units = op.units;
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, values.scalar_type(), "kink_flips_cuda", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        const KinkData<scalar_t> data(op);
        for_each_index(op.result.numel(), [=] __device__(int64_t i) {
          const int64_t p = i / units;
          const int64_t u = i - p * units;
          const int64_t a = data.ends_a[p];
          const int64_t b = data.ends_b[p];
          data.result[i] = flips<acc_t>(data.values[a * units + u], data.tolerance[a],
                                        data.values[b * units + u], data.tolerance[b]);
        });
      });
  return op.result;
}

TORCH_LIBRARY_IMPL(fastattr, CUDA, m) { m.impl("kink_flips", &kink_flips); }

}  // namespace fastattr::cuda
