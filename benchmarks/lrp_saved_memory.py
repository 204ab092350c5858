"""What LRP on a transformer keeps for its backward: the activations held by autograd nodes at
the start of the backward, for fastattr's LRP (AttnLRP), lxt's AttnLRP and the floor (the
model's forward, then one backward to the input embeddings), on the cases of
benchmarks/cases/transformers_lrp.py.

    python benchmarks/lrp_saved_memory.py --models bert-eager,bert-sdpa,llama --sites 8

Every tensor an autograd node saves during the call passes through a saved-tensor hook, which
notes its storage and the line of the model (and of fastattr) that saved it; when the backward
starts, the storages of the notes still alive are summed once each, parameters excluded (the
linear layers save their weights). The figures depend on neither load nor timing.
"""

from __future__ import annotations

import argparse
import collections
import importlib.util
import traceback
import weakref
from pathlib import Path
from typing import Any

import torch

import fastattr.lrp.lrp as lrp_module
from fastattr import LRP
from fastattr.bench import contenders
from fastattr.canonizers import AttnLRP

CASES = Path(__file__).parent / "cases" / "transformers_lrp.py"


class _Saved:
    """A saved tensor and where it was saved (held by the node; noted weakly)."""

    __slots__ = ("__weakref__", "site", "tensor")

    def __init__(self, tensor: torch.Tensor, site: str) -> None:
        self.tensor = tensor
        self.site = site


def _site() -> str:
    frames = [f for f in traceback.extract_stack()[:-3] if "/torch/" not in f.filename]
    model = next((f for f in reversed(frames) if "transformers" in f.filename), None)
    inner = next((f for f in reversed(frames) if "fastattr" in f.filename), None)
    where = [f"{Path(f.filename).name}:{f.lineno}" for f in (model, inner) if f is not None]
    return " < ".join(where) or "?"


class Recorder:
    """Notes every saved tensor but parameters (a parameter itself, a view of one, or a tensor
    in the storage of one of ``parameters``: a detached weight); ``snapshot`` sums those alive
    by storage."""

    def __init__(self, parameters: set[int]) -> None:
        self.parameters = parameters  # storage addresses
        self.notes: list[weakref.ref] = []
        self.snapshot_taken: dict[str, float] | None = None

    def pack(self, tensor: torch.Tensor) -> _Saved:
        saved = _Saved(tensor, _site())
        # Parameters by type (lxt's BERT is a copy of the model, with parameters of its own),
        # and by storage the detached weights fastattr's nodes keep.
        root = tensor if tensor._base is None else tensor._base  # a weight's transpose
        weight = tensor.untyped_storage().data_ptr() in self.parameters
        if not isinstance(root, torch.nn.Parameter) and not weight:
            self.notes.append(weakref.ref(saved))
        return saved

    @staticmethod
    def unpack(saved: _Saved) -> torch.Tensor:
        return saved.tensor

    def snapshot(self) -> None:
        if self.snapshot_taken is not None:
            return
        by_site: dict[str, float] = collections.defaultdict(float)
        seen: set[int] = set()
        for note in self.notes:
            saved = note()
            if saved is None:
                continue
            storage = saved.tensor.untyped_storage()
            key = storage.data_ptr()
            if key in seen or storage.nbytes() == 0:
                continue
            seen.add(key)
            by_site[saved.site] += storage.nbytes() / 2**20
        self.snapshot_taken = dict(by_site)


def measure(call: Any, parameters: set[int]) -> dict[str, float]:
    """The saved activations (MiB by site) alive when ``call`` starts its backward, the
    storages ``parameters`` excluded."""
    recorder = Recorder(parameters)
    engine_grad, fastattr_gradients = torch.autograd.grad, lrp_module.input_gradients

    def grad(*args: Any, **kwargs: Any) -> Any:
        recorder.snapshot()
        return engine_grad(*args, **kwargs)

    def input_gradients(*args: Any, **kwargs: Any) -> Any:
        recorder.snapshot()
        return fastattr_gradients(*args, **kwargs)

    torch.autograd.grad, lrp_module.input_gradients = grad, input_gradients
    try:
        with torch.autograd.graph.saved_tensors_hooks(recorder.pack, recorder.unpack):
            call()
    finally:
        torch.autograd.grad, lrp_module.input_gradients = engine_grad, fastattr_gradients
    assert recorder.snapshot_taken is not None, "the call ran no backward"
    return recorder.snapshot_taken


def report(name: str, model: torch.nn.Module, embeddings: Any, batch: int, sites: int) -> None:
    """Prints each contender's saved activations on ``model`` (and its ``sites`` largest)."""
    arguments = embeddings(batch, torch.Generator().manual_seed(0))
    inputs, mask = arguments["inputs"], arguments["additional_forward_args"][0]
    lrp = LRP(model, canonizers=[AttnLRP()])
    leaf = inputs.detach().requires_grad_(True)
    parameters = {p.untyped_storage().data_ptr() for p in model.parameters()}
    calls = {
        "fastattr": lambda: lrp.attribute(inputs, target=0, additional_forward_args=(mask,)),
        "lxt": contenders.lxt_attnlrp(
            model, {"inputs": inputs, "target": 0, "additional_forward_args": (mask,)}
        ),
        "floor": lambda: torch.autograd.grad(model(leaf, mask)[:, 0].sum(), leaf),
    }
    for contender, call in calls.items():
        call()  # fastattr's first call learns where the forward writes in place
        by_site = measure(call, parameters)
        print(f"{name:10s} {contender:8s} {sum(by_site.values()):7.1f} MiB")
        for site, mib in sorted(by_site.items(), key=lambda item: -item[1])[:sites]:
            print(f"{'':19s} {mib:7.1f}  {site}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="bert-eager,bert-sdpa,llama")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--sites", type=int, default=0, help="the largest sites to list")
    options = parser.parse_args()
    spec = importlib.util.spec_from_file_location("transformers_lrp", CASES)
    assert spec is not None and spec.loader is not None
    cases = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cases)
    builders = {
        "bert-eager": lambda: cases.bert("eager"),
        "bert-sdpa": lambda: cases.bert("sdpa"),
        "llama": cases.llama,
    }
    for name in options.models.split(","):
        report(name, builders[name](), cases.embeddings, options.batch, options.sites)


if __name__ == "__main__":
    main()
