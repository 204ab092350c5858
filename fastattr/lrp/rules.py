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
from collections.abc import Callable
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
    ) -> tuple[Tensor, float]:
        """``(z, epsilon)``: the tensor whose graph receives the relevance, and the stabilizer.

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


class EpsilonRule(RatioRule):
    """LRP-epsilon: ``R_in = x * J^T (R_out / (z + epsilon * sign(z)))``, with ``sign(0) = 1``.

    The default for linear maps, convolutions, pooling, batch norm and upsampling.

    Args:
        epsilon: The stabilizer, finite and non-negative.

    Raises:
        TypeError: ``epsilon`` is not a real number.
        ValueError: ``epsilon`` is negative or not finite.

    Examples:
        >>> import torch
        >>> from torch import nn
        >>> from fastattr import LRP, EpsilonRule
        >>> model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
        >>> model[0].rule = EpsilonRule(epsilon=0.25)
        >>> LRP(model).attribute(torch.randn(5, 4), target=1).shape
        torch.Size([5, 4])
    """

    def __init__(self, epsilon: float = 1e-9) -> None:
        self.epsilon = _check_epsilon(epsilon)

    def ratio_operands(
        self, module: nn.Module, inputs: tuple, output: Tensor
    ) -> tuple[Tensor, float]:
        """``(output, epsilon)``.

        Args:
            module: The module the rule is set on.
            inputs: The inputs the module ran on.
            output: The module's output.

        Returns:
            The output itself and the rule's epsilon.
        """
        return output, self.epsilon

    def __repr__(self) -> str:
        return f"EpsilonRule(epsilon={self.epsilon})"


def _check_flag(value: object, name: str) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
    return value


class ModifiedWeightRule(RatioRule):
    """Epsilon with a stabilizer of 1e-9 on ``z' = module(x; modified weight, bias)``, as
    captum's rules with modified weights; the model continues on the true output.

    Args:
        set_bias_to_zero: Compute ``z'`` without the bias.

    Raises:
        TypeError: ``set_bias_to_zero`` is not a bool.
    """

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

    def unsupported_reason(self, module: nn.Module) -> str | None:
        """Why the rule cannot recompute ``module``: its type has no known map.

        Args:
            module: The module the rule is set on.

        Returns:
            A reason, or None when the module can be recomputed (or need not be).
        """
        if self.changes(module) and _map_type(module) not in MODIFIED_FORWARDS:
            name = type(module).__name__
            return f"{type(self).__name__} cannot recompute {name} with modified weights"
        return None

    def modified_z(
        self,
        module: nn.Module,
        x: Tensor,
        weight: Tensor | None,
        bias: Tensor | None,
        output: Tensor,
    ) -> Tensor:
        """``z'``: ``module``'s map with the weight modified and the bias zeroed if asked.

        Args:
            module: The module whose map is recomputed.
            x: Its input (in the graph the relevance goes into).
            weight: The (detached) weight to modify and use in place of the module's own.
            bias: The (detached) bias to use, or None.
            output: The module's output (its shape pins transposed convolutions' padding).

        Returns:
            The recomputed output.
        """
        if weight is not None:
            weight = self.modify_weight(weight)
        if bias is not None and self.set_bias_to_zero:
            bias = torch.zeros_like(bias)
        return MODIFIED_FORWARDS[_map_type(module)](module, x, weight, bias, output)

    def ratio_operands(
        self, module: nn.Module, inputs: tuple, output: Tensor
    ) -> tuple[Tensor, float]:
        """``(z', 1e-9)``, ``z'`` recomputed with the modified weight.

        Args:
            module: The module the rule is set on.
            inputs: The inputs the module ran on.
            output: The module's output.

        Returns:
            ``z'`` (the output itself when nothing changes) and captum's stabilizer.
        """
        if not self.changes(module):
            return output, STABILIZER
        weight = None if module.weight is None else module.weight.detach()
        bias = None if module.bias is None else module.bias.detach()
        return self.modified_z(module, inputs[0], weight, bias, output), STABILIZER


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
        epsilon: The stabilizer.
        rebind_in_place: For ``a += b``, return the sum as a new tensor instead of writing it
            into ``a`` (only where the code is known to rebind ``a``, as torchvision's residual
            blocks do).
        scope: When given, the rule takes only sums computed directly in the forward of a
            module for which ``scope(module)`` holds.

    Raises:
        TypeError: ``epsilon`` is not a real number.
        ValueError: ``epsilon`` is negative or not finite.
    """

    functions = (torch.Tensor.add, torch.add, torch.Tensor.add_)

    def __init__(
        self,
        epsilon: float = STABILIZER,
        rebind_in_place: bool = False,
        scope: Callable[[nn.Module], bool] | None = None,
    ) -> None:
        self.epsilon = _check_epsilon(epsilon)
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


def _map_type(module: nn.Module) -> type:
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
    "Alpha1_Beta0_Rule",
    "EpsilonRule",
    "EpsilonSumRule",
    "GammaRule",
    "IdentityRule",
    "ModifiedWeightRule",
    "OpRule",
    "PropagationRule",
    "RatioRule",
    "default_rule",
]
