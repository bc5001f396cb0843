"""The patched verl FSDP engine's unfused log-prob path: log-probs, entropy and
sum_pi_squared from one read of the logits (rlhf_ext.integrations.verl.prepare_model_outputs),
against verl 0.9.1's own ``FSDPEngineWithLMHead.prepare_model_outputs`` run unpatched on the
same inputs. The engine is verl's class without its FSDP setup: the method reads only the
engine config, the Ulysses flag and the entropy function from ``self``."""

from __future__ import annotations

import zlib
from types import SimpleNamespace

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

engine_impl = pytest.importorskip("verl.workers.engine.fsdp.transformer_impl")

from bench import peers  # noqa: E402
from rlhf_ext.integrations import verl as adapter  # noqa: E402

TOL = dict(rtol=1e-5, atol=1e-5)
VOCAB, LENGTHS, PAD = 67, (5, 3, 9), 2


@pytest.fixture(autouse=True)
def _seeded(request):
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))


class CountForwardReads(TorchDispatchMode):
    """Counts the log-prob kernels' forward calls (each one reads the logits once)."""

    def __init__(self):
        super().__init__()
        self.reads = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if "token_logprobs_fwd" in str(func):
            self.reads += 1
        return func(*args, **(kwargs or {}))


def _run(engine, micro_batch, output_args, logits, upstream):
    """prepare_model_outputs on a leaf copy of the logits: its outputs (flat), the gradient
    of sum(output * upstream) w.r.t. the logits, the log-prob kernel forwards it made."""
    leaf = logits.clone().requires_grad_(True)
    with CountForwardReads() as counter:
        flat = peers.verl_prepare_model_outputs(engine, micro_batch, output_args, leaf)
    loss = sum((flat[key].float() * upstream[key]).sum() for key in flat)
    loss.backward()
    return flat, leaf.grad, counter.reads


def _inputs(flags, dtype=torch.float32):
    return peers.verl_packed_micro_batch(LENGTHS, VOCAB, PAD, flags, dtype)


FLAG_SETS = [
    dict(calculate_entropy=True, calculate_sum_pi_squared=True),
    dict(calculate_entropy=True),
    dict(calculate_sum_pi_squared=True),
    dict(),
]


@pytest.mark.parametrize("flags", FLAG_SETS, ids=lambda f: "+".join(f) or "logprobs")
@pytest.mark.parametrize("engine_options", [{}, {"chunking": True}, {"checkpointing": True}],
                         ids=["plain", "chunked-entropy", "checkpointed-entropy"])  # fmt: skip
def test_one_read_matches_verl_engine(flags, engine_options):
    """Outputs and the logits' gradient equal verl's own method's; the shared read is one
    log-prob kernel forward for everything this adapter computes (verl's chunked and
    checkpointed entropies stay verl's own calls)."""
    micro_batch, output_args, logits = _inputs(flags)
    keys = ["log_probs"] + [k for k, on in (("entropy", "calculate_entropy"),
                                            ("sum_pi_squared", "calculate_sum_pi_squared"))
                            if flags.get(on)]  # fmt: skip
    upstream = {key: torch.randn(sum(LENGTHS)) for key in keys}
    theirs, their_grad, their_reads = _run(
        peers.verl_fsdp_engine(**engine_options), micro_batch, output_args, logits, upstream
    )
    assert sorted(theirs) == sorted(keys) and their_reads == 0
    adapter.patch()
    try:
        assert engine_impl.FSDPEngineWithLMHead.prepare_model_outputs is (
            adapter.prepare_model_outputs
        )
        ours, our_grad, our_reads = _run(
            peers.verl_fsdp_engine(**engine_options), micro_batch, output_args, logits, upstream
        )
    finally:
        adapter.unpatch()
    assert engine_impl.FSDPEngineWithLMHead.prepare_model_outputs is not (
        adapter.prepare_model_outputs
    )
    for key in keys:
        assert ours[key].dtype == theirs[key].dtype, key
        torch.testing.assert_close(ours[key], theirs[key], **TOL)
    torch.testing.assert_close(our_grad, their_grad, **TOL)
    # one read for the log-probs and what shares it; verl's checkpointed entropy calls the
    # patched plain function on its own (its recomputation in the backward is not counted)
    entropy_apart = flags.get("calculate_entropy") and engine_options.get("checkpointing")
    assert our_reads == 1 + bool(entropy_apart)


def test_bf16_logits_match_verl_dtypes_and_accuracy():
    """bf16 logits: the dtypes verl returns (its functions compute in bf16), values within
    twice verl's error against float64."""
    flags = dict(calculate_entropy=True, calculate_sum_pi_squared=True)
    micro_batch, output_args, logits = _inputs(flags, torch.bfloat16)
    upstream = {k: torch.randn(sum(LENGTHS)) for k in ("log_probs", "entropy", "sum_pi_squared")}
    engine = peers.verl_fsdp_engine()
    theirs, _, _ = _run(engine, micro_batch, output_args, logits, upstream)
    exact, _, _ = _run(engine, micro_batch, output_args, logits.double(), upstream)
    adapter.patch()
    try:
        ours, _, reads = _run(peers.verl_fsdp_engine(), micro_batch, output_args, logits, upstream)
    finally:
        adapter.unpatch()
    assert reads == 1
    for key in upstream:
        assert ours[key].dtype == theirs[key].dtype == torch.bfloat16
        our_error = (ours[key].double() - exact[key]).abs().max()
        assert our_error <= 2 * (theirs[key].double() - exact[key]).abs().max() + 1e-2, key


def test_shared_read_falls_back_for_other_or_modified_logits():
    """Inside a plan, logits other than the first ones read, other labels, or the same
    logits changed in place since the read get their own computation, never the stale
    shared output."""
    logits = torch.randn(6, 23)
    labels = torch.randint(0, 23, (6,))
    outputs = ("logprobs", "entropy")
    with adapter._share_logits_read(labels, outputs):
        entropy = adapter.entropy_from_logits(logits)
        other = torch.randn(6, 23)
        torch.testing.assert_close(
            adapter.logprobs_from_logits(other, labels), other.log_softmax(-1)[range(6), labels]
        )
        assert adapter.logprobs_from_logits(logits, labels.clone()) is not None
        logits.mul_(2.0)
        logprobs = adapter.logprobs_from_logits(logits, labels)
    expected_entropy = torch.distributions.Categorical(logits=logits / 2).entropy()
    torch.testing.assert_close(entropy, expected_entropy)
    torch.testing.assert_close(logprobs, logits.log_softmax(-1)[range(6), labels])


# --- the fused-kernel path: per-sample temperature and sum_pi_squared -------------------


class TinyCausalLM(torch.nn.Module):
    """What verl's fused forward (dense_common.forward_with_torch_backend) reads of a
    model: ``.model`` (the decoder: here an embedding and a tanh), ``.lm_head`` and
    ``.config``."""

    def __init__(self, vocab=VOCAB, size=12):
        super().__init__()
        from transformers.modeling_outputs import BaseModelOutputWithPast

        self.embed = torch.nn.Embedding(vocab, size)
        self.lm_head = torch.nn.Linear(size, vocab, bias=False)
        self.config = SimpleNamespace(output_attentions=False, output_hidden_states=False)
        self.model = lambda input_ids, **_: BaseModelOutputWithPast(
            last_hidden_state=torch.tanh(self.embed(input_ids)) * 3
        )

    def logits(self, input_ids, **_):
        return SimpleNamespace(logits=self.lm_head(self.model(input_ids)[0]))


def _engine_step(engine, micro_batch, model, fused, keep=None):
    """verl's forward step around the model: inputs, the model (the fused forward or the
    plain logits), outputs; flat outputs and the model's gradients of their weighted sum
    (the log-probs weighted 0 where ``keep`` is False)."""
    from verl.models.transformers.dense_common import forward_with_torch_backend

    cls = engine_impl.FSDPEngineWithLMHead
    model.zero_grad()
    model_inputs, output_args = cls.prepare_model_inputs(engine, micro_batch)
    if fused:
        output = forward_with_torch_backend(model, **model_inputs)
    else:
        output = model.logits(**model_inputs)
    result = cls.prepare_model_outputs(engine, output, output_args, micro_batch, None)
    flat = {key: value.values() for key, value in result.items()}
    generator = torch.Generator().manual_seed(5)
    weights = {key: torch.randn(flat[key].shape, generator=generator) for key in sorted(flat)}
    if keep is not None:
        weights["log_probs"] = weights["log_probs"] * keep
    loss = sum((flat[key].float() * weights[key]).sum() for key in flat)
    loss.backward()
    return flat, [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("remove_padding", [True, False], ids=["rmpad", "padded"])
@pytest.mark.parametrize("per_sample", [True, False], ids=["per-sample-T", "float-T"])
def test_fused_kernels_lift_verls_refusals(remove_padding, per_sample):
    """With use_fused_kernels (torch head) verl refuses a per-sample temperature and
    sum_pi_squared; patched, the fused path gives what verl's unfused path gives on the
    same model: log-probs, entropy and sum_pi_squared, and the model's gradients."""
    lengths = (5, 3, 9)
    temperature = torch.rand(len(lengths)) + 0.5 if per_sample else 0.7
    flags = dict(use_remove_padding=remove_padding, calculate_entropy=True,
                 calculate_sum_pi_squared=True)  # fmt: skip
    unfused = peers.verl_micro_batch(lengths, VOCAB, {**flags, "use_fused_kernels": False},
                                     temperature)  # fmt: skip
    fused = unfused.copy()
    tu = pytest.importorskip("verl.utils.tensordict_utils")
    tu.assign_non_tensor(fused, use_fused_kernels=True)
    # verl's padded paths disagree at each sequence's last token: the fused forward rolls
    # the labels within each padded row (the pad id follows), the unfused path over the
    # packed sequence (the next sequence's first token follows); the rest agrees
    keep = torch.ones(sum(lengths), dtype=torch.bool)
    if not remove_padding:
        keep[torch.tensor(lengths).cumsum(0) - 1] = False
    model = TinyCausalLM()
    engine = peers.verl_fsdp_engine(fused_backend="torch")
    expected, expected_grads = _engine_step(engine, unfused, model, fused=False, keep=keep)
    refusal = AssertionError if per_sample else NotImplementedError
    with pytest.raises(refusal, match="per sample temperature|calculate_sum_pi_squared"):
        _engine_step(engine, fused, model, fused=True)
    adapter.patch()
    try:
        got, got_grads = _engine_step(engine, fused, model, fused=True, keep=keep)
        # the Triton head (verl's linear_cross_entropy) is not replaced: its refusals stay
        triton_engine = peers.verl_fsdp_engine(fused_backend="triton")
        with pytest.raises(refusal, match="per sample temperature|calculate_sum_pi_squared"):
            _engine_step(triton_engine, fused, model, fused=True)
    finally:
        adapter.unpatch()
    assert sorted(got) == sorted(expected) == ["entropy", "log_probs", "sum_pi_squared"]
    for key in expected:
        want = expected[key].float()[keep] if key == "log_probs" else expected[key].float()
        have = got[key].float()[keep] if key == "log_probs" else got[key].float()
        torch.testing.assert_close(have, want, **TOL, msg=key)
    for ours, theirs in zip(got_grads, expected_grads, strict=True):
        torch.testing.assert_close(ours, theirs, **TOL)
