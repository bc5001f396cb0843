"""Show a build's progress as one short line per compiled file; keep the whole log.

``pip install -v ... 2>&1 | python tools/build_progress.py LOG`` (the Makefile's build
step). pip -v streams ninja's output, whose status lines ``[3/24] <compiler command>``
(printed as each file finishes when the output is not a terminal) are a screen long
each; this prints ``[3/24] csrc/cpu/gae.cpp  (0:41)`` for them and one line for the
link, passes compiler errors and setup's own ``rlhf_ext setup:`` notes through, and
writes every line to LOG for when something fails (the Makefile prints LOG's tail then).
"""

from __future__ import annotations

import re
import sys
import time

# "  [3/24] /usr/bin/c++ -MMD ... -c /path/csrc/cpu/gae.cpp -o ..." (ninja's status line).
NINJA_STATUS = re.compile(r"^\s*\[(\d+)/(\d+)\]\s")
SOURCE = re.compile(r"(?:^|\s)(\S*?(csrc/\S+\.(?:cpp|cu)))(?:\s|$)")
PASSED_THROUGH = re.compile(r"rlhf_ext setup:|error|FAILED|Successfully installed", re.I)


def describe(line: str, start: float) -> str | None:
    """The short line to print for one line of build output, or None to keep quiet."""
    elapsed = int(time.monotonic() - start)
    clock = f"{elapsed // 60}:{elapsed % 60:02d}"
    status = NINJA_STATUS.match(line)
    if status:
        source = SOURCE.search(line)
        what = source.group(2) if source else ("link" if " -shared " in line else "step")
        return f"  [{status.group(1)}/{status.group(2)}] {what}  ({clock})"
    if " -shared " in line and ".so" in line:
        return f"  link rlhf_ext._C  ({clock})"
    if PASSED_THROUGH.search(line) and "-Werror" not in line and "warn-spills" not in line:
        return "  " + line.strip()[:200]
    return None


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: ... | python tools/build_progress.py LOG", file=sys.stderr)
        return 2
    start = time.monotonic()
    with open(argv[0], "w") as log:
        for line in sys.stdin:
            log.write(line)
            log.flush()  # a build that hangs or is killed leaves its whole log
            short = describe(line, start)
            if short is not None:
                print(short, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
