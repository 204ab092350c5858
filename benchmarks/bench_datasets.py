"""attribute_dataset against attribute() in a loop over tensors already in memory (the same
batches), and one process against two gloo processes on the same job.

Reproduce the figures in RESULTS.md (from the repository root, zarr installed):

    python benchmarks/bench_datasets.py pipeline --threads 1
    python benchmarks/bench_datasets.py processes

``pipeline``: for each case, a dataset of a fixed size (``CASES``; ``--scale`` multiplies it);
``fastattr.bench.timing.interleaved_medians`` times the loop and the whole attribute_dataset
call (store created, every batch computed and written, the store closed) round by round. The
pipeline's results are checked against the loop's. A one-batch job measures the fixed cost
(the chunking measured, the store created, the loader and writer started and stopped), and
"without the fixed cost" is the loop's time over the pipeline's less that cost.

``processes``: the `fastattr attribute` command on the job below (``job_model``,
``job_data``), as one process with one torch thread, as one process with two, and under torchrun
as two gloo processes with one thread each, in rotating rounds; reports the wall time of each
command and the time attribute_dataset measured inside it, and checks that the stores are the
same bit for bit.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

import fastattr
from fastattr.bench import models
from fastattr.bench.runner import device_name
from fastattr.bench.timing import interleaved_medians

BATCH = 16
N_STEPS = 50
HERE = Path(__file__).resolve().parent


def _inputs(model: str, count: int, generator: torch.Generator) -> torch.Tensor:
    if model == "mlp":
        return torch.randn(count, models.MLP_FEATURES, generator=generator)
    if model == "transformer":
        return torch.randint(
            1, models.VOCAB_SIZE, (count, models.SEQUENCE_LENGTH), generator=generator
        )
    return torch.randn(count, *models.IMAGE_SHAPE, generator=generator)


# name: (model, attribution class, attribute() keywords, examples: 5-15 s of the loop on one
# core of the 2-core machine of RESULTS.md)
CASES = {
    "ig-mlp": ("mlp", "IntegratedGradients", {"n_steps": N_STEPS}, 4096),
    "lrp-mlp": ("mlp", "LRP", {}, 65536),
    "ig-cnn": ("cnn", "IntegratedGradients", {"n_steps": N_STEPS}, 128),
    "lrp-cnn": ("cnn", "LRP", {}, 4096),
    "lig-transformer": ("transformer", "LayerIntegratedGradients", {"n_steps": N_STEPS}, 256),
}


def _attribution(case: str) -> tuple[object, dict]:
    model_name, method, kwargs, _ = CASES[case]
    model = getattr(models, model_name)()
    if method == "LayerIntegratedGradients":
        return fastattr.LayerIntegratedGradients(model, model.embedding), kwargs
    return getattr(fastattr, method)(model), kwargs


def pipeline_vs_loop(case: str, scale: float, repeats: int) -> dict:
    attribution, kwargs = _attribution(case)
    generator = torch.Generator().manual_seed(0)
    examples = max(BATCH, round(CASES[case][3] * scale / BATCH) * BATCH)
    inputs = _inputs(CASES[case][0], examples, generator)
    data = torch.utils.data.TensorDataset(inputs)
    scratch = Path(tempfile.mkdtemp(prefix="fastattr-bench-datasets-"))

    def loop():
        return [
            attribution.attribute(inputs[i : i + BATCH], target=1, **kwargs)
            for i in range(0, len(inputs), BATCH)
        ]

    def pipeline(dataset=data):
        out = scratch / "store"
        store = fastattr.attribute_dataset(
            attribution, dataset, out, target=1, batch_size=BATCH, progress=False, **kwargs
        )
        shutil.rmtree(out)
        return store

    one_batch = torch.utils.data.TensorDataset(inputs[:BATCH])
    try:
        # Correctness first: the store's rows against the loop's.
        out = scratch / "check"
        store = fastattr.attribute_dataset(
            attribution, data, out, target=1, batch_size=BATCH, progress=False, **kwargs
        )
        stored = torch.from_numpy(store.attributions[:])
        error = (stored - torch.cat(loop())).abs().max().item()
        shutil.rmtree(out)
        times = interleaved_medians(
            {"loop": loop, "pipeline": pipeline, "one batch": lambda: pipeline(one_batch)},
            warmup=1,
            repeats=repeats,
        )
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    examples = len(inputs)
    fixed = times["one batch"] - times["loop"] * BATCH / examples
    return {
        "case": case,
        "examples": examples,
        "loop_ex_per_s": examples / times["loop"],
        "pipeline_ex_per_s": examples / times["pipeline"],
        "ratio": times["loop"] / times["pipeline"],
        "fixed_s": fixed,
        # Per batch, once the job runs: what is left of the pipeline's time without its fixed
        # cost (measured by the one-batch job).
        "steady_ratio": times["loop"] / (times["pipeline"] - fixed),
        "max_abs_error": error,
    }


# ----------------------------------------------------------------------------- processes
# The job the `processes` study runs through the CLI: --model/--data name these factories.
PROCESS_EXAMPLES = 512


def job_model() -> torch.nn.Module:
    return models.cnn()


def job_data() -> torch.utils.data.Dataset:
    generator = torch.Generator().manual_seed(1)
    return torch.utils.data.TensorDataset(_inputs("cnn", PROCESS_EXAMPLES, generator))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def processes(repeats: int, n_steps: int) -> dict:
    scratch = Path(tempfile.mkdtemp(prefix="fastattr-bench-processes-"))
    command = [
        "attribute", "--model", "bench_datasets:job_model", "--data", "bench_datasets:job_data",
        "--method", "ig", "--target", "1", "--batch-size", str(BATCH), "--n-steps", str(n_steps),
        "--no-progress",
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE.parent), str(HERE)])}
    inside: dict[str, list[float]] = {
        "1 process, 1 thread": [],
        "1 process, 2 threads": [],
        "2 gloo processes, 1 thread each": [],
    }

    def run(name: str) -> None:
        out = scratch / name.replace(" ", "-").replace(",", "")
        shutil.rmtree(out, ignore_errors=True)
        if name.startswith("1 process"):
            launch = [sys.executable, "-m", "fastattr"]
            extra = {"OMP_NUM_THREADS": "2" if "2 threads" in name else "1"}
        else:
            launch = [
                sys.executable, "-m", "torch.distributed.run", "--nnodes", "1",
                "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
                "--master-port", str(_free_port()), "-m", "fastattr",
            ]  # fmt: skip
            extra = {"OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo"}
        subprocess.run(
            [*launch, *command, "--out", str(out)],
            cwd=HERE, env={**env, **extra}, check=True, capture_output=True,
        )  # fmt: skip
        inside[name].append(fastattr.open_store(out).metadata["runs"][-1]["seconds"])

    try:
        wall = interleaved_medians(
            {name: (lambda name=name: run(name)) for name in inside}, warmup=1, repeats=repeats
        )
        one, *others = (
            fastattr.open_store(scratch / n.replace(" ", "-").replace(",", "")) for n in inside
        )
        identical = all(
            np.asarray(one.group[a][:]).tobytes() == np.asarray(other.group[a][:]).tobytes()
            for a in ("attributions/0", "target")
            for other in others
        )
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return {
        "examples": PROCESS_EXAMPLES,
        "n_steps": n_steps,
        "wall_s": wall,
        "inside_s": {name: statistics.median(times) for name, times in inside.items()},
        "bit_identical": identical,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("study", choices=("pipeline", "processes"))
    parser.add_argument("--cases", default=",".join(CASES))
    parser.add_argument("--scale", type=float, default=1.0, help="times each case's examples")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, help="torch CPU threads (pipeline)")
    parser.add_argument("--n-steps", type=int, default=16, help="processes: IG steps")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"# {device_name(torch.device('cpu'))}; torch {torch.__version__}; "
          f"{torch.get_num_threads()} threads; load average {os.getloadavg()[0]:.1f}")  # fmt: skip
    if args.study == "pipeline":
        columns = ["case", "examples", "loop ex/s", "pipeline ex/s", "pipeline / loop"]
        columns += ["fixed s", "without the fixed cost", "max abs err"]
        print("| " + " | ".join(columns) + " |")
        print("|:--|" + "--:|" * (len(columns) - 1))
        for case in args.cases.split(","):
            r = pipeline_vs_loop(case, args.scale, args.repeats)
            print(
                f"| `{r['case']}` | {r['examples']} | {r['loop_ex_per_s']:,.0f} | "
                f"{r['pipeline_ex_per_s']:,.0f} | {r['ratio']:.2f} | {r['fixed_s']:.2f} | "
                f"{r['steady_ratio']:.2f} | {r['max_abs_error']:.1e} |",
                flush=True,
            )
    else:
        print(json.dumps(processes(args.repeats, args.n_steps), indent=2))


if __name__ == "__main__":
    main()
