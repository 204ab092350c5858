"""How the processes of a torch.distributed job share a dataset: who they are, what rank 0
tells the others before they start, and how a failure on one reaches all of them.

There are two collectives, one at the start (rank 0's plan, or its error) and one at the end (a
barrier), and none per batch. A rank that fails writes its error into the store; the others
look for it at most once a second while they work, and keep looking while they wait at the
final barrier, so a failure stops the job on every rank instead of leaving them waiting.
"""

from __future__ import annotations

import os
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

import torch
import torch.distributed as dist

from fastattr.data._store import FAILURES, import_zarr

if TYPE_CHECKING:
    import zarr

T = TypeVar("T")
# How often a working rank looks for another's failure: rarely enough to cost nothing, often
# enough that a failed job stops within about a second of compute.
CHECK_INTERVAL_S = 1.0
WAIT_POLL_S = 0.05


class JobFailed(RuntimeError):
    """Another rank of the job failed; the message is its error."""


@dataclass(frozen=True)
class Ranks:
    """This process's place in the job."""

    rank: int
    world: int
    local_rank: int

    @property
    def distributed(self) -> bool:
        return self.world > 1


def current_ranks() -> Ranks:
    """The job's ranks from torch.distributed when it is initialized, else a single process.

    Raises:
        RuntimeError: a launcher such as torchrun started several processes but
            torch.distributed is not initialized (each would otherwise do the whole job).
    """
    if dist.is_available() and dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
    else:
        launched = int(os.environ.get("WORLD_SIZE", "1"))
        if launched > 1:
            raise RuntimeError(
                f"WORLD_SIZE is {launched} but torch.distributed is not initialized: call "
                "torch.distributed.init_process_group() before attribute_dataset (the fastattr "
                "CLI does this itself)"
            )
        rank, world = 0, 1
    local_rank = int(os.environ.get("LOCAL_RANK", rank if world > 1 else 0))
    return Ranks(rank, world, local_rank)


def _collective_device() -> torch.device:
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def describe_error(error: BaseException) -> str:
    return "".join(traceback.format_exception_only(type(error), error)).strip()


def from_rank0(ranks: Ranks, prepare: Callable[[], T]) -> T:
    """Run ``prepare`` on rank 0 and give every rank its result; if it raises, every rank
    raises (rank 0 its own error, the others ``JobFailed`` naming it)."""
    if not ranks.distributed:
        return prepare()
    payload: list[Any] = [None]
    if ranks.rank == 0:
        try:
            payload[0] = ("ok", prepare())
        except BaseException as error:
            payload[0] = ("error", describe_error(error))
            dist.broadcast_object_list(payload, src=0, device=_collective_device())
            raise
    dist.broadcast_object_list(payload, src=0, device=_collective_device())
    status, value = payload[0]
    if status == "error":
        raise JobFailed(f"rank 0 failed while preparing the job: {value}")
    return value


class FailureBoard:
    """Where ranks post their failures (a group per failed rank in the store) and look for
    each other's."""

    def __init__(self, group: zarr.Group, ranks: Ranks) -> None:
        self.group = group
        self.ranks = ranks
        self._next_check = 0.0

    def clear(self) -> None:
        """Forget the failures of earlier runs (rank 0, before the others start)."""
        if FAILURES in self.group:
            del self.group[FAILURES]

    def post(self, error: BaseException) -> None:
        """Tell the other ranks this one failed, and why."""
        if not self.ranks.distributed or isinstance(error, JobFailed):
            return
        try:
            failures = self.group.require_group(FAILURES)
        except import_zarr().errors.ContainsGroupError:  # another rank created it in between
            failures = self.group.require_group(FAILURES)
        failures.create_group(
            f"rank-{self.ranks.rank}",
            overwrite=True,
            attributes={
                "rank": self.ranks.rank,
                "error": describe_error(error),
                "traceback": "".join(traceback.format_exception(error)),
            },
        )

    def check(self, *, now: bool = False) -> None:
        """Raise ``JobFailed`` if another rank has failed (looks at most once per
        CHECK_INTERVAL_S unless ``now``)."""
        if not self.ranks.distributed:
            return
        clock = time.monotonic()
        if not now and clock < self._next_check:
            return
        self._next_check = clock + CHECK_INTERVAL_S
        if FAILURES not in self.group:
            return
        for name, failure in sorted(self.group[FAILURES].groups()):
            if name != f"rank-{self.ranks.rank}":
                attrs = failure.attrs
                raise JobFailed(
                    f"rank {attrs['rank']} failed: {attrs['error']} (its traceback is in the "
                    f"store under {FAILURES}/{name})"
                )

    def wait_for_all(self) -> None:
        """The final barrier, watching for failures while it waits."""
        if not self.ranks.distributed:
            return
        work = dist.barrier(async_op=True)
        while not work.is_completed():
            self.check(now=True)
            time.sleep(WAIT_POLL_S)
        try:
            work.wait()
        except RuntimeError:
            # A rank that failed and left breaks the barrier ("Connection closed by peer"
            # from gloo): the failure it posted before leaving says why.
            self.check(now=True)
            raise


def seed_generators(seed: int, device: torch.device) -> None:
    """Seed torch's generators of the CPU and ``device`` with ``seed``: a batch seeded with
    its first index draws the same noise (NoiseTunnel) whichever process computes it."""
    torch.default_generator.manual_seed(seed)
    if device.type == "cuda":
        with torch.cuda.device(device):
            torch.cuda.manual_seed(seed)


@contextmanager
def restored_generators(device: torch.device) -> Iterator[None]:
    """Give the caller's generators (the CPU's and ``device``'s) back as they were, however
    the job seeded them."""
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        yield
