// quadrature_finish on the CPU.
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <tuple>

#include "../quadrature.h"
#include "rowwise.h"

namespace fastattr::cpu {
namespace {

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

TORCH_LIBRARY_IMPL(fastattr, CPU, m) { m.impl("quadrature_finish", &quadrature_finish); }

}  // namespace fastattr::cpu
