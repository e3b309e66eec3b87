"""The sweeper settles staged jobs whose astages record no longer matches arq's (real Redis)."""

from __future__ import annotations

import asyncio
import time

import arq.worker
from arq.constants import default_queue_name, in_progress_key_prefix, job_key_prefix
from helpers import keys_left, stop_when_idle, wait_for

import astages
from astages import Cleaner, JobStatus, StagedGroup, StageStatus, Sweeper
from astages._scripts import SEND_LIMIT
from astages.sweeper import suspects_key, sweep


async def work(ctx, tag, fail=False):
    """A plain job function: fails on request."""
    if fail:
        raise ValueError(f"{tag} fails on purpose")
    return tag


async def other(ctx, tag):
    return tag


async def make_group(redis, sizes, fn=work, **kwargs) -> tuple[StagedGroup, list[list[astages.StagedJob]]]:
    async with astages.within_a_grouping(redis, "sweep") as group:
        jobs = []
        for n, size in enumerate(sizes, start=1):
            stage = await group.stage(n)
            jobs.append(await stage.enqueue_many([(fn, (f"{n}-{i}",), kwargs) for i in range(size)]))
    return group, jobs


async def plain_burst(redis, functions) -> None:
    """Run the queue with a plain arq worker: no astages wrapper, no hooks (what arq does
    when it ends a job without running any hook)."""
    worker = arq.worker.Worker(functions=functions, redis_pool=redis, burst=True, poll_delay=0, handle_signals=False)
    try:
        await worker.main()
    finally:
        await worker.close()


async def test_arq_results_settle_jobs_no_hook_reported(real_redis):
    """Jobs arq finished without any astages report become successful/failed from arq's result."""
    group, (first, second) = await make_group(real_redis, (3, 2))
    await (first[0].stage()).enqueue(work, "boom", fail=True)
    await plain_burst(real_redis, [work])
    assert [await job.status() for job in first] == [JobStatus.QUEUED] * 3
    report = await Sweeper(real_redis).sweep()
    assert report.from_results == 4
    assert report.lost == 0
    assert await second[0].status() is JobStatus.QUEUED  # stage 2 started
    assert await (await group.stage(1)).status() is StageStatus.COMPLETE
    failed = (await first[0].stage().jobs())[-1]
    assert await failed.status() is JobStatus.FAILED
    assert "fails on purpose" in (await failed.error() or "")
    await plain_burst(real_redis, [work])
    await Sweeper(real_redis).sweep()
    assert not await group.exists()
    assert await keys_left(real_redis) == []


async def test_function_not_found_fails_the_job_and_the_group_moves_on(real_redis):
    """A job whose function no worker knows (arq fails it with no hook) ends failed; the group finishes."""
    group, (_jobs,) = await make_group(real_redis, (2,), fn="no_such_function")
    settings = astages.worker_settings(functions=[other], sweep_interval=0.2, sweep_grace=0.1)
    worker = arq.worker.Worker(**settings, redis_pool=real_redis, poll_delay=0.01, handle_signals=False)
    task = asyncio.ensure_future(worker.main())
    try:

        async def gone() -> bool:
            return not await group.exists()

        await wait_for(gone, within=10, what="the sweeper to finish the group")
    finally:
        await stop_when_idle(worker, task)
    assert await keys_left(real_redis) == []


async def test_lost_job_fails_after_two_looks_with_a_message(real_redis):
    """A queued job arq has no trace of is failed, with a status message saying why, only on a second look."""
    _group, (jobs, later) = await make_group(real_redis, (2, 1))
    lost = jobs[0]
    await real_redis.delete(job_key_prefix + lost.id)
    await real_redis.zrem(default_queue_name, lost.id)
    sweeper = Sweeper(real_redis, grace=0.2)
    started = time.monotonic()
    first = await sweeper.sweep()
    assert first.lost == 0 and first.suspects == 1
    assert 0 < await real_redis.pttl(suspects_key(sweeper.keys)) <= sweeper.suspects_ms  # outlives no worker
    assert await lost.status() is JobStatus.QUEUED
    second = await sweeper.sweep()  # too soon: still a suspect
    assert second.lost == 0
    passes: list[astages.SweepReport] = []

    async def settled() -> bool:
        passes.append(await sweeper.sweep())
        return passes[-1].lost > 0

    await wait_for(settled, within=5, what="the lost job to be failed")
    assert time.monotonic() - started >= 0.2
    assert passes[-1].settled == {lost.id: "open"}
    assert await lost.status() is JobStatus.FAILED
    assert (await lost.status_message()).startswith("lost: the job was queued but arq has no record")
    assert "lost" in (await lost.error() or "")
    assert await jobs[1].status() is JobStatus.QUEUED  # untouched: arq holds it
    assert await real_redis.exists(suspects_key(sweeper.keys)) == 0
    assert await later[0].status() is JobStatus.PENDING


async def test_expired_job_record_fails_the_job(real_redis):
    """A job whose arq record expired while it waited in the queue is failed, saying so."""
    _group, (jobs, later) = await make_group(real_redis, (1, 1))
    await real_redis.delete(job_key_prefix + jobs[0].id)
    report = await sweep(real_redis, grace=0.1)
    assert report.lost == 1
    assert "expired before it ran" in await jobs[0].status_message()
    assert await later[0].status() is JobStatus.QUEUED


async def test_running_and_waiting_jobs_are_left_alone(real_redis):
    """A job arq holds (queued, in progress, waiting for a retry) is never touched."""
    group, (jobs,) = await make_group(real_redis, (3,))
    store = group.store
    ref0, ref1 = jobs[0].ref, jobs[1].ref
    await store.run("start_job", group.id, 1, ref0.seq, 1)
    await real_redis.set(in_progress_key_prefix + jobs[0].id, b"1")
    await store.run("start_job", group.id, 1, ref1.seq, 1)
    await store.run("finish_job", group.id, 1, ref1.seq, 1, "e", "")
    report = await sweep(real_redis, grace=0.05)
    assert report.settled == {} and report.suspects == 0
    assert [await job.status() for job in jobs] == [JobStatus.RUNNING, JobStatus.PENDING_RE_RUN, JobStatus.QUEUED]


async def test_stopped_chunked_sending_is_resumed(real_redis):
    """A stage whose chunked sending stopped half-way (its starter died) is sent on by the sweeper."""
    group = await StagedGroup.create(real_redis, "big", window=None)  # no window: sent whole, in chunks
    stage = await group.stage(1)
    await stage.enqueue_many([(work, (i,)) for i in range(SEND_LIMIT + 300)])
    await group.store.run("initiate_group", group.id)  # one chunk only: what a crash leaves
    assert (await stage.progress()).pending == 300
    report = await Sweeper(real_redis).sweep()
    assert report.nudged == 1
    assert (await stage.progress()).queued == SEND_LIMIT + 300
    assert await Cleaner.check(real_redis) == {}


async def test_running_stage_with_nothing_open_completes(real_redis):
    """A running stage left with no open job (a script stopped half-way) completes; the group moves on."""
    group, (jobs, later) = await make_group(real_redis, (1, 1))
    sk = group.store.keys.stage(group.id, 1)
    # what a lost completion would leave: the job final, the stage still running
    await real_redis.hdel(f"{sk}:open", str(jobs[0].ref.seq))
    await real_redis.hset(f"{sk}:done", str(jobs[0].ref.seq), "s1")
    await real_redis.hincrby(sk, "queued", -1)
    await real_redis.hincrby(sk, "successful", 1)
    await Sweeper(real_redis).sweep()
    assert await (await group.stage(1)).status() is StageStatus.COMPLETE
    assert await later[0].status() is JobStatus.QUEUED


async def test_many_sweepers_at_once_settle_each_job_once(real_redis):
    """Ten sweepers racing over the same lost and finished jobs: each job is settled exactly once."""
    group, (jobs, later) = await make_group(real_redis, (40, 5))
    await plain_burst(real_redis, [work])  # every stage-1 job finished in arq, none reported
    sweepers = [Sweeper(real_redis, grace=0) for _ in range(10)]
    reports = await asyncio.gather(*(s.sweep() for s in sweepers))
    moved = [job_id for r in reports for job_id, got in r.settled.items() if got not in ("dup", "stale", "gone")]
    assert sorted(moved) == sorted(job.id for job in jobs)
    progress = await (await group.stage(1)).progress()
    assert progress.successful == 40 and progress.total == 40
    assert await later[0].status() is JobStatus.QUEUED
    assert await Cleaner.check(real_redis) == {}


async def test_sweep_cost_does_not_grow_with_finished_groups(real_redis):
    """A pass looks at live running groups only: 300 finished groups add nothing to it."""
    _live, _ = await make_group(real_redis, (5,))
    before = await Sweeper(real_redis).sweep()
    for _ in range(300):
        group, _ = await make_group(real_redis, (1,))
        await group.delete()  # a finished group leaves the same: nothing
    for _ in range(50):
        await StagedGroup.create(real_redis, "pending, never initiated")
    after = await Sweeper(real_redis).sweep()
    assert (before.groups, before.jobs) == (after.groups, after.jobs) == (1, 5)


async def test_worker_sweeper_starts_stops_and_keeps_user_hooks(real_redis):
    """worker_settings sweeps in the background between the user's on_startup and on_shutdown, leaving no key."""
    calls: list[str] = []

    async def up(ctx):
        calls.append("startup")

    async def down(ctx):
        calls.append("shutdown")

    group, (jobs,) = await make_group(real_redis, (1,))
    await real_redis.delete(job_key_prefix + jobs[0].id)  # lost: only the sweeper can end it
    settings = astages.worker_settings(
        functions=[work], on_startup=up, on_shutdown=down, sweep_interval=0.05, sweep_grace=0.01
    )
    worker = arq.worker.Worker(**settings, redis_pool=real_redis, poll_delay=0.01, handle_signals=False)
    task = asyncio.ensure_future(worker.main())
    try:

        async def gone() -> bool:
            return not await group.exists()

        await wait_for(gone, within=10, what="the worker's sweeper to fail the lost job")
        sweeper_task = worker.ctx["astages_sweeper"]
    finally:
        await stop_when_idle(worker, task)
    assert calls == ["startup", "shutdown"]
    assert sweeper_task.done()
    assert await keys_left(real_redis) == []


async def test_sweeper_skips_a_corrupt_group_and_goes_on(real_redis):
    """Garbage planted under one group's key is counted as an error; other groups are still swept."""
    bad, _ = await make_group(real_redis, (1,))
    good, (jobs,) = await make_group(real_redis, (1,))
    await real_redis.delete(job_key_prefix + jobs[0].id)
    await real_redis.delete(f"astages:{{{bad.id}}}:stages")
    await real_redis.set(f"astages:{{{bad.id}}}:stages", b"garbage")
    report = await sweep(real_redis, grace=0.05)
    assert report.errors >= 1
    assert report.lost == 1
    assert not await good.exists()
