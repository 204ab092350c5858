"""LRP and LayerLRP: against captum on the models it runs, against zennit on those it cannot,
conservation, the model left as found, and bad input."""

from __future__ import annotations

import copy
import warnings

import captum.attr as captum_attr
import captum.attr._utils.lrp_rules as captum_rules
import pytest
import torch
import zennit.rules as zr
from captum.attr._utils.custom_modules import Addition_Module
from torch import nn
from zennit.composites import LayerMapComposite
from zennit.core import Stabilizer
from zennit.layer import Sum
from zennit.rules import Epsilon, Norm, Pass
from zennit.types import Activation

import fastattr
from fastattr import LRP, Alpha1_Beta0_Rule, EpsilonRule, GammaRule, IdentityRule, LayerLRP
from fastattr.canonizers import EpsilonSum

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


class BeyondToo(nn.Module):
    """The remaining 1-D and 3-D variants: transposed convolutions, adaptive pooling; more
    activations captum has no rule for (it raises TypeError for a Sigmoid, even unused)."""

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
            nn.Sigmoid(),
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


@pytest.mark.parametrize("name", ["shufflenet_v2_x0_5", "efficientnet_b0"])
def test_torchvision_models_captum_cannot_run_match_zennit(name: str) -> None:
    # ShuffleNet's stride-1 blocks hold an empty nn.Sequential (the identity, never called);
    # EfficientNet drops residual branches with torchvision's StochasticDepth (the identity in
    # eval mode): neither needs a rule, and zennit's plain autograd through them is the number.
    import torchvision

    torch.manual_seed(0)
    model = getattr(torchvision.models, name)(weights=None).to(torch.float64).eval()
    x = torch.randn(1, 3, 32, 32, dtype=torch.float64)
    with pytest.raises(TypeError):
        _captum(captum_attr.LRP, model, x, target=3)
    _close(LRP(model).attribute(x, target=3), _zennit(model, x, 3))


def test_stochastic_depth_in_training_mode_passes_relevance_as_dropout_does() -> None:
    from torchvision.ops import StochasticDepth

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), StochasticDepth(0.5, "row"), nn.Linear(6, 2))
    model = model.to(torch.float64).train()
    x = torch.randn(8, 4, dtype=torch.float64)
    torch.manual_seed(1)  # the same rows dropped in both
    ours = LRP(model).attribute(x, target=1)
    torch.manual_seed(1)
    composite = LayerMapComposite([(StochasticDepth, Pass()), (nn.Linear, Epsilon(1e-9))])
    leaf = x.clone().requires_grad_()
    with composite.context(model) as modified:
        output = modified(leaf)
        seed = torch.zeros_like(output)
        seed[:, 1] = output[:, 1]
        (theirs,) = torch.autograd.grad(output, leaf, seed)
    assert (theirs == 0).all(1).any() and not (theirs == 0).all()  # some rows dropped
    _close(ours, theirs)


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


def test_inference_mode_is_a_clear_error_and_no_grad_runs() -> None:
    # Under torch.inference_mode() no graph is recorded: captum fails registering its hooks;
    # fastattr says so up front (it failed deep inside the propagation).
    model = _seeded(MLP(), torch.float64)
    state, modes = _snapshot(model), {n: m.training for n, m in model.named_modules()}
    x = torch.randn(3, 12, dtype=torch.float64)
    with torch.inference_mode():
        with pytest.raises(RuntimeError):
            _captum(captum_attr.LRP, model, x, target=0)
    calls = [
        lambda: LRP(model).attribute(x, target=0),
        lambda: LRP(model).attribute_targets(x, [0, 1]),
        lambda: LayerLRP(model, model.fc1).attribute(x, target=0),
        lambda: LayerLRP(model, model.fc1).attribute_targets(x, [0, 1]),
    ]
    for call in calls:
        with torch.inference_mode(), pytest.raises(RuntimeError, match="inference_mode"):
            call()
        _assert_untouched(model, state, {}, modes)
    with torch.no_grad():
        ours = LRP(model).attribute(x, target=0)
        theirs = _captum(captum_attr.LRP, model, x, target=0)
    _close(ours, theirs.detach())


def test_inputs_made_under_inference_mode_give_captums_numbers() -> None:
    # Inputs preprocessed under torch.inference_mode() and attributed outside it: captum fails
    # ("Setting requires_grad=True on inference tensor"), as fastattr did.
    model = _seeded(MLP(), torch.float64)
    x = torch.randn(3, 12, dtype=torch.float64)
    with torch.inference_mode():
        made = x.clone()
    assert made.is_inference()
    ours = LRP(model).attribute(made, target=0)
    ours_layer = LayerLRP(model, model.fc2).attribute(made, target=0)
    _close(ours, _captum(captum_attr.LRP, model, x, target=0))
    _close(ours_layer, _captum(captum_attr.LayerLRP, model, x, model.fc2, target=0))


class Detached(nn.Module):
    def __init__(self, how: str) -> None:
        super().__init__()
        self.fc = nn.Linear(12, 5)
        self.how = how

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.how == "no_grad":
            with torch.no_grad():
                return self.fc(x)
        out = self.fc(x)
        return out.detach() if self.how == "detached" else (out > 0).to(out.dtype)


@pytest.mark.parametrize("how", ["no_grad", "detached", "from-a-comparison"])
def test_an_output_without_a_graph_is_a_clear_error(how: str) -> None:
    # captum fails inside autograd (or registering its hooks); fastattr says which output and
    # why, and leaves the model as found.
    model = Detached(how).double()
    x = torch.randn(3, 12, dtype=torch.float64)
    with pytest.raises(RuntimeError):
        _captum(captum_attr.LRP, model, x, target=1)
    state, modes = _snapshot(model), {n: m.training for n, m in model.named_modules()}
    for method in (LRP(model), LayerLRP(model, model.fc)):
        with pytest.raises(RuntimeError, match=r"the output to attribute .* has no gradient"):
            method.attribute(x, target=1)
        _assert_untouched(model, state, {}, modes)


def test_unsupported_modules_listed_before_any_work() -> None:
    calls = []

    class Model(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.norm = nn.LayerNorm(4)
            self.fc = nn.Linear(4, 4)
            self.norm2 = nn.LayerNorm(4)
            self.soft = nn.Softmax(dim=1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            calls.append(1)
            return self.soft(self.norm2(self.fc(self.norm(x))))

    with pytest.raises(TypeError, match=r"LayerNorm \(model.norm, model.norm2\); Softmax"):
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
    # An epsilon set after the rule checked it, or a custom rule's, is checked where it
    # reaches the nodes (the compiled kernels take it unchecked).
    for epsilon in (-1.0, float("nan")):
        rule = EpsilonRule()
        rule.epsilon = epsilon
        model.fc1.rule = rule
        with pytest.raises(ValueError, match=r"^epsilon\b"):
            LRP(model).attribute(x, target=0)
    del model.fc1.rule
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


def test_compute_convergence_delta_takes_one_output_per_example() -> None:
    model = _seeded(MLP(), torch.float64)
    x = torch.randn(3, 12, dtype=torch.float64)
    lrp = LRP(model)
    relevance = lrp.attribute(x, target=1)
    output = model(x)
    for value in (output[:, 1], output[:, 1].sum()):  # one value per example, or one for all
        theirs = captum_attr.LRP(model).compute_convergence_delta(relevance, value)
        _close(lrp.compute_convergence_delta(relevance, value), theirs)
    # captum fails broadcasting (B, C) against the (B,) sums; fastattr names the output.
    with pytest.raises(RuntimeError, match="must match the size"):
        captum_attr.LRP(model).compute_convergence_delta(relevance, output)
    with pytest.raises(ValueError, match=r"output must hold one value per example \(3\)"):
        lrp.compute_convergence_delta(relevance, output)
    empty = torch.zeros(0, 12, dtype=torch.float64)
    assert lrp.compute_convergence_delta(empty, torch.zeros(0, dtype=torch.float64)).shape == (0,)


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


class Folded(nn.Module):
    """A layer run on the tokens of every example folded into one leading dimension, and
    called with its input by keyword."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = nn.Linear(4, 4)
        self.head = nn.Linear(12, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.inner(input=x.reshape(-1, 4)).reshape(x.shape[0], -1))


def test_layer_lrp_refuses_what_it_cannot_give_per_example() -> None:
    model = Folded().double()
    state = _snapshot(model)
    x = torch.randn(2, 3, 4, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"shape \[6, 4\].*not the batch \(2 examples\)"):
        LayerLRP(model, model.inner).attribute(x, target=0)
    with pytest.raises(ValueError, match=r"no positional input .*keyword arguments"):
        LayerLRP(model, model.inner).attribute(x, target=0, attribute_to_layer_input=True)
    _assert_untouched(model, state, {}, {"": True, "inner": True, "head": True})


class BatchSum(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(4, 4), nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x))).sum(0, keepdim=True)


def test_layer_lrp_with_one_output_value_for_the_batch_matches_captum() -> None:
    torch.manual_seed(0)
    model = BatchSum().double()
    x = torch.randn(3, 4, dtype=torch.float64)
    ours = LayerLRP(model, model.fc1).attribute(x, target=0)
    _close(ours, _captum(captum_attr.LayerLRP, model, x, target=0, layer=model.fc1))


def test_in_place_sum_retries_once_with_copies(capsys: pytest.CaptureFixture) -> None:
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
    lrp = LRP(model, canonizers=[EpsilonSum()])
    relevance, delta = lrp.attribute(x, target=1, return_convergence_delta=True, verbose=True)
    assert len(capsys.readouterr().out.splitlines()) == 3  # printed once, despite the retry
    scale = float(model(x)[:, 1].abs().max())
    torch.testing.assert_close(delta, torch.zeros_like(delta), rtol=0, atol=1e-7 * scale)
    _close(lrp.attribute(x, target=1), relevance)


def test_bench_resnet_conserves_and_transformer_is_refused() -> None:
    from fastattr.bench.models import resnet, transformer

    model = resnet().double()
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            # Shift-free batch norms: relevance is then conserved up to epsilon.
            module.bias.data.zero_()
            module.running_mean.zero_()
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    model.fc.bias.data.zero_()
    lrp = LRP(model, canonizers=[EpsilonSum()])
    _, delta = lrp.attribute(x, target=4, return_convergence_delta=True)
    scale = float(model(x)[:, 4].abs().max())
    torch.testing.assert_close(delta, torch.zeros_like(delta), rtol=0, atol=1e-6 * scale)
    with pytest.raises(TypeError, match="Embedding"):
        LRP(transformer()).attribute(torch.zeros(2, 32, dtype=torch.long), target=0)


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


# captum's behaviours (issue 11, section 3).


class AddsBetweenModules(nn.Module):
    """A functional `+` of two module outputs, and of a module output and an extra input."""

    def __init__(self) -> None:
        super().__init__()
        self.left = nn.Linear(6, 8)
        self.right = nn.Linear(6, 8)
        self.relu = nn.ReLU()
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor, add_input: torch.Tensor) -> torch.Tensor:
        return self.head(self.relu(self.left(x) + self.right(x) + add_input))


@pytest.mark.parametrize("dtype", DTYPES)
def test_functional_addition_is_plain_autograd_as_in_captum(dtype: torch.dtype) -> None:
    model = _seeded(AddsBetweenModules(), dtype)
    x, extra = torch.randn(4, 6, dtype=dtype), torch.randn(4, 8, dtype=dtype)
    ours, delta = LRP(model).attribute(
        x, target=2, additional_forward_args=(extra,), return_convergence_delta=True
    )
    theirs, their_delta = _captum(
        captum_attr.LRP,
        model,
        x,
        target=2,
        additional_forward_args=(extra,),
        return_convergence_delta=True,
    )
    _close(ours, theirs)
    _close(delta, their_delta)
    ours_layer = LayerLRP(model, model.left).attribute(
        x, target=2, additional_forward_args=(extra,)
    )
    theirs_layer = _captum(
        captum_attr.LayerLRP, model, x, model.left, target=2, additional_forward_args=(extra,)
    )
    _close(ours_layer, theirs_layer)


@pytest.mark.parametrize("rule", ["gamma", "epsilon0", "alpha"])
def test_rules_on_relu_dropout_tanh_are_ignored_as_in_captum(rule: str) -> None:
    # captum passes relevance straight through these three, whatever rule they carry. The
    # dropout follows a ReLU: EpsilonRule(0) on it would divide 0 by 0.
    model = nn.Sequential(
        nn.Linear(12, 16), nn.ReLU(), nn.Dropout(0.5), nn.Linear(16, 8), nn.Tanh(), nn.Linear(8, 3)
    )
    model = _seeded(model, torch.float64)
    x = torch.randn(5, 12, dtype=torch.float64)
    made = {
        "gamma": (GammaRule, captum_rules.GammaRule),
        "epsilon0": (lambda: EpsilonRule(0), lambda: captum_rules.EpsilonRule(0)),
        "alpha": (Alpha1_Beta0_Rule, captum_rules.Alpha1_Beta0_Rule),
    }[rule]
    ignored = (model[1], model[2], model[4])
    for layer in ignored:
        layer.rule = made[0]()
    ours = LRP(model).attribute(x, target=1)
    for layer in ignored:
        layer.rule = made[1]()
    theirs = _captum(captum_attr.LRP, model, x, target=1)
    assert not ours.isnan().any()
    _close(ours, theirs)


def _tutorial_rules(model: nn.Module, rules: object) -> None:
    # captum's VGG LRP tutorial: gamma on the first layers, epsilon 0.25 in the middle,
    # epsilon 0 on the classifier, alpha1-beta0 on the first convolution (here on vgg11).
    layers = list(model.features) + list(model.classifier)
    for i in range(1, len(layers)):
        if i <= 10:
            layers[i].rule = rules.GammaRule()  # type: ignore[attr-defined]
        elif i <= 20:
            layers[i].rule = rules.EpsilonRule(epsilon=0.25)  # type: ignore[attr-defined]
        else:
            layers[i].rule = rules.EpsilonRule(epsilon=0)  # type: ignore[attr-defined]
    model.features[0].rule = rules.Alpha1_Beta0_Rule()  # type: ignore[attr-defined]


class SmallVGG11(nn.Module):
    """torchvision's vgg11 (in-place ReLUs, dropout in the classifier) at an eighth of its
    widths: the same features, pooling and classifier layout."""

    def __init__(self) -> None:
        from torchvision.models.vgg import make_layers

        super().__init__()
        self.features = make_layers([8, "M", 16, "M", 32, 32, "M", 64, 64, "M", 64, 64, "M"])
        self.avgpool = nn.AdaptiveAvgPool2d((7, 7))
        self.classifier = nn.Sequential(
            nn.Linear(64 * 7 * 7, 64),
            nn.ReLU(True),
            nn.Dropout(),
            nn.Linear(64, 64),
            nn.ReLU(True),
            nn.Dropout(),
            nn.Linear(64, 10),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


def _small_vgg11() -> nn.Module:
    torch.manual_seed(0)
    return SmallVGG11().double().eval()


def test_captum_vgg_tutorial_layout_on_in_place_relus_matches_captum() -> None:
    model = _small_vgg11()
    x = torch.randn(1, 3, 32, 32, dtype=torch.float64)
    _tutorial_rules(model, fastattr)
    ours = LRP(model).attribute(x, target=3)
    _tutorial_rules(model, captum_rules)
    theirs = _captum(captum_attr.LRP, model, x, target=3)
    _close(ours, theirs)
    # The tutorial's first step on its own: a rule on an in-place ReLU.
    plain = _small_vgg11()
    plain.features[1].rule = EpsilonRule()
    ours = LRP(plain).attribute(x, target=3)
    plain.features[1].rule = captum_rules.EpsilonRule()
    _close(ours, _captum(captum_attr.LRP, plain, x, target=3))


class HoldsAnUnusedEmbedding(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 2)
        self.unused = nn.Embedding(10, 4)  # never called

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x)


def test_a_module_without_rule_raises_type_error_first_as_in_captum() -> None:
    model = HoldsAnUnusedEmbedding()
    x = torch.randn(3, 4)
    with pytest.raises(TypeError):
        _captum(captum_attr.LRP, model, x, target=0)
    # Before anything else: here the target is out of range, the inputs are not floating.
    for bad in (x, x.long()):
        with pytest.raises(TypeError, match=r"Embedding \(model.unused\)"):
            LRP(model).attribute(bad, target=7)
        with pytest.raises(TypeError, match=r"Embedding \(model.unused\)"):
            LayerLRP(model, model.fc).attribute(bad, target=7)


class OwnParameters(nn.Module):
    """A container using a parameter of its own: captum runs it, as plain autograd."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(5, 5)
        self.scale = nn.Parameter(torch.rand(5) + 0.5)
        self.head = nn.Linear(5, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.fc(x) * self.scale)


def test_containers_without_rule_run_as_plain_autograd_as_in_captum() -> None:
    model = _seeded(OwnParameters(), torch.float64)
    x = torch.randn(3, 5, dtype=torch.float64)
    _close(LRP(model).attribute(x, target=1), _captum(captum_attr.LRP, model, x, target=1))


class Unrolled(nn.Module):
    def __init__(self, shared: bool) -> None:
        super().__init__()
        self.fc1 = nn.Linear(5, 5)
        self.fc2 = self.fc1 if shared else nn.Linear(5, 5)
        self.relu = nn.ReLU()
        self.head = nn.Linear(5, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.relu(self.fc2(self.relu(self.fc1(x)))))


def test_a_module_used_twice_is_the_unrolled_model() -> None:
    # Deliberate difference: captum refuses a module with a rule that runs twice; fastattr
    # applies the rule at each call, which is LRP on the model with the module unrolled.
    shared = _seeded(Unrolled(shared=True), torch.float64)
    unrolled = Unrolled(shared=False).double()
    state = shared.state_dict()
    unrolled.load_state_dict({**state, **{k.replace("fc1", "fc2"): v for k, v in state.items()}})
    x = torch.randn(4, 5, dtype=torch.float64)
    with pytest.raises(RuntimeError, match="more than once"):
        _captum(captum_attr.LRP, shared, x, target=0)
    for model in (shared, unrolled):
        model.fc1.rule = GammaRule()
    unrolled.fc2.rule = GammaRule()
    ours = LRP(shared).attribute(x, target=0)
    _close(ours, LRP(unrolled).attribute(x, target=0))
    unrolled.fc1.rule = unrolled.fc2.rule = captum_rules.GammaRule()
    _close(ours, _captum(captum_attr.LRP, unrolled, x, target=0))


class Affine(nn.Module):
    """A linear map written as a container around a linear layer and a parameter."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = nn.Linear(5, 4)
        self.shift = nn.Parameter(torch.randn(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x) + self.shift


def test_a_rule_on_a_container_covers_it_as_one_layer() -> None:
    # Deliberate difference: captum ignores rules on modules with submodules; fastattr applies
    # them to the module as a whole, as if it were one layer computing the same map.
    model = nn.Sequential(Affine(), nn.ReLU(), nn.Linear(4, 2)).double()
    _seeded(model, torch.float64)
    leaf = nn.Sequential(nn.Linear(5, 4), nn.ReLU(), nn.Linear(4, 2)).double()
    leaf[0].weight.data = model[0].inner.weight.data.clone()
    leaf[0].bias.data = model[0].inner.bias.data + model[0].shift.data
    leaf[2].load_state_dict(model[2].state_dict())
    x = torch.randn(3, 5, dtype=torch.float64)
    model[0].rule = EpsilonRule(0.1)
    leaf[0].rule = EpsilonRule(0.1)
    _close(LRP(model).attribute(x, target=1), LRP(leaf).attribute(x, target=1))


class Branching(nn.Module):
    """h = fc1(x) feeds fc2 and, through a plain `+`, the head: out = head(fc2(h) + h)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(1, 1, bias=False)
        self.fc2 = nn.Linear(1, 1, bias=False)
        self.head = nn.Linear(1, 1, bias=False)
        for layer, weight in ((self.fc1, 2.0), (self.fc2, 3.0), (self.head, 1.0)):
            nn.init.constant_(layer.weight, weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc1(x)
        return self.head(self.fc2(h) + h)


def test_an_activation_used_twice_gets_each_rule_on_its_own_use() -> None:
    # Deliberate difference. x = 1: h = 2, fc2(h) = 6, output 8. The plain `+` hands the
    # output's relevance (8) to both branches: fc2 sends 8 back to h, the `+` another 8, and h's
    # 16 reach x (LRP-0, epsilon negligible). captum's rules are tensor hooks: fc2's input hook
    # multiplies *all* of h's gradient by h, so the `+` branch's relevance is multiplied by
    # h = 2 once more (24). zennit applies each rule to the module's own use, as fastattr does.
    model = Branching().double()
    x = torch.ones(1, 1, dtype=torch.float64)
    ours = LRP(model).attribute(x, target=0)
    torch.testing.assert_close(ours, torch.full_like(x, 16.0), rtol=1e-9, atol=0)
    torch.testing.assert_close(
        _captum(captum_attr.LRP, model, x, target=0), torch.full_like(x, 24.0), rtol=1e-9, atol=0
    )
    _close(ours, _zennit(model, x, 0))
    # The epsilon rule of the sum splits the 8 by the branches' shares instead: 6 and 2.
    summed = LRP(model, canonizers=[EpsilonSum()]).attribute(x, target=0)
    torch.testing.assert_close(summed, torch.full_like(x, 8.0), rtol=1e-9, atol=0)


class SharedInput(nn.Module):
    """Two layers reading the same tensor (bias-free, so that LRP conserves relevance)."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 3, bias=False)
        self.b = nn.Linear(4, 3, bias=False)
        self.out = nn.Linear(6, 2, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.cat([self.a(x), self.b(x)], 1))


def test_layer_input_relevance_is_the_layer_s_own_share_of_a_shared_tensor() -> None:
    # Deliberate difference. captum's input hook sits on the tensor, so the first layer's
    # "input relevance" is the relevance of x from both layers, and the second layer's fails.
    # fastattr gives each layer what it passes to its input: its output relevance, conserved
    # (bias-free), and the two shares add up to x's relevance.
    model = _seeded(SharedInput(), torch.float64)
    x = torch.randn(3, 4, dtype=torch.float64)
    total = LRP(model).attribute(x, target=1)
    shares = []
    for layer in (model.a, model.b):
        share = LayerLRP(model, layer).attribute(x, target=1, attribute_to_layer_input=True)
        output = LayerLRP(model, layer).attribute(x, target=1)
        torch.testing.assert_close(share.sum(1), output.sum(1), rtol=0, atol=1e-8)
        _close(output, _captum(captum_attr.LayerLRP, model, x, layer, target=1))
        shares.append(share)
    _close(shares[0] + shares[1], total)
    theirs = _captum(
        captum_attr.LayerLRP, model, x, model.a, target=1, attribute_to_layer_input=True
    )
    _close(theirs.detach(), total)
    with pytest.raises(AssertionError):
        _captum(captum_attr.LayerLRP, model, x, model.b, target=1, attribute_to_layer_input=True)


class FirstExampleOnly(nn.Module):
    """An output whose first dimension is not the batch's: model(x)[0].unsqueeze(0)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(2, 2)
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.lin(x))[0].unsqueeze(0)


def test_an_output_not_one_per_example_is_differentiated_as_captum_does() -> None:
    model = _seeded(FirstExampleOnly(), torch.float64)
    x = torch.randn(3, 2, dtype=torch.float64)
    ours, delta = LRP(model).attribute(x, target=0, return_convergence_delta=True)
    theirs, their_delta = _captum(
        captum_attr.LRP, model, x, target=0, return_convergence_delta=True
    )
    _close(ours, theirs)
    _close(delta, their_delta)
    with pytest.raises(ValueError, match="one value per example"):
        LRP(model).attribute(x)  # (1, 2): neither per example nor per entry


# attribute_targets: one forward, one backward per target.


@pytest.mark.parametrize(
    "targets",
    [[0, 3, 1], (2,), [[0, 1, 2, 3], 4], torch.tensor([1, 4]), [torch.tensor([0, 1, 0, 1])]],
    ids=["ints", "one", "mixed", "tensor", "per-example-tensor"],
)
def test_attribute_targets_equals_one_call_per_target(targets: object) -> None:
    model = _seeded(MLP(), torch.float64)
    x = torch.randn(4, 12, dtype=torch.float64)
    lrp = LRP(model)
    found = lrp.attribute_targets(x, targets, return_convergence_delta=True)
    expected_targets = list(targets.unbind(0)) if isinstance(targets, torch.Tensor) else targets
    assert len(found) == len(expected_targets)
    for (relevance, delta), target in zip(found, expected_targets):
        expected, expected_delta = lrp.attribute(x, target=target, return_convergence_delta=True)
        torch.testing.assert_close(relevance, expected, rtol=0, atol=0)
        torch.testing.assert_close(delta, expected_delta, rtol=0, atol=0)


def test_attribute_targets_with_tuple_inputs_grid_outputs_layers_and_canonizers() -> None:
    model = _seeded(TwoInputs(), torch.float64)
    a, b = torch.randn(4, 6, dtype=torch.float64), torch.randn(4, 4, dtype=torch.float64)
    lrp = LRP(model)
    for found, target in zip(lrp.attribute_targets((a, b), [0, 2], 2.0), [0, 2]):
        for mine, expected in zip(found, lrp.attribute((a, b), target, 2.0)):
            _close(mine, expected)
    grid = _seeded(GridOutput(), torch.float64)
    x = torch.randn(3, 7, dtype=torch.float64)
    targets = [(0, 1), [(1, 2), (0, 0), (1, 4)]]
    for found, target in zip(LRP(grid).attribute_targets(x, targets), targets):
        _close(found, LRP(grid).attribute(x, target=target))
    cnn = _seeded(CNN(inplace=True), torch.float64)
    images = torch.randn(2, 3, 12, 12, dtype=torch.float64)
    layer_lrp = LayerLRP(cnn, [cnn.conv2, cnn.fc1], canonizers=[EpsilonSum()])
    for to_input in (False, True):
        found = layer_lrp.attribute_targets(
            images, [3, 1], attribute_to_layer_input=to_input, return_convergence_delta=True
        )
        for (relevances, deltas), target in zip(found, [3, 1]):
            expected, expected_deltas = layer_lrp.attribute(
                images, target, attribute_to_layer_input=to_input, return_convergence_delta=True
            )
            for mine, theirs in zip([*relevances, *deltas], [*expected, *expected_deltas]):
                _close(mine, theirs)


def test_attribute_targets_bad_targets() -> None:
    lrp = LRP(_seeded(MLP(), torch.float32))
    x = torch.randn(3, 12)
    with pytest.raises(ValueError, match="at least one target"):
        lrp.attribute_targets(x, [])
    with pytest.raises(TypeError, match="targets must be a list or tuple"):
        lrp.attribute_targets(x, 3)
    with pytest.raises(IndexError, match=r"targets\[1\]"):
        lrp.attribute_targets(x, [0, 9])
    with pytest.raises(ValueError, match="None"):
        lrp.attribute_targets(x, [None, 1])


@pytest.mark.parametrize(
    "parametrization",
    [
        nn.utils.parametrizations.weight_norm,
        nn.utils.parametrizations.spectral_norm,
        nn.utils.parametrizations.orthogonal,
    ],
    ids=["weight_norm", "spectral_norm", "orthogonal"],
)
def test_parametrized_weights_give_captums_numbers_on_the_plain_model(parametrization) -> None:
    # torch.nn.utils.parametrize computes a weight through modules under the layer's
    # `parametrizations`: they compute weights, not activations, so the layer keeps the rule
    # of its type. Captum refuses them ("no rule for _WeightNorm"); its numbers on the same
    # model without parametrizations are the reference.
    def build() -> nn.Sequential:
        torch.manual_seed(0)
        return nn.Sequential(
            nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3)
        ).double()

    model, plain = build(), build().eval()
    parametrization(model[0])
    parametrization(model[2])
    model.eval()
    with torch.no_grad():
        for ours, theirs in zip(model, plain):
            if isinstance(ours, nn.Linear):
                theirs.weight.copy_(ours.weight)
    model[2].rule = GammaRule(0.25)
    state = _snapshot(model)
    x = torch.randn(4, 6, dtype=torch.float64)
    ours = LRP(model).attribute(x, target=1)
    ours_layer = LayerLRP(model, model[2]).attribute(x, target=1, attribute_to_layer_input=True)
    plain[2].rule = captum_rules.GammaRule(0.25)
    theirs = _captum(captum_attr.LRP, plain, x, target=1)
    plain[2].rule = captum_rules.GammaRule(0.25)  # captum removed it
    theirs_layer = _captum(
        captum_attr.LayerLRP, plain, x, plain[2], target=1, attribute_to_layer_input=True
    )
    _close(ours, theirs)
    _close(ours_layer, theirs_layer)
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key]), key


@pytest.mark.parametrize("in_place", [False, True], ids=["compiled", "compiled_in_place"])
def test_a_compiled_model_gives_captums_numbers_without_a_warning(in_place: bool) -> None:
    # Compiled code runs no hook added after it was compiled (LayerLRP: "did not run"), traces
    # the rules' nodes into its graph (inductor fails on them), and torch warns on every call
    # of a compiled wrapper while process-wide hooks are in place: LRP runs the model eagerly.
    model = _seeded(MLP(), torch.float64)
    x = torch.randn(4, 12, dtype=torch.float64)
    model.fc2.rule = GammaRule(0.25)
    if in_place:
        compiled = copy.deepcopy(model)
        compiled.compile(backend="eager")
    else:
        compiled = torch.compile(model, backend="eager")
    compiled(x)  # compiled before LRP's hooks are added
    layer = compiled.fc2 if in_place else model.fc2
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ours = LRP(compiled).attribute(x, target=1)
        ours_layer = LayerLRP(compiled, layer).attribute(x, target=1)
    model.fc2.rule = captum_rules.GammaRule(0.25)
    theirs_layer = _captum(captum_attr.LayerLRP, model, x, model.fc2, target=1)
    model.fc2.rule = captum_rules.GammaRule(0.25)  # captum removed it
    theirs = _captum(captum_attr.LRP, model, x, target=1)
    _close(ours, theirs)
    _close(ours_layer, theirs_layer)
    assert torch._dynamo.eval_frame._stance.stance == "default"


@pytest.mark.parametrize("how", ["trace", "script"])
def test_a_torchscript_model_is_a_clear_error(how: str) -> None:
    # Captum (and fastattr before) asked for a rule on each TracedModule, which no rule can
    # act inside: TorchScript runs no Python hooks.
    model = _seeded(MLP(), torch.float64)
    x = torch.randn(2, 12, dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit is deprecated
        scripted = torch.jit.trace(model, (x,)) if how == "trace" else torch.jit.script(model)
    with pytest.raises(TypeError, match=r"TorchScript modules .* before tracing or scripting"):
        LRP(scripted).attribute(x, target=0)
    with pytest.raises(TypeError, match="TorchScript modules"):
        LayerLRP(scripted, scripted.fc1).attribute(x, target=0)


def test_layer_lrp_on_a_container_is_a_clear_error() -> None:
    class Blocks(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.blocks = nn.ModuleList([nn.Linear(4, 4), nn.Linear(4, 4)])

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            for block in self.blocks:
                x = block(x)
            return x

    model = Blocks()
    with pytest.raises(ValueError, match=r"no forward of its own .* one of the modules"):
        LayerLRP(model, model.blocks).attribute(torch.randn(2, 4), target=0)


def test_layer_lrp_on_a_layer_returning_a_dict_is_a_clear_error() -> None:
    # It read as "has no output that depends on the attributed inputs".
    class Heads(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 3)

        def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
            return {"logits": self.fc(x)}

    class Model(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.heads = Heads()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.heads(x)["logits"]

    model, x = Model(), torch.randn(2, 4)
    with pytest.raises(TypeError, match="returns a dict: LayerLRP reads a layer's output as"):
        LayerLRP(model, model.heads).attribute(x, target=0)
    # Its input is a tensor, as usual.
    relevance = LayerLRP(model, model.heads).attribute(x, target=0, attribute_to_layer_input=True)
    _close(relevance, LRP(model).attribute(x, target=0))


def test_dropout_in_training_mode_draws_one_mask_and_conserves() -> None:
    # Captum runs two forwards (the output, then the relevance), each drawing its own dropout
    # mask, and scales one's relevance by the other's output: its relevance does not add up
    # to the output even without biases. fastattr's single forward draws one mask.
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(6, 16, bias=False), nn.ReLU(), nn.Dropout(0.5), nn.Linear(16, 3, bias=False)
    )
    model = model.double().train()
    x = torch.randn(4, 6, dtype=torch.float64)
    torch.manual_seed(1)
    _, delta = LRP(model).attribute(x, target=1, return_convergence_delta=True)
    ours_next = torch.rand(1)
    torch.manual_seed(1)
    _, their_delta = _captum(captum_attr.LRP, model, x, target=1, return_convergence_delta=True)
    torch.manual_seed(1)
    model(x)  # one mask drawn
    assert torch.equal(ours_next, torch.rand(1))
    assert delta.abs().max() < 1e-6  # what the epsilon stabilizer takes
    assert their_delta.abs().max() > 1e-2


# zennit's rules: each against zennit's own, in float64 and float32, on every layer of a
# convolution net and an MLP, with epsilon 1e-9 on the other layers in both (zennit's rules
# get the same stabilizer argument as fastattr's, their default 1e-6 unless given).


def _zennit_with(
    model: nn.Module, x: torch.Tensor, target: int, name: str, rule, layer_map: tuple = ()
) -> torch.Tensor:
    from zennit.composites import NameLayerMapComposite

    layer_map = [
        *layer_map,
        (Activation, Pass()),
        ((nn.Linear, nn.modules.conv._ConvNd), Epsilon(1e-9)),
    ]
    composite = NameLayerMapComposite(name_map=[((name,), rule)], layer_map=layer_map)
    x = x.clone().requires_grad_()
    with composite.context(model) as modified:
        output = modified(x)
        seed = torch.zeros_like(output)
        seed[:, target] = output[:, target]
        (relevance,) = torch.autograd.grad(output, x, seed)
    return relevance


def _zennit_rule_nets() -> list:
    torch.manual_seed(0)
    conv = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1, padding_mode="reflect"),
        nn.ReLU(),
        nn.Conv2d(4, 5, 3, stride=2),
        nn.ReLU(),
        nn.ConvTranspose2d(5, 3, 2, stride=2, bias=False),
        nn.ReLU(),
        nn.Flatten(),
        nn.Conv1d(1, 2, 5),
        nn.Flatten(),
        nn.Linear(2 * 44, 4),
    )
    mlp = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 7), nn.Tanh(), nn.Linear(7, 3))
    conv.insert(7, nn.Unflatten(1, (1, 48)))
    return [(conv, (2, 3, 6, 6), ["0", "2", "4", "8", "10"]), (mlp, (3, 6), ["0", "2", "4"])]


# Per-channel bounds: broadcast (fastattr) and with trailing singleton dimensions (zennit).
_HIGH = torch.tensor([1.0, 2.0, 3.0])


def _scaled(z: torch.Tensor) -> torch.Tensor:
    """A callable stabilizer, as zennit takes them: the stabilized denominator itself."""
    return 1.25 * z + torch.where(z < 0, -1e-3, 1e-3)


ZENNIT_RULES = [
    ("AlphaBeta(2, 1)", lambda: fastattr.AlphaBetaRule(2, 1), lambda: zr.AlphaBeta(2.0, 1.0)),
    (
        "AlphaBeta(3, 2, 1e-3)",
        lambda: fastattr.AlphaBetaRule(3, 2, stabilizer=1e-3),
        lambda: zr.AlphaBeta(3.0, 2.0, stabilizer=1e-3),
    ),
    ("ZPlus", lambda: fastattr.ZPlusRule(), lambda: zr.ZPlus()),
    ("Gamma(0.5)", lambda: fastattr.GeneralizedGammaRule(0.5), lambda: zr.Gamma(0.5)),
    ("Flat", lambda: fastattr.FlatRule(), lambda: zr.Flat()),
    ("WSquare", lambda: fastattr.WSquareRule(1e-4), lambda: zr.WSquare(1e-4)),
    ("ZBox", lambda: fastattr.ZBoxRule(-2.0, 2.0), lambda: zr.ZBox(-2.0, 2.0)),
    # Callable stabilizers: a function of the user's, zennit's Stabilizer objects.
    ("Epsilon(callable)", lambda: fastattr.EpsilonRule(_scaled), lambda: zr.Epsilon(_scaled)),
    (
        "AlphaBeta(2, 1, norm-scaled)",
        lambda: fastattr.AlphaBetaRule(2, 1, Stabilizer(0.1, norm_scale=True)),
        lambda: zr.AlphaBeta(2.0, 1.0, Stabilizer(0.1, norm_scale=True)),
    ),
    (
        "ZPlus(clipped)",
        lambda: fastattr.ZPlusRule(Stabilizer(1e-2, clip=True)),
        lambda: zr.ZPlus(Stabilizer(1e-2, clip=True)),
    ),
    (
        "Gamma(0.5, callable)",
        lambda: fastattr.GeneralizedGammaRule(0.5, _scaled),
        lambda: zr.Gamma(0.5, _scaled),
    ),
    ("Flat(callable)", lambda: fastattr.FlatRule(_scaled), lambda: zr.Flat(_scaled)),
    ("WSquare(callable)", lambda: fastattr.WSquareRule(_scaled), lambda: zr.WSquare(_scaled)),
    (
        "ZBox(callable)",
        lambda: fastattr.ZBoxRule(-2.0, 2.0, _scaled),
        lambda: zr.ZBox(-2.0, 2.0, _scaled),
    ),
    (
        "ZBox per channel",
        lambda: fastattr.ZBoxRule(
            -torch.ones(1, 3, 1, 1), torch.tensor([1.0, 2.0, 3.0])[:, None, None]
        ),
        lambda: zr.ZBox(
            -torch.ones(1, 3, 1, 1), torch.tensor([1.0, 2.0, 3.0])[None, :, None, None]
        ),
    ),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", ZENNIT_RULES, ids=[case[0] for case in ZENNIT_RULES])
def test_zennit_rules_match_zennit_on_every_layer(case, dtype: torch.dtype) -> None:
    _, ours, theirs = case
    for model, shape, names in _zennit_rule_nets():
        model = model.to(dtype).eval()
        if case[0] == "ZBox per channel" and len(shape) != 4:
            continue
        for name in names[:1] if case[0] == "ZBox per channel" else names:
            x = torch.randn(shape, dtype=dtype)
            expected = _zennit_with(model, x, 1, name, theirs())
            layer = model.get_submodule(name)
            layer.rule = ours()
            try:
                _close(LRP(model).attribute(x, target=1), expected)
                # LayerLRP at the layer's input: the same relevance.
                found = LayerLRP(model, layer).attribute(x, target=1, attribute_to_layer_input=True)
                if name == "0":
                    _close(found, expected)
            finally:
                del layer.rule


# zennit's zero_params: each rule with it against zennit's, on every layer of both nets (their
# biases are non-zero; the transposed convolution has none, which the rules pass over). Flat
# never has a bias and ZBox's cancels: "weight" zeroes their whole map (after Flat's ones).
ZERO_PARAMS_RULES = [
    (
        "Epsilon",
        lambda zero: fastattr.EpsilonRule(1e-6, zero_params=zero),
        lambda zero: zr.Epsilon(1e-6, zero_params=zero),
        "bias",
    ),
    (
        "AlphaBeta(2, 1)",
        lambda zero: fastattr.AlphaBetaRule(2, 1, zero_params=zero),
        lambda zero: zr.AlphaBeta(2.0, 1.0, zero_params=zero),
        ["bias"],
    ),
    (
        "ZPlus",
        lambda zero: fastattr.ZPlusRule(zero_params=zero),
        lambda zero: zr.ZPlus(zero_params=zero),
        "bias",
    ),
    (
        "Gamma(0.5)",
        lambda zero: fastattr.GeneralizedGammaRule(0.5, zero_params=zero),
        lambda zero: zr.Gamma(0.5, zero_params=zero),
        ("bias",),
    ),
    (
        "WSquare",
        lambda zero: fastattr.WSquareRule(1e-4, zero_params=zero),
        lambda zero: zr.WSquare(1e-4, zero_params=zero),
        ["bias"],
    ),
    (
        "Flat",
        lambda zero: fastattr.FlatRule(zero_params=zero),
        lambda zero: zr.Flat(zero_params=zero),
        "weight",
    ),
    (
        "ZBox",
        lambda zero: fastattr.ZBoxRule(-2.0, 2.0, zero_params=zero),
        lambda zero: zr.ZBox(-2.0, 2.0, zero_params=zero),
        ["weight", "bias"],
    ),
]


@pytest.mark.parametrize("case", ZERO_PARAMS_RULES, ids=[case[0] for case in ZERO_PARAMS_RULES])
def test_zennit_rules_with_zero_params_match_zennit_on_every_layer(case) -> None:
    _, ours, theirs, zero_params = case
    changed = False
    for model, shape, names in _zennit_rule_nets():
        model = model.double().eval()
        before = copy.deepcopy(model.state_dict())
        for name in names:
            x = torch.randn(shape, dtype=torch.float64)
            expected = _zennit_with(model, x, 1, name, theirs(zero_params))
            layer = model.get_submodule(name)
            layer.rule = ours(zero_params)
            try:
                _close(LRP(model).attribute(x, target=1), expected)
                layer.rule = ours(None)
                changed |= not torch.allclose(LRP(model).attribute(x, target=1), expected)
            finally:
                del layer.rule
        assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert changed  # the case tests zero_params: without it, the numbers differ


def test_epsilon_zero_params_on_batch_norm_and_pooling_match_zennit() -> None:
    # A batch norm's bias zeroed in z; average pooling has no parameter to zero.
    torch.manual_seed(0)
    model = (
        nn.Sequential(
            nn.Conv2d(3, 4, 3),
            nn.BatchNorm2d(4),
            nn.ReLU(),
            nn.AvgPool2d(2),
            nn.Flatten(),
            nn.Linear(16, 3),
        )
        .double()
        .eval()
    )
    with torch.no_grad():
        model[1].running_mean.normal_(0, 0.2)
        model[1].bias.uniform_(-0.5, 0.5)
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    # fastattr's defaults there: epsilon on the batch norm, the ratio of pooling's output.
    defaults = ((nn.BatchNorm2d, Epsilon(1e-9)), (nn.AvgPool2d, Norm(1e-9)))
    for name in ("1", "3"):
        rule = zr.Epsilon(1e-6, zero_params="bias")
        expected = _zennit_with(model, x, 1, name, rule, defaults)
        model.get_submodule(name).rule = EpsilonRule(1e-6, zero_params="bias")
        try:
            _close(LRP(model).attribute(x, target=1), expected)
        finally:
            del model.get_submodule(name).rule


def test_zero_params_are_checked_and_shown() -> None:
    with pytest.raises(TypeError, match=r"zero_params must be None, a parameter name or a list"):
        fastattr.ZPlusRule(zero_params=1)
    with pytest.raises(TypeError, match=r"zero_params must be .*, got \['bias', None\]"):
        EpsilonRule(zero_params=["bias", None])
    # zennit ignores a name the layer has no parameter of; the rules run on maps whose
    # parameters are the weight and the bias, so another name is a mistake.
    with pytest.raises(ValueError, match=r"may name only 'weight' and 'bias', .* got \['b'\]"):
        fastattr.FlatRule(zero_params=["bias", "b"])
    assert repr(fastattr.ZPlusRule(zero_params="bias")) == (
        "ZPlusRule(stabilizer=1e-06, zero_params=('bias',))"
    )
    assert repr(EpsilonRule(0.5, ["weight", "bias", "weight"])) == (
        "EpsilonRule(epsilon=0.5, zero_params=('weight', 'bias'))"
    )
    assert repr(EpsilonRule()) == "EpsilonRule(epsilon=1e-09)"
    model = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4), nn.Linear(4, 2))
    model[1].rule = EpsilonRule(zero_params="bias")
    with pytest.raises(TypeError, match=r"model\.1: EpsilonRule cannot recompute LayerNorm"):
        LRP(model).attribute(torch.randn(2, 4), target=0)


def test_zplus_is_alpha1_beta0_on_non_negative_inputs_without_negative_bias() -> None:
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3)).double()
    with torch.no_grad():
        model[0].bias.abs_()
    x = torch.rand(4, 6, dtype=torch.float64)
    model[0].rule = fastattr.ZPlusRule(stabilizer=1e-9)
    zplus = LRP(model).attribute(x, target=0)
    model[0].rule = Alpha1_Beta0_Rule()
    _close(LRP(model).attribute(x, target=0), zplus)


@pytest.mark.parametrize(
    ("make", "error", "message"),
    [
        (lambda: fastattr.AlphaBetaRule(2.0, 0.5), ValueError, "alpha - beta must be 1"),
        (lambda: fastattr.AlphaBetaRule(0.0, -1.0), ValueError, "beta must be non-negative"),
        (lambda: fastattr.AlphaBetaRule("2", 1), TypeError, "alpha must be a real number"),
        (lambda: fastattr.AlphaBetaRule(float("inf"), 1), ValueError, "alpha must be finite"),
        (lambda: fastattr.ZPlusRule(stabilizer=-1.0), ValueError, "stabilizer must be non-neg"),
        (lambda: fastattr.GeneralizedGammaRule(None), TypeError, "gamma must be a real number"),
        (lambda: fastattr.FlatRule(float("nan")), ValueError, "stabilizer must be finite"),
        (lambda: fastattr.ZBoxRule(1.0, 0.0), ValueError, "low must not exceed high"),
        (lambda: fastattr.ZBoxRule(torch.zeros(3), torch.ones(2)), ValueError, "broadcast"),
        (lambda: fastattr.ZBoxRule("0", 1.0), TypeError, "low must be a real number"),
        (lambda: fastattr.ZBoxRule(0, torch.ones(2, dtype=torch.long)), TypeError, "floating"),
        (lambda: fastattr.ZBoxRule(0.0, float("inf")), ValueError, "high must be finite"),
        (lambda: fastattr.ZPlusRule("1e-6"), TypeError, "stabilizer must be a real number or a c"),
        (
            lambda: fastattr.EpsilonRule(torch.tensor(1e-6)),
            TypeError,
            r"epsilon must be a real number or a callable \(Tensor\) -> Tensor, got Tensor",
        ),
    ],
)
def test_zennit_rules_refuse_bad_arguments(make, error: type, message: str) -> None:
    with pytest.raises(error, match=message):
        make()


def test_zennit_rules_refuse_modules_without_a_linear_map_and_bounds_of_the_wrong_shape() -> None:
    model = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3), nn.Linear(3, 2)).eval()
    model[1].rule = fastattr.AlphaBetaRule()
    with pytest.raises(TypeError, match=r"model\.1: AlphaBetaRule runs on nn\.Linear and conv"):
        LRP(model).attribute(torch.randn(2, 4), target=0)
    model[1].rule = None
    model[0].rule = fastattr.FlatRule(lambda z: z.sum())
    with pytest.raises(ValueError, match=r"stabilizer must return a tensor of its input's shape"):
        LRP(model).attribute(torch.randn(2, 4), target=0)
    model[0].rule = fastattr.ZBoxRule(torch.zeros(5), 1.0)
    with pytest.raises(ValueError, match=r"low of shape \[5\] does not broadcast to .* \[2, 4\]"):
        LRP(model).attribute(torch.randn(2, 4), target=0)
