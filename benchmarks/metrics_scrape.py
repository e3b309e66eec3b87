"""How long a Prometheus scrape takes with many live groups (target: 1,000 groups < 100 ms).

    python -m benchmarks.metrics_scrape [--url redis://127.0.0.1:6379/10] [--groups 1000]
        [--stages 3] [--jobs 5] [--scrapes 20]

Flushes the database, makes ``--groups`` running groups of ``--stages`` stages with
``--jobs`` jobs each (no worker runs: the first stage's jobs wait in arq's queue), then
times ``Metrics.render()`` (the dashboard's /metrics: every Redis read and the text
exposition) ``--scrapes`` times. The first scrape also reads one job spec per stage (the
stage's queue, cached after); it is reported apart. Prints the median and the slowest of
the others, and how many commands one scrape sends.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from typing import Any

from astages import StagedGroup
from astages._connection import connect
from astages.metrics import Metrics

DEFAULT_URL = "redis://127.0.0.1:6379/10"


async def noop(ctx: dict[str, Any]) -> None:
    return None


async def populate(redis: Any, groups: int, stages: int = 3, jobs: int = 5, batch: int = 50) -> None:
    """``groups`` running groups of ``stages`` stages of ``jobs`` jobs (stage 1 sent to arq)."""

    async def one(i: int) -> None:
        group = await StagedGroup.create(redis, f"bench {i}")
        for n in range(1, stages + 1):
            stage = group.stage(n, name=f"s{n}")
            for _ in range(jobs):
                await stage.enqueue(noop)
        await group.initiate()

    for start in range(0, groups, batch):
        await asyncio.gather(*(one(i) for i in range(start, min(groups, start + batch))))


async def time_scrapes(redis: Any, scrapes: int) -> tuple[float, list[float], int]:
    """(first scrape's seconds, the others' seconds, bytes of one exposition)."""
    metrics = Metrics(redis)
    started = time.perf_counter()
    await metrics.render()
    first = time.perf_counter() - started
    times, size = [], 0
    for _ in range(scrapes):
        started = time.perf_counter()
        body = await metrics.render()
        times.append(time.perf_counter() - started)
        size = len(body)
    return first, times, size


async def main(url: str, groups: int, stages: int, jobs: int, scrapes: int) -> None:
    redis = await connect(url)
    try:
        await redis.flushdb()
        started = time.perf_counter()
        await populate(redis, groups, stages, jobs)
        print(f"made {groups} running groups ({stages} stages x {jobs} jobs) in {time.perf_counter() - started:.1f}s")
        first, times, size = await time_scrapes(redis, scrapes)
        print(f"first scrape (reads each stage's queue once): {first * 1000:.1f} ms")
        print(
            f"scrape: median {statistics.median(times) * 1000:.1f} ms, slowest {max(times) * 1000:.1f} ms "
            f"over {len(times)} scrapes; {size / 1024:.0f} KiB of text"
        )
        await redis.flushdb()
    finally:
        await redis.aclose()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default=DEFAULT_URL)
    parser.add_argument("--groups", type=int, default=1000)
    parser.add_argument("--stages", type=int, default=3)
    parser.add_argument("--jobs", type=int, default=5)
    parser.add_argument("--scrapes", type=int, default=20)
    args = parser.parse_args()
    asyncio.run(main(args.url, args.groups, args.stages, args.jobs, args.scrapes))
