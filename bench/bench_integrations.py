"""``python -m bench integrations``: each peer's own function against rlhf_ext's drop-in
adapter for it (``rlhf_ext.integrations``), timed on the same inputs, in one run.

Only the peers installed here are timed (TRL: the `peers` extra; verl: see
docs/integrations.md; OpenRLHF does not import without flash-attn). Each case checks that
the adapter's output matches the peer's before it is timed. One timed call is the forward
and, for differentiable functions, the backward (``torch.autograd.grad`` of a weighted sum
of the output). The table prints the median time per call of each and the speedup
(peer / adapter); ``--no-save`` is accepted for `python -m bench all` (nothing is saved:
the figures go to docs/integrations.md by hand).
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable
from dataclasses import dataclass

import torch

from . import harness
from .harness import Impl

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
# (rows, tokens, vocab): a small policy's micro-batch on a CPU
SHAPE = (8, 256, 8192)
QUICK_SHAPE = (4, 64, 2048)
PEER, ADAPTER = "peer", "rlhf_ext"  # the two implementations timed per peer function
# TRL 1.16's fused LM head as GRPO calls it: (tokens, hidden, vocabulary) of a small
# policy's micro-batch on a CPU, TRL's own vocabulary tile width.
FUSED_HEAD = "trl.kernels.chunked_logprob.ChunkedLogProbFunction"
FUSED_HEAD_SHAPE = (2048, 1024, 32000)
QUICK_FUSED_HEAD_SHAPE = (256, 128, 4096)
TRL_VOCAB_TILE = 32768  # trl.trainer.utils._CHUNKED_LOGPROB_CHUNK_SIZE
# verl's FSDP engine, unfused remove-padding path: (sequences, tokens each, vocabulary)
ENGINE = "verl.workers.engine.fsdp.transformer_impl"
ENGINE_SHAPE = (8, 256, 32000)
QUICK_ENGINE_SHAPE = (4, 64, 4096)
ENGINE_FLAGS = {"calculate_entropy": True, "calculate_sum_pi_squared": True}
# the peers' T-step return loops at a realistic rollout: (rows, tokens)
RETURNS_SHAPE = (4096, 8192)
QUICK_RETURNS_SHAPE = (64, 256)


@dataclass
class Case:
    """One peer function: its qualified name, the adapter, the inputs it takes, whether
    the timed call includes a backward through the first input."""

    peer: str
    qualname: str
    adapter: Callable
    make_args: Callable[[dict], tuple]
    backward: bool


def _peer_function(qualname: str):
    module, _, name = qualname.rpartition(".")
    try:
        return getattr(importlib.import_module(module), name)
    except Exception:  # not installed, or fails to import here
        return None


def make_inputs(shape, seed: int = 0) -> dict:
    """Logits [B, T, V], labels, per-token log-probs, rewards, values and a mask with
    right padding and holes (every row keeps its first token)."""
    rows, tokens, vocab = shape
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(rows, tokens, vocab, generator=generator) * 2
    lengths = torch.randint(tokens // 2, tokens + 1, (rows,), generator=generator)
    mask = torch.arange(tokens)[None, :] < lengths[:, None]
    mask &= torch.rand(rows, tokens, generator=generator) > 0.1
    mask[:, 0] = True
    old = -torch.rand(rows, tokens, generator=generator) * 4
    return {
        "logits": logits,
        "labels": torch.randint(0, vocab, (rows, tokens), generator=generator),
        "old": old,
        "new": old + torch.randn(rows, tokens, generator=generator) * 0.3,
        "adv": torch.randn(rows, tokens, generator=generator),
        "rewards": torch.randn(rows, tokens, generator=generator),
        "values": torch.randn(rows, tokens, generator=generator),
        "mask": mask.float(),
    }


class _VerlConfig(dict):
    __getattr__ = dict.__getitem__


VERL_CONFIG = _VerlConfig(
    clip_ratio=0.2, clip_ratio_low=None, clip_ratio_high=0.28, global_batch_info={}, gamma=1.0
)


def cases() -> list[Case]:
    """The timed functions of every peer (the adapters import without the peers)."""
    from rlhf_ext.integrations import trl, verl

    logits_labels = lambda x: (x["logits"], x["labels"])  # noqa: E731
    logits_only = lambda x: (x["logits"],)  # noqa: E731
    core, functional = "verl.trainer.ppo.core_algos", "verl.utils.torch_functional"
    return [
        Case("trl", "trl.trainer.utils.selective_log_softmax", trl.selective_log_softmax,
             logits_labels, True),
        Case("trl", "trl.trainer.utils.entropy_from_logits", trl.entropy_from_logits,
             logits_only, True),
        Case("trl", "trl.experimental.ppo.ppo_trainer.masked_whiten", trl.masked_whiten,
             lambda x: (x["adv"], x["mask"]), False),
        Case("verl", f"{functional}.logprobs_from_logits_v2",
             lambda lg, lb: verl.logprobs_from_logits(lg, lb, inplace_backward=False),
             logits_labels, True),
        Case("verl", f"{functional}.entropy_from_logits", verl.entropy_from_logits,
             logits_only, True),
        Case("verl", f"{functional}.calculate_sum_pi_squared_from_logits",
             verl.calculate_sum_pi_squared_from_logits, logits_only, False),
        Case("verl", f"{core}.compute_reinforce_plus_plus_outcome_advantage",
             verl.compute_reinforce_plus_plus_outcome_advantage,
             lambda x: (x["rewards"], x["mask"], VERL_CONFIG), False),
        Case("verl", f"{core}.compute_gae_advantage_return", verl.compute_gae_advantage_return,
             lambda x: (x["rewards"], x["values"], x["mask"], 1.0, 0.95), False),
        Case("verl", f"{core}.compute_policy_loss_vanilla", verl.compute_policy_loss_vanilla,
             lambda x: (x["old"], x["new"], x["adv"], x["mask"], "token-mean", VERL_CONFIG),
             False),
        Case("verl", f"{core}.kl_penalty", verl.kl_penalty,
             lambda x: (x["new"], x["old"], "low_var_kl"), True),
    ]  # fmt: skip


def _first_tensor(out):
    return out[0] if isinstance(out, tuple) else out


def timed_call(fn: Callable, args: tuple, backward: bool) -> Callable[[dict], object]:
    """fn(*args), plus the gradient w.r.t. args[0] when ``backward``."""

    def call(_):
        if not backward:
            return fn(*args)
        leaf = args[0].detach().requires_grad_()
        out = _first_tensor(fn(leaf, *args[1:]))
        weights = torch.ones_like(out)
        return torch.autograd.grad((out * weights).sum(), leaf)

    return call


def forward_output(fn: Callable, args: tuple) -> Callable[[dict], object]:
    """The first output of fn(*args): what the adapter must match the peer on."""
    return lambda _: _first_tensor(fn(*args))


def installed_peers(all_cases: list[Case]) -> dict[str, tuple[Case, Callable]]:
    """The cases whose peer function imports here, with that function, by its name."""
    found = {case.qualname: (case, _peer_function(case.qualname)) for case in all_cases}
    return {name: pair for name, pair in found.items() if pair[1] is not None}


def case_impls(case: Case, peer: Callable, x: dict) -> list[Impl]:
    """The peer's function (the baseline) and its adapter, each timed as forward (and
    backward) on the shared inputs `x` and verified on its forward output."""
    call_args = case.make_args(x)
    return [
        Impl(name, timed_call(fn, call_args, case.backward), check=forward_output(fn, call_args))
        for name, fn in ((PEER, peer), (ADAPTER, case.adapter))
    ]


def peer_output(case: Case, peer: Callable, x: dict):
    """The peer's first forward output on `x`: the expected output of both."""
    return _first_tensor(peer(*case.make_args(x)))


def print_table(all_cases: list[Case], installed: dict, shape, runner: harness.Runner) -> int:
    """One line per peer function: the peer's and the adapter's median ms and the speedup
    (peer / adapter); then the notes. Returns 1 when an adapter did not match its peer."""
    medians = {row.impl: row.median_ms for row in runner.rows}
    width = max(len(case.qualname) for case in all_cases)
    print(f"\nintegrations on {runner.device_name}, (B, T, V) = {shape}, float32")
    print(f"{'function':{width}s} {'peer ms':>9s} {'rlhf_ext ms':>12s} {'speedup':>8s}")
    for case in all_cases:
        peer_ms = medians.get(harness.mode_name(PEER, case.qualname))
        ours_ms = medians.get(harness.mode_name(ADAPTER, case.qualname))
        if case.qualname not in installed:
            print(f"{case.qualname:{width}s} {'(peer not installed)':>31s}")
        elif peer_ms is None or ours_ms is None:
            print(f"{case.qualname:{width}s} {'(not timed: see below)':>31s}")
        else:
            speedup = peer_ms / ours_ms
            print(f"{case.qualname:{width}s} {peer_ms:9.3f} {ours_ms:12.3f} {speedup:7.2f}x")
    return runner.print_notes()


def fused_head_inputs(shape, seed: int = 0):
    """(hidden [N, H], weight [V, H], targets [N]): logits of std ~3, float32."""
    tokens, size, vocab = shape
    generator = torch.Generator().manual_seed(seed)
    hidden = torch.randn(tokens, size, generator=generator)
    weight = torch.randn(vocab, size, generator=generator) * (3 / size**0.5)
    return hidden, weight, torch.randint(0, vocab, (tokens,), generator=generator)


def fused_head_pass(function, inputs) -> Callable[[object], tuple]:
    """One GRPO-style call of a ChunkedLogProbFunction: log-probs and entropy forward, the
    gradients of hidden and weight through the log-probs."""
    hidden, weight, targets = inputs

    def call(_):
        leaves = (hidden.detach().requires_grad_(), weight.detach().requires_grad_())
        out = function.apply(*leaves[:2], None, targets, 1.0, TRL_VOCAB_TILE, None, 1.0,
                             ("log_probs", "entropy"))  # fmt: skip
        grads = torch.autograd.grad(out[0].sum(), leaves)
        return out[0].detach(), out[1].detach(), *grads

    return call


def fused_head_section(quick: bool) -> int:
    """TRL's fused LM head against the adapter: median time of a forward+backward and the
    peak memory each allocates beyond its inputs (targets: time within 1.2x of TRL's, peak
    no larger). Returns 1 when their results differ, else 0."""
    from rlhf_ext.integrations import trl as adapter

    peer = _peer_function(FUSED_HEAD)
    shape = QUICK_FUSED_HEAD_SHAPE if quick else FUSED_HEAD_SHAPE
    print(f"\nTRL fused LM head (N, H, V) = {shape}, float32, log_probs+entropy, grad of log_probs")
    if peer is None:
        print(f"{FUSED_HEAD}: (peer not installed: needs TRL >= 1.16)")
        return 0
    inputs = fused_head_inputs(shape)
    calls = {PEER: fused_head_pass(peer, inputs),
             ADAPTER: fused_head_pass(adapter.ChunkedLogProbFunction, inputs)}  # fmt: skip
    results = {name: call(None) for name, call in calls.items()}
    for want, got in zip(results[PEER], results[ADAPTER], strict=True):
        if not torch.allclose(got, want, rtol=1e-4, atol=1e-4):
            print(f"  rlhf_ext differs from TRL: max |diff| {(got - want).abs().max().item():.3g}")
            return 1
    device = torch.device("cpu")
    budget = dict(min_time_s=0.5 if quick else 5.0, min_repeats=3, max_repeats=50)
    print(f"{'implementation':16s} {'median ms':>10s} {'peak extra MiB':>15s}")
    medians = {}
    for name, call in calls.items():
        medians[name] = harness.time_fn(call, [None], device, **budget).median_ms
        peak = harness.peak_extra_memory_mib(call, None, device)
        shown = f"{peak:15.1f}" if isinstance(peak, float) else f"{peak:>15s}"
        print(f"{name:16s} {medians[name]:10.1f} {shown}")
    print(f"time rlhf_ext / TRL: {medians[ADAPTER] / medians[PEER]:.2f}x")
    return 0


def engine_pass(engine, inputs) -> Callable[[object], tuple]:
    """One micro-batch through verl's ``prepare_model_outputs``: log-probs, entropy and
    sum_pi_squared forward, the gradient of their sum w.r.t. the logits."""
    from . import peers

    micro_batch, output_args, logits = inputs

    def call(_):
        leaf = logits.detach().requires_grad_()
        flat = peers.verl_prepare_model_outputs(engine, micro_batch, output_args, leaf)
        (grad,) = torch.autograd.grad(sum(value.sum() for value in flat.values()), leaf)
        return *(flat[key].detach() for key in sorted(flat)), grad

    return call


def engine_section(quick: bool) -> int:
    """verl's FSDP engine step after the model (log-probs, entropy, sum_pi_squared of the
    same logits), verl's own against the patched engine (one read of the logits): median
    time of a forward+backward and the peak memory beyond the inputs. Returns 1 when their
    results differ, else 0."""
    from rlhf_ext.integrations import verl as adapter

    from . import peers

    sequences, tokens, vocab = QUICK_ENGINE_SHAPE if quick else ENGINE_SHAPE
    print(f"\nverl FSDP engine prepare_model_outputs, {sequences} x {tokens} tokens, V={vocab}, "
          "float32, log_probs+entropy+sum_pi_squared, grad of their sum")  # fmt: skip
    if _peer_function(f"{ENGINE}.FSDPEngineWithLMHead") is None:
        print(f"{ENGINE}: (peer not installed)")
        return 0
    torch.manual_seed(0)
    inputs = peers.verl_packed_micro_batch([tokens] * sequences, vocab, 0, ENGINE_FLAGS)
    mean, results, device = {}, {}, torch.device("cpu")
    budget = dict(min_time_s=0.5 if quick else 5.0, min_repeats=3, max_repeats=50)
    print(f"{'implementation':16s} {'median ms':>10s} {'peak extra MiB':>15s}")
    for name in (PEER, ADAPTER):
        if name == ADAPTER:
            adapter.patch()
        try:
            call = engine_pass(peers.verl_fsdp_engine(), inputs)
            results[name] = call(None)
            mean[name] = harness.time_fn(call, [None], device, **budget).median_ms
            peak = harness.peak_extra_memory_mib(call, None, device)
        finally:
            adapter.unpatch()
        shown = f"{peak:15.1f}" if isinstance(peak, float) else f"{peak:>15s}"
        print(f"{name:16s} {mean[name]:10.1f} {shown}")
    for want, got in zip(results[PEER], results[ADAPTER], strict=True):
        if not torch.allclose(got, want, rtol=1e-4, atol=1e-4):
            print(f"  rlhf_ext differs from verl: max |diff| {(got - want).abs().max().item():.3g}")
            return 1
    print(f"speedup verl / rlhf_ext: {mean[PEER] / mean[ADAPTER]:.2f}x")
    return 0


def returns_section(quick: bool) -> int:
    """The peers' T-step Python loops over the returns against the adapters on rlhf_ext.gae
    (values 0, lam 1): verl's REINFORCE++ estimator (returns, then masked whitening) and
    OpenRLHF 0.11.2's ``get_cumulative_returns`` (cut from its wheel). Median of 3 calls
    each; returns 1 when a result differs, else 0."""
    from rlhf_ext.integrations import openrlhf as openrlhf_adapter
    from rlhf_ext.integrations import verl as verl_adapter

    from . import peers

    rows, tokens = QUICK_RETURNS_SHAPE if quick else RETURNS_SHAPE
    print(f"\nreturn loops at [{rows}, {tokens}] float32 (rewards, a mask with right padding)")
    generator = torch.Generator().manual_seed(0)
    rewards = torch.randn(rows, tokens, generator=generator)
    lengths = torch.randint(tokens // 2, tokens + 1, (rows,), generator=generator)
    mask = (torch.arange(tokens)[None, :] < lengths[:, None]).float()
    verl_peer = _peer_function("verl.trainer.ppo.core_algos."
                               "compute_reinforce_plus_plus_outcome_advantage")  # fmt: skip
    cases = {
        "verl compute_reinforce_plus_plus_outcome_advantage": (
            verl_peer, verl_adapter.compute_reinforce_plus_plus_outcome_advantage,
            (rewards, mask, VERL_CONFIG)),
        "OpenRLHF get_cumulative_returns": (
            peers.openrlhf_get_cumulative_returns(),
            lambda r, m, g: openrlhf_adapter.get_cumulative_returns(None, r, m, g),
            (rewards, mask, 1.0)),
    }  # fmt: skip
    device = torch.device("cpu")
    print(f"{'function':52s} {'peer ms':>10s} {'rlhf_ext ms':>12s} {'speedup':>8s}")
    status = 0
    for name, (peer, ours, args) in cases.items():
        if peer is None:
            print(f"{name:52s} (peer not installed)")
            continue
        want, got = _first_tensor(peer(*args)), _first_tensor(ours(*args))
        if not torch.allclose(got, want, rtol=1e-4, atol=1e-4):
            print(f"  rlhf_ext differs from the peer: {(got - want).abs().max().item():.3g}")
            status = 1
            continue
        budget = dict(min_time_s=0.0, min_repeats=3, max_repeats=3, warmup=1)
        times = [harness.time_fn(lambda _, f=f, a=args: f(*a), [None], device, **budget).median_ms
                 for f in (peer, ours)]  # fmt: skip
        print(f"{name:52s} {times[0]:10.1f} {times[1]:12.1f} {times[0] / times[1]:7.1f}x")
    return status


def main(argv=None) -> int:
    """Time every installed peer's function against its adapter; print the table."""
    args = harness.parse_args("integrations", argv, __doc__.splitlines()[0])
    device = torch.device("cpu")  # the peers' reference code paths here are the CPU ones
    shape = QUICK_SHAPE if args.quick else SHAPE
    runner = harness.start_runner("integrations", device, args.quick)
    # This table's own budget, kept from before it ran through the harness's sweep.
    runner.budget = dict(min_time_s=0.3 if args.quick else 1.5, min_repeats=5, max_repeats=200)
    x = make_inputs(shape)  # one input set, shared by every case
    all_cases = cases()
    installed = installed_peers(all_cases)
    # Each installed peer function is one mode of the sweep; the report is this script's
    # own table (peer vs adapter per function), and nothing is saved.
    status = harness.sweep(
        runner,
        shapes=[shape],
        dtypes=[torch.float32],
        modes=list(installed),
        make_inputs=lambda point, seed: x,
        implementations=lambda point: case_impls(*installed[point.mode], x),
        expected=lambda point, inputs: peer_output(*installed[point.mode], inputs),
        baseline=PEER,
        set_count=lambda set_bytes: 1,
        report=lambda runner: print_table(all_cases, installed, shape, runner),
    )
    sections = (fused_head_section, engine_section, returns_section)
    return status | max(section(args.quick) for section in sections)


if __name__ == "__main__":
    raise SystemExit(main())
