"""LRP rules: small objects that each know how to send relevance through one module.

Set one on a module as ``module.rule = EpsilonRule(epsilon=1e-6)`` (captum's convention); modules
without one get the default of their type ([default_rule][fastattr.lrp.rules.default_rule]). A
rule never changes the module: rules with modified weights compute them on the fly from detached
parameters.
"""

from __future__ import annotations

import math
import numbers
from abc import ABC, abstractmethod

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastattr import ops

# captum's stabilizer for the rules that take no epsilon.
STABILIZER = 1e-9


class PropagationRule(ABC):
    """How relevance crosses one module.

    ``relevance_at_input`` says whether the module's tensor inputs receive ``input *
    contribution`` (every rule but the pass-through ones); ``propagate`` wraps the module's
    output so that the backward applies the rule.
    """

    relevance_at_input: bool = True

    def unsupported_reason(self, module: nn.Module) -> str | None:
        """Why this rule cannot run on ``module``, or None when it can.

        Args:
            module: The module the rule is set on.
        """
        return None

    @abstractmethod
    def propagate(self, module: nn.Module, inputs: tuple, output: Tensor, copy: bool) -> Tensor:
        """The output the model continues with, carrying this rule's backward.

        Args:
            module: The module the rule is set on.
            inputs: The module's positional inputs in this forward.
            output: The module's output.
            copy: Hand out a copy of the output rather than a view of it (a later in-place
                change of the output must not reach the rule's saved values).
        """


def ratio_node(
    nodes: ops.LrpNodes, z: Tensor, output: Tensor, epsilon: float, copy: bool
) -> Tensor:
    """``output`` to continue with, whose backward divides the relevance by ``z + epsilon *
    sign(z)`` and sends it into ``z``'s graph."""
    return nodes.ratio(z, None if z is output else output.detach(), epsilon, copy)


class RatioRule(PropagationRule):
    """A rule whose backward starts with the epsilon ratio at ``z``, the output or a
    recomputation of it; a product at the next module's input can then fold into that ratio."""

    @abstractmethod
    def ratio_operands(
        self, module: nn.Module, inputs: tuple, output: Tensor
    ) -> tuple[Tensor, float]:
        """``(z, epsilon)``: the tensor whose graph receives the relevance, and the stabilizer.

        Args:
            module: The module the rule is set on.
            inputs: The module's positional inputs in this forward.
            output: The module's output.
        """

    def propagate(self, module: nn.Module, inputs: tuple, output: Tensor, copy: bool) -> Tensor:
        z, epsilon = self.ratio_operands(module, inputs, output)
        return ratio_node(ops.lrp_nodes(), z, output, epsilon, copy)


class EpsilonRule(RatioRule):
    """LRP-epsilon: ``R_in = x * J^T (R_out / (z + epsilon * sign(z)))``, with ``sign(0) = 1``.

    The default for linear maps, convolutions, pooling, batch norm, upsampling and residual
    additions.

    Args:
        epsilon: The stabilizer, finite and non-negative.

    Raises:
        TypeError: ``epsilon`` is not a real number.
        ValueError: ``epsilon`` is negative or not finite.
    """

    def __init__(self, epsilon: float = 1e-9) -> None:
        if not isinstance(epsilon, numbers.Real) or isinstance(epsilon, bool):
            raise TypeError(f"epsilon must be a real number, got {type(epsilon).__name__}")
        if not (math.isfinite(epsilon) and epsilon >= 0):
            raise ValueError(f"epsilon must be finite and non-negative, got {epsilon}")
        self.epsilon = float(epsilon)

    def ratio_operands(
        self, module: nn.Module, inputs: tuple, output: Tensor
    ) -> tuple[Tensor, float]:
        return output, self.epsilon

    def __repr__(self) -> str:
        return f"EpsilonRule(epsilon={self.epsilon})"


def _check_flag(value: object, name: str) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
    return value


class _ModifiedWeightRule(RatioRule):
    """Epsilon with a stabilizer of 1e-9 on ``z' = module(x; modified weight, bias)``; the
    model continues on the true output."""

    def __init__(self, set_bias_to_zero: bool) -> None:
        self.set_bias_to_zero = _check_flag(set_bias_to_zero, "set_bias_to_zero")

    @abstractmethod
    def modify_weight(self, weight: Tensor) -> Tensor:
        """The weight the rule's ``z`` is computed with.

        Args:
            weight: The module's weight, detached.
        """

    def _changes(self, module: nn.Module) -> bool:
        has_bias = getattr(module, "bias", None) is not None
        return getattr(module, "weight", None) is not None or (self.set_bias_to_zero and has_bias)

    def unsupported_reason(self, module: nn.Module) -> str | None:
        if self._changes(module) and type(module) not in _MODIFIED_FORWARDS:
            name = type(module).__name__
            return f"{type(self).__name__} cannot recompute {name} with modified weights"
        return None

    def ratio_operands(
        self, module: nn.Module, inputs: tuple, output: Tensor
    ) -> tuple[Tensor, float]:
        if not self._changes(module):
            return output, STABILIZER
        weight = module.weight
        if weight is not None:
            weight = self.modify_weight(weight.detach())
        bias = module.bias
        if bias is not None:
            bias = torch.zeros_like(bias) if self.set_bias_to_zero else bias.detach()
        modified = _MODIFIED_FORWARDS[type(module)](module, inputs[0], weight, bias, output)
        return modified, STABILIZER


class GammaRule(_ModifiedWeightRule):
    """LRP-gamma as captum defines it: epsilon (1e-9) on the module with its weight replaced by
    ``w + gamma * max(w, 0)``, and its bias by zero if ``set_bias_to_zero``.

    Args:
        gamma: How much the positive weights are boosted; finite.
        set_bias_to_zero: Compute ``z`` without the bias.

    Raises:
        TypeError: ``gamma`` is not a real number, or ``set_bias_to_zero`` not a bool.
        ValueError: ``gamma`` is not finite.
    """

    def __init__(self, gamma: float = 0.25, set_bias_to_zero: bool = False) -> None:
        if not isinstance(gamma, numbers.Real) or isinstance(gamma, bool):
            raise TypeError(f"gamma must be a real number, got {type(gamma).__name__}")
        if not math.isfinite(gamma):
            raise ValueError(f"gamma must be finite, got {gamma}")
        super().__init__(set_bias_to_zero)
        self.gamma = float(gamma)

    def modify_weight(self, weight: Tensor) -> Tensor:
        return weight + self.gamma * weight.clamp(min=0)

    def __repr__(self) -> str:
        return f"GammaRule(gamma={self.gamma}, set_bias_to_zero={self.set_bias_to_zero})"


class Alpha1_Beta0_Rule(_ModifiedWeightRule):  # captum's name
    """LRP-alpha1-beta0 as captum defines it: epsilon (1e-9) on the module with its weight
    replaced by ``max(w, 0)``, and its bias by zero if ``set_bias_to_zero``.

    Args:
        set_bias_to_zero: Compute ``z`` without the bias.

    Raises:
        TypeError: ``set_bias_to_zero`` is not a bool.
    """

    def __init__(self, set_bias_to_zero: bool = False) -> None:
        super().__init__(set_bias_to_zero)

    def modify_weight(self, weight: Tensor) -> Tensor:
        return weight.clamp(min=0)

    def __repr__(self) -> str:
        return f"Alpha1_Beta0_Rule(set_bias_to_zero={self.set_bias_to_zero})"


class IdentityRule(PropagationRule):
    """The relevance at the output, unchanged, at the (single, same-shaped) input."""

    relevance_at_input = False

    def propagate(self, module: nn.Module, inputs: tuple, output: Tensor, copy: bool) -> Tensor:
        return ops.lrp_pass_node(self.source(module, inputs, output), output.detach(), copy)

    def source(self, module: nn.Module, inputs: tuple, output: Tensor) -> Tensor:
        """The input that receives the output's relevance: the module's one tensor input.

        Args:
            module: The module the rule is set on.
            inputs: The module's positional inputs in this forward.
            output: The module's output.

        Raises:
            ValueError: The module has not exactly one tensor input of the output's shape.
        """
        if len(inputs) == 1 and isinstance(inputs[0], Tensor) and inputs[0].shape == output.shape:
            return inputs[0]  # the common case, checked without building the list below
        tensors = [x for x in inputs if isinstance(x, Tensor)]
        if len(tensors) != 1 or not isinstance(output, Tensor) or tensors[0].shape != output.shape:
            raise ValueError(
                f"{self!r} on {type(module).__name__} needs one input of the output's shape, got "
                f"inputs of shapes {[list(x.shape) for x in tensors]} and output of shape "
                f"{list(output.shape) if isinstance(output, Tensor) else type(output).__name__}"
            )
        return tensors[0]

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class PassRule(IdentityRule):
    """The default of element-wise activations and dropout: relevance passes through."""


def _linear(module: nn.Linear, x: Tensor, weight: Tensor, bias: Tensor | None, _: Tensor) -> Tensor:
    return F.linear(x, weight, bias)


def _conv(module: nn.Module, x: Tensor, weight: Tensor, bias: Tensor | None, _: Tensor) -> Tensor:
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


_MODIFIED_FORWARDS = {
    nn.Linear: _linear,
    nn.Conv1d: _conv,
    nn.Conv2d: _conv,
    nn.Conv3d: _conv,
    **{kind: _conv_transpose for kind in _TRANSPOSED},
    nn.BatchNorm1d: _batch_norm,
    nn.BatchNorm2d: _batch_norm,
    nn.BatchNorm3d: _batch_norm,
}

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

# Pure reshapes: their own backward already hands the relevance through unchanged.
STRUCTURAL_TYPES = (nn.Identity, nn.Flatten, nn.Unflatten, nn.Sequential, nn.ModuleList)


def _is_captum_addition(module: nn.Module) -> bool:
    # captum's stand-in for `+`, found in models prepared for captum's LRP.
    kind = type(module)
    return kind.__name__ == "Addition_Module" and kind.__module__.startswith("captum.")


def default_rule(module: nn.Module) -> PropagationRule | None:
    """The rule a module gets when none is set, or None when its type has no default.

    Args:
        module: Any module.
    """
    if isinstance(module, _EPSILON_TYPES) or _is_captum_addition(module):
        return EpsilonRule()
    if isinstance(module, _PASS_TYPES):
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
        f"{where}.rule must be an LRP rule (EpsilonRule, GammaRule, Alpha1_Beta0_Rule, "
        f"IdentityRule) or None, got {kind.__name__}"
    )


__all__ = [
    "Alpha1_Beta0_Rule",
    "EpsilonRule",
    "GammaRule",
    "IdentityRule",
    "PropagationRule",
    "default_rule",
]
