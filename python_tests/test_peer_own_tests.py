"""The peers' own unit tests, run once unpatched and once with ``patch()`` applied (issue 24,
"Proof"): every test that passes unpatched passes patched.

verl 0.9.1's source archive carries its tests; ``make test`` downloads it into
``.venv/peer-wheels`` (``RLHF_EXT_VERL_SDIST`` elsewhere; skipped without it) and this test
extracts ``tests/trainer/ppo/*_on_cpu.py`` (the core algorithms: GAE and the advantage
estimators, the policy and value losses, the loss aggregation, the KL penalties) into a
temporary directory, so that they import the installed verl, and runs them in a fresh
pytest, with ``python_tests/peer_patch_plugin.py`` patching before collection in the second
run. TRL's archives have no tests, and OpenRLHF has no source archive on the index
(docs/integrations.md)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

pytest.importorskip("verl.trainer.ppo.core_algos")

VERL_SDIST = Path(
    os.environ.get("RLHF_EXT_VERL_SDIST", Path(sys.prefix) / "peer-wheels" / "verl-0.9.1.tar.gz")
)
VERL_TESTS = re.compile(r"^verl-0\.9\.1/tests/trainer/ppo/(test_\w+_on_cpu\.py)$")
# verl's tests that need what a --no-deps verl lacks (torchdata, through ray_trainer)
NEEDS_MISSING_DEPENDENCIES = {"test_spec_decode_metrics_on_cpu.py"}
HERE = Path(__file__).resolve().parent


def extract_verl_tests(into: Path) -> list[str]:
    names = []
    with tarfile.open(VERL_SDIST) as archive:
        for member in archive.getmembers():
            match = VERL_TESTS.match(member.name)
            if match and match.group(1) not in NEEDS_MISSING_DEPENDENCIES:
                (into / match.group(1)).write_bytes(archive.extractfile(member).read())
                names.append(match.group(1))
    return sorted(names)


def run_pytest(directory: Path, patched: bool) -> tuple[dict[str, str], str]:
    """{test id: outcome} of a fresh pytest over `directory`, and its output."""
    env = dict(os.environ, RLHF_EXT_QUIET="1")
    env["PYTHONPATH"] = os.pathsep.join([str(HERE), str(HERE.parent), env.get("PYTHONPATH", "")])
    args = [sys.executable, "-m", "pytest", "-q", "-rA", "-p", "no:cacheprovider", str(directory)]
    if patched:
        env["RLHF_EXT_PATCH_PEER"] = "verl"
        args[3:3] = ["-s", "-p", "peer_patch_plugin"]
    done = subprocess.run(args, cwd=directory, env=env, capture_output=True, text=True,
                          timeout=900)  # fmt: skip
    outcomes = {}
    for line in done.stdout.splitlines():
        found = re.match(r"^(PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS) (\S+)", line)
        if found:
            outcomes[found.group(2)] = found.group(1)
    return outcomes, done.stdout + done.stderr


@pytest.mark.skipif(not VERL_SDIST.is_file(), reason=f"verl 0.9.1's sdist is not at {VERL_SDIST}")
def test_verls_own_ppo_tests_pass_patched(tmp_path):
    names = extract_verl_tests(tmp_path)
    assert "test_core_algos_on_cpu.py" in names
    before, before_log = run_pytest(tmp_path, patched=False)
    after, after_log = run_pytest(tmp_path, patched=True)
    assert re.search(r"rlhf_ext patched \d+ verl names", after_log), after_log[-3000:]
    passed = {test for test, outcome in before.items() if outcome == "PASSED"}
    assert len(passed) >= 100, before_log[-3000:]  # 115 in verl 0.9.1
    broken = sorted(test for test in passed if after.get(test) != "PASSED")
    assert not broken, f"pass unpatched, not patched: {broken}\n{after_log[-3000:]}"
