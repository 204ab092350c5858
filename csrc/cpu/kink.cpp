// kink_flips on the CPU: one pass over each segment's two rows.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "../kink.h"
#include "rowwise.h"

namespace fastattr::cpu {
namespace {

at::Tensor kink_flips(const at::Tensor& values, const at::Tensor& tolerance,
                      const at::Tensor& ends_a, const at::Tensor& ends_b) {
  const KinkOperands op = prepare_kink_flips(values, tolerance, ends_a, ends_b);
  const int64_t units = op.units;
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, values.scalar_type(), "kink_flips_cpu", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        const KinkData<scalar_t> data(op);
        const int64_t segments = op.ends_a.numel();
        at::parallel_for(0, segments, rows_per_task(units), [&](int64_t begin, int64_t end) {
          for (int64_t p = begin; p < end; ++p) {
            const int64_t a = data.ends_a[p];
            const int64_t b = data.ends_b[p];
            const scalar_t* at_a = data.values + a * units;
            const scalar_t* at_b = data.values + b * units;
            const acc_t tol_a = data.tolerance[a];
            const acc_t tol_b = data.tolerance[b];
            bool* row = data.result + p * units;
            for (int64_t u = 0; u < units; ++u) {
              row[u] = flips<acc_t>(at_a[u], tol_a, at_b[u], tol_b);
            }
          }
        });
      });
  return op.result;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastattr, CPU, m) { m.impl("kink_flips", &kink_flips); }

}  // namespace fastattr::cpu
