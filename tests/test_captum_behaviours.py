"""captum's behaviours the integrated-gradients family follows, with captum as the oracle, and
the model left as found: batch-reducing outputs and neuron selectors, forward arguments that
are not batched, models that couple the examples of a batch, several threads, interrupts."""

from __future__ import annotations

import contextlib
import functools
import itertools
import sys
import threading
import warnings
from collections.abc import Iterator

import captum.attr as captum_attr
import pytest
import torch
from torch import Tensor, nn

import fastattr
from fastattr import _model_state
from fastattr._settle import settled

F64 = {"rtol": 1e-10, "atol": 1e-12}


def mlp(batch_norm: bool = False, **norm) -> nn.Module:
    torch.manual_seed(0)
    layers = [nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3)]
    if batch_norm:
        layers.insert(1, nn.BatchNorm1d(8, **norm))
    return nn.Sequential(*layers).double().eval()


def inputs(batch: int = 3) -> Tensor:
    torch.manual_seed(1)
    return torch.randn(batch, 5, dtype=torch.float64)


def both(name: str, *args, **kwargs):
    return getattr(fastattr, name)(*args, **kwargs), getattr(captum_attr, name)(*args, **kwargs)


def assert_same(ours, theirs) -> None:
    if isinstance(theirs, (tuple, list)):
        assert len(ours) == len(theirs)
        for a, b in zip(ours, theirs):
            assert_same(a, b)
    else:
        torch.testing.assert_close(ours, theirs, **F64)


def snapshot(model: nn.Module):
    """Everything a call could change: tensors (identity and values), each module's own
    attributes (hook dictionaries, instance forwards, training flags)."""
    tensors = [
        (n, t, t.detach().clone()) for n, t in [*model.named_parameters(), *model.named_buffers()]
    ]
    modules = [
        (m, {k: dict(v) if isinstance(v, dict) else v for k, v in vars(m).items()})
        for m in model.modules()
    ]
    return tensors, modules


def assert_as_found(model: nn.Module, state) -> None:
    tensors, modules = state
    now = dict([*model.named_parameters(), *model.named_buffers()])
    assert now.keys() == {n for n, _, _ in tensors}
    for name, tensor, value in tensors:
        assert now[name] is tensor, name
        assert torch.equal(tensor, value), name
        assert tensor.grad is None, name
    for module, attributes in modules:
        current = vars(module)
        assert current.keys() == attributes.keys(), type(module).__name__
        for key, value in attributes.items():
            if isinstance(value, dict):
                assert dict(current[key]).keys() == value.keys(), key
                assert all(current[key][k] is v for k, v in value.items()), key
            else:
                assert current[key] is value or current[key] == value, key


# ----------------------------------------------------------------------------- outputs


def test_neuron_selector_summing_over_the_batch():
    model, x = mlp(), inputs()
    for selector in (
        lambda v: v[:, 2:].sum(),
        lambda v: v.sum(0),
        lambda v: v[:, 1].sum().reshape(1, 1),
    ):
        for extra in ({}, {"internal_batch_size": 6}):
            ours, theirs = both("NeuronIntegratedGradients", model, model[2])
            kwargs = {"n_steps": 7, **extra}
            assert_same(
                ours.attribute(x, selector, **kwargs), theirs.attribute(x, selector, **kwargs)
            )


def test_neuron_selector_with_several_values_per_example_is_refused():
    model, x = mlp(), inputs()
    with pytest.raises(ValueError, match="neuron_selector must give one value per example"):
        fastattr.NeuronIntegratedGradients(model, model[2]).attribute(x, lambda v: v[:, :2])


def test_a_missing_target_is_captums_assertion_error_too():
    model, x = mlp(), inputs()
    for method in (captum_attr.IntegratedGradients(model), fastattr.IntegratedGradients(model)):
        with pytest.raises(AssertionError):
            method.attribute(x)
    with pytest.raises(ValueError, match="pass a target"):
        fastattr.IntegratedGradients(model).attribute(x)


@pytest.mark.parametrize(
    ("name", "layer", "argument"),
    [
        ("IntegratedGradients", None, "target"),
        ("LayerIntegratedGradients", 2, "target"),
        ("NeuronIntegratedGradients", 2, "neuron_selector"),
        ("LRP", None, "target"),
        ("LayerLRP", 2, "target"),
    ],
)
def test_more_indices_than_dimensions_is_captums_assertion_error_too(name, layer, argument):
    # captum asserts on a target or neuron selector with more indices than the output (or
    # the layer's values) has dimensions; its tests expect that AssertionError.
    model, x = mlp(), inputs()
    args = () if layer is None else (model[layer],)
    with pytest.raises(AssertionError):
        getattr(captum_attr, name)(model, *args).attribute(x, **{argument: (1,) * 5})
    # (captum's LRP leaves attributes on the modules: the model is snapshot after it.)
    state = snapshot(model)
    for error in (AssertionError, ValueError):
        with pytest.raises(error, match=f"{argument} .* has more indices"):
            getattr(fastattr, name)(model, *args).attribute(x, **{argument: (1,) * 5})
    assert_as_found(model, state)


@pytest.mark.parametrize("method", ["gausslegendre", "riemann_trapezoid"])
def test_forward_whose_first_dimension_is_not_the_batch(method):
    # captum differentiates the sum of the selected outputs of each forward; which rows a
    # forward sees matters (here only the first row of the expanded batch reaches the output),
    # so fastattr runs the path as captum chunks it.
    model, x = mlp(), inputs()

    def first_row(v):
        return model(v)[0].unsqueeze(0)

    def column_sums(v):
        return model(v).sum(0, keepdim=True)

    for forward in (first_row, column_sums):
        for extra in ({}, {"internal_batch_size": 6}):
            kwargs = {"target": 1, "n_steps": 6, "method": method, **extra}
            ours, theirs = both("IntegratedGradients", forward)
            assert_same(ours.attribute(x, **kwargs), theirs.attribute(x, **kwargs))
            deltas = [
                m.attribute(x, return_convergence_delta=True, **kwargs) for m in (ours, theirs)
            ]
            assert_same(*deltas)
            ours, theirs = both("LayerIntegratedGradients", forward, model[2])
            assert_same(ours.attribute(x, **kwargs), theirs.attribute(x, **kwargs))


def test_delta_rows_that_do_not_broadcast_are_refused():
    model, x = mlp(), inputs()
    method = fastattr.IntegratedGradients(lambda v: model(v)[:2])
    with pytest.raises(ValueError, match="one output row per example"):
        method.compute_convergence_delta(torch.zeros_like(x), 0.0, x, target=0)


@pytest.mark.parametrize(
    "name", ["IntegratedGradients", "LayerIntegratedGradients", "NeuronIntegratedGradients"]
)
def test_forward_arguments_that_are_not_batched(name):
    model, x = mlp(), inputs()
    weights = torch.linspace(0.5, 2.0, 4, dtype=torch.float64)  # (4,), batch of 3

    class Weighted(nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, v, w, index):
            return self.model(v) * w[index]

    forward = Weighted()
    ours, theirs = both(
        name, *((forward,) if name == "IntegratedGradients" else (forward, model[2]))
    )
    kwargs = {"additional_forward_args": (weights, 2), "n_steps": 5}
    if name == "NeuronIntegratedGradients":
        kwargs["neuron_selector"] = 4
    else:
        kwargs["target"] = 2
    assert_same(ours.attribute(x, **kwargs), theirs.attribute(x, **kwargs))


@pytest.mark.parametrize("name", ["IntegratedGradients", "LayerIntegratedGradients"])
def test_forward_arguments_repeated_once_per_step_of_each_forward(name):
    # A tensor argument without a batch dimension is repeated once per step a forward holds,
    # as captum repeats it; fastattr's own chunks hold fewer steps than captum's one forward
    # (not all steps at once, which would cost captum's memory), so a forward that sums the
    # argument gets captum's numbers with captum's internal_batch_size.
    model, x = mlp(), inputs()
    factor = torch.tensor([0.5, 0.25], dtype=torch.float64)  # (2,), batch of 3
    seen = []

    class Scaled(nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, v, f):
            seen.append((v.shape[0], f.shape[0]))
            return self.model(v) * f.sum()

    forward = Scaled()
    layer = () if name == "IntegratedGradients" else (model[2],)
    kwargs = {"target": 2, "n_steps": 5, "additional_forward_args": (factor,)}
    for internal_batch_size in (5 * 3, 6):
        ours, theirs = both(name, forward, *layer)
        kwargs["internal_batch_size"] = internal_batch_size
        assert_same(ours.attribute(x, **kwargs), theirs.attribute(x, **kwargs))
    del kwargs["internal_batch_size"]
    seen.clear()
    getattr(fastattr, name)(forward, *layer).attribute(x, **kwargs)
    assert (5 * 3, 5 * 2) not in seen  # its own chunks: the first holds one step
    assert all(repeats == 2 * rows // 3 for rows, repeats in seen)


# ----------------------------------------------------------------------------- coupled examples


def test_layer_ig_takes_inputs_and_baselines_apart():
    # BatchNorm without running statistics normalizes with the batch even in eval mode: one
    # pass over inputs and baselines together mixed them (39-99% off captum before).
    model, x = mlp(batch_norm=True, track_running_stats=False), inputs(4)
    baselines = torch.randn(4, 5, dtype=torch.float64)
    for layer in (model[3], model[5]):
        ours, theirs = both("LayerIntegratedGradients", model, layer)
        kwargs = {
            "baselines": baselines,
            "target": 0,
            "n_steps": 9,
            "return_convergence_delta": True,
        }
        assert_same(ours.attribute(x, **kwargs), theirs.attribute(x, **kwargs))


@pytest.mark.parametrize(
    "name", ["IntegratedGradients", "LayerIntegratedGradients", "NeuronIntegratedGradients"]
)
def test_train_mode_batch_norm_gives_captums_numbers_and_keeps_buffers(name):
    model, x = mlp(batch_norm=True).train(), inputs(4)
    state = snapshot(model)
    ours = getattr(fastattr, name)(
        *((model,) if name == "IntegratedGradients" else (model, model[4]))
    )
    kwargs = {"neuron_selector": 1} if name == "NeuronIntegratedGradients" else {"target": 1}
    for extra in ({}, {"internal_batch_size": 8}):
        got = ours.attribute(x, n_steps=5, **kwargs, **extra)
        assert_as_found(model, state)
        theirs = getattr(captum_attr, name)(
            *((model,) if name == "IntegratedGradients" else (model, model[4]))
        )
        expected = theirs.attribute(x, n_steps=5, **kwargs, **extra)
        assert not torch.equal(model[1].running_mean, state[0][-3][2])  # captum updated them
        with torch.no_grad():
            for _, tensor, value in state[0]:
                tensor.copy_(value)
        assert_same(got, expected)


_NET = mlp(batch_norm=True).train()


def _through_a_global(v):
    return _NET(v).softmax(-1)


class _Predictor:
    """A wrapper holding the model, as an object (not a module) callable or with a method."""

    def __init__(self, net):
        self.net = net

    def __call__(self, v):
        return self.net(v).softmax(-1)

    def predict(self, v):
        return self.net(v).softmax(-1)


@pytest.mark.parametrize(
    "spelling",
    ["closure", "partial", "global", "default", "kwdefault", "callable_object", "method"],
)
def test_a_plain_function_s_batch_norm_is_seen(spelling):
    # The batch-normalizing model behind a plain function: captum's rows per forward (all
    # steps at once), so captum's numbers, and its buffers kept.
    model = _NET if spelling == "global" else mlp(batch_norm=True).train()
    forward = {
        "closure": lambda v: model(v).softmax(-1),
        "partial": functools.partial(lambda net, v: net(v).softmax(-1), model),
        "global": _through_a_global,
        # the model bound as a default value (forwards made in a loop)
        "default": lambda v, net=model: net(v).softmax(-1),
        "kwdefault": lambda v, *, net=model: net(v).softmax(-1),
        # the model among the attributes of an object that is not a module
        "callable_object": _Predictor(model),
        "method": _Predictor(model).predict,
    }[spelling]
    x = inputs(4)
    state = snapshot(model)
    got = fastattr.IntegratedGradients(forward).attribute(x, target=1, n_steps=6)
    assert_as_found(model, state)
    expected = captum_attr.IntegratedGradients(forward).attribute(x, target=1, n_steps=6)
    with torch.no_grad():
        for _, tensor, value in state[0]:
            tensor.copy_(value)
    assert_same(got, expected)


@pytest.mark.parametrize("name", ["LayerIntegratedGradients", "NeuronIntegratedGradients"])
def test_train_mode_dropout_draws_as_captum_does(name):
    # In training mode the passes run to the end, as captum's: the dropouts draw the same
    # numbers, so the attributions and the random state after are captum's. (Given captum's
    # rows per forward: dropouts before and after the layer take turns drawing, so chunks of
    # other sizes give the rows other draws.)
    def build():
        torch.manual_seed(0)
        return nn.Sequential(
            nn.Linear(5, 8), nn.Tanh(), nn.Dropout(0.5), nn.Linear(8, 8), nn.Dropout(0.5),
            nn.Linear(8, 3),
        ).double().train()  # fmt: skip

    x = inputs(3)
    kwargs = {"neuron_selector": 2} if name == "NeuronIntegratedGradients" else {"target": 1}
    results, states = [], []
    for module in (fastattr, captum_attr):
        model = build()
        torch.manual_seed(5)
        method = getattr(module, name)(model, model[3])
        results.append(method.attribute(x, n_steps=4, internal_batch_size=12, **kwargs))
        states.append(torch.get_rng_state())
    assert_same(results[0], results[1])
    assert torch.equal(states[0], states[1])


def test_buffers_are_restored_after_an_error():
    model, x = mlp(batch_norm=True).train(), inputs(4)
    state = snapshot(model)

    class Failing(nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, v):
            self.model(v)
            raise RuntimeError("after the forward")

    for method in (
        fastattr.IntegratedGradients(Failing()),
        fastattr.IntegratedGradients(model.forward),
    ):
        with pytest.raises((RuntimeError, IndexError)):
            method.attribute(x, target=7)  # the bound method: an out-of-range target
        assert_as_found(model, state)


def test_uses_batch_statistics():
    assert not _model_state.uses_batch_statistics(mlp(batch_norm=True))
    assert _model_state.uses_batch_statistics(mlp(batch_norm=True).train())
    assert _model_state.uses_batch_statistics(mlp(batch_norm=True, track_running_stats=False))
    assert not _model_state.uses_batch_statistics(lambda v: v)


# ----------------------------------------------------------------------------- threads


@pytest.fixture
def eager_switching():
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    yield
    sys.setswitchinterval(interval)


def run_threads(work, count: int = 4) -> list:
    results, errors = [None] * count, []

    def run(index):
        try:
            results[index] = work(index)
        except BaseException as error:
            errors.append(error)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors
    return results


@pytest.mark.parametrize("name", ["LayerIntegratedGradients", "NeuronIntegratedGradients"])
def test_threads_on_one_model(name, eager_switching):
    model, x = mlp(batch_norm=True), inputs(4)
    layer = model[3]
    kwargs = {"neuron_selector": 2} if name == "NeuronIntegratedGradients" else {"target": 2}
    expected = getattr(fastattr, name)(model, layer).attribute(x, n_steps=4, **kwargs)
    plain = model(x)
    state = snapshot(model)

    def work(index):
        if index == 0:  # plain inference alongside: never sees the attributions' hooks
            return [torch.equal(model(x), plain) for _ in range(60)]
        method = getattr(fastattr, name)(model, layer)
        return [method.attribute(x, n_steps=4, **kwargs) for _ in range(15)]

    inference, *attributions = run_threads(work)
    assert all(inference)
    for results in attributions:
        for result in results:
            torch.testing.assert_close(result, expected, rtol=0, atol=0)
    assert_as_found(model, state)


def test_threads_on_a_train_mode_model_leave_its_statistics(eager_switching):
    model, x = mlp(batch_norm=True).train(), inputs(4)
    state = snapshot(model)
    expected = fastattr.IntegratedGradients(model).attribute(x, target=0, n_steps=4)
    results = run_threads(
        lambda _: (
            [
                fastattr.LayerIntegratedGradients(model, model[0]).attribute(x, target=0, n_steps=4)
                for _ in range(10)
            ]
            + [
                fastattr.IntegratedGradients(model).attribute(x, target=0, n_steps=4)
                for _ in range(10)
            ]
        )
    )
    for result in results:
        for got in result[10:]:
            torch.testing.assert_close(got, expected, rtol=0, atol=0)
    assert_as_found(model, state)


def test_lrp_and_ig_in_two_threads_leave_a_train_mode_models_statistics():
    # IG's forward has updated the running statistics when LRP starts; IG then finishes and
    # LRP after it. LRP kept a snapshot of its own, taken after IG's update, and restored that
    # last: the statistics were left changed. (The order is forced by a hook on the head.)
    model, x = mlp(batch_norm=True).train(), inputs(4)
    expected = {
        "ig": fastattr.IntegratedGradients(model).attribute(x, target=0, n_steps=4),
        "lrp": fastattr.LRP(model).attribute(x, target=0),
    }
    state = snapshot(model)
    forwarded = {name: threading.Event() for name in expected}
    go = {name: threading.Event() for name in expected}
    results = {}

    def pause(module, args, output):
        name = threading.current_thread().name
        if not forwarded[name].is_set():
            forwarded[name].set()
            assert go[name].wait(10)

    def run(name):
        method = fastattr.IntegratedGradients(model) if name == "ig" else fastattr.LRP(model)
        results[name] = method.attribute(x, target=0, **({"n_steps": 4} if name == "ig" else {}))

    handle = model[-1].register_forward_hook(pause)
    threads = {name: threading.Thread(target=run, args=(name,), name=name) for name in expected}
    try:
        threads["ig"].start()
        assert forwarded["ig"].wait(10)
        threads["lrp"].start()
        assert forwarded["lrp"].wait(10)
        go["ig"].set()
        threads["ig"].join()
        go["lrp"].set()
        threads["lrp"].join()
    finally:
        handle.remove()
        for event in go.values():
            event.set()
    for name, result in expected.items():
        torch.testing.assert_close(results[name], result, rtol=0, atol=0)
    assert_as_found(model, state)


def test_a_layer_run_in_another_thread_is_a_clear_error():
    # DataParallel over several devices runs replicas in worker threads: not attributable.
    class InWorker(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, v):
            out = []
            worker = threading.Thread(target=lambda: out.append(self.inner(v)))
            worker.start()
            worker.join()
            return out[0]

    inner = mlp()
    model = InWorker(inner)
    state = snapshot(model)
    with pytest.raises(ValueError, match="other threads"):
        fastattr.LayerIntegratedGradients(model, inner[2]).attribute(inputs(), target=0, n_steps=3)
    assert_as_found(model, state)


# ----------------------------------------------------------------------------- interrupts


class Interrupt:
    """A tracer that raises KeyboardInterrupt as the ``at``-th Python function is entered
    (fastattr's, torch's, the model's, contextlib's), where CPython handles a pending SIGINT;
    None: only counts the entries."""

    def __init__(self, at: int | None) -> None:
        self.at, self.entries = at, 0

    def __call__(self, frame, event, arg):
        if event == "call":
            self.entries += 1
            if self.entries - 1 == self.at:
                raise KeyboardInterrupt


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # in finalizers
@pytest.mark.parametrize("name", ["LayerIntegratedGradients", "NeuronIntegratedGradients"])
def test_an_interrupt_anywhere_leaves_the_model_as_found(name):
    # Interrupts at a sample of the function entries of a call on a train-mode model (hooks
    # being added, forwards, buffers being saved and restored, hooks being removed).
    model, x = mlp(batch_norm=True).train(), inputs(4)
    method = getattr(fastattr, name)(model, model[3])
    kwargs = {"neuron_selector": 1} if name == "NeuronIntegratedGradients" else {"target": 1}
    expected = method.attribute(x, n_steps=3, **kwargs)
    state = snapshot(model)
    counter = Interrupt(None)
    sys.settrace(counter)
    try:
        method.attribute(x, n_steps=3, **kwargs)
    finally:
        sys.settrace(None)
    interrupted = 0
    for at in range(0, counter.entries, max(1, counter.entries // 80)):
        sys.settrace(Interrupt(at))
        try:
            method.attribute(x, n_steps=3, **kwargs)
        except KeyboardInterrupt:
            interrupted += 1
        finally:
            sys.settrace(None)
        assert_as_found(model, state)
        assert torch.is_grad_enabled()  # an interrupt in a torch.no_grad() exit included
    assert interrupted > 0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        torch.testing.assert_close(
            method.attribute(x, n_steps=3, **kwargs), expected, rtol=0, atol=0
        )


class LineInterrupt:
    """A tracer that raises KeyboardInterrupt at the ``at``-th line run in a file whose path
    ends with ``file`` (or one of them; None: only counts them). Finer than Interrupt: CPython
    traces the line of a with statement again before its __exit__ runs, and a finally's first
    lines before any try inside it."""

    def __init__(self, file: str | tuple[str, ...], at: int | None) -> None:
        self.file, self.at, self.lines = file, at, 0

    def __call__(self, frame, event, arg):
        if not frame.f_code.co_filename.endswith(self.file):
            return None
        if event == "line":
            self.lines += 1
            if self.lines - 1 == self.at:
                raise KeyboardInterrupt
        return self


def in_a_thread(call, tracer=None) -> list:
    """``call()`` run in a daemon thread under ``tracer``: its result in a list, empty when
    interrupted; fails, rather than hangs, when it does not finish."""
    out: list = []

    def run() -> None:
        sys.settrace(tracer)
        try:
            out.append(call())
        except KeyboardInterrupt:
            pass
        finally:
            sys.settrace(None)

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    worker.join(20)
    assert not worker.is_alive(), "blocked"
    return out


def interrupt_every_line(file: str | tuple[str, ...], call) -> Iterator[int]:
    """Runs ``call`` once per line it runs in ``file``, interrupted there, yielding the line's
    number after each."""
    counter = LineInterrupt(file, None)
    in_a_thread(call, counter)
    assert counter.lines > 20
    for at in range(counter.lines):
        in_a_thread(call, LineInterrupt(file, at))
        yield at


# The helper the eager stance, the kept buffers and the layer hooks settle back through: the
# tests of each interrupt its lines too.
SETTLE = "_settle.py"


@pytest.mark.parametrize("body", ["returns", "raises"])
def test_an_interrupt_at_any_line_of_settled_still_settles_and_is_raised(body):
    # An interrupt on the first line of a finally skips that finally: settled() settles again
    # in the finally around it. Without that second settle the state was left set up.
    held: list[str] = []

    @contextlib.contextmanager
    def holding() -> Iterator[None]:
        yield from settled(lambda: held.append("held"), held.clear)

    def call() -> None:
        with holding():
            assert held == ["held"]
            if body == "raises":
                raise ValueError("the block's own error")

    interrupted = 0
    for at in itertools.count():
        tracer = LineInterrupt(SETTLE, at)
        sys.settrace(tracer)
        try:
            call()
        except (KeyboardInterrupt, ValueError) as error:
            raised: type[BaseException] | None = type(error)
        else:
            raised = None
        finally:
            sys.settrace(None)
        assert held == [], at
        if tracer.lines <= at:  # ran through without the interrupt
            assert raised is (ValueError if body == "raises" else None)
            break
        assert raised is KeyboardInterrupt, at  # never lost, nor replaced
        interrupted += 1
    assert interrupted > 10


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_an_interrupt_at_any_line_of_the_eager_stance_leaves_it_and_its_lock():
    # Once torch.compile is loaded, the hooked passes run under the eager stance, taken and
    # given back under a lock shared by all threads.
    import torch._dynamo  # what torch.compile loads

    import fastattr._compiled as compiled

    model, x = mlp(), inputs(4)
    method = fastattr.LayerIntegratedGradients(model, model[2])
    expected = method.attribute(x, target=1, n_steps=3)
    call = functools.partial(method.attribute, x, target=1, n_steps=3)
    for at in interrupt_every_line(("_compiled.py", SETTLE), call):
        assert torch._dynamo.eval_frame._stance.stance == "default", at
        assert compiled._eager_calls == 0 and compiled._eager_stance is None, at
        done = in_a_thread(call)  # the lock is free
        torch.testing.assert_close(done[0], expected, rtol=0, atol=0)


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_an_interrupt_at_any_line_keeping_the_buffers_leaves_them_and_the_lock():
    # An interrupt on the line of `with _held_lock:` as it was left kept the lock held: the next
    # call, in any thread, waited for it for ever. One on the first lines of the finally skipped
    # the restore: the running statistics were left changed.
    model, x = mlp(batch_norm=True).train(), inputs(4)
    method = fastattr.IntegratedGradients(model)
    expected = method.attribute(x, target=1, n_steps=3)
    state = snapshot(model)
    call = functools.partial(method.attribute, x, target=1)
    for at in interrupt_every_line(("_model_state.py", SETTLE), call):
        assert_as_found(model, state)
        assert torch.is_grad_enabled(), at
        # The lock is free: a call in another thread gets through.
        done = in_a_thread(lambda: method.attribute(x, target=1, n_steps=3))
        torch.testing.assert_close(done[0], expected, rtol=0, atol=0)


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.parametrize("name", ["LayerIntegratedGradients", "NeuronIntegratedGradients"])
def test_an_interrupt_at_any_line_of_the_layer_hooks_leaves_none(name):
    # An interrupt on the first lines of the finally that removes the layer's hooks skipped
    # the removal: the hook stayed on the layer.
    model, x = mlp(batch_norm=True).train(), inputs(4)
    method = getattr(fastattr, name)(model, model[3])
    kwargs = {"neuron_selector": 1} if name == "NeuronIntegratedGradients" else {"target": 1}
    expected = method.attribute(x, n_steps=3, **kwargs)
    state = snapshot(model)
    call = functools.partial(method.attribute, x, n_steps=3, **kwargs)
    for at in interrupt_every_line(("_layers.py", SETTLE), call):
        assert_as_found(model, state)
        assert torch.is_grad_enabled(), at
    torch.testing.assert_close(method.attribute(x, n_steps=3, **kwargs), expected, rtol=0, atol=0)
