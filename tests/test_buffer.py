"""Jobs enqueued one at a time inside within_a_grouping are written in batches."""

from __future__ import annotations

import asyncio

import pytest
from arq.constants import default_queue_name
from helpers import keys_left

import astages
from astages import JobStatus, StageStatus
from astages.stage import RECORD_BATCH


async def work(ctx, *args):
    return args


def count_scripts(monkeypatch, redis) -> list[str]:
    calls: list[str] = []
    original = type(redis).evalsha

    async def counting(self, sha, numkeys, *args):
        calls.append(sha)
        return await original(self, sha, numkeys, *args)

    monkeypatch.setattr(type(redis), "evalsha", counting)
    return calls


async def test_one_at_a_time_is_written_in_batches(redis, monkeypatch):
    """3,000 single enqueues in the block cost a handful of script calls; ids are known at once."""
    calls = count_scripts(monkeypatch, redis)
    async with astages.within_a_grouping(redis, "batched", window=None) as group:  # every job sent
        stage = await group.stage(1)
        jobs = [await stage.enqueue(work, i) for i in range(3_000)]
        assert [job.ref.seq for job in jobs] == list(range(1, 3_001))
        assert len({job.id for job in jobs}) == 3_000
    # 2 writes of RECORD_BATCH, 8 reservations (16 doubling to 1,024), create, stage,
    # initiate, and a reload per script on a server that has not seen it: not 3,000
    assert len(calls) <= 2 * (3_000 // RECORD_BATCH + 1) + 8 + 3 + 8
    assert await stage.num_jobs() == 3_000
    assert [j.args for j in await stage.jobs(2_998)] == [(2_998,), (2_999,)]
    assert await redis.zcard(default_queue_name) == 3_000
    assert await jobs[-1].status() is JobStatus.QUEUED


async def test_reads_in_the_block_see_buffered_jobs(redis):
    """Every read through the group writes the buffer first."""
    async with astages.within_a_grouping(redis, "reads") as group:
        s1 = await group.stage(1)
        job = await s1.enqueue(work, "a")
        assert await job.status() is JobStatus.PENDING
        assert (await job.info()).args == ("a",)
        await s1.enqueue(work, "b")
        assert await s1.num_jobs() == 2
        await s1.enqueue(work, "c")
        assert [j.args for j in await s1.jobs()] == [("a",), ("b",), ("c",)]
        await s1.enqueue(work, "d")
        assert (await group.progress())[1].pending == 4
        assert await job.set_status_message("noted")
    assert await job.status_message() == "noted"


async def test_order_kept_across_stages_and_bulk_calls(redis):
    """Single and bulk enqueues, over several stages, keep their order."""
    async with astages.within_a_grouping(redis, "order") as group:
        s1, s2 = await group.stage(1), await group.stage(2)
        await s1.enqueue(work, "a")
        await s2.enqueue(work, "x")
        await s1.enqueue_many([(work, ("b",)), (work, ("c",))])
        await s1.enqueue(work, "d")
        await s2.enqueue(work, "y")
    assert [j.args[0] for j in await s1.jobs()] == ["a", "b", "c", "d"]
    assert [j.args[0] for j in await s2.jobs()] == ["x", "y"]


async def test_exception_drops_the_buffer_with_the_group(redis):
    """An exception in the block writes nothing buffered and removes the group."""
    with pytest.raises(RuntimeError):
        async with astages.within_a_grouping(redis, "doomed") as group:
            stage = await group.stage(1)
            for i in range(10):
                await stage.enqueue(work, i)
            raise RuntimeError("stop")
    assert not await group.exists()
    assert await keys_left(redis) == []


async def test_initiating_in_the_block_ends_buffering(redis):
    """Once a stage is started in the block, later jobs are sent at once."""
    async with astages.within_a_grouping(redis, "early") as group:
        stage = await group.stage(1)
        await stage.enqueue(work, "before")
        await stage.initiate()
        assert await stage.status() is StageStatus.RUNNING
        late = await stage.enqueue(work, "after")
        assert await late.status() is JobStatus.QUEUED
        assert await redis.zcard(default_queue_name) == 2


async def test_concurrent_enqueues_in_the_block(real_redis):
    """Enqueues gathered concurrently in the block all land, each with its own id."""
    async with astages.within_a_grouping(real_redis, "gather") as group:
        stage = await group.stage(1)
        jobs = await asyncio.gather(*(stage.enqueue(work, i) for i in range(500)))
    assert len({job.id for job in jobs}) == 500
    assert await stage.num_jobs() == 500
    assert sorted(j.args[0] for j in await stage.jobs()) == list(range(500))
    for job in jobs[::50]:
        assert (await job.info()).args == job.args


async def test_stage_deleted_in_the_block(redis):
    """Buffered jobs of a stage deleted in the block go with it; other stages keep theirs."""
    async with astages.within_a_grouping(redis, "deleted") as group:
        s1, s2 = await group.stage(1), await group.stage(2)
        await s1.enqueue(work, "gone")
        await s2.enqueue(work, "kept")
        await s1.delete()
        await s2.enqueue(work, "kept too")
    assert list(await group.stages()) == [2]
    assert [j.args[0] for j in await s2.jobs()] == ["kept", "kept too"]


async def test_failed_write_at_the_end_removes_the_group(redis):
    """If the buffered jobs cannot be written when the block ends, the group is removed."""
    with pytest.raises(astages.StageNotFound):
        async with astages.within_a_grouping(redis, "vanishing") as group:
            stage = await group.stage(1)
            await stage.enqueue(work, 1)
            # another process deletes the stage behind this block's back
            other = await astages.StagedGroup.load(redis, group.id)
            await (await other.get_stage(1)).delete()
    assert not await group.exists()
    assert await keys_left(redis) == []


async def test_concurrent_enqueues_beside_a_bulk_call_all_land(real_redis):
    """Single enqueues gathered with an enqueue_many in the block are all recorded (a task
    that was reserving ids used to add to a buffer the bulk call had meanwhile detached)."""
    async with astages.within_a_grouping(real_redis, "gather") as group:
        s1, s2 = await group.stage(1), await group.stage(2)
        results = await asyncio.gather(
            *(s1.enqueue(work, i) for i in range(100)), s2.enqueue_many([(work, (i,)) for i in range(10)])
        )
    assert len(results) == 101
    assert await s1.num_jobs() == 100
    assert await s2.num_jobs() == 10
    assert sorted(j.args[0] for j in await s1.jobs()) == list(range(100))
    assert (await s1.progress()).queued == 100  # stage 1 started with every job


async def test_flush_failing_midway_keeps_what_it_did_not_write(redis, monkeypatch):
    """A write of the buffer that fails part-way (a dropped connection) loses nothing: the
    block catches the error, goes on, and every job whose handle exists is recorded once,
    the run whose reply was lost included."""
    from redis.exceptions import ConnectionError as RedisConnectionError

    from astages._scripts import Store

    original = Store.run_now
    enqueues = 0

    async def flaky(self, name, group_id, *args):
        nonlocal enqueues
        if name == "enqueue":
            enqueues += 1
            if enqueues == 3:
                await original(self, name, group_id, *args)  # Redis ran it; the reply is lost
                raise RedisConnectionError("connection dropped")
            if enqueues == 4:
                raise RedisConnectionError("connection dropped")  # never reached Redis
        return await original(self, name, group_id, *args)

    monkeypatch.setattr(Store, "run_now", flaky)
    async with astages.within_a_grouping(redis, "flaky", prefix="astages") as group:
        s1, s2 = await group.stage(1), await group.stage(2)
        handles = []
        for i in range(6):  # alternating stages: one run per job, one call per run
            handles.append(await s1.enqueue(work, f"a{i}"))
            handles.append(await s2.enqueue(work, f"b{i}"))
        with pytest.raises(RedisConnectionError):
            await group.store.flush()
        with pytest.raises(RedisConnectionError):
            await group.store.flush()
        handles.append(await s1.enqueue(work, "a6"))
    assert [j.args[0] for j in await s1.jobs()] == [f"a{i}" for i in range(7)]
    assert [j.args[0] for j in await s2.jobs()] == [f"b{i}" for i in range(6)]
    assert {j.id for j in await s1.jobs()} | {j.id for j in await s2.jobs()} == {h.id for h in handles}
    assert (await s1.progress()).queued == 7


async def test_enqueues_still_reserving_when_buffering_ends_are_written(real_redis):
    """A call that ends the buffering (here a stage deleted) while enqueues are reserving
    their ids: those jobs are written at once instead of into a buffer nobody flushes."""
    async with astages.within_a_grouping(real_redis, "ending") as group:
        s1, s3 = await group.stage(1), await group.stage(3)
        await asyncio.gather(*(s1.enqueue(work, i) for i in range(100)), s3.delete())
        assert group.store.buffer is None
    assert await s1.num_jobs() == 100
    assert (await s1.progress()).queued == 100
