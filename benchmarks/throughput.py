"""Targets 1 and 5: staged throughput against plain arq, and the gap between stages.

Workloads (``stages`` x ``per_stage`` no-op jobs, one worker process per side,
``max_jobs=100``, ``poll_delay=0.01``), run round-robin ``reps`` times, timed from the
first enqueue to the last job done:

- ``arq, stage by stage``: a client enqueues each job with ``enqueue_job`` (one at a time)
  and waits for the queue to empty (checked every 2 ms) before the next stage: the
  reference.
- ``astages via arq``: ``within_a_grouping``, one ``await stage.enqueue(...)`` per job
  (the recording is inside the timing), then ``await group.wait()`` (pub/sub) and for
  arq to finish its own records of the last jobs; run by arq's own ``Worker`` with
  astages' settings (``arq benchmarks.settings.ASTAGES``);
- ``astages worker``: the same, run by ``astages worker`` (``HardenedWorker``, whose lean
  path takes, runs and ends staged jobs with one script call each per batch);
- the same three with every tenth job failing its first try (``Retry``) and re-run;
- ``arq, no stages``: every job enqueued at once, no waiting between stages (the floor);
- both astages paths with the group's event stream off (``events=0``): what the per-job
  events cost (target 5).

Every run is checked: each job ran once (a failing one exactly twice), and no job of
stage k+1 started before every job of stage k ended. The gaps between those two moments
are target 4. Each workload also gives the Redis server's cost per job over its run
(client and worker together, server-wide: other clients of the same server count too):
commands (``INFO commandstats``, the commands scripts run included) and CPU (``INFO
cpu``, user + system), and the ceiling that implies: jobs/s per Redis core.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from typing import Any

from arq.connections import ArqRedis

import astages
from astages.exceptions import GroupNotFound
from benchmarks.common import (
    WAIT_POLL_S,
    Config,
    RedisCost,
    Table,
    Workers,
    check_runs,
    connect,
    cpu_seconds,
    flush,
    load_average,
    median,
)

PLAIN_QUEUE = "bench:plain"
ASTAGES_QUEUE = "bench:astages"
LEAN_QUEUE = "bench:lean"
QUEUES = {"plain": PLAIN_QUEUE, "astages": ASTAGES_QUEUE, "lean": LEAN_QUEUE}
POLL_DELAY_MS = 10.0


async def wait_empty(redis: ArqRedis, queue: str) -> None:
    """Until arq's queue is empty: arq removes a job from it when the job is final, in the
    same transaction that writes its result (a retried job stays in it)."""
    while await redis.zcard(queue):  # noqa: ASYNC110 - plain arq has nothing to wait on but its queue
        await asyncio.sleep(WAIT_POLL_S)


async def arq_staged(redis: ArqRedis, run: str, fn: str, stages: int, per_stage: int) -> float:
    t0 = time.perf_counter()
    for s in range(1, stages + 1):
        for i in range(per_stage):
            await redis.enqueue_job(fn, run, s, i)
        await wait_empty(redis, PLAIN_QUEUE)
    return time.perf_counter() - t0


async def arq_flat(redis: ArqRedis, run: str, fn: str, stages: int, per_stage: int) -> float:
    t0 = time.perf_counter()
    for s in range(1, stages + 1):
        for i in range(per_stage):
            await redis.enqueue_job(fn, run, s, i)
    await wait_empty(redis, PLAIN_QUEUE)
    return time.perf_counter() - t0


async def astages_staged(redis: ArqRedis, run: str, fn: str, stages: int, per_stage: int) -> float:
    return await _astages(redis, ASTAGES_QUEUE, run, fn, stages, per_stage)


async def lean_staged(redis: ArqRedis, run: str, fn: str, stages: int, per_stage: int) -> float:
    return await _astages(redis, LEAN_QUEUE, run, fn, stages, per_stage)


async def lean_no_events(redis: ArqRedis, run: str, fn: str, stages: int, per_stage: int) -> float:
    return await _astages(redis, LEAN_QUEUE, run, fn, stages, per_stage, events=0)


async def astages_no_events(redis: ArqRedis, run: str, fn: str, stages: int, per_stage: int) -> float:
    return await _astages(redis, ASTAGES_QUEUE, run, fn, stages, per_stage, events=0)


async def _astages(
    redis: ArqRedis, queue: str, run: str, fn: str, stages: int, per_stage: int, **options: Any
) -> float:
    t0 = time.perf_counter()
    async with astages.within_a_grouping(redis, run, **options) as group:
        for s in range(1, stages + 1):
            stage = await group.stage(s)
            for i in range(per_stage):
                await stage.enqueue(fn, run, s, i)
    with contextlib.suppress(GroupNotFound):  # it finished before wait() subscribed
        await group.wait()  # woken by the script that finishes the group (pub/sub, no polling)
    await wait_empty(redis, queue)  # and arq has finished its own records of the last jobs
    return time.perf_counter() - t0


# name -> (side, driver, function, staged)
VARIANTS: dict[str, tuple[str, Any, str, bool]] = {
    "arq, stage by stage": ("plain", arq_staged, "noop", True),
    "astages via arq": ("astages", astages_staged, "noop", True),
    "astages worker": ("lean", lean_staged, "noop", True),
    "arq, stage by stage, 10% retried": ("plain", arq_staged, "flaky", True),
    "astages via arq, 10% retried": ("astages", astages_staged, "flaky", True),
    "astages worker, 10% retried": ("lean", lean_staged, "flaky", True),
    "arq, no stages (floor)": ("plain", arq_flat, "noop", False),
    "astages via arq, events=0": ("astages", astages_no_events, "noop", True),
    "astages worker, events=0": ("lean", lean_no_events, "noop", True),
}
REFERENCE = {
    "arq, stage by stage": "arq, stage by stage",
    "astages via arq": "arq, stage by stage",
    "astages worker": "arq, stage by stage",
    "arq, stage by stage, 10% retried": "arq, stage by stage, 10% retried",
    "astages via arq, 10% retried": "arq, stage by stage, 10% retried",
    "astages worker, 10% retried": "arq, stage by stage, 10% retried",
    "arq, no stages (floor)": "arq, stage by stage",
    "astages via arq, events=0": "arq, stage by stage",
    "astages worker, events=0": "arq, stage by stage",
}
# target time ratios (target 1 and 2)
TARGETS = {
    "astages via arq": 1.05,
    "astages via arq, 10% retried": 1.10,
    "astages worker": 0.85,
    "astages worker, 10% retried": 0.85,
}


async def measure(
    cfg: Config, stages: int, per_stage: int, workers: int = 1, variants: list[str] | None = None
) -> dict[str, Any]:
    """Run the variants round-robin ``cfg.reps`` times with ``workers`` processes per side;
    returns per variant its times, its ratios to its reference (paired by rep) and checks."""
    names = variants or list(VARIANTS)
    clients = {side: await connect(cfg, queue) for side, queue in QUEUES.items()}
    plain = clients["plain"]
    await flush(plain)
    times: dict[str, list[float]] = {n: [] for n in names}
    run_ids: dict[str, list[str]] = {n: [] for n in names}
    worker_cpu: dict[str, list[float]] = {n: [] for n in names}
    client_cpu: dict[str, list[float]] = {n: [] for n in names}
    redis_cost: dict[str, list[RedisCost]] = {n: [] for n in names}
    sides = {VARIANTS[n][0] for n in names}
    pools = {side: Workers(cfg, side, queue, workers if side in sides else 0) for side, queue in QUEUES.items()}
    try:
        async with pools["plain"], pools["astages"], pools["lean"]:
            # one warm-up round (imports, connections, script loading), not counted
            for name in names:
                side, driver, fn, _ = VARIANTS[name]
                await driver(clients[side], "warm" + uuid.uuid4().hex[:6], fn, 1, 50)
            for _ in range(cfg.reps):
                for name in names:
                    side, driver, fn, _ = VARIANTS[name]
                    run = uuid.uuid4().hex[:12]
                    run_ids[name].append(run)
                    pids = pools[side].pids()
                    cost = await RedisCost.start(plain)
                    w0, c0 = sum(map(cpu_seconds, pids)), time.process_time()
                    times[name].append(await driver(clients[side], run, fn, stages, per_stage))
                    worker_cpu[name].append(sum(map(cpu_seconds, pids)) - w0)
                    client_cpu[name].append(time.process_time() - c0)
                    redis_cost[name].append(await cost.stop(plain))
        errors = [e for w in pools.values() for e in w.errors]
        warnings = [e for w in pools.values() for e in w.warnings]
        runs = {side: w.runs for side, w in pools.items()}
    finally:
        await flush(plain)
        for client in clients.values():
            await client.aclose()
    out: dict[str, Any] = {}
    for name in names:
        side, _, fn, is_staged = VARIANTS[name]
        checks = [check_runs(runs[side], r, stages, per_stage, fn == "flaky", is_staged) for r in run_ids[name]]
        ref = REFERENCE[name]
        ratios = [t / r for t, r in zip(times[name], times[ref], strict=True)] if ref in times and ref != name else []
        out[name] = {
            "times": times[name],
            "median_s": median(times[name]),
            "jobs_per_s": stages * per_stage / median(times[name]),
            "ratio": median(ratios) if ratios else (1.0 if ref == name else None),
            "reference": ref,
            "worker_cpu_ms": median(worker_cpu[name]) / (stages * per_stage) * 1000,
            "redis_cmds": median(c.commands for c in redis_cost[name]) / (stages * per_stage),
            "redis_scripts": median(c.scripts for c in redis_cost[name]) / (stages * per_stage),
            "redis_cpu_us": median(c.cpu_us for c in redis_cost[name]) / (stages * per_stage),
            "client_cpu_ms": median(client_cpu[name]) / (stages * per_stage) * 1000,
            "missing": sum(c["missing"] for c in checks),
            "wrong_count": sum(c["wrong_count"] for c in checks),
            "overlaps": sum(c["overlaps"] for c in checks),
            "gaps_ms": [g * 1000 for c in checks for g in c["gaps"]],
            "queued_ms": [g * 1000 for c in checks for g in c["queued"]],
        }
    out["_errors"] = errors
    out["_warnings"] = warnings
    return out


async def run(cfg: Config) -> list[Table]:
    stages, per_stage = 3, cfg.size(1000, 200)
    load_before = load_average()
    res = await measure(cfg, stages, per_stage)
    errors = res.pop("_errors")
    warnings = res.pop("_warnings")
    t = Table(
        f"Throughput: {stages} stages x {per_stage:,} no-op jobs, 1 worker (median of {cfg.reps})",
        [
            "workload",
            "time s",
            "jobs/s",
            "ratio",
            "vs",
            "target",
            "worker CPU ms/job",
            "client CPU ms/job",
            "run twice",
            "order broken",
        ],
    )
    for name, r in res.items():
        t.rows.append(
            [
                name,
                r["median_s"],
                r["jobs_per_s"],
                "" if r["ratio"] is None else round(r["ratio"], 3),
                "" if r["reference"] == name else r["reference"],
                f"<= {TARGETS[name]:.2f}" if name in TARGETS else "",
                r["worker_cpu_ms"],
                r["client_cpu_ms"],
                r["wrong_count"] + r["missing"],
                r["overlaps"],
            ]
        )
    t.notes.append(f"load average before / after: {load_before} / {load_average()} (other work shares the machine)")
    t.notes.append("CPU: medians per job of the worker process(es) and of the client, from /proc and process_time")
    t.notes.append("ratio: median over reps of (time / the same rep's reference time)")
    t.notes.append(f"worker errors: {len(errors)}" + (f" (first: {errors[0]})" if errors else ""))
    if warnings:
        t.notes.append(f"worker warnings: {len(warnings)} (first: {warnings[0]})")
    t.data = {"stages": stages, "per_stage": per_stage, "results": res, "errors": errors, "warnings": warnings}

    g = Table(
        f"Stage gap: last job of stage k ends -> first job of stage k+1 starts (poll_delay {POLL_DELAY_MS:g} ms)",
        ["workload", "gaps", "median ms", "p90 ms", "max ms", "of which: until queued, median ms", "target ms"],
    )
    for name, r in res.items():
        gaps = sorted(r["gaps_ms"])
        if not gaps:
            continue
        p90 = gaps[min(len(gaps) - 1, int(0.9 * len(gaps)))]
        ref = res.get(r["reference"], {}).get("gaps_ms")
        target = f"<= {median(ref):.1f}" if "astages" in name and ref else ""
        g.rows.append([name, len(gaps), median(gaps), p90, gaps[-1], median(r["queued_ms"]), target])
    g.notes.append(
        "until queued: to the first job of stage k+1 being in arq's queue (its score; astages: the report of the "
        "last job that sends the next stage; arq: the client noticing the empty queue and enqueueing); the rest "
        "is the pick-up: up to one poll_delay (astages worker: none when its own report started the stage), "
        "claiming the job, marking it running"
    )
    g.data = {name: {"gaps_ms": r["gaps_ms"], "queued_ms": r["queued_ms"]} for name, r in res.items()}

    c = Table(
        "Redis cost per job (same runs; client and worker together)",
        ["workload", "commands/job", "vs arq", "scripts/job", "Redis CPU us/job", "vs arq", "jobs/s per Redis core"],
    )
    for name, r in res.items():
        base = res.get(r["reference"], r)
        c.rows.append(
            [
                name,
                r["redis_cmds"],
                round(r["redis_cmds"] / base["redis_cmds"], 3),
                r["redis_scripts"],
                r["redis_cpu_us"],
                round(r["redis_cpu_us"] / base["redis_cpu_us"], 3),
                1e6 / r["redis_cpu_us"],
            ]
        )
    c.notes.append(
        "commands: INFO commandstats calls (a script call and every command it runs each count one); script "
        "calls: EVALSHA/EVAL/FCALL; Redis CPU: INFO cpu used_cpu_user + used_cpu_sys of the server over the run "
        "(networking and the event loop included): jobs/s per Redis core = 1e6 / Redis CPU us per job, the "
        "ceiling of one Redis"
    )
    c.notes.append(
        "server-wide: other clients of the same server count too (measure on a server of its own for exact figures)"
    )
    c.notes.append("targets: astages worker <= 1.00 x arq (commands and CPU); astages via arq <= 1.25 x")
    c.data = {
        name: {k: r[k] for k in ("redis_cmds", "redis_scripts", "redis_cpu_us", "reference")} for name, r in res.items()
    }
    return [t, g, c]
