"""astages.testing.run_group: a group run to the end in-process, every job's outcome kept."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import arq
import pytest
from arq import Retry
from arq.connections import ArqRedis

import astages
from astages.testing import GroupNotInitiated, GroupStuck, GroupTimeout, run_group


async def step(ctx: dict[str, Any], i: int) -> int:
    job = await astages.StagedJob.perform_job(ctx, i)
    await job.set_status_message(f"step {i} try {ctx['job_try']}")
    if i % 4 == 1 and ctx["job_try"] < 3:
        raise Retry(defer=30)  # fast-forwarded: the test never waits 30 s
    if i == 6:
        raise ValueError("six is broken")
    return i


async def busy(ctx: dict[str, Any]) -> None:
    job = await astages.StagedJob.perform_job(ctx)
    await job.set_status_message(f"busy on try {ctx['job_try']}")
    raise Retry(defer=5)


async def explode(ctx: dict[str, Any]) -> None:
    job = await astages.StagedJob.perform_job(ctx)
    await job.set_status_message("about to fail")
    raise RuntimeError("boom")


async def sleepy(ctx: dict[str, Any]) -> None:
    await asyncio.sleep(30)


async def _group(redis: ArqRedis, stages: dict[int, list[tuple[Any, tuple[Any, ...]]]]) -> astages.StagedGroup:
    async with astages.within_a_grouping(redis, "harness") as group:
        for number, calls in stages.items():
            await (await group.stage(number)).enqueue_many(calls)
    return group


async def test_every_job_outcome_is_kept_across_stages(redis: ArqRedis) -> None:
    """Statuses, tries, messages and errors of every job, in order, after the group deleted itself."""
    group = await _group(redis, {1: [(step, (i,)) for i in range(8)], 2: [(step, (i,)) for i in range(10, 14)]})
    started = time.monotonic()
    run = await run_group(redis, group, [step])
    assert time.monotonic() - started < 20  # deferred retries of 30 s were fast-forwarded
    assert not await group.exists()
    assert [job.args[0] for job in run.jobs] == [*range(8), *range(10, 14)]
    assert run.counts() == {"successful": 11, "failed": 1}
    six = run.find("step", 6)
    assert six.status is astages.JobStatus.FAILED
    assert six.error is not None and "ValueError: six is broken" in six.error
    assert six.message == "step 6 try 1"
    five = run.find("step", 5)
    assert (five.status, five.tries, five.message) == (astages.JobStatus.SUCCESSFUL, 3, "step 5 try 3")
    assert [s.as_dict()["retried"] for s in run.summary()] == [4, 2]
    assert run.stage(2)[-1].message == "step 13 try 3"  # the job that finished the group


async def test_the_job_that_finishes_the_group_is_recorded(redis: ArqRedis) -> None:
    """The last job's failure, error and message survive the group deleting itself."""
    group = await _group(redis, {1: [(step, (0,))], 2: [(explode, ())]})
    run = await run_group(redis, group, [step, explode])
    last = run.stage(2)[0]
    assert (last.status, last.tries, last.message) == (astages.JobStatus.FAILED, 1, "about to fail")
    assert last.error is not None and "RuntimeError: boom" in last.error


async def test_retries_exhausted_on_the_last_job(redis: ArqRedis) -> None:
    """A job that retries until max_tries ends failed with every try counted."""
    group = await _group(redis, {1: [(busy, ())]})
    run = await run_group(redis, group, [busy], max_tries=3)
    (job,) = run.jobs
    assert (job.status, job.tries, job.message) == (astages.JobStatus.FAILED, 3, "busy on try 3")
    assert job.error is not None and "3" in job.error
    assert run.summary()[0].retried == 2


async def test_a_job_timeout_is_a_failure(redis: ArqRedis) -> None:
    """A job cancelled by its timeout is failed, read from arq's result."""
    group = await _group(redis, {1: [("sleepy", ())]})
    run = await run_group(redis, group, [arq.func(sleepy, timeout=0.2)], timeout=20)
    (job,) = run.jobs
    assert job.status is astages.JobStatus.FAILED
    assert job.error is not None and "TimeoutError" in job.error


async def test_user_hooks_and_ctx_still_apply(redis: ArqRedis) -> None:
    """The user's after_job_end hook and worker ctx reach the jobs, and a group id works as well."""
    seen: list[str] = []

    async def after(ctx: dict[str, Any]) -> None:
        seen.append(ctx["job_id"])

    async def greet(ctx: dict[str, Any]) -> None:
        job = await astages.StagedJob.perform_job(ctx)
        await job.set_status_message(ctx["greeting"])

    group = await _group(redis, {1: [(greet, ()), (greet, ())]})
    run = await run_group(redis, group.id, [greet], after_job_end=after, ctx={"greeting": "hello"})
    assert run.messages == ["hello", "hello"]
    assert sorted(seen) == sorted(job.id for job in run.jobs)


async def test_a_pending_group_is_refused(redis: ArqRedis) -> None:
    """A group still being filled raises GroupNotInitiated instead of waiting forever."""
    group = await astages.StagedGroup.create(redis, "not yet")
    await (await group.stage(1)).enqueue(step, 0)
    with pytest.raises(GroupNotInitiated, match="initiate"):
        await run_group(redis, group, [step])


async def test_a_job_arq_drops_reports_the_group_stuck(redis: ArqRedis) -> None:
    """A function the worker lacks empties the queue with the group open: GroupStuck names the job."""
    group = await _group(redis, {1: [("unknown_function", (1,))]})
    with pytest.raises(GroupStuck, match="unknown_function"):
        await run_group(redis, group, [step], timeout=20)


async def test_a_run_that_takes_too_long_times_out(redis: ArqRedis) -> None:
    """GroupTimeout after the given time, with the open jobs in the message."""
    group = await _group(redis, {1: [(sleepy, ())]})
    started = time.monotonic()
    with pytest.raises(GroupTimeout, match="sleepy"):
        await run_group(redis, group, [sleepy], timeout=0.5)
    assert time.monotonic() - started < 10
    await group.delete()


async def test_a_kept_group_and_its_callback(redis: ArqRedis) -> None:
    """A group kept with keep_for ends without vanishing; its on_complete callback runs too."""
    called: list[str] = []

    async def done(ctx: dict[str, Any], summary: Any, label: str) -> None:
        called.append(f"{label}: {type(summary).__name__}")

    async with astages.within_a_grouping(redis, "kept", keep_for=60) as group:
        await (await group.stage(1)).enqueue_many([(step, (i,)) for i in (0, 1, 6)])
        await group.on_complete(done, "all done")
    run = await run_group(redis, group, [step, done])
    assert await group.exists() and (await group.status()).value == "complete"
    assert run.counts() == {"successful": 2, "failed": 1}
    assert run.find("step", 1).message == "step 1 try 3"
    assert called == ["all done: GroupSummary"]
