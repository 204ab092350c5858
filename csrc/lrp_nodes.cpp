// The autograd nodes LRP inserts around a module, in C++ so that the backward never enters
// Python: each node's backward calls the compiled ops on whatever device the tensors are.
// Device-agnostic (registered as composites); their PyTorch twins are the Functions in
// fastattr/ops/reference.py.
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include <optional>

namespace fastattr {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

at::Tensor epsilon_ratio(const at::Tensor& relevance, const at::Tensor& z, double epsilon) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("fastattr::epsilon_ratio", "")
                             .typed<at::Tensor(const at::Tensor&, const at::Tensor&, double)>();
  return op.call(relevance, z, epsilon);
}

at::Tensor input_relevance(const at::Tensor& activations, const at::Tensor& contributions) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("fastattr::input_relevance", "")
                             .typed<at::Tensor(const at::Tensor&, const at::Tensor&)>();
  return op.call(activations, contributions);
}

at::Tensor epsilon_ratio_of_product(const at::Tensor& activations,
                                    const at::Tensor& contributions, const at::Tensor& z,
                                    double epsilon) {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("fastattr::epsilon_ratio_of_product", "")
          .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, double)>();
  return op.call(activations, contributions, z, epsilon);
}

// What the model continues with: a copy protects the saved tensors when the model later
// modifies the output in place; otherwise autograd hands out a view of the input returned.
at::Tensor shown_value(const at::Tensor& value, bool copy) {
  return copy ? value.clone() : value;
}

// Identity forward; backward activation * relevance: the relevance at a module's input.
struct ProductNode : public torch::autograd::Function<ProductNode> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& activation) {
    ctx->save_for_backward({activation});
    return activation;
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const at::Tensor activation = ctx->get_saved_variables()[0];
    return {input_relevance(activation, grads[0].to(activation.scalar_type()))};
  }
};

// Forward shows `shown` (z itself when absent); backward sends relevance / (z + eps sign z)
// into z's graph.
struct RatioNode : public torch::autograd::Function<RatioNode> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& z,
                            const std::optional<at::Tensor>& shown, double epsilon, bool copy) {
    ctx->save_for_backward({z});
    ctx->saved_data["epsilon"] = epsilon;
    return shown_value(shown.has_value() ? *shown : z, copy);
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const at::Tensor z = ctx->get_saved_variables()[0];
    const double epsilon = ctx->saved_data["epsilon"].toDouble();
    return {epsilon_ratio(grads[0].to(z.scalar_type()), z, epsilon), at::Tensor(), at::Tensor(),
            at::Tensor()};
  }
};

// Forward shows `shown`; backward hands the relevance to `source` unchanged.
struct PassNode : public torch::autograd::Function<PassNode> {
  static at::Tensor forward(AutogradContext*, const at::Tensor& source, const at::Tensor& shown,
                            bool copy) {
    return shown_value(shown, copy);
  }
  static variable_list backward(AutogradContext*, variable_list grads) {
    return {grads[0], at::Tensor(), at::Tensor()};
  }
};

// ProductNode, PassNodes and RatioNode in one: forward shows `activation` (detached, a function
// of z through pass-through modules only); backward sends activation * relevance /
// (z + eps sign z) straight into z's graph.
struct ProductRatioNode : public torch::autograd::Function<ProductRatioNode> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& z,
                            const at::Tensor& activation, double epsilon) {
    ctx->save_for_backward({z, activation});
    ctx->saved_data["epsilon"] = epsilon;
    return activation;
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const variable_list saved = ctx->get_saved_variables();
    const at::Tensor& activation = saved[1];
    const double epsilon = ctx->saved_data["epsilon"].toDouble();
    return {epsilon_ratio_of_product(activation, grads[0].to(activation.scalar_type()), saved[0],
                                     epsilon),
            at::Tensor(), at::Tensor()};
  }
};

at::Tensor lrp_product_node(const at::Tensor& activation) {
  return ProductNode::apply(activation);
}

at::Tensor lrp_ratio_node(const at::Tensor& z, const std::optional<at::Tensor>& shown,
                          double epsilon, bool copy) {
  return RatioNode::apply(z, shown, epsilon, copy);
}

at::Tensor lrp_pass_node(const at::Tensor& source, const at::Tensor& shown, bool copy) {
  return PassNode::apply(source, shown, copy);
}

at::Tensor lrp_product_ratio_node(const at::Tensor& z, const at::Tensor& activation,
                                  double epsilon) {
  return ProductRatioNode::apply(z, activation, epsilon);
}

}  // namespace

TORCH_LIBRARY_IMPL(fastattr, CompositeImplicitAutograd, m) {
  m.impl("lrp_product_node", &lrp_product_node);
  m.impl("lrp_ratio_node", &lrp_ratio_node);
  m.impl("lrp_pass_node", &lrp_pass_node);
  m.impl("lrp_product_ratio_node", &lrp_product_ratio_node);
}

}  // namespace fastattr
