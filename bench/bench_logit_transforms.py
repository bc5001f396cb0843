"""``python -m bench logit_transforms``: what token_logprobs' logit transforms cost.

One mode per transform, each its own table section (``--modes`` picks), all timed as PPO
uses them (log-probs and entropy, and the gradient for random per-token upstream
gradients):

- ``T``: a scalar temperature (0.7), the path every other mode is measured against;
- ``T[token]``: one temperature per token (a float32 tensor, uniform in [0.5, 1.5]);
- ``softcap``: Gemma's final_logit_softcapping (30) with the scalar temperature;
- ``T[token]+softcap+scale``: all of them, with logit_scale 0.5;
- ``T+outputs``: the scalar temperature with every extra output asked for (``outputs=``:
  lse, log_sum_sq_probs, mean_logits, is_top1), only logprobs and entropy differentiated.

Implementations: ``rlhf_ext[<backend>]`` and the baseline ``eager``, the transform in
float32 then log_softmax + gather and the softmax entropy (what a trainer writes by hand).
The issue 17 targets: ``T[token]`` within 5% of ``T`` on rlhf_ext's kernels (the bytes do
not change: the N temperatures are 1/V of the logits), and ``T+outputs`` within 10% of
``T`` (one read: the bytes do not change either).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch

from . import harness
from .harness import Impl

OP = "logit_transforms"
MODES = ("T", "T[token]", "softcap", "T[token]+softcap+scale", "T+outputs")
BASELINE = "eager"
SHAPES = {"cuda": [(16384, 151936)], "cpu": [(2048, 32000)]}
QUICK_SHAPES = {"cuda": [(4096, 32000)], "cpu": [(256, 32000)]}
DTYPES = {"cuda": ("bfloat16",), "cpu": ("float32",)}
GRAD_ROWS = 32  # rows of the gradient that are verified
REF_CHUNK = 256  # rows per float64 reference chunk


def transform(mode: str, temps: torch.Tensor) -> dict:
    """token_logprobs' keyword arguments of a mode."""
    per_token = mode.startswith("T[token]")
    kwargs = {"temperature": temps if per_token else 0.7}
    if "softcap" in mode:
        kwargs["softcap"] = 30.0
    if "scale" in mode:
        kwargs["logit_scale"] = 0.5
    return kwargs


def make_inputs(point: harness.Point, seed: int, device: torch.device) -> dict:
    rows, vocab = point.shape
    gen = torch.Generator(device=device).manual_seed(seed)
    logits = torch.randn(rows, vocab, generator=gen, device=device).mul_(3.0).to(point.dtype)
    return {
        "logits": logits,
        "target": torch.randint(0, vocab, (rows,), generator=gen, device=device),
        "temps": torch.rand(rows, generator=gen, device=device) + 0.5,
        "g_lp": torch.randn(rows, generator=gen, device=device),
        "g_ent": torch.randn(rows, generator=gen, device=device),
    }


def expected_outputs(point: harness.Point, inputs: dict):
    """float64 reference: log-probs and entropy of every row, the gradient's first rows."""
    from rlhf_ext import reference

    logits, target, temps = inputs["logits"], inputs["target"], inputs["temps"]
    lps, ents = [], []
    for start in range(0, logits.shape[0], REF_CHUNK):
        rows = slice(start, start + REF_CHUNK)
        kwargs = transform(point.mode, temps[rows])
        lp, ent = reference.token_logprobs(
            logits[rows].double(), target[rows], return_entropy=True, **kwargs
        )
        lps.append(lp)
        ents.append(ent)
    x = logits[:GRAD_ROWS].double().requires_grad_()
    kwargs = transform(point.mode, temps[:GRAD_ROWS])
    lp, ent = reference.token_logprobs(x, target[:GRAD_ROWS], return_entropy=True, **kwargs)
    ((lp * inputs["g_lp"][:GRAD_ROWS]).sum() + (ent * inputs["g_ent"][:GRAD_ROWS]).sum()).backward()
    return torch.cat(lps), torch.cat(ents), x.grad


def ours(backend: str, mode: str):
    import rlhf_ext
    from rlhf_ext.ops._vocab import LOGPROB_OUTPUTS

    def compute(logits, target, temps):
        if "outputs" in mode:
            out = rlhf_ext.token_logprobs(
                logits, target, outputs=LOGPROB_OUTPUTS, validate=False, backend=backend,
                **transform(mode, temps),
            )  # fmt: skip
            return out.logprobs, out.entropy
        return rlhf_ext.token_logprobs(
            logits, target, return_entropy=True, validate=False, backend=backend,
            **transform(mode, temps),
        )  # fmt: skip

    return compute


def eager(mode: str):
    def compute(logits, target, temps):
        kwargs = transform(mode, temps)
        z = logits.float() * kwargs.get("logit_scale", 1.0)
        if "softcap" in kwargs:
            z = torch.tanh(z / kwargs["softcap"]) * kwargs["softcap"]
        temperature = kwargs["temperature"]
        z = z / (temperature[:, None] if isinstance(temperature, torch.Tensor) else temperature)
        logp = torch.log_softmax(z, -1)
        entropy = -(logp.exp() * logp).sum(-1)
        if "outputs" in mode:  # what a trainer computes for them by hand
            # computed (and timed), not checked
            _extras = (torch.logsumexp(z, -1), torch.logsumexp(2 * logp, -1), z.mean(-1),
                       z.argmax(-1) == target)  # fmt: skip
        return logp.gather(-1, target[:, None]).squeeze(-1), entropy

    return compute


def as_impl(name: str, compute, dtype: torch.dtype) -> Impl:
    low = dtype in (torch.bfloat16, torch.float16)
    tol = dict(rtol=2e-2, atol=2e-3) if low else dict(rtol=1e-4, atol=1e-4)

    def forward_backward(x):
        logits = x["logits"].requires_grad_()
        lp, ent = compute(logits, x["target"], x["temps"])
        (grad,) = torch.autograd.grad((lp, ent), logits, (x["g_lp"], x["g_ent"]))
        logits.requires_grad_(False)
        return lp.detach(), ent.detach(), grad[:GRAD_ROWS]

    return Impl(name, forward_backward, **tol)


def implementations(point: harness.Point, device, runner) -> list[Impl]:
    backends = harness.rlhf_ext_backends(device, runner)
    impls = [as_impl(f"rlhf_ext[{b}]", ours(b, point.mode), point.dtype) for b in backends]
    return impls + [as_impl(BASELINE, eager(point.mode), point.dtype)]


def bytes_moved(point: harness.Point, impl: Impl) -> int:
    """The logits read in the forward, read again and the gradient written in the backward,
    plus the per-token tensors (target, temperature, outputs, upstream gradients)."""
    (rows, vocab), dtype = point.shape, point.dtype
    return 3 * rows * vocab * dtype.itemsize + rows * (8 + 4 + 2 * 4 + 2 * 4 + 4)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the logit-transform benchmark; see ``python -m bench logit_transforms --help``."""
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
        only=args.only,
        save=not args.no_save,
        csv_path=args.csv,
        results_dir=args.results_dir,
    )


def _extra_args(parser) -> None:
    harness.add_mode_dtype_args(parser, MODES)


if __name__ == "__main__":
    raise SystemExit(main())
