"""The benchmarks ship in the wheel as rlhf_ext.bench (issue 20, item 4).

A pure-Python wheel is built from this checkout and unpacked into a temporary folder; then
``python -m rlhf_ext bench gae`` runs from a fresh directory with only that folder and
torch's site-packages on the path (``python -S``: no editable-install finder, so nothing
comes from the checkout). It must print its table, write its CSV under that directory, and
leave the checkout's bench/results/ and rlhf_ext/ untouched. The other tests here are fast
checks of the two names (``bench`` in a checkout, ``rlhf_ext.bench`` installed), the results
location and the plot's reading of the CSV rows.
"""

from __future__ import annotations

import csv
import os
import re
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest
import torch

from bench import harness, plot
from bench.__main__ import available_ops

ROOT = Path(__file__).resolve().parents[1]
WATCHED = ("bench/results", "rlhf_ext")  # what a benchmark run must never write into


def _run(cmd, cwd, env=None, timeout=240):
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def _git_status(*paths: str) -> set[str]:
    """The checkout's changed, untracked and ignored files under `paths` (empty set without
    git), ignoring __pycache__."""
    try:
        done = _run(
            ["git", "status", "--porcelain", "--untracked-files=all", "--ignored", "--", *paths],
            ROOT,
        )
    except (OSError, subprocess.SubprocessError):
        return set()
    return {line for line in done.stdout.splitlines() if "__pycache__" not in line}


def _stamps(folder: Path) -> dict[str, tuple[int, int]]:
    return {str(p): (p.stat().st_mtime_ns, p.stat().st_size) for p in folder.rglob("*.csv")}


def _copy_sources(target: Path) -> Path:
    """What a wheel is built from (no compiled files, no results, no caches)."""
    import shutil

    target.mkdir()
    for name in ("setup.py", "pyproject.toml", "README.md", "LICENSE"):
        shutil.copy2(ROOT / name, target / name)
    skip = shutil.ignore_patterns("*.so", "__pycache__", "results")
    for folder in ("rlhf_ext", "bench"):
        shutil.copytree(ROOT / folder, target / folder, ignore=skip)
    return target


@pytest.mark.timeout(300)
def test_wheel_runs_bench_outside_the_checkout(tmp_path):
    wheels, site, cwd = tmp_path / "wheels", tmp_path / "site", tmp_path / "cwd"
    cwd.mkdir()
    env = {**os.environ, "RLHF_EXT_NO_EXT": "1"}
    # Built from a copy: a build in the checkout leaves rlhf_ext.egg-info there, whose
    # (pure-Python) metadata would then shadow the editable install's.
    source = _copy_sources(tmp_path / "src")
    built = _run(
        [sys.executable, "-m", "pip", "wheel", "--no-build-isolation", "--no-deps", "-q",
         "-w", str(wheels), str(source)],
        source, env=env,
    )  # fmt: skip
    assert built.returncode == 0, built.stdout + built.stderr
    (wheel,) = wheels.glob("rlhf_ext-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        archive.extractall(site)
    shipped = {n for n in names if n.startswith("rlhf_ext/bench/")}
    assert {"rlhf_ext/bench/__main__.py", "rlhf_ext/bench/harness.py",
            "rlhf_ext/bench/peers.py", "rlhf_ext/bench/plot.py"} <= shipped  # fmt: skip
    assert {f"rlhf_ext/bench/bench_{op}.py" for op in available_ops()} <= shipped
    assert not any(n.startswith(("bench/", "python_tests/")) for n in names), names
    for name in shipped:  # in the wheel there is no top-level bench or python_tests
        text = (site / name).read_text()
        assert not re.search(r"^\s*(from|import) (bench|python_tests)\b", text, re.M), name

    before, stamps = _git_status(*WATCHED), _stamps(ROOT / "bench" / "results")
    clean = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    purelib = sysconfig.get_paths()["purelib"]  # torch and its dependencies
    clean.update(PYTHONPATH=os.pathsep.join([str(site), purelib]), RLHF_EXT_QUIET="1")
    code = (
        "import runpy, sys, rlhf_ext.bench; print('bench from', rlhf_ext.bench.__file__); "
        "sys.argv = ['rlhf_ext'] + sys.argv[1:]; runpy.run_module('rlhf_ext', run_name='__main__')"
    )
    # The fastest run: --quick on CPU, one tiny shape (the copy-bandwidth probe dominates).
    args = ["bench", "gae", "--quick", "--device", "cpu", "--shapes", "8x16"]
    done = _run([sys.executable, "-S", "-c", code, *args], cwd, env=clean)
    out = done.stdout + done.stderr
    assert done.returncode == 0, out
    assert f"bench from {site / 'rlhf_ext' / 'bench' / '__init__.py'}" in done.stdout, out
    assert "op: gae" in done.stdout and "python loop (TRL)" in done.stdout, out
    (written,) = (cwd / "bench-results").glob("*.csv")
    assert f"rows to {written.resolve()}" in done.stdout, out
    with written.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert rows and {r["op"] for r in rows} == {"gae"} and rows[0]["shape"] == "8x16"
    assert not list((site / "rlhf_ext").rglob("*.csv")), "wrote into the installed package"
    assert _git_status(*WATCHED) <= before, "a bench run wrote into the checkout"
    assert _stamps(ROOT / "bench" / "results") == stamps, "a committed CSV changed"


@pytest.mark.timeout(120)
def test_both_names_list_the_same_ops(tmp_path):
    """``python -m bench`` (checkout) and ``python -m rlhf_ext bench`` (installed, or the
    checkout through the editable install) find the same scripts and name themselves."""
    here = _run([sys.executable, "-m", "bench", "list"], ROOT)
    assert here.returncode == 0, here.stderr
    assert here.stdout.split() == available_ops() and "gae" in available_ops()
    usage = _run([sys.executable, "-m", "bench", "--help"], ROOT)
    assert usage.stdout.startswith("usage: python -m bench {list | all | plot | <op>}")
    env = {**os.environ, "RLHF_EXT_QUIET": "1"}
    installed = _run([sys.executable, "-m", "rlhf_ext", "bench", "--help"], tmp_path, env=env)
    assert installed.returncode == 0, installed.stderr
    lines = installed.stdout.splitlines()
    assert lines[0].startswith("usage: python -m rlhf_ext bench {list | all | plot | <op>}")
    assert lines[1] == "ops: " + ", ".join(available_ops())


def test_results_go_under_the_current_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    runner = harness.Runner.__new__(harness.Runner)  # no bandwidth probe: only the paths
    runner.device = torch.device("cpu")
    name = f"{harness.device_slug(runner.device)}.csv"
    assert runner.csv_path() == tmp_path / "bench-results" / name
    assert runner.csv_path(results_dir=tmp_path / "elsewhere") == tmp_path / "elsewhere" / name
    assert runner.csv_path(tmp_path / "x.csv", tmp_path / "elsewhere") == tmp_path / "x.csv"
    assert not hasattr(harness, "RESULTS_DIR")  # the package folder is no default any more
    args = harness.parse_args("gae", ["--results-dir", "out"])
    assert args.results_dir == Path("out") and args.csv is None
    with pytest.raises(SystemExit):  # one or the other
        harness.parse_args("gae", ["--results-dir", "out", "--csv", "x.csv"])


def test_plot_splits_modes_and_finds_the_floor():
    def row(impl, baseline, ms):
        return {"impl": impl, "baseline": baseline, "shape": "8x16x32", "median_ms": ms}

    rows = [
        row("GEMM floor fwd", "GEMM floor fwd", "2"),  # the name of the committed rows
        row("rlhf_ext[cpu] fwd", "eager fwd", "3"),
        row("eager fwd", "eager fwd", "4"),
        row("rlhf_ext[cpu] fwd+bwd", "eager fwd+bwd", "5"),
        row("eager fwd+bwd", "eager fwd+bwd", "6"),
    ]
    split = plot.split_modes(rows)
    assert [(mode, name) for mode, name, _ in split] == [
        ("fwd", "GEMMs alone"), ("fwd", "rlhf_ext[cpu]"), ("fwd", "eager"),
        ("fwd+bwd", "rlhf_ext[cpu]"), ("fwd+bwd", "eager"),
    ]  # fmt: skip
    kinds = [plot.category(name, r, r["baseline"] if "eager" in r["impl"] else "eager fwd")
             for _, name, r in split]  # fmt: skip
    assert kinds[:3] == ["floor", "ours", "baseline"]
    assert plot.split_modes([row("python loop (TRL)", "python loop (TRL)", "1")])[0][0] == ""
    assert plot.format_ms(0.0123) == "12.3 us" and plot.format_ms(1530) == "1.53 s"
    assert plot.format_speed(10, 2) == "(5x faster)" and plot.format_speed(2, 4) == "(2x slower)"


def test_plot_draws_a_memory_benchmark_in_one_figure_per_device(tmp_path):
    pytest.importorskip("matplotlib")
    columns = list(harness.Row.__dataclass_fields__)
    lines = [",".join(columns)]
    for impl, dtype, mib in (("plain", "float32", 1800), ("fused", "float32", 300),
                             ("bf16", "bfloat16", 800)):  # fmt: skip
        row = dict.fromkeys(columns, "")
        row.update(date="2026-12-02T00:00:00", op="trainer_memory", impl=impl, dtype=dtype,
                   device="Some CPU (2 cores)", shape="8x528", median_ms="5000",
                   peak_mem_mib=str(mib), baseline="plain")  # fmt: skip
        lines.append(",".join(row[c] for c in columns))
    (tmp_path / "results.csv").write_text("\n".join(lines) + "\n")
    assert plot.main(["--results-dir", str(tmp_path), "--out", str(tmp_path / "plots")]) == 0
    assert [p.name for p in (tmp_path / "plots").iterdir()] == [
        "trainer-memory-some-cpu-2-cores.png"
    ]
