"""Target 4: Redis memory per staged job beyond arq's own job record, and its release.

Records N jobs into a pending stage, starts it, then completes every job (the worker's
two script calls per job, pipelined), measuring with ``MEMORY USAGE ... SAMPLES 0`` (exact
per key, unaffected by other databases) after each step:

- the group's keys per job (pending; sent to arq; every job but the last final);
- arq's own record per job (its job key and queue entry) for the same staged jobs, and
  for jobs enqueued by plain ``enqueue_job`` (arq's ids are shorter than staged ids);
- after the last job: how many ``astages:*`` keys are left (target: none).
"""

from __future__ import annotations

import uuid

from arq.connections import ArqRedis
from arq.constants import job_key_prefix

import astages
from benchmarks.common import Config, Table, connect, flush, key_memory
from benchmarks.drive import complete_pipelined

QUEUE = "bench:idle"


async def group_bytes(redis: ArqRedis, group_id: str) -> int:
    total, _ = await key_memory(redis, f"astages:{{{group_id}}}*")
    return total


async def arq_bytes(redis: ArqRedis, ids: list[str]) -> int:
    """MEMORY USAGE of the arq job keys of ``ids`` plus the queue sorted set."""
    total = 0
    for i in range(0, len(ids), 1000):
        async with redis.pipeline(transaction=False) as pipe:
            for job_id in ids[i : i + 1000]:
                pipe.memory_usage(job_key_prefix + job_id, samples=0)
            total += sum(int(v or 0) for v in await pipe.execute())
    return total + int(await redis.memory_usage(QUEUE, samples=0) or 0)


async def run(cfg: Config) -> list[Table]:
    n = cfg.size(100_000, 10_000)
    plain_n = min(n, cfg.size(10_000, 2_000))
    redis = await connect(cfg, QUEUE)
    try:
        await flush(redis)
        used0 = int((await redis.info("memory"))["used_memory"])
        group = await astages.StagedGroup.create(redis, "memory", window=None)  # every job sent by initiate
        stage = await group.stage(1)
        await stage.enqueue_many(("noop", ("memory", 1, i)) for i in range(n))
        pending = await group_bytes(redis, group.id)
        await group.initiate()
        sent = await group_bytes(redis, group.id)
        ids = [j.id for j in await stage.jobs()]
        staged_arq = await arq_bytes(redis, [i for i in ids if i])
        used1 = int((await redis.info("memory"))["used_memory"])
        await complete_pipelined(redis, group.id, 1, list(range(1, n)))
        nearly = await group_bytes(redis, group.id)
        await complete_pipelined(redis, group.id, 1, [n])
        # reply keys of the recording calls (re-sent calls act once) expire within a minute
        # ... and the prefix's totals and samples (kept across groups, by design)
        kept = (b":reply:", b"astages:totals", b"astages:series")
        left = [k async for k in redis.scan_iter(match="astages:*", count=1000) if not any(x in k for x in kept)]
        used2 = int((await redis.info("memory"))["used_memory"])

        await flush(redis)
        plain_ids = []
        for i in range(plain_n):
            job = await redis.enqueue_job("noop", "memory", 1, i, _job_id=uuid.uuid4().hex)
            assert job is not None
            plain_ids.append(job.job_id)
        plain_arq = await arq_bytes(redis, plain_ids)
    finally:
        await flush(redis)
        await redis.aclose()

    t = Table(
        f"Redis memory per staged job ({n:,} jobs in one stage, MEMORY USAGE)",
        ["state", "astages bytes/job", "target", "arq's record bytes/job"],
    )
    t.rows.append(["recorded (pending stage)", pending / n, "", ""])
    t.rows.append(["sent to arq (queued)", sent / n, "<= 300", staged_arq / n])
    t.rows.append(["all final but the last", nearly / n, "<= 300", ""])
    t.rows.append(["group finished", 0 if not left else f"{len(left)} keys left", "0", ""])
    t.rows.append([f"plain arq enqueue_job ({plain_n:,} jobs)", "", "", plain_arq / plain_n])
    t.notes.append(
        f"used_memory (server-wide, noisy): +{(used1 - used0) / n:.0f} bytes/job with the stage sent, "
        f"{(used2 - used0) / n:+.0f} after the group finished (arq's own job records are still queued)"
    )
    t.notes.append("arq's record per staged job is larger than plain arq's by the longer job id (key and queue member)")
    t.data = {
        "n": n,
        "pending": pending / n,
        "sent": sent / n,
        "nearly": nearly / n,
        "left": len(left),
        "arq_staged": staged_arq / n,
        "arq_plain": plain_arq / plain_n,
    }
    return [t]
