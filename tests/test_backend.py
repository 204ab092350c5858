"""Backend selection, build information and the fallback when fastattr._C is missing."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

import fastattr
from fastattr import build_info, current_backend, ops, use_backend
from fastattr.ops import reference

# Where the fastattr under test lives: this checkout, or an install of it (the oldest-torch
# run of `make test` imports a build installed elsewhere).
ROOT = Path(fastattr.__file__).resolve().parents[1]
OPS = (
    "interpolate_points",
    "accumulate_points",
    "point_slopes",
    "quadrature_finish",
    "epsilon_ratio",
    "input_relevance",
    "epsilon_ratio_of_product",
)


def run_python(*args: str, **env: str) -> subprocess.CompletedProcess:
    """`python *args` in a fresh interpreter importing the fastattr under test, with the
    default backend unless `env` sets FASTATTR_BACKEND."""
    environment = {k: v for k, v in os.environ.items() if k != "FASTATTR_BACKEND"}
    environment.update(env)
    environment["PYTHONPATH"] = os.pathsep.join(
        filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])
    )
    return subprocess.run(
        [sys.executable, *args],
        cwd=ROOT,
        env=environment,
        capture_output=True,
        text=True,
        timeout=120,
    )


def has_kernel(op: str, dispatch_key: str) -> bool:
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"fastattr::{op}", dispatch_key)


def test_build_info_describes_this_build() -> None:
    info = build_info()
    assert {"compiled", "cpu", "cuda", "torch_version", "cuda_arch_list"} <= info.keys()
    assert info["compiled"] is True
    assert info["cpu"] is all(has_kernel(op, "CPU") for op in OPS)
    assert info["cpu"] is True
    # "cuda" says whether the CUDA kernels were built, GPU or not.
    assert info["cuda"] is all(has_kernel(op, "CUDA") for op in OPS)
    assert isinstance(info["cuda_arch_list"], list)
    if info["cuda"]:
        assert info["cuda_arch_list"]
        for arch in info["cuda_arch_list"]:
            assert re.fullmatch(r"\d+\.\d+a?(\+PTX)?", arch), arch
    else:
        assert info["cuda_arch_list"] == []
    assert info["torch_version"] == torch.__version__
    assert info["backend"] == current_backend()
    assert info["import_error"] is None
    json.dumps(info)  # printable by `python -m fastattr info`


def test_info_command_prints_build_info_as_json() -> None:
    result = run_python("-m", "fastattr", "info")
    assert result.returncode == 0, result.stderr
    printed = json.loads(result.stdout)
    expected = {**build_info(), "backend": "compiled"}
    assert printed == json.loads(json.dumps(expected))


def test_default_backend_is_compiled_unless_the_environment_says_otherwise() -> None:
    assert current_backend() == os.environ.get("FASTATTR_BACKEND", "compiled")


def test_use_backend_switches_nests_and_restores() -> None:
    outer = current_backend()
    with use_backend("reference"):
        assert current_backend() == "reference"
        assert build_info()["backend"] == "reference"
        with use_backend("compiled"):
            assert current_backend() == "compiled"
        assert current_backend() == "reference"
    assert current_backend() == outer


def test_use_backend_restores_after_an_exception() -> None:
    outer = current_backend()
    with pytest.raises(KeyError), use_backend("reference"):
        assert current_backend() == "reference"
        raise KeyError("boom")
    assert current_backend() == outer


@pytest.mark.parametrize("name", ["bogus", "", "Compiled", "gpu"])
def test_use_backend_rejects_unknown_names(name: str) -> None:
    outer = current_backend()
    with pytest.raises(ValueError, match=r"backend must be one of"), use_backend(name):
        pytest.fail("the body must not run")
    assert current_backend() == outer


def test_backend_is_per_thread() -> None:
    seen: list[str] = []
    with use_backend("reference"):
        worker = threading.Thread(target=lambda: seen.append(current_backend()))
        worker.start()
        worker.join()
    assert seen == [os.environ.get("FASTATTR_BACKEND", "compiled")]


def test_ops_dispatch_to_the_chosen_backend(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []
    twin = reference.epsilon_ratio

    def spy(*args: object) -> torch.Tensor:
        calls.append("reference")
        return twin(*args)

    monkeypatch.setattr(reference, "epsilon_ratio", spy)
    relevance, z = torch.randn(2, 3), torch.randn(2, 3)
    with use_backend("compiled"):
        compiled = ops.epsilon_ratio(relevance, z, 0.1)
    assert calls == []
    with use_backend("reference"):
        twin_result = ops.epsilon_ratio(relevance, z, 0.1)
    assert calls == ["reference"]
    torch.testing.assert_close(compiled, twin_result, rtol=0, atol=0)


def test_environment_variable_sets_the_default_backend() -> None:
    result = run_python(
        "-c",
        "import fastattr; print(fastattr.current_backend(), fastattr.build_info()['backend'])",
        FASTATTR_BACKEND="reference",
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["reference", "reference"]

    result = run_python("-c", "import fastattr", FASTATTR_BACKEND="bogus")
    assert result.returncode != 0
    assert "ValueError: FASTATTR_BACKEND='bogus': backend must be one of" in result.stderr


# Runs with fastattr._C unimportable, as on a machine where the extension was never built.
FALLBACK = """
import json, sys, warnings
sys.modules["fastattr._C"] = None
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    import fastattr
    import fastattr.ops as ops
    import fastattr.attr
    from fastattr import _backend

import torch
x = torch.randn(3, 4, dtype=torch.float64)
base = torch.randn(4, dtype=torch.float64)
rows = torch.arange(3).repeat(3)
alphas = torch.tensor([0.0, 0.5, 1.0], dtype=torch.float64).repeat_interleave(3)
path = ops.interpolate_points(x, base, rows, alphas)
accumulator = torch.zeros(3, 4, dtype=torch.float64)
ops.accumulate_points(accumulator, torch.ones(9, 4, dtype=torch.float64), rows, alphas)
attributions, sums = ops.quadrature_finish(accumulator, x, base, True)
ratio = ops.epsilon_ratio(x, torch.zeros_like(x), 0.5)
input_relevance = ops.input_relevance(x, x)
try:
    with fastattr.use_backend("compiled"):
        pass
    compiled_error = None
except Exception as error:
    compiled_error = [type(error).__name__, str(error)]
print(json.dumps({
    "warnings": [
        [w.category.__name__, str(w.message)] for w in caught if "fastattr" in str(w.message)
    ],
    "info": fastattr.build_info(),
    "backend": fastattr.current_backend(),
    "registered": hasattr(torch.ops.fastattr, "interpolate_points"),
    "path": torch.allclose(
        path, torch.cat([base.expand(3, 4), (x + base) / 2, x]), rtol=1e-15, atol=1e-15
    ),
    "accumulated": torch.equal(accumulator, torch.full((3, 4), 1.5, dtype=torch.float64)),
    "finished": torch.equal(attributions, 1.5 * (x - base)) and torch.allclose(
        sums, attributions.sum(1), rtol=1e-14, atol=1e-14
    ),
    "ratio": torch.equal(ratio, x / 0.5),
    "product": torch.equal(input_relevance, x * x),
    "compiled_error": compiled_error,
}))
"""


def test_fallback_without_the_extension() -> None:
    result = run_python("-c", FALLBACK)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])

    assert len(report["warnings"]) == 1, report["warnings"]
    category, message = report["warnings"][0]
    assert category == "RuntimeWarning"
    assert "not built" in message and "reference" in message

    info = report["info"]
    assert info["compiled"] is False and info["cpu"] is False and info["cuda"] is False
    assert info["cuda_arch_list"] == []
    assert info["import_error"]
    assert report["backend"] == "reference" == info["backend"]
    assert report["registered"] is False

    for check in ("path", "accumulated", "finished", "ratio", "product"):
        assert report[check] is True, check

    error_type, error_message = report["compiled_error"]
    assert error_type == "RuntimeError"
    assert "fastattr._C is not built" in error_message


def test_asking_for_compiled_without_the_extension_fails_at_import() -> None:
    result = run_python(
        "-c",
        "import sys; sys.modules['fastattr._C'] = None; import fastattr",
        FASTATTR_BACKEND="compiled",
    )
    assert result.returncode != 0
    assert "RuntimeError: FASTATTR_BACKEND='compiled'" in result.stderr
    assert "fastattr._C is not built" in result.stderr
