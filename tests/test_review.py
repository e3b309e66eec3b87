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
