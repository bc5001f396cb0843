"""CPU threads (csrc/cpu/cpu_parallel.h, issue 20 item 6): the kernels give the same bits
at any thread count and any task size, the task-size override is checked, and the bench
and the trainer take ``--threads``."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rlhf_ext._backend import compiled_available

ROOT = Path(__file__).resolve().parents[1]
needs_compiled = pytest.mark.skipif(not compiled_available(), reason="needs rlhf_ext._C")

# every CPU kernel that splits work, on inputs large enough to split (bits printed)
KERNELS = """
import hashlib, sys, torch, rlhf_ext
torch.set_num_threads(int(sys.argv[1]))
g = torch.Generator().manual_seed(0)
x, v = torch.randn(96, 700, generator=g), torch.randn(96, 700, generator=g)
m = torch.rand(96, 700, generator=g) < 0.9
out = [*rlhf_ext.gae(x, v, m, gamma=0.99, lam=0.95), rlhf_ext.masked_whiten(x, m),
       rlhf_ext.masked_mean(x, m, dim=1), rlhf_ext.masked_mean(x, m),
       *rlhf_ext.token_logprobs(x, torch.randint(0, 700, (96,), generator=g), return_entropy=True),
       rlhf_ext.kl_penalty(x, v, kind="k3"),
       rlhf_ext.kl_shaped_rewards(x[:, 0], x, v, m, kl_coef=0.1, kl="k1"),
       rlhf_ext.group_advantages(x[:, 0], group_size=8)]
lp = x.clone().requires_grad_()
loss, stats = rlhf_ext.policy_loss(lp, v, x, m, kind="ppo")
loss.backward()
out += [loss.detach(), lp.grad, stats["clipfrac"]]
digest = hashlib.sha256(b"".join(t.detach().contiguous().numpy().tobytes() for t in out))
print(digest.hexdigest())
"""


def _run(code: str, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", code, *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "RLHF_EXT_QUIET": "1", **(env or {})},
        cwd=ROOT,
    )


@needs_compiled
def test_same_bits_at_any_thread_count_and_task_size():
    digests = set()
    for threads in ("1", "2"):
        for task in ("", "1000", "1"):  # the default, a few chunks, one element per task
            result = _run(KERNELS, threads, env={"RLHF_EXT_CPU_MIN_TASK_ELEMENTS": task})
            assert result.returncode == 0, result.stderr
            digests.add(result.stdout.strip())
    assert len(digests) == 1


@needs_compiled
@pytest.mark.parametrize("value", ["abc", "0", "-5", "12x"])
def test_task_size_override_is_checked(value):
    code = "import torch, rlhf_ext; rlhf_ext.masked_mean(torch.randn(4, 4))"
    result = _run(code, env={"RLHF_EXT_CPU_MIN_TASK_ELEMENTS": value})
    assert result.returncode != 0
    assert f"RLHF_EXT_CPU_MIN_TASK_ELEMENTS must be an int >= 1, got '{value}'" in result.stderr


def test_bench_threads_option_sets_torch_threads():
    from bench import harness

    before = torch.get_num_threads()
    try:
        args = harness.parse_args("gae", ["--threads", "1"])
        assert args.threads == 1 and torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
    with pytest.raises(SystemExit):
        harness.parse_args("gae", ["--threads", "0"])


@needs_compiled
@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs 2 cores")
def test_contention_benchmark_runs(capsys):
    from bench.__main__ import main

    before = torch.get_num_threads()
    assert main(["threads", "--quick", "--kernels", "gae", "--no-save"]) == 0
    assert torch.get_num_threads() == before
    out = capsys.readouterr().out
    assert "kernel          shape" in out and "gae             64x256" in out
    assert "cases slower than 2x under contention" in out


def test_trainer_cli_threads_option():
    from rlhf_ext import __main__ as cli
    from rlhf_ext.trainer.demo import run_demo

    with pytest.raises(SystemExit):
        cli.main(["train", "--config", "x.json", "--threads", "0"])
    with pytest.raises(ValueError, match="`threads` must be an int >= 1"):
        run_demo("unused", threads=0)
