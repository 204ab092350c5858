// epsilon_ratio and relevance_product: operands shared by the CPU and CUDA kernels.
#pragma once

#include "operands.h"

namespace fastattr {

struct PairOperands {
  at::Tensor first;   // dense in `first`'s layout
  at::Tensor second;  // dense in the same layout
};

inline PairOperands prepare_pair(const at::Tensor& first, const char* first_name,
                                 const at::Tensor& second, const char* second_name) {
  check_floating(first, first_name);
  check_same_device(second, second_name, first, first_name);
  check_same_dtype(second, second_name, first, first_name);
  check_same_shape(second, second_name, first, first_name);
  const at::MemoryFormat layout = row_layout(first);
  return {first.contiguous(layout), second.contiguous(layout)};
}

inline void check_epsilon(double epsilon) {
  TORCH_CHECK_VALUE(std::isfinite(epsilon) && epsilon >= 0,
                    "epsilon must be finite and non-negative, got ", epsilon);
}

}  // namespace fastattr
