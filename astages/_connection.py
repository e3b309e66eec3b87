"""Connections for the command, the demo and the test harness: a real server checked
with a PING, or an in-memory fakeredis server (with arq's INFO logging made tolerant of
fakeredis, which has no INFO)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import arq.worker
from arq.connections import ArqRedis, RedisSettings, create_pool
from arq.constants import default_queue_name
from redis.exceptions import RedisError

__all__ = ["connect", "fake_redis", "safe_url"]


async def _tolerant_redis_info(redis: Any, log_func: Callable[[str], Any]) -> None:
    """arq logs the server's INFO at worker start; fakeredis has no INFO."""
    try:
        await _ARQ_LOG_REDIS_INFO(redis, log_func)
    except RedisError:
        log_func("redis info unavailable (fakeredis has no INFO)")


_ARQ_LOG_REDIS_INFO = arq.worker.log_redis_info  # type: ignore[attr-defined]
if not getattr(_ARQ_LOG_REDIS_INFO, "__astages_tolerant__", False):
    _tolerant_redis_info.__astages_tolerant__ = True  # type: ignore[attr-defined]
    arq.worker.log_redis_info = _tolerant_redis_info  # type: ignore[attr-defined]


def fake_redis(*, default_queue_name: str = default_queue_name) -> ArqRedis:
    """An ArqRedis on a new, empty, in-memory fakeredis server (Lua included)."""
    import fakeredis

    server = fakeredis.FakeServer()
    client = fakeredis.FakeAsyncRedis(server=server)
    redis = ArqRedis(connection_pool=client.connection_pool)
    redis.default_queue_name = default_queue_name
    return redis


async def connect(url: str | None, *, default_queue_name: str = default_queue_name) -> ArqRedis:
    """An ArqRedis on ``url`` (checked with a PING, no retries), or on fakeredis when
    ``url`` is empty. Raises ``redis.exceptions.RedisError`` or ``OSError`` when the
    server does not answer and ``ValueError`` for a URL that is not a Redis URL."""
    if not url:
        return fake_redis(default_queue_name=default_queue_name)
    try:
        settings = RedisSettings.from_dsn(url)
    except (RuntimeError, ValueError) as e:
        raise ValueError(f"{url!r} is not a Redis URL (redis://host:port/db, rediss://, unix://)") from e
    settings.conn_retries = 0
    settings.conn_timeout = 2
    return await create_pool(settings, default_queue_name=default_queue_name)


def safe_url(url: str) -> str:
    """The URL without its password (to show where a command or the demo runs)."""
    if "@" not in url:
        return url
    scheme, _, rest = url.partition("://")
    return f"{scheme}://***@{rest.rpartition('@')[2]}"
