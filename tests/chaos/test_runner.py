"""The hardened worker (astages.runner) and ``astages worker``, on the real Redis server."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path

import arq.worker
import pytest
from arq.connections import RedisSettings, create_pool
from conftest import Server
from helpers import stop_when_idle, wait_for
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import WatchError

import astages
from astages.runner import HardenedWorker, reconnecting

HERE = Path(__file__).parent


RUNS: list[str] = []


async def work(ctx, tag):
    """Takes a little time, so connections drop while jobs run."""
    await asyncio.sleep(0.01)
    RUNS.append(tag)
    return tag


async def kill_clients(redis, db: int) -> int:
    me = await redis.client_id()
    ids = [c["id"] for c in await redis.client_list() if int(c["db"]) == db and int(c["id"]) != me]
    for client_id in ids:
        await redis.client_kill_filter(_id=client_id)
    return len(ids)


def test_reconnecting_adds_a_policy_unless_one_is_set():
    """reconnecting() adds retry-on-connection-error to settings, keeps a policy the user set."""
    settings = reconnecting(RedisSettings())
    assert settings.retry is not None
    assert RedisConnectionError in (settings.retry_on_error or [])
    own = RedisSettings(retry=Retry(NoBackoff(), 1))
    assert reconnecting(own) is own
    assert "redis_settings" not in astages.worker_settings(functions=[work])  # arq's pool: as the user set it


async def test_start_jobs_gives_a_slot_back_when_redis_fails(redis_server: Server):
    """A Redis error while taking a job leaks a slot in arq's Worker; HardenedWorker gives it back."""
    pool = await create_pool(redis_server.settings)

    def broken_pipeline(*args, **kwargs):
        raise WatchError("A ConnectionError occurred on while watching one or more keys")

    try:
        plain = arq.worker.Worker(functions=[work], redis_pool=pool, handle_signals=False, max_jobs=2)
        hardened = HardenedWorker(functions=[work], redis_pool=pool, handle_signals=False, max_jobs=2)
        for worker in (plain, hardened):
            worker.pool.pipeline = broken_pipeline
            with pytest.raises(WatchError):
                await worker.start_jobs([b"some-job"])
        assert plain.job_counter == 1  # arq's own leak: after max_jobs of these it stops taking jobs
        assert hardened.job_counter == 0 and hardened.sem._value == 3
    finally:
        await pool.aclose()


async def test_claim_written_before_a_dropped_connection_still_runs_the_job(real_redis, redis_server: Server):
    """EXEC applied but its reply lost: arq skips the job and leaves its in-progress mark (the job waits
    for it to expire); HardenedWorker reads its own token back and runs the job."""
    job = await real_redis.enqueue_job("work", "x")
    assert job is not None
    key = f"arq:in-progress:{job.job_id}"
    for cls, runs in ((arq.worker.Worker, False), (HardenedWorker, True)):
        pool = await create_pool(redis_server.settings)
        real_pipeline = pool.pipeline

        def lossy_pipeline(*args, real_pipeline=real_pipeline, **kwargs):
            pipe = real_pipeline(*args, **kwargs)
            real_execute = pipe.execute

            async def execute(*a, **kw):
                await real_execute(*a, **kw)  # applied, then the reply is "lost"
                raise WatchError("A ConnectionError occurred on while watching one or more keys")

            pipe.execute = execute
            return pipe

        worker = cls(functions=[work], redis_pool=pool, handle_signals=False, max_jobs=2, burst=True)
        pool.pipeline = lossy_pipeline
        try:
            await worker.start_jobs([job.job_id.encode()])
            pool.pipeline = real_pipeline
            assert (job.job_id in worker.tasks) is runs
            assert await real_redis.exists(key) == 1  # the mark was written either way
            if runs:
                await worker.tasks[job.job_id]
                assert RUNS[-1] == "x"
        finally:
            await real_redis.delete(key)
            await pool.aclose()


async def test_poll_loop_survives_redis_errors(redis_server: Server):
    """A poll iteration failing on Redis errors backs off and carries on (arq's would end the worker)."""
    pool = await create_pool(redis_server.settings)
    worker = HardenedWorker(functions=[work], redis_pool=pool, handle_signals=False, poll_delay=0)
    real = pool.zrangebyscore
    failures = [RedisConnectionError("dropped"), WatchError("watching")]

    async def flaky(*args, **kwargs):
        if failures:
            raise failures.pop(0)
        return await real(*args, **kwargs)

    pool.zrangebyscore = flaky
    try:
        await worker._poll_iteration()
        await worker._poll_iteration()
        assert worker.redis_failures == 2
        await worker._poll_iteration()
        assert worker.redis_failures == 0
    finally:
        await pool.aclose()


@pytest.mark.slow
async def test_hardened_worker_runs_through_dropped_connections(real_redis, redis_server: Server):
    """Every connection of the database is killed 5 times while a HardenedWorker runs a group: it finishes."""
    async with astages.within_a_grouping(real_redis, "drops") as group:
        for n in (1, 2, 3):
            await (await group.stage(n)).enqueue_many([(work, (f"{n}-{i}",)) for i in range(150)])
    settings = astages.worker_settings(
        functions=[work], redis_settings=redis_server.settings, sweep_interval=0.5, sweep_grace=0.5, job_timeout=2
    )
    worker = HardenedWorker(**settings, handle_signals=False, poll_delay=0.01, max_jobs=20)
    task = asyncio.ensure_future(worker.main())
    killer = await create_pool(reconnecting(redis_server.settings))
    RUNS.clear()
    try:
        killed = 0
        for k in range(1, 6):  # spread the drops over the run: one every 60 jobs

            async def progressed(k: int = k) -> bool:
                return len(RUNS) >= 60 * k

            await wait_for(progressed, within=30, what=f"{60 * k} jobs to run")
            killed += await kill_clients(killer, redis_server.db)
            assert not task.done()

        async def gone() -> bool:
            return not await group.exists()

        await wait_for(gone, within=60, what="the group to finish")
        assert not task.done()  # still polling
        assert killed >= 5
    finally:
        await stop_when_idle(worker, task)
        await killer.aclose()


def run(argv: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(argv, env=env, cwd=HERE, capture_output=True, timeout=60)


@pytest.mark.slow
async def test_astages_worker_command(real_redis, redis_server: Server):
    """`astages worker app.WorkerSettings --burst` runs staged jobs and exits; --check reports no worker."""
    async with astages.within_a_grouping(real_redis, "cli") as group:
        for n in (1, 2):
            await (await group.stage(n)).enqueue_many([("step", (f"0-{n}-{i}", "ok", 0)) for i in range(5)])
    path = os.pathsep.join(p for p in (str(HERE), os.environ.get("PYTHONPATH", "")) if p)
    env = {**os.environ, "PYTHONPATH": path, "CHAOS_REDIS_URL": redis_server.url}
    command = [sys.executable, "-c", "from astages.cli import main; main()", "worker", "chaos_app.WorkerSettings"]
    for _ in range(5):  # a burst worker can stop between two stages: run it again, as arq's own tests do
        done = await asyncio.to_thread(run, [*command, "--burst"], env)
        assert done.returncode == 0, done.stderr.decode()[-2000:]
        if not await group.exists():
            break
    assert not await group.exists()
    check = await asyncio.to_thread(run, [*command, "--check"], env)
    assert check.returncode == 1  # no worker is running: no health-check key
