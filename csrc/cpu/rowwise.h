// CPU loops shared by the kernels: rows of a (B, ...) tensor split across threads.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>

#include "elementwise.h"

namespace fastattr::cpu {

// Enough elements per task that thread start-up stays negligible.
inline int64_t rows_per_task(int64_t row) {
  return std::max<int64_t>(1, (int64_t{1} << 15) / std::max<int64_t>(row, 1));
}

// The sum of a row in double, in eight interleaved partial sums that vectorize (a single
// running sum is a chain of dependent additions, several times slower).
template <typename scalar_t>
FASTATTR_SIMD_CLONES double row_sum(const scalar_t* values, int64_t length) {
  constexpr int64_t kLanes = 8;
  double lanes[kLanes] = {};
  int64_t j = 0;
  for (; j + kLanes <= length; j += kLanes) {
    for (int64_t l = 0; l < kLanes; ++l) lanes[l] += static_cast<double>(values[j + l]);
  }
  for (; j < length; ++j) lanes[0] += static_cast<double>(values[j]);
  double total = 0;
  for (int64_t l = 0; l < kLanes; ++l) total += lanes[l];
  return total;
}

// out[j] = term(b, j) for every element j of every row b, and row_sums[b] = sum_j out[j]
// (summed in double whatever the dtypes).
template <typename out_t, typename sum_t, typename Term>
void rowwise_terms(int64_t batch, int64_t row, out_t* out, sum_t* row_sums, const Term& term) {
  at::parallel_for(0, batch, rows_per_task(row), [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      double sum = 0;
      for (int64_t j = b * row; j < (b + 1) * row; ++j) {
        const auto value = term(b, j);
        out[j] = static_cast<out_t>(value);
        sum += static_cast<double>(value);
      }
      row_sums[b] = static_cast<sum_t>(sum);
    }
  });
}

}  // namespace fastattr::cpu
