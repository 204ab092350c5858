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
