"""The package's layers depend one way (docs/design.md §2.2): every module imports
on its own in a fresh interpreter, in any order, and nothing under rlhf_ext/triton
imports an ops/<op>.py module."""

from __future__ import annotations

import ast
import os
import pkgutil
import random
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

import rlhf_ext

PACKAGE_DIR = Path(rlhf_ext.__file__).parent


def _modules() -> list[str]:
    names = ["rlhf_ext"]
    names += [info.name for info in pkgutil.walk_packages([str(PACKAGE_DIR)], prefix="rlhf_ext.")]
    return sorted(names)


MODULES = _modules()


def _import_in_fresh_interpreter(names: list[str]) -> subprocess.CompletedProcess:
    code = "import importlib, sys\nfor name in sys.argv[1:]:\n    importlib.import_module(name)\n"
    env = dict(os.environ, RLHF_EXT_QUIET="1")
    return subprocess.run(
        [sys.executable, "-c", code, *names], capture_output=True, text=True, env=env, timeout=300
    )


def _needs_missing_dependency(name: str) -> str | None:
    """Why `name` cannot import here for want of an optional package (triton,
    transformers), or None."""
    import importlib.util

    if ".triton" in name and importlib.util.find_spec("triton") is None:
        return "triton is not installed"
    return None


def test_every_module_imports_alone_in_a_fresh_interpreter():
    """One interpreter per module, so no module leans on another having been imported."""
    names = [n for n in MODULES if not _needs_missing_dependency(n)]
    with ThreadPoolExecutor(max_workers=2) as pool:  # an interpreter each, two at a time
        outcomes = pool.map(lambda n: _import_in_fresh_interpreter([n]), names)
        results = dict(zip(names, outcomes, strict=True))
    failures = [f"{n}:\n{r.stderr[-2000:]}" for n, r in results.items() if r.returncode != 0]
    assert not failures, "\n\n".join(failures)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_all_modules_import_in_any_order(seed):
    names = [n for n in MODULES if not _needs_missing_dependency(n)]
    random.Random(seed).shuffle(names)
    result = _import_in_fresh_interpreter(names)
    assert result.returncode == 0, f"order {names}:\n{result.stderr[-3000:]}"


def _imported_modules(path: Path) -> set[str]:
    """Every module an rlhf_ext source file imports, at any depth (lazy imports too)."""
    tree = ast.parse(path.read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            found |= {f"{node.module}.{alias.name}" for alias in node.names}
    return found


# What the Triton layer may import from the rest of rlhf_ext: its own modules, the
# backend probe and the leaf vocabulary.
TRITON_MAY_IMPORT = ("rlhf_ext.triton", "rlhf_ext._backend", "rlhf_ext.ops._vocab")
# What the leaf modules of ops/ may import from rlhf_ext.
LEAVES = {
    "_vocab.py": (),
    "_registry.py": ("rlhf_ext._backend",),
    "_checks.py": ("rlhf_ext.ops._vocab",),
}


def _rlhf_imports(path: Path) -> set[str]:
    return {m for m in _imported_modules(path) if m.split(".")[0] == "rlhf_ext"}


def test_triton_layer_never_imports_the_ops_layer():
    for path in sorted((PACKAGE_DIR / "triton").glob("*.py")):
        bad = {m for m in _rlhf_imports(path) if not m.startswith(TRITON_MAY_IMPORT)}
        assert not bad, f"{path.name} imports {sorted(bad)}"


@pytest.mark.parametrize("leaf", sorted(LEAVES))
def test_ops_leaf_modules_stay_leaves(leaf):
    imports = _rlhf_imports(PACKAGE_DIR / "ops" / leaf)
    bad = {m for m in imports if not m.startswith(LEAVES[leaf])}
    assert not bad, f"ops/{leaf} imports {sorted(bad)}"


def test_reference_imports_only_the_vocabulary():
    """The oracle stays independent of the kernels it checks."""
    imports = _rlhf_imports(PACKAGE_DIR / "reference.py")
    assert {m for m in imports if not m.startswith("rlhf_ext.ops._vocab")} == set()


def test_triton_loader_registers_once_under_threads():
    """Two threads making the first call of an op's Triton loader register its ops once
    (a second register_autograd on the same op would raise)."""
    import threading

    from rlhf_ext.ops._registry import triton_loader

    calls = []
    barrier = threading.Barrier(4)

    def register(kernels):
        calls.append(kernels)

    load = triton_loader("_common", register) if _triton_here() else None
    if load is None:
        pytest.skip("triton is not installed")

    def first_call():
        barrier.wait()
        load()

    threads = [threading.Thread(target=first_call) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert len(calls) == 1


def _triton_here() -> bool:
    import importlib.util

    return importlib.util.find_spec("triton") is not None
