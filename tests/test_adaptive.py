"""n_steps="auto": completeness to the tolerance, agreement with a high-step reference, points
where the path needs them, the step count, memory groups, and bad arguments."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from seeding import seeded  # tests/seeding.py (pytest puts tests/ on sys.path)
from torch import Tensor, nn

import fastattr
import fastattr._path_integral as path_integral
from fastattr._patterson import LEVELS, compute, patterson


def smooth() -> nn.Module:
    return seeded(
        nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 3))
    )


def relu() -> nn.Module:
    return seeded(
        nn.Sequential(nn.Linear(6, 24), nn.ReLU(), nn.Linear(24, 24), nn.ReLU(), nn.Linear(24, 3))
    )


def data(*shape: int, seed: int = 1, scale: float = 2.0) -> Tensor:
    generator = torch.Generator().manual_seed(seed)
    return scale * torch.randn(shape, generator=generator, dtype=torch.float64)


def completeness_target(model: nn.Module, x: Tensor, tolerance: float, target: int = 1) -> Tensor:
    with torch.no_grad():
        change = model(x)[:, target] - model(torch.zeros_like(x))[:, target]
    return tolerance * change.abs().clamp(min=1.0)


def relative_l1(actual: Tensor, expected: Tensor) -> Tensor:
    return (actual - expected).abs().sum(1) / expected.abs().sum(1)


def test_patterson_levels_nest_and_integrate_polynomials_to_their_degree():
    for level in range(LEVELS):
        nodes, weights = patterson(level)
        assert len(nodes) == 2 ** (level + 1) - 1
        assert ((nodes > 0) & (nodes < 1)).all() and (weights > 0).all()
        if level:  # every node of the level before, first, in its order
            assert (nodes[: len(nodes) // 2] == patterson(level - 1)[0]).all()
        # Exact up to its degree (1, 5, 11, 23, ...: checked on Legendre polynomials, which
        # keep the sums well-conditioned); one degree further the error is measurable up to
        # level 5 (from level 6 on the rules miss it by less than rounding).
        degree = 1 if level == 0 else 3 * 2**level - 1
        basis = np.polynomial.legendre.Legendre.basis
        errors = [
            abs(float(weights @ basis(d, [0, 1])(nodes)) - (d == 0)) for d in range(degree + 2)
        ]
        assert max(errors[: degree + 1]) < 1e-15
        assert level > 5 or errors[degree + 1] > 1e-12


def test_patterson_table_is_what_the_generator_computes():
    # The first levels afresh (the whole table takes minutes at the generator's precision).
    nodes, weights = compute(5, digits=40)
    table_nodes, _ = patterson(4)
    assert np.abs((np.array(nodes, dtype=float) + 1) / 2 - table_nodes).max() < 1e-15
    for level in range(5):
        expected = np.array(weights[level], dtype=float) / 2
        assert np.abs(expected - patterson(level)[1]).max() < 1e-15


@pytest.mark.parametrize("method", ["gausslegendre", "riemann_trapezoid"])
def test_smooth_model_matches_a_high_step_reference(method):
    model, x = smooth(), data(6, 6)
    ig = fastattr.IntegratedGradients(model)
    reference = ig.attribute(x, target=1, n_steps=2000)
    # Bisection is second order on a smooth path: a looser tolerance for the same points.
    tolerance = 1e-8 if method == "gausslegendre" else 1e-4
    ours, delta, steps = ig.attribute(
        x,
        target=1,
        n_steps="auto",
        method=method,
        tolerance=tolerance,
        max_steps=512,
        return_convergence_delta=True,
        return_n_steps=True,
    )
    assert (delta.abs() <= completeness_target(model, x, tolerance)).all()
    # The attributions themselves converge with the completeness on a smooth path.
    assert (relative_l1(ours, reference) < 100 * tolerance).all()
    assert steps.dtype == torch.long
    if method == "gausslegendre":  # nested high-order levels: few points for 1e-8
        assert steps.float().mean() < 40


def test_relu_model_reaches_the_tolerance_and_the_reference():
    model, x = relu(), data(8, 6)
    ig = fastattr.IntegratedGradients(model)
    reference = ig.attribute(x, target=1, n_steps=2000, method="riemann_trapezoid")
    errors = []
    for tolerance in (1e-2, 1e-4, 1e-6):
        ours, delta, steps = ig.attribute(
            x,
            target=1,
            n_steps="auto",
            tolerance=tolerance,
            max_steps=512,
            return_convergence_delta=True,
            return_n_steps=True,
        )
        reached = delta.abs() <= completeness_target(model, x, tolerance)
        assert (reached | (steps == 512)).all()
        errors.append(relative_l1(ours, reference).median())
    # Points go where the gradient jumps: a tighter tolerance brings the attributions to the
    # reference, not just their sum.
    assert errors[0] > errors[1] > errors[2]
    assert errors[2] < 1e-2


def test_points_follow_the_difficulty_of_each_path():
    model = relu()
    direction = data(1, 6, seed=3)
    # A path short enough to cross no kink, and one crossing many.
    x = torch.cat([1e-4 * direction, 8 * direction, data(1, 6, seed=4, scale=0.001)])
    _, steps = fastattr.IntegratedGradients(model).attribute(
        x, target=0, n_steps="auto", tolerance=1e-6, return_n_steps=True
    )
    assert steps[0] == 1 and steps[2] == 1  # the midpoint: exact on an affine piece
    assert steps[1] > 10


def test_fixed_steps_report_n_steps_and_results_order():
    model, x = relu(), data(4, 6)
    ig = fastattr.IntegratedGradients(model)
    attributions, steps = ig.attribute(x, target=0, n_steps=7, return_n_steps=True)
    assert steps.tolist() == [7] * 4
    assert torch.equal(attributions, ig.attribute(x, target=0, n_steps=7))
    both = ig.attribute(x, target=0, n_steps=7, return_convergence_delta=True, return_n_steps=True)
    assert len(both) == 3 and both[1].shape == (4,) and both[2].tolist() == [7] * 4


def test_no_gradient_is_taken_at_the_ends():
    # A bias-free ReLU network is positively homogeneous: from a zero baseline its gradient is
    # the same all along the path but at alpha 0, where every ReLU sits on its kink. Rules
    # with a node there (closed Newton-Cotes, Clenshaw-Curtis) are off by its weight; the
    # midpoint alone is exact, and "auto" stops there.
    model = seeded(
        nn.Sequential(nn.Linear(6, 24, bias=False), nn.ReLU(), nn.Linear(24, 3, bias=False))
    )
    x = data(4, 6)
    ig = fastattr.IntegratedGradients(model)
    ours, delta, steps = ig.attribute(
        x, target=2, n_steps="auto", tolerance=1e-12, return_convergence_delta=True,
        return_n_steps=True,
    )  # fmt: skip
    assert steps.tolist() == [1] * 4
    assert delta.abs().max() < 1e-13
    torch.testing.assert_close(ours, ig.attribute(x, target=2, n_steps=1), rtol=0, atol=0)
    trapezoid = 2 * ig.attribute(x, target=2, n_steps=2, method="riemann_trapezoid")
    assert (relative_l1(trapezoid, ours) > 0.1).all()  # half the path at the kink's gradient


def test_max_steps_caps_the_points():
    model, x = relu(), data(4, 6, scale=8.0)
    _, steps = fastattr.IntegratedGradients(model).attribute(
        x, target=2, n_steps="auto", tolerance=1e-12, max_steps=2, return_n_steps=True
    )
    assert steps.tolist() == [2] * 4


def test_groups_of_kept_gradients_give_the_same_result(monkeypatch):
    model, x = relu(), data(6, 6)
    ig = fastattr.IntegratedGradients(model)
    kwargs = dict(target=1, n_steps="auto", tolerance=1e-5, return_n_steps=True)
    whole, steps = ig.attribute(x, **kwargs)
    # A budget that holds one example's kept gradients and chunks of single points.
    monkeypatch.setattr(path_integral, "CPU_CHUNK_BYTES", 1)
    rows: list[int] = []
    counting = fastattr.IntegratedGradients(lambda t: rows.append(t.shape[0]) or model(t))
    grouped, grouped_steps = counting.attribute(x, **kwargs)
    # (Two forwards without a graph per example give the outputs at the ends.)
    assert max(rows) == 1 and sum(rows) == int(steps.sum()) + 2 * len(x)
    assert torch.equal(steps, grouped_steps)
    torch.testing.assert_close(grouped, whole, rtol=1e-12, atol=1e-14)


def test_layer_and_neuron_methods():
    model, x = relu(), data(4, 6)
    layer = fastattr.LayerIntegratedGradients(model, model[2])
    ours, delta = layer.attribute(
        x,
        target=0,
        n_steps="auto",
        tolerance=1e-6,
        return_convergence_delta=True,
    )
    assert (delta.abs() <= completeness_target(model, x, 1e-6, target=0)).all()
    reference = layer.attribute(x, target=0, n_steps=2000, method="riemann_trapezoid")
    assert (relative_l1(ours, reference) < 1e-2).all()
    neuron = fastattr.NeuronIntegratedGradients(model, model[2])
    ours = neuron.attribute(x, 5, n_steps="auto", tolerance=1e-4)
    with torch.no_grad():
        change = model[:3](x)[:, 5] - model[:3](torch.zeros_like(x))[:, 5]
    assert ((ours.sum(1) - change).abs() <= 1e-4 * change.abs().clamp(min=1.0)).all()


def test_attribute_targets_with_auto_is_attribute_per_target():
    model, x = relu(), data(3, 6)
    ig = fastattr.IntegratedGradients(model)
    kwargs = dict(n_steps="auto", tolerance=1e-4, return_n_steps=True)
    many = ig.attribute_targets(x, [0, 2], **kwargs)
    for k, target in enumerate((0, 2)):
        single, steps = ig.attribute(x, target=target, **kwargs)
        torch.testing.assert_close(many[k][0], single, rtol=1e-12, atol=1e-14)
        assert torch.equal(many[k][1], steps)


def test_noise_tunnel_passes_auto_on():
    # The oracle: captum's noise drawn by hand, the noisy copies attributed in one call.
    model, x = relu(), data(2, 6)
    ig = fastattr.IntegratedGradients(model)
    kwargs = dict(target=1, n_steps="auto", tolerance=1e-5)
    torch.manual_seed(0)
    ours = fastattr.NoiseTunnel(ig).attribute(x, nt_samples=3, stdevs=0.1, **kwargs)
    torch.manual_seed(0)
    noise = torch.normal(0, torch.tensor(0.1).repeat(6, 6))
    copies = ig.attribute(x.repeat_interleave(3, dim=0) + noise, **kwargs)
    torch.testing.assert_close(ours, copies.view(2, 3, 6).sum(1) / 3, rtol=1e-10, atol=1e-12)


def test_empty_batch():
    attributions, steps = fastattr.IntegratedGradients(relu()).attribute(
        data(0, 6), target=1, n_steps="auto", return_n_steps=True
    )
    assert attributions.shape == (0, 6) and steps.shape == (0,)


@pytest.mark.parametrize(
    ("kwargs", "error", "name"),
    [
        (dict(method="riemann_middle"), ValueError, "method"),
        (dict(method="riemann_left"), ValueError, "method"),
        (dict(tolerance=0.0), ValueError, "tolerance"),
        (dict(tolerance=-1e-3), ValueError, "tolerance"),
        (dict(tolerance=float("nan")), ValueError, "tolerance"),
        (dict(tolerance="small"), TypeError, "tolerance"),
        (dict(max_steps=1), ValueError, "max_steps"),
        (dict(max_steps=2.5), TypeError, "max_steps"),
        (dict(n_steps=50, tolerance=1e-3), ValueError, "tolerance"),
        (dict(n_steps=50, max_steps=20), ValueError, "max_steps"),
        (dict(n_steps="fast"), TypeError, "n_steps"),
    ],
)
def test_bad_arguments_name_the_argument(kwargs, error, name):
    calls: list[int] = []
    model = relu()
    ig = fastattr.IntegratedGradients(lambda t: calls.append(1) or model(t))
    kwargs = {"n_steps": "auto", **kwargs}
    with pytest.raises(error, match=name):
        ig.attribute(data(2, 6), target=0, **kwargs)
    assert calls == []


def test_auto_refuses_what_needs_captums_chunks():
    """n_steps='auto' gives each example its own points: an output reduced over the batch, an
    argument without a batch dimension and batch statistics are refused by name (fixed steps
    run them as captum does)."""
    model = smooth()
    x = data(3, 6)
    reduced = fastattr.IntegratedGradients(lambda inputs: model(inputs)[:, 0].sum().unsqueeze(0))
    with pytest.raises(ValueError, match="n_steps='auto' needs the selected output"):
        reduced.attribute(x, n_steps="auto")
    reduced.attribute(x, n_steps=8)  # captum's behaviour with a fixed rule
    shifted = fastattr.IntegratedGradients(lambda inputs, shift: model(inputs + shift))
    with pytest.raises(ValueError, match="additional_forward_args must hold one row"):
        shifted.attribute(x, target=0, additional_forward_args=torch.ones(1, 6), n_steps="auto")
    normalized = nn.Sequential(nn.Linear(6, 4), nn.BatchNorm1d(4), nn.Linear(4, 2)).train()
    before = {k: v.clone() for k, v in normalized.state_dict().items()}
    with pytest.raises(ValueError, match="batch norm in training mode"):
        fastattr.IntegratedGradients(normalized).attribute(x, target=0, n_steps="auto")
    for key, value in normalized.state_dict().items():
        assert torch.equal(value, before[key]), key
