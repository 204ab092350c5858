"""``fastattr bench``: its command-line options and what it prints and writes."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from fastattr.bench import report
from fastattr.bench.cases import BUILT_IN, METHODS, load, select
from fastattr.bench.runner import Config, failed_checks, run

# (batch sizes, n_steps, warm-up rounds, timed rounds): the defaults keep a CPU run to a few
# minutes on two cores; --quick finishes within a minute there.
PRESETS = {
    ("cpu", False): ((1, 4, 16), 50, 1, 5),
    ("cpu", True): ((1, 8), 8, 1, 3),
    ("cuda", False): ((1, 8, 32, 128, 512), 50, 3, 10),
    ("cuda", True): ((1, 16), 16, 2, 5),
}


def _int_list(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers, got {text!r}"
        ) from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def _name_list(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def _at_least(minimum: int, text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = minimum - 1
    if value < minimum:
        raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {text!r}")
    return value


def _positive(text: str) -> int:
    return _at_least(1, text)


def _non_negative(text: str) -> int:
    return _at_least(0, text)


def add_parser(commands: argparse._SubParsersAction) -> None:
    """Adds the ``bench`` command and its options.

    Args:
        commands: The ``fastattr`` command's subparsers.
    """
    method_help = ", ".join(f"{short} ({name})" for name, short in METHODS.items())
    parser = commands.add_parser(
        "bench",
        help="time fastattr against Captum and the model's own forward+backward",
        description="Times fastattr, Captum (when installed) and the floor (the model's own "
        "forward+backward over the same rows) on built-in models; checks fastattr's "
        "attributions against the reference backend and Captum; prints a table and writes "
        "bench.json, bench.md (a Markdown summary) and bench.png.",
    )
    parser.add_argument(
        "--device",
        choices=("cpu", "cuda"),
        default="cuda" if torch.cuda.is_available() else "cpu",
        help="where to run (default: cuda when available)",
    )
    parser.add_argument(
        "--cases",
        default=BUILT_IN,
        metavar="SOURCE",
        help="a Python file (or module) whose CASES to run instead of the built-in ones, "
        "e.g. benchmarks/cases/layer_neuron_ig.py",
    )
    parser.add_argument("--list", action="store_true", help="list the cases and exit")
    parser.add_argument("--quick", action="store_true", help="a small run (under a minute on CPU)")
    parser.add_argument("--batch-sizes", type=_int_list, help="comma-separated, e.g. 1,8,32")
    parser.add_argument("--methods", type=_name_list, help=f"comma-separated: {method_help}")
    parser.add_argument("--models", type=_name_list, help="comma-separated: mlp, cnn, ...")
    parser.add_argument("--n-steps", type=_positive, help="integration steps (IG methods)")
    parser.add_argument("--repeats", type=_positive, help="timed rounds per measurement")
    parser.add_argument("--warmup", type=_non_negative, help="untimed rounds before them")
    parser.add_argument(
        "--out", type=Path, default=Path("fastattr-bench"), help="directory for JSON and PNG"
    )
    parser.add_argument(
        "--threads",
        type=_positive,
        help="torch CPU threads (default: torch's own choice); 1 gives steadier figures on a "
        "machine other work shares",
    )
    parser.add_argument("--no-memory", action="store_true", help="skip peak-memory measurement")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.set_defaults(run=main)


def main(args: argparse.Namespace) -> int:
    """Runs ``fastattr bench``: prints the table, writes ``bench.json``, ``bench.md`` and
    ``bench.png`` under ``--out``.

    Args:
        args: The parsed options.

    Returns:
        0 when every check passed, 1 when one failed, 2 for bad options.
    """
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("fastattr bench: --device cuda but no CUDA GPU is available", file=sys.stderr)
        return 2
    try:
        cases = select(args.methods, args.models, args.quick, load(args.cases))
    except ValueError as error:
        print(f"fastattr bench: {error}", file=sys.stderr)
        return 2
    if args.list:
        for case in cases:
            print(f"{case.name}: {case.method} on {case.model}")
        return 0
    batch_sizes, n_steps, warmup, repeats = PRESETS[(device.type, args.quick)]
    config = Config(
        device=device,
        batch_sizes=args.batch_sizes or batch_sizes,
        n_steps=args.n_steps or n_steps,
        cases=tuple(cases),
        warmup=warmup if args.warmup is None else args.warmup,
        repeats=args.repeats or repeats,
        measure_memory=not args.no_memory,
        progress=not args.no_progress,
        source=args.cases,
    )
    threads = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        result = run(config)
    finally:
        torch.set_num_threads(threads)
    print(report.table(result))
    print(report.legend(result))
    args.out.mkdir(parents=True, exist_ok=True)
    report.write_json(result, args.out / "bench.json")
    (args.out / "bench.md").write_text(
        report.summary_markdown(result) + "\n\n" + report.legend(result) + "\n"
    )
    print(f"wrote {args.out / 'bench.json'} and {args.out / 'bench.md'}")
    why_not = report.plot(result, args.out / "bench.png")
    print(why_not or f"wrote {args.out / 'bench.png'}")
    problems = failed_checks(result)
    for problem in problems:
        print(f"CHECK FAILED: {problem}", file=sys.stderr)
    return 1 if problems else 0
