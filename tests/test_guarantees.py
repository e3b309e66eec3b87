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


async def test_a_sweep_drops_expired_groups_from_the_index(redis):
    """A kept (keep_for) or ttl= group whose keys expired leaves the groups index at the
    next sweep (before, only list() pruned, so the index grew for ever); a live one stays."""
    expired = await StagedGroup.create(redis, "expired", ttl=3600)
    live = await StagedGroup.create(redis, "live", ttl=3600)
    await redis.delete(*await redis.keys(f"astages:{{{expired.id}}}*"))  # as its TTL would
    report = await astages.Sweeper(redis).sweep()
    assert report.unindexed == 1
    assert await redis.zrange("astages:groups", 0, -1) == [live.id.encode()]
    assert await astages.Cleaner.check(redis) == {}


async def test_the_sweepers_second_look_is_timed_by_redis(real_redis, monkeypatch):
    """A job with no trace in arq is failed as lost only when two looks are ``grace``
    apart by Redis' clock: a sweeper whose own clock runs an hour ahead of the one that
    first looked does not fail it at once."""
    import time as real_time

    import astages.sweeper as sweeper_module

    group = await StagedGroup.create(real_redis, "skew")
    job = await (await group.stage(1)).enqueue(work)
    await group.initiate()
    await real_redis.delete(f"arq:job:{job.id}")
    await real_redis.zrem("arq:queue", str(job.id))  # arq lost it: no record, no result
    first = await astages.Sweeper(real_redis, grace=5).sweep()
    assert first.lost == 0 and first.suspects == 1

    class Ahead:
        perf_counter = staticmethod(real_time.perf_counter)

        @staticmethod
        def time() -> float:
            return real_time.time() + 3600

    monkeypatch.setattr(sweeper_module, "time", Ahead)
    second = await astages.Sweeper(real_redis, grace=5).sweep()
    assert second.lost == 0
    assert await job.status() == astages.JobStatus.QUEUED


async def test_jobs_due_now_are_due_by_a_clock_behind_redis(real_redis, monkeypatch):
    """A stage started by a caller (a worker's report, a client) whose clock is a minute
    behind Redis: its jobs' scores are due by that clock, so arq's poll on that machine
    takes them at once (scored by Redis' clock they waited out the skew)."""
    import astages._scripts as scripts

    seconds, micros = await real_redis.time()
    behind = int(seconds) * 1000 + int(micros) // 1000 - 60_000
    monkeypatch.setattr(scripts, "now_ms", lambda: behind)
    group = await StagedGroup.create(real_redis, "skewed")
    stage = await group.stage(1)
    now_job = await stage.enqueue(work)
    later_job = await stage.enqueue_in(5, work)
    await group.initiate()
    assert await real_redis.zscore("arq:queue", str(now_job.id)) == behind
    assert await real_redis.zscore("arq:queue", str(later_job.id)) == behind + 5_000


async def test_a_stage_made_again_does_not_fire_the_old_stages_callbacks(real_redis):
    """A stage's callbacks are deleted with it: a stage deleted after it completed (its
    on_complete fired) and made again under the same number did fire them again, under
    the same arq job id."""
    group = await StagedGroup.create(real_redis, "again")
    s1 = await group.stage(1)
    first = await s1.enqueue(work, 1)
    await s1.on_complete("notify", "old")
    s2 = await group.stage(2)
    await s2.enqueue(work, 2)
    await group.initiate()
    assert first.ref is not None
    await group.store.move("finish_job", group.id, 1, first.ref.seq, 1, "s", "")
    fired = [m for m in await real_redis.zrange("arq:queue", 0, -1) if b":cb:" in m]
    assert len(fired) == 1
    await real_redis.delete(b"arq:job:" + fired[0])  # arq ran it and kept its result
    await real_redis.zrem("arq:queue", fired[0])
    await real_redis.set(b"arq:result:" + fired[0], b"done")
    await s1.delete()
    again = await group.stage(1)  # pending, runs after stage 2
    second = await again.enqueue(work, 3)
    await again.on_complete("notify", "new")
    (job2,) = await s2.jobs()
    assert job2.ref is not None and second.ref is not None
    await group.store.move("finish_job", group.id, 2, job2.ref.seq, 1, "s", "")
    await group.store.move("finish_job", group.id, 1, second.ref.seq, 1, "s", "")
    callbacks = [m for m in await real_redis.zrange("arq:queue", 0, -1) if b":cb:" in m]
    assert len(callbacks) == 1 and callbacks[0] != fired[0]


async def test_cancel_asks_arq_to_abort_only_jobs_it_runs(real_redis):
    """Cancelling asks arq to abort (its arq:abort set) only the jobs arq is running: a job
    astages saw running whose run already ended in arq (its report was lost) left an entry
    nothing ever removed; a job arq re-queued instead leaves arq's queue."""
    group = await StagedGroup.create(real_redis, "abort")
    jobs = await (await group.stage(1)).enqueue_many([(work, (i,)) for i in range(3)])
    await group.initiate()
    ids = [str(j.id) for j in jobs]
    for job in jobs:
        assert job.ref is not None
        await group.store.run("start_job", group.id, 1, job.ref.seq, 1)
    await real_redis.set(f"arq:in-progress:{ids[0]}", b"1")  # arq runs it
    await real_redis.delete(f"arq:job:{ids[1]}")  # ended in arq; its report was lost
    await real_redis.zrem("arq:queue", ids[1])
    # ids[2]: a Retry whose report was lost: back in arq's queue, not in progress
    await group.cancel()
    assert await real_redis.zrange("arq:abort", 0, -1) == [ids[0].encode()]
    assert await real_redis.zrange("arq:queue", 0, -1) == [ids[0].encode()]
    assert not await real_redis.exists(f"arq:job:{ids[2]}")


@pytest.mark.parametrize(
    "options",
    [
        {"keep_for": 1e17},
        {"keep_for": float("nan")},
        {"keep_for": -1},
        {"events": 10**20},
        {"events": 1.5},
        {"ttl": 1e14},
        {"ttl": float("inf")},
        {"ttl": 0},
    ],
)
async def test_group_options_out_of_range_are_refused(redis, options):
    """keep_for, events and ttl out of range are refused with a clear error and nothing is
    created (the scripts also cap them, so none can stop a script half-way)."""
    with pytest.raises(astages.AstagesError, match="must be"):
        await StagedGroup.create(redis, "bad", **options)
    assert await redis.keys("astages:*") == []
