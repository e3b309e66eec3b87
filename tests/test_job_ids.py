"""Which arq jobs astages takes for its own (issue 10, item 13): only ids of the exact shape
astages makes; any other job runs as a plain arq job. A staged job the worker must not run
(deleted, or already ended) is not run, and arq's result says why."""

from __future__ import annotations

import pytest
from arq.jobs import Job
from helpers import run_burst

import astages
from astages import JobNotRun

RAN: list[object] = []


async def echo(ctx, value):
    """Returns its argument (and notes that it ran)."""
    RAN.append(value)
    return value


@pytest.fixture(autouse=True)
def _clear():
    RAN.clear()


# ids that merely look like a staged job's or a callback's (no such group, wrong shape)
LOOKALIKES = [
    "astages:order42:1:7",
    "astages:order42:cb:complete:1",
    f"astages:{'a' * 32}:1:7",  # seq not padded
    f"astages:{'A' * 32}:1:0000000007",  # not lowercase hex
    f"astages:{'a' * 31}:1:0000000007",  # 31 digits
    f"astages:{'a' * 32}:01:0000000007",  # stage not an int as astages writes it
    f"astages:{'a' * 32}:1:0000000007:x",
    f"astages:{'a' * 32}:cb:whenever:1",  # no such event
    f"astages:{'a' * 32}:cb:complete:x",
]


async def test_plain_arq_jobs_with_staged_looking_ids_run_as_in_arq(redis):
    """A plain arq job whose id only looks like a staged job's or a callback's runs; its result is its return value."""
    for i, job_id in enumerate(LOOKALIKES):
        assert await redis.enqueue_job("echo", i, _job_id=job_id) is not None
    await run_burst(redis, [echo])
    assert sorted(RAN) == list(range(len(LOOKALIKES)))
    for i, job_id in enumerate(LOOKALIKES):
        assert await Job(job_id, redis).result(timeout=5) == i


async def test_staged_job_not_run_says_why_in_arqs_result(redis):
    """A staged job arq delivers once ended ('final') or deleted ('gone') does not run; arq's result is JobNotRun."""
    async with astages.within_a_grouping(redis, "not run") as group:
        s1 = await group.stage(1)
        gone = await s1.enqueue(echo, "gone")
        done = await s1.enqueue(echo, "done")
        await s1.enqueue(echo, "stays")
    store = group.store
    assert done.ref is not None
    await store.run("start_job", group.id, 1, done.ref.seq, 1)  # it ran and reported, and arq
    await store.move("finish_job", group.id, 1, done.ref.seq, 1, "s", "")  # still holds it
    await gone.delete()
    await redis.enqueue_job("echo", "gone", _job_id=gone.id)  # a stale copy, behind astages' back
    await run_burst(redis, [echo], max_jobs=1)  # 'done', 'stays' (the group ends), then 'gone'
    assert RAN == ["stays"]
    assert not await group.exists()
    with pytest.raises(JobNotRun, match="already ended"):
        await Job(done.id, redis).result(timeout=5)
    with pytest.raises(JobNotRun, match="no longer exists"):
        await Job(gone.id, redis).result(timeout=5)
