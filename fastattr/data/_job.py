"""What identifies a dataset job: the attribution, its model, every argument, the target, the
batch size and the dataset, as JSON that the store keeps and that a resumed run must match."""

from __future__ import annotations

import dataclasses
import hashlib
import inspect
import json
import math
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from fastattr._model_state import module_of
from fastattr.canonizers import Canonizer

# Arguments attribute_dataset supplies per batch: never part of the user's keywords.
PER_BATCH_ARGUMENTS = ("inputs", "target")
# The attributes through which a wrapper such as NoiseTunnel holds the attribution it wraps.
WRAPPED_ATTRIBUTES = ("attribution_method",)


def qualified_name(obj: Any) -> str:
    """``module.QualifiedName`` of a class or function, or of an object's class; fastattr's
    public classes by their public name (``fastattr.IntegratedGradients``)."""
    kind = obj if isinstance(obj, type) or inspect.isroutine(obj) else type(obj)
    import fastattr

    if getattr(fastattr, getattr(kind, "__name__", ""), None) is kind:
        return f"fastattr.{kind.__name__}"
    module = getattr(kind, "__module__", None)
    name = getattr(kind, "__qualname__", type(kind).__name__)
    return name if module in (None, "builtins") else f"{module}.{name}"


def tensor_digest(tensor: Tensor) -> str:
    """SHA-256 of a tensor's values (its dtype and shape included), wherever it lives."""
    digest = hashlib.sha256(f"{tensor.dtype}{tuple(tensor.shape)}".encode())
    flat = tensor.detach().reshape(-1).contiguous().cpu()
    digest.update(memoryview(flat.view(torch.uint8).numpy()))
    return digest.hexdigest()


def model_digest(model: nn.Module) -> str:
    """SHA-256 of a model's parameters and buffers, names included: equal digests, the same
    weights."""
    digest = hashlib.sha256()
    for name, value in model.state_dict(keep_vars=True).items():
        if isinstance(value, Tensor):
            digest.update(name.encode())
            digest.update(tensor_digest(value).encode())
    return digest.hexdigest()


def wrapped_attributions(attribution: Any) -> Iterator[Any]:
    """``attribution`` and every attribution it wraps, outermost first."""
    seen: set[int] = set()
    while attribution is not None and id(attribution) not in seen:
        seen.add(id(attribution))
        yield attribution
        attribution = next(
            (getattr(attribution, a) for a in WRAPPED_ATTRIBUTES if hasattr(attribution, a)), None
        )


def model_of(attribution: Any) -> nn.Module | None:
    """The module an attribution runs: its ``model`` (LRP), or the module behind its
    ``forward_func``, looking through wrappers."""
    for inner in wrapped_attributions(attribution):
        model = getattr(inner, "model", None)
        if isinstance(model, nn.Module):
            return model
        model = module_of(getattr(inner, "forward_func", None))
        if model is not None:
            return model
    return None


def forward_of(attribution: Any) -> Callable[..., Any] | None:
    """What the attribution calls to run the model, for ``target="predicted"``."""
    for inner in wrapped_attributions(attribution):
        for name in ("forward_func", "model"):
            forward = getattr(inner, name, None)
            if callable(forward):
                return forward
    return None


def attribute_parameters(attribution: Any) -> tuple[dict[str, inspect.Parameter], bool]:
    """The named parameters ``attribution.attribute`` takes, including those a wrapper passes
    on to the attribution it wraps through ``**kwargs``; and whether it takes any keyword
    (the innermost attribute() has ``**kwargs`` itself)."""
    parameters: dict[str, inspect.Parameter] = {}
    passes_on = False
    for inner in wrapped_attributions(attribution):
        signature = inspect.signature(inner.attribute)
        passes_on = False
        for name, parameter in signature.parameters.items():
            if parameter.kind is inspect.Parameter.VAR_KEYWORD:
                passes_on = True
            elif parameter.kind is not inspect.Parameter.VAR_POSITIONAL:
                parameters.setdefault(name, parameter)
        if not passes_on:
            break
    return parameters, passes_on


class Describer:
    """JSON for the values a job is made of. Modules of the job's model are named by their
    path in it; tensors and other modules by a digest of their values."""

    def __init__(self, model: nn.Module | None) -> None:
        self._names = {} if model is None else {id(m): n for n, m in model.named_modules()}
        self._model = model

    def __call__(self, value: Any, depth: int = 0) -> Any:
        if value is None or isinstance(value, (bool, int, str)):
            return value
        if isinstance(value, float):
            return value if math.isfinite(value) else repr(value)
        if isinstance(value, (np.integer, np.floating, np.bool_)):
            return self(value.item(), depth)
        if isinstance(value, Tensor):
            return {"tensor": {"shape": list(value.shape), "dtype": str(value.dtype)[6:],
                               "sha256": tensor_digest(value)}}  # fmt: skip
        if isinstance(value, np.ndarray):
            return self(torch.from_numpy(np.ascontiguousarray(value)), depth)
        if isinstance(value, nn.Module):
            if id(value) in self._names:
                return {"module": self._names[id(value)] or "<the model>"}
            return {"module": qualified_name(value), "sha256": model_digest(value)}
        if isinstance(value, tuple):
            return {"tuple": [self(v, depth + 1) for v in value]}
        if isinstance(value, list):
            return [self(v, depth + 1) for v in value]
        if isinstance(value, Mapping):
            return {str(k): self(v, depth + 1) for k, v in value.items()}
        if inspect.ismethod(value) and isinstance(value.__self__, nn.Module):
            return {"method": f"{self(value.__self__)['module']}.{value.__name__}"}
        if inspect.isroutine(value) or isinstance(value, type):
            return {"callable": qualified_name(value)}
        described: dict[str, Any] = {"object": qualified_name(value)}
        if depth < 3:
            state = vars(value) if hasattr(value, "__dict__") else {}
            # A canonizer keeps its settings in the rules it holds, private attributes.
            settings = isinstance(value, Canonizer)
            public = {k: v for k, v in state.items() if settings or not k.startswith("_")}
            if dataclasses.is_dataclass(value):
                public = {f.name: getattr(value, f.name) for f in dataclasses.fields(value)}
            if public:
                described["state"] = {k: self(v, depth + 1) for k, v in sorted(public.items())}
        return described

    def attribution(self, attribution: Any) -> dict[str, Any]:
        """The attribution's class and settings (layers, multiply_by_inputs, LRP rules),
        through any wrappers; the model itself is described once, elsewhere."""
        chain = []
        for inner in wrapped_attributions(attribution):
            settings: dict[str, Any] = {"class": qualified_name(inner)}
            if hasattr(inner, "multiplies_by_inputs"):
                settings["multiplies_by_inputs"] = bool(inner.multiplies_by_inputs)
            for key, value in sorted(vars(inner).items()):
                if key.startswith("_") or key in WRAPPED_ATTRIBUTES:
                    continue
                settings[key] = self(value)
            chain.append(settings)
        described: dict[str, Any] = {"classes": chain}
        rules = {
            name: self(module.rule)
            for name, module in (self._model.named_modules() if self._model else ())
            if getattr(module, "rule", None) is not None
        }
        if rules:
            described["module_rules"] = rules
        return described


def effective_arguments(
    parameters: Mapping[str, inspect.Parameter], given: Mapping[str, Any]
) -> dict[str, Any]:
    """Every argument ``attribute`` will see, the defaults included, so that leaving one out
    and passing its default describe the same job."""
    arguments = {
        name: parameter.default
        for name, parameter in parameters.items()
        if name not in PER_BATCH_ARGUMENTS and parameter.default is not inspect.Parameter.empty
    }
    arguments.update(given)
    return dict(sorted(arguments.items()))


# A message lists this many differences at most, and counts the rest.
LISTED_DIFFERENCES = 12


def listed(found: list[str]) -> str:
    """Differences as indented lines for a message: the first LISTED_DIFFERENCES, then how
    many more there are."""
    lines = found[:LISTED_DIFFERENCES]
    if len(found) > LISTED_DIFFERENCES:
        lines.append(f"... and {len(found) - LISTED_DIFFERENCES} more")
    return "".join(f"\n  {line}" for line in lines)


def differences(
    stored: Any, current: Any, path: str = "", theirs: str = "in the store"
) -> list[str]:
    """Where two job descriptions differ, as readable lines (empty when they are equal);
    ``theirs`` says where ``stored`` comes from."""
    if isinstance(stored, dict) and isinstance(current, dict):
        found = []
        for key in sorted(set(stored) | set(current), key=str):
            where = f"{path}.{key}" if path else str(key)
            if key not in stored:
                found.append(f"{where}: absent {theirs}, {_show(current[key])} here")
            elif key not in current:
                found.append(f"{where}: {_show(stored[key])} {theirs}, absent here")
            else:
                found += differences(stored[key], current[key], where, theirs)
        return found
    if isinstance(stored, list) and isinstance(current, list) and len(stored) == len(current):
        found = []
        for i, (a, b) in enumerate(zip(stored, current)):
            found += differences(a, b, f"{path}[{i}]", theirs)
        return found
    if stored != current:
        return [f"{path}: {_show(stored)} {theirs}, {_show(current)} here"]
    return []


def item_fingerprints(dataset: Any) -> dict[str, str]:
    """A SHA-256 of a few items of ``dataset`` (the first, the middle and the last: their
    tensors' values, dtypes and shapes, and any label), by index. Reading three items tells
    apart two datasets of one length and item format, such as two shards, without reading
    the rest."""
    length = len(dataset)
    describe = Describer(None)
    fingerprints = {}
    for index in sorted({0, length // 2, length - 1}):
        described = json.dumps(describe(dataset[index]), sort_keys=True)
        fingerprints[str(index)] = hashlib.sha256(described.encode()).hexdigest()
    return fingerprints


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 120 else text[:117] + "..."
