// LRP's element-wise ops: operands shared by the CPU and CUDA kernels.
#pragma once

#include "operands.h"

namespace fastattr {

struct PairOperands {
  at::Tensor first;   // dense
  at::Tensor second;  // dense in the same layout
};

// The element-wise kernels walk their operands as flat arrays, so any dense layout will do:
// the leading operand is read where it lies (a permuted view, as attention's query, key and
// value are), the others are brought to its layout, and the output takes it. A leading operand
// that is not dense is copied as empty_like lays it out, so the output is empty_like's.
inline at::Tensor dense_leading(const at::Tensor& first) {
  return first.is_non_overlapping_and_dense() ? first : at::empty_like(first).copy_(first);
}

inline at::Tensor in_layout_of(const at::Tensor& other, const at::Tensor& dense) {
  return other.strides() == dense.strides() ? other : at::empty_like(dense).copy_(other);
}

inline PairOperands prepare_pair(const char* op, const at::Tensor& first, const char* first_name,
                                 const at::Tensor& second, const char* second_name) {
  check_floating(op, first, first_name);
  check_like(op, second, second_name, first);
  at::Tensor dense = dense_leading(first);
  return {dense, in_layout_of(second, dense)};
}

// A third operand, checked against the leading one, in the pair's layout.
inline at::Tensor prepare_third(const char* op, const PairOperands& pair, const at::Tensor& third,
                                const char* name) {
  check_like(op, third, name, pair.first);
  return in_layout_of(third, pair.first);
}

}  // namespace fastattr
