"""LRP (epsilon on linear layers, relevance passed through activations) side by side: the floor
(one plain forward + backward of the summed target output w.r.t. the input), fastattr, captum
and zennit, interleaved round by round.

    python benchmarks/bench_lrp.py [--threads 2] [--repeats 15]
    python benchmarks/bench_lrp.py --device cuda    # the issue's shapes and GPU-sized batches

Checks that fastattr's relevance agrees with captum's, then prints a markdown table of median
times and ratios.
"""

from __future__ import annotations

import argparse
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
from fastattr.bench.runner import script_device
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
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=3)
    options = parser.parse_args()
    torch.set_num_threads(options.threads)
    warnings.filterwarnings("ignore")
    device, machine = script_device(options.device, parser.error)
    # The shapes; on a GPU they are launch-bound, so larger batches are added too.
    mlp_batches, cnn_batches = (
        ([256, 16384], [64, 1024]) if device.type == "cuda" else ([256], [64])
    )
    cases = [
        (f"MLP 64-256-256-10, batch {b}", mlp(), torch.randn(b, MLP_FEATURES)) for b in mlp_batches
    ] + [
        (f"small CNN 3x32x32, batch {b}", cnn(), torch.randn(b, *IMAGE_SHAPE)) for b in cnn_batches
    ]
    print(
        f"{machine}, torch {torch.__version__}, captum "
        f"{captum.__version__}, fastattr {fastattr.__version__}; medians of {options.repeats} "
        "interleaved rounds\n"
    )
    print(
        "| model | floor | fastattr | captum | zennit | fastattr/floor | captum/fastattr "
        "| zennit/fastattr |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for name, model, x in cases:
        model, x = model.to(device), x.to(device)
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
            device=device,
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
