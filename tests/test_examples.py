"""The README's example runs as it is written: its app with `arq` and with `astages
worker` against a real server, and the FastAPI app that mounts the dashboard."""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
APP = ROOT / "examples" / "app.py"


def readme_block(heading: str) -> str:
    """The first python block under the README's ``heading``."""
    section = README.read_text(encoding="utf-8").split(f"\n## {heading}\n", 1)[1].split("\n## ", 1)[0]
    found = re.search(r"```python\n(.*?)```", section, flags=re.S)
    assert found, f"no python block under {heading!r}"
    return found.group(1)


def without_docstring(text: str) -> str:
    return text.split('"""', 2)[2].lstrip("\n")


def test_the_readme_example_is_the_example_app() -> None:
    """The README's example is examples/app.py, word for word (its docstring aside)."""
    assert readme_block("Example") == without_docstring(APP.read_text(encoding="utf-8"))


@pytest.mark.parametrize("worker", [["arq"], ["astages", "worker"]], ids=["arq", "astages worker"])
def test_the_example_app_runs_with_a_worker(redis_server: Any, worker: list[str]) -> None:
    """`arq examples.app.WorkerSettings` (or `astages worker ...`) and `python -m examples.app`,
    as the README says: the group completes and the client prints how it ended."""
    import redis

    redis.Redis(host=redis_server.host, port=redis_server.port, db=redis_server.db).flushdb()
    env = {**os.environ, "REDIS_URL": redis_server.url}
    binary = str(Path(sys.executable).parent / worker[0])
    proc = subprocess.Popen(
        [binary, *worker[1:], "examples.app.WorkerSettings"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        client = subprocess.run(
            [sys.executable, "-m", "examples.app"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=90
        )
    finally:
        proc.terminate()
        log, _ = proc.communicate(timeout=30)
    assert client.returncode == 0, client.stdout + client.stderr + log
    assert client.stdout.strip() == "nightly import: complete, 13 jobs done", client.stdout + log
    assert "13 jobs complete" in log


async def test_the_fastapi_example_mounts_the_dashboard(redis_server: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """examples/dashboard_fastapi.py: the dashboard answers under /stages once the app's
    lifespan has made its Redis pool (run here as a server runs it)."""
    import importlib

    import httpx
    import redis

    redis.Redis(host=redis_server.host, port=redis_server.port, db=redis_server.db).flushdb()
    monkeypatch.setenv("REDIS_URL", redis_server.url)
    monkeypatch.syspath_prepend(str(ROOT))
    module = importlib.import_module("examples.dashboard_fastapi")
    app = module.app
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app)
        async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1:8000") as client:
            assert (await client.get("/")).json() == {"dashboard": "/stages/"}
            page = await client.get("/stages/")
            assert page.status_code == 200 and "astages" in page.text
            assert (await client.get("/stages/api/groups")).json()["groups"] == []


@pytest.mark.parametrize(
    "page", [README, *sorted((ROOT / "docs").rglob("*.md"))], ids=lambda p: str(p.relative_to(ROOT))
)
def test_every_python_block_of_the_readme_compiles(page: Path) -> None:
    """No python block in the README or a docs/ page has a syntax error (the runnable ones
    run above, in tests/test_docs.py and in tests/testing/test_plugin.py)."""
    text = page.read_text(encoding="utf-8")
    blocks = re.findall(r"^( *)```python\n(.*?)^\1```", text, flags=re.S | re.M)
    if page == README:
        assert blocks, "the README has no python block"
    for indent, block in blocks:
        code = "\n".join(line.removeprefix(indent) for line in block.splitlines())
        compile(code, str(page.relative_to(ROOT)), "exec", flags=ast.PyCF_ALLOW_TOP_LEVEL_AWAIT)
