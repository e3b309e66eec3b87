"""The operations readers (astages.ops): the prefix's job totals kept as groups end or are
deleted, the sampled series, arq's queues and workers."""

from __future__ import annotations

import asyncio
import datetime as dt

import pytest
from arq.connections import ArqRedis
from helpers import keys_left

import astages
from astages import Cleaner, StagedGroup
from astages._keys import Keys
from astages.ops import (
    Sample,
    cumulative,
    parse_health,
    rates,
    read_queues,
    read_series,
    read_totals,
    read_workers,
    sample,
    stage_queues,
)
from astages.sweeper import Sweeper

KEYS = Keys()


async def work(ctx, *args):
    return args


async def running_group(redis, sizes, **options):
    async with astages.within_a_grouping(redis, "ops", **options) as group:
        jobs = []
        for n, size in enumerate(sizes, start=1):
            stage = await group.stage(n)
            jobs.append(await stage.enqueue_many([(work, (i,)) for i in range(size)]))
    return group, jobs


async def finish(job: astages.StagedJob, outcome: str, try_: int = 1) -> str:
    assert job.ref is not None
    store = job.stage().group.store
    await store.run("start_job", job.ref.group_id, job.ref.stage, job.ref.seq, try_)
    motion = await store.move("finish_job", job.ref.group_id, job.ref.stage, job.ref.seq, try_, outcome, "boom")
    return motion.outcome


async def test_totals_grow_once_when_a_group_ends(redis):
    """A group that ends adds its stages' counts to <prefix>:totals once; the group's keys go."""
    group, (first, second) = await running_group(redis, (3, 1))
    await finish(first[0], "s")
    await finish(first[1], "f")
    assert await read_totals(redis, KEYS) == dict.fromkeys(("successful", "failed", "cancelled", "retried"), 0)
    await finish(first[2], "s")
    assert await finish(second[0], "s") == "finished"
    assert not await group.exists()
    assert await read_totals(redis, KEYS) == {"successful": 3, "failed": 1, "cancelled": 0, "retried": 0}
    assert await finish(second[0], "s") == "gone"  # a duplicate report counts nothing
    assert (await read_totals(redis, KEYS))["successful"] == 3
    assert await keys_left(redis) == []


async def test_cancelled_group_counts_its_cancelled_jobs(redis):
    """Cancelling a group adds its finished and cancelled jobs to the totals."""
    group, (jobs,) = await running_group(redis, (3,))
    await finish(jobs[0], "s")
    await group.cancel()
    assert await read_totals(redis, KEYS) == {"successful": 1, "failed": 0, "cancelled": 2, "retried": 0}


async def test_deleting_a_live_group_adds_its_counts_and_a_kept_one_adds_nothing(redis):
    """delete_group adds a live group's counts as they are; an ended kept group was counted as it ended."""
    live, (jobs,) = await running_group(redis, (3,))
    await finish(jobs[0], "s")
    await finish(jobs[1], "f")
    await live.delete()
    assert await read_totals(redis, KEYS) == {"successful": 1, "failed": 1, "cancelled": 0, "retried": 0}
    kept, (kjobs,) = await running_group(redis, (1,), keep_for=600)
    await finish(kjobs[0], "s")
    assert await kept.status() is astages.GroupStatus.COMPLETE
    assert (await read_totals(redis, KEYS))["successful"] == 2
    await kept.delete()
    assert (await read_totals(redis, KEYS))["successful"] == 2


async def test_concurrent_last_reports_count_the_group_once(real_redis):
    """Many concurrent reports of a stage's last jobs end the group once: totals say each job once."""
    group, (jobs,) = await running_group(real_redis, (40,))
    await asyncio.gather(*(finish(job, "s") for job in jobs), *(finish(job, "s") for job in jobs))
    assert not await group.exists()
    assert (await read_totals(real_redis, KEYS))["successful"] == 40


async def test_totals_survive_script_flush(real_redis):
    """After SCRIPT FLUSH the scripts reload and an ending group still adds to the totals."""
    group, (jobs,) = await running_group(real_redis, (1,))
    await real_redis.script_flush()
    await finish(jobs[0], "f")
    assert not await group.exists()
    assert (await read_totals(real_redis, KEYS))["failed"] == 1


async def test_cumulative_is_totals_plus_live_counters(redis):
    """cumulative() = the ended groups' totals + the live groups' stage counters, a kept group once."""
    ended, (ejobs,) = await running_group(redis, (2,))
    for job in ejobs:
        await finish(job, "s")
    kept, (kjobs,) = await running_group(redis, (1,), keep_for=600)
    await finish(kjobs[0], "f")
    live, (ljobs, _later) = await running_group(redis, (3, 2))
    await finish(ljobs[0], "s")
    await finish(ljobs[1], "f")
    assert await cumulative(redis, KEYS) == {"successful": 3, "failed": 2, "cancelled": 0, "retried": 0}
    assert not await ended.exists() and await kept.exists() and await live.exists()


async def test_a_sweeper_pass_samples_the_series(redis):
    """Each sweeper pass appends the cumulative counts to the capped series; rates come from two samples."""
    group, (jobs,) = await running_group(redis, (4,))
    sweeper = Sweeper(redis)
    await sweeper.sweep()
    await finish(jobs[0], "s")
    await finish(jobs[1], "f")
    await sweeper.sweep()
    samples = await read_series(redis, KEYS)
    assert [(s.successful, s.failed) for s in samples] == [(0, 0), (1, 1)]
    assert samples[0].at_ms <= samples[1].at_ms
    assert await redis.xinfo_stream(KEYS.series) is not None
    await group.delete()


async def test_series_is_capped(real_redis):
    """The series keeps about its cap of samples (MAXLEN ~: at most one stream node, 100, more)."""
    for _ in range(300):
        await sample(real_redis, KEYS, cap=10)
    assert 10 <= await real_redis.xlen(KEYS.series) <= 110


def test_rates_are_per_second_between_samples():
    """rates(): jobs per second between consecutive samples; a counter that went back counts 0."""
    samples = [Sample(0, 0, 0, 0), Sample(10_000, 50, 10, 0), Sample(20_000, 40, 10, 0), Sample(20_000, 90, 9, 0)]
    got = rates(samples)
    want = [(0, 10_000, 5.0, 1.0), (10_000, 20_000, 0.0, 0.0)]
    assert [(r.start_ms, r.end_ms, r.successful, r.failed) for r in got] == want


async def test_cleaner_purges_the_global_keys_and_check_ignores_them(real_redis):
    """purge_all deletes <prefix>:totals and :series; check and cleanup_jobs never see them."""
    group, (jobs,) = await running_group(real_redis, (2,))
    await finish(jobs[0], "s")
    await finish(jobs[1], "s")
    await sample(real_redis, KEYS)
    assert await real_redis.exists(KEYS.totals, KEYS.series) == 2
    assert await Cleaner.check(real_redis) == {}
    report = await Cleaner.cleanup_jobs(real_redis)
    assert report.repaired == 0 and report.errors == ()
    assert await real_redis.exists(KEYS.totals, KEYS.series) == 2
    assert not await group.exists()
    await Cleaner.purge_all(real_redis)
    assert await real_redis.keys("astages:*") == []


async def test_queues_say_length_due_deferred_and_oldest(redis: ArqRedis):
    """read_queues: length, due vs deferred against Redis' clock, the earliest job's age; not a zset is skipped."""
    now = int((await redis.time())[0]) * 1000
    await redis.zadd("arq:queue", {"a": now - 60_000, "b": now - 1_000, "c": now + 3_600_000})
    await redis.zadd("arq:later", {"x": now + 120_000})
    await redis.set("arq:notaqueue", "x")
    got = {q.name: q for q in await read_queues(redis, ["arq:queue", "arq:later", "arq:empty", "arq:notaqueue"])}
    assert set(got) == {"arq:queue", "arq:later", "arq:empty"}
    q = got["arq:queue"]
    assert (q.jobs, q.due, q.deferred) == (3, 2, 1)
    assert q.oldest_age is not None and 59 <= q.oldest_age <= 70
    later = got["arq:later"]
    assert (later.due, later.deferred, later.oldest_age) == (0, 1, None)
    assert later.next_due_in is not None and 100 < later.next_due_in <= 121
    assert (got["arq:empty"].jobs, got["arq:empty"].oldest_age) == (0, None)
    assert q.as_json()["due"] == 2


async def test_workers_from_arqs_health_check_keys(redis: ArqRedis):
    """read_workers: a queue's health-check key gives its last report, counts, age and TTL; none, no worker."""
    now = dt.datetime.now()
    report = f"{now - dt.timedelta(seconds=42):%b-%d %H:%M:%S} j_complete=7 j_failed=1 j_retried=0 j_ongoing=2 queued=3"
    await redis.psetex("arq:queue:health-check", 3_601_000, report.encode())
    got = await read_workers(redis, ["arq:queue", "arq:idle"], now=now)
    assert len(got) == 1
    worker = got[0]
    assert (worker.queue, worker.key, worker.report) == ("arq:queue", "arq:queue:health-check", report)
    assert worker.counts == {"j_complete": 7, "j_failed": 1, "j_retried": 0, "j_ongoing": 2, "queued": 3}
    assert worker.age is not None and 41 <= worker.age <= 43
    assert worker.expires_in is not None and 3590 < worker.expires_in <= 3601


def test_health_report_without_a_time_has_no_age():
    """A report arq did not write (no leading time) still gives its counts, and no age."""
    assert parse_health("j_complete=1 queued=0") == ("", {"j_complete": 1, "queued": 0}, None)
    new_year = dt.datetime(2027, 1, 1, 0, 0, 5)
    assert parse_health("Dec-31 23:59:55 j_complete=1", now=new_year)[2] == 10.0


async def test_stage_queues_name_the_queues_of_running_stages(redis):
    """stage_queues: the queue of each running stage of the live groups (pending ones not)."""
    async with astages.within_a_grouping(redis, "to thumbs") as group:
        await (await group.stage(1)).enqueue_to("arq:thumbs", work, 1)
        await (await group.stage(2)).enqueue_to("arq:later-stage", work, 1)
    pending = await StagedGroup.create(redis, "not started")
    await (await pending.stage(1)).enqueue_to("arq:pending", work, 1)
    assert await stage_queues(redis, KEYS) == {"arq:thumbs"}


@pytest.mark.parametrize("planted", ["totals", "series"])
async def test_a_planted_global_key_does_not_stop_a_sweep(real_redis, planted):
    """A key of the wrong type at <prefix>:totals or :series: the sweeper pass still ends."""
    await real_redis.set(getattr(KEYS, planted), "planted")
    report = await Sweeper(real_redis).sweep()
    assert report.errors == 0
