"""captum's attribution protocol on fastattr's classes: the members captum's wrappers use, with
captum's meanings, and membership of captum's classes whichever of the two is imported first,
while captum stays optional (fastattr never imports it, and runs without it)."""

from __future__ import annotations

import inspect
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import captum.attr as captum_attr
import pytest
import torch
from torch import nn

import fastattr
from fastattr import _captum
from fastattr.attr._base import Attribution

ROOT = Path(__file__).resolve().parents[1]
CLASSES = (
    "IntegratedGradients",
    "LayerIntegratedGradients",
    "NeuronIntegratedGradients",
    "LRP",
    "LayerLRP",
)
LAYERED = {"LayerIntegratedGradients", "NeuronIntegratedGradients", "LayerLRP"}


def model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 3)).double().eval()


def pair(name: str, net: nn.Module, **kwargs):
    args = (net, net[0]) if name in LAYERED else (net,)
    return getattr(fastattr, name)(*args, **kwargs), getattr(captum_attr, name)(*args, **kwargs)


def run_python(code: str, env: dict[str, str] | None = None) -> str:
    """Run ``code`` in a fresh interpreter on this checkout's fastattr; its stdout."""
    completed = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert completed.returncode == 0, completed.stderr
    assert "could not become a subclass" not in completed.stderr, completed.stderr
    return completed.stdout


# ----------------------------------------------------------------------------- the members


@pytest.mark.parametrize("name", CLASSES)
def test_attribute_wrapped_is_the_method(name):
    net = model()
    method, _ = pair(name, net)
    inputs = torch.randn(3, 4, dtype=torch.float64)
    kwargs = {"neuron_selector": 1} if name == "NeuronIntegratedGradients" else {"target": 2}
    expected = method.attribute(inputs, **kwargs)
    # How captum's NoiseTunnel calls it.
    got = method.attribute.__wrapped__(method, inputs, **kwargs)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    cls = type(method)
    assert inspect.signature(cls.attribute) == inspect.signature(cls.attribute.__wrapped__)
    assert cls.attribute.__doc__ == cls.attribute.__wrapped__.__doc__
    assert cls.attribute.__name__ == "attribute"


@pytest.mark.parametrize("name", CLASSES)
def test_protocol_members_have_captum_meanings(name):
    net = model()
    options = [{}]
    if name not in {"LRP", "LayerLRP"}:
        options += [{"multiply_by_inputs": False}, {"multiply_by_inputs": True}]
    for kwargs in options:
        ours, theirs = pair(name, net, **kwargs)
        assert ours.forward_func is net
        assert ours.get_name() == theirs.get_name() == type(theirs).get_name()
        assert type(ours).get_name() == theirs.get_name()
        assert ours.has_convergence_delta() is theirs.has_convergence_delta()
        assert ours.multiplies_by_inputs is theirs.multiplies_by_inputs
        # captum's layer and neuron classes lack attribute_future; fastattr's all have it.
        for method in (ours, theirs) if hasattr(theirs, "attribute_future") else (ours,):
            with pytest.raises(NotImplementedError, match="attribute_future"):
                method.attribute_future()


def test_get_name_follows_captum_rule():
    # captum puts a space before every character after the first that is not lower case.
    class My2ndLRPVariant(Attribution):
        pass

    class Ab_c(Attribution):
        pass

    for cls in (My2ndLRPVariant, Ab_c):
        assert cls.get_name() == captum_attr.Attribution.get_name.__func__(cls)


@pytest.mark.parametrize("name", ("LayerIntegratedGradients", "LayerLRP"))
def test_interpolate_is_captums(name):
    attributions = torch.randn(2, 3, 4, 5, dtype=torch.float64)
    for mode in ("nearest", "bilinear", "area"):
        expected = captum_attr.LayerAttribution.interpolate(attributions, (7, 9), mode)
        got = getattr(fastattr, name).interpolate(attributions, (7, 9), mode)
        torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_forward_func_must_be_callable():
    with pytest.raises(TypeError, match="forward_func must be callable"):
        fastattr.IntegratedGradients(3)


# ----------------------------------------------------------------------------- captum's classes


@pytest.mark.parametrize("name", CLASSES)
def test_captum_isinstance_holds_with_fastattr_first(name):
    net = model()
    ours, theirs = pair(name, net)
    for base in type(theirs).__mro__:
        assert isinstance(ours, base)
    mro = type(ours).__mro__
    first_captum = next(i for i, k in enumerate(mro) if k.__module__.startswith("captum."))
    assert all(not k.__module__.startswith("captum.") for k in mro[:first_captum])
    assert all(
        k.__module__.startswith(("captum.", "typing", "builtins")) for k in mro[first_captum:]
    )


@pytest.mark.parametrize("name", CLASSES)
def test_captum_internals_never_run_on_fastattr_objects(name):
    net = model()
    ours, theirs = pair(name, net)
    defined_by_fastattr = {
        n
        for k in type(ours).__mro__
        if k.__module__.startswith("fastattr")
        for n, value in vars(k).items()
        if not isinstance(value, _captum._CaptumOnly)
    }
    hidden = {
        n
        for k in type(theirs).__mro__
        if k.__module__.startswith("captum.")
        for n in vars(k)
        if not (n.startswith("__") and n.endswith("__")) and n not in defined_by_fastattr
    }
    if name == "IntegratedGradients":  # the check sees captum's private helpers
        assert "_attribute" in hidden
    for attribute in hidden:
        assert not hasattr(ours, attribute), attribute
        with pytest.raises(AttributeError, match="captum"):
            getattr(ours, attribute)
    # Dunders taken from captum are data only (no captum __init__ or __call__ runs).
    inherited = {
        n
        for n in dir(type(ours))
        if n.startswith("__")
        and n not in defined_by_fastattr
        and next(k for k in type(ours).__mro__ if n in vars(k)).__module__.startswith("captum.")
    }
    assert inherited <= {
        "__dict__",
        "__weakref__",
        "__annotations__",
        "__orig_bases__",
        "__parameters__",
    }


def test_an_object_may_still_set_a_hidden_name():
    lrp = fastattr.LRP(model())
    lrp.verbose = True  # captum's class attribute: now the instance's own
    assert lrp.verbose is True


def test_failed_adoption_warns_and_leaves_the_class_usable(monkeypatch):
    monkeypatch.setattr(_captum, "_registered", [])
    with pytest.warns(RuntimeWarning, match="could not become a subclass of captum.attr.NoSuch"):

        class Orphan(Attribution, captum_class="NoSuchAttribution"):
            def attribute(self, inputs):
                return inputs

    assert Orphan(abs).attribute(3) == 3


# ----------------------------------------------------------------------------- import orders

PUBLIC_MEMBERS = f"""
import fastattr
def public_members():
    return {{
        name: sorted(n for n in dir(getattr(fastattr, name)) if not n.startswith("_")
                     and hasattr(getattr(fastattr, name), n))
        for name in {CLASSES!r}
    }}
"""

CHECK_ADOPTED = f"""
import torch
from torch import nn
import captum.attr as ca
net = nn.Sequential(nn.Linear(4, 3))
for name in {CLASSES!r}:
    cls = getattr(fastattr, name)
    args = (net, net[0]) if name in {LAYERED!r} else (net,)
    obj = cls(*args)
    assert isinstance(obj, getattr(ca, name)) and isinstance(obj, ca.GradientAttribution), name
    assert not hasattr(obj, "_original_state_dict") and not hasattr(obj, "_attribute")
assert _captum._finder not in sys.meta_path
import importlib.machinery
assert isinstance(ca.__loader__, importlib.machinery.SourceFileLoader), ca.__loader__
assert ca.__spec__.loader is ca.__loader__
"""


def test_fastattr_first_then_captum():
    out = run_python(
        "import sys\n"
        + PUBLIC_MEMBERS
        + """
from fastattr import _captum
assert not any(m == "captum" or m.startswith("captum.") for m in sys.modules)
before = public_members()

class Mine(fastattr.IntegratedGradients):  # a user's subclass, made before captum comes
    pass

from captum.attr._core.integrated_gradients import IntegratedGradients  # through a submodule
assert public_members() == before, (public_members(), before)
assert isinstance(Mine(abs), IntegratedGradients)
"""
        + CHECK_ADOPTED
        + "print(sorted(before['LRP']))"
    )
    assert "attribute_future" in out and "get_name" in out


def test_captum_first_then_fastattr():
    run_python(
        "import sys\nimport captum.attr\nimport fastattr\nfrom fastattr import _captum\n"
        + CHECK_ADOPTED
    )


def test_captum_imported_by_another_thread_meanwhile():
    # fastattr's classes register while another thread is still inside captum.attr's import
    # (held there until they do): registration waits for that import to finish, then adopts.
    run_python(
        """
import sys, threading, time, importlib.abc, importlib.machinery

class HeldLoader(importlib.abc.Loader):  # (a finder can't wait: it runs under the import lock)
    def __init__(self, loader):
        self.loader = loader
    def create_module(self, spec):
        return self.loader.create_module(spec)
    def exec_module(self, module):
        inside.set()
        while not getattr(sys.modules.get("fastattr._captum"), "_registered", None):
            time.sleep(0.01)
        self.loader.exec_module(module)

class Held(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name != "captum.attr._core.lrp":
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        spec.loader = HeldLoader(spec.loader)
        return spec

inside = threading.Event()
sys.meta_path.insert(0, Held())
importer = threading.Thread(target=lambda: __import__("captum.attr"))
importer.start()
inside.wait()
import fastattr
from fastattr import _captum
importer.join()
"""
        + CHECK_ADOPTED
    )


def test_fastattr_without_captum():
    out = run_python(
        """
import sys, importlib.abc

class NoCaptum(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name == "captum" or name.startswith("captum."):
            raise ModuleNotFoundError(f"No module named {name!r}")
        return None

sys.meta_path.insert(0, NoCaptum())
import torch
from torch import nn
import fastattr
net = nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 3))
x = torch.randn(2, 4)
for method, kwargs in [
    (fastattr.IntegratedGradients(net), {"target": 1}),
    (fastattr.LayerIntegratedGradients(net, net[0]), {"target": 1}),
    (fastattr.NeuronIntegratedGradients(net, net[0]), {"neuron_selector": 1}),
    (fastattr.LRP(net), {"target": 1}),
    (fastattr.LayerLRP(net, net[0]), {"target": 1}),
]:
    result = method.attribute.__wrapped__(method, x, **kwargs)
    assert torch.equal(result, method.attribute(x, **kwargs))
    assert method.get_name() and method.forward_func is net
try:
    import captum.attr
except ModuleNotFoundError:
    pass
else:
    raise AssertionError("captum was importable")
assert not any(m == "captum" or m.startswith("captum.") for m in sys.modules)
print("ok")
"""
    )
    assert out.strip() == "ok"
