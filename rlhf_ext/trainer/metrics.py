"""Metrics: JSONL log, a one-line progress bar, the sample table and the PNG plot."""

from __future__ import annotations

import json
import math
import os
import sys
import time
from dataclasses import dataclass

NAME = "rlhf_ext.trainer.MetricsWriter"


TENSORBOARD_DIR = "tensorboard"  # under output_dir: `tensorboard --logdir <output_dir>`


class MetricsWriter:
    """Appends one JSON object per iteration to ``<output_dir>/metrics.jsonl`` and,
    with ``report_to=("tensorboard",)``, the same numbers as TensorBoard scalars
    (``torch.utils.tensorboard``; needs the ``tensorboard`` package) in
    ``<output_dir>/tensorboard``, at the record's ``step``."""

    def __init__(
        self, output_dir: str, filename: str = "metrics.jsonl", report_to: tuple = ()
    ) -> None:
        """Log to ``output_dir/filename`` (the folder is created)."""
        os.makedirs(output_dir, exist_ok=True)
        self.path = os.path.join(output_dir, filename)
        self.tensorboard_dir = None
        self._tensorboard = None  # opened at the first record: one event file per run
        self._purge_step = None
        if "tensorboard" in report_to:
            self.tensorboard_dir = os.path.join(output_dir, TENSORBOARD_DIR)
            _summary_writer_class()  # a missing package fails now, not at iteration 1

    def append(self, record: dict) -> None:
        """Write ``record`` as one line (non-finite floats as null), and its numbers to
        TensorBoard when enabled. A failed write (a full disk) is an OSError naming the
        file; the torn line is cut off."""
        self._append_line(record)
        if self.tensorboard_dir is not None:
            if self._tensorboard is None:
                self._tensorboard = _summary_writer_class()(
                    log_dir=self.tensorboard_dir, purge_step=self._purge_step
                )
            step = int(record.get("step", 0))
            for key, value in record.items():
                if key != "step" and isinstance(value, int | float) and not isinstance(value, bool):
                    self._tensorboard.add_scalar(key, value, step)
            self._tensorboard.flush()

    def close(self) -> None:
        """Close the TensorBoard writer (the JSONL file is closed after every line)."""
        if self._tensorboard is not None:
            self._tensorboard.close()
            self._tensorboard = None

    def _append_line(self, record: dict) -> None:
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
        """Drop records beyond ``step`` (a resumed run rewrites them); TensorBoard's
        events after ``step`` are purged when the next one is written."""
        kept = [r for r in self.read() if r.get("step", 0) <= step]
        with open(self.path, "w") as fh:
            fh.writelines(json.dumps(r) + "\n" for r in kept)
        if self.tensorboard_dir is not None:
            self.close()
            self._purge_step = step + 1  # the next writer drops the events after `step`

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


def _summary_writer_class():
    """``torch.utils.tensorboard.SummaryWriter``; an ImportError that says what to
    install when the tensorboard package is missing."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # torch's module imports the tensorboard package
        raise ImportError(
            f"{NAME}: report_to=['tensorboard'] needs the tensorboard package: "
            "pip install tensorboard (or pip install 'rlhf_ext[tensorboard]')"
        ) from None
    return SummaryWriter


def _cut_back(path: str, size: int) -> None:
    """Best effort: truncate ``path`` to ``size`` bytes (drop a partly written line)."""
    try:
        os.truncate(path, size)
    except OSError:
        pass


def _nonfinite(value) -> bool:
    return isinstance(value, float) and not math.isfinite(value)


def format_duration(seconds: float) -> str:
    """``m:ss`` under an hour, ``h:mm:ss`` above ("?" for a non-finite or negative time)."""
    if not math.isfinite(seconds) or seconds < 0:
        return "?"
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def progress_line(
    done: int, total: int, metrics: dict, elapsed: float, done_here: int, width: int = 24
) -> str:
    """The progress bar's text for ``done`` of ``total`` iterations: a few headline
    metrics, the speed, the time taken and an ETA. The speed is ``done_here``
    iterations over ``elapsed`` seconds, both counted in this process (after a
    resume ``done`` also counts the iterations before it, which took no time here)."""
    filled = min(int(width * done / max(total, 1)), width)
    rate = done_here / elapsed if done_here > 0 and elapsed > 0 else None
    if rate is None:
        speed, eta = "? it/s", "?"
    else:
        speed = f"{rate:.2f} it/s" if rate >= 1 else f"{1 / rate:.1f} s/it"
        eta = format_duration(max(total - done, 0) / rate)
    return (
        f"[{'#' * filled}{'-' * (width - filled)}] {done}/{total} "
        f"score {metrics.get('objective/scores', float('nan')):.3f} "
        f"kl {metrics.get('objective/kl', float('nan')):.3f} "
        f"kl_coef {metrics.get('kl_coef', float('nan')):.4f} | "
        f"{speed}, {format_duration(elapsed)} elapsed, ETA {eta}"
    )


class ProgressBar:
    """``[#####---] 12/100 score 0.410 kl 1.200 kl_coef 0.2000 | 2.50 it/s, 0:04
    elapsed, ETA 0:35`` on stderr (see :func:`progress_line`).

    On a terminal the line is redrawn in place. Elsewhere (a log file, a pipe) a full
    line is printed at the first update, at every tenth of the run, at least every
    ``log_every_s`` seconds, and at the last iteration, not once per iteration.
    """

    def __init__(
        self,
        total: int,
        enabled: bool = True,
        width: int = 24,
        *,
        initial: int = 0,
        stream=None,
        clock=time.perf_counter,
        interactive: bool | None = None,
        log_every_s: float = 30.0,
    ) -> None:
        """A bar for iterations ``initial`` (a resumed run's first) to ``total``;
        nothing is drawn when not ``enabled``. ``stream`` (default stderr), ``clock``
        and ``interactive`` (default: whether ``stream`` is a terminal) are for tests."""
        self.total, self.enabled, self.width = total, enabled, width
        self.initial = initial
        self.stream = stream if stream is not None else sys.stderr
        self.clock = clock
        self.start = clock()
        if interactive is None:
            isatty = getattr(self.stream, "isatty", None)
            interactive = bool(isatty and isatty())
        self.interactive = interactive
        self.log_every_s = log_every_s
        self._drawn = 0  # length of the line on screen (interactive), 0: none open
        self._last_print = None  # (time, tenth) of the last printed line (not interactive)

    def update(self, done: int, metrics: dict) -> None:
        """Redraw for ``done`` iterations with a few headline metrics."""
        if not self.enabled:
            return
        now = self.clock()
        elapsed = now - self.start
        line = progress_line(done, self.total, metrics, elapsed, done - self.initial, self.width)
        if self.interactive:
            pad = " " * max(self._drawn - len(line), 0)  # a shorter line hides the longer
            self.stream.write("\r" + line + pad)
            self.stream.flush()
            self._drawn = len(line)
            return
        tenth = 10 * done // max(self.total, 1)
        last = self._last_print
        due = (
            last is None
            or done >= self.total
            or tenth > last[1]
            or now - last[0] >= self.log_every_s
        )
        if due:
            self.stream.write(line + "\n")
            self.stream.flush()
            self._last_print = (now, tenth)

    def break_line(self) -> None:
        """End the bar's line on a terminal, so that a log message starts on a line
        of its own (the next update draws the bar again)."""
        if self.enabled and self.interactive and self._drawn:
            self.stream.write("\n")
            self.stream.flush()
            self._drawn = 0

    def close(self) -> None:
        """End the bar's line."""
        self.break_line()


def format_sample_table(prompts, completions, scores, rows: int = 4) -> str:
    """A small text table of (query, response, score) for the log."""
    lines = ["| query | response | score |", "|---|---|---|"]
    for prompt, completion, score in list(zip(prompts, completions, scores, strict=True))[:rows]:
        lines.append(f"| {prompt[:60]!r} | {completion[:80]!r} | {float(score):.3f} |")
    return "\n".join(lines)


# ------------------------------------------------------------------ plots
@dataclass(frozen=True)
class Panel:
    """One panel of a figure: ``keys`` (metric names) drawn against the iteration,
    with ``labels`` in the legend (defaults: the keys), a ``ylabel`` with the units,
    an optional horizontal ``target`` line (labelled ``target_label``), and ``log``
    (True / False; None: a log scale when the positive values span 10x or more)."""

    title: str
    keys: tuple[str, ...]
    ylabel: str = ""
    labels: tuple[str, ...] = ()
    target: float | None = None
    target_label: str = "target"
    log: bool | None = None


ITERATION = "iteration"
KL_UNITS = "nats / sequence (sum of per-token k1)"
# what the per-run figure calls the metrics a `metrics_fn` may add (others: their name)
METRIC_LABELS = {
    "demo/hidden_rule": (
        "hidden rule: the demo's true goal",
        "fraction of a-class tokens (0 to 1)",
    ),
}
# the trainer's own metrics; any other numeric key came from `metrics_fn`
_TRAINER_PREFIXES = ("objective/", "policy/", "loss/", "val/", "train/", "time/")
_TRAINER_KEYS = {"kl_coef", "lr", "value_lr", "tokens/s", "step", "episode"}
_MAX_EXTRA_PANELS = 3
NO_MATPLOTLIB = "matplotlib is not installed: no plot written"


def run_panels(
    records: list[dict],
    kl_target: float | None = None,
    score_shaping: str | None = None,
    kl_in_reward: bool = True,
) -> list[Panel]:
    """The per-run figure's panels: each ``metrics_fn`` metric (the demo's hidden
    rule), the raw score, what the policy is trained on (the shaped score, the KL
    penalty and their sum ``rlhf_reward``), the KL with the adaptive controller's
    ``kl_target`` (None: a fixed coefficient), the KL coefficient and the entropy.
    ``score_shaping`` says what shaped the score; ``kl_in_reward`` False: the KL is a
    loss term (no penalty in the reward)."""
    panels = []
    for key in extra_metric_keys(records)[:_MAX_EXTRA_PANELS]:
        title, ylabel = METRIC_LABELS.get(key, (key, "metrics_fn value"))
        panels.append(Panel(title, (key,), ylabel))
    shaped = "shaped score" + (f" ({score_shaping})" if score_shaping else "")
    panels += [
        Panel(
            "score (the reward's raw output)",
            ("objective/scores",),
            "mean over the rollouts, reward's units",
        ),
        Panel(
            "what the policy is trained on\nrlhf_reward = shaped score − kl_coef × KL",
            ("objective/shaped_scores", "objective/non_score_reward", "objective/rlhf_reward"),
            "per sequence, mean (shaped units)",
            labels=(
                shaped,
                "KL penalty −kl_coef × KL"
                + ("" if kl_in_reward else " (0: the KL is a loss term)"),
                "rlhf_reward, their sum: falls as the policy buys KL",
            ),
        ),
        Panel(
            "KL to the reference",
            ("objective/kl",),
            KL_UNITS,
            labels=("KL (rollouts)",),
            target=kl_target,
            target_label=f"target {kl_target:g} (adaptive controller)" if kl_target else "",
        ),
        Panel(
            f"KL coefficient kl_coef ({'fixed' if kl_target is None else 'adaptive'})",
            ("kl_coef",),
            "coefficient (reward per nat)",
        ),
        Panel("entropy of the policy", ("objective/entropy",), "nats / sequence (sum)"),
    ]
    return panels


def extra_metric_keys(records: list[dict]) -> list[str]:
    """Numeric metrics in ``records`` that are not the trainer's own (a
    ``metrics_fn``'s), in the order they first appear."""
    keys = {}
    for record in records:
        for key, value in record.items():
            ours = key in _TRAINER_KEYS or key.startswith(_TRAINER_PREFIXES)
            if not ours and isinstance(value, int | float) and not isinstance(value, bool):
                keys[key] = None
    return list(keys)


def plot_metrics(
    records: list[dict],
    path: str,
    *,
    title: str | None = None,
    kl_target: float | None = None,
    score_shaping: str | None = None,
    kl_in_reward: bool = True,
) -> str | None:
    """One run's curves against the iteration, as a PNG at ``path`` (the panels of
    :func:`run_panels`, which takes the keywords but ``title``), under ``title``.

    matplotlib is imported here (an optional dependency): without it nothing is
    written and the reason is returned.
    """
    panels = run_panels(records, kl_target, score_shaping, kl_in_reward)
    fig, axes = _figure(len(panels), title)
    if fig is None:
        return NO_MATPLOTLIB
    steps = [r["step"] for r in records]
    for ax, panel in zip(axes, panels, strict=False):
        labels = panel.labels or panel.keys
        for key, label in zip(panel.keys, labels, strict=True):
            ax.plot(steps, [_or_nan(r.get(key)) for r in records], label=label)
        _finish_panel(ax, panel)
        _legend_below(ax)
    fig.savefig(path, dpi=100)
    return None


def plot_comparison(
    runs: dict, path: str, panels, title: str | None = None, note: str | None = None
) -> str | None:
    """Several runs' curves in one PNG at ``path``: ``runs`` maps ``(label, seed)`` to
    a run's per-iteration metrics (dicts with ``"step"``); ``panels`` is a sequence of
    :class:`Panel` (one metric key each), one line per run (a colour per label, a line
    style per seed), explained by one legend in the last cell, above ``note``. Returns
    the reason when nothing was written (no matplotlib), else None."""
    panels = [p if isinstance(p, Panel) else Panel(p[0], (p[1],)) for p in panels]
    labels = list(dict.fromkeys(label for label, _ in runs))  # in the runs' order
    seeds = sorted({seed for _, seed in runs})
    colours = {label: f"C{i}" for i, label in enumerate(labels)}
    styles = {seed: ("-", "--", ":", "-.")[i % 4] for i, seed in enumerate(seeds)}
    fig, axes = _figure(len(panels) + 1, title)
    if fig is None:
        return NO_MATPLOTLIB
    for ax, panel in zip(axes, panels, strict=False):
        (key,) = panel.keys
        for (label, seed), records in runs.items():
            ax.plot(
                [r["step"] for r in records],
                [_or_nan(r.get(key)) for r in records],
                color=colours[label],
                linestyle=styles[seed],
                linewidth=1.2,
            )
        _finish_panel(ax, panel)
        if panel.target is not None:
            ax.legend(loc="best", fontsize=7)  # the target line only: small, out of the way
    from matplotlib.lines import Line2D

    key_ax = axes[len(panels)]
    key_ax.set_axis_off()
    handles = [Line2D([], [], color=colours[label], label=label) for label in labels]
    handles += [
        Line2D([], [], color="0.3", linestyle=styles[seed], label=f"seed {seed}") for seed in seeds
    ]
    key_ax.legend(handles=handles, loc="upper center", fontsize=9, frameon=False)
    if note:
        key_ax.text(0.5, 0.0, note, ha="center", va="bottom", fontsize=8, wrap=True)
    fig.savefig(path, dpi=100)
    return None


def _figure(cells: int, title: str | None, ncols: int = 3):
    """``(figure, axes)``: a grid of ``cells`` panels (unused cells hidden), or
    ``(None, None)`` without matplotlib. A bare Figure, not pyplot: the caller's
    matplotlib backend and pyplot's figure list are left alone."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        return None, None
    ncols = min(ncols, cells)
    nrows = -(-cells // ncols)
    fig = Figure(figsize=(4.8 * ncols, 3.6 * nrows + 0.4), layout="constrained")
    axes = list(fig.subplots(nrows, ncols, squeeze=False).flat)
    for ax in axes[cells:]:
        ax.set_axis_off()
    if title:
        fig.suptitle(title, fontsize=11)
    return fig, axes


def _finish_panel(ax, panel: Panel) -> None:
    """Title, axis labels, the target line and the scale of one panel."""
    ax.set_title(panel.title, fontsize=9)
    ax.set_xlabel(ITERATION, fontsize=8)
    ax.set_ylabel(panel.ylabel, fontsize=8)
    ax.tick_params(labelsize=8)
    ax.grid(alpha=0.3)
    curves = [v for line in ax.get_lines() for v in line.get_ydata()]  # before the target
    if panel.target is not None:
        ax.axhline(panel.target, color="k", linestyle="--", linewidth=1, label=panel.target_label)
    if panel.log or (panel.log is None and spans_a_decade(curves)):
        from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

        ax.set_yscale("log")
        ax.yaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
        ax.yaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
        ax.yaxis.set_minor_formatter(NullFormatter())
        ax.set_ylabel(panel.ylabel + ", log scale", fontsize=8)


def spans_a_decade(values) -> bool:
    """Whether finite ``values`` are all positive and span a factor of 10 or more
    (a panel's curves then get a log scale)."""
    finite = [float(v) for v in values if math.isfinite(float(v))]
    return bool(finite) and min(finite) > 0 and max(finite) >= 10 * min(finite)


def _legend_below(ax) -> None:
    """The legend of a panel of several lines (a target included), under its axes
    where it hides no curve."""
    if len(ax.get_lines()) > 1:
        ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.2), fontsize=7, frameon=False)


def _or_nan(value) -> float:
    return float("nan") if value is None else float(value)
