"""The peers' own implementations, written as the peers write them.

The benchmarks time them as their baselines (``from . import peers``, so they ship with
the benchmarks as rlhf_ext.bench.peers) and the test suite checks rlhf_ext against them,
importing them as ``bench.peers`` (python_tests/test_peers_home.py checks the one name).
Only torch is imported at module level; TorchRL is optional.
"""

from __future__ import annotations

import torch


def trl_gae(rewards: torch.Tensor, values: torch.Tensor, gamma: float = 1.0, lam: float = 0.95):
    """GAE as TRL's PPO trainer (and verl before its multi-turn mask) computes it.

    The Python loop over time steps, one handful of [B] kernels per step; no mask (the
    recurrence runs over every position). Returns ``(advantages, returns)``.
    """
    lastgaelam = 0
    advantages_reversed = []
    gen_length = rewards.shape[1]
    for t in reversed(range(gen_length)):
        nextvalues = values[:, t + 1] if t < gen_length - 1 else 0.0
        delta = rewards[:, t] + gamma * nextvalues - values[:, t]
        lastgaelam = delta + gamma * lam * lastgaelam
        advantages_reversed.append(lastgaelam)
    advantages = torch.stack(advantages_reversed[::-1], dim=1)
    returns = advantages + values
    return advantages, returns


def verl_gae(
    token_level_rewards: torch.Tensor,
    values: torch.Tensor,
    response_mask: torch.Tensor,
    gamma: float = 1.0,
    lam: float = 0.95,
):
    """GAE as verl's ``compute_gae_advantage_return`` computes it (with the multi-turn
    mask: masked positions pass the running value and advantage through), without the
    ``masked_whiten`` verl applies afterwards (a separate op, benchmarked on its own).

    Differs from rlhf_ext.gae only at masked positions: verl writes the carried
    advantage there, rlhf_ext writes 0. On an all-valid mask they agree.
    """
    with torch.no_grad():
        nextvalues = 0
        lastgaelam = 0
        advantages_reversed = []
        gen_len = token_level_rewards.shape[-1]
        for t in reversed(range(gen_len)):
            delta = token_level_rewards[:, t] + gamma * nextvalues - values[:, t]
            lastgaelam_ = delta + gamma * lam * lastgaelam
            # skip values and TD-error on observation tokens
            nextvalues = values[:, t] * response_mask[:, t] + (1 - response_mask[:, t]) * nextvalues
            lastgaelam = lastgaelam_ * response_mask[:, t] + (1 - response_mask[:, t]) * lastgaelam
            advantages_reversed.append(lastgaelam)
        advantages = torch.stack(advantages_reversed[::-1], dim=1)
        returns = advantages + values
    return advantages, returns


def torchrl_available() -> bool:
    """Whether TorchRL's vectorised GAE can be imported."""
    try:
        from torchrl.objectives.value.functional import vec_generalized_advantage_estimate  # noqa: F401
    except Exception:
        return False
    return True


def torchrl_gae(rewards: torch.Tensor, values: torch.Tensor, gamma: float = 1.0, lam: float = 0.95):
    """GAE through TorchRL's ``vec_generalized_advantage_estimate`` (a convolution with
    the (gamma*lam)^k series instead of a loop), on [B, T] inputs with no mask.

    TorchRL takes ``[B, T, 1]`` tensors and an explicit next-state value; each row is one
    trajectory that terminates at its last step (next value 0 there, as in TRL). The
    reshaping a [B, T] caller needs is part of what is timed.
    """
    from torchrl.objectives.value.functional import vec_generalized_advantage_estimate

    state_value = values.unsqueeze(-1)
    next_state_value = torch.cat([values[:, 1:], torch.zeros_like(values[:, :1])], dim=1).unsqueeze(
        -1
    )
    done = torch.zeros_like(state_value, dtype=torch.bool)
    done[:, -1] = True
    reward = rewards.unsqueeze(-1)
    try:
        advantages, value_target = vec_generalized_advantage_estimate(
            gamma, lam, state_value, next_state_value, reward, done, terminated=done, time_dim=-2
        )
    except TypeError:  # TorchRL before `terminated` was added
        advantages, value_target = vec_generalized_advantage_estimate(
            gamma, lam, state_value, next_state_value, reward, done, time_dim=-2
        )
    return advantages.squeeze(-1), value_target.squeeze(-1)


# -- token log-probs ---------------------------------------------------------------------


def eager_logprobs(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The common eager form: upcast, ``log_softmax`` over the vocabulary, ``gather``.

    Materialises the [..., V] float32 log-probs (the memory RLHF trainers run out of).
    """
    logp = torch.log_softmax(logits.float(), dim=-1)
    return logp.gather(-1, target.unsqueeze(-1)).squeeze(-1)


def verl_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Entropy as verl's ``entropy_from_logits`` writes it: a softmax, then
    ``logsumexp - sum(p * logits)``; a second full pass over the logits."""
    logits = logits.float()
    pd = torch.softmax(logits, dim=-1)
    return torch.logsumexp(logits, dim=-1) - (pd * logits).sum(dim=-1)


def trl_selective_log_softmax(logits: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """TRL's ``selective_log_softmax`` approach on [B, T, V] logits.

    float32 / float64: the target logit minus a per-sequence ``logsumexp`` (a loop over
    the B sequences keeps the temporaries at one sequence). bfloat16 / float16: a
    per-sequence ``log_softmax`` in the input dtype (logsumexp is unstable there).
    """
    if logits.dtype in (torch.float32, torch.float64):
        picked = torch.gather(logits, dim=-1, index=index.unsqueeze(-1)).squeeze(-1)
        lse = torch.stack([torch.logsumexp(row, dim=-1) for row in logits])
        return picked - lse
    rows = []
    for row_logits, row_index in zip(logits, index, strict=True):
        row_logps = torch.log_softmax(row_logits, dim=-1)
        rows.append(row_logps.gather(dim=-1, index=row_index.unsqueeze(-1)).squeeze(-1))
    return torch.stack(rows)


def trl_entropy(logits: torch.Tensor, chunk_size: int = 128) -> torch.Tensor:
    """TRL's ``entropy_from_logits`` approach: log-softmax over chunks of rows,
    ``-(exp(logp) * logp).sum(-1)`` per chunk."""
    flat = logits.reshape(-1, logits.shape[-1])
    parts = []
    for chunk in flat.split(chunk_size, dim=0):
        logps = torch.log_softmax(chunk.float(), dim=-1)
        parts.append(-(torch.exp(logps) * logps).sum(-1))
    return torch.cat(parts).reshape(logits.shape[:-1])


# -- losses, as verl's core_algos writes them ----------------------------------
# verl computes the PPO losses in eager PyTorch, one small kernel per line; these are
# the same steps (written here in our own words) so tests and bench/bench_losses.py
# compare against, and time, what a verl user runs today.


def verl_masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """verl's masked mean: sum(values * mask) / (sum(mask) + 1e-8)."""
    return (values * mask).sum() / (mask.sum() + 1e-8)


def verl_agg_loss(loss_mat: torch.Tensor, loss_mask: torch.Tensor, loss_agg_mode: str):
    """verl's agg_loss. Unlike rlhf_ext, the seq-mean modes average over every row
    (a row with no valid token counts as 0, or NaN for seq-mean-token-mean)."""
    if loss_agg_mode == "token-mean":
        return verl_masked_mean(loss_mat, loss_mask)
    if loss_agg_mode == "seq-mean-token-sum":
        return torch.sum(loss_mat * loss_mask, dim=-1).mean()
    if loss_agg_mode == "seq-mean-token-mean":
        per_row = torch.sum(loss_mat * loss_mask, dim=-1) / torch.sum(loss_mask, dim=-1)
        return per_row.mean()
    if loss_agg_mode == "seq-mean-token-sum-norm":
        return torch.sum(loss_mat * loss_mask) / loss_mask.shape[-1]
    raise ValueError(f"unknown loss_agg_mode {loss_agg_mode!r}")


def verl_policy_loss(
    old_log_prob: torch.Tensor,
    log_prob: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    clip_ratio_c: float = 3.0,
    loss_agg_mode: str = "token-mean",
):
    """verl's vanilla PPO policy loss (dual clip always on, c = clip_ratio_c).

    Returns ``(loss, clipfrac, ppo_kl, clipfrac_lower)``; response_mask is float 0/1.
    """
    log_ratio = torch.clamp(log_prob - old_log_prob, min=-20.0, max=20.0)
    ratio = torch.exp(log_ratio)
    ppo_kl = verl_masked_mean(-log_ratio, response_mask)
    surrogate = -advantages * ratio
    surrogate_clipped = -advantages * torch.clamp(ratio, 1 - clip_low, 1 + clip_high)
    clip_max = torch.maximum(surrogate, surrogate_clipped)
    clipfrac = verl_masked_mean(torch.gt(surrogate_clipped, surrogate).float(), response_mask)
    floor = -advantages * clip_ratio_c
    clip_min = torch.min(floor, clip_max)
    clipfrac_lower = verl_masked_mean(
        torch.gt(clip_max, floor) * (advantages < 0).float(), response_mask
    )
    per_token = torch.where(advantages < 0, clip_min, clip_max)
    loss = verl_agg_loss(per_token, response_mask, loss_agg_mode)
    return loss, clipfrac, ppo_kl, clipfrac_lower


def trl_grpo_loss(
    per_token_logps: torch.Tensor,
    old_per_token_logps: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    epsilon_low: float = 0.2,
    epsilon_high: float = 0.2,
    *,
    importance_sampling_level: str = "token",
    delta: float | None = None,
    loss_type: str = "grpo",
):
    """TRL's GRPO loss for ``loss_type`` "grpo" (mean over rows of each row's token mean) or
    "bnpo" (token mean), beta 0, no masks beyond the completion mask, as
    ``GRPOTrainer._compute_loss`` writes it (trl 1.12 ``trainer/grpo_trainer.py``
    L3172-3209, 3241-3250): ``"sequence"`` level is GSPO (the ratio's gradient flows through
    the row mean), ``delta`` the two-sided clip. ``advantages`` are per row ``[B]``;
    returns the loss before gradient accumulation."""
    advantages = advantages.unsqueeze(1)
    log_ratio = per_token_logps - old_per_token_logps
    if importance_sampling_level == "token":
        log_importance_weights = log_ratio
    else:
        log_importance_weights = (log_ratio * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)
        log_importance_weights = log_importance_weights.unsqueeze(-1)
    coef_1 = torch.exp(log_importance_weights)
    coef_2 = torch.clamp(coef_1, 1 - epsilon_low, 1 + epsilon_high)
    if delta is not None:
        coef_1 = torch.clamp(coef_1, max=delta)
    per_token_loss1 = coef_1 * advantages
    per_token_loss2 = coef_2 * advantages
    per_token_loss = -torch.min(per_token_loss1, per_token_loss2)
    if loss_type == "grpo":
        return ((per_token_loss * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()
    return (per_token_loss * mask).sum() / mask.sum().clamp(min=1.0)


def verl_value_loss(
    vpreds: torch.Tensor,
    returns: torch.Tensor,
    values: torch.Tensor,
    response_mask: torch.Tensor,
    cliprange_value: float,
    loss_agg_mode: str = "token-mean",
):
    """verl's clipped value loss: ``(loss, clipfrac)``."""
    vpreds_clipped = torch.clamp(vpreds, values - cliprange_value, values + cliprange_value)
    losses = (vpreds - returns) ** 2
    losses_clipped = (vpreds_clipped - returns) ** 2
    loss = 0.5 * verl_agg_loss(torch.max(losses, losses_clipped), response_mask, loss_agg_mode)
    clipfrac = verl_masked_mean(torch.gt(losses_clipped, losses).float(), response_mask)
    return loss, clipfrac


def verl_kl_penalty(
    logprob: torch.Tensor, ref_logprob: torch.Tensor, kl_penalty: str = "low_var_kl"
):
    """verl's per-token KL estimators ("kl"/"k1", "abs", "mse"/"k2", "low_var_kl"/"k3";
    "+" = straight-through with the k2 gradient)."""
    if kl_penalty.endswith("+"):
        value = verl_kl_penalty(logprob, ref_logprob, kl_penalty[:-1])
        k2 = verl_kl_penalty(logprob, ref_logprob, "mse")
        return k2 - k2.detach() + value.detach()
    if kl_penalty in ("kl", "k1"):
        return logprob - ref_logprob
    if kl_penalty == "abs":
        return (logprob - ref_logprob).abs()
    if kl_penalty in ("mse", "k2"):
        return 0.5 * (logprob - ref_logprob).square()
    if kl_penalty in ("low_var_kl", "k3"):
        kl = torch.clamp(ref_logprob - logprob, min=-20, max=20)
        kl = torch.clamp(torch.exp(kl) - kl - 1, min=-10, max=10)
        return kl
    raise ValueError(f"unknown kl_penalty {kl_penalty!r}")


def verl_kl_loss(
    logprob, ref_logprob, response_mask, kl_penalty="low_var_kl", loss_agg_mode="token-mean"
):
    """verl's actor KL loss: agg_loss(kl_penalty(...))."""
    return verl_agg_loss(
        verl_kl_penalty(logprob, ref_logprob, kl_penalty), response_mask, loss_agg_mode
    )


def eager_linear_logprobs(hidden: torch.Tensor, weight: torch.Tensor, target: torch.Tensor):
    """Log-probs from the LM head as eager training code computes them: the logits
    ``hidden @ weight.T`` materialised, then ``eager_logprobs`` (upcast, log_softmax, gather)."""
    return eager_logprobs(hidden @ weight.T, target)


def liger_linear_logprobs(hidden: torch.Tensor, weight: torch.Tensor, target: torch.Tensor):
    """Per-token log-probs through Liger-Kernel's fused linear cross entropy
    (``reduction="none"``, negated); needs liger_kernel and a GPU."""
    from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

    loss = liger_fused_linear_cross_entropy(hidden, weight, target, reduction="none")
    return -(loss[0] if isinstance(loss, tuple) else loss)


def cce_linear_logprobs(hidden: torch.Tensor, weight: torch.Tensor, target: torch.Tensor):
    """Per-token log-probs through Apple's cut-cross-entropy ``linear_cross_entropy``
    (``reduction="none"``, negated); needs cut_cross_entropy and a GPU."""
    from cut_cross_entropy import linear_cross_entropy

    return -linear_cross_entropy(hidden, weight, target, reduction="none")


# -- verl's FSDP engine, without its FSDP setup ---------------------------------------


def verl_fsdp_engine(chunking: bool = False, checkpointing: bool = False, fused_backend=None):
    """verl 0.9.1's ``FSDPEngineWithLMHead`` object holding only what its
    ``prepare_model_inputs`` / ``prepare_model_outputs`` read from ``self`` (the engine
    config's entropy options, no Ulysses and no static padding, the model config's fused
    kernel backend, the entropy function bound as ``__init__`` binds it: verl_F's, patched
    or not, or the chunked one). Needs verl."""
    from types import SimpleNamespace

    from verl.utils import torch_functional as verl_F
    from verl.workers.engine.fsdp.transformer_impl import FSDPEngineWithLMHead

    engine = object.__new__(FSDPEngineWithLMHead)
    engine.engine_config = SimpleNamespace(
        entropy_checkpointing=checkpointing,
        entropy_from_logits_with_chunking=chunking,
        entropy_from_logits_chunk_size=4,
    )
    engine.use_ulysses_sp, engine.ulysses_sequence_parallel_size = False, 1
    engine.pad_to_length = False
    options = None if fused_backend is None else {"impl_backend": fused_backend}
    engine.model_config = SimpleNamespace(fused_kernel_options=options)
    engine.compute_entropy_from_logits = (
        verl_F.entropy_from_logits_with_chunking if chunking else verl_F.entropy_from_logits
    )
    return engine


def verl_packed_micro_batch(lengths, vocab: int, pad: int, flags: dict, dtype=torch.float32):
    """A packed micro-batch as verl's ``prepare_model_inputs`` leaves it on the
    remove-padding path: ``(micro_batch, output_args, logits)`` with the nested input ids
    and ``flags`` (``calculate_entropy``, ``calculate_sum_pi_squared``, ...) as non-tensor
    data, the rolled labels and per-token temperatures of ``sum(lengths) + pad`` rows, and
    the model's ``[1, rows, vocab]`` logits (std ~3). Draws from torch's generator."""
    from verl.utils import tensordict_utils as tu

    rows = sum(lengths) + pad
    ids = torch.nested.nested_tensor(
        [torch.randint(0, vocab, (n,)) for n in lengths], layout=torch.jagged
    )
    micro_batch = tu.get_tensordict({"input_ids": ids}, non_tensor_dict=dict(flags))
    output_args = {
        "input_ids_rmpad_rolled": torch.randint(0, vocab, (rows,)),
        "temperature_rmpad": torch.rand(rows) + 0.5,
        "temperature_is_one": False,
        "pad_size": pad,
    }
    return micro_batch, output_args, (torch.randn(1, rows, vocab) * 3).to(dtype)


def verl_micro_batch(lengths, vocab: int, flags: dict, temperature):
    """A micro-batch as verl's FSDP engine receives it: nested ``input_ids`` and
    ``position_ids`` of ``lengths`` tokens, ``temperature`` (a float, or a [bsz] tensor:
    per sample) and ``flags`` (``use_fused_kernels``, ``calculate_entropy``, ...) as
    non-tensor data. Draws from torch's generator."""
    from verl.utils import tensordict_utils as tu

    def nested(rows):
        return torch.nested.nested_tensor(rows, layout=torch.jagged)

    tensors = {
        "input_ids": nested([torch.randint(0, vocab, (n,)) for n in lengths]),
        "position_ids": nested([torch.arange(n) for n in lengths]),
    }
    non_tensors = dict(flags)
    if isinstance(temperature, torch.Tensor):
        tensors["temperature"] = temperature
    else:
        non_tensors["temperature"] = temperature
    return tu.get_tensordict(tensors, non_tensor_dict=non_tensors)


def verl_prepare_model_outputs(engine, micro_batch, output_args, logits: torch.Tensor):
    """verl's engine step after the model: ``prepare_model_outputs`` on the model output
    ``logits * 1.0`` (a fresh non-leaf, as a model's head gives it), as installed (patched or
    not). Returns the flat outputs ({"log_probs": [nnz], "entropy": ..., ...})."""
    from types import SimpleNamespace

    result = type(engine).prepare_model_outputs(
        engine, SimpleNamespace(logits=logits * 1.0), output_args, micro_batch, None
    )
    return {key: value.values() for key, value in result.items()}


# -- Megatron-style vocabulary parallelism (verl's Megatron backend) --------------------


class _MegatronVocabParallelCrossEntropy(torch.autograd.Function):
    """Megatron-core's ``vocab_parallel_cross_entropy`` as it computes it: three
    all-reduces of N floats (the max, the target's logit, the sum of exponentials), the
    softmax ``[N, V_local]`` saved for the backward (local: softmax - one-hot)."""

    @staticmethod
    def forward(ctx, vocab_parallel_logits, target, group):
        import torch.distributed as dist

        logits_max = vocab_parallel_logits.max(dim=-1).values
        dist.all_reduce(logits_max, op=dist.ReduceOp.MAX, group=group)
        shifted = vocab_parallel_logits - logits_max.unsqueeze(-1)
        per_partition = shifted.shape[-1]
        start = dist.get_rank(group) * per_partition
        outside = (target < start) | (target >= start + per_partition)
        masked_target = torch.where(outside, 0, target - start)
        predicted = shifted.gather(-1, masked_target.unsqueeze(-1)).squeeze(-1)
        predicted = torch.where(outside, 0.0, predicted)
        dist.all_reduce(predicted, group=group)
        exp_logits = shifted.exp()
        sum_exp = exp_logits.sum(dim=-1)
        dist.all_reduce(sum_exp, group=group)
        loss = sum_exp.log() - predicted
        softmax = exp_logits / sum_exp.unsqueeze(-1)
        ctx.save_for_backward(softmax, outside, masked_target)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        softmax, outside, masked_target = ctx.saved_tensors
        one_hot = torch.zeros_like(softmax).scatter_(-1, masked_target.unsqueeze(-1), 1.0)
        grad = (softmax - one_hot * (~outside).unsqueeze(-1)) * grad_loss.unsqueeze(-1)
        return grad, None, None


def install_fake_megatron(group) -> None:
    """Register stand-ins for what ``verl.utils.megatron.tensor_parallel`` imports from
    megatron-core (which does not install here): ``megatron.core.parallel_state``'s
    tensor-parallel group, rank and size (``group``'s), and
    ``megatron.core.tensor_parallel.vocab_parallel_cross_entropy`` (the function above).
    verl's own module then imports and runs as under Megatron."""
    import sys
    import types

    import torch.distributed as dist

    parallel_state = types.ModuleType("megatron.core.parallel_state")
    parallel_state.get_tensor_model_parallel_group = lambda: group
    parallel_state.get_tensor_model_parallel_rank = lambda: dist.get_rank(group)
    parallel_state.get_tensor_model_parallel_world_size = lambda: dist.get_world_size(group)
    tensor_parallel = types.ModuleType("megatron.core.tensor_parallel")
    tensor_parallel.vocab_parallel_cross_entropy = lambda vocab_parallel_logits, target: (
        _MegatronVocabParallelCrossEntropy.apply(vocab_parallel_logits, target, group)
    )
    core = types.ModuleType("megatron.core")
    core.parallel_state, core.tensor_parallel = parallel_state, tensor_parallel
    megatron = types.ModuleType("megatron")
    megatron.core = core
    sys.modules.update({"megatron": megatron, "megatron.core": core,
                        "megatron.core.parallel_state": parallel_state,
                        "megatron.core.tensor_parallel": tensor_parallel})  # fmt: skip


# -- peer code cut from a downloaded wheel (OpenRLHF does not import without flash-attn) ---


def openrlhf_wheel_path():
    """OpenRLHF 0.11.2's wheel: ``RLHF_EXT_OPENRLHF_WHEEL``, else where ``make test``
    downloads it (``<venv>/peer-wheels``, any platform tag), else the path earlier
    sessions used (which may not exist)."""
    import os
    import sys
    from pathlib import Path

    if os.environ.get("RLHF_EXT_OPENRLHF_WHEEL"):
        return Path(os.environ["RLHF_EXT_OPENRLHF_WHEEL"])
    found = sorted((Path(sys.prefix) / "peer-wheels").glob("openrlhf-0.11.2-*.whl"))
    return found[0] if found else Path("/tmp/orl/openrlhf-0.11.2-cp311-cp311-manylinux1_x86_64.whl")


def wheel_source(wheel, module_path: str) -> str:
    """The text of ``module_path`` (``openrlhf/...py``) in ``wheel``, under
    ``*.data/purelib/`` or the root."""
    import zipfile

    with zipfile.ZipFile(wheel) as archive:
        (name,) = [n for n in archive.namelist()
                   if n == module_path or n.endswith("/" + module_path)]  # fmt: skip
        return archive.read(name).decode()


def top_level(source: str, names) -> list:
    """The module-level definitions (functions, classes, assignments) of ``source`` named
    in ``names`` (AssertionError when one is missing)."""
    import ast

    found = []
    for node in ast.parse(source).body:
        if isinstance(node, ast.Assign):
            defined = [t.id for t in node.targets if isinstance(t, ast.Name)]
        else:
            defined = [getattr(node, "name", None)]
        if set(defined) & set(names):
            found.append(node)
    assert len(found) == len(names), f"not all of {names} found"
    return found


def exec_nodes(nodes, namespace: dict, origin: str = "<peer wheel>") -> dict:
    """Run the statements ``nodes`` in ``namespace``; returns it."""
    import ast

    code = compile(ast.Module(body=list(nodes), type_ignores=[]), origin, "exec")
    exec(code, namespace)
    return namespace


def openrlhf_get_cumulative_returns():
    """OpenRLHF 0.11.2's ``RemoteExperienceMaker.get_cumulative_returns`` (its T-step loop),
    cut from its wheel and called with ``self=None``; None without the wheel."""
    wheel = openrlhf_wheel_path()
    if not wheel.is_file():
        return None
    source = wheel_source(wheel, "openrlhf/trainer/ppo_utils/experience_maker.py")
    (maker,) = top_level(source, ["RemoteExperienceMaker"])
    maker.body = [n for n in maker.body if getattr(n, "name", None) == "get_cumulative_returns"]
    namespace = exec_nodes([maker], {"torch": torch, "Tuple": tuple}, "<openrlhf 0.11.2>")
    method = namespace["RemoteExperienceMaker"].get_cumulative_returns
    return lambda rewards, action_mask, gamma: method(None, rewards, action_mask, gamma)
