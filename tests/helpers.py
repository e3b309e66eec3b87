"""Helpers the tests import (``from helpers import ...``): in-process workers and polling.
The fixtures stay in conftest.py."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from typing import Any

import arq.worker
import pytest
from arq.connections import ArqRedis
from arq.constants import default_queue_name

import astages


async def run_burst(redis: ArqRedis, functions: list[Any], **options: Any) -> arq.worker.Worker:
    """Run in-process burst workers (as arq's own suite does) until the queue stays empty.

    A burst worker stops when it sees an empty queue, which can happen between arq's
    clean-up of a stage's last job and the after_job_end hook that starts the next stage,
    so another worker runs while jobs are left. Returns the last worker; its counters
    are the totals over all of them."""
    settings = astages.worker_settings(functions=functions, **options)
    settings.setdefault("poll_delay", 0)
    settings.setdefault("max_jobs", 20)
    queue = settings.get("queue_name", default_queue_name)
    totals = {"jobs_complete": 0, "jobs_failed": 0, "jobs_retried": 0}
    for _ in range(20):
        worker = arq.worker.Worker(**settings, redis_pool=redis, burst=True, handle_signals=False)
        try:
            await asyncio.wait_for(worker.main(), timeout=60)
        finally:
            await worker.close()
        for name in totals:
            totals[name] += getattr(worker, name)
        if not await redis.zcard(queue):
            break
    for name, value in totals.items():
        setattr(worker, name, value)
    return worker


async def wait_for(condition: Callable[[], Awaitable[bool]], within: float = 10.0, what: str = "condition") -> None:
    """Poll ``condition`` until it holds, failing after ``within`` seconds."""
    deadline = time.monotonic() + within
    while not await condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {within}s waiting for {what}")
        await asyncio.sleep(0.02)


async def stop_when_idle(worker: arq.worker.Worker, task: asyncio.Future[Any]) -> None:
    """Stop an in-process worker once its job tasks have ended (arq's close() cancels a job
    still doing its bookkeeping, and re-raises the CancelledError)."""
    if worker.tasks:
        await asyncio.wait(list(worker.tasks.values()), timeout=10)
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await worker.close()


async def start_unsent(group: astages.StagedGroup, number: int, send: int = 0) -> None:
    """Start stage ``number`` with only its first ``send`` jobs sent to arq, as while a
    big stage is being sent in chunks, so a test can send others with ``job.enqueue_job()``."""
    import astages._scripts as scripts

    saved = scripts.SEND_LIMIT
    scripts.SEND_LIMIT = send
    try:
        await group.store.run("initiate_stage", group.id, number)
    finally:
        scripts.SEND_LIMIT = saved


async def keys_left(redis: ArqRedis, pattern: str = "astages:*") -> list[bytes]:
    """The keys matching ``pattern``, but the reply keys of recent calls
    (``<prefix>:reply:<token>``: kept a minute so that a call re-sent after its reply was
    lost acts once, see ``once`` in astages/lua/_lib.lua), the prefix's action counters
    (``<prefix>:stats``, see astages/_stats.py), and its job totals and their samples
    (``<prefix>:totals``, ``<prefix>:series``: global, they outlive every group by design,
    see astages/ops.py); what "no key is left" means."""
    kept = (b":stats", b":totals", b":series")
    return sorted(k for k in await redis.keys(pattern) if b":reply:" not in k and not k.endswith(kept))
