"""LoRA through peft (an optional dependency): adapters on the policy's linear layers.

``apply_lora`` injects the adapters into the policy's own modules (``peft.get_peft_model``;
the base weights are frozen), so the trainer keeps calling the same model object.
``merged_copy`` gives a plain model with the adapters folded into the weights, for
exports that other tools load without peft.
"""

from __future__ import annotations

import copy

from torch import nn

INSTALL_HINT = "pip install peft (or pip install 'rlhf_ext[lora]')"


def _peft(owner: str):
    try:
        import peft
    except ImportError:
        raise ImportError(f"{owner}: `lora_rank` > 0 needs peft: {INSTALL_HINT}") from None
    return peft


def lora_settings(config) -> dict:
    """The LoRA fields of a :class:`PPOConfig` (or of its dict) as peft's LoraConfig
    arguments."""
    get = config.get if isinstance(config, dict) else lambda name: getattr(config, name)
    targets = get("lora_target_modules")
    return {
        "r": get("lora_rank"),
        "lora_alpha": get("lora_alpha"),
        "lora_dropout": get("lora_dropout"),
        "target_modules": targets if isinstance(targets, str) else list(targets),
    }


def apply_lora(model: nn.Module, config, owner: str):
    """Wrap ``model`` (a TinyGPT or a transformers causal LM) in a peft ``PeftModel``
    with the config's LoRA settings; ``model`` itself gets the adapter layers and its
    other weights are frozen. Errors name ``owner``."""
    peft = _peft(owner)
    if isinstance(model, peft.PeftModel):
        raise ValueError(
            f"{owner}: `policy` is a PeftModel already; pass its base model with lora_rank, "
            "or the PeftModel with lora_rank=0"
        )
    lora_config = peft.LoraConfig(**lora_settings(config))
    try:
        return peft.get_peft_model(model, lora_config)
    except ValueError as exc:  # no module matched `lora_target_modules`
        raise ValueError(f"{owner}: `lora_target_modules`: {exc}") from exc


def merged_copy(peft_model) -> nn.Module:
    """A copy of the base model with the LoRA updates merged into its weights (the
    training model is left as it is)."""
    return copy.deepcopy(peft_model).merge_and_unload()
