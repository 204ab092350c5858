"""`fastattr bench`: the CLI's quick path on a tiny configuration, its report, and how it
reports a contender running out of memory."""

from __future__ import annotations

import json
import math
import statistics
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import fastattr
from fastattr.__main__ import main
from fastattr.bench import cases, floors, memory, models, report, runner, timing
from fastattr.bench.cases import METHODS

captum_attr = pytest.importorskip("captum.attr")
ROOT = Path(__file__).resolve().parents[1]

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
        others = {"zennit"} if entry["case"] == "lrp-mlp" else set()
        assert set(impls) == {"fastattr", "captum", "floor", *others}
        # Captum's LayerLRP has no rule for the transformer's embedding, norms or attention.
        captum_runs = entry["case"] != "llrp-transformer"
        if not captum_runs:
            assert impls.pop("captum")["status"] == "error"
        for name, record in impls.items():
            assert record["status"] == "ok", (entry["case"], name, record)
            assert record["seconds"] > 0
            assert record["examples_per_s"] == pytest.approx(2 / record["seconds"])
            assert record["peak_bytes"] >= 0
        fast = impls["fastattr"]
        assert fast["rel_err_reference"] <= runner.TOLERANCE
        if captum_runs:
            assert fast["rel_err_captum"] <= runner.TOLERANCE
        for other in others:
            assert fast[f"rel_err_{other}"] <= runner.TOLERANCE
            assert fast[f"speedup_vs_{other}"] == pytest.approx(
                impls[other]["seconds"] / fast["seconds"]
            )
        if captum_runs:
            assert fast["speedup_vs_captum"] == pytest.approx(
                impls["captum"]["seconds"] / fast["seconds"]
            )
        assert fast["time_over_floor"] == pytest.approx(fast["seconds"] / impls["floor"]["seconds"])
        # One round gives a ratio but no interval.
        assert fast["time_over_floor_interval"] is None
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


def _coverage(n: int, k: int) -> float:
    # Of [ratios[k - 1], ratios[n - k]] (sorted): it misses the median when at most k - 1 of
    # the n ratios fall below it, or at most k - 1 above.
    return 1 - 2 * sum(math.comb(n, i) for i in range(k)) / 2**n


@given(st.lists(st.tuples(st.floats(0.01, 100), st.floats(0.01, 100)), min_size=1, max_size=60))
def test_paired_ratio_is_the_median_ratio_with_the_tightest_interval_of_its_coverage(pairs):
    numerators, denominators = zip(*pairs)
    ratio, interval = timing.paired_ratio(numerators, denominators)
    ratios = sorted(a / b for a, b in pairs)
    n = len(ratios)
    assert ratio == statistics.median(ratios)
    usable = [k for k in range(1, n // 2 + 1) if _coverage(n, k) >= 0.95]
    if not usable:
        assert interval is None and n < 6
        return
    k = max(usable)  # the tightest: one order statistic further in covers too little
    assert interval == (ratios[k - 1], ratios[n - k])
    assert interval[0] <= ratio <= interval[1]


@pytest.mark.parametrize("n", [6, 9, 21, 40])
def test_paired_ratio_interval_covers_the_true_median_as_often_as_it_says(n):
    # Times whose ratio has median 2 (log-normal noise on both): the interval holds 2 in at
    # least 95% of trials, and not in (nearly) all of them, which a needlessly wide one would.
    generator = np.random.default_rng(n)
    trials = 4000
    covered = 0
    for _ in range(trials):
        base = generator.uniform(0.5, 1.5, n)  # the machine's speed, shared by the round
        slow = 2 * base * generator.lognormal(0, 0.1, n)
        fast = base * generator.lognormal(0, 0.1, n)
        _, (low, high) = timing.paired_ratio(slow, fast)
        covered += low <= 2 <= high
    k = max(k for k in range(1, n // 2 + 1) if _coverage(n, k) >= 0.95)
    expected = _coverage(n, k)
    assert abs(covered / trials - expected) < 4 * math.sqrt(expected * (1 - expected) / trials)


def test_paired_ratio_refuses_bad_arguments():
    with pytest.raises(ValueError, match="one numerator per denominator"):
        timing.paired_ratio([], [])
    with pytest.raises(ValueError, match="one numerator per denominator"):
        timing.paired_ratio([1.0, 2.0], [1.0])
    with pytest.raises(ValueError, match="positive"):
        timing.paired_ratio([1.0, 0.0], [1.0, 1.0])
    with pytest.raises(ValueError, match="positive"):
        timing.paired_ratio([1.0, float("nan")], [1.0, 1.0])
    with pytest.raises(ValueError, match="confidence"):
        timing.paired_ratio([1.0], [1.0], confidence=1.0)


def test_tables_show_each_ratio_with_its_interval():
    fast = {
        "status": "ok",
        "examples_per_s": 10.0,
        "speedup_vs_lxt": 1.031,
        "speedup_vs_lxt_interval": (1.012, 1.054),
        "time_over_floor": 0.981,
        "time_over_floor_interval": None,
    }
    fake = {
        "results": [
            {
                "case": "lrp-bert",
                "batch": 4,
                "method": "LRP",
                "model": "bert",
                "implementations": {"fastattr": fast, "lxt": {"status": "ok"}},
            }
        ]
    }
    (row,) = report.summary_markdown(fake).splitlines()[2:]
    assert "| 1.03x [1.01, 1.05] | 0.98 |" in row
    fast["speedup_vs_captum"], fast["speedup_vs_captum_interval"] = 2.0, (1.5, 2.5)
    (row,) = report.table(fake).splitlines()[2:3]
    assert "2.00x [1.50, 2.50]" in row and "0.98" in row


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


CASE_FILE = """
from fastattr.bench import models
from fastattr.bench.cases import Case, features
from fastattr.bench.floors import path_floor


def doubled(model, arguments):
    # fastattr's own attributions, doubled: a contender that disagrees.
    from fastattr import IntegratedGradients

    attributor = IntegratedGradients(model)
    return lambda: 2 * attributor.attribute(**arguments)


CASES = (
    Case("IntegratedGradients", "mlp", models.mlp, features, path_floor,
         call_kwargs={"target": 0}, others={"doubled": doubled}, name="ig-doubled"),
)
"""


@pytest.mark.skipif("IntegratedGradients" not in AVAILABLE, reason="needs fastattr's IG")
def test_a_case_file_runs_with_its_contenders_and_float64_tells_who_is_off(tmp_path):
    case_file = tmp_path / "my_cases.py"
    case_file.write_text(textwrap.dedent(CASE_FILE))
    code, result = _bench(tmp_path, "--cases", str(case_file))
    # fastattr is right; the doubled contender is named as the one off.
    assert code == 0
    assert any("doubled is the further from float64" in note for note in result["notes"])
    assert result["meta"]["cases"] == str(case_file)
    (entry,) = result["results"]
    impls = entry["implementations"]
    assert set(impls) == {"fastattr", "captum", "doubled", "floor"}
    fast = impls["fastattr"]
    assert fast["rel_err_captum"] <= runner.TOLERANCE
    assert fast["rel_err_doubled"] == pytest.approx(0.5)
    # float64 decided: fastattr is right, the doubled contender is not.
    assert fast["rel_err_float64"] < 1e-5 and impls["doubled"]["rel_err_float64"] > 0.9
    # The memory worker, a fresh process, found the case in the file.
    assert all(record["peak_bytes"] >= 0 for record in impls.values())
    summary = (tmp_path / "bench.md").read_text()
    assert "| fastattr vs doubled |" in summary and "| err vs doubled |" in summary


def test_listing_cases(capsys):
    source = ROOT / "benchmarks" / "cases" / "layer_neuron_ig.py"
    assert main(["bench", "--cases", str(source), "--list"]) == 0
    listed = capsys.readouterr().out.splitlines()
    assert listed == [f"{c.name}: {c.method} on {c.model}" for c in cases.load(str(source))]
    assert main(["bench", "--list", "--methods", "lrp"]) == 0
    assert capsys.readouterr().out.splitlines()[0] == "lrp-mlp: LRP on mlp"


def test_bad_case_sources_are_refused(tmp_path, capsys):
    empty = tmp_path / "empty.py"
    empty.write_text("x = 1\n")
    twice = tmp_path / "twice.py"
    twice.write_text(
        "from fastattr.bench.cases import CASES as BUILT_IN\nCASES = BUILT_IN[:1] * 2\n"
    )
    for source, message in (
        (str(empty), "has no CASES"),
        (str(twice), "several cases named ['ig-mlp']"),
        (str(tmp_path / "missing.py"), "no case file"),
        ("fastattr.no_such_module", "cannot import"),
    ):
        assert main(["bench", "--cases", source, "--list"]) == 2
        assert message in capsys.readouterr().err
    with pytest.raises(ValueError, match="add its short name to METHODS"):
        cases.Case("Saliency", "mlp", models.mlp, cases.features, floors.input_floor)


# Every case file of benchmarks/cases, so that a new study's floors and batches are run too.
STUDY_CASES = tuple(
    case
    for path in sorted((ROOT / "benchmarks" / "cases").glob("*.py"))
    for case in cases.load(str(path))
)


def _readme_case_file(tmp_path: Path) -> Path:
    readme = (ROOT / "benchmarks" / "README.md").read_text()
    example = readme.split("```python\n", 1)[1].split("```", 1)[0]
    path = tmp_path / "readme_cases.py"
    path.write_text(example)
    return path


def test_the_readme_example_case_file_works(tmp_path):
    example = cases.load(str(_readme_case_file(tmp_path)))
    assert [case.name for case in example] == ["lig-wide-mlp", "lrp-cnn-zennit"]
    for case in example:
        arguments = runner.batch_arguments(case, 2, 3, torch.device("cpu"))
        contenders = runner.implementations(case, torch.device("cpu"))
        results = {name: prepare(arguments)() for name, prepare in contenders.items()}
        for name in set(results) - {"fastattr", "floor"}:
            assert runner.relative_error(results["fastattr"], results[name]) <= runner.TOLERANCE


@pytest.mark.parametrize("case", cases.CASES + STUDY_CASES, ids=lambda case: case.name)
def test_floor_is_a_forward_and_backward_over_the_same_rows(case):
    """The floor's gradient has the path's rows (n_steps * batch, times the noisy copies of a
    NoiseTunnel) and is not 0."""
    model = case.make_model()
    arguments = runner.batch_arguments(case, 2, 3, torch.device("cpu"))
    (grad,) = case.floor(model, arguments)()
    rows = 2 * 3 * case.call_kwargs.get("nt_samples", 1) if case.uses_path else 2
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
    # In a process of its own, as the harness measures: in this one, memory that other tests'
    # threads free meanwhile would offset the rise.
    size = 64 * 2**20
    code = (
        "import torch; from fastattr.bench import memory; "
        f"print(memory.peak_bytes(lambda: torch.ones({size // 4}).sum(), torch.device('cpu')))"
    )
    completed = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    peak = int(completed.stdout.split()[-1])
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
