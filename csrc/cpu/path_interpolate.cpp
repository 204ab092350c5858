// interpolate_path on the CPU.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include "../path_interpolate.h"
#include "rowwise.h"

namespace fastattr::cpu {
namespace {

at::Tensor interpolate_path(const at::Tensor& inputs, const at::Tensor& baselines,
                            const at::Tensor& alphas) {
  PathOperands op = prepare_path(inputs, baselines, alphas);
  const int64_t batch = op.batch, row = op.row, rows = op.path.size(0);
  const bool shared = op.baselines.shared;
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, inputs.scalar_type(), "interpolate_path_cpu", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        const scalar_t* x = op.inputs.const_data_ptr<scalar_t>();
        const scalar_t* base = op.baselines.rows.const_data_ptr<scalar_t>();
        const double* alpha = op.alphas.const_data_ptr<double>();
        scalar_t* path = op.path.mutable_data_ptr<scalar_t>();
        at::parallel_for(0, rows, rows_per_task(row), [&](int64_t begin, int64_t end) {
          for (int64_t r = begin; r < end; ++r) {
            const int64_t step = r / batch, b = r - step * batch;
            const acc_t a = static_cast<acc_t>(alpha[step]);
            const scalar_t* xr = x + b * row;
            const scalar_t* br = base + (shared ? 0 : b * row);
            scalar_t* out = path + r * row;
            for (int64_t d = 0; d < row; ++d) {
              const acc_t bv = static_cast<acc_t>(br[d]);
              out[d] = static_cast<scalar_t>(bv + a * (static_cast<acc_t>(xr[d]) - bv));
            }
          }
        });
      });
  return op.path;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastattr, CPU, m) { m.impl("interpolate_path", &interpolate_path); }

}  // namespace fastattr::cpu
