"""Issue 11: the per-job script calls shared between jobs (the arq path's coalesced starts
and reports) and ``astages worker``'s lean path (one claim_jobs and one end_jobs call per
batch of staged jobs), with every guarantee of the single-job scripts kept."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import arq.worker
import pytest
from arq import Retry
from arq.connections import ArqRedis
from arq.constants import default_queue_name
from arq.jobs import Job
from helpers import wait_for

import astages
import astages.worker
from astages._keys import Keys
from astages._scripts import Store
from astages.runner import HardenedWorker

RAN: list[tuple[str, int]] = []


async def step(ctx: dict[str, Any], tag: str) -> str:
    RAN.append((tag, ctx["job_try"]))
    return tag


async def flaky(ctx: dict[str, Any], tag: str) -> str:
    RAN.append((tag, ctx["job_try"]))
    if ctx["job_try"] == 1:
        raise Retry(defer=0)
    return tag


async def broken(ctx: dict[str, Any], tag: str) -> str:
    RAN.append((tag, ctx["job_try"]))
    raise ValueError(f"broken {tag}")


async def done(ctx: dict[str, Any], summary: Any) -> str:
    RAN.append((f"done {summary.outcome}", ctx["job_try"]))
    return str(summary.outcome)


GATE: dict[str, asyncio.Event] = {}


async def gated(ctx: dict[str, Any], tag: str) -> str:
    GATE["started"].set()
    await GATE["open"].wait()
    RAN.append((tag, ctx["job_try"]))
    return tag


async def plain(ctx: dict[str, Any], x: int) -> int:
    RAN.append((f"plain {x}", ctx["job_try"]))
    return 2 * x


@pytest.fixture(autouse=True)
def _reset() -> None:
    RAN.clear()


@pytest.fixture
def scripts(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The names of the astages scripts called, in order."""
    called: list[str] = []
    real = Store.run_now

    async def run_now(self: Store, name: str, group_id: str, *args: Any) -> Any:
        called.append(name)
        return await real(self, name, group_id, *args)

    monkeypatch.setattr(Store, "run_now", run_now)
    return called


def settings(**options: Any) -> dict[str, Any]:
    options.setdefault("sweep_interval", 0)
    return astages.worker_settings(functions=[step, flaky, broken, plain, done, gated], handle_signals=False, **options)


async def run_hardened(redis: ArqRedis, **options: Any) -> None:
    """Burst HardenedWorkers until arq's queue stays empty (a burst can end between stages)."""
    for _ in range(20):
        worker = HardenedWorker(**settings(**options), redis_pool=redis, burst=True, poll_delay=0, max_jobs=20)
        try:
            await asyncio.wait_for(worker.main(), 30)
        finally:
            await worker.close()
        if not await redis.zcard(default_queue_name):
            return


async def run_arq(redis: ArqRedis, **options: Any) -> None:
    for _ in range(20):
        worker = arq.worker.Worker(**settings(**options), redis_pool=redis, burst=True, poll_delay=0, max_jobs=20)
        try:
            await asyncio.wait_for(worker.main(), 30)
        finally:
            await worker.close()
        if not await redis.zcard(default_queue_name):
            return


@contextlib.asynccontextmanager
async def running(worker: arq.worker.Worker) -> AsyncIterator[None]:
    """``worker`` running in the background for the block; stopped and closed after it."""
    task = asyncio.ensure_future(worker.main())
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await worker.close()


async def test_coalesced_calls_keep_each_jobs_transition(redis: ArqRedis, scripts: list[str]) -> None:
    """Starts and reports made together share one script call and each gets the single script's reply."""
    from astages.worker import Coalescer

    async with astages.within_a_grouping(redis, "coalesced") as group:
        first = await (await group.stage(1)).enqueue_many([(step, (str(i),)) for i in range(3)])
        await (await group.stage(2)).enqueue(step, "later")
    refs = [job.ref for job in first]
    assert all(ref is not None for ref in refs)
    a, b, c = refs  # type: ignore[misc]
    woke: list[int] = []
    coalescer = Coalescer(redis, Keys(), lambda: woke.append(1))
    scripts.clear()
    assert await asyncio.gather(*(coalescer.start(ref, 1) for ref in refs)) == ["run"] * 3
    assert scripts == ["start_jobs"]
    scripts.clear()
    motions = await asyncio.gather(
        coalescer.finish(a, 1, "s", ""),
        coalescer.finish(a, 1, "s", ""),  # a duplicate report
        coalescer.finish(b, 0, "s", ""),  # a stale one (try 1 runs)
        coalescer.finish(b, 1, "e", ""),  # a retry
        coalescer.finish(c, 1, "f", "boom"),
    )
    assert [m.outcome for m in motions] == ["open", "dup", "stale", "retry", "open"]
    assert scripts == ["finish_jobs"] and woke == [1]
    assert await coalescer.start(a, 2) == "final"  # re-delivered after its end: refused
    assert await coalescer.start(b, 2) == "run"
    assert (await coalescer.finish(b, 2, "s", "")).outcome == "running"  # the last one starts stage 2
    progress = await group.stage(1).progress()
    assert (progress.successful, progress.failed, progress.retried) == (2, 1, 1)
    assert await group.stage(2).status() is astages.StageStatus.RUNNING


async def test_astages_worker_takes_and_ends_staged_jobs_in_batches(real_redis: ArqRedis, scripts: list[str]) -> None:
    """astages worker runs staged jobs with claim_jobs/end_jobs calls (not one start and one report each),
    keeps arq's results, and runs a plain job on the same queue the way arq does."""
    async with astages.within_a_grouping(real_redis, "lean") as group:
        first = await (await group.stage(1)).enqueue_many([(step, (f"1-{i}",)) for i in range(30)])
        await (await group.stage(2)).enqueue_many([(step, (f"2-{i}",)) for i in range(5)])
    await real_redis.enqueue_job("plain", 21, _job_id="a-plain-job")
    scripts.clear()
    await run_hardened(real_redis)
    expected = [(f"1-{i}", 1) for i in range(30)] + [(f"2-{i}", 1) for i in range(5)] + [("plain 21", 1)]
    assert sorted(RAN) == sorted(expected)
    assert not await group.exists()
    assert set(scripts) <= {"claim_jobs", "end_jobs", "send_more"}
    assert scripts.count("claim_jobs") < 10 and scripts.count("end_jobs") < 20  # 35 staged jobs
    assert await Job("a-plain-job", real_redis).result(timeout=1) == 42
    info = await Job(first[0].id or "", real_redis).result_info()
    assert info is not None and info.success and info.result == "1-0" and info.job_try == 1


async def outcomes(redis: ArqRedis, run: Any) -> tuple[Any, ...]:
    """Run one mixed workload with ``run``; what astages and arq made of it."""
    async with astages.within_a_grouping(redis, "mixed") as group:
        s1 = await group.stage(1)
        jobs = await s1.enqueue_many([(step, ("a",)), (flaky, ("b",)), (broken, ("c",)), (step, ("d",))])
        jobs += await (await group.stage(2)).enqueue_many([(flaky, ("e",)), (step, ("f",))])
        await group.on_complete(done)
    await run(redis, keep_result=60)
    await wait_for(lambda: _gone(group), what="the group to finish")
    results = []
    for job in jobs:
        info = await Job(job.id or "", redis).result_info()
        assert info is not None
        results.append((info.function, info.success, info.job_try, repr(info.result)))
    return tuple(sorted(RAN)), tuple(results)


async def _gone(group: astages.StagedGroup) -> bool:
    return not await group.exists()


async def test_astages_worker_ends_jobs_as_arqs_worker_does(real_redis: ArqRedis) -> None:
    """The same workload (success, Retry, failure, a callback) gives the same runs and arq results
    on astages worker's lean path as on arq's own Worker with astages' hooks."""
    with_arq = await outcomes(real_redis, run_arq)
    RAN.clear()
    await real_redis.flushdb()
    lean = await outcomes(real_redis, run_hardened)
    assert lean == with_arq
    assert ("b", 2) in lean[0] and ("c", 1) in lean[0] and ("done complete", 1) in lean[0]


async def test_astages_worker_refuses_a_redelivered_final_job(real_redis: ArqRedis) -> None:
    """A staged job whose record is final, delivered again by arq, does not run on the lean path."""
    async with astages.within_a_grouping(real_redis, "again", keep_for=60) as group:
        (job,) = await (await group.stage(1)).enqueue_many([(step, ("once",))])
        await (await group.stage(2)).enqueue(step, "two")
    await run_hardened(real_redis)
    assert sorted(RAN) == [("once", 1), ("two", 1)]
    await real_redis.delete(f"arq:result:{job.id}")
    assert await real_redis.enqueue_job("step", "once", _job_id=job.id) is not None
    await run_hardened(real_redis)
    assert sorted(RAN) == [("once", 1), ("two", 1)]
    info = await Job(job.id or "", real_redis).result_info()
    assert info is not None and not info.success and "already ended" in str(info.result)


async def test_astages_worker_takes_the_next_stage_at_once(real_redis: ArqRedis) -> None:
    """astages worker whose report started a stage polls at once instead of after poll_delay."""
    async with astages.within_a_grouping(real_redis, "gap") as group:
        for n in (1, 2, 3):
            await (await group.stage(n)).enqueue_many([(step, (f"{n}-{i}",)) for i in range(3)])
    worker = HardenedWorker(**settings(), redis_pool=real_redis, poll_delay=3.0)
    async with running(worker):
        await wait_for(lambda: _gone(group), within=2.5, what="all three stages in less than one poll_delay")
    assert len(RAN) == 9


async def test_arq_worker_shares_start_and_report_calls(real_redis: ArqRedis, scripts: list[str]) -> None:
    """arq's Worker, which takes jobs one at a time, still shares report calls between its jobs;
    once a reply said the group exists, first tries run at once and their marks ride in reports."""
    async with astages.within_a_grouping(real_redis, "shared") as group:
        await (await group.stage(1)).enqueue_many([(step, (f"1-{i}",)) for i in range(60)])
    scripts.clear()
    await run_arq(real_redis)
    assert len(RAN) == 60 and not await group.exists()
    calls = [name for name in scripts if name in ("start_job", "start_jobs", "finish_job", "finish_jobs")]
    assert "finish_jobs" in calls and len(calls) < 30
    reports = [i for i, name in enumerate(calls) if name.startswith("finish")]
    assert all(name.startswith("finish") for name in calls[reports[0] :])  # no checked start once heard from


async def test_first_try_runs_at_once_and_is_marked_running(real_redis: ArqRedis, scripts: list[str]) -> None:
    """A first try of a group the worker heard from runs before its mark goes; the mark comes
    within the window while it runs, and its events read queued, running, successful."""
    GATE.update(started=asyncio.Event(), open=asyncio.Event())
    async with astages.within_a_grouping(real_redis, "marked") as group:
        calls = [(step, ("first",)), (step, ("fast",)), (gated, ("slow",))]
        _first, _fast, slow = await (await group.stage(1)).enqueue_many(calls)
    scripts.clear()
    worker = arq.worker.Worker(**settings(), redis_pool=real_redis, poll_delay=0.01, max_jobs=1)
    async with running(worker):
        await asyncio.wait_for(GATE["started"].wait(), 10)
        await wait_for(lambda: _is(slow, astages.JobStatus.RUNNING), what="the running job's mark")
        # 'first' was checked, 'fast' ran at once and was reported before its mark went
        seen = [(e.kind, e.to_status) for e in await group.events(100)]
        assert seen.count(("job", "running")) == 3 and seen.count(("job", "successful")) == 2
        assert [name for name in scripts if name.startswith("start")] == ["start_job"]  # 'first' only
        GATE["open"].set()
        await wait_for(lambda: _gone(group), what="the group to finish")
    assert RAN == [("first", 1), ("fast", 1), ("slow", 1)]


async def test_retry_of_a_try_this_worker_reported_runs_at_once(real_redis: ArqRedis, scripts: list[str]) -> None:
    """The retry of a try the worker itself reported 'retry' for needs no checked start; a try
    another worker could have ended (one it did not see end in 'retry') is checked."""
    async with astages.within_a_grouping(real_redis, "retried") as group:
        await (await group.stage(1)).enqueue_many([(step, ("first",)), (flaky, ("again",))])
    scripts.clear()
    worker = arq.worker.Worker(**settings(), redis_pool=real_redis, poll_delay=0.01, max_jobs=1)
    async with running(worker):
        await wait_for(lambda: _gone(group), what="the group to finish")
    assert RAN == [("first", 1), ("again", 1), ("again", 2)]
    assert [name for name in scripts if name.startswith("start")] == ["start_job"]  # 'first' only


async def test_report_that_may_end_or_hold_up_its_stage_goes_at_once(real_redis: ArqRedis) -> None:
    """Reports wait for the window unless the replies say every open job of the stage is
    reported here: then the one that may end the stage (or a retry it waits for) goes at once."""
    from astages.worker import Coalescer

    async with astages.within_a_grouping(real_redis, "tail") as group:
        a, b, c = await (await group.stage(1)).enqueue_many([(step, (t,)) for t in "abc"])
        d, e = await (await group.stage(2)).enqueue_many([(flaky, ("d",)), (step, ("e",))])
    assert a.ref and b.ref and c.ref and d.ref and e.ref
    coalescer = Coalescer(real_redis, Keys(), window=30.0, batch=50)
    assert await asyncio.gather(*(coalescer.start(j.ref, 1) for j in (a, b, c) if j.ref)) == ["run"] * 3
    first = await asyncio.wait_for(coalescer.finish(a.ref, 1, "s", ""), 5)  # not heard yet: at once
    assert (first.outcome, first.open) == ("open", 2)
    waiting = coalescer.finish(b.ref, 1, "s", "")  # one more open: waits for the window
    await asyncio.sleep(0)
    assert not waiting.done() and len(coalescer._pending[("finish", group.id)]) == 1
    last = coalescer.finish(c.ref, 1, "s", "")  # may end the stage: goes at once, with b's
    assert [m.outcome for m in await asyncio.wait_for(asyncio.gather(waiting, last), 5)] == ["open", "running"]
    assert await asyncio.gather(coalescer.start(d.ref, 1), coalescer.start(e.ref, 1)) == ["run"] * 2
    assert (await asyncio.wait_for(coalescer.finish(e.ref, 1, "s", ""), 5)).open == 1
    retry = await asyncio.wait_for(coalescer.finish(d.ref, 1, "e", ""), 5)  # the stage waits for it alone
    assert retry.outcome == "retry"


async def _is(job: astages.StagedJob, status: astages.JobStatus) -> bool:
    return await job.status() is status


async def test_reply_that_group_is_gone_makes_the_next_first_try_checked(real_redis: ArqRedis) -> None:
    """A worker runs a first try at once only while a reply said its group exists (LIVE_FOR):
    a report answered 'gone' (the group purged behind its back) makes the next start a check."""
    from astages.worker import LIVE_FOR, Coalescer

    async with astages.within_a_grouping(real_redis, "purged") as group:
        a, b, c = await (await group.stage(1)).enqueue_many([(step, (t,)) for t in "abc"])
    coalescer = Coalescer(real_redis, Keys())
    assert a.ref and b.ref and c.ref
    assert not coalescer.fresh(group.id)  # never heard from: checked
    assert await coalescer.start(a.ref, 1) == "run"
    assert coalescer.fresh(group.id)
    assert (await coalescer.finish(a.ref, 1, "s", "")).outcome == "open"
    assert coalescer.fresh(group.id)
    await astages.Cleaner.purge_all(real_redis)
    assert (await coalescer.finish(b.ref, 1, "s", "")).outcome == "gone"
    assert not coalescer.fresh(group.id)
    assert await coalescer.start(c.ref, 1) == "gone"  # the check refuses it
    assert LIVE_FOR <= 0.1


async def test_arq_worker_window_does_not_delay_a_stage(real_redis: ArqRedis, monkeypatch: pytest.MonkeyPatch) -> None:
    """The first start and the last report of a worker's jobs of a group go at once, whatever the window."""
    monkeypatch.setattr(astages.worker, "COALESCE_WINDOW", 1.0)
    async with astages.within_a_grouping(real_redis, "window") as group:
        for n in (1, 2, 3):
            await (await group.stage(n)).enqueue(step, f"{n}")
    worker = arq.worker.Worker(**settings(), redis_pool=real_redis, poll_delay=0.01, max_jobs=20)
    async with running(worker):
        await wait_for(lambda: _gone(group), within=1.5, what="three one-job stages within one window")
    assert sorted(RAN) == [("1", 1), ("2", 1), ("3", 1)]


async def test_astages_worker_leaves_a_job_another_worker_marked(real_redis: ArqRedis) -> None:
    """A staged job with another worker's in-progress mark is not taken by the lean claim (arq's rule)."""
    async with astages.within_a_grouping(real_redis, "marked") as group:
        busy, _free = await (await group.stage(1)).enqueue_many([(step, ("busy",)), (step, ("free",))])
    await real_redis.set(f"arq:in-progress:{busy.id}", b"another worker", px=10_000)
    worker = HardenedWorker(**settings(), redis_pool=real_redis, poll_delay=0.01)
    async with running(worker):
        await wait_for(lambda: _ran("free"), what="the free job to run")  # both were due in the same poll
        await wait_for(lambda: _successful(group, 1), what="the free job's end")
    assert RAN == [("free", 1)]
    assert await real_redis.get(f"arq:in-progress:{busy.id}") == b"another worker"
    assert await real_redis.zscore(default_queue_name, busy.id or "") is not None


async def _ran(tag: str) -> bool:
    return any(t == tag for t, _ in RAN)


async def _successful(group: astages.StagedGroup, count: int) -> bool:
    return (await group.stage(1).progress()).successful == count


async def test_astages_worker_clears_the_abort_request_of_a_job_it_ends(real_redis: ArqRedis) -> None:
    """A staged job that ends on the lean path leaves arq's abort set, as arq's own bookkeeping does."""
    GATE.update(started=asyncio.Event(), open=asyncio.Event())
    async with astages.within_a_grouping(real_redis, "abort") as group:
        (job,) = await (await group.stage(1)).enqueue_many([(gated, ("gated",))])
    worker = HardenedWorker(**settings(), redis_pool=real_redis, poll_delay=0.01)
    async with running(worker):
        await asyncio.wait_for(GATE["started"].wait(), 10)
        await real_redis.zadd("arq:abort", {job.id or "": 1})  # asked while it runs (the worker does not abort)
        GATE["open"].set()
        await wait_for(lambda: _gone(group), what="the group to finish")
    assert RAN == [("gated", 1)]
    assert await real_redis.zscore("arq:abort", job.id or "") is None


def test_final_reports_are_detached_only_when_arq_keeps_results_for_two_sweeps() -> None:
    """A final report may leave the job behind only when the sweeper can find arq's result of
    a run whose report was lost: results kept two sweeper intervals at least."""
    from arq.worker import func

    from astages.worker import _detaches, _Runtime

    def runtime(**options: Any) -> _Runtime:
        return _Runtime(keys=Keys(), max_tries=5, retry_jobs=True, queue_name="q", **options)

    kept = func(step)
    assert _detaches(kept, runtime(keep_result_s=3600, sweep_interval=30))
    assert _detaches(kept, runtime(keep_result_s=60, sweep_interval=30))
    assert not _detaches(kept, runtime(keep_result_s=59, sweep_interval=30))
    assert not _detaches(kept, runtime(keep_result_s=3600, sweep_interval=None))  # no sweeper
    assert not _detaches(func(step, keep_result=0), runtime(keep_result_s=3600, sweep_interval=30))
    assert _detaches(func(step, keep_result_forever=True), runtime(keep_result_s=0, sweep_interval=30))
    assert _detaches(kept, runtime(keep_result_s=0, keep_result_forever=True, sweep_interval=30))


async def _stop_with_a_report_waiting(redis: ArqRedis, monkeypatch: pytest.MonkeyPatch) -> astages.StagedJob:
    """Run a worker (one slot, a 30 s window) until it ran a stage's second job and holds the
    third (gated): arq ended the second (its result kept), whose detached report waits for
    the window. Then stop the worker; the second job is returned."""
    GATE.update(started=asyncio.Event(), open=asyncio.Event())
    monkeypatch.setattr(astages.worker, "COALESCE_WINDOW", 30.0)
    monkeypatch.setattr(astages.worker, "TAIL_WINDOW", 30.0)  # (a 3-job stage is near its end)
    async with astages.within_a_grouping(redis, "report waiting") as group:
        calls = [(step, ("first",)), (step, ("waits",)), (gated, ("holds",))]
        _first, waits, _holds = await (await group.stage(1)).enqueue_many(calls)
    worker = arq.worker.Worker(**settings(sweep_interval=600), redis_pool=redis, poll_delay=0.01, max_jobs=1)
    async with running(worker):
        await asyncio.wait_for(GATE["started"].wait(), 10)  # 'waits' ran before it
        await wait_for(lambda: _arq_done(redis, waits.id or ""), what="arq's result of 'waits'")
        assert await waits.status() is not astages.JobStatus.SUCCESSFUL  # its report waits for the window
    GATE["open"].set()
    return waits


async def test_worker_shutting_down_sends_the_reports_waiting_for_the_window(
    real_redis: ArqRedis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A detached report waiting for the window goes before the worker's shutdown returns."""
    waits = await _stop_with_a_report_waiting(real_redis, monkeypatch)
    assert await waits.status() is astages.JobStatus.SUCCESSFUL  # sent by on_shutdown


async def test_detached_report_lost_with_its_worker_is_settled_from_arqs_result(
    real_redis: ArqRedis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A worker that dies with a detached report unsent leaves the job final in arq (its result
    kept) and open in astages; the sweeper settles it from that result."""
    from astages.sweeper import Sweeper
    from astages.worker import Coalescer

    monkeypatch.setattr(Coalescer, "drain", lambda self: asyncio.sleep(0))  # as if killed
    lost = await _stop_with_a_report_waiting(real_redis, monkeypatch)
    assert await lost.status() is not astages.JobStatus.SUCCESSFUL  # lost with the worker
    report = await Sweeper(real_redis).sweep()
    assert report.from_results == 1
    assert await lost.status() is astages.JobStatus.SUCCESSFUL


async def _arq_done(redis: ArqRedis, job_id: str) -> bool:
    return bool(await redis.exists(f"arq:result:{job_id}")) and not await redis.zscore(default_queue_name, job_id)


async def test_astages_worker_claims_a_few_jobs_at_a_time(
    real_redis: ArqRedis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With 100 free slots and 60 jobs due, the claims take at most LEAN_FIRST_CLAIM jobs first
    and LEAN_CLAIM after (a claim's jobs end together: small claims keep a stage's last end
    call short), and every job runs once."""
    from astages.runner import LEAN_CLAIM, LEAN_FIRST_CLAIM

    sizes: list[int] = []
    real = HardenedWorker._claim_lean

    async def claim(self: HardenedWorker, jobs: list[Any]) -> None:
        sizes.append(len(jobs))
        await real(self, jobs)

    monkeypatch.setattr(HardenedWorker, "_claim_lean", claim)
    async with astages.within_a_grouping(real_redis, "waves") as group:
        await (await group.stage(1)).enqueue_many([(step, (f"{i}",)) for i in range(60)])
    worker = HardenedWorker(**settings(), redis_pool=real_redis, burst=True, poll_delay=0, max_jobs=100)
    try:
        await asyncio.wait_for(worker.main(), 30)
    finally:
        await worker.close()
    assert sorted(RAN) == sorted((f"{i}", 1) for i in range(60))
    # the first poll claims its 60 due jobs 10, 20, 20, 10 (a later poll of a burst worker
    # may try again jobs still ending: refused, and never more than LEAN_CLAIM a call)
    assert sizes[:4] == [LEAN_FIRST_CLAIM, LEAN_CLAIM, LEAN_CLAIM, 60 - LEAN_FIRST_CLAIM - 2 * LEAN_CLAIM]
    assert max(sizes) == LEAN_CLAIM


async def _stage_started_by_a_report(redis: ArqRedis, coalescer: Any) -> tuple[astages.StagedGroup, Any]:
    """A group whose stage 2 (150 jobs) a report of ``coalescer`` started: the report's call
    queued its first chunk (100 jobs). Returns the group and a stage 2 job's ref."""
    async with astages.within_a_grouping(redis, "rest waits") as group:
        (only,) = await (await group.stage(1)).enqueue_many([(step, ("only",))])
        second = await (await group.stage(2)).enqueue_many([(step, (f"{i}",)) for i in range(150)])
    assert only.ref and second[0].ref
    assert await coalescer.start(only.ref, 1) == "run"
    motion = await asyncio.wait_for(coalescer.finish(only.ref, 1, "s", ""), 5)
    assert (motion.outcome, motion.unsent) == ("running", 50)
    return group, second[0].ref


async def _queued(group: astages.StagedGroup, n: int) -> bool:
    return (await group.stage(2).progress()).queued == n


async def test_arq_worker_sends_the_rest_of_a_stage_once_it_takes_a_job(
    real_redis: ArqRedis, scripts: list[str]
) -> None:
    """On arq's Worker, the report that started a stage holds the rest back (arq's claims of
    the first chunk would wait behind it in Redis) until this worker starts a job of the
    group; after PICKUP_WAIT if it does not; at once when the worker shuts down."""
    from astages.worker import PICKUP_WAIT, Coalescer

    coalescer = Coalescer(real_redis, Keys())
    coalescer.pickup_wait = 30.0
    group, ref = await _stage_started_by_a_report(real_redis, coalescer)
    for _ in range(20):
        await asyncio.sleep(0)
    assert "send_more" not in scripts and await _queued(group, 100)
    coalescer.mark(ref, 1)  # the worker took a job of the stage
    await wait_for(lambda: _queued(group, 150), within=5, what="the rest of stage 2 sent")
    assert not coalescer._picking

    waits = Coalescer(real_redis, Keys())  # nothing taken: the rest goes after PICKUP_WAIT
    group, _ = await _stage_started_by_a_report(real_redis, waits)
    await wait_for(lambda: _queued(group, 150), within=PICKUP_WAIT + 5, what="the rest sent after the wait")

    stops = Coalescer(real_redis, Keys())
    stops.pickup_wait = 30.0
    group, _ = await _stage_started_by_a_report(real_redis, stops)
    await asyncio.wait_for(stops.drain(), 5)  # a worker shutting down sends it
    assert await _queued(group, 150)


async def test_reports_of_a_stage_near_its_end_wait_for_the_tail_window_only(real_redis: ArqRedis) -> None:
    """Once a stage's open jobs (less this worker's reports since) fit in the worker's slots
    (2 * batch), its reports wait TAIL_WINDOW instead of the window: with several workers, a
    worker's last report of a stage does not hold the stage up for a whole window."""
    from astages.worker import TAIL_WINDOW, Coalescer

    async with astages.within_a_grouping(real_redis, "near the end") as group:
        jobs = await (await group.stage(1)).enqueue_many([(step, (f"{i}",)) for i in range(30)])
    refs = [job.ref for job in jobs if job.ref]
    coalescer = Coalescer(real_redis, Keys(), window=30.0, batch=10)  # slots: 20
    assert await asyncio.gather(*(coalescer.start(ref, 1) for ref in refs)) == ["run"] * 30
    first = await asyncio.wait_for(coalescer.finish(refs[0], 1, "s", ""), 5)  # not heard yet: at once
    assert first.open == 29
    waiting = [coalescer.finish(ref, 1, "s", "") for ref in refs[1:9]]  # 28 to 21 open: the window
    for _ in range(20):
        await asyncio.sleep(0)
    assert not any(report.done() for report in waiting)
    near = coalescer.finish(refs[9], 1, "s", "")  # 20 open: the tail window for them all
    motions = await asyncio.wait_for(asyncio.gather(*waiting, near), TAIL_WINDOW + 5)
    assert [m.open for m in motions][-1] == 20
    assert (await group.stage(1).progress()).successful == 10


async def test_astages_worker_runs_a_stage_bigger_than_its_window(real_redis: ArqRedis) -> None:
    """A 60-job stage with a window of 5 on astages worker: each end_jobs call tops the window
    up once, after its last report; every job runs once, in stage order, and arq's queue
    never holds more of the stage than its window."""
    async with astages.within_a_grouping(real_redis, "windowed", window=5) as group:
        await (await group.stage(1)).enqueue_many([(step, (f"1-{i}",)) for i in range(60)])
        await (await group.stage(2)).enqueue_many([(step, (f"2-{i}",)) for i in range(7)])
    most = 0

    async def watch() -> None:
        nonlocal most
        while True:
            most = max(most, await real_redis.zcard(default_queue_name))
            await asyncio.sleep(0.001)

    watcher = asyncio.ensure_future(watch())
    try:
        await run_hardened(real_redis)
    finally:
        watcher.cancel()
    assert sorted(RAN) == sorted([(f"1-{i}", 1) for i in range(60)] + [(f"2-{i}", 1) for i in range(7)])
    assert [tag[:1] for tag, _ in RAN] == ["1"] * 60 + ["2"] * 7  # stage 2 only after stage 1
    assert 0 < most <= 5 and not await group.exists()
