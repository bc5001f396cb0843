"""``python -m bench logprobs``: rlhf_ext.token_logprobs against the peers, in one run.

Four modes per shape and dtype, each its own table section (``--modes`` picks):

- ``fwd``: log-probs of the target tokens; ``fwd+ent``: and the entropy;
- ``fwd+bwd``, ``fwd+bwd+ent``: the same plus the gradient w.r.t. the logits for random
  per-token upstream gradients (PPO's case: every token has its own weight).

Implementations (each verified against a float64 reference before it is timed; for the
backward modes, on the gradient's first rows):

- ``rlhf_ext[cpu]`` / ``[cuda]`` / ``[triton]`` (Triton on CUDA only); in the backward
  modes also ``+inplace`` (``inplace_backward=True``: the gradient overwrites the logits);
- ``eager log_softmax+gather`` (the baseline): upcast, log_softmax, gather; verl's
  softmax-based entropy;
- ``TRL selective_log_softmax``: TRL's per-sequence logsumexp / log_softmax loop
  (sequences of 1024 tokens); TRL's chunked entropy;
- ``torch.compile(...)`` of both (not on CPU under --quick: compiling takes minutes there);
- ``liger cross_entropy`` and ``flash-attn cross_entropy`` (their per-token losses, negated)
  when installed; they have no entropy.

Bytes moved (the minimum): the logits read once in the forward, read again and the
gradient written in the backward (3 passes), plus the per-token tensors.
"""

from __future__ import annotations

import functools
import importlib.util
from collections.abc import Callable, Sequence

import torch

from . import harness, peers
from .harness import Impl

OP = "logprobs"
MODES = ("fwd", "fwd+ent", "fwd+bwd", "fwd+bwd+ent")
BASELINE = "eager log_softmax+gather"
SHAPES = {
    "cuda": [(n, v) for n in (4096, 16384) for v in (32000, 151936, 262144)],
    "cpu": [(2048, 32000)],
}
QUICK_SHAPES = {"cuda": [(4096, 32000)], "cpu": [(256, 32000)]}
DTYPES = {"cuda": ("bfloat16", "float32"), "cpu": ("float32", "bfloat16")}
SEQ_LEN = 1024  # tokens per sequence, for TRL's per-sequence loop
GRAD_ROWS = 32  # rows of the gradient that are verified (each row's gradient is its own)
REF_CHUNK = 256  # rows per float64 reference chunk (a [chunk, V] float64 temporary)


def make_inputs(point: harness.Point, seed: int, device: torch.device) -> dict:
    """Logits of a trained-model scale (std 3), targets, per-token upstream gradients.
    Built afresh per mode: the in-place variant overwrites its logits."""
    rows, vocab = point.shape
    dtype = point.dtype
    gen = torch.Generator(device=device).manual_seed(seed)
    logits = torch.randn(rows, vocab, generator=gen, device=device, dtype=torch.float32)
    logits = logits.mul_(3.0).to(dtype)
    target = torch.randint(0, vocab, (rows,), generator=gen, device=device)
    g_lp = torch.randn(rows, generator=gen, device=device)
    g_ent = torch.randn(rows, generator=gen, device=device)
    return {"logits": logits, "target": target, "g_lp": g_lp, "g_ent": g_ent}


def input_set_count(set_bytes: int) -> int:
    """Two input sets to rotate among; one when a set is over 1 GiB, which bounds the
    memory the largest shapes take (their logits alone are several GiB)."""
    return 1 if set_bytes > (1 << 30) else 2


def expected_outputs(point: harness.Point, inputs: dict):
    """float64 reference: logprobs (and entropy) for every row; the gradient's first rows."""
    from rlhf_ext import reference

    mode = point.mode
    logits, target = inputs["logits"], inputs["target"]
    entropy = "ent" in mode
    lps, ents = [], []
    for start in range(0, logits.shape[0], REF_CHUNK):
        lp, ent = reference.token_logprobs(
            logits[start : start + REF_CHUNK].double(),
            target[start : start + REF_CHUNK],
            return_entropy=True,
        )
        lps.append(lp)
        ents.append(ent)
    outputs = [torch.cat(lps)] + ([torch.cat(ents)] if entropy else [])
    if "bwd" in mode:
        x = logits[:GRAD_ROWS].double().requires_grad_()
        lp, ent = reference.token_logprobs(x, target[:GRAD_ROWS], return_entropy=True)
        loss = (lp * inputs["g_lp"][:GRAD_ROWS]).sum()
        if entropy:
            loss = loss + (ent * inputs["g_ent"][:GRAD_ROWS]).sum()
        loss.backward()
        outputs.append(x.grad)
    return tuple(outputs)


# -- the implementations, as functions (logits, target, entropy) -> outputs ---------------


def ours(backend: str, inplace: bool = False) -> Callable:
    import rlhf_ext

    def compute(logits, target, entropy):
        return rlhf_ext.token_logprobs(
            logits,
            target,
            return_entropy=entropy,
            validate=False,
            inplace_backward=inplace,
            backend=backend,
        )

    return compute


def eager(logits, target, entropy):
    lp = peers.eager_logprobs(logits, target)
    return (lp, peers.verl_entropy(logits)) if entropy else lp


def trl(logits, target, entropy):
    rows, vocab = logits.shape
    seq = SEQ_LEN if rows % SEQ_LEN == 0 else rows
    lp = peers.trl_selective_log_softmax(
        logits.view(rows // seq, seq, vocab), target.view(rows // seq, seq)
    ).reshape(rows)
    return (lp, peers.trl_entropy(logits)) if entropy else lp


def liger(logits, target, entropy):
    from liger_kernel.ops.cross_entropy import LigerCrossEntropyFunction

    loss = LigerCrossEntropyFunction.apply(logits, target, None, -100, 0.0, 0.0, "none")
    return -(loss[0] if isinstance(loss, tuple) else loss)


def flash_attn(logits, target, entropy):
    from flash_attn.ops.triton.cross_entropy import cross_entropy_loss

    losses, _ = cross_entropy_loss(logits, target)
    return -losses


def as_impl(name: str, compute: Callable, mode: str, dtype: torch.dtype, **kwargs) -> Impl:
    """An Impl of `compute` in `mode`: forward outputs, plus the gradient's first rows."""
    entropy = "ent" in mode
    low = dtype in (torch.bfloat16, torch.float16)
    tol = dict(rtol=2e-2, atol=2e-3) if low else dict(rtol=1e-4, atol=1e-4)

    def forward(x):
        out = compute(x["logits"], x["target"], entropy)
        return out if isinstance(out, tuple) else (out,)

    def forward_backward(x):
        logits = x["logits"].requires_grad_()
        out = forward(x)
        grads = (x["g_lp"], x["g_ent"])[: len(out)]
        (grad,) = torch.autograd.grad(out, logits, grads)
        logits.requires_grad_(False)
        return tuple(o.detach() for o in out) + (grad[:GRAD_ROWS],)

    fn = forward_backward if "bwd" in mode else forward
    return Impl(name, fn, **{**tol, **kwargs})


def implementations(point: harness.Point, device, args, runner) -> list[Impl]:
    """Ours first, the peers after; the in-place variant last (it overwrites its inputs)."""
    mode, dtype = point.mode, point.dtype
    ours_here = harness.rlhf_ext_backends(device, runner)
    impls = [as_impl(f"rlhf_ext[{b}]", ours(b), mode, dtype) for b in ours_here]
    impls.append(as_impl(BASELINE, eager, mode, dtype, optional=True))
    impls.append(as_impl("TRL selective_log_softmax", trl, mode, dtype, optional=True))
    if device.type == "cpu" and args.quick:
        runner.note("torch.compile peers skipped on CPU under --quick (minutes of compiling)")
    else:
        for name, fn in (("eager log_softmax+gather", eager), ("TRL selective_log_softmax", trl)):
            compiled = torch.compile(fn, dynamic=False)
            impls.append(as_impl(f"torch.compile({name})", compiled, mode, dtype, optional=True))
    if "ent" not in mode and device.type == "cuda":
        for name, module, fn in (
            ("liger cross_entropy", "liger_kernel", liger),
            ("flash-attn cross_entropy", "flash_attn", flash_attn),
        ):
            if importlib.util.find_spec(module) is None:
                runner.note(f"{name} skipped: {module} is not installed")
            else:
                impls.append(as_impl(name, fn, mode, dtype, optional=True))
    if "bwd" in mode and device.type in ours_here:
        inplace = ours(device.type, inplace=True)
        impls.append(as_impl(f"rlhf_ext[{device.type}]+inplace", inplace, mode, dtype))
    return impls


def bytes_moved(point: harness.Point, impl: Impl) -> int:
    """The logits read once per pass (3 passes with the backward), plus the per-token
    tensors."""
    (rows, vocab), dtype, mode = point.shape, point.dtype, point.mode
    passes = 3 if "bwd" in mode else 1
    per_token = 8 + 4 + (4 if "ent" in mode else 0)  # target, logprob, entropy
    if "bwd" in mode:
        per_token *= 2  # read again, with the upstream gradients
    return passes * rows * vocab * dtype.itemsize + rows * per_token


def main(argv: Sequence[str] | None = None) -> int:
    """Run the token log-probs benchmark; see ``python -m bench logprobs --help``."""
    args = harness.parse_args(OP, argv, __doc__.splitlines()[0], extra=_extra_args)
    device = harness.resolve_device(args.device)
    runner = harness.start_runner(OP, device, args.quick)
    modes, dtypes = harness.chosen_modes_and_dtypes(args, MODES, DTYPES[device.type])
    return harness.sweep(
        runner,
        shapes=harness.chosen_shapes(args, SHAPES, QUICK_SHAPES, device),
        dtypes=dtypes,
        modes=modes,
        make_inputs=functools.partial(make_inputs, device=device),
        implementations=functools.partial(implementations, device=device, args=args, runner=runner),
        expected=expected_outputs,
        baseline=BASELINE,
        bytes_moved=bytes_moved,
        only=args.only,
        set_count=input_set_count,
        save=not args.no_save,
        csv_path=args.csv,
        results_dir=args.results_dir,
    )


def _extra_args(parser) -> None:
    harness.add_mode_dtype_args(parser, MODES)


if __name__ == "__main__":
    raise SystemExit(main())
