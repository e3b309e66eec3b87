"""The Lua transitions called directly: idempotency, stale reports, races, SCRIPT FLUSH."""

from __future__ import annotations

import asyncio

import pytest
from helpers import keys_left

import astages
import astages._scripts
from astages import JobStatus, StagedGroup, StageStatus
from astages._scripts import SCRIPTS


async def work(ctx, *args):
    return args


async def running_group(redis, sizes: tuple[int, ...]) -> tuple[StagedGroup, list[list[astages.StagedJob]]]:
    async with astages.within_a_grouping(redis, "direct") as group:
        jobs = []
        for n, size in enumerate(sizes, start=1):
            stage = await group.stage(n)
            jobs.append(await stage.enqueue_many([(work, (i,)) for i in range(size)]))
    return group, jobs


async def start(job: astages.StagedJob, try_: int = 1) -> str:
    assert job.ref is not None
    store = job.stage().group.store
    return (await store.run("start_job", job.ref.group_id, job.ref.stage, job.ref.seq, try_)).decode()


async def finish(job: astages.StagedJob, outcome: str, try_: int = 1, error: str = "") -> str:
    assert job.ref is not None
    store = job.stage().group.store
    motion = await store.move("finish_job", job.ref.group_id, job.ref.stage, job.ref.seq, try_, outcome, error)
    return motion.outcome


async def test_start_and_finish(redis):
    """start marks running; finish records the outcome and the last one moves the group on."""
    group, (first, second) = await running_group(redis, (2, 1))
    assert await start(first[0]) == "run"
    assert await first[0].status() is JobStatus.RUNNING
    assert await finish(first[0], "s") == "open"
    assert await finish(first[1], "f", error="ValueError: bad") == "running"
    assert await first[1].error() == "ValueError: bad"
    assert await second[0].status() is JobStatus.QUEUED
    progress = await first[0].stage().progress()
    assert (progress.successful, progress.failed, progress.open) == (1, 1, 0)
    assert await finish(second[0], "s") == "finished"
    assert not await group.exists()


async def finish_batch(reports: list[tuple[astages.StagedJob, int, str, str]]) -> list[str]:
    """One finish_jobs call reporting each (job, try, outcome, error), in order."""
    flat: list[str] = []
    for job, try_, o, e in reports:
        assert job.ref is not None
        flat += [f"{job.ref.stage}:{job.ref.seq}:{try_}:{o}", *([e] if o in "fF" else [])]
    ref = reports[0][0].ref
    assert ref is not None
    replies = await reports[0][0].stage().group.store.run("finish_jobs", ref.group_id, 0, len(reports), *flat)
    return [r[0].decode() for r in replies]


@pytest.mark.parametrize("window", [None, 2])
async def test_one_call_of_reports_counts_and_moves_on_as_single_reports(redis, window):
    """Reports sharing one finish_jobs call (their reads and counter moves shared) count each
    job once, refill a window, and the call's last report ends the stage and starts the next."""
    async with astages.within_a_grouping(redis, "batch", window=window) as group:
        first = await (await group.stage(1)).enqueue_many([(work, (i,)) for i in range(6)])
        second = await (await group.stage(2)).enqueue_many([(work, (i,)) for i in range(2)])
    stage = first[0].stage()
    assert await start(first[0]) == "run"
    assert await finish(first[0], "e") == "retry"
    assert await start(first[0], 2) == "run"  # in flight until the last call
    done = 0
    while done < 5:
        sent = [j for j in first[1:] if await j.status() is JobStatus.QUEUED]
        assert sent and len(sent) <= (window or 6) - 1
        sent = sent[:3]  # more than one call: a call's trailing reports share its reads
        for job in sent:
            assert await start(job) == "run"
        reports = [(job, 1, "s", "") for job in sent]
        last = done + len(sent) == 5
        if last:
            reports.append((first[0], 2, "f", "ValueError: last"))
        outcomes = await finish_batch(reports)
        done += len(sent)
        assert outcomes[:-1] == ["open"] * (len(reports) - 1)
        assert outcomes[-1] == ("running" if last else "open")
        progress = await stage.progress()
        assert (progress.successful, progress.running) == (done, 0 if last else 1)
        assert progress.queued == (0 if last else min((window or 6) - 1, 5 - done))
    progress = await stage.progress()
    assert (progress.successful, progress.failed, progress.retried, progress.open) == (5, 1, 1, 0)
    assert await stage.status() is StageStatus.COMPLETE
    assert [await j.status() for j in second] == [JobStatus.QUEUED] * 2


async def test_duplicate_and_stale_reports_change_nothing(redis):
    """A second report of a final job, or a report older than the latest try, is ignored."""
    _group, (jobs, later) = await running_group(redis, (2, 1))
    job = jobs[0]
    assert await start(job, 1) == "run"
    assert await finish(job, "e", 1) == "retry"
    assert await finish(job, "e", 1) == "dup"
    assert await start(job, 2) == "run"
    assert await finish(job, "f", 1, "late report of try 1") == "stale"
    assert await job.status() is JobStatus.RUNNING
    assert await finish(job, "s", 2) == "open"
    assert await finish(job, "s", 2) == "dup"
    assert await finish(job, "f", 3) == "dup"
    assert await start(job, 3) == "final"
    progress = await job.stage().progress()
    assert (progress.successful, progress.running, progress.retried) == (1, 0, 1)
    assert await later[0].status() is JobStatus.PENDING


async def test_reports_for_deleted_job_create_nothing(redis):
    """start/finish/message of a deleted job report 'gone' and write nothing."""
    group, (jobs,) = await running_group(redis, (2,))
    job = jobs[0]
    await job.delete()
    keys_before = sorted(await redis.keys("astages:*"))
    assert await start(job) == "gone"
    assert await finish(job, "s") == "gone"
    assert sorted(await redis.keys("astages:*")) == keys_before
    await group.delete()
    assert await start(job) == "gone"
    assert await finish(job, "s") == "gone"
    assert await keys_left(redis) == []


async def test_race_last_jobs_finish_together(real_redis):
    """Many concurrent completions of a stage: exactly one caller moves the group on."""
    _group, (jobs, later) = await running_group(real_redis, (200, 3))
    outcomes = await asyncio.gather(*(finish(job, "s") for job in jobs))
    assert outcomes.count("running") == 1
    assert outcomes.count("open") == 199
    replays = await asyncio.gather(*(finish(job, "s") for job in jobs))
    assert set(replays) == {"dup"}
    assert [await j.status() for j in later] == [JobStatus.QUEUED] * 3
    assert await real_redis.zcard("arq:queue") == 200 + 3  # the test plays the worker: arq keeps its 200


async def test_race_group_finishes_exactly_once(real_redis):
    """Concurrent completions of the last stage finish the group exactly once."""
    group, (jobs,) = await running_group(real_redis, (50,))
    outcomes = await asyncio.gather(*(finish(job, "f" if i % 2 else "s") for i, job in enumerate(jobs)))
    assert outcomes.count("finished") == 1
    assert not await group.exists()
    assert await keys_left(real_redis) == []


async def test_race_concurrent_initiate(real_redis):
    """Initiating a group from many callers at once sends each job once."""
    group = await StagedGroup.create(real_redis, "race")
    stage = await group.stage(1)
    await stage.enqueue_many([(work, (i,)) for i in range(300)])
    await asyncio.gather(*(group.initiate() for _ in range(10)), *(stage.initiate() for _ in range(10)))
    assert await real_redis.zcard("arq:queue") == 300
    progress = await stage.progress()
    assert (progress.pending, progress.queued) == (0, 300)


async def test_growth_while_stage_completes(real_redis):
    """A running job adding a job to its own stage keeps the stage open until both finish."""
    _group, (jobs, later) = await running_group(real_redis, (2, 1))
    assert await start(jobs[0]) == "run"
    stage = jobs[0].stage()
    finishing = asyncio.gather(*(finish(jobs[1], "s") for _ in range(5)))
    added = await stage.enqueue(work, "added")
    await finishing
    assert await stage.status() is StageStatus.RUNNING
    assert await finish(jobs[0], "s") == "open"
    assert await finish(added, "s") == "running"
    assert await later[0].status() is JobStatus.QUEUED


@pytest.mark.parametrize("name", sorted(SCRIPTS))
async def test_every_script_survives_script_flush(real_redis, name):
    """After SCRIPT FLUSH every script still runs (redis-py reloads it on NOSCRIPT)."""
    group, (jobs,) = await running_group(real_redis, (1,))
    await real_redis.script_flush()
    store = group.store
    ref = jobs[0].ref
    assert ref is not None
    args = {
        "create_group": ("desc", 1),
        "ensure_stage": (7,),
        "enqueue": (1, "token", ""),
        "reserve": (1, 4),
        "initiate_stage": (1,),
        "start_job": (1, ref.seq, 1),
        "finish_job": (1, ref.seq, 1, "e", ""),
        "start_jobs": (1, 1, ref.seq, 1),
        "finish_jobs": (0, 1, f"1:{ref.seq}:1:e"),
        "claim_jobs": ("arq:queue", 0, 1000, 0, 1, jobs[0].id, 1, ref.seq, "mark"),
        "end_jobs": ("arq:queue", 1, jobs[0].id, 1, ref.seq, 1, 0, "", "", "", "", ""),
        "set_message": (1, ref.seq, "m"),
        "enqueue_job": (1, ref.seq),
        "retry_jobs": (1, ref.seq),
        "delete_job": (1, ref.seq),
        "delete_stage": (1,),
        "cancel_stage": (1,),
        "add_callback": ("complete", b"n0|0|9|arq:queuepayload"),
        "configure": ("", 0, -1),
        "set_limits": ("", 5, "100.0", "10/s", 1, 50),
    }.get(name, ())
    await store.run(name, group.id, *args)
    assert await real_redis.script_exists(SCRIPTS[name].sha) == [True]


async def test_repeated_enqueue_call_records_once(redis, monkeypatch):
    """A recording call repeated with its token (reply lost, retried) adds no job."""
    group = await StagedGroup.create(redis, "retry-safe")
    stage = await group.stage(1)
    spec, _ = stage._spec(work, (1,), {}, astages.models.Schedule())
    monkeypatch.setattr(astages._scripts, "_token", lambda: "tok-1")  # the call's reply key
    first = await group.store.run("enqueue", group.id, 1, "", "", spec)
    again = await group.store.run("enqueue", group.id, 1, "", "", spec)
    assert first == again and await stage.num_jobs() == 1
    monkeypatch.setattr(astages._scripts, "_token", lambda: "tok-2")
    other = await group.store.run("enqueue", group.id, 1, "", "", spec)
    assert int(other[0]) == int(first[0]) + 1 and await stage.num_jobs() == 2


async def test_wrong_type_under_a_group_key_is_corrupt_record(redis):
    """Data of the wrong type planted under a group's key gives CorruptRecord, not WRONGTYPE."""
    group = await StagedGroup.create(redis, "planted")
    await redis.delete(f"astages:{{{group.id}}}:stages")
    await redis.set(f"astages:{{{group.id}}}:stages", "not a sorted set")
    with pytest.raises(astages.CorruptRecord, match="not written by astages"):
        await group.initiate()


async def test_script_call_outlasts_a_flushed_cache(fake_redis, monkeypatch):
    """A script call survives the cache being flushed again between reload and retry."""
    group = await StagedGroup.create(fake_redis, "flushy")
    real_evalsha = type(fake_redis).evalsha
    misses = {"left": 3}

    async def flaky_evalsha(self, *args):
        if misses["left"] > 0:
            misses["left"] -= 1
            from redis.exceptions import NoScriptError

            raise NoScriptError("NOSCRIPT No matching script")
        return await real_evalsha(self, *args)

    monkeypatch.setattr(type(fake_redis), "evalsha", flaky_evalsha)
    assert (await group.stage(1)).number == 1
    assert misses["left"] == 0
