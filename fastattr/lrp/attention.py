"""LRP for transformers: the rules of AttnLRP (Achtibat et al., "AttnLRP: Attention-Aware
Layer-Wise Relevance Propagation for Transformers", ICML 2024, arXiv 2402.05602).

The canonizer [AttnLRP][fastattr.canonizers.AttnLRP], passed by name, gives LRP these rules;
they are the LRP engine's ordinary rules, applied by the same module hooks and torch-function
mode as the built-in rules and a user's, with LRP's convention: the relevance arriving at an
output goes out as relevance at the inputs.

* Module rules ([PropagationRule][fastattr.lrp.PropagationRule]) for the module types that
  transformers use and that have no rule of their own
  ([transformer_module_rule][fastattr.lrp.attention.transformer_module_rule]):
  [LayerNormRule][fastattr.lrp.attention.LayerNormRule] for ``nn.LayerNorm``, relevance passed
  through unchanged for RMSNorm modules and HuggingFace's activations, epsilon for
  HuggingFace's ``Conv1D``, [SoftmaxRule][fastattr.lrp.attention.SoftmaxRule] for
  ``nn.Softmax`` and [EmbeddingRule][fastattr.lrp.attention.EmbeddingRule] for
  ``nn.Embedding``.
* Op rules ([OpRule][fastattr.lrp.OpRule]) for the torch functions a model's own forward code
  calls on activations, tensors that depend on the attributed inputs
  ([build_op_rules][fastattr.lrp.attention.build_op_rules]): the uniform rule for products of
  two activations (``a * b``, ``a @ b``, ``torch.bmm``, ``torch.einsum``, ...), AttnLRP's
  softmax rule, the layer-norm rule for ``F.layer_norm``, ``F.scaled_dot_product_attention``
  and ``F.multi_head_attention_forward`` (``nn.MultiheadAttention``), the epsilon rule for sums,
  biases and other linear maps, relevance passed unchanged through point-wise functions and
  reshapes, and a refusal naming any other function.

Example: a hand-written attention head.

>>> import torch
>>> from torch import nn
>>> from fastattr import LRP
>>> from fastattr.canonizers import AttnLRP
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
>>> LRP(model, canonizers=[AttnLRP()]).attribute(x, target=0).shape
torch.Size([2, 5, 8])
"""

from __future__ import annotations

import functools
import math
import types
from abc import abstractmethod
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastattr import ops
from fastattr.lrp.rules import (
    STABILIZER,
    EpsilonRule,
    OpRule,
    PassRule,
    PropagationRule,
    _check_epsilon,
)

if TYPE_CHECKING:
    from fastattr.lrp.propagation import Relevance

# ---------------------------------------------------------------------------------------------
# Module rules


def overrides_forward(module: nn.Module, base: type[nn.Module]) -> bool:
    """Whether ``module``'s class replaces ``base``'s forward (ConvNeXt's channels-first
    layer norm permutes around it): a rule that recomputes ``base``'s forward would compute
    something else."""
    return type(module).forward is not base.forward


def runs_own_forward(module: nn.Module) -> bool:
    """A layer norm or softmax whose class replaces the forward that AttnLRP's module rules
    recompute: it gets no module rule, and its forward runs under the op rules instead (its
    parameters notwithstanding)."""
    return any(
        isinstance(module, base) and overrides_forward(module, base)
        for base in (nn.LayerNorm, nn.Softmax)
    )


def _replaced_forward(rule: str, base: type[nn.Module], module: nn.Module) -> str | None:
    """Why ``rule``, which recomputes ``base``'s forward, can't run on ``module``, if so."""
    if not overrides_forward(module, base):
        return None
    return (
        f"{rule} computes nn.{base.__name__}'s own forward, which {type(module).__name__} "
        "replaces; with canonizers=[AttnLRP()] and no rule set, its forward runs under "
        "AttnLRP's op rules"
    )


class NodeRule(PropagationRule):
    """A module rule whose node takes the relevance at the module's output straight to its
    inputs (or stops it): the inputs get no product node."""

    def forward_inputs(self, relevance: Relevance, module: nn.Module, inputs: tuple) -> tuple:
        """The inputs unchanged.

        Args:
            relevance: The call's relevance graph.
            module: The module the rule is set on.
            inputs: Its positional inputs.

        Returns:
            ``inputs``.
        """
        return inputs


class LayerNormRule(NodeRule):
    """AttnLRP's rule for layer norm: the normalization treated as linear (the standard deviation
    held fixed, so the variance path carries no relevance), the epsilon rule on the resulting
    linear map. Per normalized row, with ``v = weight * R_out / (y + epsilon * sign(y))``, the
    relevance at the input is ``x * (v - mean(v)) / std``; the bias absorbs its share.

    [AttnLRP][fastattr.canonizers.AttnLRP]'s rule for ``nn.LayerNorm``.

    Args:
        epsilon: The stabilizer of the ratio at the output.

    Raises:
        TypeError: ``epsilon`` is not a real number.
        ValueError: ``epsilon`` is negative or not finite.

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

    def __init__(self, epsilon: float = STABILIZER) -> None:
        self.epsilon = _check_epsilon(epsilon)

    def unsupported_reason(self, module: nn.Module) -> str | None:
        """Why the rule cannot run on ``module``: it is not an ``nn.LayerNorm``.

        Args:
            module: The module the rule is set on.

        Returns:
            A reason, or None for an ``nn.LayerNorm``.
        """
        if not isinstance(module, nn.LayerNorm):
            return f"LayerNormRule runs on nn.LayerNorm, not on {type(module).__name__}"
        return _replaced_forward("LayerNormRule", nn.LayerNorm, module)

    def forward_output(
        self, relevance: Relevance, module: nn.Module, inputs: tuple, output: Tensor
    ) -> Tensor:
        """The layer norm of the input, through the node whose backward is this rule.

        Args:
            relevance: The call's relevance graph.
            module: The layer norm.
            inputs: The inputs it ran on.
            output: Its output.

        Returns:
            ``output``'s value, carrying the rule's backward.
        """
        return ops.lrp_layer_norm_node(
            inputs[0],
            list(module.normalized_shape),  # type: ignore[arg-type]
            module.weight,
            module.bias,
            module.eps,  # type: ignore[arg-type]
            self.epsilon,
        )

    def __repr__(self) -> str:
        return f"LayerNormRule(epsilon={self.epsilon})"


def softmax_node(
    relevance: Relevance, inputs: Tensor, dim: int, dtype: torch.dtype | None
) -> Tensor:
    """``softmax(inputs, dim, dtype)`` through the node of AttnLRP's softmax rule. Where
    ``inputs`` holds attention scores ``q @ k^T`` scaled and masked (see
    [Relevance.scaled_scores][fastattr.lrp.Relevance.scaled_scores]), the node sends
    ``scale * (R - s * sum(R))`` straight to the scores, which is the rule's relevance divided
    by the scores at their ratio, but for its stabilizer: neither the scores nor ``inputs``
    are kept for the backward.

    Args:
        relevance: The call's relevance graph.
        inputs: The softmax's input, an activation.
        dim: The softmax dimension.
        dtype: The dtype the softmax computes in, or None.

    Returns:
        The softmax, carrying the rule's backward.
    """
    scores = relevance.scaled_scores(inputs)
    if scores is None:
        return ops.lrp_softmax_node(inputs, dim, dtype)
    z, scale = scores
    return ops.lrp_softmax_ratio_node(z, inputs.detach(), dim, dtype, scale)


class SoftmaxRule(NodeRule):
    """AttnLRP's softmax rule: with ``s = softmax(x)``, the relevance at the input is ``x * (R -
    s * sum(R))`` along the softmax dimension (the input times the gradient of ``sum(s * R /
    s)``, computed without dividing by ``s``). It does not conserve relevance: the Taylor
    expansion's bias term is not redistributed, as in the paper (Proposition 3.1). Inputs of
    ``-inf`` (masked scores) receive none.

    [AttnLRP][fastattr.canonizers.AttnLRP]'s rule for ``nn.Softmax``; its op rules apply the
    same to ``torch.softmax``.

    Examples:
        >>> import torch
        >>> from torch import nn
        >>> from fastattr import LRP
        >>> from fastattr.lrp.attention import SoftmaxRule
        >>> model = nn.Sequential(nn.Linear(4, 3), nn.Softmax(dim=-1)).double()
        >>> model[1].rule = SoftmaxRule()
        >>> LRP(model).attribute(torch.randn(2, 4, dtype=torch.float64), target=0).shape
        torch.Size([2, 4])
    """

    def unsupported_reason(self, module: nn.Module) -> str | None:
        """Why the rule cannot run on ``module``: it is not an ``nn.Softmax`` with a ``dim``.

        Args:
            module: The module the rule is set on.

        Returns:
            A reason, or None.
        """
        if not isinstance(module, nn.Softmax):
            return f"SoftmaxRule runs on nn.Softmax, not on {type(module).__name__}"
        replaced = _replaced_forward("SoftmaxRule", nn.Softmax, module)
        if replaced is not None:
            return replaced
        if module.dim is None:
            return "SoftmaxRule needs nn.Softmax with an explicit dim"
        return None

    def forward_output(
        self, relevance: Relevance, module: nn.Module, inputs: tuple, output: Tensor
    ) -> Tensor:
        """The softmax of the input, through the node whose backward is this rule.

        Args:
            relevance: The call's relevance graph.
            module: The softmax.
            inputs: The inputs it ran on.
            output: Its output.

        Returns:
            ``output``'s value, carrying the rule's backward.
        """
        return softmax_node(relevance, inputs[0], module.dim, None)  # type: ignore[arg-type]

    def __repr__(self) -> str:
        return "SoftmaxRule()"


class EmbeddingRule(NodeRule):
    """An embedding's output is where relevance stops: the token ids it looks up carry none.

    [AttnLRP][fastattr.canonizers.AttnLRP]'s rule for ``nn.Embedding``, so that ``LayerLRP`` on
    a model's word embedding gives the relevance of each embedded token. Embeddings added to the
    tokens' (positions, token types) take their share of a sum as a bias does. The output is a
    source of relevance whether or not it is attributed: an encoder-decoder's decoder tokens
    are an activation in the cross-attention's products when only the encoder's inputs are
    attributed, as when LayerLRP also reads the decoder's embedding (a frozen model's
    embedding output joins autograd's graph for that).

    Examples:
        >>> import torch
        >>> from torch import nn
        >>> from fastattr import LayerLRP
        >>> from fastattr.lrp.attention import EmbeddingRule
        >>> model = nn.Sequential(nn.Embedding(10, 4), nn.Flatten(), nn.Linear(12, 2))
        >>> model[0].rule = EmbeddingRule()
        >>> ids = torch.tensor([[1, 2, 3]])
        >>> LayerLRP(model, model[0]).attribute(ids, target=0).shape
        torch.Size([1, 3, 4])
    """

    def forward_output(
        self, relevance: Relevance, module: nn.Module, inputs: tuple, output: Tensor
    ) -> Tensor:
        """The embedded tokens, unchanged.

        Args:
            relevance: The call's relevance graph.
            module: The embedding.
            inputs: The inputs it ran on.
            output: Its output.

        Returns:
            ``output``, as a source of relevance.
        """
        return relevance.source(output)

    def __repr__(self) -> str:
        return "EmbeddingRule()"


class ParameterTableRule(EmbeddingRule):
    """A module whose output is read from its own parameters (BEiT's relative position bias
    table, indexed by the window's geometry): as at an embedding, relevance stops at its output,
    which takes its share of a sum as a bias does. An input that carries relevance has no
    rule.

    [AttnLRP][fastattr.canonizers.AttnLRP]'s rule for HuggingFace's ``*RelativePositionBias``
    modules.

    Examples:
        >>> import torch
        >>> from torch import nn
        >>> from fastattr import LRP
        >>> from fastattr.lrp.attention import ParameterTableRule
        >>> class Biased(nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.linear, self.table = nn.Linear(3, 2), nn.Embedding(1, 2)
        ...         self.table.rule = ParameterTableRule()
        ...     def forward(self, x):
        ...         return self.linear(x) + self.table(torch.zeros(1, dtype=torch.long))
        >>> LRP(Biased()).attribute(torch.randn(4, 3), target=0).shape
        torch.Size([4, 3])
    """

    def forward_inputs(self, relevance: Relevance, module: nn.Module, inputs: tuple) -> tuple:
        """The inputs unchanged, once none is found to carry relevance.

        Args:
            relevance: The call's relevance graph.
            module: The module the rule is set on.
            inputs: Its positional inputs.

        Returns:
            ``inputs``.

        Raises:
            TypeError: An input carries relevance.
        """
        if any(relevance.is_activation(x) for x in inputs):
            raise TypeError(
                f"{self!r} on {type(module).__name__}: an input carries relevance, which this "
                "rule, for outputs read from the module's parameters alone, would drop; give "
                "the module a rule that passes it on (module.rule = EpsilonRule(), ...)"
            )
        return inputs

    def forward_output(
        self, relevance: Relevance, module: nn.Module, inputs: tuple, output: Tensor
    ) -> Tensor:
        """The table's output, unchanged: read from parameters alone, it is no source of
        relevance.

        Args:
            relevance: The call's relevance graph.
            module: The module the rule is set on.
            inputs: The inputs it ran on.
            output: Its output.

        Returns:
            ``output``.
        """
        return output

    def __repr__(self) -> str:
        return "ParameterTableRule()"


# HuggingFace's T5-style norms: RMS normalization ("no bias and no subtraction of mean")
# under a LayerNorm name.
_RMS_NORMS_CALLED_LAYER_NORM = frozenset(
    f"{family}LayerNorm"
    for family in (
        "T5", "MT5", "UMT5", "LongT5", "SwitchTransformers", "Udop", "Pix2Struct", "Pop2Piano",
        "CpmAnt",
    )
)  # fmt: skip


# HuggingFace's point-wise activations written in a model's own code rather than taken from
# transformers.activations: BLOOM's tanh GELU, `x * 0.5 * (1 + tanh(c * x * (1 + a * x * x)))`,
# whose products the op rules would read as products of activations.
_ACTIVATIONS_IN_MODEL_CODE = frozenset(("BloomGelu",))


def _hf_type(module: nn.Module, module_prefix: str) -> str | None:
    """The class name of a HuggingFace transformers module from ``module_prefix``, else None;
    transformers itself is never imported."""
    kind = type(module)
    return kind.__name__ if kind.__module__.startswith(module_prefix) else None


def transformer_module_rule(
    module: nn.Module, epsilon: float = STABILIZER
) -> PropagationRule | None:
    """AttnLRP's rule for a transformer module type that has no rule of its own, or None.

    ``nn.LayerNorm``: [LayerNormRule][fastattr.lrp.attention.LayerNormRule]; ``nn.Softmax``:
    [SoftmaxRule][fastattr.lrp.attention.SoftmaxRule]; ``nn.Embedding``:
    [EmbeddingRule][fastattr.lrp.attention.EmbeddingRule]; ``nn.RMSNorm`` and HuggingFace's
    RMSNorm modules (``transformers.models.*.*RMSNorm``, and T5's, MT5's, ... RMS norms named
    ``*LayerNorm``): relevance passed through unchanged
    (RMS normalization with the RMS held fixed is a per-feature scaling); HuggingFace's
    activation modules (``transformers.activations``, and BLOOM's ``BloomGelu``): passed through
    unchanged; HuggingFace's ``Conv1D`` (GPT-2's linear layers):
    [EpsilonRule][fastattr.EpsilonRule]; HuggingFace's
    ``*RelativePositionBias`` modules (BEiT's, Data2VecVision's bias tables):
    [ParameterTableRule][fastattr.lrp.attention.ParameterTableRule]. Subclasses of
    ``nn.LayerNorm`` and ``nn.Softmax`` that replace the forward get none: their forward runs
    under the op rules.

    Args:
        module: Any module.
        epsilon: The stabilizer of the rules that take one.

    Returns:
        A new rule, or None when the type has none.

    Examples:
        >>> from torch import nn
        >>> from fastattr.lrp.attention import transformer_module_rule
        >>> transformer_module_rule(nn.LayerNorm(8))
        LayerNormRule(epsilon=1e-09)
        >>> transformer_module_rule(nn.GRU(2, 2)) is None
        True
    """
    if runs_own_forward(module):
        return None
    if isinstance(module, nn.LayerNorm):
        return LayerNormRule(epsilon)
    if isinstance(module, nn.Softmax):
        return SoftmaxRule()
    if isinstance(module, nn.Embedding):
        return EmbeddingRule()
    rms_norm = getattr(nn, "RMSNorm", None)
    if rms_norm is not None and isinstance(module, rms_norm):
        return PassRule()
    name = _hf_type(module, "transformers.models.")
    if name is not None and (name.endswith("RMSNorm") or name in _RMS_NORMS_CALLED_LAYER_NORM):
        return PassRule()
    if _hf_type(module, "transformers.activations") is not None or (
        name in _ACTIVATIONS_IN_MODEL_CODE
    ):
        return PassRule()
    if _hf_type(module, "transformers.pytorch_utils") == "Conv1D":
        return EpsilonRule(epsilon)
    if name is not None and name.endswith("RelativePositionBias"):
        return ParameterTableRule()
    return None


# ---------------------------------------------------------------------------------------------
# Op rules


def _carrying(args: tuple, kwargs: Mapping[str, Any], carries: Callable[[object], bool]) -> list:
    # Arguments may hold tensors one list deep: torch.cat([a, b]), torch.einsum(eq, [a, b]).
    found = []
    for value in (*args, *kwargs.values()):
        if isinstance(value, (list, tuple)):
            found.extend(v for v in value if carries(v))
        elif carries(value):
            found.append(value)
    return found


def _map_carrying(value: Any, carries: Callable[[object], bool], wrap: Callable) -> Any:
    if isinstance(value, (list, tuple)):
        return type(value)(wrap(v) if carries(v) else v for v in value)
    return wrap(value) if carries(value) else value


def _name(func: Callable) -> str:
    qualname = getattr(func, "__qualname__", None) or getattr(func, "__name__", None)
    return (
        str(qualname or func)
        .replace("TensorBase.", "Tensor.")
        .replace("_VariableFunctionsClass.", "torch.")
    )


def no_rule_error(func: Callable, detail: str = "") -> TypeError:
    """The error for a torch function that LRP has no rule for on activations.

    Args:
        func: The torch function.
        detail: What about the call has no rule, appended to the function's name.

    Returns:
        A TypeError naming the function and saying how to give the computation a rule.
    """
    return TypeError(
        f"LRP has no rule for {_name(func)}{detail} on tensors that carry relevance: it is none "
        "of the activations, sums, products, norms, softmax and attention that AttnLRP's rules "
        "cover, and passing the gradient through it would misattribute silently. Move the "
        "computation into a module of its own and set a rule on it (module.rule = "
        "EpsilonRule() for a linear map, IdentityRule() for an element-wise one, ...)."
    )


def _argument(args: tuple, kwargs: Mapping[str, Any], index: int, name: str, default: Any) -> Any:
    if len(args) > index:
        return args[index]
    return kwargs.get(name, default)


class ActivationOpRule(OpRule):
    """An op rule for calls on activations: a call none of whose tensor arguments depends on the
    attributed inputs (parameters, masks, positions) runs as it is; the others go to
    [propagate][fastattr.lrp.attention.ActivationOpRule.propagate].

    Args:
        functions: The torch functions the rule is offered.
    """

    def __init__(self, functions: Sequence[Callable[..., Any]]) -> None:
        self.functions = tuple(functions)

    def apply(
        self,
        relevance: Relevance,
        func: Callable[..., Any],
        args: tuple,
        kwargs: dict[str, Any],
    ) -> Any:
        """The call, through ``propagate`` when an argument is an activation.

        Args:
            relevance: The call's relevance graph.
            func: The torch function called.
            args: Its positional arguments.
            kwargs: Its keyword arguments.

        Returns:
            What ``func(*args, **kwargs)`` returns, in value.
        """
        found = _carrying(args, kwargs, relevance.is_activation)
        if not found:
            return func(*args, **kwargs)
        return self.propagate(relevance, func, args, kwargs, found)

    @abstractmethod
    def propagate(
        self,
        relevance: Relevance,
        func: Callable[..., Any],
        args: tuple,
        kwargs: dict[str, Any],
        found: list[Tensor],
    ) -> Any:
        """The call's result, with this rule's nodes on the activations among its arguments.

        Args:
            relevance: The call's relevance graph.
            func: The torch function called.
            args: Its positional arguments.
            kwargs: Its keyword arguments.
            found: The activations among the arguments, in order.

        Returns:
            What ``func(*args, **kwargs)`` returns, in value.
        """


class IdentityOpRule(ActivationOpRule):
    """Point-wise functions of one activation (activations, dropout, scaling by a constant): the
    relevance passes to the input unchanged (AttnLRP's identity rule)."""

    def propagate(self, relevance, func, args, kwargs, found):
        with torch.no_grad():
            output = func(*args, **kwargs)
        if len(found) != 1 or not isinstance(output, Tensor) or output.shape != found[0].shape:
            raise no_rule_error(func, " (as an element-wise map of one tensor)")
        return relevance.passing(found[0], output)

    def __repr__(self) -> str:
        return "IdentityOpRule()"


class EpsilonOpRule(ActivationOpRule):
    """The epsilon rule on a map that is linear in each activation among its arguments: each
    such input ``a`` receives ``share * a * J_a^T (R / (z + epsilon * sign(z)))``.

    ``uniform=False`` (share 1): sums, differences, a bias added, sums and means over
    dimensions, a product with a constant matrix. ``uniform=True`` (share 1/n for n
    activations): AttnLRP's uniform rule for products of activations (``a * b``, ``a @ b``),
    which are linear in each factor alone.

    Args:
        functions: The torch functions the rule is offered.
        uniform: Split the relevance equally between the activations.
        epsilon: The stabilizer of the ratio at the output.
        copy: The forward may change the output in place (as BERT's embeddings do to a sum):
            hand on a copy where it has done so before.
    """

    # Whether a term that is a rule's epsilon-ratio output, unchanged, takes the contribution
    # straight to that ratio's z (see Relevance.product's cancel).
    cancels = False

    def __init__(
        self,
        functions: Sequence[Callable[..., Any]],
        uniform: bool = False,
        epsilon: float = STABILIZER,
        copy: bool = False,
    ) -> None:
        super().__init__(functions)
        self.uniform = uniform
        self.epsilon = _check_epsilon(epsilon)
        self.copy = copy

    def propagate(self, relevance, func, args, kwargs, found):
        product_node = self._product_node(func, args, kwargs, found)
        if product_node is not None:
            # Both factors activations: one node for the product and both shares.
            output = product_node(*args)
        else:
            share = 1.0 / len(found) if self.uniform else 1.0

            def node(tensor: Tensor) -> Tensor:
                if share == 1.0:
                    return relevance.product(tensor, cancel=self.cancels)
                return relevance.share(tensor, share)

            carries = relevance.is_activation
            args = tuple(_map_carrying(a, carries, node) for a in args)
            kwargs = {k: _map_carrying(v, carries, node) for k, v in kwargs.items()}
            output = func(*args, **kwargs)
            if not isinstance(output, Tensor):
                raise no_rule_error(func, " (a linear map with one tensor result)")
        return relevance.ratio(output, output, self.epsilon, copy=self.copy)

    def _product_node(self, func, args, kwargs, found) -> Callable[..., Tensor] | None:
        """The uniform rule's node for ``func(a, b)`` of two activations (a matrix or an
        element-wise product), or None for the general path."""
        if not (self.uniform and len(found) == 2 and _two_factors(args, kwargs)):
            return None
        if func in _MATMULS and args[0].dim() >= 2 and args[1].dim() >= 2:
            return ops.lrp_uniform_matmul_node
        return ops.lrp_uniform_product_node if func in _PRODUCTS else None

    def __repr__(self) -> str:
        return f"EpsilonOpRule(uniform={self.uniform}, epsilon={self.epsilon})"


_MATMULS = frozenset((torch.matmul, torch.Tensor.matmul))
_PRODUCTS = frozenset((torch.mul, torch.multiply, torch.Tensor.mul, torch.Tensor.multiply))


def _two_factors(args: tuple, kwargs: Mapping[str, Any]) -> bool:
    """Whether a call is ``f(a, b)`` of two tensors of one dtype on one device, outside
    autocast (``out=``, type promotion, a CPU scalar and autocast's casts take the general
    path)."""
    return (
        not kwargs
        and len(args) == 2
        and isinstance(args[0], Tensor)
        and isinstance(args[1], Tensor)
        and args[0].dtype == args[1].dtype
        and args[0].device == args[1].device
        and not torch.is_autocast_enabled(args[0].device.type)
    )


def _is_mask(value: object) -> bool:
    """Whether ``value`` is an additive attention mask: a floating tensor of zeros and of values
    at most half the dtype's lowest (``-inf`` included)."""
    if not isinstance(value, Tensor) or not value.is_floating_point():
        return False
    lowest = torch.finfo(value.dtype).min / 2
    if value.numel():  # one element first: an embedding added (BERT's) is rejected at once
        first = value[(0,) * value.dim()].item()
        if first != 0 and first > lowest:
            return False
    return bool(((value == 0) | (value <= lowest)).all())


class SumOpRule(EpsilonOpRule):
    """Sums and differences: the epsilon rule (a constant added is a bias, which absorbs its
    share), handing on copies; an attention mask added to scores passes the relevance on
    unchanged, which is exact: it adds zero where the softmax rule leaves relevance, and where
    it adds a huge negative number the softmax rule leaves none.

    A term that is a module's output as its epsilon rule handed it on (a residual branch's
    last linear layer) takes the sum's contribution ``c`` straight into that rule: its
    relevance ``x * c`` divided by ``x + epsilon * sign(x)`` is ``c`` but for the stabilizer,
    so the epsilon that would damp outputs near zero there is not applied, as in lxt's AttnLRP
    (the gradient's path), and the branch's output is neither read again nor kept for the
    backward.

    Args:
        functions: The torch functions the rule is offered.
        epsilon: The stabilizer of the ratio at the output.
    """

    cancels = True

    def __init__(self, functions: Sequence[Callable[..., Any]], epsilon: float = STABILIZER):
        super().__init__(functions, epsilon=epsilon, copy=True)

    def propagate(self, relevance, func, args, kwargs, found):
        others = [
            v
            for v in (*args, *kwargs.values())
            if isinstance(v, Tensor) and not relevance.is_activation(v)
        ]
        if len(found) == 1 and others and all(relevance.memoized(_is_mask, v) for v in others):
            output = func(*args, **kwargs)
            relevance.follows_scores(found[0], output)
            return output
        return super().propagate(relevance, func, args, kwargs, found)

    def __repr__(self) -> str:
        return f"SumOpRule(epsilon={self.epsilon})"


def _is_own_sum(dividend: object, divisor: object) -> bool:
    """Whether ``divisor`` is ``dividend.sum(dims, keepdim=True)`` over the dimensions where it
    has size one and the dividend does not (its values, exactly, as the model computed them)."""
    if not (isinstance(dividend, Tensor) and isinstance(divisor, Tensor)):
        return False
    if divisor.dim() != dividend.dim() or divisor.dtype != dividend.dtype:
        return False
    dims = []
    for dim, (size, reduced) in enumerate(zip(dividend.shape, divisor.shape)):
        if reduced == 1 and size != 1:
            dims.append(dim)
        elif reduced != size:
            return False
    if not dims:
        return False
    with torch.no_grad():
        return torch.equal(dividend.sum(dims, keepdim=True), divisor)


def _constant_factor(
    args: tuple, kwargs: Mapping[str, Any], activation: Tensor, divides: bool
) -> float | None:
    """The number ``c`` when a call is ``activation * c``, ``c * activation`` or (``divides``)
    ``activation / c`` for a real Python number ``c``: the factor the call scales by, else
    None."""
    if kwargs or len(args) != 2:
        return None
    if args[0] is activation:
        constant = args[1]
    elif args[1] is activation and not divides:
        constant = args[0]
    else:
        return None
    if isinstance(constant, bool) or not isinstance(constant, (int, float)):
        return None
    try:
        value = float(constant)
    except OverflowError:  # an int beyond float's range
        return None
    if not math.isfinite(value) or (divides and value == 0):
        return None
    return 1.0 / value if divides else value


class ReshapeOpRule(ActivationOpRule):
    """Functions that only rearrange an activation's elements (``view``, ``reshape``,
    ``transpose``, ...): they run as they are (autograd's own backward moves the relevance).
    Where they rearrange attention scores on their way to a softmax, the result is noted as
    such (see [Relevance.follows_scores][fastattr.lrp.Relevance.follows_scores])."""

    def propagate(self, relevance, func, args, kwargs, found):
        output = func(*args, **kwargs)
        if (
            len(found) == 1
            and args
            and args[0] is found[0]
            and isinstance(output, Tensor)
            and output.dtype == found[0].dtype  # not a view as another dtype
        ):
            relevance.follows_scores(found[0], output, lambda z: func(z, *args[1:], **kwargs))
        return output

    def __repr__(self) -> str:
        return "ReshapeOpRule()"


class MaskFillOpRule(ActivationOpRule):
    """``masked_fill`` and ``torch.where``: a selection, which runs as it is (autograd's own
    backward moves the relevance). Where it fills an activation with values of at most half
    their dtype's lowest (``-inf`` included), masking attention scores as an additive mask
    does, the result is noted as such (see
    [Relevance.follows_scores][fastattr.lrp.Relevance.follows_scores]).
    """

    def propagate(self, relevance, func, args, kwargs, found):
        output = func(*args, **kwargs)
        if len(found) != 1 or kwargs or len(args) != 3 or not isinstance(output, Tensor):
            return output
        # torch.where(condition, x, y), x.where(condition, y), x.masked_fill(mask, value)
        pair = (args[1], args[2]) if func is torch.where else (args[0], args[2])
        if pair[0] is found[0]:
            activation, fill = pair
        elif pair[1] is found[0]:
            fill, activation = pair
        else:
            return output
        if relevance.scaled_scores(activation) is None:
            return output  # nothing to note (and a fill on a GPU is not read)
        if isinstance(fill, Tensor):
            masks = fill.is_floating_point() and relevance.memoized(_below_half_lowest, fill)
        else:
            lowest = torch.finfo(output.dtype).min / 2
            masks = isinstance(fill, (int, float)) and not isinstance(fill, bool) and fill <= lowest
        if masks:
            relevance.follows_scores(activation, output)
        return output

    def __repr__(self) -> str:
        return "MaskFillOpRule()"


def _below_half_lowest(tensor: Tensor) -> bool:
    """Whether every value is at most half the dtype's lowest (where a softmax gives zero)."""
    return bool((tensor <= torch.finfo(tensor.dtype).min / 2).all())


class ProductOpRule(ActivationOpRule):
    """``a * b`` and ``a / b``: the uniform rule when both factors are activations, else the
    product with a constant: relevance passed unchanged when the result has the shape of the
    factor, the epsilon rule when broadcasting makes it larger. A divisor that is an activation
    has no rule, but for the dividend's own sum over some dimensions (``w / w.sum(-1,
    keepdim=True)``, a mixture of experts' routing weights renormalized): a normalization,
    whose sum is held fixed, as the layer norm rule holds the standard deviation, so the
    relevance passes to the dividend unchanged.

    Args:
        functions: The torch functions the rule is offered.
        divides: The rule of a division (only the dividend may be an activation).
        epsilon: The stabilizer of the ratio at the output.
    """

    def __init__(
        self, functions: Sequence[Callable[..., Any]], divides: bool, epsilon: float = STABILIZER
    ) -> None:
        super().__init__(functions)
        self.divides = divides
        self.uniform = EpsilonOpRule(functions, uniform=True, epsilon=epsilon)
        self.linear = EpsilonOpRule(functions, epsilon=epsilon)

    def propagate(self, relevance, func, args, kwargs, found):
        if kwargs.get("rounding_mode") is not None:
            raise no_rule_error(func, f" with rounding_mode={kwargs['rounding_mode']!r}")
        if self.divides and len(args) > 1 and relevance.is_activation(args[1]):
            if not (relevance.is_activation(args[0]) and _is_own_sum(args[0], args[1])):
                raise no_rule_error(func, " by a divisor other than the dividend's own sum")
            # A normalization (MoE routing weights renormalized over the chosen experts): the
            # sum held fixed, as the layer norm rule holds the standard deviation.
            with torch.no_grad():
                output = func(*args, **kwargs)
            return relevance.passing(args[0], output)
        if len(found) > 1:
            return self.uniform.propagate(relevance, func, args, kwargs, found)
        with torch.no_grad():
            output = func(*args, **kwargs)
        if output.shape == found[0].shape:
            scale = _constant_factor(args, kwargs, found[0], self.divides)
            return relevance.passing(found[0], output, scale)
        return self.linear.propagate(relevance, func, args, kwargs, found)

    def __repr__(self) -> str:
        return f"ProductOpRule(divides={self.divides})"


class SoftmaxOpRule(ActivationOpRule):
    """``torch.softmax``, ``F.softmax`` and ``Tensor.softmax``:
    [SoftmaxRule][fastattr.lrp.attention.SoftmaxRule].

    Args:
        functions: The torch functions the rule is offered.
        dtype_index: Where the functions take ``dtype`` among their positional arguments.
    """

    def __init__(self, functions: Sequence[Callable[..., Any]], dtype_index: int) -> None:
        super().__init__(functions)
        self.dtype_index = dtype_index

    def propagate(self, relevance, func, args, kwargs, found):
        inputs = _argument(args, kwargs, 0, "input", None)
        dim = _argument(args, kwargs, 1, "dim", None)
        dtype = _argument(args, kwargs, self.dtype_index, "dtype", None)
        if not relevance.is_activation(inputs) or dim is None:
            raise no_rule_error(func, " without an explicit dim" if dim is None else "")
        return softmax_node(relevance, inputs, dim, dtype)

    def __repr__(self) -> str:
        return "SoftmaxOpRule()"


class LayerNormOpRule(ActivationOpRule):
    """``F.layer_norm``: [LayerNormRule][fastattr.lrp.attention.LayerNormRule] (a weight or
    bias that is an activation has no rule).

    Args:
        functions: The torch functions the rule is offered.
        epsilon: The stabilizer of the ratio at the output.
    """

    def __init__(self, functions: Sequence[Callable[..., Any]], epsilon: float = STABILIZER):
        super().__init__(functions)
        self.epsilon = _check_epsilon(epsilon)

    def propagate(self, relevance, func, args, kwargs, found):
        inputs = _argument(args, kwargs, 0, "input", None)
        shape = _argument(args, kwargs, 1, "normalized_shape", None)
        weight = _argument(args, kwargs, 2, "weight", None)
        bias = _argument(args, kwargs, 3, "bias", None)
        eps = _argument(args, kwargs, 4, "eps", 1e-5)
        if len(found) != 1 or not relevance.is_activation(inputs):
            raise no_rule_error(func, " with a weight or bias that carries relevance")
        return ops.lrp_layer_norm_node(inputs, list(shape), weight, bias, eps, self.epsilon)

    def __repr__(self) -> str:
        return f"LayerNormOpRule(epsilon={self.epsilon})"


class RMSNormOpRule(ActivationOpRule):
    """``F.rms_norm``: the relevance passes to the input unchanged (with the RMS held fixed, RMS
    normalization scales each feature)."""

    def propagate(self, relevance, func, args, kwargs, found):
        inputs = _argument(args, kwargs, 0, "input", None)
        if len(found) != 1 or not relevance.is_activation(inputs):
            raise no_rule_error(func, " with a weight that carries relevance")
        with torch.no_grad():
            output = func(*args, **kwargs)
        return relevance.passing(inputs, output)

    def __repr__(self) -> str:
        return "RMSNormOpRule()"


class ScaledDotProductAttentionRule(ActivationOpRule):
    """``F.scaled_dot_product_attention``: AttnLRP through the whole attention, as the input
    times the gradient of ``sum(O * R / (O + epsilon * sign(O)))`` with shares 1/4 for the query
    and the key and 1/2 for the value (the uniform rule at both matrix products, the softmax
    by its rule, the mask a bias). Exactly the rules applied one by one to the written-out
    attention, in one pass of the attention's own backward. A mask that is an activation has
    no rule.

    Args:
        functions: The torch functions the rule is offered.
        epsilon: The stabilizer of the ratio at the output.
    """

    SHARES = (0.25, 0.25, 0.5)

    def __init__(self, functions: Sequence[Callable[..., Any]], epsilon: float = STABILIZER):
        super().__init__(functions)
        self.epsilon = _check_epsilon(epsilon)

    def propagate(self, relevance, func, args, kwargs, found):
        if relevance.is_activation(_argument(args, kwargs, 3, "attn_mask", None)):
            raise no_rule_error(func, " with an attn_mask that carries relevance")
        args = list(args)
        for index, (name, share) in enumerate(zip(("query", "key", "value"), self.SHARES)):
            value = _argument(args, kwargs, index, name, None)
            if relevance.is_activation(value):
                shared = relevance.share(value, share)
                if index < len(args):
                    args[index] = shared
                else:
                    kwargs = {**kwargs, name: shared}
        output = func(*args, **kwargs)
        return relevance.ratio(output, output, self.epsilon)

    def __repr__(self) -> str:
        return f"ScaledDotProductAttentionRule(epsilon={self.epsilon})"


class OpenRule(ActivationOpRule):
    """A torch function written in Python from other torch functions (such as
    ``F.multi_head_attention_forward``, behind ``nn.MultiheadAttention``): its own code runs,
    with the op rules applied to the calls it makes."""

    def propagate(self, relevance, func, args, kwargs, found):
        return relevance.under_op_rules(OpenRule.body(func), args, kwargs)

    @staticmethod
    @functools.lru_cache(maxsize=16)
    def body(func: Callable) -> Callable:
        """``func`` without its dispatch to torch-function modes (its first step), so that the
        calls it makes meet the rules instead of ``func`` meeting them again.

        Args:
            func: A torch function written in Python that dispatches through
                ``has_torch_function``, as those of ``torch.nn.functional`` do.

        Returns:
            The same function, its check for torch-function modes always false.

        Raises:
            TypeError: ``func`` is not such a function.
        """
        # torch's Python functions dispatch through the has_torch_function of their module's
        # globals (a private arrangement, checked on torch 2.13 and 2.14;
        # tests/test_torch_private_api.py).
        found = getattr(func, "__globals__", {}).get("has_torch_function")
        if found is None or not isinstance(func, types.FunctionType):
            raise no_rule_error(func)
        namespace = dict(func.__globals__)
        namespace["has_torch_function"] = lambda _: False
        return types.FunctionType(
            func.__code__, namespace, func.__name__, func.__defaults__, func.__closure__
        )

    def __repr__(self) -> str:
        return "OpenRule()"


class InPlaceOpRule(ActivationOpRule):
    """In-place calls (``a += b``, ``a.mul_(b)``, ...): the rule of the out-of-place function,
    its result written into the first argument.

    Args:
        out_of_place: Per in-place function, the function whose result it writes.
        rules: The op rules to take the out-of-place functions' rules from.
    """

    def __init__(
        self, out_of_place: Mapping[Callable[..., Any], Callable[..., Any]], rules: Sequence[OpRule]
    ) -> None:
        super().__init__(tuple(out_of_place))
        self.out_of_place = out_of_place
        self.rules = {f: rule for rule in rules for f in rule.functions or ()}

    def propagate(self, relevance, func, args, kwargs, found):
        relevance.before_write(args[0])
        function = self.out_of_place[func]
        rule = self.rules.get(function)
        if rule is None:  # a selection (masked_fill_): autograd's own backward moves relevance
            return func(*args, **kwargs)
        # The rule's nodes may save the first argument, which the call then overwrites: they
        # get a copy, unless the rule cancels it (and so saves nothing of it).
        target = args[0]
        first = target
        if not (getattr(rule, "cancels", False) and relevance.cancels(target)):
            first = target.clone()
        result = rule.apply(relevance, function, (first, *args[1:]), kwargs)
        return relevance.write_into(target, result)

    def __repr__(self) -> str:
        return "InPlaceOpRule()"


class UnlistedOpRule(OpRule):
    """Every torch call no other op rule takes: reshapes, selections, copies and metadata run as
    they are (autograd's own backward moves the relevance); any other function that returns an
    activation is refused, naming it.

    Args:
        structural: The functions that run as they are.
    """

    functions = None

    def __init__(self, structural: Sequence[Callable[..., Any]]) -> None:
        self.runs_as_is = frozenset(structural)

    def apply(
        self,
        relevance: Relevance,
        func: Callable[..., Any],
        args: tuple,
        kwargs: dict[str, Any],
    ) -> Any:
        """The call as it is, unless it turns activations into an activation.

        Args:
            relevance: The call's relevance graph.
            func: The torch function called.
            args: Its positional arguments.
            kwargs: Its keyword arguments.

        Returns:
            What ``func(*args, **kwargs)`` returns.

        Raises:
            TypeError: ``func`` has no rule, and its result depends on the attributed inputs.
        """
        result = func(*args, **kwargs)
        if func in self.runs_as_is:
            return result
        outputs = result if isinstance(result, (list, tuple)) else (result,)
        if any(isinstance(t, Tensor) and t.requires_grad for t in outputs) and _carrying(
            args, kwargs, relevance.is_activation
        ):
            raise no_rule_error(func)
        return result

    def __repr__(self) -> str:
        return "UnlistedOpRule()"


def _methods(*names: str) -> list[Callable]:
    return [getattr(torch.Tensor, n) for n in names if hasattr(torch.Tensor, n)]


def _functions(module: Any, *names: str) -> list[Callable]:
    return [getattr(module, n) for n in names if hasattr(module, n)]


def _getters(*names: str) -> list[Callable]:
    return [getattr(torch.Tensor, n).__get__ for n in names if hasattr(torch.Tensor, n)]


# Functions that only rearrange a tensor's elements, as ReshapeOpRule takes them.
_VIEWS = (
    "view",
    "view_as",
    "reshape",
    "reshape_as",
    "transpose",
    "t",
    "permute",
    "flatten",
    "unflatten",
    "squeeze",
    "unsqueeze",
    "movedim",
    "moveaxis",
    "swapaxes",
    "swapdims",
)
_RESHAPES = (
    "contiguous",
    "expand",
    "expand_as",
    "broadcast_to",
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
    "roll",
    "flip",
    "clone",
    "max",
    "min",
    "topk",
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
    "clamp",
    "clip",
    "clamp_min",
    "clamp_max",
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
_ATTRIBUTES = ("T", "mT", "H", "mH", "data", "shape", "dtype", "device")


def build_op_rules(epsilon: float = STABILIZER) -> tuple[OpRule, ...]:
    """AttnLRP's op rules, with the stabilizer ``epsilon`` in every ratio: what
    [AttnLRP][fastattr.canonizers.AttnLRP] hands LRP.

    Args:
        epsilon: The stabilizer of the epsilon, uniform, layer-norm and attention rules.

    Returns:
        The rules, each listing the torch functions it takes (``torch.matmul``,
        ``torch.Tensor.softmax``, ``F.scaled_dot_product_attention``, ...), the last one
        taking every other call.

    Raises:
        TypeError: ``epsilon`` is not a real number.
        ValueError: ``epsilon`` is negative or not finite.

    Examples:
        >>> import torch
        >>> from fastattr.lrp.attention import build_op_rules
        >>> [rule for rule in build_op_rules(1e-6) if torch.matmul in (rule.functions or ())]
        [EpsilonOpRule(uniform=True, epsilon=1e-06)]
    """
    rules: list[OpRule] = [
        IdentityOpRule(
            _methods(*_POINTWISE)
            + _functions(torch, *_POINTWISE)
            + _functions(F, *_POINTWISE)
            + _functions(torch.special, "expit")
        ),
        SumOpRule(
            _methods("add", "sub", "__rsub__") + _functions(torch, "add", "sub", "rsub"), epsilon
        ),
        EpsilonOpRule(
            _methods("sum", "mean", "cumsum", "index_add")
            + _functions(torch, "sum", "mean", "cumsum", "index_add")
            + _functions(F, "linear", "conv1d", "conv2d", "conv3d", "avg_pool1d", "avg_pool2d")
            + _functions(F, "avg_pool3d", "adaptive_avg_pool1d", "adaptive_avg_pool2d")
            + _functions(F, "adaptive_avg_pool3d"),
            epsilon=epsilon,
        ),
        ProductOpRule(
            _methods("mul", "multiply") + _functions(torch, "mul", "multiply"), False, epsilon
        ),
        ProductOpRule(
            _methods("div", "divide", "true_divide")
            + _functions(torch, "div", "divide", "true_divide"),
            True,
            epsilon,
        ),
        EpsilonOpRule(
            _methods("matmul", "__rmatmul__", "bmm", "mm", "baddbmm")
            + _functions(torch, "matmul", "bmm", "mm", "baddbmm", "einsum"),
            uniform=True,
            epsilon=epsilon,
        ),
        SoftmaxOpRule([F.softmax], dtype_index=3),
        SoftmaxOpRule([torch.softmax, torch.Tensor.softmax], dtype_index=2),
        LayerNormOpRule(_functions(F, "layer_norm") + _functions(torch, "layer_norm"), epsilon),
        RMSNormOpRule(_functions(F, "rms_norm") + _functions(torch, "rms_norm")),
        ScaledDotProductAttentionRule([F.scaled_dot_product_attention], epsilon),
        OpenRule([F.multi_head_attention_forward]),
    ]
    rules.append(InPlaceOpRule(IN_PLACE, rules))
    # After the in-place rule, which thus leaves masked_fill_ a selection that runs as it is.
    rules.append(
        MaskFillOpRule(_methods("masked_fill", "where") + _functions(torch, "masked_fill", "where"))
    )
    rules.append(ReshapeOpRule(_methods(*_VIEWS) + _functions(torch, *_VIEWS)))
    structural = _methods(*_RESHAPES, *_METADATA) + _functions(torch, *_RESHAPES)
    rules.append(UnlistedOpRule([*structural, F.pad, *_getters(*_ATTRIBUTES)]))
    return tuple(rules)


# In-place functions, by the function whose result they write into their first argument.
IN_PLACE: Mapping[Callable, Callable] = types.MappingProxyType(
    {
        getattr(torch.Tensor, f"{name}_"): getattr(torch.Tensor, name)
        for name in (
            "add",
            "sub",
            "mul",
            "div",
            "relu",
            "tanh",
            "sigmoid",
            "neg",
            "masked_fill",
            "index_add",
            "clamp",
        )
    }
)

__all__ = [
    "IN_PLACE",
    "ActivationOpRule",
    "EmbeddingRule",
    "EpsilonOpRule",
    "IdentityOpRule",
    "InPlaceOpRule",
    "LayerNormOpRule",
    "LayerNormRule",
    "MaskFillOpRule",
    "NodeRule",
    "OpenRule",
    "ProductOpRule",
    "RMSNormOpRule",
    "ReshapeOpRule",
    "ScaledDotProductAttentionRule",
    "SoftmaxOpRule",
    "SoftmaxRule",
    "SumOpRule",
    "UnlistedOpRule",
    "build_op_rules",
    "no_rule_error",
    "transformer_module_rule",
]
