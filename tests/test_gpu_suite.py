"""benchmarks/gpu_suite.sh, as far as a machine without a GPU can check it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_suite.sh"


def test_script_is_valid_bash():
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the behaviour without a GPU")
def test_without_a_gpu_it_fails_clearly_and_says_so_in_its_output_dir(tmp_path):
    out = tmp_path / "results"
    env = dict(os.environ, PYTHON=sys.executable)
    completed = subprocess.run(
        ["bash", str(SCRIPT), str(out)], capture_output=True, text=True, env=env, check=False
    )
    assert completed.returncode == 2, completed.stdout + completed.stderr
    assert "no CUDA GPU is visible" in completed.stdout + completed.stderr
    assert (out / "summary.txt").read_text().strip() == "no GPU"
    assert "no CUDA GPU is visible" in (out / "suite.log").read_text()


# Stands in for the GPU machine's python: says a GPU is there, records every call.
FAKE_PYTHON = r"""#!/usr/bin/env bash
echo "FASTATTR_CUDA=${FASTATTR_CUDA:-} ARCH=${TORCH_CUDA_ARCH_LIST:-} $*" >> "$FAKE_CALLS"
case "$*" in
    *torch.cuda.is_available*) exit 0 ;;
    *get_device_capability*) echo "9.0" ;;
    -) cat > /dev/null; echo "python 3.12 (fake)" ;;
    *"-m pytest"*) exit "${FAKE_PYTEST_STATUS:-0}" ;;
esac
exit 0
"""


@pytest.mark.parametrize("pytest_status", [0, 1])
def test_with_a_gpu_it_builds_tests_and_benchmarks_and_collects_the_statuses(
    tmp_path, pytest_status
):
    fake = tmp_path / "python"
    fake.write_text(FAKE_PYTHON)
    fake.chmod(0o755)
    calls, out = tmp_path / "calls.txt", tmp_path / "results"
    env = {k: v for k, v in os.environ.items() if k != "TORCH_CUDA_ARCH_LIST"}
    env.update(PYTHON=str(fake), FAKE_CALLS=str(calls), FAKE_PYTEST_STATUS=str(pytest_status))
    completed = subprocess.run(
        ["bash", str(SCRIPT), str(out)], capture_output=True, text=True, env=env, check=False
    )
    log = completed.stdout + completed.stderr
    assert completed.returncode == pytest_status, log

    recorded = calls.read_text().splitlines()
    build = next(line for line in recorded if "setup.py build_ext --inplace" in line)
    assert build.startswith("FASTATTR_CUDA=1 ARCH=9.0 ")
    tests = next(line for line in recorded if "-m pytest" in line)
    assert "-k cuda" in tests and f"--junitxml={out}/tests-cuda.xml" in tests
    benches = [line for line in recorded if "-m fastattr bench" in line]
    assert f"--device cuda --no-progress --out {out}" in benches[0]
    assert recorded.index(build) < recorded.index(tests) < recorded.index(benches[0])
    # The studies: each a `fastattr bench` run on the GPU into a directory of its own.
    studies = benches[1:]
    assert len(studies) == 3 and all("--device cuda" in line for line in studies)
    assert "--cases benchmarks/cases/layer_neuron_ig.py" in studies[0]
    case_file = Path(__file__).resolve().parents[1] / "benchmarks/cases/layer_neuron_ig.py"
    assert case_file.is_file()
    assert len({line.split("--out ")[1] for line in studies}) == 3

    summary = (out / "summary.txt").read_text().splitlines()
    assert summary == [
        "build: exit 0",
        "info: exit 0",
        f"tests-cuda: exit {pytest_status}",
        "bench: exit 0",
        "study-layer-neuron: exit 0",
        "study-lrp-large: exit 0",
        "study-ig-memory: exit 0",
    ]
    for written in ("suite.log", "environment.txt", "build.log", "tests-cuda.log", "bench.log"):
        assert (out / written).exists(), written
    if pytest_status:
        assert "failed steps: tests-cuda" in log
