"""Run every kernel of rlhf_ext once on shapes that cover their code paths
(short and long rows, chunk boundaries, packed rows, masks).

For compute-sanitizer: `compute-sanitizer --tool racecheck python tools/sanitize_ops.py`
(the CUDA kernels; `--backend triton` for the Triton ones). tools/triton_compile_check.py
runs it with `backend="triton"` on CPU tensors to compile every Triton kernel for a GPU
architecture without one."""

import argparse

import torch

import rlhf_ext
from rlhf_ext.ops._vocab import GROUP_BASELINES, GROUP_SCALES

# policy_loss kinds and the parameters each reads (python_tests/test_policy_loss.py's).
POLICY_KIND_SETTINGS = {
    "ppo": dict(clip_eps_high=0.28, dual_clip=3.0, ratio_cap=1.25),
    "reinforce": {},
    "cispo": dict(clip_eps_high=0.3),
    "sapo": {},
    "dppo_tv": dict(clip_eps=0.03, clip_eps_high=0.05),
    "dppo_kl": dict(clip_eps=0.005, clip_eps_high=0.01),
    "dro": dict(beta=0.1),
    "gspo": dict(clip_eps=0.05),
    "gspo_token": dict(clip_eps=0.05),
    "geo_mean": dict(clip_eps=0.05, clip_eps_high=0.08),
}


def run_all(dev: str = "cuda", backend: str = "cuda") -> None:
    torch.manual_seed(0)
    for rows, steps in [(3, 1), (5, 37), (4, 600), (3, 4500)]:
        r, v = torch.randn(rows, steps, device=dev), torch.randn(rows, steps, device=dev)
        m = torch.rand(rows, steps, device=dev) > 0.3
        m[0, 0] = m[-1, -1] = True  # whole-tensor mean and whitening need 1 and 2, whatever the RNG
        for dtype in (torch.float32, torch.bfloat16, torch.float64):
            rlhf_ext.gae(
                r.to(dtype),
                v.to(dtype),
                m,
                gamma=torch.rand(rows, device=dev),
                lam=0.95,
                last_value=torch.randn(rows, device=dev),
                backend=backend,
            )
        rlhf_ext.masked_mean(r, m, backend=backend)
        if dev == "cuda" or steps < 4096:  # interpreted, 4500 columns cost ~30 s (no new variant)
            rlhf_ext.masked_mean(r, m, 0, backend=backend)
        rlhf_ext.masked_mean(r, m, 1, backend=backend)
        rlhf_ext.masked_whiten(r, m, backend=backend)
        rlhf_ext.kl_shaped_rewards(
            torch.randn(rows, device=dev), r, v, m, kl_coef=0.1, kl="k3", backend=backend
        )
    lens = [3, 0, 4000, 7, 1]
    cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), device=dev)
    n = sum(lens)
    rlhf_ext.gae(
        torch.randn(n, device=dev),
        torch.randn(n, device=dev),
        torch.rand(n, device=dev) > 0.2,
        cu_seqlens=cu,
        backend=backend,
    )
    # Loss ops (forward: per-row kernel + one-block finish; backward: loss_backward) on
    # short, long and empty rows, every agg mode, an all-masked and an empty batch.
    # more rows than the finish kernel's block; 20 under the interpreter (the compile check's
    # recording, on the CPU: the same kernel variants, a program per row costs ~10 ms there)
    many_rows = 300 if dev == "cuda" else 20
    for rows, steps in [(3, 1), (5, 37), (4, 600), (3, 4500), (many_rows, 9)]:
        lp = -torch.rand(rows, steps, device=dev) * 3
        old, adv = lp + 0.3 * torch.randn_like(lp), torch.randn_like(lp)
        m = torch.rand(rows, steps, device=dev) > 0.3
        m[0] = False
        for dtype in (torch.float32, torch.bfloat16, torch.float64):
            x = lp.to(dtype).requires_grad_()
            for agg in (
                "token-mean",
                "seq-mean-token-sum",
                "seq-mean-token-mean",
                "seq-mean-token-sum-norm",
            ):
                loss, _ = rlhf_ext.ppo_policy_loss(
                    x,
                    old.to(dtype),
                    adv.to(dtype),
                    m,
                    clip_eps_high=0.28,
                    dual_clip=3.0,
                    agg=agg,
                    backend=backend,
                )
                vloss, _ = rlhf_ext.value_loss(
                    x, old.to(dtype), adv.to(dtype), m, clip_eps=0.2, agg=agg, backend=backend
                )
                kl = rlhf_ext.kl_loss(x, old.to(dtype), m, kind="k3+", agg=agg, backend=backend)
                (loss + vloss + kl).backward()
            pen = rlhf_ext.kl_penalty(x, old.to(dtype), kind="k3", backend=backend)
            pen.sum().backward()
        rlhf_ext.ppo_policy_loss(lp, old, adv, torch.zeros_like(m), backend=backend)
        # Every policy kind, [B] advantages (the per-row load) and the gspo row prologue.
        for kind, settings in POLICY_KIND_SETTINGS.items():
            x = lp.clone().requires_grad_()
            loss, _ = rlhf_ext.policy_loss(
                x, old, adv[:, 0].contiguous(), m, kind=kind, backend=backend, **settings
            )
            loss.backward()
    for shape in [(0, 5), (4, 0)]:
        e = torch.randn(shape, device=dev, requires_grad=True)
        loss, _ = rlhf_ext.ppo_policy_loss(e, e.detach(), e.detach(), backend=backend)
        loss.backward()
    big = torch.randn(2, 3 * 4096 + 5, device=dev)
    rlhf_ext.masked_whiten(big, big > 0, backend=backend)
    # token_logprobs: aligned and unaligned rows, ignored rows, -inf entries, odd and large V,
    # every dtype, forward with and without entropy, both backwards.
    for rows, vocab in [(4, 1), (5, 33), (3, 4097), (2, 151936)]:
        for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
            full = torch.randn(rows, vocab + 1, device=dev).to(dtype)
            for logits in (full[:, :vocab], full[:, 1:]):
                target = torch.randint(0, vocab, (rows,), device=dev)
                target[0] = -100
                x = logits.clone()
                x[:, ::7] = float("-inf")
                x.requires_grad_()
                lp, ent = rlhf_ext.token_logprobs(x, target, return_entropy=True, backend=backend)
                (lp.sum() + ent.sum()).backward()
                y = logits.clone().requires_grad_()
                out = rlhf_ext.token_logprobs(
                    y * 1.0, target, inplace_backward=True, backend=backend
                )
                out.sum().backward()
    # token_logprobs' logit transforms (the PER_ROW_TEMP / SOFTCAP variants): per-token
    # temperatures with and without a softcap and a scale, every dtype, both backwards.
    for rows, vocab in [(5, 33), (2, 151936)]:
        for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
            logits = torch.randn(rows, vocab, device=dev).to(dtype) * 8
            target = torch.randint(0, vocab, (rows,), device=dev)
            target[0] = -100
            temps = torch.rand(rows, device=dev) + 0.5
            for kw in ({"softcap": 30.0}, {"temperature": temps},
                       {"temperature": temps, "softcap": 10.0, "logit_scale": 0.5}):  # fmt: skip
                x = logits.clone().requires_grad_()
                lp, ent = rlhf_ext.token_logprobs(
                    x, target, return_entropy=True, backend=backend, **kw
                )
                (lp.sum() + ent.sum()).backward()
                y = logits.clone().requires_grad_()
                out = rlhf_ext.token_logprobs(
                    y * 1.0, target, inplace_backward=True, backend=backend, **kw
                )
                out.sum().backward()
    # token_logprobs' extra outputs (SUM_SQ / MEAN / TOP1 forwards, the extra gradients'
    # backwards; CUDA: the kExtras kernel), with and without the entropy and a softcap.
    names = ("logprobs", "entropy", "lse", "log_sum_sq_probs", "mean_logits", "is_top1")
    for rows, vocab in [(5, 33), (2, 151936)]:
        for dtype in (torch.float32, torch.bfloat16, torch.float64):
            full = torch.randn(rows, vocab + 1, device=dev).to(dtype)
            target = torch.randint(0, vocab, (rows,), device=dev)
            target[0] = -100
            for logits, outputs, kw in ((full[:, :vocab], names, {}),
                                        (full[:, 1:], names[2:], {"softcap": 30.0}),
                                        (full[:, :vocab], ("mean_logits",), {})):  # fmt: skip
                x = logits.clone().requires_grad_()
                out = rlhf_ext.token_logprobs(x, target, outputs=outputs, backend=backend, **kw)
                sum(getattr(out, k).sum() for k in outputs if k != "is_top1").backward()
    # linear_token_logprobs: one chunk, uneven chunks, a backward split over the vocabulary and
    # over rows, ignored rows, a bias, entropy, every dtype; H of 128 (the Triton forward's
    # whole 64-wide k-steps) over two 4096-column spans.
    # 48 rows keep 32 valid ones: a multiple of 16, as without ignored tokens.
    cases = [(5, 8, 33, None), (37, 16, 2048, 16), (40, 8, 1100, 16), (48, 128, 4500, None)]
    for rows, size, vocab, chunk in cases:
        for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
            h = torch.randn(rows, size, device=dev).to(dtype).requires_grad_()
            w = torch.randn(vocab, size, device=dev).to(dtype).requires_grad_()
            b = torch.randn(vocab, device=dev).to(dtype).requires_grad_()
            target = torch.randint(0, vocab, (rows,), device=dev)
            target[::3] = -100
            lp, ent = rlhf_ext.linear_token_logprobs(
                h, w, target, bias=b, return_entropy=True, chunk_size=chunk, backend=backend
            )
            (lp.sum() + ent.sum()).backward()
    # ... and with the logit transforms (the fused forward's PER_ROW_TEMP / SOFTCAP epilogues).
    rows, size, vocab = 48, 128, 4500
    for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
        h = torch.randn(rows, size, device=dev).to(dtype).requires_grad_()
        w = torch.randn(vocab, size, device=dev).to(dtype).requires_grad_()
        target = torch.randint(0, vocab, (rows,), device=dev)
        target[::3] = -100
        temps = torch.rand(rows, device=dev) + 0.5
        for kw in ({"softcap": 30.0}, {"temperature": temps, "softcap": 10.0, "logit_scale": 2.0},
                   {"temperature": temps}):  # fmt: skip
            lp, ent = rlhf_ext.linear_token_logprobs(
                h, w, target, return_entropy=True, backend=backend, **kw
            )
            (lp.sum() + ent.sum()).backward()
    # ... and with every extra output (the fused forward's EXTRAS planes and merge; the C++
    # chunks' kExtras rows), the extra gradients through the tiled backward.
    for dtype in (torch.float32, torch.bfloat16, torch.float64):
        h = torch.randn(rows, size, device=dev).to(dtype).requires_grad_()
        w = torch.randn(vocab, size, device=dev).to(dtype).requires_grad_()
        target = torch.randint(0, vocab, (rows,), device=dev)
        target[::3] = -100
        for outputs in (names, ("mean_logits", "is_top1")):
            out = rlhf_ext.linear_token_logprobs(
                h, w, target, outputs=outputs, softcap=20.0, chunk_size=16, backend=backend
            )
            sum(getattr(out, k).sum() for k in outputs if k != "is_top1").backward()
    # group_advantages: singletons, one big group, every baseline and scale, [B, K] scores.
    # (The Triton compile check records its launches through this function under the
    # interpreter on the CPU: small shapes there, the same kernel variants.)
    shapes = [(1, 1), (7, 3), (4096, 8), (3000, 3000)] if dev == "cuda" else [(1, 1), (9, 3)]
    for rows, size in shapes:
        scores = torch.randn(rows, 2, device=dev)
        ids = torch.randperm(rows, device=dev) // size
        lengths = torch.randint(1, 100, (rows,), device=dev)
        for baseline in GROUP_BASELINES:
            for scale in GROUP_SCALES:
                rlhf_ext.group_advantages(
                    scores, ids, baseline=baseline, scale=scale, lengths=lengths,
                    baselines=scores[:, 0], nonzero_rescale=scale == "batch",
                    validate=False, backend=backend,
                )  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", default="cuda", choices=["cuda", "triton"])
    run_all("cuda", parser.parse_args().backend)
    torch.cuda.synchronize()
    print("sanitize_ops: all kernels ran")


if __name__ == "__main__":
    main()
