"""``python -m rlhf_ext demo`` and ``python -m rlhf_ext train --config FILE``.

The train config file (JSON, or TOML on Python 3.11+) holds::

    {
      "policy": "gpt2",                      # a transformers name or path, or
                                             # {"builtin": {GPTConfig fields}} (byte tokenizer)
      "ref_policy": null,                    # default: a frozen copy of the policy
      "value_model": null,                   # a separate critic; default: a value head
      "reward": "my_module:score",           # fn(prompts, completions) -> scores, or
                                             # {"model": name_or_path} (a sequence classifier)
      "prompts": "prompts.txt",              # one prompt per line, or a list of strings
      "ppo": {...every PPOConfig field...}
    }

Under ``torchrun`` each process joins the group (gloo on CPU, NCCL on GPU) and
rolls out its own share.
"""

from __future__ import annotations

import importlib
import os

import torch

from rlhf_ext.trainer.checkpoint import CHECKPOINT_FILE
from rlhf_ext.trainer.config import PPOConfig, load_config_file, ppo_section
from rlhf_ext.trainer.demo import ALGORITHMS

NAME = "python -m rlhf_ext train"
EXPORT_NAME = "python -m rlhf_ext export"
# a typo ("ref_polcy") must not quietly fall back to a default
TOP_LEVEL_KEYS = ("policy", "ref_policy", "value_model", "reward", "prompts", "ppo")


def positive_int(text: str) -> int:
    """argparse type: an int >= 1 (``--threads``)."""
    import argparse

    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an int >= 1, got {text!r}")
    return value


THREADS_HELP = (
    "CPU threads (torch.set_num_threads) per process; on a machine shared with other work, "
    "at most the idle cores (docs/trainer.md, CPU threads)"
)


def add_subcommands(sub) -> None:
    """Register ``demo`` and ``train`` on an argparse subparsers object."""
    demo = sub.add_parser(
        "demo", help="the offline RLHF demo (pretrain, reward model, then PPO and GRPO)"
    )
    demo.add_argument("--output-dir", default="runs/demo")
    demo.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    demo.add_argument(
        "--iterations", type=int, default=None, help="iterations per seed and algorithm"
    )
    demo.add_argument("--algorithms", nargs="+", choices=ALGORITHMS, default=list(ALGORITHMS))
    demo.add_argument("--quick", action="store_true", help="a tiny scale, for smoke tests")
    demo.add_argument(
        "--threads", type=positive_int, default=1, metavar="N", help=THREADS_HELP + "; default 1"
    )
    train = sub.add_parser("train", help="PPO from a config file")
    train.add_argument("--config", required=True, help="JSON or TOML file")
    train.add_argument("--resume", action="store_true", help="continue from output_dir")
    train.add_argument(
        "--overwrite", action="store_true", help="a fresh run may replace output_dir's files"
    )
    train.add_argument("--output-dir", default=None, help="overrides ppo.output_dir")
    train.add_argument("--iterations", type=int, default=None, help="overrides total_iterations")
    train.add_argument(
        "--threads",
        type=positive_int,
        default=None,
        metavar="N",
        help=THREADS_HELP + "; default torch's",
    )
    export = sub.add_parser(
        "export",
        help="write a checkpoint's policy (and value head or critic) as an export folder",
        description="Write the policy of a trainer checkpoint.pt (and its value head or "
        "critic) to OUTPUT_DIR: save_pretrained files for a Hugging Face model, model.pt for "
        "the built-in GPT, and rlhf_ext_export.json (docs/trainer.md, Export and formats).",
    )
    export.add_argument("checkpoint", help="a checkpoint.pt written by the trainer")
    export.add_argument("output_dir", help="the folder to write (created if missing)")


def run_demo_command(args) -> int:
    """Entry point of ``demo``."""
    import dataclasses

    from rlhf_ext.trainer.demo import QUICK, DemoScale, run_demo

    scale = QUICK if args.quick else DemoScale()
    if args.iterations is not None:
        scale = dataclasses.replace(scale, ppo_iterations=args.iterations)
    run_demo(
        args.output_dir,
        seeds=args.seeds,
        scale=scale,
        algorithms=tuple(args.algorithms),
        threads=args.threads,
    )
    return 0


def run_export_command(args) -> int:
    """Entry point of ``export``."""
    from rlhf_ext.trainer.export import export_checkpoint

    manifest = export_checkpoint(args.checkpoint, args.output_dir)
    print(f"{EXPORT_NAME}: wrote {', '.join(manifest['files'])} in {args.output_dir}")
    if manifest["tokenizer"] is None:
        print(f"{EXPORT_NAME}: no tokenizer saved (the model's original one was not found)")
    return 0


def run_train_command(args) -> int:
    """Entry point of ``train``: build everything from the file, then train."""
    from rlhf_ext.trainer.ppo import PPOTrainer

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    spec = load_config_file(args.config)
    unknown = sorted(set(spec) - set(TOP_LEVEL_KEYS))
    if unknown:
        raise ValueError(
            f"{NAME}: unknown key(s) {unknown} in {args.config}; known: {list(TOP_LEVEL_KEYS)}"
        )
    ppo = dict(ppo_section(spec.get("ppo", {}), args.config))
    if args.output_dir is not None:
        ppo["output_dir"] = args.output_dir
    if args.iterations is not None:
        ppo["total_iterations"] = args.iterations
    config = PPOConfig.from_dict(ppo)
    checkpoint = os.path.join(config.output_dir, CHECKPOINT_FILE)
    # --resume without a checkpoint starts afresh, as the docs promise, over what is there
    config.overwrite = config.overwrite or args.overwrite or args.resume
    device = _init_distributed()
    if "policy" not in spec:
        raise ValueError(f"{NAME}: the config file needs a `policy` entry")
    # a builtin model without weights is initialised from torch's global RNG: seed it
    # first, alike on every rank (the default reference is a copy made before DDP syncs)
    torch.manual_seed(config.seed)
    policy, tokenizer = load_policy(spec["policy"], device)
    ref = load_policy(spec["ref_policy"], device)[0] if spec.get("ref_policy") else None
    critic = load_policy(spec["value_model"], device)[0] if spec.get("value_model") else None
    reward, reward_tokenizer = load_reward(spec.get("reward"), device)
    prompts = load_prompts(spec.get("prompts"))
    trainer = PPOTrainer(
        config, policy, ref, reward, tokenizer, critic, reward_tokenizer=reward_tokenizer
    )
    if args.resume:
        if os.path.exists(checkpoint):
            trainer.load_checkpoint()
            trainer.log(f"resumed from {trainer.checkpoint_path} at iteration {trainer.iteration}")
        else:
            trainer.log(
                f"warning: {NAME} --resume: no checkpoint at {trainer.checkpoint_path}; "
                "starting a fresh run"
            )
    trainer.train(prompts)
    return 0


def _init_distributed() -> torch.device:
    """Join the torchrun process group when there is one; this rank's device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available()
    if world > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if cuda else "gloo")
    if cuda:
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def load_policy(spec, device):
    """A model and its tokenizer: ``{"builtin": {...}, "weights": ...}``, an export
    folder (rlhf_ext/trainer/export.py), or a transformers name/path."""
    from rlhf_ext.trainer.export import MANIFEST, load_export, load_weights

    if isinstance(spec, dict) and "builtin" in spec:
        from rlhf_ext.trainer.model import ByteTokenizer, GPTConfig, TinyGPT

        tokenizer = ByteTokenizer()
        fields = {"vocab_size": tokenizer.vocab_size, **spec["builtin"]}
        model = TinyGPT(GPTConfig(**fields))
        if spec.get("weights"):  # a state dict, an export folder or a trainer checkpoint.pt
            load_weights(model, spec["weights"])
        return model.to(device), tokenizer
    if not isinstance(spec, str):
        raise ValueError(f"{NAME}: a model must be a name/path or {{'builtin': ...}}, got {spec!r}")
    if os.path.isfile(os.path.join(spec, MANIFEST)):
        exported = load_export(spec)
        if exported.tokenizer is None:
            raise ValueError(f"{NAME}: the export {spec} holds no tokenizer")
        return exported.policy.to(device), exported.tokenizer
    transformers = _transformers()
    model = transformers.AutoModelForCausalLM.from_pretrained(spec).to(device)
    tokenizer = transformers.AutoTokenizer.from_pretrained(spec)
    return model, tokenizer


def load_reward(spec, device):
    """``(reward, reward_tokenizer)``: a ``"module:function"`` (no tokenizer of its
    own) or ``{"model": name_or_path}`` (a sequence classifier in eval mode, with
    the tokenizer of the same name; a missing pad token becomes EOS)."""
    if isinstance(spec, str) and ":" in spec:
        module_name, _, attr = spec.partition(":")
        return getattr(importlib.import_module(module_name), attr), None
    if isinstance(spec, dict) and "model" in spec:
        transformers = _transformers()
        model = transformers.AutoModelForSequenceClassification.from_pretrained(spec["model"])
        tokenizer = transformers.AutoTokenizer.from_pretrained(spec["model"])
        if tokenizer.pad_token_id is None and tokenizer.eos_token_id is not None:
            tokenizer.pad_token = tokenizer.eos_token
        if getattr(model.config, "pad_token_id", None) is None:
            model.config.pad_token_id = tokenizer.pad_token_id  # finds each row's last token
        return model.to(device).eval(), tokenizer
    raise ValueError(
        f"{NAME}: `reward` must be 'module:function' or {{'model': name_or_path}}, got {spec!r}"
    )


def load_prompts(spec) -> list:
    """A list of prompts (strings or lists of int token ids), or the non-empty
    lines of a text file."""
    if isinstance(spec, list):
        for i, prompt in enumerate(spec):
            _check_prompt(i, prompt)
        return spec
    if isinstance(spec, str):
        with open(spec) as fh:
            return [line.rstrip("\n") for line in fh if line.strip()]
    raise ValueError(f"{NAME}: `prompts` must be a file path or a list of strings, got {spec!r}")


def _check_prompt(index: int, prompt) -> None:
    """A prompt is a string or a list of int token ids (a JSON 2 or 2.0 is not a prompt)."""
    if isinstance(prompt, str):
        return
    ids = isinstance(prompt, list) and all(
        isinstance(t, int) and not isinstance(t, bool) for t in prompt
    )
    if not ids:
        raise ValueError(
            f"{NAME}: `prompts[{index}]` must be a string or a list of int token ids, "
            f"got {prompt!r}"
        )


def _transformers():
    try:
        import transformers
    except ImportError as exc:
        raise ImportError(
            f"{NAME}: loading a Hugging Face model needs `transformers` "
            "(pip install 'rlhf_ext[trainer]')"
        ) from exc
    return transformers
