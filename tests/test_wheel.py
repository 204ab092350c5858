"""The wheel: built from this tree, installed into a fresh virtual environment that reuses this
torch, it carries the compiled extension and every op runs on it."""

from __future__ import annotations

import fcntl
import json
import os
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

import fastattr

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
# Every build in this checkout, in place or as a wheel, shares build/; take the same lock.
BUILD_LOCK = Path("/tmp/fastattr-build.lock")

# Runs inside the fresh environment: every compiled op against its reference twin.
CHECK_OPS = r"""
import json

import torch

import fastattr
from fastattr import ops
from fastattr.ops import reference

torch.manual_seed(0)
inputs = torch.randn(3, 5, 4)
baselines = torch.randn(1, 5, 4)
rows = torch.tensor([0, 2, 1, 1, 0, 2])
alphas = torch.linspace(0, 1, 6, dtype=torch.float64)
weights = torch.rand(6, dtype=torch.float64)
grads = torch.randn(6, 5, 4)
accumulator = torch.randn(3, 5, 4)
z = torch.randn(3, 7)
z[0, :3] = 0.0  # the epsilon rule's sign(0) = +1 branch
relevance = torch.randn(3, 7)
rstd = torch.rand(3, 1) + 0.5
norm_weight, norm_bias = torch.rand(7) + 0.5, torch.randn(7)
square = torch.randn(7, 7)
first_row = relevance * torch.tensor([[1.0], [0.0], [0.0]])  # two rows without relevance


def accumulate(op):
    out = accumulator.clone()
    op(out, grads, rows, weights)
    return out


def linear_backward(op):
    leaf = z.clone().requires_grad_()
    return torch.autograd.grad(op(leaf, square, z @ square.T), leaf, first_row)[0]


def backward_of(node):
    leaf = z.clone().requires_grad_()
    return torch.autograd.grad(node(leaf), leaf, relevance)[0]


CALLS = {
    "interpolate_points": lambda op: op(inputs, baselines, rows, alphas),
    "accumulate_points": accumulate,
    "point_slopes": lambda op: op(grads, rows, inputs, baselines),
    "quadrature_finish": lambda op: op(accumulator, inputs, baselines, True),
    "epsilon_ratio": lambda op: op(relevance, z, 0.01),
    "input_relevance": lambda op: op(relevance, z),
    "epsilon_ratio_of_product": lambda op: op(relevance, relevance, z, 0.01),
    "kink_flips": lambda op: op(z, relevance[:, 0].abs() * 0.1, torch.tensor([0, 1, 2]),
                                torch.tensor([2, 0, 1])).double(),
    # LRP's autograd nodes: what their backward sends back.
    "lrp_product_node": lambda op: backward_of(op),
    "lrp_product_ratio_node": lambda op: backward_of(lambda t: op(t, relevance, 0.01)),
    "lrp_ratio_node": lambda op: backward_of(lambda t: op(t, 0.01)),
    "lrp_ratio_shown_node": lambda op: backward_of(lambda t: op(t, relevance, 0.01)),
    "lrp_pass_node": lambda op: backward_of(lambda t: op(t, relevance)),
    "lrp_linear_node": linear_backward,
    # The transformer rules' ops and nodes.
    "softmax_relevance": lambda op: op(z, torch.softmax(z, -1), relevance, -1),
    "layer_norm_relevance": lambda op: op(z, relevance, z * rstd, rstd, norm_weight, 1e-6),
    "relevance_share": lambda op: op(z, relevance, 0.25),
    "lrp_share_node": lambda op: backward_of(lambda t: op(t, 0.25)),
    "lrp_uniform_matmul_node": lambda op: backward_of(lambda t: op(t, t.mT) @ t),
    "lrp_uniform_product_node": lambda op: backward_of(lambda t: op(t, t[:1])),
    "lrp_softmax_node": lambda op: backward_of(lambda t: op(t, -1, None)),
    "softmax_contribution": lambda op: op(torch.softmax(z, -1), relevance, -1, 0.125),
    "lrp_softmax_ratio_node": lambda op: backward_of(
        lambda t: op(t, t.detach() / 8, -1, None, 0.125)
    ),
    "lrp_layer_norm_node": lambda op: backward_of(
        lambda t: op(t, [7], norm_weight, norm_bias, 1e-5, 1e-6)
    ),
}

registered = sorted(
    name.split("::", 1)[1]
    for name in torch._C._dispatch_get_all_op_names()
    if name.startswith("fastattr::")
)
checked = []
for name in registered:
    if name not in CALLS:
        continue
    with fastattr.use_backend("compiled"):
        compiled = CALLS[name](getattr(ops, name))
    expected = CALLS[name](getattr(reference, name))
    torch.testing.assert_close(compiled, expected, rtol=1e-6, atol=1e-6)
    checked.append(name)

print(json.dumps({
    "build_info": fastattr.build_info(),
    "file": fastattr.__file__,
    "registered": registered,
    "checked": checked,
}))
"""


def _run(*command: str | Path, **kwargs) -> subprocess.CompletedProcess:
    completed = subprocess.run(
        [str(part) for part in command], capture_output=True, text=True, check=False, **kwargs
    )
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    return completed


def test_wheel_installs_into_a_fresh_environment_with_the_compiled_ops(tmp_path):
    dist = tmp_path / "dist"
    with BUILD_LOCK.open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        _run(
            sys.executable, "-m", "pip", "wheel", ".", "--no-build-isolation", "--no-deps",
            "--quiet", "-w", dist, cwd=ROOT,
        )  # fmt: skip
    (wheel,) = dist.glob("fastattr-*.whl")
    assert "-abi3-" in wheel.name, wheel.name  # torch>=2.13 builds the stable-ABI extension
    names = zipfile.ZipFile(wheel).namelist()
    assert any(n.startswith("fastattr/_C") and n.endswith(".so") for n in names), names

    venv = tmp_path / "venv"
    _run(sys.executable, "-m", "venv", "--without-pip", venv)
    python = venv / "bin" / "python"
    site = Path(
        _run(
            python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"
        ).stdout.strip()
    )
    # Reuse this torch (and numpy) without reinstalling it: its site-packages goes on the path
    # after the new environment's own, so the wheel's fastattr wins over any other install.
    (site / "reuse_torch.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    _run(
        sys.executable, "-m", "pip", "--python", python, "install", "--quiet", "--no-deps",
        "--no-index", wheel,
    )  # fmt: skip

    workdir = tmp_path / "elsewhere"  # not the source tree, so its fastattr cannot be imported
    workdir.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "FASTATTR_BACKEND")}
    completed = _run(python, "-c", CHECK_OPS, cwd=workdir, env=env)
    result = json.loads(completed.stdout.strip().splitlines()[-1])

    assert Path(result["file"]).is_relative_to(site), result["file"]
    info = result["build_info"]
    assert info["compiled"] and info["backend"] == "compiled", info
    assert info["import_error"] is None
    # Built by the same setup.py in the same environment as the in-place extension.
    assert info["cuda"] == fastattr.build_info()["cuda"], info
    assert result["registered"], "the wheel's extension registered no fastattr ops"
    assert result["checked"] == result["registered"], (
        f"ops without a check here: {sorted(set(result['registered']) - set(result['checked']))}"
    )
