"""The floors: the model's own forward and backward over the work an attribution method does.

A floor has a contender's signature ([fastattr.bench.cases.Contender][]): given its own
copy of the model and one batch's ``attribute()`` arguments, it returns the call to time.
Whatever can be built before the call (the interpolated path, the expanded arguments) is
built outside it, so the floor times the model alone.

The floors read the arguments the method reads: ``inputs`` (one tensor), ``baselines``,
``n_steps``, ``target`` (an int, or None for a model with one output per example),
``neuron_selector`` and ``additional_forward_args``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

Arguments = dict[str, Any]


def straight_path(start: Tensor, end: Tensor, n_steps: int) -> Tensor:
    """The step-major straight path from ``start`` to ``end``, as a leaf that requires grad.

    Args:
        start: The baselines, broadcasting to ``end``.
        end: (B, ...) inputs.
        n_steps: Points on the path, ``start`` and ``end`` included.

    Returns:
        The ``(n_steps * B, ...)`` path.
    """
    alphas = torch.linspace(0, 1, n_steps, device=end.device, dtype=end.dtype)
    alphas = alphas.view(-1, *([1] * end.dim()))
    path = start + alphas * (end - start)
    return path.reshape(-1, *end.shape[1:]).detach().requires_grad_(True)


def _forward_args(arguments: Arguments, repeats: int) -> tuple[Any, ...]:
    """``additional_forward_args``, their tensors repeated along the batch ``repeats`` times
    (step-major, as the path)."""
    extra = arguments.get("additional_forward_args")
    if extra is None:
        return ()
    extra = extra if isinstance(extra, tuple) else (extra,)
    return tuple(
        arg.repeat(repeats, *([1] * (arg.dim() - 1))) if isinstance(arg, Tensor) else arg
        for arg in extra
    )


def _selected(output: Tensor, target: int | None) -> Tensor:
    return output if target is None else output[:, target]


def path_floor(model: nn.Module, arguments: Arguments) -> Callable[[], Any]:
    """IntegratedGradients: the model over the prebuilt path (``n_steps * B`` rows) and one
    gradient of the summed target outputs with respect to the path.

    Args:
        model: The floor's copy of the model.
        arguments: The batch's ``attribute()`` arguments.
    """
    n_steps = arguments["n_steps"]
    path = straight_path(arguments["baselines"], arguments["inputs"], n_steps)
    extra = _forward_args(arguments, n_steps)
    target = arguments.get("target")
    return lambda: torch.autograd.grad(_selected(model(path, *extra), target).sum(), path)


def layer_floor(layer_name: str) -> Callable[[nn.Module, Arguments], Callable[[], Any]]:
    """LayerIntegratedGradients at ``layer_name``: the model over the expanded inputs with the
    layer's output replaced by the prebuilt path between its values at the baselines and the
    inputs, and one gradient of the summed target outputs with respect to that path.

    Args:
        layer_name: The layer's name in the model.
    """

    def floor(model: nn.Module, arguments: Arguments) -> Callable[[], Any]:
        n_steps = arguments["n_steps"]
        layer = model.get_submodule(layer_name)
        extra = _forward_args(arguments, 1)
        values: list[Tensor] = []
        handle = layer.register_forward_hook(lambda _m, _i, out: values.append(out.detach()))
        try:
            with torch.no_grad():
                model(arguments["inputs"], *extra)
                model(arguments["baselines"], *extra)
        finally:
            handle.remove()
        path = straight_path(values[1], values[0], n_steps)
        inputs = arguments["inputs"]
        expanded = inputs.repeat(n_steps, *([1] * (inputs.dim() - 1)))
        expanded_extra = _forward_args(arguments, n_steps)
        target = arguments.get("target")

        def forward_backward() -> Any:
            replace = layer.register_forward_hook(lambda _m, _i, _out: path)
            try:
                output = model(expanded, *expanded_extra)
            finally:
                replace.remove()
            return torch.autograd.grad(_selected(output, target).sum(), path)

        return forward_backward

    return floor


def neuron_floor(layer_name: str) -> Callable[[nn.Module, Arguments], Callable[[], Any]]:
    """NeuronIntegratedGradients at ``layer_name``: the whole model over the prebuilt input path
    and one gradient of the selected neuron's summed values. (The method itself runs the
    forward only up to the layer, so it can beat this floor.)

    Args:
        layer_name: The layer's name in the model.
    """

    def floor(model: nn.Module, arguments: Arguments) -> Callable[[], Any]:
        n_steps = arguments["n_steps"]
        path = straight_path(arguments["baselines"], arguments["inputs"], n_steps)
        extra = _forward_args(arguments, n_steps)
        selector = arguments["neuron_selector"]
        selector = selector if isinstance(selector, tuple) else (selector,)
        layer = model.get_submodule(layer_name)

        def forward_backward() -> Any:
            captured: list[Tensor] = []
            handle = layer.register_forward_hook(lambda _m, _i, out: captured.append(out))
            try:
                model(path, *extra)
            finally:
                handle.remove()
            neuron = captured[0][(slice(None), *selector)]
            return torch.autograd.grad(neuron.sum(), path)

        return forward_backward

    return floor


def input_floor(model: nn.Module, arguments: Arguments) -> Callable[[], Any]:
    """LRP and other single-pass methods: one forward over the batch and one gradient of the
    summed target outputs with respect to the inputs.

    Args:
        model: The floor's copy of the model.
        arguments: The batch's ``attribute()`` arguments.
    """
    inputs = arguments["inputs"].detach().requires_grad_(True)
    extra = _forward_args(arguments, 1)
    target = arguments.get("target")
    return lambda: torch.autograd.grad(_selected(model(inputs, *extra), target).sum(), inputs)


def noise_floor(model: nn.Module, arguments: Arguments) -> Callable[[], Any]:
    """NoiseTunnel around IntegratedGradients: the path floor over the noisy copies
    (``nt_samples`` per example, so ``n_steps * nt_samples * B`` rows), drawn beforehand.

    Args:
        model: The floor's copy of the model.
        arguments: The batch's ``attribute()`` arguments, with ``nt_samples`` and ``stdevs``.
    """
    inputs, samples = arguments["inputs"], arguments["nt_samples"]
    generator = torch.Generator(device=inputs.device).manual_seed(0)
    copies = inputs.repeat_interleave(samples, dim=0)
    noisy = copies + arguments.get("stdevs", 1.0) * torch.randn(
        copies.shape, generator=generator, device=inputs.device, dtype=inputs.dtype
    )
    baselines = arguments["baselines"]
    if baselines.shape[0] == inputs.shape[0]:
        baselines = baselines.repeat_interleave(samples, dim=0)
    return path_floor(model, {**arguments, "inputs": noisy, "baselines": baselines})


def layer_output_floor(layer_name: str) -> Callable[[nn.Module, Arguments], Callable[[], Any]]:
    """LayerLRP and other single-pass layer methods: one forward over the batch and one
    gradient of the summed target outputs with respect to the layer's output.

    Args:
        layer_name: The layer's name in the model.
    """

    def floor(model: nn.Module, arguments: Arguments) -> Callable[[], Any]:
        layer = model.get_submodule(layer_name)
        extra = _forward_args(arguments, 1)
        target = arguments.get("target")

        def forward_backward() -> Any:
            captured: list[Tensor] = []
            handle = layer.register_forward_hook(lambda _m, _i, out: captured.append(out))
            try:
                output = model(arguments["inputs"], *extra)
            finally:
                handle.remove()
            return torch.autograd.grad(_selected(output, target).sum(), captured[0])

        return forward_backward

    return floor
