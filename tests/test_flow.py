"""Flow control (issue 13): windows, max_in_flight caps, rates and priorities, on the real
server. Most tests drive the scripts directly (a report is ``finish_job``, as a worker's
is), so what is in flight is exact; a few run real workers."""

from __future__ import annotations

import asyncio
import itertools
import re
import time

import pytest
from arq.connections import ArqRedis
from arq.constants import default_queue_name
from helpers import run_burst
from redis.asyncio import ConnectionPool

from astages import (
    DEFAULT_WINDOW,
    AstagesError,
    Cleaner,
    FlowLimits,
    InFlightCapReached,
    Rate,
    StagedGroup,
    within_a_grouping,
)
from astages.models import StageStatus
from astages.sweeper import Sweeper


async def noop(ctx, i):
    """Does nothing."""


async def queued_ids(redis) -> list[str]:
    return [m.decode() for m in await redis.zrange(default_queue_name, 0, -1)]


async def report(group: StagedGroup, number: int, seq: int, outcome: str = "s") -> None:
    """What a worker's end of a job does: arq drops its queue entry, then astages' report,
    finish_job (which tops the window up)."""
    await group.redis.zrem(default_queue_name, group.store.keys.job_id(group.id, number, seq))
    await group.store.move("finish_job", group.id, number, seq, 1, outcome, "boom" if outcome == "f" else "")


async def make(redis, jobs: int, stages: int = 1, **options) -> tuple[StagedGroup, list]:
    group = await StagedGroup.create(redis, "flow", **options)
    out = []
    for n in range(1, stages + 1):
        out.append(await group.stage(n).enqueue_many([(noop, (i,)) for i in range(jobs)]))
    return group, out


def test_lua_and_python_default_windows_agree():
    """DEFAULT_WINDOW in astages/_flow.py is the one lua/_lib.lua uses."""
    from importlib import resources

    lib = (resources.files("astages") / "lua" / "_lib.lua").read_text()
    assert f"local DEFAULT_WINDOW = {DEFAULT_WINDOW}\n" in lib


async def test_a_running_stage_keeps_a_window_of_jobs_in_flight(real_redis):
    """A 50-job stage with window 10 sends its first 10; each report sends the next one, in enqueue order."""
    group, (jobs,) = await make(real_redis, 50, window=10)
    await group.initiate()
    stage = group.stage(1)
    info = await stage.info()
    assert (info.progress.in_flight, info.progress.waiting, info.held) == (10, 40, "window")
    assert await queued_ids(real_redis) == [j.id for j in jobs[:10]]
    await report(group, 1, 1)
    assert await queued_ids(real_redis) == [j.id for j in jobs[1:11]]
    for seq in range(2, 45):
        await report(group, 1, seq)
    info = await stage.info()
    assert (info.progress.in_flight, info.progress.waiting, info.held) == (6, 0, None)
    assert await queued_ids(real_redis) == [j.id for j in jobs[44:]]
    for seq in range(45, 51):
        await report(group, 1, seq)
    assert not await group.exists()


async def test_default_window_and_no_window(real_redis):
    """Groups get DEFAULT_WINDOW unless made with window=None (a stage sent whole)."""
    group, _ = await make(real_redis, DEFAULT_WINDOW + 5)
    assert (await group.limits()).window == DEFAULT_WINDOW
    await group.initiate()
    assert (await group.stage(1).progress()).in_flight == DEFAULT_WINDOW
    whole, _ = await make(real_redis, DEFAULT_WINDOW + 5, window=None)
    assert (await whole.limits()).window is None
    await whole.initiate()
    assert (await whole.stage(1).progress()).in_flight == DEFAULT_WINDOW + 5


async def test_a_small_group_is_not_queued_behind_a_big_one(real_redis):
    """With a big group running, a later group's jobs have at most a window of the big group's jobs ahead."""
    big, _ = await make(real_redis, 500, window=20)
    await big.initiate()
    small, (jobs,) = await make(real_redis, 3)
    await small.initiate()
    ids = await queued_ids(real_redis)
    assert len(ids) == 23 and ids[-3:] == [j.id for j in jobs]


async def test_stage_cap_and_group_cap(real_redis):
    """A stage cap bounds its stage; a group cap counts every running stage; set_limits tops up at once."""
    group, _ = await make(real_redis, 20, stages=2, max_in_flight=5)
    await group.stage(1).set_limits(max_in_flight=2)
    assert (await group.stage(1).limits()) == FlowLimits(max_in_flight=2, window=DEFAULT_WINDOW)
    await group.stage(1).initiate()
    info = await group.stage(1).info()
    assert (info.progress.in_flight, info.held) == (2, "stage_cap")
    await group.stage(2).initiate()  # both stages run: the group's cap leaves 3 for stage 2
    info2 = await group.stage(2).info()
    assert (info2.progress.in_flight, info2.held) == (3, "group_cap")
    await report(group, 2, 1)  # room under the group cap goes to the lowest running stage with room
    assert (await group.stage(1).progress()).in_flight + (await group.stage(2).progress()).in_flight == 5
    await group.stage(1).set_limits(max_in_flight=None)
    await group.set_limits(max_in_flight=12)
    p1, p2 = await group.stage(1).progress(), await group.stage(2).progress()
    assert p1.in_flight + p2.in_flight == 12
    assert not await Cleaner.check(real_redis)


async def test_rate_spaces_the_scores_of_jobs_sent(real_redis):
    """rate='20/s' gives the jobs sent scores 50 ms apart, at most about a second ahead."""
    group, (_jobs,) = await make(real_redis, 100, rate="20/s")
    before = int(time.time() * 1000)
    await group.initiate()
    scores = [int(s) for _, s in await real_redis.zrange(default_queue_name, 0, -1, withscores=True)]
    assert 20 <= len(scores) <= 22
    assert scores[0] >= before - 5
    assert all(49 <= b - a <= 51 for a, b in itertools.pairwise(scores))
    assert (await group.stage(1).info()).held == "rate"
    assert (await group.limits()).rate == "20/s"


async def test_a_slow_rate_still_sends_one_job(real_redis):
    """A stage with nothing in flight sends one job whatever its rate's next slot, so it is never stuck."""
    group, (jobs,) = await make(real_redis, 3)
    await group.stage(1).set_limits(rate="1/h")
    await group.initiate()
    assert len(await queued_ids(real_redis)) == 1
    await report(group, 1, 1)
    ids = await queued_ids(real_redis)
    assert ids == [jobs[1].id]
    score = await real_redis.zscore(default_queue_name, jobs[1].id)
    assert score > time.time() * 1000 + 3_500_000  # an hour after the first


async def test_priority_puts_a_group_ahead_within_its_head_start(real_redis):
    """A group with priority=30 has its jobs scored 30 s earlier: ahead of jobs sent before it, not of older ones."""
    plain, (pjobs,) = await make(real_redis, 3)
    await plain.initiate()
    urgent, (ujobs,) = await make(real_redis, 3, priority=30)
    await urgent.initiate()
    assert await queued_ids(real_redis) == [j.id for j in ujobs + pjobs]
    ps = await real_redis.zscore(default_queue_name, pjobs[0].id)
    us = await real_redis.zscore(default_queue_name, ujobs[0].id)
    assert 29_000 <= ps - us <= 31_000  # bounded: a plain job waits at most 30 s more


async def test_growth_goes_through_the_window(real_redis):
    """Jobs enqueued into a running stage wait for the window, behind the stage's waiting jobs."""
    group, (_jobs,) = await make(real_redis, 5, window=5)
    await group.initiate()
    more = await group.stage(1).enqueue_many([(noop, (i,)) for i in range(3)])
    p = await group.stage(1).progress()
    assert (p.in_flight, p.waiting) == (5, 3)
    await report(group, 1, 2)
    assert (await queued_ids(real_redis))[-1] == more[0].id


async def test_enqueue_job_goes_past_the_window_not_past_a_cap(real_redis):
    """job.enqueue_job() sends a waiting job past the window, but raises InFlightCapReached at a full cap."""
    group, (jobs,) = await make(real_redis, 10, window=2)
    await group.initiate()
    await jobs[7].enqueue_job()
    assert (await group.stage(1).progress()).in_flight == 3
    await group.stage(1).set_limits(max_in_flight=3)
    with pytest.raises(InFlightCapReached):
        await jobs[8].enqueue_job()


async def test_cancel_and_delete_top_up(real_redis):
    """Deleting a job in flight tops the window up; deleting waiting jobs keeps the cursor right; cancel ends all."""
    group, (jobs,) = await make(real_redis, 10, window=3)
    await group.initiate()
    await jobs[6].delete()  # waiting: behind the cursor, which stays
    await jobs[0].delete()  # in flight: the next waiting one goes
    assert await queued_ids(real_redis) == [j.id for j in jobs[1:4]]
    for seq in (2, 3, 4, 5, 6, 8, 9):
        await report(group, 1, seq)
    assert await queued_ids(real_redis) == [jobs[9].id]
    assert not await Cleaner.check(real_redis)
    await group.stage(1).cancel()
    assert not await group.exists()
    assert not await queued_ids(real_redis)


async def test_halt_policy_with_a_window(real_redis):
    """A halting failure cancels the waiting jobs too: nothing more is sent."""
    group, _ = await make(real_redis, 10, window=2, failure_policy="halt")
    await group.initiate()
    await report(group, 1, 1, "f")
    assert not await group.exists()
    assert not await queued_ids(real_redis)


async def test_limits_are_checked(real_redis):
    """Bad limits raise AstagesError and create nothing."""
    for bad in (
        {"max_in_flight": 0},
        {"max_in_flight": 2.5},
        {"rate": "50"},
        {"rate": "0/s"},
        {"rate": "1/y"},
        {"priority": -1},
        {"window": 0},
        {"rate": 5},
    ):
        with pytest.raises(AstagesError):
            await StagedGroup.create(real_redis, "bad", **bad)
    assert await StagedGroup.count(real_redis) == 0
    assert Rate.of("600/m").per_second == 10 and Rate.of("36/h").interval_ms == 100_000


async def test_sweeper_nudges_a_window_left_unfilled(real_redis):
    """A stage whose window a crash left empty (nothing in flight, jobs waiting) is topped up by the sweeper."""
    group, (jobs,) = await make(real_redis, 4, window=2)
    await group.initiate()
    # a crash: arq's entries and the stage's in-flight jobs vanish as if never sent
    sk = group.store.keys.stage(group.id, 1)
    await real_redis.delete(default_queue_name)
    await real_redis.hset(f"{sk}:open", mapping={"1": "p", "2": "p"})
    await real_redis.hset(sk, mapping={"queued": 0, "pending": 4, "cursor": 0})
    report_ = await Sweeper(real_redis).sweep()
    assert report_.nudged == 1
    assert await queued_ids(real_redis) == [j.id for j in jobs[:2]]
    assert not await Cleaner.check(real_redis)


async def test_a_waiting_window_is_not_stuck_for_the_sweeper(real_redis):
    """A full window with jobs waiting is healthy: the sweeper does not nudge it."""
    group, _ = await make(real_redis, 10, window=2)
    await group.initiate()
    assert (await Sweeper(real_redis).sweep()).nudged == 0


async def test_check_finds_a_cap_exceeded_and_a_job_skipped(real_redis):
    """Cleaner.check reports a stage over its cap and a pending job before the cursor."""
    group, (_jobs,) = await make(real_redis, 6, window=2)
    await group.initiate()
    sk = group.store.keys.stage(group.id, 1)
    await real_redis.hset(sk, "max_in_flight", 1)
    await real_redis.hset(sk, "cursor", 4)
    breaches = (await Cleaner.check(real_redis))[group.id]
    assert any("in flight 2 > max_in_flight 1" in b for b in breaches)
    assert any("pending jobs before the cursor" in b for b in breaches)


CONCURRENT = "flowtest:concurrent"
PEAK = "flowtest:peak"


async def counted(ctx, i):
    """Counts jobs running at once across workers (the peak kept in Redis)."""
    redis = ctx["redis"]
    now = await redis.incr(CONCURRENT)
    await redis.eval(
        "if tonumber(redis.call('GET', KEYS[1]) or 0) < tonumber(ARGV[1]) then redis.call('SET', KEYS[1], ARGV[1]) end",
        1,
        PEAK,
        now,
    )
    await asyncio.sleep(0.01)
    await redis.decr(CONCURRENT)


async def test_a_cap_holds_with_real_workers(real_redis):
    """Two workers of 20 slots each run a 60-job stage capped at 3: never more than 3 at once, and 3 reached."""
    group = await StagedGroup.create(real_redis, "capped", max_in_flight=3)
    await group.stage(1).enqueue_many([(counted, (i,)) for i in range(60)])
    await group.initiate()
    other = ArqRedis(connection_pool=ConnectionPool(**real_redis.connection_pool.connection_kwargs))
    try:  # a worker closes its pool when it stops: each worker has its own
        await asyncio.gather(run_burst(real_redis, [counted]), run_burst(other, [counted]))
    finally:
        await other.aclose(close_connection_pool=True)  # a pool passed in is not closed otherwise
    assert not await group.exists()
    assert int(await real_redis.get(PEAK)) == 3


async def test_within_a_grouping_takes_the_options_and_run_group_works(real_redis):
    """within_a_grouping takes the flow options; astages.testing.run_group runs a windowed, capped, rated group."""
    from astages.testing import run_group

    async with within_a_grouping(real_redis, "g", window=4, max_in_flight=3, rate="200/s") as group:
        for i in range(12):
            await group.stage(1).enqueue(noop, i)
    assert (await group.limits()) == FlowLimits(max_in_flight=3, rate="200/s", window=4)
    run = await run_group(real_redis, group, [noop])
    assert len(run.successful) == 12
    assert (await StagedGroup.count(real_redis)) == 0


async def test_show_watch_and_dashboard_show_what_holds_a_stage(real_redis, redis_server):
    """show, the watch board and the stage and group pages say what is in flight, waiting and holding it back."""
    import httpx
    from click.testing import CliRunner

    from astages._board import Board, snapshot
    from astages.cli import main
    from astages.web import create_app

    group, _ = await make(real_redis, 30, window=5)
    await group.stage(1).set_limits(max_in_flight=4, rate="100/s")
    await group.initiate()
    info = await group.stage(1).info()
    assert info.held in ("stage_cap", "rate") and info.progress.waiting == 26

    def show() -> str:
        return CliRunner().invoke(main, ["show", "--redis-url", str(redis_server.url), group.id]).output

    out = await asyncio.to_thread(show)
    assert "limits: window 5" in out and "4 in flight, 26 waiting to be sent (held by " in out
    assert "stage limits: max 4 in flight, 100/s" in out
    rows = await snapshot(group)
    assert rows is not None and "(4 in flight, 26 waiting, held by " in Board(live=False, color=False).line(rows[0])
    app = create_app(real_redis)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://test") as client:
        stage_page = (await client.get(f"/groups/{group.id}/stages/1")).text
        group_page = (await client.get(f"/groups/{group.id}")).text
        live = (await client.get(f"/api/groups/{group.id}/stages/1")).json()  # what the page polls
    flow = re.sub(r"<[^>]+>", "", stage_page)  # the figures are live spans
    assert "4 in flight · 26 waiting to be sent" in flow and "held by" in flow
    assert 'data-live="progress.in_flight"' in stage_page and 'data-live="held"' in stage_page
    assert (live["progress"]["in_flight"], live["progress"]["waiting"]) == (4, 26)
    assert live["held"].startswith("· held by ")
    assert "held by" in group_page


async def test_a_lowered_cap_drains_without_a_breach(real_redis):
    """A cap lowered under the jobs in flight sends nothing more until they drain below it,
    and Cleaner.check does not call the jobs already in flight a breach (it did until they
    drained); a stage or group over a cap that was never lowered still is one."""
    group, _ = await make(real_redis, 20, max_in_flight=8)
    await group.stage(1).set_limits(max_in_flight=6)
    await group.initiate()
    assert (await group.stage(1).progress()).in_flight == 6
    await group.stage(1).set_limits(max_in_flight=2)
    await group.set_limits(max_in_flight=3)
    assert not await Cleaner.check(real_redis)
    for seq in (1, 2, 3):  # 6 -> 3 in flight: nothing sent while above the cap
        await report(group, 1, seq)
    assert (await group.stage(1).progress()).in_flight == 3
    await report(group, 1, 4)
    await report(group, 1, 5)  # 1 in flight: room for one more under the stage cap of 2
    assert (await group.stage(1).progress()).in_flight == 2
    assert not await Cleaner.check(real_redis)
    await real_redis.hset(group.store.keys.stage(group.id, 1), "max_in_flight", 1)  # planted: no drain
    assert "in flight 2 > max_in_flight 1" in str(await Cleaner.check(real_redis))


async def _lrange_calls(redis) -> int:
    return int((await redis.info("commandstats")).get("cmdstat_lrange", {}).get("calls", 0))


async def report_batch(group: StagedGroup, seqs: list[int], outcome: str = "s", number: int = 1) -> list:
    """What a worker's shared report call does (finish_jobs): arq drops the queue entries,
    then one call reports every job, in order."""
    ids = [group.store.keys.job_id(group.id, number, seq) for seq in seqs]
    await group.redis.zrem(default_queue_name, *ids)
    calls = [(f"{number}:{seq}:1:{outcome}",) + (("boom",) if outcome == "f" else ()) for seq in seqs]
    return await group.store.moves("finish_jobs", group.id, calls, 0)


async def test_a_batch_of_reports_tops_the_window_up_once(real_redis):
    """The reports of one call make room for as many jobs as they end, sent by one top-up
    after the last report (one read of the stage's job list), in enqueue order; the last
    report's reply tells what it did."""
    group, (jobs,) = await make(real_redis, 30, window=10)
    await group.initiate()
    for job in jobs[:10]:
        assert await group.store.run("start_job", group.id, 1, job.ref.seq, 1) == b"run"
    before = await _lrange_calls(real_redis)
    motions = await report_batch(group, [job.ref.seq for job in jobs[:4]])
    assert await _lrange_calls(real_redis) - before == 1  # per report, it was one each
    assert [m.outcome for m in motions] == ["open"] * 4
    assert [m.open for m in motions] == [29, 28, 27, 26]
    assert await queued_ids(real_redis) == [j.id for j in jobs[4:14]]
    info = await group.stage(1).info()
    assert (info.progress.in_flight, info.progress.waiting, info.progress.successful) == (10, 16, 4)


async def test_a_batch_that_ends_a_stage_keeps_the_reply_that_started_the_next(real_redis):
    """A batch whose reports leave a stage's jobs open, then end it: the report that ended
    it topped up and started the next stage itself; nothing is deferred past it, and its
    reply ('running') stands."""
    group, (first, second) = await make(real_redis, 3, stages=2, window=10)
    await group.initiate()
    for job in first:
        assert await group.store.run("start_job", group.id, 1, job.ref.seq, 1) == b"run"
    motions = await report_batch(group, [job.ref.seq for job in first])
    assert [m.outcome for m in motions] == ["open", "open", "running"]
    assert await queued_ids(real_redis) == [j.id for j in second]
    assert await group.stage(1).status() is StageStatus.COMPLETE


async def test_jobs_failing_at_sending_in_a_batchs_top_up_count_against_the_policy(real_redis):
    """The top-up after a batch sends as a lone report's would: a job whose spec cannot be
    sent fails there, and when that breaches the stage's policy the group stops; the last
    report's reply says so."""
    group, (jobs,) = await make(real_redis, 6, window=2, failure_policy="halt")
    await group.initiate()
    third = group.store.keys.stage(group.id, 1) + ":spec"
    await real_redis.hset(third, str(jobs[2].ref.seq), b"not a spec")  # planted: unusable
    for job in jobs[:2]:
        assert await group.store.run("start_job", group.id, 1, job.ref.seq, 1) == b"run"
    async with group.ending() as ending:
        motions = await report_batch(group, [job.ref.seq for job in jobs[:2]])
        assert [m.outcome for m in motions] == ["open", "finished"]
        summary = await ending.wait(5)
    assert summary.outcome == "failed" and summary.failed_jobs == (jobs[2].id,)
    assert (summary.successful, summary.failed, summary.cancelled) == (2, 1, 3)
