"""Target 6, at scale: one stage of 1,000,000 jobs on ``astages worker``.

Not part of the default run (``python -m benchmarks --only million``: about 5 minutes and
some 300 MB of Redis memory). One group, one stage of ``n`` no-op jobs: recorded with
``enqueue_many`` (10,000 jobs a call), started with ``initiate``, then run through by one
``astages worker`` process (``max_jobs=100``, ``poll_delay=0.01``); timed from
``initiate`` until the group has finished. Memory: every key of the group (``MEMORY
USAGE ... SAMPLES 0``) recorded, and after ``initiate``; keys left when it finished. The
run is checked: every job ran exactly once.
"""

from __future__ import annotations

import contextlib
import time

import astages
from astages.exceptions import GroupNotFound
from benchmarks.common import Config, RedisCost, Table, Workers, connect, flush, key_memory, load_average
from benchmarks.throughput import LEAN_QUEUE, wait_empty

BATCH = 10_000


async def run(cfg: Config) -> list[Table]:
    n = cfg.size(1_000_000, 20_000)
    redis = await connect(cfg, LEAN_QUEUE)
    load_before = load_average()
    await flush(redis)
    try:
        async with Workers(cfg, "lean", LEAN_QUEUE, 1) as workers:
            group = await astages.StagedGroup.create(redis, "million")
            stage = await group.stage(1)
            t0 = time.perf_counter()
            for start in range(0, n, BATCH):
                await stage.enqueue_many(("noop", ("million", 1, i)) for i in range(start, min(n, start + BATCH)))
            record_s = time.perf_counter() - t0
            recorded, _ = await key_memory(redis, f"astages:{{{group.id}}}*")
            cost = await RedisCost.start(redis)
            t1 = time.perf_counter()
            await group.initiate()
            initiate_s = time.perf_counter() - t1
            sent, _ = await key_memory(redis, f"astages:{{{group.id}}}*")
            with contextlib.suppress(GroupNotFound):  # it finished before wait() subscribed
                await group.wait()
            await wait_empty(redis, LEAN_QUEUE)
            run_s = time.perf_counter() - t1
            spent = await cost.stop(redis)
            # keys of the group left (not the reply keys, the prefix's totals, samples and
            # counters of sweeper passes, the sweeper's own)
            kept = (b":reply:", b"astages:totals", b"astages:series", b"astages:stats", b"astages:sweeper:")
            left = [k async for k in redis.scan_iter(match="astages:*", count=1000) if not any(x in k for x in kept)]
        runs = [r for r in workers.runs if r.run == "million"]
        twice = len(runs) - len({r.index for r in runs})
        missing = n - len({r.index for r in runs})
    finally:
        await flush(redis)
        await redis.aclose()
    t = Table(
        f"One stage of {n:,} jobs on astages worker (record, initiate, run through, memory)",
        ["step", "seconds", "jobs/s", "bytes/job", "notes"],
    )
    t.rows.append(["record (enqueue_many, 10,000 a call)", record_s, n / record_s, recorded / n, "pending stage"])
    t.rows.append(["initiate", initiate_s, "", sent / n, "the first window sent; the rest as jobs end"])
    t.rows.append(["run through (initiate to group finished)", run_s, n / run_s, "", "1 worker, max_jobs 100"])
    t.notes.append(
        f"Redis over the run: {spent.commands / n:.1f} commands, {spent.scripts / n:.3f} script calls, "
        f"{spent.cpu_us / n:.1f} us CPU per job ({1e6 * n / max(spent.cpu_us, 1):,.0f} jobs/s per Redis core)"
    )
    errors = len(workers.errors)
    t.notes.append(f"run twice: {twice}, missing: {missing}, keys left: {len(left)}, worker errors: {errors}")
    t.notes.append(f"load average before / after: {load_before} / {load_average()}")
    t.data = {
        "n": n,
        "record_s": record_s,
        "initiate_s": initiate_s,
        "run_s": run_s,
        "recorded_bytes": recorded / n,
        "sent_bytes": sent / n,
        "commands": spent.commands / n,
        "scripts": spent.scripts / n,
        "cpu_us": spent.cpu_us / n,
        "twice": twice,
        "missing": missing,
        "left": len(left),
        "errors": workers.errors,
    }
    return [t]
