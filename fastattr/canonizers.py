"""Canonizers: named, explicit changes to how LRP reads a model, as zennit has them.

Pass them to ``LRP(model, canonizers=[...])`` or ``LayerLRP(model, layer, canonizers=[...])``.
They act for that object's calls only and never touch the model: a canonizer changes the rules
LRP applies ([module_rule][fastattr.canonizers.Canonizer.module_rule]) and adds rules for
torch-level calls ([op_rules][fastattr.canonizers.Canonizer.op_rules]), decided per call from
the data flow the call shows. Without a canonizer, LRP's numbers are captum's.

- [EpsilonSum][fastattr.canonizers.EpsilonSum]: ``a + b`` / ``torch.add`` / ``a += b`` of two
  activations gets the epsilon rule of a sum instead of plain autograd, which copies the
  relevance into both branches. A parameter or a constant added to an activation is a bias,
  not a branch, and is left alone.
- [MergeBatchNorm][fastattr.canonizers.MergeBatchNorm]: a batch norm (using running
  statistics) that receives a linear or convolution module's output is merged into it: the
  rule of the linear module applies to the composite affine map, with its ratio at the batch
  norm's output.
- [ResNetCanonizer][fastattr.canonizers.ResNetCanonizer]: ``MergeBatchNorm``, and the epsilon
  rule on the residual sum of torchvision's ``BasicBlock`` and ``Bottleneck``, as zennit's
  ``ResNetCanonizer``.
- [EpsilonPlus][fastattr.canonizers.EpsilonPlus],
  [EpsilonPlusFlat][fastattr.canonizers.EpsilonPlusFlat],
  [EpsilonAlpha2Beta1][fastattr.canonizers.EpsilonAlpha2Beta1],
  [EpsilonAlpha2Beta1Flat][fastattr.canonizers.EpsilonAlpha2Beta1Flat],
  [EpsilonGammaBox][fastattr.canonizers.EpsilonGammaBox]: zennit's composites of the same
  names, rules by module type and for the first layer.
- [AttnLRP][fastattr.canonizers.AttnLRP]: the rules of AttnLRP for transformers (layer norm,
  softmax, attention, gated products, residual sums), as lxt applies them.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Sequence
from itertools import pairwise

import torch
from torch import Tensor, nn

from fastattr.lrp.attention import build_op_rules, transformer_module_rule
from fastattr.lrp.propagation import Relevance
from fastattr.lrp.rules import (
    MODIFIED_FORWARDS,
    STABILIZER,
    ZENNIT_STABILIZER,
    AlphaBetaRule,
    EpsilonRule,
    EpsilonSumRule,
    FlatRule,
    GeneralizedGammaRule,
    ModifiedWeightRule,
    OpRule,
    PassRule,
    PropagationRule,
    RatioRule,
    RecomputedRatioRule,
    RecomputingRule,
    Stabilizer,
    ZBoxRule,
    ZeroParams,
    ZPlusRule,
    check_stabilizer,
    map_type,
    zero_params_repr,
)


class Canonizer:
    """How LRP reads a model for the calls of one LRP object: override either method.

    The base changes nothing.
    """

    def module_rule(
        self, module: nn.Module, rule: PropagationRule | None
    ) -> PropagationRule | None:
        """The rule ``module`` gets with this canonizer.

        Args:
            module: A module of the model that carries a rule.
            rule: The rule it has without this canonizer.

        Returns:
            The rule to use; by default ``rule``.
        """
        return rule

    def wrap_rule(self, module: nn.Module, rule: PropagationRule | None) -> PropagationRule | None:
        """The rule ``module`` runs, from the rule every canonizer's
        [module_rule][fastattr.canonizers.Canonizer.module_rule] chose: asked after them all,
        so that a wrapper wraps whichever rule a canonizer chose, before or after it in
        ``canonizers`` ([MergeBatchNorm][fastattr.canonizers.MergeBatchNorm] wraps batch
        norms' rules here in one that merges).

        Args:
            module: A module of the model that carries a rule.
            rule: The rule the canonizers chose.

        Returns:
            The rule to run; by default ``rule``.
        """
        return rule

    def op_rules(self) -> Sequence[OpRule]:
        """Rules for torch-level calls outside the modules that carry a rule.

        Returns:
            The op rules; by default none.
        """
        return ()

    def for_model(self, model: nn.Module) -> Canonizer:
        """The canonizer as it applies to ``model``, asked once each time LRP plans the rules
        (a composite finds the model's first layer here).

        Args:
            model: The model LRP runs.

        Returns:
            The canonizer whose methods LRP calls for this plan; by default itself.
        """
        return self

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class EpsilonSum(Canonizer):
    """The epsilon rule on sums of two activations (``a + b``, ``torch.add``, ``a += b``),
    wherever the forward computes them outside a module with a rule of its own.

    Args:
        epsilon: The stabilizer of the sum's ratio, or a callable that returns the stabilized
            sum (as zennit's ``Norm`` takes it).

    Raises:
        TypeError: ``epsilon`` is neither a real number nor a callable.
        ValueError: ``epsilon`` is negative or not finite.

    Examples:
        >>> import torch
        >>> from torch import nn
        >>> from fastattr import LRP
        >>> from fastattr.canonizers import EpsilonSum
        >>> class Residual(nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.fc = nn.Linear(4, 4)
        ...         self.head = nn.Linear(4, 2)
        ...     def forward(self, x):
        ...         return self.head(self.fc(x) + x)
        >>> lrp = LRP(Residual(), canonizers=[EpsilonSum()])
        >>> lrp.attribute(torch.randn(3, 4), target=0).shape
        torch.Size([3, 4])
    """

    def __init__(self, epsilon: Stabilizer = STABILIZER) -> None:
        self._rule = EpsilonSumRule(epsilon)

    @property
    def epsilon(self) -> Stabilizer:
        """The stabilizer of the sum's ratio."""
        return self._rule.epsilon

    def op_rules(self) -> Sequence[OpRule]:
        """The epsilon sum rule.

        Returns:
            One [EpsilonSumRule][fastattr.lrp.EpsilonSumRule].
        """
        return (self._rule,)

    def __repr__(self) -> str:
        return f"EpsilonSum(epsilon={self.epsilon})"


# _ConvNd and _BatchNorm are torch's private bases of every convolution and batch norm
# (checked on torch 2.13 and 2.14; tests/test_torch_private_api.py fails if one moves).
_LINEAR = (nn.Linear, nn.modules.conv._ConvNd)


def _merged_parameters(linear: nn.Module, norm: nn.modules.batchnorm._BatchNorm) -> tuple:
    """The weight and bias of ``norm(linear(x))`` as one affine map, from detached parameters
    and the running statistics."""
    weight = linear.weight.detach()
    scale = torch.rsqrt(norm.running_var.detach() + norm.eps)
    if norm.weight is not None:
        scale = scale * norm.weight.detach()
    bias = -norm.running_mean.detach()
    if linear.bias is not None:
        bias = bias + linear.bias.detach()
    bias = bias * scale
    if norm.bias is not None:
        bias = bias + norm.bias.detach()
    # Output channels are dimension 0 of the weight, 1 for transposed convolutions.
    channel = 1 if getattr(linear, "transposed", False) else 0
    shape = [1] * weight.dim()
    shape[channel] = -1
    return weight * scale.reshape(shape).to(weight.dtype), bias.to(weight.dtype)


def _layers(module: nn.Module) -> Iterator[nn.Module]:
    """The modules without submodules under ``module``, depth first in registration order (the
    order of zennit's pairing), a linear module counting as one (a parametrized weight's
    modules are its own)."""
    children = list(module.children())
    if isinstance(module, _LINEAR) or not children:
        yield module
        return
    for child in children:
        yield from _layers(child)


def _recomputes(module: nn.Module, rule: PropagationRule | None) -> bool:
    """Whether ``rule`` recomputes ``module``'s map (zennit's rules, captum's with modified
    weights, epsilon with ``zero_params``): work that a batch norm merging into the module
    would do again."""
    if isinstance(rule, RecomputedRatioRule):
        return rule.changes(module)
    return isinstance(rule, RecomputingRule)


def _recomputes_merged(linear: nn.Module, rule: PropagationRule) -> bool:
    """Whether ``rule``, an epsilon-type rule, recomputes the map of ``linear`` merged with a
    batch norm: a map that has a bias even where ``linear`` has none (as after zennit's merge),
    which epsilon's ``zero_params`` may zero."""
    if isinstance(rule, ModifiedWeightRule):
        return rule.changes(linear)
    return isinstance(rule, EpsilonRule) and bool(rule.zero_params)


class _HeldForMergeRule(PropagationRule):
    """The rule of a linear module registered just before a batch norm, under
    ``MergeBatchNorm``: ``rule``, except that the module's output is held for the batch norm
    to merge (see [held_for_merge][fastattr.lrp.Relevance.held_for_merge]), so that ``rule``
    recomputes the map once, merged, rather than also on the module's own map."""

    def __init__(self, rule: PropagationRule) -> None:
        self.rule = rule

    def unsupported_reason(self, module: nn.Module) -> str | None:
        return self.rule.unsupported_reason(module)

    def forward_inputs(self, relevance: Relevance, module: nn.Module, inputs: tuple) -> tuple:
        return self.rule.forward_inputs(relevance, module, inputs)

    def forward_output(
        self, relevance: Relevance, module: nn.Module, inputs: tuple, output: Tensor
    ) -> Tensor:
        held = relevance.held_for_merge(output, module)
        if held is None:
            return self.rule.forward_output(relevance, module, inputs, output)
        return held

    def __repr__(self) -> str:
        return repr(self.rule)


def _own_rule(rule: PropagationRule | None) -> PropagationRule | None:
    return rule.rule if isinstance(rule, _HeldForMergeRule) else rule


class _MergedBatchNormRule(PropagationRule):
    """A batch norm's rule under ``MergeBatchNorm``: when its input is the output of a
    linear module whose rule is an epsilon-type rule or a rule that recomputes it, that rule on
    the merged affine map (for the epsilon rule, relevance through the batch norm's and the
    linear module's own backward; the ratio at the batch norm's output); otherwise ``own``,
    the rule it has without the canonizer."""

    def __init__(self, own: PropagationRule) -> None:
        self.own = own

    def unsupported_reason(self, module: nn.Module) -> str | None:
        # The batch norm's own rule runs wherever it does not merge.
        return self.own.unsupported_reason(module)

    def _producer(self, relevance: Relevance, module: nn.Module, x: object):
        found = relevance.rule_output(x)
        if (
            found is None
            or not isinstance(found.module, _LINEAR)
            or not isinstance(_own_rule(found.rule), (RatioRule, RecomputingRule))
            or module.training
            or module.running_mean is None
        ):
            return None
        return found

    def forward_inputs(self, relevance: Relevance, module: nn.Module, inputs: tuple) -> tuple:
        # Merging: the linear module's own output, past its rule's nodes.
        found = self._producer(relevance, module, inputs[0]) if len(inputs) == 1 else None
        if found is None:
            return self.own.forward_inputs(relevance, module, inputs)
        return (found.raw,)

    def forward_output(
        self, relevance: Relevance, module: nn.Module, inputs: tuple, output: Tensor
    ) -> Tensor:
        found = relevance.raw_output(inputs[0])
        if found is None:
            return self.own.forward_output(relevance, module, inputs, output)
        result = self._merged(relevance, module, found, output)
        relevance.merged(module, found.module, result)
        return result

    def _merged(self, relevance: Relevance, module: nn.Module, found, output: Tensor) -> Tensor:
        linear, rule = found.module, _own_rule(found.rule)
        if isinstance(rule, RecomputingRule):
            weight, bias = _merged_parameters(linear, module)
            return rule.output_with(relevance, linear, found.inputs[0], weight, bias, output)
        if _recomputes_merged(linear, rule):
            weight, bias = _merged_parameters(linear, module)
            z = rule.modified_z(linear, found.inputs[0], weight, bias, output)
            return relevance.ratio(z, output, rule.epsilon)
        _, epsilon = rule.ratio_operands(linear, found.inputs, found.raw)
        return relevance.ratio(output, output, epsilon)

    def __repr__(self) -> str:
        return f"MergedBatchNorm({self.own!r})"


class MergeBatchNorm(Canonizer):
    """Batch norms merged into the linear or convolution module whose output they receive, as
    zennit's ``SequentialMergeBatchNorm`` does, but read off the data flow of each call (a
    batch norm that receives anything else keeps its own rule). Only batch norms that
    normalize with running statistics (eval mode) are merged. The linear module's rule (an
    epsilon-type rule, or one of zennit's) then runs on the merged map; LayerLRP reads the
    linear module's output, and the merged batch norm's input and output, after the batch norm.

    Examples:
        >>> import torch
        >>> from torch import nn
        >>> from fastattr import LRP
        >>> from fastattr.canonizers import MergeBatchNorm
        >>> model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(),
        ...                       nn.Flatten(), nn.Linear(16, 2)).eval()
        >>> LRP(model, canonizers=[MergeBatchNorm()]).attribute(
        ...     torch.randn(2, 3, 4, 4), target=1).shape
        torch.Size([2, 3, 4, 4])
    """

    def __init__(self) -> None:
        # The linear modules registered just before a batch norm (see for_model).
        self._before_norm: frozenset[int] = frozenset()

    def for_model(self, model: nn.Module) -> Canonizer:
        """The canonizer with the linear modules of ``model`` registered just before a batch
        norm found (among the modules without submodules, depth first, as zennit's
        ``SequentialMergeBatchNorm`` pairs them): likely merged into, their rules wait for
        the batch norm where they recompute the map (see
        [wrap_rule][fastattr.canonizers.MergeBatchNorm.wrap_rule]).

        Args:
            model: The model LRP runs.

        Returns:
            A copy that knows those modules.
        """
        bound = copy.copy(self)
        bound._before_norm = frozenset(
            id(module)
            for module, after in pairwise(_layers(model))
            if isinstance(module, _LINEAR) and isinstance(after, nn.modules.batchnorm._BatchNorm)
        )
        return bound

    def wrap_rule(self, module: nn.Module, rule: PropagationRule | None) -> PropagationRule | None:
        """A batch norm's rule (whichever the canonizers chose), wrapped so that it merges
        into the linear module before it; and the rule of a linear module registered just
        before a batch norm, where it recomputes the module's map (zennit's rules, captum's
        with modified weights), wrapped so that the module's output waits for the merge,
        which then recomputes the merged map alone. (Where no batch norm merges it after
        all, the call runs again with the rule as it is, and so do later calls.)

        Args:
            module: A module of the model that carries a rule.
            rule: The rule the canonizers chose.

        Returns:
            The rule to run.
        """
        if rule is not None and isinstance(module, nn.modules.batchnorm._BatchNorm):
            return _MergedBatchNormRule(rule)
        if id(module) in self._before_norm and _recomputes(module, rule):
            return _HeldForMergeRule(rule)
        return rule


def _is_torchvision_block(module: nn.Module | None) -> bool:
    """A torchvision ``BasicBlock`` or ``Bottleneck`` running its own, unchanged forward (which
    rebinds ``out`` after ``out += identity``)."""
    if module is None or "forward" in module.__dict__:
        return False
    kind = type(module)
    if kind.__module__ != "torchvision.models.resnet" or kind.__name__ not in (
        "BasicBlock",
        "Bottleneck",
    ):
        return False
    from torchvision.models import resnet

    return kind.forward in (resnet.BasicBlock.forward, resnet.Bottleneck.forward)


class ResNetCanonizer(Canonizer):
    """For torchvision's ResNets: [MergeBatchNorm][fastattr.canonizers.MergeBatchNorm], and
    the epsilon rule on the residual sum of each ``BasicBlock`` and ``Bottleneck``, as zennit's
    ``ResNetCanonizer``.

    Args:
        epsilon: The stabilizer of the residual sums' ratio, or a callable that returns the
            stabilized sum (as zennit's ``Norm`` takes it).

    Raises:
        TypeError: ``epsilon`` is neither a real number nor a callable.
        ValueError: ``epsilon`` is negative or not finite.

    Examples:
        >>> import torch
        >>> from torchvision.models import resnet18
        >>> from fastattr import LRP
        >>> from fastattr.canonizers import ResNetCanonizer
        >>> model = resnet18(weights=None).eval()
        >>> lrp = LRP(model, canonizers=[ResNetCanonizer()])
        >>> lrp.attribute(torch.randn(1, 3, 32, 32), target=3).shape
        torch.Size([1, 3, 32, 32])
    """

    def __init__(self, epsilon: Stabilizer = STABILIZER) -> None:
        self._merge = MergeBatchNorm()
        # torchvision's blocks rebind `out` after `out += identity`: the sum may be a new tensor.
        self._sum = EpsilonSumRule(epsilon, rebind_in_place=True, scope=_is_torchvision_block)

    def for_model(self, model: nn.Module) -> Canonizer:
        """As [MergeBatchNorm][fastattr.canonizers.MergeBatchNorm]'s.

        Args:
            model: The model LRP runs.

        Returns:
            A copy that merges as ``MergeBatchNorm`` does on ``model``.
        """
        bound = copy.copy(self)
        bound._merge = self._merge.for_model(model)
        return bound

    def wrap_rule(self, module: nn.Module, rule: PropagationRule | None) -> PropagationRule | None:
        """As [MergeBatchNorm][fastattr.canonizers.MergeBatchNorm]'s.

        Args:
            module: A module of the model that carries a rule.
            rule: The rule the canonizers chose.

        Returns:
            The rule to run.
        """
        return self._merge.wrap_rule(module, rule)

    def op_rules(self) -> Sequence[OpRule]:
        """The epsilon sum rule, on sums in torchvision's residual blocks only.

        Returns:
            One [EpsilonSumRule][fastattr.lrp.EpsilonSumRule].
        """
        return (self._sum,)

    def __repr__(self) -> str:
        return f"ResNetCanonizer(epsilon={self._sum.epsilon})"


class AttnLRP(Canonizer):
    """The rules of AttnLRP (Achtibat et al., ICML 2024) for transformers, as the ``lxt``
    package applies them, without patching the model: the rules of
    [fastattr.lrp.attention][] for the module types transformers use (layer norm, softmax,
    embeddings, RMS norm, HuggingFace's activations and ``Conv1D``) where they have no rule
    of their own, and op rules for the torch calls of the model's own forward code on
    activations (attention's matrix products and softmax, ``F.scaled_dot_product_attention``,
    ``nn.MultiheadAttention``, gated products, sums, point-wise functions). A torch call on
    activations that has no rule raises a TypeError naming it.

    Args:
        epsilon: The stabilizer of every ratio these rules make (linear layers keep their own
            rules: epsilon 1e-9 unless one is set).

    Raises:
        TypeError: ``epsilon`` is not a real number.
        ValueError: ``epsilon`` is negative or not finite.

    Examples:
        >>> import torch
        >>> from torch import nn
        >>> from fastattr import LRP
        >>> from fastattr.canonizers import AttnLRP
        >>> layer = nn.TransformerEncoderLayer(8, 2, dim_feedforward=16, dropout=0.0,
        ...                                    batch_first=True)
        >>> model = nn.Sequential(layer, nn.Flatten(), nn.Linear(40, 3)).eval()
        >>> LRP(model, canonizers=[AttnLRP()]).attribute(torch.randn(2, 5, 8), target=0).shape
        torch.Size([2, 5, 8])
    """

    def __init__(self, epsilon: float = STABILIZER) -> None:
        self._rules = build_op_rules(epsilon)
        self.epsilon = float(epsilon)

    def module_rule(
        self, module: nn.Module, rule: PropagationRule | None
    ) -> PropagationRule | None:
        """``rule``, or AttnLRP's for a transformer module type without one.

        Args:
            module: A module of the model without submodules, or with a rule set.
            rule: The rule it has without this canonizer.

        Returns:
            The rule to use.
        """
        return rule if rule is not None else transformer_module_rule(module, self.epsilon)

    def op_rules(self) -> Sequence[OpRule]:
        """AttnLRP's op rules ([build_op_rules][fastattr.lrp.attention.build_op_rules]).

        Returns:
            The rules, the last taking every torch call that no other lists.
        """
        return self._rules

    def __repr__(self) -> str:
        return f"AttnLRP(epsilon={self.epsilon})"


# zennit's composites: the rule of each module by its type, and of the first layer by position.

# Every convolution torch has, by the private base _ConvNd (see _LINEAR).
_CONVOLUTIONS = tuple(
    kind for kind in MODIFIED_FORWARDS if issubclass(kind, nn.modules.conv._ConvNd)
)
_AVERAGE_POOLS = (nn.modules.pooling._AvgPoolNd, nn.modules.pooling._AdaptiveAvgPoolNd)


class Composite(Canonizer):
    """Rules by module type and position, as zennit's composites assign them: the first module
    of ``first_types`` (in ``model.modules()``'s order, as zennit counts) gets
    [first_rule][fastattr.canonizers.Composite.first_rule], other convolutions
    [convolution_rule][fastattr.canonizers.Composite.convolution_rule], ``nn.Linear``
    epsilon, average pooling the stabilized ratio of its output (zennit's ``Norm``), batch
    norms pass-through (those that [MergeBatchNorm][fastattr.canonizers.MergeBatchNorm] merges,
    before or after the composite in ``canonizers``, stay merged); every other module keeps
    its rule. The model is never changed.

    Args:
        epsilon: The stabilizer of the epsilon rule on ``nn.Linear`` (a number, or a callable
            that returns the stabilized denominator, as zennit takes it).
        stabilizer: The stabilizer of every other rule, likewise.
        zero_params: "weight", "bias" or a list of them, which the rules of ``nn.Linear``,
            convolutions and the first layer zero (zennit's ``zero_params``; average pooling's
            rule has none).

    Raises:
        TypeError: ``epsilon`` or ``stabilizer`` is neither a real number nor a callable, or
            ``zero_params`` is neither None, a string nor a list of strings.
        ValueError: ``epsilon`` or ``stabilizer`` is negative or not finite, or
            ``zero_params`` names another parameter than "weight" and "bias".
    """

    first_types: tuple[type, ...] = ()

    def __init__(
        self,
        epsilon: Stabilizer = ZENNIT_STABILIZER,
        stabilizer: Stabilizer = ZENNIT_STABILIZER,
        zero_params: ZeroParams = None,
    ) -> None:
        self._linear = EpsilonRule(epsilon, zero_params)
        self._pool = EpsilonRule(check_stabilizer(stabilizer))
        self._first: nn.Module | None = None

    @property
    def epsilon(self) -> Stabilizer:
        """The stabilizer of the epsilon rule on ``nn.Linear``."""
        return self._linear.epsilon

    @property
    def stabilizer(self) -> Stabilizer:
        """The stabilizer of every other rule."""
        return self._pool.epsilon

    @property
    def zero_params(self) -> tuple[str, ...]:
        """The parameters the rules of linear layers, convolutions and the first layer zero."""
        return self._linear.zero_params

    def convolution_rule(self) -> PropagationRule:
        """The rule of convolutions other than the first layer.

        Returns:
            The rule.
        """
        return EpsilonRule(self.epsilon, self.zero_params)

    def first_rule(self) -> PropagationRule | None:
        """The rule of the first layer; None where the composite has none.

        Returns:
            The rule, or None.
        """
        return None

    def for_model(self, model: nn.Module) -> Canonizer:
        """The composite with ``model``'s first layer found.

        Args:
            model: The model LRP runs.

        Returns:
            A copy that knows the first layer (itself where the composite has no first rule).
        """
        if not self.first_types:
            return self
        bound = copy.copy(self)
        bound._first = next((m for m in model.modules() if map_type(m) in self.first_types), None)
        return bound

    def module_rule(
        self, module: nn.Module, rule: PropagationRule | None
    ) -> PropagationRule | None:
        """The composite's rule for ``module``'s type and position, else ``rule``.

        Args:
            module: A module of the model that carries a rule.
            rule: The rule it has without this canonizer.

        Returns:
            The rule to use.
        """
        if module is self._first:
            return self.first_rule()
        if map_type(module) in _CONVOLUTIONS:
            return self.convolution_rule()
        if isinstance(module, nn.Linear):
            return self._linear
        if isinstance(module, _AVERAGE_POOLS):
            return self._pool
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            return PassRule()
        return rule

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(epsilon={self.epsilon}, stabilizer={self.stabilizer}"
            f"{zero_params_repr(self.zero_params)})"
        )


class _FlatFirstLayer(Composite):
    """zennit's "Flat" composites: [FlatRule][fastattr.FlatRule] on the first linear layer or
    convolution."""

    first_types = (nn.Linear, *_CONVOLUTIONS)

    def first_rule(self) -> PropagationRule | None:
        """[FlatRule][fastattr.FlatRule].

        Returns:
            The rule.
        """
        return FlatRule(self.stabilizer, self.zero_params)


class EpsilonPlus(Composite):
    """zennit's ``EpsilonPlus``: [ZPlusRule][fastattr.ZPlusRule] on convolutions, epsilon on
    ``nn.Linear`` (see [Composite][fastattr.canonizers.Composite]).

    Args:
        epsilon: The stabilizer of the epsilon rule on ``nn.Linear`` (a number, or a callable
            that returns the stabilized denominator, as zennit takes it).
        stabilizer: The stabilizer of every other rule, likewise.
        zero_params: "weight", "bias" or a list of them, zeroed by the rules of ``nn.Linear``,
            convolutions and the first layer (zennit's ``zero_params``).

    Raises:
        TypeError: ``epsilon`` or ``stabilizer`` is neither a real number nor a callable, or
            ``zero_params`` is neither None, a string nor a list of strings.
        ValueError: ``epsilon`` or ``stabilizer`` is negative or not finite, or
            ``zero_params`` names another parameter than "weight" and "bias".

    Examples:
        >>> import torch
        >>> from torch import nn
        >>> from fastattr import LRP
        >>> from fastattr.canonizers import EpsilonPlus
        >>> model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(16, 2))
        >>> LRP(model, canonizers=[EpsilonPlus()]).attribute(
        ...     torch.randn(2, 3, 4, 4), target=1).shape
        torch.Size([2, 3, 4, 4])
    """

    def convolution_rule(self) -> PropagationRule:
        """[ZPlusRule][fastattr.ZPlusRule].

        Returns:
            The rule.
        """
        return ZPlusRule(self.stabilizer, self.zero_params)


class EpsilonPlusFlat(_FlatFirstLayer, EpsilonPlus):
    """zennit's ``EpsilonPlusFlat``: [FlatRule][fastattr.FlatRule] on the first linear layer
    or convolution, [ZPlusRule][fastattr.ZPlusRule] on other convolutions, epsilon on
    ``nn.Linear`` (see [Composite][fastattr.canonizers.Composite]).

    Args:
        epsilon: The stabilizer of the epsilon rule on ``nn.Linear`` (a number, or a callable
            that returns the stabilized denominator, as zennit takes it).
        stabilizer: The stabilizer of every other rule, likewise.
        zero_params: "weight", "bias" or a list of them, zeroed by the rules of ``nn.Linear``,
            convolutions and the first layer (zennit's ``zero_params``).

    Raises:
        TypeError: ``epsilon`` or ``stabilizer`` is neither a real number nor a callable, or
            ``zero_params`` is neither None, a string nor a list of strings.
        ValueError: ``epsilon`` or ``stabilizer`` is negative or not finite, or
            ``zero_params`` names another parameter than "weight" and "bias".

    Examples:
        >>> import torch
        >>> from torch import nn
        >>> from fastattr import LRP
        >>> from fastattr.canonizers import EpsilonPlusFlat
        >>> model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 1),
        ...                       nn.Flatten(), nn.Linear(16, 2))
        >>> LRP(model, canonizers=[EpsilonPlusFlat()]).attribute(
        ...     torch.randn(2, 3, 4, 4), target=1).shape
        torch.Size([2, 3, 4, 4])
    """


class EpsilonAlpha2Beta1(Composite):
    """zennit's ``EpsilonAlpha2Beta1``: [AlphaBetaRule(2, 1)][fastattr.AlphaBetaRule] on
    convolutions, epsilon on ``nn.Linear`` (see [Composite][fastattr.canonizers.Composite]).

    Args:
        epsilon: The stabilizer of the epsilon rule on ``nn.Linear`` (a number, or a callable
            that returns the stabilized denominator, as zennit takes it).
        stabilizer: The stabilizer of every other rule, likewise.
        zero_params: "weight", "bias" or a list of them, zeroed by the rules of ``nn.Linear``,
            convolutions and the first layer (zennit's ``zero_params``).

    Raises:
        TypeError: ``epsilon`` or ``stabilizer`` is neither a real number nor a callable, or
            ``zero_params`` is neither None, a string nor a list of strings.
        ValueError: ``epsilon`` or ``stabilizer`` is negative or not finite, or
            ``zero_params`` names another parameter than "weight" and "bias".

    Examples:
        >>> import torch
        >>> from torch import nn
        >>> from fastattr import LRP
        >>> from fastattr.canonizers import EpsilonAlpha2Beta1
        >>> model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(16, 2))
        >>> LRP(model, canonizers=[EpsilonAlpha2Beta1()]).attribute(
        ...     torch.randn(2, 3, 4, 4), target=1).shape
        torch.Size([2, 3, 4, 4])
    """

    def convolution_rule(self) -> PropagationRule:
        """[AlphaBetaRule(2, 1)][fastattr.AlphaBetaRule].

        Returns:
            The rule.
        """
        return AlphaBetaRule(2.0, 1.0, self.stabilizer, self.zero_params)


class EpsilonAlpha2Beta1Flat(_FlatFirstLayer, EpsilonAlpha2Beta1):
    """zennit's ``EpsilonAlpha2Beta1Flat``: [FlatRule][fastattr.FlatRule] on the first linear
    layer or convolution, [AlphaBetaRule(2, 1)][fastattr.AlphaBetaRule] on other
    convolutions, epsilon on ``nn.Linear`` (see [Composite][fastattr.canonizers.Composite]).

    Args:
        epsilon: The stabilizer of the epsilon rule on ``nn.Linear`` (a number, or a callable
            that returns the stabilized denominator, as zennit takes it).
        stabilizer: The stabilizer of every other rule, likewise.
        zero_params: "weight", "bias" or a list of them, zeroed by the rules of ``nn.Linear``,
            convolutions and the first layer (zennit's ``zero_params``).

    Raises:
        TypeError: ``epsilon`` or ``stabilizer`` is neither a real number nor a callable, or
            ``zero_params`` is neither None, a string nor a list of strings.
        ValueError: ``epsilon`` or ``stabilizer`` is negative or not finite, or
            ``zero_params`` names another parameter than "weight" and "bias".

    Examples:
        >>> import torch
        >>> from torch import nn
        >>> from fastattr import LRP
        >>> from fastattr.canonizers import EpsilonAlpha2Beta1Flat
        >>> model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 1),
        ...                       nn.Flatten(), nn.Linear(16, 2))
        >>> LRP(model, canonizers=[EpsilonAlpha2Beta1Flat()]).attribute(
        ...     torch.randn(2, 3, 4, 4), target=1).shape
        torch.Size([2, 3, 4, 4])
    """


class EpsilonGammaBox(Composite):
    """zennit's ``EpsilonGammaBox``: [ZBoxRule(low, high)][fastattr.ZBoxRule] on the first
    convolution, [GeneralizedGammaRule(gamma)][fastattr.GeneralizedGammaRule] (zennit's
    gamma) on other convolutions, epsilon on ``nn.Linear`` (see
    [Composite][fastattr.canonizers.Composite]).

    Args:
        low: The lowest value of each input (a number, or a tensor broadcastable to it).
        high: The highest, likewise.
        epsilon: The stabilizer of the epsilon rule on ``nn.Linear`` (a number, or a callable
            that returns the stabilized denominator, as zennit takes it).
        gamma: The gamma of the convolutions' rule.
        stabilizer: The stabilizer of every other rule, likewise.
        zero_params: "weight", "bias" or a list of them, zeroed by the rules of ``nn.Linear``,
            convolutions and the first layer (zennit's ``zero_params``).

    Raises:
        TypeError: an argument is not a real number (``low``, ``high``: nor a floating tensor;
            ``epsilon``, ``stabilizer``: nor a callable; ``zero_params``: nor a string or a
            list of strings).
        ValueError: an argument is not finite, a stabilizer is negative, ``low`` exceeds
            ``high``, or ``zero_params`` names another parameter than "weight" and "bias".

    Examples:
        >>> import torch
        >>> from torch import nn
        >>> from fastattr import LRP
        >>> from fastattr.canonizers import EpsilonGammaBox
        >>> model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 1),
        ...                       nn.Flatten(), nn.Linear(16, 2))
        >>> lrp = LRP(model, canonizers=[EpsilonGammaBox(low=0.0, high=1.0)])
        >>> lrp.attribute(torch.rand(2, 3, 4, 4), target=1).shape
        torch.Size([2, 3, 4, 4])
    """

    first_types = _CONVOLUTIONS

    def __init__(
        self,
        low: float | Tensor,
        high: float | Tensor,
        epsilon: Stabilizer = ZENNIT_STABILIZER,
        gamma: float = 0.25,
        stabilizer: Stabilizer = ZENNIT_STABILIZER,
        zero_params: ZeroParams = None,
    ) -> None:
        super().__init__(epsilon, stabilizer, zero_params)
        self._box = ZBoxRule(low, high, stabilizer, zero_params)
        self._gamma = GeneralizedGammaRule(gamma, stabilizer, zero_params)

    def convolution_rule(self) -> PropagationRule:
        """[GeneralizedGammaRule][fastattr.GeneralizedGammaRule].

        Returns:
            The rule.
        """
        return self._gamma

    def first_rule(self) -> PropagationRule | None:
        """[ZBoxRule][fastattr.ZBoxRule].

        Returns:
            The rule.
        """
        return self._box

    def __repr__(self) -> str:
        return (
            f"EpsilonGammaBox(low={self._box.low.tolist()}, high={self._box.high.tolist()}, "
            f"epsilon={self.epsilon}, gamma={self._gamma.gamma}, stabilizer={self.stabilizer}"
            f"{zero_params_repr(self.zero_params)})"
        )


# User-built composites: rules from lists of (module types, rule) or (module names, rule).

LayerMap = Sequence[tuple[type | tuple[type, ...], PropagationRule]]
NameMap = Sequence[tuple[str | Sequence[str], PropagationRule]]


def _checked_rule(rule: object, where: str) -> PropagationRule:
    if not isinstance(rule, PropagationRule):
        raise TypeError(f"{where} must pair with a rule (a PropagationRule), got {rule!r}")
    return rule


def _type_map(layer_map: object, name: str) -> tuple[tuple[tuple[type, ...], PropagationRule], ...]:
    """``layer_map`` as ``((types, rule), ...)``, checked."""
    if isinstance(layer_map, (str, bytes)) or not isinstance(layer_map, Sequence):
        raise TypeError(f"{name} must be a list of (module types, rule) pairs, got {layer_map!r}")
    checked = []
    for index, entry in enumerate(layer_map):
        where = f"{name}[{index}]"
        if not isinstance(entry, tuple) or len(entry) != 2:
            raise TypeError(f"{where} must be a (module types, rule) pair, got {entry!r}")
        kinds, rule = entry
        kinds = kinds if isinstance(kinds, tuple) else (kinds,)
        if not kinds or not all(isinstance(kind, type) for kind in kinds):
            raise TypeError(f"{where} must name module types (a class or a tuple of classes)")
        checked.append((kinds, _checked_rule(rule, f"{where}'s types")))
    return tuple(checked)


def _match(layer_map: tuple, module: nn.Module) -> PropagationRule | None:
    return next((rule for kinds, rule in layer_map if isinstance(module, kinds)), None)


class LayerMapComposite(Canonizer):
    """Rules by module type from a list, as zennit's ``LayerMapComposite``: a module gets the
    rule of the first ``(types, rule)`` pair whose types it is an instance of, in place of its
    own; a module that no pair names keeps its rule. As with the built-in composites, batch
    norms that [MergeBatchNorm][fastattr.canonizers.MergeBatchNorm] merges stay merged.

    The rules apply to the modules that carry one: those without submodules, and those with a
    rule set on them (a type that names a container without a rule of its own does nothing).
    zennit's ``layer_map=`` argument of its built-in composites reads as a ``LayerMapComposite``
    after the composite in ``canonizers`` (later canonizers override earlier ones), which
    overrides the composite's first layer too; zennit's ``NameLayerMapComposite`` as a
    ``LayerMapComposite`` followed by a [NameMapComposite][fastattr.canonizers.NameMapComposite].

    Args:
        layer_map: ``(types, rule)`` pairs: a module class or a tuple of them, and a rule.

    Raises:
        TypeError: ``layer_map`` is not a list of such pairs.

    Examples:
        >>> import torch
        >>> from torch import nn
        >>> from fastattr import LRP, EpsilonRule, ZPlusRule
        >>> from fastattr.canonizers import LayerMapComposite
        >>> model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(16, 2))
        >>> composite = LayerMapComposite([(nn.Conv2d, ZPlusRule()), (nn.Linear, EpsilonRule(0.1))])
        >>> LRP(model, canonizers=[composite]).attribute(torch.randn(2, 3, 4, 4), target=1).shape
        torch.Size([2, 3, 4, 4])
    """

    def __init__(self, layer_map: LayerMap) -> None:
        self.layer_map = _type_map(layer_map, "layer_map")

    def module_rule(
        self, module: nn.Module, rule: PropagationRule | None
    ) -> PropagationRule | None:
        """The rule of the first pair that names ``module``'s type, else ``rule``.

        Args:
            module: A module of the model that carries a rule.
            rule: The rule it has without this canonizer.

        Returns:
            The rule to use.
        """
        found = _match(self.layer_map, module)
        return rule if found is None else found

    def __repr__(self) -> str:
        return f"{type(self).__name__}({len(self.layer_map)} pairs)"


class SpecialFirstLayerMapComposite(LayerMapComposite):
    """A [LayerMapComposite][fastattr.canonizers.LayerMapComposite] with a rule of its own for
    the first layer, as zennit's ``SpecialFirstLayerMapComposite``: the first module (in
    ``model.modules()``'s order, as zennit counts) that a pair of ``first_map`` names gets
    that pair's rule; every other module, ``layer_map``'s.

    Args:
        layer_map: ``(types, rule)`` pairs for every module but the first layer.
        first_map: ``(types, rule)`` pairs for the first layer.

    Raises:
        TypeError: ``layer_map`` or ``first_map`` is not a list of such pairs.

    Examples:
        >>> import torch
        >>> from torch import nn
        >>> from fastattr import LRP, AlphaBetaRule, EpsilonRule, ZBoxRule
        >>> from fastattr.canonizers import SpecialFirstLayerMapComposite
        >>> model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 1),
        ...                       nn.Flatten(), nn.Linear(16, 2))
        >>> composite = SpecialFirstLayerMapComposite(
        ...     [(nn.Conv2d, AlphaBetaRule(2, 1)), (nn.Linear, EpsilonRule(1e-6))],
        ...     [(nn.Conv2d, ZBoxRule(0.0, 1.0))])
        >>> LRP(model, canonizers=[composite]).attribute(torch.rand(2, 3, 4, 4), target=1).shape
        torch.Size([2, 3, 4, 4])
    """

    def __init__(self, layer_map: LayerMap, first_map: LayerMap) -> None:
        super().__init__(layer_map)
        self.first_map = _type_map(first_map, "first_map")
        self._first: tuple[nn.Module, PropagationRule] | None = None

    def for_model(self, model: nn.Module) -> Canonizer:
        """The composite with ``model``'s first layer found.

        Args:
            model: The model LRP runs.

        Returns:
            A copy that knows the first layer and its rule.
        """
        bound = copy.copy(self)
        matches = ((module, _match(self.first_map, module)) for module in model.modules())
        bound._first = next(((m, rule) for m, rule in matches if rule is not None), None)
        return bound

    def module_rule(
        self, module: nn.Module, rule: PropagationRule | None
    ) -> PropagationRule | None:
        """``first_map``'s rule for the first layer, else ``layer_map``'s, else ``rule``.

        Args:
            module: A module of the model that carries a rule.
            rule: The rule it has without this canonizer.

        Returns:
            The rule to use.
        """
        if self._first is not None and module is self._first[0]:
            return self._first[1]
        return super().module_rule(module, rule)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}({len(self.layer_map)} pairs, first: "
            f"{len(self.first_map)} pairs)"
        )


class NameMapComposite(Canonizer):
    """Rules by module name, as zennit's ``NameMapComposite``: the module of each name (as
    ``model.named_modules()`` names them) gets the rule of the first ``(names, rule)`` pair
    that lists it, in place of its own. The names must name modules of the model, modules
    that carry a rule (see [LayerMapComposite][fastattr.canonizers.LayerMapComposite]).

    Args:
        name_map: ``(names, rule)`` pairs: a name or a tuple of names, and a rule.

    Raises:
        TypeError: ``name_map`` is not a list of such pairs.
        ValueError: (at ``attribute()``) a name names no module of the model.

    Examples:
        >>> import torch
        >>> from torch import nn
        >>> from fastattr import LRP, FlatRule
        >>> from fastattr.canonizers import NameMapComposite
        >>> model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
        >>> composite = NameMapComposite([("0", FlatRule())])
        >>> LRP(model, canonizers=[composite]).attribute(torch.randn(5, 4), target=1).shape
        torch.Size([5, 4])
    """

    def __init__(self, name_map: NameMap) -> None:
        if isinstance(name_map, (str, bytes)) or not isinstance(name_map, Sequence):
            raise TypeError(f"name_map must be a list of (names, rule) pairs, got {name_map!r}")
        checked = []
        for index, entry in enumerate(name_map):
            where = f"name_map[{index}]"
            if not isinstance(entry, tuple) or len(entry) != 2:
                raise TypeError(f"{where} must be a (names, rule) pair, got {entry!r}")
            names, rule = entry
            names = (names,) if isinstance(names, str) else tuple(names)
            if not all(isinstance(name, str) for name in names):
                raise TypeError(f"{where} must name modules by strings, got {names!r}")
            checked.append((names, _checked_rule(rule, f"{where}'s names")))
        self.name_map = tuple(checked)
        self._rules: dict[int, PropagationRule] = {}

    def for_model(self, model: nn.Module) -> Canonizer:
        """The composite with the named modules of ``model`` found.

        Args:
            model: The model LRP runs.

        Returns:
            A copy that knows each named module's rule.

        Raises:
            ValueError: A name names no module of the model.
        """
        modules = dict(model.named_modules())
        unknown = [n for names, _ in self.name_map for n in names if n not in modules]
        if unknown:
            raise ValueError(
                f"NameMapComposite: no module of the model is named {', '.join(map(repr, unknown))}"
                " (names as model.named_modules() gives them)"
            )
        bound = copy.copy(self)
        bound._rules = {}
        for names, rule in self.name_map:
            for name in names:
                bound._rules.setdefault(id(modules[name]), rule)
        return bound

    def module_rule(
        self, module: nn.Module, rule: PropagationRule | None
    ) -> PropagationRule | None:
        """The rule of the first pair that lists ``module``'s name, else ``rule``.

        Args:
            module: A module of the model that carries a rule.
            rule: The rule it has without this canonizer.

        Returns:
            The rule to use.
        """
        found = self._rules.get(id(module))
        return rule if found is None else found

    def __repr__(self) -> str:
        return f"NameMapComposite({len(self.name_map)} pairs)"


__all__ = [
    "AttnLRP",
    "Canonizer",
    "Composite",
    "EpsilonAlpha2Beta1",
    "EpsilonAlpha2Beta1Flat",
    "EpsilonGammaBox",
    "EpsilonPlus",
    "EpsilonPlusFlat",
    "EpsilonSum",
    "LayerMapComposite",
    "MergeBatchNorm",
    "NameMapComposite",
    "ResNetCanonizer",
    "SpecialFirstLayerMapComposite",
]
