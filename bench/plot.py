"""``python -m bench plot [--results-dir DIR | --csv PATH ...] [--out DIR]``: charts of the results.

One PNG per (device, op, dtype), one panel per shape (and per mode, for the ops timed in
several: fwd, fwd+bwd, ...): a horizontal bar per implementation, named on the left, its
median time per call on a log axis, the time and the speedup over the panel's baseline at
the bar's end. Colours say what a bar is (rlhf_ext, the baseline, another peer, a floor
timed on its own), not which implementation, so any number of bars stays readable. For each
(implementation, shape) the newest row in the CSVs is drawn. A memory benchmark
(``trainer_memory``) gets one PNG per device: peak memory and time per configuration.

Reads every ``*.csv`` in the results folder (``--results-dir``, default ``./bench-results``
under the current directory, where the benchmarks write) unless ``--csv`` names files, and
writes the PNGs to ``--out`` (default ``<results folder>/plots``). Needs matplotlib.
The command is also ``python -m rlhf_ext bench plot`` and ``python -m bench.plot``.
"""

from __future__ import annotations

import argparse
import csv
import re
import sys
import textwrap
from collections import Counter, defaultdict
from collections.abc import Sequence
from pathlib import Path

from . import add_results_dir_option, default_results_dir

# Names an implementation had in older CSVs -> the name it has now (the committed rows of
# bench/results/ predate the rename; see bench_linear_logprobs.FLOOR).
RENAMED = {"GEMM floor": "GEMMs alone"}

# Benchmarks of memory rather than speed (bytes 0, peak_mem_mib the result): one figure per
# device with every configuration (their dtype column differs: bf16 autocast), memory and time.
MEMORY_OPS = {"trainer_memory"}

# What the dimensions of each op's shape are (the column holds e.g. "2048x32000").
SHAPE_NAMES = {"logprobs": "N x V", "linear_logprobs": "N x H x V", "integrations": "B x T x V"}

COLOURS = {
    "ours": "#1f77b4",  # rlhf_ext, in any form
    "baseline": "#ff7f0e",  # the peer the speedups are relative to
    "peer": "#8c8c8c",  # the other peers (eager, torch.compile, TorchRL, Liger, ...)
    "floor": "#ffffff",  # timed on its own (e.g. the bare GEMMs), hatched
}
LEGEND = {
    "ours": "rlhf_ext",
    "baseline": "baseline (speedups are over it)",
    "peer": "other peers",
    "floor": "floor: timed on its own, the work no implementation can skip",
}


def load_rows(paths: Sequence[Path]) -> list[dict]:
    """All rows of the given CSV files, as dicts."""
    rows = []
    for path in paths:
        with Path(path).open(newline="") as handle:
            rows.extend(csv.DictReader(handle))
    return rows


def latest(rows: Sequence[dict]) -> dict[tuple, dict[tuple, dict]]:
    """{(device, op, dtype): {(impl, shape): newest row}} (ISO dates sort as text)."""
    groups: dict[tuple, dict[tuple, dict]] = defaultdict(dict)
    for row in rows:
        group = groups[(row["device"], row["op"], row["dtype"])]
        key = (row["impl"], row["shape"])
        if key not in group or row["date"] >= group[key]["date"]:
            group[key] = row
    return groups


def _shape_size(shape: str) -> int:
    size = 1
    for d in shape.split("x"):
        size *= int(d)
    return size


def _renamed(name: str) -> str:
    for old, new in RENAMED.items():
        if name == old or name.startswith(old + " "):
            return new + name[len(old) :]
    return name


def split_modes(rows: Sequence[dict]) -> list[tuple[str, str, dict]]:
    """(mode, name without the mode, row) per row. A script that times several modes names
    every implementation, and its baseline, "<name> <mode>" (harness.mode_name): the mode is
    the last word of the baseline column, where the rows hold more than one; else ""."""
    modes = {row["baseline"].rsplit(" ", 1)[-1] for row in rows if row["baseline"]}
    out = []
    for row in rows:
        mode = row["baseline"].rsplit(" ", 1)[-1] if len(modes) > 1 and row["baseline"] else ""
        name = row["impl"]
        if mode and name.endswith(" " + mode):
            name = name[: -len(mode) - 1]
        out.append((mode, _renamed(name), row))
    return out


def category(name: str, row: dict, baseline: str) -> str:
    """ours / baseline / floor / peer (see COLOURS)."""
    if row["impl"] == baseline:
        return "baseline"
    if row["baseline"] == row["impl"]:  # its own baseline, not the panel's: a floor
        return "floor"
    return "ours" if "rlhf_ext" in name else "peer"


def describe_mode(mode: str) -> str:
    """fwd+bwd+ent -> forward + backward + entropy."""
    words = {"fwd": "forward", "bwd": "backward", "ent": "entropy"}
    return " + ".join(words.get(part, part) for part in mode.split("+"))


def format_ms(ms: float) -> str:
    """A time with its unit: 12.3 us, 4.56 ms, 1.23 s."""
    if ms < 1:
        return f"{ms * 1e3:.3g} us"
    if ms < 1000:
        return f"{ms:.3g} ms"
    return f"{ms / 1e3:.3g} s"


def _panels(group: dict[tuple, dict]) -> list[tuple[str, str, list[tuple[str, dict]]]]:
    """[(shape, mode, [(name, row), ...])], shapes by size, modes in the order they ran."""
    by_panel: dict[tuple[str, str], list[tuple[str, dict]]] = defaultdict(list)
    mode_order: dict[str, int] = {}
    for mode, name, row in split_modes(list(group.values())):
        mode_order.setdefault(mode, len(mode_order))
        by_panel[(row["shape"], mode)].append((name, row))
    keys = sorted(by_panel, key=lambda k: (_shape_size(k[0]), mode_order[k[1]]))
    return [(shape, mode, by_panel[(shape, mode)]) for shape, mode in keys]


def _subtitle(rows: Sequence[dict], gpu: bool) -> str:
    """Versions, threads and dates of the drawn rows."""

    def values(key):
        return ", ".join(sorted({r[key] for r in rows if r.get(key)})) or "-"

    parts = [f"torch {values('torch')}", f"rlhf_ext {values('rlhf_ext')}"]
    if gpu:
        parts += [f"triton {values('triton')}", f"CUDA {values('cuda')}"]
    else:  # torch's CUDA version says nothing about a CPU run; the thread count does
        parts.append(f"{values('threads')} threads")
    parts.append(f"run {', '.join(sorted({r['date'][:10] for r in rows}))}")
    return "   ".join(parts)


def format_speed(base_ms: float, ms: float) -> str:
    """The speedup over the baseline as a label: (4.47x faster), (1.66x slower), (1,570x faster)."""
    speed = base_ms / ms
    ratio = speed if speed >= 1 else 1 / speed
    text = f"{ratio:,.0f}x" if ratio >= 100 else f"{ratio:.3g}x"
    return f"({text} {'faster' if speed >= 1 else 'slower'})"


def plot_group(
    plt, device: str, op: str, dtype: str, rows: dict[tuple, dict], out_dir: Path
) -> Path:
    """Draw one figure (a panel per shape and mode, a bar per implementation); save a PNG."""
    from matplotlib.patches import Patch
    from matplotlib.ticker import FuncFormatter, NullFormatter

    panels = _panels(rows)
    shape_names = SHAPE_NAMES.get(op, "B x T" if panels and "x" in panels[0][0] else "shape")
    # Per panel: its title, and its bars top to bottom as (name, row, kind); footnotes.
    drawn, footnotes = [], []
    rank = {"floor": 0, "ours": 1, "baseline": 2, "peer": 3}
    for shape, mode, items in panels:
        baseline = Counter(r["baseline"] for _, r in items).most_common(1)[0][0]
        bars = [(name, r, category(name, r, baseline)) for name, r in items]
        bars.sort(key=lambda bar: rank[bar[2]])  # stable: each kind in the order it ran
        title = f"{shape_names} = {shape}" + (f",  {mode} ({describe_mode(mode)})" if mode else "")
        floor = next((b for b in bars if b[2] == "floor"), None)
        if floor is not None:
            floor_ms = float(floor[1]["median_ms"])
            faster = [
                n for n, r, k in bars if k != "floor" and float(r["median_ms"]) < 0.95 * floor_ms
            ]
            if faster:
                where = f"{mode} {shape}" if mode else shape
                footnotes += textwrap.wrap(
                    f"* {where}: {' and '.join(faster)} ran faster than the floor "
                    f"'{floor[0]}', which times the same work alone: the timings are noisy "
                    "(e.g. a shared CPU; compare runs), or that work ran another way there "
                    "(e.g. GEMMs of another layout or output dtype).",
                    width=190,
                    subsequent_indent="   ",
                )
        drawn.append((title, baseline, bars, bool(floor is not None and faster)))
    # Layout in inches: the title block, the panels (a title line and 0.3 in per bar), the
    # x axis, the footnotes, the legend.
    top, bottom = 0.95, 0.95 + 0.16 * len(footnotes)
    panel_in = [0.45 + 0.3 * len(bars) for _, _, bars, _ in drawn]
    height = top + bottom + sum(panel_in)
    longest = max(len(name) for _, _, bars, _ in drawn for name, _, _ in bars)
    left = min(4.5, 0.3 + 0.068 * longest)
    # The x range: from half the fastest time, to where the slowest bar's label fits.
    times = [float(r["median_ms"]) for _, _, bars, _ in drawn for _, r, _ in bars]
    lo = min(times) / 2
    label_share = min(0.6, 2.1 / (11 * 0.98 - left))  # of the axis width, for ~25 characters
    hi = lo * (1.08 * max(times) / lo) ** (1 / (1 - label_share))
    fig, axes = plt.subplots(
        len(drawn), 1, figsize=(11, height), sharex=True, squeeze=False,
        gridspec_kw={"height_ratios": panel_in},
    )  # fmt: skip
    fig.subplots_adjust(left=left / 11, right=0.98, top=1 - top / height, bottom=bottom / height,
                        hspace=0.45 / (sum(panel_in) / len(panel_in)))  # fmt: skip
    used = set()
    for ax, (title, baseline, bars, flagged) in zip(axes[:, 0], drawn, strict=True):
        base_ms = next((float(r["median_ms"]) for _, r, _ in bars if r["impl"] == baseline), None)
        for y, (_, row, kind) in enumerate(bars):
            ms = float(row["median_ms"])
            used.add(kind)
            ax.barh(y, ms - lo, left=lo, height=0.7, color=COLOURS[kind], edgecolor="black",
                    linewidth=0.6, hatch="///" if kind == "floor" else None)  # fmt: skip
            label = format_ms(ms)
            if kind == "baseline":
                label += "  (baseline)"
            elif base_ms is not None:
                label += "  " + format_speed(base_ms, ms)
            if kind == "floor" and flagged:
                label += "  *"
            ax.text(ms * 1.08, y, label, va="center", fontsize=8)
        ax.set_yticks(range(len(bars)), [name for name, _, _ in bars], fontsize=8)
        ax.set_ylim(len(bars) - 0.4, -0.6)  # first bar on top
        if base_ms is None:
            title += f"   (no row of the baseline, {baseline}: no speedups)"
        ax.set_title(title, fontsize=9, loc="left")
        ax.grid(axis="x", which="major", linewidth=0.4, alpha=0.5)
    ax = axes[-1, 0]
    ax.set_xscale("log")
    ax.set_xlim(lo, hi)
    plain = FuncFormatter(lambda value, _: f"{value:g}")  # 0.01 ... 100, not 10^-2 ... 10^2
    ax.xaxis.set_major_formatter(plain)
    # Minor labels only at 2x and 5x a decade: every one of 2..9 runs into its neighbours.
    sparse = FuncFormatter(lambda value, _: f"{value:g}" if f"{value:e}"[0] in "25" else "")
    ax.xaxis.set_minor_formatter(sparse if hi / lo < 30 else NullFormatter())
    ax.set_xlabel("median time per call (ms, log scale; lower is faster)")
    all_rows = [r for _, _, bars, _ in drawn for _, r, _ in bars]
    gpu = not re.search(r"\(\d+ cores\)$", device)  # harness.device_name: "<CPU> (N cores)"
    fig.text(0.01, 1 - 0.12 / height, f"{op} on {device}, {dtype}", fontsize=12, ha="left",
             va="top")  # fmt: skip
    fig.text(0.01, 1 - 0.45 / height, _subtitle(all_rows, gpu), fontsize=8, ha="left",
             va="top", color="#444444")  # fmt: skip
    for k, note in enumerate(footnotes):
        fig.text(0.01, (0.3 + 0.16 * (len(footnotes) - k)) / height, note, fontsize=7,
                 ha="left", va="center", style="italic", color="#a00000")  # fmt: skip
    handles = [Patch(facecolor=COLOURS[k], edgecolor="black", hatch="///" if k == "floor" else None,
                     label=LEGEND[k]) for k in COLOURS if k in used]  # fmt: skip
    fig.legend(handles=handles, loc="lower center", ncol=len(handles), fontsize=8, frameon=False,
               bbox_to_anchor=(0.5, 0.0))  # fmt: skip
    slug = re.sub(r"[^a-z0-9]+", "-", f"{op}-{device}-{dtype}".lower()).strip("-")
    path = out_dir / f"{slug}.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main(argv: Sequence[str] | None = None, prog: str = "python -m bench plot") -> int:
    """Draw every (device, op, dtype) group found in the CSVs; returns the exit status."""
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[1])
    where = parser.add_mutually_exclusive_group()
    add_results_dir_option(where, "read DIR/*.csv")
    where.add_argument("--csv", type=Path, nargs="+", default=None, metavar="PATH",
                       help="read these CSV files instead")  # fmt: skip
    parser.add_argument("--out", type=Path, default=None, metavar="DIR",
                        help="write the PNGs here (default: <results folder>/plots)")  # fmt: skip
    args = parser.parse_args(argv)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("bench plot needs matplotlib: pip install matplotlib", file=sys.stderr)
        return 2
    folder = args.results_dir if args.results_dir is not None else default_results_dir()
    paths = args.csv if args.csv else sorted(folder.glob("*.csv"))
    rows = load_rows(paths)
    if not rows:
        where = [str(p) for p in paths] if paths else f"{folder}/*.csv"
        print(f"bench plot: no result rows in {where} (run a benchmark first, or name the "
              "CSVs with --results-dir / --csv)", file=sys.stderr)  # fmt: skip
        return 1
    out = args.out if args.out is not None else folder / "plots"
    out.mkdir(parents=True, exist_ok=True)
    for (device, op, dtype), group in sorted(latest(rows).items()):
        if op not in MEMORY_OPS:
            print(plot_group(plt, device, op, dtype, group, out).resolve())
    memory: dict[tuple, dict] = defaultdict(dict)  # in the order the configurations ran
    for row in rows:
        if row["op"] in MEMORY_OPS:
            group = memory[(row["device"], row["op"])]
            key = (row["impl"], row["shape"])
            if key not in group or row["date"] >= group[key]["date"]:
                group[key] = row
    for (device, op), group in sorted(memory.items()):
        print(plot_memory_group(plt, device, op, group, out).resolve())
    return 0


def plot_memory_group(plt, device: str, op: str, rows: dict[tuple, dict], out_dir: Path) -> Path:
    """A memory benchmark's figure: per shape, the peak extra memory of each configuration
    (left, linear MiB) and its time per call (right), in the order the rows ran."""
    shapes = sorted({shape for _, shape in rows}, key=_shape_size)
    height = 1.2 + 2.2 * len(shapes)
    fig, axes = plt.subplots(
        len(shapes), 2, figsize=(11, height), squeeze=False, gridspec_kw={"wspace": 0.35},
    )  # fmt: skip
    for (ax_mem, ax_time), shape in zip(axes, shapes, strict=True):
        items = [r for (_, s), r in rows.items() if s == shape]
        baseline = Counter(r["baseline"] for r in items).most_common(1)[0][0]
        base = next((r for r in items if r["impl"] == baseline), None)
        names = [r["impl"] for r in items]
        colours = [COLOURS["baseline" if r["impl"] == baseline else "ours"] for r in items]
        for ax, key, unit in ((ax_mem, "peak_mem_mib", "MiB"), (ax_time, "median_ms", "ms")):
            values = [_number(r[key]) for r in items]
            ax.barh(range(len(items)), values, color=colours, edgecolor="black", linewidth=0.6)
            for y, (value, r) in enumerate(zip(values, items, strict=True)):
                label = f"{value:.0f} {unit}" if unit == "MiB" else format_ms(value)
                if base is not None and r is not base and _number(base[key]) > 0:
                    label += f"  ({value / _number(base[key]):.2f}x {baseline})"
                ax.text(value, y, " " + label, va="center", fontsize=8)
            ax.set_yticks(range(len(items)), names, fontsize=8)
            ax.set_ylim(len(items) - 0.4, -0.6)
            ax.set_xlim(0, 1.45 * max(values + [1e-9]))
            ax.grid(axis="x", linewidth=0.4, alpha=0.5)
        ax_mem.set_title(f"B x T = {shape}: peak extra memory (MiB; lower is better)",
                         fontsize=9, loc="left")  # fmt: skip
        ax_time.set_title("time per call (ms; lower is faster)", fontsize=9, loc="left")
        note = items[0].get("note", "")
        if note:
            ax_mem.set_xlabel(note, fontsize=7, color="#444444")
    all_rows = list(rows.values())
    fig.text(0.01, 1 - 0.12 / height, f"{op} on {device}", fontsize=12, ha="left", va="top")
    subtitle = _subtitle(all_rows, False) + "   orange: the baseline; blue: with the switches"
    fig.text(0.01, 1 - 0.45 / height, subtitle, fontsize=8, ha="left", va="top",
             color="#444444")  # fmt: skip
    fig.subplots_adjust(left=0.1, right=0.98, top=1 - 0.95 / height, bottom=0.55 / height)
    slug = re.sub(r"[^a-z0-9]+", "-", f"{op}-{device}".lower()).strip("-")
    path = out_dir / f"{slug}.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _number(text) -> float:
    """A CSV cell as a float (0 for an empty or 'n/a' one)."""
    try:
        return float(text)
    except (TypeError, ValueError):
        return 0.0


if __name__ == "__main__":
    sys.exit(main())
