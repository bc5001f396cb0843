"""``python -m bench.plot [--csv PATH ...] [--out DIR]``: bar charts of the results.

One PNG per (device, op, dtype): median time per implementation, grouped by shape, on a
log scale. For each (implementation, shape) the latest row in the CSVs is drawn. Reads
every ``bench/results/*.csv`` unless ``--csv`` names files. Needs matplotlib.
"""

from __future__ import annotations

import argparse
import csv
import re
import sys
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

from bench.harness import RESULTS_DIR


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


def plot_group(
    plt, device: str, op: str, dtype: str, rows: dict[tuple, dict], out_dir: Path
) -> Path:
    """Draw one grouped bar chart (x: shape, bars: implementation) and save it as PNG."""
    shapes = sorted({shape for _, shape in rows}, key=_shape_size)
    impls = list(dict.fromkeys(impl for impl, _ in rows))
    width = 0.8 / max(len(impls), 1)
    fig, ax = plt.subplots(figsize=(max(6.0, 1.6 * len(shapes) * max(len(impls), 1) * 0.5), 4.5))
    for k, impl in enumerate(impls):
        xs, ys = [], []
        for i, shape in enumerate(shapes):
            row = rows.get((impl, shape))
            if row is not None:
                xs.append(i - 0.4 + width * (k + 0.5))
                ys.append(float(row["median_ms"]))
        bars = ax.bar(xs, ys, width=width, label=impl)
        for bar, y in zip(bars, ys, strict=True):
            ax.annotate(
                f"{y:.3g}",
                (bar.get_x() + bar.get_width() / 2, y),
                ha="center",
                va="bottom",
                fontsize=6,
                rotation=90,
            )
    ax.set_xticks(range(len(shapes)), [f"{s}\n{dtype}" for s in shapes])
    ax.set_yscale("log")
    ax.set_ylabel("median time per call (ms, log scale)")
    ax.set_title(f"{op} on {device}")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    slug = re.sub(r"[^a-z0-9]+", "-", f"{op}-{device}-{dtype}".lower()).strip("-")
    path = out_dir / f"{slug}.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main(argv: Sequence[str] | None = None) -> int:
    """Draw every (device, op, dtype) group found in the CSVs; returns the exit status."""
    parser = argparse.ArgumentParser(
        prog="python -m bench.plot", description=__doc__.splitlines()[0]
    )
    parser.add_argument(
        "--csv", type=Path, nargs="*", default=None, help="CSV files (default: bench/results/*.csv)"
    )
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "plots", help="output folder")
    args = parser.parse_args(argv)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("bench.plot needs matplotlib: pip install matplotlib", file=sys.stderr)
        return 2
    paths = args.csv if args.csv else sorted(RESULTS_DIR.glob("*.csv"))
    rows = load_rows(paths)
    if not rows:
        print(
            f"bench.plot: no result rows in {[str(p) for p in paths] or str(RESULTS_DIR)}",
            file=sys.stderr,
        )
        return 1
    args.out.mkdir(parents=True, exist_ok=True)
    for (device, op, dtype), group in sorted(latest(rows).items()):
        print(plot_group(plt, device, op, dtype, group, args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
