"""README.md and docs/ stay usable: every relative link points at a file of the repository,
README stays short, and the blocks docs/ marks as runnable run (on the tiny model)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PAGES = [REPO / "README.md", REPO / "CONTRIBUTING.md", *sorted((REPO / "docs").glob("*.md"))]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
#: ``<!-- runnable -->`` before a ```bash block: run as written, in a fresh folder
RUNNABLE = re.compile(r"<!-- runnable -->\s*```bash\n(.*?)```", re.S)


def _links(page: Path) -> list[str]:
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)  # code is not a link
    return [m for m in LINK.findall(text)
            if not m.startswith(("http://", "https://", "mailto:", "#"))]


def test_no_dead_relative_link():
    dead = []
    for page in PAGES:
        for link in _links(page):
            target = (page.parent / link.split("#", 1)[0]).resolve()
            if not target.exists() or REPO not in (target, *target.parents):
                dead.append(f"{page.relative_to(REPO)} -> {link}")
    assert not dead, dead


def test_readme_is_short_and_indexes_every_docs_page():
    readme = (REPO / "README.md").read_text()
    assert len(readme.splitlines()) < 300
    linked = {Path(link).name for link in _links(REPO / "README.md")}
    pages = {p.name for p in (REPO / "docs").glob("*.md")}
    assert pages <= linked, sorted(pages - linked)


def _runnable() -> list[tuple[str, str]]:
    out = []
    for page in sorted((REPO / "docs").glob("*.md")):
        for i, body in enumerate(RUNNABLE.findall(page.read_text())):
            out.append((f"{page.name}#{i + 1}", body))
    return out


@pytest.mark.parametrize("name,body", _runnable(), ids=[n for n, _ in _runnable()])
def test_runnable_blocks_run_as_written(name, body, tmp_path):
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}"
           f"{os.environ.get('PATH', '')}", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "PFL_CHECKOUT": str(REPO)}
    done = subprocess.run(["bash", "-euo", "pipefail", "-c", body], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"{name}:\n{body}\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}"


def test_the_configuration_page_is_current():
    from simulations.config_doc import render

    page = (REPO / "docs" / "configuration.md").read_text()
    assert page == render(), "docs/configuration.md is stale: python -m simulations.config_doc"


def test_no_pointer_to_documents_outside_the_repository():
    """The team's design notes are not shipped: code and docs must stand on their own."""
    outside = ("DESIGN" + ".md", "METHODS" + ".md")
    found = [f"{path.relative_to(REPO)}" for folder in ("cloud_server", "edge_client", "shared",
                                                        "simulations", "docs", "tests")
             for path in (REPO / folder).rglob("*") if path.suffix in (".py", ".md", ".toml")
             and any(name in path.read_text(errors="replace") for name in outside)]
    found += [name for name in ("README.md", "CONTRIBUTING.md", "pyproject.toml")
              if any(n in (REPO / name).read_text() for n in outside)]
    assert not found, found
