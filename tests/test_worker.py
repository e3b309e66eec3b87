"""Staged jobs run by an in-process arq worker (both backends)."""

from __future__ import annotations

import asyncio
import time

import arq
import pytest
from arq import Retry
from arq.constants import default_queue_name
from helpers import keys_left, run_burst

import astages
from astages import JobStatus, StagedGroup
from astages._scripts import SCRIPTS

EVENTS: list[tuple[str, object, float]] = []


@pytest.fixture(autouse=True)
def _clear_events():
    EVENTS.clear()
    ATTEMPTS.clear()


ATTEMPTS: dict[object, int] = {}


async def record(ctx, tag, *rest, **kw):
    """Records (tag, job try) with a timestamp; retries per the ``retries`` kwarg."""
    job = await astages.StagedJob.perform_job(ctx, tag, *rest, **kw)
    EVENTS.append(("start", tag, time.monotonic()))
    ATTEMPTS[tag] = ATTEMPTS.get(tag, 0) + 1
    await job.set_status_message(f"try {ctx['job_try']}")
    if ATTEMPTS[tag] <= kw.get("retries", 0):
        raise Retry(defer=0.05)
    if kw.get("fail"):
        raise ValueError(f"{tag} failed on purpose")
    if kw.get("sleep"):
        await asyncio.sleep(kw["sleep"])
    EVENTS.append(("end", tag, time.monotonic()))
    return tag


async def always_retry(ctx, tag):
    ATTEMPTS[tag] = ATTEMPTS.get(tag, 0) + 1
    raise Retry(defer=0.01)


async def plain(ctx, x):
    job = await astages.StagedJob.perform_job(ctx, x)
    EVENTS.append(("plain", job.blank, time.monotonic()))
    assert job.args == (x,)
    await job.set_status_message("ignored outside a stage")
    return x * 2


async def test_stages_run_in_order_and_group_cleans_up(redis):
    """Every job of stage k ends before any job of stage k+1 starts; then no key is left."""
    async with astages.within_a_grouping(redis, "ordered") as group:
        for n in (1, 2, 3):
            stage = await group.stage(n)
            for i in range(10):
                await stage.enqueue(record, (n, i))
    worker = await run_burst(redis, [record])
    assert worker.jobs_complete == 30 and worker.jobs_failed == 0
    for n in (1, 2):
        last_end = max(t for kind, tag, t in EVENTS if kind == "end" and tag[0] == n)
        first_next = min(t for kind, tag, t in EVENTS if kind == "start" and tag[0] == n + 1)
        assert last_end <= first_next
    assert not await group.exists()
    assert await keys_left(redis) == []


async def test_retry_keeps_stage_open(redis):
    """A job that retries is pending_re_run and the next stage waits for its last try."""
    async with astages.within_a_grouping(redis, "retry") as group:
        s1 = await group.stage(1)
        await s1.enqueue(record, "slow-retry", retries=2)
        for i in range(5):
            await s1.enqueue(record, ("ok", i))
        await (await group.stage(2)).enqueue(record, "next")
    seen: list[JobStatus] = []

    async def watch(ctx):
        if ctx["job_id"].endswith(":1:0000000001") and await group.exists():
            (job,) = await s1.jobs(0, 1)
            seen.append(await job.status())

    await run_burst(redis, [record], after_job_end=watch)
    assert JobStatus.PENDING_RE_RUN in seen
    retry_end = max(t for kind, tag, t in EVENTS if kind == "end" and tag == "slow-retry")
    next_start = min(t for kind, tag, t in EVENTS if kind == "start" and tag == "next")
    assert ATTEMPTS["slow-retry"] == 3
    assert retry_end <= next_start
    assert not await group.exists()


async def test_exhausted_retries_fail_and_group_advances(redis):
    """Running out of tries makes the job failed (arq runs no hook then) and the next stage runs."""
    async with astages.within_a_grouping(redis, "exhaust") as group:
        s1 = await group.stage(1)
        job = await s1.enqueue(always_retry, "never")
        await (await group.stage(2)).enqueue(record, "after")
    outcomes: dict[str, tuple[JobStatus, str | None]] = {}

    async def watch(ctx):
        if await job.exists():
            info = await job.info()
            outcomes["job"] = (info.status, info.error)

    await run_burst(redis, [always_retry, record], max_tries=3, after_job_end=watch)
    assert ATTEMPTS["never"] == 3
    assert outcomes["job"] == (JobStatus.FAILED, "max 3 retries exceeded")
    assert ("start", "after") in [(k, t) for k, t, _ in EVENTS]
    assert not await group.exists()


async def test_func_max_tries_is_honoured(redis):
    """arq.func(..., max_tries=2) limits a staged job to two tries."""
    async with astages.within_a_grouping(redis, "func") as group:
        await (await group.stage(1)).enqueue("always_retry", "twice")
    await run_burst(redis, [arq.func(always_retry, max_tries=2)], max_tries=10)
    assert ATTEMPTS["twice"] == 2
    assert not await group.exists()


async def test_failure_keeps_message_and_error(redis):
    """A failed job keeps its own status message and its error separately; the group goes on."""
    async with astages.within_a_grouping(redis, "fail") as group:
        s1 = await group.stage(1)
        bad = await s1.enqueue(record, "bad", fail=True)
        s2 = await group.stage(2)
        await s2.enqueue(record, "inspector")
    infos = {}

    async def watch(ctx):
        if ctx["job_id"] == bad.id:
            infos["bad"] = await bad.info()
            infos["s2"] = await s2.status()

    await run_burst(redis, [record], after_job_end=watch)
    info = infos["bad"]
    assert info.status is JobStatus.FAILED
    assert info.status_message == "try 1"
    assert info.error is not None and info.error.startswith("ValueError: bad failed on purpose")
    assert infos["s2"] is astages.StageStatus.RUNNING
    assert not await group.exists()


async def test_timeout_is_a_failure(redis):
    """A job that times out is failed (seen from arq's result in after_job_end)."""
    async with astages.within_a_grouping(redis, "timeout") as group:
        job = await (await group.stage(1)).enqueue(record, "sleepy", sleep=5)
        await (await group.stage(2)).enqueue(record, "after")
    seen = {}

    async def watch(ctx):
        if ctx["job_id"] == job.id:
            seen["info"] = await job.info()

    await run_burst(redis, [arq.func(record, timeout=0.2)], after_job_end=watch)
    assert seen["info"].status is JobStatus.FAILED
    assert "TimeoutError" in str(seen["info"].error)
    assert ("start", "after") in [(k, t) for k, t, _ in EVENTS]
    assert not await group.exists()


async def test_plain_job_beside_staged_ones(redis):
    """A job enqueued with plain arq runs untouched, with a blank handle."""
    async with astages.within_a_grouping(redis, "mixed") as group:
        await (await group.stage(1)).enqueue(record, "staged")
    plain_job = await redis.enqueue_job("plain", 21)
    worker = await run_burst(redis, [record, plain])
    assert await plain_job.result(timeout=5) == 42
    assert ("plain", True) in [(k, t) for k, t, _ in EVENTS]
    assert worker.jobs_complete == 2
    assert await keys_left(redis) == []


async def test_final_job_redelivered_is_not_run_again(redis):
    """arq delivering a job whose record is final (crash after our report) does not run it."""
    group = await StagedGroup.create(redis, "redeliver")
    stage = await group.stage(1)
    done = await stage.enqueue(record, "done")
    await stage.enqueue(record, "holds-stage-open")
    await stage.initiate()
    store = group.store
    assert done.ref is not None
    await store.run("start_job", group.id, 1, done.ref.seq, 1)
    await store.move("finish_job", group.id, 1, done.ref.seq, 1, "s", "")
    # arq still has it queued, as after a worker died before its own clean-up
    await run_burst(redis, [record])
    assert [t for k, t, _ in EVENTS if k == "start"] == ["holds-stage-open"]
    assert not await group.exists()


async def test_deleted_job_is_not_run(redis):
    """A queued job whose record was deleted while arq still held it does not run."""
    async with astages.within_a_grouping(redis, "deleted") as group:
        s1 = await group.stage(1)
        gone = await s1.enqueue(record, "gone")
        await s1.enqueue(record, "stays")
    # put it back in arq's queue behind astages' back, as a stale copy would be
    await gone.delete()
    await redis.enqueue_job("record", "gone", _job_id=gone.id)
    await run_burst(redis, [record])
    assert [t for k, t, _ in EVENTS if k == "start"] == ["stays"]
    assert not await group.exists()


async def test_user_hooks_run_and_their_errors_are_contained(redis):
    """The user's hooks still run; an exception in one is logged, not fatal to the worker."""
    calls: list[str] = []

    async def on_job_start(ctx):
        calls.append("start")
        raise RuntimeError("user hook bug")

    async def on_job_end(ctx):
        calls.append("end")

    async def after_job_end(ctx):
        calls.append("after")
        raise RuntimeError("another user hook bug")

    async with astages.within_a_grouping(redis, "hooks") as group:
        stage = await group.stage(1)
        for i in range(3):
            await stage.enqueue(record, i)
    worker = await run_burst(
        redis, [record], on_job_start=on_job_start, on_job_end=on_job_end, after_job_end=after_job_end
    )
    assert worker.jobs_complete == 3
    assert calls.count("start") == calls.count("end") == calls.count("after") == 3
    assert not await group.exists()


async def test_custom_queue_and_prefix(redis):
    """A group with its own prefix, run on a named queue, works like the default one."""
    async with astages.within_a_grouping(redis, "custom", prefix="myapp") as group:
        stage = await group.stage(1)
        await stage.enqueue_to("jobs:q", record, "q1")
        await stage.enqueue_to("jobs:q", record, "q2")
    assert await redis.zcard("jobs:q") == 2 and await redis.zcard(default_queue_name) == 0
    assert await StagedGroup.count(redis, prefix="myapp") == 1
    await run_burst(redis, [record], queue_name="jobs:q", prefix="myapp")
    assert not await group.exists()
    assert await keys_left(redis, "myapp:*") == []


async def noop(ctx, x):
    return x


async def test_round_trips_per_job(fake_redis, monkeypatch):
    """A staged run costs one script call (its report; it runs at once, its mark rides in
    the report) once the worker heard from its group, two before (the start is checked
    first); a plain job costs none."""
    async with astages.within_a_grouping(fake_redis, "cost") as group:
        stage = await group.stage(1)
        for i in range(5):
            await stage.enqueue(noop, i)
    await fake_redis.enqueue_job("noop", 7)
    for script in SCRIPTS.values():  # as on any server that ran astages before
        await fake_redis.script_load(script.script)
    calls: list[str] = []
    original = type(fake_redis).execute_command
    # arq's own worker loop (polling, heartbeat) runs beside the job; count the rest
    arq_loop = {"ZCARD", "ZRANGEBYSCORE", "PSETEX", "SET", "GET", "EXISTS"}

    async def counting(self, *args, **options):
        if args[0] not in arq_loop or str(args[1]).startswith("astages"):
            calls.append(str(args[0]))
        return await original(self, *args, **options)

    monkeypatch.setattr(type(fake_redis), "execute_command", counting)
    marks: list[int] = []

    async def mark(ctx):
        marks.append(len(calls))

    await run_burst(fake_redis, [noop], on_job_start=mark, on_job_end=mark, max_jobs=1)
    per_run = [calls[a:b] for a, b in zip(marks[::2], marks[1::2], strict=True)]
    assert sorted(per_run) == [[]] + [["EVALSHA"]] * 4 + [["EVALSHA", "EVALSHA"]]
    assert per_run[0] == ["EVALSHA", "EVALSHA"]  # the group's first job
    assert not await group.exists()


async def test_lost_retry_report_is_settled_from_arq(redis, monkeypatch):
    """A retry whose report fails is settled in after_job_end from arq's own record."""
    from redis.exceptions import ConnectionError as RedisConnectionError

    from astages._scripts import Store

    async with astages.within_a_grouping(redis, "lost-retry") as group:
        stage = await group.stage(1)
        await stage.enqueue(record, "flaky", retries=1)
        await (await group.stage(2)).enqueue(record, "after")
    real_run = Store.run_now
    failed_once: list[str] = []

    async def run_now(self, name, group_id, *args):
        if name == "finish_job" and args[-2] == "e" and not failed_once:
            failed_once.append("e")
            raise RedisConnectionError("dropped")
        return await real_run(self, name, group_id, *args)

    monkeypatch.setattr(Store, "run_now", run_now)
    seen = {}

    async def watch(ctx):
        if ctx["job_try"] == 1 and await group.exists():
            seen["progress"] = await stage.progress()

    await run_burst(redis, [record], after_job_end=watch)
    assert failed_once == ["e"]
    assert seen["progress"].pending_re_run == 1 and seen["progress"].retried == 1
    assert ATTEMPTS["flaky"] == 2 and ("start", "after") in [(k, t) for k, t, _ in EVENTS]
    assert not await group.exists()
