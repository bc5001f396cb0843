"""``python -m bench linear_logprobs``: rlhf_ext.linear_token_logprobs against its GEMMs alone
and the peers, in one run.

Two modes per shape (N tokens x H hidden x V vocabulary) and dtype, each its own section:

- ``fwd``: log-probs of the target tokens from the hidden states and the LM head;
- ``fwd+bwd``: the same plus the gradients w.r.t. hidden and weight of ``sum(logprobs)``
  (the cross-entropy loss's gradient, which Liger's and Apple's fused kernels compute);
- ``fwd+outputs``: ``fwd`` with every extra output asked for (``outputs=``: entropy, lse,
  log_sum_sq_probs, mean_logits, is_top1; the eager baseline computes them by hand from the
  materialised logits). Target: within 10% of ``fwd`` (the same GEMM; the extras are a few
  operations per logit in the row pass or the fused epilogue).

Implementations:

- ``GEMMs alone`` (the floor): bare ``hidden @ weight.T`` (cuBLAS on CUDA), and in
  ``fwd+bwd`` also ``logits @ weight`` and ``logits.T @ hidden``, the three GEMMs of a linear
  layer's forward and backward, by torch.matmul in the inputs' dtype and nothing else: the
  work every implementation here does. Verified on its own (first rows against a float32
  GEMM), in a section of its own. It was named "GEMM floor" (the committed CSV rows), but
  it is a floor only for steady timings of GEMMs like its own: on a shared CPU the medians
  of the same GEMMs move by 30% and more between implementations (the committed float32
  fwd+bwd rows have it slower than eager's three GEMMs plus the softmax), and an
  implementation whose GEMMs write float32 logits or run in chunks may be faster;
- ``rlhf_ext[cpu]`` / ``[cuda]`` / ``[triton]`` (Triton on CUDA only; its forward is the fused
  kernel), chunk_size=None;
- ``matmul + rlhf_ext.token_logprobs``: the logits materialised, then the fused row op;
- ``eager matmul+log_softmax+gather`` (the baseline of the speedups);
- ``liger fused_linear_cross_entropy`` and ``cut-cross-entropy`` (Apple) when installed.

Each row's note gives the model TFLOP/s (2NHV per GEMM: 1 GEMM forward, 3 forward+backward;
the op's recomputation of the logits in the backward is not counted) and the ratio of its
time to that of the GEMMs alone. Outputs are checked against a reference with a float32 GEMM of
the (rounded) inputs and a float64 softmax: logprobs of every row, and the gradients' first
rows.
"""

from __future__ import annotations

import functools
import importlib.util
from collections.abc import Callable, Sequence

import torch

from . import harness, peers
from .harness import Impl

OP = "linear_logprobs"
MODES = ("fwd", "fwd+bwd", "fwd+outputs")
BASELINE = "eager matmul+log_softmax+gather"
FLOOR = "GEMMs alone"  # the floor: see the module docstring
SHAPES = {
    "cuda": [(n, 4096, v) for n in (4096, 16384) for v in (32000, 151936)],
    "cpu": [(2048, 1024, 32000)],
}
QUICK_SHAPES = {"cuda": [(4096, 4096, 32000)], "cpu": [(256, 256, 32000)]}
DTYPES = {"cuda": ("bfloat16",), "cpu": ("float32", "bfloat16")}
GRAD_ROWS = 16  # rows of grad_hidden and grad_weight that are verified
REF_CHUNK = 256  # rows per reference chunk


def make_inputs(point: harness.Point, seed: int, device: torch.device) -> dict:
    """Hidden states of unit scale and an LM head giving logits of std ~3."""
    (rows, size, vocab), dtype = point.shape, point.dtype
    gen = torch.Generator(device=device).manual_seed(seed)
    hidden = torch.randn(rows, size, generator=gen, device=device).to(dtype)
    weight = (torch.randn(vocab, size, generator=gen, device=device) * (3 / size**0.5)).to(dtype)
    target = torch.randint(0, vocab, (rows,), generator=gen, device=device)
    return {"hidden": hidden, "weight": weight, "target": target}


def one_input_set(set_bytes: int) -> int:
    """One input set per point, not several to rotate among: each set holds a whole LM
    head (128 MiB to over 1 GiB at the default shapes), larger than any cache."""
    return 1


def expected_outputs(point: harness.Point, inputs: dict):
    """logprobs of every row; in fwd+bwd also grad_hidden and grad_weight's first rows."""
    mode = point.mode
    hidden, weight, target = inputs["hidden"], inputs["weight"], inputs["target"]
    weight32 = weight.float()
    logprobs, grad_weight = [], 0
    grad_hidden = None
    for start in range(0, hidden.shape[0], REF_CHUNK):
        rows = slice(start, start + REF_CHUNK)
        logp = torch.log_softmax((hidden[rows].float() @ weight32.T).double(), -1)
        logprobs.append(logp.gather(-1, target[rows, None]).squeeze(-1))
        if "bwd" in mode:  # d sum(logprobs) / d logits = onehot - p
            dlogits = -logp.exp()
            dlogits.scatter_add_(-1, target[rows, None], torch.ones_like(dlogits[:, :1]))
            grad_weight = grad_weight + dlogits[:, :GRAD_ROWS].T @ hidden[rows].double()
            if start == 0:
                grad_hidden = dlogits[:GRAD_ROWS] @ weight.double()
    outputs = (torch.cat(logprobs),)
    if "bwd" in mode:
        outputs += (grad_hidden, grad_weight)
    return outputs


def floor_expected(point: harness.Point, inputs: dict):
    """The floor's first rows by a float32 GEMM; its second GEMM reads the logits rounded
    to the inputs' dtype, as the floor's does."""
    hidden, weight = inputs["hidden"], inputs["weight"]
    logits = hidden[:GRAD_ROWS].float() @ weight.float().T
    if "bwd" not in point.mode:
        return (logits,)
    return logits, logits.to(hidden.dtype).float() @ weight.float()


# -- the implementations, as functions (hidden, weight, target) -> logprobs ----------------


def ours(backend: str, mode: str = "fwd") -> Callable:
    import rlhf_ext
    from rlhf_ext.ops._vocab import LOGPROB_OUTPUTS

    def compute(hidden, weight, target):
        if mode == "fwd+outputs":
            return rlhf_ext.linear_token_logprobs(
                hidden, weight, target, validate=False, outputs=LOGPROB_OUTPUTS, backend=backend
            )[0]
        return rlhf_ext.linear_token_logprobs(hidden, weight, target, validate=False,
                                              backend=backend)  # fmt: skip

    return compute


def matmul_token_logprobs(backend: str, mode: str = "fwd") -> Callable:
    import rlhf_ext
    from rlhf_ext.ops._vocab import LOGPROB_OUTPUTS

    def compute(hidden, weight, target):
        if mode == "fwd+outputs":
            return rlhf_ext.token_logprobs(
                hidden @ weight.T, target, validate=False, outputs=LOGPROB_OUTPUTS, backend=backend
            )[0]
        return rlhf_ext.token_logprobs(hidden @ weight.T, target, validate=False, backend=backend)

    return compute


def eager_outputs(hidden, weight, target):
    """What a trainer computes by hand for the extra outputs: the logits, their float32
    log-softmax, and each output from it (TRL's DPO / verl's sum_pi_squared style)."""
    logits = (hidden @ weight.T).float()
    logp = torch.log_softmax(logits, -1)
    lp = logp.gather(-1, target[:, None]).squeeze(-1)
    entropy = -(logp.exp() * logp).sum(-1)
    lse = torch.logsumexp(logits, -1)
    log_sum_sq = torch.logsumexp(2 * logp, -1)
    mean, top1 = logits.mean(-1), logits.argmax(-1) == target
    del entropy, lse, log_sum_sq, mean, top1  # timed; only the log-probs are checked
    return lp


def as_impl(name: str, compute: Callable, mode: str, dtype: torch.dtype, **kwargs) -> Impl:
    """An Impl of `compute`: logprobs, plus in fwd+bwd the gradients' first rows."""
    low = dtype in (torch.bfloat16, torch.float16)
    tol = dict(rtol=3e-2, atol=3e-2) if low else dict(rtol=1e-3, atol=1e-3)

    def forward(x):
        return (compute(x["hidden"], x["weight"], x["target"]),)

    def forward_backward(x):
        hidden, weight = x["hidden"].requires_grad_(), x["weight"].requires_grad_()
        (lp,) = forward(x)
        grad_hidden, grad_weight = torch.autograd.grad(lp.sum(), (hidden, weight))
        hidden.requires_grad_(False)
        weight.requires_grad_(False)
        return lp.detach(), grad_hidden[:GRAD_ROWS], grad_weight[:GRAD_ROWS]

    fn = forward_backward if "bwd" in mode else forward
    return Impl(name, fn, **{**tol, **kwargs})


def gemm_floor(point: harness.Point) -> Impl:
    """The GEMMs alone: logits = h W^T; in fwd+bwd also g W and g^T h (g = the logits)."""
    mode = point.mode
    low = point.dtype in (torch.bfloat16, torch.float16)
    tol = dict(rtol=2e-2, atol=5e-2) if low else dict(rtol=1e-3, atol=1e-3)

    def fn(x):
        hidden, weight = x["hidden"], x["weight"]
        logits = hidden @ weight.T
        if "bwd" not in mode:
            return (logits[:GRAD_ROWS],)
        grad_hidden = logits @ weight
        grad_weight = logits.T @ hidden
        del grad_weight  # timed, not checked (its float64 check would cost minutes on CPU)
        return logits[:GRAD_ROWS], grad_hidden[:GRAD_ROWS]

    return Impl(FLOOR, fn, **tol)


def implementations(point: harness.Point, device, runner) -> list[Impl]:
    """Ours (fused, then materialised logits + the row op), the baseline, the GPU peers."""
    mode, dtype = point.mode, point.dtype
    ours_here = harness.rlhf_ext_backends(device, runner)
    impls = [as_impl(f"rlhf_ext[{b}]", ours(b, mode), mode, dtype) for b in ours_here]
    impls += [
        as_impl(
            f"matmul + rlhf_ext.token_logprobs[{b}]", matmul_token_logprobs(b, mode), mode, dtype
        )  # fmt: skip
        for b in ours_here
    ]
    baseline = eager_outputs if mode == "fwd+outputs" else peers.eager_linear_logprobs
    impls.append(as_impl(BASELINE, baseline, mode, dtype, optional=True))
    if mode == "fwd+outputs":  # the peers' fused kernels have no such outputs
        return impls
    for name, module, fn in (
        ("liger fused_linear_cross_entropy", "liger_kernel", peers.liger_linear_logprobs),
        ("cut-cross-entropy", "cut_cross_entropy", peers.cce_linear_logprobs),
    ):
        if device.type != "cuda":
            runner.note(f"{name} skipped: GPU only")
        elif importlib.util.find_spec(module) is None:
            runner.note(f"{name} skipped: {module} is not installed")
        else:
            impls.append(as_impl(name, fn, mode, dtype, optional=True))
    return impls


def model_flops(point: harness.Point) -> int:
    """2NHV per GEMM: 1 GEMM forward, 3 forward+backward (the op's recomputation of the
    logits in the backward is not counted)."""
    rows, size, vocab = point.shape
    return (3 if "bwd" in point.mode else 1) * 2 * rows * size * vocab


def bytes_moved(point: harness.Point, impl: Impl) -> int:
    """Inputs read once, per-token outputs written once (and the gradients in fwd+bwd)."""
    rows, size, vocab = point.shape
    weights = (rows + vocab) * size * point.dtype.itemsize
    return weights * (3 if "bwd" in point.mode else 1) + rows * 12


def main(argv: Sequence[str] | None = None) -> int:
    """Run the linear log-probs benchmark; see ``python -m bench linear_logprobs --help``."""
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
        implementations=functools.partial(implementations, device=device, runner=runner),
        expected=expected_outputs,
        baseline=BASELINE,
        bytes_moved=bytes_moved,
        flops=model_flops,
        floor=harness.Floor(gemm_floor, floor_expected),
        only=args.only,
        set_count=one_input_set,
        save=not args.no_save,
        csv_path=args.csv,
        results_dir=args.results_dir,
    )


def _extra_args(parser) -> None:
    harness.add_mode_dtype_args(parser, MODES)


if __name__ == "__main__":
    raise SystemExit(main())
