"""Test your staged workflows: pytest fixtures and a helper that runs a group to the end.

Opt in from your top-level ``conftest.py``::

    pytest_plugins = ["astages.testing"]

Fixtures (async; they need pytest-asyncio):

- ``astages_redis``: an ``ArqRedis`` on a fresh in-memory fakeredis server, or on a
  real server when you point the tests at one with ``--astages-redis-url URL`` or the
  ``ASTAGES_REDIS_URL`` environment variable. That database is flushed before each
  test: give the tests a database of their own.
- ``astages_fake_redis``: always fakeredis.

``run_group(redis, group, functions, **worker_options)`` runs a group to completion with
in-process arq burst workers (deferred retries fast-forwarded, no real waiting) and
returns a ``GroupRun``: every job's final status, tries, status message and error, in
stage and enqueue order, and every callback run (``run.callbacks``: event, function,
status, error, the summary it received). A callback naming a function the worker was not
given raises ``CallbackNotRegistered`` (pass ``check_callbacks=False`` to only see it
failed in ``run.callbacks``). A finished group deletes itself, records included, so the
outcomes are collected while the group runs; see ``astages._inprocess`` for how.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator

import pytest
import pytest_asyncio
from arq.connections import ArqRedis
from redis.exceptions import RedisError

from astages._inprocess import (
    CallbackNotRegistered,
    CallbackRun,
    GroupNotInitiated,
    GroupRun,
    GroupStuck,
    GroupTimeout,
    JobOutcome,
    StageSummary,
    connect,
    fake_redis,
    run_group,
)

__all__ = [
    "REDIS_URL_ENV",
    "CallbackNotRegistered",
    "CallbackRun",
    "GroupNotInitiated",
    "GroupRun",
    "GroupStuck",
    "GroupTimeout",
    "JobOutcome",
    "StageSummary",
    "astages_fake_redis",
    "astages_redis",
    "connect",
    "fake_redis",
    "pytest_addoption",
    "run_group",
]

REDIS_URL_ENV = "ASTAGES_REDIS_URL"


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("astages")
    group.addoption(
        "--astages-redis-url",
        default=None,
        help=f"run the astages_redis fixture on this Redis database, flushed before each test "
        f"(default: ${REDIS_URL_ENV}, else an in-memory fakeredis)",
    )


def _redis_url(config: pytest.Config) -> str | None:
    url = config.getoption("astages_redis_url", default=None)
    return str(url) if url else os.environ.get(REDIS_URL_ENV) or None


@pytest_asyncio.fixture
async def astages_redis(request: pytest.FixtureRequest) -> AsyncIterator[ArqRedis]:
    """An ArqRedis on fakeredis, or on the real database you named (flushed first)."""
    url = _redis_url(request.config)
    if url is None:
        redis = fake_redis()
    else:
        try:
            redis = await connect(url)
        except (RedisError, OSError, ValueError) as e:
            pytest.fail(f"astages_redis: cannot use {url}: {e}")
        await redis.flushdb()
    try:
        yield redis
    finally:
        await redis.aclose()


@pytest_asyncio.fixture
async def astages_fake_redis() -> AsyncIterator[ArqRedis]:
    """An ArqRedis on a fresh in-memory fakeredis server."""
    redis = fake_redis()
    try:
        yield redis
    finally:
        await redis.aclose()
