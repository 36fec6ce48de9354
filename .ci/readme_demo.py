"""Run `pfl demo` and write its output into README.md and docs/getting-started.md, between
``<!-- demo:begin -->`` and ``<!-- demo:end -->``, with the wall time it took.

    python .ci/readme_demo.py                 # runs ./dev demo (about 3-5 min on 2 cores)
    python .ci/readme_demo.py --log FILE      # uses a saved `pfl demo` output instead

The excerpt is what the command printed: the results table, the phase times, the answers and
the audit table (log lines of Flower are left out). Nothing in it is typed by hand.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PAGES = (REPO / "README.md", REPO / "docs" / "getting-started.md")
BLOCK = re.compile(r"<!-- demo:begin -->.*?<!-- demo:end -->", re.S)
#: where the printed results start, and lines of the federation's log to leave out
START = "federation: task "
LOG_LINE = re.compile(r"^(\x1b\[[0-9;]*m)?(INFO|WARNING|DEBUG|ERROR)\b|warnings\.warn|Warning:")


def excerpt(output: str, wall: float | None) -> str:
    text = re.sub(r"\x1b\[[0-9;]*m", "", output)
    if START not in text:
        raise SystemExit("the demo's output has no results table (did it fail?)")
    kept = [line.rstrip() for line in text[text.index(START):].splitlines()
            if not LOG_LINE.search(line)]
    measured = (f"`./dev demo`, measured on this run: {wall:.0f} s wall on "
                f"{_machine()}\n\n") if wall is not None else ""
    return ("<!-- demo:begin -->\n" + measured + "```\n" + "\n".join(kept).strip() + "\n```\n"
            "<!-- demo:end -->")


def _machine() -> str:
    import os

    return f"{os.cpu_count()} cores"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--log", help="a saved `pfl demo` output (default: run ./dev demo)")
    args = parser.parse_args()
    if args.log:
        output, wall = Path(args.log).read_text(), None
    else:
        started = time.perf_counter()
        done = subprocess.run([str(REPO / "dev"), "demo"], cwd=REPO, capture_output=True,
                              text=True)
        wall = time.perf_counter() - started
        if done.returncode != 0:
            sys.stderr.write(done.stdout[-3000:] + done.stderr[-3000:])
            return done.returncode
        output = done.stdout
    block = excerpt(output, wall)
    for page in PAGES:
        text = page.read_text()
        if not BLOCK.search(text):
            raise SystemExit(f"{page}: no <!-- demo:begin --> ... <!-- demo:end --> block")
        page.write_text(BLOCK.sub(lambda _: block, text, count=1))
        print(f"wrote the demo's output into {page.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
