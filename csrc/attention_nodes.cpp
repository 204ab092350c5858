// The autograd nodes of the transformer rules, in C++ so that the backward never enters Python:
// each backward calls a compiled op on whatever device the tensors are. Device-agnostic
// (registered as composites); their PyTorch twins are the Functions in
// fastattr/ops/reference.py.
#include <ATen/OpMathType.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/grad_mode.h>
#include <ATen/ops/bmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/matmul.h>
#include <ATen/ops/native_layer_norm.h>
#include <ATen/ops/softmax.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include <optional>
#include <tuple>
#include <vector>

#include "attention.h"

namespace fastattr {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

at::Tensor relevance_share(const at::Tensor& activations, const at::Tensor& contributions,
                           double share) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("fastattr::relevance_share", "")
                             .typed<at::Tensor(const at::Tensor&, const at::Tensor&, double)>();
  return op.call(activations, contributions, share);
}

at::Tensor softmax_relevance(const at::Tensor& inputs, const at::Tensor& probs,
                             const at::Tensor& relevance, int64_t dim) {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("fastattr::softmax_relevance", "")
          .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, int64_t)>();
  return op.call(inputs, probs, relevance, dim);
}

at::Tensor softmax_contribution(const at::Tensor& probs, const at::Tensor& relevance,
                                int64_t dim, double scale) {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("fastattr::softmax_contribution", "")
          .typed<at::Tensor(const at::Tensor&, const at::Tensor&, int64_t, double)>();
  return op.call(probs, relevance, dim, scale);
}

at::Tensor layer_norm_relevance(const at::Tensor& inputs, const at::Tensor& relevance,
                                const at::Tensor& outputs, const at::Tensor& rstd,
                                const std::optional<at::Tensor>& weight, double epsilon) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("fastattr::layer_norm_relevance", "")
                             .typed<at::Tensor(const at::Tensor&, const at::Tensor&,
                                               const at::Tensor&, const at::Tensor&,
                                               const std::optional<at::Tensor>&, double)>();
  return op.call(inputs, relevance, outputs, rstd, weight, epsilon);
}

// Identity forward; backward share * activation * relevance: one factor's part of a product's
// relevance under the uniform rule.
struct ShareNode : public torch::autograd::Function<ShareNode> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& activation, double share) {
    ctx->save_for_backward({activation});
    ctx->saved_data["share"] = share;
    return activation;
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const at::Tensor activation = ctx->get_saved_variables()[0];
    const double share = ctx->saved_data["share"].toDouble();
    return {relevance_share(activation, grads[0].to(activation.scalar_type()), share),
            at::Tensor()};
  }
};

// out = a @ b for factors of one batch shape (at least 3-D), one torch.bmm per matrix batch of
// the last batch dimension: bmm reads a batch at any stride between its matrices, so permuted
// views (attention's heads) are multiplied where they lie, where at::matmul would copy them.
void batched_matmul_into(at::Tensor out, const at::Tensor& a, const at::Tensor& b) {
  if (a.dim() == 3) {
    at::bmm_out(out, a, b);
    return;
  }
  for (int64_t i = 0; i < a.size(0); ++i) {
    batched_matmul_into(out[i], a[i], b[i]);
  }
}

// torch.matmul(a, b), without copying the factors where they share their batch shape.
at::Tensor matmul_without_copies(const at::Tensor& a, const at::Tensor& b) {
  const int64_t dims = a.dim();
  const bool same_batch = dims >= 3 && b.dim() == dims &&
                          a.sizes().slice(0, dims - 2) == b.sizes().slice(0, dims - 2);
  // out= takes no tensor that autograd records (a double backward): matmul then.
  if (!same_batch || at::GradMode::is_enabled()) {
    return at::matmul(a, b);
  }
  std::vector<int64_t> sizes = a.sizes().vec();
  sizes.back() = b.size(-1);
  at::Tensor out = at::empty(sizes, a.options());
  batched_matmul_into(out, a, b);
  return out;
}

// Forward a @ b (torch.matmul, both factors at least 2-D); backward AttnLRP's uniform rule:
// each factor receives half the relevance, 0.5 * factor * its gradient of the product. The
// factors are saved as they came, often permuted views of the model's tensors, rather than as
// the contiguous copies that autograd's matmul keeps, and are multiplied where they lie.
struct UniformMatmulNode : public torch::autograd::Function<UniformMatmulNode> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& a, const at::Tensor& b) {
    ctx->save_for_backward({a, b});
    return matmul_without_copies(a, b);
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const variable_list saved = ctx->get_saved_variables();
    const at::Tensor& a = saved[0];
    const at::Tensor& b = saved[1];
    const at::Tensor contribution = grads[0].to(a.scalar_type());
    // matmul broadcasts the batch dimensions: their gradients sum back to each factor's shape.
    const at::Tensor to_a = matmul_without_copies(contribution, b.mT()).sum_to_size(a.sizes());
    const at::Tensor to_b = matmul_without_copies(a.mT(), contribution).sum_to_size(b.sizes());
    return {relevance_share(a, to_a, 0.5), relevance_share(b, to_b, 0.5)};
  }
};

// Forward a * b (broadcast) of two activations; backward AttnLRP's uniform rule: each factor
// receives half the relevance, 0.5 * a * b * contribution, summed over the dimensions it was
// broadcast along (where it is constant). Only the product is saved: the ratio at it keeps it
// anyway, and autograd's multiplication would keep both factors.
struct UniformProductNode : public torch::autograd::Function<UniformProductNode> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& a, const at::Tensor& b) {
    at::Tensor product = a.mul(b);
    ctx->save_for_backward({product});
    ctx->saved_data["a_sizes"] = a.sizes();
    ctx->saved_data["b_sizes"] = b.sizes();
    return product;
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const at::Tensor product = ctx->get_saved_variables()[0];
    const at::Tensor half = relevance_share(product, grads[0].to(product.scalar_type()), 0.5);
    return {half.sum_to_size(ctx->saved_data["a_sizes"].toDimVector()),
            half.sum_to_size(ctx->saved_data["b_sizes"].toDimVector())};
  }
};

// Forward softmax(inputs, dim, dtype); backward AttnLRP's softmax rule into inputs.
struct SoftmaxNode : public torch::autograd::Function<SoftmaxNode> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& inputs, int64_t dim,
                            std::optional<at::ScalarType> dtype) {
    at::Tensor probs = at::softmax(inputs, dim, dtype);
    ctx->save_for_backward({inputs, probs});
    ctx->saved_data["dim"] = dim;
    return probs;
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const variable_list saved = ctx->get_saved_variables();
    const at::Tensor& inputs = saved[0];
    const auto dtype = inputs.scalar_type();
    return {softmax_relevance(inputs, saved[1].to(dtype), grads[0].to(dtype),
                              ctx->saved_data["dim"].toInt()),
            at::Tensor(), at::Tensor()};
  }
};

// Forward softmax(inputs, dim, dtype) of inputs = scale * scores plus a mask; backward the
// softmax rule's relevance divided by the scores (the ratio at them folded in), into scores.
// Only the softmax's output is kept: neither the scores nor inputs.
struct SoftmaxRatioNode : public torch::autograd::Function<SoftmaxRatioNode> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& scores,
                            const at::Tensor& inputs, int64_t dim,
                            std::optional<at::ScalarType> dtype, double scale) {
    at::Tensor probs = at::softmax(inputs, dim, dtype);
    ctx->save_for_backward({probs});
    ctx->saved_data["dim"] = dim;
    ctx->saved_data["scale"] = scale;
    ctx->saved_data["dtype"] = scores.scalar_type();
    return probs;
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const at::Tensor probs = ctx->get_saved_variables()[0];
    const auto dtype = ctx->saved_data["dtype"].toScalarType();
    return {softmax_contribution(probs.to(dtype), grads[0].to(dtype),
                                 ctx->saved_data["dim"].toInt(),
                                 ctx->saved_data["scale"].toDouble()),
            at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

// Forward layer_norm(inputs, ...); backward AttnLRP's layer-norm rule (the normalization taken
// as linear) into inputs. The weight and bias receive nothing.
struct LayerNormNode : public torch::autograd::Function<LayerNormNode> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& inputs,
                            c10::IntArrayRef normalized_shape,
                            const std::optional<at::Tensor>& weight,
                            const std::optional<at::Tensor>& bias, double eps, double epsilon) {
    auto [outputs, mean, rstd] = at::native_layer_norm(inputs, normalized_shape, weight, bias, eps);
    ctx->save_for_backward({inputs, outputs,
                            rstd.to(at::toOpMathType(inputs.scalar_type())),
                            weight.value_or(at::Tensor())});
    ctx->saved_data["epsilon"] = epsilon;
    return outputs;
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const variable_list saved = ctx->get_saved_variables();
    const at::Tensor& inputs = saved[0];
    const std::optional<at::Tensor> weight =
        saved[3].defined() ? std::optional<at::Tensor>(saved[3]) : std::nullopt;
    return {layer_norm_relevance(inputs, grads[0].to(inputs.scalar_type()), saved[1], saved[2],
                                 weight, ctx->saved_data["epsilon"].toDouble()),
            at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

at::Tensor lrp_share_node(const at::Tensor& activation, double share) {
  return ShareNode::apply(activation, share);
}

at::Tensor lrp_uniform_matmul_node(const at::Tensor& a, const at::Tensor& b) {
  return UniformMatmulNode::apply(a, b);
}

at::Tensor lrp_uniform_product_node(const at::Tensor& a, const at::Tensor& b) {
  return UniformProductNode::apply(a, b);
}

at::Tensor lrp_softmax_node(const at::Tensor& inputs, int64_t dim,
                            std::optional<at::ScalarType> dtype) {
  return SoftmaxNode::apply(inputs, dim, dtype);
}

at::Tensor lrp_softmax_ratio_node(const at::Tensor& scores, const at::Tensor& inputs, int64_t dim,
                                  std::optional<at::ScalarType> dtype, double scale) {
  return SoftmaxRatioNode::apply(scores, inputs, dim, dtype, scale);
}

at::Tensor lrp_layer_norm_node(const at::Tensor& inputs, c10::IntArrayRef normalized_shape,
                               const std::optional<at::Tensor>& weight,
                               const std::optional<at::Tensor>& bias, double eps, double epsilon) {
  return LayerNormNode::apply(inputs, normalized_shape, weight, bias, eps, epsilon);
}

}  // namespace

TORCH_LIBRARY_IMPL(fastattr, CompositeImplicitAutograd, m) {
  m.impl("lrp_share_node", &lrp_share_node);
  m.impl("lrp_uniform_matmul_node", &lrp_uniform_matmul_node);
  m.impl("lrp_uniform_product_node", &lrp_uniform_product_node);
  m.impl("lrp_softmax_node", &lrp_softmax_node);
  m.impl("lrp_softmax_ratio_node", &lrp_softmax_ratio_node);
  m.impl("lrp_layer_norm_node", &lrp_layer_norm_node);
}

}  // namespace fastattr
