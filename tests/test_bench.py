"""`fastattr bench`: the CLI's quick path on a tiny configuration, its report, and how it
reports a contender running out of memory."""

from __future__ import annotations

import json
import sys

import pytest
import torch

import fastattr
from fastattr.__main__ import main
from fastattr.bench import cases, memory, models, report, runner
from fastattr.bench.cases import METHODS

captum_attr = pytest.importorskip("captum.attr")

AVAILABLE = [method for method in METHODS if hasattr(fastattr, method)]
# One thread: steady on a shared machine, and it exercises --threads.
TINY = ["--quick", "--batch-sizes", "2", "--n-steps", "4", "--repeats", "1", "--warmup", "0"]
TINY += ["--threads", "1"]


def _bench(tmp_path, *extra: str) -> tuple[int, dict]:
    code = main(
        ["bench", "--device", "cpu", *TINY, "--no-progress", "--out", str(tmp_path), *extra]
    )
    return code, json.loads((tmp_path / "bench.json").read_text())


def test_quick_run_reports_every_available_method(tmp_path, capsys):
    # One model per method keeps this fast; memory is measured in its worker process.
    models_arg = "mlp,transformer"
    threads_before = torch.get_num_threads()
    code, result = _bench(tmp_path, "--models", models_arg)
    out = capsys.readouterr().out
    assert code == 0, out
    assert (tmp_path / "bench.png").stat().st_size > 0
    summary = (tmp_path / "bench.md").read_text()

    meta = result["meta"]
    assert meta["device"] == "cpu" and meta["n_steps"] == 4 and meta["batch_sizes"] == [2]
    assert meta["captum_version"] is not None and meta["memory_method"] is not None
    assert meta["torch_threads"] == 1 and torch.get_num_threads() == threads_before
    measured = {r["method"] for r in result["results"]}
    assert measured == set(AVAILABLE)
    for method in set(METHODS) - set(AVAILABLE):
        assert any(method in note for note in result["notes"])

    for entry in result["results"]:
        impls = entry["implementations"]
        assert set(impls) == {"fastattr", "captum", "floor"}
        for name, record in impls.items():
            assert record["status"] == "ok", (entry["case"], name, record)
            assert record["seconds"] > 0
            assert record["examples_per_s"] == pytest.approx(2 / record["seconds"])
            assert record["peak_bytes"] >= 0
        fast = impls["fastattr"]
        assert fast["rel_err_reference"] <= runner.TOLERANCE
        assert fast["rel_err_captum"] <= runner.TOLERANCE
        assert fast["speedup_vs_captum"] == pytest.approx(
            impls["captum"]["seconds"] / fast["seconds"]
        )
        assert fast["time_over_floor"] == pytest.approx(fast["seconds"] / impls["floor"]["seconds"])
        assert entry["case"] in out
        assert f"| `{entry['case']}` | 2 |" in summary


@pytest.mark.skipif("IntegratedGradients" not in AVAILABLE, reason="needs fastattr's IG")
def test_captum_out_of_memory_is_reported_not_raised(tmp_path, monkeypatch, capsys):
    def out_of_memory(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")

    monkeypatch.setattr(captum_attr.IntegratedGradients, "attribute", out_of_memory)
    code, result = _bench(tmp_path, "--methods", "ig", "--models", "mlp", "--no-memory")
    out = capsys.readouterr().out
    assert code == 0
    (entry,) = result["results"]
    impls = entry["implementations"]
    assert impls["captum"] == {"status": "oom"}
    assert impls["fastattr"]["status"] == impls["floor"]["status"] == "ok"
    assert "rel_err_captum" not in impls["fastattr"]
    assert "speedup_vs_captum" not in impls["fastattr"]
    assert any(line.split()[2:4] == ["captum", "OOM"] for line in out.splitlines())


def test_out_of_memory_during_timing_is_recorded():
    calls = []

    def flaky():
        calls.append(None)
        if len(calls) > 1:
            raise MemoryError

    guarded = runner._Guarded(flaky)
    guarded()
    assert guarded.failure is None
    guarded()
    guarded()
    assert guarded.failure == {"status": "oom"} and len(calls) == 2


def test_a_failing_fastattr_fails_the_check():
    failing = {
        "results": [
            {
                "case": "ig-mlp",
                "batch": 1,
                "implementations": {
                    "fastattr": {"status": "ok", "rel_err_reference": 0.0, "rel_err_captum": 0.5}
                },
            },
            {
                "case": "ig-cnn",
                "batch": 1,
                "implementations": {"fastattr": {"status": "error", "message": "boom"}},
            },
        ]
    }
    problems = runner.failed_checks(failing)
    assert len(problems) == 2
    assert "rel_err_captum" in problems[0] and "boom" in problems[1]


def _disagreeing(ours_to_float64: float, captum_to_float64: float) -> list[dict]:
    return [
        {
            "case": "ig-resnet",
            "batch": 512,
            "implementations": {
                "fastattr": {
                    "status": "ok",
                    "rel_err_reference": 0.0,
                    "rel_err_captum": 2e-3,
                    "rel_err_float64": ours_to_float64,
                },
                "captum": {"status": "ok", "rel_err_float64": captum_to_float64},
            },
        }
    ]


def test_float64_decides_when_fastattr_and_captum_disagree():
    # Each as far from float64: rounding the model amplifies, said in a note, not a failure.
    results = _disagreeing(2.9e-3, 2.9e-3)
    assert runner.failed_checks({"results": results}) == []
    (note,) = runner.float32_notes(results)
    assert "ig-resnet batch 512" in note and "float64" in note
    # fastattr further off than captum: a failure.
    results = _disagreeing(3e-2, 2.9e-3)
    (problem,) = runner.failed_checks({"results": results})
    assert "rel_err_captum" in problem
    assert runner.float32_notes(results) == []


@pytest.mark.skipif("IntegratedGradients" not in AVAILABLE, reason="needs fastattr's IG")
def test_a_disagreement_with_captum_is_measured_against_float64(tmp_path, monkeypatch):
    # A tolerance below float32 rounding makes every batch disagree.
    monkeypatch.setattr(runner, "TOLERANCE", 1e-12)
    _, result = _bench(tmp_path, "--methods", "ig", "--models", "cnn", "--no-memory")
    (entry,) = result["results"]
    fast, captum = entry["implementations"]["fastattr"], entry["implementations"]["captum"]
    assert fast["rel_err_captum"] > 1e-12
    # Both float32 results lie within float32 rounding of the float64 one.
    assert 0 < fast["rel_err_float64"] < 1e-5 and 0 < captum["rel_err_float64"] < 1e-5
    flagged = any("rel_err_captum" in p for p in runner.failed_checks(result))
    assert flagged == (fast["rel_err_float64"] > captum["rel_err_float64"] + 1e-12)


def test_relative_error():
    reference = torch.tensor([[1.0, -4.0], [2.0, 0.0]])
    assert runner.relative_error(reference.clone(), reference) == 0.0
    assert runner.relative_error(reference + 0.5, reference) == pytest.approx(0.5 / 4.0)
    assert runner.relative_error((reference,), (reference * 2,)) == pytest.approx(0.5)
    assert runner.relative_error(reference[:1], reference) == float("inf")


def test_bad_arguments_are_refused(capsys):
    assert main(["bench", "--device", "cpu", "--methods", "shap", "--no-progress"]) == 2
    assert "unknown method 'shap'" in capsys.readouterr().err
    for bad in (["--batch-sizes", "0,4"], ["--n-steps", "x"], ["--warmup", "-1"]):
        with pytest.raises(SystemExit):
            main(["bench", *bad])
        assert "expected" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert main(["bench", "--device", "cuda"]) == 2
        assert "no CUDA GPU" in capsys.readouterr().err


def test_selecting_cases():
    assert {c.method for c in cases.select(["lrp", "IntegratedGradients"])} == {
        "LRP",
        "IntegratedGradients",
    }
    assert all(c.model == "cnn" for c in cases.select(None, ["cnn"]))
    quick = cases.select(quick=True)
    assert sorted(c.method for c in quick) == sorted(METHODS)
    with pytest.raises(ValueError, match="unknown model"):
        cases.select(None, ["vit"])


@pytest.mark.parametrize("case", cases.CASES, ids=lambda case: case.name)
def test_floor_gradient_matches_autograd_on_the_same_rows(case):
    """The floor is a real forward+backward: its gradient has the path's shape and is not 0."""
    model = case.make_model()
    inputs, baselines = case.make_batch(2, torch.Generator().manual_seed(0))
    (grad,) = case.floor(model, inputs, baselines, 3)()
    rows = 2 * 3 if case.uses_path else 2
    assert grad.shape[0] == rows and grad.abs().sum() > 0


def test_models_are_deterministic_and_left_in_eval_mode():
    for factory in (models.mlp, models.cnn, models.resnet, models.transformer):
        first, second = factory(), factory()
        assert not first.training
        for a, b in zip(first.state_dict().values(), second.state_dict().values()):
            assert torch.equal(a, b)


def test_table_shows_out_of_memory():
    fake = {
        "results": [
            {
                "case": "ig-cnn",
                "batch": 64,
                "method": "IntegratedGradients",
                "model": "cnn",
                "implementations": {"captum": {"status": "oom"}},
            }
        ]
    }
    (row,) = report.table(fake).splitlines()[2:]
    assert row.split()[:4] == ["ig-cnn", "64", "captum", "OOM"]
    (summary_row,) = report.summary_markdown(fake).splitlines()[2:]
    assert summary_row.startswith("| `ig-cnn` | 64 | - | OOM | - |")


@pytest.mark.skipif(not memory.cpu_measurement_supported(), reason="needs /proc/self/clear_refs")
def test_cpu_peak_counts_what_the_call_touched_and_then_freed():
    size = 64 * 2**20
    peak = memory.peak_bytes(lambda: torch.ones(size // 4).sum(), torch.device("cpu"))
    # Resident memory is the whole process's: pages the allocator hands back to the system
    # during the call (trimming) offset a little of the rise.
    assert size - 2**20 <= peak < size + 16 * 2**20


@pytest.mark.cuda
def test_cuda_peak_counts_what_the_call_allocated_and_then_freed():
    size = 64 * 2**20
    peak = memory.peak_bytes(
        lambda: torch.ones(size // 4, device="cuda").sum(), torch.device("cuda")
    )
    assert size <= peak < size + 2**20


@pytest.mark.skipif("LRP" not in AVAILABLE, reason="needs fastattr's LRP")
def test_running_on_the_reference_kernels_is_said(tmp_path):
    with fastattr.use_backend("reference"):
        code, result = _bench(tmp_path, "--methods", "lrp", "--models", "mlp", "--no-memory")
    assert code == 0
    assert any("reference kernels" in note for note in result["notes"])
    assert result["meta"]["build"]["backend"] == "reference"


@pytest.mark.skipif("IntegratedGradients" not in AVAILABLE, reason="needs fastattr's IG")
def test_without_captum_there_is_no_captum_column(tmp_path, monkeypatch):
    monkeypatch.setattr(
        runner, "_import_captum", lambda: (None, "captum is not installed: no Captum column")
    )
    code, result = _bench(tmp_path, "--methods", "ig", "--models", "mlp", "--no-memory")
    assert code == 0
    assert result["meta"]["captum_version"] is None
    assert "captum is not installed: no Captum column" in result["notes"]
    (entry,) = result["results"]
    assert set(entry["implementations"]) == {"fastattr", "floor"}
    fast = entry["implementations"]["fastattr"]
    assert fast["rel_err_reference"] <= runner.TOLERANCE and "rel_err_captum" not in fast


def test_without_matplotlib_there_is_no_plot_and_it_says_so(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` fail
    fake = {"meta": {}, "results": [{"method": "LRP", "implementations": {}}]}
    assert report.plot(fake, tmp_path / "bench.png") == "matplotlib is not installed: no plot"
    assert not (tmp_path / "bench.png").exists()
