"""astages.sync: build, start and wait for a group from plain (non-async) code, on the real server."""

from __future__ import annotations

import asyncio

import pytest
from arq.connections import create_pool
from helpers import run_burst

import astages
import astages.sync
from astages import GroupNotFound, JobStatus, StageStatus


async def square(ctx, x):
    return x * x


async def total(ctx):
    job = await astages.StagedJob.perform_job(ctx)
    return sum(r.value for r in await job.stage().group.stage(1).results())


async def done(ctx, summary):
    return summary.outcome


def _run_worker(server) -> None:
    async def main() -> None:
        redis = await create_pool(server.settings)
        try:
            await run_burst(redis, [square, total, done])
        finally:
            await redis.aclose()

    asyncio.run(main())


@pytest.fixture
def server(redis_server):
    """The real server's database, flushed (no event loop needed)."""

    async def flush() -> None:
        redis = await create_pool(redis_server.settings)
        await redis.flushdb()
        await redis.aclose()

    asyncio.run(flush())
    return redis_server


def test_sync_grouping_builds_starts_and_waits(server):
    """Plain calls record jobs in pending stages; leaving the block starts the group; wait() returns its summary."""
    with astages.sync.within_a_grouping(server.url, "from sync code", keep_for=60) as group:
        jobs = [group.stage(1, name="fan out").enqueue(square, i) for i in range(4)]
        group.stage(2).enqueue(total)
        group.on_complete(done)
        assert group.stage(1).status() is StageStatus.PENDING
        assert [job.status() for job in jobs] == [JobStatus.PENDING] * 4
        assert jobs[0].args == (0,)
    assert group.id and jobs[3].id.endswith(":1:0000000004")
    _run_worker(server)
    summary = astages.sync.wait(server.url, group.id, timeout=10)
    assert summary.outcome == "complete"
    assert [(s.number, s.name, s.successful) for s in summary.stages] == [(1, "fan out", 4), (2, None, 1)]


def test_sync_grouping_exception_deletes_the_group(server):
    """An exception in the block deletes the group and propagates."""
    with (
        pytest.raises(RuntimeError, match="changed my mind"),
        astages.sync.within_a_grouping(server.settings, "abandoned") as group,
    ):
        group.stage(1).enqueue(square, 1)
        raise RuntimeError("changed my mind")
    with pytest.raises(GroupNotFound):
        astages.sync.wait(server.url, group.id, timeout=1)


def test_sync_refuses_what_it_cannot_use(server):
    """A connection object (bound to another event loop) or a bad URL is refused with a clear error."""
    with (
        pytest.raises(TypeError, match="Redis URL or arq RedisSettings"),
        astages.sync.within_a_grouping(object(), "x"),  # type: ignore[arg-type]
    ):
        pass
    with pytest.raises(ValueError, match="not a Redis URL"):
        astages.sync.wait("http://nowhere", "x")
    with (
        astages.sync.within_a_grouping(server.url, "errors as in async") as group,
        pytest.raises(astages.InvalidStageNumber),
    ):
        group.stage("one")
