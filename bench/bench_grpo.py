"""``python -m bench grpo``: one critic-free policy step (group advantages from ``[B]``
scores, then the policy loss forward + backward), and the policy-loss kinds, against
verl's own functions in the same run.

Two kinds of rows (``op`` column):

- ``grpo_step``: ``rlhf_ext.group_advantages`` (GRPO: group mean and std, eps 1e-6) into
  ``rlhf_ext.policy_loss`` with the ``[B]`` advantages broadcast in the kernel (kind "ppo",
  clip 0.2 / 0.28, dual clip 3, token-mean), forward + backward, against verl 0.9.1's
  ``compute_grpo_outcome_advantage`` (the speedup baseline: a Python loop over the rows,
  then a ``[B, T]`` broadcast) + ``compute_policy_loss_vanilla`` forward + backward;
- ``policy_loss[<kind>]``: the loss alone from ``[B]`` advantages, for the kinds "ppo",
  "gspo_token" (verl's GSPO), "gspo" (TRL's), "cispo" and "geo_mean" (GMPO), each against
  verl's function for it where verl has one (``compute_policy_loss_vanilla`` / ``_gspo`` /
  ``_cispo`` / ``_geo_mean``, given ``[B, T]`` advantages, its only form). The GSPO and
  CISPO rows divided by the "ppo" row of the same run are issue 18's "within 1.3x of the
  vanilla loss".

Every implementation is verified against the float64 reference (loss and gradient)
before it is timed. verl's functions take float 0/1 masks and uid arrays, as verl's trainer
gives them; the uid factorisation is not timed for rlhf_ext (the verl adapter does it once
per batch). Groups of 8 rows; right-padded masks with at least one token per row. Minimum
bytes: read logprobs, old logprobs (4 B each) and the bool mask (1 B), write the float32
gradient (4 B) per token.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch

from . import harness
from .bench_group_advantages import EPS
from .bench_group_advantages import make_inputs as group_inputs
from .harness import Impl

CLIP_LOW, CLIP_HIGH, DUAL_CLIP = 0.2, 0.28, 3.0
GSPO_LOW, GSPO_HIGH = 3e-3, 4e-3  # the GSPO paper's band for the sequence ratio
GMPO_CLIP = 0.4  # the GMPO paper's log-ratio band (e^-0.4, e^0.4)
BASELINE = "verl"
SHAPES = {"cuda": [(4096, 8192)], "cpu": [(512, 1024), (4096, 8192)]}
QUICK_SHAPES = [(256, 512)]
# kind -> (rlhf_ext policy_loss settings, verl's registry name or None)
KINDS = {
    "ppo": (dict(clip_eps=CLIP_LOW, clip_eps_high=CLIP_HIGH, dual_clip=DUAL_CLIP), "vanilla"),
    "gspo_token": (dict(clip_eps=GSPO_LOW, clip_eps_high=GSPO_HIGH), "gspo"),
    "gspo": (dict(clip_eps=GSPO_LOW, clip_eps_high=GSPO_HIGH), None),
    "cispo": (dict(clip_eps=CLIP_LOW, clip_eps_high=CLIP_HIGH), "cispo"),
    # verl averages GMPO's row losses over the rows (all non-empty here): seq-mean-token-sum
    "geo_mean": (
        dict(clip_eps=GMPO_CLIP, clip_eps_high=GMPO_CLIP, agg="seq-mean-token-sum"),
        "geo_mean",
    ),
}


def make_inputs(point: harness.Point, seed: int, device: torch.device) -> dict:
    """bench_group_advantages' inputs ([B] scores in shuffled groups of GROUP, verl's
    token_level_rewards, uids, a right-padded mask) plus log-probs with ratios around 1 and
    the loss rows' [B] advantages."""
    rows, tokens = point.shape
    out = group_inputs(point, seed, device)
    generator = torch.Generator().manual_seed(seed + 1)
    lp = -torch.rand(rows, tokens, generator=generator) * 4 - 0.01
    old = lp + torch.randn(rows, tokens, generator=generator) * 0.05
    scores = out["scores"]
    out.update(lp=lp.to(device), old=old.to(device),
               adv_rows=((scores - scores.mean()) / scores.std()))  # fmt: skip
    return out


def _loss_and_grad(loss_fn, x):
    """(loss, d loss / d logprobs) of loss_fn(x, leaf) for a fresh logprobs leaf."""
    leaf = x["lp"].detach().requires_grad_()
    loss = loss_fn(x, leaf)
    (grad,) = torch.autograd.grad(loss, leaf)
    return loss.detach(), grad


# -- grpo_step ------------------------------------------------------------------------


def _step_ours(x, leaf, backend):
    import rlhf_ext

    adv = rlhf_ext.group_advantages(x["scores"], x["ids"], eps=EPS, validate=False,
                                    backend=backend)  # fmt: skip
    loss, _ = rlhf_ext.policy_loss(leaf, x["old"], adv, x["mask"], kind="ppo",
                                   backend=backend, **KINDS["ppo"][0])  # fmt: skip
    return loss


def _step_reference(x, leaf):
    import rlhf_ext
    from rlhf_ext import reference

    adv = reference.group_advantages(x["scores"].double(), x["ids"], eps=EPS)
    loss, _ = rlhf_ext.policy_loss(leaf.double(), x["old"].double(), adv, x["mask"],
                                   kind="ppo", backend="torch", **KINDS["ppo"][0])  # fmt: skip
    return loss


# -- policy_loss[kind] ----------------------------------------------------------------


def _loss_ours(x, leaf, kind, backend):
    import rlhf_ext

    loss, _ = rlhf_ext.policy_loss(leaf, x["old"], x["adv_rows"], x["mask"], kind=kind,
                                   backend=backend, **KINDS[kind][0])  # fmt: skip
    return loss


def _loss_reference(x, leaf, kind):
    import rlhf_ext

    loss, _ = rlhf_ext.policy_loss(leaf.double(), x["old"].double(), x["adv_rows"].double(),
                                   x["mask"], kind=kind, backend="torch",
                                   **KINDS[kind][0])  # fmt: skip
    return loss


def _verl(runner: harness.Runner):
    try:
        from verl.trainer.ppo import core_algos
        from verl.workers.config import ActorConfig
    except Exception as error:  # verl is a test extra
        runner.note(f"verl not timed: it does not import ({type(error).__name__})")
        return None, None
    return core_algos, ActorConfig


def _verl_config(actor_config, kind):
    settings = KINDS[kind][0]
    low = settings.get("clip_eps", CLIP_LOW)
    high = settings.get("clip_eps_high", low)
    return actor_config(strategy="fsdp", ppo_micro_batch_size_per_gpu=1, rollout_n=1,
                        clip_ratio=low, clip_ratio_low=low, clip_ratio_high=high,
                        clip_ratio_c=DUAL_CLIP)  # fmt: skip


def step_impls(device, runner) -> list[Impl]:
    impls = [Impl(f"rlhf_ext[{backend}]",
                  functools.partial(_loss_and_grad, functools.partial(_step_ours,
                                                                      backend=backend)),
                  rtol=1e-4, atol=1e-6)
             for backend in harness.rlhf_ext_backends(device, runner)]  # fmt: skip
    core_algos, actor_config = _verl(runner)
    if core_algos is not None:
        config = _verl_config(actor_config, "ppo")

        def verl_step(x, leaf):
            adv, _ = core_algos.compute_grpo_outcome_advantage(
                x["rewards"], x["mask_float"], x["uids"], epsilon=EPS)  # fmt: skip
            loss, _ = core_algos.compute_policy_loss_vanilla(
                x["old"], leaf, adv, x["mask_float"], "token-mean", config)  # fmt: skip
            return loss

        impls.append(Impl(BASELINE, functools.partial(_loss_and_grad, verl_step), rtol=1e-4,
                          atol=1e-6))  # fmt: skip
    return impls


def kind_impls(kind, device, runner) -> list[Impl]:
    impls = [Impl(f"rlhf_ext[{backend}]",
                  functools.partial(_loss_and_grad, functools.partial(_loss_ours, kind=kind,
                                                                      backend=backend)),
                  rtol=1e-4, atol=1e-6)
             for backend in harness.rlhf_ext_backends(device, runner)]  # fmt: skip
    core_algos, actor_config = _verl(runner)
    name = KINDS[kind][1]
    if core_algos is not None and name is not None:
        config = _verl_config(actor_config, kind)
        verl_fn = core_algos.POLICY_LOSS_REGISTRY[name]

        def verl_loss(x, leaf):
            adv = x["adv_rows"].unsqueeze(-1) * x["mask_float"]  # verl's [B, T] advantages
            loss, _ = verl_fn(x["old"], leaf, adv, x["mask_float"], "token-mean", config)
            return loss

        impls.append(Impl(BASELINE, functools.partial(_loss_and_grad, verl_loss), rtol=1e-4,
                          atol=1e-6))  # fmt: skip
    return impls


def bytes_moved(point: harness.Point, impl: Impl) -> int:
    rows, tokens = point.shape
    return rows * tokens * (4 + 4 + 1 + 4)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the GRPO-step and policy-kind benchmarks; see ``python -m bench grpo --help``."""
    args = harness.parse_args("grpo", argv, __doc__.splitlines()[0])
    device = harness.resolve_device(args.device)
    shapes = harness.chosen_shapes(args, SHAPES, QUICK_SHAPES, device)
    cases = [("grpo_step", step_impls, _step_reference)]
    for kind in KINDS:
        cases.append((f"policy_loss[{kind}]", functools.partial(kind_impls, kind),
                      functools.partial(_loss_reference, kind=kind)))  # fmt: skip
    status = 0
    for op, impls, reference in cases:
        runner = harness.start_runner(op, device, args.quick)
        status = max(status, harness.sweep(
            runner,
            shapes=shapes,
            dtypes=[torch.float32],
            make_inputs=functools.partial(make_inputs, device=device),
            implementations=lambda point, impls=impls, runner=runner: impls(device, runner),
            expected=lambda point, x, reference=reference: _loss_and_grad(reference, x),
            baseline=BASELINE,
            bytes_moved=bytes_moved,
            only=args.only,
            set_count=functools.partial(harness.input_set_count, device=device, limit=2),
            save=not args.no_save,
            csv_path=args.csv,
            results_dir=args.results_dir,
        ))  # fmt: skip
    return status


if __name__ == "__main__":
    raise SystemExit(main())
