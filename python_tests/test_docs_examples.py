"""Every code block in README.md and docs/*.md works as written (docs that drift fail here).

- ```python blocks run, each in a fresh interpreter in an empty folder (a block may patch a
  peer or write files), within a time limit;
- ```json blocks parse;
- ```bash blocks: each ``python -m rlhf_ext`` / ``rlhf-ext`` command names a subcommand
  that exists and only options that subcommand takes, each ``make`` target exists in the
  Makefile, each ``.venv/bin/python -m pytest`` path exists;
- a block that cannot run as written (an excerpt of the sources with ``...`` in it, a line
  from inside a peer's trainer) carries ``<!-- not run: why -->`` on the line above its
  fence, and one that needs a peer installed ``<!-- requires: trl -->``; blocks in other
  languages (C++ excerpts, diagrams) are not code to run.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
CHECKED_LANGUAGES = ("python", "json", "bash")
FENCE = re.compile(r"^```(\w*)\s*$")
MARKER = re.compile(r"<!--\s*(not run|requires):\s*(.*?)\s*-->")
# the slowest block (docs/trainer.md's example) takes ~40 s on a loaded 2-core machine
BLOCK_TIMEOUT_S = 300
SCORE_LINE = re.compile(r"score (-?[\d.]+) -> (-?[\d.]+)")


@dataclass
class Block:
    path: Path
    line: int  # of the opening fence, 1-based
    language: str
    text: str
    not_run: str | None  # the reason, when marked
    requires: list[str]

    @property
    def name(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"


def collect_blocks() -> list[Block]:
    blocks = []
    for path in DOCS:
        lines = path.read_text().splitlines()
        i = 0
        while i < len(lines):
            opening = FENCE.match(lines[i])
            if not opening:
                i += 1
                continue
            end = next(j for j in range(i + 1, len(lines)) if lines[j].startswith("```"))
            markers = dict(MARKER.findall(lines[i - 1])) if i else {}
            requires = markers.get("requires", "").replace(",", " ").split()
            text = "\n".join(lines[i + 1 : end]) + "\n"
            blocks.append(
                Block(path, i + 1, opening.group(1), text, markers.get("not run"), requires)
            )
            i = end + 1
    return blocks


BLOCKS = collect_blocks()
CHECKED = [b for b in BLOCKS if b.language in CHECKED_LANGUAGES and b.not_run is None]
EXCERPT = re.compile(r"an excerpt of (\S+)")


def _skip_unless_installed(block: Block) -> None:
    for module in block.requires:
        if importlib.util.find_spec(module) is None:
            pytest.skip(f"needs {module}, which is not installed")


def test_every_block_not_run_says_why():
    """A ``not run`` marker needs a reason, and an excerpt names a file that exists."""
    for block in BLOCKS:
        if block.not_run is None:
            continue
        assert block.not_run, f"{block.name}: `not run` needs a reason"
        excerpt = EXCERPT.search(block.not_run)
        if excerpt:
            assert (ROOT / excerpt.group(1)).is_file(), f"{block.name}: no {excerpt.group(1)}"
    assert any(b.language == "python" for b in CHECKED)


def test_the_command_check_catches_a_wrong_option():
    """The bash check below fails on a misspelt option, subcommand or make target."""
    good = Block(ROOT / "README.md", 0, "bash", "python -m rlhf_ext demo --seeds 0 1\n", None, [])
    test_bash_block_commands_exist(good)
    for text in (
        "python -m rlhf_ext demo --sedes 0\n",
        "rlhf-ext trian --config x\n",
        "python -m rlhf_ext bench gae --quik\n",
        "make tests\n",
    ):
        with pytest.raises(AssertionError):
            test_bash_block_commands_exist(Block(ROOT / "README.md", 0, "bash", text, None, []))


@pytest.mark.parametrize(
    "block", [b for b in CHECKED if b.language == "python"], ids=lambda b: b.name
)
def test_python_block_runs(block, tmp_path):
    _skip_unless_installed(block)
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    env["RLHF_EXT_QUIET"] = "1"
    result = subprocess.run(
        [sys.executable, "-c", block.text],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=BLOCK_TIMEOUT_S,
    )
    assert result.returncode == 0, f"{block.name} failed:\n{result.stderr[-4000:]}"
    # a training example prints "score <first> -> <last>": it must learn, not only run
    for first, last in SCORE_LINE.findall(result.stdout):
        assert float(last) > float(first) + 0.3, f"{block.name} did not learn:\n{result.stdout}"


@pytest.mark.parametrize(
    "block", [b for b in CHECKED if b.language == "json"], ids=lambda b: b.name
)
def test_json_block_parses(block):
    _skip_unless_installed(block)
    import json

    json.loads(block.text)


class _Captured(Exception):
    pass


def _parser_used_by(fn) -> argparse.ArgumentParser:
    """The parser whose ``parse_args`` ``fn()`` calls first (intercepted: nothing runs)."""
    captured = {}
    original = argparse.ArgumentParser.parse_args

    def capture(self, *args, **kwargs):
        captured["parser"] = self
        raise _Captured

    argparse.ArgumentParser.parse_args = capture
    try:
        fn()
    except _Captured:
        pass
    finally:
        argparse.ArgumentParser.parse_args = original
    return captured["parser"]


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return action.choices


def _options(parser: argparse.ArgumentParser) -> set[str]:
    return {s for a in parser._actions for s in a.option_strings}


def _known_options(args: list[str]) -> set[str]:
    """The options ``python -m rlhf_ext <args>`` accepts (bench: those of the op's
    script, or of plot; ``bench all`` passes its options to every script)."""
    from rlhf_ext import __main__ as cli

    subcommands = _subparsers(_parser_used_by(lambda: cli.main(["info"])))
    assert args[0] in subcommands, f"no subcommand {args[0]!r}"
    if args[0] != "bench":
        return _options(subcommands[args[0]])
    from bench import __main__ as bench

    target = args[1] if len(args) > 1 else "all"
    if target == "plot":
        return _options(_parser_used_by(lambda: bench.main(["plot"])))
    if target in ("all", "list"):
        target = "gae"
    assert target in bench.available_ops(), f"no benchmark {target!r}"
    return _options(_parser_used_by(lambda: bench.run_op(target, [])))


def _commands(text: str) -> list[list[str]]:
    """The shell words of each command line (comments, continuations and usage brackets
    dropped)."""
    commands = []
    for raw in text.replace("\\\n", " ").splitlines():
        line = raw.split(" #", 1)[0].strip()
        if not line or line.startswith("#"):
            continue
        for part in re.split(r"&&|\|\|?|;", line):
            words = shlex.split(part.replace("[", " ").replace("]", " ").replace("|", " "))
            while words and "=" in words[0] and not words[0].startswith("-"):
                words = words[1:]  # VAR=value prefixes
            if words:
                commands.append(words)
    return commands


def _rlhf_ext_args(words: list[str]) -> list[str] | None:
    """The arguments after ``python -m rlhf_ext`` / ``rlhf-ext`` / ``torchrun ... -m
    rlhf_ext`` in ``words``, or None when the command is something else."""
    if words[0] == "rlhf-ext":
        return words[1:]
    for i in range(len(words) - 1):
        if words[i] == "-m" and words[i + 1] == "rlhf_ext":
            return words[i + 2 :]
        if words[i] == "-m" and words[i + 1] == "bench":  # the checkout's python -m bench
            return ["bench", *("gae" if w == "<op>" else w for w in words[i + 2 :])]
    return None


def _make_targets() -> set[str]:
    text = (ROOT / "Makefile").read_text()
    targets = set(re.findall(r"^([\w.-]+):", text, flags=re.M))
    phony = re.search(r"^\.PHONY:(.*)$", text, flags=re.M)
    return targets | set(phony.group(1).split() if phony else [])


@pytest.mark.parametrize(
    "block", [b for b in CHECKED if b.language == "bash"], ids=lambda b: b.name
)
def test_bash_block_commands_exist(block):
    _skip_unless_installed(block)
    targets = _make_targets()
    for words in _commands(block.text):
        args = _rlhf_ext_args(words)
        if args is not None:
            if not args or args[0].startswith("-"):
                continue  # --help / --version
            known = _known_options(args)
            for word in args[1:]:
                flag = word.split("=", 1)[0]
                if flag.startswith("--"):
                    assert flag in known, f"{block.name}: `{' '.join(args[:2])}` has no {flag}"
        elif words[0] == "make":
            for target in (w for w in words[1:] if not w.startswith("-") and "=" not in w):
                assert target in targets, f"{block.name}: no make target {target!r}"
        elif "pytest" in words:
            for path in (w for w in words if w.startswith("python_tests/")):
                assert (ROOT / path.split("::")[0]).exists(), f"{block.name}: no {path}"


def test_trainer_md_lists_every_ppo_config_field_with_its_default():
    """docs/trainer.md's table: one row per PPOConfig field, in order, default as repr."""
    import dataclasses

    from rlhf_ext.trainer import PPOConfig

    text = (ROOT / "docs" / "trainer.md").read_text()
    section = text.split("## Every `PPOConfig` field", 1)[1].split("\n## ", 1)[0]
    rows = re.findall(r"^\| `(\w+)` \| `([^`]*)` \| (.+) \|$", section, flags=re.M)
    documented = [(name, default) for name, default, _ in rows]
    expected = []
    for f in dataclasses.fields(PPOConfig):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        expected.append((f.name, repr(default)))
    assert documented == expected
