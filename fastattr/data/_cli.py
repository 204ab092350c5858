"""``fastattr attribute``: a dataset through an attribution method into a store, from the
command line; under ``torchrun`` every process takes its share."""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

METHODS = ("ig", "lig", "nig", "lrp")


def load_factory(spec: str, what: str) -> Any:
    """``MODULE:FACTORY`` (a module importable from the current directory, or a ``.py`` file)
    -> the factory's return value."""
    module_name, _, factory_name = spec.rpartition(":")
    if not module_name or not factory_name:
        raise ValueError(f"--{what} must be MODULE:FACTORY, got {spec!r}")
    if module_name.endswith(".py"):
        path = Path(module_name)
        loader_spec = importlib.util.spec_from_file_location(path.stem, path)
        if loader_spec is None or loader_spec.loader is None:
            raise ValueError(f"--{what}: can't load {module_name}")
        module = importlib.util.module_from_spec(loader_spec)
        loader_spec.loader.exec_module(module)
    else:
        if os.getcwd() not in sys.path and "" not in sys.path:
            sys.path.insert(0, os.getcwd())
        module = importlib.import_module(module_name)
    factory = getattr(module, factory_name, None)
    if not callable(factory):
        raise ValueError(f"--{what}: {module_name} has no callable {factory_name!r}")
    return factory()


def _target(text: str | None) -> Any:
    if text is None or text in ("label", "predicted"):
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--target must be an int, 'label' or 'predicted', got {text!r}"
        ) from None


def _argument(text: str) -> tuple[str, Any]:
    name, equals, value = text.partition("=")
    if not equals or not name:
        raise argparse.ArgumentTypeError(f"--arg must be NAME=VALUE, got {text!r}")
    try:
        return name, json.loads(value)
    except json.JSONDecodeError:
        return name, value


def add_parser(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "attribute",
        help="attribute a whole dataset into a resumable store",
        description="Attributes every example of a dataset and writes the results into a zarr "
        "store, one row per example; rerun the same command to resume an interrupted job. "
        "Under torchrun (`torchrun --nproc-per-node N -m fastattr attribute ...`) the "
        "processes share the work.",
    )
    parser.add_argument("--model", required=True, help="MODULE:FACTORY returning the model")
    parser.add_argument(
        "--data", required=True, help="MODULE:FACTORY returning a Dataset or a DataLoader"
    )
    parser.add_argument("--method", required=True, choices=METHODS)
    parser.add_argument("--out", required=True, type=Path, help="the store's directory")
    parser.add_argument(
        "--layer",
        help="dotted name of the model's layer (lig and nig; with lrp, LayerLRP of that layer)",
    )
    parser.add_argument(
        "--neuron", help="nig: the neuron's index in the layer's output, e.g. 3 or 0,4,4"
    )
    parser.add_argument("--target", type=_target, help="an int, 'label' or 'predicted'")
    parser.add_argument("--batch-size", type=int, help="examples per batch (default 32)")
    parser.add_argument("--n-steps", type=int, help="integration steps (ig, lig, nig)")
    parser.add_argument("--delta", action="store_true", help="store the convergence delta")
    parser.add_argument(
        "--arg",
        type=_argument,
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="another attribute() argument, VALUE as JSON (else a string); repeatable",
    )
    parser.add_argument(
        "--device",
        help="cpu, cuda or cuda:N (default: cuda when available; under torchrun each process "
        "uses cuda:LOCAL_RANK)",
    )
    parser.add_argument("--workers", type=int, help="DataLoader worker processes per process")
    parser.add_argument(
        "--overwrite", action="store_true", help="discard what --out holds and start over"
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.set_defaults(run=main)


def _device(requested: str | None, local_rank: int, distributed: bool) -> torch.device:
    name = requested or ("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("--device cuda but no CUDA GPU is available")
        if device.index is None:
            device = torch.device("cuda", local_rank if distributed else 0)
        torch.cuda.set_device(device)
    return device


def _layer(model: nn.Module, name: str | None, method: str) -> nn.Module:
    if name is None:
        raise ValueError(f"--method {method} needs --layer")
    try:
        return model.get_submodule(name)
    except AttributeError:
        names = [n for n, _ in model.named_modules() if n]
        raise ValueError(f"--layer {name!r} is not in the model; its layers: {names}") from None


def _attribution(args: argparse.Namespace, model: nn.Module) -> tuple[Any, dict[str, Any]]:
    import fastattr

    kwargs: dict[str, Any] = dict(args.arg)
    if args.neuron is not None and args.method != "nig":
        raise ValueError("--neuron is for --method nig")
    if args.layer is not None and args.method == "ig":
        raise ValueError("--layer is for lig, nig and lrp (LayerLRP); ig takes the inputs")
    if args.n_steps is not None:
        if args.method == "lrp":
            raise ValueError("--n-steps is for ig, lig and nig")
        if "n_steps" in kwargs:
            raise ValueError("n_steps given twice, by --n-steps and by --arg n_steps=...")
        kwargs["n_steps"] = args.n_steps
    if args.delta:
        if args.method == "nig":
            raise ValueError("--delta: NeuronIntegratedGradients has no convergence delta")
        kwargs["return_convergence_delta"] = True
    if args.method == "ig":
        return fastattr.IntegratedGradients(model), kwargs
    if args.method == "lig":
        return fastattr.LayerIntegratedGradients(model, _layer(model, args.layer, "lig")), kwargs
    if args.method == "nig":
        if args.neuron is None:
            raise ValueError("--method nig needs --neuron")
        neuron = tuple(int(i) for i in args.neuron.split(","))
        kwargs["neuron_selector"] = neuron[0] if len(neuron) == 1 else neuron
        return fastattr.NeuronIntegratedGradients(model, _layer(model, args.layer, "nig")), kwargs
    if args.layer is not None:
        return fastattr.LayerLRP(model, _layer(model, args.layer, "lrp")), kwargs
    return fastattr.LRP(model), kwargs


def main(args: argparse.Namespace) -> int:
    import fastattr

    launched = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    rank = int(os.environ.get("RANK", "0"))
    started_group = False
    try:
        device = _device(args.device, local_rank, launched > 1)
        if launched > 1 and not dist.is_initialized():
            backend = "nccl" if device.type == "cuda" else "gloo"
            dist.init_process_group(backend, device_id=device if backend == "nccl" else None)
            started_group = True
        model = load_factory(args.model, "model")
        if not isinstance(model, nn.Module):
            raise ValueError(f"--model must give a torch.nn.Module, got {type(model).__name__}")
        model = model.to(device).eval()
        data = load_factory(args.data, "data")
        if args.workers is not None:
            if isinstance(data, torch.utils.data.DataLoader):
                raise ValueError("--workers: the DataLoader from --data sets its own workers")
            data = torch.utils.data.DataLoader(
                data, batch_size=args.batch_size, num_workers=args.workers
            )
        attribution, kwargs = _attribution(args, model)
        started = time.perf_counter()
        store = fastattr.attribute_dataset(
            attribution,
            data,
            args.out,
            target=args.target,
            batch_size=args.batch_size,
            resume=not args.overwrite,
            progress=not args.no_progress,
            **kwargs,
        )
        seconds = time.perf_counter() - started
    except Exception as error:
        print(f"fastattr attribute (rank {rank}): {type(error).__name__}: {error}", file=sys.stderr)
        return 1
    finally:
        # Also after a failure: a group left to the interpreter's exit can abort the process
        # (SIGABRT from gloo's teardown) instead of returning the error's exit code.
        if started_group:
            dist.destroy_process_group()
    if rank == 0:
        computed = store.metadata["runs"][-1]["examples"]
        processes = f"{launched} process{'es' if launched > 1 else ''}"
        print(
            f"fastattr attribute: {computed} examples attributed in {seconds:.1f} s "
            f"({computed / seconds:.1f} examples/s, {processes} on {device.type}); "
            f"{int(store.complete.sum())}/{len(store)} complete in {store.path} "
            "(read it with fastattr.open_store)"
        )
    return 0
