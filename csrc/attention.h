// The transformer rules' kernels (AttnLRP): argument guards and operands shared by the CPU and
// CUDA kernels.
#pragma once

#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>

#include <cstdint>
#include <optional>

#include "lrp_epsilon.h"

namespace fastattr {

// `t` with dimension `dim` moved last, dense.
inline at::Tensor moved_last(const at::Tensor& t, int64_t dim) {
  return t.movedim(dim, -1).contiguous();
}

// softmax_relevance's and softmax_contribution's operands with the softmax dimension moved
// last, dense; `rows` rows of `length` elements (`inputs` undefined for softmax_contribution).
struct SoftmaxOperands {
  at::Tensor inputs;
  at::Tensor probs;
  at::Tensor relevance;
  int64_t dim;
  int64_t rows;
  int64_t length;
};

// The operands of probs and relevance (of one shape), without inputs.
inline SoftmaxOperands softmax_rows(const char* op, const at::Tensor& probs,
                                    const at::Tensor& relevance, int64_t dim) {
  TORCH_CHECK_VALUE(dim >= -probs.dim() && dim < probs.dim(), op, ": dim out of range");
  const int64_t wrapped = dim < 0 ? dim + probs.dim() : dim;
  const int64_t length = probs.size(wrapped);
  const int64_t rows = length == 0 ? 0 : probs.numel() / length;
  return {at::Tensor(), moved_last(probs, wrapped), moved_last(relevance, wrapped), wrapped, rows,
          length};
}

inline SoftmaxOperands prepare_softmax(const at::Tensor& inputs, const at::Tensor& probs,
                                       const at::Tensor& relevance, int64_t dim) {
  constexpr const char* kOp = "fastattr::softmax_relevance";
  check_floating(kOp, inputs, "inputs");
  check_like(kOp, probs, "probs", inputs);
  check_like(kOp, relevance, "relevance", inputs);
  SoftmaxOperands operands = softmax_rows(kOp, probs, relevance, dim);
  operands.inputs = moved_last(inputs, operands.dim);
  return operands;
}

inline SoftmaxOperands prepare_softmax_contribution(const at::Tensor& probs,
                                                    const at::Tensor& relevance, int64_t dim) {
  constexpr const char* kOp = "fastattr::softmax_contribution";
  check_floating(kOp, probs, "probs");
  check_like(kOp, relevance, "relevance", probs);
  return softmax_rows(kOp, probs, relevance, dim);
}

// The result computed into `moved` (dense, the softmax dimension last), in `like`'s shape.
inline at::Tensor softmax_result(const at::Tensor& moved, const SoftmaxOperands& op,
                                 const at::Tensor& like) {
  if (op.dim == like.dim() - 1) return moved;
  return moved.movedim(-1, op.dim).contiguous();
}

// layer_norm_relevance's operands, dense: `rows` rows of `length` normalized elements.
struct LayerNormOperands {
  at::Tensor inputs;
  at::Tensor relevance;
  at::Tensor outputs;
  at::Tensor rstd;
  at::Tensor weight;  // undefined when absent
  int64_t rows;
  int64_t length;
};

inline LayerNormOperands prepare_layer_norm(const at::Tensor& inputs, const at::Tensor& relevance,
                                            const at::Tensor& outputs, const at::Tensor& rstd,
                                            const std::optional<at::Tensor>& weight) {
  constexpr const char* kOp = "fastattr::layer_norm_relevance";
  check_floating(kOp, inputs, "inputs");
  check_like(kOp, relevance, "relevance", inputs);
  check_like(kOp, outputs, "outputs", inputs);
  check_same_device(kOp, rstd, "rstd", inputs);
  // The kernels read rstd in the precision they compute in.
  TORCH_CHECK_TYPE(rstd.scalar_type() == at::toOpMathType(inputs.scalar_type()), kOp,
                   ": rstd dtype mismatch");
  int64_t kept = 0;  // the leading dimensions rstd shares with inputs; the rest are normalized
  while (kept < rstd.dim() && kept < inputs.dim() && rstd.size(kept) == inputs.size(kept)) ++kept;
  bool shaped = rstd.dim() == inputs.dim() && inputs.dim() > 0;
  for (int64_t d = kept; shaped && d < rstd.dim(); ++d) shaped = rstd.size(d) == 1;
  TORCH_CHECK_VALUE(shaped, kOp, ": rstd shape mismatch");
  int64_t length = 1;
  for (int64_t d = kept; d < inputs.dim(); ++d) length *= inputs.size(d);
  at::Tensor weight_dense;
  if (weight.has_value() && weight->defined()) {
    check_same_device(kOp, *weight, "weight", inputs);
    check_same_dtype(kOp, *weight, "weight", inputs);
    TORCH_CHECK_VALUE(weight->numel() == length, kOp, ": weight shape mismatch");
    weight_dense = weight->contiguous();
  }
  return {inputs.contiguous(), relevance.contiguous(), outputs.contiguous(), rstd.contiguous(),
          weight_dense, rstd.numel(), length};
}

}  // namespace fastattr
