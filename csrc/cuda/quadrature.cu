// quadrature_accumulate and quadrature_finish on CUDA.
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <tuple>

#include "../quadrature.h"
#include "launch.cuh"

namespace fastattr::cuda {

template <typename grad_t, typename acc_t>
void accumulate(const at::Tensor& accumulator, const AccumulateOperands& op) {
  const at::Tensor weights =
      coefficients_to_device(op.weights, accumulator.device(), accumulator.scalar_type());
  const acc_t* w = weights.const_data_ptr<acc_t>();
  const grad_t* g = op.grads.const_data_ptr<grad_t>();
  acc_t* acc = accumulator.mutable_data_ptr<acc_t>();
  const int64_t steps = weights.numel(), block = op.block;
  for_each_index(block, [=] __device__(int64_t j) {
    acc_t sum = acc[j];
    for (int64_t k = 0; k < steps; ++k) sum += w[k] * static_cast<acc_t>(g[k * block + j]);
    acc[j] = sum;
  });
}

void quadrature_accumulate(const at::Tensor& accumulator, const at::Tensor& grads,
                           const at::Tensor& weights) {
  AccumulateOperands op = prepare_accumulate(accumulator, grads, weights);
  const c10::cuda::CUDAGuard guard(accumulator.device());
  if (op.block == 0 || op.weights.numel() == 0) return;
  const bool double_acc = accumulator.scalar_type() == at::kDouble;
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, grads.scalar_type(), "quadrature_accumulate_cuda", [&] {
        if (double_acc) {
          accumulate<scalar_t, double>(accumulator, op);
        } else {
          accumulate<scalar_t, float>(accumulator, op);
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
                op.row_sums.mutable_data_ptr<acc_t>(),
                [=] __device__(int64_t b, int64_t j) -> acc_t {
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
  const c10::cuda::CUDAGuard guard(accumulator.device());
  const bool double_acc = accumulator.scalar_type() == at::kDouble;
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, inputs.scalar_type(), "quadrature_finish_cuda", [&] {
        if (double_acc) {
          finish<scalar_t, double>(op, multiply_by_inputs);
        } else {
          finish<scalar_t, float>(op, multiply_by_inputs);
        }
      });
  return {op.attributions, op.row_sums};
}

TORCH_LIBRARY_IMPL(fastattr, CUDA, m) {
  m.impl("quadrature_accumulate", &quadrature_accumulate);
  m.impl("quadrature_finish", &quadrature_finish);
}

}  // namespace fastattr::cuda
