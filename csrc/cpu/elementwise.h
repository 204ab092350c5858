// LRP's element-wise CPU loops over the formulas of lrp_formula.h. On x86-64 Linux each is
// compiled for AVX2 as well as the baseline ISA and picked at load time, as torch picks its own
// kernels: the division runs twice as fast eight floats wide. No FMA contraction (setup.py), so
// both clones round alike.
#pragma once

#include <ATen/OpMathType.h>

#include <cstdint>

#include "../lrp_formula.h"

#if defined(__x86_64__) && defined(__linux__) && defined(__GNUC__)
#define FASTATTR_SIMD_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define FASTATTR_SIMD_CLONES
#endif

namespace fastattr::cpu {

template <typename scalar_t>
FASTATTR_SIMD_CLONES void epsilon_ratio_range(const scalar_t* r, const scalar_t* z, scalar_t* out,
                                              int64_t begin, int64_t end, double epsilon) {
  using acc_t = at::opmath_type<scalar_t>;
  const acc_t eps = static_cast<acc_t>(epsilon);
  for (int64_t i = begin; i < end; ++i) {
    out[i] = static_cast<scalar_t>(
        stabilized_ratio(static_cast<acc_t>(r[i]), static_cast<acc_t>(z[i]), eps));
  }
}

template <typename scalar_t>
FASTATTR_SIMD_CLONES void product_range(const scalar_t* a, const scalar_t* c, scalar_t* out,
                                        int64_t begin, int64_t end) {
  using acc_t = at::opmath_type<scalar_t>;
  for (int64_t i = begin; i < end; ++i) out[i] = input_product<scalar_t, acc_t>(a[i], c[i]);
}

template <typename scalar_t>
FASTATTR_SIMD_CLONES void epsilon_ratio_of_product_range(const scalar_t* a, const scalar_t* c,
                                                         const scalar_t* z, scalar_t* out,
                                                         int64_t begin, int64_t end,
                                                         double epsilon) {
  using acc_t = at::opmath_type<scalar_t>;
  const acc_t eps = static_cast<acc_t>(epsilon);
  for (int64_t i = begin; i < end; ++i) {
    out[i] = ratio_of_product<scalar_t, acc_t>(a[i], c[i], z[i], eps);
  }
}

}  // namespace fastattr::cpu
