"""LRP for transformers: the rules of AttnLRP (Achtibat et al., "AttnLRP: Attention-Aware
Layer-Wise Relevance Propagation for Transformers", ICML 2024, arXiv 2402.05602).

Two kinds of rules live here, both with LRP's convention: the relevance arriving at an output
goes out as relevance at the inputs.

* Module rules ([PropagationRule][fastattr.lrp.rules.PropagationRule]), the defaults of module
  types that transformers use
  ([transformer_default_rule][fastattr.lrp.attention.transformer_default_rule]):
  [LayerNormRule][fastattr.lrp.attention.LayerNormRule] for ``nn.LayerNorm``, relevance passed
  through unchanged for RMSNorm modules and point-wise activations (HuggingFace's included),
  epsilon for HuggingFace's ``Conv1D``, [SoftmaxRule][fastattr.lrp.attention.SoftmaxRule] for
  ``nn.Softmax`` and [EmbeddingRule][fastattr.lrp.attention.EmbeddingRule] for
  ``nn.Embedding``.
* Op rules ([OpRule][fastattr.lrp.attention.OpRule]), for the torch functions a model's own
  forward code calls on tensors that carry relevance
  ([OP_RULES][fastattr.lrp.attention.OP_RULES]): the uniform rule for the products of two such
  tensors (``a * b``, ``a @ b``, ``torch.bmm``, ``torch.einsum``, ...), AttnLRP's softmax
  rule, the layer-norm rule for ``F.layer_norm``, ``F.scaled_dot_product_attention`` and
  ``F.multi_head_attention_forward`` (``nn.MultiheadAttention``), the epsilon rule for sums,
  biases and other linear maps, and relevance passed unchanged through point-wise functions
  and reshapes.

Example: a hand-written attention head.

>>> import torch
>>> from torch import nn
>>> from fastattr import LRP
>>> class Head(nn.Module):
...     def __init__(self):
...         super().__init__()
...         self.q, self.k, self.v = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 8)
...         self.out = nn.Linear(8, 3)
...     def forward(self, x):
...         q, k, v = self.q(x), self.k(x), self.v(x)
...         weights = torch.softmax(q @ k.transpose(-1, -2) / 8**0.5, dim=-1)
...         return self.out((weights @ v).mean(1))
>>> model = Head().double().eval()
>>> x = torch.randn(2, 5, 8, dtype=torch.float64)
>>> relevance, delta = LRP(model).attribute(x, target=0, return_convergence_delta=True)
>>> relevance.shape
torch.Size([2, 5, 8])
"""

from __future__ import annotations

import functools
import math
import numbers
import types
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastattr import ops
from fastattr.lrp.rules import EpsilonRule, PassRule, PropagationRule

# The stabilizer of the ratios the op rules divide by (captum's epsilon default).
EPSILON = 1e-9

CarriesRelevance = Callable[[object], bool]


def _check_epsilon(epsilon: object) -> float:
    if not isinstance(epsilon, numbers.Real) or isinstance(epsilon, bool):
        raise TypeError(f"epsilon must be a real number, got {type(epsilon).__name__}")
    if not (math.isfinite(epsilon) and epsilon >= 0):
        raise ValueError(f"epsilon must be finite and non-negative, got {epsilon}")
    return float(epsilon)


def _shown(tensor: Tensor, copy: bool) -> Tensor:
    # A rule output the model later modifies in place must not be the tensor its node saved.
    return tensor.clone() if copy else tensor


# ---------------------------------------------------------------------------------------------
# Module rules


class LayerNormRule(PropagationRule):
    """AttnLRP's rule for layer norm: the normalization treated as linear (the standard deviation
    held fixed, so the variance path carries no relevance), the epsilon rule on the resulting
    linear map. Per normalized row, with ``v = weight * R_out / (y + epsilon * sign(y))``, the
    relevance at the input is ``x * (v - mean(v)) / std``; the bias absorbs its share.

    The default rule of ``nn.LayerNorm``.

    Args:
        epsilon: the stabilizer of the ratio at the output.

    Examples:
        >>> import torch
        >>> from torch import nn
        >>> from fastattr import LRP
        >>> from fastattr.lrp.attention import LayerNormRule
        >>> model = nn.Sequential(nn.Linear(4, 6), nn.LayerNorm(6), nn.Linear(6, 2)).double()
        >>> model[1].rule = LayerNormRule(epsilon=1e-9)
        >>> LRP(model).attribute(torch.randn(3, 4, dtype=torch.float64), target=1).shape
        torch.Size([3, 4])
    """

    relevance_at_input = False

    def __init__(self, epsilon: float = EPSILON) -> None:
        self.epsilon = _check_epsilon(epsilon)

    def unsupported_reason(self, module: nn.Module) -> str | None:
        if not isinstance(module, nn.LayerNorm):
            return f"LayerNormRule runs on nn.LayerNorm, not on {type(module).__name__}"
        return None

    def propagate(self, module: nn.Module, inputs: tuple, output: Tensor, copy: bool) -> Tensor:
        return _shown(
            ops.lrp_layer_norm_node(
                inputs[0],
                list(module.normalized_shape),  # type: ignore[arg-type]
                module.weight,
                module.bias,
                module.eps,  # type: ignore[arg-type]
                self.epsilon,
            ),
            copy,
        )

    def __repr__(self) -> str:
        return f"LayerNormRule(epsilon={self.epsilon})"


class SoftmaxRule(PropagationRule):
    """AttnLRP's softmax rule: with ``s = softmax(x)``, the relevance at the input is ``x * (R -
    s * sum(R))`` along the softmax dimension (the input times the gradient of ``sum(s * R /
    s)``, computed without dividing by ``s``). It does not conserve relevance: the Taylor
    expansion's bias term is not redistributed, as in the paper (Proposition 3.1). Inputs of
    ``-inf`` (masked scores) receive none.

    The default rule of ``nn.Softmax``; [OP_RULES][fastattr.lrp.attention.OP_RULES] applies the
    same to ``torch.softmax``.

    Examples:
        >>> import torch
        >>> from torch import nn
        >>> from fastattr.lrp.attention import SoftmaxRule
        >>> softmax = nn.Softmax(dim=-1)
        >>> softmax.rule = SoftmaxRule()
    """

    relevance_at_input = False

    def unsupported_reason(self, module: nn.Module) -> str | None:
        if not isinstance(module, nn.Softmax):
            return f"SoftmaxRule runs on nn.Softmax, not on {type(module).__name__}"
        return None

    def propagate(self, module: nn.Module, inputs: tuple, output: Tensor, copy: bool) -> Tensor:
        dim = module.dim  # type: ignore[attr-defined]
        if dim is None:
            raise ValueError("SoftmaxRule needs nn.Softmax with an explicit dim")
        return _shown(ops.lrp_softmax_node(inputs[0], dim, None), copy)

    def __repr__(self) -> str:
        return "SoftmaxRule()"


class EmbeddingRule(PropagationRule):
    """An embedding's output is where relevance stops: the token ids it looks up carry none.

    The default rule of ``nn.Embedding``, so that ``LayerLRP`` on a model's word embedding gives
    the relevance of each embedded token. Embeddings added to the tokens' (positions, token
    types) take their share of a sum as a bias does.

    Examples:
        >>> from torch import nn
        >>> from fastattr.lrp.attention import EmbeddingRule
        >>> embedding = nn.Embedding(10, 4)
        >>> embedding.rule = EmbeddingRule()
    """

    relevance_at_input = False

    def propagate(self, module: nn.Module, inputs: tuple, output: Tensor, copy: bool) -> Tensor:
        return _shown(output, copy)

    def __repr__(self) -> str:
        return "EmbeddingRule()"


def _hf_type(module: nn.Module, module_prefix: str) -> str | None:
    """The class name of a HuggingFace transformers module from ``module_prefix``, else None;
    transformers itself is never imported."""
    kind = type(module)
    return kind.__name__ if kind.__module__.startswith(module_prefix) else None


def transformer_default_rule(module: nn.Module) -> PropagationRule | None:
    """The AttnLRP default of a transformer module type, or None.

    ``nn.LayerNorm``: [LayerNormRule][fastattr.lrp.attention.LayerNormRule]; ``nn.Softmax``:
    [SoftmaxRule][fastattr.lrp.attention.SoftmaxRule]; ``nn.Embedding``:
    [EmbeddingRule][fastattr.lrp.attention.EmbeddingRule]; ``nn.RMSNorm`` and HuggingFace's
    RMSNorm modules
    (``transformers.models.*.*RMSNorm``): relevance passed through unchanged (RMS
    normalization with the RMS held fixed is a per-feature scaling); HuggingFace's activation
    modules (``transformers.activations``): passed through unchanged; HuggingFace's ``Conv1D``
    (GPT-2's linear layers): [EpsilonRule][fastattr.lrp.rules.EpsilonRule].

    Args:
        module: any module.

    Returns:
        A new rule, or None when the type has no transformer default.

    Examples:
        >>> from torch import nn
        >>> from fastattr.lrp.attention import transformer_default_rule
        >>> transformer_default_rule(nn.LayerNorm(8))
        LayerNormRule(epsilon=1e-09)
        >>> transformer_default_rule(nn.Linear(2, 2)) is None
        True
    """
    if isinstance(module, nn.LayerNorm):
        return LayerNormRule()
    if isinstance(module, nn.Softmax):
        return SoftmaxRule()
    if isinstance(module, nn.Embedding):
        return EmbeddingRule()
    rms_norm = getattr(nn, "RMSNorm", None)
    if rms_norm is not None and isinstance(module, rms_norm):
        return PassRule()
    name = _hf_type(module, "transformers.models.")
    if name is not None and name.endswith("RMSNorm"):
        return PassRule()
    if _hf_type(module, "transformers.activations") is not None:
        return PassRule()
    if _hf_type(module, "transformers.pytorch_utils") == "Conv1D":
        return EpsilonRule()
    return None


# ---------------------------------------------------------------------------------------------
# Op rules


class OpRule(ABC):
    """How relevance crosses one call of a torch function.

    A rule runs the call itself and returns its result, built so that the backward turns the
    relevance arriving at the result into relevance at the arguments that carry relevance
    (``carries(argument)`` is true for them).
    """

    @abstractmethod
    def __call__(
        self,
        func: Callable,
        args: tuple,
        kwargs: dict[str, Any],
        carries: CarriesRelevance,
        copy: bool,
    ) -> Any:
        """``func(*args, **kwargs)`` carrying this rule's backward; ``copy``: return outputs
        that the model may modify in place."""


def _map_carrying(value: Any, carries: CarriesRelevance, wrap: Callable[[Tensor], Tensor]) -> Any:
    # Arguments may hold tensors one list deep: torch.cat([a, b]), torch.einsum(eq, [a, b]).
    if isinstance(value, (list, tuple)):
        return type(value)(wrap(v) if carries(v) else v for v in value)
    return wrap(value) if carries(value) else value


def _carrying(args: tuple, kwargs: Mapping[str, Any], carries: CarriesRelevance) -> list[Tensor]:
    found = []
    for value in (*args, *kwargs.values()):
        if isinstance(value, (list, tuple)):
            found.extend(v for v in value if carries(v))
        elif carries(value):
            found.append(value)
    return found


def _name(func: Callable) -> str:
    qualname = getattr(func, "__qualname__", None) or getattr(func, "__name__", None)
    return (
        str(qualname or func)
        .replace("TensorBase.", "Tensor.")
        .replace("_VariableFunctionsClass.", "torch.")
    )


def no_rule_error(func: Callable, detail: str = "") -> TypeError:
    """The error for a torch function that LRP has no rule for on tensors carrying relevance.

    Args:
        func: the torch function.
        detail: what about the call has no rule, appended to the function's name.

    Returns:
        A TypeError naming the function and saying how to give the computation a rule.
    """
    return TypeError(
        f"LRP has no rule for {_name(func)}{detail} on tensors that carry relevance: it is not "
        "point-wise, so passing the gradient through would misattribute silently. Move the "
        "computation into a module of its own and set a rule on it (module.rule = "
        "EpsilonRule() for a linear map, IdentityRule() for an element-wise one, ...)."
    )


class StructuralRule(OpRule):
    """Reshapes, copies, selections: autograd's own backward moves the relevance."""

    def __call__(self, func, args, kwargs, carries, copy):
        return func(*args, **kwargs)


class IdentityOpRule(OpRule):
    """Point-wise functions of one tensor (activations, dropout, scaling by a constant): the
    relevance passes to the input unchanged (AttnLRP's identity rule)."""

    def __call__(self, func, args, kwargs, carries, copy):
        found = _carrying(args, kwargs, carries)
        with torch.no_grad():
            output = func(*args, **kwargs)
        if len(found) != 1 or not isinstance(output, Tensor) or output.shape != found[0].shape:
            raise no_rule_error(func, " (as an element-wise map of one tensor)")
        return ops.lrp_pass_node(found[0], output, copy)


class EpsilonOpRule(OpRule):
    """The epsilon rule on a map that is linear in each tensor that carries relevance: each such
    input ``a`` receives ``share * a * J_a^T (R / (z + epsilon * sign(z)))``.

    ``uniform=False`` (share 1): sums, differences, a bias added, sums and means over
    dimensions, a product with a constant matrix. ``uniform=True`` (share 1/n for n inputs that
    carry relevance): AttnLRP's uniform rule for products of activations (``a * b``, ``a @ b``),
    which are linear in each factor alone.

    Args:
        uniform: split the relevance equally between the inputs that carry it.
        epsilon: the stabilizer of the ratio at the output.
    """

    def __init__(self, uniform: bool = False, epsilon: float = EPSILON) -> None:
        self.uniform = uniform
        self.epsilon = _check_epsilon(epsilon)

    def __call__(self, func, args, kwargs, carries, copy):
        found = _carrying(args, kwargs, carries)
        share = 1.0 / len(found) if self.uniform and found else 1.0

        def node(tensor: Tensor) -> Tensor:
            return (
                ops.lrp_share_node(tensor, share) if share != 1.0 else ops.lrp_product_node(tensor)
            )

        args = tuple(_map_carrying(a, carries, node) for a in args)
        kwargs = {k: _map_carrying(v, carries, node) for k, v in kwargs.items()}
        output = func(*args, **kwargs)
        if not isinstance(output, Tensor):
            raise no_rule_error(func, " (a linear map with one tensor result)")
        return ops.lrp_ratio_node(output, None, self.epsilon, copy)

    def __repr__(self) -> str:
        return f"EpsilonOpRule(uniform={self.uniform}, epsilon={self.epsilon})"


def _is_mask(value: object) -> bool:
    """Whether ``value`` is an additive attention mask: a floating tensor of zeros and of values
    at most half the dtype's lowest (``-inf`` included)."""
    if not isinstance(value, Tensor) or not value.is_floating_point():
        return False
    lowest = torch.finfo(value.dtype).min / 2
    return bool(((value == 0) | (value <= lowest)).all())


class SumOpRule(EpsilonOpRule):
    """Sums and differences: the epsilon rule (a constant added is a bias, which absorbs its
    share), except that an attention mask added to scores passes the relevance on unchanged,
    which is exact: it adds zero where the softmax rule leaves relevance, and where it adds a
    huge negative number the softmax rule leaves none."""

    def __call__(self, func, args, kwargs, carries, copy):
        found = _carrying(args, kwargs, carries)
        others = [v for v in (*args, *kwargs.values()) if isinstance(v, Tensor) and not carries(v)]
        if len(found) == 1 and others and all(map(_is_mask, others)):
            return func(*args, **kwargs)
        return super().__call__(func, args, kwargs, carries, copy)


class ProductOpRule(OpRule):
    """``a * b`` and ``a / b``: the uniform rule when both factors carry relevance, else the
    product with a constant: relevance passed unchanged when the result has the shape of the
    factor, the epsilon rule when broadcasting makes it larger. A divisor carrying relevance
    has no rule.

    Args:
        divides: the rule of a division (only the dividend may carry relevance).
        epsilon: the stabilizer of the ratio at the output.
    """

    def __init__(self, divides: bool, epsilon: float = EPSILON) -> None:
        self.divides = divides
        self.uniform = EpsilonOpRule(uniform=True, epsilon=epsilon)
        self.linear = EpsilonOpRule(epsilon=epsilon)

    def __call__(self, func, args, kwargs, carries, copy):
        if kwargs.get("rounding_mode") is not None:
            raise no_rule_error(func, f" with rounding_mode={kwargs['rounding_mode']!r}")
        found = _carrying(args, kwargs, carries)
        if self.divides and len(args) > 1 and carries(args[1]):
            raise no_rule_error(func, " by a tensor that carries relevance")
        if len(found) > 1:
            return self.uniform(func, args, kwargs, carries, copy)
        with torch.no_grad():
            output = func(*args, **kwargs)
        if output.shape == found[0].shape:
            return ops.lrp_pass_node(found[0], output, copy)
        return self.linear(func, args, kwargs, carries, copy)


def _argument(args: tuple, kwargs: Mapping[str, Any], index: int, name: str, default: Any) -> Any:
    if len(args) > index:
        return args[index]
    return kwargs.get(name, default)


class SoftmaxOpRule(OpRule):
    """``torch.softmax``, ``F.softmax`` and ``Tensor.softmax``:
    [SoftmaxRule][fastattr.lrp.attention.SoftmaxRule].

    Args:
        dtype_index: where the function takes ``dtype`` among its positional arguments.
    """

    def __init__(self, dtype_index: int) -> None:
        self.dtype_index = dtype_index  # where dtype sits among the positional arguments

    def __call__(self, func, args, kwargs, carries, copy):
        inputs = _argument(args, kwargs, 0, "input", None)
        dim = _argument(args, kwargs, 1, "dim", None)
        dtype = _argument(args, kwargs, self.dtype_index, "dtype", None)
        if not carries(inputs) or dim is None:
            raise no_rule_error(func, " without an explicit dim" if dim is None else "")
        return _shown(ops.lrp_softmax_node(inputs, dim, dtype), copy)


class LayerNormOpRule(OpRule):
    """``F.layer_norm``: [LayerNormRule][fastattr.lrp.attention.LayerNormRule] (a weight or
    bias carrying relevance has no rule).

    Args:
        epsilon: the stabilizer of the ratio at the output.
    """

    def __init__(self, epsilon: float = EPSILON) -> None:
        self.epsilon = _check_epsilon(epsilon)

    def __call__(self, func, args, kwargs, carries, copy):
        inputs = _argument(args, kwargs, 0, "input", None)
        shape = _argument(args, kwargs, 1, "normalized_shape", None)
        weight = _argument(args, kwargs, 2, "weight", None)
        bias = _argument(args, kwargs, 3, "bias", None)
        eps = _argument(args, kwargs, 4, "eps", 1e-5)
        if carries(weight) or carries(bias) or not carries(inputs):
            raise no_rule_error(func, " with a weight or bias that carries relevance")
        return _shown(
            ops.lrp_layer_norm_node(inputs, list(shape), weight, bias, eps, self.epsilon), copy
        )


class RMSNormOpRule(OpRule):
    """``F.rms_norm``: the relevance passes to the input unchanged (with the RMS held fixed, RMS
    normalization scales each feature)."""

    def __call__(self, func, args, kwargs, carries, copy):
        inputs = _argument(args, kwargs, 0, "input", None)
        weight = _argument(args, kwargs, 2, "weight", None)
        if carries(weight) or not carries(inputs):
            raise no_rule_error(func, " with a weight that carries relevance")
        with torch.no_grad():
            output = func(*args, **kwargs)
        return ops.lrp_pass_node(inputs, output, copy)


class ScaledDotProductAttentionRule(OpRule):
    """``F.scaled_dot_product_attention``: AttnLRP through the whole attention, as the input
    times the gradient of ``sum(O * R / (O + epsilon * sign(O)))`` with shares 1/4 for the query
    and the key and 1/2 for the value (the uniform rule at both matrix products, the softmax
    by its rule, the mask a bias). Exactly the rules applied one by one to the written-out
    attention, in one pass of the attention's own backward. A mask that carries relevance has
    no rule.

    Args:
        epsilon: the stabilizer of the ratio at the output.
    """

    SHARES = (0.25, 0.25, 0.5)

    def __init__(self, epsilon: float = EPSILON) -> None:
        self.epsilon = _check_epsilon(epsilon)

    def __call__(self, func, args, kwargs, carries, copy):
        if carries(_argument(args, kwargs, 3, "attn_mask", None)):
            raise no_rule_error(func, " with an attn_mask that carries relevance")
        args = list(args)
        for index, (name, share) in enumerate(zip(("query", "key", "value"), self.SHARES)):
            value = _argument(args, kwargs, index, name, None)
            if carries(value):
                shared = ops.lrp_share_node(value, share)
                if index < len(args):
                    args[index] = shared
                else:
                    kwargs = {**kwargs, name: shared}
        output = func(*args, **kwargs)
        return ops.lrp_ratio_node(output, None, self.epsilon, copy)

    def __repr__(self) -> str:
        return f"ScaledDotProductAttentionRule(epsilon={self.epsilon})"


class OpenRule(OpRule):
    """A torch function written in Python from other torch functions (such as
    ``F.multi_head_attention_forward``, behind ``nn.MultiheadAttention``): its own code runs,
    with the op rules applied to the calls it makes. The interception that applies op rules
    runs [body][fastattr.lrp.attention.OpenRule.body] under them."""

    def __call__(self, func, args, kwargs, carries, copy):
        raise RuntimeError("OpenRule is applied by running its body under the op rules")

    @staticmethod
    @functools.lru_cache(maxsize=16)
    def body(func: Callable) -> Callable:
        """``func`` without its dispatch to torch-function modes (its first step), so that the
        calls it makes meet the rules instead of ``func`` meeting them again.

        Args:
            func: a torch function written in Python that dispatches through
                ``has_torch_function``, as those of ``torch.nn.functional`` do.

        Returns:
            The same function, its check for torch-function modes always false.

        Raises:
            TypeError: ``func`` is not such a function.
        """
        found = getattr(func, "__globals__", {}).get("has_torch_function")
        if found is None or not isinstance(func, types.FunctionType):
            raise no_rule_error(func)
        namespace = dict(func.__globals__)
        namespace["has_torch_function"] = lambda _: False
        return types.FunctionType(
            func.__code__, namespace, func.__name__, func.__defaults__, func.__closure__
        )


STRUCTURAL = StructuralRule()


def _methods(*names: str) -> list[Callable]:
    return [getattr(torch.Tensor, n) for n in names if hasattr(torch.Tensor, n)]


def _functions(module: Any, *names: str) -> list[Callable]:
    return [getattr(module, n) for n in names if hasattr(module, n)]


def _getters(*names: str) -> list[Callable]:
    return [getattr(torch.Tensor, n).__get__ for n in names if hasattr(torch.Tensor, n)]


_RESHAPES = (
    "view",
    "view_as",
    "reshape",
    "reshape_as",
    "transpose",
    "t",
    "permute",
    "contiguous",
    "flatten",
    "unflatten",
    "squeeze",
    "unsqueeze",
    "expand",
    "expand_as",
    "repeat",
    "repeat_interleave",
    "tile",
    "narrow",
    "select",
    "index_select",
    "gather",
    "take_along_dim",
    "split",
    "split_with_sizes",
    "chunk",
    "unbind",
    "tensor_split",
    "movedim",
    "moveaxis",
    "swapaxes",
    "swapdims",
    "roll",
    "flip",
    "clone",
    "masked_fill",
    "where",
    "max",
    "min",
    "amax",
    "amin",
    "cat",
    "concat",
    "concatenate",
    "stack",
    "hstack",
    "vstack",
)
_METADATA = (
    "size",
    "dim",
    "numel",
    "stride",
    "is_floating_point",
    "is_contiguous",
    "element_size",
    "__len__",
    "type_as",
    "to",
    "type",
    "float",
    "double",
    "half",
    "bfloat16",
    "detach",
    "__getitem__",
    "__setitem__",
)
_POINTWISE = (
    "relu",
    "relu6",
    "gelu",
    "silu",
    "mish",
    "elu",
    "selu",
    "celu",
    "leaky_relu",
    "hardtanh",
    "hardswish",
    "hardsigmoid",
    "softplus",
    "softsign",
    "tanh",
    "sigmoid",
    "neg",
    "negative",
    "dropout",
    "dropout1d",
    "dropout2d",
    "dropout3d",
    "alpha_dropout",
    "feature_alpha_dropout",
    "normalize",
)


def build_op_rules(epsilon: float = EPSILON) -> Mapping[Callable, OpRule]:
    """The op rule of each torch function that has one, with the stabilizer ``epsilon`` in every
    ratio, as a read-only mapping ([OP_RULES][fastattr.lrp.attention.OP_RULES] is the
    default).

    Args:
        epsilon: the stabilizer of the epsilon, uniform, layer-norm and attention rules.

    Returns:
        A read-only mapping from torch functions (``torch.matmul``, ``torch.Tensor.softmax``,
        ``F.scaled_dot_product_attention``, ...) to their rules.

    Examples:
        >>> import torch
        >>> from fastattr.lrp.attention import build_op_rules
        >>> build_op_rules(1e-6)[torch.matmul]
        EpsilonOpRule(uniform=True, epsilon=1e-06)
    """
    identity, total = IdentityOpRule(), EpsilonOpRule(epsilon=epsilon)
    sums = SumOpRule(epsilon=epsilon)
    uniform = EpsilonOpRule(uniform=True, epsilon=epsilon)
    product = ProductOpRule(divides=False, epsilon=epsilon)
    quotient = ProductOpRule(divides=True, epsilon=epsilon)
    table: dict[Callable, OpRule] = {}

    def add(rule: OpRule, funcs: list[Callable]) -> None:
        for func in funcs:
            table[func] = rule

    add(STRUCTURAL, _methods(*_RESHAPES, *_METADATA) + _functions(torch, *_RESHAPES))
    add(STRUCTURAL, [F.pad, *_getters("T", "mT", "H", "mH", "data", "shape", "dtype", "device")])
    add(identity, _methods(*_POINTWISE) + _functions(torch, *_POINTWISE))
    add(identity, _functions(F, *_POINTWISE) + _functions(torch.special, "expit"))
    add(sums, _methods("add", "sub", "__rsub__") + _functions(torch, "add", "sub", "rsub"))
    add(total, _methods("sum", "mean", "cumsum") + _functions(torch, "sum", "mean", "cumsum"))
    add(total, _functions(F, "linear", "conv1d", "conv2d", "conv3d", "avg_pool1d", "avg_pool2d"))
    add(total, _functions(F, "avg_pool3d", "adaptive_avg_pool1d", "adaptive_avg_pool2d"))
    add(total, _functions(F, "adaptive_avg_pool3d"))
    add(product, _methods("mul", "multiply") + _functions(torch, "mul", "multiply"))
    add(quotient, _methods("div", "divide", "true_divide"))
    add(quotient, _functions(torch, "div", "divide", "true_divide"))
    add(uniform, _methods("matmul", "__rmatmul__", "bmm", "mm", "baddbmm"))
    add(uniform, _functions(torch, "matmul", "bmm", "mm", "baddbmm", "einsum"))
    add(SoftmaxOpRule(dtype_index=3), [F.softmax])
    add(SoftmaxOpRule(dtype_index=2), [torch.softmax, torch.Tensor.softmax])
    add(LayerNormOpRule(epsilon), _functions(F, "layer_norm") + _functions(torch, "layer_norm"))
    add(RMSNormOpRule(), _functions(F, "rms_norm") + _functions(torch, "rms_norm"))
    add(ScaledDotProductAttentionRule(epsilon), [F.scaled_dot_product_attention])
    add(OpenRule(), [F.multi_head_attention_forward])
    return types.MappingProxyType(table)


OP_RULES: Mapping[Callable, OpRule] = build_op_rules()
"""The op rule of each torch function that has one, with the default stabilizer."""

# In-place functions, by the function whose result they write into their first argument.
IN_PLACE: Mapping[Callable, Callable] = types.MappingProxyType(
    {
        getattr(torch.Tensor, f"{name}_"): getattr(torch.Tensor, name)
        for name in ("add", "sub", "mul", "div", "relu", "tanh", "sigmoid", "neg", "masked_fill")
    }
)

__all__ = [
    "EPSILON",
    "IN_PLACE",
    "OP_RULES",
    "EmbeddingRule",
    "EpsilonOpRule",
    "IdentityOpRule",
    "LayerNormOpRule",
    "LayerNormRule",
    "OpRule",
    "OpenRule",
    "ProductOpRule",
    "RMSNormOpRule",
    "ScaledDotProductAttentionRule",
    "SoftmaxOpRule",
    "SoftmaxRule",
    "StructuralRule",
    "SumOpRule",
    "build_op_rules",
    "no_rule_error",
    "transformer_default_rule",
]
