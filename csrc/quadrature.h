// The accumulator check and quadrature_finish's operands, shared by the CPU and CUDA kernels.
#pragma once

#include "operands.h"

namespace fastattr {

// The kernels write the accumulator's memory in place, as dense rows.
inline void check_accumulator(const char* op, const at::Tensor& accumulator) {
  check_batched(op, accumulator, "accumulator");
  const auto dtype = accumulator.scalar_type();
  TORCH_CHECK_TYPE(dtype == at::kFloat || dtype == at::kDouble, op,
                   ": accumulator has unsupported dtype ", dtype);
  TORCH_CHECK_VALUE(accumulator.is_contiguous(row_layout(accumulator)), op,
                    ": accumulator is not dense");
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
  constexpr const char* kOp = "fastattr::quadrature_finish";
  check_accumulator(kOp, accumulator);
  check_floating(kOp, inputs, "inputs");
  check_same_device(kOp, inputs, "inputs", accumulator);
  check_same_shape(kOp, inputs, "inputs", accumulator);
  const at::MemoryFormat layout = row_layout(accumulator);
  FinishOperands op;
  op.accumulator = accumulator;
  op.inputs = inputs.contiguous(layout);
  op.baselines = prepare_baselines(kOp, baselines, inputs, layout);
  op.attributions = at::empty_like(accumulator, accumulator.options().memory_format(layout));
  op.row_sums = at::empty({accumulator.size(0)}, accumulator.options());
  op.row = row_numel(accumulator);
  return op;
}

}  // namespace fastattr
