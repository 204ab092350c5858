"""LRP (epsilon on linear layers, relevance passed through activations) side by side: the floor
(one plain forward + backward of the summed target output w.r.t. the input), fastattr, captum
and zennit, interleaved round by round, on the CPU.

    python benchmarks/bench_lrp.py [--threads 2] [--repeats 15]

Checks that fastattr's relevance agrees with captum's, then prints a markdown table of median
times and ratios.
"""

from __future__ import annotations

import argparse
import platform
import warnings
from collections.abc import Callable

import captum.attr
import torch
from torch import Tensor, nn
from zennit.composites import LayerMapComposite
from zennit.rules import Epsilon, Norm, Pass
from zennit.types import Activation, AvgPool

import fastattr
from fastattr.bench.models import IMAGE_SHAPE, MLP_FEATURES, cnn, mlp
from fastattr.bench.timing import interleaved_medians

TARGET = 3


def floor(model: nn.Module, x: Tensor) -> Callable[[], object]:
    def run() -> object:
        leaf = x.detach().requires_grad_()
        return torch.autograd.grad(model(leaf)[:, TARGET].sum(), leaf)

    return run


def zennit_lrp(model: nn.Module, x: Tensor) -> Callable[[], object]:
    # The same rules as fastattr's and captum's defaults on these models.
    composite = LayerMapComposite(
        [
            (Activation, Pass()),
            ((nn.Linear, nn.Conv2d), Epsilon(1e-9)),
            ((AvgPool, nn.MaxPool2d), Norm(1e-9)),
        ]
    )

    def run() -> object:
        leaf = x.detach().requires_grad_()
        with composite.context(model) as modified:
            output = modified(leaf)
            seed = torch.zeros_like(output)
            seed[:, TARGET] = output[:, TARGET]
            return torch.autograd.grad(output, leaf, seed)

    return run


def attribution(method: object, x: Tensor) -> Callable[[], object]:
    return lambda: method.attribute(x, target=TARGET)  # type: ignore[attr-defined]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=3)
    options = parser.parse_args()
    torch.set_num_threads(options.threads)
    warnings.filterwarnings("ignore")
    cases = [
        ("MLP 64-256-256-10, batch 256", mlp(), torch.randn(256, MLP_FEATURES)),
        ("small CNN 3x32x32, batch 64", cnn(), torch.randn(64, *IMAGE_SHAPE)),
    ]
    print(
        f"CPU ({platform.processor() or platform.machine()}), {options.threads} threads, "
        f"torch {torch.__version__}, captum {captum.__version__}, fastattr "
        f"{fastattr.__version__}; medians of {options.repeats} interleaved rounds\n"
    )
    print(
        "| model | floor | fastattr | captum | zennit | fastattr/floor | captum/fastattr "
        "| zennit/fastattr |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for name, model, x in cases:
        # Timings only count when the numbers agree.
        ours = fastattr.LRP(model).attribute(x, target=TARGET)
        theirs = captum.attr.LRP(model).attribute(x, target=TARGET)
        torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4 * float(theirs.abs().max()))
        medians = interleaved_medians(
            {
                "floor": floor(model, x),
                "fastattr": attribution(fastattr.LRP(model), x),
                "captum": attribution(captum.attr.LRP(model), x),
                "zennit": zennit_lrp(model, x),
            },
            warmup=options.warmup,
            repeats=options.repeats,
        )
        ms = {k: f"{v * 1e3:.2f} ms" for k, v in medians.items()}
        ratios = (
            medians["fastattr"] / medians["floor"],
            medians["captum"] / medians["fastattr"],
            medians["zennit"] / medians["fastattr"],
        )
        cells = [ms["floor"], ms["fastattr"], ms["captum"], ms["zennit"]]
        cells += [f"{r:.2f}" for r in ratios]
        print(f"| {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
