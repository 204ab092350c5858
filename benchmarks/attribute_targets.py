"""attribute_targets: K targets from one forward per chunk, against K attribute() calls.

    python benchmarks/attribute_targets.py [--device cpu] [--batch 16] [--targets 10]
        [--n-steps 50] [--repeats 7] [--threads 1]

Per model (the built-in MLP and CNN), timed side by side with
fastattr.bench.timing.interleaved_medians:

- ``targets``: ``IntegratedGradients.attribute_targets(inputs, range(K))``;
- ``singles``: K calls of ``attribute(inputs, target=k)``;
- the limit, on the same prebuilt path (the floors' rows): ``one forward + K backwards``
  (retained graph) against ``K forwards + K backwards``, the best attribute_targets can do.

Also the peak memory of both fastattr contenders (CPU: the rise of the process's peak
resident size; CUDA: max_memory_allocated), which must not grow with K beyond the K
accumulators.
"""

from __future__ import annotations

import argparse
import json

import torch

import fastattr
from fastattr.bench import memory, models
from fastattr.bench.floors import straight_path
from fastattr.bench.runner import device_name
from fastattr.bench.timing import interleaved_medians

MODELS = {"mlp": (models.mlp, (models.MLP_FEATURES,)), "cnn": (models.cnn, models.IMAGE_SHAPE)}


def study(name: str, device: torch.device, batch: int, targets: int, n_steps: int, repeats: int):
    make, shape = MODELS[name]
    model = make().to(device)
    generator = torch.Generator().manual_seed(0)
    inputs = torch.randn(batch, *shape, generator=generator).to(device)
    baselines = torch.zeros_like(inputs)
    ig = fastattr.IntegratedGradients(model)
    classes = list(range(targets))
    kwargs = dict(baselines=baselines, n_steps=n_steps)

    path = straight_path(baselines, inputs, n_steps)

    def one_forward_k_backwards():
        output = model(path)
        for k in classes:
            torch.autograd.grad(output[:, k].sum(), path, retain_graph=k + 1 < targets)

    def k_forwards_k_backwards():
        for k in classes:
            torch.autograd.grad(model(path)[:, k].sum(), path)

    calls = {
        "targets": lambda: ig.attribute_targets(inputs, classes, **kwargs),
        "singles": lambda: [ig.attribute(inputs, target=k, **kwargs) for k in classes],
        "limit: 1 forward + K backwards": one_forward_k_backwards,
        "limit: K forwards + K backwards": k_forwards_k_backwards,
    }
    # The results agree before anything is timed.
    together, separate = calls["targets"](), calls["singles"]()
    error = max(
        float((a - b).abs().max() / b.abs().max().clamp(min=1e-30))
        for a, b in zip(together, separate)
    )
    times = interleaved_medians(calls, device=device, warmup=2, repeats=repeats)
    peaks = {}
    for label in ("targets", "singles"):
        peaks[label] = memory.peak_bytes(calls[label], device) / 2**20
    return {
        "model": name,
        "batch": batch,
        "targets": targets,
        "n_steps": n_steps,
        "seconds": times,
        "speedup": times["singles"] / times["targets"],
        "limit": times["limit: K forwards + K backwards"] / times["limit: 1 forward + K backwards"],
        "peak_mib": peaks,
        "max_relative_difference": error,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--targets", type=int, default=10)
    parser.add_argument("--n-steps", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--models", default="mlp,cnn")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    print(device_name(device))
    rows = []
    for name in args.models.split(","):
        row = study(name, device, args.batch, args.targets, args.n_steps, args.repeats)
        rows.append(row)
        print(json.dumps(row))
    print()
    print(
        "| model | batch | K | attribute_targets | K attribute() | speed-up | limit "
        "| peak MiB targets / singles |"
    )
    print("|:--|--:|--:|--:|--:|--:|--:|--:|")
    for row in rows:
        s = row["seconds"]
        print(
            f"| {row['model']} | {row['batch']} | {row['targets']} | {s['targets'] * 1e3:.1f} ms "
            f"| {s['singles'] * 1e3:.1f} ms | {row['speedup']:.2f}x | {row['limit']:.2f}x "
            f"| {row['peak_mib']['targets']:.1f} / {row['peak_mib']['singles']:.1f} |"
        )


if __name__ == "__main__":
    main()
