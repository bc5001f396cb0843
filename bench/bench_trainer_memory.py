"""``python -m bench trainer_memory``: the trainer's loss pass under its memory switches.

One forward and backward of the trainer's policy pass (log-probs and entropy of every
response token, as ``PPOTrainer._forward`` computes them for the loss) on a built-in GPT
with a GPT-2-sized vocabulary, in six configurations: ``plain`` (logits ``[B, T, V]`` then
``token_logprobs``), ``fused`` (``fused_lm_head``: ``linear_token_logprobs`` from the hidden
states, no logits), ``ckpt`` (``gradient_checkpointing``), ``fused+ckpt``, ``bf16`` (bfloat16
autocast) and ``fused+bf16``. It reports the peak memory the pass allocates beyond the
model, its gradients and the inputs (CUDA: ``max_memory_allocated``; CPU: the growth of the
resident set's peak) and the pass's median time. Rows go to the device's CSV (op
``trainer_memory``, impl the configuration, baseline ``plain``; ``bytes`` is 0: this is a
memory benchmark, not a bandwidth one).

What to expect: the plain pass holds the float32 logits of every position (``B x T x V x 4``
bytes) and their gradient; the fused pass holds one logits tile (CPU: 256 MiB at most) and
per-row statistics, so its peak no longer grows with ``B x T x V``.
"""

from __future__ import annotations

import statistics
import tempfile
import time

import torch

from . import harness

OP = "trainer_memory"
CONFIGS = {
    "plain": {},
    "fused": {"fused_lm_head": True},
    "ckpt": {"gradient_checkpointing": True},
    "fused+ckpt": {"fused_lm_head": True, "gradient_checkpointing": True},
    "bf16": {"bf16": True},
    "fused+bf16": {"fused_lm_head": True, "bf16": True},
}
# (rows, query tokens, response tokens, vocabulary, width, layers)
FULL = (8, 16, 512, 50257, 256, 4)
QUICK = (4, 8, 56, 8192, 64, 2)


class _Tokenizer:
    pad_token_id = 0
    eos_token_id = 2

    def encode(self, text):
        return [1]

    def decode(self, ids, skip_special_tokens=True):
        return ""


def build_pass(settings: dict, shape: tuple, device: torch.device):
    """A trainer with ``settings`` and a callable running its loss pass (forward and
    backward) on a fixed random batch; the gradients are allocated by one warm-up call."""
    from rlhf_ext.trainer import GPTConfig, PPOConfig, PPOTrainer, TinyGPT
    from rlhf_ext.trainer.rollout import Batch

    rows, query, response, vocab, width, layers = shape
    torch.manual_seed(0)
    gpt = GPTConfig(vocab, n_layer=layers, n_head=4, d_model=width, max_seq_len=query + response)
    policy = TinyGPT(gpt).to(device)
    config = PPOConfig(
        advantage_estimator="grpo",
        num_generations=2,
        rollout_batch_size=rows,
        mini_batch_size=rows,
        output_dir=tempfile.mkdtemp(prefix="rlhf_ext_bench_"),
        progress_bar=False,
        **settings,
    )
    trainer = PPOTrainer(config, policy, None, lambda p, c: [0.0] * len(c), _Tokenizer())
    gen = torch.Generator().manual_seed(0)
    queries = torch.randint(3, vocab, (rows, query), generator=gen).to(device)
    responses = torch.randint(3, vocab, (rows, response), generator=gen).to(device)
    ones = torch.ones(rows, query + response, dtype=torch.bool, device=device)
    no_eos = torch.zeros(rows, dtype=torch.bool, device=device)
    batch = Batch(queries, ones[:, :query], responses, ones[:, query:], no_eos)

    def loss_pass(_):
        logprobs, entropy, _ = trainer._forward(trainer.train_model, None, batch)
        (logprobs.sum() + entropy.sum()).backward()
        harness.synchronize(device)

    loss_pass(None)  # gradients allocated: the measurement sees the pass's own memory
    return loss_pass


def main(argv=None) -> int:
    def extra(parser):
        parser.add_argument(
            "--configs",
            default=None,
            help=f"comma-separated subset of {','.join(CONFIGS)} (default: all)",
        )
        parser.add_argument(
            "--repeats", type=int, default=3, help="timed passes per configuration (default 3)"
        )

    args = harness.parse_args(OP, argv, __doc__.splitlines()[0], extra=extra)
    device = harness.resolve_device(args.device)
    names = args.configs.split(",") if args.configs else list(CONFIGS)
    unknown = [n for n in names if n not in CONFIGS]
    if unknown:
        print(f"bench {OP}: unknown --configs {unknown}; known: {list(CONFIGS)}")
        return 2
    if args.repeats < 1:
        print(f"bench {OP}: --repeats must be >= 1, got {args.repeats}")
        return 2
    shape = QUICK if args.quick else FULL
    rows, query, response, vocab, width, layers = shape
    shape_text = f"{rows}x{query + response}"
    logits_mib = rows * (query + response) * vocab * 4 / (1 << 20)
    print(
        f"bench {OP}: B={rows}, T={query + response} ({response} response tokens), V={vocab}, "
        f"H={width}, {layers} layers; the float32 logits alone are {logits_mib:.0f} MiB",
        flush=True,
    )
    runner = harness.start_runner(OP, device, args.quick)
    table = []
    base_ms = None
    for name in names:
        loss_pass = build_pass(CONFIGS[name], shape, device)
        peak = harness.peak_extra_memory_mib(loss_pass, None, device)
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            loss_pass(None)
            times.append((time.perf_counter() - start) * 1e3)
        ms = statistics.median(times)
        base_ms = base_ms or ms
        table.append((name, peak, ms))
        print(f"  {name}: peak extra {_mib(peak)} MiB, {ms:.4g} ms", flush=True)
        runner.rows.append(
            harness.Row(
                date=runner.date,
                op=OP,
                impl=name,
                device=runner.device_name,
                shape=shape_text,
                dtype="bfloat16" if "bf16" in name else "float32",
                median_ms=ms,
                min_ms=min(times),
                repeats=args.repeats,
                bytes=0,
                gbps=0.0,
                copy_gbps=runner.copy_gbps,
                frac_copy_bw=0.0,
                peak_mem_mib=peak,
                baseline=names[0],
                speedup=base_ms / ms,
                threads=torch.get_num_threads(),
                note=f"V={vocab} H={width} layers={layers}; logits {logits_mib:.0f} MiB",
                **runner.versions,
            )
        )
    print()
    print(runner.header())
    print()
    print(f"{'config':<14}{'peak MiB':>10}{'vs ' + names[0]:>10}{'ms':>10}{'speedup':>9}")
    base_peak = table[0][1]
    for name, peak, ms in table:
        ratio = f"{peak / base_peak:.2f}x" if _numbers(peak, base_peak) else "n/a"
        print(f"{name:<14}{_mib(peak):>10}{ratio:>10}{ms:>10.4g}{base_ms / ms:>8.2f}x")
    runner.print_notes()
    if not args.no_save:
        path = runner.save(args.csv, args.results_dir)
        print(f"rows appended to {path}")
    return 0


def _numbers(*values) -> bool:
    return all(isinstance(v, float | int) and v > 0 for v in values)


def _mib(value) -> str:
    return f"{value:.1f}" if isinstance(value, float | int) else str(value)
