"""The offline RLHF demo (``python -m rlhf_ext demo``, ``make demo``): the whole
pipeline at toy scale with no downloads.

1. Pretrain the built-in GPT on a synthetic corpus (a Markov chain over a small
   vocabulary), so the reference policy is a real language model.
2. Train a reward model on preference pairs of the pretrained model's own
   completions, labelled by a hidden rule (the fraction of "a"-class tokens in
   the response) with a Bradley-Terry loss.
3. PPO and GRPO against that learned reward model, each from the pretrained
   model, with the same adaptive KL control: PPO with a value head and GAE, GRPO
   with no critic and groups of 8 responses per prompt.

It reports the hidden-rule score, the reward-model score and the KL to the
reference on held-out prompts before and after each algorithm, for each seed, and
plots both algorithms' training curves in one figure (``ppo_vs_grpo.png``).
"""

from __future__ import annotations

import copy
import json
import os
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

import rlhf_ext
from rlhf_ext.trainer.config import PPOConfig
from rlhf_ext.trainer.metrics import KL_UNITS, Panel, plot_comparison
from rlhf_ext.trainer.model import GPTConfig, PooledRewardModel, TinyGPT
from rlhf_ext.trainer.ppo import PPOTrainer
from rlhf_ext.trainer.rollout import (
    generate,
    left_pad,
    response_logits,
    response_logprobs,
    right_pad,
)

PAD, BOS, EOS = 0, 1, 2
N_A, N_B = 6, 18  # "a"-class tokens (the hidden rule rewards them) and the others
WORLD_SEED = 1234  # the corpus and the rule are the same for every run seed
ALGORITHMS = ("ppo", "grpo")
GRPO_GENERATIONS = 8  # responses per prompt: a GRPO group
FIGURE = "ppo_vs_grpo.png"
# the combined figure's name for each algorithm
ALGORITHM_NAMES = {
    "ppo": "PPO (GAE, value head)",
    "grpo": f"GRPO (groups of {GRPO_GENERATIONS}, no critic)",
}


def comparison_panels(kl_target: float) -> tuple[Panel, ...]:
    """The combined figure: one panel per metric, one line per algorithm and seed."""
    return (
        Panel(
            "hidden rule: the true goal (the policy sees only the RM)",
            ("demo/hidden_rule",),
            "fraction of a-class tokens (0 to 1)",
        ),
        Panel(
            "reward-model score: what the policy maximises",
            ("objective/scores",),
            "RM output (Bradley-Terry logit), mean",
        ),
        Panel(
            "KL to the reference",
            ("objective/kl",),
            KL_UNITS,
            target=kl_target,
            target_label=f"KL target {kl_target:g} (adaptive controller)",
        ),
        Panel("KL coefficient kl_coef (adaptive)", ("kl_coef",), "coefficient (reward per nat)"),
        Panel("entropy of the policy", ("objective/entropy",), "nats / sequence (sum)"),
    )


@dataclass
class DemoScale:
    """Sizes of the stages (the defaults fit ~1.5 min per seed on 2 CPU cores).
    ``ppo_iterations`` is the iteration count of each algorithm, PPO and GRPO."""

    d_model: int = 64
    n_layer: int = 2
    pretrain_steps: int = 400
    pretrain_batch: int = 64
    reward_pairs: int = 2048
    reward_steps: int = 300
    ppo_iterations: int = 60
    rollout_batch: int = 64
    eval_prompts: int = 256


QUICK = DemoScale(
    d_model=32,
    n_layer=1,
    pretrain_steps=60,
    reward_pairs=256,
    reward_steps=60,
    ppo_iterations=4,
    rollout_batch=16,
    eval_prompts=32,
)


class DemoTokenizer:
    """Token names ``a0..a5`` and ``b0..b17`` plus pad / bos / eos; text is the
    space-separated names."""

    pad_token_id, bos_token_id, eos_token_id = PAD, BOS, EOS
    names = (
        ["<pad>", "<bos>", "<eos>"] + [f"a{i}" for i in range(N_A)] + [f"b{i}" for i in range(N_B)]
    )
    vocab_size = len(names)

    def encode(self, text: str) -> list[int]:
        """BOS plus the ids of the space-separated names in ``text``."""
        return [BOS] + [self.names.index(w) for w in text.split()]

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        """Space-separated names (special tokens dropped when asked)."""
        keep = [int(i) for i in ids if not (skip_special_tokens and int(i) < 3)]
        return " ".join(self.names[i] for i in keep)


def _print(message: str) -> None:
    print(message, flush=True)


class _LogStream:
    """A text stream (what PPOTrainer's ``log`` takes) that hands each printed
    message to a ``log(message)`` function."""

    def __init__(self, log) -> None:
        self.log = log

    def write(self, text: str) -> None:
        if text.strip():
            self.log(text.rstrip("\n"))

    def flush(self) -> None:
        pass


def hidden_rule(completions: list[str]) -> list[float]:
    """The preference the reward model must discover: the fraction of a-class
    tokens in each completion (0 for an empty one)."""
    scores = []
    for text in completions:
        words = text.split()
        scores.append(sum(w.startswith("a") for w in words) / len(words) if words else 0.0)
    return scores


class SyntheticCorpus:
    """Documents from a fixed random Markov chain; a-class tokens are rarer
    (about a fifth of the text), so the rule has room to rise."""

    def __init__(self) -> None:
        """Draw the chain from ``WORLD_SEED``."""
        gen = torch.Generator().manual_seed(WORLD_SEED)
        n = N_A + N_B
        logits = 2.0 * torch.randn(n, n, generator=gen)
        logits[:, :N_A] -= 0.6  # rarer a-class tokens
        self.transition = logits.softmax(-1)
        self.first = torch.full((n,), 1.0 / n)

    def documents(self, count: int, gen: torch.Generator, min_len=6, max_len=12) -> list:
        """``count`` token-id lists: BOS, a chain of content tokens, EOS (sampled
        for all documents at once, one position at a time)."""
        lengths = torch.randint(min_len, max_len + 1, (count,), generator=gen).tolist()
        tokens = [torch.multinomial(self.first.expand(count, -1), 1, generator=gen)]
        for _ in range(max_len - 1):
            rows = self.transition[tokens[-1].squeeze(1)]
            tokens.append(torch.multinomial(rows, 1, generator=gen))
        body = (torch.cat(tokens, dim=1) + 3).tolist()
        return [[BOS] + row[:n] + [EOS] for row, n in zip(body, lengths, strict=True)]

    def prompts(self, count: int, gen: torch.Generator, length: int = 3) -> list:
        """Document openings: BOS and ``length`` content tokens."""
        return [d[: 1 + length] for d in self.documents(count, gen, min_len=length + 1)]


def pretrain(corpus: SyntheticCorpus, scale: DemoScale, seed: int) -> TinyGPT:
    """Next-token training of the built-in GPT (negative rlhf_ext.token_logprobs)."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model = TinyGPT(
        GPTConfig(DemoTokenizer.vocab_size, scale.n_layer, 4, scale.d_model, max_seq_len=32)
    )
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(scale.pretrain_steps):
        docs = corpus.documents(scale.pretrain_batch, gen)
        ids, mask, _ = right_pad(docs, PAD, EOS, "cpu")  # EOS ends each document
        logits, _, _ = model(ids, mask)
        targets = ids[:, 1:].masked_fill(~mask[:, 1:], -100)
        logprobs = rlhf_ext.token_logprobs(logits[:, :-1], targets)
        loss = -rlhf_ext.masked_mean(logprobs, mask[:, 1:])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return model.eval()


def sample_completions(model, prompts: list, max_new_tokens: int, gen, temperature=1.0):
    """Completions of ``prompts`` by ``model`` (a rollout Batch)."""
    ids, mask = left_pad(prompts, PAD, "cpu")
    cfg = PPOConfig(max_new_tokens=max_new_tokens, temperature=temperature, progress_bar=False)
    return generate(model, ids, mask, config=cfg, eos_token_id=EOS, pad_token_id=PAD, generator=gen)


def train_reward_model(corpus, policy, scale: DemoScale, seed: int, max_new_tokens: int):
    """Bradley-Terry reward model on pairs of the policy's completions labelled by
    the hidden rule; returns the model and its held-out pair accuracy."""
    gen = torch.Generator().manual_seed(seed + 1)
    torch.manual_seed(seed + 1)
    tok = DemoTokenizer()
    prompts = corpus.prompts(scale.reward_pairs, gen)
    first = sample_completions(policy, prompts, max_new_tokens, gen, temperature=1.2)
    second = sample_completions(policy, prompts, max_new_tokens, gen, temperature=1.2)
    rule_first = torch.tensor(hidden_rule([tok.decode(r[m]) for r, m in _rows(first)]))
    rule_second = torch.tensor(hidden_rule([tok.decode(r[m]) for r, m in _rows(second)]))
    keep = rule_first != rule_second
    chosen_first = rule_first > rule_second
    lm = TinyGPT(GPTConfig(tok.vocab_size, 1, 4, 32, max_seq_len=32))
    model = PooledRewardModel(lm)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    rows = keep.nonzero().squeeze(1)
    split = int(0.8 * rows.numel())
    train_rows, test_rows = rows[:split], rows[split:]
    for _ in range(scale.reward_steps):
        pick = train_rows[torch.randint(train_rows.numel(), (64,), generator=gen)]
        margin = _margin(model, first, second, chosen_first, pick)
        loss = -F.logsigmoid(margin).mean()  # Bradley-Terry
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        accuracy = float(
            (_margin(model, first, second, chosen_first, test_rows) > 0).float().mean()
        )
    return model.eval().requires_grad_(False), accuracy


def _rows(batch):
    return zip(batch.responses, batch.response_mask, strict=True)


def _margin(model, first, second, chosen_first, rows):
    score_first = model(first.select(rows).input_ids, first.select(rows).attention_mask)
    score_second = model(second.select(rows).input_ids, second.select(rows).attention_mask)
    return torch.where(chosen_first[rows], score_first - score_second, score_second - score_first)


@torch.no_grad()
def evaluate(policy_lm, ref_lm, reward_model, prompts, max_new_tokens: int, seed: int) -> dict:
    """Hidden-rule score, reward-model score and KL (sum per sequence, k1) of the
    policy on ``prompts``, sampled with a generator of its own."""
    gen = torch.Generator().manual_seed(seed)
    batch = sample_completions(policy_lm, prompts, max_new_tokens, gen)
    tok = DemoTokenizer()
    rule = hidden_rule([tok.decode(r[m]) for r, m in _rows(batch)])
    logits, _ = response_logits(policy_lm, batch)
    ref_logits, _ = response_logits(ref_lm, batch)
    logprobs = response_logprobs(logits, batch, 1.0)
    ref_logprobs = response_logprobs(ref_logits, batch, 1.0)
    kl = rlhf_ext.kl_penalty(logprobs, ref_logprobs, kind="k1") * batch.response_mask
    return {
        "hidden_rule": sum(rule) / len(rule),
        "rm_score": float(reward_model(batch.input_ids, batch.attention_mask).mean()),
        "kl": float(kl.sum(1).mean()),
    }


def demo_config(scale: DemoScale, seed: int, output_dir: str, algorithm: str = "ppo") -> PPOConfig:
    """The settings of the demo: PPO (value head on the policy, GAE, normalised and
    clipped scores) or GRPO (no critic, groups of ``GRPO_GENERATIONS`` responses,
    group-normalised scores); both put the sequence's KL into its reward under the
    same adaptive controller, so both chase the same KL target."""
    if algorithm not in ALGORITHMS:
        raise ValueError(
            f"rlhf_ext.trainer.demo: `algorithm` must be one of {ALGORITHMS}, got {algorithm!r}"
        )
    ppo = _ppo_config(scale, seed, output_dir)
    if algorithm == "ppo":
        return ppo
    fields = ppo.to_dict()
    fields.update(
        advantage_estimator="grpo",
        num_generations=GRPO_GENERATIONS,
        # the group's mean and std normalise the scores: no running normalisation or clip
        normalize_reward=False,
        reward_clip=None,
    )
    return PPOConfig(**fields)


def _ppo_config(scale: DemoScale, seed: int, output_dir: str) -> PPOConfig:
    return PPOConfig(
        learning_rate=1e-3,
        total_iterations=scale.ppo_iterations,
        rollout_batch_size=scale.rollout_batch,
        mini_batch_size=scale.rollout_batch // 4,
        ppo_epochs=4,
        vf_coef=0.5,
        kl_coef=0.2,
        adaptive_kl=True,
        kl_target=6.0,
        kl_horizon=256.0,
        normalize_reward=True,
        reward_clip=5.0,
        max_new_tokens=12,
        missing_eos_penalty=1.0,
        seed=seed,
        sample_interval=max(scale.ppo_iterations // 3, 1),
        checkpoint_interval=scale.ppo_iterations,
        output_dir=output_dir,
        overwrite=True,  # `make demo` twice re-runs the demo in the same folders
    )


def run_seed(
    seed: int, output_dir: str, scale: DemoScale, log=_print, algorithms=ALGORITHMS
) -> list[dict]:
    """The stages for one seed: pretraining and the reward model once, then each of
    ``algorithms`` from the pretrained model (under ``output_dir/<algorithm>``);
    returns one dict of start / end figures per algorithm."""
    corpus = SyntheticCorpus()
    clock = time.perf_counter()
    reference = pretrain(corpus, scale, seed)
    log(f"[seed {seed}] pretrained the GPT in {time.perf_counter() - clock:.1f}s")
    max_new_tokens = _ppo_config(scale, seed, output_dir).max_new_tokens
    clock = time.perf_counter()
    reward_model, accuracy = train_reward_model(corpus, reference, scale, seed, max_new_tokens)
    log(
        f"[seed {seed}] reward model: held-out pair accuracy {accuracy:.3f} "
        f"({time.perf_counter() - clock:.1f}s)"
    )
    eval_prompts = corpus.prompts(scale.eval_prompts, torch.Generator().manual_seed(10_000 + seed))
    train_prompts = corpus.prompts(1024, torch.Generator().manual_seed(20_000 + seed))
    start = evaluate(reference, reference, reward_model, eval_prompts, max_new_tokens, seed)
    results = []
    for algorithm in algorithms:
        cfg = demo_config(scale, seed, os.path.join(output_dir, algorithm), algorithm)
        # the trainer freezes its reference in place: the copy is trained again
        policy = copy.deepcopy(reference).requires_grad_(True)
        trainer = PPOTrainer(
            cfg,
            policy,
            reference,
            reward_model,
            DemoTokenizer(),
            metrics_fn=lambda p, c: {"demo/hidden_rule": _mean(hidden_rule(c))},
            log=_LogStream(lambda message, a=algorithm: log(f"[seed {seed} {a}] {message}")),
        )
        clock = time.perf_counter()
        history = trainer.train(train_prompts)
        seconds = time.perf_counter() - clock
        train_kl = [m["objective/kl"] for m in history]
        end = evaluate(
            trainer.policy_lm, reference, reward_model, eval_prompts, max_new_tokens, seed
        )
        results.append(
            {
                "seed": seed,
                "algorithm": algorithm,
                "reward_model_accuracy": accuracy,
                "start": start,
                "end": end,
                "final_kl_coef": trainer.kl_controller.value,
                "train_kl_max": max(train_kl),
                "train_kl_last10": _mean(train_kl[-10:]),
                "kl_target": cfg.kl_target,
                "train_seconds": seconds,
                "history": history,
            }
        )
    return results


def _mean(values: list[float]) -> float:
    return sum(values) / max(len(values), 1)


def run_demo(
    output_dir: str = "runs/demo",
    seeds=(0,),
    scale: DemoScale | None = None,
    log=_print,
    algorithms=ALGORITHMS,
    threads: int = 1,
) -> list[dict]:
    """Run the demo for each seed under ``output_dir/seed<N>/<algorithm>``; print and
    write ``summary.json`` (start and end figures per seed and algorithm) and
    ``ppo_vs_grpo.png`` (every run's training curves). ``threads``: CPU threads
    (``torch.set_num_threads``; default 1, the fastest at this scale)."""
    scale = scale or DemoScale()
    unknown = [a for a in algorithms if a not in ALGORITHMS]
    if unknown or not algorithms:
        raise ValueError(
            f"rlhf_ext.trainer.demo.run_demo: `algorithms` must be a non-empty subset of "
            f"{ALGORITHMS}, got {list(algorithms)}"
        )
    # One thread by default: at this scale OpenMP's barriers cost more than the math (20x
    # on a busy 2-core machine: 7 ms against 140 ms for one GPT forward).
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise ValueError(
            f"rlhf_ext.trainer.demo.run_demo: `threads` must be an int >= 1, got {threads!r}"
        )
    torch.set_num_threads(threads)
    results = []
    for seed in seeds:
        runs = run_seed(seed, os.path.join(output_dir, f"seed{seed}"), scale, log, algorithms)
        for run in runs:
            log(format_result(run))
        results.extend(runs)
    os.makedirs(output_dir, exist_ok=True)
    histories = {(ALGORITHM_NAMES[r["algorithm"]], r["seed"]): r.pop("history") for r in results}
    summary = os.path.join(output_dir, "summary.json")
    with open(summary, "w") as fh:
        json.dump(results, fh, indent=2)
    figure = os.path.join(output_dir, FIGURE)
    kl_target = _ppo_config(scale, 0, output_dir).kl_target
    title = (
        f"{' vs '.join(a.upper() for a in algorithms)} on the offline demo, "
        f"{'seed' if len(seeds) == 1 else 'seeds'} {', '.join(str(s) for s in seeds)}: "
        "each run from the same pretrained model, against the same reward model"
    )
    note = (
        f"Each point: the mean over one iteration's {scale.rollout_batch} rollouts.\n"
        "KL: log-ratio to the reference (k1) summed over the response.\n"
        "The controller raises kl_coef while the KL is above its target."
    )
    panels = comparison_panels(kl_target)
    problem = plot_comparison(histories, figure, panels, title=title, note=note)
    log(
        f"summary: {summary}; "
        + (f"no figure: {problem}" if problem else f"training curves: {figure}")
    )
    log(format_summary(results))
    return results


def format_result(r: dict) -> str:
    """One run's start -> end figures."""
    s, e = r["start"], r["end"]
    return (
        f"[seed {r['seed']} {r['algorithm']}] hidden rule {s['hidden_rule']:.3f} -> "
        f"{e['hidden_rule']:.3f} ({e['hidden_rule'] - s['hidden_rule']:+.3f}); reward model "
        f"{s['rm_score']:.3f} -> {e['rm_score']:.3f}; KL {s['kl']:.3f} -> {e['kl']:.3f} "
        f"(target {r['kl_target']}); kl_coef {r['final_kl_coef']:.4f}; "
        f"{r['train_seconds']:.0f}s"
    )


def format_summary(results: list[dict]) -> str:
    """A Markdown table of every run (held-out start / end, and the training KL)."""
    lines = [
        "| seed | algorithm | RM pair accuracy | hidden rule start | end | rise | RM score start "
        "| end | KL start | end | training KL, last 10 it. | max | target | seconds |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        s, e = r["start"], r["end"]
        lines.append(
            f"| {r['seed']} | {r['algorithm']} | {r['reward_model_accuracy']:.3f} | "
            f"{s['hidden_rule']:.3f} | "
            f"{e['hidden_rule']:.3f} | {e['hidden_rule'] - s['hidden_rule']:+.3f} | "
            f"{s['rm_score']:.3f} | {e['rm_score']:.3f} | {s['kl']:.3f} | {e['kl']:.3f} | "
            f"{r['train_kl_last10']:.2f} | {r['train_kl_max']:.2f} | {r['kl_target']:g} | "
            f"{r['train_seconds']:.0f} |"
        )
    return "\n".join(lines)
