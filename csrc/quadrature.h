// The accumulator check and quadrature_finish's operands, shared by the CPU and CUDA kernels.
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
