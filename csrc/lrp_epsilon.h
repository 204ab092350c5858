// LRP's element-wise ops: operands shared by the CPU and CUDA kernels.
#pragma once

#include "operands.h"

namespace fastattr {

struct PairOperands {
  at::Tensor first;   // dense in `first`'s layout
  at::Tensor second;  // dense in the same layout
};

// `other`, checked against `first`, dense in `first`'s layout.
inline at::Tensor prepare_like(const at::Tensor& other, const char* name, const at::Tensor& first,
                               const char* first_name) {
  check_same_device(other, name, first, first_name);
  check_same_dtype(other, name, first, first_name);
  check_same_shape(other, name, first, first_name);
  return other.contiguous(row_layout(first));
}

inline PairOperands prepare_pair(const at::Tensor& first, const char* first_name,
                                 const at::Tensor& second, const char* second_name) {
  check_floating(first, first_name);
  at::Tensor second_dense = prepare_like(second, second_name, first, first_name);
  return {first.contiguous(row_layout(first)), second_dense};
}

inline void check_epsilon(double epsilon) {
  TORCH_CHECK_VALUE(std::isfinite(epsilon) && epsilon >= 0,
                    "epsilon must be finite and non-negative, got ", epsilon);
}

}  // namespace fastattr
