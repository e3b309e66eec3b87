"""Reading what jobs gave: stage.results() and job.result() with real in-process workers."""

from __future__ import annotations

import asyncio

import pytest
from arq import func
from arq.constants import in_progress_key_prefix, result_key_prefix
from arq.jobs import serialize_result
from helpers import run_burst

import astages
from astages import JobFailed, JobStatus, ResultNotAvailable, StagedJob

AGGREGATED: list[object] = []


@pytest.fixture(autouse=True)
def _clear():
    AGGREGATED.clear()


async def square(ctx, x, fail=False):
    if fail:
        raise ValueError(f"no square for {x}")
    return x * x


async def aggregate(ctx):
    """A stage-2 job: sums what stage 1 gave, page by page."""
    job = await StagedJob.perform_job(ctx)
    stage1 = job.stage().group.stage(1)
    total, errors, offset = 0, [], 0
    while page := await stage1.results(offset=offset, limit=2):
        for result in page:
            if result.ok:
                total += result.value
            else:
                errors.append((result.reason, (result.error or "").splitlines()[0]))
        offset += len(page)
    AGGREGATED.append((total, errors))
    return total


FUNCTIONS = [square, aggregate, func(square, name="unkept", keep_result=0)]


async def test_stage2_aggregates_stage1_results(real_redis):
    """A stage-2 job reads every stage-1 result, in pages, including a failed job's error."""
    async with astages.within_a_grouping(real_redis, "fan-out", keep_for=60) as group:
        await group.stage(1).enqueue_many([(square, (i,)) for i in range(5)])
        await group.stage(1).enqueue(square, 9, fail=True)
        await group.stage(2).enqueue(aggregate)
    await run_burst(real_redis, FUNCTIONS)
    assert AGGREGATED == [(0 + 1 + 4 + 9 + 16, [("failed", "ValueError: no square for 9")])]
    results = await group.stage(1).results()
    assert [r.value for r in results] == [0, 1, 4, 9, 16, None]
    assert [r.status for r in results] == [JobStatus.SUCCESSFUL] * 5 + [JobStatus.FAILED]
    (final,) = await group.stage(2).results()
    assert final.ok and final.value == 30


async def test_results_page_and_order(redis):
    """results(offset, limit) gives that page of the stage's jobs in enqueue order."""
    async with astages.within_a_grouping(redis, "pages", keep_for=60) as group:
        jobs = await group.stage(1).enqueue_many([(square, (i,)) for i in range(7)])
    await run_burst(redis, FUNCTIONS)
    page = await group.stage(1).results(offset=2, limit=3)
    assert [r.job_id for r in page] == [j.id for j in jobs[2:5]]
    assert [r.value for r in page] == [4, 9, 16]
    assert await group.stage(1).results(offset=7) == []
    assert await group.stage(1).results(limit=0) == []


async def test_job_result_rules(real_redis):
    """result() gives the value, raises JobFailed with the error, and says why a value is missing."""
    async with astages.within_a_grouping(real_redis, "rules", keep_for=60) as group:
        ok = await group.stage(1).enqueue(square, 3)
        bad = await group.stage(1).enqueue(square, 4, fail=True)
        unkept = await group.stage(1).enqueue("unkept", 5)
        later = await group.stage(2).enqueue(square, 6)
    with pytest.raises(ResultNotAvailable) as e:
        await later.result()
    assert e.value.reason == "not_final"
    await run_burst(real_redis, FUNCTIONS)
    assert await ok.result() == 9
    with pytest.raises(JobFailed) as failed:
        await bad.result()
    assert failed.value.reason == "failed" and failed.value.error.startswith("ValueError: no square for 4")
    with pytest.raises(ResultNotAvailable) as e:
        await unkept.result()
    assert e.value.reason == "not_kept"
    assert await later.result() == 36


async def test_result_after_group_deleted(real_redis):
    """A deleted group's job still gives arq's kept result; with that gone too, reason 'gone'."""
    async with astages.within_a_grouping(real_redis, "gone") as group:
        job = await group.stage(1).enqueue(square, 7)
    await run_burst(real_redis, FUNCTIONS)
    assert not await group.exists()
    outcome = await job.outcome()
    assert outcome.ok and outcome.value == 49 and outcome.status is None
    await real_redis.delete(result_key_prefix + str(job.id))
    with pytest.raises(ResultNotAvailable) as e:
        await job.result()
    assert e.value.reason == "gone" and "deleted" in str(e.value)


async def test_result_waits_while_arq_writes_it(redis):
    """A job ended in astages whose result arq is still writing is waited for (settle), else 'being_written'."""
    async with astages.within_a_grouping(redis, "settle", keep_for=60) as group:
        job = await group.stage(1).enqueue(square, 2)
        await group.stage(1).enqueue(square, 3)
    jid = str(job.id)
    assert job.ref is not None
    # astages has the job's report (successful, try 1); arq has not finished the run yet
    await redis.hdel(group.store.keys.stage_part(group.id, 1, "open"), str(job.ref.seq))
    await redis.hset(group.store.keys.stage_part(group.id, 1, "done"), str(job.ref.seq), "s1")
    await redis.set(in_progress_key_prefix + jid, b"1")
    assert (await job.outcome(settle=0)).reason == "being_written"

    async def arq_finishes() -> None:
        await asyncio.sleep(0.1)
        data = serialize_result("square", (2,), {}, 1, 0, True, 4, 0, 0, "ref", "arq:queue", jid)
        async with redis.pipeline(transaction=True) as tr:
            tr.set(result_key_prefix + jid, data)
            tr.delete(in_progress_key_prefix + jid)
            await tr.execute()

    writer = asyncio.create_task(arq_finishes())
    assert await job.result(settle=5) == 4
    await writer
