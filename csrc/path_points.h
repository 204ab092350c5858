// interpolate_points and accumulate_points: operands shared by the CPU and CUDA kernels.
//
// A path point is a row of the inputs (an example) and a position alpha on its path, or, when
// accumulating, a row of the accumulator and a quadrature weight. The point tables (rows,
// alphas, weights) are planned on the host; a table on the device is accepted too, at the
// cost of a copy to the host (a synchronization).
#pragma once

#include <ATen/ops/empty.h>

#include <algorithm>
#include <numeric>
#include <vector>

#include "quadrature.h"

namespace fastattr {

// The rows of `count` that the points belong to, on the host; the kernels index with them.
inline at::Tensor prepare_rows(const char* op, const at::Tensor& rows, int64_t count,
                               const at::Tensor& data) {
  at::Tensor host = host_table(op, rows, "rows", at::kLong, data);
  const int64_t* values = host.const_data_ptr<int64_t>();
  for (int64_t p = 0; p < host.numel(); ++p) {
    TORCH_CHECK_INDEX(values[p] >= 0 && values[p] < count, op, ": rows out of range");
  }
  return host;
}

// A coefficient table (alphas, weights) of one float64 entry per point, on the host.
inline at::Tensor prepare_coefficients(const char* op, const at::Tensor& coefficients,
                                       const char* name, const at::Tensor& rows,
                                       const at::Tensor& data) {
  at::Tensor host = host_table(op, coefficients, name, at::kDouble, data);
  TORCH_CHECK_VALUE(host.numel() == rows.numel(), op, ": ", name, " length mismatch");
  return host;
}

struct PointPathOperands {
  at::Tensor inputs;    // (B, ...), dense in `layout`
  Baselines baselines;  // one shared row or B rows, dense in `layout`
  at::Tensor rows;      // (P,) int64 on the CPU
  at::Tensor alphas;    // (P,) float64 on the CPU
  at::Tensor path;      // (P, ...), dense in `layout`, to be written
  int64_t row;          // elements per row
};

inline PointPathOperands prepare_point_path(const at::Tensor& inputs, const at::Tensor& baselines,
                                            const at::Tensor& rows, const at::Tensor& alphas) {
  constexpr const char* kOp = "fastattr::interpolate_points";
  check_batched(kOp, inputs, "inputs");
  check_floating(kOp, inputs, "inputs");
  const at::MemoryFormat layout = row_layout(inputs);
  PointPathOperands op;
  op.baselines = prepare_baselines(kOp, baselines, inputs, layout);
  op.rows = prepare_rows(kOp, rows, inputs.size(0), inputs);
  op.alphas = prepare_coefficients(kOp, alphas, "alphas", op.rows, inputs);
  op.inputs = inputs.contiguous(layout);
  op.row = row_numel(inputs);
  auto sizes = inputs.sizes().vec();
  sizes[0] = op.rows.numel();
  op.path = at::empty(sizes, inputs.options().memory_format(layout));
  return op;
}

// The points grouped by the accumulator row they add to, each group in the points' order, so
// that every row is written by one worker adding its points in a fixed order (deterministic,
// no atomics). Group g holds the points order[starts[g] .. starts[g + 1]), all adding to row
// group_rows[g]. One int64 table: [starts (G + 1) | group_rows (G) | order (P)].
struct PointGroups {
  at::Tensor table;
  int64_t groups = 0;
  const int64_t* starts() const { return table.const_data_ptr<int64_t>(); }
  const int64_t* group_rows() const { return starts() + groups + 1; }
  const int64_t* order() const { return group_rows() + groups; }
};

inline PointGroups group_points(const at::Tensor& rows) {
  const int64_t points = rows.numel();
  const int64_t* row = rows.const_data_ptr<int64_t>();
  std::vector<int64_t> order(static_cast<size_t>(points));
  std::iota(order.begin(), order.end(), int64_t{0});
  int64_t low = 0, high = -1;
  if (points > 0) {
    const auto [min, max] = std::minmax_element(row, row + points);
    low = *min;
    high = *max;
  }
  if (high - low < 4 * points) {
    // A counting sort over the span of rows touched: linear in the points when, as the
    // engine plans them, they touch a compact range of rows.
    std::vector<int64_t> next(static_cast<size_t>(high - low + 2), 0);
    for (int64_t p = 0; p < points; ++p) ++next[row[p] - low + 1];
    std::partial_sum(next.begin(), next.end(), next.begin());
    for (int64_t p = 0; p < points; ++p) order[next[row[p] - low]++] = p;
  } else {
    std::stable_sort(order.begin(), order.end(),
                     [row](int64_t a, int64_t b) { return row[a] < row[b]; });
  }
  int64_t groups = 0;
  for (int64_t q = 0; q < points; ++q) groups += q == 0 || row[order[q]] != row[order[q - 1]];
  PointGroups result;
  result.groups = groups;
  result.table = at::empty({2 * groups + 1 + points}, at::kLong);
  int64_t* starts = result.table.mutable_data_ptr<int64_t>();
  int64_t* group_rows = starts + groups + 1;
  int64_t group = 0;
  for (int64_t q = 0; q < points; ++q) {
    if (q == 0 || row[order[q]] != row[order[q - 1]]) {
      starts[group] = q;
      group_rows[group] = row[order[q]];
      ++group;
    }
  }
  starts[groups] = points;
  std::copy(order.begin(), order.end(), group_rows + groups);
  return result;
}

struct PointAccumulateOperands {
  at::Tensor grads;    // (P, ...), dense in the accumulator's layout
  at::Tensor weights;  // (P,) float64 on the CPU
  PointGroups groups;
  int64_t row;         // elements per row
};

inline PointAccumulateOperands prepare_point_accumulate(const at::Tensor& accumulator,
                                                        const at::Tensor& grads,
                                                        const at::Tensor& rows,
                                                        const at::Tensor& weights) {
  constexpr const char* kOp = "fastattr::accumulate_points";
  check_accumulator(kOp, accumulator);
  check_batched(kOp, grads, "grads");
  check_floating(kOp, grads, "grads");
  check_same_device(kOp, grads, "grads", accumulator);
  // The kernels add float64 grads only into a float64 accumulator.
  TORCH_CHECK_TYPE(
      !(grads.scalar_type() == at::kDouble && accumulator.scalar_type() != at::kDouble), kOp,
      ": accumulator dtype mismatch");
  PointAccumulateOperands op;
  const at::Tensor host_rows = prepare_rows(kOp, rows, accumulator.size(0), accumulator);
  op.weights = prepare_coefficients(kOp, weights, "weights", host_rows, grads);
  TORCH_CHECK_VALUE(grads.dim() == accumulator.dim() &&
                        grads.sizes().slice(1) == accumulator.sizes().slice(1) &&
                        grads.size(0) == host_rows.numel(),
                    kOp, ": grads shape mismatch");
  op.grads = grads.contiguous(row_layout(accumulator));
  op.groups = group_points(host_rows);
  op.row = row_numel(accumulator);
  return op;
}

struct PointSlopeOperands {
  at::Tensor grads;     // (P, ...), dense in the inputs' layout
  at::Tensor inputs;    // (B, ...), dense in `layout`
  Baselines baselines;  // one shared row or B rows, dense in `layout`
  at::Tensor rows;      // (P,) int64 on the CPU
  at::Tensor slopes;    // (P,) float64, to be written
  int64_t row;          // elements per row
};

inline PointSlopeOperands prepare_point_slopes(const at::Tensor& grads, const at::Tensor& rows,
                                               const at::Tensor& inputs,
                                               const at::Tensor& baselines) {
  constexpr const char* kOp = "fastattr::point_slopes";
  check_batched(kOp, grads, "grads");
  check_floating(kOp, grads, "grads");
  check_batched(kOp, inputs, "inputs");
  check_same_device(kOp, inputs, "inputs", grads);
  check_same_dtype(kOp, inputs, "inputs", grads);
  const at::MemoryFormat layout = row_layout(inputs);
  PointSlopeOperands op;
  op.baselines = prepare_baselines(kOp, baselines, inputs, layout);
  op.rows = prepare_rows(kOp, rows, inputs.size(0), inputs);
  TORCH_CHECK_VALUE(grads.dim() == inputs.dim() &&
                        grads.sizes().slice(1) == inputs.sizes().slice(1) &&
                        grads.size(0) == op.rows.numel(),
                    kOp, ": grads shape mismatch");
  op.inputs = inputs.contiguous(layout);
  op.grads = grads.contiguous(layout);
  op.row = row_numel(inputs);
  op.slopes = at::empty({op.rows.numel()}, inputs.options().dtype(at::kDouble));
  return op;
}

}  // namespace fastattr
