"""attribute_dataset, open_store and `fastattr attribute`: results against attribute() on the
same rows, every target and item form, the methods through the pipeline, 2 gloo processes,
SIGKILL-and-resume to a bit-identical store, failures on one rank reaching the others, bad
input and write failures leaving the store valid."""

from __future__ import annotations

import errno
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

zarr = pytest.importorskip("zarr", minversion="3")

import data_jobs  # noqa: E402 (pytest puts tests/ on sys.path)

import fastattr  # noqa: E402
import fastattr._path_integral  # noqa: E402
from fastattr.__main__ import main as cli  # noqa: E402
from fastattr.data import JobFailed, StoreWriteError, labeled, open_store  # noqa: E402
from fastattr.data import _distributed as distributed  # noqa: E402
from fastattr.data import _job as job  # noqa: E402
from fastattr.data import _pipeline as pipeline  # noqa: E402
from fastattr.data import _store as store  # noqa: E402

TESTS = Path(__file__).parent
ROOT = TESTS.parent
ARRAYS = ("attributions/0", "delta", "target", "complete")
SUBPROCESS_TIMEOUT = 240


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One torch thread here and in the processes launched: steady on a shared machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> fastattr.AttributionStore:
    """The test job, run without interruption in this process."""
    return data_jobs.run(str(tmp_path_factory.mktemp("reference") / "store"))


def assert_same_store(got: fastattr.AttributionStore, want: fastattr.AttributionStore) -> None:
    """Bit for bit: every array's bytes."""
    for name in ARRAYS:
        assert got.group[name][:].tobytes() == want.group[name][:].tobytes(), name


def files_of(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in path.rglob("*") if p.is_file()}


def small_mlp() -> nn.Module:
    torch.manual_seed(3)
    return nn.Sequential(nn.Linear(6, 12), nn.Tanh(), nn.Linear(12, 4)).eval()


def small_data(length: int = 12) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(5)
    features = torch.randn(length, 6, generator=generator)
    return features, torch.randint(0, 4, (length,), generator=generator)


# --- results against attribute() ------------------------------------------------------------


def test_rows_equal_attribute_on_the_same_rows(reference):
    features, labels = data_jobs.inputs_and_labels()
    ig = fastattr.IntegratedGradients(data_jobs.model())
    internal = reference.metadata["internal_batch_size"]
    assert internal is not None and internal > data_jobs.JOB["batch_size"]
    assert reference.is_complete and len(reference) == data_jobs.LENGTH
    for start in range(0, data_jobs.LENGTH, data_jobs.JOB["batch_size"]):
        rows = slice(start, start + data_jobs.JOB["batch_size"])
        kwargs = {"target": labels[rows], "n_steps": 16, "return_convergence_delta": True}
        # With the job's fixed chunking: the same bits.
        want, delta = ig.attribute(features[rows], internal_batch_size=internal, **kwargs)
        assert torch.equal(reference.attributions.tensor(rows), want)
        assert torch.equal(reference.delta.tensor(rows), delta)
        # With attribute()'s own chunking: equal to float rounding.
        loose, _ = fastattr.IntegratedGradients(data_jobs.model()).attribute(
            features[rows], **kwargs
        )
        torch.testing.assert_close(reference.attributions.tensor(rows), loose)
    assert np.array_equal(reference.target[:], labels.numpy())
    meta = reference.metadata
    assert meta["job"]["method"] == "fastattr.IntegratedGradients"
    assert meta["job"]["arguments"]["n_steps"] == 16
    assert meta["job"]["dataset"]["length"] == data_jobs.LENGTH
    assert meta["job"]["model"]["class"] == job.qualified_name(data_jobs.model())
    assert meta["versions"]["torch"] == torch.__version__
    assert meta["versions"]["fastattr"] == fastattr.__version__


def test_model_and_random_state_are_left_as_found(tmp_path):
    model = small_mlp()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    features, _ = small_data()
    data = torch.utils.data.TensorDataset(features)
    fastattr.attribute_dataset(
        fastattr.IntegratedGradients(model), data, tmp_path / "s", target=1, progress=False
    )
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())
    assert "forward" not in vars(model[0])


def _predicted(features, model):
    return model(features).argmax(1)


@pytest.mark.parametrize("target", [None, 2, (1,), "label", "predicted", "callable"])
def test_every_target_form(tmp_path, target):
    model = small_mlp()
    features, labels = small_data()
    forward = (lambda x: model(x)[:, 3]) if target is None else model
    data = labeled(torch.utils.data.TensorDataset(features, labels))
    by_example = {
        "label": labels,
        "predicted": _predicted(features, model),
        "callable": (features.sum(1) > 0).long(),
    }
    expected = by_example.get(target, target)
    spec = (lambda batch: (batch[0].sum(1) > 0).long()) if target == "callable" else target
    ig = fastattr.IntegratedGradients(forward)
    got = fastattr.attribute_dataset(
        ig, data, tmp_path / "s", target=spec, batch_size=5, n_steps=8, progress=False
    )
    want = ig.attribute(features, target=expected, n_steps=8)
    torch.testing.assert_close(got.attributions.tensor(slice(None)), want)
    if target is None:
        assert got.target is None
    elif target in by_example:
        assert torch.equal(got.target.tensor(slice(None)), expected)
    else:  # the same index for every example: one row (or one tuple) each
        rows = torch.tensor([expected] * len(features))
        assert torch.equal(got.target.tensor(slice(None)), rows)
    if target == "predicted":
        torch.testing.assert_close(got.output.tensor(slice(None)), model(features).detach())
    else:
        assert got.output is None


def test_tuple_inputs(tmp_path):
    class TwoInputs(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.linear = nn.Linear(6 + 12, 3)

        def forward(self, a, b):
            return self.linear(torch.cat([a, b.flatten(1)], 1))

    model = TwoInputs().eval()
    a, b = torch.randn(10, 6), torch.randn(10, 3, 4)
    ig = fastattr.IntegratedGradients(model)
    got = fastattr.attribute_dataset(
        ig, torch.utils.data.TensorDataset(a, b), tmp_path / "s", target=1, batch_size=4,
        progress=False,
    )  # fmt: skip
    want = ig.attribute((a, b), target=1)
    row = got.attributions[7]
    assert isinstance(row, tuple) and row[0].shape == (6,) and row[1].shape == (3, 4)
    first, second = got.attributions.tensor(slice(None))
    torch.testing.assert_close(first, want[0])
    torch.testing.assert_close(second, want[1])
    assert got.metadata["job"]["dataset"]["items"]["tuple"] is True


class TwoBranches(nn.Module):
    """Two layers that both read the input: a list of layers for LayerIntegratedGradients."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc1 = nn.Linear(data_jobs.FEATURES, 16)
        self.fc2 = nn.Linear(data_jobs.FEATURES, 16)
        self.head = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.fc1(x)) * torch.sigmoid(self.fc2(x)))


def test_layer_and_neuron_integrated_gradients(tmp_path):
    model = data_jobs.model()
    features, labels = data_jobs.inputs_and_labels()
    data = labeled(torch.utils.data.TensorDataset(features, labels))
    # Several layers: a list of results per example.
    branches = TwoBranches()
    lig = fastattr.LayerIntegratedGradients(branches, [branches.fc1, branches.fc2])
    got = fastattr.attribute_dataset(
        lig, data, tmp_path / "lig", target="label", batch_size=8, n_steps=8, progress=False
    )
    want = lig.attribute(features, target=labels, n_steps=8)
    stored = got.attributions.tensor(slice(None))
    assert isinstance(stored, list) and len(stored) == 2
    for s, w in zip(stored, want):
        torch.testing.assert_close(s, w)
    assert got.metadata["job"]["attribution"]["classes"][0]["layer"] == [
        {"module": "fc1"},
        {"module": "fc2"},
    ]
    nig = fastattr.NeuronIntegratedGradients(model, model.fc2)
    got = fastattr.attribute_dataset(
        nig, data, tmp_path / "nig", batch_size=8, n_steps=8, neuron_selector=5, progress=False
    )
    torch.testing.assert_close(
        got.attributions.tensor(slice(None)), nig.attribute(features, 5, n_steps=8)
    )
    with pytest.raises(ValueError, match="target must be None"):
        fastattr.attribute_dataset(nig, data, tmp_path / "x", target="label", neuron_selector=5)


def test_token_ids_through_layer_integrated_gradients(tmp_path):
    from fastattr.bench import models

    model = models.transformer()
    tokens = torch.randint(1, models.VOCAB_SIZE, (6, models.SEQUENCE_LENGTH))
    lig = fastattr.LayerIntegratedGradients(model, model.embedding)
    pad = torch.zeros(1, models.SEQUENCE_LENGTH, dtype=torch.long)
    got = fastattr.attribute_dataset(
        lig, torch.utils.data.TensorDataset(tokens), tmp_path / "s", target=1, batch_size=3,
        baselines=pad, n_steps=4, progress=False,
    )  # fmt: skip
    want = lig.attribute(tokens, baselines=pad, target=1, n_steps=4)
    torch.testing.assert_close(got.attributions.tensor(slice(None)), want)


def test_lrp_through_the_pipeline(tmp_path):
    model = data_jobs.model()
    features, labels = data_jobs.inputs_and_labels()
    data = labeled(torch.utils.data.TensorDataset(features, labels))
    lrp = fastattr.LRP(model)
    got = fastattr.attribute_dataset(
        lrp, data, tmp_path / "lrp", target="label", batch_size=8,
        return_convergence_delta=True, progress=False,
    )  # fmt: skip
    want, delta = lrp.attribute(features, target=labels, return_convergence_delta=True)
    torch.testing.assert_close(got.attributions.tensor(slice(None)), want)
    torch.testing.assert_close(got.delta.tensor(slice(None)), delta)
    assert got.metadata["internal_batch_size"] is None
    layer = fastattr.LayerLRP(model, model.fc2)
    got = fastattr.attribute_dataset(
        layer, data, tmp_path / "layer", target=3, batch_size=8, progress=False
    )
    torch.testing.assert_close(
        got.attributions.tensor(slice(None)), layer.attribute(features, target=3)
    )


def test_a_canonizer_with_other_settings_is_another_job(tmp_path):
    # A canonizer's settings live in the rules it holds (private attributes): they must tell
    # jobs apart, or a resume would mix relevance of two epsilons in one store.
    from fastattr.canonizers import EpsilonPlusFlat, EpsilonSum

    model = data_jobs.model()
    out = tmp_path / "lrp"

    def run(*canonizers):
        lrp = fastattr.LRP(model, canonizers=list(canonizers))
        return fastattr.attribute_dataset(
            lrp, data_jobs.dataset(), out, target="label", batch_size=8, progress=False
        )

    run(EpsilonSum(0.1), EpsilonPlusFlat())
    before = files_of(out)
    with pytest.raises(ValueError, match=r"epsilon: 0\.1 in the store, 0\.2 here"):
        run(EpsilonSum(0.2), EpsilonPlusFlat())
    with pytest.raises(ValueError, match=r"epsilon: 1e-06 in the store, 0\.5 here"):
        run(EpsilonSum(0.1), EpsilonPlusFlat(epsilon=0.5))
    assert files_of(out) == before
    assert run(EpsilonSum(0.1), EpsilonPlusFlat()).is_complete


def _noise_tunnels() -> list:
    """captum's NoiseTunnel around fastattr's IG, and fastattr's own."""
    from captum.attr import NoiseTunnel

    return [NoiseTunnel, fastattr.NoiseTunnel]


@pytest.mark.parametrize("NoiseTunnel", _noise_tunnels(), ids=lambda c: c.__module__.split(".")[0])
def test_noise_tunnel_through_the_pipeline(tmp_path, NoiseTunnel):
    model = data_jobs.model()
    features, labels = data_jobs.inputs_and_labels()
    data = labeled(torch.utils.data.TensorDataset(features, labels))
    nt = NoiseTunnel(fastattr.IntegratedGradients(model))
    kwargs = {"nt_samples": 5, "nt_samples_batch_size": 2, "stdevs": 0.1, "n_steps": 8}
    got = fastattr.attribute_dataset(
        nt, data, tmp_path / "s", target="label", batch_size=3, progress=False,
        return_convergence_delta=True, **kwargs,
    )  # fmt: skip
    internal = got.metadata["internal_batch_size"]
    assert internal is not None
    assert got.delta[:].shape == (data_jobs.LENGTH, 5)
    for first in range(0, data_jobs.LENGTH, 3):
        rows = slice(first, first + 3)
        # Each batch draws its noise from generators seeded with its first index.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(first)
            want, deltas = nt.attribute(
                features[rows], target=labels[rows], internal_batch_size=internal,
                return_convergence_delta=True, **kwargs,
            )  # fmt: skip
        assert torch.equal(got.attributions.tensor(rows), want)
        # captum's deltas: partitions of 2, 2 and 1 copies, each example's copies together.
        for example in range(3):
            copies = [2 * example, 2 * example + 1, 6 + 2 * example, 7 + 2 * example, 12 + example]
            assert torch.equal(got.delta.tensor(first + example), deltas[copies])


@pytest.mark.parametrize("with_delta", [False, True])
def test_adaptive_steps_through_the_pipeline(tmp_path, with_delta):
    """n_steps='auto' (its tolerance and max_steps) and return_n_steps: the points each example
    took are stored as the extra 'n_steps', equal to attribute()'s on the same rows."""
    model = data_jobs.model()
    features, labels = data_jobs.inputs_and_labels()
    data = labeled(torch.utils.data.TensorDataset(features, labels))
    ig = fastattr.IntegratedGradients(model)
    kwargs = {"n_steps": "auto", "tolerance": 1e-4, "max_steps": 64, "return_n_steps": True}
    got = fastattr.attribute_dataset(
        ig, data, tmp_path / "s", target="label", batch_size=8, progress=False,
        return_convergence_delta=with_delta, **kwargs,
    )  # fmt: skip
    want = ig.attribute(features, target=labels, return_convergence_delta=with_delta, **kwargs)
    torch.testing.assert_close(got.attributions.tensor(slice(None)), want[0])
    assert torch.equal(got.extras["n_steps"].tensor(slice(None)), want[-1])
    assert int(want[-1].min()) < int(want[-1].max())  # the examples took different points
    if with_delta:
        torch.testing.assert_close(got.delta.tensor(slice(None)), want[1])


def test_a_dataloader_brings_its_batch_size_workers_and_collate(tmp_path, reference):
    def stack_with_labels(items):
        return torch.stack([f for f, _ in items]), torch.stack([label for _, label in items])

    loader = torch.utils.data.DataLoader(
        data_jobs.dataset(), batch_size=2, num_workers=2, collate_fn=stack_with_labels
    )
    got = data_jobs.run(str(tmp_path / "s"), loader, batch_size=None)
    assert got.metadata["job"]["batch_size"] == 2
    assert_same_store(got, reference)

    def drop_one(items):
        features, labels = stack_with_labels(items)
        return features[1:], labels[1:]

    loader = torch.utils.data.DataLoader(data_jobs.dataset(), batch_size=4, collate_fn=drop_one)
    with pytest.raises(ValueError, match=r"dataset items 0\.\.3 from collate_fn"):
        data_jobs.run(str(tmp_path / "t"), loader, batch_size=None)


# --- resumption -----------------------------------------------------------------------------


def _env(rank: int = 0, world: int = 1, port: int = 0) -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(TESTS)])}
    env["OMP_NUM_THREADS"] = "1"
    if world > 1:
        env.update(
            MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), GLOO_SOCKET_IFNAME="lo",
            WORLD_SIZE=str(world), RANK=str(rank), LOCAL_RANK=str(rank),
            LOCAL_WORLD_SIZE=str(world),
        )  # fmt: skip
    return env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(out: Path, world: int, *args: str) -> list[subprocess.Popen]:
    port = _free_port()
    return [
        subprocess.Popen(
            [sys.executable, str(TESTS / "data_jobs.py"), str(out), *args],
            env=_env(rank, world, port),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for rank in range(world)
    ]


def _outputs(processes: list[subprocess.Popen]) -> list[tuple[int, str]]:
    return [(p.wait(SUBPROCESS_TIMEOUT), p.stdout.read()) for p in processes]


def test_killed_and_resumed_single_process_is_bit_identical(tmp_path, reference, monkeypatch):
    out = tmp_path / "s"
    ((code, log),) = _outputs(_launch(out, 1, "--kill-unit", "5", "--kill-stage", "data"))
    assert code == -signal.SIGKILL, log
    partial = open_store(out)
    # Unit 5's rows were written but it was not marked complete: it reads as not done.
    assert partial.complete.tolist() == [True] * 10 + [False] * 14
    assert not np.isnan(partial.attributions[10]).any()
    assert np.isnan(partial.attributions[12]).all() and partial.target[12] == -1
    # A resumed run in another process sees other free memory; the job's chunking is fixed.
    monkeypatch.setattr(fastattr._path_integral, "chunk_budget", lambda device: 40_000)
    monkeypatch.setattr(pipeline, "chunk_budget", lambda device: 40_000)
    resumed = data_jobs.run(str(out))
    assert resumed.metadata["runs"][-1]["examples"] == 14  # only what was not complete
    assert_same_store(resumed, reference)


def test_a_creation_cut_short_is_redone(tmp_path, reference, monkeypatch):
    out = tmp_path / "s"
    group_type = store.import_zarr().Group
    create_array = group_type.create_array

    class CutShort(Exception):
        pass

    def cut_after_the_first(group, *args, **kwargs):
        if any(True for _ in group.array_keys()):
            raise CutShort
        return create_array(group, *args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(group_type, "create_array", cut_after_the_first)
        with pytest.raises(CutShort):
            data_jobs.run(str(out))
    with pytest.raises(FileNotFoundError, match="being created, or its creation was cut short"):
        open_store(out)
    assert_same_store(data_jobs.run(str(out)), reference)


def test_two_gloo_processes_killed_and_resumed_match_one_process(tmp_path, reference):
    out = tmp_path / "s"
    processes = _launch(out, 2, "--kill-rank", "1", "--kill-unit", "5", "--kill-stage", "complete")
    assert processes[1].wait(SUBPROCESS_TIMEOUT) == -signal.SIGKILL
    # As torchrun does when a worker dies: stop the others.
    processes[0].kill()
    processes[0].wait(SUBPROCESS_TIMEOUT)
    done_before = int(open_store(out).complete.sum())
    assert 0 < done_before < data_jobs.LENGTH
    # Resumed by two processes again, then compared with the single-process store.
    outcomes = _outputs(_launch(out, 2))
    assert all(code == 0 and "DONE" in log for code, log in outcomes), outcomes
    resumed = open_store(out)
    assert resumed.metadata["runs"][-1]["processes"] == 2
    assert resumed.metadata["runs"][-1]["examples"] == data_jobs.LENGTH - done_before
    assert_same_store(resumed, reference)


def test_a_rank_running_another_job_stops_every_rank(tmp_path):
    (code0, log0), (code1, log1) = _outputs(_launch(tmp_path / "a", 2, "--other-weights-rank", "1"))
    assert code0 == code1 == 3, (log0, log1)
    assert "ERROR ValueError: rank 1 runs another job than rank 0" in log1
    assert "model.sha256" in log1
    assert "ERROR JobFailed: rank 1 failed" in log0


def test_a_rank_given_its_own_shard_stops_every_rank(tmp_path):
    # The same length and item format: told apart by the fingerprints of a few items.
    (code0, log0), (code1, log1) = _outputs(_launch(tmp_path / "a", 2, "--other-data-rank", "1"))
    assert code0 == code1 == 3, (log0, log1)
    assert "ERROR ValueError: rank 1 runs another job than rank 0" in log1
    theirs, ours = (
        job.item_fingerprints(d) for d in (data_jobs.dataset(), data_jobs.other_shard())
    )
    for index in ("0", "12", "23"):
        assert (
            f"dataset.fingerprints.{index}: {theirs[index]!r} on rank 0, {ours[index]!r} here"
            in log1
        )
    assert "ERROR JobFailed: rank 1 failed" in log0


def test_a_failing_rank_stops_every_rank_with_its_error(tmp_path):
    # Item 7 is in unit 3, which rank 1 computes.
    started = time.monotonic()
    (code0, log0), (code1, log1) = _outputs(_launch(tmp_path / "a", 2, "--bad-item", "7"))
    assert code0 == code1 == 3, (log0, log1)
    assert "ERROR ValueError: dataset item 7 has inputs of shape [63]" in log1
    assert "ERROR JobFailed: rank 1 failed: ValueError: dataset item 7" in log0
    # Rank 0 failing while it prepares the job (item 0 sets the format, item 1 breaks it).
    (code0, log0), (code1, log1) = _outputs(_launch(tmp_path / "b", 2, "--bad-item", "0"))
    assert code0 == code1 == 3, (log0, log1)
    assert "ERROR ValueError: dataset item 1" in log0
    assert "ERROR JobFailed: rank 0 failed while preparing the job: ValueError" in log1
    assert time.monotonic() - started < SUBPROCESS_TIMEOUT


# --- the command line -------------------------------------------------------------------------


def _cli_args(out: Path, *extra: str) -> list[str]:
    return [
        "attribute", "--model", "data_jobs:model", "--data", "data_jobs:dataset",
        "--out", str(out), "--batch-size", "2", *extra,
    ]  # fmt: skip


def test_cli_runs_the_same_job_as_the_python_api(tmp_path, reference, monkeypatch, capsys):
    monkeypatch.chdir(TESTS)
    ig_args = ["--method", "ig", "--target", "label", "--n-steps", "16", "--delta"]
    assert cli(_cli_args(tmp_path / "ig", *ig_args)) == 0
    captured = capsys.readouterr()
    assert "24 examples attributed" in captured.out and "examples/s" in captured.out
    assert str(tmp_path / "ig") in captured.out
    assert "24/24" in captured.err  # the progress bar
    assert_same_store(open_store(tmp_path / "ig"), reference)
    # The same command resumes the Python API's store: nothing left to do.
    assert cli(_cli_args(Path(reference.path), *ig_args, "--no-progress")) == 0
    assert "0 examples attributed" in capsys.readouterr().out

    assert cli(_cli_args(tmp_path / "nig", "--method", "nig", "--layer", "fc1", "--neuron", "3",
                         "--n-steps", "4", "--no-progress")) == 0  # fmt: skip
    assert cli(_cli_args(tmp_path / "lrp", "--method", "lrp", "--target", "predicted",
                         "--no-progress")) == 0  # fmt: skip
    lrp = open_store(tmp_path / "lrp")
    features, _ = data_jobs.inputs_and_labels()
    assert np.array_equal(lrp.target[:], data_jobs.model()(features).argmax(1).numpy())
    assert cli(_cli_args(tmp_path / "lig", "--method", "lig", "--layer", "fc2", "--target", "2",
                         "--workers", "0",
                         "--arg", 'method="riemann_trapezoid"', "--no-progress")) == 0  # fmt: skip
    lig = open_store(tmp_path / "lig")
    assert lig.metadata["job"]["arguments"]["method"] == "riemann_trapezoid"
    assert lig.attributions[0].shape == (256,)

    assert cli(_cli_args(tmp_path / "bad", "--method", "nig", "--layer", "fc1")) == 1
    assert "--method nig needs --neuron" in capsys.readouterr().err
    assert cli(_cli_args(tmp_path / "bad", "--method", "lig", "--layer", "nope")) == 1
    assert "'nope' is not in the model" in capsys.readouterr().err
    assert cli(_cli_args(tmp_path / "ig", "--method", "ig", "--n-steps", "4")) == 1
    assert "arguments.n_steps: 16 in the store, 4 here" in capsys.readouterr().err
    # Options the method does not take, or given twice, are refused rather than ignored.
    for options, message in (
        (("--method", "ig", "--layer", "fc1"), "--layer is for lig, nig and lrp"),
        (("--method", "lig", "--layer", "fc1", "--neuron", "3"), "--neuron is for --method nig"),
        (("--method", "ig", "--n-steps", "4", "--arg", "n_steps=8"), "n_steps given twice"),
    ):
        assert cli(_cli_args(tmp_path / "bad", *options)) == 1
        assert message in capsys.readouterr().err


def test_cli_under_torchrun(tmp_path, reference):
    out = tmp_path / "s"
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", "2",
        "--master-addr", "127.0.0.1", "--master-port", str(_free_port()),
        "-m", "fastattr", *_cli_args(out, "--method", "ig", "--target", "label",
                                     "--n-steps", "16", "--delta", "--no-progress"),
    ]  # fmt: skip
    env = {**_env(), "GLOO_SOCKET_IFNAME": "lo"}
    completed = subprocess.run(
        command, cwd=TESTS, env=env, capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT
    )
    assert completed.returncode == 0, completed.stdout + completed.stderr
    assert "2 processes on cpu" in completed.stdout
    assert open_store(out).metadata["runs"][-1]["processes"] == 2
    assert_same_store(open_store(out), reference)


# --- bad input ------------------------------------------------------------------------------


def test_a_different_job_is_refused_and_left_intact(tmp_path):
    out = tmp_path / "s"
    data_jobs.run(str(out))
    before = files_of(out)
    with pytest.raises(ValueError, match=r"arguments\.n_steps: 16 in the store, 8 here"):
        data_jobs.run(str(out), n_steps=8)
    with pytest.raises(ValueError, match=r"method: 'fastattr\.IntegratedGradients' in the store"):
        fastattr.attribute_dataset(
            fastattr.LRP(data_jobs.model()), data_jobs.dataset(), out, target="label",
            batch_size=2, return_convergence_delta=True, progress=False,
        )  # fmt: skip
    # More differences than a message lists: the rest are counted.
    lrp = fastattr.LRP(data_jobs.model())
    with pytest.raises(ValueError) as refused:
        fastattr.attribute_dataset(lrp, data_jobs.dataset(), out, target=1, progress=False)
    lrp_job = pipeline._Job(lrp, data_jobs.dataset(), None, 1, 32, {}, torch.device("cpu"))
    items = pipeline.ItemFormat.of(lrp_job.dataset, lrp_job.dataset[0])
    found = job.differences(open_store(out).metadata["job"], lrp_job.identity(items))
    assert len(found) > job.LISTED_DIFFERENCES
    lines = str(refused.value).splitlines()[1:-1]
    assert lines == [f"  {line}" for line in found[: job.LISTED_DIFFERENCES]] + [
        f"  ... and {len(found) - job.LISTED_DIFFERENCES} more"
    ]
    shorter = labeled(torch.utils.data.Subset(data_jobs.dataset(), range(20)))
    with pytest.raises(ValueError, match=r"dataset\.length: 24 in the store, 20 here"):
        data_jobs.run(str(out), shorter)
    # Another dataset of the same length and item format (another shard), or one whose middle
    # item alone differs.
    with pytest.raises(ValueError, match=r"dataset\.fingerprints\.0: '[0-9a-f]{64}' in the store"):
        data_jobs.run(str(out), data_jobs.other_shard())
    features, labels = data_jobs.inputs_and_labels()
    features[12, 5] += 1
    middle = labeled(torch.utils.data.TensorDataset(features, labels))
    only_item_12 = r"job:\n  dataset\.fingerprints\.12: \S+ in the store, \S+ here\nPass"
    with pytest.raises(ValueError, match=only_item_12):
        data_jobs.run(str(out), middle)
    retrained = data_jobs.model()
    with torch.no_grad():
        retrained.fc3.bias += 1
    with pytest.raises(ValueError, match=r"model\.sha256"):
        fastattr.attribute_dataset(
            fastattr.IntegratedGradients(retrained), data_jobs.dataset(), out, progress=False,
            **data_jobs.JOB,
        )  # fmt: skip
    with pytest.raises(ValueError, match=r"batch_size: 2 in the store, 3 here"):
        data_jobs.run(str(out), batch_size=3)
    assert files_of(out) == before
    # An explicit start-over replaces it.
    replaced = data_jobs.run(str(out), n_steps=8, resume=False)
    assert replaced.metadata["job"]["arguments"]["n_steps"] == 8 and replaced.is_complete


def test_a_format_1_store_resumes_redoing_units_without_chunk_files(tmp_path, reference):
    """A store of the previous format: no item fingerprints, and no file for a chunk equal to
    the fill value, so a missing chunk file is no sign of damage there."""
    out = tmp_path / "s"
    shutil.copytree(reference.path, out)
    group = zarr.open_group(out, mode="r+")
    metadata = group.attrs["fastattr"]
    fingerprints = metadata["job"]["dataset"].pop("fingerprints")
    metadata["format"] = 1
    group.attrs["fastattr"] = metadata
    # Unit 3 (examples 6 and 7) as format 1 stored attributions that were all NaN.
    for key in store.chunk_keys(group["attributions/0"], 6, 8):
        (out / key).unlink()
    old = open_store(out)
    assert old.missing == {} and old.is_complete
    assert np.isnan(old.attributions[6:8]).all()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing to say: its chunks are written now
        resumed = data_jobs.run(str(out))
    assert resumed.metadata["runs"][-1]["examples"] == 2
    assert resumed.metadata["format"] == store.FORMAT_VERSION == 2
    assert resumed.metadata["job"]["dataset"]["fingerprints"] == fingerprints
    assert_same_store(resumed, reference)
    with pytest.raises(ValueError, match=r"dataset\.fingerprints\.0: "):
        data_jobs.run(str(out), data_jobs.other_shard())


def test_a_chunk_file_deleted_from_a_complete_store_is_named_and_redone(
    tmp_path, reference, monkeypatch
):
    out = tmp_path / "s"
    shutil.copytree(reference.path, out)
    group = zarr.open_group(out, mode="r")
    # Unit 5 (examples 10 and 11) of the attributions and targets, unit 2 (4 and 5) of the
    # deltas.
    for name, rows in (("attributions/0", (10, 12)), ("target", (10, 12)), ("delta", (4, 6))):
        for key in store.chunk_keys(group[name], *rows):
            (out / key).unlink()
    # Found from a listing of the store's keys: opening it reads no chunk of results.
    get, read = zarr.storage.LocalStore.get, []

    async def noting_get(self, key, *args, **kwargs):
        read.append(key)
        return await get(self, key, *args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(zarr.storage.LocalStore, "get", noting_get)
        damaged = open_store(out)
    assert not [key for key in read if "/c/" in key and not key.startswith("complete/")]
    assert damaged.missing == {
        "attributions/0": [(10, 12)],
        "delta": [(4, 6)],
        "target": [(10, 12)],
    }
    assert (
        damaged.complete.tolist()
        == [True] * 4 + [False] * 2 + [True] * 4 + [False] * 2 + [True] * 12
    )
    assert not damaged.is_complete
    assert "20/24 examples complete, 4 marked complete but missing from the store" in repr(damaged)
    missing = r"examples 10\.\.11 of attributions/0 are marked complete, but their chunk files"
    for index in (slice(None), 11, -13, [3, 10], slice(1, 24, 5)):
        with pytest.raises(FileNotFoundError, match=missing):
            damaged.attributions[index]
    with pytest.raises(FileNotFoundError, match=r"examples 4\.\.5 of delta .*run the same job"):
        damaged.as_dataset()[5]
    # The other rows read as they were written.
    assert damaged.attributions[:10].tobytes() == reference.attributions[:10].tobytes()
    assert (
        damaged.attributions[[0, 12, 23]].tobytes() == reference.attributions[[0, 12, 23]].tobytes()
    )
    assert damaged.delta[6:].tobytes() == reference.delta[6:].tobytes()
    # Run again, the job computes them again, and says why.
    lacking = (
        r"examples 4\.\.5, 10\.\.11 marked complete but chunk files of "
        r"attributions/0, delta, target missing \(deleted, or not copied\?\)"
    )
    with pytest.warns(UserWarning, match=lacking):
        resumed = data_jobs.run(str(out))
    assert resumed.metadata["runs"][-1]["examples"] == 4
    assert_same_store(resumed, reference)
    assert resumed.missing == {} and damaged.missing == {} and damaged.is_complete
    assert damaged.attributions[10:12].tobytes() == reference.attributions[10:12].tobytes()


def test_chunks_equal_to_the_fill_value_are_written(tmp_path):
    """Attributions that are all NaN (the fill value): every chunk has its file all the same,
    so a complete store misses none and nothing is redone."""
    model = small_mlp()
    with torch.no_grad():
        model[2].weight[1, 0] = float("nan")
    features, _ = small_data()
    data = torch.utils.data.TensorDataset(features)
    ig = fastattr.IntegratedGradients(model)
    kwargs = {"target": 1, "batch_size": 4, "n_steps": 4, "progress": False}
    written = fastattr.attribute_dataset(ig, data, tmp_path / "s", **kwargs)
    assert np.isnan(written.attributions[:]).all()
    for array in written.group.array_values():
        assert array.nchunks_initialized == array.nchunks, array.path
    assert written.missing == {} and written.is_complete
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        again = fastattr.attribute_dataset(ig, data, tmp_path / "s", **kwargs)
    assert again.metadata["runs"][-1]["examples"] == 0


def test_out_holding_something_else_is_refused(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    for resume in (True, False):
        with pytest.raises(FileExistsError, match="other than a fastattr store"):
            data_jobs.run(str(tmp_path), resume=resume)
    assert (tmp_path / "notes.txt").read_text() == "mine"
    with pytest.raises(FileNotFoundError):
        open_store(tmp_path / "missing")


@pytest.mark.parametrize("workers", [0, 1])
def test_an_item_of_the_wrong_shape_is_named(tmp_path, workers):
    loader = torch.utils.data.DataLoader(data_jobs.BadItem(13), num_workers=workers)
    with pytest.raises(ValueError, match=r"dataset item 13 has inputs of shape \[63\] float32"):
        data_jobs.run(str(tmp_path / "s"), loader)
    # The rows before it are stored and marked complete.
    assert open_store(tmp_path / "s").complete[:12].all()


class IntegerItem(data_jobs.BadItem):
    """Item ``bad`` in int64 among float32 items: stacked with them it would pass as float32."""

    def __getitem__(self, index: int):
        features, label = super().__getitem__(index)
        return (self.features[index].long() if index == self.bad else features), label


def test_an_item_of_another_dtype_is_named_though_stacking_would_promote_it(tmp_path):
    with pytest.raises(ValueError, match=r"dataset item 13 has inputs of shape \[64\] int64"):
        data_jobs.run(str(tmp_path / "s"), IntegerItem(13))


def test_bad_arguments_are_refused_before_any_work(tmp_path, monkeypatch):
    ig = fastattr.IntegratedGradients(small_mlp())
    features, labels = small_data()
    plain = torch.utils.data.TensorDataset(features)
    out = tmp_path / "s"
    cases = [
        ({"target": "label"}, ValueError, "target='label' needs items of the form"),
        ({"target": "biggest"}, ValueError, "got 'biggest'"),
        ({"target": 1.5}, TypeError, "got float"),
        ({"inputs": features}, TypeError, "inputs is set per batch"),
        ({"n_stepz": 3}, TypeError, "'n_stepz' is not an argument"),
        ({"batch_size": 0}, ValueError, "batch_size must be a positive int"),
    ]
    for kwargs, error, message in cases:
        with pytest.raises(error, match=message):
            fastattr.attribute_dataset(ig, plain, out, progress=False, **kwargs)

    class Stream(torch.utils.data.IterableDataset):
        def __iter__(self):
            return iter(features)

    with pytest.raises(TypeError, match="map-style dataset"):
        fastattr.attribute_dataset(ig, Stream(), out, progress=False)
    with pytest.raises(ValueError, match="holds no examples"):
        fastattr.attribute_dataset(ig, torch.utils.data.TensorDataset(features[:0]), out)
    unlabeled_pairs = torch.utils.data.TensorDataset(features, labels)  # (tensor, label) items
    with pytest.raises(TypeError, match=r"tuple of tensors.*fastattr\.data\.labeled"):
        fastattr.attribute_dataset(ig, list(zip(features, labels.tolist())), out, progress=False)
    with pytest.raises(TypeError, match=r"looks like a label.*fastattr\.data\.labeled"):
        fastattr.attribute_dataset(ig, unlabeled_pairs, out, progress=False, target=1)
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(RuntimeError, match=r"torch\.distributed is not initialized"):
        fastattr.attribute_dataset(ig, plain, out, progress=False)
    assert not out.exists()


def test_without_zarr_the_error_names_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "zarr", None)
    ig = fastattr.IntegratedGradients(small_mlp())
    data = torch.utils.data.TensorDataset(small_data()[0])
    with pytest.raises(ImportError, match=r"pip install 'fastattr\[data\]'"):
        fastattr.attribute_dataset(ig, data, tmp_path / "s")
    with pytest.raises(ImportError, match=r"fastattr\[data\]"):
        open_store(tmp_path / "s")


# --- faults ---------------------------------------------------------------------------------


def test_a_full_disk_fails_the_write_and_keeps_the_rows_written(tmp_path, reference, monkeypatch):
    out = tmp_path / "s"
    real_set = zarr.storage.LocalStore.set

    async def full_from_unit_4(self, key, value):
        if key.startswith("attributions/0/c/") and int(key.split("/")[3]) >= 4:
            raise OSError(errno.ENOSPC, "No space left on device")
        return await real_set(self, key, value)

    monkeypatch.setattr(zarr.storage.LocalStore, "set", full_from_unit_4)
    with pytest.raises(StoreWriteError, match=r"No space left on device.*run the same job again"):
        data_jobs.run(str(out))
    assert issubclass(StoreWriteError, OSError)
    partial = open_store(out)
    assert partial.complete.tolist() == [True] * 8 + [False] * 16
    for name in ("attributions/0", "delta"):
        assert partial.group[name][:8].tobytes() == reference.group[name][:8].tobytes()
    monkeypatch.setattr(zarr.storage.LocalStore, "set", real_set)
    assert_same_store(data_jobs.run(str(out)), reference)


def test_an_unwritable_path_is_an_error(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(OSError):
        data_jobs.run(str(tmp_path / "file" / "store"))


# --- reading the store ----------------------------------------------------------------------


def test_reading_the_store(reference):
    rows = reference.attributions
    assert len(rows) == data_jobs.LENGTH and rows[3].shape == (data_jobs.FEATURES,)
    assert rows[[1, 5, 22]].shape == (3, data_jobs.FEATURES)
    assert np.array_equal(rows[[1, 5]], rows[1:6:4])
    assert torch.equal(rows.tensor(4), torch.from_numpy(rows[4]))
    assert reference.complete.all() and "24/24" in repr(reference)
    loader = torch.utils.data.DataLoader(reference.as_dataset(), batch_size=5)
    first = next(iter(loader))
    assert set(first) == {"attributions", "delta", "target"}
    assert torch.equal(first["attributions"], rows.tensor(slice(0, 5)))
    # One example's delta is a scalar, read as a tensor too, and batched to (5,).
    assert reference.delta.tensor(5).shape == () == reference.delta[5].shape
    assert first["delta"].shape == (5,)
    # A boolean mask reads the rows where it is True.
    mask = np.zeros(data_jobs.LENGTH, dtype=bool)
    mask[[2, 7, 11]] = True
    assert np.array_equal(rows[mask], rows[[2, 7, 11]])
    assert torch.equal(rows.tensor(torch.from_numpy(mask)), rows.tensor([2, 7, 11]))
    with pytest.raises(IndexError, match="one entry per example"):
        rows[mask[:5]]
    # It is a plain zarr group too.
    group = zarr.open_group(reference.path, mode="r")
    assert group["attributions/0"].shape == (data_jobs.LENGTH, data_jobs.FEATURES)


def test_a_damaged_chunk_fails_to_read(tmp_path, reference):
    copy = tmp_path / "copy"
    shutil.copytree(reference.path, copy)
    chunk = next(p for p in (copy / "attributions" / "0").rglob("*") if p.name != "zarr.json")
    if chunk.is_dir():
        chunk = next(p for p in chunk.rglob("*") if p.is_file())
    damaged = bytearray(chunk.read_bytes())
    damaged[len(damaged) // 2] ^= 0xFF
    chunk.write_bytes(bytes(damaged))
    with pytest.raises(RuntimeError, match="checksum"):
        open_store(copy).attributions[:]


def test_the_store_reads_while_the_job_writes(tmp_path, reference):
    features, labels = data_jobs.inputs_and_labels()
    reached, resume = threading.Event(), threading.Event()

    class Gated(torch.utils.data.Dataset):
        fastattr_labels = True

        def __len__(self):
            return data_jobs.LENGTH

        def __getitem__(self, index):
            if index == 16:
                reached.set()
                resume.wait(SUBPROCESS_TIMEOUT)
            return features[index], labels[index]

    out = tmp_path / "s"
    loader = torch.utils.data.DataLoader(Gated(), batch_size=2, num_workers=0)
    job_thread = threading.Thread(target=data_jobs.run, args=(str(out), loader))
    job_thread.start()
    try:
        assert reached.wait(SUBPROCESS_TIMEOUT)
        store = open_store(out)
        deadline = time.monotonic() + 30
        while not store.complete[:16].all() and time.monotonic() < deadline:
            time.sleep(0.05)
        complete = store.complete
        assert complete[:16].all() and not complete[16:].any()
        for name in ("attributions/0", "delta", "target"):
            assert store.group[name][:16].tobytes() == reference.group[name][:16].tobytes()
        assert np.isnan(store.attributions[16:]).all()
    finally:
        resume.set()
        job_thread.join(SUBPROCESS_TIMEOUT)
    assert open_store(out).is_complete


def test_layout_units_hold_whole_chunks():
    cases = [(24, 2, 256, 0.1), (10_000, 16, 4, 1e-4), (1000, 64, 600_000, 10), (5000, 8, 40, 0.01)]
    for length, batch, row_bytes, seconds in cases:
        layout = store.Layout.choose(length, batch, row_bytes, seconds)
        assert layout.rows_per_unit % batch == 0
        assert layout.units >= min(store.MIN_UNITS, -(-length // batch))
        rows = store.chunk_rows(layout.rows_per_unit, row_bytes)
        assert layout.rows_per_unit % rows == 0
        assert rows * row_bytes <= max(store.CHUNK_BYTES, row_bytes)
        covered = [r for u in range(layout.units) for b in layout.batches(u) for r in range(*b)]
        assert covered == list(range(length))


def test_job_failed_is_raised_from_another_ranks_post(tmp_path):
    group = zarr.open_group(tmp_path / "g", mode="w")
    ranks = [distributed.Ranks(r, 2, r) for r in range(2)]
    boards = [distributed.FailureBoard(group, r) for r in ranks]
    boards[1].post(ValueError("boom"))
    boards[1].check(now=True)  # its own post is not news to it
    with pytest.raises(JobFailed, match="rank 1 failed: ValueError: boom"):
        boards[0].check(now=True)
    boards[0].clear()
    boards[0].check(now=True)


def test_two_ranks_posting_at_once_both_post(tmp_path, monkeypatch):
    # Rank 0 finds no failures group, rank 1 creates it, rank 0's creation then collides.
    group = zarr.open_group(tmp_path / "g", mode="w")
    boards = [distributed.FailureBoard(group, distributed.Ranks(r, 2, r)) for r in range(2)]
    require_group = zarr.Group.require_group
    collided = []

    def require_group_in_a_race(self, name, **kwargs):
        if not collided:
            collided.append(True)
            boards[1].post(RuntimeError("first"))
            raise zarr.errors.ContainsGroupError(name)
        return require_group(self, name, **kwargs)

    monkeypatch.setattr(zarr.Group, "require_group", require_group_in_a_race)
    boards[0].post(ValueError("second"))
    monkeypatch.undo()
    assert sorted(group[store.FAILURES].group_keys()) == ["rank-0", "rank-1"]
