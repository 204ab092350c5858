// Argument checks and operand preparation shared by the CPU and CUDA kernels.
//
// Every kernel walks its tensors as flat arrays in which row b of a (B, ...) tensor is the
// contiguous block [b * row, (b + 1) * row). Contiguous and channels_last layouts both keep
// the batch outermost, so all operands are brought to the layout of the leading one and the
// kernels never see strides.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <cstdint>

namespace fastattr {

inline at::MemoryFormat row_layout(const at::Tensor& t) {
  if (t.dim() == 4 && !t.is_contiguous() && t.is_contiguous(at::MemoryFormat::ChannelsLast)) {
    return at::MemoryFormat::ChannelsLast;
  }
  if (t.dim() == 5 && !t.is_contiguous() && t.is_contiguous(at::MemoryFormat::ChannelsLast3d)) {
    return at::MemoryFormat::ChannelsLast3d;
  }
  return at::MemoryFormat::Contiguous;
}

inline int64_t row_numel(const at::Tensor& t) {
  int64_t n = 1;
  for (int64_t d = 1; d < t.dim(); ++d) n *= t.size(d);
  return n;
}

// The four dtypes the kernels are dispatched for (at::isFloatingType also admits float8).
inline void check_floating(const at::Tensor& t, const char* name) {
  const auto dtype = t.scalar_type();
  TORCH_CHECK_TYPE(dtype == at::kHalf || dtype == at::kBFloat16 || dtype == at::kFloat ||
                       dtype == at::kDouble,
                   name, " must be a floating point tensor (float16, bfloat16, float32 or "
                   "float64), got ", t.scalar_type());
}

inline void check_batched(const at::Tensor& t, const char* name) {
  TORCH_CHECK_VALUE(t.dim() >= 1, name, " must have a batch dimension, got a 0-dim tensor");
}

inline void check_same_device(const at::Tensor& t, const char* name, const at::Tensor& ref,
                              const char* ref_name) {
  TORCH_CHECK_VALUE(t.device() == ref.device(), name, " must be on the same device as ",
                    ref_name, " (", ref.device(), "), got ", t.device());
}

inline void check_same_dtype(const at::Tensor& t, const char* name, const at::Tensor& ref,
                             const char* ref_name) {
  TORCH_CHECK_TYPE(t.scalar_type() == ref.scalar_type(), name, " must have the dtype of ",
                   ref_name, " (", ref.scalar_type(), "), got ", t.scalar_type());
}

inline void check_same_shape(const at::Tensor& t, const char* name, const at::Tensor& ref,
                             const char* ref_name) {
  TORCH_CHECK_VALUE(t.sizes() == ref.sizes(), name, " must have the shape of ", ref_name, " ",
                    ref.sizes(), ", got ", t.sizes());
}

// A per-step coefficient table (path alphas, quadrature weights): 1-D, float64, finite. It may
// live on the CPU even when the data is on a GPU, which keeps the finiteness check sync-free.
inline at::Tensor prepare_coefficients(const at::Tensor& coefficients, const char* name,
                                       const at::Tensor& data, const char* data_name) {
  TORCH_CHECK_VALUE(coefficients.dim() == 1, name, " must be 1-D, got shape ",
                    coefficients.sizes());
  TORCH_CHECK_TYPE(coefficients.scalar_type() == at::kDouble, name, " must be float64, got ",
                   coefficients.scalar_type());
  TORCH_CHECK_VALUE(coefficients.is_cpu() || coefficients.device() == data.device(), name,
                    " must be on the CPU or on the device of ", data_name, " (", data.device(),
                    "), got ", coefficients.device());
  at::Tensor host = coefficients.cpu().contiguous();
  const double* values = host.const_data_ptr<double>();
  for (int64_t k = 0; k < host.numel(); ++k) {
    TORCH_CHECK_VALUE(std::isfinite(values[k]), name, " must be finite, got ", values[k],
                      " at index ", k);
  }
  return host;
}

// A baseline broadcast against (B, ...) inputs, reduced to the rows it really has: one row
// shared by every example, or one row per example, dense in `layout`.
struct Baselines {
  at::Tensor rows;
  bool shared;
};

inline Baselines prepare_baselines(const at::Tensor& baselines, const at::Tensor& inputs,
                                   at::MemoryFormat layout) {
  check_same_device(baselines, "baselines", inputs, "inputs");
  check_same_dtype(baselines, "baselines", inputs, "inputs");
  TORCH_CHECK_VALUE(baselines.dim() <= inputs.dim(), "baselines of shape ", baselines.sizes(),
                    " do not broadcast to inputs of shape ", inputs.sizes());
  const int64_t offset = inputs.dim() - baselines.dim();
  for (int64_t d = 0; d < baselines.dim(); ++d) {
    const int64_t size = baselines.size(d);
    TORCH_CHECK_VALUE(size == 1 || size == inputs.size(d + offset), "baselines of shape ",
                      baselines.sizes(), " do not broadcast to inputs of shape ",
                      inputs.sizes());
  }
  at::Tensor full = baselines.expand(inputs.sizes());
  if (inputs.size(0) == 0) return {full.contiguous(layout), true};
  const bool shared = offset > 0 || baselines.size(0) == 1;
  at::Tensor rows = shared ? full.narrow(0, 0, 1) : full;
  return {rows.contiguous(layout), shared};
}

}  // namespace fastattr
