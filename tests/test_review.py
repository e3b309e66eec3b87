"""Regression tests for bugs found in review (each names what was wrong)."""

from __future__ import annotations

import time

from arq.constants import default_queue_name, result_key_prefix
from arq.jobs import serialize_result

from astages import JobStatus, StagedGroup
from astages.sweeper import Sweeper


async def work(ctx, tag):
    return tag


async def test_recreated_stage_does_not_reuse_job_ids(real_redis):
    """A stage deleted and made again must not hand arq the ids of its old jobs: arq's
    kept result of the old job made the sweeper settle the new, still queued job from
    it (the stage completed before its job ran)."""
    redis = real_redis
    group = await StagedGroup.create(redis, "reuse")
    one = await group.stage(1)
    old = await one.enqueue(work, "old")
    later = await group.stage(5)
    await later.enqueue_to("elsewhere", work, "later")
    await group.initiate()
    # arq ran the old job and kept its result; the worker reported it.
    now = int(time.time() * 1000)
    await redis.set(
        result_key_prefix + str(old.id),
        serialize_result(
            "work", ("old",), {}, 1, now, True, "old", now, now, "ref", default_queue_name, job_id=str(old.id)
        ),
    )
    await redis.delete("arq:job:" + str(old.id))
    await redis.zrem(default_queue_name, str(old.id))
    assert old.ref is not None
    await group.store.move("finish_job", group.id, 1, old.ref.seq, 1, "s", "")
    assert (await group.stage_statuses())[5].value == "running"

    await one.delete()
    one = await group.stage(1)
    new = await one.enqueue(work, "new")
    await (await group.stage(5)).cancel()  # stage 1 (pending, lower) starts now
    assert await new.status() == JobStatus.QUEUED
    await Sweeper(redis).sweep()
    assert await new.status() == JobStatus.QUEUED
    assert await group.exists()
    assert new.id != old.id


async def test_message_on_kept_group_expires_with_it(real_redis):
    """A status message set after a kept group ended (a cancelled job still running)
    must expire with the group, not stay behind as a key with no TTL."""
    redis = real_redis
    group = await StagedGroup.create(redis, "kept", keep_for=60)
    job = await (await group.stage(1)).enqueue(work, "a")
    await group.initiate()
    assert job.ref is not None
    await group.store.run("start_job", group.id, 1, job.ref.seq, 1)
    await group.cancel()
    assert await job.set_status_message("still going")
    ttl = await redis.ttl(group.store.keys.stage_part(group.id, 1, "msg"))
    assert 0 < ttl <= 60


async def test_enqueue_at_long_past_runs_when_its_stage_starts(redis):
    """README: enqueue_at runs the job at ``when``, or when its stage starts if that is
    later. A time more than arq's expires_extra_ms (a day) before the stage started gave
    arq's job record a TTL of 1 ms: arq failed the job as expired, without running it."""
    group = await StagedGroup.create(redis, "late")
    job = await (await group.stage(1)).enqueue_at(time.time() - 2 * 86400, work, "late")
    await group.initiate()
    ttl = await redis.pttl("arq:job:" + str(job.id))
    assert ttl > 86_000_000


async def test_one_call_sends_at_most_send_limit_jobs(redis, monkeypatch):
    """Initiation is sent in chunks of SEND_LIMIT jobs per script call. When a stage
    whose jobs were all final used up the call's budget, the next stage got a budget of
    0 and, from cursor 0, LRANGE 0 -1 sent the whole of it in the same call."""
    monkeypatch.setattr("astages._scripts.SEND_LIMIT", 2)
    group = await StagedGroup.create(redis, "chunks")
    one = await group.stage(1)
    done = [await one.enqueue(work, i) for i in range(2)]
    two = await group.stage(2)
    await two.enqueue_many([(work, (i,)) for i in range(5)])
    for job in done:  # reported final while the stage is pending
        assert job.ref is not None
        await group.store.run("finish_job", group.id, 1, job.ref.seq, 1, "s", "")
    reply = await group.store.run("initiate_group", group.id)
    queued = (await two.progress()).queued
    assert queued <= 2
    assert int(reply[2]) == 5 - queued
    await group.initiate()  # sends the rest
    assert (await two.progress()).queued == 5
