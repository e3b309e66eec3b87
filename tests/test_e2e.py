"""End to end: worker processes started with arq's own CLI, against the real Redis."""

from __future__ import annotations

import collections
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import Server
from helpers import keys_left, wait_for

import astages

pytestmark = pytest.mark.slow
HERE = Path(__file__).parent


@pytest.fixture
def workers(redis_server: Server) -> Iterator[list[subprocess.Popen[bytes]]]:
    """Two `arq` worker processes on the test database; stopped after the test."""
    env = {**os.environ, "PYTHONPATH": str(HERE), "E2E_REDIS_URL": redis_server.url}
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "arq", "e2e_app.WorkerSettings"],
            env=env,
            cwd=HERE,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for _ in range(2)
    ]
    yield procs
    for proc in procs:
        proc.send_signal(signal.SIGTERM)
    for proc in procs:
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()


async def read_log(redis) -> list[tuple[str, str, float, int]]:
    rows = []
    for raw in await redis.lrange("e2e:log", 0, -1):
        what, tag, t, job_try = raw.decode().split()
        rows.append((what, tag, float(t), int(job_try)))
    return rows


def stage_of(tag: str) -> int:
    return int(tag.split("-")[0])


async def test_two_workers_run_each_job_once_and_stages_in_order(real_redis, workers):
    """Two workers share 3 stages x 300 jobs: each job runs once, each stage after the last."""
    async with astages.within_a_grouping(real_redis, "e2e") as group:
        for n in (1, 2, 3):
            stage = await group.stage(n)
            for i in range(300):
                await stage.enqueue("step", f"{n}-{i}")

    async def finished() -> bool:
        return not await group.exists()

    await wait_for(finished, within=90, what="the group to finish")
    log = await read_log(real_redis)
    starts = collections.Counter(tag for what, tag, _, _ in log if what == "start")
    assert len(starts) == 900 and set(starts.values()) == {1}
    for n in (1, 2):
        last_end = max(t for what, tag, t, _ in log if what == "end" and stage_of(tag) == n)
        first_next = min(t for what, tag, t, _ in log if what == "start" and stage_of(tag) == n + 1)
        assert last_end <= first_next
    assert await keys_left(real_redis) == []


async def test_retries_then_advance_across_processes(real_redis, workers):
    """Stage 2 starts only after stage 1's last retry ended; exhausted retries fail and advance."""
    async with astages.within_a_grouping(real_redis, "e2e-retry") as group:
        s1 = await group.stage(1)
        for i in range(40):
            await s1.enqueue("step", f"1-{i}", retries=2 if i % 8 == 0 else 0)
        await s1.enqueue("step", "1-exhausted", retries=5)
        await s1.enqueue("step", "1-broken", fail=True)
        s2 = await group.stage(2)
        for i in range(10):
            await s2.enqueue("step", f"2-{i}")

    async def finished() -> bool:
        return not await group.exists()

    await wait_for(finished, within=60, what="the group to finish")
    log = await read_log(real_redis)
    stage1_last = max(t for what, tag, t, _ in log if stage_of(tag) == 1)
    stage2_first = min(t for what, tag, t, _ in log if what == "start" and stage_of(tag) == 2)
    assert stage1_last <= stage2_first
    tries = collections.Counter(tag for what, tag, _, _ in log if what == "start")
    assert tries["1-0"] == 3 and tries["1-1"] == 1
    assert tries["1-exhausted"] == 3  # max_tries=3, then failed without a 4th run
    assert {tag for what, tag, _, _ in log if what == "end" and stage_of(tag) == 2} == {f"2-{i}" for i in range(10)}
