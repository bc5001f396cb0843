"""Export of a trained policy (rlhf_ext/trainer/export.py): the folder's files, loading
them back, ``python -m rlhf_ext export`` from a checkpoint, and the trainer's own
checkpoint or export given as ``weights`` / ``policy`` to ``train``."""

from __future__ import annotations

import dataclasses
import json
import pickle

import pytest
import torch
import trainer_helpers as th

from rlhf_ext import __main__ as cli
from rlhf_ext.trainer import (
    ByteTokenizer,
    GPTConfig,
    PPOTrainer,
    TinyGPT,
    export_checkpoint,
    load_export,
    load_weights,
)
from rlhf_ext.trainer.cli import load_policy
from rlhf_ext.trainer.demo import DemoTokenizer
from rlhf_ext.trainer.export import MANIFEST


def _trained(tmp_path, **overrides) -> PPOTrainer:
    trainer = th.tiny_trainer(tmp_path / "run", total_iterations=2, **overrides)
    trainer.train(th.prompts())
    return trainer


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        torch.testing.assert_close(sa[key], sb[key], rtol=0, atol=0, msg=key)


def test_builtin_export_holds_the_policy_and_value_head(tmp_path):
    trainer = _trained(tmp_path)
    manifest = trainer.export(str(tmp_path / "export"))
    assert manifest["files"] == [MANIFEST, "model.pt", "value_head.pt"]
    assert manifest["policy"]["builtin"]["vocab_size"] == DemoTokenizer.vocab_size
    assert manifest["iteration"] == 2
    on_disk = json.loads((tmp_path / "export" / MANIFEST).read_text())
    assert on_disk == manifest
    # the documented format: a flat {name: tensor} state dict, weights_only-loadable
    weights = torch.load(tmp_path / "export" / "model.pt", weights_only=True)
    assert weights.keys() == trainer.policy_lm.state_dict().keys()
    exported = load_export(str(tmp_path / "export"))
    _same_weights(exported.policy, trainer.policy_lm)
    _same_weights(exported.value_head, trainer.model.value_head)
    assert isinstance(exported.tokenizer, DemoTokenizer) and exported.critic is None
    ids = torch.tensor([th.prompts(1)[0]])
    torch.testing.assert_close(exported.policy(ids)[0], trainer.policy_lm(ids)[0])


def test_critic_free_and_separate_critic_exports(tmp_path):
    grpo = _trained(tmp_path / "grpo", advantage_estimator="grpo", num_generations=4)
    manifest = grpo.export(str(tmp_path / "grpo_export"))
    assert manifest["value_head"] is None and manifest["critic"] is None
    separate = _trained(tmp_path / "sep", value_model="separate")
    manifest = separate.export(str(tmp_path / "sep_export"))
    assert manifest["critic"] == "critic" and manifest["value_head"] is None
    exported = load_export(str(tmp_path / "sep_export"))
    _same_weights(exported.critic, separate.critic)


def test_export_from_a_checkpoint_equals_the_trainers(tmp_path, capsys):
    trainer = _trained(tmp_path)
    checkpoint = trainer.outputs["checkpoint"]
    assert cli.main(["export", checkpoint, str(tmp_path / "from_ckpt")]) == 0
    assert "wrote rlhf_ext_export.json, model.pt, value_head.pt" in capsys.readouterr().out
    exported = load_export(str(tmp_path / "from_ckpt"))
    _same_weights(exported.policy, trainer.policy_lm)
    _same_weights(exported.value_head, trainer.model.value_head)
    assert isinstance(exported.tokenizer, DemoTokenizer)


def test_checkpoint_and_export_are_accepted_as_weights(tmp_path):
    """`{"builtin": ..., "weights": checkpoint.pt}` used to fail unpickling; now the
    policy part of the checkpoint (value head dropped) is loaded, as from an export."""
    trainer = _trained(tmp_path)
    trainer.export(str(tmp_path / "export"))
    shape = dataclasses.asdict(trainer.policy_lm.config)
    for weights in (trainer.outputs["checkpoint"], str(tmp_path / "export")):
        model, _ = load_policy({"builtin": shape, "weights": weights}, torch.device("cpu"))
        _same_weights(model, trainer.policy_lm)
    model, tokenizer = load_policy(str(tmp_path / "export"), torch.device("cpu"))
    _same_weights(model, trainer.policy_lm)
    assert isinstance(tokenizer, DemoTokenizer)


def test_load_weights_errors_name_the_file(tmp_path):
    model = TinyGPT(GPTConfig(vocab_size=ByteTokenizer.vocab_size, n_layer=1, d_model=16))
    other = TinyGPT(GPTConfig(vocab_size=ByteTokenizer.vocab_size, n_layer=1, d_model=32))
    path = tmp_path / "other.pt"
    torch.save(other.state_dict(), path)
    with pytest.raises(ValueError, match=r"load_weights: the weights in .*other\.pt do not fit"):
        load_weights(model, str(path))
    crafted = tmp_path / "crafted.pt"
    crafted.write_bytes(pickle.dumps(ByteTokenizer(), protocol=2))
    with pytest.raises(ValueError, match="crafted.pt"):
        load_weights(model, str(crafted))
    with pytest.raises(FileNotFoundError, match="no file at"):
        load_weights(model, str(tmp_path / "missing.pt"))
    with pytest.raises(FileNotFoundError, match=f"without {MANIFEST}"):
        load_weights(model, str(tmp_path))
    with pytest.raises(FileNotFoundError, match=f"no {MANIFEST}"):
        load_export(str(tmp_path))


def test_old_checkpoint_without_models_entry_is_refused_clearly(tmp_path):
    trainer = _trained(tmp_path)
    state = torch.load(trainer.outputs["checkpoint"], weights_only=True)
    del state["models"]
    old = tmp_path / "old.pt"
    torch.save(state, old)
    with pytest.raises(ValueError, match="no `models` entry"):
        export_checkpoint(str(old), str(tmp_path / "x"))


def test_hugging_face_export_is_save_pretrained(tmp_path):
    transformers = th.transformers_or_skip()
    for critic in (None, th.hf_gpt2(1)):
        out = tmp_path / ("shared" if critic is None else "separate")
        config = th.tiny_config(out / "run", total_iterations=1)
        trainer = PPOTrainer(config, th.hf_gpt2(0), None, th.byte_reward, ByteTokenizer(), critic)
        trainer.train(["abc", "hello"])
        trainer.export(str(out / "export"))
        # what any transformers user does with it
        loaded = transformers.AutoModelForCausalLM.from_pretrained(out / "export")
        _same_weights(loaded, trainer.policy_lm.model)
        exported = load_export(str(out / "export"))
        assert isinstance(exported.tokenizer, ByteTokenizer)
        if critic is None:
            _same_weights(exported.value_head, trainer.model.value_head)
        else:
            _same_weights(exported.critic, trainer.critic)
        # the checkpoint rebuilds the model from its config alone
        export_checkpoint(trainer.outputs["checkpoint"], str(out / "from_ckpt"))
        again = transformers.AutoModelForCausalLM.from_pretrained(out / "from_ckpt")
        _same_weights(again, trainer.policy_lm.model)
