"""Contenders other than fastattr and Captum's class of the same name.

Each has a contender's signature ([fastattr.bench.cases.Contender][]): given its own copy
of the model and one batch's ``attribute()`` arguments, it returns the call to time, whose
result is compared with fastattr's. The library it needs is imported when it is set up, so a
missing one fails that contender alone (recorded, and named in the notes).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping
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


def with_attnlrp(layer: str | None = None) -> Callable[[Any, nn.Module], Any]:
    """How a transformer case builds its attributor: fastattr's ``LRP`` (or ``LayerLRP`` at
    ``layer``) with the [AttnLRP][fastattr.canonizers.AttnLRP] canonizer; Captum's as it is
    (it has no rule for layer norm, embeddings or attention).

    Args:
        layer: The layer's name in the model, for ``LayerLRP``; None for ``LRP``.

    Returns:
        ``(library, model) -> attributor``, a case's ``construct``.
    """

    def construct(library: Any, model: nn.Module) -> Any:
        options = {}
        if library.__name__.startswith("fastattr"):
            from fastattr.canonizers import AttnLRP

            options["canonizers"] = [AttnLRP()]
        if layer is None:
            return library.LRP(model, **options)
        return library.LayerLRP(model, model.get_submodule(layer), **options)

    return construct


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
    return zennit_relevance(composite, model, arguments["inputs"], arguments["target"])


def zennit_relevance(
    composite: Any, model: nn.Module, inputs: torch.Tensor, target: int
) -> Callable[[], torch.Tensor]:
    """The call a zennit contender times: the relevance at ``inputs`` of output ``target``,
    with ``composite``'s rules (and canonizers) on ``model``.

    Args:
        composite: A zennit composite.
        model: The contender's copy of the model.
        inputs: The batch, (B, ...).
        target: The output column attributed, the same for every example.

    Returns:
        A function of no arguments that returns the (B, ...) relevance.
    """

    def relevance() -> torch.Tensor:
        leaf = inputs.detach().requires_grad_(True)
        with composite.context(model) as modified:
            output = modified(leaf)
            seed = torch.zeros_like(output)
            seed[:, target] = output[:, target]
            (result,) = torch.autograd.grad(output, leaf, seed)
        return result

    return relevance


@contextlib.contextmanager
def _patched(patches: Mapping[Any, Callable[[Any], object]]) -> Iterator[None]:
    """lxt's patches (a map from class or module to the function patching it) applied, and
    every attribute they changed restored on exit."""
    saved = [(target, dict(vars(target))) for target in patches]
    try:
        for target, patch in patches.items():
            patch(target)
        yield
    finally:
        for target, before in saved:
            for name in set(vars(target)) - set(before):
                delattr(target, name)
            for name, value in before.items():
                if vars(target).get(name) is not value:
                    setattr(target, name, value)


def lxt_attnlrp(model: nn.Module, arguments: Arguments) -> Callable[[], Any]:
    """lxt's AttnLRP in its efficient mode (the relevance is the input embeddings times a
    gradient into which its rules are built) on a HuggingFace BERT, GPT-2 or LLaMA model.

    lxt patches transformers, and torch's LayerNorm and Dropout, for the whole process; here its
    patches are applied around each call and undone after, so that the other contenders run
    unpatched. For BERT, whose classes lxt replaces by copies of its own, the model is rebuilt
    from lxt's copy with the same weights.

    Args:
        model: The model, wrapped in
            [HuggingFaceLogits][fastattr.bench.models.HuggingFaceLogits].
        arguments: ``inputs`` (input embeddings), ``target`` and ``additional_forward_args``
            (the attention mask), as fastattr's LRP gets them.

    Returns:
        The call to time, returning lxt's relevance at the input embeddings.
    """
    import sys

    from lxt.efficient.models import get_default_map

    from fastattr.bench.models import HuggingFaceLogits

    hf = model.model  # type: ignore[attr-defined]
    module = sys.modules[type(hf).__module__]
    patches = get_default_map(module)
    if module.__name__.endswith("modeling_bert"):
        from lxt.efficient.models import bert

        parameter = next(hf.parameters())
        copy = getattr(bert, type(hf).__name__)(hf.config)
        copy.load_state_dict(hf.state_dict())
        hf = copy.to(device=parameter.device, dtype=parameter.dtype).eval()
    wrapped = HuggingFaceLogits(hf, model.position)  # type: ignore[attr-defined]
    inputs, target = arguments["inputs"], arguments["target"]
    extra = arguments.get("additional_forward_args") or ()

    def relevance() -> Any:
        with _patched(patches):
            leaf = inputs.detach().requires_grad_(True)
            output = wrapped(leaf, *extra)[:, target]
            (gradient,) = torch.autograd.grad(output.sum(), leaf)
        return leaf.detach() * gradient

    return relevance
