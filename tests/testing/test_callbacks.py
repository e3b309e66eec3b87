"""astages.testing.run_group reports callback runs, and a callback whose function the worker lacks."""

from __future__ import annotations

from typing import Any

import pytest
from arq.connections import ArqRedis

import astages
from astages import JobStatus
from astages.testing import CallbackNotRegistered, run_group


async def work(ctx: dict[str, Any], i: int) -> int:
    if i == 2:
        raise ValueError("two")
    return i


async def finished(ctx: dict[str, Any], summary: astages.GroupSummary, tag: str) -> str:
    return tag


async def broken(ctx: dict[str, Any], summary: astages.GroupSummary) -> None:
    raise RuntimeError("callback broke")


async def adds_callback(ctx: dict[str, Any]) -> None:
    job = await astages.StagedJob.perform_job(ctx)
    await job.stage().group.on_complete("nowhere")


async def test_callback_runs_are_reported(redis: ArqRedis) -> None:
    """run.callbacks holds each callback run: event, function, args, status, error and its summary."""
    async with astages.within_a_grouping(redis, "callbacks") as group:
        await group.stage(1).enqueue_many([(work, (i,)) for i in range(3)])
        await group.stage(1).on_complete(finished, "stage one")
        await group.on_complete(finished, "all")
        await group.on_failure(broken)
        await group.on_success(finished, "never")
    run = await run_group(redis, group, [work, finished, broken])
    seen = sorted((c.event, c.function, c.args, c.status.value) for c in run.callbacks)
    assert seen == [
        ("complete", "finished", ("all",), "successful"),
        ("failure", "broken", (), "failed"),
        ("stage.1", "finished", ("stage one",), "successful"),
    ]
    (failure,) = run.callback("failure")
    assert failure.error is not None and failure.error.startswith("RuntimeError: callback broke")
    (complete,) = run.callback("complete")
    assert complete.summary is not None and complete.summary.outcome == "complete"
    assert complete.summary.stages[0].failed == 1
    assert run.callback("success") == ()
    assert [j.status for j in run.jobs] == [JobStatus.SUCCESSFUL, JobStatus.SUCCESSFUL, JobStatus.FAILED]


async def test_unregistered_callback_function_is_refused_before_running(redis: ArqRedis) -> None:
    """A registered callback naming a function the worker lacks raises CallbackNotRegistered, naming it."""
    async with astages.within_a_grouping(redis, "missing") as group:
        await group.stage(1).enqueue(work, 1)
        await group.on_complete(finished, "x")
    with pytest.raises(CallbackNotRegistered, match=r"complete:\d+ -> 'finished'") as e:
        await run_group(redis, group, [work])
    assert e.value.run is None and e.value.missing[0][1] == "finished"
    run = await run_group(redis, group, [work], check_callbacks=False)
    (callback,) = run.callbacks
    assert callback.function_missing and callback.status is JobStatus.FAILED


async def test_callback_added_during_the_run_without_its_function(redis: ArqRedis) -> None:
    """A callback a job adds, whose function the worker lacks, fails the run afterwards with the run attached."""
    async with astages.within_a_grouping(redis, "late") as group:
        await group.stage(1).enqueue(adds_callback)
    with pytest.raises(CallbackNotRegistered, match="'nowhere'") as e:
        await run_group(redis, group, [adds_callback])
    assert e.value.run is not None
    (callback,) = e.value.run.callbacks
    assert callback.event == "complete" and callback.function == "nowhere" and callback.function_missing
