"""LRP on data flow as it happens: forwards that reading their source would misjudge, modules
shared between parents, several threads on one model, interrupted calls. Oracles: captum where
it runs, the same model written out plainly, zennit's explicit sum module."""

from __future__ import annotations

import functools
import gc
import sys
import threading
import warnings
from collections.abc import Callable
from pathlib import Path

import captum.attr as captum_attr
import pytest
import torch
from matrix_products import MatrixProducts  # tests/matrix_products.py
from torch import nn
from torch.nn.modules import module as module_hooks
from zennit.composites import LayerMapComposite
from zennit.layer import Sum
from zennit.rules import Epsilon, Norm, Pass
from zennit.types import Activation

import fastattr
from fastattr import LRP, LayerLRP
from fastattr.canonizers import AttnLRP, EpsilonSum
from fastattr.lrp.propagation import _ACTIVE

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

F64 = torch.float64


def _close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    torch.testing.assert_close(
        actual, expected, rtol=1e-12, atol=1e-12 * float(expected.abs().max())
    )


def _captum(model: nn.Module, x: torch.Tensor, target: int, layer: nn.Module | None = None):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if layer is None:
            return captum_attr.LRP(model).attribute(x, target=target)
        return captum_attr.LayerLRP(model, layer).attribute(x, target=target)


def _zennit(model: nn.Module, x: torch.Tensor, target: int) -> torch.Tensor:
    """zennit with the rules fastattr applies by default, and a zennit Sum module (where the
    model has one) with the rule fastattr's EpsilonSum canonizer gives `+`."""
    composite = LayerMapComposite(
        [(Activation, Pass()), (nn.Linear, Epsilon(1e-9)), (Sum, Norm(1e-9))]
    )
    x = x.clone().requires_grad_()
    with composite.context(model) as modified:
        output = modified(x)
        seed = torch.zeros_like(output)
        seed[:, target] = output[:, target]
        (relevance,) = torch.autograd.grad(output, x, seed)
    return relevance


def _seeded(model: nn.Module, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    for parameter in model.parameters():
        nn.init.normal_(parameter, std=0.5)
    return model.to(F64).eval()


def adds_input(forward: Callable) -> Callable:
    """A decorator that adds the block's input to what its forward returns."""

    @functools.wraps(forward)
    def wrapper(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return forward(self, x) + x

    return wrapper


class DecoratedBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 6)

    @adds_input
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x)


class PlainBlock(DecoratedBlock):
    """The same block with its `+` written out, or as a zennit Sum module."""

    def __init__(self, explicit: str = "+") -> None:
        super().__init__()
        self.sum = Sum() if explicit == "zennit" else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # type: ignore[no-redef]
        if self.sum is not None:
            return self.sum(torch.stack([self.fc(x), x], dim=-1))
        return self.fc(x) + x


def _residual_model(block: nn.Module) -> nn.Module:
    return _seeded(nn.Sequential(nn.Linear(5, 6), nn.ReLU(), block, nn.ReLU(), nn.Linear(6, 3)))


def _same_weights(model: nn.Module, block: nn.Module) -> nn.Module:
    twin = _residual_model(block)
    twin.load_state_dict(model.state_dict(), strict=False)
    return twin


def test_a_decorated_forward_that_adds_is_seen_adding() -> None:
    # Reading the source, the decorated forward looks like a plain chain; what runs adds.
    model = _residual_model(DecoratedBlock())
    plain = _same_weights(model, PlainBlock())
    explicit = _same_weights(model, PlainBlock("zennit"))
    x = torch.randn(4, 5, dtype=F64)
    # Without a canonizer, plain autograd through `+` for both spellings (zennit's numbers;
    # captum's differ here, as the block's input also feeds a module with a rule: see
    # test_lrp.py::test_an_activation_used_twice_gets_each_rule_on_its_own_use).
    _close(LRP(model).attribute(x, target=1), _zennit(plain, x, 1))
    _close(LRP(plain).attribute(x, target=1), _zennit(plain, x, 1))
    # With the sum rule, zennit's with an explicit sum module.
    expected = _zennit(explicit, x, 1)
    for spelled in (model, plain):
        _close(LRP(spelled, canonizers=[EpsilonSum()]).attribute(x, target=1), expected)


def view(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Named like a reshape; adds."""
    return a + b


class ShadowedView(nn.Module):
    def __init__(self, explicit: bool = False) -> None:
        super().__init__()
        self.fc1 = nn.Linear(5, 5)
        self.relu = nn.ReLU()
        self.fc2 = nn.Linear(5, 5)
        self.head = nn.Linear(5, 3)
        self.sum = Sum() if explicit else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.relu(self.fc1(x))
        if self.sum is not None:
            return self.head(self.sum(torch.stack([self.fc2(h), h], dim=-1)))
        return self.head(view(self.fc2(h), h))


def test_a_function_named_view_that_adds_is_seen_adding() -> None:
    model = _seeded(ShadowedView())
    explicit = _seeded(ShadowedView(explicit=True))
    explicit.load_state_dict(model.state_dict())
    x = torch.randn(4, 5, dtype=F64)
    _close(LRP(model).attribute(x, target=2), _zennit(model, x, 2))
    ours = LRP(model, canonizers=[EpsilonSum()]).attribute(x, target=2)
    _close(ours, _zennit(explicit, x, 2))


class PositionalBias(nn.Module):
    """`x + self.pos[:, :T]`: a parameter added to an activation, plus a buffer and a constant."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(4, 4)
        self.pos = nn.Parameter(torch.randn(1, 8, 4))
        self.register_buffer("shift", torch.randn(4))
        self.relu = nn.ReLU()
        self.head = nn.Linear(4 * 6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        length = x.shape[1]
        h = self.proj(x) + self.pos[:, :length]
        h = self.relu(h + self.shift + 0.5)
        return self.head(h.flatten(1))


def test_parameters_buffers_and_constants_added_are_biases_not_branches() -> None:
    model = _seeded(PositionalBias())
    x = torch.randn(3, 6, 4, dtype=F64)
    captum = _captum(model, x, 0)
    _close(LRP(model).attribute(x, target=0), captum)
    # No sum of two activations here: the sum rule leaves every addition to plain autograd.
    _close(LRP(model, canonizers=[EpsilonSum()]).attribute(x, target=0), captum)


class PositionalEmbedding(nn.Module):
    """Positions from an embedding of constant ids, added to an activation: a bias, computed by
    a module (with a rule) from no input."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(4, 4)
        self.positions = nn.Embedding(8, 4)
        self.positions.rule = fastattr.EpsilonRule()
        self.relu = nn.ReLU()
        self.head = nn.Linear(4 * 6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ids = torch.arange(x.shape[1])
        return self.head(self.relu(self.proj(x) + self.positions(ids)).flatten(1))


def test_positions_made_by_a_module_from_constants_are_a_bias() -> None:
    model = _seeded(PositionalEmbedding())
    x = torch.randn(3, 6, 4, dtype=F64)
    expected = _zennit(model, x, 1)  # zennit: plain autograd through the embedding and `+`
    _close(LRP(model).attribute(x, target=1), expected)
    _close(LRP(model, canonizers=[EpsilonSum()]).attribute(x, target=1), expected)


class FlowFromData(nn.Module):
    """A forward whose data flow depends on the input's values (no trace could fix it)."""

    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([nn.Linear(5, 5), nn.Linear(5, 5)])
        self.relu = nn.ReLU()
        self.head = nn.Linear(5, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.relu(self.blocks[0](x))
        if float(x.sum()) > 0:
            h = h + self.relu(self.blocks[1](h))
        else:
            h = self.relu(self.blocks[1](h))
        return self.head(h)


def test_data_dependent_flow_and_a_module_list_on_every_call() -> None:
    model = _seeded(FlowFromData())
    lrp = LRP(model)
    summed = LRP(model, canonizers=[EpsilonSum()])
    positive = torch.rand(3, 5, dtype=F64)
    negative = -torch.rand(3, 5, dtype=F64)
    for x in (positive, negative, positive, negative):
        _close(lrp.attribute(x, target=1), _zennit(model, x, 1))
    # The sum rule applies exactly when the sum runs.
    no_sum = summed.attribute(negative, target=1)
    _close(no_sum, lrp.attribute(negative, target=1))
    with_sum = summed.attribute(positive, target=1)
    assert (with_sum - lrp.attribute(positive, target=1)).abs().max() > 1e-6


class _Steps(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(6, 8)
        self.relu = nn.ReLU()
        self.fc2 = nn.Linear(8, 8)
        self.act = nn.GELU()
        self.fc3 = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc3(self.act(self.fc2(self.relu(self.fc1(x)))))


def test_a_forward_replaced_between_calls_is_followed() -> None:
    model = _seeded(_Steps())
    x = torch.randn(4, 6, dtype=F64)
    lrp = LRP(model)
    lrp.attribute(x, target=0)

    def reusing(t: torch.Tensor) -> torch.Tensor:
        z = model.fc1(t)
        return model.fc3(model.act(model.fc2(model.relu(z)))) * z.mean(1, keepdim=True)

    model.forward = reusing
    _close(lrp.attribute(x, target=0), _zennit(model, x, 0))


# Modules shared between parents (issue 11, section 4).


class TwoParents(nn.Module):
    """`head` registered twice (also in `heads`), called once."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(5, 6)
        self.relu = nn.ReLU()
        self.head = nn.Linear(6, 3)
        self.heads = nn.ModuleList([self.head])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.relu(self.fc(x)))


class OneParent(TwoParents):
    def __init__(self) -> None:
        super().__init__()
        del self.heads


def _fingerprint(model: nn.Module) -> list:
    """Everything LRP could change on a model: tensors (bitwise), hooks, instance attributes,
    training flags."""
    found = []
    for name, module in model.named_modules(remove_duplicate=False):
        found.append((name, module.training, sorted(module.__dict__)))
        for hooks in (
            module._forward_hooks,
            module._forward_pre_hooks,
            module._backward_hooks,
            module._backward_pre_hooks,
        ):
            found.append(tuple(hooks.values()))
        found.append({k: v for k, v in module.__dict__.items() if not k.startswith("_")})
    for name, tensor in model.state_dict(keep_vars=True).items():
        found.append((name, tensor.detach().clone()))
    return found


def _assert_same(before: list, after: list) -> None:
    assert len(before) == len(after)
    for old, new in zip(before, after):
        if isinstance(old, tuple) and len(old) == 2 and isinstance(old[1], torch.Tensor):
            assert old[0] == new[0] and torch.equal(old[1], new[1]), old[0]
        else:
            assert old == new


def _no_global_hooks_left(before: tuple[int, ...]) -> None:
    """No call is active in this thread, grad mode is on, no torch-function mode of one is
    left on torch's stack, and once the state of finished calls is collected, no hook of
    theirs is left (a hook left by an interrupt removes itself at the next module call)."""
    assert _ACTIVE.get() is None
    assert torch.is_grad_enabled()
    assert torch.overrides._get_current_function_mode_stack() == []
    if _global_hook_counts() != before:
        gc.collect()
        nn.Identity()(torch.zeros(1))
    assert _global_hook_counts() == before


def _global_hook_counts() -> tuple[int, ...]:
    return (
        len(module_hooks._global_forward_pre_hooks),
        len(module_hooks._global_forward_hooks),
        len(module_hooks._global_backward_hooks),
        len(module_hooks._global_backward_pre_hooks),
    )


def test_a_module_registered_under_two_parents_counts_once() -> None:
    model = _seeded(TwoParents())
    reference = _seeded(OneParent())
    reference.load_state_dict(model.state_dict(), strict=False)
    x = torch.randn(4, 5, dtype=F64)
    before = _fingerprint(model)
    _close(LRP(model).attribute(x, target=1), _captum(reference, x, 1))
    _close(
        LayerLRP(model, model.head).attribute(x, target=1, attribute_to_layer_input=True),
        LayerLRP(reference, reference.head).attribute(x, target=1, attribute_to_layer_input=True),
    )
    _assert_same(before, _fingerprint(model))


def test_a_relu_shared_by_two_sequentials() -> None:
    relu = nn.ReLU()
    model = _seeded(
        nn.Sequential(
            nn.Sequential(nn.Linear(5, 6), relu),
            nn.Sequential(nn.Linear(6, 6), relu),
            nn.Linear(6, 2),
        )
    )
    reference = _seeded(
        nn.Sequential(
            nn.Sequential(nn.Linear(5, 6), nn.ReLU()),
            nn.Sequential(nn.Linear(6, 6), nn.ReLU()),
            nn.Linear(6, 2),
        )
    )
    reference.load_state_dict(model.state_dict())
    x = torch.randn(4, 5, dtype=F64)
    before = _fingerprint(model)
    _close(LRP(model).attribute(x, target=0), _captum(reference, x, 0))
    _assert_same(before, _fingerprint(model))


# Several threads on one model (issue 11, section 4; issue 13).


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4)).eval()


def test_threads_with_their_own_lrp_on_one_model_get_single_threaded_results() -> None:
    model = _mlp()
    inputs = [torch.randn(6, 8, generator=torch.Generator().manual_seed(i)) for i in range(4)]
    targets = [0, 1, 2, 3]
    expected = [LRP(model).attribute(x, target=t) for x, t in zip(inputs, targets)]
    expected_layer = [
        LayerLRP(model, model[2]).attribute(x, target=t) for x, t in zip(inputs, targets)
    ]
    leaf = inputs[0].clone().requires_grad_()
    (plain,) = torch.autograd.grad(model(leaf)[:, 1].sum(), leaf)
    before = _fingerprint(model)
    hooks_before = _global_hook_counts()
    failures: list[str] = []
    gradients: list[torch.Tensor] = []
    barrier = threading.Barrier(5)

    def attribute(i: int) -> None:
        lrp, layer_lrp = LRP(model), LayerLRP(model, model[2])
        barrier.wait()
        for _ in range(50):
            if not torch.equal(lrp.attribute(inputs[i], target=targets[i]), expected[i]):
                failures.append(f"LRP {i}")
            found = layer_lrp.attribute(inputs[i], target=targets[i])
            if not torch.equal(found, expected_layer[i]):
                failures.append(f"LayerLRP {i}")

    def plain_gradients() -> None:
        barrier.wait()
        for _ in range(50):
            x = inputs[0].clone().requires_grad_()
            gradients.append(torch.autograd.grad(model(x)[:, 1].sum(), x)[0])

    threads = [threading.Thread(target=attribute, args=(i,)) for i in range(4)]
    threads.append(threading.Thread(target=plain_gradients))
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not failures
    # A plain backward through the model, during the calls and after them, is untouched.
    assert all(torch.equal(g, plain) for g in gradients)
    (after,) = torch.autograd.grad(model(leaf)[:, 1].sum(), leaf)
    assert torch.equal(after, plain)
    _assert_same(before, _fingerprint(model))
    _no_global_hooks_left(hooks_before)


def test_one_lrp_shared_by_threads_with_and_without_canonizers() -> None:
    model = _residual_model(PlainBlock())
    x = torch.randn(5, 5, dtype=F64)
    summed, plain = LRP(model, canonizers=[EpsilonSum()]), LRP(model)
    expected_summed, expected_plain = summed.attribute(x, target=0), plain.attribute(x, target=0)
    failures: list[str] = []

    def attribute(lrp: LRP, expected: torch.Tensor) -> None:
        for _ in range(30):
            if not torch.equal(lrp.attribute(x, target=0), expected):
                failures.append(repr(lrp.canonizers))

    threads = [
        threading.Thread(target=attribute, args=(lrp, expected))
        for lrp, expected in [(summed, expected_summed), (plain, expected_plain)] * 2
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not failures
    assert (expected_summed - expected_plain).abs().max() > 1e-6


# Interrupted calls (issue 13): a KeyboardInterrupt at any line of fastattr or of the model.


class Interrupted(Exception):
    pass


class TrainModeModel(nn.Module):
    """Batch norm in training mode (its running statistics change in a forward), an in-place
    ReLU, a residual sum and a dropout."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(4, 6)
        self.bn = nn.BatchNorm1d(6)
        self.relu = nn.ReLU(inplace=True)
        self.fc2 = nn.Linear(6, 6)
        self.drop = nn.Dropout(0.2)
        self.head = nn.Linear(6, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.relu(self.bn(self.fc1(x)))
        h = self.fc2(h) + h
        return self.head(self.drop(h))


def _interrupting_at(event: int, roots: tuple[str, ...]) -> Callable:
    """A tracer raising KeyboardInterrupt at the ``event``-th line run in files under
    ``roots`` (none for 0); it notes the function of every such line in ``tracer.seen``."""
    seen: list[str] = []

    def tracer(frame, kind, arg):  # type: ignore[no-untyped-def]
        if not frame.f_code.co_filename.startswith(roots):
            return None
        if kind == "line":
            seen.append(frame.f_code.co_name)
            if len(seen) == event:
                raise KeyboardInterrupt
        return tracer

    tracer.seen = seen  # type: ignore[attr-defined]
    return tracer


class TrainModeAttention(nn.Module):
    """nn.MultiheadAttention (its functional code runs under the op rules, in a torch-function
    mode of its own) and a batch norm in training mode."""

    def __init__(self) -> None:
        super().__init__()
        self.attention = nn.MultiheadAttention(4, 2, batch_first=True)
        self.bn = nn.BatchNorm1d(3)
        self.bn.rule = fastattr.EpsilonRule()
        self.head = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.attention(x, x, x, need_weights=False)[0]
        return self.head(self.bn(h + x).mean(1))


# Where an interrupt could leave something behind: every line of these is tried, and every
# eleventh line elsewhere.
_CLEANUP = {"run", "_forward", "_remove", "forget", "_propagate", "_backward", "kept_buffers"}
# The module hooks' __call__ turns torch functions off around each rule.
_CLEANUP |= {"release", "under_op_rules", "__call__"}
# kept_buffers' holds, taken and settled through _settle.settled.
_CLEANUP |= {"hold", "settle", "settled", "through"}


@pytest.mark.parametrize("method", ["lrp", "layer", "attention"])
def test_an_interrupt_at_any_line_leaves_the_model_as_found(method: str) -> None:
    torch.manual_seed(0)
    model = (TrainModeAttention() if method == "attention" else TrainModeModel()).double()
    model.train()
    x = torch.randn(5, *((3, 4) if method == "attention" else (4,)), dtype=F64)
    roots = (str(Path(fastattr.__file__).parent), __file__)

    def call() -> object:
        if method == "layer":
            return LayerLRP(model, model.fc2, canonizers=[EpsilonSum()]).attribute(x, target=1)
        if method == "attention":
            return LRP(model, canonizers=[AttnLRP()]).attribute(x, target=1)
        return LRP(model, canonizers=[EpsilonSum()]).attribute(x, target=1)

    torch.manual_seed(1)
    expected = call()
    before = _fingerprint(model)
    hooks_before = _global_hook_counts()
    counting = _interrupting_at(0, roots)
    sys.settrace(counting)
    try:
        call()
    finally:
        sys.settrace(None)
    seen = counting.seen  # type: ignore[attr-defined]
    events = [i + 1 for i, name in enumerate(seen) if name in _CLEANUP or i % 11 == 0]
    assert len(seen) > 500 and len(events) > 100
    for event in events:
        sys.settrace(_interrupting_at(event, roots))
        try:
            call()
        except KeyboardInterrupt:
            pass
        finally:
            sys.settrace(None)
        _assert_same(before, _fingerprint(model))
        _no_global_hooks_left(hooks_before)
        # The thread's torch state too: grad mode, torch functions on, no mode left pushed.
        assert torch.is_grad_enabled() and torch._C._is_torch_function_enabled(), event
        assert torch._C._len_torch_function_stack() == 0, event
    torch.manual_seed(1)
    _close(call(), expected)


def test_an_interrupt_as_torch_puts_the_op_rules_mode_back_leaves_no_mode() -> None:
    # torch's Python functions (F.layer_norm here) take the op rules' mode off the stack while
    # it handles them, in a generator's with statement; an interrupt as its exit is entered left
    # the generator suspended in the traceback, and the mode was pushed back when that was
    # freed, after the call: left on the thread's stack for good (and the interrupt was
    # replaced by "trying to pop from empty mode stack").
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4), nn.Linear(4, 2)).double()
    x = torch.randn(3, 4, dtype=F64)
    lrp = LRP(model, canonizers=[AttnLRP()])
    expected = lrp.attribute(x, target=1)
    hooks_before = _global_hook_counts()
    exits = 0

    def tracer(frame, kind, arg):  # type: ignore[no-untyped-def]
        nonlocal exits
        caller = frame.f_back
        if kind == "call" and frame.f_code.co_name == "__exit__" and caller is not None:
            if caller.f_code.co_name == "handle_torch_function":
                exits += 1
                raise KeyboardInterrupt
        return None

    sys.settrace(tracer)
    try:
        with pytest.raises(KeyboardInterrupt):
            lrp.attribute(x, target=1)
    finally:
        sys.settrace(None)
    gc.collect()
    assert exits == 1
    assert torch._C._len_torch_function_stack() == 0
    assert torch._C._is_torch_function_enabled() and torch.is_grad_enabled()
    _no_global_hooks_left(hooks_before)
    _close(lrp.attribute(x, target=1), expected)


class InPlaceReLUs(nn.Module):
    """In-place ReLUs after a linear layer: one whose input also goes elsewhere (`h` in the
    sum) when ``reuse``."""

    def __init__(self, inplace: bool, reuse: bool) -> None:
        super().__init__()
        self.fc1 = nn.Linear(5, 6)
        self.relu1 = nn.ReLU(inplace=inplace)
        self.fc2 = nn.Linear(6, 6)
        self.relu2 = nn.ReLU(inplace=inplace)
        self.head = nn.Linear(6, 2)
        self.reuse = reuse

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc2(self.relu1(self.fc1(x)))
        out = self.head(self.relu2(h))
        return out + h[:, :2] if self.reuse else out


@pytest.mark.parametrize("reuse", [False, True])
def test_in_place_relus_write_without_copies_unless_their_input_has_another_use(
    reuse: bool,
) -> None:
    # The ReLU writes into the tensor the ratio before it divides by (no copy); where that
    # ratio's output is used again (`h`), the backward finds the tensor changed and the call
    # runs again with the ReLUs writing into copies. Either way: the numbers of the same model
    # with out-of-place ReLUs.
    x = torch.randn(4, 5, dtype=F64)
    model = _seeded(InPlaceReLUs(inplace=True, reuse=reuse))
    reference = _seeded(InPlaceReLUs(inplace=False, reuse=reuse))
    lrp = LRP(model)
    for _ in range(2):
        _close(lrp.attribute(x, target=1), LRP(reference).attribute(x, target=1))
    assert lrp._copy_writes == reuse
    for layer in (model.relu1, model.fc2):
        _close(
            LayerLRP(model, layer).attribute(x, target=1),
            LayerLRP(
                reference, getattr(reference, "relu1" if layer is model.relu1 else "fc2")
            ).attribute(x, target=1),
        )


class ThreeReaders(nn.Module):
    """A transformer's query, key and value: three linear layers reading one tensor (or, with
    ``copies``, each a copy of it)."""

    def __init__(self, copies: bool) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(6)
        self.readers = nn.ModuleList(nn.Linear(6, 6) for _ in range(3))
        self.head = nn.Linear(6, 2)
        self.copies = copies

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(x)
        outputs = [reader(h.clone() if self.copies else h) for reader in self.readers]
        return self.head(torch.tanh(outputs[0]) * outputs[1] + outputs[2])


def _product_nodes(output: torch.Tensor) -> int:
    seen, stack, found = set(), [output.grad_fn], 0
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        found += "ProductNode" in node.name()
        stack.extend(following for following, _ in node.next_functions)
    return found


def test_modules_reading_one_tensor_share_its_product_node() -> None:
    from fastattr.canonizers import AttnLRP
    from fastattr.lrp import Relevance
    from fastattr.lrp.propagation import plan_rules

    shared, copied = ThreeReaders(copies=False).double(), ThreeReaders(copies=True).double()
    copied.load_state_dict(shared.state_dict())
    x = torch.randn(4, 6, dtype=torch.float64)
    expected = LRP(copied, [AttnLRP()]).attribute(x, target=1)
    torch.testing.assert_close(
        LRP(shared, [AttnLRP()]).attribute(x, target=1), expected, rtol=1e-12, atol=0
    )
    counts = []
    for model in (shared, copied):
        leaf = x.clone().requires_grad_()
        relevance = Relevance(plan_rules(model, [AttnLRP()]))
        with torch.enable_grad():
            counts.append(_product_nodes(relevance.run(lambda m=model, a=leaf: m(a), [leaf])))
    assert counts[1] - counts[0] == 2  # one node where the copies had three


class FirstToken(nn.Module):
    """Linear layers over a sequence (batch, tokens, features) and a classifier on the first
    token, as BERT's: the relevance of the layers' outputs lives on that token alone."""

    def __init__(self, inplace: bool) -> None:
        super().__init__()
        self.fc1 = nn.Linear(5, 7)
        self.relu = nn.ReLU(inplace=inplace)
        self.fc2 = nn.Linear(7, 6)
        self.head = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.fc2(self.relu(self.fc1(x)))[:, 0])


@pytest.mark.parametrize("inplace", [False, True])
def test_linear_layers_multiply_only_the_tokens_that_carry_relevance(inplace: bool) -> None:
    model = FirstToken(inplace).double()
    x = torch.randn(4, 6, 5, dtype=F64)
    with MatrixProducts() as seen:
        relevance = LRP(model).attribute(x, target=2)
    _close(relevance, _captum(model, x, 2))
    with fastattr.use_backend("reference"):  # every row multiplied
        _close(relevance, LRP(model).attribute(x, target=2))
    assert relevance[:, 1:].abs().max() == 0
    # The backward through fc2 and fc1: a row per example (the first token), not per token.
    backward = [rows for (rows, width), weight in seen.shapes if weight in ((6, 7), (7, 5))]
    assert backward == [4, 4]
