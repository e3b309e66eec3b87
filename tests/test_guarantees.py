"""Regression tests for issue 10's defects that the lead fixed (each says what was wrong)."""

from __future__ import annotations

import pytest

import astages
from astages import StagedGroup


async def work(ctx, *args):
    return args


async def test_wait_sees_an_end_between_subscribing_and_reading(real_redis):
    """A group that ends after wait() subscribed but before it read the group's hash is
    waited for, not reported missing: its summary is already on the subscription."""
    group = await StagedGroup.create(real_redis, "racy")
    job = await (await group.stage(1)).enqueue(work)
    await group.initiate()
    async with group.ending() as ending:
        assert job.ref is not None
        await group.store.move("finish_job", group.id, 1, job.ref.seq, 1, "s", "")
        assert not await group.exists()
        summary = await ending.result(timeout=5)
    assert summary.outcome == "complete"
    assert summary.group_id == group.id


async def test_wait_on_a_deleted_group_is_not_found_at_once(real_redis):
    """A group deleted before the read: GroupNotFound, without waiting for the timeout."""
    group = await StagedGroup.create(real_redis, "deleted")
    async with group.ending() as ending:
        await group.delete()
        with pytest.raises(astages.GroupNotFound):
            await ending.result(timeout=30)


async def test_wait_racing_the_end_never_misses_it(real_redis):
    """wait() started at the same moment as the group's last report returns the summary
    every time (before the fix: GroupNotFound in 16 of 300 such races)."""
    import asyncio

    for i in range(100):
        group = await StagedGroup.create(real_redis, f"race {i}")
        job = await (await group.stage(1)).enqueue(work)
        await group.initiate()
        assert job.ref is not None
        finish = group.store.move("finish_job", group.id, 1, job.ref.seq, 1, "s", "")
        summary, _ = await asyncio.gather(group.wait(timeout=10), finish)
        assert summary.outcome == "complete"


async def test_a_job_of_a_pending_stage_is_not_sent(redis):
    """job.enqueue_job() on a job of a stage that has not started refuses (StageNotRunning)
    and sends nothing: it would run beside, or before, the stages ahead of it."""
    group = await StagedGroup.create(redis, "early")
    first = await (await group.stage(1)).enqueue(work, 1)
    later = await (await group.stage(2)).enqueue(work, 2)
    await group.initiate()
    with pytest.raises(astages.StageNotRunning):
        await later.enqueue_job()
    assert await later.pending()
    assert await redis.zrange("arq:queue", 0, -1) == [str(first.id).encode()]
    assert await astages.Cleaner.check(redis) == {}


async def test_a_pending_job_of_a_running_stage_is_sent(redis):
    """job.enqueue_job() sends a job its running stage has not sent yet (chunked sending)."""
    from helpers import start_unsent

    group = await StagedGroup.create(redis, "chunked")
    jobs = await (await group.stage(1)).enqueue_many([(work, (i,)) for i in range(5)])
    await start_unsent(group, 1)
    await jobs[3].enqueue_job()
    assert [await j.status() for j in jobs] == [astages.JobStatus.PENDING] * 3 + [
        astages.JobStatus.QUEUED,
        astages.JobStatus.PENDING,
    ]
    assert await redis.zrange("arq:queue", 0, -1) == [str(jobs[3].id).encode()]
    assert await astages.Cleaner.check(redis) == {}


async def test_every_key_of_a_ttl_group_expires_after_a_failure(real_redis):
    """A ttl= group's stage whose first job fails: its :err hash gets the group's TTL too
    (it was created without one, outlived the group, and the Cleaner rebuilt a ghost
    group from it)."""
    group = await StagedGroup.create(real_redis, "ttl", ttl=3600)
    jobs = await (await group.stage(1)).enqueue_many([(work, (i,)) for i in range(2)])
    await group.initiate()
    ref = jobs[0].ref
    assert ref is not None
    await group.store.run("start_job", group.id, 1, ref.seq, 1)
    await group.store.move("finish_job", group.id, 1, ref.seq, 1, "f", "boom")
    keys = await real_redis.keys(f"astages:{{{group.id}}}*")
    assert any(k.endswith(b":err") for k in keys)
    assert {k: await real_redis.pttl(k) > 0 for k in keys} == {k: True for k in keys}
    assert await astages.Cleaner.check(real_redis) == {}
