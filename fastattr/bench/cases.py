"""What ``fastattr bench`` measures: one declarative [Case][fastattr.bench.cases.Case] per
(method, model).

A case says how to build the model and one batch's ``attribute()`` arguments, how to construct
the attribution class (fastattr's and Captum's take the same arguments, so one recipe serves
both), the floor (the model's own forward and backward over the same work) and any other
contenders, such as zennit's LRP. ``fastattr bench`` runs
[CASES][fastattr.bench.cases.CASES]; ``fastattr bench --cases FILE`` runs the ``CASES`` of a
Python file (or module) instead, which is how the studies in ``benchmarks/`` are written.
"""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fastattr.bench import contenders, models
from fastattr.bench.floors import (
    input_floor,
    layer_floor,
    layer_output_floor,
    neuron_floor,
    noise_floor,
    path_floor,
)

# The source of the built-in cases, for --cases and the memory worker.
BUILT_IN = "fastattr.bench.cases"
TARGET = 1

# The method's class name (in fastattr and captum.attr) and its short name on the command line.
METHODS = {
    "IntegratedGradients": "ig",
    "LayerIntegratedGradients": "lig",
    "NeuronIntegratedGradients": "nig",
    "LRP": "lrp",
    "NoiseTunnel": "nt",
    "LayerLRP": "llrp",
}

# ``attribute()``'s keyword arguments: inputs, baselines, target, n_steps, ...
Arguments = dict[str, Any]
# Given its own copy of the model and one batch's arguments, returns the call to time.
Contender = Callable[[nn.Module, Arguments], Callable[[], Any]]


@dataclass(frozen=True)
class Case:
    """One benchmark case.

    Attributes:
        method: The attribution class's name, in fastattr and in ``captum.attr`` (a key of
            [METHODS][fastattr.bench.cases.METHODS]). Cases of one method share a panel of the plot.
        model: The model's short name (``--models`` selects by it).
        make_model: Builds the model, seeded, in eval mode.
        make_batch: ``(batch_size, generator) -> arguments`` of one batch: ``inputs`` and, for
            path methods, ``baselines``; any per-batch argument such as
            ``additional_forward_args``.
        floor: The model's own work on the same rows (see [fastattr.bench.floors][]).
        layer: For the layer and neuron methods, the layer's name in the model.
        call_kwargs: Fixed ``attribute()`` arguments (``target``, ``neuron_selector``, ...);
            an ``n_steps`` here wins over the command line's.
        uses_path: Whether the method integrates along a path: it gets ``baselines`` and
            ``n_steps``; otherwise ``baselines`` is dropped.
        others: Further contenders by name, timed and compared with fastattr.
        construct: ``(library, model) -> attributor``, where library is ``fastattr`` or
            ``captum.attr``; by default ``library.<method>(model[, layer])``.
        quick: Whether ``--quick`` keeps this case (one per method).
        name: Unique within its source; by default ``<short method>-<model>``.
    """

    method: str
    model: str
    make_model: Callable[[], nn.Module]
    make_batch: Callable[[int, torch.Generator], Arguments]
    floor: Contender
    layer: str | None = None
    call_kwargs: Mapping[str, Any] = field(default_factory=dict)
    uses_path: bool = True
    others: Mapping[str, Contender] = field(default_factory=dict)
    construct: Callable[[Any, nn.Module], Any] | None = None
    quick: bool = False
    name: str = ""

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}: add its short name to METHODS")
        if not self.name:
            object.__setattr__(self, "name", f"{METHODS[self.method]}-{self.model}")

    def build(self, library: Any, model: nn.Module) -> Any:
        """The attribution object of ``library`` on ``model``.

        Args:
            library: ``fastattr`` or ``captum.attr``.
            model: The contender's copy of the model.
        """
        if self.construct is not None:
            return self.construct(library, model)
        cls = getattr(library, self.method)
        if self.layer is None:
            return cls(model)
        return cls(model, model.get_submodule(self.layer))

    def arguments(self, batch: Arguments, n_steps: int) -> Arguments:
        """Every ``attribute()`` argument for one batch (the floor and others get the same).

        Args:
            batch: The batch's arguments, from ``make_batch``.
            n_steps: Integration steps, for path methods unless ``call_kwargs`` fixes them.
        """
        arguments = {**self.call_kwargs, **batch}
        if self.uses_path:
            arguments.setdefault("n_steps", n_steps)
        else:
            arguments.pop("baselines", None)
        return arguments


class SeededNoise:
    """An attributor whose every call draws its noise from the same seed, so that fastattr's
    and Captum's NoiseTunnel see the same noise and their results can be compared.

    Args:
        attributor: The NoiseTunnel (or any attributor) to call.
        seed: The seed of torch's generators before each call.
    """

    def __init__(self, attributor: Any, seed: int = 0) -> None:
        self.attributor = attributor
        self.seed = seed

    def attribute(self, **arguments: Any) -> Any:
        """The wrapped ``attribute``, after seeding torch's generators.

        Args:
            **arguments: The wrapped method's arguments.
        """
        torch.manual_seed(self.seed)
        return self.attributor.attribute(**arguments)


def noise_tunnel(library: Any, model: nn.Module) -> SeededNoise:
    """``library.NoiseTunnel(library.IntegratedGradients(model))``, seeded per call.

    Args:
        library: ``fastattr`` or ``captum.attr``.
        model: The model.
    """
    return SeededNoise(library.NoiseTunnel(library.IntegratedGradients(model)))


def features(batch: int, generator: torch.Generator, count: int = models.MLP_FEATURES) -> Arguments:
    """Standard-normal feature vectors and zero baselines.

    Args:
        batch: The batch size.
        generator: The random source.
        count: Features per example.
    """
    inputs = torch.randn(batch, count, generator=generator)
    return {"inputs": inputs, "baselines": torch.zeros_like(inputs)}


def images(batch: int, generator: torch.Generator) -> Arguments:
    """Standard-normal ``3x32x32`` images and zero baselines.

    Args:
        batch: The batch size.
        generator: The random source.
    """
    inputs = torch.randn(batch, *models.IMAGE_SHAPE, generator=generator)
    return {"inputs": inputs, "baselines": torch.zeros_like(inputs)}


def tokens(batch: int, generator: torch.Generator, masked: bool = False) -> Arguments:
    """Token ids and baselines of padding tokens.

    Args:
        batch: The batch size.
        generator: The random source.
        masked: Pad each sequence after a random length of at least half, and pass the mask
            (1 for tokens, 0 for padding) as an additional forward argument.
    """
    shape = (batch, models.SEQUENCE_LENGTH)
    ids = torch.randint(1, models.VOCAB_SIZE, shape, generator=generator)
    arguments: Arguments = {"baselines": torch.full_like(ids, models.PAD_TOKEN)}
    if masked:
        length = models.SEQUENCE_LENGTH
        lengths = torch.randint(length // 2, length + 1, (batch, 1), generator=generator)
        mask = (torch.arange(length) < lengths).long()
        ids = ids * mask
        arguments["additional_forward_args"] = (mask,)
    arguments["inputs"] = ids
    return arguments


CASES: tuple[Case, ...] = (
    Case(
        "IntegratedGradients", "mlp", models.mlp, features, path_floor,
        call_kwargs={"target": TARGET},
    ),
    Case(
        "IntegratedGradients", "cnn", models.cnn, images, path_floor,
        call_kwargs={"target": TARGET}, quick=True,
    ),
    Case(
        "IntegratedGradients", "resnet", models.resnet, images, path_floor,
        call_kwargs={"target": TARGET},
    ),
    Case(
        "LayerIntegratedGradients", "transformer", models.transformer, tokens,
        layer_floor("embedding"), layer="embedding", call_kwargs={"target": TARGET},
        quick=True,
    ),
    Case(
        "NeuronIntegratedGradients", "mlp", models.mlp, features, neuron_floor("fc2"),
        layer="fc2", call_kwargs={"neuron_selector": 7}, quick=True,
    ),
    Case(
        "NeuronIntegratedGradients", "cnn", models.cnn, images, neuron_floor("conv2"),
        layer="conv2", call_kwargs={"neuron_selector": (5, 4, 4)},
    ),
    Case(
        "LRP", "mlp", models.mlp, features, input_floor, call_kwargs={"target": TARGET},
        uses_path=False, others={"zennit": contenders.zennit_epsilon},
    ),
    Case(
        "LRP", "cnn", models.cnn, images, input_floor, call_kwargs={"target": TARGET},
        uses_path=False, others={"zennit": contenders.zennit_epsilon}, quick=True,
    ),
    # SmoothGrad of IntegratedGradients: 10 noisy copies per example, each integrated along
    # n_steps points (fastattr streams copies and steps through one chunked engine).
    Case(
        "NoiseTunnel", "mlp", models.mlp, features, noise_floor, construct=noise_tunnel,
        call_kwargs={"target": TARGET, "nt_samples": 10, "stdevs": 0.1}, quick=True,
    ),
    # The residual `+` gets the epsilon rule of a sum, by name; Captum's LRP has no such rule
    # (and none for nn.Identity), and zennit's rules above none either.
    Case(
        "LRP", "resnet", models.resnet, images, input_floor, call_kwargs={"target": TARGET},
        uses_path=False, construct=contenders.lrp_with_residual_sums,
    ),
    # LRP for transformers (AttnLRP) from token ids: the relevance of each embedded token.
    # Captum's LayerLRP has no rule for the embedding, layer norm or attention.
    Case(
        "LayerLRP", "transformer", models.transformer, tokens,
        layer_output_floor("embedding"), layer="embedding", call_kwargs={"target": TARGET},
        uses_path=False, construct=contenders.with_attnlrp("embedding"), quick=True,
    ),
)  # fmt: skip


def load(source: str = BUILT_IN) -> tuple[Case, ...]:
    """The ``CASES`` of a Python file or module.

    Args:
        source: A path ending in ``.py`` (``benchmarks/cases/x.py``) or a module name.

    Raises:
        ValueError: ``source`` cannot be imported, has no ``CASES`` of
            [Case][fastattr.bench.cases.Case], or two of its cases share a name.
    """
    if source.endswith(".py") or Path(source).is_file():
        path = Path(source).resolve()
        if not path.is_file():
            raise ValueError(f"no case file {source!r}")
        spec = importlib.util.spec_from_file_location(f"fastattr_bench_cases_{path.stem}", path)
        module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
        spec.loader.exec_module(module)  # type: ignore[union-attr]
    else:
        try:
            module = importlib.import_module(source)
        except ImportError as error:
            raise ValueError(f"cannot import the cases of {source!r}: {error}") from None
    found = getattr(module, "CASES", None)
    if not isinstance(found, Sequence) or not all(isinstance(c, Case) for c in found):
        raise ValueError(f"{source!r} has no CASES: a sequence of fastattr.bench.cases.Case")
    names = [case.name for case in found]
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise ValueError(f"{source!r} has several cases named {repeated}")
    return tuple(found)


def select(
    methods: list[str] | None = None,
    model_names: list[str] | None = None,
    quick: bool = False,
    cases: Sequence[Case] = CASES,
) -> list[Case]:
    """The cases of the given methods and models; all by default.

    Args:
        methods: Class or short names (``IntegratedGradients`` or ``ig``).
        model_names: Model names of the cases.
        quick: Keep only the cases marked quick, unless models are named or none is marked.
        cases: The cases to choose from.

    Raises:
        ValueError: A method or model is unknown.
    """
    chosen = list(cases)
    if quick and not model_names and any(case.quick for case in cases):
        chosen = [case for case in chosen if case.quick]
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
        known_models = sorted({case.model for case in cases})
        unknown = sorted(set(model_names) - set(known_models))
        if unknown:
            raise ValueError(f"unknown model(s) {unknown}; known: {known_models}")
        chosen = [case for case in chosen if case.model in model_names]
    return chosen
