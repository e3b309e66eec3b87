"""A worker that survives dropped Redis connections: ``astages worker app.WorkerSettings``.

arq 0.28's poll loop ends on the first Redis error it meets: a connection dropped
while ``start_jobs`` watches a job raises ``WatchError`` (a retry policy on the pool
cannot help, a watched transaction is never retried), a failed heartbeat or a job task
that died on a connection error is re-raised, and the worker exits. The plain ``arq``
command therefore needs a process supervisor to restart it.

``HardenedWorker`` is arq's ``Worker`` with three changes and nothing else:

- a poll iteration that fails on a connection error is logged and retried after an
  exponential backoff with jitter (0.1 s doubling up to 5 s), until Redis answers again;
- a failure in the middle of taking a job gives its slot back (arq would leak the slot
  and, after ``max_jobs`` such failures, stop taking jobs), and the job's in-progress
  mark carries this worker's token: when a connection drops while the mark is written,
  reading it back tells whether to run the job here (arq would skip it and leave the
  mark: the job would wait for it to expire, the longest timeout + 10 s). A job is never
  lost, and never run twice at the same time;
- a job task that died on a Redis error is logged instead of re-raised into the loop.

``reconnecting(settings)`` gives a ``RedisSettings`` a reconnect-and-retry policy unless
the user set one (``astages.worker_settings`` applies it too, so the plain ``arq``
command gets it): a command that fails on a dropped connection reconnects and is sent
again. Every astages script a worker runs (start, report, settle, send on) is safe to
repeat: idempotent per job and try.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import logging.config
import os
import random
import sys
import uuid
from typing import Any

from arq.connections import RedisSettings
from arq.constants import in_progress_key_prefix
from arq.logs import default_log_config
from arq.utils import import_string, timestamp_ms
from arq.worker import Worker, check_health, get_kwargs
from redis.asyncio.retry import Retry
from redis.backoff import EqualJitterBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError, ResponseError, WatchError
from redis.exceptions import TimeoutError as RedisTimeoutError

__all__ = ["HardenedWorker", "create_worker", "reconnecting", "run_worker"]

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
BACKOFF_BASE = 0.1
BACKOFF_CAP = 5.0
# The pool's policy: up to 10 tries per command, 25 ms doubling to 1 s between them.
POOL_RETRIES = 10


def reconnecting(settings: RedisSettings | None = None) -> RedisSettings:
    """``settings`` (or the defaults) with a reconnect-and-retry policy, unless it has one."""
    settings = settings or RedisSettings()
    if settings.retry is not None:
        return settings
    errors: list[type[Exception]] = list(settings.retry_on_error or [])
    errors += [e for e in (RedisConnectionError, RedisTimeoutError) if e not in errors]
    return dataclasses.replace(
        settings,
        retry=Retry(EqualJitterBackoff(cap=1.0, base=0.025), POOL_RETRIES),
        retry_on_error=errors,
    )


class HardenedWorker(Worker):
    """arq's Worker, kept running through dropped Redis connections (see the module doc)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        if kwargs.get("redis_pool") is None:
            kwargs["redis_settings"] = reconnecting(kwargs.get("redis_settings"))
        super().__init__(*args, **kwargs)
        self.redis_failures = 0
        # the value of this worker's in-progress marks (arq writes b"1" and reads none)
        self.token = f"astages:{uuid.uuid4().hex}".encode()

    async def _poll_iteration(self) -> None:
        self._reap_failed_tasks()
        try:
            await super()._poll_iteration()
        except TRANSIENT as e:
            self.redis_failures += 1
            delay = min(BACKOFF_CAP, BACKOFF_BASE * 2 ** (self.redis_failures - 1)) * random.uniform(0.5, 1.0)
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
        """Log (arq would re-raise) job tasks that died on an error of their own."""
        for job_id, task in list(self.tasks.items()):
            if task.done() and not task.cancelled() and task.exception() is not None:
                del self.tasks[job_id]
                exc = task.exception()
                level = logging.WARNING if isinstance(exc, REDIS_FAILURES) else logging.ERROR
                logger.log(level, "job %s ended on an error outside the job (%s: %s)", job_id, type(exc).__name__, exc)

    async def start_jobs(self, job_ids: list[bytes]) -> None:
        """arq's start_jobs, with the slot given back on a Redis error and the job's
        in-progress mark written with this worker's token, so that a connection dropped
        while the mark was being written is resolved by reading it back: the job runs
        here if the mark is ours, and is left alone otherwise."""
        for job_id_b in job_ids:
            await self.sem.acquire()
            if self.job_counter >= self.max_jobs:
                self.sem.release()
                return
            self.job_counter += 1
            job_id = job_id_b.decode()
            try:
                score = await self._claim(job_id)
            except REDIS_FAILURES:
                self.job_counter -= 1
                self.sem.release()
                raise
            if score is None:
                self.job_counter -= 1
                self.sem.release()
                continue
            task = self.loop.create_task(self.run_job(job_id, score))
            task.add_done_callback(lambda _: self._release_sem_dec_counter_on_complete())
            self.tasks[job_id] = task

    async def _claim(self, job_id: str) -> int | None:
        """Mark the job in progress (as arq does, but with this worker's token); its score
        when this worker may run it, None when it runs elsewhere or is not due."""
        key = in_progress_key_prefix + job_id
        async with self.pool.pipeline(transaction=True) as pipe:
            await pipe.watch(key)  # a failure up to MULTI wrote nothing: it propagates
            ongoing = await pipe.exists(key)
            score = await pipe.zscore(self.queue_name, job_id)
            if ongoing or not score or score > timestamp_ms():
                return None
            pipe.multi()  # type: ignore[no-untyped-call]
            pipe.psetex(key, int(self.in_progress_timeout_s * 1000), self.token)
            try:
                await pipe.execute()
            except (ResponseError, WatchError, RedisConnectionError, RedisTimeoutError):
                # WatchError also stands for a connection dropped during EXEC: the mark
                # may have been written. Whose is it? (A failure here propagates; the mark,
                # if ours, then expires and the job runs again, as after a crash.)
                if await self.pool.get(key) != self.token:
                    return None
                logger.info("job %s: claimed despite a Redis error while claiming it", job_id)
        return int(score)


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
