"""A stage of 100,000 jobs on the real server: every view renders one page quickly, because
no request reads the whole stage."""

from __future__ import annotations

import time

import httpx
from arq.connections import ArqRedis
from helpers import start_unsent

import astages
from astages.web import create_app
from astages.web.stagepage import FEW, SCAN_BUDGET

JOBS = 100_000
# Generous bounds for a loaded CI machine; on a quiet one each view takes 5-40 ms.
PAGE_SECONDS = 1.0


async def test_views_of_a_100k_stage_stay_bounded(real_redis: ArqRedis) -> None:
    """Default, last page, newest first, filters, windowed sorts and a job page of a 100k-job stage each take < 1 s."""
    group = await astages.StagedGroup.create(real_redis, "huge")
    stage = await group.stage(1)
    jobs = await stage.enqueue_many([("work", (i, "payload" * 3)) for i in range(JOBS)])
    await start_unsent(group, 1)
    for job in jobs[-5:]:
        await job.enqueue_job()
    await jobs[77_777].set_status_message("needle")
    base = f"/groups/{group.id}/stages/1"
    views = {
        "": 50,
        "?page=2000": 50,
        "?order=desc": 50,
        "?status=pending": 50,
        "?status=queued": 0,  # 5 queued jobs at the very end: the walk stops at its budget
        "?status=failed": 0,
        "?sort=status": 50,
        "?sort=message&order=desc&window=77": 50,
        "?sort=function&window=99": 50,
        f"?status=queued&after={JOBS - 6}": 5,
    }
    transport = httpx.ASGITransport(create_app(real_redis))
    async with httpx.AsyncClient(transport=transport, base_url="http://dash") as client:
        for query, rows in views.items():
            started = time.perf_counter()
            reply = await client.get("/api" + base + query)
            took = time.perf_counter() - started
            assert reply.status_code == 200, query
            assert len(reply.json()["jobs"]) == rows, query
            assert took < PAGE_SECONDS, f"{query}: {took:.3f} s"
            page = await client.get(base + query)
            assert page.status_code == 200
        walked = (await client.get("/api" + base + "?status=queued")).json()
        assert walked["matches"] == 5 and walked["next_after"] == SCAN_BUDGET - 1
        assert f"Looked at jobs #1 to #{SCAN_BUDGET:,}" in walked["notes"][0]
        needle = (await client.get("/api" + base + "?sort=message&order=desc&window=77")).json()
        assert needle["jobs"][0]["message"] == "needle"
        started = time.perf_counter()
        assert (await client.get(base + f"/jobs/{jobs[50_000].ref.seq}")).status_code == 200  # type: ignore[union-attr]
        assert time.perf_counter() - started < PAGE_SECONDS
    assert FEW < JOBS


async def test_few_failures_among_many_are_found_at_once(fake_client: httpx.AsyncClient, fake_redis: ArqRedis) -> None:
    """Failed (and other rare statuses) come from their own small hash: exact pages, in order, both ways."""
    group = await astages.StagedGroup.create(fake_redis, "rare")
    stage = await group.stage(1)
    jobs = await stage.enqueue_many([("work", (i,)) for i in range(300)])
    await stage.initiate()
    keys = stage.group.store.keys
    failed = [10, 150, 299]
    for index in failed:
        job = jobs[index]
        assert job.ref is not None
        await stage.group.store.move("start_job", group.id, 1, job.ref.seq, 1)
        await stage.group.store.move("finish_job", group.id, 1, job.ref.seq, 1, "f", "boom")
    assert await fake_redis.hlen(keys.stage_part(group.id, 1, "err")) == 3
    base = f"/api/groups/{group.id}/stages/1"
    data = (await fake_client.get(base + "?status=failed")).json()
    assert [j["index"] for j in data["jobs"]] == failed and data["notes"] == []
    newest = (await fake_client.get(base + "?status=failed&order=desc")).json()
    assert [j["index"] for j in newest["jobs"]] == failed[::-1]
    after = (await fake_client.get(base + "?status=failed&after=10")).json()
    assert [j["index"] for j in after["jobs"]] == [150, 299]
    assert after["prev_before"] == 150
    before = (await fake_client.get(base + "?status=failed&before=150")).json()
    assert [j["index"] for j in before["jobs"]] == [10]
    queued = (await fake_client.get(base + "?status=queued")).json()
    assert queued["matches"] == 297 and len(queued["jobs"]) == 50 and queued["next_after"] == 50
    more = (await fake_client.get(base + f"?status=queued&after={queued['next_after']}")).json()
    assert more["jobs"][0]["index"] == 51
