"""Metrics: JSONL log, a one-line progress bar, the sample table and the PNG plot."""

from __future__ import annotations

import json
import math
import os
import sys
import time

PLOTTED = (
    ("reward", ("objective/scores", "objective/rlhf_reward")),
    ("KL", ("objective/kl",)),
    ("entropy", ("objective/entropy",)),
)


NAME = "rlhf_ext.trainer.MetricsWriter"


class MetricsWriter:
    """Appends one JSON object per iteration to ``<output_dir>/metrics.jsonl``."""

    def __init__(self, output_dir: str, filename: str = "metrics.jsonl") -> None:
        """Log to ``output_dir/filename`` (the folder is created)."""
        os.makedirs(output_dir, exist_ok=True)
        self.path = os.path.join(output_dir, filename)

    def append(self, record: dict) -> None:
        """Write ``record`` as one line (non-finite floats as null). A failed write
        (a full disk) is an OSError naming the file; the torn line is cut off."""
        clean = {k: (None if _nonfinite(v) else v) for k, v in record.items()}
        size = os.path.getsize(self.path) if os.path.exists(self.path) else 0
        try:
            with open(self.path, "a") as fh:
                fh.write(json.dumps(clean) + "\n")
        except OSError as exc:
            _cut_back(self.path, size)
            raise OSError(
                exc.errno, f"{NAME}.append: could not write to {self.path}: {exc.strerror or exc}"
            ) from exc

    def truncate_after(self, step: int) -> None:
        """Drop records beyond ``step`` (a resumed run rewrites them)."""
        kept = [r for r in self.read() if r.get("step", 0) <= step]
        with open(self.path, "w") as fh:
            fh.writelines(json.dumps(r) + "\n" for r in kept)

    def read(self) -> list[dict]:
        """Every record written so far. A torn last line (a write cut short: no
        newline at its end) is left out; any other bad line is a ValueError."""
        if not os.path.exists(self.path):
            return []
        with open(self.path) as fh:
            lines = fh.readlines()
        records = []
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as exc:
                if number == len(lines) and not line.endswith("\n"):
                    break  # torn: truncate_after rewrites the file without it
                raise ValueError(f"{NAME}.read: {self.path} line {number}: {exc}") from exc
        return records


def _cut_back(path: str, size: int) -> None:
    """Best effort: truncate ``path`` to ``size`` bytes (drop a partly written line)."""
    try:
        os.truncate(path, size)
    except OSError:
        pass


def _nonfinite(value) -> bool:
    return isinstance(value, float) and not math.isfinite(value)


class ProgressBar:
    """``[#####-----] 12/100 score 0.41 kl 1.20 12.3 it/s`` on one line of stderr."""

    def __init__(self, total: int, enabled: bool = True, width: int = 24) -> None:
        """A bar for ``total`` iterations; nothing is drawn when not ``enabled``."""
        self.total, self.enabled, self.width = total, enabled, width
        self.start = time.perf_counter()
        self.interactive = sys.stderr.isatty()

    def update(self, done: int, metrics: dict) -> None:
        """Redraw for ``done`` iterations with a few headline metrics."""
        if not self.enabled:
            return
        filled = int(self.width * done / max(self.total, 1))
        rate = done / max(time.perf_counter() - self.start, 1e-9)
        line = (
            f"[{'#' * filled}{'-' * (self.width - filled)}] {done}/{self.total} "
            f"score {metrics.get('objective/scores', float('nan')):.3f} "
            f"kl {metrics.get('objective/kl', float('nan')):.3f} "
            f"kl_coef {metrics.get('kl_coef', float('nan')):.4f} {rate:.2f} it/s"
        )
        if self.interactive:
            print("\r" + line, end="", file=sys.stderr, flush=True)
        else:
            print(line, file=sys.stderr, flush=True)

    def close(self) -> None:
        """End the bar's line."""
        if self.enabled and self.interactive:
            print(file=sys.stderr, flush=True)


def format_sample_table(prompts, completions, scores, rows: int = 4) -> str:
    """A small text table of (query, response, score) for the log."""
    lines = ["| query | response | score |", "|---|---|---|"]
    for prompt, completion, score in list(zip(prompts, completions, scores, strict=True))[:rows]:
        lines.append(f"| {prompt[:60]!r} | {completion[:80]!r} | {float(score):.3f} |")
    return "\n".join(lines)


def plot_metrics(records: list[dict], path: str) -> str | None:
    """Reward, KL and entropy curves against the step, as a PNG at ``path``.

    matplotlib is imported here (an optional dependency): without it nothing is
    written and the reason is returned.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed: no plot written"
    fig, axes = plt.subplots(1, len(PLOTTED), figsize=(4.5 * len(PLOTTED), 3.2))
    steps = [r["step"] for r in records]
    for ax, (title, keys) in zip(axes, PLOTTED, strict=True):
        for key in keys:
            ax.plot(steps, [_or_nan(r.get(key)) for r in records], label=key)
        ax.set_title(title)
        ax.set_xlabel("iteration")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return None


def plot_comparison(runs: dict, path: str, panels) -> str | None:
    """Several runs' curves in one PNG at ``path``: ``runs`` maps ``(label, seed)`` to
    a run's per-iteration metrics (dicts with ``"step"``); ``panels`` is a sequence of
    ``(title, metric key)``, one panel each, one line per run (a colour per label, a
    line style per seed). Returns the reason when nothing was written (no matplotlib),
    else None."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed: no plot written"
    labels = list(dict.fromkeys(label for label, _ in runs))  # in the runs' order
    seeds = sorted({seed for _, seed in runs})
    colours = {label: f"C{i}" for i, label in enumerate(labels)}
    styles = {seed: ("-", "--", ":", "-.")[i % 4] for i, seed in enumerate(seeds)}
    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 3.4))
    for ax, (title, key) in zip(axes, panels, strict=True):
        for (label, seed), records in runs.items():
            ax.plot(
                [r["step"] for r in records],
                [_or_nan(r.get(key)) for r in records],
                color=colours[label],
                linestyle=styles[seed],
                label=f"{label} seed {seed}",
            )
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("iteration")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return None


def _or_nan(value) -> float:
    return float("nan") if value is None else float(value)
