// quadrature_accumulate and quadrature_finish on the CPU.
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <tuple>

#include "../quadrature.h"
#include "rowwise.h"

namespace fastattr::cpu {
namespace {

template <typename grad_t, typename acc_t>
void accumulate(acc_t* acc, const grad_t* grads, const double* weights, int64_t steps,
                int64_t block) {
  // Each task owns a slice of the accumulator and streams every step through it.
  at::parallel_for(0, block, int64_t{1} << 14, [&](int64_t begin, int64_t end) {
    for (int64_t k = 0; k < steps; ++k) {
      const acc_t w = static_cast<acc_t>(weights[k]);
      const grad_t* g = grads + k * block;
      for (int64_t j = begin; j < end; ++j) acc[j] += w * static_cast<acc_t>(g[j]);
    }
  });
}

void quadrature_accumulate(const at::Tensor& accumulator, const at::Tensor& grads,
                           const at::Tensor& weights) {
  AccumulateOperands op = prepare_accumulate(accumulator, grads, weights);
  const int64_t steps = op.weights.numel();
  if (op.block == 0 || steps == 0) return;
  const bool double_acc = accumulator.scalar_type() == at::kDouble;
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, grads.scalar_type(), "quadrature_accumulate_cpu", [&] {
        const scalar_t* g = op.grads.const_data_ptr<scalar_t>();
        const double* w = op.weights.const_data_ptr<double>();
        if (double_acc) {
          accumulate(accumulator.mutable_data_ptr<double>(), g, w, steps, op.block);
        } else {
          accumulate(accumulator.mutable_data_ptr<float>(), g, w, steps, op.block);
        }
      });
}

template <typename input_t, typename acc_t>
void finish(const FinishOperands& op, bool multiply_by_inputs) {
  const acc_t* acc = op.accumulator.const_data_ptr<acc_t>();
  const input_t* x = op.inputs.const_data_ptr<input_t>();
  const input_t* base = op.baselines.rows.const_data_ptr<input_t>();
  const bool shared = op.baselines.shared;
  const int64_t row = op.row;
  rowwise_terms(op.accumulator.size(0), row, op.attributions.mutable_data_ptr<acc_t>(),
                op.row_sums.mutable_data_ptr<acc_t>(), [&](int64_t b, int64_t j) -> acc_t {
                  if (!multiply_by_inputs) return acc[j];
                  const acc_t bv = static_cast<acc_t>(base[shared ? j - b * row : j]);
                  return acc[j] * (static_cast<acc_t>(x[j]) - bv);
                });
}

std::tuple<at::Tensor, at::Tensor> quadrature_finish(const at::Tensor& accumulator,
                                                     const at::Tensor& inputs,
                                                     const at::Tensor& baselines,
                                                     bool multiply_by_inputs) {
  FinishOperands op = prepare_finish(accumulator, inputs, baselines);
  const bool double_acc = accumulator.scalar_type() == at::kDouble;
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, inputs.scalar_type(), "quadrature_finish_cpu", [&] {
        if (double_acc) {
          finish<scalar_t, double>(op, multiply_by_inputs);
        } else {
          finish<scalar_t, float>(op, multiply_by_inputs);
        }
      });
  return {op.attributions, op.row_sums};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastattr, CPU, m) {
  m.impl("quadrature_accumulate", &quadrature_accumulate);
  m.impl("quadrature_finish", &quadrature_finish);
}

}  // namespace fastattr::cpu
