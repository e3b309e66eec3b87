"""Target 3: recording a big stage in bulk, and starting it, against arq's enqueue_job.

- ``enqueue_many``: record N jobs into a pending stage (jobs/s; target >= 30,000);
- ``stage.enqueue`` one at a time, for comparison;
- ``initiate``: hand the N recorded jobs to arq (target < 3 s for 100,000);
- arq's ``enqueue_job`` once per job, awaited one by one (the reference, over a sample of
  the jobs and scaled to N) and with 100 in flight.

No worker serves the queue: the jobs stay queued, and the database is flushed after.
"""

from __future__ import annotations

import asyncio
import time

from arq.connections import ArqRedis

import astages
from benchmarks.common import Config, Table, connect, flush, median

QUEUE = "bench:idle"


async def _enqueue_in_flight(redis: ArqRedis, count: int, in_flight: int) -> None:
    """``count`` jobs with arq's ``enqueue_job``, ``in_flight`` at a time."""
    sem = asyncio.Semaphore(in_flight)

    async def enqueue(i: int) -> None:
        async with sem:
            await redis.enqueue_job("noop", "arq", 1, i)

    await asyncio.gather(*(enqueue(i) for i in range(count)))


async def run(cfg: Config) -> list[Table]:
    n = cfg.size(100_000, 10_000)
    sample = cfg.size(20_000, 3_000)
    redis = await connect(cfg, QUEUE)
    many, one, init, arq_seq, arq_par = [], [], [], [], []
    sent_ok = True
    try:
        for _ in range(max(1, min(cfg.reps, 3))):
            await flush(redis)
            group = await astages.StagedGroup.create(redis, "initiate", window=None)  # all sent by initiate
            stage = await group.stage(1)
            calls = [("noop", ("initiate", 1, i)) for i in range(n)]
            t0 = time.perf_counter()
            await stage.enqueue_many(calls)
            many.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            await group.initiate()
            init.append(time.perf_counter() - t0)
            sent_ok = sent_ok and await redis.zcard(QUEUE) == n

            await flush(redis)
            group = await astages.StagedGroup.create(redis, "one by one", window=None)
            stage = await group.stage(1)
            t0 = time.perf_counter()
            for i in range(sample):
                await stage.enqueue("noop", "one", 1, i)
            one.append((time.perf_counter() - t0) / sample)

            await flush(redis)
            t0 = time.perf_counter()
            for i in range(sample):
                await redis.enqueue_job("noop", "arq", 1, i)
            arq_seq.append((time.perf_counter() - t0) / sample)

            await flush(redis)
            t0 = time.perf_counter()
            await _enqueue_in_flight(redis, sample, 100)
            arq_par.append((time.perf_counter() - t0) / sample)
    finally:
        await flush(redis)
        await redis.aclose()

    t_many, t_init = median(many), median(init)
    per_seq, per_par, per_one = median(arq_seq), median(arq_par), median(one)
    t = Table(
        f"Recording and starting a stage of {n:,} jobs (median of {len(many)})",
        ["operation", "seconds", "jobs/s", "target", "astages initiate is x faster"],
    )
    t.rows.append(["stage.enqueue_many (record, pending stage)", t_many, n / t_many, ">= 30,000/s", ""])
    t.rows.append([f"stage.enqueue one at a time (x{n:,}, from {sample:,})", per_one * n, 1 / per_one, "", ""])
    t.rows.append(["group.initiate (hand all to arq)", t_init, n / t_init, "< 3 s", ""])
    for label, per in (("one at a time", per_seq), ("100 in flight", per_par)):
        t.rows.append(
            [f"arq enqueue_job {label} (x{n:,}, from {sample:,})", per * n, 1 / per, "", round(per * n / t_init, 1)]
        )
    t.notes.append("target: initiate >= 10x faster than enqueue_job once per job")
    t.notes.append(f"every job was in arq's queue after initiate: {sent_ok}")
    t.data = {
        "n": n,
        "enqueue_many_s": many,
        "initiate_s": init,
        "enqueue_one_per_job_s": one,
        "arq_per_job_s": arq_seq,
        "arq_parallel_per_job_s": arq_par,
        "sent_ok": sent_ok,
    }
    return [t]
