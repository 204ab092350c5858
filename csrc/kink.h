// kink_flips: operands shared by the CPU and CUDA kernels.
//
// A kink's switch values (a pre-activation minus its threshold, say) are (points, units);
// a segment of the path is a pair of points, its two ends. The kernels mark, for each segment
// and unit, whether the switch value lies beyond the tolerance of zero at both ends with
// opposite signs.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>

#include "operands.h"

namespace fastattr {

struct KinkOperands {
  at::Tensor values;     // (points, units), contiguous
  at::Tensor tolerance;  // (points,), contiguous
  at::Tensor ends_a;     // (segments,) int64, contiguous
  at::Tensor ends_b;
  at::Tensor result;     // (segments, units) bool, to be written
  int64_t units;
};

constexpr const char* kKinkFlips = "fastattr::kink_flips";

// 1-D int64 indices into the rows of `values`, on its device, each in [0, rows). On a GPU the
// range check reads them on the host (a synchronization).
inline at::Tensor prepare_ends(const at::Tensor& ends, const char* name, const at::Tensor& values) {
  TORCH_CHECK_VALUE(ends.dim() == 1, kKinkFlips, ": ", name, " is not 1-D");
  TORCH_CHECK_TYPE(ends.scalar_type() == at::kLong, kKinkFlips, ": ", name, " dtype is not ",
                   at::kLong);
  check_same_device(kKinkFlips, ends, name, values);
  at::Tensor dense = ends.contiguous();
  const at::Tensor host = dense.cpu();
  const int64_t* index = host.const_data_ptr<int64_t>();
  for (int64_t p = 0; p < host.numel(); ++p) {
    TORCH_CHECK_INDEX(index[p] >= 0 && index[p] < values.size(0), kKinkFlips, ": ", name,
                      " out of range");
  }
  return dense;
}

inline KinkOperands prepare_kink_flips(const at::Tensor& values, const at::Tensor& tolerance,
                                       const at::Tensor& ends_a, const at::Tensor& ends_b) {
  check_floating(kKinkFlips, values, "values");
  TORCH_CHECK_VALUE(values.dim() == 2, kKinkFlips, ": values is not 2-D");
  check_same_device(kKinkFlips, tolerance, "tolerance", values);
  check_same_dtype(kKinkFlips, tolerance, "tolerance", values);
  TORCH_CHECK_VALUE(tolerance.dim() == 1 && tolerance.size(0) == values.size(0), kKinkFlips,
                    ": tolerance shape mismatch");
  TORCH_CHECK_VALUE(ends_a.sizes() == ends_b.sizes(), kKinkFlips,
                    ": ends_a and ends_b shape mismatch");
  const int64_t units = values.size(1);
  return {values.contiguous(),
          tolerance.contiguous(),
          prepare_ends(ends_a, "ends_a", values),
          prepare_ends(ends_b, "ends_b", values),
          at::empty({ends_a.numel(), units}, values.options().dtype(at::kBool)),
          units};
}

// The operands' data in a kernel's dtype.
template <typename scalar_t>
struct KinkData {
  const scalar_t* values;
  const scalar_t* tolerance;
  const int64_t* ends_a;
  const int64_t* ends_b;
  bool* result;

  explicit KinkData(const KinkOperands& op)
      : values(op.values.const_data_ptr<scalar_t>()),
        tolerance(op.tolerance.const_data_ptr<scalar_t>()),
        ends_a(op.ends_a.const_data_ptr<int64_t>()),
        ends_b(op.ends_b.const_data_ptr<int64_t>()),
        result(op.result.mutable_data_ptr<bool>()) {}
};

// Whether x (at one end, tolerance tx) and y (at the other, ty) lie beyond their tolerances
// of zero with opposite signs. Non-short-circuit operators, so that the loops vectorize.
template <typename T>
C10_HOST_DEVICE inline bool flips(T x, T tx, T y, T ty) {
  return ((x > tx) & (y < -ty)) | ((x < -tx) & (y > ty));
}

}  // namespace fastattr
