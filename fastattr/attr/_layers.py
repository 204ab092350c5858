"""Reading and replacing a layer's values during a forward pass, with hooks that never
outlive the call."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Optional, Union

import torch
from torch import Tensor, nn

from fastattr._compiled import compiled_code_runs_eagerly
from fastattr._model_state import module_of
from fastattr._settle import settled

# A layer's input or output: its tensors, with None where it takes or returns None (attention
# weights not asked for, an optional argument left out).
LayerValues = tuple[Optional[Tensor], ...]
ModuleOrList = Union[nn.Module, list[nn.Module]]


class _LayersReached(BaseException):
    """Ends a forward pass once every layer of interest has been seen. A BaseException, so that
    a model's own ``except Exception`` does not swallow it."""


def as_layer_list(layer: ModuleOrList | None, name: str = "layer") -> list[nn.Module]:
    if layer is None:
        raise TypeError(f"{name} is None: set it to a module of the model (or a list of them)")
    layers = layer if isinstance(layer, list) else [layer]
    if not layers or not all(isinstance(m, nn.Module) for m in layers):
        raise TypeError(f"{name} must be a torch.nn.Module or a non-empty list of them")
    for i, layer in enumerate(layers):
        first = next(j for j, other in enumerate(layers) if other is layer)
        if first != i:
            raise ValueError(
                f"{name}[{i}] is {name}[{first}] again: each module may appear once in {name}"
            )
    return layers


def check_layers_in_model(forward_func: object, layers: Sequence[nn.Module], name: str) -> None:
    """Every layer must run Python hooks, and when ``forward_func`` is a module, be one of its
    submodules."""
    for i, layer in enumerate(layers):
        if isinstance(layer, torch.jit.ScriptModule):
            where = f"{name}[{i}]" if len(layers) > 1 else name
            raise TypeError(
                f"{where} is a TorchScript module ({type(layer).__name__}, made by "
                "torch.jit.trace or torch.jit.script), whose compiled code runs no Python "
                "hooks: its values can't be read or replaced. Attribute the model before "
                "tracing or scripting it (its numbers are the same)"
            )
    model = module_of(forward_func)
    if model is None:
        return
    members = {id(m) for m in model.modules()}
    for i, layer in enumerate(layers):
        if id(layer) not in members:
            raise ValueError(
                f"{name}[{i}] ({type(layer).__name__}) is not a submodule of the model"
                if len(layers) > 1
                else f"{name} ({type(layer).__name__}) is not a submodule of the model"
            )


def _as_values(values: Any, layer: nn.Module, name: str) -> LayerValues:
    values = tuple(values) if isinstance(values, (tuple, list)) else (values,)
    if not values:
        raise TypeError(
            f"{name} ({type(layer).__name__}) was called without positional tensors (only "
            "keyword arguments reach no hook): its input can't be attributed"
        )
    tensors = [v for v in values if isinstance(v, Tensor)]
    if not tensors or len(tensors) + values.count(None) != len(values):
        raise TypeError(
            f"{name} ({type(layer).__name__}) must take and return tensors or tuples of "
            f"tensors (None allowed beside them) to be attributed, got "
            f"{[type(v).__name__ for v in values]}"
        )
    return values


def tensors_of(values: LayerValues) -> tuple[Tensor, ...]:
    """The tensors among a layer's values (the Nones left out)."""
    return tuple(v for v in values if v is not None)


def with_nones(tensors: Sequence[Any], like: LayerValues) -> tuple[Any, ...]:
    """``tensors`` (one per tensor of ``like``) in ``like``'s places, with its Nones between."""
    given = iter(tensors)
    return tuple(None if v is None else next(given) for v in like)


@contextlib.contextmanager
def _hooks(
    layers: Sequence[nn.Module], on_input: bool, hook: Callable[[int, Any], Any]
) -> Iterator[None]:
    """Within the block, ``hook(index, values)`` sees each layer's input (or output) in this
    thread's forward passes, and may replace it. Other threads running the same modules at the
    same time (another attribution, or plain inference) are not seen, nor changed. The hooks
    are removed on exit, also when an interrupt arrives while they are being added or removed.
    """
    owner = threading.get_ident()

    def made(index: int) -> Callable[..., Any]:
        if on_input:
            return lambda module, args: (
                hook(index, args) if threading.get_ident() == owner else None
            )
        return lambda module, args, output: (
            hook(index, output) if threading.get_ident() == owner else None
        )

    installed = [(layer, made(index)) for index, layer in enumerate(layers)]

    def add() -> None:
        for layer, function in installed:
            if on_input:
                layer.register_forward_pre_hook(function)
            else:
                layer.register_forward_hook(function)

    def remove() -> None:
        # By identity rather than by handle: an interrupt inside a registration would lose
        # the handle of a hook that is in place already. (The dicts are torch's private
        # registries, checked on torch 2.13 and 2.14: tests/test_torch_private_api.py checks what
        # this relies on.)
        for layer, function in installed:
            registry = layer._forward_pre_hooks if on_input else layer._forward_hooks
            for key, value in list(registry.items()):
                if value is function:
                    registry.pop(key, None)

    # Compiled code would skip hooks added after it was compiled.
    with compiled_code_runs_eagerly():
        yield from settled(add, remove)


def _check_all_called(seen: Sequence[Any], layers: Sequence[nn.Module], name: str) -> None:
    missing = [layers[i] for i, value in enumerate(seen) if value is None]
    if not missing:
        return
    names = ", ".join(type(layer).__name__ for layer in missing)
    containers = [type(m).__name__ for m in missing if type(m).forward is nn.Module.forward]
    if containers:
        raise ValueError(
            f"{name} was never called by forward_func ({names}): {', '.join(containers)} has "
            "no forward of its own (a container such as ModuleList is never called itself): "
            "pass one of the modules it holds"
        )
    raise ValueError(
        f"{name} was never called by forward_func ({names}) in the calling thread: pass a "
        "module that the forward pass runs (a forward that runs it in other threads, as "
        "DataParallel over several devices does, can't be attributed)"
    )


class LayerCalledAgain(Exception):
    """A layer ran more than once in a pass whose values were taken at its first call."""


def capture_layers(
    run: Callable[[], Any],
    layers: Sequence[nn.Module],
    on_input: bool,
    name: str = "layer",
    detach: bool = True,
    last: bool = False,
    calls: list[int] | None = None,
) -> list[LayerValues]:
    """Each layer's output (or input) in the forward pass that ``run`` starts.

    By default the values are those of each layer's first call and the pass stops as soon as
    every layer has been seen: what comes after never runs, forward or backward. With
    ``last``, the pass runs to its end and a layer called more than once gives its last
    call's values (captum's convention). ``calls``, when given, receives how many times each
    layer ran."""
    seen: list[LayerValues | None] = [None] * len(layers)
    counts = [0] * len(layers) if calls is None else calls
    counts[:] = [0] * len(layers)

    wants_gradients = not detach and torch.is_grad_enabled()

    def record(index: int, values: Any) -> None:
        if wants_gradients:
            _refuse_gradients_off(layers[index], name)
        counts[index] += 1
        if last or seen[index] is None:
            captured = _as_values(values, layers[index], name)
            seen[index] = (
                tuple(v if v is None else v.detach() for v in captured) if detach else captured
            )
        if not last and all(s is not None for s in seen):
            raise _LayersReached

    with _hooks(layers, on_input, record):
        try:
            run()
        except _LayersReached:
            pass
    _check_all_called(seen, layers, name)
    return seen  # type: ignore[return-value]


@contextlib.contextmanager
def replaced_layers(
    layers: Sequence[nn.Module],
    replacements: Sequence[LayerValues],
    on_input: bool,
    name: str = "layer",
    calls: list[int] | None = None,
    check_paths: bool = False,
) -> Iterator[Callable[[Any], None]]:
    """Within the block, each layer's output (or input) is replaced by the given tensors, at
    every call. ``calls``, when given, receives how many times each layer ran. The block gets
    a check to call on the forward's output: with ``check_paths``, it raises when a layer's
    replacement reaches the output only through another layer's values, which are replaced
    in turn (captum's "layers solely dependent on another"); otherwise it does nothing."""
    called = [None] * len(layers)
    counts = [0] * len(layers) if calls is None else calls
    counts[:] = [0] * len(layers)
    handed: dict[Any, int] = {}  # the graph node of each replacement handed out -> its layer
    feeds: dict[int, int] = {}  # a layer whose replacement another's values depend on -> that one

    wants_gradients = torch.is_grad_enabled()

    def replace(index: int, values: Any) -> Any:
        found = _as_values(values, layers[index], name)
        if wants_gradients:
            _refuse_gradients_off(layers[index], name)
        called[index] = True
        counts[index] += 1
        shapes = [None if v is None else list(v.shape) for v in found]
        attributed = [None if r is None else list(r.shape) for r in replacements[index]]
        if shapes != attributed:
            raise ValueError(
                f"{name} {type(layers[index]).__name__} runs more than once, with values of "
                f"other shapes ({shapes} against {attributed} at its call whose values are "
                "attributed): every call is replaced by those values' path, which the others "
                "can't take. Choose a layer that runs once."
            )
        if check_paths and handed:
            for source in _reached(tensors_of(found), handed) - {index}:
                feeds.setdefault(source, index)
        # Copies: the model may change the values in place (ReLU(inplace=True) after the
        # layer), which autograd refuses on the path itself, a leaf.
        new = tuple(None if v is None else v.clone() for v in replacements[index])
        if check_paths:
            handed.update((v.grad_fn, index) for v in tensors_of(new) if v.grad_fn is not None)
        if isinstance(values, list):
            return list(new)
        if on_input or isinstance(values, tuple):
            return tuple(new)
        return new[0]

    def check(output: Any) -> None:
        if not feeds:
            return
        reached = _reached(_tensors_in(output), handed)
        for source, fed in feeds.items():
            if source not in reached:
                where = "input" if on_input else "output"
                raise ValueError(
                    f"{name} {type(layers[fed]).__name__} (#{fed}) depends on the {where} of "
                    f"{type(layers[source]).__name__} (#{source}), which reaches the output "
                    f"through it alone: once both are replaced by their paths, #{source}'s "
                    "path no longer reaches the output. Attribute layers that feed one another "
                    "in separate calls."
                )

    with _hooks(layers, on_input, replace):
        yield check
    _check_all_called(called, layers, name)


def _refuse_gradients_off(layer: nn.Module, name: str) -> None:
    """Raises for a layer that runs with gradients off in a pass started with them on: its
    values would carry no gradient, and read as zero attributions."""
    if not torch.is_grad_enabled():
        raise ValueError(
            f"{name} {type(layer).__name__} runs with gradients off inside the model's forward "
            "(reentrant gradient checkpointing, or torch.no_grad in its code), so the path's "
            "gradient can't pass through its values. With HuggingFace models: "
            "model.gradient_checkpointing_enable(gradient_checkpointing_kwargs="
            "{'use_reentrant': False}), or gradient_checkpointing_disable()."
        )


def _tensors_in(value: Any) -> list[Tensor]:
    if isinstance(value, Tensor):
        return [value]
    if isinstance(value, (tuple, list)):
        return [t for v in value for t in _tensors_in(v)]
    if isinstance(value, dict):
        return [t for v in value.values() for t in _tensors_in(v)]
    return []


def _reached(values: Sequence[Tensor], handed: dict[Any, int]) -> set[int]:
    """The layers whose handed-out replacements the graph behind ``values`` holds."""
    stack = [v.grad_fn for v in values if v.grad_fn is not None]
    seen = set()
    reached = set()
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        source = handed.get(node)
        if source is not None:
            reached.add(source)
        stack.extend(next_node for next_node, _ in node.next_functions if next_node is not None)
    return reached
