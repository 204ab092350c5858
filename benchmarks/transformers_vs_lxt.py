"""fastattr's LRP (AttnLRP) against lxt's AttnLRP alone, taking turns for many rounds, on the
cases of benchmarks/cases/transformers_lrp.py: a longer loop than `fastattr bench` runs (which
also times the floor), for intervals narrow enough to tell a few percent apart on a noisy
machine.

    python benchmarks/transformers_vs_lxt.py --models bert-base,bert-base-sdpa,llama --rounds 50

Per case (selected by its model's name): `fastattr.bench.timing.interleaved_times` (2 warm-up
rounds, then `--rounds` rounds that each run both once, in turn), and
`fastattr.bench.timing.paired_ratio` of lxt's time over fastattr's with its 95% interval; above
1 is fastattr faster. The batch as `fastattr bench` makes it, on the CPU.
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import torch

import fastattr
from fastattr.bench import cases
from fastattr.bench.runner import batch_arguments
from fastattr.bench.timing import interleaved_times, paired_ratio

CASES = Path(__file__).parent / "cases" / "transformers_lrp.py"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="bert-base,bert-base-sdpa,llama")
    parser.add_argument("--rounds", type=int, default=50)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=4)
    options = parser.parse_args()
    torch.set_num_threads(options.threads)
    by_model = {case.model: case for case in cases.load(str(CASES))}
    print("| model | fastattr ms | lxt ms | lxt over fastattr | rounds fastattr was faster in |")
    print("|---|--:|--:|--:|--:|")
    for name in options.models.split(","):
        case = by_model[name]
        model = case.make_model()
        arguments = batch_arguments(case, options.batch, 0, torch.device("cpu"))
        attributor = case.build(fastattr, model)
        times = interleaved_times(
            {
                "fastattr": lambda a=attributor, args=arguments: a.attribute(**args),
                "lxt": case.others["lxt"](model, arguments),
            },
            warmup=2,
            repeats=options.rounds,
        )
        ratio, interval = paired_ratio(times["lxt"], times["fastattr"])
        low, high = interval if interval is not None else (float("nan"), float("nan"))
        wins = sum(f < x for f, x in zip(times["fastattr"], times["lxt"]))
        print(
            f"| {name} | {statistics.median(times['fastattr']) * 1e3:,.0f} "
            f"| {statistics.median(times['lxt']) * 1e3:,.0f} "
            f"| {ratio:.3f}x [{low:.3f}, {high:.3f}] | {wins} of {options.rounds} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
