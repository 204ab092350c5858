// quadrature_accumulate and quadrature_finish: operands shared by the CPU and CUDA kernels.
#pragma once

#include "operands.h"

namespace fastattr {

inline void check_accumulator(const at::Tensor& accumulator) {
  check_batched(accumulator, "accumulator");
  const auto dtype = accumulator.scalar_type();
  TORCH_CHECK_TYPE(dtype == at::kFloat || dtype == at::kDouble,
                   "accumulator must be float32 or float64, got ", dtype);
  TORCH_CHECK_VALUE(accumulator.is_contiguous(row_layout(accumulator)),
                    "accumulator must be contiguous (or channels_last), got strides ",
                    accumulator.strides());
}

struct AccumulateOperands {
  at::Tensor grads;    // (K * B, ...), dense in the accumulator's layout
  at::Tensor weights;  // (K,) float64 on the CPU
  int64_t block;       // B * row: the elements of one step
};

inline AccumulateOperands prepare_accumulate(const at::Tensor& accumulator,
                                             const at::Tensor& grads,
                                             const at::Tensor& weights) {
  check_accumulator(accumulator);
  check_batched(grads, "grads");
  check_floating(grads, "grads");
  check_same_device(grads, "grads", accumulator, "accumulator");
  TORCH_CHECK_TYPE(!(grads.scalar_type() == at::kDouble && accumulator.scalar_type() != at::kDouble),
                   "accumulator must be float64 for float64 grads, got ",
                   accumulator.scalar_type());
  AccumulateOperands op;
  op.weights = prepare_coefficients(weights, "weights", grads, "grads");
  const int64_t steps = op.weights.numel();
  const int64_t batch = accumulator.size(0);
  TORCH_CHECK_VALUE(grads.dim() == accumulator.dim() &&
                        grads.sizes().slice(1) == accumulator.sizes().slice(1) &&
                        grads.size(0) == steps * batch,
                    "grads must have shape (", steps, " * ", batch, ", ...) matching the ",
                    steps, " weights and the accumulator of shape ", accumulator.sizes(),
                    ", got ", grads.sizes());
  op.grads = grads.contiguous(row_layout(accumulator));
  op.block = accumulator.numel();
  return op;
}

struct FinishOperands {
  at::Tensor accumulator;  // (B, ...), dense
  at::Tensor inputs;       // (B, ...), dense in the accumulator's layout
  Baselines baselines;
  at::Tensor attributions;  // (B, ...) in the accumulator's dtype and layout, to be written
  at::Tensor row_sums;      // (B,) in the accumulator's dtype, to be written
  int64_t row;
};

inline FinishOperands prepare_finish(const at::Tensor& accumulator, const at::Tensor& inputs,
                                     const at::Tensor& baselines) {
  check_accumulator(accumulator);
  check_floating(inputs, "inputs");
  check_same_device(inputs, "inputs", accumulator, "accumulator");
  check_same_shape(inputs, "inputs", accumulator, "accumulator");
  const at::MemoryFormat layout = row_layout(accumulator);
  FinishOperands op;
  op.accumulator = accumulator;
  op.inputs = inputs.contiguous(layout);
  op.baselines = prepare_baselines(baselines, inputs, layout);
  op.attributions = at::empty_like(accumulator, accumulator.options().memory_format(layout));
  op.row_sums = at::empty({accumulator.size(0)}, accumulator.options());
  op.row = row_numel(accumulator);
  return op;
}

}  // namespace fastattr
