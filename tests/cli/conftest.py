"""A flushed real database for the command-line tests."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import redis as sync_redis


@pytest.fixture
def db_url(redis_server: Any) -> Iterator[str]:
    """The URL of the real test database, flushed (the commands connect on their own)."""
    client = sync_redis.Redis(host=redis_server.host, port=redis_server.port, db=redis_server.db)
    client.flushdb()
    try:
        yield str(redis_server.url)
    finally:
        client.close()
