"""The README's two commands, each doing its own set-up on a machine with only Python 3.11+.

    python3 .ci/dev.py demo [astages demo options]   # the demo (no Redis server needed)
    python3 .ci/dev.py test [pytest options]         # the tests
    python3 .ci/dev.py lint                          # ruff and mypy (CI runs it before the tests)
    python3 .ci/dev.py docs [mkdocs build options]   # the documentation site, built --strict into site/

Both make (or reuse) a virtual environment in ``.venv`` and install the project into it
(``.[dev]`` for the tests). ``test`` also installs Debian's ``chromium`` for the browser
tests and ``prometheus`` (for ``promtool``) when they are missing (``apt-get``, as root
or through ``sudo``); the tests find a Redis
server on 127.0.0.1:6379 or start one themselves (tests/conftest.py). Standard library
only: this runs before anything is installed.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VENV = ROOT / ".venv"
BIN = VENV / ("Scripts" if os.name == "nt" else "bin")
PYTHON = BIN / "python"
CHROMIUM = Path(os.environ.get("ASTAGES_TEST_CHROMIUM", "/usr/bin/chromium"))


def say(message: str) -> None:
    print(f"[dev] {message}", file=sys.stderr, flush=True)


def run(*args: str | os.PathLike[str], **kwargs: object) -> None:
    subprocess.run([str(a) for a in args], check=True, **kwargs)  # type: ignore[call-overload]


def as_root(*args: str) -> list[str]:
    """``args`` run as root: directly when we are root, else through sudo."""
    if os.name != "nt" and os.geteuid() == 0:
        return list(args)
    if shutil.which("sudo"):
        return ["sudo", *args]
    raise SystemExit(f"[dev] {' '.join(args)} needs root (or sudo); run it yourself and try again")


def apt_install(*packages: str) -> None:
    if not shutil.which("apt-get"):
        raise SystemExit(f"[dev] please install {' '.join(packages)} (no apt-get on this machine)")
    say(f"installing {' '.join(packages)} with apt-get")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    run(*as_root("apt-get", "update", "-qq"), env=env)
    run(*as_root("apt-get", "install", "-y", "-qq", *packages), env=env, stdout=subprocess.DEVNULL)


def make_venv() -> None:
    if PYTHON.exists():
        return
    say(f"creating {VENV}")
    try:
        venv.create(VENV, with_pip=True)
    except (subprocess.CalledProcessError, OSError):
        # Debian's python3 keeps ensurepip in a separate package
        shutil.rmtree(VENV, ignore_errors=True)
        version = f"{sys.version_info.major}.{sys.version_info.minor}"
        apt_install(f"python{version}-venv")
        venv.create(VENV, with_pip=True)


def install(extra: str) -> None:
    make_venv()
    target = f".[{extra}]" if extra else "."
    say(f"installing {target} into {VENV}")
    run(PYTHON, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", "-e", target, cwd=ROOT)


def demo(args: list[str]) -> int:
    install("")
    return subprocess.call([str(BIN / "astages"), "demo", *args], cwd=ROOT)


def test(args: list[str]) -> int:
    install("dev")
    missing = [] if CHROMIUM.exists() else ["chromium"]  # tests/web/test_browser.py drives it (Playwright)
    if not shutil.which("promtool"):
        missing.append("prometheus")  # promtool: tests/test_metrics.py runs the alert rules' unit tests
    if missing:
        apt_install(*missing)
    return subprocess.call([str(PYTHON), "-m", "pytest", *args], cwd=ROOT)


def lint(args: list[str]) -> int:
    install("dev")
    for command in (["ruff", "check", "."], ["ruff", "format", "--check", "."], ["mypy", *args]):
        code = subprocess.call([str(BIN / command[0]), *command[1:]], cwd=ROOT)
        if code:
            return code
    return 0


def docs(args: list[str]) -> int:
    """Build the documentation site (mkdocs.yml, docs/) with --strict: any warning fails."""
    install("docs")
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}  # mkdocs-material's notice about its successor
    command = [str(BIN / "mkdocs"), "build", "--strict", "--site-dir", str(ROOT / "site"), *args]
    return subprocess.call(command, cwd=ROOT, env=env)


def main(argv: list[str]) -> int:
    if sys.version_info < (3, 11):  # noqa: UP036 - any python3 may run this file
        raise SystemExit("[dev] astages needs Python 3.11 or newer")
    commands = {"demo": demo, "test": test, "lint": lint, "docs": docs}
    if not argv or argv[0] not in commands:
        print(__doc__, file=sys.stderr)
        return 2
    return commands[argv[0]](argv[1:])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
