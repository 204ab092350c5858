"""LRP and LayerLRP: against captum on the models it runs, against zennit on those it cannot,
conservation, the model left as found, and bad input."""

from __future__ import annotations

import copy
import warnings

import captum.attr as captum_attr
import captum.attr._utils.lrp_rules as captum_rules
import pytest
import torch
from captum.attr._utils.custom_modules import Addition_Module
from torch import nn
from zennit.composites import LayerMapComposite
from zennit.layer import Sum
from zennit.rules import Epsilon, Norm, Pass
from zennit.types import Activation

import fastattr
from fastattr import LRP, Alpha1_Beta0_Rule, EpsilonRule, GammaRule, IdentityRule, LayerLRP

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

DTYPES = [torch.float32, torch.float64]


def _close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    # float64 agrees to rounding; float32 to its own rounding of the same operations.
    tol = 1e-12 if expected.dtype == torch.float64 else 1e-5
    torch.testing.assert_close(actual, expected, rtol=tol, atol=tol * float(expected.abs().max()))


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(12, 16)
        self.relu = nn.ReLU()
        self.fc2 = nn.Linear(16, 16)
        self.tanh = nn.Tanh()
        self.drop = nn.Dropout(0.3)
        self.fc3 = nn.Linear(16, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc3(self.drop(self.tanh(self.fc2(self.relu(self.fc1(x))))))


class CNN(nn.Module):
    def __init__(self, inplace: bool = False) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 3, padding=1)
        self.relu1 = nn.ReLU(inplace=inplace)
        self.pool1 = nn.MaxPool2d(2)
        self.conv2 = nn.Conv2d(6, 8, 3)
        self.bn = nn.BatchNorm2d(8)
        self.relu2 = nn.ReLU(inplace=inplace)
        self.pool2 = nn.AvgPool2d(2)
        self.adapt = nn.AdaptiveAvgPool2d(2)
        self.fc1 = nn.Linear(32, 10)
        self.relu3 = nn.ReLU()
        self.fc2 = nn.Linear(10, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool1(self.relu1(self.conv1(x)))
        x = self.adapt(self.pool2(self.relu2(self.bn(self.conv2(x)))))
        return self.fc2(self.relu3(self.fc1(x.view(x.shape[0], -1))))


class TwoInputs(nn.Module):
    """Tuple inputs, an additional forward argument and captum's Addition_Module."""

    def __init__(self) -> None:
        super().__init__()
        self.left = nn.Linear(6, 8)
        self.right = nn.Linear(4, 8)
        self.add = Addition_Module()
        self.relu = nn.ReLU()
        self.head = nn.Linear(8, 3)

    def forward(self, a: torch.Tensor, b: torch.Tensor, scale: float) -> torch.Tensor:
        return self.head(self.relu(self.add(self.left(a), self.right(b)))) * scale


class GridOutput(nn.Module):
    """Output of shape (B, 2, 5), for tuple targets."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(7, 12)
        self.relu = nn.ReLU()
        self.fc2 = nn.Linear(12, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.relu(self.fc1(x))).view(-1, 2, 5)


def _seeded(module: nn.Module, dtype: torch.dtype, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    for p in module.parameters():
        nn.init.normal_(p, std=0.5)
    for m in module.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.normal_(0, 0.2)
            m.running_var.uniform_(0.5, 1.5)
    return module.to(dtype).eval()


def _captum(cls, model, inputs, layer=None, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        method = cls(model) if layer is None else cls(model, layer)
        return method.attribute(inputs, **kwargs)


CAPTUM_MODELS = {
    "mlp": (MLP, (12,), 0),
    "cnn": (CNN, (3, 12, 12), [0, 1, 2, 3, 0]),
    "cnn_inplace_relu": (lambda: CNN(inplace=True), (3, 12, 12), torch.tensor([3, 2, 1, 0, 1])),
    "grid": (GridOutput, (7,), (1, 3)),
}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", list(CAPTUM_MODELS))
def test_lrp_matches_captum(name: str, dtype: torch.dtype) -> None:
    build, shape, target = CAPTUM_MODELS[name]
    model = _seeded(build(), dtype)
    x = torch.randn(5, *shape, dtype=dtype)
    ours, delta = LRP(model).attribute(x, target=target, return_convergence_delta=True)
    theirs, their_delta = _captum(
        captum_attr.LRP, model, x, target=target, return_convergence_delta=True
    )
    _close(ours, theirs)
    _close(delta, their_delta)
    assert ours.dtype == dtype


@pytest.mark.parametrize("dtype", DTYPES)
def test_tuple_inputs_additional_args_and_addition_module_match_captum(dtype: torch.dtype) -> None:
    model = _seeded(TwoInputs(), dtype)
    a, b = torch.randn(4, 6, dtype=dtype), torch.randn(4, 4, dtype=dtype)
    ours = LRP(model).attribute((a, b), target=1, additional_forward_args=(2.0,))
    theirs = _captum(captum_attr.LRP, model, (a, b), target=1, additional_forward_args=(2.0,))
    assert isinstance(ours, tuple) and len(ours) == 2
    for mine, expected in zip(ours, theirs):
        _close(mine, expected)


RULE_PAIRS = [
    (lambda: EpsilonRule(1e-2), lambda: captum_rules.EpsilonRule(1e-2)),
    (lambda: GammaRule(), lambda: captum_rules.GammaRule()),
    (lambda: GammaRule(0.7, set_bias_to_zero=True), lambda: captum_rules.GammaRule(0.7, True)),
    (lambda: Alpha1_Beta0_Rule(), lambda: captum_rules.Alpha1_Beta0_Rule()),
    (lambda: Alpha1_Beta0_Rule(True), lambda: captum_rules.Alpha1_Beta0_Rule(True)),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("pair", range(len(RULE_PAIRS)))
def test_user_rules_match_captum(pair: int, dtype: torch.dtype) -> None:
    ours_rule, their_rule = RULE_PAIRS[pair]
    model = _seeded(CNN(), dtype)
    x = torch.randn(3, 3, 12, 12, dtype=dtype)
    layers = (model.conv1, model.conv2, model.bn, model.pool2, model.fc1)
    for layer in layers:
        layer.rule = ours_rule()
    model.relu2.rule = IdentityRule()
    ours = LRP(model).attribute(x, target=2)
    for layer in layers:
        layer.rule = their_rule()
    model.relu2.rule = captum_rules.IdentityRule()
    # captum's rule objects are accepted as they are.
    ours_from_captum_rules = LRP(model).attribute(x, target=2)
    theirs = _captum(captum_attr.LRP, model, x, target=2)  # removes the rules it finds
    _close(ours, theirs)
    _close(ours_from_captum_rules, theirs)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("to_input", [False, True])
def test_layer_lrp_matches_captum(to_input: bool, dtype: torch.dtype) -> None:
    model = _seeded(CNN(), dtype)
    x = torch.randn(4, 3, 12, 12, dtype=dtype)
    for layer in (model.conv1, model.conv2, model.bn, model.pool1, model.fc2):
        ours, delta = LayerLRP(model, layer).attribute(
            x, target=1, attribute_to_layer_input=to_input, return_convergence_delta=True
        )
        theirs, their_delta = _captum(
            captum_attr.LayerLRP,
            model,
            x,
            layer,
            target=1,
            attribute_to_layer_input=to_input,
            return_convergence_delta=True,
        )
        _close(ours, theirs)
        _close(delta, their_delta)


def test_layer_lrp_list_of_layers_and_multiple_inputs_match_captum() -> None:
    model = _seeded(TwoInputs(), torch.float64)
    a, b = torch.randn(4, 6, dtype=torch.float64), torch.randn(4, 4, dtype=torch.float64)
    layers = [model.left, model.add]
    for to_input in (False, True):
        ours = LayerLRP(model, layers).attribute(
            (a, b), target=0, additional_forward_args=3.0, attribute_to_layer_input=to_input
        )
        theirs = _captum(
            captum_attr.LayerLRP,
            model,
            (a, b),
            layers,
            target=0,
            additional_forward_args=3.0,
            attribute_to_layer_input=to_input,
        )
        assert isinstance(ours, list) and len(ours) == 2
        _close(ours[0], theirs[0])
        if to_input:
            assert isinstance(ours[1], tuple) and len(ours[1]) == 2
            # fastattr lists the inputs in order; captum in the order its backward hooks fired.
            for mine, expected in zip(ours[1], reversed(theirs[1])):
                _close(mine, expected)
        else:
            _close(ours[1], theirs[1])


def test_layer_lrp_on_an_activation_passes_relevance() -> None:
    # captum fails on a layer without a rule of its own; relevance passes through a ReLU.
    model = _seeded(MLP(), torch.float64)
    x = torch.randn(3, 12, dtype=torch.float64)
    at_output = LayerLRP(model, model.relu).attribute(x, target=2)
    at_input = LayerLRP(model, model.relu).attribute(x, target=2, attribute_to_layer_input=True)
    at_fc2_input = LayerLRP(model, model.fc2).attribute(x, target=2, attribute_to_layer_input=True)
    _close(at_output, at_fc2_input)
    _close(at_input, at_output)


def test_verbose_prints_the_rules(capsys: pytest.CaptureFixture) -> None:
    model = _seeded(MLP(), torch.float32)
    model.fc2.rule = GammaRule(0.5)
    LRP(model).attribute(torch.randn(2, 12), target=0, verbose=True)
    lines = capsys.readouterr().out.splitlines()
    assert lines == [
        f"Applied EpsilonRule(epsilon=1e-09) on layer {model.fc1}",
        f"Applied GammaRule(gamma=0.5, set_bias_to_zero=False) on layer {model.fc2}",
        f"Applied EpsilonRule(epsilon=1e-09) on layer {model.fc3}",
    ]


# Beyond captum: checked against zennit with the same rules (epsilon on linear maps, a
# stabilized ratio on parameter-free linear modules, relevance passed through activations).


def _zennit(model: nn.Module, x: torch.Tensor, target: int) -> torch.Tensor:
    linear = (nn.Linear, nn.modules.conv._ConvNd, nn.modules.batchnorm._BatchNorm)
    parameter_free = (
        nn.modules.pooling._AvgPoolNd,
        nn.modules.pooling._MaxPoolNd,
        nn.modules.pooling._AdaptiveAvgPoolNd,
        nn.Upsample,
        Sum,
    )
    composite = LayerMapComposite(
        [
            (Activation, Pass()),
            (nn.modules.dropout._DropoutNd, Pass()),
            (linear, Epsilon(1e-9)),
            (parameter_free, Norm(1e-9)),
        ]
    )
    x = x.clone().requires_grad_()
    with composite.context(model) as modified:
        output = modified(x)
        seed = torch.zeros_like(output)
        seed[:, target] = output[:, target]
        (relevance,) = torch.autograd.grad(output, x, seed)
    return relevance


class Beyond(nn.Module):
    """Every module type captum has no rule for, flattening with nn.Flatten."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv1d(2, 4, 3, padding=1),
            nn.BatchNorm1d(4),
            nn.ReLU(),
            nn.Upsample(scale_factor=2, mode="nearest"),
            nn.AvgPool1d(2),
            nn.Identity(),
            nn.Unflatten(1, (1, 4)),
            nn.Conv2d(1, 3, 3, padding=1),
            nn.ConvTranspose2d(3, 2, 2, stride=2),
            nn.GELU(),
            nn.Unflatten(1, (2, 1)),
            nn.Conv3d(2, 2, 1),
            nn.MaxPool3d((1, 2, 2)),
            nn.AvgPool3d(1),
            nn.Dropout(0.5),
            nn.Flatten(),
        )
        self.head = nn.Linear(2 * 4 * 8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


class Block(nn.Module):
    """A ResNet-style block whose residual addition is written with `+` (or a zennit Sum)."""

    def __init__(self, zennit_sum: bool = False) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 3, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(3)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(3, 3, 3, padding=1, bias=False)
        self.relu2 = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(3, 4, bias=False)
        self.sum = Sum(-1) if zennit_sum else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        branch = self.conv2(self.relu1(self.bn1(self.conv1(x))))
        if self.sum is not None:
            out = self.sum(torch.stack([branch, x], dim=-1))
        else:
            out = branch + x
        return self.fc(self.pool(self.relu2(out)).flatten(1))


class BeyondToo(nn.Module):
    """The remaining 1-D and 3-D variants: transposed convolutions, adaptive pooling."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.ConvTranspose1d(2, 3, 3, stride=2),
            nn.Tanh(),
            nn.MaxPool1d(2),
            nn.AdaptiveAvgPool1d(6),
            nn.Unflatten(2, (1, 2, 3)),
            nn.ConvTranspose3d(3, 2, 2, stride=2),
            nn.BatchNorm3d(2),
            nn.SiLU(),
            nn.AdaptiveAvgPool3d((2, 2, 3)),
            nn.Flatten(),
        )
        self.head = nn.Linear(2 * 2 * 2 * 3, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


@pytest.mark.parametrize("build", [Beyond, BeyondToo])
def test_models_captum_cannot_run_match_zennit(build: type) -> None:
    model = _seeded(build(), torch.float64)
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.running_var.uniform_(0.5, 1.5)
    x = torch.randn(3, 2, 8, dtype=torch.float64)
    with pytest.raises(TypeError):
        _captum(captum_attr.LRP, model, x, target=1)
    _close(LRP(model).attribute(x, target=1), _zennit(model, x, 1))


@pytest.mark.parametrize("in_place", [False, True])
def test_residual_addition_matches_zennit_and_conserves(in_place: bool) -> None:
    model = _seeded(Block(), torch.float64)
    if in_place:
        # `out += x`, as torchvision writes it.
        def forward(x: torch.Tensor) -> torch.Tensor:
            out = model.conv2(model.relu1(model.bn1(model.conv1(x))))
            out += x
            return model.fc(model.pool(model.relu2(out)).flatten(1))

        model.forward = forward
    reference = _seeded(Block(zennit_sum=True), torch.float64)
    reference.load_state_dict(_seeded(Block(), torch.float64).state_dict())
    x = torch.randn(4, 3, 6, 6, dtype=torch.float64)
    relevance, delta = LRP(model).attribute(x, target=2, return_convergence_delta=True)
    _close(relevance, _zennit(reference, x, 2))
    # Only bn1's shift absorbs relevance: without it the sum is the output.
    model.bn1.bias.data.zero_()
    model.bn1.running_mean.zero_()
    _, delta = LRP(model).attribute(x, target=2, return_convergence_delta=True)
    output = model(x)[:, 2]
    torch.testing.assert_close(
        delta, torch.zeros_like(delta), atol=1e-7 * float(output.abs().max()), rtol=0
    )


def test_bias_free_relu_network_conserves_exactly_and_is_gradient_times_input() -> None:
    model = nn.Sequential(
        nn.Conv2d(2, 4, 3, bias=False),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(4, 4, 3, bias=False),
        nn.ReLU(),
        nn.AvgPool2d(2),
        nn.Flatten(),
        nn.Linear(16, 8, bias=False),
        nn.ReLU(),
        nn.Linear(8, 3, bias=False),
    ).double()
    for module in model:
        if not isinstance(module, (nn.ReLU, nn.Flatten)):
            module.rule = EpsilonRule(1e-12)
    x = torch.randn(5, 2, 14, 14, dtype=torch.float64, requires_grad=True)
    relevance, delta = LRP(model).attribute(x, target=1, return_convergence_delta=True)
    output = model(x)[:, 1]
    # What epsilon = 1e-12 takes, relative to the output's scale.
    scale = 1e-9 * float(output.abs().max())
    torch.testing.assert_close(relevance.sum((1, 2, 3)), output.detach(), rtol=0, atol=scale)
    torch.testing.assert_close(delta, torch.zeros_like(delta), rtol=0, atol=scale)
    (gradient,) = torch.autograd.grad(output.sum(), x)
    torch.testing.assert_close(relevance, gradient * x.detach(), rtol=1e-9, atol=scale)


def test_biases_absorb_relevance() -> None:
    model = _seeded(MLP(), torch.float64)
    x = torch.randn(6, 12, dtype=torch.float64)
    relevance, delta = LRP(model).attribute(x, target=3, return_convergence_delta=True)
    output = model(x)[:, 3].detach()
    torch.testing.assert_close(delta, output - relevance.sum(1), rtol=0, atol=1e-12)
    assert delta.abs().max() > 1e-3  # the biases take their share
    for layer in (model.fc1, model.fc2, model.fc3):
        layer.bias.data.zero_()
    # tanh is not homogeneous, but without biases nothing is absorbed along the way.
    _, delta = LRP(model).attribute(x, target=3, return_convergence_delta=True)
    assert delta.abs().max() < 1e-7


@pytest.mark.parametrize(
    "target",
    [3, torch.tensor(3), torch.tensor([3]), [3, 0, 1, 2], torch.tensor([3, 0, 1, 2])],
)
def test_target_forms(target: object) -> None:
    model = _seeded(MLP(), torch.float64)
    x = torch.randn(4, 12, dtype=torch.float64)
    expected = _captum(captum_attr.LRP, model, x, target=target)
    _close(LRP(model).attribute(x, target=target), expected)


# Left as found.


def _snapshot(model: nn.Module) -> dict:
    return {k: v.clone() for k, v in model.state_dict().items()}


def _assert_untouched(model: nn.Module, state: dict, rules: dict, modes: dict) -> None:
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key]), key
    for name, module in model.named_modules():
        assert not module._forward_hooks and not module._forward_pre_hooks, name
        assert "forward" not in module.__dict__, name
        assert not module._backward_hooks and not module._backward_pre_hooks, name
        assert module.training == modes[name], name
        if name in rules:
            assert module.rule is rules[name]
        else:
            assert not hasattr(module, "rule"), name


class Raises(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(4, 4)
        self.bn = nn.BatchNorm1d(4)
        self.relu = nn.ReLU()
        self.fc2 = nn.Linear(4, 2)
        self.fail = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn(self.fc1(x)))
        if self.fail:
            raise RuntimeError("forward failed mid-way")
        return self.fc2(x)


@pytest.mark.parametrize("fail", [False, True])
def test_model_left_as_found(fail: bool) -> None:
    model = Raises()
    model.train()
    model.fc1.eval()
    model.fc2.rule = GammaRule()
    model.fail = fail
    state, modes = _snapshot(model), {n: m.training for n, m in model.named_modules()}
    rules = {"fc2": model.fc2.rule}
    x = torch.randn(6, 4)
    if fail:
        with pytest.raises(RuntimeError, match="mid-way"):
            LRP(model).attribute(x, target=0)
        with pytest.raises(RuntimeError, match="mid-way"):
            LayerLRP(model, model.bn).attribute(x, target=0)
    else:
        LRP(model).attribute(x, target=0)
        LayerLRP(model, model.bn).attribute(x, target=0, attribute_to_layer_input=True)
    _assert_untouched(model, state, rules, modes)


def test_modules_with_their_own_hooks_or_forward_get_the_same_rules() -> None:
    # Rules go in as instance forwards where a module has no hooks, else as hooks after the
    # user's: the same numbers either way, and the user's hooks and forwards stay.
    model = _seeded(MLP(), torch.float64)
    x = torch.randn(4, 12, dtype=torch.float64)
    expected = LRP(model).attribute(x, target=1)
    expected_at_fc2 = LayerLRP(model, model.fc2).attribute(x, target=1)
    seen = []
    handles = [
        model.fc1.register_forward_pre_hook(lambda m, args: seen.append("pre")),
        # Registered first, the user's hook sees the module's own output, before the rule's.
        model.fc2.register_forward_hook(lambda m, args, out: seen.append(out.grad_fn.name())),
        model.tanh.register_full_backward_hook(lambda m, gin, gout: seen.append("backward")),
    ]
    original = model.fc3.forward
    model.fc3.forward = lambda t: original(t)
    forward = model.fc3.forward
    _close(LRP(model).attribute(x, target=1), expected)
    _close(LayerLRP(model, model.fc2).attribute(x, target=1), expected_at_fc2)
    assert seen.count("pre") == seen.count("AddmmBackward0") == seen.count("backward") == 2
    for handle in handles:
        handle.remove()
    assert model.fc3.__dict__["forward"] is forward
    for module in model.modules():
        assert not module._forward_hooks and not module._forward_pre_hooks
        assert "forward" not in module.__dict__ or module is model.fc3


def test_unsupported_modules_listed_before_any_work() -> None:
    calls = []

    class Model(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.norm = nn.GroupNorm(1, 4)
            self.fc = nn.Linear(4, 4)
            self.norm2 = nn.GroupNorm(1, 4)
            self.soft = nn.LSTM(4, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            calls.append(1)
            return self.soft(self.norm2(self.fc(self.norm(x))))

    with pytest.raises(TypeError, match=r"GroupNorm \(model.norm, model.norm2\); LSTM"):
        LRP(Model()).attribute(torch.randn(2, 4), target=0)
    assert not calls


def test_bad_inputs() -> None:
    model = _seeded(MLP(), torch.float32)
    lrp = LRP(model)
    x = torch.randn(3, 12)
    with pytest.raises(TypeError, match="inputs"):
        lrp.attribute([x], target=0)
    with pytest.raises(TypeError, match="inputs"):
        lrp.attribute(torch.ones(3, 12, dtype=torch.long), target=0)
    with pytest.raises(IndexError, match="target"):
        lrp.attribute(x, target=5)
    with pytest.raises(ValueError, match="target"):
        lrp.attribute(x, target=[0, 1])
    with pytest.raises(TypeError, match="target"):
        lrp.attribute(x, target=1.5)
    with pytest.raises(ValueError, match="one value per example"):
        lrp.attribute(x)
    with pytest.raises(TypeError, match="model"):
        LRP(lambda x: x)
    with pytest.raises(ValueError, match="epsilon"):
        EpsilonRule(-1.0)
    with pytest.raises(TypeError, match="gamma"):
        GammaRule("big")
    with pytest.raises(TypeError, match="set_bias_to_zero"):
        Alpha1_Beta0_Rule(set_bias_to_zero=1)
    model.fc1.rule = "epsilon"
    with pytest.raises(TypeError, match=r"model.fc1.rule"):
        LRP(model)
    del model.fc1.rule
    with pytest.raises(ValueError, match="not a module of the model"):
        LayerLRP(model, nn.Linear(2, 2))
    with pytest.raises(TypeError, match="attribute_to_layer_input"):
        LayerLRP(model, model.fc1).attribute(x, target=0, attribute_to_layer_input=1)
    norm = nn.Sequential(nn.Linear(12, 4), nn.LayerNorm(4))
    norm[1].rule = GammaRule()
    with pytest.raises(TypeError, match="GammaRule cannot recompute LayerNorm"):
        LRP(norm).attribute(x, target=0)
    shrink = nn.Sequential(nn.Linear(12, 4))
    shrink[0].rule = IdentityRule()
    with pytest.raises(ValueError, match="IdentityRule"):
        LRP(shrink).attribute(x, target=0)


def test_exported_from_fastattr_and_attr() -> None:
    for name in (
        "LRP",
        "LayerLRP",
        "EpsilonRule",
        "GammaRule",
        "Alpha1_Beta0_Rule",
        "IdentityRule",
    ):
        assert getattr(fastattr, name) is getattr(fastattr.attr, name)
    assert copy.copy(EpsilonRule(0.5)).epsilon == 0.5


def test_rules_changed_between_calls_are_seen() -> None:
    model = _seeded(MLP(), torch.float64)
    x = torch.randn(3, 12, dtype=torch.float64)
    lrp = LRP(model)
    default = lrp.attribute(x, target=1)
    model.fc2.rule = GammaRule(0.5)
    with_gamma = lrp.attribute(x, target=1)
    del model.fc2.rule
    _close(lrp.attribute(x, target=1), default)
    model.fc2.rule = captum_rules.GammaRule(0.5)
    _close(with_gamma, _captum(captum_attr.LRP, model, x, target=1))
    assert (with_gamma - default).abs().max() > 1e-6


def test_layer_lrp_refuses_a_layer_that_runs_twice() -> None:
    class Twice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(self.fc(x))

    model = Twice()
    state = _snapshot(model)
    with pytest.raises(ValueError, match="more than once"):
        LayerLRP(model, model.fc).attribute(torch.randn(2, 4), target=0)
    _assert_untouched(model, state, {}, {"": True, "fc": True})
    # LRP itself treats each call as its own layer.
    relevance, delta = LRP(model).attribute(
        torch.randn(2, 4), target=0, return_convergence_delta=True
    )
    assert relevance.shape == (2, 4) and delta.shape == (2,)


def test_in_place_residual_retries_once_with_copies(capsys: pytest.CaptureFixture) -> None:
    class InPlace(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc1 = nn.Linear(5, 5, bias=False)
            self.fc2 = nn.Linear(5, 5, bias=False)
            self.relu = nn.ReLU()
            self.head = nn.Linear(5, 2, bias=False)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            out = self.fc2(self.relu(self.fc1(x)))
            out.add_(x)  # result discarded: only an in-place update keeps this model right
            return self.head(self.relu(out))

    model = InPlace().double()
    x = torch.randn(4, 5, dtype=torch.float64)
    lrp = LRP(model)
    relevance, delta = lrp.attribute(x, target=1, return_convergence_delta=True, verbose=True)
    assert len(capsys.readouterr().out.splitlines()) == 3  # printed once, despite the retry
    scale = float(model(x)[:, 1].abs().max())
    torch.testing.assert_close(delta, torch.zeros_like(delta), rtol=0, atol=1e-7 * scale)
    _close(lrp.attribute(x, target=1), relevance)


@pytest.mark.parametrize("dtype", DTYPES)
def test_folded_products_round_as_the_nodes_they_replace(
    dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch
) -> None:
    # fc1 -> relu -> fc2 and fc2 -> tanh -> dropout -> fc3: each product at a linear layer's
    # input folds into the previous layer's ratio, unless the rule outputs are copies.
    from fastattr import ops

    folded = []
    backend_nodes = ops.lrp_nodes

    def counting_nodes() -> ops.LrpNodes:
        nodes = backend_nodes()

        def counted(*args: object) -> torch.Tensor:
            folded.append(args)
            return nodes.product_ratio(*args)

        return nodes._replace(product_ratio=counted)

    monkeypatch.setattr(ops, "lrp_nodes", counting_nodes)
    model = _seeded(MLP(), dtype)
    x = torch.randn(5, 12, dtype=dtype)
    lrp = LRP(model)
    fused = lrp.attribute(x, target=[0, 1, 2, 3, 4])
    assert len(folded) == 2
    lrp._copies = True
    separate = lrp.attribute(x, target=[0, 1, 2, 3, 4])
    assert len(folded) == 2
    torch.testing.assert_close(fused, separate, rtol=0, atol=0)
    # A tapped layer keeps the nodes its relevance must reach: only the other pair folds.
    for layer, folds in ((model.relu, 1), (model.fc1, 1), (model.fc2, 0)):
        folded.clear()
        LayerLRP(model, layer).attribute(x, target=0)
        assert len(folded) == folds


def test_bench_resnet_conserves_and_token_ids_are_refused() -> None:
    from fastattr.bench.models import resnet, transformer

    model = resnet().double()
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            # Shift-free batch norms: relevance is then conserved up to epsilon.
            module.bias.data.zero_()
            module.running_mean.zero_()
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    model.fc.bias.data.zero_()
    _, delta = LRP(model).attribute(x, target=4, return_convergence_delta=True)
    scale = float(model(x)[:, 4].abs().max())
    torch.testing.assert_close(delta, torch.zeros_like(delta), rtol=0, atol=1e-6 * scale)
    # Token ids carry no relevance: LayerLRP on the embedding gives it to the embedded tokens.
    with pytest.raises(TypeError, match="inputs"):
        LRP(transformer()).attribute(torch.zeros(2, 32, dtype=torch.long), target=0)


class _Residual(nn.Module):
    """A residual block whose addition is spelled in different ways."""

    def __init__(self, spelling: str) -> None:
        super().__init__()
        self.spelling = spelling
        self.fc1 = nn.Linear(6, 6, bias=False)
        self.relu = nn.ReLU()
        self.fc2 = nn.Linear(6, 6, bias=False)
        self.head = nn.Linear(6, 2, bias=False)

    def merge(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return a + b

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        branch = self.fc2(self.relu(self.fc1(x)))
        if self.spelling == "helper":
            out = self.merge(branch, x)
        elif self.spelling == "torch.add":
            out = torch.add(branch, x)
        else:
            out = branch + x
        return self.head(self.relu(out))


@pytest.mark.parametrize("spelling", ["helper", "torch.add"])
def test_residual_addition_however_spelled(spelling: str) -> None:
    x = torch.randn(5, 6, dtype=torch.float64)
    model = _Residual(spelling).double()
    plain = _Residual("+").double()
    plain.load_state_dict(model.state_dict())
    relevance, delta = LRP(model).attribute(x, target=0, return_convergence_delta=True)
    _close(relevance, LRP(plain).attribute(x, target=0))
    scale = float(model(x)[:, 0].abs().max())
    torch.testing.assert_close(delta, torch.zeros_like(delta), rtol=0, atol=1e-7 * scale)


class EveryWeightedType(nn.Module):
    """Each module type whose weights the gamma and alpha-beta rules recompute."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1d = nn.Conv1d(2, 4, 3, padding=1)
        self.bn1d = nn.BatchNorm1d(4)
        self.relu1 = nn.ReLU()
        self.up = nn.ConvTranspose2d(1, 2, 3, stride=2, padding=1, output_padding=1)
        self.relu2 = nn.ReLU()
        self.conv3d = nn.Conv3d(2, 2, (1, 3, 3))
        self.bn3d = nn.BatchNorm3d(2)
        self.relu3 = nn.ReLU()
        self.fc = nn.Linear(2 * 6 * 6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu1(self.bn1d(self.conv1d(x)))  # (B, 4, 4)
        x = self.relu2(self.up(x.unsqueeze(1)))  # (B, 2, 8, 8)
        x = self.relu3(self.bn3d(self.conv3d(x.unsqueeze(2))))  # (B, 2, 1, 6, 6)
        return self.fc(x.reshape(x.shape[0], -1))


@pytest.mark.parametrize("pair", range(len(RULE_PAIRS)))
def test_rules_on_every_weighted_type_match_captum(pair: int) -> None:
    # captum runs any module once a rule is set on it.
    ours_rule, their_rule = RULE_PAIRS[pair]
    model = _seeded(EveryWeightedType(), torch.float64)
    for bn in (model.bn1d, model.bn3d):
        bn.running_var.uniform_(0.5, 1.5)
    weighted = (model.conv1d, model.bn1d, model.up, model.conv3d, model.bn3d, model.fc)
    x = torch.randn(3, 2, 4, dtype=torch.float64)
    for layer in weighted:
        layer.rule = ours_rule()
    ours = LRP(model).attribute(x, target=1)
    for layer in weighted:
        layer.rule = their_rule()
    theirs = _captum(captum_attr.LRP, model, x, target=1)
    _close(ours, theirs)


def test_list_of_tuple_targets_and_a_scalar_output_match_captum() -> None:
    model = _seeded(GridOutput(), torch.float64)
    x = torch.randn(3, 7, dtype=torch.float64)
    target = [(0, 1), (1, 2), (1, 4)]
    _close(
        LRP(model).attribute(x, target=target), _captum(captum_attr.LRP, model, x, target=target)
    )
    scalar = _seeded(nn.Sequential(nn.Linear(7, 5), nn.ReLU(), nn.Linear(5, 1)), torch.float64)
    _close(LRP(scalar).attribute(x), _captum(captum_attr.LRP, scalar, x))


@pytest.mark.cuda
def test_cuda_matches_cpu() -> None:
    model = _seeded(CNN(inplace=True), torch.float64)
    model.conv2.rule = GammaRule()
    x = torch.randn(4, 3, 12, 12, dtype=torch.float64)
    expected = LayerLRP(model, [model.conv1, model.fc1]).attribute(x, target=[0, 1, 2, 3])
    expected.append(LRP(model).attribute(x, target=[0, 1, 2, 3]))
    model.cuda()
    cuda_x = x.cuda()
    found = LayerLRP(model, [model.conv1, model.fc1]).attribute(cuda_x, target=[0, 1, 2, 3])
    found.append(LRP(model).attribute(cuda_x, target=[0, 1, 2, 3]))
    for on_cuda, on_cpu in zip(found, expected):
        assert on_cuda.is_cuda
        torch.testing.assert_close(on_cuda.cpu(), on_cpu, rtol=1e-9, atol=1e-12)


def test_a_new_captum_rule_object_is_seen_even_at_a_reused_address() -> None:
    model = _seeded(MLP(), torch.float64)
    x = torch.randn(3, 12, dtype=torch.float64)
    lrp = LRP(model)
    results = []
    for epsilon in (1e-9, 1.0, 1e-9, 1.0):
        model.fc2.rule = captum_rules.EpsilonRule(epsilon)  # the old object may be freed
        results.append(lrp.attribute(x, target=0))
    _close(results[2], results[0])
    _close(results[3], results[1])
    assert (results[1] - results[0]).abs().max() > 1e-6
    model.fc2.rule.STABILITY_FACTOR = 1e-9  # changed in place
    _close(lrp.attribute(x, target=0), results[0])
    model.fc2.rule = EpsilonRule(1.0)
    _close(lrp.attribute(x, target=0), results[1])
    model.fc2.rule.epsilon = 1e-9
    _close(lrp.attribute(x, target=0), results[0])


class _Steps(nn.Module):
    """fc1 -> relu -> fc2 -> relu, then a flatten, then fc3, written as statements."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(6, 8)
        self.relu = nn.ReLU()
        self.fc2 = nn.Linear(8, 8)
        self.act = nn.GELU()
        self.fc3 = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.fc1(x))
        x = self.act(self.fc2(x))
        x = torch.flatten(x, 1)
        return self.fc3(x)


class _Reused(_Steps):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc1(x)
        return self.fc3(self.act(self.fc2(self.relu(h)))) * h.sum()


class _TwoUses(_Steps):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.fc1(x))
        return self.fc3(self.act(self.fc2(x))) + self.fc3(self.act(self.fc2(x)))


class _ShapeFromInput(_Steps):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self.fc2(self.relu(self.fc1(x))))
        return self.fc3(x.view(x.shape[0], -1))


def test_call_chains_are_proven_only_from_single_use_code() -> None:
    from fastattr.lrp._forward_code import call_chain

    steps = _Steps()
    names = {id(m): n for n, m in steps.named_children()}
    assert [names[id(m)] if m is not None else None for m in call_chain(steps)] == [
        "fc1",
        "relu",
        "fc2",
        "act",
        None,
        "fc3",
    ]
    sequential = nn.Sequential(nn.Linear(2, 2), nn.ReLU())
    assert call_chain(sequential) == list(sequential)
    for unproven in (_Reused(), _TwoUses(), _ShapeFromInput(), nn.ModuleList([nn.ReLU()])):
        assert call_chain(unproven) is None
    steps.forward = steps.forward  # an instance forward could be anything
    assert call_chain(steps) is None


def _counting_nodes(monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    from fastattr import ops

    made = {"ratio": 0, "passing": 0, "product_ratio": 0}
    backend_nodes = ops.lrp_nodes

    def counting() -> ops.LrpNodes:
        nodes = backend_nodes()

        def counted(kind: str):
            def make(*args: object) -> torch.Tensor:
                made[kind] += 1
                return getattr(nodes, kind)(*args)

            return make

        return nodes._replace(**{kind: counted(kind) for kind in made})

    monkeypatch.setattr(ops, "lrp_nodes", counting)
    return made


def _unproven(model: nn.Module) -> nn.Module:
    """The same model, with a forward whose code LRP cannot read (so every node is made)."""
    twin = copy.deepcopy(model)
    forward = type(twin).forward
    twin.forward = lambda *args: forward(twin, *args)
    return twin


@pytest.mark.parametrize("dtype", DTYPES)
def test_proven_chains_hand_outputs_on_without_nodes_and_change_no_bit(
    dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch
) -> None:
    # In a proven chain a layer's output goes into the next layer only: its ratio folds into
    # that layer's product with no ratio or pass-through node made on the way; elsewhere (the
    # flatten, the output) the nodes are made as before. Same bits either way.
    made = _counting_nodes(monkeypatch)
    model = _seeded(_Steps(), dtype)
    x = torch.randn(5, 6, dtype=dtype)
    chained = LRP(model).attribute(x, target=[0, 1, 2, 0, 1])
    # act makes fc2's ratio node, as torch.flatten stands between it and fc3; fc3's own; the
    # products at fc2 and fc3 fold (flattening a 2-D tensor returns it).
    assert made == {"ratio": 2, "passing": 1, "product_ratio": 2}
    made.update(dict.fromkeys(made, 0))
    expected = LRP(_unproven(model)).attribute(x, target=[0, 1, 2, 0, 1])
    assert made == {"ratio": 3, "passing": 2, "product_ratio": 2}
    torch.testing.assert_close(chained, expected, rtol=0, atol=0)
    # A tapped layer keeps the nodes its relevance must reach.
    twin = _unproven(model)
    for name in ("fc1", "relu", "fc2", "act"):
        for to_input in (False, True):
            torch.testing.assert_close(
                LayerLRP(model, getattr(model, name)).attribute(
                    x, target=1, attribute_to_layer_input=to_input
                ),
                LayerLRP(twin, getattr(twin, name)).attribute(
                    x, target=1, attribute_to_layer_input=to_input
                ),
                rtol=0,
                atol=0,
            )


def test_a_layer_run_twice_or_followed_by_a_reshape_module_gets_its_nodes(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The shared ReLU runs twice: the layers before it hand their outputs on, and it makes
    # their ratio nodes itself (which the next products fold away). The layer before
    # nn.Identity makes its own.
    made = _counting_nodes(monkeypatch)
    relu = nn.ReLU()
    model = _seeded(
        nn.Sequential(
            nn.Linear(6, 8),
            relu,
            nn.Linear(8, 8),
            relu,
            nn.Linear(8, 8),
            nn.Identity(),
            nn.Tanh(),
            nn.Linear(8, 3),
        ),
        torch.float64,
    )
    x = torch.randn(4, 6, dtype=torch.float64)
    relevance = LRP(model).attribute(x, target=2)
    assert made == {"ratio": 4, "passing": 3, "product_ratio": 3}
    torch.testing.assert_close(
        relevance, LRP(_unproven(model)).attribute(x, target=2), rtol=0, atol=0
    )
    _close(relevance, _zennit(model, x, 2))


def test_a_forward_replaced_between_calls_is_read_again() -> None:
    # The chain proof holds for the class's forward; an instance forward set later uses fc1's
    # output twice, so its ratio node must be made again.
    model = _seeded(_Steps(), torch.float64)
    x = torch.randn(4, 6, dtype=torch.float64)
    lrp = LRP(model)
    lrp.attribute(x, target=0)

    def reusing(t: torch.Tensor) -> torch.Tensor:
        z = model.fc1(t)
        return model.fc3(model.act(model.fc2(model.relu(z)))) * z.mean()

    model.forward = reusing
    torch.testing.assert_close(
        lrp.attribute(x, target=0), LRP(model).attribute(x, target=0), rtol=0, atol=0
    )


def test_input_gradients_agree_with_autograd_grad_for_plain_tensors_and_subclasses() -> None:
    from fastattr._autograd import input_gradients

    class Marked(torch.Tensor):
        pass

    for wrap in (lambda t: t, lambda t: t.as_subclass(Marked)):
        x = wrap(torch.randn(3, 4)).requires_grad_()
        unused = torch.randn(2, requires_grad=True)
        output = (x * x).sum(1)
        seed = torch.randn(3)
        grads = input_gradients(output, (x, unused), seed)
        assert grads[1] is None
        torch.testing.assert_close(grads[0], 2 * x.detach() * seed[:, None], rtol=0, atol=1e-6)
