"""``python -m bench group_advantages``: rlhf_ext.group_advantages against verl's GRPO and
RLOO estimators on the same scores, in one run.

Implementations (each verified against the float64 reference before it is timed):

- ``rlhf_ext.group_advantages[cpu]`` / ``[cuda]`` (and ``[triton]`` on CUDA): GRPO
  advantages, ``[B]`` out, from the ``[B]`` scores and int64 group ids;
- ``... +broadcast``: the same, times the response mask, ``[B, T]`` out, which is what
  verl's estimators return (the broadcast is most of their time at large T);
- ``verl grpo (loop)``: verl 0.9.1's ``compute_grpo_outcome_advantage`` (the speedup
  baseline) and ``verl grpo_vectorized``, when verl is installed.
  verl takes ``token_level_rewards [B, T]`` (the score at the last valid token) and the uid
  array; the uid factorisation is not timed for rlhf_ext (the adapter does it once per
  batch on the host) and is inside verl's own function.

Groups of 8 rows (``--shapes BxT``: B rows, T tokens), float32. Minimum bytes: the [B]
scores and ids read, the [B] advantages written (+ the [B, T] mask read and output
written for +broadcast).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import numpy as np
import torch

from . import harness
from .harness import Impl

OP = "group_advantages"
GROUP = 8
EPS = 1e-6
BASELINE = "verl grpo (loop)"
SHAPES = {"cuda": [(4096, 8192)], "cpu": [(512, 1024), (4096, 8192)]}
QUICK_SHAPES = [(256, 512)]


def make_inputs(point: harness.Point, seed: int, device: torch.device) -> dict:
    """Scores at the last valid token of right-padded rows, shuffled groups of GROUP."""
    rows, tokens = point.shape
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, tokens + 1, (rows,), generator=generator)
    mask = torch.arange(tokens)[None, :] < lengths[:, None]
    scores = torch.randn(rows, generator=generator)
    ids = torch.randperm(rows, generator=generator) // GROUP
    rewards = torch.zeros(rows, tokens)
    rewards[torch.arange(rows), lengths - 1] = scores
    return {
        "scores": scores.to(device),
        "ids": ids.to(device),
        "uids": np.array([f"prompt-{i}" for i in ids.tolist()], dtype=object),
        "mask": mask.to(device),
        "mask_float": mask.float().to(device),
        "rewards": rewards.to(device),
    }


def expected_outputs(point: harness.Point, inputs: dict):
    from rlhf_ext import reference

    return reference.group_advantages(
        inputs["scores"].double(), inputs["ids"], singleton="raw", eps=EPS
    )


def _grpo(x, backend):
    import rlhf_ext

    return rlhf_ext.group_advantages(x["scores"], x["ids"], singleton="raw", eps=EPS,
                                     validate=False, backend=backend)  # fmt: skip


def rlhf_ext_impls(device: torch.device, runner: harness.Runner) -> list[Impl]:
    impls = []
    for backend in harness.rlhf_ext_backends(device, runner):
        grpo = functools.partial(_grpo, backend=backend)
        impls.append(Impl(f"rlhf_ext.group_advantages[{backend}]", grpo,
                          meta={"broadcast": False}))  # fmt: skip
        impls.append(
            Impl(
                f"rlhf_ext.group_advantages[{backend}]+broadcast",
                lambda x, grpo=grpo: grpo(x).unsqueeze(-1) * x["mask_float"],
                check=grpo,
                meta={"broadcast": True},
            )
        )
    return impls


def verl_impls(runner: harness.Runner) -> list[Impl]:
    try:
        from verl.trainer.ppo import core_algos
    except Exception as error:  # verl is a test extra
        runner.note(f"verl not timed: it does not import ({type(error).__name__})")
        return []

    def row_values(fn):
        # verl returns [B, T] = a_i * mask: the check reads a_i at each row's first token.
        return lambda x: fn(x)[:, 0]

    grpo = lambda x: core_algos.compute_grpo_outcome_advantage(  # noqa: E731
        x["rewards"], x["mask_float"], x["uids"], epsilon=EPS)[0]  # fmt: skip
    vectorized = lambda x: core_algos.compute_grpo_vectorized_outcome_advantage(  # noqa: E731
        x["rewards"], x["mask_float"], x["uids"], epsilon=EPS)[0]  # fmt: skip
    return [
        Impl(BASELINE, grpo, check=row_values(grpo), rtol=1e-4, atol=1e-5,
             meta={"broadcast": True}),
        Impl("verl grpo_vectorized", vectorized, check=row_values(vectorized), rtol=1e-4,
             atol=1e-5, meta={"broadcast": True}),
    ]  # fmt: skip


def bytes_moved(point: harness.Point, impl: Impl) -> int:
    rows, tokens = point.shape
    per_row = 4 + 8 + 4  # score, int64 id, advantage
    if impl.meta.get("broadcast"):
        per_row += tokens * (4 + 4)  # float mask read, [B, T] advantages written
    return rows * per_row


def main(argv: Sequence[str] | None = None) -> int:
    """Run the group-advantage benchmark; see ``python -m bench group_advantages --help``."""
    args = harness.parse_args(OP, argv, __doc__.splitlines()[0])
    device = harness.resolve_device(args.device)
    runner = harness.start_runner(OP, device, args.quick)
    ours = rlhf_ext_impls(device, runner)
    peers = verl_impls(runner)
    return harness.sweep(
        runner,
        shapes=harness.chosen_shapes(args, SHAPES, QUICK_SHAPES, device),
        dtypes=[torch.float32],
        make_inputs=functools.partial(make_inputs, device=device),
        implementations=lambda point: ours + peers,
        expected=expected_outputs,
        baseline=BASELINE,
        bytes_moved=bytes_moved,
        only=args.only,
        save=not args.no_save,
        csv_path=args.csv,
        results_dir=args.results_dir,
    )


if __name__ == "__main__":
    raise SystemExit(main())
