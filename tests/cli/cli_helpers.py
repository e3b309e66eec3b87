"""Sync helpers and a fixture for the command-line tests (click's runner calls asyncio.run
itself, so these tests are sync). Not a conftest.py: other tests import the top-level
conftest as ``conftest``, and a second one would shadow it."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterator
from typing import Any, TypeVar

import pytest
import redis as sync_redis
from arq.connections import ArqRedis

import astages
from astages._connection import connect

T = TypeVar("T")


@pytest.fixture(name="db_url")
def db_url_fixture(redis_server: Any) -> Iterator[str]:
    """The URL of the real test database, flushed (the commands connect on their own)."""
    client = sync_redis.Redis(host=redis_server.host, port=redis_server.port, db=redis_server.db)
    client.flushdb()
    try:
        yield str(redis_server.url)
    finally:
        client.close()


def on_redis(url: str, action: Callable[[ArqRedis], Awaitable[T]]) -> T:
    """Run ``action`` with a connection to ``url`` in a loop of its own (the tests are sync,
    as click's runner calls asyncio.run itself)."""

    async def run() -> T:
        redis = await connect(url)
        try:
            return await action(redis)
        finally:
            await redis.aclose()

    return asyncio.run(run())


async def noop(ctx: dict[str, Any], i: int) -> int:
    job = await astages.StagedJob.perform_job(ctx, i)
    await job.set_status_message(f"noop {i} done")
    return i


async def crash(ctx: dict[str, Any], i: int) -> None:
    job = await astages.StagedJob.perform_job(ctx, i)
    await job.set_status_message(f"crash {i} starting")
    raise ValueError(f"crash {i} went wrong")


def make_group(url: str, description: str = "nightly import", *, initiate: bool = True, jobs: int = 3) -> str:
    """A group: stage 1 with ``jobs`` noop jobs, stage 2 with one; returns its id."""

    async def action(redis: ArqRedis) -> str:
        group = await astages.StagedGroup.create(redis, description)
        await (await group.stage(1)).enqueue_many([(noop, (i,)) for i in range(jobs)])
        await (await group.stage(2)).enqueue(noop, 99)
        if initiate:
            await group.initiate()
        return group.id

    return on_redis(url, action)
