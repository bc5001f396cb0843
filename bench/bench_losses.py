"""``python -m bench losses``: the PPO policy loss (with its statistics), the value loss
and the KL loss, forward + backward, against verl's eager code, in one run.

For each op (one results row per implementation and shape; ``op`` = ppo_policy_loss,
value_loss or kl_loss), each implementation is verified against a float64 reference
before it is timed. One timed call = forward (loss and statistics) + backward
(``torch.autograd.grad`` of the loss w.r.t. the differentiable input):

- ``rlhf_ext[cpu]`` / ``rlhf_ext[cuda]``: the compiled kernels for the device;
- ``rlhf_ext[triton]``: on CUDA only (on CPU Triton runs only under its interpreter);
- ``eager (verl)``: verl's compute_policy_loss / compute_value_loss / kl_penalty +
  agg_loss as eager PyTorch (bench/peers.py), the speedup baseline;
- ``torch.compile(verl)``: the same function under torch.compile (forward and backward
  compiled by AOTAutograd).

Settings: policy clip_eps 0.2, clip_eps_high 0.28, dual clip 3 (verl always applies its
clip_ratio_c = 3); value clip 0.2; KL kind low_var_kl (k3); agg token-mean; float32
inputs; right-padded masks with at least one valid token per row (where verl's and
rlhf_ext's seq-mean conventions agree). Minimum bytes moved: read the three (KL: two)
[B, T] float32 inputs and the mask (1 B bool; 4 B for verl's float mask), write the
float32 gradient; the statistics and the scalar loss are negligible.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from . import harness, peers
from .harness import Impl

DTYPE = torch.float32
BASELINE = "eager (verl)"
SHAPES = [(256, 1024), (1024, 4096)]
QUICK_SHAPES = [(64, 256), (256, 1024)]
CLIP_LOW, CLIP_HIGH, DUAL_CLIP, VALUE_CLIP, KL_KIND = 0.2, 0.28, 3.0, 0.2, "low_var_kl"


@dataclass
class OpSpec:
    """One benchmarked op: its input names (the first is differentiable), the
    rlhf_ext call, verl's call and the reference, each returning (loss, *stats)."""

    name: str
    inputs: tuple[str, ...]
    ours: Callable
    verl: Callable
    reference: Callable


def _policy_ours(x, lp, backend):
    import rlhf_ext

    loss, stats = rlhf_ext.ppo_policy_loss(
        lp,
        x["old"],
        x["adv"],
        x["mask"],
        clip_eps=CLIP_LOW,
        clip_eps_high=CLIP_HIGH,
        dual_clip=DUAL_CLIP,
        backend=backend,
    )
    return loss, stats["clipfrac"], stats["approx_kl"], stats["clipfrac_lower"]


def _policy_verl(x, lp):
    return peers.verl_policy_loss(
        x["old"], lp, x["adv"], x["mask_float"], CLIP_LOW, CLIP_HIGH, DUAL_CLIP
    )


def _policy_reference(x, lp):
    from rlhf_ext import reference

    loss, stats = reference.ppo_policy_loss(
        lp,
        x["old"].double(),
        x["adv"].double(),
        x["mask"],
        clip_eps=CLIP_LOW,
        clip_eps_high=CLIP_HIGH,
        dual_clip=DUAL_CLIP,
    )
    return loss, stats["clipfrac"], stats["approx_kl"], stats["clipfrac_lower"]


def _value_ours(x, v, backend):
    import rlhf_ext

    loss, stats = rlhf_ext.value_loss(
        v, x["old"], x["ret"], x["mask"], clip_eps=VALUE_CLIP, backend=backend
    )
    return loss, stats["clipfrac"]


def _value_verl(x, v):
    return peers.verl_value_loss(v, x["ret"], x["old"], x["mask_float"], VALUE_CLIP)


def _value_reference(x, v):
    from rlhf_ext import reference

    loss, stats = reference.value_loss(
        v, x["old"].double(), x["ret"].double(), x["mask"], clip_eps=VALUE_CLIP
    )
    return loss, stats["clipfrac"]


def _kl_ours(x, lp, backend):
    import rlhf_ext

    return (rlhf_ext.kl_loss(lp, x["ref"], x["mask"], kind=KL_KIND, backend=backend),)


def _kl_verl(x, lp):
    return (peers.verl_kl_loss(lp, x["ref"], x["mask_float"], KL_KIND),)


def _kl_reference(x, lp):
    from rlhf_ext import reference

    return (reference.kl_loss(lp, x["ref"].double(), x["mask"], kind=KL_KIND),)


OPS = [
    OpSpec(
        "ppo_policy_loss",
        ("lp", "old", "adv"),
        _policy_ours,
        _policy_verl,
        _policy_reference,
    ),
    OpSpec("value_loss", ("v", "old", "ret"), _value_ours, _value_verl, _value_reference),
    OpSpec("kl_loss", ("lp", "ref"), _kl_ours, _kl_verl, _kl_reference),
]


def make_inputs(point: harness.Point, seed: int, device: torch.device) -> dict:
    """One input set for all three ops: log-probs near each other (ratios around 1 with
    some outside the clip range), advantages of both signs, values and returns, and a
    right-padded mask (every row keeps at least one token) as bool and as float."""
    generator = torch.Generator().manual_seed(seed)
    rows, cols = point.shape

    def randn(scale=1.0):
        return torch.randn(rows, cols, generator=generator, dtype=DTYPE) * scale

    lp = -torch.rand(rows, cols, generator=generator, dtype=DTYPE) * 4 - 0.01
    v = randn()
    lengths = torch.randint(1, cols + 1, (rows,), generator=generator)
    mask = torch.arange(cols)[None, :] < lengths[:, None]
    tensors = {
        "lp": lp,
        "old": lp + randn(0.3),
        "adv": randn(),
        "ref": lp + randn(0.5),
        "v": v,
        "ret": v + randn(0.5),
        "mask": mask,
        "mask_float": mask.to(DTYPE),
    }
    return {k: t.to(device) for k, t in tensors.items()}


def with_backward(call: Callable, spec: OpSpec, x: dict):
    """call(x, leaf) -> (loss, *stats); returns (loss, *stats, d loss / d leaf)."""
    leaf = x[spec.inputs[0]].detach().requires_grad_()
    out = call(x, leaf)
    (grad,) = torch.autograd.grad(out[0], leaf)
    return (*(t.detach() for t in out), grad)


def expected_outputs(spec: OpSpec, point: harness.Point, x: dict):
    """The reference's (loss, *stats, gradient), the differentiable input in float64."""
    x64 = dict(x)
    x64[spec.inputs[0]] = x[spec.inputs[0]].double()
    return with_backward(spec.reference, spec, x64)


def impls_for(
    spec: OpSpec, point: harness.Point, device: torch.device, runner: harness.Runner
) -> list[Impl]:
    """rlhf_ext's backends for the device, verl eager (baseline), verl compiled."""
    impls = []
    for backend in harness.rlhf_ext_backends(device, runner):
        call = functools.partial(spec.ours, backend=backend)
        impls.append(
            Impl(
                f"rlhf_ext[{backend}]",
                functools.partial(with_backward, call, spec),
                meta={"mask_bytes": 1},
            )
        )
    impls.append(
        Impl(BASELINE, functools.partial(with_backward, spec.verl, spec), meta={"mask_bytes": 4})
    )
    compiled = torch.compile(spec.verl, dynamic=False)
    impls.append(
        Impl(
            "torch.compile(verl)",
            functools.partial(with_backward, compiled, spec),
            optional=True,
            meta={"mask_bytes": 4},
        )
    )
    return impls


def bytes_moved(spec: OpSpec, point: harness.Point, impl: Impl) -> int:
    """Minimum traffic: the inputs read once, the float32 gradient written once."""
    elements = point.shape[0] * point.shape[1]
    return elements * (4 * len(spec.inputs) + impl.meta.get("mask_bytes", 0) + 4)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the loss benchmarks; see ``python -m bench losses --help``."""
    args = harness.parse_args("losses", argv, __doc__.splitlines()[0], extra=_extra_args)
    device = harness.resolve_device(args.device)
    wanted = [s.strip() for s in args.ops.split(",")] if args.ops else [s.name for s in OPS]
    shapes = harness.chosen_shapes(args, SHAPES, QUICK_SHAPES, device)
    status = 0
    for spec in OPS:
        if spec.name not in wanted:
            continue
        runner = harness.start_runner(spec.name, device, args.quick)
        spec_status = harness.sweep(
            runner,
            shapes=shapes,
            dtypes=[DTYPE],
            make_inputs=functools.partial(make_inputs, device=device),
            implementations=functools.partial(impls_for, spec, device=device, runner=runner),
            expected=functools.partial(expected_outputs, spec),
            baseline=BASELINE,
            bytes_moved=functools.partial(bytes_moved, spec),
            only=args.only,
            set_count=functools.partial(harness.input_set_count, device=device, limit=8),
            save=not args.no_save,
            csv_path=args.csv,
            results_dir=args.results_dir,
        )
        status = max(status, spec_status)
    return status


def _extra_args(parser) -> None:
    parser.add_argument(
        "--ops",
        default=None,
        help="comma-separated subset of ppo_policy_loss,value_loss,kl_loss (default: all)",
    )


if __name__ == "__main__":
    raise SystemExit(main())
