"""The README's example app: a worker runs the jobs, a client starts a group and waits.

    arq examples.app.WorkerSettings          # or: astages worker examples.app.WorkerSettings
    python -m examples.app                   # in another terminal: start a group, wait for it

REDIS_URL (default redis://127.0.0.1:6379/0) names the server for both.
"""

import asyncio
import os

from arq import create_pool
from arq.connections import RedisSettings

import astages

REDIS = RedisSettings.from_dsn(os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0"))


async def resize(ctx, index, size):
    job = await astages.StagedJob.perform_job(ctx, index, size)  # in a stage or not
    await job.set_status_message(f"resized {index} to {size}")
    return index


async def summarise(ctx):
    job = await astages.StagedJob.perform_job(ctx)
    resized = await job.stage().group.get_stage(1)  # stage 1 is complete: every job final
    await job.set_status_message(f"{(await resized.progress()).successful} photos resized")


# arq takes this dict as its settings; any arq Worker option may be added.
WorkerSettings = astages.worker_settings(functions=[resize, summarise], redis_settings=REDIS)


async def main():
    redis = await create_pool(REDIS)
    async with astages.within_a_grouping(redis, "nightly import", keep_for=600) as group:
        resizing = group.stage(1, name="resize")
        for i in range(12):
            await resizing.enqueue(resize, i, "large")  # recorded, not sent yet
        await group.stage(2, name="summary").enqueue(summarise)
    # leaving the block started stage 1; stage 2 starts once all 12 jobs are final
    summary = await group.wait(timeout=60)  # kept for 10 minutes (keep_for), so never missed
    print(f"{group.description}: {summary.outcome}, {sum(s.successful for s in summary.stages)} jobs done")
    await redis.aclose()


if __name__ == "__main__":
    asyncio.run(main())
