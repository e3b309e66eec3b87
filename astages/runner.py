"""A worker that survives dropped Redis connections: ``astages worker app.WorkerSettings``.

arq 0.28's poll loop ends on the first Redis error it meets: a connection dropped
while ``start_jobs`` watches a job raises ``WatchError`` (a retry policy on the pool
cannot help, a watched transaction is never retried), a failed heartbeat or a job task
that died on a connection error is re-raised, and the worker exits. The plain ``arq``
command therefore needs a process supervisor to restart it.

``HardenedWorker`` is arq's ``Worker`` with four changes for resilience:

- a poll iteration that fails on a connection error is logged and retried after an
  exponential backoff with jitter (0.1 s doubling up to 5 s), until Redis answers again;
- a failure in the middle of taking a job gives its slot back (arq would leak the slot
  and, after ``max_jobs`` such failures, stop taking jobs), and the job's in-progress
  mark carries this worker's token: when a connection drops while the mark is written,
  reading it back tells whether to run the job here (arq would skip it and leave the
  mark: the job would wait for it to expire, the longest timeout + 10 s). A job is never
  lost, and never run twice at the same time;
- arq's bookkeeping after a job (its result written, its in-progress mark deleted, the
  job taken off the queue or re-scored for a retry) that fails on a dropped connection
  is done again, with backoff, once Redis answers: only when it did not take effect
  (read back under WATCH: the queue entry and this run's in-progress mark tell), so it
  acts once, and a finished job does not run again when its mark expires;
- a job task that died on a lost connection is logged instead of re-raised into the loop.

With astages' settings (every function wrapped by ``astages.worker_settings``) it also
takes staged jobs on a lean path; plain jobs on the same queue go through arq's own code
as above. The staged jobs due in a poll are taken as many at a time as there are free
slots (up to ``LEAN_CLAIM``) with one ``claim_jobs`` script call per group (arq's due
check, its in-progress mark, payload, try counter and abort check, and astages' start,
for every job at once) and run the way arq runs a job (same ctx, hooks, timeout, retry
and abort handling, results and counters); their ends, those of one event-loop turn
together, are one ``end_jobs`` call per group (arq's result and clean-up, or a retry's
new score, and astages' report). arq's records, queue, results and abort set keep arq's
format. A failed claim is resolved by reading the marks back; a failed end by arq's
bookkeeping redone once known not to have taken effect, the report left to
``after_job_end``. A report that starts a stage wakes the poll at once (as soon as a slot
is free).

Only connectivity loss is survived. Any other error does what it does in arq: a job task
that died on it (a hook that raised, say) is re-raised into the loop and stops the
worker, and so does an authentication, authorization, permission or TLS error (redis-py
reports a wrong password as a ``ConnectionError`` and a TLS failure as one caused by an
``ssl.SSLError``: retrying cannot fix either). arq's pool (``ctx['redis']`` in a job)
keeps the user's settings: no retry policy is added to it, so a job's own command whose
reply was lost is not sent a second time.

``reconnecting(settings)`` gives a ``RedisSettings`` a reconnect-and-retry policy unless
the user set one, and ``reconnecting_client(redis)`` a client of the same server with
that policy on a pool of its own: a command that fails on a dropped connection
reconnects and is sent again (an authentication, authorization or TLS error is raised at
once: sending it again cannot help). ``astages.worker_settings`` makes astages' own calls
(start, report, settle, sweep, a callback's summary) through such a client; every
astages script a worker runs is safe to repeat: idempotent per job and try.
"""

from __future__ import annotations

import asyncio
import contextvars
import dataclasses
import itertools
import logging
import logging.config
import os
import random
import ssl
import sys
import uuid
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from arq.connections import ArqRedis, RedisSettings
from arq.constants import abort_jobs_ss, in_progress_key_prefix, job_key_prefix, result_key_prefix, retry_key_prefix
from arq.jobs import SerializationError, deserialize_job_raw, serialize_result
from arq.logs import default_log_config
from arq.utils import import_string, ms_to_datetime, timestamp_ms
from arq.worker import JobExecutionFailed, RetryJob, Worker, check_health, get_kwargs
from arq.worker import Retry as ArqRetry
from redis.asyncio.client import Pipeline
from redis.asyncio.connection import ConnectionPool
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import SentinelConnectionPool
from redis.backoff import EqualJitterBackoff
from redis.exceptions import AuthenticationError, AuthorizationError, RedisError, ResponseError, WatchError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

if TYPE_CHECKING:
    from astages._keys import JobRef, Keys

__all__ = ["HardenedWorker", "create_worker", "reconnecting", "reconnecting_client", "run_worker", "transient"]

logger = logging.getLogger("astages.runner")

# Errors that mean "Redis is (for now) unreachable": the loop waits and tries again.
TRANSIENT: tuple[type[BaseException], ...] = (
    RedisConnectionError,
    RedisTimeoutError,
    WatchError,
    OSError,
    asyncio.TimeoutError,
)
# ... and every Redis error: what may fail in the middle of taking a job.
REDIS_FAILURES: tuple[type[BaseException], ...] = (*TRANSIENT, RedisError)
# What a job task (arq's code around the job, the user's hooks) may die on when Redis is
# unreachable; anything else it dies on stops the worker, as in arq.
TASK_TRANSIENT: tuple[type[BaseException], ...] = (RedisConnectionError, RedisTimeoutError, WatchError)
# Never transient, whatever they are wrapped in: retrying cannot fix a credential, a
# permission or a TLS set-up.
FATAL: tuple[type[BaseException], ...] = (AuthenticationError, AuthorizationError, PermissionError)
# TLS errors that mean the connection was cut, not that TLS is set up wrong.
TLS_DROPPED: tuple[type[BaseException], ...] = (ssl.SSLEOFError, ssl.SSLZeroReturnError, ssl.SSLSyscallError)
BACKOFF_BASE = 0.1
BACKOFF_CAP = 5.0
# The pool's policy: up to 10 tries per command, 25 ms doubling to 1 s between them.
POOL_RETRIES = 10


class Reconnecting(Retry):
    """redis-py's retry policy, except that an error that is not connectivity loss (a wrong
    password, a missing permission, a TLS failure: redis-py raises them as a
    ``ConnectionError`` too) is raised at once instead of being tried again."""

    async def call_with_retry(self, do: Callable[[], Awaitable[Any]], fail: Callable[[RedisError], Any]) -> Any:
        async def fail_fast(error: RedisError) -> None:
            await fail(error)
            if not transient(error, (RedisConnectionError, RedisTimeoutError)):
                raise error

        return await super().call_with_retry(do, fail_fast)


def _policy(errors: list[type[Exception]] | None) -> tuple[Retry, list[type[Exception]]]:
    """The reconnect-and-retry policy, and the errors it retries (added to ``errors``)."""
    retried: list[type[Exception]] = list(errors or [])
    retried += [e for e in (RedisConnectionError, RedisTimeoutError) if e not in retried]
    return Reconnecting(EqualJitterBackoff(cap=1.0, base=0.025), POOL_RETRIES), retried


def reconnecting(settings: RedisSettings | None = None) -> RedisSettings:
    """``settings`` (or the defaults) with a reconnect-and-retry policy, unless it has one."""
    settings = settings or RedisSettings()
    if settings.retry is not None:
        return settings
    retry, errors = _policy(settings.retry_on_error)
    return dataclasses.replace(settings, retry=retry, retry_on_error=errors)


def reconnecting_client(redis: ArqRedis) -> ArqRedis:
    """A client of the same server, database and credentials as ``redis`` (any connection
    class, TLS and Sentinel included), on a pool of its own, with the reconnect-and-retry
    policy unless ``redis`` has one. ``redis`` is left as it is. Nothing is sent until it is
    used; close it with ``aclose(close_connection_pool=True)``."""
    pool = redis.connection_pool
    kwargs = {k: v for k, v in pool.connection_kwargs.items() if k != "connection_pool"}
    if kwargs.get("retry") is None:
        kwargs["retry"], kwargs["retry_on_error"] = _policy(kwargs.get("retry_on_error"))
    twin: ConnectionPool
    if isinstance(pool, SentinelConnectionPool):
        twin = SentinelConnectionPool(  # type: ignore[no-untyped-call]
            pool.service_name,
            pool.sentinel_manager,
            is_master=pool.is_master,
            check_connection=pool.check_connection,
            connection_class=pool.connection_class,
            max_connections=pool.max_connections,
            **kwargs,
        )
    else:
        twin = type(pool)(connection_class=pool.connection_class, max_connections=pool.max_connections, **kwargs)
    return ArqRedis(
        connection_pool=twin,
        job_serializer=redis.job_serializer,
        job_deserializer=redis.job_deserializer,
        default_queue_name=redis.default_queue_name,
        expires_extra_ms=redis.expires_extra_ms,
    )


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _chain(exc: BaseException) -> list[BaseException]:
    """``exc`` and the errors it was raised from or while handling."""
    chain: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and all(current is not seen for seen in chain):
        chain.append(current)
        current = current.__cause__ or current.__context__
    return chain


def transient(exc: BaseException, kinds: tuple[type[BaseException], ...] = TRANSIENT) -> bool:
    """Whether ``exc`` (one of ``kinds``) means Redis is unreachable for now, so waiting
    and trying again may help. An authentication, authorization, permission or TLS error
    is never transient, even wrapped in a ``ConnectionError`` (as redis-py reports them)."""
    if not isinstance(exc, kinds):
        return False
    for error in _chain(exc):
        if isinstance(error, FATAL):
            return False
        if isinstance(error, ssl.SSLError) and not isinstance(error, TLS_DROPPED):
            return False
    return True


def _delay(failures: int) -> float:
    """Exponential backoff with jitter: 0.1 s doubling up to 5 s, times 0.5 to 1."""
    return min(BACKOFF_CAP, BACKOFF_BASE * 2.0 ** min(failures - 1, 16)) * random.uniform(0.5, 1.0)


# The run a job task belongs to: (its in-progress mark, its score when taken). Set in the
# context each job task is created with, so that arq's bookkeeping, called inside the
# task, can tell whether a write whose reply was lost took effect.
_RUN: contextvars.ContextVar[tuple[bytes, float]] = contextvars.ContextVar("astages_run")
# How many jobs the first claim of a poll takes at most: its jobs start before the rest
# is claimed.
LEAN_FIRST_CLAIM = 10
# How many jobs one claim takes at most. The jobs of one claim start together and, when
# they are short, end together: their ends are one end_jobs call. Small claims let Redis
# end one wave while the worker runs the next, and keep the call that ends a stage (and
# starts the next) short. 3 x 1,000 no-op jobs, max_jobs 100: 0.19 x plain arq's time and
# a 4-6 ms stage gap with 20, against 0.29 x and 10-14 ms with every free slot at once.
LEAN_CLAIM = 20
# How long arq keeps a job's retry counter (s), as arq does.
RETRY_COUNTER_S = 88400
_NO_RESULT = object()


@dataclasses.dataclass(frozen=True, slots=True)
class _Claim:
    """A staged job the lean claim took: what arq's run_job would read first."""

    ref: JobRef
    payload: bytes | None
    job_try: int
    aborted: bool
    verdict: str


def _lean_keys(functions: dict[str, Any]) -> Keys | None:
    """The key layout of astages' wrapped functions when every function of the worker is
    one (settings from ``astages.worker_settings``); None otherwise: no lean path."""
    from astages.worker import RUNTIME_ATTR

    runtimes = [getattr(f.coroutine, RUNTIME_ATTR, None) for f in functions.values() if not hasattr(f, "next_run")]
    if not runtimes or any(r is None for r in runtimes):
        return None
    keys: Keys = getattr(runtimes[0], "keys")  # noqa: B009 - typed Any
    return keys if all(getattr(r, "keys").prefix == keys.prefix for r in runtimes) else None  # noqa: B009


class HardenedWorker(Worker):
    """arq's Worker, kept running through dropped Redis connections (see the module doc)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.redis_failures = 0
        # the prefix of this worker's in-progress marks (arq writes b"1" and reads none);
        # each claim adds a number, so a mark names one run of one job
        self.token = f"astages:{uuid.uuid4().hex}".encode()
        self._claims = itertools.count(1)
        # the lean path for staged jobs (see _start_lean), when the settings are astages'
        self.lean_keys = _lean_keys(self.functions)
        self._claimed: dict[str, _Claim] = {}
        self._ender: Any = None
        # set by a report that queued jobs (a new stage, a retry): poll at once, or as soon
        # as a slot is free (arq's poll takes no job while every slot is taken)
        self._wake = asyncio.Event()
        self._wake_pending = False
        from astages.worker import CTX_WAKE

        if not self.burst:  # a burst worker stops when the queue is empty: it sends stages on at once
            self.ctx[CTX_WAKE] = self.wake

    async def _poll_iteration(self) -> None:
        """One poll (see ``_poll_once``); then, until ``poll_delay`` has passed, another one
        each time a report queued jobs (a stage started, a job to retry), so the worker
        whose report started a stage takes its jobs at once (arq then sleeps what is left
        of ``poll_delay``: nothing)."""
        started = self.loop.time()
        await self._poll_once()
        while not self.burst:
            left = self.poll_delay_s - (self.loop.time() - started)
            if left <= 0:
                return
            if not self._wake.is_set():
                try:
                    await asyncio.wait_for(self._wake.wait(), left)
                except TimeoutError:
                    return
            self._wake.clear()
            self._wake_pending = False
            await self._poll_once()

    def wake(self) -> None:
        """Poll at once (or when a slot frees): jobs were queued by this worker's report."""
        self._wake_pending = True
        if self.job_counter < self.max_jobs:
            self._wake.set()

    def _release_sem_dec_counter_on_complete(self) -> None:
        super()._release_sem_dec_counter_on_complete()
        if self._wake_pending:
            self._wake.set()

    async def _poll_once(self) -> None:
        self._reap_failed_tasks()
        try:
            await super()._poll_iteration()
        except Exception as e:
            if not transient(e):
                raise  # as in arq: the worker stops with it
            self.redis_failures += 1
            delay = _delay(self.redis_failures)
            logger.warning(
                "redis error in the poll loop (%s: %s); retrying in %.2fs (failure %d)",
                type(e).__name__,
                e,
                delay,
                self.redis_failures,
            )
            await asyncio.sleep(delay)
        else:
            if self.redis_failures:
                logger.info("redis answers again after %d failed polls", self.redis_failures)
                self.redis_failures = 0

    def _reap_failed_tasks(self) -> None:
        """Log (arq would re-raise) job tasks that died on a lost connection. A task that
        died on anything else is left for arq's loop, which re-raises it: the worker stops."""
        for job_id, task in list(self.tasks.items()):
            if not task.done() or task.cancelled():
                continue
            exc = task.exception()
            if exc is not None and transient(exc, TASK_TRANSIENT):
                del self.tasks[job_id]
                logger.warning("job %s: its task ended on a lost connection (%s: %s)", job_id, type(exc).__name__, exc)

    async def start_jobs(self, job_ids: list[bytes]) -> None:
        """arq's start_jobs, with the slot given back on a Redis error and the job's
        in-progress mark written with this worker's token, so that a connection dropped
        while the mark was being written is resolved by reading it back: the job runs
        here if the mark is ours, and is left alone otherwise.

        Staged jobs (with astages' settings) take the lean path instead: the jobs due in
        this poll are taken as many at a time as there are free slots (up to
        ``LEAN_CLAIM``), with one script call per group (``_start_lean``)."""
        staged: list[tuple[str, JobRef]] = []
        for job_id_b in job_ids:
            job_id = job_id_b.decode()
            ref = None if self.lean_keys is None else self.lean_keys.parse_job_id(job_id)
            if ref is not None:
                staged.append((job_id, ref))
                continue
            if staged:
                if not await self._start_lean(staged):
                    return
                staged = []
            if not await self._start_one(job_id):
                return
        if staged:
            await self._start_lean(staged)

    async def _take_slot(self) -> bool:
        """Wait for a free slot and take it; False when the worker has max_jobs already."""
        await self.sem.acquire()
        if self.job_counter >= self.max_jobs:
            self.sem.release()
            return False
        self.job_counter += 1
        return True

    def _give_slot(self) -> None:
        self.job_counter -= 1
        self.sem.release()

    def _spawn(self, job_id: str, mark: bytes, score: float) -> None:
        """Run the job in a task of its own that knows its run (see _RUN)."""
        run = contextvars.copy_context()
        run.run(_RUN.set, (mark, score))
        task = self.loop.create_task(self.run_job(job_id, int(score)), context=run)
        task.add_done_callback(lambda _: self._release_sem_dec_counter_on_complete())
        self.tasks[job_id] = task

    async def _start_one(self, job_id: str) -> bool:
        """Take one job the way arq does (with this run's own mark); False when the
        worker has max_jobs already."""
        if not await self._take_slot():
            return False
        try:
            claim = await self._claim(job_id)
        except REDIS_FAILURES:
            self._give_slot()
            raise
        if claim is None:
            self._give_slot()
            return True
        self._spawn(job_id, *claim)
        return True

    async def _start_lean(self, jobs: list[tuple[str, JobRef]]) -> bool:
        """Take staged jobs: wait for one free slot, take every slot free at that moment
        (up to the jobs left, ``LEAN_FIRST_CLAIM`` the first time, ``LEAN_CLAIM`` after),
        and claim that many jobs with one ``claim_jobs`` call per group; again until every
        job was tried. False when the worker has max_jobs."""
        i = 0
        while i < len(jobs):
            if not await self._take_slot():
                return False
            take = [jobs[i]]
            i += 1
            # the first claim of a poll is small: its jobs start before the rest is claimed
            limit = LEAN_FIRST_CLAIM if i == 1 else LEAN_CLAIM
            while i < len(jobs) and len(take) < limit and not self.sem.locked() and self.job_counter < self.max_jobs:
                await self.sem.acquire()  # free: returns at once
                self.job_counter += 1
                take.append(jobs[i])
                i += 1
            groups: dict[str, list[tuple[str, JobRef]]] = {}
            for job in take:
                groups.setdefault(job[1].group_id, []).append(job)
            batches = list(groups.values())
            for k, batch in enumerate(batches):
                try:
                    await self._claim_lean(batch)
                except BaseException:
                    for _ in (job for later in batches[k + 1 :] for job in later):
                        self._give_slot()
                    raise
        return True

    async def _claim_lean(self, jobs: list[tuple[str, JobRef]]) -> None:
        """One ``claim_jobs`` call for jobs of one group, each holding a slot: each job
        taken runs in a task (``_run_lean``), a slot not used is given back. When the call
        fails on a Redis error, the marks are read back: a job whose mark is ours was
        taken and runs the way arq runs a job; the others are left (a failure to read
        them back propagates, and a mark of ours then expires as after a crash)."""
        from astages._scripts import Store

        assert self.lean_keys is not None
        marks = [b"%s:%d" % (self.token, next(self._claims)) for _ in jobs]
        flat: list[Any] = []
        for (job_id, ref), mark in zip(jobs, marks, strict=True):
            flat += [job_id, ref.stage, ref.seq, mark]
        store = Store(self.pool, self.lean_keys)
        args = (self.queue_name, timestamp_ms(), int(self.in_progress_timeout_s * 1000), int(self.allow_abort_jobs))
        try:
            replies = await store.run_now("claim_jobs", jobs[0][1].group_id, *args, len(jobs), *flat)
        except REDIS_FAILURES as e:
            try:
                current = await self.pool.mget([in_progress_key_prefix + job_id for job_id, _ in jobs])
                scores = [await self.pool.zscore(self.queue_name, job_id) for job_id, _ in jobs]
            except BaseException:
                for _ in jobs:
                    self._give_slot()
                raise e from None
            for (job_id, _), mark, cur, score in zip(jobs, marks, current, scores, strict=True):
                if cur == mark and score is not None:
                    logger.info("job %s: claimed despite a Redis error while claiming it", job_id)
                    self._spawn(job_id, mark, float(score))  # not in _claimed: arq's run_job
                else:
                    self._give_slot()
            return
        for (job_id, ref), mark, reply in zip(jobs, marks, replies, strict=True):
            if not reply:
                self._give_slot()
                continue
            score, payload, job_try, aborted, verdict = reply
            self._claimed[job_id] = _Claim(ref, payload or None, int(job_try), bool(aborted), _text(verdict))
            self._spawn(job_id, mark, float(score))

    async def run_job(self, job_id: str, score: int) -> None:
        """arq's run_job, or ``_run_lean`` for a job the lean claim took."""
        claim = self._claimed.pop(job_id, None)
        if claim is None:
            await super().run_job(job_id, score)
        else:
            await self._run_lean(job_id, score, claim)

    async def _run_lean(self, job_id: str, score: int, claim: _Claim) -> None:
        """Run a staged job the lean claim took, as arq's worker runs a job (same ctx,
        hooks, timeout, retry and abort handling, result and counters), with what arq
        reads first (payload, try, abort request) and astages' start from the claim, and
        arq's bookkeeping and astages' report in one ``end_jobs`` call after it."""
        from astages.worker import CTX_LEAN, CTX_VERDICT

        start_ms = timestamp_ms()
        job_try = claim.job_try
        function_name, enqueue_time_ms = "<unknown>", 0
        args: tuple[Any, ...] = ()
        kwargs: dict[str, Any] = {}

        async def not_run(exc: BaseException) -> None:
            # as arq fails a job it cannot run: no hook; astages records the failure
            self.jobs_failed += 1
            data = serialize_result(
                function_name, args, kwargs, job_try, enqueue_time_ms, False, exc, start_ms, timestamp_ms(),
                f"{job_id}:{function_name}", self.queue_name, job_id=job_id, serializer=self.job_serializer,
            )  # fmt: skip
            await asyncio.shield(self._not_run(job_id, claim.ref, job_try, data, exc))

        if claim.payload is None:
            logger.warning("job %s expired", job_id)
            return await not_run(JobExecutionFailed("job expired"))
        try:
            function_name, args, kwargs, enqueue_try, enqueue_time_ms = deserialize_job_raw(
                claim.payload, deserializer=self.job_deserializer
            )
        except SerializationError as e:
            logger.exception("deserializing job %s failed", job_id)
            return await not_run(e)
        if claim.aborted:
            logger.info("%s:%s aborted before start", job_id, function_name)
            return await not_run(asyncio.CancelledError())
        function = self.functions.get(function_name)
        if function is None:
            logger.warning("job %s, function %r not found", job_id, function_name)
            return await not_run(JobExecutionFailed(f"function {function_name!r} not found"))
        ref = f"{job_id}:{function_name}"
        if enqueue_try and enqueue_try > job_try:
            job_try = enqueue_try
            await self.pool.setex(retry_key_prefix + job_id, RETRY_COUNTER_S, str(job_try))
        max_tries = self.max_tries if function.max_tries is None else function.max_tries
        if job_try > max_tries:
            logger.warning("%s max retries %d exceeded", ref, max_tries)
            return await not_run(JobExecutionFailed(f"max {max_tries} retries exceeded"))

        ctx = {
            **self.ctx,
            "job_id": job_id,
            "job_try": job_try,
            "enqueue_time": ms_to_datetime(enqueue_time_ms),
            "score": score,
            CTX_VERDICT: claim.verdict,
            CTX_LEAN: True,
        }
        if self.on_job_start:
            await self.on_job_start(ctx)
        result: Any = _NO_RESULT
        finish = success = False
        incr_score: int | None = None
        timeout_s = self.job_timeout_s if function.timeout_s is None else function.timeout_s
        start_ms = timestamp_ms()
        logger.info("→ %s try=%d", ref, job_try)
        try:
            self.job_tasks[job_id] = task = self.loop.create_task(function.coroutine(ctx, *args, **kwargs))
            try:
                result = await asyncio.wait_for(task, timeout_s)
            finally:
                del self.job_tasks[job_id]
        except (Exception, asyncio.CancelledError) as e:
            finished_ms = timestamp_ms()
            if self.retry_jobs and isinstance(e, ArqRetry):
                incr_score = e.defer_score + (timestamp_ms() - score) if e.defer_score else e.defer_score
                logger.info("↻ %s retrying job in %0.2fs", ref, (e.defer_score or 0) / 1000)
                self.jobs_retried += 1
            elif job_id in self.aborting_tasks and isinstance(e, asyncio.CancelledError):
                logger.info("⊘ %s aborted", ref)
                result, finish = e, True
                self.aborting_tasks.remove(job_id)
                self.jobs_failed += 1
            elif self.retry_jobs and isinstance(e, asyncio.CancelledError | RetryJob):
                logger.info("↻ %s cancelled, will be run again", ref)
                self.jobs_retried += 1
            else:
                logger.exception("! %s failed, %s: %s", ref, type(e).__name__, e)
                result, finish = e, True
                self.jobs_failed += 1
        else:
            success = finish = True
            finished_ms = timestamp_ms()
            logger.info("← %s ●", ref)
            self.jobs_complete += 1

        forever = self.keep_result_forever if function.keep_result_forever is None else function.keep_result_forever
        keep_s = self.keep_result_s if function.keep_result_s is None else function.keep_result_s
        result_data = None
        if result is not _NO_RESULT and (forever or keep_s > 0):
            result_data = serialize_result(
                function_name, args, kwargs, job_try, enqueue_time_ms, success, result, start_ms, finished_ms,
                ref, self.queue_name, job_id=job_id, serializer=self.job_serializer,
            )  # fmt: skip
        if self.on_job_end:
            await self.on_job_end(ctx)
        await asyncio.shield(self._end_lean(ctx, claim.ref, finish, result_data, keep_s, forever, incr_score))
        if self.after_job_end:
            await self.after_job_end(ctx)

    async def _not_run(self, job_id: str, ref: JobRef, job_try: int, data: bytes | None, exc: BaseException) -> None:
        """arq's bookkeeping for a staged job it cannot run, then astages' report of it."""
        from astages._scripts import Store
        from astages.worker import CTX_REDIS, describe_error

        await self.finish_failed_job(job_id, data)
        assert self.lean_keys is not None
        try:
            store = Store(self.ctx.get(CTX_REDIS) or self.pool, self.lean_keys)
            await store.move("finish_job", ref.group_id, ref.stage, ref.seq, job_try, "f", describe_error(exc))
        except RedisError:
            logger.warning("job %s: could not report that it did not run; the sweeper will", job_id, exc_info=True)

    async def _end_lean(
        self,
        ctx: dict[str, Any],
        ref: JobRef,
        finish: bool,
        result_data: bytes | None,
        keep_s: float | None,
        forever: bool,
        incr_score: int | None,
    ) -> None:
        """arq's bookkeeping after the run and astages' report of its outcome (if the
        wrapper knew it) in one ``end_jobs`` call, shared with the jobs of the group that
        end in the same event-loop turn. On a Redis error arq's bookkeeping is done again
        once it is known not to have taken effect (as after arq's own), and the report
        is left to after_job_end."""
        from astages.worker import CTX_OUTCOME, CTX_REPORTED

        job_id: str = ctx["job_id"]
        outcome, error = ("", "") if ctx.get(CTX_REPORTED) else ctx.get(CTX_OUTCOME) or ("", "")
        px = "" if forever or keep_s is None else int(keep_s * 1000)
        end: tuple[Any, ...] = (
            job_id,
            ref.stage,
            ref.seq,
            ctx["job_try"],
            int(finish),
            (finish and result_data) or b"",
        )
        end += (px, incr_score or "", outcome, error)
        try:
            await self._end_jobs().end(ref.group_id, end)
        except Exception as error:
            e = error
            writes, applied = self._finish_plan(job_id, finish, result_data, keep_s, forever, incr_score, None)
            if not transient(e):
                logger.error(
                    "job %s: end_jobs failed (%s: %s); arq's own bookkeeping instead", job_id, type(e).__name__, e
                )
                await self.finish_job(job_id, finish, result_data, keep_s, forever, incr_score, None)
                return

            async def lost() -> None:
                raise e

            await self._bookkeep(job_id, lost(), writes, applied)
            return
        if outcome:
            ctx[CTX_REPORTED] = True

    def _end_jobs(self) -> Any:
        if self._ender is None:
            from astages.worker import CTX_REDIS, EndJobs

            assert self.lean_keys is not None
            wake = None if self.burst else self.wake
            self._ender = EndJobs(self.pool, self.ctx.get(CTX_REDIS), self.lean_keys, self.queue_name, wake)
        return self._ender

    async def _claim(self, job_id: str) -> tuple[bytes, float] | None:
        """Mark the job in progress (as arq does, but with a mark of this run's own); the
        mark and the job's score when this worker may run it, None when it runs elsewhere
        or is not due."""
        key = in_progress_key_prefix + job_id
        mark = b"%s:%d" % (self.token, next(self._claims))
        async with self.pool.pipeline(transaction=True) as pipe:
            await pipe.watch(key)  # a failure up to MULTI wrote nothing: it propagates
            ongoing = await pipe.exists(key)
            score = await pipe.zscore(self.queue_name, job_id)
            if ongoing or not score or score > timestamp_ms():
                return None
            pipe.multi()  # type: ignore[no-untyped-call]
            pipe.psetex(key, int(self.in_progress_timeout_s * 1000), mark)
            try:
                await pipe.execute()
            except (ResponseError, WatchError, RedisConnectionError, RedisTimeoutError):
                # WatchError also stands for a connection dropped during EXEC: the mark
                # may have been written. Whose is it? (A failure here propagates; the mark,
                # if ours, then expires and the job runs again, as after a crash.)
                if await self.pool.get(key) != mark:
                    return None
                logger.info("job %s: claimed despite a Redis error while claiming it", job_id)
        return mark, float(score)

    async def finish_job(
        self,
        job_id: str,
        finish: bool,
        result_data: bytes | None,
        result_timeout_s: float | None,
        keep_result_forever: bool,
        incr_score: int | None,
        keep_in_progress: float | None,
    ) -> None:
        """arq's bookkeeping after a run, done again after a dropped connection if it did not
        take effect (see ``_again``)."""
        writes, applied = self._finish_plan(
            job_id, finish, result_data, result_timeout_s, keep_result_forever, incr_score, keep_in_progress
        )
        first = super().finish_job(
            job_id, finish, result_data, result_timeout_s, keep_result_forever, incr_score, keep_in_progress
        )
        await self._bookkeep(job_id, first, writes, applied)

    def _finish_plan(
        self,
        job_id: str,
        finish: bool,
        result_data: bytes | None,
        result_timeout_s: float | None,
        keep_result_forever: bool,
        incr_score: int | None,
        keep_in_progress: float | None,
    ) -> tuple[Callable[[Pipeline], None], Callable[[bytes | None, float | None, float | None], bool]]:
        """arq's bookkeeping after a run as writes to a transaction, and how to tell from
        the job's mark and queue entry (and its score when taken) that it took effect."""

        def writes(pipe: Pipeline) -> None:
            mark_key = in_progress_key_prefix + job_id
            if keep_in_progress is None:
                pipe.delete(mark_key)
            else:
                pipe.pexpire(mark_key, int(keep_in_progress * 1000))
            if finish:
                if result_data:
                    px = None if keep_result_forever or result_timeout_s is None else int(result_timeout_s * 1000)
                    pipe.set(result_key_prefix + job_id, result_data, px=px)
                pipe.delete(retry_key_prefix + job_id, job_key_prefix + job_id)
                pipe.zrem(abort_jobs_ss, job_id)
                pipe.zrem(self.queue_name, job_id)
            elif incr_score:
                pipe.zincrby(self.queue_name, incr_score, job_id)

        def applied(mark: bytes | None, queued: float | None, score: float | None) -> bool:
            if finish:
                return queued is None  # it leaves the queue
            if incr_score:
                return score is None or queued != score  # it moves in the queue
            return keep_in_progress is None and mark is None  # only its mark goes

        return writes, applied

    async def finish_failed_job(self, job_id: str, result_data: bytes | None) -> None:
        """arq's bookkeeping for a job that failed without running (expired, unknown,
        retries exhausted, ...), done again after a dropped connection (see ``_again``)."""

        def writes(pipe: Pipeline) -> None:
            pipe.delete(retry_key_prefix + job_id, in_progress_key_prefix + job_id, job_key_prefix + job_id)
            pipe.zrem(abort_jobs_ss, job_id)
            pipe.zrem(self.queue_name, job_id)
            if result_data is not None and (self.keep_result_forever or self.keep_result_s > 0):
                px = None if self.keep_result_forever else int(self.keep_result_s * 1000)
                pipe.set(result_key_prefix + job_id, result_data, px=px)

        def applied(mark: bytes | None, queued: float | None, score: float | None) -> bool:
            return queued is None

        await self._bookkeep(job_id, super().finish_failed_job(job_id, result_data), writes, applied)

    async def _bookkeep(
        self,
        job_id: str,
        first: Awaitable[None],
        writes: Callable[[Pipeline], None],
        applied: Callable[[bytes | None, float | None, float | None], bool],
    ) -> None:
        """Await arq's own bookkeeping (``first``); when it fails on a lost connection, do
        it again (``_again``) until Redis answers."""
        try:
            await first
            return
        except Exception as e:
            if not transient(e):
                raise
            error: Exception = e
        for failures in itertools.count(1):
            delay = _delay(failures)
            logger.warning(
                "job %s: arq's bookkeeping failed on a lost connection (%s: %s); again in %.2fs",
                job_id,
                type(error).__name__,
                error,
                delay,
            )
            await asyncio.sleep(delay)
            try:
                await self._again(job_id, writes, applied)
                return
            except Exception as e:
                if not transient(e):
                    raise
                error = e

    async def _again(
        self,
        job_id: str,
        writes: Callable[[Pipeline], None],
        applied: Callable[[bytes | None, float | None, float | None], bool],
    ) -> None:
        """The bookkeeping's ``writes``, unless the attempt whose reply was lost took effect.

        Read under WATCH of the job's in-progress mark: a mark of another run means the job
        was taken again (the earlier attempt took effect, or the mark expired) and is not
        this run's to write; otherwise ``applied`` decides from the mark and the job's
        queue entry. A run taken again meanwhile changes the mark: the write is then
        refused (WatchError, transient: decided again after the backoff)."""
        mark_key = in_progress_key_prefix + job_id
        run = _RUN.get(None)
        async with self.pool.pipeline(transaction=True) as pipe:
            await pipe.watch(mark_key)
            mark = await pipe.get(mark_key)
            queued = await pipe.zscore(self.queue_name, job_id)
            ours = mark is None or (mark == run[0] if run is not None else mark.startswith(self.token))
            if not ours:
                logger.info("job %s: taken again since; its bookkeeping is the new run's", job_id)
                return
            if applied(mark, queued, None if run is None else run[1]):
                logger.info("job %s: arq's bookkeeping had taken effect", job_id)
                return
            pipe.multi()  # type: ignore[no-untyped-call]
            writes(pipe)
            await pipe.execute()
        logger.info("job %s: arq's bookkeeping done after a lost connection", job_id)


def create_worker(settings: Any, **overrides: Any) -> HardenedWorker:
    """A HardenedWorker from an arq settings class or dict, like ``arq.worker.create_worker``."""
    return HardenedWorker(**{**get_kwargs(settings), **overrides})


def run_worker(settings: Any, **overrides: Any) -> HardenedWorker:
    worker = create_worker(settings, **overrides)
    worker.run()
    return worker


def main(
    worker_settings: str,
    *,
    burst: bool | None = None,
    check: bool = False,
    watch: str | None = None,
    verbose: bool = False,
    custom_log_dict: str | None = None,
) -> int:
    """What ``astages worker`` does (arq's CLI, with a HardenedWorker). Returns the exit code."""
    sys.path.append(os.getcwd())
    settings = import_string(worker_settings)
    log_config = import_string(custom_log_dict) if custom_log_dict else default_log_config(verbose)
    log_config.setdefault("loggers", {}).setdefault("astages", {"handlers": ["arq.standard"], "level": "INFO"})
    logging.config.dictConfig(log_config)
    if check:
        return int(check_health(settings))
    overrides = {} if burst is None else {"burst": burst}
    if watch:
        asyncio.run(_watch_reload(watch, settings, overrides))
    else:
        run_worker(settings, **overrides)
    return 0


async def _watch_reload(path: str, settings: Any, overrides: dict[str, Any]) -> None:
    """arq's ``--watch``: restart the worker when files under ``path`` change."""
    from signal import Signals

    try:
        from watchfiles import awatch  # type: ignore[import-not-found]
    except ImportError as e:  # pragma: no cover - optional, as in arq
        raise ImportError("watchfiles not installed, use `pip install watchfiles`") from e
    stop_event = asyncio.Event()

    def on_stop(sig: Signals) -> None:
        if sig != Signals.SIGUSR1:
            stop_event.set()

    worker = create_worker(settings, **overrides)
    loop = asyncio.get_running_loop()
    runs: list[asyncio.Task[None]] = []
    try:
        worker.on_stop = on_stop
        runs.append(loop.create_task(worker.async_run()))
        async for _ in awatch(path, stop_event=stop_event):
            print("\nfiles changed, reloading astages worker...")
            worker.handle_sig(Signals.SIGUSR1)
            await worker.close()
            runs.append(loop.create_task(worker.async_run()))
    finally:
        await worker.close()
