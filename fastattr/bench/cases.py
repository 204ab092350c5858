"""What ``fastattr bench`` measures: one declarative entry per (method, model).

An entry says how to build the model and a batch, how to construct the attribution class
(fastattr's and Captum's take the same arguments, so one recipe serves both), how to call
``attribute``, and the floor: the model's own forward and backward over the same work.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from fastattr.bench import models

TARGET = 1

# The method's class name (in fastattr and captum.attr) and its short name on the command line.
METHODS = {
    "IntegratedGradients": "ig",
    "LayerIntegratedGradients": "lig",
    "NeuronIntegratedGradients": "nig",
    "LRP": "lrp",
}

Floor = Callable[[nn.Module, Tensor, Tensor, int], Callable[[], Any]]


@dataclass(frozen=True)
class Case:
    method: str
    model: str
    make_model: Callable[[], nn.Module]
    make_batch: Callable[[int, torch.Generator], tuple[Tensor, Tensor]]
    construct: Callable[[type, nn.Module], Any]
    call_kwargs: dict[str, Any]
    floor: Floor
    uses_path: bool = True
    # In the --quick run: one representative case per method.
    quick: bool = False

    @property
    def name(self) -> str:
        return f"{METHODS[self.method]}-{self.model}"

    def attribute(self, attributor: Any, inputs: Tensor, baselines: Tensor, n_steps: int) -> Any:
        kwargs = dict(self.call_kwargs)
        if self.uses_path:
            kwargs.update(baselines=baselines, n_steps=n_steps)
        return attributor.attribute(inputs, **kwargs)


def _straight_path(start: Tensor, end: Tensor, n_steps: int) -> Tensor:
    """The (n_steps * B, ...) step-major path, built once, outside the timed region."""
    alphas = torch.linspace(0, 1, n_steps, device=end.device, dtype=end.dtype)
    alphas = alphas.view(-1, *([1] * end.dim()))
    path = start + alphas * (end - start)
    return path.reshape(-1, *end.shape[1:]).detach().requires_grad_(True)


def _target_floor(
    model: nn.Module, inputs: Tensor, baselines: Tensor, n_steps: int
) -> Callable[[], Any]:
    path = _straight_path(baselines, inputs, n_steps)
    return lambda: torch.autograd.grad(model(path)[:, TARGET].sum(), path)


def _embedding_floor(
    model: nn.Module, tokens: Tensor, pad_tokens: Tensor, n_steps: int
) -> Callable[[], Any]:
    with torch.no_grad():
        start, end = model.embedding(pad_tokens), model.embedding(tokens)
    path = _straight_path(start, end, n_steps)
    return lambda: torch.autograd.grad(model.classify(path)[:, TARGET].sum(), path)


def _neuron_floor(layer_name: str, selector: tuple[int, ...]) -> Floor:
    def floor(
        model: nn.Module, inputs: Tensor, baselines: Tensor, n_steps: int
    ) -> Callable[[], Any]:
        path = _straight_path(baselines, inputs, n_steps)
        layer = model.get_submodule(layer_name)

        def forward_backward() -> Any:
            captured: list[Tensor] = []
            handle = layer.register_forward_hook(lambda _m, _i, out: captured.append(out))
            try:
                model(path)
            finally:
                handle.remove()
            neuron = captured[0][(slice(None), *selector)]
            return torch.autograd.grad(neuron.sum(), path)

        return forward_backward

    return floor


def _lrp_floor(
    model: nn.Module, inputs: Tensor, baselines: Tensor, n_steps: int
) -> Callable[[], Any]:
    x = inputs.detach().requires_grad_(True)
    return lambda: torch.autograd.grad(model(x)[:, TARGET].sum(), x)


def _features(batch: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    inputs = torch.randn(batch, models.MLP_FEATURES, generator=generator)
    return inputs, torch.zeros_like(inputs)


def _images(batch: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    inputs = torch.randn(batch, *models.IMAGE_SHAPE, generator=generator)
    return inputs, torch.zeros_like(inputs)


def _tokens(batch: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    shape = (batch, models.SEQUENCE_LENGTH)
    tokens = torch.randint(1, models.VOCAB_SIZE, shape, generator=generator)
    return tokens, torch.full_like(tokens, models.PAD_TOKEN)


def _whole_model(cls: type, model: nn.Module) -> Any:
    return cls(model)


def _at_layer(layer_name: str) -> Callable[[type, nn.Module], Any]:
    return lambda cls, model: cls(model, model.get_submodule(layer_name))


CASES: tuple[Case, ...] = (
    Case(
        "IntegratedGradients", "mlp", models.mlp, _features, _whole_model,
        {"target": TARGET}, _target_floor,
    ),
    Case(
        "IntegratedGradients", "cnn", models.cnn, _images, _whole_model,
        {"target": TARGET}, _target_floor, quick=True,
    ),
    Case(
        "IntegratedGradients", "resnet", models.resnet, _images, _whole_model,
        {"target": TARGET}, _target_floor,
    ),
    Case(
        "LayerIntegratedGradients", "transformer", models.transformer, _tokens,
        _at_layer("embedding"), {"target": TARGET}, _embedding_floor, quick=True,
    ),
    Case(
        "NeuronIntegratedGradients", "mlp", models.mlp, _features, _at_layer("fc2"),
        {"neuron_selector": 7}, _neuron_floor("fc2", (7,)), quick=True,
    ),
    Case(
        "NeuronIntegratedGradients", "cnn", models.cnn, _images, _at_layer("conv2"),
        {"neuron_selector": (5, 4, 4)}, _neuron_floor("conv2", (5, 4, 4)),
    ),
    Case(
        "LRP", "mlp", models.mlp, _features, _whole_model, {"target": TARGET}, _lrp_floor,
        uses_path=False,
    ),
    Case(
        "LRP", "cnn", models.cnn, _images, _whole_model, {"target": TARGET}, _lrp_floor,
        uses_path=False, quick=True,
    ),
    # Captum's LRP has no rule for the residual `+` (and nn.Identity); fastattr's has.
    Case(
        "LRP", "resnet", models.resnet, _images, _whole_model, {"target": TARGET},
        _lrp_floor, uses_path=False,
    ),
)  # fmt: skip


def select(
    methods: list[str] | None = None,
    model_names: list[str] | None = None,
    quick: bool = False,
) -> list[Case]:
    """The cases of the given methods (class or short names) and models; all by default.
    ``quick`` keeps the quick cases unless models are named."""
    chosen = [case for case in CASES if case.quick or not quick or model_names]
    if methods:
        wanted = set()
        for name in methods:
            matches = [m for m, short in METHODS.items() if name in (m, short)]
            if not matches:
                known = ", ".join(f"{short} ({m})" for m, short in METHODS.items())
                raise ValueError(f"unknown method {name!r}; known: {known}")
            wanted.update(matches)
        chosen = [case for case in chosen if case.method in wanted]
    if model_names:
        known_models = sorted({case.model for case in CASES})
        unknown = sorted(set(model_names) - set(known_models))
        if unknown:
            raise ValueError(f"unknown model(s) {unknown}; known: {known_models}")
        chosen = [case for case in chosen if case.model in model_names]
    return chosen
