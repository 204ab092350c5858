"""Contenders other than fastattr and Captum's class of the same name.

Each has a contender's signature ([fastattr.bench.cases.Contender][]): given its own copy
of the model and one batch's ``attribute()`` arguments, it returns the call to time, whose
result is compared with fastattr's. The library it needs is imported when it is set up, so a
missing one fails that contender alone (recorded, and named in the notes).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

Arguments = dict[str, Any]


def lrp_with_residual_sums(library: Any, model: nn.Module) -> Any:
    """``library.LRP`` on ``model``; fastattr's with the epsilon rule on residual sums (the
    [EpsilonSum][fastattr.canonizers.EpsilonSum] canonizer), which Captum's LRP does not have.

    Args:
        library: ``fastattr`` or ``captum.attr``.
        model: The model.

    Returns:
        The attributor.
    """
    if library.__name__.startswith("fastattr"):
        from fastattr.canonizers import EpsilonSum

        return library.LRP(model, canonizers=[EpsilonSum()])
    return library.LRP(model)


def zennit_epsilon(model: nn.Module, arguments: Arguments) -> Callable[[], Any]:
    """zennit's LRP with the rules fastattr and Captum apply by default to models of linear
    and convolutional layers, activations and pooling: epsilon (1e-9) on linear and
    convolutional layers, relevance passed through activations, and the pooling layers
    redistributing by their share of the output.

    Args:
        model: The contender's copy of the model.
        arguments: The batch's ``attribute()`` arguments (``inputs``, ``target``).
    """
    from zennit.composites import LayerMapComposite
    from zennit.rules import Epsilon, Norm, Pass
    from zennit.types import Activation, AvgPool

    composite = LayerMapComposite(
        [
            (Activation, Pass()),
            ((nn.Linear, nn.Conv2d), Epsilon(1e-9)),
            ((AvgPool, nn.MaxPool2d), Norm(1e-9)),
        ]
    )
    inputs, target = arguments["inputs"], arguments["target"]

    def relevance() -> Any:
        leaf = inputs.detach().requires_grad_(True)
        with composite.context(model) as modified:
            output = modified(leaf)
            seed = torch.zeros_like(output)
            seed[:, target] = output[:, target]
            (result,) = torch.autograd.grad(output, leaf, seed)
        return result

    return relevance
