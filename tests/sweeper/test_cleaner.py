"""Cleaner: purge_all, cleanup_jobs (orphan repair) and check (the invariants), on real Redis."""

from __future__ import annotations

from arq.constants import default_queue_name, job_key_prefix
from helpers import keys_left, run_burst

import astages
from astages import Cleaner, CleanupReport, JobStatus, StagedGroup, StageStatus


async def work(ctx, tag):
    """A job that does nothing."""
    return tag


async def make_group(redis, sizes, initiate=True) -> tuple[StagedGroup, list[list[astages.StagedJob]]]:
    group = await StagedGroup.create(redis, "clean")
    jobs = []
    for n, size in enumerate(sizes, start=1):
        stage = await group.stage(n)
        jobs.append(await stage.enqueue_many([(work, (f"{n}-{i}",)) for i in range(size)]))
    if initiate:
        await group.initiate()
    return group, jobs


async def test_purge_all_deletes_astages_keys_only(real_redis):
    """purge_all deletes every astages key (SCAN) and leaves arq's and other apps' keys alone."""
    await make_group(real_redis, (3, 2))
    await make_group(real_redis, (2,), initiate=False)
    await real_redis.set("other:app", b"1")
    await real_redis.set("astagesX", b"1")
    arq_keys = {k for k in await real_redis.keys("arq:*")}
    assert arq_keys
    deleted = await Cleaner.purge_all(real_redis)
    assert deleted > 5
    assert await real_redis.keys("astages:*") == []  # the calls' reply keys too
    assert {k for k in await real_redis.keys("arq:*")} == arq_keys
    assert await real_redis.get("other:app") == b"1" and await real_redis.get("astagesX") == b"1"
    # the purged groups' jobs still in arq's queue are not run by a worker: their record is
    # gone, and arq's result of each says so (JobNotRun)
    worker = await run_burst(real_redis, [work])
    assert worker.jobs_failed == 3 and worker.jobs_complete == 0 and await real_redis.zcard(default_queue_name) == 0


async def test_purge_all_with_another_prefix(real_redis):
    """purge_all(prefix=) touches that prefix only, even one with glob characters."""
    await StagedGroup.create(real_redis, "a", prefix="ap*p")
    await StagedGroup.create(real_redis, "b")
    assert await Cleaner.purge_all(real_redis, prefix="ap*p") == 3  # hash, index, the call's reply
    assert await StagedGroup.count(real_redis) == 1


async def test_cleanup_on_a_healthy_database_changes_nothing(real_redis):
    """cleanup_jobs reports nothing to repair when nothing is broken."""
    await make_group(real_redis, (3, 2))
    await make_group(real_redis, (1,), initiate=False)
    report = await Cleaner.cleanup_jobs(real_redis)
    assert report == CleanupReport() and report.repaired == 0
    assert await Cleaner.check(real_redis) == {}


async def test_stage_without_group_gets_its_group_back_and_finishes(real_redis):
    """A stage whose group hash is gone gets the group back (running: its jobs are with arq); it then finishes."""
    group, (_jobs, _) = await make_group(real_redis, (3, 2))
    await real_redis.delete(group.store.keys.group(group.id))
    await real_redis.zrem(group.store.keys.index, group.id)
    assert not await group.exists()
    report = await Cleaner.cleanup_jobs(real_redis)
    assert report.groups_recreated == (group.id,)
    assert report.groups_reindexed == (group.id,)
    assert await group.status() == "running"
    assert await Cleaner.check(real_redis) == {}
    await run_burst(real_redis, [work])
    assert not await group.exists()
    assert await keys_left(real_redis) == []


async def test_jobs_without_stage_get_their_stage_back(real_redis):
    """Jobs whose stage hash is gone get the stage back, with counters rebuilt from the jobs."""
    group, (jobs, _later) = await make_group(real_redis, (4, 1))
    keys = group.store.keys
    await group.store.run("start_job", group.id, 1, jobs[0].ref.seq, 1)
    await group.store.run("finish_job", group.id, 1, jobs[0].ref.seq, 1, "s", "")
    await real_redis.delete(keys.stage(group.id, 1))
    await real_redis.zrem(keys.stages(group.id), 1)
    report = await Cleaner.cleanup_jobs(real_redis)
    assert report.stages_recreated == (f"{group.id}:1",)
    assert report.stages_relinked == (f"{group.id}:1",)
    stage = await group.stage(1)
    assert await stage.status() is StageStatus.RUNNING
    progress = await stage.progress()
    assert (progress.queued, progress.successful, progress.total) == (3, 1, 4)
    assert await Cleaner.check(real_redis) == {}
    await run_burst(real_redis, [work])
    assert not await group.exists()


async def test_ids_missing_from_their_lists_are_readded(real_redis):
    """A job missing from its stage's list, a stage missing from the group's, a group missing from the index."""
    group, (jobs, _) = await make_group(real_redis, (3, 1))
    keys = group.store.keys
    await real_redis.lrem(keys.stage_part(group.id, 1, "jobs"), 1, str(jobs[1].ref.seq))
    await real_redis.zrem(keys.stages(group.id), 2)
    await real_redis.zrem(keys.index, group.id)
    breaches = await Cleaner.check(real_redis)
    assert breaches == {}  # not indexed: check sees live (indexed) groups only
    await real_redis.zadd(keys.index, {group.id: 1})
    assert "jobs missing from the stage's job list" in " ".join((await Cleaner.check(real_redis))[group.id])
    await real_redis.zrem(keys.index, group.id)
    report = await Cleaner.cleanup_jobs(real_redis)
    assert report.jobs_relinked == (jobs[1].id,)
    assert report.stages_relinked == (f"{group.id}:2",)
    assert report.groups_reindexed == (group.id,)
    assert await Cleaner.check(real_redis) == {}
    await run_burst(real_redis, [work])
    assert not await group.exists()


async def test_dangling_entries_are_dropped(real_redis):
    """Index entries and stage entries with nothing behind them are dropped."""
    group, _ = await make_group(real_redis, (1,), initiate=False)
    keys = group.store.keys
    await real_redis.zadd(keys.index, {"ghost": 1})
    await real_redis.zadd(keys.stages(group.id), {"9": 9})
    # the ghost index entry is harmless (a kept group that expired): not a breach
    assert await Cleaner.check(real_redis) == {group.id: ("stage 9 is listed but its hash is missing",)}
    report = await Cleaner.cleanup_jobs(real_redis)
    assert report.index_dropped == ("ghost",)
    assert report.stages_dropped == (f"{group.id}:9",)
    assert await Cleaner.check(real_redis) == {}


async def test_check_reports_each_invariant_breach(real_redis):
    """check names every breach: counts, a job in two states, a complete stage with open jobs, sent-but-pending."""
    group, (jobs, later) = await make_group(real_redis, (3, 2))
    keys = group.store.keys
    s1, s2 = keys.stage(group.id, 1), keys.stage(group.id, 2)
    assert await Cleaner.check(real_redis) == {}
    await real_redis.hset(f"{s1}:done", str(jobs[0].ref.seq), "s1")  # both open and done
    await real_redis.hset(f"{s2}:open", str(later[0].ref.seq), "q")  # queued in a pending stage
    await real_redis.hincrby(s2, "queued", 1)
    await real_redis.hincrby(s2, "pending", -1)
    breaches = " | ".join((await Cleaner.check(real_redis))[group.id])
    assert "open 3 + finished 1 != total 3" in breaches
    assert "jobs both open and finished" in breaches
    assert "counter successful is 0, its jobs say 1" in breaches
    assert "stage 2 was not initiated but jobs were sent" in breaches
    await real_redis.hset(s1, "status", "complete")
    assert "stage 1 is complete but has 3 open jobs" in " | ".join((await Cleaner.check(real_redis))[group.id])


async def test_check_and_cleanup_report_corrupt_records(real_redis):
    """Data astages did not write is reported, never raised: check names it, cleanup lists it in errors."""
    group, _ = await make_group(real_redis, (1,))
    keys = group.store.keys
    await real_redis.delete(keys.stage_part(group.id, 1, "open"))
    await real_redis.set(keys.stage_part(group.id, 1, "open"), b"not a hash")
    breaches = (await Cleaner.check(real_redis))[group.id]
    assert breaches[0].startswith("corrupt record")
    report = await Cleaner.cleanup_jobs(real_redis)
    assert [gid for gid, _ in report.errors] == [group.id]
    assert await Cleaner.purge_all(real_redis) > 0
    assert await real_redis.keys("astages:*") == []  # the calls' reply keys too


async def test_lost_job_then_cleanup_and_sweep_finish_everything(real_redis):
    """After repair, a job arq lost is failed by the sweeper and the recreated group finishes."""
    group, (jobs,) = await make_group(real_redis, (2,))
    await real_redis.delete(keys_group := group.store.keys.group(group.id))
    await real_redis.delete(job_key_prefix + jobs[0].id)
    await real_redis.zrem(default_queue_name, jobs[0].id)
    assert (await Cleaner.cleanup_jobs(real_redis)).groups_recreated == (group.id,)
    assert await real_redis.exists(keys_group)
    await run_burst(real_redis, [work])
    assert await jobs[0].status() is JobStatus.QUEUED
    report = await astages.sweeper.sweep(real_redis, grace=0.05)
    assert report.lost == 1
    assert not await group.exists()
