// The autograd nodes LRP inserts around modules and torch calls. Each op's forward returns a
// view of one input (what the model continues with, declared `Tensor(a) -> Tensor(a)`); its
// backward, registered on the Autograd key, runs the compiled element-wise ops (or, for
// lrp_linear_node, a matrix product) on whatever device the tensors are, so the backward never
// enters Python. Their PyTorch twins are the
// Functions in fastattr/ops/reference.py.
#include <ATen/Dispatch.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/alias.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include <algorithm>
#include <optional>
#include <vector>

namespace fastattr {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

template <typename Signature>
c10::TypedOperatorHandle<Signature> op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Signature>();
}

at::Tensor epsilon_ratio(const at::Tensor& relevance, const at::Tensor& z, double epsilon) {
  static const auto handle =
      op<at::Tensor(const at::Tensor&, const at::Tensor&, double)>("fastattr::epsilon_ratio");
  return handle.call(relevance, z, epsilon);
}

at::Tensor input_relevance(const at::Tensor& activations, const at::Tensor& contributions) {
  static const auto handle =
      op<at::Tensor(const at::Tensor&, const at::Tensor&)>("fastattr::input_relevance");
  return handle.call(activations, contributions);
}

at::Tensor epsilon_ratio_of_product(const at::Tensor& activations,
                                    const at::Tensor& contributions, const at::Tensor& z,
                                    double epsilon) {
  static const auto handle =
      op<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, double)>(
          "fastattr::epsilon_ratio_of_product");
  return handle.call(activations, contributions, z, epsilon);
}

// The forwards, below autograd: a view of the tensor shown. at::alias goes through the
// ADInplaceOrView key, so the view shares its base's version counter, and autograd, which
// sees it created inside a custom Function, refuses in-place changes to it.

at::Tensor product_forward(const at::Tensor& activation) { return at::alias(activation); }

at::Tensor product_ratio_forward(const at::Tensor&, const at::Tensor& activation, double) {
  return at::alias(activation);
}

at::Tensor ratio_forward(const at::Tensor& z, double) { return at::alias(z); }

at::Tensor ratio_shown_forward(const at::Tensor&, const at::Tensor& shown, double) {
  return at::alias(shown);
}

at::Tensor pass_forward(const at::Tensor&, const at::Tensor& shown) { return at::alias(shown); }

at::Tensor linear_forward(const at::Tensor&, const at::Tensor&, const at::Tensor& shown) {
  return at::alias(shown);
}

// The indices of the rows of a matrix that are not all zero, when they are at most half of its
// rows and it lies in CPU memory; otherwise nullopt. A row whose first entry is not zero is live
// at once, and the count stops as soon as more than half are: a dense matrix costs a few reads.
std::optional<at::Tensor> few_live_rows(const at::Tensor& rows) {
  const int64_t count = rows.size(0);
  const int64_t width = rows.size(1);
  if (!rows.is_cpu() || count < 2 || width == 0) return std::nullopt;
  std::vector<int64_t> live;
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, rows.scalar_type(), "few_live_rows", [&] {
        const scalar_t* data = rows.const_data_ptr<scalar_t>();
        const int64_t row_stride = rows.stride(0);
        const int64_t column_stride = rows.stride(1);
        for (int64_t i = 0; i < count && 2 * static_cast<int64_t>(live.size()) <= count; ++i) {
          const scalar_t* row = data + i * row_stride;
          for (int64_t j = 0; j < width; ++j) {
            if (row[j * column_stride] != scalar_t(0)) {
              live.push_back(i);
              break;
            }
          }
        }
      });
  const int64_t found = static_cast<int64_t>(live.size());
  if (2 * found > count) return std::nullopt;
  at::Tensor indices = rows.new_empty({found}, rows.options().dtype(at::kLong));
  std::copy(live.begin(), live.end(), indices.mutable_data_ptr<int64_t>());
  return indices;
}

// contribution @ weight over the last dimension. On the CPU, when at most half the rows are not
// all zero, only those are multiplied: a model that reads some positions of a sequence (a
// classifier on the first token, a language model's last position) leaves the others without
// relevance. (On a GPU, looking would stall the stream.)
at::Tensor rows_times_weight(const at::Tensor& contribution, const at::Tensor& weight) {
  std::vector<int64_t> sizes = contribution.sizes().vec();
  sizes.back() = weight.size(1);
  const at::Tensor rows = contribution.reshape({-1, weight.size(0)});
  const std::optional<at::Tensor> live = few_live_rows(rows);
  if (!live) return rows.mm(weight).view(sizes);
  at::Tensor result = rows.new_zeros({rows.size(0), weight.size(1)});
  result.index_copy_(0, *live, rows.index_select(0, *live).mm(weight));
  return result.view(sizes);
}

// Each Function's forward calls its op below autograd (and so reaches the forward above).

// Backward activation * relevance: the relevance at a module's input.
struct ProductNode : public torch::autograd::Function<ProductNode> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& activation) {
    static const auto handle = op<at::Tensor(const at::Tensor&)>("fastattr::lrp_product_node");
    ctx->save_for_backward({activation});
    const at::AutoDispatchBelowAutograd below;
    return handle.call(activation);
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const at::Tensor activation = ctx->get_saved_variables()[0];
    return {input_relevance(activation, grads[0].to(activation.scalar_type()))};
  }
};

// Shows `activation` (detached, a function of z through pass-through rules only); backward
// sends activation * relevance / (z + eps sign z) straight into z's graph: a ProductNode folded
// into the RatioNode of the module before.
struct ProductRatioNode : public torch::autograd::Function<ProductRatioNode> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& z,
                            const at::Tensor& activation, double epsilon) {
    static const auto handle =
        op<at::Tensor(const at::Tensor&, const at::Tensor&, double)>(
            "fastattr::lrp_product_ratio_node");
    ctx->save_for_backward({z, activation});
    ctx->saved_data["epsilon"] = epsilon;
    const at::AutoDispatchBelowAutograd below;
    return handle.call(z, activation, epsilon);
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

// Shows z; backward relevance / (z + eps sign z) into z's graph.
struct RatioNode : public torch::autograd::Function<RatioNode> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& z, double epsilon) {
    static const auto handle =
        op<at::Tensor(const at::Tensor&, double)>("fastattr::lrp_ratio_node");
    ctx->save_for_backward({z});
    ctx->saved_data["epsilon"] = epsilon;
    const at::AutoDispatchBelowAutograd below;
    return handle.call(z, epsilon);
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const at::Tensor z = ctx->get_saved_variables()[0];
    const double epsilon = ctx->saved_data["epsilon"].toDouble();
    return {epsilon_ratio(grads[0].to(z.scalar_type()), z, epsilon), at::Tensor()};
  }
};

// Shows `shown` (the module's true output, when z is a recomputation of it); backward as
// RatioNode's, into z's graph.
struct RatioShownNode : public torch::autograd::Function<RatioShownNode> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& z, const at::Tensor& shown,
                            double epsilon) {
    static const auto handle =
        op<at::Tensor(const at::Tensor&, const at::Tensor&, double)>(
            "fastattr::lrp_ratio_shown_node");
    ctx->save_for_backward({z});
    ctx->saved_data["epsilon"] = epsilon;
    const at::AutoDispatchBelowAutograd below;
    return handle.call(z, shown, epsilon);
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const at::Tensor z = ctx->get_saved_variables()[0];
    const double epsilon = ctx->saved_data["epsilon"].toDouble();
    return {epsilon_ratio(grads[0].to(z.scalar_type()), z, epsilon), at::Tensor(), at::Tensor()};
  }
};

// Shows `shown`; backward hands the relevance to `source` unchanged.
struct PassNode : public torch::autograd::Function<PassNode> {
  static at::Tensor forward(AutogradContext*, const at::Tensor& source, const at::Tensor& shown) {
    static const auto handle =
        op<at::Tensor(const at::Tensor&, const at::Tensor&)>("fastattr::lrp_pass_node");
    const at::AutoDispatchBelowAutograd below;
    return handle.call(source, shown);
  }
  static variable_list backward(AutogradContext*, variable_list grads) {
    return {grads[0], at::Tensor()};
  }
};

// Shows `shown`, a linear layer's output x @ weight^T + bias; backward sends contribution @
// weight into x's graph (rows_times_weight), in place of the layer's own matmul backward.
struct LinearNode : public torch::autograd::Function<LinearNode> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& weight,
                            const at::Tensor& shown) {
    static const auto handle =
        op<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&)>(
            "fastattr::lrp_linear_node");
    ctx->save_for_backward({weight});
    const at::AutoDispatchBelowAutograd below;
    return handle.call(x, weight, shown);
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const at::Tensor weight = ctx->get_saved_variables()[0];
    return {rows_times_weight(grads[0].to(weight.scalar_type()), weight), at::Tensor(),
            at::Tensor()};
  }
};

at::Tensor product_autograd(const at::Tensor& activation) {
  return ProductNode::apply(activation);
}

at::Tensor product_ratio_autograd(const at::Tensor& z, const at::Tensor& activation,
                                  double epsilon) {
  return ProductRatioNode::apply(z, activation, epsilon);
}

at::Tensor ratio_autograd(const at::Tensor& z, double epsilon) {
  return RatioNode::apply(z, epsilon);
}

at::Tensor ratio_shown_autograd(const at::Tensor& z, const at::Tensor& shown, double epsilon) {
  return RatioShownNode::apply(z, shown, epsilon);
}

at::Tensor pass_autograd(const at::Tensor& source, const at::Tensor& shown) {
  return PassNode::apply(source, shown);
}

at::Tensor linear_autograd(const at::Tensor& x, const at::Tensor& weight,
                           const at::Tensor& shown) {
  return LinearNode::apply(x, weight, shown);
}

}  // namespace

TORCH_LIBRARY_IMPL(fastattr, CompositeExplicitAutograd, m) {
  m.impl("lrp_product_node", &product_forward);
  m.impl("lrp_product_ratio_node", &product_ratio_forward);
  m.impl("lrp_ratio_node", &ratio_forward);
  m.impl("lrp_ratio_shown_node", &ratio_shown_forward);
  m.impl("lrp_pass_node", &pass_forward);
  m.impl("lrp_linear_node", &linear_forward);
}

TORCH_LIBRARY_IMPL(fastattr, Autograd, m) {
  m.impl("lrp_product_node", &product_autograd);
  m.impl("lrp_product_ratio_node", &product_ratio_autograd);
  m.impl("lrp_ratio_node", &ratio_autograd);
  m.impl("lrp_ratio_shown_node", &ratio_shown_autograd);
  m.impl("lrp_pass_node", &pass_autograd);
  m.impl("lrp_linear_node", &linear_autograd);
}

}  // namespace fastattr
