import time, torch, rlhf_ext
from rlhf_ext import reference as ref
print(rlhf_ext.build_info()["cuda_archs"], torch.__version__, torch.cuda.get_device_name())
dev = "cuda"
torch.manual_seed(0)
def err(a, b): return ((a.double() - b).abs().max() / (b.abs().max() + 1e-12)).item()
for (B, T) in [(3, 1), (5, 37), (4, 600), (3, 2049), (2, 70000), (64, 4096)]:
    r = torch.randn(B, T, device=dev); v = torch.randn(B, T, device=dev)
    m = torch.rand(B, T, device=dev) > 0.3; m[0] = False
    lv = torch.randn(B, device=dev); g = torch.rand(B, device=dev) * 0.1 + 0.9
    ra, rr = ref.gae(r.double().cpu(), v.double().cpu(), m.cpu(), gamma=g.double().cpu(), lam=0.95, last_value=lv.double().cpu())
    for be in ["cuda", "triton"]:
        a, rt = rlhf_ext.gae(r, v, m, gamma=g, lam=0.95, last_value=lv, backend=be)
        a2, _ = rlhf_ext.gae(r, v, m, gamma=g, lam=0.95, last_value=lv, backend=be)
        print(f"gae {be} B={B} T={T} err={err(a.cpu(), ra):.2e} {err(rt.cpu(), rr):.2e} det={torch.equal(a, a2)}")
lens = [3, 0, 4000, 7, 70000, 1]
cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), device=dev)
N = sum(lens); r1 = torch.randn(N, device=dev); v1 = torch.randn(N, device=dev); m1 = torch.rand(N, device=dev) > 0.2
pa, pr = ref.gae(r1.double().cpu(), v1.double().cpu(), m1.cpu(), gamma=0.99, lam=0.95, cu_seqlens=cu.cpu())
for be in ["cuda", "triton"]:
    a, rt = rlhf_ext.gae(r1, v1, m1, gamma=0.99, lam=0.95, cu_seqlens=cu, backend=be)
    print(f"gae packed {be} err={err(a.cpu(), pa):.2e} {err(rt.cpu(), pr):.2e}")
x = torch.randn(33, 9000, device=dev); mm = torch.rand(33, 9000, device=dev) > 0.5; sc = torch.randn(33, device=dev)
xd, md = x.double().cpu(), mm.cpu()
for be in ["cuda", "triton"]:
    print(be, "mean", err(rlhf_ext.masked_mean(x, mm, backend=be).cpu(), ref.masked_mean(xd, md)),
          "mean1", err(rlhf_ext.masked_mean(x, mm, 1, backend=be).cpu(), ref.masked_mean(xd, md, 1)),
          "mean0", err(rlhf_ext.masked_mean(x, mm, 0, backend=be).cpu(), ref.masked_mean(xd, md, 0)),
          "whiten", err(rlhf_ext.masked_whiten(x, mm, backend=be).cpu(), ref.masked_whiten(xd, md)),
          "klsr", err(rlhf_ext.kl_shaped_rewards(sc, x, x * 0.9, mm, kl_coef=0.1, kl="k3", backend=be).cpu(),
                      ref.kl_shaped_rewards(sc.double().cpu(), xd, xd * 0.9, md, kl_coef=0.1, kl="k3")))
xg = x.clone().requires_grad_(); rlhf_ext.masked_mean(xg, mm, backend="cuda").backward(); print("grad ok", xg.grad.isfinite().all().item())

def bench(fn, reps=50):
    for _ in range(5): fn()
    torch.cuda.synchronize(); s = torch.cuda.Event(enable_timing=True); e = torch.cuda.Event(enable_timing=True)
    ts = []
    for _ in range(reps):
        s.record(); fn(); e.record(); torch.cuda.synchronize(); ts.append(s.elapsed_time(e))
    return sorted(ts)[len(ts) // 2]
big = torch.empty(2**28, device=dev); t = bench(lambda: big.clone()); copy_bw = 2 * big.numel() * 4 / t / 1e6
print(f"copy bandwidth {copy_bw:.0f} GB/s")
B, T = 1024, 4096
sets = [(torch.randn(B, T, device=dev), torch.randn(B, T, device=dev), torch.rand(B, T, device=dev) > 0.1) for _ in range(4)]
i = [0]
def run(be, masked=True):
    def f():
        r, v, m = sets[i[0] % 4]; i[0] += 1
        rlhf_ext.gae(r, v, m if masked else None, gamma=0.99, lam=0.95, backend=be)
    return f
for be in ["cuda", "triton"]:
    for masked in [True, False]:
        t = bench(run(be, masked)); nbytes = B * T * (4 + 4 + (1 if masked else 0) + 8)
        print(f"gae {be} masked={masked} {t*1000:.1f} us  {nbytes/t/1e6:.0f} GB/s = {nbytes/t/1e6/copy_bw:.2%} of copy")
r, v, m = sets[0]
def loop():
    lastgaelam = 0; adv = []; nextv = 0.0
    for t in reversed(range(T)):
        nextv = v[:, t + 1] if t < T - 1 else 0.0
        delta = r[:, t] + 0.99 * nextv - v[:, t]
        lastgaelam = delta + 0.99 * 0.95 * lastgaelam
        adv.append(lastgaelam)
    return torch.stack(adv[::-1], 1)
t0 = time.perf_counter(); loop(); torch.cuda.synchronize(); t1 = time.perf_counter()
print(f"python loop {1000*(t1-t0):.1f} ms")
# kernel-only timing: raw op and CUDA graph replay
r, v, m = sets[0]
raw = lambda: torch.ops.rlhf_ext.gae(r, v, m, None, None, None, None, 0.99, 0.95)
t = bench(raw); nbytes = B * T * 17
print(f"raw op {t*1000:.1f} us {nbytes/t/1e6/copy_bw:.2%}")
g = torch.cuda.CUDAGraph()
s_ = torch.cuda.Stream(); s_.wait_stream(torch.cuda.current_stream())
with torch.cuda.stream(s_):
    for _ in range(3): raw()
torch.cuda.current_stream().wait_stream(s_)
with torch.cuda.graph(g):
    for _ in range(10): raw()
t = bench(g.replay) / 10
print(f"graph {t*1000:.1f} us {nbytes/t/1e6:.0f} GB/s {nbytes/t/1e6/copy_bw:.2%}")
for name, (TT, BB) in {"short": (256, 16384), "mid": (1024, 4096)}.items():
    r2 = torch.randn(BB, TT, device=dev); v2 = torch.randn(BB, TT, device=dev); m2 = torch.rand(BB, TT, device=dev) > 0.1
    t = bench(lambda: torch.ops.rlhf_ext.gae(r2, v2, m2, None, None, None, None, 0.99, 0.95))
    print(f"{name} B={BB} T={TT} {t*1000:.1f} us {BB*TT*17/t/1e6/copy_bw:.2%}")
