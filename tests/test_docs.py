"""The documentation site (docs/, mkdocs.yml): every code block marked runnable runs as
written, every page is in the navigation, and every relative link and anchor resolves.

A block is marked by an HTML comment on the line before its fence:

- ``<!-- runnable -->``: a self-contained Python script, run in this process; it makes
  its own Redis (``astages.testing.fake_redis()``) and checks itself with ``assert``.
- ``<!-- runnable: redis -->``: the same, on the real test server, whose URL it gets in
  ``REDIS_URL`` (its database flushed first).
- ``<!-- runnable: pytest -->``: one file of a small test project (its first line,
  ``# name``, names the file); the page's files are run by a separate pytest.

``python3 .ci/dev.py docs`` builds the site itself (``mkdocs build --strict``)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import redis as redis_py
import yaml

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
PAGES = sorted(DOCS.rglob("*.md"))

MARK = re.compile(r"<!--\s*runnable(?::\s*([\w-]+))?\s*-->")
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)
KINDS = ("", "redis", "pytest")


@dataclass(frozen=True)
class Block:
    page: Path
    line: int
    kind: str
    language: str
    code: str

    @property
    def id(self) -> str:
        return f"{self.page.relative_to(DOCS)}:{self.line}"


def blocks(page: Path) -> list[Block]:
    """The runnable blocks of a page; a mark not followed by a code block is an error."""
    text = page.read_text(encoding="utf-8")
    found = []
    for mark in MARK.finditer(text):
        rest = text[mark.end() :]
        fence = FENCE.match(rest.lstrip("\n"))
        line = text.count("\n", 0, mark.start()) + 2
        if fence is None:
            raise AssertionError(f"{page.relative_to(DOCS)}:{line - 1}: a runnable mark with no code block after it")
        found.append(Block(page, line, mark.group(1) or "", fence.group(1), fence.group(2)))
    return found


ALL_BLOCKS = [block for page in PAGES for block in blocks(page)]
SCRIPTS = [b for b in ALL_BLOCKS if b.kind in ("", "redis")]
PROJECTS = sorted({b.page for b in ALL_BLOCKS if b.kind == "pytest"})


def test_marks_are_known_and_scripts_are_python() -> None:
    """Every runnable mark names a known kind, and script blocks are Python."""
    for block in ALL_BLOCKS:
        assert block.kind in KINDS, f"{block.id}: unknown kind {block.kind!r}"
        if block.kind != "pytest":
            assert block.language == "python", f"{block.id}: a runnable script must be a python block"


def test_concept_examples_are_runnable() -> None:
    """The concepts page's examples (callbacks, failure policy, cancel, wait, progress,
    growth) are all marked runnable."""
    text = (DOCS / "concepts.md").read_text(encoding="utf-8")
    for section in ("Callbacks", "Failure policies", "Cancellation", "Waiting", "Progress", "Growth"):
        body = text.split(f"\n## {section}\n", 1)[1].split("\n## ", 1)[0]
        assert MARK.search(body), f"concepts.md '{section}' has no runnable example"


@pytest.mark.parametrize("block", SCRIPTS, ids=[b.id for b in SCRIPTS])
def test_runnable_block(block: Block, request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """The block runs to its end as written (its own asserts hold)."""
    if block.kind == "redis":
        server: Any = request.getfixturevalue("redis_server")
        with redis_py.Redis(host=server.host, port=server.port, db=server.db) as client:
            client.flushdb()
        monkeypatch.setenv("REDIS_URL", server.url)
    namespace = {"__name__": "__docs__"}
    exec(compile(block.code, block.id, "exec"), namespace)


@pytest.mark.parametrize("page", PROJECTS, ids=[str(p.relative_to(DOCS)) for p in PROJECTS])
def test_runnable_test_project(page: Path, tmp_path: Path) -> None:
    """The page's test project (its pytest-marked files, as written) passes in a separate
    pytest, any warning an error."""
    for block in blocks(page):
        if block.kind != "pytest":
            continue
        first, _, body = block.code.partition("\n")
        name = first.removeprefix("#").strip()
        text = block.code
        if name == "pytest.ini":
            text = body + "filterwarnings = error\n"
        (tmp_path / name).write_text(text, encoding="utf-8")
    environment = {k: v for k, v in os.environ.items() if not k.startswith(("ASTAGES_", "PYTEST_"))}
    environment["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), environment.get("PYTHONPATH")]))
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tmp_path)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        env=environment,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert " passed" in done.stdout


# -- navigation and links -------------------------------------------------------------


def nav_pages(node: Any) -> list[str]:
    if isinstance(node, str):
        return [node] if node.endswith(".md") else []
    if isinstance(node, list):
        return [p for item in node for p in nav_pages(item)]
    if isinstance(node, dict):
        return [p for value in node.values() for p in nav_pages(value)]
    return []


def test_every_page_is_in_the_nav() -> None:
    """Every page under docs/ is in mkdocs.yml's nav once, and the nav names no missing page."""
    config = yaml.safe_load((ROOT / "mkdocs.yml").read_text(encoding="utf-8"))
    listed = nav_pages(config["nav"])
    assert len(listed) == len(set(listed)), "a page is in the nav twice"
    assert sorted(listed) == sorted(str(p.relative_to(DOCS)) for p in PAGES)


def slug(heading: str) -> str:
    """Python-Markdown's default toc slug of a heading's text."""
    text = re.sub(r"`([^`]*)`", r"\1", heading)
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", text)
    text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode()
    text = re.sub(r"[^\w\s-]", "", text).strip().lower()
    return re.sub(r"[-\s]+", "-", text)


def prose(page: Path) -> str:
    """The page without its code (fenced blocks and inline code)."""
    text = FENCE.sub("", page.read_text(encoding="utf-8"))
    return re.sub(r"`[^`\n]*`", "", text)


def anchors(page: Path) -> set[str]:
    return {slug(m.group(1)) for m in re.finditer(r"^#{1,6} (.+?)\s*$", prose(page), re.M)}


LINK = re.compile(r"\]\(([^)\s]+)\)")


def test_relative_links_resolve() -> None:
    """Every relative link of every page names an existing file, and its #anchor a
    heading of that page."""
    broken = []
    for page in PAGES:
        for match in LINK.finditer(prose(page)):
            target = match.group(1)
            if re.match(r"^[a-z]+:", target):
                continue  # http(s), mailto
            path, _, anchor = target.partition("#")
            file = (page.parent / path).resolve() if path else page
            if not file.is_file():
                broken.append(f"{page.relative_to(DOCS)}: {target} (no such file)")
            elif anchor and file.suffix == ".md" and anchor not in anchors(file):
                broken.append(f"{page.relative_to(DOCS)}: {target} (no such heading)")
    assert not broken, "\n".join(broken)


def test_readme_links_into_the_docs_resolve() -> None:
    """The README (the front page) links into docs/ with relative links that name existing
    files and headings, and links every page of the navigation's top level."""
    readme = ROOT / "README.md"
    broken, linked = [], set()
    for match in LINK.finditer(prose(readme)):
        target = match.group(1)
        if re.match(r"^[a-z]+:", target):
            continue
        path, _, anchor = target.partition("#")
        file = (ROOT / path).resolve() if path else readme
        if not file.is_file():
            broken.append(f"{target} (no such file)")
        elif anchor and file.suffix == ".md" and anchor not in anchors(file):
            broken.append(f"{target} (no such heading)")
        linked.add(path)
    assert not broken, "\n".join(broken)
    config = yaml.safe_load((ROOT / "mkdocs.yml").read_text(encoding="utf-8"))
    top = [item for entry in config["nav"] for item in entry.values() if isinstance(item, str)]
    missing = [page for page in top if page != "index.md" and f"docs/{page}" not in linked]
    assert not missing, f"the README links no {missing}"


def test_link_checker_sees_a_broken_link(tmp_path: Path) -> None:
    """The anchor check is not vacuous: headings slug as mkdocs does."""
    assert slug("`arq` or `astages worker`") == "arq-or-astages-worker"
    assert slug("Maintenance: the Cleaner") == "maintenance-the-cleaner"
    assert "the-sweeper" in anchors(DOCS / "operations.md")
