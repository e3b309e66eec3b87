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
  and, after ``max_jobs`` such failures, stop taking jobs); the job itself stays in the
  queue, or, when the failure hid that arq's in-progress mark was written, runs once
  that mark expires: it is never lost, and never run twice at the same time;
- a job task that died on a Redis error is logged instead of re-raised into the loop.

``reconnecting(settings)`` gives a ``RedisSettings`` a reconnect-and-retry policy unless
the user set one (``astages.worker_settings`` applies it too, so the plain ``arq``
command gets it): a command that fails on a dropped connection reconnects and is sent
again. Every astages script is safe to repeat (idempotent per job and try).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import logging.config
import os
import random
import sys
from typing import Any

from arq.connections import RedisSettings
from arq.logs import default_log_config
from arq.utils import import_string
from arq.worker import Worker, check_health, get_kwargs
from redis.asyncio.retry import Retry
from redis.backoff import EqualJitterBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError, WatchError
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
        for job_id in job_ids:
            if self.job_counter >= self.max_jobs:
                return
            try:
                await super().start_jobs([job_id])
            except REDIS_FAILURES:
                # arq took a slot (counter and semaphore) before the call that failed and
                # gives it back only on the errors it expects; give it back here.
                self.job_counter -= 1
                self.sem.release()
                raise


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
