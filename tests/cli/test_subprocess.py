"""The astages command as a real process, against the real Redis server, demo included."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

from arq.connections import ArqRedis
from cli_helpers import (
    db_url_fixture,  # noqa: F401 - the db_url fixture
    make_group,
    noop,
    on_redis,
)
from helpers import keys_left

from astages.testing import run_group

DEADLINE = 60


def command(*args: str) -> list[str]:
    return [sys.executable, "-m", "astages", *args]


def environment() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "REDIS_URL"}
    return env | {"PYTHONUNBUFFERED": "1"}


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(command(*args), capture_output=True, text=True, timeout=DEADLINE, env=environment())


def test_groups_and_show_in_a_process(db_url: str) -> None:
    """groups --json and show (by id prefix) work as a separate process."""
    group_id = make_group(db_url, "as a process")
    listed = run("groups", "--json", "--redis-url", db_url)
    assert listed.returncode == 0, listed.stderr
    assert [g["id"] for g in json.loads(listed.stdout)["groups"]] == [group_id]
    shown = run("show", group_id[:24], "--redis-url", db_url)
    assert shown.returncode == 0, shown.stderr
    assert "stage 1  running  3 jobs: 3 queued" in shown.stdout


def test_errors_are_one_line_on_stderr(db_url: str) -> None:
    """An unknown group and an unreachable server: exit 1, one stderr line, no traceback."""
    for args in (("show", "nope", "--redis-url", db_url), ("groups", "--redis-url", "redis://127.0.0.1:1/0")):
        done = run(*args)
        assert done.returncode == 1
        assert done.stdout == ""
        assert done.stderr.startswith("Error: ") and done.stderr.count("\n") == 1, done.stderr


def test_watch_follows_a_group_until_it_finishes(db_url: str) -> None:
    """watch prints the group, then exits 0 once a worker has finished it."""
    group_id = make_group(db_url, "watched", jobs=5)
    proc = subprocess.Popen(
        command("watch", group_id, "--interval", "0.05", "--redis-url", db_url),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=environment(),
    )
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().startswith(f"group {group_id}  'watched'")

        async def finish(redis: ArqRedis) -> int:
            return len((await run_group(redis, group_id, [noop])).jobs)

        assert on_redis(db_url, finish) == 6
        out, err = proc.communicate(timeout=DEADLINE)
    finally:
        proc.kill()
    assert proc.returncode == 0, err
    assert f"group {group_id} ended: complete at " in out  # heard from its end, though it deleted itself
    assert out.rstrip().endswith(": 6 successful, 0 failed, 0 cancelled")
    assert "stage 2" in out


def test_demo_on_a_real_server_leaves_nothing_behind(db_url: str) -> None:
    """demo --redis-url runs there, reports every stage, and the database is empty after."""
    started = time.monotonic()
    done = run("demo", "--quick", "--photos", "20", "--json", "--redis-url", db_url)
    assert done.returncode == 0, done.stderr
    data = json.loads(done.stdout)
    assert data["redis"] == db_url
    assert (data["jobs"], data["successful"], data["failed"]) == (43, 42, 1)
    stages = [(s["name"], s["jobs"]) for s in data["stages"]]
    assert stages == [("fetch", 20), ("resize", 20), ("index", 2), ("report", 1)]
    assert data["retried"] > 0
    assert data["failures"][0]["error"] == "PhotoMissing: photo 13: the source answered 404"
    assert time.monotonic() - started < 30
    assert on_redis(db_url, lambda redis: keys_left(redis, "*")) == []


def test_demo_suggests_a_watch_on_its_own_server(db_url: str) -> None:
    """demo --redis-url suggests `astages watch` with that URL (without it, watch looked in
    the default database and said the group did not exist)."""
    done = run("demo", "--quick", "--photos", "5", "--redis-url", db_url)
    assert done.returncode == 0, done.stderr
    assert f"(try `astages watch --redis-url {db_url} " in done.stdout


def test_demo_without_a_server(db_url: str) -> None:
    """demo with no URL runs on fakeredis and prints bars and a summary table."""
    done = run("demo", "--quick", "--photos", "15")
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert out.startswith("astages demo: importing 15 photos in 4 stages on fakeredis (in memory)\n")
    assert "stage 1 fetch   [" in out and "complete" in out
    assert "STAGE  NAME    JOBS  SUCCESSFUL  FAILED  CANCELLED  RETRIED  DURATION" in out
    assert "33 jobs in " in out and "32 successful, 1 failed" in out
    assert "report: 14 of 15 photos published, 1 missing" in out
    assert "(0 keys left)" in out
    assert done.stderr == ""
    assert on_redis(db_url, lambda redis: redis.dbsize()) == 0  # it did not touch the real server
