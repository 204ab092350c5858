// kink_flips on CUDA: a thread per (segment, unit); consecutive threads read consecutive units
// of the segment's two rows.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "../kink.h"
#include "launch.cuh"

namespace fastattr::cuda {

at::Tensor kink_flips(const at::Tensor& values, const at::Tensor& tolerance,
                      const at::Tensor& ends_a, const at::Tensor& ends_b) {
  const KinkOperands op = prepare_kink_flips(values, tolerance, ends_a, ends_b);
  const c10::cuda::CUDAGuard guard(values.device());
  const int64_t segments = op.ends_a.numel();
  const int64_t units = op.values.size(1);
  at::Tensor result = at::empty({segments, units}, values.options().dtype(at::kBool));
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, values.scalar_type(), "kink_flips_cuda", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        const scalar_t* v = op.values.const_data_ptr<scalar_t>();
        const scalar_t* tol = op.tolerance.const_data_ptr<scalar_t>();
        const int64_t* a = op.ends_a.const_data_ptr<int64_t>();
        const int64_t* b = op.ends_b.const_data_ptr<int64_t>();
        bool* out = result.mutable_data_ptr<bool>();
        for_each_index(segments * units, [=] __device__(int64_t i) {
          const int64_t p = i / units;
          const int64_t u = i - p * units;
          const int64_t row_a = a[p];
          const int64_t row_b = b[p];
          out[i] = flips<acc_t>(v[row_a * units + u], tol[row_a], v[row_b * units + u],
                                tol[row_b]);
        });
      });
  return result;
}

TORCH_LIBRARY_IMPL(fastattr, CUDA, m) { m.impl("kink_flips", &kink_flips); }

}  // namespace fastattr::cuda
