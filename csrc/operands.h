// The kernels' argument guards and operand preparation, shared by the CPU and CUDA kernels.
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

// The guards below keep a kernel from reading or writing out of bounds or misreading memory,
// for any caller of torch.ops.fastattr.*. The user-facing checks, one message per argument
// fault, are in fastattr/ops/_checks.py; fastattr.ops runs them before the kernels. Messages
// here are terse: "fastattr::<op>: <argument> <fault>".

// The four dtypes the kernels are dispatched for (at::isFloatingType also admits float8).
inline void check_floating(const char* op, const at::Tensor& t, const char* name) {
  const auto dtype = t.scalar_type();
  TORCH_CHECK_TYPE(dtype == at::kHalf || dtype == at::kBFloat16 || dtype == at::kFloat ||
                       dtype == at::kDouble,
                   op, ": ", name, " has unsupported dtype ", dtype);
}

inline void check_batched(const char* op, const at::Tensor& t, const char* name) {
  TORCH_CHECK_VALUE(t.dim() >= 1, op, ": ", name, " has no batch dimension");
}

inline void check_same_device(const char* op, const at::Tensor& t, const char* name,
                              const at::Tensor& ref) {
  TORCH_CHECK_VALUE(t.device() == ref.device(), op, ": ", name, " device mismatch");
}

inline void check_same_dtype(const char* op, const at::Tensor& t, const char* name,
                             const at::Tensor& ref) {
  TORCH_CHECK_TYPE(t.scalar_type() == ref.scalar_type(), op, ": ", name, " dtype mismatch");
}

inline void check_same_shape(const char* op, const at::Tensor& t, const char* name,
                             const at::Tensor& ref) {
  TORCH_CHECK_VALUE(t.sizes() == ref.sizes(), op, ": ", name, " shape mismatch");
}

// The device, dtype and shape of `ref`.
inline void check_like(const char* op, const at::Tensor& t, const char* name,
                       const at::Tensor& ref) {
  check_same_device(op, t, name, ref);
  check_same_dtype(op, t, name, ref);
  check_same_shape(op, t, name, ref);
}

// A point table (rows, alphas, weights): 1-D, of `dtype`, on the CPU or on `data`'s device,
// copied to the host where the kernels plan with it (a synchronization for a device table).
inline at::Tensor host_table(const char* op, const at::Tensor& table, const char* name,
                             at::ScalarType dtype, const at::Tensor& data) {
  TORCH_CHECK_VALUE(table.dim() == 1, op, ": ", name, " is not 1-D");
  TORCH_CHECK_TYPE(table.scalar_type() == dtype, op, ": ", name, " dtype is not ", dtype);
  TORCH_CHECK_VALUE(table.is_cpu() || table.device() == data.device(), op, ": ", name,
                    " device mismatch");
  return table.cpu().contiguous();
}

// A baseline broadcast against (B, ...) inputs, reduced to the rows it really has: one row
// shared by every example, or one row per example, dense in `layout`.
struct Baselines {
  at::Tensor rows;
  bool shared;
};

inline Baselines prepare_baselines(const char* op, const at::Tensor& baselines,
                                   const at::Tensor& inputs, at::MemoryFormat layout) {
  check_same_device(op, baselines, "baselines", inputs);
  check_same_dtype(op, baselines, "baselines", inputs);
  const int64_t offset = inputs.dim() - baselines.dim();
  bool broadcasts = offset >= 0;
  for (int64_t d = 0; broadcasts && d < baselines.dim(); ++d) {
    broadcasts = baselines.size(d) == 1 || baselines.size(d) == inputs.size(d + offset);
  }
  TORCH_CHECK_VALUE(broadcasts, op, ": baselines shape mismatch");
  at::Tensor full = baselines.expand(inputs.sizes());
  if (inputs.size(0) == 0) return {full.contiguous(layout), true};
  const bool shared = offset > 0 || baselines.size(0) == 1;
  at::Tensor rows = shared ? full.narrow(0, 0, 1) : full;
  return {rows.contiguous(layout), shared};
}

}  // namespace fastattr
