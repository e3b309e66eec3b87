from __future__ import annotations

from arq.worker import Worker

import astages


async def noop(ctx, i):
    job = await astages.StagedJob.perform_job(ctx, i)
    await job.set_status_message(f"did {i}")
    return i


async def test_smoke(redis):
    async with astages.within_a_grouping(redis, "smoke") as group:
        s1 = await group.stage(1)
        for i in range(3):
            await s1.enqueue(noop, i)
        s2 = await group.stage(2)
        await s2.enqueue("noop", 99)
    assert await s1.status() == astages.StageStatus.RUNNING
    assert await s2.status() == astages.StageStatus.PENDING
    settings = astages.worker_settings(functions=[noop])
    w = Worker(**settings, redis_pool=redis, burst=True, poll_delay=0, max_jobs=10)
    await w.main()
    await w.close()
    assert not await group.exists()
    assert await redis.keys("astages:*") == []
