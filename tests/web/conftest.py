"""Fixtures for the dashboard's tests: an httpx client on the ASGI app."""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
import pytest
from arq.connections import ArqRedis

from astages.web import create_app


@pytest.fixture
async def client(redis: ArqRedis) -> AsyncIterator[httpx.AsyncClient]:
    """A client on the dashboard over ``redis`` (both backends)."""
    async with httpx.AsyncClient(transport=httpx.ASGITransport(create_app(redis)), base_url="http://dash") as c:
        yield c


@pytest.fixture
async def fake_client(fake_redis: ArqRedis) -> AsyncIterator[httpx.AsyncClient]:
    """A client on the dashboard over fakeredis only."""
    async with httpx.AsyncClient(transport=httpx.ASGITransport(create_app(fake_redis)), base_url="http://dash") as c:
        yield c
