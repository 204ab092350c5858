"""The benchmark report as a text table, JSON and a PNG plot."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

COLUMNS = (
    ("case", "<"),
    ("batch", ">"),
    ("impl", "<"),
    ("examples/s", ">"),
    ("vs captum", ">"),
    ("time/floor", ">"),
    ("peak MiB", ">"),
    ("err vs ref", ">"),
    ("err vs others", "<"),
)


def _number(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _ratio(record: dict[str, Any], key: str, unit: str = "") -> str:
    """A ratio with its 95% interval when there is one: ``1.03x [1.01, 1.05]``."""
    value = record.get(key)
    if value is None:
        return "-"
    interval = record.get(f"{key}_interval")
    shown = f"{value:.2f}{unit}"
    return shown if interval is None else f"{shown} [{interval[0]:.2f}, {interval[1]:.2f}]"


def _rate(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:,.0f}" if value >= 100 else f"{value:.3g}"


def _row(result: dict[str, Any], name: str, record: dict[str, Any]) -> list[str]:
    status = record["status"]
    if status != "ok":
        shown = "OOM" if status == "oom" else "error"
        return [result["case"], str(result["batch"]), name, shown, *["-"] * 5]
    peak = record.get("peak_bytes")
    errors = [
        f"{key[len('rel_err_') :]} {value:.1e}"
        for key, value in record.items()
        if key.startswith("rel_err_") and key not in ("rel_err_reference", "rel_err_float64")
    ]
    return [
        result["case"],
        str(result["batch"]),
        name,
        _rate(record.get("examples_per_s")),
        _ratio(record, "speedup_vs_captum", "x"),
        _ratio(record, "time_over_floor"),
        "-" if peak is None else f"{peak / 2**20:.1f}",
        _number(record.get("rel_err_reference"), ".1e"),
        ", ".join(errors) or "-",
    ]


def table(report: dict[str, Any]) -> str:
    """The terminal table: one row per case, batch and contender.

    Args:
        report: A report of [fastattr.bench.runner.run][].
    """
    rows = [
        _row(result, name, record)
        for result in report["results"]
        for name, record in result["implementations"].items()
    ]
    headers = [name for name, _ in COLUMNS]
    widths = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(headers)]

    def line(cells: list[str]) -> str:
        return "  ".join(
            cell.ljust(width) if align == "<" else cell.rjust(width)
            for cell, width, (_, align) in zip(cells, widths, COLUMNS)
        )

    return "\n".join([line(headers), line(["-" * w for w in widths]), *map(line, rows)])


def _throughput(record: dict[str, Any] | None) -> str:
    if record is None:
        return "-"
    if record["status"] != "ok":
        return "OOM" if record["status"] == "oom" else "error"
    return _rate(record.get("examples_per_s"))


def _mib(record: dict[str, Any] | None) -> str:
    peak = (record or {}).get("peak_bytes")
    return "-" if peak is None else f"{peak / 2**20:.1f}"


def contender_names(report: dict[str, Any]) -> list[str]:
    """Every contender in the report: fastattr first, the floor last, the others as found.

    Args:
        report: A report of [fastattr.bench.runner.run][].
    """
    names = dict.fromkeys(
        name for result in report["results"] for name in result["implementations"]
    )
    others = [name for name in names if name not in ("fastattr", "floor")]
    return ["fastattr", *others, "floor"]


def summary_markdown(report: dict[str, Any]) -> str:
    """A Markdown table with one row per case and batch: the contenders side by side.

    Args:
        report: A report of [fastattr.bench.runner.run][].
    """
    names = contender_names(report)
    others = names[1:-1]
    header = [
        "case",
        "batch",
        *(f"{name} ex/s" for name in names),
        *(f"fastattr vs {name}" for name in others),
        "fastattr time/floor",
        f"peak MiB {' / '.join(names)}",
        "err vs ref",
        *(f"err vs {name}" for name in others),
    ]
    lines = [
        "| " + " | ".join(header) + " |",
        "|:--|" + "--:|" * (len(header) - 1),
    ]
    for result in report["results"]:
        impls = result["implementations"]
        fast = impls.get("fastattr", {})
        cells = [
            f"`{result['case']}`",
            str(result["batch"]),
            *(_throughput(impls.get(name)) for name in names),
            *(_ratio(fast, f"speedup_vs_{name}", "x") for name in others),
            _ratio(fast, "time_over_floor"),
            " / ".join(_mib(impls.get(name)) for name in names),
            _number(fast.get("rel_err_reference"), ".1e"),
            *(_number(fast.get(f"rel_err_{name}"), ".1e") for name in others),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def legend(report: dict[str, Any]) -> str:
    """What the tables' columns mean, the machine and settings, and the notes.

    Args:
        report: A report of [fastattr.bench.runner.run][].
    """
    meta = report["meta"]
    lines = [
        f"device: {meta['device_name']} ({meta['device']}); torch {meta['torch_version']}, "
        f"{meta['torch_threads']} threads; captum {meta['captum_version'] or 'not installed'}; "
        f"fastattr backend {meta['build']['backend']}",
        f"n_steps {meta['n_steps']} (IG methods; the floor runs the same n_steps * batch rows); "
        f"timing: {meta['timing']}, {meta['warmup']} warm-up + {meta['repeats']} repeats",
        "vs X: X's time / this time; time/floor: this time / the model's own "
        "forward+backward over the same rows; both the median of the ratios round by round, "
        "with a 95% interval in brackets (from 6 repeats on): one that excludes 1 is a "
        "difference beyond the machine's noise",
        f"peak MiB: {meta['memory_method'] or 'not measured'}",
        "err: max |fastattr - ref| / max |ref| against the reference backend and each other "
        "contender, computed with TF32 off",
    ]
    lines += [f"note: {note}" for note in report["notes"]]
    return "\n".join(lines)


def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {key: _json_safe(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_json_safe(item) for item in value]
    return value


def write_json(report: dict[str, Any], path: Path) -> None:
    """Saves the report (infinities as strings, which JSON lacks).

    Args:
        report: A report of [fastattr.bench.runner.run][].
        path: The file to write.
    """
    path.write_text(json.dumps(_json_safe(report), indent=2) + "\n")


def plot(report: dict[str, Any], path: Path) -> str | None:
    """Throughput against batch size, one panel per method, one line per contender and model.

    Args:
        report: A report of [fastattr.bench.runner.run][].
        path: The PNG to write.

    Returns:
        Why no plot was drawn (matplotlib missing, nothing measured), or None.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed: no plot"
    methods = list(dict.fromkeys(result["method"] for result in report["results"]))
    if not methods:
        return "nothing was measured: no plot"
    columns = min(2, len(methods))
    rows = -(-len(methods) // columns)
    figure, axes = plt.subplots(rows, columns, figsize=(5.5 * columns, 4 * rows), squeeze=False)
    for unused in axes.flat[len(methods) :]:
        unused.set_visible(False)
    palette = iter(["tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown"])
    colors = {name: next(palette, "tab:olive") for name in contender_names(report)}
    colors.update(fastattr="tab:blue", floor="tab:gray")
    markers = ["o", "s", "^", "D", "v"]
    for axis, method in zip(axes.flat, methods):
        results = [r for r in report["results"] if r["method"] == method]
        model_names = list(dict.fromkeys(r["model"] for r in results))
        for model_index, model in enumerate(model_names):
            for impl, color in colors.items():
                points = [
                    (r["batch"], r["implementations"][impl]["examples_per_s"])
                    for r in results
                    if r["model"] == model
                    and "examples_per_s" in r["implementations"].get(impl, {})
                ]
                if not points:
                    continue
                xs, ys = zip(*points)
                axis.plot(
                    xs,
                    ys,
                    color=color,
                    marker=markers[model_index % len(markers)],
                    linestyle="--" if impl == "floor" else "-",
                    label=f"{impl} ({model})",
                )
        batches = sorted({r["batch"] for r in results})
        axis.set_xscale("log", base=2)
        axis.set_xticks(batches, [str(b) for b in batches])
        axis.minorticks_off()
        axis.set_yscale("log")
        axis.set_title(method)
        axis.set_xlabel("batch size")
        axis.grid(True, which="both", alpha=0.3)
        axis.legend(fontsize=7)
    for axis in axes[:, 0]:
        axis.set_ylabel("examples / s")
    meta = report["meta"]
    figure.suptitle(f"fastattr bench: {meta['device_name']}, n_steps {meta['n_steps']}")
    figure.tight_layout()
    figure.savefig(path, dpi=80)
    plt.close(figure)
    return None
