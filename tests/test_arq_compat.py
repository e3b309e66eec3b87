"""arq compatibility: what a plain arq user sees is arq's behaviour (issue 10, items 11, 12, 14).

A job's ``ctx['redis']`` is arq's pool as the user configured it (no retry policy of
astages': a job's own command whose reply is lost is not sent again), while astages' own
idempotent calls still survive dropped connections; ``HardenedWorker`` survives Redis
connectivity loss and nothing else (a hook that raises, a wrong password or a TLS
failure stops it, as it stops arq's Worker); astages' exceptions survive arq's pickling.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import pickle
import ssl
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import arq
import arq.worker
import pytest
from arq.connections import ArqRedis, RedisSettings
from arq.constants import default_queue_name, in_progress_key_prefix, result_key_prefix
from arq.jobs import Job, JobStatus
from conftest import Server
from helpers import run_burst, stop_when_idle, wait_for
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import AuthenticationError, AuthorizationError, ResponseError, WatchError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

import astages
import astages.exceptions
from astages._scripts import SCRIPTS
from astages.exceptions import AstagesError, CorruptRecord
from astages.runner import POOL_RETRIES, HardenedWorker, _chain, reconnecting_client, transient
from astages.worker import CTX_REDIS

# ---------------------------------------------------------------------------------------
# Defect 14: every astages error pickles (arq stores a failed job's exception pickled)


def _sample(param: inspect.Parameter) -> Any:
    """A plausible argument for an exception's ``__init__`` parameter."""
    annotation = str(param.annotation)
    if "int" in annotation:
        return 7
    if "float" in annotation:
        return 1.5
    return f"<{param.name}>"


def _instance(cls: type[AstagesError]) -> AstagesError:
    if cls.__init__ is AstagesError.__init__:
        return cls("a message", 2)
    params = [p for p in inspect.signature(cls).parameters.values() if p.default is inspect.Parameter.empty]
    return cls(*[_sample(p) for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)])


ERRORS = [
    getattr(astages.exceptions, name)
    for name in astages.exceptions.__all__
    if isinstance(getattr(astages.exceptions, name), type)
    and issubclass(getattr(astages.exceptions, name), AstagesError)
]


@pytest.mark.parametrize("cls", ERRORS, ids=lambda cls: cls.__name__)
def test_every_error_round_trips_through_pickle(cls: type[AstagesError]):
    """Every class in astages.exceptions unpickles to the same type, message, args and attributes."""
    error = _instance(cls)
    error.add_note("a note")
    copy = pickle.loads(pickle.dumps(error))
    assert type(copy) is cls
    assert str(copy) == str(error) and copy.args == error.args
    assert copy.__dict__ == error.__dict__


async def fails_corrupt(ctx: dict[str, Any], key: str) -> None:
    raise CorruptRecord(key, "made up by the test")


async def test_arq_result_of_a_job_failed_with_an_astages_error_deserializes(real_redis: ArqRedis):
    """arq's result of a plain and of a staged job that raised CorruptRecord reads back as that error."""
    plain = await real_redis.enqueue_job("fails_corrupt", "plain:key")
    assert plain is not None
    async with astages.within_a_grouping(real_redis, "pickled") as group:
        staged = await (await group.stage(1)).enqueue(fails_corrupt, "staged:key")
    await run_burst(real_redis, [fails_corrupt])
    for job_id, key in ((plain.job_id, "plain:key"), (staged.id, "staged:key")):
        info = await Job(job_id, real_redis).result_info()
        assert info is not None and not info.success
        assert isinstance(info.result, CorruptRecord)
        assert (info.result.key, info.result.detail) == (key, "made up by the test")
        assert await Job(job_id, real_redis).status() == JobStatus.complete


# ---------------------------------------------------------------------------------------
# A loopback proxy to the real server that loses a reply (or a request) on demand


@dataclass
class LossyProxy:
    """Relays TCP between clients and Redis on 127.0.0.1. ``rule(chunk)`` sees every chunk a
    client sends and answers None (relay), "reply" (Redis runs it, then the client's
    connection is closed instead of getting the reply) or "request" (the connection is
    closed before Redis sees it). redis-py waits for each reply before its next command on
    a connection, so the reply to a chunk is the next thing Redis sends on it."""

    upstream: tuple[str, int]
    rule: Callable[[bytes], str | None] = lambda chunk: None
    lost: list[bytes] = field(default_factory=list)
    port: int = 0
    _server: asyncio.Server | None = None
    _tasks: set[asyncio.Task[None]] = field(default_factory=set)

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        assert self._server is not None
        self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._server.wait_closed()

    def settings(self, db: int) -> RedisSettings:
        return RedisSettings(host="127.0.0.1", port=self.port, database=db)

    async def _handle(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        up_r, up_w = await asyncio.open_connection(*self.upstream)
        losing = asyncio.Event()

        async def downstream() -> None:
            while data := await up_r.read(65536):
                if losing.is_set():
                    return  # Redis answered: the reply is lost with the connection
                client_w.write(data)
                await client_w.drain()

        down = asyncio.ensure_future(downstream())
        try:
            while data := await client_r.read(65536):
                verdict = self.rule(data)
                if verdict == "request":
                    self.lost.append(data)
                    return
                if verdict == "reply":
                    self.lost.append(data)
                    losing.set()
                up_w.write(data)
                await up_w.drain()
                if losing.is_set():
                    await asyncio.wait_for(down, 10)
                    return
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            down.cancel()
            for writer in (client_w, up_w):
                writer.close()
                with contextlib.suppress(OSError, asyncio.CancelledError):
                    await writer.wait_closed()
            self._tasks.discard(task)


def once(predicate: Callable[[bytes], bool], verdict: str = "reply", times: int = 1) -> Callable[[bytes], str | None]:
    """A rule: the first ``times`` chunks matching ``predicate`` get ``verdict``."""
    left = [times]

    def rule(chunk: bytes) -> str | None:
        if left[0] > 0 and predicate(chunk):
            left[0] -= 1
            return verdict
        return None

    return rule


@pytest.fixture
async def proxy(redis_server: Server) -> AsyncIterator[LossyProxy]:
    """A LossyProxy in front of the real server (losing nothing until its rule is set)."""
    proxy = LossyProxy((redis_server.host, redis_server.port))
    await proxy.start()
    try:
        yield proxy
    finally:
        await proxy.stop()


async def run_worker(worker: arq.worker.Worker, within: float = 20) -> None:
    """Run an in-process burst worker to its end (its error, if any, raised), then close it."""
    try:
        await asyncio.wait_for(worker.main(), within)
    finally:
        await worker.close()


# ---------------------------------------------------------------------------------------
# Defect 11: ctx['redis'] is arq's pool as configured; astages' own calls retry


COUNTER = "compat:counter"
ran: list[str] = []


@pytest.fixture(autouse=True)
def _clear_runs() -> None:
    ran.clear()


async def incr_job(ctx: dict[str, Any]) -> int:
    ran.append(ctx["job_id"])
    return int(await ctx["redis"].incr(COUNTER))


@pytest.mark.parametrize("worker_class", [arq.worker.Worker, HardenedWorker], ids=["arq", "hardened"])
async def test_a_jobs_own_command_whose_reply_is_lost_acts_once(
    real_redis: ArqRedis, redis_server: Server, proxy: LossyProxy, worker_class: type[arq.worker.Worker]
):
    """Under worker_settings, a job's own INCR whose reply is lost is not re-sent: it fails, as in arq."""
    job = await real_redis.enqueue_job("incr_job")
    assert job is not None
    proxy.rule = once(lambda chunk: b"INCR" in chunk and COUNTER.encode() in chunk)
    settings = astages.worker_settings(
        functions=[incr_job], redis_settings=proxy.settings(redis_server.db), sweep_interval=0
    )
    await run_worker(worker_class(**settings, burst=True, poll_delay=0, handle_signals=False))
    assert len(proxy.lost) == 1 and ran == [job.job_id]
    assert await real_redis.get(COUNTER) == b"1"
    info = await job.result_info()
    assert info is not None and not info.success and isinstance(info.result, RedisConnectionError)


SEEN: dict[str, Any] = {}


async def look(ctx: dict[str, Any]) -> None:
    SEEN["arq"] = ctx["redis"].connection_pool.connection_kwargs.get("retry")
    SEEN["own"] = ctx[CTX_REDIS]
    SEEN["own_retry"] = ctx[CTX_REDIS].connection_pool.connection_kwargs.get("retry")


async def test_ctx_redis_keeps_the_users_settings_and_astages_has_its_own_client(
    real_redis: ArqRedis, redis_server: Server
):
    """ctx['redis'] has no retry policy unless the user set one; astages' own client has one and is closed."""
    seen = SEEN
    user_retry = Retry(NoBackoff(), 2)
    for redis_settings, expected in ((redis_server.settings, None), (redis_server.settings, user_retry)):
        if expected is not None:
            redis_settings = RedisSettings(
                host=redis_server.host, port=redis_server.port, database=redis_server.db, retry=user_retry
            )
        await real_redis.enqueue_job("look")
        settings = astages.worker_settings(functions=[look], redis_settings=redis_settings, sweep_interval=0)
        assert settings.get("redis_settings") is redis_settings
        await run_worker(arq.worker.Worker(**settings, burst=True, poll_delay=0, handle_signals=False))
        if expected is None:
            assert seen["arq"] is None  # as configured: no retry
            assert seen["own_retry"]._retries == POOL_RETRIES
        else:
            assert seen["arq"]._retries == seen["own_retry"]._retries == 2  # the user's policy, kept
        pool = seen["own"].connection_pool
        assert all(not c.is_connected for c in pool._available_connections + list(pool._in_use_connections))


async def staged_step(ctx: dict[str, Any], tag: str) -> str:
    ran.append(tag)
    return tag


async def staged_done(ctx: dict[str, Any], summary: Any) -> None:
    ran.append(f"callback {summary.outcome}")


async def test_astages_own_calls_survive_lost_replies(real_redis: ArqRedis, redis_server: Server, proxy: LossyProxy):
    """Lost replies of astages' start/finish scripts (single or batched) and of a callback's summary read are
    re-sent: the group ends."""
    async with astages.within_a_grouping(real_redis, "lossy") as group:
        for n in (1, 2):
            await (await group.stage(n)).enqueue_many([(staged_step, (f"{n}-{i}",)) for i in range(3)])
        await group.on_complete(staged_done)
    for script in SCRIPTS.values():  # EVALSHA from the first call (no NOSCRIPT detour)
        await real_redis.script_load(script.script)
    shas = [SCRIPTS[name].sha.encode() for name in ("start_job", "finish_job", "start_jobs", "finish_jobs")]
    lost_twice: dict[bytes, int] = {}

    def rule(chunk: bytes) -> str | None:
        # the first two replies of every start/finish call and of the summary read are lost
        if any(sha in chunk for sha in shas) or (b"GET" in chunk and b":summary:" in chunk):
            lost_twice[chunk] = lost_twice.get(chunk, 0) + 1
            return "reply" if lost_twice[chunk] <= 2 else None
        return None

    proxy.rule = rule
    settings = astages.worker_settings(
        functions=[staged_step, staged_done], redis_settings=proxy.settings(redis_server.db), sweep_interval=0
    )
    for _ in range(5):  # a burst can end between two stages
        await run_worker(arq.worker.Worker(**settings, burst=True, poll_delay=0, handle_signals=False))
        if not await group.exists():
            break
    assert not await group.exists()
    assert sorted(ran) == sorted([f"{n}-{i}" for n in (1, 2) for i in range(3)] + ["callback complete"])
    # every call (a start or report, alone or shared by jobs, and the summary read) lost two replies
    assert len(lost_twice) >= 3 and all(sent == 3 for sent in lost_twice.values())
    assert len(proxy.lost) == 2 * len(lost_twice)


def test_reconnecting_client_copies_the_connection_and_adds_the_policy():
    """reconnecting_client(): same connection class and kwargs on a new pool (Sentinel too), a retry policy added."""
    from redis.asyncio.sentinel import Sentinel, SentinelConnectionPool

    plain = ArqRedis(host="example.invalid", port=6390, db=3, password="secret", ssl=True)
    sentinel = Sentinel([("example.invalid", 26379)]).master_for("mymaster", redis_class=ArqRedis, db=2)
    for redis in (plain, sentinel):
        twin = reconnecting_client(redis)
        source, copy = redis.connection_pool, twin.connection_pool
        assert copy is not source and type(copy) is type(source)
        assert copy.connection_class is source.connection_class
        assert source.connection_kwargs.get("retry") is None and copy.connection_kwargs["retry"] is not None
        assert RedisConnectionError in copy.connection_kwargs["retry_on_error"]
        own = ("retry", "retry_on_error", "connection_pool")  # a Sentinel pool's kwargs name the pool itself
        same = {k: v for k, v in copy.connection_kwargs.items() if k not in own}
        assert same == {k: v for k, v in source.connection_kwargs.items() if k not in own}
    assert isinstance(sentinel.connection_pool, SentinelConnectionPool)
    assert reconnecting_client(sentinel).connection_pool.service_name == "mymaster"


# ---------------------------------------------------------------------------------------
# HardenedWorker: arq's bookkeeping after a job survives a lost connection, and acts once


async def counted(ctx: dict[str, Any], defer: float = 0) -> str:
    ran.append(f"{ctx['job_id']} try {ctx['job_try']}")
    if defer and ctx["job_try"] == 1:
        raise arq.Retry(defer=defer)
    return "done"


@pytest.mark.parametrize("lose", ["reply", "request"])
async def test_hardened_bookkeeping_survives_a_lost_connection(
    real_redis: ArqRedis, redis_server: Server, proxy: LossyProxy, lose: str
):
    """arq's write of a finished job's result, lost either way, is done once: the job runs once and is done."""
    job = await real_redis.enqueue_job("counted")
    assert job is not None
    proxy.rule = once(lambda chunk: b"EXEC" in chunk and f"{result_key_prefix}{job.job_id}".encode() in chunk, lose)
    worker = HardenedWorker(
        functions=[counted],
        redis_settings=proxy.settings(redis_server.db),
        burst=True,
        poll_delay=0,
        handle_signals=False,
    )
    await run_worker(worker)
    assert len(proxy.lost) == 1 and ran == [f"{job.job_id} try 1"]
    info = await job.result_info()
    assert info is not None and info.success and info.result == "done"
    assert await real_redis.exists(in_progress_key_prefix + job.job_id) == 0
    assert await real_redis.zscore(default_queue_name, job.job_id) is None


async def test_arq_worker_keeps_arqs_behaviour_on_lost_bookkeeping(
    real_redis: ArqRedis, redis_server: Server, proxy: LossyProxy
):
    """arq's own Worker is left as it is: a lost bookkeeping write stops it and leaves the job's mark."""
    job = await real_redis.enqueue_job("counted")
    assert job is not None
    proxy.rule = once(
        lambda chunk: b"EXEC" in chunk and f"{result_key_prefix}{job.job_id}".encode() in chunk, "request"
    )
    worker = arq.worker.Worker(
        functions=[counted],
        redis_settings=proxy.settings(redis_server.db),
        burst=True,
        poll_delay=0,
        handle_signals=False,
    )
    with pytest.raises(RedisConnectionError):
        await run_worker(worker)
    assert await real_redis.exists(in_progress_key_prefix + job.job_id) == 1


async def test_hardened_retry_bookkeeping_whose_reply_is_lost_defers_once(
    real_redis: ArqRedis, redis_server: Server, proxy: LossyProxy
):
    """A Retry(defer=60)'s re-scoring whose reply is lost is not applied twice: the job waits 60 s, not 120 s."""
    job = await real_redis.enqueue_job("counted", defer=60)
    assert job is not None
    queued = await real_redis.zscore(default_queue_name, job.job_id)
    proxy.rule = once(lambda chunk: b"ZINCRBY" in chunk)
    worker = HardenedWorker(
        functions=[counted], redis_settings=proxy.settings(redis_server.db), poll_delay=0, handle_signals=False
    )
    task = asyncio.ensure_future(worker.main())
    try:

        async def rescored() -> bool:
            mark = await real_redis.exists(in_progress_key_prefix + job.job_id)
            return not mark and await real_redis.zscore(default_queue_name, job.job_id) != queued

        await wait_for(rescored, within=20, what="the retry to be re-scored")
        await wait_for(lambda: asyncio.sleep(0, not worker.tasks), within=10, what="the job task to end")
    finally:
        await stop_when_idle(worker, task)
    score = await real_redis.zscore(default_queue_name, job.job_id)
    assert len(proxy.lost) == 1 and ran == [f"{job.job_id} try 1"]
    assert 55_000 < score - queued < 90_000  # once: about 60 s after it was queued (twice: 120 s)


# ---------------------------------------------------------------------------------------
# Defect 12: only connectivity loss is survived; anything else stops the worker, as in arq


async def failing_on_job_end(ctx: dict[str, Any]) -> None:
    raise RuntimeError("on_job_end fails on purpose")


async def dropping_on_job_end(ctx: dict[str, Any]) -> None:
    raise RedisConnectionError("connection lost in a hook")


@pytest.mark.parametrize("worker_class", [arq.worker.Worker, HardenedWorker], ids=["arq", "hardened"])
async def test_a_hook_error_stops_the_worker_as_in_arq(real_redis: ArqRedis, worker_class: type[arq.worker.Worker]):
    """An on_job_end that raises stops HardenedWorker with that error, as arq's Worker; the job ran once."""
    job = await real_redis.enqueue_job("counted")
    assert job is not None
    worker = worker_class(
        functions=[counted],
        redis_pool=real_redis,
        on_job_end=failing_on_job_end,
        burst=True,
        poll_delay=0,
        handle_signals=False,
    )
    with pytest.raises(RuntimeError, match="on_job_end fails on purpose"):
        await asyncio.wait_for(worker.main(), 10)
    assert ran == [f"{job.job_id} try 1"]


async def test_a_job_task_lost_on_a_dropped_connection_does_not_stop_the_hardened_worker(real_redis: ArqRedis):
    """A job task that died on a connection error stops arq's Worker; the hardened one logs it and carries on."""
    options: dict[str, Any] = {
        "functions": [counted],
        "redis_pool": real_redis,
        "on_job_end": dropping_on_job_end,
        "poll_delay": 0,
        "handle_signals": False,
    }
    await real_redis.enqueue_job("counted")
    with pytest.raises(RedisConnectionError, match="connection lost in a hook"):
        await asyncio.wait_for(arq.worker.Worker(**options).main(), 10)
    await real_redis.flushdb()
    ran.clear()
    await real_redis.enqueue_job("counted")
    worker = HardenedWorker(**options)
    task = asyncio.ensure_future(worker.main())
    try:

        async def reaped() -> bool:
            return bool(ran) and not worker.tasks

        await wait_for(reaped, within=10, what="the job task to be reaped")
        await worker._poll_iteration()
        assert not task.done()
    finally:
        await stop_when_idle(worker, task)


async def test_a_wrong_password_stops_the_hardened_worker(redis_server: Server):
    """An authentication error is not retried: the hardened worker stops with it, as arq's does."""
    pool = ArqRedis(host=redis_server.host, port=redis_server.port, db=redis_server.db, password="wrong")
    try:
        worker = HardenedWorker(functions=[counted], redis_pool=pool, poll_delay=0, handle_signals=False)
        with pytest.raises(AuthenticationError):
            await asyncio.wait_for(worker.main(), 10)
        assert worker.redis_failures == 0
    finally:
        await pool.aclose()


async def test_a_tls_failure_stops_the_hardened_worker():
    """A TLS handshake that fails is not retried: the hardened worker stops with the error."""

    async def not_tls(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(100)
        writer.write(b"-ERR this server speaks no TLS\r\n")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(not_tls, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    pool = ArqRedis(host="127.0.0.1", port=port, ssl=True, ssl_cert_reqs="none")
    try:
        worker = HardenedWorker(functions=[counted], redis_pool=pool, poll_delay=0, handle_signals=False)
        with pytest.raises(RedisConnectionError) as raised:
            await asyncio.wait_for(worker.main(), 10)
        assert any(isinstance(e, ssl.SSLError) for e in _chain(raised.value))
        assert worker.redis_failures == 0
    finally:
        await pool.aclose()
        server.close()
        await server.wait_closed()


def _wrapped(outer: BaseException, inner: BaseException) -> BaseException:
    outer.__context__ = inner
    return outer


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        (RedisConnectionError("Connection closed by server."), True),
        (RedisTimeoutError("Timeout reading from socket"), True),
        (WatchError("watching"), True),
        (ConnectionResetError(104, "reset"), True),
        (_wrapped(RedisConnectionError("Error 1 connecting"), ssl.SSLEOFError(8, "EOF")), True),
        (AuthenticationError("invalid username-password pair"), False),
        (AuthorizationError("not allowed"), False),
        (_wrapped(WatchError("A ConnectionError occurred"), AuthenticationError("NOAUTH")), False),
        (_wrapped(RedisConnectionError("Error 1 connecting"), ssl.SSLCertVerificationError(1, "verify")), False),
        (_wrapped(RedisConnectionError("Error 1 connecting"), ssl.SSLError(1, "WRONG_VERSION_NUMBER")), False),
        (PermissionError(13, "Permission denied"), False),
        (ResponseError("NOPERM this user has no permissions"), False),
        (RuntimeError("a hook's bug"), False),
    ],
    ids=lambda v: type(v).__name__ if isinstance(v, BaseException) else str(v),
)
def test_what_counts_as_transient(error: BaseException, expected: bool):
    """Connectivity loss is transient; authentication, authorization, permission and TLS errors are not."""
    assert transient(error) is expected


async def test_astages_own_client_does_not_retry_an_authentication_error():
    """astages' own client re-sends on connectivity loss only: NOAUTH (a ConnectionError to redis-py) fails at once."""
    connections: list[int] = []

    async def noauth(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # lets the connection handshake through, then refuses commands (requirepass set since)
        connections.append(1)
        while data := await reader.read(65536):
            if b"CLIENT" in data or b"SELECT" in data:
                writer.write(b"+OK\r\n" * (data.count(b"\r\n*") + 1))
            else:
                writer.write(b"-NOAUTH Authentication required.\r\n")
            await writer.drain()
        writer.close()

    server = await asyncio.start_server(noauth, "127.0.0.1", 0)
    user = ArqRedis(host="127.0.0.1", port=server.sockets[0].getsockname()[1])
    own = reconnecting_client(user)
    try:
        with pytest.raises(AuthenticationError):
            await own.get("anything")
        assert len(connections) == 1  # a plain retry policy reconnects and re-sends 10 times (about 5 s)
    finally:
        await own.aclose(close_connection_pool=True)
        await user.aclose()
        server.close()
        await server.wait_closed()
