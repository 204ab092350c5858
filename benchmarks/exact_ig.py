"""Exact integrated gradients (``method="exact"``) against the 50-node Gauss-Legendre rule of
captum and of fastattr: pieces per example, rows through the model, time, and how far each
is from the exact integral.

    python benchmarks/exact_ig.py [--models mlp,cnn,resnet,resnet18] [--batch 4] \\
        [--repeats 3] [--threads 1] [--resnet18-size 32] [--out DIR]
    python benchmarks/exact_ig.py --first-kink-size 224 [--batch 2]

For each model (float32, eval mode, standard-normal inputs, zero baselines, target 1):

- pieces: the affine pieces of each example's path (``return_n_steps=True``);
- rows: the points the model ran on, counted by a forward pre-hook in an untimed run:
  ``method="exact"`` runs forward-only passes over the ends of the open segments while it
  splits the path, then one forward and backward per piece; the 50-node rule runs forward and
  backward over 50 points per example;
- time: medians of interleaved rounds (``fastattr.bench.timing.interleaved_medians``) after
  an untimed call of each;
- completeness: per example ``|sum(attributions) - (f(x) - f(0))| / |f(x) - f(0)|``;
- error of the 50-node rule: per example ``||A_50 - A_exact|| / ||A_exact||``.

``resnet18`` is torchvision's (``weights=None``) with batch-norm statistics drawn as the
benchmark's own models draw them (``fastattr.bench.models``): as built, every batch norm is the
identity and no layer has a bias before the classifier, so the network is positively
homogeneous and a path from a zero baseline is one piece. It runs on ``--resnet18-size``
square images.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from fastattr import IntegratedGradients
from fastattr.bench import cases, models
from fastattr.bench.runner import device_name
from fastattr.bench.timing import interleaved_medians

TARGET = cases.TARGET


def resnet18(size: int) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        import torchvision

        return models.seeded_model(lambda: torchvision.models.resnet18(weights=None), 4)

    return build


def image_batch(size: int) -> Callable[[int, torch.Generator], dict[str, Tensor]]:
    def make(batch: int, generator: torch.Generator) -> dict[str, Tensor]:
        inputs = torch.randn(batch, 3, size, size, generator=generator)
        return {"inputs": inputs, "baselines": torch.zeros_like(inputs)}

    return make


def studies(resnet18_size: int) -> dict[str, tuple[Callable[[], nn.Module], Any, str]]:
    return {
        "mlp": (models.mlp, cases.features, "64 features"),
        "cnn": (models.cnn, cases.images, "3x32x32"),
        "resnet": (models.resnet, cases.images, "3x32x32"),
        "resnet18": (
            resnet18(resnet18_size),
            image_batch(resnet18_size),
            f"3x{resnet18_size}x{resnet18_size}",
        ),
    }


class RowCounter:
    """Counts the rows the model runs on, with and without autograd."""

    def __init__(self, model: nn.Module) -> None:
        self.forward_only = 0
        self.with_backward = 0
        self._handle = model.register_forward_pre_hook(self._count)

    def _count(self, module: nn.Module, args: tuple[Any, ...]) -> None:
        if torch.is_grad_enabled():
            self.with_backward += args[0].shape[0]
        else:
            self.forward_only += args[0].shape[0]

    def remove(self) -> None:
        self._handle.remove()


def relative(values: Tensor, scale: Tensor) -> list[float]:
    return (values.abs() / scale.abs()).tolist()


def measure(
    name: str, build: Callable[[], nn.Module], make_batch: Any, batch: int, repeats: int
) -> dict[str, Any]:
    import captum.attr

    model = build()
    arguments = make_batch(batch, torch.Generator().manual_seed(0))
    inputs, baselines = arguments["inputs"], arguments["baselines"]
    ours = IntegratedGradients(model)
    theirs = captum.attr.IntegratedGradients(model)

    counter = RowCounter(model)
    exact, exact_delta, pieces = ours.attribute(
        inputs, baselines, target=TARGET, method="exact", return_convergence_delta=True,
        return_n_steps=True,
    )  # fmt: skip
    counter.remove()
    coarse, coarse_delta = theirs.attribute(
        inputs, baselines, target=TARGET, return_convergence_delta=True
    )
    with torch.no_grad():
        change = model(inputs)[:, TARGET] - model(baselines)[:, TARGET]
    error = (coarse - exact).flatten(1).norm(dim=1) / exact.flatten(1).norm(dim=1)

    def call(attributor: Any, **kwargs: Any) -> Callable[[], Any]:
        return lambda: attributor.attribute(inputs, baselines, target=TARGET, **kwargs)

    times = interleaved_medians(
        {
            "exact": call(ours, method="exact"),
            "fastattr_50": call(ours),
            "captum_50": call(theirs),
        },
        warmup=0,
        repeats=repeats,
    )
    return {
        "model": name,
        "batch": batch,
        "pieces": pieces.tolist(),
        "rows_exact_forward_only": counter.forward_only,
        "rows_exact_with_backward": counter.with_backward,
        "rows_50": 50 * batch,
        "seconds": times,
        "completeness_exact": relative(exact_delta, change),
        "completeness_50": relative(coarse_delta, change),
        "error_50_vs_exact": error.tolist(),
    }


def first_kink_segments(size: int, batch: int) -> list[int]:
    """resnet18 on size x size images: the segments each path has after the first round, the
    crossings of its first kink alone (a lower bound on its pieces, from two points)."""
    from fastattr._exact import _Splitter, forward_at_points

    model = resnet18(size)()
    arguments = image_batch(size)(batch, torch.Generator().manual_seed(0))
    splitter = _Splitter(
        (arguments["inputs"],),
        (arguments["baselines"],),
        forward_at_points(model, TARGET, None),
        None,
        model,
    )
    splitter.run_round(
        torch.arange(batch),
        torch.zeros(batch, dtype=torch.float64),
        torch.ones(batch, dtype=torch.float64),
    )
    examples = torch.cat([children[0] for children in splitter.children])
    return torch.bincount(examples, minlength=batch).tolist()


def row(record: dict[str, Any], shape: str) -> str:
    pieces = record["pieces"]
    seconds = record["seconds"]
    rows_exact = record["rows_exact_forward_only"] + record["rows_exact_with_backward"]
    cells = [
        f"`{record['model']}` ({shape})",
        f"{statistics.median(pieces):,.0f} ({min(pieces):,}-{max(pieces):,})",
        f"{record['rows_exact_forward_only']:,} + {record['rows_exact_with_backward']:,}",
        f"{rows_exact / record['rows_50']:.1f}",
        f"{seconds['exact']:.3g}",
        f"{seconds['fastattr_50']:.3g}",
        f"{seconds['captum_50']:.3g}",
        f"{seconds['exact'] / seconds['captum_50']:.1f}",
        f"{statistics.median(record['completeness_exact']):.1e}",
        f"{statistics.median(record['completeness_50']):.1e}",
        f"{statistics.median(record['error_50_vs_exact']):.1e}",
    ]
    return "| " + " | ".join(cells) + " |"


HEADER = (
    "| model | pieces per example: median (range) | exact rows: forward-only + "
    "forward/backward | exact rows / 50-node rows | exact s | fastattr 50 s | captum 50 s | "
    "exact / captum time | completeness, exact | completeness, 50 nodes | 50 nodes vs exact |\n"
    "|:--|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|"
)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="mlp,cnn,resnet,resnet18")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int)
    parser.add_argument("--resnet18-size", type=int, default=32)
    parser.add_argument(
        "--first-kink-size",
        type=int,
        help="instead: resnet18's segments after the first kink at this image size",
    )
    parser.add_argument("--out", type=Path, default=Path("fastattr-bench"))
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.first_kink_size:
        segments = first_kink_segments(args.first_kink_size, args.batch)
        print(f"resnet18, {args.first_kink_size}x{args.first_kink_size}: {segments} segments")
        return 0
    available = studies(args.resnet18_size)
    names = [n for n in args.models.split(",") if n]
    unknown = sorted(set(names) - set(available))
    if unknown:
        print(f"unknown model(s) {unknown}; known: {sorted(available)}", file=sys.stderr)
        return 2
    print(
        f"{device_name(torch.device('cpu'))}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} thread(s), batch {args.batch}, {args.repeats} rounds"
    )
    print(HEADER)
    records = []
    for name in names:
        build, make_batch, shape = available[name]
        record = measure(name, build, make_batch, args.batch, args.repeats)
        records.append(record)
        print(row(record, shape), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "exact_ig.json").write_text(json.dumps(records, indent=1))
    print(f"wrote {args.out / 'exact_ig.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
