// interpolate_points, accumulate_points and point_slopes on the CPU.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include "../path_points.h"
#include "rowwise.h"

namespace fastattr::cpu {
namespace {

at::Tensor interpolate_points(const at::Tensor& inputs, const at::Tensor& baselines,
                              const at::Tensor& rows, const at::Tensor& alphas) {
  PointPathOperands op = prepare_point_path(inputs, baselines, rows, alphas);
  const int64_t row = op.row, points = op.path.size(0);
  const bool shared = op.baselines.shared;
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, inputs.scalar_type(), "interpolate_points_cpu", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        const scalar_t* x = op.inputs.const_data_ptr<scalar_t>();
        const scalar_t* base = op.baselines.rows.const_data_ptr<scalar_t>();
        const int64_t* example = op.rows.const_data_ptr<int64_t>();
        const double* alpha = op.alphas.const_data_ptr<double>();
        scalar_t* path = op.path.mutable_data_ptr<scalar_t>();
        at::parallel_for(0, points, rows_per_task(row), [&](int64_t begin, int64_t end) {
          for (int64_t p = begin; p < end; ++p) {
            const int64_t b = example[p];
            const acc_t a = static_cast<acc_t>(alpha[p]);
            const scalar_t* xr = x + b * row;
            const scalar_t* br = base + (shared ? 0 : b * row);
            scalar_t* out = path + p * row;
            for (int64_t d = 0; d < row; ++d) {
              const acc_t bv = static_cast<acc_t>(br[d]);
              out[d] = static_cast<scalar_t>(bv + a * (static_cast<acc_t>(xr[d]) - bv));
            }
          }
        });
      });
  return op.path;
}

// Each task owns a slice of the columns of some accumulator rows and adds that row's points
// to it in their order, so that the result does not depend on the split.
template <typename grad_t, typename acc_t>
void accumulate(acc_t* acc, const grad_t* grads, const double* weights,
                const PointGroups& groups, int64_t row) {
  constexpr int64_t kColumns = int64_t{1} << 14;
  const int64_t slices = (row + kColumns - 1) / kColumns;
  const int64_t* starts = groups.starts();
  const int64_t* group_rows = groups.group_rows();
  const int64_t* order = groups.order();
  // Enough slices per task that thread start-up stays negligible.
  const int64_t grain = std::max<int64_t>(1, kColumns / std::max<int64_t>(row, 1));
  at::parallel_for(0, groups.groups * slices, grain, [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      const int64_t g = item / slices, slice = item - g * slices;
      const int64_t low = slice * kColumns, high = std::min(row, low + kColumns);
      acc_t* out = acc + group_rows[g] * row;
      for (int64_t q = starts[g]; q < starts[g + 1]; ++q) {
        const int64_t p = order[q];
        const acc_t w = static_cast<acc_t>(weights[p]);
        const grad_t* gp = grads + p * row;
        for (int64_t j = low; j < high; ++j) out[j] += w * static_cast<acc_t>(gp[j]);
      }
    }
  });
}

void accumulate_points(const at::Tensor& accumulator, const at::Tensor& grads,
                       const at::Tensor& rows, const at::Tensor& weights) {
  PointAccumulateOperands op = prepare_point_accumulate(accumulator, grads, rows, weights);
  if (op.row == 0 || op.groups.groups == 0) return;
  const bool double_acc = accumulator.scalar_type() == at::kDouble;
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, grads.scalar_type(), "accumulate_points_cpu", [&] {
        const scalar_t* g = op.grads.const_data_ptr<scalar_t>();
        const double* w = op.weights.const_data_ptr<double>();
        if (double_acc) {
          accumulate(accumulator.mutable_data_ptr<double>(), g, w, op.groups, op.row);
        } else {
          accumulate(accumulator.mutable_data_ptr<float>(), g, w, op.groups, op.row);
        }
      });
}

at::Tensor point_slopes(const at::Tensor& grads, const at::Tensor& rows, const at::Tensor& inputs,
                        const at::Tensor& baselines) {
  PointSlopeOperands op = prepare_point_slopes(grads, rows, inputs, baselines);
  const int64_t row = op.row, points = op.slopes.numel();
  const bool shared = op.baselines.shared;
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, grads.scalar_type(), "point_slopes_cpu", [&] {
        const scalar_t* g = op.grads.const_data_ptr<scalar_t>();
        const scalar_t* x = op.inputs.const_data_ptr<scalar_t>();
        const scalar_t* base = op.baselines.rows.const_data_ptr<scalar_t>();
        const int64_t* example = op.rows.const_data_ptr<int64_t>();
        double* slope = op.slopes.mutable_data_ptr<double>();
        at::parallel_for(0, points, rows_per_task(row), [&](int64_t begin, int64_t end) {
          for (int64_t p = begin; p < end; ++p) {
            const int64_t b = example[p];
            const scalar_t* xr = x + b * row;
            const scalar_t* br = base + (shared ? 0 : b * row);
            const scalar_t* gp = g + p * row;
            double sum = 0;
            for (int64_t d = 0; d < row; ++d) {
              const double diff = static_cast<double>(xr[d]) - static_cast<double>(br[d]);
              sum += static_cast<double>(gp[d]) * diff;
            }
            slope[p] = sum;
          }
        });
      });
  return op.slopes;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastattr, CPU, m) {
  m.impl("interpolate_points", &interpolate_points);
  m.impl("accumulate_points", &accumulate_points);
  m.impl("point_slopes", &point_slopes);
}

}  // namespace fastattr::cpu
