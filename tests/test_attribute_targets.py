"""attribute_targets on IntegratedGradients, LayerIntegratedGradients and
NeuronIntegratedGradients: K results, each equal (float rounding) to attribute() with that
target, from one forward per chunk; and bad target sequences."""

from __future__ import annotations

import pytest
import torch
from seeding import seeded  # tests/seeding.py (pytest puts tests/ on sys.path)
from torch import Tensor, nn

import fastattr
import fastattr._path_integral as path_integral

TOL = {"rtol": 1e-10, "atol": 1e-12}


def data(*shape: int, seed: int = 1) -> Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def mlp() -> nn.Module:
    return seeded(
        nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
    )


class Grid(nn.Module):
    """A (B, 3, 4) output, for tuple targets and lists of tuples."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(5, 12)

    def forward(self, x: Tensor, scale: Tensor) -> Tensor:
        return torch.tanh(self.fc(x) * scale).reshape(-1, 3, 4)


class Counting(nn.Module):
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.rows: list[int] = []

    def forward(self, *args):
        self.rows.append(args[0].shape[0])
        return self.model(*args)


def assert_same(ours, theirs) -> None:
    assert type(ours) is type(theirs)
    if isinstance(theirs, (list, tuple)):
        assert len(ours) == len(theirs)
        for o, t in zip(ours, theirs):
            assert_same(o, t)
        return
    assert ours.shape == theirs.shape and ours.dtype == theirs.dtype
    torch.testing.assert_close(ours, theirs, **TOL)


BATCH = 3
TARGET_FORMS = {
    "ints": [0, 3, 1],
    "tuples": [(0,), (2,)],
    "per-example-lists": [[0, 1, 2], [3, 3, 0]],
    "tensors": [torch.tensor([1, 0, 2]), torch.tensor(3), torch.tensor([2])],
    "mixed": [1, [0, 2, 3], torch.tensor([3, 3, 1]), (2,)],
    "tensor-of-targets": torch.tensor([[0, 1, 2], [2, 1, 0]]),
}


@pytest.fixture(params=[False, True], ids=["one-chunk", "one-point-chunks"])
def chunking(request, monkeypatch):
    if request.param:
        monkeypatch.setattr(path_integral, "CPU_CHUNK_BYTES", 1)
    return request.param


@pytest.mark.parametrize("form", list(TARGET_FORMS), ids=list(TARGET_FORMS))
@pytest.mark.parametrize("method", ["gausslegendre", "riemann_left"])
def test_integrated_gradients(chunking, form, method):
    model = Counting(mlp())
    ig = fastattr.IntegratedGradients(model)
    x = data(BATCH, 5)
    targets = TARGET_FORMS[form]
    kwargs = dict(baselines=data(1, 5, seed=2), n_steps=7, method=method)
    many = ig.attribute_targets(x, targets, return_convergence_delta=True, **kwargs)
    path_rows = sum(model.rows)
    assert isinstance(many, list) and len(many) == len(targets)
    for k, target in enumerate(targets):
        assert_same(
            many[k], ig.attribute(x, target=target, return_convergence_delta=True, **kwargs)
        )
    # One forward per chunk for all targets: the path's rows once (and the delta's forwards).
    ends = 0 if method == "riemann_left" else BATCH
    assert path_rows == 7 * BATCH + BATCH + ends


def test_integrated_gradients_tuple_targets_arguments_and_tuple_inputs(chunking):
    model = seeded(Grid())
    ig = fastattr.IntegratedGradients(lambda x, y, scale: model(x + y, scale))
    inputs = (data(BATCH, 5), data(BATCH, 5, seed=3))
    scale = data(BATCH, 1, seed=4)
    targets = [(1, 2), [(0, 1), (2, 3), (1, 1)], (0, 3)]
    kwargs = dict(additional_forward_args=(scale,), n_steps=5, internal_batch_size=2 * BATCH)
    if chunking:
        del kwargs["internal_batch_size"]
    many = ig.attribute_targets(inputs, targets, **kwargs)
    for k, target in enumerate(targets):
        assert_same(many[k], ig.attribute(inputs, target=target, **kwargs))


def test_integrated_gradients_none_targets_on_a_scalar_output():
    model = nn.Sequential(mlp(), nn.Softplus())
    ig = fastattr.IntegratedGradients(lambda x: model(x).sum(1))
    x = data(BATCH, 5)
    many = ig.attribute_targets(x, [None, None], n_steps=4)
    assert_same(many, [ig.attribute(x, n_steps=4)] * 2)


@pytest.mark.parametrize("on_input", [False, True])
def test_layer_integrated_gradients(chunking, on_input):
    net = mlp()
    lig = fastattr.LayerIntegratedGradients(net, net[2])
    x = data(BATCH, 5)
    targets = TARGET_FORMS["mixed"]
    kwargs = dict(n_steps=6, attribute_to_layer_input=on_input, return_convergence_delta=True)
    many = lig.attribute_targets(x, targets, **kwargs)
    for k, target in enumerate(targets):
        assert_same(many[k], lig.attribute(x, target=target, **kwargs))


class Branches(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.head = nn.Linear(5, 8), nn.Linear(5, 8), nn.Linear(8, 4)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(torch.tanh(self.a(x)) + self.b(x).relu())


def test_layer_integrated_gradients_list_of_layers():
    net = seeded(Branches())
    lig = fastattr.LayerIntegratedGradients(net, [net.a, net.b])
    x = data(BATCH, 5)
    many = lig.attribute_targets(x, [0, 2], n_steps=5)
    assert_same(many, [lig.attribute(x, target=t, n_steps=5) for t in (0, 2)])


@pytest.mark.parametrize("on_input", [False, True])
def test_neuron_integrated_gradients(chunking, on_input):
    net = mlp()
    nig = fastattr.NeuronIntegratedGradients(net, net[2])
    x = data(BATCH, 5)
    selectors = [3, (5,), (slice(1, 4),), lambda values: values[:, 0] * values[:, 7]]
    kwargs = dict(n_steps=6, attribute_to_neuron_input=on_input)
    many = nig.attribute_targets(x, selectors, **kwargs)
    for k, selector in enumerate(selectors):
        assert_same(many[k], nig.attribute(x, selector, **kwargs))


def test_one_target_is_attribute():
    net = mlp()
    ig = fastattr.IntegratedGradients(net)
    x = data(BATCH, 5)
    (only,) = ig.attribute_targets(x, [2], n_steps=4)
    assert_same(only, ig.attribute(x, target=2, n_steps=4))


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("targets", "error", "match"),
    [
        ([], ValueError, "targets must hold at least one target"),
        ((), ValueError, "targets must hold at least one target"),
        (torch.tensor(1), TypeError, "targets must be a list or tuple"),
        (3, TypeError, "targets must be a list or tuple"),
        ([0, None], ValueError, "targets mixes None"),
        ([0, 9], IndexError, "target"),
        ([0, [1, 2]], ValueError, r"targets\[1\]"),
        ([0, 1.5], TypeError, r"targets\[1\]"),
    ],
)
def test_bad_targets_name_the_argument(targets, error, match):
    counting = Counting(mlp())
    with pytest.raises(error, match=match):
        fastattr.IntegratedGradients(counting).attribute_targets(data(BATCH, 5), targets, n_steps=3)
    if error is not IndexError:  # range checks need the output
        assert counting.rows == []


def test_bad_neuron_selectors():
    net = mlp()
    nig = fastattr.NeuronIntegratedGradients(net, net[2])
    with pytest.raises(ValueError, match="targets must hold at least one target"):
        nig.attribute_targets(data(BATCH, 5), [])
    with pytest.raises(TypeError, match="targets must be a list or tuple"):
        nig.attribute_targets(data(BATCH, 5), torch.tensor([1, 2]))
    with pytest.raises(IndexError, match="neuron_selector"):
        nig.attribute_targets(data(BATCH, 5), [1, 30])
