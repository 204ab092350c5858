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

// The rows of `count` that the points belong to: 1-D, int64, each in [0, count), on the host.
inline at::Tensor prepare_rows(const at::Tensor& rows, int64_t count, const char* count_name,
                               const at::Tensor& data, const char* data_name) {
  TORCH_CHECK_VALUE(rows.dim() == 1, "rows must be 1-D, got shape ", rows.sizes());
  TORCH_CHECK_TYPE(rows.scalar_type() == at::kLong, "rows must be int64, got ",
                   rows.scalar_type());
  TORCH_CHECK_VALUE(rows.is_cpu() || rows.device() == data.device(),
                    "rows must be on the CPU or on the device of ", data_name, " (",
                    data.device(), "), got ", rows.device());
  at::Tensor host = rows.cpu().contiguous();
  const int64_t* values = host.const_data_ptr<int64_t>();
  for (int64_t p = 0; p < host.numel(); ++p) {
    TORCH_CHECK_INDEX(values[p] >= 0 && values[p] < count, "rows must index the ", count,
                      " rows of ", count_name, ", got ", values[p], " at index ", p);
  }
  return host;
}

inline void check_table_length(const at::Tensor& table, const char* name, const at::Tensor& rows) {
  TORCH_CHECK_VALUE(table.numel() == rows.numel(), name, " must have one entry per point (",
                    rows.numel(), " rows), got ", table.numel());
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
  check_batched(inputs, "inputs");
  check_floating(inputs, "inputs");
  const at::MemoryFormat layout = row_layout(inputs);
  PointPathOperands op;
  op.baselines = prepare_baselines(baselines, inputs, layout);
  op.rows = prepare_rows(rows, inputs.size(0), "inputs", inputs, "inputs");
  op.alphas = prepare_coefficients(alphas, "alphas", inputs, "inputs");
  check_table_length(op.alphas, "alphas", op.rows);
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
  check_accumulator(accumulator);
  check_batched(grads, "grads");
  check_floating(grads, "grads");
  check_same_device(grads, "grads", accumulator, "accumulator");
  TORCH_CHECK_TYPE(
      !(grads.scalar_type() == at::kDouble && accumulator.scalar_type() != at::kDouble),
      "accumulator must be float64 for float64 grads, got ", accumulator.scalar_type());
  PointAccumulateOperands op;
  const at::Tensor host_rows =
      prepare_rows(rows, accumulator.size(0), "accumulator", accumulator, "accumulator");
  op.weights = prepare_coefficients(weights, "weights", grads, "grads");
  check_table_length(op.weights, "weights", host_rows);
  TORCH_CHECK_VALUE(grads.dim() == accumulator.dim() &&
                        grads.sizes().slice(1) == accumulator.sizes().slice(1) &&
                        grads.size(0) == host_rows.numel(),
                    "grads must have shape (", host_rows.numel(),
                    ", ...) matching the rows and the accumulator of shape ",
                    accumulator.sizes(), ", got ", grads.sizes());
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
  check_batched(grads, "grads");
  check_floating(grads, "grads");
  check_batched(inputs, "inputs");
  check_same_device(inputs, "inputs", grads, "grads");
  check_same_dtype(inputs, "inputs", grads, "grads");
  const at::MemoryFormat layout = row_layout(inputs);
  PointSlopeOperands op;
  op.baselines = prepare_baselines(baselines, inputs, layout);
  op.rows = prepare_rows(rows, inputs.size(0), "inputs", inputs, "inputs");
  TORCH_CHECK_VALUE(grads.dim() == inputs.dim() && grads.sizes().slice(1) == inputs.sizes().slice(1) &&
                        grads.size(0) == op.rows.numel(),
                    "grads must have shape (", op.rows.numel(),
                    ", ...) matching the rows and the inputs of shape ", inputs.sizes(), ", got ",
                    grads.sizes());
  op.inputs = inputs.contiguous(layout);
  op.grads = grads.contiguous(layout);
  op.row = row_numel(inputs);
  op.slopes = at::empty({op.rows.numel()}, inputs.options().dtype(at::kDouble));
  return op;
}

}  // namespace fastattr
