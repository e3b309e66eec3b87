"""astages cancel, events and wait, and the cancelled counts and stage durations the
other commands show: through click's runner and as real processes, on the real Redis."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import time
from typing import IO, Any

from arq.connections import ArqRedis
from cli_helpers import (
    crash,
    db_url_fixture,  # noqa: F401 - the db_url fixture
    make_group,
    noop,
    on_redis,
)
from click.testing import CliRunner
from helpers import wait_for

import astages
from astages._board import Board, StageRow
from astages.cli import main
from astages.models import StageProgress
from astages.testing import run_group

DEADLINE = 20


def invoke(*args: str, input: str | None = None) -> Any:
    return CliRunner().invoke(main, list(args), input=input, env={"REDIS_URL": None})


def kept_group(url: str, *, run: bool, fail: bool = False) -> str:
    """A group kept 60 s after it ends: stage 1 with noop 1 (and crash 2 when ``fail``),
    stage 2 with noop 3; run to its end by an in-process worker when ``run``."""

    async def action(redis: ArqRedis) -> str:
        async with astages.within_a_grouping(redis, "kept", keep_for=60) as group:
            calls: list[Any] = [(noop, (1,)), *([(crash, (2,))] if fail else [])]
            await (await group.stage(1)).enqueue_many(calls)
            await (await group.stage(2)).enqueue(noop, 3)
        if run:
            await run_group(redis, group, [noop, crash])
        return group.id

    return on_redis(url, action)


def read_line(stream: IO[str], deadline: float) -> str:
    """The next line of a child's output (the child is killed by the caller on a timeout)."""
    line = stream.readline()
    assert line or time.monotonic() < deadline, "the process printed nothing"
    return line


def test_cancel_stage_asks_first_then_the_group_goes_on(db_url: str) -> None:
    """cancel --stage asks, says how many jobs it cancelled and what the group does next;
    groups and show then list the cancelled counts and status."""
    group_id = make_group(db_url, jobs=3)
    refused = invoke("cancel", group_id[:16], "--stage", "1", "--redis-url", db_url, input="n\n")
    assert refused.exit_code == 1 and "Aborted" in refused.output
    assert f"Cancel stage 1 (running, 3 jobs not final) of group {group_id} 'nightly import'?" in refused.output
    done = invoke("cancel", group_id, "--stage", "1", "--redis-url", db_url, input="y\n")
    assert done.exit_code == 0, done.output
    assert done.output.endswith(
        f"cancelled stage 1 of group {group_id}: 3 jobs cancelled; the group goes on with stage 2\n"
    )
    assert on_redis(db_url, lambda redis: redis.zcard("arq:queue")) == 1  # stage 1's jobs left, stage 2's came
    shown = invoke("show", group_id, "--redis-url", db_url).output
    assert "stage 1  cancelled  3 jobs: 3 cancelled  in " in shown
    assert "stage 2  running  1 job: 1 queued  for " in shown and "s so far" in shown
    listed = invoke("groups", "--redis-url", db_url).output.splitlines()
    assert listed[1].split()[-5:] == ["running", "2/2", "3/4", "0", "3"]
    row = json.loads(invoke("groups", "--json", "--redis-url", db_url).output)["groups"][0]
    assert (row["current_stage"], row["jobs"]["cancelled"]) == (2, 3)
    again = invoke("cancel", group_id, "--stage", "1", "--yes", "--redis-url", db_url)
    assert again.exit_code == 1 and again.output.startswith("Error: ") and again.output.count("\n") == 1
    missing = invoke("cancel", group_id, "--stage", "7", "--yes", "--redis-url", db_url)
    assert missing.exit_code == 1 and missing.output.startswith("Error: ") and "7" in missing.output


def test_cancel_group_ends_it(db_url: str) -> None:
    """cancel ends a group: a group that is not kept is gone, a kept one shows its outcome
    and cannot be cancelled twice."""
    gone = make_group(db_url, jobs=3)
    data = json.loads(invoke("cancel", gone, "--yes", "--json", "--redis-url", db_url).output)
    assert data == {
        "group": gone,
        "stage": None,
        "cancelled": 4,
        "running": 0,
        "outcome": "cancelled",
        "next_stage": None,
        "status": "cancelled",
    }
    assert invoke("show", gone, "--redis-url", db_url).exit_code == 1
    assert on_redis(db_url, lambda redis: redis.zcard("arq:queue")) == 0

    kept = kept_group(db_url, run=False)
    done = invoke("cancel", kept, "--yes", "--redis-url", db_url)
    assert done.output == f"cancelled group {kept}: 2 jobs cancelled; the group ended: cancelled\n"
    shown = invoke("show", kept, "--redis-url", db_url)
    assert f"group {kept}  'kept'  cancelled  created" in shown.output
    assert "outcome: cancelled at " in shown.output and ": 0 successful, 0 failed, 2 cancelled" in shown.output
    assert json.loads(invoke("show", kept, "--json", "--redis-url", db_url).output)["summary"]["cancelled"] == 2
    again = invoke("cancel", kept, "--yes", "--redis-url", db_url)
    assert again.exit_code == 1
    assert again.output == f"Error: group {kept} already ended (cancelled): nothing to cancel\n"


def test_wait_exit_status_says_how_the_group_ended(db_url: str) -> None:
    """wait prints the summary; exit 0 complete and clean, 1 with a failed job or cancelled, 2 on timeout."""
    clean = kept_group(db_url, run=True)
    result = invoke("wait", clean, "--redis-url", db_url)
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0].startswith(f"group {clean}  'kept'  ended complete at ")
    assert lines[0].endswith(": 2 successful, 0 failed, 0 cancelled")
    assert lines[1].split() == ["STAGE", "STATUS", "JOBS", "SUCCESSFUL", "FAILED", "CANCELLED", "RETRIED", "DURATION"]
    assert lines[2].split()[:7] == ["1", "complete", "1", "1", "0", "0", "0"] and lines[2].endswith("s")

    failed = kept_group(db_url, run=True, fail=True)
    result = invoke("wait", failed, "--json", "--redis-url", db_url)
    assert result.exit_code == 1, result.output
    data = json.loads(result.output)
    assert (data["outcome"], data["failed"], data["failed_jobs"]) == ("complete", 1, [f"astages:{failed}:1:0000000002"])
    assert all(s["duration"] is not None and s["duration"] >= 0 for s in data["stages"])

    cancelled = kept_group(db_url, run=False)
    invoke("cancel", cancelled, "--yes", "--redis-url", db_url)
    assert invoke("wait", cancelled, "--redis-url", db_url).exit_code == 1

    running = make_group(db_url)
    started = time.monotonic()
    result = invoke("wait", running, "--timeout", "0.2", "--redis-url", db_url)
    assert result.exit_code == 2
    assert result.stderr == f"Error: group {running} did not end within 0.2s\n"
    assert time.monotonic() - started < 15  # gave up after its 0.2 s timeout, not later


def test_events_prints_the_timeline(db_url: str) -> None:
    """events lists job and stage transitions oldest first; --count keeps the latest;
    --json is a list; --follow on a group that already ended prints it all and stops."""
    group_id = kept_group(db_url, run=True, fail=True)
    out = invoke("events", group_id, "--redis-url", db_url).output.splitlines()
    assert [line.split()[2:] for line in out[:1]] == [["stage", "1", "->", "running", "jobs=2"]]
    failed = next(line for line in out if " 1:2 " in line and "-> failed" in line)
    assert failed.split()[2:7] == ["job", "1:2", "running", "->", "failed"]
    assert "try=1 error=ValueError: crash 2 went wrong" in failed
    assert out[-1].split()[2:] == ["group", group_id, "->", "complete"]
    latest = invoke("events", group_id, "--count", "2", "--redis-url", db_url).output.splitlines()
    assert latest == out[-2:]
    data = json.loads(invoke("events", group_id, "--json", "--redis-url", db_url).output)
    assert len(data) == len(out)
    assert data[0] | {"id": "", "at": ""} == {
        "id": "",
        "at": "",
        "kind": "stage",
        "subject": "1",
        "from": None,
        "to": "running",
        "details": {"jobs": "2"},
    }
    followed = invoke("events", group_id, "--follow", "--json", "--redis-url", db_url)
    assert followed.exit_code == 0, followed.output
    assert [json.loads(line)["to"] for line in followed.stdout.splitlines()] == [e["to"] for e in data]
    assert followed.stderr.startswith(f"group {group_id} ended: complete at ")


def test_follow_and_wait_in_processes_wake_when_the_group_ends(db_url: str) -> None:
    """events --follow and wait, as processes, print the group's transitions as a worker
    runs it and exit once it ends, woken by Redis (blocking XREAD, pub/sub; no polling)."""
    group_id = kept_group(db_url, run=False)  # kept: its timeline outlives its end
    env = {k: v for k, v in os.environ.items() if k != "REDIS_URL"} | {"PYTHONUNBUFFERED": "1"}
    follow = subprocess.Popen(
        [sys.executable, "-m", "astages", "events", group_id, "--follow", "--redis-url", db_url],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    wait = subprocess.Popen(
        [sys.executable, "-m", "astages", "wait", group_id, "--json", "--redis-url", db_url],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        assert follow.stdout is not None
        first = read_line(follow.stdout, time.monotonic() + DEADLINE)
        assert first.split()[2:] == ["stage", "1", "->", "running", "jobs=1"]

        async def subscribed(redis: ArqRedis) -> None:  # both hear the end on the group's channel
            async def both() -> bool:
                return bool((await redis.pubsub_numsub(f"astages:{group_id}:finished"))[0][1] == 2)

            await wait_for(both, DEADLINE, "events --follow and wait to subscribe")

        on_redis(db_url, subscribed)
        assert len(on_redis(db_url, lambda redis: run_group(redis, group_id, [noop])).jobs) == 2
        out, err = follow.communicate(timeout=DEADLINE)
        waited, wait_err = wait.communicate(timeout=DEADLINE)
    finally:
        follow.kill()
        wait.kill()
    assert follow.returncode == 0, err
    lines = (first + out).splitlines()
    timeline = json.loads(invoke("events", group_id, "--json", "--redis-url", db_url).output)
    assert [line.split()[2:4] for line in lines[:-1]] == [[e["kind"], e["subject"]] for e in timeline]
    assert [e["to"] for e in timeline][-4:] == ["running", "successful", "complete", "complete"]
    assert lines[-1].startswith(f"group {group_id} ended: complete at ")
    assert lines[-1].endswith(": 2 successful, 0 failed, 0 cancelled")
    assert wait.returncode == 0, wait_err
    assert json.loads(waited)["outcome"] == "complete"


def test_demo_reports_outcome_cancelled_and_stage_durations() -> None:
    """demo --json takes each stage's duration from the stage's own start and end."""
    result = CliRunner().invoke(main, ["demo", "--quick", "--photos", "4", "--json"], env={"REDIS_URL": None})
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert (data["outcome"], data["cancelled"]) == ("complete", 0)
    assert [(s["status"], s["cancelled"]) for s in data["stages"]] == [("complete", 0)] * 4
    assert all(isinstance(s["duration"], float) for s in data["stages"])


def test_board_shows_cancelled_jobs_and_duration() -> None:
    """A stage's bar names its cancelled jobs, its status and how long it took."""
    stream = io.StringIO()
    Board(stream, live=False).draw([StageRow(1, "cancelled", StageProgress(successful=2, cancelled=3), "", 1.5)])
    assert stream.getvalue().rstrip().endswith("5/5  ok 2 failed 0 retried 0 cancelled 3  cancelled 1.50s")
