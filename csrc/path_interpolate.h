// interpolate_path: operands shared by the CPU and CUDA kernels.
#pragma once

#include "operands.h"

namespace fastattr {

struct PathOperands {
  at::Tensor inputs;     // (B, ...), dense in `layout`
  Baselines baselines;   // one shared row or B rows, dense in `layout`
  at::Tensor alphas;     // (K,) float64 on the CPU
  at::Tensor path;       // (K * B, ...), dense in `layout`, to be written
  int64_t batch;
  int64_t row;
};

inline PathOperands prepare_path(const at::Tensor& inputs, const at::Tensor& baselines,
                                 const at::Tensor& alphas) {
  check_batched(inputs, "inputs");
  check_floating(inputs, "inputs");
  const at::MemoryFormat layout = row_layout(inputs);
  PathOperands op;
  op.inputs = inputs.contiguous(layout);
  op.baselines = prepare_baselines(baselines, inputs, layout);
  op.alphas = prepare_coefficients(alphas, "alphas", inputs, "inputs");
  op.batch = inputs.size(0);
  op.row = row_numel(inputs);
  auto sizes = inputs.sizes().vec();
  sizes[0] *= op.alphas.numel();
  op.path = at::empty(sizes, inputs.options().memory_format(layout));
  return op;
}

}  // namespace fastattr
