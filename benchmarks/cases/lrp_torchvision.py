"""LRP on torchvision's resnet18 and vgg16 (random weights; batch norms with random statistics),
224x224 images, against the floor and zennit with the matching composite and canonizers.

    fastattr bench --cases benchmarks/cases/lrp_torchvision.py --batch-sizes 8 --repeats 5 \\
        --warmup 1 --no-memory

- ``lrp-resnet18``: fastattr with ``ResNetCanonizer`` (batch norms merged, the epsilon rule on
  the residual sums), zennit with its ``ResNetCanonizer`` (Captum's LRP has no canonizers: its
  column says so).
- ``lrp-resnet18-captum``: fastattr without canonizers, as Captum's LRP reads the model (their
  numbers differ where an activation feeds both a convolution and the residual sum: see the
  differences from Captum in docs/lrp/index.md).
- ``lrp-vgg16``: no batch norms, no sums: fastattr's, Captum's and zennit's defaults agree.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from fastattr.bench.cases import TARGET, Case
from fastattr.bench.contenders import zennit_relevance
from fastattr.bench.floors import input_floor
from fastattr.bench.models import seeded_model

IMAGE = (3, 224, 224)


def _images(batch: int, generator: torch.Generator) -> dict[str, Any]:
    return {"inputs": torch.randn(batch, *IMAGE, generator=generator)}


def resnet18() -> nn.Module:
    from torchvision.models import resnet18 as build

    return seeded_model(lambda: build(weights=None), 0)


def vgg16() -> nn.Module:
    from torchvision.models import vgg16 as build

    return seeded_model(lambda: build(weights=None), 0)


def _zennit(canonizers: Callable[[], list]) -> Callable[[nn.Module, dict], Callable[[], Any]]:
    """zennit's LRP with the rules fastattr applies by default and the given canonizers."""

    def contender(model: nn.Module, arguments: dict) -> Callable[[], Any]:
        from zennit.composites import LayerMapComposite
        from zennit.layer import Sum
        from zennit.rules import Epsilon, Norm, Pass
        from zennit.types import Activation

        made = canonizers()
        composite = LayerMapComposite(
            [
                (Activation, Pass()),
                (nn.Dropout, Pass()),
                (nn.BatchNorm2d, Pass()),  # merged by the canonizer
                ((nn.Linear, nn.Conv2d), Epsilon(1e-9)),
                ((nn.MaxPool2d, nn.AdaptiveAvgPool2d, Sum), Norm(1e-9)),
            ],
            canonizers=made,
        )
        return zennit_relevance(composite, model, arguments["inputs"], TARGET)

    return contender


def _resnet_canonizers() -> list:
    from zennit.torchvision import ResNetCanonizer

    return [ResNetCanonizer()]


def _with_resnet_canonizer(library: Any, model: nn.Module) -> Any:
    if not library.__name__.startswith("fastattr"):
        raise TypeError("Captum's LRP has no canonizers (no epsilon rule for residual sums)")
    from fastattr.canonizers import ResNetCanonizer

    return library.LRP(model, canonizers=[ResNetCanonizer()])


CASES = (
    Case(
        "LRP", "resnet18", resnet18, _images, input_floor, call_kwargs={"target": TARGET},
        uses_path=False, others={"zennit": _zennit(_resnet_canonizers)},
        construct=_with_resnet_canonizer,
    ),
    Case(
        "LRP", "resnet18", resnet18, _images, input_floor, call_kwargs={"target": TARGET},
        uses_path=False, name="lrp-resnet18-captum",
    ),
    Case(
        "LRP", "vgg16", vgg16, _images, input_floor, call_kwargs={"target": TARGET},
        uses_path=False, others={"zennit": _zennit(list)},
    ),
)  # fmt: skip
