"""rlhf_ext.integrations.trl against the installed TRL's own functions (the `peers` extra
installs TRL 1.16; `make test` installs it). Values and gradients within float32 tolerance,
masks with holes, patch() through TRL's own callers, unpatch() restoring TRL exactly.

TRL 1.13 removed the PPO trainer whose masked statistics the adapter also replaces. Those
targets are tested against TRL 1.12.0 itself: its wheel (``make test`` downloads it into
``.venv/peer-wheels``; ``RLHF_EXT_TRL112_WHEEL`` elsewhere; skipped without it), whose
``masked_mean`` / ``masked_var`` / ``masked_whiten`` are cut out of the source with ``ast``,
and which a fresh interpreter imports to run patch() on it."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
trl_utils = pytest.importorskip("trl.trainer.utils")

from rlhf_ext.integrations import trl as adapter  # noqa: E402
from rlhf_ext.integrations._patch import Patcher, Target, VersionRange  # noqa: E402

TOL = dict(rtol=1e-5, atol=1e-5)


TRL112_WHEEL = Path(
    os.environ.get(
        "RLHF_EXT_TRL112_WHEEL", Path(sys.prefix) / "peer-wheels" / "trl-1.12.0-py3-none-any.whl"
    )
)
PPO_SOURCE = "trl/experimental/ppo/ppo_trainer.py"


def _ppo_module():
    """The installed TRL's PPO trainer module (TRL <= 1.12), else None."""
    try:
        import trl.experimental.ppo.ppo_trainer as ppo
    except ImportError:
        return None
    return ppo


def _ppo_functions_of_trl112():
    """TRL 1.12.0's masked_mean / masked_var / masked_whiten, cut verbatim from its wheel
    and exec'd with torch (they use nothing else), as a namespace."""
    with zipfile.ZipFile(TRL112_WHEEL) as wheel:
        source = wheel.read(PPO_SOURCE).decode()
    wanted = ("masked_mean", "masked_var", "masked_whiten")
    body = [n for n in ast.parse(source).body if getattr(n, "name", None) in wanted]
    assert len(body) == 3, "TRL 1.12.0's ppo_trainer.py changed shape"
    namespace = {"torch": torch}
    module = ast.fix_missing_locations(ast.Module(body=body, type_ignores=[]))
    exec(compile(module, f"<trl 1.12.0 {PPO_SOURCE}>", "exec"), namespace)
    return type("TRL112PPO", (), {name: staticmethod(namespace[name]) for name in wanted})


def _logits(shape, dtype=torch.float32, requires_grad=True):
    logits = (torch.randn(shape) * 3).to(dtype)
    return logits.requires_grad_(requires_grad)


def _holey_mask(shape):
    mask = torch.rand(shape) > 0.3
    mask.view(-1)[0] = True
    mask.view(-1)[-1] = False
    return mask


def _values_and_grads(fn, logits, *args, seed=0):
    """fn's output and the gradient of a random (seeded, so repeatable) weighting of it."""
    out = fn(logits, *args)
    upstream = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed))
    (grad,) = torch.autograd.grad((out.float() * upstream).sum(), logits)
    return out, grad


@pytest.mark.parametrize("index_shape", ["per_token", "top_k"])
def test_selective_log_softmax_matches_trl(index_shape):
    batch, length, vocab = 3, 7, 53
    logits = _logits((batch, length, vocab))
    if index_shape == "per_token":
        index = torch.randint(0, vocab, (batch, length))
    else:
        index = torch.randint(0, vocab, (batch, length, 4))
    ours, our_grad = _values_and_grads(adapter.selective_log_softmax, logits, index)
    theirs, their_grad = _values_and_grads(trl_utils.selective_log_softmax, logits, index)
    assert ours.shape == theirs.shape and ours.dtype == theirs.dtype
    torch.testing.assert_close(ours, theirs, **TOL)
    torch.testing.assert_close(our_grad, their_grad, **TOL)


def test_selective_log_softmax_bf16_dtype_and_accuracy():
    logits = _logits((2, 5, 40), torch.bfloat16, requires_grad=False)
    index = torch.randint(0, 40, (2, 5))
    ours = adapter.selective_log_softmax(logits, index)
    theirs = trl_utils.selective_log_softmax(logits, index)
    exact = torch.log_softmax(logits.double(), -1).gather(-1, index.unsqueeze(-1)).squeeze(-1)
    assert ours.dtype == theirs.dtype == torch.bfloat16
    our_error = (ours.double() - exact).abs().max()
    their_error = (theirs.double() - exact).abs().max()
    assert our_error <= 2 * their_error + 1e-2


def test_selective_log_softmax_temperature_and_row_mask():
    """TRL >= 1.16's arguments, against the formula TRL documents for them."""
    logits = _logits((2, 6, 30))
    index = torch.randint(0, 30, (2, 6))
    row_mask = _holey_mask((2, 6))
    ours = adapter.selective_log_softmax(logits, index, temperature=0.7, row_mask=row_mask)
    expected = torch.log_softmax(logits / 0.7, -1).gather(-1, index.unsqueeze(-1)).squeeze(-1)
    expected = expected.masked_fill(~row_mask, 0.0)
    torch.testing.assert_close(ours, expected, **TOL)
    with pytest.raises(ValueError, match="selective_log_softmax: `temperature`"):
        adapter.selective_log_softmax(logits, index, temperature=0.0)


def test_selective_log_softmax_and_entropy_matches_trls_formula():
    """TRL 1.16's selective_log_softmax_and_entropy (absent from older TRL: compared with
    the formula of its path without the CUDA kernel; test_integrations_trl_grpo.py runs it
    against TRL 1.16's own code): values, gradients, row mask, entropy_requires_grad."""
    logits = _logits((2, 6, 30))
    index = torch.randint(0, 30, (2, 6))
    row_mask = _holey_mask((2, 6))
    upstream = torch.randn(2, 6), torch.randn(2, 6)

    def ours(x):
        return adapter.selective_log_softmax_and_entropy(x, index, True, 0.7, row_mask)

    def theirs(x):
        logp = torch.log_softmax(x / 0.7, -1)
        picked = logp.gather(-1, index.unsqueeze(-1)).squeeze(-1)
        entropy = -(logp.exp() * logp).sum(-1)
        return picked.masked_fill(~row_mask, 0.0), entropy.masked_fill(~row_mask, 0.0)

    results = []
    for fn in (ours, theirs):
        x = logits.detach().clone().requires_grad_()
        lp, ent = fn(x)
        (lp * upstream[0] + ent * upstream[1]).sum().backward()
        results.append((lp, ent, x.grad))
    for a, b in zip(*results, strict=True):
        assert a.dtype == b.dtype
        torch.testing.assert_close(a, b, **TOL)
    x = logits.detach().clone().requires_grad_()
    lp, ent = adapter.selective_log_softmax_and_entropy(x, index, False)
    assert lp.requires_grad and not ent.requires_grad
    with pytest.raises(ValueError, match="selective_log_softmax_and_entropy: `index` must"):
        adapter.selective_log_softmax_and_entropy(logits, index[:, :2])


def test_entropy_from_logits_matches_trl():
    logits = _logits((4, 5, 37))
    ours, our_grad = _values_and_grads(adapter.entropy_from_logits, logits)
    theirs, their_grad = _values_and_grads(trl_utils.entropy_from_logits, logits)
    torch.testing.assert_close(ours, theirs, **TOL)
    torch.testing.assert_close(our_grad, their_grad, **TOL)
    with pytest.raises(ValueError, match="entropy_from_logits: `chunk_size`"):
        adapter.entropy_from_logits(logits, chunk_size=0)


@pytest.fixture
def ppo():
    """TRL's PPO masked statistics: the installed TRL's, else TRL 1.12.0's from its wheel."""
    module = _ppo_module()
    if module is not None:
        return module
    if not TRL112_WHEEL.is_file():
        pytest.skip(f"the installed TRL has no PPO trainer and TRL 1.12.0's wheel is not at "
                    f"{TRL112_WHEEL}")  # fmt: skip
    return _ppo_functions_of_trl112()


@pytest.mark.parametrize("axis", [None, 1])
def test_masked_mean_matches_trl_ppo(ppo, axis):
    values = torch.randn(6, 11, dtype=torch.float32, requires_grad=True)
    mask = _holey_mask((6, 11))
    mask[:, 0] = True  # no empty row: TRL gives NaN there
    ours = adapter.masked_mean(values, mask, axis)
    theirs = ppo.masked_mean(values, mask, axis)
    torch.testing.assert_close(ours, theirs, **TOL)
    (our_grad,) = torch.autograd.grad(ours.sum(), values)
    (their_grad,) = torch.autograd.grad(theirs.sum(), values)
    torch.testing.assert_close(our_grad, their_grad, **TOL)


@pytest.mark.parametrize("unbiased", [True, False])
def test_masked_var_matches_trl_ppo(ppo, unbiased):
    values = torch.randn(5, 9) * 2 + 1
    mask = _holey_mask((5, 9))
    torch.testing.assert_close(
        adapter.masked_var(values, mask, unbiased), ppo.masked_var(values, mask, unbiased), **TOL
    )
    with pytest.raises(ValueError, match="masked_var: `mask` keeps 1"):
        adapter.masked_var(values, torch.zeros_like(mask).index_fill_(1, torch.tensor([0]), 1)[:1])


@pytest.mark.parametrize("shift_mean", [True, False])
def test_masked_whiten_matches_trl_ppo(ppo, shift_mean):
    values = torch.randn(7, 13) * 3 + 2
    mask = _holey_mask((7, 13))
    ours = adapter.masked_whiten(values, mask, shift_mean)
    theirs = ppo.masked_whiten(values, mask, shift_mean)
    torch.testing.assert_close(ours, theirs, **TOL)


@pytest.fixture
def patched():
    replaced = adapter.patch()
    yield replaced
    adapter.unpatch()


def test_patch_reports_and_replaces_every_binding(patched):
    assert "trl.trainer.utils.selective_log_softmax" in patched
    assert "trl.trainer.utils.entropy_from_logits" in patched
    assert trl_utils.selective_log_softmax is adapter.selective_log_softmax
    assert adapter.patch() == patched  # idempotent
    ppo = _ppo_module()
    if ppo is not None:
        assert "trl.experimental.ppo.ppo_trainer.selective_log_softmax" in patched
        assert ppo.selective_log_softmax is adapter.selective_log_softmax
        assert ppo.masked_whiten is adapter.masked_whiten


def _trl_caller():
    """(module, loss of (logits, labels)): a TRL function that calls selective_log_softmax
    by the name it imported. TRL 1.16: SDPO's sampled-token distillation loss (student
    logits against a fixed teacher); TRL 1.12: SFT's DFT loss."""
    import importlib

    try:
        sdpo = importlib.import_module("trl.experimental.sdpo.loss_utils")
    except ImportError:
        from types import SimpleNamespace

        from trl.trainer import sft_trainer

        return sft_trainer, lambda logits, labels: sft_trainer.dft_loss(
            SimpleNamespace(logits=logits), labels.clone()
        )
    teacher = torch.randn(3, 8, 29, generator=torch.Generator().manual_seed(5))

    def loss(logits, labels):
        per_token = sdpo.compute_sampled_token_self_distillation_loss(
            logits, teacher, labels.clamp(min=0), distillation_alpha=1.0
        )
        return (per_token * (labels != -100)).sum()

    return sdpo, loss


def test_trl_callers_give_the_same_results_after_patch():
    """A TRL function that calls selective_log_softmax by the name it imported (_trl_caller);
    patched, it must give the same loss and gradient as before."""
    module, loss_of = _trl_caller()
    logits = _logits((3, 8, 29))
    labels = torch.randint(0, 29, (3, 8))
    labels[0, 5:] = -100

    def loss_and_grad():
        loss = loss_of(logits, labels)
        (grad,) = torch.autograd.grad(loss, logits)
        return loss, grad

    before = loss_and_grad()
    replaced = adapter.patch()
    try:
        assert f"{module.__name__}.selective_log_softmax" in replaced
        assert module.selective_log_softmax is adapter.selective_log_softmax
        after = loss_and_grad()
    finally:
        adapter.unpatch()
    torch.testing.assert_close(after[0], before[0], **TOL)
    torch.testing.assert_close(after[1], before[1], **TOL)


def test_unpatch_restores_trl_exactly():
    originals = {
        "selective_log_softmax": trl_utils.selective_log_softmax,
        "entropy_from_logits": trl_utils.entropy_from_logits,
    }
    replaced = adapter.patch()
    restored = adapter.unpatch()
    assert set(replaced) <= set(restored)
    for name, function in originals.items():
        assert getattr(trl_utils, name) is function
    assert (
        adapter.original("trl.trainer.utils.entropy_from_logits")
        is originals["entropy_from_logits"]
    )
    assert adapter.unpatch() == []


def test_patch_without_the_peer_names_the_package():
    targets = [Target("no_such_peer_pkg", "f", None)]
    missing = Patcher("no_such_peer_pkg", "no-such-peer", targets, VersionRange("1", "2"))
    with pytest.raises(ImportError, match=r"caller: the `no-such-peer` package is not installed"):
        missing.patch("caller")


PATCH_ON_TRL112 = """
import json, sys, torch
sys.path.insert(0, sys.argv[1])  # the wheel itself: a zip on sys.path
import trl
import trl.experimental.ppo.ppo_trainer as ppo
originals = (ppo.masked_mean, ppo.masked_var, ppo.masked_whiten, ppo.selective_log_softmax)
from rlhf_ext.integrations import trl as adapter
names = adapter.patch()
values = torch.randn(4, 9) * 2 + 1
mask = torch.rand(4, 9) > 0.3
mask[:, 0] = True
logits, labels = torch.randn(2, 5, 11), torch.randint(0, 11, (2, 5))
close = [
    bool(torch.allclose(ppo.masked_mean(values, mask), originals[0](values, mask), atol=1e-6)),
    bool(torch.allclose(ppo.masked_var(values, mask), originals[1](values, mask), atol=1e-5)),
    bool(torch.allclose(ppo.masked_whiten(values, mask), originals[2](values, mask), atol=1e-5)),
    bool(torch.allclose(ppo.selective_log_softmax(logits, labels),
                        originals[3](logits, labels), atol=1e-5)),
]
print(json.dumps({"version": trl.__version__, "names": names, "close": close}))
"""


@pytest.mark.skipif(not TRL112_WHEEL.is_file(), reason=f"no TRL 1.12.0 wheel at {TRL112_WHEEL}")
def test_patch_on_trl_112_itself():
    """The PPO-era targets on TRL 1.12.0 (imported from its wheel in a fresh interpreter):
    patch() replaces the PPO trainer's masked statistics and its selective_log_softmax
    binding, which agree with TRL's own."""
    env = dict(os.environ, TRL_EXPERIMENTAL_SILENCE="1", RLHF_EXT_QUIET="1")
    root = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join([root, env.get("PYTHONPATH", "")])
    done = subprocess.run(
        [sys.executable, "-c", PATCH_ON_TRL112, str(TRL112_WHEEL)],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["version"] == "1.12.0"
    for name in ("masked_mean", "masked_var", "masked_whiten", "selective_log_softmax"):
        assert f"trl.experimental.ppo.ppo_trainer.{name}" in result["names"]
    assert result["close"] == [True] * 4
