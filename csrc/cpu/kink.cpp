// kink_flips on the CPU: one pass over each segment's two rows.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include "../kink.h"
#include "rowwise.h"

namespace fastattr::cpu {
namespace {

at::Tensor kink_flips(const at::Tensor& values, const at::Tensor& tolerance,
                      const at::Tensor& ends_a, const at::Tensor& ends_b) {
  const KinkOperands op = prepare_kink_flips(values, tolerance, ends_a, ends_b);
  const int64_t segments = op.ends_a.numel();
  const int64_t units = op.values.size(1);
  at::Tensor result = at::empty({segments, units}, values.options().dtype(at::kBool));
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, values.scalar_type(), "kink_flips_cpu", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        const scalar_t* v = op.values.const_data_ptr<scalar_t>();
        const scalar_t* tol = op.tolerance.const_data_ptr<scalar_t>();
        const int64_t* a = op.ends_a.const_data_ptr<int64_t>();
        const int64_t* b = op.ends_b.const_data_ptr<int64_t>();
        bool* out = result.mutable_data_ptr<bool>();
        at::parallel_for(0, segments, rows_per_task(units), [&](int64_t begin, int64_t end) {
          for (int64_t p = begin; p < end; ++p) {
            const scalar_t* at_a = v + a[p] * units;
            const scalar_t* at_b = v + b[p] * units;
            const acc_t tol_a = tol[a[p]];
            const acc_t tol_b = tol[b[p]];
            bool* row = out + p * units;
            for (int64_t u = 0; u < units; ++u) {
              row[u] = flips<acc_t>(at_a[u], tol_a, at_b[u], tol_b);
            }
          }
        });
      });
  return result;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastattr, CPU, m) { m.impl("kink_flips", &kink_flips); }

}  // namespace fastattr::cpu
