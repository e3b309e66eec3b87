"""The bad-input table of the README's operations section: each user mistake gets a clear
error or a clear job failure, never a stuck group or a crashed worker (real Redis)."""

from __future__ import annotations

import asyncio

import arq.worker
import pytest
from helpers import keys_left, run_burst, stop_when_idle, wait_for
from redis.exceptions import ResponseError

import astages
from astages import (
    AstagesError,
    Cleaner,
    CorruptRecord,
    GroupNotFound,
    InvalidJobFunction,
    InvalidQueue,
    InvalidStageNumber,
    InvalidStatusMessage,
    JobNotFound,
    JobStatus,
    StagedGroup,
    StagedJob,
    StageNotFound,
)

OUTCOMES: dict[str, str] = {}


async def work(ctx, tag):
    """Records the job's outcome in the test (the group deletes itself when done)."""
    OUTCOMES[tag] = "ran"
    return tag


async def noisy(ctx, tag, message):
    """Sets the status message it is given."""
    job = await StagedJob.perform_job(ctx, tag, message)
    try:
        await job.set_status_message(message)
    except AstagesError as e:
        OUTCOMES[tag] = type(e).__name__
        raise
    OUTCOMES[tag] = "ran"


RELEASE = asyncio.Event()


async def hold(ctx, tag):
    """Waits until the test releases it (keeps its group alive to be looked at)."""
    await asyncio.wait_for(RELEASE.wait(), 20)
    OUTCOMES[tag] = "ran"


@pytest.fixture(autouse=True)
def _clear():
    OUTCOMES.clear()
    RELEASE.clear()


async def test_wrong_types_raise_clear_errors(real_redis):
    """Wrong types raise an AstagesError subclass naming the mistake; nothing is recorded."""
    group = await StagedGroup.create(real_redis, "bad types")
    stage = await group.stage(1)
    with pytest.raises(InvalidStageNumber, match="must be an int, not str"):
        await group.stage("1")  # type: ignore[arg-type]
    with pytest.raises(InvalidStageNumber):
        await group.stage(1.5)  # type: ignore[arg-type]
    with pytest.raises(AstagesError, match="description must be a str"):
        await StagedGroup.create(real_redis, 5)  # type: ignore[arg-type]
    with pytest.raises(InvalidJobFunction, match="not int"):
        await stage.enqueue(42)  # type: ignore[arg-type]
    with pytest.raises(InvalidJobFunction):
        await stage.enqueue(print)  # a plain (not async) function
    with pytest.raises(InvalidQueue):
        await stage.enqueue_to(5, work, 1)  # type: ignore[arg-type]
    with pytest.raises(InvalidStatusMessage, match="must be a str, not int"):
        await (await stage.enqueue(work, "m")).set_status_message(5)  # type: ignore[arg-type]
    with pytest.raises(InvalidStatusMessage, match="limited to 65536 characters"):
        await (await stage.enqueue(work, "m")).set_status_message("x" * 1_000_000)
    assert await stage.num_jobs() == 2


async def test_unknown_ids_raise_not_found(real_redis):
    """Unknown group and job ids raise GroupNotFound / JobNotFound and create nothing."""
    with pytest.raises(GroupNotFound):
        await StagedGroup.load(real_redis, "no-such-group")
    with pytest.raises(JobNotFound):
        await StagedJob.load(real_redis, "astages:no-such-group:1:1")
    with pytest.raises(JobNotFound):
        await StagedJob.load(real_redis, "not a staged job id")
    assert await keys_left(real_redis) == []


async def test_deleted_stage_group_and_job(real_redis):
    """Using a deleted stage, group or job raises StageNotFound / GroupNotFound / JobNotFound."""
    group = await StagedGroup.create(real_redis, "deleted")
    stage = await group.stage(1)
    job = await stage.enqueue(work, "j")
    await job.delete()
    with pytest.raises(JobNotFound):
        await job.status()
    await stage.delete()
    for action in (lambda: stage.enqueue(work, 1), stage.status, stage.initiate, stage.delete):
        with pytest.raises(StageNotFound, match=r"call group\.stage"):
            await action()
    await group.delete()
    with pytest.raises(GroupNotFound):
        await group.stage(1)
    with pytest.raises(GroupNotFound):
        await group.initiate()


async def test_unregistered_function_name_fails_the_job_not_the_group(real_redis):
    """A job naming a function no worker has ends failed (arq: 'not found', no hook; the sweeper settles it)."""
    async with astages.within_a_grouping(real_redis, "unregistered") as group:
        stage = await group.stage(1)
        missing = await stage.enqueue("no_such_function", "x")
        await stage.enqueue(work, "ok")
        await (await group.stage(2)).enqueue(hold, "after")
    settings = astages.worker_settings(functions=[work, hold], sweep_interval=0.2, sweep_grace=0.1)
    worker = arq.worker.Worker(**settings, redis_pool=real_redis, poll_delay=0.01, handle_signals=False)
    task = asyncio.ensure_future(worker.main())
    try:

        async def missing_failed() -> bool:
            return await missing.status() is JobStatus.FAILED

        await wait_for(missing_failed, within=10, what="the sweeper to fail the job")
        assert "function 'no_such_function' not found" in (await missing.error() or "")
        RELEASE.set()

        async def gone() -> bool:
            return not await group.exists()

        await wait_for(gone, within=10, what="the group to finish")
    finally:
        await stop_when_idle(worker, task)
    assert OUTCOMES == {"ok": "ran", "after": "ran"}


async def test_bad_status_message_inside_a_job_fails_that_job(real_redis):
    """A job setting a 1 MB or non-str message fails with InvalidStatusMessage; its stage and group go on."""
    async with astages.within_a_grouping(real_redis, "messages") as group:
        stage = await group.stage(1)
        await stage.enqueue(noisy, "big", "x" * 1_000_000)
        await stage.enqueue(noisy, "int", 5)
        await stage.enqueue(noisy, "fine", "ok")
        await (await group.stage(2)).enqueue(work, "after")
    worker = await run_burst(real_redis, [noisy, work])
    assert OUTCOMES == {"big": "InvalidStatusMessage", "int": "InvalidStatusMessage", "fine": "ran", "after": "ran"}
    assert worker.jobs_failed == 2
    assert not await group.exists()


async def test_planted_garbage_is_reported_and_removable(real_redis):
    """Data astages did not write: reads raise CorruptRecord or Redis' WRONGTYPE, check names the group,
    the worker survives, and delete() or purge_all removes it."""
    async with astages.within_a_grouping(real_redis, "garbage") as group:
        stage = await group.stage(1)
        job = await stage.enqueue(work, "g")
    keys = group.store.keys
    await real_redis.hset(keys.stage_part(group.id, 1, "spec"), str(job.ref.seq), b"garbage")
    with pytest.raises(CorruptRecord, match="was not written by astages"):
        await job.info()
    await real_redis.hset(keys.stage_part(group.id, 1, "open"), str(job.ref.seq), b"zz")
    with pytest.raises(CorruptRecord, match="not a job status code"):
        await job.status()
    assert "unknown status code" in " ".join((await Cleaner.check(real_redis))[group.id])
    await real_redis.delete(keys.group(group.id))
    await real_redis.set(keys.group(group.id), b"garbage")
    with pytest.raises(ResponseError, match="WRONGTYPE"):
        await group.status()
    assert (await Cleaner.check(real_redis))[group.id][0].startswith("corrupt record")
    worker = await run_burst(real_redis, [work])  # the job's arq record still exists: the worker runs it
    assert worker.jobs_complete + worker.jobs_failed == 1
    assert (await astages.sweeper.sweep(real_redis, grace=0)).errors == 1  # skipped, logged, not raised
    assert await group.delete()
    assert await keys_left(real_redis) == []


async def test_garbage_in_the_index_and_stage_list(real_redis):
    """Garbage in the index or a stage list is reported by check and dropped by cleanup_jobs."""
    group = await StagedGroup.create(real_redis, "lists")
    await group.stage(1)
    keys = group.store.keys
    await real_redis.zadd(keys.stages(group.id), {"not-a-number": 5})
    assert "unreadable" in (await Cleaner.check(real_redis))[group.id][0]
    report = await Cleaner.cleanup_jobs(real_redis)
    assert report.stages_dropped == (f"{group.id}:not-a-number",)
    assert await Cleaner.check(real_redis) == {}
