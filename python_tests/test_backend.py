"""Backend discovery and choice, the `python -m rlhf_ext info` command, and
importing rlhf_ext without its compiled part or without triton (docs/design.md §2.1)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import COMPILED, HAS_CUDA, TRITON_CPU, requires_compiled

import rlhf_ext
from rlhf_ext import _backend

ROOT = Path(__file__).resolve().parents[1]


def run_python(
    code: str, *args: str, env_extra: dict | None = None, timeout=240
) -> subprocess.CompletedProcess:
    """Run `code` in a fresh interpreter that imports this checkout's rlhf_ext."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.pop("RLHF_EXT_QUIET", None)
    env.setdefault("TRITON_INTERPRET", os.environ.get("TRITON_INTERPRET", "0"))
    env.update(env_extra or {})
    return subprocess.run(
        [sys.executable, *args, "-c", textwrap.dedent(code)] if code else [sys.executable, *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=timeout,
    )


def check(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 0, (
        f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    )
    return proc.stdout


# -- in-process --------------------------------------------------------------------


def test_available_backends_cpu():
    backends = rlhf_ext.available_backends("cpu")
    assert "torch" in backends
    assert ("cpu" in backends) == COMPILED
    assert ("triton" in backends) == TRITON_CPU
    if os.environ.get("TRITON_INTERPRET") == "1" and _backend.triton_import_error() is None:
        assert "triton" in backends
    assert "cuda" not in backends
    assert rlhf_ext.available_backends(torch.device("cpu")) == backends
    assert set(rlhf_ext.available_backends()) <= set(_backend.BACKENDS)


def test_auto_backend_choice():
    cpu = torch.device("cpu")
    assert _backend.resolve_backend("op", "auto", cpu) == ("cpu" if COMPILED else "torch")
    if HAS_CUDA:
        assert _backend.resolve_backend("op", "auto", torch.device("cuda")) in (
            "cuda",
            "triton",
            "torch",
        )
    with pytest.raises(ValueError, match=r"op: `backend` must be one of"):
        _backend.resolve_backend("op", "fast", cpu)
    with pytest.raises(
        rlhf_ext.BackendUnavailableError, match=r"op: backend='cuda' is unavailable: .*cpu"
    ):
        _backend.resolve_backend("op", "cuda", cpu)
    assert issubclass(rlhf_ext.BackendUnavailableError, RuntimeError)


@requires_compiled
def test_build_info():
    from rlhf_ext import _C

    info = _C.build_info()
    for key in ("version", "torch_version", "with_cuda", "cuda_archs"):
        assert key in info, key
    assert info["version"] == rlhf_ext.__version__
    assert isinstance(info["with_cuda"], bool)
    assert isinstance(info["cuda_archs"], str)
    # Built against the torch that runs it (the ABI must match).
    assert info["torch_version"].split("+")[0] == torch.__version__.split("+")[0]
    assert rlhf_ext.build_info() == dict(info)


def test_public_api():
    """`rlhf_ext.__all__` is the package's public API, exactly.

    Every name in `__all__` exists on the module, and every callable or class in it has
    a non-empty docstring of its own; `__version__` is a non-empty string. The other way
    round, the public names the package exports are the names in `dir(rlhf_ext)` that do
    not start with `_`, except the package's own submodules (`ops`, `reference`,
    `triton`, `integrations`, `trainer`, ...: modules named `rlhf_ext.<name>`, which
    appear as attributes once something imports them); that set is `__all__` without
    `__version__`. A module from elsewhere (`torch`, say) left in the namespace counts
    as exported, and fails the test.
    """
    import types

    assert len(rlhf_ext.__all__) == len(set(rlhf_ext.__all__)), "duplicates in __all__"
    for name in rlhf_ext.__all__:
        assert hasattr(rlhf_ext, name), f"rlhf_ext.__all__ names {name!r}, which is missing"
        obj = getattr(rlhf_ext, name)
        if callable(obj):  # functions and classes; a class's __doc__ is not inherited
            assert (obj.__doc__ or "").strip(), f"rlhf_ext.{name} has no docstring"
    assert isinstance(rlhf_ext.__version__, str) and rlhf_ext.__version__
    submodules = {
        name
        for name in dir(rlhf_ext)
        if isinstance(getattr(rlhf_ext, name), types.ModuleType)
        and getattr(rlhf_ext, name).__name__ == f"rlhf_ext.{name}"
    }
    exported = {name for name in dir(rlhf_ext) if not name.startswith("_")} - submodules
    assert exported == set(rlhf_ext.__all__) - {"__version__"}
    assert {
        "gae",
        "masked_mean",
        "masked_whiten",
        "kl_shaped_rewards",
        "token_logprobs",
        "available_backends",
        "build_info",
        "BackendUnavailableError",
    } <= exported


# -- command line ------------------------------------------------------------------------


def test_cli_info():
    out = check(run_python("", "-m", "rlhf_ext", "info"))
    assert rlhf_ext.__version__ in out
    assert "torch" in out and torch.__version__ in out
    assert "triton" in out
    lines = {line.split("  ")[0].strip(): line for line in out.splitlines()}
    backends_line = lines.get("backends (cpu tensors)")
    assert backends_line is not None, out
    assert "torch" in backends_line
    if COMPILED:
        assert "cpu" in backends_line.split("  ", 1)[1]
        assert "compiled CPU kernels" in out


# -- degraded installs (fresh interpreters) -----------------------------------------------

HIDE_C_MODULES = "sys.modules['rlhf_ext._C'] = None"
HIDE_C_FINDER = """
import importlib.abc
class _NoCompiled(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == 'rlhf_ext._C':
            raise ImportError('simulated: rlhf_ext._C could not be loaded')
        return None
sys.meta_path.insert(0, _NoCompiled())
"""


@pytest.mark.parametrize("hide", [HIDE_C_MODULES, HIDE_C_FINDER], ids=["sys.modules", "meta_path"])
def test_import_without_compiled_extension(hide):
    code = f"""
import sys, warnings
{hide}
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    import torch
    import rlhf_ext
    from rlhf_ext import reference
    r, v = torch.randn(3, 9), torch.randn(3, 9)
    m = torch.rand(3, 9) > 0.3
    a, ret = rlhf_ext.gae(r, v, m, gamma=0.9, lam=0.8)
    ra, rr = reference.gae(r, v, m, gamma=0.9, lam=0.8)
    assert torch.equal(a, ra) and torch.equal(ret, rr)
    a2, _ = rlhf_ext.gae(r, v, m, gamma=0.9, lam=0.8, backend="auto")
    assert torch.equal(a, a2)
    assert rlhf_ext.masked_mean(r, m).shape == ()
    rlhf_ext.masked_whiten(r, m)
    rlhf_ext.kl_shaped_rewards(r[:, 0], r, v, m, kl_coef=0.1)
    backends = rlhf_ext.available_backends("cpu")
    assert "cpu" not in backends and "torch" in backends, backends
    assert rlhf_ext.build_info() == {{}}
ours = [w for w in caught
        if issubclass(w.category, RuntimeWarning) and "rlhf_ext" in str(w.message)]
assert len(ours) == 1, [str(w.message) for w in caught]
print("WARNING:", ours[0].message)
try:
    rlhf_ext.gae(r, v, backend="cpu")
except rlhf_ext.BackendUnavailableError as error:
    print("ERROR:", error)
else:
    raise SystemExit("backend='cpu' did not raise")
"""
    out = check(run_python(code))
    assert "WARNING: rlhf_ext: compiled kernels unavailable" in out
    error = next(line for line in out.splitlines() if line.startswith("ERROR:"))
    assert "rlhf_ext.gae" in error and "backend='cpu'" in error
    assert "rlhf_ext._C is not built or failed to load" in error


def test_missing_extension_note_says_which_install_it_is():
    error = ImportError("cannot import name '_C' from partially initialized module 'rlhf_ext'")
    pure = _backend.missing_extension_message(error, file_present=False)
    assert "pure-Python install" in pure and "'torch' backend" in pure
    assert "RLHF_EXT_QUIET=1" in pure and "partially initialized" not in pure
    broken = _backend.missing_extension_message(ImportError("undefined symbol: x"), True)
    assert "undefined symbol: x" in broken and "Reinstall" in broken
    assert "RLHF_EXT_QUIET=1" in broken
    assert _backend._extension_file_present() == COMPILED


@requires_compiled
def test_compiled_part_names_its_torch_and_is_stripped():
    """The .so carries the torch it was built against (readable without loading it), the
    install's metadata pins that torch, and a release build has no host debug info."""
    import importlib.metadata
    import shutil

    built = rlhf_ext.build_info()["torch_version"]
    for path in _backend._extension_files():
        assert _backend.built_against_torch(path) == built, path
        if shutil.which("readelf") and os.environ.get("RLHF_EXT_DEBUG") != "1":
            sections = subprocess.run(
                ["readelf", "-S", "-W", path], capture_output=True, text=True
            ).stdout
            assert ".debug_info" not in sections, f"{path} carries debug info"
    requires = importlib.metadata.requires("rlhf_ext") or []
    assert f"torch=={built.split('+')[0]}" in requires, requires


def test_torch_mismatch_note_says_which_torch(monkeypatch, tmp_path):
    """A compiled part that cannot load under this torch (undefined symbols) is named
    with the torch it was built against, read from the marker in its bytes."""
    fake = tmp_path / "_C.cpython-311-x86_64-linux-gnu.so"
    fake.write_bytes(b"\x7fELF junk rlhf_ext-built-against-torch=1.0.0+cpu; more junk")
    assert _backend.built_against_torch(str(fake)) == "1.0.0+cpu"
    unmarked = tmp_path / "_C.other.so"
    unmarked.write_bytes(b"\x7fELF no marker")
    assert _backend.built_against_torch(str(unmarked)) is None
    monkeypatch.setattr(_backend, "_extension_files", lambda: [str(fake)])
    note = _backend.missing_extension_message(ImportError("undefined symbol: _ZN3c10"), True)
    assert "undefined symbol" in note and "compiled against torch 1.0.0+cpu" in note
    assert "install torch==1.0.0" in note and torch.__version__ in note
    # The C++ check's own message already says it: not repeated.
    own = ImportError("rlhf_ext._C was compiled against torch 1.0.0 but this is torch 9")
    assert _backend.missing_extension_message(own, True).count("compiled against") == 1


def test_build_progress_prints_one_short_line_per_file():
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
    try:
        import build_progress
    finally:
        sys.path.pop(0)
    compile_line = (
        "[3/24] /usr/bin/c++ -MMD -MF x.o.d -O3 -I/work/csrc/include "
        "-c /work/main/csrc/cpu/gae.cpp -o /work/build/gae.o -fPIC\n"
    )
    short = build_progress.describe(compile_line, start=0.0)
    assert short.startswith("  [3/24] csrc/cpu/gae.cpp  (")
    link = build_progress.describe("[24/24] c++ a.o b.o -shared -o _C.so\n", start=0.0)
    assert link.startswith("  [24/24] link")
    assert build_progress.describe("  copying rlhf_ext/ops/gae.py\n", start=0.0) is None
    error = build_progress.describe("csrc/cpu/gae.cpp:3:1: error: expected ';'\n", 0.0)
    assert "error: expected" in error


def test_command_line_names_itself_and_has_a_version(capsys, monkeypatch):
    from rlhf_ext.__main__ import main

    with pytest.raises(SystemExit) as exit:
        main(["--version"])
    assert exit.value.code == 0
    assert capsys.readouterr().out.strip() == f"rlhf_ext {rlhf_ext.__version__}"
    monkeypatch.setattr(sys, "argv", ["/usr/bin/rlhf-ext", "--help"])
    with pytest.raises(SystemExit):
        main(["--help"])
    text = capsys.readouterr().out
    assert text.startswith("usage: rlhf-ext ") and "``" not in text


def test_import_without_compiled_extension_quiet():
    code = f"""
import sys, warnings
{HIDE_C_MODULES}
warnings.simplefilter("error", RuntimeWarning)
import rlhf_ext, torch
rlhf_ext.gae(torch.randn(2, 3), torch.randn(2, 3))
print("ok")
"""
    assert "ok" in check(run_python(code, env_extra={"RLHF_EXT_QUIET": "1"}))


@pytest.mark.skipif(not TRITON_CPU, reason="needs triton under the interpreter")
def test_triton_backend_without_compiled_extension():
    code = f"""
import sys
{HIDE_C_MODULES}
import torch, rlhf_ext
from rlhf_ext import reference
r, v = torch.randn(2, 40), torch.randn(2, 40)
a, ret = rlhf_ext.gae(r, v, gamma=0.9, lam=0.8, backend="triton")
ra, rr = reference.gae(r.double(), v.double(), gamma=0.9, lam=0.8)
torch.testing.assert_close(a.double(), ra, rtol=1e-5, atol=1e-5)
print("ok")
"""
    assert "ok" in check(run_python(code, "-W", "ignore", env_extra={"TRITON_INTERPRET": "1"}))


def test_import_without_triton():
    code = """
import sys
sys.modules["triton"] = None
import torch, rlhf_ext
from rlhf_ext import _backend
assert "triton" not in rlhf_ext.available_backends("cpu")
r, v = torch.randn(2, 5), torch.randn(2, 5)
rlhf_ext.gae(r, v)
rlhf_ext.masked_mean(r, None, 1)
try:
    rlhf_ext.gae(r, v, backend="triton")
except rlhf_ext.BackendUnavailableError as error:
    print("ERROR:", error)
else:
    raise SystemExit("backend='triton' did not raise")
import runpy
sys.argv = ["rlhf_ext", "info"]
try:
    runpy.run_module("rlhf_ext", run_name="__main__")
except SystemExit as exit:
    assert exit.code in (0, None), exit.code
"""
    out = check(run_python(code, "-W", "ignore", env_extra={"TRITON_INTERPRET": "1"}))
    error = next(line for line in out.splitlines() if line.startswith("ERROR:"))
    assert (
        "rlhf_ext.gae" in error
        and "backend='triton'" in error
        and "triton is not installed" in error
    )
    assert "backends (cpu tensors)" in out


def test_triton_unavailable_on_cpu_without_interpreter():
    if _backend.triton_import_error() is not None:
        pytest.skip(_backend.triton_import_error())
    code = """
import torch, rlhf_ext
assert "triton" not in rlhf_ext.available_backends("cpu")
try:
    rlhf_ext.masked_mean(torch.randn(3), None, backend="triton")
except rlhf_ext.BackendUnavailableError as error:
    print("ERROR:", error)
"""
    out = check(run_python(code, "-W", "ignore", env_extra={"TRITON_INTERPRET": "0"}))
    if "ERROR:" not in out:
        pytest.skip("triton backend runs on CPU tensors here")
    assert "rlhf_ext.masked_mean" in out and "TRITON_INTERPRET=1" in out


@pytest.mark.cuda
def test_torch_backend_on_cuda_tensors(inputs):
    """The pure-PyTorch backend serves CUDA tensors too, edge shapes included."""
    from rlhf_ext import reference

    for B, T in ((3, 17), (0, 5), (3, 0)):
        r, v = inputs.randn(B, T, device="cuda"), inputs.randn(B, T, device="cuda")
        mask = inputs.mask(B, T, device="cuda")
        adv, ret = rlhf_ext.gae(r, v, mask, gamma=0.9, lam=0.8, backend="torch")
        ref_adv, _ = reference.gae(
            r.cpu().double(), v.cpu().double(), mask.cpu(), gamma=0.9, lam=0.8
        )
        assert adv.is_cuda
        torch.testing.assert_close(adv.cpu().double(), ref_adv, rtol=1e-5, atol=1e-5)
        scores = inputs.randn(B, device="cuda")
        out = rlhf_ext.kl_shaped_rewards(scores, r, v, mask, kl_coef=0.1, kl="k3", backend="torch")
        expected = reference.kl_shaped_rewards(
            scores.cpu(), r.cpu(), v.cpu(), mask.cpu(), kl_coef=0.1, kl="k3"
        )
        assert out.is_cuda and out.shape == (B, T)
        torch.testing.assert_close(out.cpu(), expected)
        if B and T:
            mean = rlhf_ext.masked_mean(r, mask, 1, backend="torch")
            assert mean.is_cuda
            torch.testing.assert_close(mean.cpu(), reference.masked_mean(r.cpu(), mask.cpu(), 1))
