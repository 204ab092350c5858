// The transformer rules' kernels on the CPU: the softmax rule and layer_norm_relevance walk
// rows (split across threads) in vectorized passes, relevance_share is element-wise.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <limits>
#include <optional>
#include <vector>

#include "../attention.h"
#include "elementwise.h"
#include "rowwise.h"

namespace fastattr::cpu {
namespace {

// out = x * (r - s * sum) along a row; zero where x is -inf (a masked score).
template <typename scalar_t>
FASTATTR_SIMD_CLONES void softmax_relevance_row(const scalar_t* x, const scalar_t* s,
                                                const scalar_t* r, scalar_t* out, int64_t length,
                                                at::opmath_type<scalar_t> sum) {
  using acc_t = at::opmath_type<scalar_t>;
  for (int64_t j = 0; j < length; ++j) {
    const acc_t xj = static_cast<acc_t>(x[j]);
    out[j] = static_cast<scalar_t>(xj * (static_cast<acc_t>(r[j]) - static_cast<acc_t>(s[j]) * sum));
  }
  // A pass of its own: with the choice in the loop above, the compiler branches instead of
  // vectorizing.
  constexpr acc_t masked = -std::numeric_limits<acc_t>::infinity();
  for (int64_t j = 0; j < length; ++j) {
    out[j] = static_cast<acc_t>(x[j]) == masked ? scalar_t(0) : out[j];
  }
}

// row_with_sum(first, sum) for each row, split across threads, with the row's sum of r.
template <typename scalar_t, typename RowWithSum>
void rows_with_sums(const scalar_t* r, int64_t rows, int64_t length,
                    const RowWithSum& row_with_sum) {
  at::parallel_for(0, rows, rows_per_task(length), [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t first = row * length;
      row_with_sum(first, static_cast<at::opmath_type<scalar_t>>(row_sum(r + first, length)));
    }
  });
}

template <typename scalar_t>
void softmax_relevance_rows(const scalar_t* x, const scalar_t* s, const scalar_t* r, scalar_t* out,
                            int64_t rows, int64_t length) {
  rows_with_sums(r, rows, length, [&](int64_t first, at::opmath_type<scalar_t> sum) {
    softmax_relevance_row(x + first, s + first, r + first, out + first, length, sum);
  });
}

at::Tensor softmax_relevance(const at::Tensor& inputs, const at::Tensor& probs,
                             const at::Tensor& relevance, int64_t dim) {
  const SoftmaxOperands op = prepare_softmax(inputs, probs, relevance, dim);
  at::Tensor moved = at::empty_like(op.inputs);
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, inputs.scalar_type(), "softmax_relevance_cpu", [&] {
        softmax_relevance_rows(op.inputs.const_data_ptr<scalar_t>(),
                               op.probs.const_data_ptr<scalar_t>(),
                               op.relevance.const_data_ptr<scalar_t>(),
                               moved.mutable_data_ptr<scalar_t>(), op.rows, op.length);
      });
  return softmax_result(moved, op, inputs);
}

// out = scale * (r - s * sum) along a row.
template <typename scalar_t>
FASTATTR_SIMD_CLONES void softmax_contribution_row(const scalar_t* s, const scalar_t* r,
                                                   scalar_t* out, int64_t length,
                                                   at::opmath_type<scalar_t> sum,
                                                   at::opmath_type<scalar_t> scale) {
  using acc_t = at::opmath_type<scalar_t>;
  for (int64_t j = 0; j < length; ++j) {
    out[j] = static_cast<scalar_t>(
        scale * (static_cast<acc_t>(r[j]) - static_cast<acc_t>(s[j]) * sum));
  }
}

template <typename scalar_t>
void softmax_contribution_rows(const scalar_t* s, const scalar_t* r, scalar_t* out, int64_t rows,
                               int64_t length, double scale) {
  using acc_t = at::opmath_type<scalar_t>;
  rows_with_sums(r, rows, length, [&](int64_t first, acc_t sum) {
    softmax_contribution_row(s + first, r + first, out + first, length, sum,
                             static_cast<acc_t>(scale));
  });
}

at::Tensor softmax_contribution(const at::Tensor& probs, const at::Tensor& relevance, int64_t dim,
                                double scale) {
  const SoftmaxOperands op = prepare_softmax_contribution(probs, relevance, dim);
  at::Tensor moved = at::empty_like(op.probs);
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, probs.scalar_type(), "softmax_contribution_cpu", [&] {
        softmax_contribution_rows(op.probs.const_data_ptr<scalar_t>(),
                                  op.relevance.const_data_ptr<scalar_t>(),
                                  moved.mutable_data_ptr<scalar_t>(), op.rows, op.length, scale);
      });
  return softmax_result(moved, op, probs);
}

// v = weight * r / (y + epsilon * sign(y)) along a row (weight may be null).
template <typename scalar_t>
FASTATTR_SIMD_CLONES void layer_norm_ratio_row(const scalar_t* r, const scalar_t* y,
                                               const scalar_t* w, at::opmath_type<scalar_t>* v,
                                               int64_t length, at::opmath_type<scalar_t> eps) {
  using acc_t = at::opmath_type<scalar_t>;
  for (int64_t k = 0; k < length; ++k) {
    v[k] = stabilized_ratio(static_cast<acc_t>(r[k]), static_cast<acc_t>(y[k]), eps);
  }
  if (w != nullptr) {
    for (int64_t k = 0; k < length; ++k) v[k] *= static_cast<acc_t>(w[k]);
  }
}

// out = x * ((v - mean) * scale) along a row.
template <typename scalar_t>
FASTATTR_SIMD_CLONES void layer_norm_scale_row(const scalar_t* x,
                                               const at::opmath_type<scalar_t>* v, scalar_t* out,
                                               int64_t length, at::opmath_type<scalar_t> mean,
                                               at::opmath_type<scalar_t> scale) {
  using acc_t = at::opmath_type<scalar_t>;
  for (int64_t k = 0; k < length; ++k) {
    out[k] = static_cast<scalar_t>(static_cast<acc_t>(x[k]) * ((v[k] - mean) * scale));
  }
}

// Per row, v = weight * r / (y + epsilon * sign(y)) and out = x * ((v - mean(v)) * rstd): three
// vectorized passes over the row, v held in acc_t between them.
template <typename scalar_t>
void layer_norm_relevance_rows(const LayerNormOperands& op, scalar_t* out, double epsilon) {
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t* x = op.inputs.const_data_ptr<scalar_t>();
  const scalar_t* r = op.relevance.const_data_ptr<scalar_t>();
  const scalar_t* y = op.outputs.const_data_ptr<scalar_t>();
  const acc_t* rstd = op.rstd.const_data_ptr<acc_t>();
  const scalar_t* w = op.weight.defined() ? op.weight.const_data_ptr<scalar_t>() : nullptr;
  const acc_t eps = static_cast<acc_t>(epsilon);
  const int64_t length = op.length;
  at::parallel_for(0, op.rows, rows_per_task(length), [&](int64_t begin, int64_t end) {
    std::vector<acc_t> v(static_cast<size_t>(length));
    for (int64_t row = begin; row < end; ++row) {
      const int64_t first = row * length;
      layer_norm_ratio_row(r + first, y + first, w, v.data(), length, eps);
      const acc_t mean = static_cast<acc_t>(row_sum(v.data(), length) / static_cast<double>(length));
      layer_norm_scale_row(x + first, v.data(), out + first, length, mean, rstd[row]);
    }
  });
}

at::Tensor layer_norm_relevance(const at::Tensor& inputs, const at::Tensor& relevance,
                                const at::Tensor& outputs, const at::Tensor& rstd,
                                const std::optional<at::Tensor>& weight, double epsilon) {
  const LayerNormOperands op = prepare_layer_norm(inputs, relevance, outputs, rstd, weight);
  at::Tensor result = at::empty_like(op.inputs);
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, inputs.scalar_type(), "layer_norm_relevance_cpu", [&] {
        layer_norm_relevance_rows<scalar_t>(op, result.mutable_data_ptr<scalar_t>(), epsilon);
      });
  return result;
}

template <typename scalar_t>
FASTATTR_SIMD_CLONES void share_range(const scalar_t* a, const scalar_t* c, scalar_t* out,
                                      int64_t begin, int64_t end, double share) {
  using acc_t = at::opmath_type<scalar_t>;
  const acc_t factor = static_cast<acc_t>(share);
  for (int64_t i = begin; i < end; ++i) {
    out[i] = static_cast<scalar_t>(static_cast<acc_t>(a[i]) * static_cast<acc_t>(c[i]) * factor);
  }
}

at::Tensor relevance_share(const at::Tensor& activations, const at::Tensor& contributions,
                           double share) {
  constexpr const char* kOp = "fastattr::relevance_share";
  PairOperands op =
      prepare_pair(kOp, activations, "activations", contributions, "contributions");
  at::Tensor relevance = at::empty_like(op.first);
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, activations.scalar_type(), "relevance_share_cpu", [&] {
        const scalar_t* a = op.first.const_data_ptr<scalar_t>();
        const scalar_t* c = op.second.const_data_ptr<scalar_t>();
        scalar_t* out = relevance.mutable_data_ptr<scalar_t>();
        at::parallel_for(0, relevance.numel(), int64_t{1} << 15, [&](int64_t begin, int64_t end) {
          share_range(a, c, out, begin, end, share);
        });
      });
  return relevance;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastattr, CPU, m) {
  m.impl("softmax_relevance", &softmax_relevance);
  m.impl("softmax_contribution", &softmax_contribution);
  m.impl("layer_norm_relevance", &layer_norm_relevance);
  m.impl("relevance_share", &relevance_share);
}

}  // namespace fastattr::cpu
