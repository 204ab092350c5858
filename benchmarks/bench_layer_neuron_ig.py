"""LayerIntegratedGradients and NeuronIntegratedGradients: fastattr against captum and the floor.

    python benchmarks/bench_layer_neuron_ig.py                 # CPU
    python benchmarks/bench_layer_neuron_ig.py --device cuda   # the same on a GPU

Cases (n_steps 50, gausslegendre, float32):
- NeuronIG, a neuron of the first layer of a 9-layer MLP (width 512, batch 64).
- LayerIG, the output of the third linear layer of that MLP (batch 64, target per example).
- LayerIG, the token embedding of a small text classifier (embedding, one transformer encoder
  layer, masked mean pool, linear; batch 32, sequence length 32, the attention mask as an
  additional forward argument, baselines of padding tokens).

Times are medians of interleaved rounds (fastattr.bench.timing.interleaved_medians): every
round runs each implementation once, in a rotating order, after warm-ups. The LayerIG floor is
the model's forward over the expanded inputs (n_steps * B rows, prebuilt) with the layer's
output replaced by a prebuilt path that requires grad, plus one ``torch.autograd.grad`` of the
summed target outputs with respect to that path. The NeuronIG floor is the network up to the
layer over the prebuilt input path, plus one gradient of the neuron's summed values.
"""

from __future__ import annotations

import argparse
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

import fastattr
from fastattr.bench.runner import script_device
from fastattr.bench.timing import interleaved_medians

N_STEPS = 50
MLP_DEPTH, MLP_WIDTH, MLP_BATCH, MLP_CLASSES = 9, 512, 64, 10
MLP_LAYER = 4  # index of the third Linear in the MLP's Sequential (Linear, ReLU, ...)
NEURON = 7
TEXT_BATCH, SEQ_LEN, VOCAB, DIM, TEXT_CLASSES, PAD = 32, 32, 1000, 64, 4, 0
NEURON_TARGET = 3.0  # captum / fastattr


def deep_mlp(device: torch.device) -> nn.Sequential:
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for i in range(MLP_DEPTH):
        last = i == MLP_DEPTH - 1
        layers.append(nn.Linear(MLP_WIDTH, MLP_CLASSES if last else MLP_WIDTH))
        if not last:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers).eval().to(device)


class TextClassifier(nn.Module):
    """Token ids and an attention mask (1 for tokens, 0 for padding) -> class scores."""

    def __init__(self) -> None:
        super().__init__()
        self.embedding = nn.Embedding(VOCAB, DIM, padding_idx=PAD)
        self.positions = nn.Parameter(torch.randn(SEQ_LEN, DIM) * 0.02)
        self.encoder = nn.TransformerEncoderLayer(
            DIM, 4, dim_feedforward=2 * DIM, dropout=0.0, batch_first=True
        )
        self.head = nn.Linear(DIM, TEXT_CLASSES)

    def forward(self, ids: Tensor, mask: Tensor) -> Tensor:
        hidden = self.embedding(ids) + self.positions[: ids.shape[1]]
        hidden = self.encoder(hidden, src_key_padding_mask=mask == 0)
        weights = mask.to(hidden.dtype).unsqueeze(-1)
        return self.head((hidden * weights).sum(1) / weights.sum(1).clamp(min=1))


def text_classifier(device: torch.device) -> TextClassifier:
    torch.manual_seed(1)
    return TextClassifier().eval().to(device)


def text_inputs(device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    generator = torch.Generator().manual_seed(2)
    ids = torch.randint(1, VOCAB, (TEXT_BATCH, SEQ_LEN), generator=generator)
    lengths = torch.randint(SEQ_LEN // 2, SEQ_LEN + 1, (TEXT_BATCH,), generator=generator)
    mask = (torch.arange(SEQ_LEN) < lengths.unsqueeze(1)).long()
    target = torch.randint(0, TEXT_CLASSES, (TEXT_BATCH,), generator=generator)
    return (ids * mask).to(device), mask.to(device), target.to(device)


def gauss_legendre_path(start: Tensor, end: Tensor) -> Tensor:
    """The n_steps * B points of the path, step-major, as one prebuilt leaf."""
    nodes, _ = np.polynomial.legendre.leggauss(N_STEPS)
    alphas = torch.tensor(0.5 * (1 + nodes), dtype=end.dtype, device=end.device)
    shape = (-1, *([1] * end.dim()))
    path = start + alphas.view(shape) * (end - start)
    return path.reshape(-1, *end.shape[1:]).detach().requires_grad_(True)


def layer_floor(
    model: nn.Module,
    layer: nn.Module,
    inputs: tuple[Tensor, ...],
    baselines: tuple[Tensor, ...],
    target: Tensor,
    args: tuple[Tensor, ...] = (),
) -> Callable[[], Any]:
    """The model over the expanded inputs with the layer's output replaced by the path."""
    values: list[Tensor] = []
    handle = layer.register_forward_hook(lambda module, inp, out: values.append(out.detach()))
    try:
        with torch.no_grad():
            model(*inputs, *args)
            model(*baselines, *args)
    finally:
        handle.remove()
    path = gauss_legendre_path(values[1], values[0])
    expanded = tuple(t.repeat(N_STEPS, *([1] * (t.dim() - 1))) for t in (*inputs, *args))
    rows = target.repeat(N_STEPS).view(-1, 1)

    def run() -> Any:
        handle = layer.register_forward_hook(lambda module, inp, out: path)
        try:
            output = model(*expanded)
        finally:
            handle.remove()
        return torch.autograd.grad(output.gather(1, rows).sum(), path)

    return run


def neuron_floor(model: nn.Sequential, inputs: Tensor) -> Callable[[], Any]:
    """The first layer over the prebuilt input path and the gradient of the neuron's sum."""
    path = gauss_legendre_path(torch.zeros_like(inputs), inputs)
    first = model[0]

    def run() -> Any:
        return torch.autograd.grad(first(path)[:, NEURON].sum(), path)

    return run


def explainers(cls_name: str, *args: Any) -> tuple[Any, Any]:
    import captum.attr

    return getattr(fastattr, cls_name)(*args), getattr(captum.attr, cls_name)(*args)


def same_numbers(label: str, ours: Tensor, theirs: Tensor) -> float:
    """float32: a loose check that both computed the same thing; the tests check tightly."""
    scale = float(theirs.abs().max())
    error = float((ours - theirs).abs().max())
    if not error <= 1e-4 * scale:
        raise RuntimeError(f"{label}: fastattr differs from captum by {error:.3g} (max {scale})")
    return error / scale


def run_case(
    label: str, candidates: dict[str, Callable[[], Any]], device: torch.device, args: Any
) -> dict[str, Any]:
    ours, theirs = candidates["fastattr"](), candidates["captum"]()
    relative_error = same_numbers(label, ours, theirs)
    del ours, theirs
    medians = interleaved_medians(
        candidates, device=device, warmup=args.warmup, repeats=args.repeats
    )
    print(f"  {label}: " + ", ".join(f"{k} {v * 1e3:.1f} ms" for k, v in medians.items()))
    return {"case": label, "relative_error": relative_error, **medians}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument(
        "--threads", type=int, help="torch CPU threads (fewer: steadier on a shared CPU)"
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", category=UserWarning)
    device, machine = script_device(args.device, parser.error)
    import captum

    print(
        f"# LayerIntegratedGradients / NeuronIntegratedGradients on {device} ({machine}); "
        f"torch {torch.__version__}, captum {captum.__version__}, fastattr "
        f"{fastattr.__version__} ({fastattr.current_backend()} kernels); n_steps {N_STEPS}, "
        f"gausslegendre; medians of {args.repeats} interleaved rounds after {args.warmup} "
        "warm-ups"
    )
    results = []

    mlp = deep_mlp(device)
    generator = torch.Generator().manual_seed(3)
    x = torch.randn(MLP_BATCH, MLP_WIDTH, generator=generator).to(device)
    target = torch.randint(0, MLP_CLASSES, (MLP_BATCH,), generator=generator).to(device)

    ours, theirs = explainers("NeuronIntegratedGradients", mlp, mlp[0])
    results.append(
        run_case(
            f"NeuronIG, neuron {NEURON} of layer 1 of a {MLP_DEPTH}-layer MLP "
            f"(width {MLP_WIDTH}, batch {MLP_BATCH})",
            {
                "floor": neuron_floor(mlp, x),
                "fastattr": lambda: ours.attribute(x, NEURON, n_steps=N_STEPS),
                "captum": lambda: theirs.attribute(x, NEURON, n_steps=N_STEPS),
            },
            device,
            args,
        )
    )

    layer = mlp[MLP_LAYER]
    lig_ours, lig_theirs = explainers("LayerIntegratedGradients", mlp, layer)
    results.append(
        run_case(
            f"LayerIG, output of layer {MLP_LAYER // 2 + 1} of the {MLP_DEPTH}-layer MLP "
            f"(batch {MLP_BATCH})",
            {
                "floor": layer_floor(mlp, layer, (x,), (torch.zeros_like(x),), target),
                "fastattr": lambda: lig_ours.attribute(x, target=target, n_steps=N_STEPS),
                "captum": lambda: lig_theirs.attribute(x, target=target, n_steps=N_STEPS),
            },
            device,
            args,
        )
    )

    text = text_classifier(device)
    ids, mask, text_target = text_inputs(device)
    pads = torch.full_like(ids, PAD)
    emb_ours, emb_theirs = explainers("LayerIntegratedGradients", text, text.embedding)
    kwargs = {
        "baselines": pads,
        "target": text_target,
        "additional_forward_args": (mask,),
        "n_steps": N_STEPS,
    }
    results.append(
        run_case(
            f"LayerIG, token embedding of a 1-layer transformer classifier "
            f"(batch {TEXT_BATCH}, seq {SEQ_LEN}, dim {DIM})",
            {
                "floor": layer_floor(text, text.embedding, (ids,), (pads,), text_target, (mask,)),
                "fastattr": lambda: emb_ours.attribute(ids, **kwargs),
                "captum": lambda: emb_theirs.attribute(ids, **kwargs),
            },
            device,
            args,
        )
    )

    print()
    print("| case | floor | fastattr | captum | fastattr/floor | captum/fastattr |")
    print("|---|---|---|---|---|---|")
    for r in results:
        print(
            f"| {r['case']} | {r['floor'] * 1e3:.1f} ms | {r['fastattr'] * 1e3:.1f} ms | "
            f"{r['captum'] * 1e3:.1f} ms | {r['fastattr'] / r['floor']:.2f} | "
            f"{r['captum'] / r['fastattr']:.2f} |"
        )
    speedup = results[0]["captum"] / results[0]["fastattr"]
    print()
    print(
        f"NeuronIG captum/fastattr {speedup:.2f} (target >= {NEURON_TARGET:g}: "
        f"{'met' if speedup >= NEURON_TARGET else 'MISSED'})"
    )


if __name__ == "__main__":
    main()
