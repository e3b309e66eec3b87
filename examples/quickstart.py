"""The README's example, end to end: two stages, a worker in this process.

    python examples/quickstart.py [redis://127.0.0.1:6379/0]

With no URL it uses an in-memory fakeredis server, so it runs anywhere.
"""

from __future__ import annotations

import asyncio
import sys

from arq.connections import ArqRedis, RedisSettings, create_pool
from arq.worker import Worker

import astages


async def resize(ctx, index, label):
    job = await astages.StagedJob.perform_job(ctx, index, label)
    await job.set_status_message(f"resizing {index}")
    return index


async def summarise(ctx, n, label):
    job = await astages.StagedJob.perform_job(ctx, n, label)
    stage_one = await job.stage().group.stage(1)
    progress = await stage_one.progress()
    await job.set_status_message(f"{progress.successful} resized")


async def connect(url: str | None) -> ArqRedis:
    if url:
        return await create_pool(RedisSettings.from_dsn(url))
    import arq.worker
    import fakeredis

    async def no_info(*_: object) -> None:  # fakeredis has no INFO
        return None

    arq.worker.log_redis_info = no_info
    return ArqRedis(connection_pool=fakeredis.FakeAsyncRedis().connection_pool)


async def main(url: str | None) -> None:
    redis = await connect(url)
    async with astages.within_a_grouping(redis, "nightly import") as group:
        stage = await group.stage(1)
        for i in range(12):
            await stage.enqueue(resize, i, "parameter")
        await (await group.stage(2)).enqueue("summarise", -1, "summary")
    print(f"group {group.id}: stage 1 is {(await stage.status()).value}")
    settings = astages.worker_settings(functions=[resize, summarise])
    worker = Worker(**settings, redis_pool=redis, burst=True, poll_delay=0.01, max_jobs=20)
    await worker.main()
    print(f"group finished and cleaned up: {not await group.exists()}")
    await worker.close()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1] if len(sys.argv) > 1 else None))
