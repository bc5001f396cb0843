"""Exporting a trained policy (and its value head or critic) in formats other tools read,
and loading model weights back from an export, a trainer checkpoint or a state dict.

An export folder (docs/trainer.md, "Export and formats") holds:

- ``rlhf_ext_export.json``: the manifest. ``policy`` is the model's description, the same
  object a ``train`` config file takes as ``policy`` (``{"builtin": {GPTConfig fields},
  "weights": "model.pt"}``, or ``{"transformers": "."}`` for a Hugging Face model), plus
  what else the folder holds, the iteration and the PPOConfig of the run;
- the policy: the built-in GPT's ``model.pt`` (a flat ``{name: tensor}`` state dict that
  ``torch.load(..., weights_only=True)`` reads), or a Hugging Face model's
  ``save_pretrained`` files (``config.json``, ``model.safetensors``) and its tokenizer's;
- ``value_head.pt`` (``{"weight": [1, H], "bias": [1]}``) when the policy carries the
  value head (PPO with GAE and no separate critic), or ``critic/`` (an export folder of
  its own, value head included) for a separate ``value_model``;
- ``lora_adapter/`` (peft's ``save_pretrained`` of the adapter) when the run trained LoRA
  adapters; the policy files above then hold the merged weights, which load without peft.
"""

from __future__ import annotations

import copy
import dataclasses
import importlib
import json
import os
import pickle
from typing import NamedTuple

import torch
from torch import nn

from rlhf_ext.trainer import distributed as dist
from rlhf_ext.trainer.lora import apply_lora, merged_copy
from rlhf_ext.trainer.model import (
    GPTConfig,
    TinyGPT,
    ValueHeadModel,
    as_causal_lm,
)

MANIFEST = "rlhf_ext_export.json"
FORMAT = "rlhf_ext.trainer.export"
FORMAT_VERSION = 1
BUILTIN_WEIGHTS = "model.pt"
ADAPTER_DIR = "lora_adapter"
VALUE_HEAD = "value_head.pt"
CRITIC_DIR = "critic"
VALUE_HEAD_PREFIX = "value_head."  # its keys in a ValueHeadModel state dict
EXPORT = "rlhf_ext.trainer.export_policy"
LOAD_EXPORT = "rlhf_ext.trainer.load_export"
LOAD_WEIGHTS = "rlhf_ext.trainer.load_weights"
# rlhf_ext's own tokenizers (no arguments), recorded in a manifest by module:Class
BUILTIN_TOKENIZERS = (
    "rlhf_ext.trainer.model:ByteTokenizer",
    "rlhf_ext.trainer.demo:DemoTokenizer",
)
# the keys of a trainer checkpoint (rlhf_ext/trainer/checkpoint.py)
CHECKPOINT_KEYS = {"model", "optimizer", "rng"}


class Export(NamedTuple):
    """What :func:`load_export` returns."""

    policy: nn.Module  # a TinyGPT or a transformers causal LM
    tokenizer: object  # ByteTokenizer, a transformers tokenizer, or None when none was saved
    value_head: nn.Linear | None  # the policy's value head, when it had one
    critic: ValueHeadModel | None  # the separate critic, when there was one
    manifest: dict


# ------------------------------------------------------------------ descriptions
def describe_lm(lm: nn.Module) -> dict:
    """How to rebuild ``lm`` without its weights: ``{"builtin": GPTConfig fields}`` or
    ``{"transformers": name_or_path, "config_json": the model config as JSON text}`` (text:
    a checkpoint holds plain values only, and a config's dict may hold other objects)."""
    lm = as_causal_lm(lm, "lm", "rlhf_ext.trainer.describe_lm")
    if isinstance(lm, TinyGPT):
        return {"builtin": dataclasses.asdict(lm.config)}
    config = lm.model.config
    return {
        "transformers": config._name_or_path or None,
        "config_json": config.to_json_string(use_diff=False),
    }


def build_lm(description: dict, where: str) -> nn.Module:
    """A freshly initialised model of ``description`` (:func:`describe_lm`'s form);
    ``where`` names the file the description came from in errors."""
    if "builtin" in description:
        return TinyGPT(GPTConfig(**description["builtin"]))
    if "config_json" in description:
        transformers = _transformers(where)
        config_dict = json.loads(description["config_json"])
        config = transformers.AutoConfig.for_model(config_dict.pop("model_type"), **config_dict)
        return transformers.AutoModelForCausalLM.from_config(config)
    raise ValueError(
        f"{where}: a model description needs `builtin` or `config_json`, got {description}"
    )


# ------------------------------------------------------------------------ export
def export_policy(trainer, output_dir: str) -> dict:
    """Write ``trainer``'s policy (and value head or critic) to ``output_dir`` in the
    format of this module's docstring; the manifest written (its ``files`` entry lists
    every path). Rank 0 writes; call it on every rank under DDP (the others return the
    empty dict after rank 0 has written)."""
    if dist.is_sharded(trainer.model):
        return _export_sharded(trainer, output_dir)
    value_head = trainer.model.value_head if isinstance(trainer.model, ValueHeadModel) else None
    extra = {"iteration": trainer.iteration, "ppo_config": trainer.config.to_dict()}
    manifest = {}
    if trainer.rank == 0:
        adapter = trainer.peft_model
        policy = trainer.policy_lm if adapter is None else merged_copy(adapter)
        manifest = write_export(
            output_dir, policy, trainer.tokenizer, value_head, trainer.critic, extra, adapter
        )
    dist.barrier()  # no rank reads the folder before it is complete
    return manifest


def _export_sharded(trainer, output_dir: str) -> dict:
    """FSDP-sharded models: every rank writes its shards into a checkpoint in a temporary
    folder, then rank 0 exports that checkpoint (models rebuilt whole in one process)."""
    import shutil
    import tempfile

    folder = tempfile.mkdtemp(prefix=".export-", dir=os.path.dirname(os.path.abspath(
        trainer.config.output_dir)) or ".") if trainer.rank == 0 else None  # fmt: skip
    folder = dist.gather_objects(folder)[0]
    manifest = {}
    try:
        path = trainer.save_checkpoint(os.path.join(folder, "checkpoint.pt"))
        if trainer.rank == 0:
            manifest = export_checkpoint(path, output_dir, tokenizer=trainer.tokenizer)
        dist.barrier()
    finally:
        if trainer.rank == 0:
            shutil.rmtree(folder, ignore_errors=True)
    return manifest


def export_checkpoint(checkpoint_path: str, output_dir: str, tokenizer=None) -> dict:
    """The export of a trainer ``checkpoint.pt`` (models rebuilt from its ``models``
    entry, then its weights loaded): what ``python -m rlhf_ext export`` runs. A Hugging
    Face policy's tokenizer comes from ``tokenizer`` or, when None, from the model's
    original name or path (skipped, and said so in the manifest, if it cannot be found)."""
    from rlhf_ext.trainer.checkpoint import load_checkpoint

    state = load_checkpoint(checkpoint_path)
    if state.get("sharded"):  # parallelism="fsdp": the weights are in the shards' folder
        from rlhf_ext.trainer.checkpoint import full_sharded_states

        state = full_sharded_states(checkpoint_path, state)
    models = state.get("models")
    if not models:
        raise ValueError(
            f"rlhf_ext.trainer.export_checkpoint: {checkpoint_path} has no `models` entry "
            "(written before rlhf_ext 0.9): rebuild the trainer and call export_policy(trainer, "
            "output_dir) instead"
        )
    lm = build_lm(models["policy"], checkpoint_path)
    adapter = _lora_for(lm, state, checkpoint_path)
    trained = lm if adapter is None else adapter.get_base_model()
    value_head = None
    if f"{VALUE_HEAD_PREFIX}weight" in state["model"]:
        shared = ValueHeadModel(trained)
        shared.load_state_dict(state["model"])
        value_head = shared.value_head
    else:
        as_causal_lm(trained).load_state_dict(state["model"])
    if adapter is not None:
        lm = merged_copy(adapter)
    critic = None
    if state.get("critic") is not None:
        critic = ValueHeadModel(build_lm(models["critic"], checkpoint_path), with_logits=False)
        critic.load_state_dict(state["critic"])
    if tokenizer is None:
        tokenizer = _tokenizer_for(models.get("tokenizer"))
    extra = {"iteration": state["iteration"], "ppo_config": state.get("config")}
    return write_export(output_dir, lm, tokenizer, value_head, critic, extra, adapter)


def _lora_for(model: nn.Module, state: dict, where: str):
    """The peft model around ``model`` with the LoRA layout of a checkpoint's run
    (None when it trained without LoRA), ready for its state dict."""
    config = state.get("config") or {}
    if not config.get("lora_rank"):
        return None
    return apply_lora(model, config, where)


def write_export(
    output_dir, lm, tokenizer, value_head, critic, extra: dict, lora_adapter=None
) -> dict:
    """Write one export folder (the policy ``lm`` with its ``tokenizer`` and
    ``value_head``, ``critic`` in a subfolder, and a LoRA policy's peft adapter in
    ``lora_adapter/``; ``lm`` is then the merged model); its manifest."""
    os.makedirs(output_dir, exist_ok=True)
    lm = as_causal_lm(lm, "policy", EXPORT)
    files = []
    if isinstance(lm, TinyGPT):
        policy = {**describe_lm(lm), "weights": BUILTIN_WEIGHTS}
        torch.save(_plain_state_dict(lm), os.path.join(output_dir, BUILTIN_WEIGHTS))
        files.append(BUILTIN_WEIGHTS)
    else:
        lm.model.save_pretrained(output_dir)
        policy = {"transformers": "."}
        files += ["config.json", "(the model's weight files)"]
    tokenizer_saved = _save_tokenizer(tokenizer, output_dir)
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "policy": policy,
        "tokenizer": tokenizer_saved,
        "value_head": None,
        "critic": None,
        "lora_adapter": None,
        **extra,
    }
    if value_head is not None:
        torch.save(_plain_state_dict(value_head), os.path.join(output_dir, VALUE_HEAD))
        manifest["value_head"] = VALUE_HEAD
        files.append(VALUE_HEAD)
    if critic is not None:
        critic_dir = os.path.join(output_dir, CRITIC_DIR)
        write_export(critic_dir, critic.lm, None, critic.value_head, None, {})  # no tokenizer
        manifest["critic"] = CRITIC_DIR
        files.append(CRITIC_DIR + "/")
    if lora_adapter is not None:  # peft's adapter_config.json + adapter_model.safetensors
        lora_adapter.save_pretrained(os.path.join(output_dir, ADAPTER_DIR))
        manifest["lora_adapter"] = ADAPTER_DIR
        files.append(ADAPTER_DIR + "/")
    manifest["files"] = [MANIFEST, *files]
    with open(os.path.join(output_dir, MANIFEST), "w") as fh:
        json.dump(manifest, fh, indent=2)
        fh.write("\n")
    return manifest


def _plain_state_dict(module: nn.Module) -> dict:
    """``{name: tensor}`` on the CPU, each tensor its own storage (no views of a
    larger buffer end up in the file)."""
    return {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}


def _save_tokenizer(tokenizer, output_dir: str) -> str | None:
    """What the manifest records for the tokenizer: "saved" (a transformers tokenizer's
    ``save_pretrained`` files), the ``module:Class`` of one of rlhf_ext's own tokenizers
    (they take no arguments), or None."""
    if tokenizer is None:
        return None
    described = describe_tokenizer(tokenizer)
    if isinstance(described, str):
        return described
    if hasattr(tokenizer, "save_pretrained"):
        tokenizer.save_pretrained(output_dir)
        return "saved"
    return None


def _builtin_tokenizer(entry: str):
    """An instance of one of :data:`BUILTIN_TOKENIZERS` (nothing else is imported)."""
    if entry not in BUILTIN_TOKENIZERS:
        raise ValueError(f"{LOAD_EXPORT}: unknown tokenizer {entry!r} in the manifest")
    module, _, name = entry.partition(":")
    return getattr(importlib.import_module(module), name)()


def describe_tokenizer(tokenizer) -> str | dict | None:
    """How to rebuild ``tokenizer``: ``module:Class`` of one of rlhf_ext's own,
    ``{"transformers": name_or_path}``, or None when neither applies."""
    cls = type(tokenizer)
    entry = f"{cls.__module__}:{cls.__name__}"
    if entry in BUILTIN_TOKENIZERS:
        return entry
    name = getattr(tokenizer, "name_or_path", None)
    return {"transformers": name} if name else None


def _tokenizer_for(description) -> object:
    """The tokenizer :func:`describe_tokenizer` described, or None when it is gone."""
    if description is None:
        return None
    if isinstance(description, str):
        return _builtin_tokenizer(description)
    try:
        return _transformers(EXPORT).AutoTokenizer.from_pretrained(description["transformers"])
    except (OSError, ValueError):
        return None


# ------------------------------------------------------------------------- load
def load_export(path: str) -> Export:
    """Read an export folder written by :func:`export_policy`: the policy (a TinyGPT
    or a transformers causal LM, in eval mode), its tokenizer, value head and critic."""
    manifest_path = os.path.join(path, MANIFEST)
    if not os.path.isfile(manifest_path):
        raise FileNotFoundError(f"{LOAD_EXPORT}: `path`: no {MANIFEST} in {path}")
    with open(manifest_path) as fh:
        manifest = json.load(fh)
    if manifest.get("format") != FORMAT or manifest.get("format_version", 0) > FORMAT_VERSION:
        raise ValueError(
            f"{LOAD_EXPORT}: {manifest_path} is format {manifest.get('format')!r} version "
            f"{manifest.get('format_version')!r}; this rlhf_ext reads {FORMAT!r} up to "
            f"version {FORMAT_VERSION}"
        )
    policy, tokenizer = _load_export_policy(path, manifest)
    value_head = None
    if manifest.get("value_head"):
        head_state = _torch_load(os.path.join(path, manifest["value_head"]), LOAD_EXPORT)
        value_head = nn.Linear(head_state["weight"].shape[1], 1)
        value_head.load_state_dict(head_state)
    critic = None
    if manifest.get("critic"):
        inner = load_export(os.path.join(path, manifest["critic"]))
        critic = ValueHeadModel(inner.policy, with_logits=False)
        critic.value_head.load_state_dict(inner.value_head.state_dict())
    return Export(policy.eval(), tokenizer, value_head, critic, manifest)


def _load_export_policy(path: str, manifest: dict):
    policy = manifest["policy"]
    if "builtin" in policy:
        model = TinyGPT(GPTConfig(**policy["builtin"]))
        load_weights(model, os.path.join(path, policy["weights"]))
    else:
        model = _transformers(LOAD_EXPORT).AutoModelForCausalLM.from_pretrained(path)
    entry = manifest.get("tokenizer")
    if entry is None:
        return model, None
    if entry == "saved":
        return model, _transformers(LOAD_EXPORT).AutoTokenizer.from_pretrained(path)
    return model, _builtin_tokenizer(entry)


def load_weights(model: nn.Module, path: str) -> nn.Module:
    """Load weights into ``model`` (returned) from ``path``: a state dict file
    (``torch.save(model.state_dict())``, an export's ``model.pt``), an export folder, or
    the trainer's own ``checkpoint.pt`` (its policy, without the value head). Read with
    ``weights_only=True``; a file that is none of these is a ValueError naming it."""
    if os.path.isdir(path):
        manifest = os.path.join(path, MANIFEST)
        if not os.path.isfile(manifest):
            raise FileNotFoundError(
                f"{LOAD_WEIGHTS}: `path`: {path} is a folder without {MANIFEST}"
            )
        with open(manifest) as fh:
            path = os.path.join(path, json.load(fh)["policy"].get("weights", BUILTIN_WEIGHTS))
    state = _torch_load(path, LOAD_WEIGHTS)
    if isinstance(state, dict) and CHECKPOINT_KEYS <= set(state):  # a trainer checkpoint
        state = _checkpoint_policy_weights(model, state, path)
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(
            f"{LOAD_WEIGHTS}: {path} holds neither a state dict nor a trainer checkpoint"
        )
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise ValueError(
            f"{LOAD_WEIGHTS}: the weights in {path} do not fit {type(model).__name__}: {exc}"
        ) from exc
    return model


def _checkpoint_policy_weights(model: nn.Module, checkpoint: dict, path: str) -> dict:
    """The policy's plain state dict in a trainer checkpoint: its own weights, with the
    LoRA updates merged in when the run trained adapters (built on a copy of
    ``model``)."""
    weights = _policy_part(checkpoint["model"])
    adapter = _lora_for(copy.deepcopy(model), checkpoint, path)
    if adapter is None:
        return weights
    try:
        adapter.get_base_model().load_state_dict(weights)
    except RuntimeError as exc:
        raise ValueError(
            f"{LOAD_WEIGHTS}: the weights in {path} do not fit {type(model).__name__}: {exc}"
        ) from exc
    return merged_copy(adapter).state_dict()


def _policy_part(model_state: dict) -> dict:
    """The policy's own weights in a checkpoint's ``model`` entry: without the value
    head and its wrapper prefix (``lm.`` of ValueHeadModel) when the policy carried one."""
    if f"{VALUE_HEAD_PREFIX}weight" in model_state:
        model_state = {
            k.removeprefix("lm."): v
            for k, v in model_state.items()
            if not k.startswith(VALUE_HEAD_PREFIX)
        }
    return model_state


def _torch_load(path: str, owner: str):
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{owner}: `path`: no file at {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise ValueError(
            f"{owner}: {path} holds objects other than tensors and plain containers; "
            "refused unloaded"
        ) from exc
    except (RuntimeError, EOFError, OSError) as exc:
        raise ValueError(f"{owner}: {path} is not a readable torch file ({exc})") from exc


def _transformers(owner: str):
    try:
        import transformers
    except ImportError as exc:
        raise ImportError(
            f"{owner}: a Hugging Face model needs `transformers` (pip install 'rlhf_ext[trainer]')"
        ) from exc
    return transformers
