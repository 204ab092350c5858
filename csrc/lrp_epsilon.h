// LRP's element-wise ops: operands shared by the CPU and CUDA kernels.
#pragma once

#include "operands.h"

namespace fastattr {

struct PairOperands {
  at::Tensor first;   // dense in `first`'s layout
  at::Tensor second;  // dense in the same layout
};

// `other`, checked against `first`, dense in `first`'s layout.
inline at::Tensor prepare_like(const char* op, const at::Tensor& other, const char* name,
                               const at::Tensor& first) {
  check_like(op, other, name, first);
  return other.contiguous(row_layout(first));
}

inline PairOperands prepare_pair(const char* op, const at::Tensor& first, const char* first_name,
                                 const at::Tensor& second, const char* second_name) {
  check_floating(op, first, first_name);
  at::Tensor second_dense = prepare_like(op, second, second_name, first);
  return {first.contiguous(row_layout(first)), second_dense};
}

}  // namespace fastattr
