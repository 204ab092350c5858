// The fastattr operator library: one schema per op. The kernels register themselves per
// device in cpu/ and cuda/; the fake (meta) implementations live in fastattr/ops/_fake.py.
#include <Python.h>
#include <torch/library.h>

TORCH_LIBRARY(fastattr, m) {
  // Path points: row p of the (P, ...) result is baselines_r + alphas_p * (inputs_r - baselines_r)
  // with r = rows_p.
  m.def("interpolate_points(Tensor inputs, Tensor baselines, Tensor rows, Tensor alphas) -> Tensor");
  // accumulator_{rows_p} += weights_p * grads_p for every point p, in place, each row's points
  // added in their order.
  m.def(
      "accumulate_points(Tensor(a!) accumulator, Tensor grads, Tensor rows, Tensor weights) -> ()");
  // Directional derivatives along the paths: slope_p = sum_j grads_pj * (inputs_rj - baselines_rj)
  // with r = rows_p, accumulated in float64.
  m.def("point_slopes(Tensor grads, Tensor rows, Tensor inputs, Tensor baselines) -> Tensor");
  // (accumulator * (inputs - baselines) if multiply_by_inputs else accumulator, per-row sums).
  m.def(
      "quadrature_finish(Tensor accumulator, Tensor inputs, Tensor baselines, "
      "bool multiply_by_inputs) -> (Tensor, Tensor)");
  // relevance / (z + epsilon * sign(z)), with sign(0) taken as +1.
  m.def("epsilon_ratio(Tensor relevance, Tensor z, float epsilon) -> Tensor");
  // epsilon_ratio(input_relevance(activations, contributions), z, epsilon) in one pass: the
  // product at a module's input and the ratio at the previous module's output, when only
  // pass-through modules lie between them.
  m.def(
      "epsilon_ratio_of_product(Tensor activations, Tensor contributions, Tensor z, "
      "float epsilon) -> Tensor");
  // activations * contributions: LRP's relevance at a module's input.
  m.def("input_relevance(Tensor activations, Tensor contributions) -> Tensor");
  // LRP's autograd nodes (csrc/lrp_nodes.cpp): each returns a view of the tensor the model
  // continues with; the backward runs input_relevance / epsilon_ratio_of_product /
  // epsilon_ratio / a plain pass / a linear layer's matmul (lrp_linear_node) into the input
  // the relevance goes to.
  m.def("lrp_product_node(Tensor(a) activation) -> Tensor(a)");
  m.def("lrp_product_ratio_node(Tensor z, Tensor(a) activation, float epsilon) -> Tensor(a)");
  m.def("lrp_ratio_node(Tensor(a) z, float epsilon) -> Tensor(a)");
  m.def("lrp_ratio_shown_node(Tensor z, Tensor(a) shown, float epsilon) -> Tensor(a)");
  m.def("lrp_pass_node(Tensor source, Tensor(a) shown) -> Tensor(a)");
  m.def("lrp_linear_node(Tensor x, Tensor weight, Tensor(a) shown) -> Tensor(a)");
  // method="exact": for each segment p and unit u, whether values[ends_a[p], u] and
  // values[ends_b[p], u] lie beyond their rows' tolerances of zero with opposite signs.
  m.def("kink_flips(Tensor values, Tensor tolerance, Tensor ends_a, Tensor ends_b) -> Tensor");
  // The transformer rules (AttnLRP, csrc/attention.h). Along `dim`: inputs * (relevance -
  // probs * relevance.sum(dim)), zero where inputs is -inf.
  m.def("softmax_relevance(Tensor inputs, Tensor probs, Tensor relevance, int dim) -> Tensor");
  // The same rule in the ratio form, for scores z the softmax read as scale * z plus a mask:
  // scale * (relevance - probs * relevance.sum(dim)), the relevance at the input over z.
  m.def(
      "softmax_contribution(Tensor probs, Tensor relevance, int dim, float scale) -> Tensor");
  // Per normalized row, v = weight * relevance / (outputs + epsilon * sign(outputs)) and
  // inputs * (v - mean(v)) * rstd: layer norm with the normalization taken as linear.
  m.def(
      "layer_norm_relevance(Tensor inputs, Tensor relevance, Tensor outputs, Tensor rstd, "
      "Tensor? weight, float epsilon) -> Tensor");
  // activations * contributions * share: one factor's part of a product's relevance.
  m.def("relevance_share(Tensor activations, Tensor contributions, float share) -> Tensor");
  // Their autograd nodes (csrc/attention_nodes.cpp): lrp_share_node's forward is the identity
  // (its output aliases the input); the others compute a @ b / a * b / softmax / layer_norm.
  // lrp_softmax_ratio_node computes the softmax of `inputs` (scale * scores plus a mask) and
  // sends softmax_contribution into `scores`.
  m.def("lrp_share_node(Tensor(a) activation, float share) -> Tensor(a)");
  m.def("lrp_uniform_matmul_node(Tensor a, Tensor b) -> Tensor");
  m.def("lrp_uniform_product_node(Tensor a, Tensor b) -> Tensor");
  m.def("lrp_softmax_node(Tensor inputs, int dim, ScalarType? dtype) -> Tensor");
  m.def(
      "lrp_softmax_ratio_node(Tensor scores, Tensor inputs, int dim, ScalarType? dtype, "
      "float scale) -> Tensor");
  m.def(
      "lrp_layer_norm_node(Tensor inputs, int[] normalized_shape, Tensor? weight, Tensor? bias, "
      "float eps, float epsilon) -> Tensor");
}

#ifdef FASTATTR_WITH_CUDA
#define FASTATTR_HAS_CUDA 1
#else
#define FASTATTR_HAS_CUDA 0
#define FASTATTR_CUDA_ARCH_LIST ""
#endif

extern "C" {
// Importing fastattr._C runs the static registrations above; the module itself only reports
// how it was built.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  PyObject* module = PyModule_Create(&module_def);
  if (module == nullptr) return nullptr;
  if (PyModule_AddIntConstant(module, "with_cuda", FASTATTR_HAS_CUDA) < 0 ||
      PyModule_AddStringConstant(module, "cuda_arch_list", FASTATTR_CUDA_ARCH_LIST) < 0) {
    Py_DECREF(module);
    return nullptr;
  }
  return module;
}
}
