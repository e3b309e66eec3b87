"""Callbacks, failure policies, cancellation, wait(), progress, retention, events, growth."""

from __future__ import annotations

import asyncio
import time

import pytest
from arq.constants import default_queue_name
from arq.worker import Worker
from helpers import run_burst, wait_for

import astages
from astages import FailurePolicy, GroupStatus, JobStatus, StagedGroup, StageStatus

CALLS: list[tuple[str, astages.GroupSummary, tuple]] = []
RUNS: list[str] = []


@pytest.fixture(autouse=True)
def _clear():
    CALLS.clear()
    RUNS.clear()


async def work(ctx, tag, fail=False, sleep=0.0):
    RUNS.append(tag)
    if sleep:
        await asyncio.sleep(sleep)
    if fail:
        raise ValueError(f"{tag} failed")
    return tag


async def grow(ctx, tag):
    """Adds a job to its own stage and one to the next stage while running."""
    job = await astages.StagedJob.perform_job(ctx, tag)
    stage = job.stage()
    await stage.enqueue(work, f"{tag}-child")
    nxt = await stage.group.stage(stage.number + 1)
    await nxt.enqueue(work, f"{tag}-next")
    RUNS.append(tag)


async def done(ctx, summary, name, *extra):
    CALLS.append((name, summary, extra))


FUNCTIONS = [work, grow, done]


async def finish(job: astages.StagedJob, outcome: str, error: str = "") -> str:
    assert job.ref is not None
    store = job.stage().group.store
    motion = await store.move("finish_job", job.ref.group_id, job.ref.stage, job.ref.seq, 1, outcome, error)
    return motion.outcome


async def test_callbacks_fire_once_with_summary(redis):
    """on_complete, on_failure and a stage's on_complete fire once; on_success does not after a failure."""
    async with astages.within_a_grouping(redis, "cb") as group:
        s1 = await group.stage(1)
        await s1.enqueue(work, "a")
        await s1.enqueue(work, "bad", fail=True)
        await (await group.stage(2)).enqueue(work, "b")
        await group.on_complete(done, "complete", 1)
        await group.on_success(done, "success")
        await group.on_failure(done, "failure")
        await s1.on_complete(done, "stage1")
    await run_burst(redis, FUNCTIONS)
    names = sorted(name for name, _, _ in CALLS)
    assert names == ["complete", "failure", "stage1"]
    complete = next(s for n, s, _ in CALLS if n == "complete")
    assert complete.outcome == "complete" and complete.description == "cb"
    assert [(s.number, s.successful, s.failed) for s in complete.stages] == [(1, 1, 1), (2, 1, 0)]
    assert len(complete.failed_jobs) == 1 and complete.failed_jobs[0].startswith(f"astages:{group.id}:1:")
    assert next(extra for n, _, extra in CALLS if n == "complete") == (1,)
    stage1 = next(s for n, s, _ in CALLS if n == "stage1")
    assert stage1.stage == 1 and stage1.outcome == "running"
    assert not await group.exists()


async def test_success_callback(redis):
    """on_success fires when no job failed."""
    async with astages.within_a_grouping(redis, "ok") as group:
        await (await group.stage(1)).enqueue(work, "a")
        await group.on_success(done, "success")
    await run_burst(redis, FUNCTIONS)
    assert [n for n, _, _ in CALLS] == ["success"]
    assert CALLS[0][1].failed_jobs == ()


async def test_callback_exactly_once_when_last_jobs_race(real_redis):
    """The last two jobs finishing together enqueue the group's callback exactly once."""
    for _ in range(20):
        async with astages.within_a_grouping(real_redis, "race") as group:
            stage = await group.stage(1)
            jobs = await stage.enqueue_many([(work, (i,)) for i in range(2)])
            await group.on_complete(done, "complete")
        outcomes = await asyncio.gather(*(finish(j, "s") for j in jobs), *(finish(j, "s") for j in jobs))
        assert outcomes.count("finished") == 1
    callbacks = [m for m in await real_redis.zrange(default_queue_name, 0, -1) if b":cb:" in m]
    assert len(callbacks) == 20


async def test_halt_policy_stops_group(redis):
    """With 'halt', the first failure cancels the rest; later stages never start; the group ends failed."""
    async with astages.within_a_grouping(redis, "halt", failure_policy="halt", keep_for=60) as group:
        s1 = await group.stage(1)
        await s1.enqueue(work, "bad", fail=True)
        for i in range(5):
            await s1.enqueue(work, f"slow{i}", sleep=0.3)
        s2 = await group.stage(2)
        await s2.enqueue(work, "never")
        await group.on_complete(done, "complete")
    await run_burst(redis, FUNCTIONS, max_jobs=1)
    assert "never" not in RUNS
    assert await group.status() is GroupStatus.FAILED
    assert await s2.status() is StageStatus.CANCELLED
    (summary,) = [s for n, s, _ in CALLS if n == "complete"]
    assert summary.outcome == "failed"
    progress = await s1.progress()
    assert (progress.failed, progress.cancelled, progress.open) == (1, 5, 0)


async def test_threshold_policy(redis):
    """A stage halts when more than max_failed jobs failed; a stage may override the group."""
    async with astages.within_a_grouping(redis, "threshold", keep_for=60) as group:
        s1 = await group.stage(1)
        await s1.set_failure_policy(FailurePolicy(max_failed=2))
        jobs = await s1.enqueue_many([(work, (i,)) for i in range(10)])
        await (await group.stage(2)).enqueue(work, "later")
    assert await finish(jobs[0], "f") == "open"
    assert await finish(jobs[1], "f") == "open"
    assert await finish(jobs[2], "f") == "finished"
    assert await group.status() is GroupStatus.FAILED
    assert await jobs[5].status() is JobStatus.CANCELLED


async def test_ratio_policy(redis):
    """max_ratio halts when more than that share of a stage's jobs failed."""
    group = await StagedGroup.create(redis, "ratio", keep_for=60, failure_policy=FailurePolicy(max_ratio=0.25))
    stage = await group.stage(1)
    jobs = await stage.enqueue_many([(work, (i,)) for i in range(8)])
    await group.initiate()
    assert await finish(jobs[0], "f") == "open"  # 1/8
    assert await finish(jobs[1], "f") == "open"  # 2/8 = 0.25, not more
    assert await finish(jobs[2], "f") == "finished"  # 3/8
    assert (await group.summary()).outcome == "failed"


@pytest.mark.parametrize("bad", [FailurePolicy, "sometimes"])
def test_bad_policy(bad):
    """A policy that makes no sense is refused."""
    with pytest.raises(ValueError):
        if bad is FailurePolicy:
            FailurePolicy(max_failed=-1)
        else:
            FailurePolicy.of(bad)


async def test_cancel_group(redis):
    """cancel() takes unstarted jobs out of arq's queue, marks them cancelled, fires callbacks once."""
    async with astages.within_a_grouping(redis, "cancel", keep_for=60) as group:
        s1 = await group.stage(1)
        jobs = await s1.enqueue_many([(work, (i,)) for i in range(5)])
        s2 = await group.stage(2)
        await s2.enqueue(work, "never")
        await group.on_complete(done, "complete")
    assert await redis.zcard(default_queue_name) == 5
    motion = await group.cancel()
    assert motion.finished
    queued = await redis.zrange(default_queue_name, 0, -1)
    assert all(b":cb:" in m for m in queued) and len(queued) == 1
    assert [await j.status() for j in jobs] == [JobStatus.CANCELLED] * 5
    assert await group.status() is GroupStatus.CANCELLED
    assert (await group.cancel()).finished  # again: nothing more happens
    with pytest.raises(astages.GroupFinished):
        await group.stage(3)
    await run_burst(redis, FUNCTIONS)
    assert RUNS == []
    assert [(n, s.outcome) for n, s, _ in CALLS] == [("complete", "cancelled")]


async def test_cancel_stage_moves_group_on(redis):
    """Cancelling the running stage ends it and starts the next."""
    async with astages.within_a_grouping(redis, "cancel-stage") as group:
        s1 = await group.stage(1)
        await s1.enqueue(work, "x")
        await (await group.stage(2)).enqueue(work, "y")
    await s1.cancel()
    assert await group.stage_statuses() == {1: StageStatus.CANCELLED, 2: StageStatus.RUNNING}
    with pytest.raises(astages.StageComplete, match="cancelled"):
        await s1.enqueue(work, "late")
    await run_burst(redis, FUNCTIONS)
    assert RUNS == ["y"]
    assert not await group.exists()


async def test_cancel_races_with_finishing_jobs(real_redis):
    """Cancel while jobs finish: the group ends once, every job is final exactly once."""
    for _ in range(10):
        async with astages.within_a_grouping(real_redis, "race", keep_for=60) as group:
            stage = await group.stage(1)
            jobs = await stage.enqueue_many([(work, (i,)) for i in range(20)])
            await (await group.stage(2)).enqueue(work, "later")
            await group.on_complete(done, "complete")
        results = await asyncio.gather(group.cancel(), *(finish(j, "s") for j in jobs))
        progress = await stage.progress()
        assert progress.successful + progress.cancelled == 20 and progress.open == 0
        assert await group.status() is GroupStatus.CANCELLED
        assert results[0].finished
    callbacks = [m for m in await real_redis.zrange(default_queue_name, 0, -1) if b":cb:" in m]
    assert len(callbacks) == 10


async def test_cancel_aborts_running_job(real_redis):
    """A running job is aborted through arq when the worker allows aborts."""
    async with astages.within_a_grouping(real_redis, "abort", keep_for=60) as group:
        job = await (await group.stage(1)).enqueue(work, "long", sleep=30)
    settings = astages.worker_settings(functions=FUNCTIONS, allow_abort_jobs=True, poll_delay=0.01)
    worker = Worker(**settings, redis_pool=real_redis, burst=False, handle_signals=False)
    task = asyncio.create_task(worker.main())
    try:

        async def running() -> bool:
            return await job.status() is JobStatus.RUNNING

        await wait_for(running, within=10, what="the job to start")
        started = time.monotonic()
        await group.cancel()

        async def aborted() -> bool:
            return worker.jobs_failed == 1

        await wait_for(aborted, within=10, what="arq to abort the job")
        assert time.monotonic() - started < 15  # the job sleeps 30 s: aborted, not finished
        assert await job.status() is JobStatus.CANCELLED
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await worker.close()


async def test_wait_wakes_on_finish(real_redis, redis_server):
    """wait() from another connection returns the summary when the group ends."""
    from arq.connections import create_pool

    async with astages.within_a_grouping(real_redis, "wait") as group:
        await (await group.stage(1)).enqueue(work, "a")
    other = await create_pool(redis_server.settings)
    try:
        waiter = asyncio.create_task((await StagedGroup.load(other, group.id)).wait(timeout=20))
        await asyncio.sleep(0)  # let it subscribe before the worker runs
        await run_burst(real_redis, FUNCTIONS)
        summary = await waiter
        assert summary.outcome == "complete" and summary.successful == 1
    finally:
        await other.aclose()


async def test_wait_timeout_and_gone(real_redis):
    """wait() times out, and raises GroupNotFound for a group that is gone."""
    group = await StagedGroup.create(real_redis, "slow")
    await (await group.stage(1)).enqueue(work, "a")
    with pytest.raises(TimeoutError):
        await group.wait(timeout=0.2)
    waiter = asyncio.create_task(group.wait(timeout=10))
    await asyncio.sleep(0.05)
    await group.delete()
    with pytest.raises(astages.GroupNotFound):
        await waiter
    with pytest.raises(astages.GroupNotFound):
        await group.wait()


async def test_keep_for_retains_summary(redis):
    """A group made with keep_for stays readable with its summary, under a TTL."""
    async with astages.within_a_grouping(redis, "kept", keep_for=120) as group:
        await (await group.stage(1)).enqueue(work, "a")
        await (await group.stage(1)).enqueue(work, "b", fail=True)
    await run_burst(redis, FUNCTIONS)
    assert await group.status() is GroupStatus.COMPLETE
    summary = await group.summary()
    assert summary is not None and (summary.successful, summary.failed) == (1, 1)
    assert (await group.wait()).outcome == "complete"
    ttls = [await redis.ttl(k) for k in await redis.keys("astages:{*")]
    assert ttls and all(0 < t <= 120 for t in ttls)
    assert [g.id for g in await StagedGroup.list(redis)] == [group.id]
    jobs = await (await group.stage(1)).jobs()
    assert [await j.status() for j in jobs] == [JobStatus.SUCCESSFUL, JobStatus.FAILED]


async def test_progress_and_events(redis):
    """progress() counts per status in O(stages); the timeline records each transition."""
    async with astages.within_a_grouping(redis, "timeline", keep_for=60) as group:
        s1 = await group.stage(1)
        await s1.enqueue(work, "a")
        await s1.enqueue(work, "b", fail=True)
        await (await group.stage(2)).enqueue(work, "c")
    progress = await group.progress()
    assert (progress[1].queued, progress[2].pending) == (2, 1)
    await run_burst(redis, FUNCTIONS)
    events = await group.events(1000)
    seen = [(e.kind, e.to_status) for e in events]
    assert seen.count(("job", "running")) == 3 and seen.count(("job", "successful")) == 2
    assert ("job", "failed") in seen and ("stage", "complete") in seen and ("group", "complete") in seen
    assert seen.index(("stage", "complete")) < len(seen) - 1
    failed = next(e for e in events if e.to_status == "failed")
    assert failed.details["error"].startswith("ValueError: b failed") and failed.from_status == "running"
    page = await group.events(2, after=events[1].id)
    assert [e.id for e in page] == [e.id for e in events[2:4]]


async def test_events_can_be_off(redis):
    """events=0 keeps no timeline."""
    async with astages.within_a_grouping(redis, "quiet", events=0, keep_for=60) as group:
        await (await group.stage(1)).enqueue(work, "a")
    await run_burst(redis, FUNCTIONS)
    assert await group.events() == []


async def test_running_job_grows_its_stage(redis):
    """A job adding jobs to its own and the next stage: the stage waits for the added job."""
    async with astages.within_a_grouping(redis, "grow") as group:
        await (await group.stage(1)).enqueue(grow, "g")
    await run_burst(redis, FUNCTIONS)
    assert RUNS.index("g-child") < RUNS.index("g-next")
    assert sorted(RUNS) == ["g", "g-child", "g-next"]
    assert not await group.exists()


async def test_failure_callback_registered_after_the_failure(redis):
    """on_failure registered after the group's first failure is enqueued at once; an ended
    stage takes no callback."""
    async with astages.within_a_grouping(redis, "late") as group:
        s1 = await group.stage(1)
        jobs = await s1.enqueue_many([(work, ("a",)), (work, ("b",))])
        await (await group.stage(2)).enqueue(work, "c")
    assert await finish(jobs[0], "f", "boom") == "open"
    await group.on_failure(done, "failure")
    queued = [m for m in await redis.zrange(default_queue_name, 0, -1) if b":cb:failure:" in m]
    assert len(queued) == 1
    assert await finish(jobs[1], "s") == "running"
    with pytest.raises(astages.StageComplete):
        await s1.on_complete(done, "too late")


async def test_ending_is_subscribed_before_the_block(redis):
    """An end that happens inside `async with group.ending()` is always heard."""
    for _ in range(5):
        async with astages.within_a_grouping(redis, "ending") as group:
            (job,) = await (await group.stage(1)).enqueue_many([(work, ("a",))])
        async with group.ending() as ending:
            assert await finish(job, "s") == "finished"
            summary = await ending.wait(timeout=5)
        assert summary.outcome == "complete" and summary.group_id == group.id
    async with astages.within_a_grouping(redis, "deleted") as group:
        await (await group.stage(1)).enqueue(work, "b")
    async with group.ending() as ending:
        await group.delete()
        with pytest.raises(astages.GroupNotFound):
            await ending.wait(timeout=5)


async def test_newest_events(redis):
    """events(newest=True) gives the latest events, oldest first."""
    async with astages.within_a_grouping(redis, "newest", keep_for=60) as group:
        await (await group.stage(1)).enqueue_many([(work, (i,)) for i in range(5)])
    await run_burst(redis, FUNCTIONS)
    everything = await group.events(1000)
    assert [e.id for e in await group.events(3, newest=True)] == [e.id for e in everything[-3:]]


async def test_safety_ttl_expires_a_group_that_never_ends(redis):
    """A group made with ttl= and never finished expires, every key of it; list() drops it."""
    async with astages.within_a_grouping(redis, "abandoned", ttl=3) as group:
        stage = await group.stage(1)
        job = await stage.enqueue(work, "never run")
        await stage.on_complete(done, "x")
    await job.set_status_message("waiting")
    assert await finish(job, "e") == "retry"  # events, counters: keys made after creation
    keys = [k for k in await redis.keys("astages:{*") if b":summary:" not in k]
    assert len(keys) >= 6
    assert all([0 < await redis.pttl(k) <= 3000 for k in keys])

    async def expired() -> bool:
        return not await redis.keys("astages:{*")

    await wait_for(expired, within=15, what="the group's keys to expire")
    assert await StagedGroup.list(redis) == []
    assert await StagedGroup.count(redis) == 0


async def test_safety_ttl_gives_way_to_keep_for(redis):
    """A group with ttl= that ends is deleted, or kept for keep_for, not cut short by ttl."""
    async with astages.within_a_grouping(redis, "ends", ttl=600, keep_for=30) as group:
        (job,) = await (await group.stage(1)).enqueue_many([(work, ("a",))])
    assert await finish(job, "s") == "finished"
    kept = [k for k in await redis.keys("astages:{*") if b":summary:" not in k]
    assert kept and all([0 < await redis.ttl(k) <= 30 for k in kept])
    with pytest.raises(astages.AstagesError, match="ttl must be"):
        await StagedGroup.create(redis, "bad", ttl=0)
