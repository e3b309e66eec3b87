"""Retry Job and Retry Failed: shown only where a retry applies, CSRF-checked, confirmed
(Retry Failed), acting once and saying what they did."""

from __future__ import annotations

import httpx
from arq.connections import ArqRedis

import astages
from astages import JobStatus
from web.helpers import flash_of, post_form


async def work(ctx, tag):
    return tag


async def failed_group(redis: ArqRedis) -> tuple[astages.StagedGroup, list[astages.StagedJob]]:
    """A running group whose stage 1 has two failed jobs and one still queued."""
    async with astages.within_a_grouping(redis, "retry buttons") as group:
        jobs = await group.stage(1).enqueue_many([(work, (i,)) for i in range(3)])
        await group.stage(2).enqueue(work, "later")
    for job in jobs[:2]:
        assert job.ref is not None
        await group.store.run("start_job", group.id, 1, job.ref.seq, 1)
        await group.store.move("finish_job", group.id, 1, job.ref.seq, 1, "f", "boom")
    return group, jobs


async def _follow(client: httpx.AsyncClient, reply: httpx.Response) -> str:
    assert reply.status_code == 303, reply.text
    return flash_of((await client.get(reply.headers["location"])).text) or ""


async def test_retry_job_button(client: httpx.AsyncClient, redis: ArqRedis) -> None:
    """A failed job's page offers Retry Job, which queues it again; a queued job's page does not."""
    group, jobs = await failed_group(redis)
    failed, queued = jobs[0], jobs[2]
    assert failed.ref is not None and queued.ref is not None
    page = f"/groups/{group.id}/stages/1/jobs/{failed.ref.seq}"
    assert "Retry Job" in (await client.get(page)).text
    assert "Retry Job" not in (await client.get(f"/groups/{group.id}/stages/1/jobs/{queued.ref.seq}")).text
    forged = await client.post(page + "/retry", data={"csrf": "forged", "next": page})
    assert forged.status_code == 403
    assert await failed.status() is JobStatus.FAILED
    reply = await post_form(client, page, page + "/retry", confirmed=False)
    assert "Retried job work" in await _follow(client, reply)
    assert await failed.status() is JobStatus.QUEUED
    assert "Retry Job" not in (await client.get(page)).text
    again = await post_form(client, page, page + "/retry", confirmed=False)
    message = await _follow(client, again)
    assert "Nothing done" in message and "queued, not failed" in message


async def test_retry_failed_button(client: httpx.AsyncClient, redis: ArqRedis) -> None:
    """A running stage with failures offers Retry Failed: it asks first, then retries them all."""
    group, jobs = await failed_group(redis)
    page = f"/groups/{group.id}/stages/1"
    assert "Retry Failed" in (await client.get(page)).text
    assert "Retry Failed" not in (await client.get(f"/groups/{group.id}/stages/2")).text
    asked = await post_form(client, page, page + "/retry-failed", confirmed=False)
    assert asked.status_code == 200 and "Retry every failed job" in asked.text
    assert await jobs[0].status() is JobStatus.FAILED
    reply = await post_form(client, page, page + "/retry-failed")
    assert "Retried 2 jobs of stage 1" in await _follow(client, reply)
    assert [await j.status() for j in jobs] == [JobStatus.QUEUED] * 3
    assert "Retry Failed" not in (await client.get(page)).text
    again = await post_form(client, page, page + "/retry-failed")
    assert "Nothing done" in await _follow(client, again)
    refused = await post_form(client, page, f"/groups/{group.id}/stages/2/retry-failed")
    assert "has not started" in await _follow(client, refused)
