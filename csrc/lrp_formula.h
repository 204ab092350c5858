// LRP's element-wise formulas, one definition for the CPU and the CUDA kernels (and the
// reference of fastattr/ops/reference.py, which computes the same in PyTorch).
#pragma once

#include <c10/macros/Macros.h>

namespace fastattr {

// relevance / (z + epsilon * sign(z)) in acc_t, with sign(0) = +1 so that a zero
// pre-activation is pushed away from zero.
template <typename acc_t>
C10_HOST_DEVICE inline acc_t stabilized_ratio(acc_t relevance, acc_t z, acc_t epsilon) {
  return relevance / (z + (z < acc_t(0) ? -epsilon : epsilon));
}

// activation * contribution in acc_t, rounded to scalar_t: the relevance at a module's input.
template <typename scalar_t, typename acc_t>
C10_HOST_DEVICE inline scalar_t input_product(scalar_t activation, scalar_t contribution) {
  return static_cast<scalar_t>(static_cast<acc_t>(activation) * static_cast<acc_t>(contribution));
}

// stabilized_ratio of input_product: the product at a module's input and the ratio at the
// previous module's output in one pass, the product rounded to scalar_t in between as when the
// two run one after the other.
template <typename scalar_t, typename acc_t>
C10_HOST_DEVICE inline scalar_t ratio_of_product(scalar_t activation, scalar_t contribution,
                                                 scalar_t z, acc_t epsilon) {
  const scalar_t product = input_product<scalar_t, acc_t>(activation, contribution);
  return static_cast<scalar_t>(
      stabilized_ratio(static_cast<acc_t>(product), static_cast<acc_t>(z), epsilon));
}

}  // namespace fastattr
