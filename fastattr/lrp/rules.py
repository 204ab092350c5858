"""LRP rules: small objects that say how relevance crosses one module or one torch call.

A rule set on a module (``module.rule = EpsilonRule(epsilon=1e-6)``, captum's convention) or
attached to torch calls by a canonizer (an op rule) works on the tensors that module or call
sees. The relevance convention is the backward's: what reaches a rule's output is the relevance
there, and the rule returns, through the autograd nodes it makes, the relevance at its inputs.

Every rule, built in or a user's, goes through the same two steps, each given the
[Relevance][fastattr.lrp.Relevance] of the call in progress, whose methods make the nodes:

- [forward_inputs][fastattr.lrp.PropagationRule.forward_inputs], before the module runs: by
  default ``relevance.product(x)`` on each input, the node that multiplies the contribution
  arriving at ``x`` by ``x``;
- [forward_output][fastattr.lrp.PropagationRule.forward_output], after: by default
  ``relevance.ratio(z, output, epsilon)`` with ``(z, epsilon)`` from
  [ratio_operands][fastattr.lrp.RatioRule.ratio_operands], the node that divides the relevance
  at the output by ``z + epsilon * sign(z)`` and sends it into ``z``'s graph.

Between the two, the module's own backward (or that of ``z``'s recomputation) runs. A rule
never changes the module: rules with modified weights recompute ``z`` from detached
parameters, and the model continues on its true output.
"""

from __future__ import annotations

import math
import numbers
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils import parametrize

from fastattr.ops._checks import check_epsilon

if TYPE_CHECKING:
    from fastattr.lrp.propagation import Relevance

# captum's stabilizer for the rules that take no epsilon.
STABILIZER = 1e-9

# How a ratio's denominator ``z`` is stabilized, as zennit takes it: a number, added as
# ``stabilizer * sign(z)`` (``sign(0) = 1``), or a function of ``z`` that returns the stabilized
# denominator itself (zennit's ``Stabilizer`` objects, or any ``(Tensor) -> Tensor``).
Stabilizer = float | Callable[[Tensor], Tensor]


class PropagationRule(ABC):
    """How relevance crosses one module (torch-level calls have [OpRule][fastattr.lrp.OpRule]).

    Subclass it and override [forward_output][fastattr.lrp.PropagationRule.forward_output]
    (and [forward_inputs][fastattr.lrp.PropagationRule.forward_inputs] when the inputs do not
    receive ``input * contribution``); the LRP page on rules shows how.

    Examples:
        >>> import torch
        >>> from torch import nn
        >>> from fastattr import LRP
        >>> from fastattr.lrp import PropagationRule
        >>> class HalfRule(PropagationRule):
        ...     "Epsilon-free LRP-0 on the module, then half of the relevance kept."
        ...     def forward_output(self, relevance, module, inputs, output):
        ...         return relevance.ratio(2 * output, output, 0.0)
        >>> model = nn.Sequential(nn.Linear(3, 4, bias=False), nn.ReLU(), nn.Linear(4, 1))
        >>> model[0].rule = HalfRule()
        >>> LRP(model).attribute(torch.randn(2, 3)).shape
        torch.Size([2, 3])
    """

    def unsupported_reason(self, module: nn.Module) -> str | None:
        """Why this rule cannot run on ``module``, or None when it can (checked before any
        work).

        Args:
            module: The module the rule is set on.

        Returns:
            A reason, worded to follow the module's name, or None.
        """
        return None

    def forward_inputs(self, relevance: Relevance, module: nn.Module, inputs: tuple) -> tuple:
        """The inputs the module runs on: by default each floating tensor input through
        ``relevance.product``, so that it receives ``input * contribution``.

        Args:
            relevance: The call's relevance graph, whose methods make the nodes.
            module: The module the rule is set on.
            inputs: The module's positional inputs.

        Returns:
            The inputs the module runs on, in the same order.
        """
        if len(inputs) == 1:  # the common case, without a generator
            return (relevance.product(inputs[0]),)
        return tuple(relevance.product(x) for x in inputs)

    @abstractmethod
    def forward_output(
        self, relevance: Relevance, module: nn.Module, inputs: tuple, output: Tensor
    ) -> Tensor:
        """The output the model continues with, carrying this rule's backward.

        Args:
            relevance: The call's relevance graph, whose methods make the nodes.
            module: The module the rule is set on.
            inputs: The inputs the module ran on (those ``forward_inputs`` returned).
            output: The module's output.

        Returns:
            What the model continues with (``output``'s value).
        """


class RatioRule(PropagationRule):
    """A rule whose backward starts with the epsilon ratio at ``z``: the module's output, or a
    recomputation of it (modified weights)."""

    @abstractmethod
    def ratio_operands(
        self, module: nn.Module, inputs: tuple, output: Tensor
    ) -> tuple[Tensor, Stabilizer]:
        """``(z, epsilon)``: the tensor whose graph receives the relevance, and the stabilizer
        (a number, or a callable that returns the stabilized ``z``).

        Args:
            module: The module the rule is set on.
            inputs: The inputs the module ran on.
            output: The module's output.

        Returns:
            ``z`` (``output``, or a recomputation of it in ``inputs``' graph) and epsilon.
        """

    def forward_output(
        self, relevance: Relevance, module: nn.Module, inputs: tuple, output: Tensor
    ) -> Tensor:
        z, epsilon = self.ratio_operands(module, inputs, output)
        if z is output:
            z = relevance.linear_output(module, inputs, output)
        return relevance.ratio(z, output, epsilon)


def _check_epsilon(epsilon: object) -> float:
    if not isinstance(epsilon, numbers.Real) or isinstance(epsilon, bool):
        raise TypeError(f"epsilon must be a real number, got {type(epsilon).__name__}")
    check_epsilon(float(epsilon))
    return float(epsilon)


# The parameters a rule may zero (zennit's ``zero_params``): those of the maps it recomputes.
_ZEROABLE = ("weight", "bias")

ZeroParams = str | Sequence[str] | None


def check_zero_params(zero_params: object) -> tuple[str, ...]:
    """``zero_params`` checked: the names it gives, each once.

    Names other than "weight" and "bias" are refused rather than ignored as zennit ignores
    them: the rules recompute only maps whose parameters are those two, so another name (a
    typo such as "biases") would zero nothing.
    """
    if zero_params is None:
        return ()
    names = (zero_params,) if isinstance(zero_params, str) else zero_params
    if not isinstance(names, (list, tuple, set, frozenset)) or not all(
        isinstance(name, str) for name in names
    ):
        raise TypeError(
            f"zero_params must be None, a parameter name or a list of them, got {zero_params!r}"
        )
    unknown = [name for name in names if name not in _ZEROABLE]
    if unknown:
        raise ValueError(
            "zero_params may name only 'weight' and 'bias', the parameters of the layers the "
            f"rules recompute, got {unknown}"
        )
    return tuple(dict.fromkeys(names))


def zero_parameters(
    zero_params: tuple[str, ...], weight: Tensor | None, bias: Tensor | None
) -> tuple[Tensor | None, Tensor | None]:
    """``weight`` and ``bias`` with those ``zero_params`` names zeroed (a zeroed bias is None,
    the same map); a parameter the layer lacks (None) stays None, as zennit skips it."""
    if "weight" in zero_params and weight is not None:
        weight = torch.zeros_like(weight)
    if "bias" in zero_params:
        bias = None
    return weight, bias


def zero_params_repr(zero_params: tuple[str, ...]) -> str:
    """``zero_params`` as a rule's repr shows it: only when set."""
    return f", zero_params={zero_params!r}" if zero_params else ""


def _detached_parameters(module: nn.Module) -> tuple[Tensor | None, Tensor | None]:
    """The module's weight and bias, detached; None where it has none."""
    weight, bias = getattr(module, "weight", None), getattr(module, "bias", None)
    return (
        weight.detach() if isinstance(weight, Tensor) else None,
        bias.detach() if isinstance(bias, Tensor) else None,
    )


class RecomputedRatioRule(RatioRule):
    """Epsilon on ``z`` recomputed from the module's input with modified parameters, the model
    continuing on the true output: captum's rules with modified weights, and epsilon with
    zennit's ``zero_params``. Subclasses say when ``z`` differs from the output and how the
    parameters change."""

    epsilon: Stabilizer

    @abstractmethod
    def changes(self, module: nn.Module) -> bool:
        """Whether ``z`` differs from the module's output (else the output is ``z``).

        Args:
            module: The module the rule is set on.

        Returns:
            True when ``z`` is recomputed.
        """

    @abstractmethod
    def modified_parameters(
        self, weight: Tensor | None, bias: Tensor | None
    ) -> tuple[Tensor | None, Tensor | None]:
        """The weight and bias ``z`` is computed with.

        Args:
            weight: The (detached) weight of the map, or None.
            bias: The (detached) bias of the map, or None.

        Returns:
            The modified weight and bias.
        """

    def unsupported_reason(self, module: nn.Module) -> str | None:
        """Why the rule cannot recompute ``module``: its type has no known map.

        Args:
            module: The module the rule is set on.

        Returns:
            A reason, or None when the module can be recomputed (or need not be).
        """
        if self.changes(module) and map_type(module) not in MODIFIED_FORWARDS:
            return f"{type(self).__name__} cannot recompute {type(module).__name__} ({self!r})"
        return None

    def modified_z(
        self,
        module: nn.Module,
        x: Tensor,
        weight: Tensor | None,
        bias: Tensor | None,
        output: Tensor,
    ) -> Tensor:
        """``z``: ``module``'s map with the modified ``weight`` and ``bias``.

        Args:
            module: The module whose map is recomputed.
            x: Its input (in the graph the relevance goes into).
            weight: The (detached) weight to modify and use in place of the module's own.
            bias: The (detached) bias to modify and use, or None.
            output: The module's output (its shape pins transposed convolutions' padding).

        Returns:
            The recomputed output.
        """
        weight, bias = self.modified_parameters(weight, bias)
        return MODIFIED_FORWARDS[map_type(module)](module, x, weight, bias, output)

    def ratio_operands(
        self, module: nn.Module, inputs: tuple, output: Tensor
    ) -> tuple[Tensor, Stabilizer]:
        """``(z, epsilon)``, ``z`` recomputed where the rule changes the module's map.

        Args:
            module: The module the rule is set on.
            inputs: The inputs the module ran on.
            output: The module's output.

        Returns:
            ``z`` (the output itself when nothing changes) and the rule's epsilon.
        """
        if not self.changes(module):
            return output, self.epsilon
        weight, bias = _detached_parameters(module)
        return self.modified_z(module, inputs[0], weight, bias, output), self.epsilon


class EpsilonRule(RecomputedRatioRule):
    """LRP-epsilon: ``R_in = x * J^T (R_out / (z + epsilon * sign(z)))``, with ``sign(0) = 1``.

    The default for linear maps, convolutions, pooling, batch norm and upsampling.

    Args:
        epsilon: The stabilizer: finite and non-negative, or, as zennit takes it, a callable
            that returns the stabilized denominator ``(z: Tensor) -> Tensor``.
        zero_params: As zennit's ``Epsilon`` takes it: "weight", "bias" or a list of them,
            zeroed in ``z``, recomputed from the layer's input (``"bias"``: ``z = w x``). A
            layer without such a parameter is left as it is.

    Raises:
        TypeError: ``epsilon`` is neither a real number nor a callable, or ``zero_params`` is
            neither None, a string nor a list of strings.
        ValueError: ``epsilon`` is negative or not finite, or ``zero_params`` names another
            parameter than "weight" and "bias".

    Examples:
        >>> import torch
        >>> from torch import nn
        >>> from fastattr import LRP, EpsilonRule
        >>> model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
        >>> model[0].rule = EpsilonRule(epsilon=0.25)
        >>> LRP(model).attribute(torch.randn(5, 4), target=1).shape
        torch.Size([5, 4])
    """

    def __init__(self, epsilon: Stabilizer = 1e-9, zero_params: ZeroParams = None) -> None:
        self.epsilon = check_stabilizer(epsilon, "epsilon")
        self.zero_params = check_zero_params(zero_params)

    def changes(self, module: nn.Module) -> bool:
        """Whether ``z`` differs from the module's output: the module has a parameter that
        ``zero_params`` names.

        Args:
            module: The module the rule is set on.

        Returns:
            True when ``z`` is recomputed.
        """
        return any(isinstance(getattr(module, name, None), Tensor) for name in self.zero_params)

    def modified_parameters(
        self, weight: Tensor | None, bias: Tensor | None
    ) -> tuple[Tensor | None, Tensor | None]:
        """``weight`` and ``bias`` with the ``zero_params`` names zeroed.

        Args:
            weight: The (detached) weight of the map, or None.
            bias: The (detached) bias of the map, or None.

        Returns:
            The weight and bias ``z`` is computed with.
        """
        return zero_parameters(self.zero_params, weight, bias)

    def __repr__(self) -> str:
        return f"EpsilonRule(epsilon={self.epsilon}{zero_params_repr(self.zero_params)})"


def _check_flag(value: object, name: str) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
    return value


class ModifiedWeightRule(RecomputedRatioRule):
    """Epsilon with a stabilizer of 1e-9 on ``z' = module(x; modified weight, bias)``, as
    captum's rules with modified weights; the model continues on the true output.

    Args:
        set_bias_to_zero: Compute ``z'`` without the bias.

    Raises:
        TypeError: ``set_bias_to_zero`` is not a bool.
    """

    epsilon = STABILIZER  # captum's, fixed

    def __init__(self, set_bias_to_zero: bool) -> None:
        self.set_bias_to_zero = _check_flag(set_bias_to_zero, "set_bias_to_zero")

    @abstractmethod
    def modify_weight(self, weight: Tensor) -> Tensor:
        """The weight ``z'`` is computed with.

        Args:
            weight: The module's weight, detached.

        Returns:
            The modified weight.
        """

    def changes(self, module: nn.Module) -> bool:
        """Whether ``z'`` differs from the module's output.

        Args:
            module: The module the rule is set on.

        Returns:
            True when the module has a weight, or a bias the rule zeroes.
        """
        has_bias = getattr(module, "bias", None) is not None
        return getattr(module, "weight", None) is not None or (self.set_bias_to_zero and has_bias)

    def modified_parameters(
        self, weight: Tensor | None, bias: Tensor | None
    ) -> tuple[Tensor | None, Tensor | None]:
        """The weight modified, and the bias zeroed if asked.

        Args:
            weight: The (detached) weight of the map, or None.
            bias: The (detached) bias of the map, or None.

        Returns:
            The weight and bias ``z'`` is computed with.
        """
        if weight is not None:
            weight = self.modify_weight(weight)
        if bias is not None and self.set_bias_to_zero:
            bias = torch.zeros_like(bias)
        return weight, bias


class GammaRule(ModifiedWeightRule):
    """LRP-gamma as captum defines it: epsilon (1e-9) on the module with its weight replaced by
    ``w + gamma * max(w, 0)``, and its bias by zero if ``set_bias_to_zero``.

    Args:
        gamma: How much the positive weights are strengthened; finite.
        set_bias_to_zero: Compute ``z'`` without the bias.

    Raises:
        TypeError: ``gamma`` is not a real number, or ``set_bias_to_zero`` not a bool.
        ValueError: ``gamma`` is not finite.

    Examples:
        >>> import torch
        >>> from torch import nn
        >>> from fastattr import LRP, GammaRule
        >>> model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(16, 2))
        >>> model[0].rule = GammaRule(gamma=0.5)
        >>> LRP(model).attribute(torch.randn(2, 3, 4, 4), target=0).shape
        torch.Size([2, 3, 4, 4])
    """

    def __init__(self, gamma: float = 0.25, set_bias_to_zero: bool = False) -> None:
        if not isinstance(gamma, numbers.Real) or isinstance(gamma, bool):
            raise TypeError(f"gamma must be a real number, got {type(gamma).__name__}")
        if not math.isfinite(gamma):
            raise ValueError(f"gamma must be finite, got {gamma}")
        super().__init__(set_bias_to_zero)
        self.gamma = float(gamma)

    def modify_weight(self, weight: Tensor) -> Tensor:
        """``w + gamma * max(w, 0)``.

        Args:
            weight: The module's weight, detached.

        Returns:
            The modified weight.
        """
        return weight + self.gamma * weight.clamp(min=0)

    def __repr__(self) -> str:
        return f"GammaRule(gamma={self.gamma}, set_bias_to_zero={self.set_bias_to_zero})"


class Alpha1_Beta0_Rule(ModifiedWeightRule):  # captum's name
    """LRP-alpha1-beta0 as captum defines it: epsilon (1e-9) on the module with its weight
    replaced by ``max(w, 0)``, and its bias by zero if ``set_bias_to_zero``.

    Args:
        set_bias_to_zero: Compute ``z'`` without the bias.

    Raises:
        TypeError: ``set_bias_to_zero`` is not a bool.

    Examples:
        >>> import torch
        >>> from torch import nn
        >>> from fastattr import LRP, Alpha1_Beta0_Rule
        >>> model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
        >>> model[0].rule = Alpha1_Beta0_Rule()
        >>> LRP(model).attribute(torch.randn(5, 4), target=0).shape
        torch.Size([5, 4])
    """

    def __init__(self, set_bias_to_zero: bool = False) -> None:
        super().__init__(set_bias_to_zero)

    def modify_weight(self, weight: Tensor) -> Tensor:
        """``max(w, 0)``.

        Args:
            weight: The module's weight, detached.

        Returns:
            The modified weight.
        """
        return weight.clamp(min=0)

    def __repr__(self) -> str:
        return f"Alpha1_Beta0_Rule(set_bias_to_zero={self.set_bias_to_zero})"


# zennit's stabilizer, the default of the rules that come from zennit.
ZENNIT_STABILIZER = 1e-6


def _check_real(value: object, name: str) -> float:
    if not isinstance(value, numbers.Real) or isinstance(value, bool):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    return float(value)


def check_stabilizer(stabilizer: object, name: str = "stabilizer") -> Stabilizer:
    """``stabilizer`` checked: a finite, non-negative real number (as a float), or a callable,
    kept as it is."""
    if callable(stabilizer):
        return stabilizer
    if not isinstance(stabilizer, numbers.Real) or isinstance(stabilizer, bool):
        raise TypeError(
            f"{name} must be a real number or a callable (Tensor) -> Tensor, got "
            f"{type(stabilizer).__name__}"
        )
    value = _check_real(stabilizer, name)
    if value < 0:
        raise ValueError(f"{name} must be non-negative, got {value}")
    return value


def _positive(t: Tensor | None) -> Tensor | None:
    return None if t is None else t.clamp(min=0)


def _negative(t: Tensor | None) -> Tensor | None:
    return None if t is None else t.clamp(max=0)


class RecomputingRule(PropagationRule):
    """Base of zennit's rules for linear layers and convolutions: each recomputes the module's
    map (never changing the module) on modified inputs and parameters, and divides by a
    recomputed ``z`` stabilized as ``z + stabilizer * sign(z)``, with ``sign(0) = 1``.

    Subclasses override [output_with][fastattr.lrp.RecomputingRule.output_with], which takes
    the weight and bias explicitly: the module's own, or those of a batch norm merged into it
    ([MergeBatchNorm][fastattr.canonizers.MergeBatchNorm]).

    Args:
        stabilizer: The stabilizer, finite and non-negative, zennit's 1e-6 by default; or, as
            zennit takes it, a callable that returns the stabilized denominator ``(z: Tensor)
            -> Tensor``.
        zero_params: As zennit's rules take it: "weight", "bias" or a list of them, zeroed in
            every map the rule computes, after the rule's own change of the parameters (a
            layer without such a parameter is left as it is).

    Raises:
        TypeError: ``stabilizer`` is neither a real number nor a callable, or ``zero_params``
            is neither None, a string nor a list of strings.
        ValueError: ``stabilizer`` is negative or not finite, or ``zero_params`` names another
            parameter than "weight" and "bias".
    """

    def __init__(
        self, stabilizer: Stabilizer = ZENNIT_STABILIZER, zero_params: ZeroParams = None
    ) -> None:
        self.stabilizer = check_stabilizer(stabilizer)
        self.zero_params = check_zero_params(zero_params)

    def unsupported_reason(self, module: nn.Module) -> str | None:
        """Why the rule cannot run on ``module``: it is not ``nn.Linear`` or a convolution.

        Args:
            module: The module the rule is set on.

        Returns:
            A reason, or None.
        """
        if map_type(module) in MODIFIED_FORWARDS and not isinstance(module, _BATCH_NORMS):
            return None
        name = type(module).__name__
        return f"{type(self).__name__} runs on nn.Linear and convolutions only, not on {name}"

    def forward_output(
        self, relevance: Relevance, module: nn.Module, inputs: tuple, output: Tensor
    ) -> Tensor:
        """[output_with][fastattr.lrp.RecomputingRule.output_with] the module's own weight and
        bias.

        Args:
            relevance: The call's relevance graph.
            module: The module the rule is set on.
            inputs: The inputs the module ran on.
            output: The module's output.

        Returns:
            What the model continues with.
        """
        weight, bias = _detached_parameters(module)
        return self.output_with(relevance, module, inputs[0], weight, bias, output)

    @abstractmethod
    def output_with(
        self,
        relevance: Relevance,
        module: nn.Module,
        x: Tensor,
        weight: Tensor,
        bias: Tensor | None,
        output: Tensor,
    ) -> Tensor:
        """The output the model continues with, its relevance redistributed by ``module``'s map
        with ``weight`` and ``bias`` in place of its own.

        Args:
            relevance: The call's relevance graph.
            module: ``nn.Linear`` or a convolution.
            x: Its input, as ``forward_inputs`` returned it.
            weight: The (detached) weight of the map.
            bias: The (detached) bias of the map, or None.
            output: The output of the map (the module's, or that of the batch norm merged
                into it).

        Returns:
            What the model continues with (``output``'s value).
        """

    def recompute(
        self, module: nn.Module, x: Tensor, weight: Tensor, bias: Tensor | None, output: Tensor
    ) -> Tensor:
        """``module``'s map on ``x`` with ``weight`` and ``bias`` in place of its own, those
        ``zero_params`` names zeroed (as zennit zeroes them: in place of the modified ones).

        Args:
            module: ``nn.Linear`` or a convolution.
            x: The input to map.
            weight: The weight to use.
            bias: The bias to use, or None.
            output: The module's output (its shape pins transposed convolutions' padding).

        Returns:
            The recomputed output.
        """
        weight, bias = zero_parameters(self.zero_params, weight, bias)
        return MODIFIED_FORWARDS[map_type(module)](module, x, weight, bias, output)


class _SignSplitRule(RecomputingRule):
    """A rule that splits each contribution ``x_i * w_ij`` by the signs of input and weight:
    ``z_up`` sums those from ``x+`` with weight ``up`` and ``x-`` with weight ``down`` (and the
    bias ``bias_up``), ``z_down`` the other pairings (and ``bias_down``). The relevance of both
    reaches the input through one product node on ``x``."""

    def split(
        self,
        module: nn.Module,
        x: Tensor,
        output: Tensor,
        up: tuple[Tensor, Tensor | None],
        down: tuple[Tensor, Tensor | None],
        with_down: bool = True,
    ) -> tuple[Tensor, Tensor | None]:
        positive, negative = x.clamp(min=0), x.clamp(max=0)
        z_up = self.recompute(module, positive, up[0], up[1], output)
        z_up = z_up + self.recompute(module, negative, down[0], None, output)
        if not with_down:
            return z_up, None
        z_down = self.recompute(module, positive, down[0], down[1], output)
        z_down = z_down + self.recompute(module, negative, up[0], None, output)
        return z_up, z_down


class AlphaBetaRule(_SignSplitRule):
    """LRP-alpha-beta as zennit defines it (``zennit.rules.AlphaBeta``), for inputs of either
    sign: ``R_in = alpha * R+ - beta * R-``, where ``R+`` redistributes ``R`` by the positive
    contributions ``x+ * w+`` and ``x- * w-`` (and the positive part of the bias) and ``R-`` by
    the negative ones ``x+ * w-`` and ``x- * w+`` (and the negative part of the bias), each
    divided by its own sum stabilized as ``z + stabilizer * sign(z)``.

    Args:
        alpha: The weight of the positive contributions, ``1 + beta``.
        beta: The weight of the negative contributions, non-negative.
        stabilizer: The stabilizer, zennit's 1e-6 by default, or a callable that returns the
            stabilized denominator (as zennit takes it).
        zero_params: "weight", "bias" or a list of them, zeroed as zennit's ``zero_params``
            (see [RecomputingRule][fastattr.lrp.RecomputingRule]).

    Raises:
        TypeError: an argument is not a real number (``stabilizer``: nor a callable;
            ``zero_params``: nor a string or a list of strings).
        ValueError: an argument is not finite, ``beta`` or ``stabilizer`` is negative,
            ``alpha - beta`` is not 1, or ``zero_params`` names another parameter than
            "weight" and "bias".

    Examples:
        >>> import torch
        >>> from torch import nn
        >>> from fastattr import LRP, AlphaBetaRule
        >>> model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(16, 2))
        >>> model[0].rule = AlphaBetaRule(alpha=2.0, beta=1.0)
        >>> LRP(model).attribute(torch.randn(2, 3, 4, 4), target=0).shape
        torch.Size([2, 3, 4, 4])
    """

    def __init__(
        self,
        alpha: float = 2.0,
        beta: float = 1.0,
        stabilizer: Stabilizer = ZENNIT_STABILIZER,
        zero_params: ZeroParams = None,
    ) -> None:
        alpha, beta = _check_real(alpha, "alpha"), _check_real(beta, "beta")
        if beta < 0:
            raise ValueError(f"beta must be non-negative, got {beta}")
        # Relative: 1.1 - 0.1 is not exactly 1 in floating point.
        if not math.isclose(alpha - beta, 1.0, rel_tol=1e-12):
            raise ValueError(f"alpha - beta must be 1, got alpha={alpha}, beta={beta}")
        super().__init__(stabilizer, zero_params)
        self.alpha, self.beta = alpha, beta

    def output_with(
        self,
        relevance: Relevance,
        module: nn.Module,
        x: Tensor,
        weight: Tensor,
        bias: Tensor | None,
        output: Tensor,
    ) -> Tensor:
        """The output, whose relevance divides by the positive and negative contributions.

        Args:
            relevance: The call's relevance graph.
            module: ``nn.Linear`` or a convolution.
            x: Its input (through the product node).
            weight: The weight of the map.
            bias: The bias of the map, or None.
            output: The output of the map.

        Returns:
            What the model continues with.
        """
        up = (_positive(weight), _positive(bias))
        down = (_negative(weight), _negative(bias))
        z_up, z_down = self.split(module, x, output, up, down, self.beta != 0)
        positive = relevance.ratio(z_up, output, self.stabilizer)
        if z_down is None and self.alpha == 1:
            return positive  # ZPlus: one ratio, which the next product may fold into
        combined = self.alpha * positive
        if z_down is not None:
            combined = combined - self.beta * relevance.ratio(z_down, output, self.stabilizer)
        # The model continues on the output's own value; the relevance goes to both ratios.
        return relevance.passing(combined, output)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(alpha={self.alpha}, beta={self.beta}, "
            f"stabilizer={self.stabilizer}{zero_params_repr(self.zero_params)})"
        )


class ZPlusRule(AlphaBetaRule):
    """LRP-z+ as zennit defines it (``zennit.rules.ZPlus``): ``AlphaBetaRule(1, 0)``, the
    relevance redistributed by the positive contributions ``x+ * w+`` and ``x- * w-`` and the
    positive part of the bias.

    captum's [Alpha1_Beta0_Rule][fastattr.Alpha1_Beta0_Rule] keeps every input and the whole
    bias (``z = max(w, 0) x + b``): the two agree on non-negative inputs of a layer whose bias
    is non-negative, absent, or zeroed by both, with the same stabilizer.

    Args:
        stabilizer: The stabilizer, zennit's 1e-6 by default, or a callable that returns the
            stabilized denominator (as zennit takes it).
        zero_params: "weight", "bias" or a list of them, zeroed as zennit's ``zero_params``
            (see [RecomputingRule][fastattr.lrp.RecomputingRule]).

    Raises:
        TypeError: ``stabilizer`` is neither a real number nor a callable, or ``zero_params``
            is neither None, a string nor a list of strings.
        ValueError: ``stabilizer`` is negative or not finite, or ``zero_params`` names another
            parameter than "weight" and "bias".

    Examples:
        >>> import torch
        >>> from torch import nn
        >>> from fastattr import LRP, ZPlusRule
        >>> model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
        >>> model[0].rule = ZPlusRule()
        >>> LRP(model).attribute(torch.randn(5, 4), target=0).shape
        torch.Size([5, 4])
    """

    def __init__(
        self, stabilizer: Stabilizer = ZENNIT_STABILIZER, zero_params: ZeroParams = None
    ) -> None:
        super().__init__(1.0, 0.0, stabilizer, zero_params)

    def __repr__(self) -> str:
        return f"ZPlusRule(stabilizer={self.stabilizer}{zero_params_repr(self.zero_params)})"


class GeneralizedGammaRule(_SignSplitRule):
    """LRP-gamma as zennit defines it (``zennit.rules.Gamma``, the generalized gamma rule for
    inputs of either sign), which zennit's ``EpsilonGammaBox`` uses: where the output is
    positive, the relevance is redistributed by ``z+ = (w + gamma * w+) x+ + (w + gamma * w-)
    x- + b + gamma * b+``; where it is negative, by ``z- = (w + gamma * w-) x+ + (w + gamma *
    w+) x- + b + gamma * b-``; where it is zero, nowhere. captum's
    [GammaRule][fastattr.GammaRule] instead uses ``w + gamma * w+`` on every input.

    Args:
        gamma: How much the contributions of the output's sign are strengthened; finite.
        stabilizer: The stabilizer, zennit's 1e-6 by default, or a callable that returns the
            stabilized denominator (as zennit takes it).
        zero_params: "weight", "bias" or a list of them, zeroed as zennit's ``zero_params``
            (see [RecomputingRule][fastattr.lrp.RecomputingRule]).

    Raises:
        TypeError: an argument is not a real number (``stabilizer``: nor a callable;
            ``zero_params``: nor a string or a list of strings).
        ValueError: an argument is not finite, ``stabilizer`` is negative, or
            ``zero_params`` names another parameter than "weight" and "bias".

    Examples:
        >>> import torch
        >>> from torch import nn
        >>> from fastattr import LRP, GeneralizedGammaRule
        >>> model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(16, 2))
        >>> model[0].rule = GeneralizedGammaRule(gamma=0.25)
        >>> LRP(model).attribute(torch.randn(2, 3, 4, 4), target=0).shape
        torch.Size([2, 3, 4, 4])
    """

    def __init__(
        self,
        gamma: float = 0.25,
        stabilizer: Stabilizer = ZENNIT_STABILIZER,
        zero_params: ZeroParams = None,
    ) -> None:
        self.gamma = _check_real(gamma, "gamma")
        super().__init__(stabilizer, zero_params)

    def _strengthened(self, t: Tensor | None, part: Callable) -> Tensor | None:
        return None if t is None else t + self.gamma * part(t)

    def output_with(
        self,
        relevance: Relevance,
        module: nn.Module,
        x: Tensor,
        weight: Tensor,
        bias: Tensor | None,
        output: Tensor,
    ) -> Tensor:
        """The output, whose relevance divides by the contributions of its own sign.

        Args:
            relevance: The call's relevance graph.
            module: ``nn.Linear`` or a convolution.
            x: Its input (through the product node).
            weight: The weight of the map.
            bias: The bias of the map, or None.
            output: The output of the map.

        Returns:
            What the model continues with.
        """
        up = (self._strengthened(weight, _positive), self._strengthened(bias, _positive))
        down = (self._strengthened(weight, _negative), self._strengthened(bias, _negative))
        z_up, z_down = self.split(module, x, output, up, down)
        sign = output.detach()
        positive = (sign > 0).to(output.dtype) * relevance.ratio(z_up, output, self.stabilizer)
        negative = (sign < 0).to(output.dtype) * relevance.ratio(z_down, output, self.stabilizer)
        return relevance.passing(positive + negative, output)

    def __repr__(self) -> str:
        return (
            f"GeneralizedGammaRule(gamma={self.gamma}, stabilizer={self.stabilizer}"
            f"{zero_params_repr(self.zero_params)})"
        )


def _as_bound(value: object, name: str) -> Tensor:
    if isinstance(value, Tensor):
        if not value.is_floating_point():
            raise TypeError(f"{name} must be a floating tensor or a real number, got {value.dtype}")
        bound = value.detach().clone()
    elif isinstance(value, numbers.Real) and not isinstance(value, bool):
        bound = torch.tensor(float(value), dtype=torch.float64)
    else:
        raise TypeError(f"{name} must be a real number or a tensor, got {type(value).__name__}")
    if not torch.isfinite(bound).all():
        raise ValueError(f"{name} must be finite")
    return bound


class ZBoxRule(RecomputingRule):
    """LRP-z^B as zennit defines it (``zennit.rules.ZBox``), for a first layer whose inputs
    lie between ``low`` and ``high``: ``R_in = x * w^T s - low * w+^T s - high * w-^T s``,
    ``s = R / (z + stabilizer * sign(z))``, ``z = w x - w+ low - w- high`` (the bias cancels in
    zennit's form).

    Args:
        low: The lowest value of each input: a number, or a tensor broadcastable to the input
            (``(1, 3, 1, 1)`` for per-channel bounds of images).
        high: The highest, likewise; not below ``low``.
        stabilizer: The stabilizer, zennit's 1e-6 by default, or a callable that returns the
            stabilized denominator (as zennit takes it).
        zero_params: "weight", "bias" or a list of them, zeroed as zennit's ``zero_params``
            (see [RecomputingRule][fastattr.lrp.RecomputingRule]).

    Raises:
        TypeError: ``low`` or ``high`` is neither a real number nor a floating tensor,
            ``stabilizer`` is neither a real number nor a callable, or ``zero_params`` is
            neither None, a string nor a list of strings.
        ValueError: ``low`` or ``high`` is not finite, the two do not broadcast together,
            ``low`` exceeds ``high`` anywhere, ``stabilizer`` is negative or not finite, or
            ``zero_params`` names another parameter than "weight" and "bias".

    Examples:
        >>> import torch
        >>> from torch import nn
        >>> from fastattr import LRP, ZBoxRule
        >>> model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(16, 2))
        >>> model[0].rule = ZBoxRule(low=0.0, high=1.0)
        >>> LRP(model).attribute(torch.rand(2, 3, 4, 4), target=0).shape
        torch.Size([2, 3, 4, 4])
    """

    def __init__(
        self,
        low: float | Tensor,
        high: float | Tensor,
        stabilizer: Stabilizer = ZENNIT_STABILIZER,
        zero_params: ZeroParams = None,
    ) -> None:
        self.low, self.high = _as_bound(low, "low"), _as_bound(high, "high")
        try:
            above = self.low.cpu() > self.high.cpu()
        except RuntimeError:
            raise ValueError(
                f"low and high must broadcast together, got shapes {list(self.low.shape)} and "
                f"{list(self.high.shape)}"
            ) from None
        if above.any():
            raise ValueError("low must not exceed high")
        super().__init__(stabilizer, zero_params)

    def _bound(self, bound: Tensor, x: Tensor, name: str) -> Tensor:
        try:
            return bound.to(x).broadcast_to(x.shape)
        except RuntimeError:
            raise ValueError(
                f"ZBoxRule's {name} of shape {list(bound.shape)} does not broadcast to the "
                f"layer's input of shape {list(x.shape)}"
            ) from None

    def forward_inputs(self, relevance: Relevance, module: nn.Module, inputs: tuple) -> tuple:
        """The inputs unchanged: the rule makes its own nodes on them.

        Args:
            relevance: The call's relevance graph.
            module: The module the rule is set on.
            inputs: The module's positional inputs.

        Returns:
            ``inputs``.
        """
        return inputs

    def output_with(
        self,
        relevance: Relevance,
        module: nn.Module,
        x: Tensor,
        weight: Tensor,
        bias: Tensor | None,
        output: Tensor,
    ) -> Tensor:
        """The output, whose relevance reaches the input as ``x``'s, ``low``'s and ``high``'s
        contributions (the bias cancels in ``z``).

        Args:
            relevance: The call's relevance graph.
            module: ``nn.Linear`` or a convolution.
            x: Its input.
            weight: The weight of the map.
            bias: The bias of the map (unused).
            output: The output of the map.

        Returns:
            What the model continues with.
        """
        # Stand-ins with the bounds' values, whose relevance (bound * contribution) goes to x.
        low = relevance.product(relevance.passing(x, self._bound(self.low, x, "low")))
        high = relevance.product(relevance.passing(x, self._bound(self.high, x, "high")))
        z = self.recompute(module, relevance.product(x), weight, None, output)
        z = z - self.recompute(module, low, weight.clamp(min=0), None, output)
        z = z - self.recompute(module, high, weight.clamp(max=0), None, output)
        return relevance.ratio(z, output, self.stabilizer)

    def __repr__(self) -> str:
        low, high = self.low.tolist(), self.high.tolist()
        return (
            f"ZBoxRule(low={low}, high={high}, stabilizer={self.stabilizer}"
            f"{zero_params_repr(self.zero_params)})"
        )


class _UniformInputRule(RecomputingRule):
    """A rule that redistributes by ``modified_weight`` alone, whatever the input: ``z`` is the
    module's map of ones, and the relevance at the input is ``modified_weight^T s``."""

    def forward_inputs(self, relevance: Relevance, module: nn.Module, inputs: tuple) -> tuple:
        return inputs

    @abstractmethod
    def modified_parameters(
        self, weight: Tensor, bias: Tensor | None
    ) -> tuple[Tensor, Tensor | None]:
        """The weight and bias the map of ones is computed with, from the map's."""

    def output_with(
        self,
        relevance: Relevance,
        module: nn.Module,
        x: Tensor,
        weight: Tensor,
        bias: Tensor | None,
        output: Tensor,
    ) -> Tensor:
        # Ones whose relevance goes to x unchanged.
        ones = relevance.passing(x, torch.ones_like(x))
        weight, bias = self.modified_parameters(weight, bias)
        z = self.recompute(module, ones, weight, bias, output)
        return relevance.ratio(z, output, self.stabilizer)

    def __repr__(self) -> str:
        zero_params = zero_params_repr(self.zero_params)
        return f"{type(self).__name__}(stabilizer={self.stabilizer}{zero_params})"


class WSquareRule(_UniformInputRule):
    """LRP-w² as zennit defines it (``zennit.rules.WSquare``): the relevance redistributed by
    the squared weights, whatever the input, ``R_in = (w ** 2)^T (R / (z + stabilizer *
    sign(z)))``, ``z`` the map of ones with the squared weight and bias.

    Args:
        stabilizer: The stabilizer, zennit's 1e-6 by default, or a callable that returns the
            stabilized denominator (as zennit takes it).
        zero_params: "weight", "bias" or a list of them, zeroed as zennit's ``zero_params``
            (see [RecomputingRule][fastattr.lrp.RecomputingRule]).

    Raises:
        TypeError: ``stabilizer`` is neither a real number nor a callable, or ``zero_params``
            is neither None, a string nor a list of strings.
        ValueError: ``stabilizer`` is negative or not finite, or ``zero_params`` names another
            parameter than "weight" and "bias".

    Examples:
        >>> import torch
        >>> from torch import nn
        >>> from fastattr import LRP, WSquareRule
        >>> model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
        >>> model[0].rule = WSquareRule()
        >>> LRP(model).attribute(torch.randn(5, 4), target=0).shape
        torch.Size([5, 4])
    """

    def modified_parameters(
        self, weight: Tensor, bias: Tensor | None
    ) -> tuple[Tensor, Tensor | None]:
        """The squared weight and bias.

        Args:
            weight: The weight of the map.
            bias: The bias of the map, or None.

        Returns:
            ``(w ** 2, b ** 2)``.
        """
        return weight**2, None if bias is None else bias**2


class FlatRule(_UniformInputRule):
    """LRP-flat as zennit defines it (``zennit.rules.Flat``): the relevance spread evenly over
    each output's receptive field, ``R_in = 1^T (R / (z + stabilizer * sign(z)))``, ``z`` the
    number of inputs each output reads (the map of ones with unit weights, without bias).

    Args:
        stabilizer: The stabilizer, zennit's 1e-6 by default, or a callable that returns the
            stabilized denominator (as zennit takes it).
        zero_params: "weight", "bias" or a list of them, zeroed as zennit's ``zero_params``
            (see [RecomputingRule][fastattr.lrp.RecomputingRule]).

    Raises:
        TypeError: ``stabilizer`` is neither a real number nor a callable, or ``zero_params``
            is neither None, a string nor a list of strings.
        ValueError: ``stabilizer`` is negative or not finite, or ``zero_params`` names another
            parameter than "weight" and "bias".

    Examples:
        >>> import torch
        >>> from torch import nn
        >>> from fastattr import LRP, FlatRule
        >>> model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
        >>> model[0].rule = FlatRule()
        >>> LRP(model).attribute(torch.randn(5, 4), target=0).shape
        torch.Size([5, 4])
    """

    def modified_parameters(
        self, weight: Tensor, bias: Tensor | None
    ) -> tuple[Tensor, Tensor | None]:
        """Unit weights, no bias.

        Args:
            weight: The weight of the map.
            bias: The bias of the map (unused).

        Returns:
            ``(ones, None)``.
        """
        return torch.ones_like(weight), None


class IdentityRule(PropagationRule):
    """The relevance at the output, unchanged, at the (single, same-shaped) input. captum passes
    relevance so through ReLU, Dropout and Tanh whatever rule is set on them, and fastattr
    through every element-wise activation without a rule.

    Examples:
        >>> import torch
        >>> from torch import nn
        >>> from fastattr import LRP, IdentityRule
        >>> model = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3), nn.Linear(3, 2)).eval()
        >>> model[1].rule = IdentityRule()
        >>> LRP(model).attribute(torch.randn(5, 4), target=0).shape
        torch.Size([5, 4])
    """

    def forward_inputs(self, relevance: Relevance, module: nn.Module, inputs: tuple) -> tuple:
        """The inputs unchanged, or copies the module may write into when it works in place.

        Args:
            relevance: The call's relevance graph.
            module: The module the rule is set on.
            inputs: The module's positional inputs.

        Returns:
            The inputs the module runs on.
        """
        if module.__dict__.get("inplace") is True:
            # The module writes into its input: give it one it may write into. A ReLU writes
            # only zeros or the values there.
            zero_or_same = type(module) is nn.ReLU
            return tuple(relevance.writable(x, zero_or_same) for x in inputs)
        return inputs

    def forward_output(
        self, relevance: Relevance, module: nn.Module, inputs: tuple, output: Tensor
    ) -> Tensor:
        """The output, whose relevance goes unchanged to the module's input.

        Args:
            relevance: The call's relevance graph.
            module: The module the rule is set on.
            inputs: The inputs the module ran on.
            output: The module's output.

        Returns:
            What the model continues with.
        """
        return relevance.passing(self.source(module, inputs, output), output)

    def source(self, module: nn.Module, inputs: tuple, output: Tensor) -> Tensor:
        """The input that receives the output's relevance: the module's one tensor input.

        Args:
            module: The module the rule is set on.
            inputs: The inputs the module ran on.
            output: The module's output.

        Returns:
            The one tensor input.

        Raises:
            ValueError: The module has not exactly one tensor input of the output's shape.
        """
        if len(inputs) == 1 and isinstance(inputs[0], Tensor) and inputs[0].shape == output.shape:
            return inputs[0]  # the common case, checked without building the list below
        tensors = [x for x in inputs if isinstance(x, Tensor)]
        if len(tensors) != 1 or tensors[0].shape != output.shape:
            raise ValueError(
                f"{self!r} on {type(module).__name__} needs one input of the output's shape, got "
                f"inputs of shapes {[list(x.shape) for x in tensors]} and output of shape "
                f"{list(output.shape)}"
            )
        return tensors[0]

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class PassRule(IdentityRule):
    """The rule of element-wise activations and dropout: relevance passes straight through."""


class OpRule(ABC):
    """How relevance crosses a torch-level call (``a + b``, ``torch.add``, ``softmax``, ...)
    outside the modules that carry a rule: canonizers attach op rules to LRP's calls.

    ``functions`` lists the torch functions the rule is offered, as ``__torch_function__``
    sees them (``torch.Tensor.add`` for ``a + b``, ``torch.Tensor.add_`` for ``a += b``,
    ``torch.add``, ...); None offers it every torch call that no other op rule lists.
    [apply][fastattr.lrp.OpRule.apply] runs in their place and returns what the call returns,
    carrying the rule's backward; for a call it does not take, it returns ``func(*args,
    **kwargs)``.
    """

    functions: tuple[Callable[..., Any], ...] | None = ()
    # Of the calls a rule offered every call takes, those it always runs as they are: LRP makes
    # them directly, without calling the rule.
    runs_as_is: frozenset[Callable[..., Any]] = frozenset()

    @abstractmethod
    def apply(
        self,
        relevance: Relevance,
        func: Callable[..., Any],
        args: tuple,
        kwargs: dict[str, Any],
    ) -> Any:
        """The call's result, with this rule's nodes on the tensors it takes.

        Args:
            relevance: The call's relevance graph, whose methods make the nodes.
            func: The torch function called.
            args: Its positional arguments.
            kwargs: Its keyword arguments.

        Returns:
            What ``func(*args, **kwargs)`` returns, in value.
        """


class EpsilonSumRule(OpRule):
    """The epsilon rule of a sum of two activations: ``R_a = a * R / (a + b + epsilon *
    sign(a + b))`` and likewise for ``b``, instead of copying the relevance into both
    branches. Sums with a parameter or a constant (a bias) are left to plain autograd.

    Args:
        epsilon: The stabilizer, or a callable that returns the stabilized sum (as zennit's
            ``Norm`` takes it).
        rebind_in_place: For ``a += b``, return the sum as a new tensor instead of writing it
            into ``a`` (only where the code is known to rebind ``a``, as torchvision's residual
            blocks do).
        scope: When given, the rule takes only sums computed directly in the forward of a
            module for which ``scope(module)`` holds.

    Raises:
        TypeError: ``epsilon`` is neither a real number nor a callable.
        ValueError: ``epsilon`` is negative or not finite.
    """

    functions = (torch.Tensor.add, torch.add, torch.Tensor.add_)

    def __init__(
        self,
        epsilon: Stabilizer = STABILIZER,
        rebind_in_place: bool = False,
        scope: Callable[[nn.Module], bool] | None = None,
    ) -> None:
        self.epsilon = check_stabilizer(epsilon, "epsilon")
        self.rebind_in_place = rebind_in_place
        self.scope = scope

    def apply(
        self,
        relevance: Relevance,
        func: Callable[..., Any],
        args: tuple,
        kwargs: dict[str, Any],
    ) -> Any:
        """The sum, through the epsilon rule when both operands are activations.

        Args:
            relevance: The call's relevance graph.
            func: ``torch.Tensor.add``, ``torch.add`` or ``torch.Tensor.add_``.
            args: Its positional arguments.
            kwargs: Its keyword arguments.

        Returns:
            The sum (written into the first operand for an in-place call).
        """
        if (
            len(args) != 2
            or not set(kwargs) <= {"alpha"}
            or (self.scope is not None and not self.scope(relevance.container))
            or not relevance.is_activation(args[0])
            or not relevance.is_activation(args[1])
        ):
            return func(*args, **kwargs)
        a, b = args
        alpha = kwargs.get("alpha", 1)
        in_place = func is torch.Tensor.add_
        first = relevance.product(a.clone() if in_place and not self.rebind_in_place else a)
        second = relevance.product(b)
        total = first + (second if alpha == 1 else alpha * second)
        total = relevance.ratio(total, total, self.epsilon)
        if in_place and not self.rebind_in_place:
            return relevance.write_into(a, total)
        return total

    def __repr__(self) -> str:
        return f"EpsilonSumRule(epsilon={self.epsilon})"


def _linear(module: nn.Linear, x: Tensor, weight: Tensor, bias: Tensor | None, _: Tensor) -> Tensor:
    return F.linear(x, weight, bias)


def _conv(module: nn.Module, x: Tensor, weight: Tensor, bias: Tensor | None, _: Tensor) -> Tensor:
    # Private: the module's own forward with other parameters, honouring its padding mode
    # (checked on torch 2.13 and 2.14; tests/test_torch_private_api.py).
    return module._conv_forward(x, weight, bias)  # type: ignore[operator]


_TRANSPOSED = {
    nn.ConvTranspose1d: F.conv_transpose1d,
    nn.ConvTranspose2d: F.conv_transpose2d,
    nn.ConvTranspose3d: F.conv_transpose3d,
}


def _conv_transpose(
    module: nn.Module, x: Tensor, weight: Tensor, bias: Tensor | None, output: Tensor
) -> Tensor:
    # The output size the module produced pins the output padding (it may have been given).
    # _output_padding is private: checked on torch 2.13 and 2.14; tests/test_torch_private_api.py.
    dims = len(module.kernel_size)  # type: ignore[arg-type]
    padding = module._output_padding(  # type: ignore[operator]
        x,
        list(output.shape[-dims:]),
        module.stride,
        module.padding,
        module.kernel_size,
        dims,
        module.dilation,
    )
    return _TRANSPOSED[type(module)](
        x, weight, bias, module.stride, module.padding, padding, module.groups, module.dilation
    )


def _batch_norm(
    module: nn.modules.batchnorm._BatchNorm,
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    _: Tensor,
) -> Tensor:
    # Batch statistics exactly when the module used them; the running ones are never updated.
    batch_stats = module.training or module.running_mean is None
    return F.batch_norm(
        x,
        None if batch_stats else module.running_mean,
        None if batch_stats else module.running_var,
        weight,
        bias,
        batch_stats,
        0.0,
        module.eps,
    )


def map_type(module: nn.Module) -> type:
    """The class whose map the module computes: for a module parametrized with
    torch.nn.utils.parametrize, the class it had (parametrize swaps in a subclass of it whose
    weight is a property)."""
    kind = type(module)
    return kind.__bases__[0] if parametrize.is_parametrized(module) else kind


# How to recompute each module type with other (detached) weights and bias.
MODIFIED_FORWARDS: dict[type, Callable[..., Tensor]] = {
    nn.Linear: _linear,
    nn.Conv1d: _conv,
    nn.Conv2d: _conv,
    nn.Conv3d: _conv,
    **{kind: _conv_transpose for kind in _TRANSPOSED},
    nn.BatchNorm1d: _batch_norm,
    nn.BatchNorm2d: _batch_norm,
    nn.BatchNorm3d: _batch_norm,
}

_BATCH_NORMS = nn.modules.batchnorm._BatchNorm

# The private bases (_ConvNd, _AvgPoolNd, ..., _DropoutNd) cover every public subclass
# (checked on torch 2.13 and 2.14; tests/test_torch_private_api.py fails if one moves).
_EPSILON_TYPES = (
    nn.Linear,
    nn.modules.conv._ConvNd,
    nn.modules.pooling._AvgPoolNd,
    nn.modules.pooling._MaxPoolNd,
    nn.modules.pooling._AdaptiveAvgPoolNd,
    nn.modules.pooling._AdaptiveMaxPoolNd,
    nn.modules.batchnorm._BatchNorm,
    nn.Upsample,
)

_PASS_TYPES = (
    nn.ReLU,
    nn.ReLU6,
    nn.LeakyReLU,
    nn.PReLU,
    nn.RReLU,
    nn.ELU,
    nn.SELU,
    nn.CELU,
    nn.GELU,
    nn.SiLU,
    nn.Mish,
    nn.Sigmoid,
    nn.Tanh,
    nn.Softplus,
    nn.Softsign,
    nn.Hardtanh,
    nn.Hardswish,
    nn.Hardsigmoid,
    nn.modules.dropout._DropoutNd,
)

# captum passes relevance straight through these whatever rule is set on them.
RULES_IGNORED_ON = (nn.ReLU, nn.Dropout, nn.Tanh)

# Pure reshapes: their own backward already hands the relevance through unchanged. An empty
# nn.Sequential is the identity (torchvision's ShuffleNet keeps one as the unused branch of its
# stride-1 blocks).
STRUCTURAL_TYPES = (nn.Identity, nn.Flatten, nn.Unflatten, nn.Sequential)


def _is_stochastic_depth(module: nn.Module) -> bool:
    # torchvision's row-wise dropout of residual branches (EfficientNet, ConvNeXt, Swin, MaxViT):
    # the identity in eval mode, a per-example scaling in training mode.
    kind = type(module)
    return kind.__name__ == "StochasticDepth" and kind.__module__.startswith("torchvision.")


def _is_captum_addition(module: nn.Module) -> bool:
    # captum's stand-in for `+`, found in models prepared for captum's LRP.
    kind = type(module)
    return kind.__name__ == "Addition_Module" and kind.__module__.startswith("captum.")


def default_rule(module: nn.Module) -> PropagationRule | None:
    """The rule a module without submodules gets when none is set.

    Args:
        module: Any module.

    Returns:
        Epsilon for linear maps, convolutions, pooling, batch norm, upsampling and captum's
        ``Addition_Module``; pass-through for element-wise activations and dropout (torchvision's
        ``StochasticDepth`` too); None otherwise.
    """
    if isinstance(module, _EPSILON_TYPES) or _is_captum_addition(module):
        return EpsilonRule()
    if isinstance(module, _PASS_TYPES) or _is_stochastic_depth(module):
        return PassRule()
    return None


_CAPTUM_RULES = ("IdentityRule", "EpsilonRule", "GammaRule", "Alpha1_Beta0_Rule")


def as_rule(rule: object, where: str) -> PropagationRule:
    """``rule`` as a fastattr rule; captum's rule objects are translated, keeping their
    parameters, so that models prepared for captum run unchanged."""
    if isinstance(rule, PropagationRule):
        return rule
    kind = type(rule)
    if kind.__module__.startswith("captum.") and kind.__name__ in _CAPTUM_RULES:
        name = kind.__name__
        if name == "IdentityRule":
            return IdentityRule()
        if name == "EpsilonRule":
            return EpsilonRule(rule.STABILITY_FACTOR)  # type: ignore[attr-defined]
        if name == "GammaRule":
            return GammaRule(rule.gamma, rule.set_bias_to_zero)  # type: ignore[attr-defined]
        return Alpha1_Beta0_Rule(rule.set_bias_to_zero)  # type: ignore[attr-defined]
    raise TypeError(
        f"{where}.rule must be an LRP rule (a PropagationRule such as EpsilonRule, GammaRule, "
        f"Alpha1_Beta0_Rule, IdentityRule) or None, got {kind.__name__}"
    )


__all__ = [
    "AlphaBetaRule",
    "Alpha1_Beta0_Rule",
    "EpsilonRule",
    "EpsilonSumRule",
    "FlatRule",
    "GammaRule",
    "GeneralizedGammaRule",
    "IdentityRule",
    "ModifiedWeightRule",
    "OpRule",
    "PropagationRule",
    "RatioRule",
    "RecomputedRatioRule",
    "RecomputingRule",
    "WSquareRule",
    "ZBoxRule",
    "ZPlusRule",
    "default_rule",
]
