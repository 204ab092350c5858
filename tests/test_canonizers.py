"""Canonizers against zennit's counterparts with the matching composite (float64, to rounding),
merged rules with modified weights against the model merged by hand, and the model left as
found."""

from __future__ import annotations

import copy
from collections import Counter

import pytest
import torch
import zennit.composites as zc
import zennit.rules as zr
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torchvision.models import densenet121, resnet18, resnet50, vgg11_bn
from torchvision.models.densenet import _DenseLayer
from zennit.canonizers import NamedMergeBatchNorm, SequentialMergeBatchNorm
from zennit.core import Stabilizer
from zennit.layer import Sum
from zennit.rules import Epsilon, Norm, Pass
from zennit.torchvision import ResNetCanonizer as ZennitResNetCanonizer
from zennit.types import Activation
from zennit.types import Linear as ZennitLinear

from fastattr import (
    LRP,
    AlphaBetaRule,
    EpsilonRule,
    FlatRule,
    GammaRule,
    GeneralizedGammaRule,
    IdentityRule,
    LayerLRP,
    ZBoxRule,
    ZPlusRule,
)
from fastattr.canonizers import (
    Canonizer,
    EpsilonAlpha2Beta1,
    EpsilonAlpha2Beta1Flat,
    EpsilonGammaBox,
    EpsilonPlus,
    EpsilonPlusFlat,
    EpsilonSum,
    LayerMapComposite,
    MergeBatchNorm,
    NameMapComposite,
    ResNetCanonizer,
    SpecialFirstLayerMapComposite,
)

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

F64 = torch.float64


def _close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    torch.testing.assert_close(
        actual, expected, rtol=1e-11, atol=1e-11 * float(expected.abs().max())
    )


def _zennit(model: nn.Module, x: torch.Tensor, target: int, canonizers: list) -> torch.Tensor:
    """zennit with the rules fastattr applies by default (epsilon 1e-9 on linear maps, the
    pooling layers and sums as their share of the output, relevance passed through
    activations), and batch norms passed through once merged (as zennit's own composites)."""
    linear = (nn.Linear, nn.Conv2d)
    shares = (nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, Sum)
    layer_map = [(Activation, Pass()), (nn.Dropout, Pass()), (linear, Epsilon(1e-9))]
    layer_map.append((nn.BatchNorm2d, Pass() if canonizers else Epsilon(1e-9)))
    layer_map.append((shares, Norm(1e-9)))
    composite = zc.LayerMapComposite(layer_map, canonizers=canonizers)
    x = x.clone().requires_grad_()
    with composite.context(model) as modified:
        output = modified(x)
        seed = torch.zeros_like(output)
        seed[:, target] = output[:, target]
        (relevance,) = torch.autograd.grad(output, x, seed)
    return relevance


def _random_statistics(model: nn.Module, seed: int = 0) -> nn.Module:
    """Batch norms with statistics and affine parameters far from the identity, so that merging
    matters. Their eps is 0: zennit 0.5.1 leaves a merged batch norm's eps in place, so its
    "identity" would divide by sqrt(1 + eps) and differ from the model by more than rounding."""
    torch.manual_seed(seed)
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.running_mean.normal_(0, 0.2)
            module.running_var.uniform_(0.5, 1.5)
            nn.init.uniform_(module.weight, 0.5, 1.5)
            nn.init.uniform_(module.bias, -0.1, 0.1)
            module.eps = 0.0
    return model.to(F64).eval()


@pytest.mark.parametrize(
    ("build", "ours", "theirs"),
    [
        (resnet18, ResNetCanonizer, ZennitResNetCanonizer),
        (resnet50, ResNetCanonizer, ZennitResNetCanonizer),
        (vgg11_bn, MergeBatchNorm, SequentialMergeBatchNorm),
    ],
    ids=["resnet18", "resnet50", "vgg11_bn"],
)
def test_torchvision_models_match_zennit(build, ours: type, theirs: type) -> None:
    torch.manual_seed(0)
    model = _random_statistics(build(weights=None))
    x = torch.randn(1, 3, 32, 32, dtype=F64)
    state = copy.deepcopy(model.state_dict())
    relevance = LRP(model, canonizers=[ours()]).attribute(x, target=3)
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key]), key
    _close(relevance, _zennit(model, x, 3, [theirs()]))


class Block(nn.Module):
    """A residual block whose `+` is spelled in several ways (or is a zennit Sum)."""

    def __init__(self, spelling: str) -> None:
        super().__init__()
        self.spelling = spelling
        self.conv1 = nn.Conv2d(3, 3, 3, padding=1, bias=False)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(3, 3, 3, padding=1, bias=False)
        self.relu2 = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(3, 4, bias=False)
        self.sum = Sum() if spelling == "zennit" else None

    def merge(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return a + b

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv2(self.relu1(self.conv1(x)))
        if self.sum is not None:
            out = self.sum(torch.stack([out, x], dim=-1))
        elif self.spelling == "+=":
            out += x
        elif self.spelling == "add_":
            out.add_(x)  # result discarded: only the in-place update keeps this model right
        elif self.spelling == "torch.add":
            out = torch.add(out, x)
        elif self.spelling == "helper":
            out = self.merge(out, x)
        else:
            out = out + x
        return self.fc(self.pool(self.relu2(out)).flatten(1))


@pytest.mark.parametrize("spelling", ["+", "+=", "add_", "torch.add", "helper"])
def test_epsilon_sum_matches_zennit_sum_and_conserves(spelling: str) -> None:
    torch.manual_seed(0)
    reference = Block("zennit").to(F64)
    model = Block(spelling).to(F64)
    model.load_state_dict(reference.state_dict())
    x = torch.randn(4, 3, 6, 6, dtype=F64)
    relevance, delta = LRP(model, canonizers=[EpsilonSum()]).attribute(
        x, target=2, return_convergence_delta=True
    )
    _close(relevance, _zennit(reference, x, 2, []))
    # Bias-free: only the stabilizers absorb anything.
    scale = float(model(x)[:, 2].abs().max())
    torch.testing.assert_close(delta, torch.zeros_like(delta), rtol=0, atol=1e-7 * scale)


def test_epsilon_sum_takes_a_callable_stabilizer_as_zennit_s_norm() -> None:
    torch.manual_seed(0)
    reference = Block("zennit").to(F64)
    model = Block("+").to(F64)
    model.load_state_dict(reference.state_dict())
    x = torch.randn(4, 3, 6, 6, dtype=F64)
    layer_map = [
        (Activation, Pass()),
        ((nn.Linear, nn.Conv2d), Epsilon(1e-9)),
        (nn.AdaptiveAvgPool2d, Norm(1e-9)),
        (Sum, Norm(_scaled)),
    ]
    expected = _zennit_composite(reference, x, 2, zc.LayerMapComposite(layer_map))
    _close(LRP(model, canonizers=[EpsilonSum(_scaled)]).attribute(x, target=2), expected)


def test_merged_rules_with_modified_weights_match_the_model_merged_by_hand() -> None:
    torch.manual_seed(0)
    model = _random_statistics(
        nn.Sequential(
            nn.Conv2d(3, 4, 3),
            nn.BatchNorm2d(4),
            nn.ReLU(inplace=True),
            nn.Conv2d(4, 4, 3, bias=False),
            nn.BatchNorm2d(4),
            nn.ReLU(),
            nn.Flatten(),
            nn.Linear(4 * 4 * 4, 3),
        )
    )
    merged = copy.deepcopy(model)
    SequentialMergeBatchNorm().apply(merged)  # merges into the convolutions, by hand
    for module in merged:
        if isinstance(module, nn.BatchNorm2d):
            module.rule = fastattr_identity()
    x = torch.randn(2, 3, 8, 8, dtype=F64)
    for conv in (0, 3):
        model[conv].rule = GammaRule(0.5, set_bias_to_zero=conv == 0)
        merged[conv].rule = GammaRule(0.5, set_bias_to_zero=conv == 0)
    ours = LRP(model, canonizers=[MergeBatchNorm()]).attribute(x, target=1)
    _close(ours, LRP(merged).attribute(x, target=1))
    # LayerLRP on a convolution a batch norm merges into applies the same merged rules.
    for to_input in (True, False):
        _close(
            LayerLRP(model, model[3], canonizers=[MergeBatchNorm()]).attribute(
                x, target=1, attribute_to_layer_input=to_input
            ),
            LayerLRP(merged, merged[3]).attribute(x, target=1, attribute_to_layer_input=to_input),
        )
    # With modified weights, merging first is not the same as the rules on the parts.
    assert (ours - LRP(model).attribute(x, target=1)).abs().max() > 1e-3 * ours.abs().max()


def fastattr_identity() -> IdentityRule:
    return IdentityRule()


def test_only_batch_norms_that_receive_a_linear_output_merge() -> None:
    # bn1 follows a ReLU and keeps its epsilon rule; bn2 merges into fc2 (zennit merges the
    # same two, here by the order of the modules).
    class Model(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc1 = nn.Linear(5, 6)
            self.relu = nn.ReLU()
            self.bn1 = nn.BatchNorm1d(6)
            self.fc2 = nn.Linear(6, 6)
            self.bn2 = nn.BatchNorm1d(6)
            self.head = nn.Linear(6, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.bn1(self.relu(self.fc1(x)))
            return self.head(self.bn2(self.fc2(h)))

    torch.manual_seed(0)
    model = Model()
    for bn in (model.bn1, model.bn2):
        bn.running_mean.normal_(0, 0.2)
        bn.running_var.uniform_(0.5, 1.5)
    model = model.to(F64).eval()
    hand = copy.deepcopy(model)
    SequentialMergeBatchNorm().apply(hand)
    hand.bn2.eps = 0.0  # the identity zennit means (see _random_statistics)
    hand.bn2.rule = fastattr_identity()
    x = torch.randn(3, 5, dtype=F64)
    merge = [MergeBatchNorm()]
    _close(LRP(model, canonizers=merge).attribute(x, target=0), LRP(hand).attribute(x, target=0))
    for to_input in (False, True):
        _close(
            LayerLRP(model, model.bn1, canonizers=merge).attribute(
                x, target=0, attribute_to_layer_input=to_input
            ),
            LayerLRP(hand, hand.bn1).attribute(x, target=0, attribute_to_layer_input=to_input),
        )


def test_canonizers_are_checked_and_compose() -> None:
    model = nn.Sequential(nn.Linear(3, 2))
    with pytest.raises(TypeError, match="canonizers"):
        LRP(model, canonizers=EpsilonSum())  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"canonizers\[1\]"):
        LRP(model, canonizers=[EpsilonSum(), "merge"])  # type: ignore[list-item]
    with pytest.raises(ValueError, match="epsilon"):
        EpsilonSum(-1.0)
    x = torch.randn(2, 3)
    _close(
        LRP(model, canonizers=[Canonizer(), EpsilonSum()]).attribute(x, target=0),
        LRP(model).attribute(x, target=0),
    )
    assert repr(EpsilonSum(0.5)) == "EpsilonSum(epsilon=0.5)"
    assert repr(ResNetCanonizer(0.5)) == "ResNetCanonizer(epsilon=0.5)"


# zennit's composites: the rules by module type and the first layer's by position.


class _CompositeNet(nn.Module):
    """The first layer inside a container, average pooling (plain and adaptive), a batch
    norm with random statistics, convolutions and linear layers."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 6, 3, padding=1),
            nn.ReLU(),
            nn.AvgPool2d(2),
            nn.Conv2d(6, 8, 3, padding=1),
            nn.BatchNorm2d(8),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(2),
        )
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(32, 10), nn.ReLU(), nn.Linear(10, 4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def _zennit_composite(model: nn.Module, x: torch.Tensor, target: int, composite) -> torch.Tensor:
    return _zennit_relevance(model, x, target, composite)[0]


def _zennit_relevance(
    model: nn.Module, x: torch.Tensor, target: int, composite, layers: tuple = ()
) -> tuple[torch.Tensor, ...]:
    """zennit's relevance at the input, then at each layer's output (its gradient there: the
    relevance the modules after it send back)."""
    x = x.clone().requires_grad_()
    outputs: dict[nn.Module, torch.Tensor] = {}
    # Registered before zennit's hooks: they see the layers' own outputs.
    handles = [
        layer.register_forward_hook(lambda module, _, output: outputs.setdefault(module, output))
        for layer in layers
    ]
    try:
        with composite.context(model) as modified:
            output = modified(x)
            seed = torch.zeros_like(output)
            seed[:, target] = output[:, target]
            return torch.autograd.grad(output, [x, *(outputs[m] for m in layers)], seed)
    finally:
        for handle in handles:
            handle.remove()


_POOLS = (nn.AvgPool2d, nn.AdaptiveAvgPool2d)


def _scaled(z: torch.Tensor) -> torch.Tensor:
    """A callable stabilizer, as zennit takes them: the stabilized denominator itself."""
    return 1.25 * z + torch.where(z < 0, -1e-3, 1e-3)


def _type_map() -> list:
    """A user's map: alpha-beta on convolutions, epsilon 1e-3 on linear layers, average
    pooling's ratio, batch norms passed through."""
    return [
        (nn.Conv2d, AlphaBetaRule(2, 1)),
        (nn.Linear, EpsilonRule(1e-3)),
        (_POOLS, EpsilonRule(1e-6)),
        (nn.BatchNorm2d, IdentityRule()),
    ]


def _zennit_type_map() -> list:
    return [
        (Activation, Pass()),
        (nn.Conv2d, zr.AlphaBeta(2.0, 1.0)),
        (nn.Linear, Epsilon(1e-3)),
        (_POOLS, Norm(1e-6)),
        (nn.BatchNorm2d, Pass()),
    ]


# zennit's side takes its composite's keyword arguments (canonizers, layer_map).
COMPOSITES = [
    ("EpsilonPlusFlat", lambda: EpsilonPlusFlat(), lambda **kw: zc.EpsilonPlusFlat(**kw)),
    (
        "EpsilonAlpha2Beta1",
        lambda: EpsilonAlpha2Beta1(),
        lambda **kw: zc.EpsilonAlpha2Beta1(**kw),
    ),
    (
        "EpsilonGammaBox",
        lambda: EpsilonGammaBox(0.0, 1.0),
        lambda **kw: zc.EpsilonGammaBox(torch.tensor(0.0), torch.tensor(1.0), **kw),
    ),
    ("EpsilonPlus", lambda: EpsilonPlus(), lambda **kw: zc.EpsilonPlus(**kw)),
    (
        "EpsilonAlpha2Beta1Flat",
        lambda: EpsilonAlpha2Beta1Flat(),
        lambda **kw: zc.EpsilonAlpha2Beta1Flat(**kw),
    ),
    (
        "EpsilonAlpha2Beta1Flat(arguments)",
        lambda: EpsilonAlpha2Beta1Flat(epsilon=1e-3, stabilizer=1e-4),
        lambda **kw: zc.EpsilonAlpha2Beta1Flat(epsilon=1e-3, stabilizer=1e-4, **kw),
    ),
    (
        "LayerMapComposite",
        lambda: LayerMapComposite(_type_map()),
        lambda **kw: zc.LayerMapComposite(_zennit_type_map(), **kw),
    ),
    (
        "SpecialFirstLayerMapComposite",
        lambda: SpecialFirstLayerMapComposite(_type_map(), [((nn.Linear, nn.Conv2d), FlatRule())]),
        lambda **kw: zc.SpecialFirstLayerMapComposite(
            _zennit_type_map(), [(ZennitLinear, zr.Flat())], **kw
        ),
    ),
    (
        "EpsilonPlusFlat(callables)",
        lambda: EpsilonPlusFlat(epsilon=Stabilizer(0.1, norm_scale=True), stabilizer=_scaled),
        lambda **kw: zc.EpsilonPlusFlat(
            epsilon=Stabilizer(0.1, norm_scale=True), stabilizer=_scaled, **kw
        ),
    ),
    (
        "EpsilonGammaBox(arguments)",
        lambda: EpsilonGammaBox(-1.0, 2.0, epsilon=1e-3, gamma=0.5, stabilizer=1e-4),
        lambda **kw: zc.EpsilonGammaBox(
            torch.tensor(-1.0), torch.tensor(2.0), epsilon=1e-3, gamma=0.5, stabilizer=1e-4, **kw
        ),
    ),
    # zero_params, in each of its forms, given to every rule the composite makes.
    (
        "EpsilonPlus(zero_params)",
        lambda: EpsilonPlus(zero_params="bias"),
        lambda **kw: zc.EpsilonPlus(zero_params="bias", **kw),
    ),
    (
        "EpsilonPlusFlat(zero_params)",
        lambda: EpsilonPlusFlat(zero_params=["bias"]),
        lambda **kw: zc.EpsilonPlusFlat(zero_params=["bias"], **kw),
    ),
    (
        "EpsilonAlpha2Beta1(zero_params)",
        lambda: EpsilonAlpha2Beta1(zero_params=("bias",)),
        lambda **kw: zc.EpsilonAlpha2Beta1(zero_params=("bias",), **kw),
    ),
    (
        "EpsilonAlpha2Beta1Flat(zero_params)",
        lambda: EpsilonAlpha2Beta1Flat(zero_params="bias"),
        lambda **kw: zc.EpsilonAlpha2Beta1Flat(zero_params="bias", **kw),
    ),
    (
        "EpsilonGammaBox(zero_params)",
        lambda: EpsilonGammaBox(0.0, 1.0, zero_params=["bias"]),
        lambda **kw: zc.EpsilonGammaBox(
            torch.tensor(0.0), torch.tensor(1.0), zero_params=["bias"], **kw
        ),
    ),
]


@pytest.mark.parametrize("case", COMPOSITES, ids=[case[0] for case in COMPOSITES])
def test_composites_match_zennit(case) -> None:
    _, ours, theirs = case
    torch.manual_seed(0)
    conv = _random_statistics(_CompositeNet().to(F64).eval())
    mlp = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3)).to(F64).eval()
    for model, x in [(conv, torch.rand(2, 3, 8, 8, dtype=F64)), (mlp, torch.rand(3, 6, dtype=F64))]:
        before = copy.deepcopy(model.state_dict())
        expected = _zennit_composite(model, x, 1, theirs())
        lrp = LRP(model, canonizers=[ours()])
        _close(lrp.attribute(x, target=1), expected)
        _close(lrp.attribute(x, target=1), expected)  # the plan, reused
        first = next(m for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d)))
        layer = LayerLRP(model, first, canonizers=[ours()])
        _close(layer.attribute(x, target=1, attribute_to_layer_input=True), expected)
        assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
        assert not any(hasattr(m, "rule") for m in model.modules())


ZERO_PARAMS = [case for case in COMPOSITES if case[0].endswith("(zero_params)")]


def _without_zero_params(name: str) -> tuple:
    """The case of the same composite without zero_params."""
    return next(case for case in COMPOSITES if case[0] == name.removesuffix("(zero_params)"))


@pytest.mark.parametrize("case", ZERO_PARAMS, ids=[case[0] for case in ZERO_PARAMS])
def test_composites_zero_params_change_their_numbers(case) -> None:
    # The cases above test zero_params: without it, each composite's numbers differ.
    name, ours, _ = case
    plain = _without_zero_params(name)[1]
    torch.manual_seed(0)
    model = _random_statistics(_CompositeNet().to(F64).eval())
    x = torch.rand(2, 3, 8, 8, dtype=F64)
    zeroed = LRP(model, canonizers=[ours()]).attribute(x, target=1)
    unzeroed = LRP(model, canonizers=[plain()]).attribute(x, target=1)
    assert (zeroed - unzeroed).abs().max() > 1e-2 * unzeroed.abs().max()


@pytest.mark.parametrize("case", ZERO_PARAMS, ids=[case[0] for case in ZERO_PARAMS])
def test_composites_zero_params_zero_the_bias_of_merged_batch_norms(case) -> None:
    # Merged, a layer has the batch norm's bias, even where it has none of its own (zennit's
    # merge makes one): zero_params zero it, convolutions' and linear layers' alike.
    name, ours, theirs = case
    torch.manual_seed(0)
    model = _random_statistics(
        nn.Sequential(
            nn.Conv2d(3, 4, 3, padding=1, bias=False),
            nn.BatchNorm2d(4),
            nn.ReLU(),
            nn.Conv2d(4, 4, 3),
            nn.BatchNorm2d(4),
            nn.ReLU(),
            nn.Flatten(),
            nn.Linear(4 * 4 * 4, 8, bias=False),
            nn.BatchNorm1d(8),
            nn.ReLU(),
            nn.Linear(8, 3),
        )
    )
    x = torch.rand(2, 3, 6, 6, dtype=F64)
    merge = [SequentialMergeBatchNorm()]
    expected = _zennit_composite(model, x, 1, theirs(canonizers=merge))
    unzeroed = _zennit_composite(model, x, 1, _without_zero_params(name)[2](canonizers=merge))
    assert (expected - unzeroed).abs().max() > 1e-2 * unzeroed.abs().max()
    for canonizers in ([MergeBatchNorm(), ours()], [ours(), MergeBatchNorm()]):
        _close(LRP(model, canonizers=canonizers).attribute(x, target=1), expected)


def test_name_maps_and_layer_maps_after_a_composite_match_zennit() -> None:
    # zennit's NameLayerMapComposite is a LayerMapComposite, then a NameMapComposite; its
    # composites' layer_map argument, a LayerMapComposite after the composite.
    torch.manual_seed(0)
    conv = _random_statistics(_CompositeNet().to(F64).eval())
    mlp = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3)).to(F64).eval()
    conv_names = [
        ("features.0", ZBoxRule(0.0, 1.0), zr.ZBox(torch.tensor(0.0), torch.tensor(1.0))),
        (("features.3",), GeneralizedGammaRule(0.5), zr.Gamma(0.5)),
        (("head.1", "head.3"), ZPlusRule(1e-4), zr.ZPlus(1e-4)),
    ]
    mlp_names = [(("0",), FlatRule(), zr.Flat()), (("2",), EpsilonRule(0.1), Epsilon(0.1))]
    for model, x, names in [
        (conv, torch.rand(2, 3, 8, 8, dtype=F64), conv_names),
        (mlp, torch.rand(3, 6, dtype=F64), mlp_names),
    ]:
        theirs = zc.NameLayerMapComposite(
            name_map=[((n,) if isinstance(n, str) else n, rule) for n, _, rule in names],
            layer_map=_zennit_type_map(),
        )
        ours = [LayerMapComposite(_type_map()), NameMapComposite([n[:2] for n in names])]
        _close(
            LRP(model, canonizers=ours).attribute(x, target=1),
            _zennit_composite(model, x, 1, theirs),
        )
        pooled = zc.EpsilonPlusFlat(layer_map=[(_POOLS, Norm(1e-2))])
        ours = [EpsilonPlusFlat(), LayerMapComposite([(_POOLS, EpsilonRule(1e-2))])]
        _close(
            LRP(model, canonizers=ours).attribute(x, target=1),
            _zennit_composite(model, x, 1, pooled),
        )


def test_user_built_composites_check_their_maps() -> None:
    model = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3), nn.Linear(3, 2)).eval()
    x = torch.randn(2, 4)
    with pytest.raises(TypeError, match=r"layer_map\[0\] must be a \(module types, rule\) pair"):
        LayerMapComposite([nn.Linear])
    with pytest.raises(TypeError, match=r"layer_map\[0\] must name module types"):
        LayerMapComposite([("Linear", EpsilonRule())])
    with pytest.raises(TypeError, match=r"first_map\[0\]'s types must pair with a rule"):
        SpecialFirstLayerMapComposite([], [(nn.Linear, "flat")])
    with pytest.raises(TypeError, match="name_map must be a list"):
        NameMapComposite({"0": FlatRule()})
    with pytest.raises(ValueError, match=r"no module of the model is named '3', 'fc'"):
        LRP(
            model, canonizers=[NameMapComposite([(("0", "3"), FlatRule()), ("fc", FlatRule())])]
        ).attribute(x, target=0)
    # A rule a canonizer gives is checked as a rule set on the module is, merged or not.
    for canonizers in (
        [LayerMapComposite([(nn.BatchNorm1d, ZPlusRule())])],
        [MergeBatchNorm(), NameMapComposite([("1", ZPlusRule())])],
    ):
        with pytest.raises(TypeError, match=r"model\.1: ZPlusRule runs on nn\.Linear and conv"):
            LRP(model, canonizers=canonizers).attribute(x, target=0)


def test_composites_find_the_first_layer_of_each_model_and_check_their_arguments() -> None:
    composite = EpsilonPlusFlat()
    first = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    second = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    x = torch.rand(2, 4, dtype=F64)
    for model in (first.double(), second.double()):
        expected = _zennit_composite(model, x, 0, zc.EpsilonPlusFlat())
        _close(LRP(model, canonizers=[composite]).attribute(x, target=0), expected)
    with pytest.raises(ValueError, match="low must not exceed high"):
        EpsilonGammaBox(1.0, 0.0)
    with pytest.raises(ValueError, match="stabilizer must be non-negative"):
        EpsilonAlpha2Beta1(stabilizer=-1.0)
    with pytest.raises(TypeError, match="epsilon must be a real number or a callable"):
        EpsilonPlusFlat(epsilon="small")
    with pytest.raises(TypeError, match="stabilizer must be a real number or a callable"):
        EpsilonGammaBox(0.0, 1.0, stabilizer=None)
    with pytest.raises(TypeError, match="zero_params must be None, a parameter name or a list"):
        EpsilonPlusFlat(zero_params=b"bias")
    with pytest.raises(
        ValueError, match=r"zero_params may name only 'weight' and 'bias', .* got \['Bias'\]"
    ):
        EpsilonGammaBox(0.0, 1.0, zero_params="Bias")
    assert repr(EpsilonGammaBox(0.0, 1.0, zero_params=["bias"])) == (
        "EpsilonGammaBox(low=0.0, high=1.0, epsilon=1e-06, gamma=0.25, stabilizer=1e-06, "
        "zero_params=('bias',))"
    )
    assert repr(EpsilonPlus()) == "EpsilonPlus(epsilon=1e-06, stabilizer=1e-06)"


@pytest.mark.parametrize("case", COMPOSITES, ids=[case[0] for case in COMPOSITES])
def test_composites_on_parametrized_weights_give_zennits_numbers_on_the_plain_model(case) -> None:
    # torch.nn.utils.parametrize swaps in a subclass (ParametrizedConv2d, ...) whose weight is
    # computed: the composites' rules must still recognise it as the convolution it is.
    _, ours, theirs = case
    torch.manual_seed(0)
    plain = _random_statistics(_CompositeNet().to(F64).eval())
    model = copy.deepcopy(plain)
    for module in model.modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            torch.nn.utils.parametrizations.weight_norm(module)
    x = torch.rand(2, 3, 8, 8, dtype=F64)
    expected = _zennit_composite(plain, x, 1, theirs())
    _close(LRP(model, canonizers=[ours()]).attribute(x, target=1), expected)


def _vgg_bn() -> nn.Sequential:
    """A VGG with batch norms in miniature: each convolution (the first included, one without
    bias) followed by a batch norm with random statistics."""
    return _random_statistics(
        nn.Sequential(
            nn.Conv2d(3, 6, 3, padding=1),
            nn.BatchNorm2d(6),
            nn.ReLU(),
            nn.Conv2d(6, 8, 3, padding=1, bias=False),
            nn.BatchNorm2d(8),
            nn.ReLU(),
            nn.AvgPool2d(2),
            nn.Conv2d(8, 8, 3, padding=1),
            nn.BatchNorm2d(8),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(2),
            nn.Flatten(),
            nn.Linear(32, 10),
            nn.ReLU(),
            nn.Linear(10, 4),
        )
    )


# Each composite with its defaults (zero_params with merged batch norms: above).
DEFAULTS = [case for case in COMPOSITES if not case[0].endswith(("(arguments)", "(zero_params)"))]


@pytest.mark.parametrize("case", DEFAULTS, ids=[case[0] for case in DEFAULTS])
def test_composites_with_merged_batch_norms_match_zennit_in_either_order(case) -> None:
    _, ours, theirs = case
    torch.manual_seed(0)
    model = _vgg_bn()
    x = torch.rand(2, 3, 8, 8, dtype=F64)
    before = copy.deepcopy(model.state_dict())
    # At the input, and past the second batch norm (its ReLU's output): the merged
    # convolution's output, and the batch norm's input and output, merged into the identity.
    expected, merged = _zennit_relevance(
        model, x, 1, theirs(canonizers=[SequentialMergeBatchNorm()]), (model[5],)
    )
    unmerged = _zennit_composite(model, x, 1, theirs())
    assert (expected - unmerged).abs().max() > 1e-2 * expected.abs().max()
    for canonizers in ([MergeBatchNorm(), ours()], [ours(), MergeBatchNorm()]):
        _close(LRP(model, canonizers=canonizers).attribute(x, target=1), expected)
        layers = [model[0], model[4]]
        first, norm = LayerLRP(model, layers, canonizers=canonizers).attribute(
            x, target=1, attribute_to_layer_input=True
        )
        _close(first, expected)
        _close(norm, merged)
        layers = [model[3], model[4]]
        for relevance in LayerLRP(model, layers, canonizers=canonizers).attribute(x, target=1):
            _close(relevance, merged)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not any(hasattr(m, "rule") for m in model.modules())


@pytest.mark.parametrize(
    "case",
    [case for case in COMPOSITES if case[0] in ("EpsilonPlusFlat", "EpsilonGammaBox")],
    ids=lambda case: case[0],
)
def test_composites_on_resnet18_match_zennits_with_its_resnet_canonizer(case) -> None:
    _, ours, theirs = case
    torch.manual_seed(0)
    model = _random_statistics(resnet18(weights=None))
    x = torch.rand(1, 3, 32, 32, dtype=F64)
    before = copy.deepcopy(model.state_dict())
    # zennit's composites pass the gradient through max pooling; fastattr's keeps epsilon
    # (1e-9) there. zennit's residual sums have its Norm rule (stabilizer 1e-6).
    composite = theirs(canonizers=[ZennitResNetCanonizer()], layer_map=[(nn.MaxPool2d, Norm(1e-9))])
    # The output of a block's first convolution, merged with its batch norm, and the block's.
    block = model.layer2[0]
    expected, at_conv, at_block = _zennit_relevance(model, x, 3, composite, (block.bn1, block))
    ours_first = [ours(), ResNetCanonizer(epsilon=1e-6)]
    _close(LRP(model, canonizers=ours_first).attribute(x, target=3), expected)
    layers = [block.conv1, block]
    conv, out = LayerLRP(model, layers, canonizers=[ResNetCanonizer(1e-6), ours()]).attribute(
        x, target=3
    )
    _close(conv, at_conv)
    _close(out, at_block)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


class _Convolutions(TorchDispatchMode):
    """Counts the convolutions run, forward and backward (aten's operators, below autograd)."""

    def __init__(self) -> None:
        super().__init__()
        self.runs: Counter = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kind = func.overloadpacket
        if kind in (torch.ops.aten.convolution, torch.ops.aten.convolution_backward):
            self.runs[kind.__name__] += 1
        return func(*args, **(kwargs or {}))


def _counted(lrp: LRP, x: torch.Tensor) -> tuple[Counter, torch.Tensor]:
    with _Convolutions() as convolutions:
        relevance = lrp.attribute(x, target=1)
    return convolutions.runs, relevance


@pytest.mark.parametrize("case", DEFAULTS, ids=[case[0] for case in DEFAULTS])
def test_merged_batch_norms_recompute_each_convolution_once(case) -> None:
    # The rules recompute each convolution merged with its batch norm, and only so: as many
    # convolutions, forward and backward, as on the model merged by hand, from the first call.
    _, ours, _ = case
    torch.manual_seed(0)
    model = _vgg_bn()
    merged = copy.deepcopy(model)
    SequentialMergeBatchNorm().apply(merged)
    x = torch.rand(2, 3, 8, 8, dtype=F64)
    runs, relevance = _counted(LRP(model, canonizers=[MergeBatchNorm(), ours()]), x)
    expected_runs, expected = _counted(LRP(merged, canonizers=[ours()]), x)
    assert runs == expected_runs
    _close(relevance, expected)


def test_densenet_merges_its_data_flow_s_pairs_and_recomputes_each_convolution_once() -> None:
    # In torchvision's DenseNet each layer's last convolution is registered just before the
    # next layer's batch norm, which receives the concatenation of all features instead (zennit's
    # SequentialMergeBatchNorm, pairing by registration, fails there on the shapes). The pairs
    # of the data flow, merged by hand: conv0 and norm0, each layer's conv1 and norm2. Outputs
    # held for those other batch norms are found unmerged in the first call's forward; the
    # convolutions of the data flow's pairs then still run once, merged.
    torch.manual_seed(0)
    model = _random_statistics(densenet121(weights=None))
    layers = [name for name, m in model.named_modules() if isinstance(m, _DenseLayer)]
    pairs = [((f"{name}.conv1",), f"{name}.norm2") for name in layers]
    merged = copy.deepcopy(model)
    NamedMergeBatchNorm([(("features.conv0",), "features.norm0"), *pairs]).apply(merged)
    x = torch.rand(1, 3, 32, 32, dtype=F64)
    before = copy.deepcopy(model.state_dict())
    # zennit's composites pass the gradient through max pooling; fastattr's keeps epsilon.
    composite = zc.EpsilonPlus(layer_map=[(nn.MaxPool2d, Norm(1e-9))])
    expected = _zennit_composite(merged, x, 1, composite)
    lrp = LRP(model, canonizers=[MergeBatchNorm(), EpsilonPlus()])
    _close(lrp.attribute(x, target=1), expected)
    runs, relevance = _counted(lrp, x)
    expected_runs, _ = _counted(LRP(merged, canonizers=[EpsilonPlus()]), x)
    assert runs == expected_runs
    _close(relevance, expected)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_a_convolution_that_ends_a_container_or_is_parametrized_is_recomputed_once() -> None:
    # As zennit pairs them: the modules without submodules, depth first, in registration order
    # (a convolution that ends a container, then the batch norm after the container), a
    # parametrized convolution counting as one.
    torch.manual_seed(0)
    plain = _random_statistics(
        nn.Sequential(
            nn.Sequential(nn.Conv2d(3, 4, 3)),
            nn.BatchNorm2d(4),
            nn.ReLU(),
            nn.Conv2d(4, 4, 3),
            nn.BatchNorm2d(4),
            nn.ReLU(),
            nn.Flatten(),
            nn.Linear(4 * 4 * 4, 3),
        )
    )
    model = copy.deepcopy(plain)
    torch.nn.utils.parametrizations.weight_norm(model[3])
    merged = copy.deepcopy(plain)
    NamedMergeBatchNorm([(("0.0",), "1"), (("3",), "4")]).apply(merged)
    x = torch.rand(2, 3, 8, 8, dtype=F64)
    runs, relevance = _counted(LRP(model, canonizers=[MergeBatchNorm(), EpsilonPlus()]), x)
    expected_runs, _ = _counted(LRP(merged, canonizers=[EpsilonPlus()]), x)
    assert runs == expected_runs
    _close(relevance, _zennit_composite(merged, x, 1, zc.EpsilonPlus()))


class _ConvolutionBeforeNorm(nn.Module):
    """A convolution registered just before a batch norm that receives its output only
    scaled (``scaled``), or written into in place (``written``), or together with another use
    of it (``shared``)."""

    def __init__(self, use: str) -> None:
        super().__init__()
        self.use = use
        self.conv = nn.Conv2d(3, 4, 3)
        self.norm = nn.BatchNorm2d(4)
        self.head = nn.Sequential(nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv(x)
        if self.use == "scaled":
            return self.head(self.norm(2 * h))
        if self.use == "written":
            h += 1
            return self.head(self.norm(h))
        return self.head(self.norm(h) + h)


class _MergedAndPlain(nn.Module):
    """The ``shared`` model with its two uses spelled out: the convolution merged with the
    batch norm by hand, beside the convolution itself."""

    def __init__(self, model: _ConvolutionBeforeNorm) -> None:
        super().__init__()
        merged = copy.deepcopy(model)
        SequentialMergeBatchNorm().apply(merged)
        self.merged, self.conv, self.head = merged.conv, model.conv, model.head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.merged(x) + self.conv(x))


@pytest.mark.parametrize("use", ["scaled", "written", "shared"])
def test_a_convolution_registered_before_a_batch_norm_that_it_does_not_merge_into(use) -> None:
    # Its rule waits for the batch norm to merge; where the relevance reaches its output by
    # another way, the call runs again with the rule on the convolution's own map as well.
    torch.manual_seed(0)
    model = _random_statistics(_ConvolutionBeforeNorm(use))
    x = torch.rand(2, 3, 8, 8, dtype=F64)
    oracle = _MergedAndPlain(model) if use == "shared" else model
    expected = _zennit_composite(oracle, x, 1, zc.EpsilonPlus())
    lrp = LRP(model, canonizers=[MergeBatchNorm(), EpsilonPlus()])
    _close(lrp.attribute(x, target=1), expected)
    _close(lrp.attribute(x, target=1), expected)  # and so on, once it knows


@pytest.mark.cuda
@pytest.mark.parametrize("case", DEFAULTS, ids=[case[0] for case in DEFAULTS])
def test_composites_with_merged_batch_norms_on_cuda_match_the_cpu(case) -> None:
    """The recomputing rules' nodes (modified weights, bounds, callables) and the merge on a
    GPU give the CPU's relevance."""
    _, ours, _ = case
    torch.manual_seed(0)
    model = _vgg_bn()
    x = torch.rand(2, 3, 8, 8, dtype=F64)
    canonizers = [MergeBatchNorm(), ours()]
    expected = LRP(model, canonizers=canonizers).attribute(x, target=1)
    model.cuda()
    found = LRP(model, canonizers=canonizers).attribute(x.cuda(), target=1)
    assert found.is_cuda
    _close(found.cpu(), expected)
