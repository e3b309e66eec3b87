"""The pytest plugin as a user meets it: the example test of docs/testing.md, run by a separate pytest."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

PAGE = Path(__file__).resolve().parents[2] / "docs" / "testing.md"


def readme_example() -> dict[str, str]:
    """The files of the example at the top of docs/testing.md, "Testing your stages" (first
    line names each)."""
    section = PAGE.read_text(encoding="utf-8").split("# Testing your stages", 1)[1].split("\n## ", 1)[0]
    files = {}
    for block in re.findall(r"```(?:python|ini)\n(.*?)```", section, flags=re.S):
        name = block.splitlines()[0].removeprefix("# ").strip()
        files[name] = block
    return files


def run_example(tmp_path: Path, **env: str) -> subprocess.CompletedProcess[str]:
    for name, text in readme_example().items():
        if name == "pytest.ini":  # as written, plus: any warning fails the run
            text = text.split("\n", 1)[1] + "filterwarnings = error\n"
        (tmp_path / name).write_text(text, encoding="utf-8")
    environment = {k: v for k, v in os.environ.items() if not k.startswith(("ASTAGES_", "PYTEST_"))} | env
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tmp_path)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        env=environment,
    )


def test_readme_names_its_example_files() -> None:
    """The page's example is a pytest.ini, a conftest.py and a test file."""
    assert sorted(readme_example()) == ["conftest.py", "pytest.ini", "test_import.py"]


def test_readme_example_passes_on_fakeredis(tmp_path: Path) -> None:
    """With no server named, the example passes on fakeredis."""
    done = run_example(tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "1 passed" in done.stdout


def test_readme_example_passes_on_a_real_server(tmp_path: Path, redis_server: Any) -> None:
    """With ASTAGES_REDIS_URL, the fixture runs the example on that server."""
    done = run_example(tmp_path, ASTAGES_REDIS_URL=redis_server.url)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "1 passed" in done.stdout


def test_an_unreachable_server_fails_the_test(tmp_path: Path) -> None:
    """A server that does not answer fails the test loudly (it is never skipped)."""
    done = run_example(tmp_path, ASTAGES_REDIS_URL="redis://127.0.0.1:1/0")
    assert done.returncode == 1
    assert "astages_redis: cannot use redis://127.0.0.1:1/0" in done.stdout
