"""Target 2: astages' Redis cost per job completion is flat in the stage's size.

For stages of 100, 10,000 and 100,000 jobs (quick: 100, 1,000, 10,000): record and start
the stage, then complete every job with the worker's own two script calls per job and
read what Redis spent from ``INFO commandstats`` (server time and commands, including
the commands the scripts run). A sample of the jobs goes through the real worker wrapper
and hooks (no arq), which also counts the client's round trips per job.

``INFO commandstats`` is server-wide: other clients of the same server add to it, so the
table shows how many script calls were not ours (``foreign``) and the figures use the
server's time per call of each measured window.
"""

from __future__ import annotations

import astages
from benchmarks.common import Config, Table, command_stats, connect, flush, median, stats_diff
from benchmarks.drive import complete_pipelined, run_like_worker

QUEUE = "bench:idle"  # no worker serves it: the jobs stay queued while we drive them


async def one_size(cfg: Config, n: int, sample: int) -> dict[str, float]:
    redis = await connect(cfg, QUEUE)
    try:
        await flush(redis)
        group = await astages.StagedGroup.create(redis, f"flat {n}", window=None)  # every job sent at once
        stage = await group.stage(1)
        await stage.enqueue_many(("noop", (i,)) for i in range(n))
        await group.initiate()
        seqs = list(range(1, n + 1))
        sample = min(sample, n // 2)
        wall, trips = await run_like_worker(redis, group.id, 1, seqs[:sample])
        before = await command_stats(redis)
        await complete_pipelined(redis, group.id, 1, seqs[sample:-1])
        after = await command_stats(redis)
        await complete_pipelined(redis, group.id, 1, seqs[-1:])  # completes the stage and the group
        last = await command_stats(redis)
        left = await group.exists()
    finally:
        await flush(redis)
        await redis.aclose()
    diff = stats_diff(before, after)
    jobs = n - sample - 1
    ours = 2 * jobs
    calls, usec = diff.get("evalsha", (0, 0))
    inner = sum(c for name, (c, _) in diff.items() if name not in ("evalsha", "info", "script|load"))
    end_calls, end_usec = stats_diff(after, last).get("evalsha", (0, 0))
    return {
        "last_us": end_usec / max(end_calls, 1) * 2,
        "jobs": n,
        "round_trips": trips / max(sample, 1),
        "client_us": wall / max(sample, 1) * 1e6,
        "redis_us": usec / max(calls, 1) * ours / jobs,
        "commands": inner * ours / max(calls, 1) / jobs,
        "foreign": calls - ours + end_calls - 2,
        "group_left": float(left),
    }


async def run(cfg: Config) -> list[Table]:
    sizes = [cfg.size(100, 100), cfg.size(10_000, 1_000), cfg.size(100_000, 10_000)]
    sample = cfg.size(2_000, 500)
    rows = []
    for n in sizes:
        reps = [await one_size(cfg, n, sample) for _ in range(2 if n > 20_000 else cfg.reps)]
        row = {k: median(r[k] for r in reps) for k in reps[0]}
        row["foreign"] = sum(r["foreign"] for r in reps)
        row["reps"] = len(reps)
        rows.append(row)
    base = rows[0]
    t = Table(
        "Flat cost per job completion (start_job + finish_job), by stage size",
        [
            "stage size",
            "round trips/job",
            "Redis us/job",
            "vs smallest",
            "Redis cmds/job",
            "client us/job",
            "last job (ends the stage) us",
            "foreign calls",
            "reps",
        ],
    )
    for r in rows:
        t.rows.append(
            [
                int(r["jobs"]),
                r["round_trips"],
                r["redis_us"],
                round(r["redis_us"] / base["redis_us"], 2),
                r["commands"],
                r["client_us"],
                r["last_us"],
                int(r["foreign"]),
                int(r["reps"]),
            ]
        )
    t.notes.append("medians over the reps; foreign: script calls of other clients in the windows (all reps)")
    t.notes.append("target: Redis time per job within 20% across sizes (vs smallest <= 1.20)")
    t.notes.append(
        f"round trips and client time: the first {sample:,} jobs (half of a smaller stage) "
        "through the worker wrapper and hooks, 50 in flight"
    )
    t.notes.append(
        "Redis time and commands: INFO commandstats over the other jobs but the last, "
        "sent pipelined (500 jobs a round trip); commands include those run by the scripts; the last job's report "
        "(it completes the stage and finishes the group: summary, callbacks, deleting the keys) is shown apart"
    )
    t.data = {"rows": rows}
    return [t]
