"""The trainer's memory and precision features (issue 20 item 11): the fused LM head
(log-probs from hidden states + LM head, no logits), bf16 autocast, gradient
checkpointing, LoRA through peft and TensorBoard reporting."""

from __future__ import annotations

import copy
import json
import os
import sys

import pytest
import torch
from trainer_helpers import (
    byte_reward,
    hf_gpt2,
    prompts,
    tiny_config,
    tiny_gpt,
    tiny_trainer,
    transformers_or_skip,
)

import rlhf_ext
from rlhf_ext.trainer import ByteTokenizer, PPOConfig, PPOTrainer, TinyGPT
from rlhf_ext.trainer.model import check_lm_head, lm_head


def _rollout(trainer, count=8, seed=0):
    """A sampled batch of the trainer's policy (fixed prompts)."""
    encoded = trainer.encode_prompts(prompts(count, seed))
    return trainer.generate(encoded)


def _hf_trainer(tmp_path, seed=0, **overrides):
    policy = hf_gpt2(seed)
    config = tiny_config(tmp_path, max_new_tokens=4, seed=seed, **overrides)
    return PPOTrainer(config, policy, None, byte_reward, ByteTokenizer())


def _byte_rollout(trainer, count=4):
    encoded = trainer.encode_prompts(["ab", "hello", "xyz", "a"][:count])
    return trainer.generate(encoded)


def _loss_gradients(trainer, batch):
    """Gradients of the trainer's loss-side forward (log-probs and entropy summed)."""
    trainer.optimizer.zero_grad(set_to_none=True)
    logprobs, entropy, values = trainer._forward(trainer.train_model, trainer.train_critic, batch)
    total = logprobs.sum() + entropy.sum()
    if values is not None:
        total = total + values.sum()
    total.backward()
    return {
        name: p.grad.clone()
        for name, p in trainer.model.named_parameters()
        if p.grad is not None and p.requires_grad
    }


# ------------------------------------------------------------------ fused LM head
@pytest.mark.parametrize("value_model", [None, "separate"])
def test_fused_lm_head_gives_the_logits_paths_logprobs_and_gradients(tmp_path, value_model):
    plain = tiny_trainer(tmp_path / "a", value_model=value_model)
    fused = tiny_trainer(tmp_path / "b", value_model=value_model, fused_lm_head=True)
    batch = _rollout(plain)
    for a, b in zip(plain._policy_statistics(batch), fused._policy_statistics(batch), strict=True):
        if a is not None:
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(
        fused._reference_logprobs(batch), plain._reference_logprobs(batch), rtol=1e-5, atol=1e-5
    )
    grads_plain, grads_fused = _loss_gradients(plain, batch), _loss_gradients(fused, batch)
    assert grads_plain.keys() == grads_fused.keys()
    for name in grads_plain:
        torch.testing.assert_close(grads_fused[name], grads_plain[name], rtol=1e-4, atol=1e-5)


def test_fused_lm_head_never_asks_for_logits(tmp_path, monkeypatch):
    trainer = tiny_trainer(tmp_path, fused_lm_head=True)
    calls = []
    original = TinyGPT.forward

    def spy(self, *args, return_logits=True, **kwargs):
        calls.append(return_logits)
        return original(self, *args, return_logits=return_logits, **kwargs)

    monkeypatch.setattr(TinyGPT, "forward", spy)

    def no_token_logprobs(*args, **kwargs):
        raise AssertionError("token_logprobs called with fused_lm_head=True")

    monkeypatch.setattr(rlhf_ext, "token_logprobs", no_token_logprobs)
    batch = _rollout(trainer)
    calls.clear()  # generation needs the logits of the next token
    trainer.step(batch.queries.tolist(), batch.responses.tolist(), [0.5] * 8)
    assert calls and not any(calls)


def _plain_and_fused(tmp_path, make_policy):
    """Two PPOTrainers on equal copies of make_policy()'s model (ByteTokenizer): the
    logits path and fused_lm_head=True."""
    policies = [make_policy() for _ in range(2)]
    policies[1].load_state_dict(policies[0].state_dict())
    return [
        PPOTrainer(
            tiny_config(tmp_path / str(i), max_new_tokens=4, fused_lm_head=bool(i)),
            policy,
            None,
            byte_reward,
            ByteTokenizer(),
        )  # fmt: skip
        for i, policy in enumerate(policies)
    ]


def test_fused_lm_head_on_an_untied_transformers_head(tmp_path):
    transformers = transformers_or_skip()
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        vocab_size=259, n_positions=64, n_embd=32, n_layer=1, n_head=2, tie_word_embeddings=False
    )
    trainers = _plain_and_fused(
        tmp_path, lambda: transformers.AutoModelForCausalLM.from_config(config)
    )
    batch = _byte_rollout(trainers[0])
    plain, fused = (t._policy_statistics(batch) for t in trainers)
    torch.testing.assert_close(fused[0], plain[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fused[1], plain[1], rtol=1e-5, atol=1e-5)
    grads = [_loss_gradients(t, batch) for t in trainers]
    head = "lm.model.lm_head.weight"
    assert head in grads[1]
    torch.testing.assert_close(grads[1][head], grads[0][head], rtol=1e-4, atol=1e-6)


class _ScaledHead(TinyGPT):
    """A TinyGPT whose logits are scaled after the head: not a plain linear head."""

    def forward(self, *args, **kwargs):
        logits, hidden, past = super().forward(*args, **kwargs)
        return (None if logits is None else logits * 2.0), hidden, past


def test_fused_lm_head_refuses_a_head_that_is_not_linear(tmp_path):
    plain = tiny_gpt(0)
    scaled = _ScaledHead(plain.config)
    with pytest.raises(ValueError, match="fused_lm_head.*not its LM head"):
        check_lm_head(scaled, 2, "owner")
    check_lm_head(plain, 2, "owner")
    config = tiny_config(tmp_path, fused_lm_head=True)
    from rlhf_ext.trainer.demo import DemoTokenizer

    with pytest.raises(ValueError, match="PPOTrainer: `fused_lm_head`"):
        PPOTrainer(config, scaled, None, byte_reward, DemoTokenizer())


def _transformed_head_model(kind: str):
    """A tiny randomly initialised transformers LM whose model applies a logit transform
    after its LM head (built from a config: no download)."""
    transformers = transformers_or_skip()
    torch.manual_seed(0)
    common = dict(vocab_size=259, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                  num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
                  tie_word_embeddings=False)  # fmt: skip
    if kind == "gemma2_softcap":
        config = transformers.Gemma2Config(**common, head_dim=16, final_logit_softcapping=0.5)
    elif kind == "cohere_logit_scale":
        config = transformers.CohereConfig(**common, logit_scale=3.0)
    else:  # granite: logits divided by logits_scaling
        config = transformers.GraniteConfig(**common, logits_scaling=0.25)
    return transformers.AutoModelForCausalLM.from_config(config)


@pytest.mark.parametrize("kind", ["gemma2_softcap", "cohere_logit_scale", "granite_scaling"])
def test_fused_lm_head_serves_softcapped_and_scaled_heads(tmp_path, kind):
    """Gemma's final_logit_softcapping, Cohere's logit_scale and Granite's logits_scaling
    (issue 17's transforms): the fused head gives the logits path's log-probs, entropy and
    gradients, against the model's own transformed logits."""
    trainers = _plain_and_fused(tmp_path, lambda: _transformed_head_model(kind))
    head = lm_head(trainers[1].model.lm)
    assert (head.logit_scale, head.softcap) == {
        "gemma2_softcap": (1.0, 0.5), "cohere_logit_scale": (3.0, None),
        "granite_scaling": (4.0, None),
    }[kind]  # fmt: skip
    batch = _byte_rollout(trainers[0])
    plain, fused = (t._policy_statistics(batch) for t in trainers)
    torch.testing.assert_close(fused[0], plain[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fused[1], plain[1], rtol=1e-5, atol=1e-5)
    grads = [_loss_gradients(t, batch) for t in trainers]
    assert grads[1].keys() == grads[0].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-4, atol=1e-6)


def test_fused_lm_head_refuses_a_config_its_model_does_not_apply(tmp_path):
    """GPT-2 ignores final_logit_softcapping: the head the config describes is not the
    model's, and the check against the model's logits says so."""
    policy = hf_gpt2(0)
    policy.config.final_logit_softcapping = 0.05  # small enough to show on random logits
    with pytest.raises(ValueError, match=r"not its LM head .* softcap=0.05"):
        PPOTrainer(
            tiny_config(tmp_path, fused_lm_head=True), policy, None, byte_reward, ByteTokenizer()
        )


# ---------------------------------------------------------------------- bf16
def test_bf16_runs_the_forwards_in_bfloat16(tmp_path, monkeypatch):
    fp32 = tiny_trainer(tmp_path / "a")
    bf16 = tiny_trainer(tmp_path / "b", bf16=True)
    batch = _rollout(fp32)
    seen = []
    original = rlhf_ext.token_logprobs

    def spy(logits, *args, **kwargs):
        seen.append(logits.dtype)
        return original(logits, *args, **kwargs)

    monkeypatch.setattr(rlhf_ext, "token_logprobs", spy)
    low, high = bf16._policy_statistics(batch), fp32._policy_statistics(batch)
    assert seen == [torch.bfloat16, torch.float32]
    for a, b in zip(low, high, strict=True):
        assert a.dtype == torch.float32
        torch.testing.assert_close(a, b, rtol=0.05, atol=0.05)  # bf16 logits, float32 math
    fused = tiny_trainer(tmp_path / "c", bf16=True, fused_lm_head=True)
    for a, b in zip(fused._policy_statistics(batch), low, strict=True):
        torch.testing.assert_close(a, b, rtol=0.02, atol=0.02)


def test_bf16_training_learns(tmp_path):
    trainer = tiny_trainer(tmp_path, bf16=True, fused_lm_head=True)
    history = trainer.train(prompts(), iterations=3)
    assert all(torch.isfinite(torch.tensor(m["loss/total_avg"])) for m in history)
    assert history[-1]["train/skipped_updates"] == 0


# ------------------------------------------------------- gradient checkpointing
def test_gradient_checkpointing_recomputes_blocks_with_the_same_gradients(tmp_path):
    plain = tiny_trainer(tmp_path / "a")
    checkpointed = tiny_trainer(tmp_path / "b", gradient_checkpointing=True)
    batch = _rollout(plain)
    calls = []
    block = checkpointed.policy_lm.blocks[0]
    # a pre-hook: the recomputation stops once it has what the backward needs
    block.register_forward_pre_hook(lambda *_: calls.append(1))
    grads = _loss_gradients(checkpointed, batch)
    assert len(calls) == 2  # the forward, and its recomputation in the backward
    reference = _loss_gradients(plain, batch)
    for name in reference:
        torch.testing.assert_close(grads[name], reference[name], rtol=0, atol=0)


def test_gradient_checkpointing_on_transformers_keeps_dropout_off(tmp_path):
    transformers_or_skip()
    plain = _hf_trainer(tmp_path / "a")
    checkpointed = _hf_trainer(tmp_path / "b", gradient_checkpointing=True)
    model = checkpointed.policy_lm.model
    layer = model.transformer.h[0]
    assert layer.gradient_checkpointing and layer.training
    assert not any(m.training for m in layer.modules() if m is not layer)  # dropout off
    assert not model.transformer.training  # the model still passes its KV cache
    batch = _byte_rollout(checkpointed)
    calls = []
    # transformers checkpoints `forward`, so count a module it calls first
    layer.ln_1.register_forward_pre_hook(lambda *_: calls.append(1))
    grads = _loss_gradients(checkpointed, batch)
    assert len(calls) == 2
    reference = _loss_gradients(plain, batch)
    for name in reference:
        torch.testing.assert_close(grads[name], reference[name], rtol=1e-6, atol=1e-7)


# ---------------------------------------------------------------------- LoRA
def _peft_or_skip():
    return pytest.importorskip("peft", reason="peft is not installed (the optional `lora` extra)")


def test_lora_trains_the_adapters_only_and_the_reference_is_the_base(tmp_path):
    _peft_or_skip()
    trainer = tiny_trainer(tmp_path, lora_rank=4, learning_rate=3e-2)
    base = {k: v.clone() for k, v in trainer.policy_lm.state_dict().items() if "lora_" not in k}
    trained = {id(p) for p in trainer.all_parameters()}
    names = [n for n, p in trainer.model.named_parameters() if id(p) in trained]
    assert names and all("lora_" in n or n.startswith("value_head") for n in names)
    assert trainer.ref_lm is trainer.policy_lm  # no copy of the weights
    batch = _rollout(trainer)
    torch.testing.assert_close(
        trainer._reference_logprobs(batch), trainer._policy_statistics(batch)[0]
    )  # lora_B starts at zero
    trainer.train(prompts(), iterations=2)
    after = trainer.policy_lm.state_dict()
    for key, value in base.items():
        assert torch.equal(after[key], value), key
    moved = trainer._policy_statistics(batch)[0] - trainer._reference_logprobs(batch)
    assert moved.abs().max() > 1e-4  # the adapters moved the policy away from the reference
    # the reference is still the initial weights: a plain run's frozen copy of them agrees
    plain = tiny_trainer(tmp_path / "plain")
    torch.testing.assert_close(plain._reference_logprobs(batch), trainer._reference_logprobs(batch))


def test_lora_resume_and_export(tmp_path):
    _peft_or_skip()
    from rlhf_ext.trainer.export import export_checkpoint, load_export, load_weights

    full = tiny_trainer(tmp_path / "full", lora_rank=4, learning_rate=3e-2)
    full_history = full.train(prompts(), iterations=3)
    part = tiny_trainer(tmp_path / "part", lora_rank=4, learning_rate=3e-2)
    part.train(prompts(), iterations=2)
    resumed = tiny_trainer(tmp_path / "part", lora_rank=4, learning_rate=3e-2)
    resumed.load_checkpoint()
    history = resumed.train(prompts(), iterations=3)
    assert history[-1]["loss/total_avg"] == full_history[-1]["loss/total_avg"]

    manifest = full.export(str(tmp_path / "export"))
    assert manifest["lora_adapter"] == "lora_adapter"
    assert os.path.isfile(tmp_path / "export" / "lora_adapter" / "adapter_config.json")
    exported = load_export(str(tmp_path / "export"))
    assert isinstance(exported.policy, TinyGPT)
    assert not any("lora_" in k for k in exported.policy.state_dict())
    ids = torch.tensor([[1, 5, 6, 7, 8]])
    torch.testing.assert_close(exported.policy(ids)[0], full.policy_lm(ids)[0])
    export_checkpoint(full.checkpoint_path, str(tmp_path / "e2"))
    from_checkpoint = load_export(str(tmp_path / "e2"))
    torch.testing.assert_close(from_checkpoint.policy(ids)[0], exported.policy(ids)[0])
    fresh = load_weights(tiny_gpt(5), full.checkpoint_path)
    torch.testing.assert_close(fresh(ids)[0], exported.policy(ids)[0])


def test_lora_on_transformers_gpt2(tmp_path):
    transformers_or_skip()
    _peft_or_skip()
    trainer = _hf_trainer(tmp_path, lora_rank=2, gradient_checkpointing=True, fused_lm_head=True)
    history = trainer.train(["ab", "hello"], iterations=2)
    assert history[-1]["train/skipped_updates"] == 0
    names = [n for n, p in trainer.model.named_parameters() if p.requires_grad]
    assert any("lora_A" in n for n in names) and all(
        "lora_" in n or n.startswith("value_head") for n in names
    )
    exported = trainer.export(str(tmp_path / "export"))
    config = json.loads((tmp_path / "export" / "config.json").read_text())
    assert config["model_type"] == "gpt2" and exported["lora_adapter"]


def test_lora_resume_refuses_another_rank(tmp_path):
    _peft_or_skip()
    tiny_trainer(tmp_path, lora_rank=4).train(prompts(), iterations=1)
    other = tiny_trainer(tmp_path, lora_rank=8)
    with pytest.raises(ValueError, match="`lora_rank` \\(checkpoint 4, this run 8\\)"):
        other.load_checkpoint()


def test_lora_without_peft_says_what_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "peft", None)
    with pytest.raises(ImportError, match="lora_rank.*needs peft: pip install peft"):
        tiny_trainer(tmp_path, lora_rank=4)


def test_lora_unknown_target_modules_name_the_field(tmp_path):
    _peft_or_skip()
    with pytest.raises(ValueError, match="lora_target_modules"):
        tiny_trainer(tmp_path, lora_rank=4, lora_target_modules=["no_such_layer"])


# --------------------------------------------------------------- TensorBoard
def _scalars(folder):
    reader = "tensorboard.backend.event_processing.event_accumulator"
    event_accumulator = pytest.importorskip(reader)
    accumulator = event_accumulator.EventAccumulator(str(folder))
    accumulator.Reload()
    return {
        tag: [(e.step, e.value) for e in accumulator.Scalars(tag)]
        for tag in accumulator.Tags()["scalars"]
    }


def test_report_to_tensorboard_writes_the_jsonl_numbers(tmp_path):
    pytest.importorskip("tensorboard")
    trainer = tiny_trainer(tmp_path, report_to=["tensorboard"])
    history = trainer.train(prompts(), iterations=3)
    trainer.writer.close()
    assert len(os.listdir(tmp_path / "tensorboard")) == 1  # one event file per run
    scalars = _scalars(tmp_path / "tensorboard")
    assert [step for step, _ in scalars["objective/kl"]] == [1, 2, 3]
    for record in history:
        value = dict(scalars["objective/scores"])[record["step"]]
        assert value == pytest.approx(record["objective/scores"], rel=1e-6, abs=1e-7)
    assert "step" not in scalars


def test_report_to_tensorboard_resume_purges_the_lost_iterations(tmp_path):
    pytest.importorskip("tensorboard")
    trainer = tiny_trainer(tmp_path, report_to="tensorboard", checkpoint_interval=2)
    trainer.train(prompts(), iterations=3)  # checkpoints at 2 and 3
    trainer.writer.close()
    resumed = tiny_trainer(tmp_path, report_to="tensorboard")
    resumed.load_checkpoint(str(tmp_path / "checkpoint.pt"))
    resumed.train(prompts(), iterations=4)
    resumed.writer.close()
    steps = [step for step, _ in _scalars(tmp_path / "tensorboard")["objective/kl"]]
    assert steps == [1, 2, 3, 4]


def test_report_to_tensorboard_without_the_package_says_what_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    with pytest.raises(ImportError, match="needs the tensorboard package: pip install"):
        tiny_trainer(tmp_path, report_to="tensorboard")


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("report_to", "wandb", "`report_to` must be"),
        ("report_to", ["tensorboard", 3], "`report_to` must be"),
        ("lora_rank", -1, "`lora_rank` must be an int >= 0"),
        ("lora_rank", 2.0, "`lora_rank` must be an int >= 0"),
        ("lora_alpha", 0, "`lora_alpha` must be a float > 0"),
        ("lora_dropout", 1.0, "`lora_dropout` must be a float in \\[0, 1\\)"),
        ("lora_target_modules", [], "`lora_target_modules` must be"),
        ("bf16", "true", "`bf16` must be a bool"),
        ("fused_lm_head", 1, "`fused_lm_head` must be a bool"),
        ("gradient_checkpointing", None, "`gradient_checkpointing` must be a bool"),
    ],
)
def test_memory_fields_are_validated(field, value, message):
    with pytest.raises((ValueError, TypeError), match=message):
        PPOConfig(**{field: value})


def test_report_to_none_is_no_target():
    assert PPOConfig(report_to="none").report_targets == ()
    assert PPOConfig(report_to=["tensorboard", "tensorboard"]).report_targets == ("tensorboard",)


def test_policy_with_lora_is_unchanged_when_the_trainer_copies_the_reference(tmp_path):
    """An explicit ref_policy with LoRA stays the frozen model given, adapters aside."""
    _peft_or_skip()
    policy, ref = tiny_gpt(0), tiny_gpt(0)
    ref_state = copy.deepcopy(ref.state_dict())
    from rlhf_ext.trainer.demo import DemoTokenizer

    config = tiny_config(tmp_path, lora_rank=4)
    trainer = PPOTrainer(config, policy, ref, byte_reward, DemoTokenizer())
    assert trainer.ref_lm is ref and not any(p.requires_grad for p in ref.parameters())
    trainer.train(prompts(), iterations=1)
    for key, value in ref.state_dict().items():
        assert torch.equal(value, ref_state[key])


def test_trainer_memory_benchmark_runs(capsys):
    """``python -m bench trainer_memory --quick`` prints its table (bench/README.md)."""
    from bench import bench_trainer_memory

    threads = torch.get_num_threads()
    try:
        status = bench_trainer_memory.main(
            ["--quick", "--no-save", "--configs", "plain,fused", "--repeats", "1", "--threads", "1"]
        )
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr().out
    assert status == 0
    assert "config" in out and "\nplain " in out and "\nfused " in out
    assert bench_trainer_memory.main(["--quick", "--no-save", "--configs", "nope"]) == 2
