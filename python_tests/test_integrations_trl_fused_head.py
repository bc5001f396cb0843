"""TRL 1.16's fused LM head (issue 24, item 1) on rlhf_ext.linear_token_logprobs:
``trl.kernels.chunked_logprob.ChunkedLogProbFunction`` replaced by
``rlhf_ext.integrations.trl.ChunkedLogProbFunction``, tested against TRL's own function (its
torch path: this machine has no GPU) and through ``add_fused_lm_head`` on tiny models, the
way GRPO, RLOO, SFT, DPO and KTO call it. Skipped where the installed TRL predates 1.16."""

from __future__ import annotations

import pytest
import torch

chunked = pytest.importorskip("trl.kernels.chunked_logprob", reason="needs TRL >= 1.16")
trl_utils = pytest.importorskip("trl.trainer.utils")
transformers = pytest.importorskip("transformers")

from rlhf_ext.integrations import trl as adapter  # noqa: E402

TRL_CHUNK = 32768  # trl.trainer.utils._CHUNKED_LOGPROB_CHUNK_SIZE
EVERY = adapter.FUSED_HEAD_DEFAULT_OUTPUTS
NAME = "rlhf_ext.integrations.trl.ChunkedLogProbFunction"


def trl_function():
    """TRL's own class, patched or not."""
    return adapter.original("trl.kernels.chunked_logprob.ChunkedLogProbFunction")


def head_inputs(gen, n=37, size=24, vocab=301, dtype=torch.float32, bias=True):
    hidden = torch.randn(n, size, generator=gen).to(dtype)
    weight = (torch.randn(vocab, size, generator=gen) * 0.6).to(dtype)
    b = torch.randn(vocab, generator=gen).to(dtype) if bias else None
    targets = torch.randint(0, vocab, (n,), generator=gen)
    return hidden, weight, b, targets


def apply_with_grads(fn, hidden, weight, bias, targets, *args, upstream):
    """(outputs, grads of hidden, weight, bias) of sum(g_lp * log_probs + g_ent * entropy)."""
    leaves = [t.detach().clone().requires_grad_() if t is not None else None
              for t in (hidden, weight, bias)]  # fmt: skip
    out = fn.apply(leaves[0], leaves[1], leaves[2], targets, *args)
    loss = (out[0] * upstream[0]).sum()
    if out[1] is not None:
        loss = loss + (out[1] * upstream[1]).sum()
    loss.backward()
    return out, [leaf.grad if leaf is not None else None for leaf in leaves]


CASES = {
    "plain": (1.0, None, 1.0, ("log_probs",)),
    "every-output": (0.7, None, 1.0, EVERY),
    "gemma-softcap": (1.0, 5.0, 1.0, ("entropy", "is_top1")),
    "cohere-scale": (0.9, None, 0.4, ("entropy", "mean_logits", "log_sum_sq_probs")),
    "softcap-and-scale": (1.3, 8.0, 1.7, EVERY),
}


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("bias", [False, True], ids=["no-bias", "bias"])
def test_matches_trls_own_function(case, bias):
    """Every output and the gradients of hidden, weight and bias, float32, against TRL's
    ChunkedLogProbFunction (a 64-column vocabulary chunk, so that it folds several tiles)."""
    gen = torch.Generator().manual_seed(len(case) + bias)
    temperature, softcap, scale, outputs = CASES[case]
    hidden, weight, b, targets = head_inputs(gen, bias=bias)
    upstream = (torch.randn(37, generator=gen), torch.randn(37, generator=gen))
    args = (temperature, 64, softcap, scale, outputs)
    want, want_grads = apply_with_grads(trl_function(), hidden, weight, b, targets, *args,
                                        upstream=upstream)  # fmt: skip
    got, got_grads = apply_with_grads(adapter.ChunkedLogProbFunction, hidden, weight, b, targets,
                                      *args, upstream=upstream)  # fmt: skip
    for k, (g, w) in enumerate(zip(got, want, strict=True)):
        assert (g is None) == (w is None), (case, k)
        if w is None:
            continue
        assert g.dtype == w.dtype and g.shape == w.shape, (case, k)
        assert g.requires_grad == w.requires_grad, (case, k)
        if w.dtype == torch.bool:
            assert torch.equal(g, w), case
        else:
            torch.testing.assert_close(g, w, rtol=2e-5, atol=2e-5)
    for g, w in zip(got_grads, want_grads, strict=True):
        assert (g is None) == (w is None)
        if w is not None:
            assert g.dtype == w.dtype
            torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5)


def test_bf16_within_twice_trls_error():
    """bf16 inputs: TRL rounds each logits tile to bf16 before its float32 statistics, as the
    CPU op does; both against a float64 reference of the same (rounded) inputs."""
    gen = torch.Generator().manual_seed(7)
    hidden, weight, b, targets = head_inputs(gen, n=64, size=64, vocab=999, dtype=torch.bfloat16)
    args = (0.8, TRL_CHUNK, None, 1.0, ("entropy",))
    want = trl_function().apply(hidden, weight, b, targets, *args)
    got = adapter.ChunkedLogProbFunction.apply(hidden, weight, b, targets, *args)
    z = (hidden.double() @ weight.double().T + b.double()) / 0.8
    logp = torch.log_softmax(z, -1)
    exact = (logp.gather(-1, targets[:, None]).squeeze(-1), -(logp.exp() * logp).sum(-1))
    for k in range(2):
        err = (got[k].double() - exact[k]).abs().max().item()
        trl_err = (want[k].double() - exact[k]).abs().max().item()
        assert err <= 2 * trl_err + 1e-6, (k, err, trl_err)


def test_autocast_computes_in_the_autocast_dtype():
    """Under autocast TRL's GEMMs run in the autocast dtype (float32 master weights); so do
    the adapter's, and the gradients come back in the leaves' float32."""
    gen = torch.Generator().manual_seed(3)
    hidden, weight, b, targets = head_inputs(gen)
    args = (1.0, TRL_CHUNK, None, 1.0, ("entropy",))
    upstream = (torch.ones(37), torch.ones(37))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want, want_grads = apply_with_grads(trl_function(), hidden, weight, b, targets, *args,
                                            upstream=upstream)  # fmt: skip
        got, got_grads = apply_with_grads(adapter.ChunkedLogProbFunction, hidden, weight, b,
                                          targets, *args, upstream=upstream)  # fmt: skip
    rounded = [t.bfloat16().double() for t in (hidden, weight, b)]
    exact, exact_grads = apply_with_grads(  # float64 of the bf16-rounded inputs
        adapter.ChunkedLogProbFunction, *rounded, targets, *args,
        upstream=tuple(u.double() for u in upstream),
    )  # fmt: skip
    for g, w, e in zip((*got[:2], *got_grads), (*want[:2], *want_grads), (*exact[:2], *exact_grads),
                       strict=True):  # fmt: skip
        assert g.dtype == w.dtype == torch.float32
        err = (g.double() - e).abs().max().item()
        trl_err = (w.double() - e).abs().max().item()
        assert err <= 2 * trl_err + 1e-6, (err, trl_err)


BAD = [
    (dict(outputs=("log_probs", "logits")), r"`outputs` must be a tuple of names from"),
    (dict(outputs="entropy"), r"`outputs` must be a tuple of names from"),
    (dict(final_logit_softcapping=0.0), r"`final_logit_softcapping` must be None or > 0"),
    (dict(logit_scale=0.0), r"`logit_scale` must be > 0, got 0.0"),
    (dict(temperature=0.0), r"rlhf_ext\.linear_token_logprobs: `temperature`"),
]


@pytest.mark.parametrize("kwargs, pattern", BAD, ids=[p[:24] for _, p in BAD])
def test_bad_arguments_name_the_function_and_argument(kwargs, pattern):
    gen = torch.Generator().manual_seed(0)
    hidden, weight, b, targets = head_inputs(gen)
    settings = dict(temperature=1.0, chunk_size=TRL_CHUNK, final_logit_softcapping=None,
                    logit_scale=1.0, outputs=EVERY) | kwargs  # fmt: skip
    with pytest.raises(ValueError, match=pattern):
        adapter.ChunkedLogProbFunction.apply(hidden, weight, b, targets, *settings.values())


def tiny_model(kind: str):
    """A tiny randomly initialised transformers LM (from a config: no download)."""
    torch.manual_seed(0)
    common = dict(vocab_size=259, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                  num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
                  tie_word_embeddings=False)  # fmt: skip
    if kind == "gemma2":
        config = transformers.Gemma2Config(**common, head_dim=16, final_logit_softcapping=3.0)
    elif kind == "granite":
        config = transformers.GraniteConfig(**common, logits_scaling=0.25)
    else:
        config = transformers.LlamaConfig(**common)
    return transformers.AutoModelForCausalLM.from_config(config).eval()


def fused_forward(model, input_ids, labels):
    out = model(input_ids=input_ids, labels=labels, fused_lm_head=True)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return out, grads


@pytest.mark.parametrize("kind", ["llama", "gemma2", "granite"])
def test_add_fused_lm_head_before_and_after_patch(kind):
    """add_fused_lm_head's forward (every output, temperature 0.7, ignored labels) gives the
    same loss, per-token outputs and parameter gradients with the patch as without, on Llama,
    Gemma 2 (softcap) and Granite (logits_scaling) heads; and the patch is what it calls."""
    model = tiny_model(kind)
    trl_utils.add_fused_lm_head(model, temperature=0.7, outputs=("log_probs", *EVERY))
    gen = torch.Generator().manual_seed(1)
    input_ids = torch.randint(0, 259, (3, 12), generator=gen)
    labels = input_ids.clone()
    labels[0, :4] = -100
    labels[2, 9:] = -100
    want, want_grads = fused_forward(model, input_ids, labels)
    adapter.patch()
    try:
        assert trl_utils._ChunkedLogProbFunction is adapter.ChunkedLogProbFunction
        got, got_grads = fused_forward(model, input_ids, labels)
    finally:
        adapter.unpatch()
    assert trl_utils._ChunkedLogProbFunction is trl_function()
    torch.testing.assert_close(got.loss, want.loss, rtol=1e-5, atol=1e-6)
    for field in ("log_probs", *EVERY):
        g, w = getattr(got, field), getattr(want, field)
        if w.dtype == torch.bool:
            assert torch.equal(g, w), field
        else:
            torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)
    assert got_grads.keys() == want_grads.keys()
    for name in want_grads:
        torch.testing.assert_close(got_grads[name], want_grads[name], rtol=1e-4, atol=1e-6)


def test_patch_reports_the_fused_head_bindings():
    names = adapter.patch()
    try:
        for where in (
            "trl.kernels.chunked_logprob.ChunkedLogProbFunction",
            "trl.kernels.ChunkedLogProbFunction",
            "trl.trainer.utils._ChunkedLogProbFunction",
        ):
            assert where in names
    finally:
        adapter.unpatch()
