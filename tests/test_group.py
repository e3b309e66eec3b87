"""Groups, stages and jobs through the public API, without workers (both backends)."""

from __future__ import annotations

import datetime as dt

import pytest
from arq.constants import default_queue_name, job_key_prefix
from helpers import keys_left

import astages
from astages import JobStatus, StagedGroup, StageStatus


async def work(ctx, *args, **kwargs):
    return args


async def astages_keys(redis) -> list[str]:
    return sorted(k.decode() for k in await keys_left(redis))


async def queued_ids(redis, queue: str = default_queue_name) -> list[str]:
    return [m.decode() for m in await redis.zrange(queue, 0, -1)]


async def test_within_a_grouping_records_then_initiates(redis):
    """Jobs recorded inside the block are pending; leaving it starts the lowest stage."""
    async with astages.within_a_grouping(redis, "nightly") as group:
        s1 = await group.stage(1)
        jobs = [await s1.enqueue(work, i, "p") for i in range(3)]
        s2 = await group.stage(2)
        await s2.enqueue("work", -1)
        assert await s1.status() is StageStatus.PENDING
        assert [await j.status() for j in jobs] == [JobStatus.PENDING] * 3
        assert await queued_ids(redis) == []
    assert await group.status() == "running"
    assert await s1.status() is StageStatus.RUNNING
    assert await s2.status() is StageStatus.PENDING
    assert sorted(await queued_ids(redis)) == sorted(str(j.id) for j in jobs)
    assert [await j.status() for j in jobs] == [JobStatus.QUEUED] * 3
    assert await redis.exists(job_key_prefix + str(jobs[0].id))


async def test_exception_in_block_removes_group(redis):
    """An exception inside within_a_grouping deletes the group and propagates."""
    with pytest.raises(ValueError, match="boom"):
        async with StagedGroup.within_a_grouping(redis, "doomed") as group:
            await (await group.stage(1)).enqueue(work, 1)
            raise ValueError("boom")
    assert not await group.exists()
    assert await astages_keys(redis) == []
    assert await queued_ids(redis) == []


async def test_stages_run_in_number_order(redis):
    """Stages 8, 0, 2 created in that order run 0, 2, 8."""
    group = await StagedGroup.create(redis, "order")
    for n in (8, 0, 2):
        await (await group.stage(n)).enqueue(work, n)
    assert list(await group.stages()) == [0, 2, 8]
    await group.initiate()
    statuses = await group.stage_statuses()
    assert statuses == {0: StageStatus.RUNNING, 2: StageStatus.PENDING, 8: StageStatus.PENDING}
    current = await group.current_stage()
    assert current is not None and current.number == 0
    last = await group.last_stage()
    assert last is not None and last.number == 8
    assert await group.num_stages() == 3


async def test_empty_stages_complete_at_once(redis):
    """An empty stage completes when initiated and the next non-empty stage starts."""
    group = await StagedGroup.create(redis, "gaps")
    await group.stage(1)
    await group.stage(2)
    s3 = await group.stage(3)
    await s3.enqueue(work, 3)
    await group.initiate()
    assert await group.stage_statuses() == {
        1: StageStatus.COMPLETE,
        2: StageStatus.COMPLETE,
        3: StageStatus.RUNNING,
    }


async def test_group_with_only_empty_stages_finishes(redis):
    """A group with nothing to run finishes and deletes itself when initiated."""
    async with astages.within_a_grouping(redis, "nothing") as group:
        await group.stage(1)
        await group.stage(2)
    assert not await group.exists()
    assert await astages_keys(redis) == []


async def test_reading_never_creates(redis):
    """Loading or reading an unknown group raises and leaves no key behind."""
    with pytest.raises(astages.GroupNotFound):
        await StagedGroup.load(redis, "no-such-group")
    ghost = StagedGroup(await _store(redis), "ghost")
    assert not await ghost.exists()
    with pytest.raises(astages.GroupNotFound):
        await ghost.stages()
    with pytest.raises(astages.GroupNotFound):
        await ghost.stage(1)
    with pytest.raises(astages.JobNotFound):
        await astages.StagedJob.load(redis, "astages:ghost:1:1")
    with pytest.raises(astages.JobNotFound):
        await astages.StagedJob.load(redis, "not-a-staged-id")
    assert await astages_keys(redis) == []


async def _store(redis):
    from astages._keys import Keys
    from astages._scripts import Store

    return Store(redis, Keys())


async def test_load_and_list(redis):
    """load() returns the stored description and time; list() pages live groups oldest first."""
    made = [await StagedGroup.create(redis, f"g{i}") for i in range(3)]
    loaded = await StagedGroup.load(redis, made[1].id)
    assert (loaded.description, loaded.created_at) == ("g1", made[1].created_at)
    assert [g.id for g in await StagedGroup.list(redis)] == [g.id for g in made]
    assert [g.description for g in await StagedGroup.list(redis, 1, 1)] == ["g1"]
    assert await StagedGroup.count(redis) == 3
    await made[0].delete()
    assert [g.id for g in await StagedGroup.list(redis)] == [g.id for g in made[1:]]


async def test_description_defaults_to_id(redis):
    """A group made without a description is described by its id."""
    group = await StagedGroup.create(redis)
    assert (await StagedGroup.load(redis, group.id)).description == group.id


@pytest.mark.parametrize("number", ["1", 1.0, None, True])
async def test_stage_number_must_be_int(redis, number):
    """A stage number that is not an int is a clear error."""
    group = await StagedGroup.create(redis, "bad")
    with pytest.raises(astages.InvalidStageNumber, match="must be an int"):
        await group.stage(number)


@pytest.mark.parametrize("function", [42, None, "", print, lambda ctx: None])
async def test_job_function_must_be_name_or_coroutine(redis, function):
    """A job function that is neither a name nor a coroutine function is rejected, nothing recorded."""
    group = await StagedGroup.create(redis, "bad")
    stage = await group.stage(1)
    with pytest.raises(astages.InvalidJobFunction):
        await stage.enqueue(function, 1)
    assert await stage.num_jobs() == 0


async def test_enqueue_into_deleted_group_or_stage(redis):
    """Enqueueing into a deleted group or stage raises instead of creating ghosts."""
    group = await StagedGroup.create(redis, "gone")
    stage = await group.stage(1)
    other = await group.stage(2)
    await other.delete()
    with pytest.raises(astages.StageNotFound):
        await other.enqueue(work, 1)
    await group.delete()
    with pytest.raises(astages.GroupNotFound):
        await stage.enqueue(work, 1)
    assert await astages_keys(redis) == []


async def test_complete_stage_takes_no_jobs(redis):
    """A complete stage refuses new jobs (the gem reopened it)."""
    group = await StagedGroup.create(redis, "done")
    s1 = await group.stage(1)
    await (await group.stage(2)).enqueue(work, 2)
    await group.initiate()
    assert await s1.status() is StageStatus.COMPLETE
    with pytest.raises(astages.StageComplete, match="takes no new jobs"):
        await s1.enqueue(work, 1)
    assert await s1.num_jobs() == 0


async def test_enqueue_into_running_stage_sends_at_once(redis):
    """A job added to a running stage goes to arq's queue immediately."""
    async with astages.within_a_grouping(redis, "live") as group:
        stage = await group.stage(1)
        await stage.enqueue(work, 1)
    late = await stage.enqueue(work, 2)
    assert await late.status() is JobStatus.QUEUED
    assert str(late.id) in await queued_ids(redis)


async def test_queue_and_schedule_kept_until_sent(redis):
    """Queue, at and in recorded on a pending stage are honoured when it starts."""
    when = dt.datetime.now(tz=dt.UTC) + dt.timedelta(hours=1)
    async with astages.within_a_grouping(redis, "sched") as group:
        stage = await group.stage(1)
        to = await stage.enqueue_to("other:queue", work, 1)
        at = await stage.enqueue_at(when, work, 2)
        at_q = await stage.enqueue_at_with_queue("other:queue", when, work, 3)
        later = await stage.enqueue_in(dt.timedelta(seconds=30), work, 4)
        later_q = await stage.enqueue_in_with_queue("other:queue", 60, work, 5)
        kw = await stage.enqueue(work, 6, _queue_name="other:queue", _defer_by=5, flag=True)
        sent_after = int(dt.datetime.now(tz=dt.UTC).timestamp() * 1000) - 1
    sent_before = int(dt.datetime.now(tz=dt.UTC).timestamp() * 1000) + 1
    other = {m.decode(): s for m, s in await redis.zrange("other:queue", 0, -1, withscores=True)}
    default = {m.decode(): s for m, s in await redis.zrange(default_queue_name, 0, -1, withscores=True)}
    assert set(other) == {str(to.id), str(at_q.id), str(later_q.id), str(kw.id)}
    assert set(default) == {str(at.id), str(later.id)}
    assert default[str(at.id)] == other[str(at_q.id)] == int(when.timestamp() * 1000)
    assert sent_after + 30_000 <= default[str(later.id)] <= sent_before + 30_000
    assert sent_after + 60_000 <= other[str(later_q.id)] <= sent_before + 60_000
    assert sent_after + 5_000 <= other[str(kw.id)] <= sent_before + 5_000
    info = await kw.info()
    assert info.kwargs == {"flag": True} and info.queue_name == "other:queue"


async def test_lower_stage_added_to_running_group_runs_next(redis):
    """A stage numbered below the running one is the next to run."""
    async with astages.within_a_grouping(redis, "insert") as group:
        await (await group.stage(5)).enqueue(work, 5)
        await (await group.stage(9)).enqueue(work, 9)
    s1 = await group.stage(1)
    job = await s1.enqueue(work, 1)
    assert await job.status() is JobStatus.PENDING
    (five,) = await (await group.stage(5)).jobs()
    await five.delete()  # stage 5's last job: stage 5 completes and the group moves on
    assert await group.stage_statuses() == {
        1: StageStatus.RUNNING,
        5: StageStatus.COMPLETE,
        9: StageStatus.PENDING,
    }


async def test_deleting_running_stage_moves_group_on(redis):
    """Deleting the running stage starts the next one (the gem got stuck)."""
    async with astages.within_a_grouping(redis, "del") as group:
        s1 = await group.stage(1)
        job = await s1.enqueue(work, 1)
        await (await group.stage(2)).enqueue(work, 2)
    await s1.delete()
    assert not await s1.exists()
    assert await group.stage_statuses() == {2: StageStatus.RUNNING}
    assert str(job.id) not in await queued_ids(redis)
    assert not await redis.exists(job_key_prefix + str(job.id))
    with pytest.raises(astages.StageNotFound):
        await s1.delete()


async def test_deleting_last_stage_finishes_group(redis):
    """Deleting the only stage of a running group finishes it."""
    async with astages.within_a_grouping(redis, "del") as group:
        await (await group.stage(1)).enqueue(work, 1)
    await (await group.stage(1)).delete()
    assert not await group.exists()
    assert await astages_keys(redis) == []


async def test_job_accessors(redis):
    """A job keeps its function, args, kwargs, queue time; predicates follow the seed."""
    before = dt.datetime.now(tz=dt.UTC) - dt.timedelta(seconds=1)
    group = await StagedGroup.create(redis, "acc")
    stage = await group.stage(1)
    job = await stage.enqueue(work, 1, "two", three=3)
    assert (job.function, job.class_name, job.args, job.kwargs) == ("work", "work", (1, "two"), {"three": 3})
    assert job.queue_time is not None and job.queue_time >= before
    assert job.stage() == stage and job.stage().group == group
    assert await job.exists() and not job.blank
    assert await job.pending() and not await job.queued() and not await job.completed()
    loaded = await astages.StagedJob.load(redis, str(job.id))
    assert (loaded.function, loaded.args, loaded.kwargs, loaded.queue_time) == (
        job.function,
        job.args,
        job.kwargs,
        job.queue_time,
    )
    assert await job.status_message() == ""
    assert await job.set_status_message("half way")
    assert await loaded.status_message() == "half way"
    with pytest.raises(astages.StageNotRunning):
        await job.enqueue_job()  # its stage is pending: sending it would run it early
    assert await job.pending()
    await group.initiate()
    assert await job.queued() and not await job.pending()
    with pytest.raises(astages.JobNotPending):
        await job.enqueue_job()
    info = await job.info()
    assert (info.status, info.tries, info.status_message, info.error) == (JobStatus.QUEUED, 0, "half way", None)


@pytest.mark.parametrize("message", [None, 12, b"bytes", "x" * 1_000_001])
async def test_bad_status_message(redis, message):
    """A message that is not a str, or is too long, is a clear error and nothing is written."""
    group = await StagedGroup.create(redis, "msg")
    job = await (await group.stage(1)).enqueue(work, 1)
    with pytest.raises(astages.InvalidStatusMessage):
        await job.set_status_message(message)
    assert await job.status_message() == ""


async def test_message_on_deleted_job_writes_nothing(redis):
    """Setting the message of a deleted job returns False and creates nothing."""
    group = await StagedGroup.create(redis, "msg")
    stage = await group.stage(1)
    keep = await stage.enqueue(work, 0)
    job = await stage.enqueue(work, 1)
    await job.delete()
    assert not await job.exists()
    assert await job.set_status_message("late") is False
    assert not await redis.exists(f"astages:{{{group.id}}}:s:1:msg")
    assert [j.args for j in await stage.jobs()] == [keep.args]
    with pytest.raises(astages.JobNotFound):
        await job.delete()


async def test_jobs_in_enqueue_order_and_pages(redis):
    """jobs() lists in enqueue order; offset/limit give a page; progress counts in O(1)."""
    group = await StagedGroup.create(redis, "pages")
    stage = await group.stage(1)
    made = await stage.enqueue_many([(work, (i,)) for i in range(25)] + [(work, (99,), {"k": 1})])
    assert await stage.num_jobs() == 26
    assert [j.args[0] for j in await stage.jobs()] == [*range(25), 99]
    assert [j.args[0] for j in await stage.jobs(10, 5)] == [10, 11, 12, 13, 14]
    assert made[-1].kwargs == {"k": 1} and made[3].id == (await stage.jobs(3, 1))[0].id
    progress = await stage.progress()
    assert (progress.pending, progress.total, progress.open) == (26, 26, 26)
    statuses = await stage.job_statuses(made[:2])
    assert statuses == [("pending", 0, ""), ("pending", 0, "")]


async def test_enqueue_many_big_batch(redis):
    """enqueue_many records more jobs than one script call takes, in order."""
    group = await StagedGroup.create(redis, "bulk")
    stage = await group.stage(1)
    await stage.enqueue_many((work, (i,)) for i in range(4_500))
    assert await stage.num_jobs() == 4_500
    assert [j.args[0] for j in await stage.jobs(4_498)] == [4_498, 4_499]


async def test_job_id_option_rejected(redis):
    """_job_id is astages' to choose."""
    stage = await (await StagedGroup.create(redis, "id")).stage(1)
    with pytest.raises(astages.InvalidJobFunction, match="_job_id"):
        await stage.enqueue(work, 1, _job_id="mine")


async def test_big_stage_is_sent_in_chunks(redis):
    """Initiating a stage of more jobs than one chunk sends them all, in order (with no window)."""
    group = await StagedGroup.create(redis, "chunks", window=None)
    stage = await group.stage(1)
    await stage.enqueue_many((work, (i,)) for i in range(2_500))
    await group.initiate()
    progress = await stage.progress()
    assert (progress.pending, progress.queued) == (0, 2_500)
    assert await redis.zcard(default_queue_name) == 2_500


async def test_stage_info_and_get_stage(redis):
    """stage.info() gives status, times and counts; get_stage() never creates a stage."""
    async with astages.within_a_grouping(redis, "info") as group:
        s1 = await group.stage(1)
        await s1.enqueue(work, 1)
        await group.stage(2)
    info = await s1.info()
    assert info.status is StageStatus.RUNNING and info.progress.queued == 1
    assert info.created is not None and info.started is not None and info.finished is None
    assert info.duration is not None and info.duration >= dt.timedelta(0)
    assert (await group.get_stage(1)) == s1
    with pytest.raises(astages.StageNotFound):
        await group.get_stage(3)
    assert await group.num_stages() == 2
    with pytest.raises(astages.InvalidStageNumber):
        await group.get_stage("1")
    await group.delete()
    with pytest.raises(astages.GroupNotFound):
        await group.get_stage(1)
    with pytest.raises(astages.StageNotFound):
        await s1.info()


@pytest.mark.parametrize(
    ("method", "value"), [("enqueue_at", "tomorrow"), ("enqueue_in", "soon"), ("enqueue_in", None)]
)
async def test_bad_schedule(redis, method, value):
    """A time or delay that is not one is InvalidSchedule, and nothing is recorded."""
    stage = await (await StagedGroup.create(redis, "when")).stage(1)
    with pytest.raises(astages.InvalidSchedule):
        await getattr(stage, method)(value, work, 1)
    assert await stage.num_jobs() == 0
