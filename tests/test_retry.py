"""Retrying failed jobs: job.retry() and stage.retry_failed(), with real in-process workers."""

from __future__ import annotations

import asyncio

import pytest
from arq.constants import (
    default_queue_name,
    in_progress_key_prefix,
    job_key_prefix,
    result_key_prefix,
    retry_key_prefix,
)
from helpers import run_burst

import astages
from astages import JobStatus, NotRetryable, StageNotFound, StageStatus

FAILS_LEFT: dict[str, int] = {}
TRIES: list[tuple[str, int]] = []


@pytest.fixture(autouse=True)
def _clear():
    FAILS_LEFT.clear()
    TRIES.clear()


async def flaky(ctx, tag):
    """Fails while FAILS_LEFT[tag] > 0."""
    TRIES.append((tag, ctx["job_try"]))
    if FAILS_LEFT.get(tag, 0) > 0:
        FAILS_LEFT[tag] -= 1
        raise ValueError(f"{tag} broke")
    return tag


FUNCTIONS = [flaky]
HELD = "held"  # a queue no worker runs until the test says so: keeps stage 1 running


async def failed_stage(redis, *tags: str):
    """A running group whose stage 1 has a failed job per tag and one job held in another queue."""
    for tag in tags:
        FAILS_LEFT[tag] = 1
    async with astages.within_a_grouping(redis, "retry", keep_for=60) as group:
        jobs = [await group.stage(1).enqueue(flaky, tag) for tag in tags]
        held = await group.stage(1).enqueue_to(HELD, flaky, "held")
        later = await group.stage(2).enqueue(flaky, "later")
    await run_burst(redis, FUNCTIONS)
    assert [await j.status() for j in jobs] == [JobStatus.FAILED] * len(tags)
    return group, jobs, held, later


async def test_retry_runs_a_failed_job_again(real_redis):
    """A failed job of a running stage goes back to queued, runs from try 1 and succeeds; the stage then completes."""
    group, (job,), _held, _later = await failed_stage(real_redis, "a")
    assert job.id is not None
    await job.retry()
    assert await job.status() is JobStatus.QUEUED
    assert await job.error() is None
    progress = await group.stage(1).progress()
    assert (progress.failed, progress.queued, progress.retried) == (0, 2, 1)
    assert await real_redis.exists(job_key_prefix + job.id, retry_key_prefix + job.id) == 1  # the record only
    assert await real_redis.exists(result_key_prefix + job.id) == 0
    assert await real_redis.zscore(default_queue_name, job.id) is not None
    events = [e for e in await group.events() if e.details.get("retry") == "1"]
    assert [(e.subject, e.from_status, e.to_status, e.details["try"]) for e in events] == [
        (f"1:{job.ref.seq}", "failed", "queued", "1")
    ]
    await run_burst(real_redis, FUNCTIONS)
    assert TRIES == [("a", 1), ("a", 1)]
    assert await job.status() is JobStatus.SUCCESSFUL
    assert await job.result() == "a"
    assert await group.stage(1).status() is StageStatus.RUNNING  # the held job is still open
    await run_burst(real_redis, FUNCTIONS, queue_name=HELD)
    await run_burst(real_redis, FUNCTIONS)
    summary = await group.wait(timeout=10)
    assert summary.outcome == "complete"
    assert [(s.successful, s.failed) for s in summary.stages] == [(2, 0), (1, 0)]


async def test_retry_failed_retries_every_failed_job_of_the_stage(real_redis):
    """stage.retry_failed() retries all failed jobs in one call and says how many."""
    group, jobs, _held, _ = await failed_stage(real_redis, "a", "b")
    assert await group.stage(1).retry_failed() == 2
    assert [await j.status() for j in jobs] == [JobStatus.QUEUED] * 2
    assert await group.stage(1).retry_failed() == 0
    await run_burst(real_redis, FUNCTIONS)
    assert [await j.result() for j in jobs] == ["a", "b"]


async def test_a_retried_job_that_fails_again_is_a_new_failure(real_redis):
    """A retried job failing again is failed again, with its new error, and can be retried again."""
    group, (job,), _, _ = await failed_stage(real_redis, "a")
    FAILS_LEFT["a"] = 1
    await job.retry()
    await run_burst(real_redis, FUNCTIONS)
    assert await job.status() is JobStatus.FAILED
    assert (await group.stage(1).progress()).failed == 1
    await job.retry()
    await run_burst(real_redis, FUNCTIONS)
    assert await job.result() == "a"


async def test_retry_refusals(real_redis):
    """Only a failed job of a running stage of a live group is retried; the rest is refused with the reason."""
    group, (job,), held, later = await failed_stage(real_redis, "a")
    with pytest.raises(NotRetryable, match="queued, not failed"):
        await held.retry()
    with pytest.raises(NotRetryable, match="has not started"):
        await later.retry()
    assert job.id is not None
    await real_redis.set(in_progress_key_prefix + job.id, b"1")  # arq still writing the end of the try
    with pytest.raises(NotRetryable, match="retry in a moment"):
        await job.retry()
    assert await group.stage(1).retry_failed() == 0
    await real_redis.delete(in_progress_key_prefix + job.id)
    with pytest.raises(StageNotFound):
        await group.stage(7).retry_failed()
    await run_burst(real_redis, FUNCTIONS, queue_name=HELD)  # stage 1 completes with its failure
    with pytest.raises(NotRetryable, match="stage is complete"):
        await job.retry()
    with pytest.raises(NotRetryable, match=r"stage 1 of group .* the stage is complete"):
        await group.stage(1).retry_failed()
    await run_burst(real_redis, FUNCTIONS)
    await group.wait(timeout=10)
    with pytest.raises(NotRetryable, match="group has ended"):
        await job.retry()
    assert await job.status() is JobStatus.FAILED


async def test_race_concurrent_retries_retry_once(real_redis):
    """Many retries of one failed job at once: exactly one retries it, the others are refused."""
    async with astages.within_a_grouping(real_redis, "race") as group:
        jobs = await group.stage(1).enqueue_many([(flaky, (i,)) for i in range(2)])
    ref = jobs[0].ref
    assert ref is not None
    await group.store.run("start_job", group.id, 1, ref.seq, 1)
    await group.store.move("finish_job", group.id, 1, ref.seq, 1, "f", "boom")
    outcomes = await asyncio.gather(
        *(jobs[0].retry() for _ in range(10)),
        *(group.stage(1).retry_failed() for _ in range(10)),
        return_exceptions=True,
    )
    won = [o for o in outcomes if o is None or o == 1]
    assert len(won) == 1
    assert all(isinstance(o, NotRetryable) or o == 0 for o in outcomes if o not in won)
    progress = await group.stage(1).progress()
    assert (progress.failed, progress.queued, progress.retried) == (0, 2, 1)
    assert await real_redis.zcard(default_queue_name) == 2


async def test_a_retry_never_goes_past_a_cap(real_redis):
    """A stage at its max_in_flight: job.retry() refuses (NotRetryable saying so) and
    stage.retry_failed() retries only as many as the cap has room for; Cleaner.check
    stays clean (retries went straight to arq past the caps)."""
    group = await astages.StagedGroup.create(real_redis, "capped")
    stage = group.stage(1)
    jobs = await stage.enqueue_many([("work", (i,)) for i in range(6)])
    await stage.set_limits(max_in_flight=3)
    await group.initiate()
    store = group.store
    for job in jobs[:3]:  # the three in flight fail
        assert job.ref is not None
        await store.run("start_job", group.id, 1, job.ref.seq, 1)
        await store.move("finish_job", group.id, 1, job.ref.seq, 1, "f", "boom")
    # the cap refilled from the three waiting jobs: 3 in flight, 3 failed
    assert (await stage.progress()).in_flight == 3
    with pytest.raises(NotRetryable, match="max_in_flight is reached"):
        await jobs[0].retry()
    assert await stage.retry_failed() == 0
    assert jobs[3].ref is not None
    await store.run("start_job", group.id, 1, jobs[3].ref.seq, 1)
    await store.move("finish_job", group.id, 1, jobs[3].ref.seq, 1, "s", "")
    assert await stage.retry_failed() == 1  # one place freed
    assert (await stage.progress()).in_flight == 3
    assert await astages.Cleaner.check(real_redis) == {}
