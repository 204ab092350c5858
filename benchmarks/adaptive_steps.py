"""n_steps="auto" against Captum's default rule and against uniform step doubling.

    python benchmarks/adaptive_steps.py [--models mlp,cnn,resnet,transformer,resnet18,smooth]
        [--examples 32] [--reference] [--threads 1]

Model evaluations are counted as rows through the model (a forward and a backward each, or a
forward alone). ``"auto"``'s counts include its two forwards at the path's ends (they give its
errors and the delta); Gauss-Legendre's 50 leave out the two its delta needs. Per model:

1. Captum's default, Gauss-Legendre with 50 nodes (fastattr's fixed n_steps gives Captum's
   numbers): the median completeness error ``|sum(attributions) - (f(x) - f(x'))|`` over the
   examples, the target.
2. ``n_steps="auto"`` at a ladder of tolerances: the rows per example and the median
   completeness error reached; the cheapest tolerance that reaches the target is the figure.
3. At each tolerance, uniform per-example step doubling (the trapezoid rule on 2, 3, 5, 9,
   17, ... equally spaced nodes, each level reusing the last): the rows each example needs to
   meet the same per-example criterion as ``"auto"`` (``tolerance * max(|f(x) - f(x')|, 1)``).
4. With ``--reference``, the attributions' median relative L1 distance to a 2000-node
   trapezoid reference, for Gauss-Legendre 50 and for ``"auto"``: completeness is one
   projection of the attributions, and this shows how far the rest follows.

The models are the built-in MLP, CNN, ResNet and transformer (LayerIntegratedGradients on its
embedding, as in ``fastattr bench``), torchvision's resnet18 (weights=None, 224x224 inputs)
(in float64) and a smooth model (a tanh MLP, 64-256-256-10, in float64).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

import fastattr
from fastattr.bench import models
from fastattr.bench.runner import device_name

# Steps of 2 at most: the figure is the cheapest tolerance that reaches the target.
TOLERANCES = tuple(m * 10.0**-e for e in range(2, 13) for m in (5, 3, 2, 1))
DOUBLING_LEVELS = (2, 3, 5, 9, 17, 33, 65, 129)


class Counting(nn.Module):
    """Counts the rows of every forward of the wrapped callable."""

    def __init__(self, forward: Callable[..., Tensor]) -> None:
        super().__init__()
        self.forward_function = forward
        self.rows = 0

    def forward(self, *args: Any) -> Tensor:
        self.rows += args[0].shape[0]
        return self.forward_function(*args)


@dataclass
class Problem:
    """A model, a batch and how to attribute it (IG, or LayerIG on an embedding)."""

    name: str
    make: Callable[[nn.Module], Any]  # counting model -> attributor
    model: nn.Module
    inputs: Tensor
    baselines: Tensor

    def attribute(self, counting: Counting, **kwargs: Any) -> Any:
        return self.make(counting).attribute(self.inputs, baselines=self.baselines, **kwargs)


def problem(name: str, examples: int) -> Problem:
    generator = torch.Generator().manual_seed(0)
    ig = fastattr.IntegratedGradients
    if name in ("mlp", "cnn", "resnet"):
        model = getattr(models, name)()
        shape = (models.MLP_FEATURES,) if name == "mlp" else models.IMAGE_SHAPE
        inputs = torch.randn(examples, *shape, generator=generator)
        return Problem(name, ig, model, inputs, torch.zeros_like(inputs))
    if name == "transformer":
        model = models.transformer()
        shape = (examples, models.SEQUENCE_LENGTH)
        tokens = torch.randint(1, models.VOCAB_SIZE, shape, generator=generator)
        pad = torch.full_like(tokens, models.PAD_TOKEN)

        def make(counting: Counting) -> Any:
            return fastattr.LayerIntegratedGradients(counting, model.embedding)

        return Problem(name, make, model, tokens, pad)
    if name == "resnet18":
        import torchvision

        torch.manual_seed(0)
        # In float64 (see the smooth model): as built it is positively homogeneous from a zero
        # baseline, and in float32 one gradient already meets the rounding floor.
        model = torchvision.models.resnet18(weights=None).eval().double()
        inputs = torch.randn(examples, 3, 224, 224, generator=generator, dtype=torch.float64)
        return Problem(name, ig, model, inputs, torch.zeros_like(inputs))
    if name == "smooth":
        torch.manual_seed(0)
        # In float64: in float32 Gauss-Legendre reaches the rounding floor by 8 nodes, and the
        # medians would compare rounding noise.
        model = (
            nn.Sequential(
                nn.Linear(64, 256), nn.Tanh(), nn.Linear(256, 256), nn.Tanh(), nn.Linear(256, 10)
            )
            .eval()
            .double()
        )
        inputs = 2 * torch.randn(examples, 64, generator=generator, dtype=torch.float64)
        return Problem(name, ig, model, inputs, torch.zeros_like(inputs))
    raise ValueError(f"unknown model {name!r}")


def run(p: Problem, reference: bool) -> dict[str, Any]:
    counting = Counting(p.model)
    target = dict(target=1)
    gl, gl_delta = p.attribute(counting, n_steps=50, return_convergence_delta=True, **target)
    gl_median = float(gl_delta.abs().median())
    with torch.no_grad():
        end = counting(p.inputs)[:, 1] if p.name != "transformer" else p.model(p.inputs)[:, 1]
        start = (
            counting(p.baselines)[:, 1] if p.name != "transformer" else p.model(p.baselines)[:, 1]
        )
    change = (end - start).double()
    scale = change.abs().clamp(min=1.0)
    # Trapezoid errors at each doubling level (captum's riemann_trapezoid weights sum to
    # (n - 1) / n: rescaled to the trapezoid rule's).
    doubling_errors = {}
    for n in DOUBLING_LEVELS:
        _, delta = p.attribute(
            counting, n_steps=n, method="riemann_trapezoid", return_convergence_delta=True, **target
        )
        sums = delta.double() + change
        doubling_errors[n] = (sums * n / (n - 1) - change).abs()
    reference_attributions = None
    if reference:
        reference_attributions = (
            p.attribute(counting, n_steps=2000, method="riemann_trapezoid", **target).double()
            * 2000
            / 1999
        )

    def distance(attributions: Tensor) -> float:
        flat, ref = attributions.double().flatten(1), reference_attributions.flatten(1)
        return float(((flat - ref).abs().sum(1) / ref.abs().sum(1)).median())

    ladder = []
    for tolerance in TOLERANCES:
        counting.rows = 0
        attributions, delta, steps = p.attribute(
            counting,
            n_steps="auto",
            tolerance=tolerance,
            return_convergence_delta=True,
            return_n_steps=True,
            **target,
        )
        rows = counting.rows / len(p.inputs)
        if p.name == "transformer":
            rows -= 2  # LayerIG's two forwards for the layer's values at the ends
        # Uniform doubling: the first level meeting the same per-example criterion.
        wanted = tolerance * scale
        needed = torch.full_like(change, float("nan"))
        for n in reversed(DOUBLING_LEVELS):
            needed[doubling_errors[n] <= wanted] = n
        entry = {
            "tolerance": tolerance,
            "rows_per_example": rows,
            "mean_points": float(steps.float().mean()),
            "max_points": int(steps.max()),
            "median_error": float(delta.abs().median()),
            "doubling_points": float(needed.mean()),
            "doubling_unreached": int(needed.isnan().sum()),
        }
        if reference:
            entry["median_relative_l1"] = distance(attributions)
        ladder.append(entry)
        if entry["median_error"] < gl_median / 4 and entry["mean_points"] > 50:
            break
    reached = [e for e in ladder if e["median_error"] <= gl_median]
    best = min(reached, key=lambda e: e["rows_per_example"]) if reached else None
    result = {
        "model": p.name,
        "examples": len(p.inputs),
        "gl50_median_error": gl_median,
        "best": best,
        "ladder": ladder,
    }
    if reference:
        result["gl50_median_relative_l1"] = distance(gl)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="mlp,cnn,resnet,transformer,resnet18,smooth")
    parser.add_argument("--examples", type=int, default=32)
    parser.add_argument("--resnet18-examples", type=int, default=4)
    parser.add_argument("--reference", action="store_true")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(device_name(torch.device("cpu")))
    summary = []
    for name in args.models.split(","):
        examples = args.resnet18_examples if name == "resnet18" else args.examples
        result = run(problem(name, examples), args.reference and name != "resnet18")
        print(json.dumps(result))
        summary.append(result)
    print()
    print(
        "| model | examples | GL-50 median error | auto: tolerance | rows/example "
        "(of GL-50's 50) | median error | doubling at that tolerance |"
    )
    print("|:--|--:|--:|--:|--:|--:|--:|")
    for r in summary:
        best = r["best"]
        if best is None:
            print(
                f"| {r['model']} | {r['examples']} | {r['gl50_median_error']:.2e} | not reached |"
            )
            continue
        print(
            f"| {r['model']} | {r['examples']} | {r['gl50_median_error']:.2e} "
            f"| {best['tolerance']:g} | {best['rows_per_example']:.1f} "
            f"({best['rows_per_example'] / 50:.2f}) | {best['median_error']:.2e} "
            f"| {best['doubling_points']:.1f} |"
        )


if __name__ == "__main__":
    main()
