"""The trainer's progress bar (ETA, rate after a resume, log files), its figures and
the line naming what train() wrote. Pure functions and a fake clock; one tiny run."""

from __future__ import annotations

import importlib.util
import io
import os

import pytest
import trainer_helpers as th
from trainer_helpers import one_thread  # noqa: F401  (autouse fixture)

from rlhf_ext.trainer import metrics as metrics_module
from rlhf_ext.trainer.metrics import (
    Panel,
    ProgressBar,
    extra_metric_keys,
    format_duration,
    plot_comparison,
    plot_metrics,
    progress_line,
    run_panels,
    spans_a_decade,
)

HEADLINE = {"objective/scores": 0.41, "objective/kl": 1.2, "kl_coef": 0.2}
HAS_MATPLOTLIB = importlib.util.find_spec("matplotlib") is not None


class FakeClock:
    """A clock that moves only when told."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.mark.parametrize(
    "seconds, text",
    [
        (0, "0:00"),
        (59.4, "0:59"),
        (59.6, "1:00"),
        (754, "12:34"),
        (3599, "59:59"),
        (3600, "1:00:00"),
        (90061, "25:01:01"),
        (float("nan"), "?"),
        (float("inf"), "?"),
        (-1, "?"),
    ],
)
def test_format_duration(seconds, text):
    assert format_duration(seconds) == text


def test_progress_line_has_the_rate_elapsed_time_and_eta():
    line = progress_line(30, 100, HEADLINE, elapsed=15.0, done_here=30, width=10)
    assert line == (
        "[###-------] 30/100 score 0.410 kl 1.200 kl_coef 0.2000 | "
        "2.00 it/s, 0:15 elapsed, ETA 0:35"
    )


def test_progress_line_slow_runs_and_unknown_rates():
    slow = progress_line(1, 1000, HEADLINE, elapsed=8.0, done_here=1, width=10)
    assert slow.endswith("| 8.0 s/it, 0:08 elapsed, ETA 2:13:12")  # 999 x 8 s
    assert progress_line(0, 10, {}, elapsed=0.0, done_here=0).endswith(
        "? it/s, 0:00 elapsed, ETA ?"
    )
    assert "score nan kl nan kl_coef nan" in progress_line(1, 10, {}, elapsed=1.0, done_here=1)
    done = progress_line(10, 10, HEADLINE, elapsed=5.0, done_here=10, width=4)
    assert done.startswith("[####] 10/10") and done.endswith("ETA 0:00")


def test_after_a_resume_the_rate_counts_only_this_processs_iterations():
    clock = FakeClock()
    stream = io.StringIO()
    bar = ProgressBar(100, initial=50, stream=stream, clock=clock, interactive=False)
    clock.now += 4.0
    bar.update(52, HEADLINE)  # 2 iterations in 4 s here; 52 / 4 = 13 it/s would be wrong
    assert stream.getvalue().endswith("| 2.0 s/it, 0:04 elapsed, ETA 1:36\n")  # 48 x 2 s


def test_a_log_file_gets_a_line_per_tenth_not_per_iteration():
    clock = FakeClock()
    stream = io.StringIO()
    bar = ProgressBar(100, stream=stream, clock=clock, interactive=False)
    for done in range(1, 101):
        clock.now += 0.5
        bar.update(done, HEADLINE)
    bar.close()
    lines = stream.getvalue().splitlines()
    assert "\r" not in stream.getvalue()
    assert [line.split()[1] for line in lines] == [f"{n}/100" for n in [1, *range(10, 101, 10)]]
    assert lines[-1].endswith("2.00 it/s, 0:50 elapsed, ETA 0:00")


def test_a_log_file_gets_a_line_at_least_every_log_every_s():
    clock = FakeClock()
    stream = io.StringIO()
    bar = ProgressBar(1000, stream=stream, clock=clock, interactive=False, log_every_s=30.0)
    for done in range(1, 31):
        clock.now += 10.0  # 10 s an iteration: a tenth of the run is 1000 s
        bar.update(done, HEADLINE)
    printed = [int(line.split()[1].split("/")[0]) for line in stream.getvalue().splitlines()]
    assert printed == [1, 4, 7, 10, 13, 16, 19, 22, 25, 28]


def test_a_terminal_redraws_one_line_and_log_messages_get_their_own():
    clock = FakeClock()
    stream = io.StringIO()
    bar = ProgressBar(10, stream=stream, clock=clock, interactive=True, width=4)
    clock.now += 1.0
    bar.update(1, {**HEADLINE, "objective/scores": -12345.678})
    first = stream.getvalue()
    assert first.startswith("\r[----] 1/10 score -12345.678") and "\n" not in first
    clock.now += 1.0
    bar.update(2, HEADLINE)  # a shorter line: blanks cover the end of the longer one
    second = stream.getvalue()[len(first) :]
    assert second.startswith("\r[----] 2/10 score 0.410") and len(second) == len(first)
    bar.break_line()
    assert stream.getvalue().endswith("\n")
    bar.break_line()  # nothing open: no empty line
    bar.close()
    assert not stream.getvalue().endswith("\n\n")


def test_a_disabled_bar_writes_nothing():
    stream = io.StringIO()
    bar = ProgressBar(10, enabled=False, stream=stream, interactive=True)
    bar.update(1, HEADLINE)
    bar.break_line()
    bar.close()
    assert stream.getvalue() == ""


def test_the_trainer_counts_the_rate_from_its_resume(tmp_path, monkeypatch):
    seen = []

    class Recording(ProgressBar):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            seen.append(self.initial)

    monkeypatch.setattr("rlhf_ext.trainer.ppo.ProgressBar", Recording)
    trainer = th.tiny_trainer(tmp_path, total_iterations=1)
    trainer.train(th.prompts())
    trainer.train(th.prompts(), iterations=2)
    assert seen == [0, 1]


def test_train_says_where_it_wrote_its_outputs(tmp_path):
    trainer = th.tiny_trainer(tmp_path, total_iterations=2)
    trainer.train(th.prompts())
    outputs = trainer.outputs
    assert outputs["output_dir"] == str(tmp_path)
    assert outputs["metrics"] == os.path.join(str(tmp_path), "metrics.jsonl")
    assert outputs["checkpoint"] == os.path.join(str(tmp_path), "checkpoint.pt")
    assert outputs["plot"] == (
        os.path.join(str(tmp_path), "metrics.png") if HAS_MATPLOTLIB else None
    )
    for key in ("metrics", "checkpoint", "plot"):
        assert outputs[key] is None or os.path.exists(outputs[key])
    lines = [line for line in trainer._log_stream.lines if ".train: wrote" in line]
    plot = "metrics.png" if HAS_MATPLOTLIB else "no plot"
    assert lines == [
        "rlhf_ext.trainer.PPOTrainer.train: wrote metrics.jsonl (iterations 1-2), "
        f"{plot}, checkpoint.pt (iteration 2) in {tmp_path}"
    ]


def test_the_per_run_panels_name_units_targets_and_extra_metrics():
    records = [
        {"step": 1, "objective/kl": 0.0, "kl_coef": 0.2, "demo/hidden_rule": 0.2, "mine": 3},
        {"step": 2, "objective/kl": 1.0, "kl_coef": 0.3, "lr": 1e-3, "flag": True, "note": "x"},
    ]
    assert extra_metric_keys(records) == ["demo/hidden_rule", "mine"]
    panels = run_panels(records, kl_target=6.0, score_shaping="clipped at ±5")
    titles = [p.title for p in panels]
    assert titles[0] == "hidden rule: the demo's true goal" and titles[1] == "mine"
    kl = next(p for p in panels if p.keys == ("objective/kl",))
    assert kl.target == 6.0 and "nats / sequence" in kl.ylabel and "target 6" in kl.target_label
    reward = next(p for p in panels if "objective/rlhf_reward" in p.keys)
    assert "kl_coef × KL" in reward.title and reward.labels[0] == "shaped score (clipped at ±5)"
    assert any(p.keys == ("kl_coef",) and "adaptive" in p.title for p in panels)
    fixed = run_panels(records, kl_target=None, kl_in_reward=False)
    assert next(p for p in fixed if p.keys == ("objective/kl",)).target is None
    assert "loss term" in next(p for p in fixed if "objective/rlhf_reward" in p.keys).labels[1]
    assert any(p.keys == ("kl_coef",) and "fixed" in p.title for p in fixed)


@pytest.mark.parametrize(
    "values, log",
    [
        ([0.2, 0.19, 1.8], False),
        ([0.11, 1.96], True),
        ([0.0, 5.0], False),  # not positive
        ([-1.0, 20.0], False),
        ([float("nan"), 0.1, 1.0], True),
        ([], False),
    ],
)
def test_a_log_scale_when_the_values_span_a_decade(values, log):
    assert spans_a_decade(values) is log


@pytest.mark.skipif(not HAS_MATPLOTLIB, reason="matplotlib is not installed")
def test_figures_are_written_without_touching_pyplot(tmp_path):
    import matplotlib

    backend = matplotlib.get_backend()
    records = [
        {
            "step": i,
            "objective/scores": -1.0 + i,
            "objective/shaped_scores": 0.1 * i,
            "objective/non_score_reward": -0.05 * i,
            "objective/rlhf_reward": 0.05 * i,
            "objective/kl": 0.5 * i,
            "objective/entropy": 10.0 - i,
            "kl_coef": 0.1 * 1.5**i,
            "demo/hidden_rule": 0.1 * i,
        }
        for i in range(1, 9)
    ]
    path = tmp_path / "run.png"
    assert plot_metrics(records, str(path), title="ppo seed 0", kl_target=2.0) is None
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    runs = {("PPO", 0): records, ("PPO", 1): records[:4], ("GRPO", 0): records}
    panels = [Panel("KL", ("objective/kl",), "nats", target=2.0), ("entropy", "objective/entropy")]
    both = tmp_path / "both.png"
    assert plot_comparison(runs, str(both), panels, title="t", note="n") is None
    assert both.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert matplotlib.get_backend() == backend
    assert "matplotlib.pyplot" not in vars(metrics_module)
