"""``python -m bench gae``: rlhf_ext.gae against the peers' GAE, in one run.

Implementations (each verified against a float64 reference before it is timed):

- ``rlhf_ext.gae[cpu]`` / ``[cuda]``: the compiled kernel for the device, without and
  with a mask (``+mask``: an all-valid bool mask, so the masked path does the same math);
- ``rlhf_ext.gae[triton]`` (and ``+mask``): on CUDA only (on CPU Triton runs only under
  its interpreter, a test tool, so it is not timed there);
- ``python loop (TRL)``: the per-timestep loop TRL and verl use (bench/peers.py: trl_gae),
  the speedup baseline;
- ``python loop+mask (verl)``: verl's loop with its multi-turn mask (float mask);
- ``torch.compile(TRL loop)``: the same loop compiled (the loop is unrolled, so compile
  time grows with T: only up to ``--compile-max-t``; not on CPU under --quick);
- ``torchrl vec_gae``: TorchRL's vectorised GAE, when torchrl is installed.

float32 inputs, gamma=1.0, lam=0.95 (TRL's defaults). The peers without a mask compute
the unmasked recurrence; every implementation is compared on an all-valid mask.
Minimum bytes moved: read rewards + values (4 B each) + the mask when one is read
(1 B bool, 4 B for verl's float mask), write advantages + returns (4 B each).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch

from . import harness, peers
from .harness import Impl

OP = "gae"
GAMMA, LAM = 1.0, 0.95
DTYPE = torch.float32
BASELINE = "python loop (TRL)"
SHAPES = {"cuda": [(256, 1024), (1024, 4096)], "cpu": [(32, 128), (256, 1024)]}
QUICK_SHAPES = [(64, 256), (256, 1024)]
# Longest T for which the TRL loop is torch.compile'd: dynamo unrolls the loop, so compile
# time grows with T (seen: T=256 took ~40 s on CPU, ~56 s with a GPU). --quick: 256, and
# never on CPU.
COMPILE_MAX_T = {"cuda": 1024, "cpu": 256}
QUICK_COMPILE_MAX_T = 256


def make_inputs(point: harness.Point, seed: int, device: torch.device) -> dict:
    """One input set: random rewards and values (never zeros), an all-valid mask as
    bool (rlhf_ext) and as float (verl multiplies by it)."""
    shape = point.shape
    generator = torch.Generator().manual_seed(seed)
    rewards = torch.randn(*shape, generator=generator, dtype=DTYPE).to(device)
    values = torch.randn(*shape, generator=generator, dtype=DTYPE).to(device)
    mask = torch.ones(*shape, dtype=torch.bool, device=device)
    return {"rewards": rewards, "values": values, "mask": mask, "mask_float": mask.to(DTYPE)}


def expected_outputs(point: harness.Point, inputs: dict):
    """(advantages, returns) in float64 from rlhf_ext's reference (TRL's loop without it)."""
    r64, v64 = inputs["rewards"].double(), inputs["values"].double()
    try:
        from rlhf_ext import reference

        return reference.gae(r64, v64, inputs["mask"], gamma=GAMMA, lam=LAM)
    except ImportError:
        return peers.trl_gae(r64, v64, GAMMA, LAM)


def rlhf_ext_impls(device: torch.device, runner: harness.Runner) -> list[Impl]:
    """The compiled kernel for the device and (on CUDA) Triton, each without/with mask."""
    try:
        import rlhf_ext
    except Exception as error:
        runner.note(
            f"rlhf_ext does not import ({type(error).__name__}: {error}); timing the peers only"
        )
        return []
    available = rlhf_ext.available_backends(device)
    wanted = [device.type] + (["triton"] if device.type == "cuda" else [])
    impls = []
    for backend in wanted:
        if backend not in available:
            runner.note(f"rlhf_ext backend {backend!r} unavailable here (available: {available})")
            continue

        def plain(x, backend=backend):
            return rlhf_ext.gae(x["rewards"], x["values"], gamma=GAMMA, lam=LAM, backend=backend)

        def masked(x, backend=backend):
            return rlhf_ext.gae(
                x["rewards"], x["values"], x["mask"], gamma=GAMMA, lam=LAM, backend=backend
            )

        impls.append(Impl(f"rlhf_ext.gae[{backend}]", plain, meta={"mask_bytes": 0}))
        impls.append(Impl(f"rlhf_ext.gae[{backend}]+mask", masked, meta={"mask_bytes": 1}))
    if device.type == "cpu":
        runner.note(
            "triton not timed on CPU (Triton kernels need CUDA; its CPU interpreter is for tests)"
        )
    return impls


def peer_impls(
    device: torch.device, shape: Sequence[int], args, runner: harness.Runner
) -> list[Impl]:
    """TRL's loop (baseline), verl's masked loop, the loop under torch.compile, TorchRL.
    Built per shape: whether the loop is compiled depends on T, and each shape gets its
    own compiled function."""
    impls = [
        Impl(
            BASELINE,
            lambda x: peers.trl_gae(x["rewards"], x["values"], GAMMA, LAM),
            meta={"mask_bytes": 0},
        ),
        Impl(
            "python loop+mask (verl)",
            lambda x: peers.verl_gae(x["rewards"], x["values"], x["mask_float"], GAMMA, LAM),
            meta={"mask_bytes": 4},
        ),
    ]
    steps = shape[-1]
    if device.type == "cpu" and args.quick:
        runner.note(
            "torch.compile(TRL loop) skipped on CPU under --quick "
            "(compiling the unrolled loop takes tens of seconds)"
        )
    elif steps > args.compile_max_t:
        runner.note(
            f"torch.compile(TRL loop) skipped for T={steps} > --compile-max-t={args.compile_max_t} "
            "(dynamo unrolls the T-step loop; compile time grows with T)"
        )
    else:
        # A fresh compiled function per shape: no recompilation or dynamic-shape guards.
        compiled = torch.compile(
            functools.partial(peers.trl_gae, gamma=GAMMA, lam=LAM), dynamic=False
        )
        impls.append(
            Impl(
                "torch.compile(TRL loop)",
                lambda x: compiled(x["rewards"], x["values"]),
                optional=True,
                meta={"mask_bytes": 0},
            )
        )
    if peers.torchrl_available():
        # A convolution with the (gamma*lam)^k series: float32 rounding differs from the loop.
        impls.append(
            Impl(
                "torchrl vec_gae",
                lambda x: peers.torchrl_gae(x["rewards"], x["values"], GAMMA, LAM),
                rtol=1e-3,
                atol=1e-3,
                optional=True,
                meta={"mask_bytes": 0},
            )
        )
    return impls


def bytes_moved(point: harness.Point, impl: Impl) -> int:
    """Minimum traffic: rewards + values read, advantages + returns written (float32),
    plus the mask when the implementation reads one."""
    elements = 1
    for d in point.shape:
        elements *= d
    return elements * (4 + 4 + impl.meta.get("mask_bytes", 0) + 4 + 4)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the GAE benchmark; see ``python -m bench gae --help``."""
    args = harness.parse_args(OP, argv, __doc__.splitlines()[0], extra=_extra_args)
    device = harness.resolve_device(args.device)
    if args.compile_max_t is None:
        args.compile_max_t = QUICK_COMPILE_MAX_T if args.quick else COMPILE_MAX_T[device.type]
    runner = harness.start_runner(OP, device, args.quick)
    ours = rlhf_ext_impls(device, runner)
    if not peers.torchrl_available():
        runner.note("torchrl vec_gae skipped: torchrl is not installed (pip install torchrl)")
    return harness.sweep(
        runner,
        shapes=harness.chosen_shapes(args, SHAPES, QUICK_SHAPES, device),
        dtypes=[DTYPE],
        make_inputs=functools.partial(make_inputs, device=device),
        implementations=lambda point: ours + peer_impls(device, point.shape, args, runner),
        expected=expected_outputs,
        baseline=BASELINE,
        bytes_moved=bytes_moved,
        only=args.only,
        save=not args.no_save,
        csv_path=args.csv,
        results_dir=args.results_dir,
    )


def _extra_args(parser) -> None:
    parser.add_argument(
        "--compile-max-t",
        type=int,
        default=None,
        help="longest T for which the TRL loop is torch.compile'd (default "
        f"{COMPILE_MAX_T['cuda']} on cuda, {COMPILE_MAX_T['cpu']} on cpu, "
        f"{QUICK_COMPILE_MAX_T} with --quick)",
    )


if __name__ == "__main__":
    raise SystemExit(main())
