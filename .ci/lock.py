"""The lock file behind ./dev: every package it installs, pinned, with its sha256.

    python .ci/lock.py write REPORT.json [REPORT.json ...] > requirements.lock
        one line per package that pip's install reports (``pip install --dry-run --report``)
        resolved, with the hash of the exact file pip chose (the project itself left out)
    python .ci/lock.py extra requirements.lock < pip-freeze.txt
        the installed distributions (``pip freeze`` lines) that the lock does not name, one a
        line: what ./dev uninstalls so that the environment is exactly the lock
    python .ci/lock.py diff OLD.lock NEW.lock
        what changed between two locks, one package a line ("name old -> new")

Only the standard library: it runs before anything is installed.
"""

from __future__ import annotations

import json
import re
import sys
from datetime import date

PROJECT = "pfl"  # installed editable from the checkout, not from the lock
HEADER = """\
# Every package ./dev installs, pinned with the sha256 of the exact file (CPython 3.11,
# Linux x86_64). pip installs it with --require-hashes --no-deps, so a fresh machine gets the
# set the suite passed on. pyproject.toml keeps the compatible ranges for people who install
# the package into their own environment.
# Refresh: ./dev lock (resolve the newest versions pyproject.toml allows, run the suite on
# them in .venv-upgrade, write this file only when it passes). Written {today}.
"""


def normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def write(reports: list[str]) -> str:
    pins: dict[str, tuple[str, str, str]] = {}
    for path in reports:
        with open(path, encoding="utf-8") as handle:
            report = json.load(handle)
        for item in report["install"]:
            name, version = item["metadata"]["name"], item["metadata"]["version"]
            if normalize(name) == PROJECT:
                continue
            hashes = (item["download_info"].get("archive_info") or {}).get("hashes") or {}
            if "sha256" not in hashes:
                raise SystemExit(f"lock: {name} {version} has no sha256 in {path} "
                                 "(a VCS or directory requirement cannot be locked)")
            key = normalize(name)
            if key in pins and pins[key][1] != version:
                raise SystemExit(f"lock: {name} resolved to {pins[key][1]} and {version}")
            pins[key] = (name, version, hashes["sha256"])
    lines = [HEADER.format(today=date.today().isoformat())]
    for key in sorted(pins):
        name, version, sha = pins[key]
        lines.append(f"{key}=={version} \\\n    --hash=sha256:{sha}\n")
    return "".join(lines)


def read(path: str) -> dict[str, str]:
    """{normalized name: version} of a lock file."""
    with open(path, encoding="utf-8") as handle:
        text = handle.read()
    return {normalize(name): version
            for name, version in re.findall(r"^([A-Za-z0-9][\w.-]*)==(\S+)", text, re.M)}


def extra(lock: str, freeze: str) -> list[str]:
    locked = read(lock)
    names = []
    for line in freeze.splitlines():
        match = re.match(r"^([A-Za-z0-9][\w.-]*)\s*(==|@)", line)
        if match and normalize(match.group(1)) not in locked | {PROJECT: ""}:
            names.append(match.group(1))
    return names


def diff(old: str, new: str) -> list[str]:
    before, after = read(old), read(new)
    return [f"{name} {before.get(name, '-')} -> {after.get(name, '-')}"
            for name in sorted(before.keys() | after.keys())
            if before.get(name) != after.get(name)]


def main(argv: list[str]) -> int:
    if len(argv) >= 2 and argv[0] == "write":
        sys.stdout.write(write(argv[1:]))
    elif len(argv) == 2 and argv[0] == "extra":
        print("\n".join(extra(argv[1], sys.stdin.read())))
    elif len(argv) == 3 and argv[0] == "diff":
        print("\n".join(diff(argv[1], argv[2])) or "no change")
    else:
        print(__doc__, file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
