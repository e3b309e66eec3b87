"""Flow control (issue 13): windows, caps, rates, and what a window costs.

``python -m benchmarks.flow [--redis-url URL] [--quick] [--only NAME ...]`` prints one table
per figure; every figure comes from the worker processes' own notes of the jobs they ran
(``benchmarks/settings.py``) or from arq's queue, sampled while the jobs run:

- ``fair``: one big group runs on a queue and its workers; a 10-job group started a
  second later on the same queue: how long until it finishes (target <= 2 s).
- ``cap``: a group with ``max_in_flight=N`` on 4 worker processes; arq's queue (a staged
  job stays in it until final: queued, running or waiting for a retry) sampled every few
  ms: the most seen at once (target: never above N).
- ``rate``: a group with ``rate="50/s"`` for about 30 s: jobs started per second, from
  the workers' notes (target: within +-10%).
- ``cost``: 3 stages x 1,000 no-op jobs, default window against no window, paired runs
  in one process: the ratio of times (target: within 2%).
- ``windows``: a big stage with windows of 100, 1,000, 10,000 and none: time to run it.
- ``initiate``: a big stage: time to initiate it and Redis memory before it runs,
  windowed against sending all.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import time
import uuid
from typing import Any

from arq.connections import ArqRedis

import astages
from astages.exceptions import GroupNotFound
from benchmarks.common import DEFAULT_URL, Config, Table, Workers, connect, flush, median

QUEUE = "bench:astages"


async def _group(redis: ArqRedis, run: str, stages: int, per_stage: int, **options: Any) -> astages.StagedGroup:
    group = await astages.StagedGroup.create(redis, run, **options)
    for s in range(1, stages + 1):
        await group.stage(s).enqueue_many([("noop", (run, s, i)) for i in range(per_stage)])
    return group


async def _finish(redis: ArqRedis, group: astages.StagedGroup) -> None:
    with contextlib.suppress(GroupNotFound):
        await group.wait()
    while await redis.zcard(QUEUE):  # noqa: ASYNC110 - arq's own clean-up of the last jobs
        await asyncio.sleep(0.002)


async def fair(cfg: Config, redis: ArqRedis) -> Table:
    big_n = cfg.size(100_000, 20_000)
    table = Table(
        "Fair share: a 10-job group behind a big one on the same queue",
        ["window", "big group", "10-job group done in (s)", "big group still running"],
    )
    for window, label in ((..., "default (1,000)"), (None, "none (sent whole)")):
        await flush(redis)
        async with Workers(cfg, "astages", QUEUE, 2):
            big = await _group(redis, "big" + uuid.uuid4().hex[:6], 1, big_n, window=window)
            await big.initiate()
            await asyncio.sleep(1.0)
            small = await _group(redis, "small" + uuid.uuid4().hex[:6], 1, 10)
            t0 = time.perf_counter()
            await small.initiate()
            with contextlib.suppress(GroupNotFound):
                await small.wait(timeout=300)
            took = time.perf_counter() - t0
            still = await big.exists()
            await big.delete()
        table.rows.append([label, f"{big_n:,} jobs", took, "yes" if still else "no"])
    table.data = {"small_s": table.rows[0][2], "small_s_unwindowed": table.rows[1][2]}
    table.notes.append("2 worker processes (arq Worker with astages' settings, max_jobs=100, poll_delay=0.01).")
    return table


async def cap(cfg: Config, redis: ArqRedis) -> Table:
    n_jobs = cfg.size(5_000, 1_000)
    table = Table(
        "max_in_flight across 4 worker processes",
        ["max_in_flight", "jobs", "samples", "most in flight (astages)", "most in arq's queue", "jobs/s"],
    )
    for limit in (1, 20, 100):
        await flush(redis)
        jobs = min(n_jobs, 50 * limit)
        async with Workers(cfg, "astages", QUEUE, 4):
            group = await _group(redis, "cap" + uuid.uuid4().hex[:6], 1, jobs, max_in_flight=limit)
            peak, arq_peak, samples = 0, 0, 0
            sk = group.store.keys.stage(group.id, 1)
            t0 = time.perf_counter()
            await group.initiate()
            while await group.exists():
                async with redis.pipeline(transaction=True) as pipe:
                    pipe.hmget(sk, ["queued", "running", "pending_re_run"])
                    pipe.zcard(QUEUE)
                    counts, queued = await pipe.execute()
                peak = max(peak, sum(int(c or 0) for c in counts))
                arq_peak = max(arq_peak, int(queued))
                samples += 1
                await asyncio.sleep(0.002)
            took = time.perf_counter() - t0
        table.rows.append([limit, jobs, samples, peak, arq_peak, jobs / took])
    table.data = {"rows": table.rows}
    table.notes.append(
        "Sampled every 2 ms by a separate client, in one transaction: the stage's in-flight counters (queued + "
        "running + waiting for a retry) and arq's queue (the only group on it). arq's queue also holds, for a "
        "moment, jobs whose function has returned and whose end astages has recorded but arq's own clean-up "
        "(result, ZREM) has not run yet: those are no longer running, hence its few extra."
    )
    return table


async def rate(cfg: Config, redis: ArqRedis) -> Table:
    per_s, seconds = 50, (30 if not cfg.quick else 10)
    n_jobs = per_s * seconds
    await flush(redis)
    run = "rate" + uuid.uuid4().hex[:6]
    async with Workers(cfg, "astages", QUEUE, 2) as workers:
        group = await _group(redis, run, 1, n_jobs, rate=f"{per_s}/s")
        await group.initiate()
        await _finish(redis, group)
    starts = sorted(r.start for r in workers.runs if r.run == run)
    span = starts[-1] - starts[0]
    measured = (len(starts) - 1) / span
    per_second = [sum(1 for t in starts if starts[0] + k <= t < starts[0] + k + 1) for k in range(int(span))]
    table = Table(
        f'rate="{per_s}/s" on 2 worker processes', ["jobs", "span (s)", "jobs/s", "error", "min/max in a 1 s window"]
    )
    table.rows.append(
        [len(starts), span, measured, f"{(measured / per_s - 1) * 100:+.1f}%", f"{min(per_second)}/{max(per_second)}"]
    )
    table.data = {"jobs_per_s": measured, "target": per_s}
    return table


async def _run_staged(redis: ArqRedis, stages: int, per_stage: int, **options: Any) -> float:
    run = "cost" + uuid.uuid4().hex[:6]
    t0 = time.perf_counter()
    async with astages.within_a_grouping(redis, run, **options) as group:
        for s in range(1, stages + 1):
            await group.stage(s).enqueue_many([("noop", (run, s, i)) for i in range(per_stage)])
    await _finish(redis, group)
    return time.perf_counter() - t0


async def cost(cfg: Config, redis: ArqRedis) -> Table:
    per_stage, reps = cfg.size(1000, 1000), (15 if not cfg.quick else 5)
    await flush(redis)
    windowed, unwindowed = [], []
    async with Workers(cfg, "astages", QUEUE, 1):
        await _run_staged(redis, 1, 50)  # warm-up
        for rep in range(reps):  # alternating which goes first, so drift cancels out
            if rep % 2:
                windowed.append(await _run_staged(redis, 3, per_stage))
                unwindowed.append(await _run_staged(redis, 3, per_stage, window=None))
            else:
                unwindowed.append(await _run_staged(redis, 3, per_stage, window=None))
                windowed.append(await _run_staged(redis, 3, per_stage))
    ratios = [w / u for w, u in zip(windowed, unwindowed, strict=True)]
    table = Table("No cost where no limit is set: 3 x 1,000 no-op jobs", ["path", "median (s)", "jobs/s"])
    table.rows.append(["no window (sent whole)", median(unwindowed), 3 * per_stage / median(unwindowed)])
    table.rows.append(["default window", median(windowed), 3 * per_stage / median(windowed)])
    runs = ", ".join(f"{r:.3f}" for r in ratios)
    table.notes.append(f"ratio windowed/unwindowed, median of {reps} paired runs: {median(ratios):.3f} (runs: {runs})")

    table.data = {"ratio": median(ratios), "ratios": ratios}
    return table


async def windows(cfg: Config, redis: ArqRedis) -> Table:
    n_jobs = cfg.size(100_000, 20_000)
    table = Table(
        f"A {n_jobs:,}-job stage by window (2 worker processes)", ["window", "initiate (ms)", "run (s)", "jobs/s"]
    )
    for window in (100, 1000, 10_000, None):
        await flush(redis)
        async with Workers(cfg, "astages", QUEUE, 2):
            group = await _group(redis, "win" + uuid.uuid4().hex[:6], 1, n_jobs, window=window)
            t0 = time.perf_counter()
            await group.initiate()
            t1 = time.perf_counter()
            await _finish(redis, group)
            took = time.perf_counter() - t0
        table.rows.append(["none" if window is None else window, (t1 - t0) * 1000, took, n_jobs / took])
    table.data = {"rows": table.rows}
    return table


async def initiate(cfg: Config, redis: ArqRedis) -> Table:
    n_jobs = cfg.size(1_000_000, 200_000)
    table = Table(
        f"Initiating a {n_jobs:,}-job stage (no worker)",
        ["window", "initiate (s)", "arq records", "Redis memory after initiate (MB)", "of which arq's (MB)"],
    )
    for window in (..., None):
        await flush(redis)
        group = await _group(redis, "init", 1, n_jobs, window=window)
        before = int((await redis.info("memory"))["used_memory"])
        t0 = time.perf_counter()
        await group.initiate()
        took = time.perf_counter() - t0
        after = int((await redis.info("memory"))["used_memory"])
        records = int(await redis.zcard(QUEUE))
        table.rows.append(
            [
                "default (1,000)" if window is ... else "none (sent whole)",
                took,
                records,
                after / 1e6,
                (after - before) / 1e6,
            ]
        )
    await flush(redis)
    table.data = {"rows": table.rows}
    return table


FIGURES = {"cost": cost, "fair": fair, "cap": cap, "rate": rate, "windows": windows, "initiate": initiate}


async def main(args: argparse.Namespace) -> None:
    cfg = Config(url=args.redis_url, quick=args.quick)
    redis = await connect(cfg, QUEUE)
    try:
        for name in args.only or list(FIGURES):
            table = await FIGURES[name](cfg, redis)
            print(table.render(), flush=True)
            print(flush=True)
    finally:
        await flush(redis)
        await redis.aclose()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--redis-url", default=DEFAULT_URL)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--only", nargs="*", choices=list(FIGURES))
    asyncio.run(main(parser.parse_args()))
