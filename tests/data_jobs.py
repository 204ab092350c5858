"""The dataset job of tests/test_data.py: its model and dataset (also the factories the CLI test
names, ``data_jobs:model`` and ``data_jobs:dataset``), and the entry point of the processes
those tests launch, with faults to inject: ``python data_jobs.py OUT [--kill-unit U
--kill-stage before|data|complete] [--kill-rank R] [--bad-item I] [--other-weights-rank R]
[--other-data-rank R]``."""

from __future__ import annotations

import argparse
import os
import signal
import sys

import torch

import fastattr
from fastattr.bench import models
from fastattr.data import labeled
from fastattr.data._store import UnitWriter

LENGTH = 24
FEATURES = models.MLP_FEATURES
# Two examples per batch: small enough that a chunk of one integration step and a chunk of
# several give different last bits on the CPU (different matrix-multiply paths), which a
# resumed run must not be exposed to.
JOB = {"batch_size": 2, "n_steps": 16, "target": "label", "return_convergence_delta": True}


def model() -> torch.nn.Module:
    return models.mlp()


def inputs_and_labels(seed: int = 12) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    features = torch.randn(LENGTH, FEATURES, generator=generator)
    return features, torch.randint(0, models.NUM_CLASSES, (LENGTH,), generator=generator)


class BadItem(torch.utils.data.Dataset):
    """The job's dataset with item ``bad`` one feature short."""

    fastattr_labels = True

    def __init__(self, bad: int) -> None:
        self.features, self.labels = inputs_and_labels()
        self.bad = bad

    def __len__(self) -> int:
        return LENGTH

    def __getitem__(self, index: int):
        features = self.features[index]
        return (features[1:] if index == self.bad else features), self.labels[index]


def dataset() -> torch.utils.data.Dataset:
    return labeled(torch.utils.data.TensorDataset(*inputs_and_labels()))


def other_shard() -> torch.utils.data.Dataset:
    """Another dataset of the job's length and item format, as a rank given its own shard
    of the data would see."""
    return labeled(torch.utils.data.TensorDataset(*inputs_and_labels(seed=13)))


def run(out: str, data: torch.utils.data.Dataset | None = None, **overrides):
    ig = fastattr.IntegratedGradients(model())
    job = {**JOB, **overrides}
    return fastattr.attribute_dataset(
        ig, dataset() if data is None else data, out, progress=False, **job
    )


def _kill_in_writer(unit: int, stage: str) -> None:
    """SIGKILL this process as it writes ``unit``: before writing it, after its rows are
    written but before it is marked complete, or right after it is marked complete."""
    write = UnitWriter.write

    def killing_write(self, this_unit, start, columns):
        if this_unit == unit and stage == "before":
            os.kill(os.getpid(), signal.SIGKILL)
        if this_unit == unit and stage == "data":
            stop = start + len(next(iter(columns.values())))
            for name, values in columns.items():
                self.arrays[name][start:stop] = values
            os.kill(os.getpid(), signal.SIGKILL)
        write(self, this_unit, start, columns)
        if this_unit == unit and stage == "complete":
            os.kill(os.getpid(), signal.SIGKILL)

    UnitWriter.write = killing_write


def _use_other_weights() -> None:
    """This process's model: the job's, its weights scaled (another job than the others')."""
    global model
    job_model = model

    def model() -> torch.nn.Module:
        scaled = job_model()
        with torch.no_grad():
            for parameter in scaled.parameters():
                parameter.mul_(1.5)
        return scaled


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--kill-unit", type=int)
    parser.add_argument("--kill-stage", default="data")
    parser.add_argument("--kill-rank", type=int, default=0)
    parser.add_argument("--bad-item", type=int)
    parser.add_argument("--other-weights-rank", type=int)
    parser.add_argument("--other-data-rank", type=int)
    args = parser.parse_args()
    rank = int(os.environ.get("RANK", "0"))
    if args.other_weights_rank == rank:
        _use_other_weights()
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        torch.distributed.init_process_group("gloo")
    if args.kill_unit is not None and rank == args.kill_rank:
        _kill_in_writer(args.kill_unit, args.kill_stage)
    data = None if args.bad_item is None else BadItem(args.bad_item)
    if args.other_data_rank == rank:
        data = other_shard()
    try:
        run(args.out, data)
    except Exception as error:
        print(f"ERROR {type(error).__name__}: {error}", flush=True)
        return 3
    finally:
        # As fastattr's CLI does: a group left to the interpreter's exit can abort the process.
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    print("DONE", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
