"""Worker settings for the chaos suite (imported by `arq chaos_app.WorkerSettings` and
`astages worker chaos_app.WorkerSettings` in separate processes).

Every run of ``step`` appends ``start`` and ``end`` records (with the wall-clock time,
its try, its process and a nonce, so a record written twice by a retried command counts
once) to the list ``chaos:log``; the test reads them to check stage order. Each job's
``kind`` decides what it does: ``ok``, ``retry`` (raises Retry on its first tries, past
max_tries for some), ``fail`` (raises) and ``slow`` (outlives its 1 s timeout); the
user's own hooks raise for a quarter of all runs. Every transition that
finished a group is recorded in ``chaos:finished`` (Store.move and Store.moves, the
batches, wrapped in the worker processes), so the test can count them.
"""

from __future__ import annotations

import asyncio
import os
import random
import time
import uuid
from typing import Any

from arq import Retry
from arq.connections import ArqRedis, RedisSettings

import astages
from astages._scripts import Motion, Store
from astages.runner import reconnecting_client

LOG = "chaos:log"
FINISHED = "chaos:finished"
URL = os.environ.get("CHAOS_REDIS_URL", "redis://127.0.0.1:6379/15")
JOB_TIMEOUT = 1  # seconds: arq re-runs a killed worker's job after this + 10 s
MAX_TRIES = 3

_move = Store.move


async def _recording_move(self: Store, name: str, group_id: str, *args: Any) -> Motion:
    motion = await _move(self, name, group_id, *args)
    if motion.finished:
        await self.redis.rpush(FINISHED, f"{group_id} {name} {os.getpid()}")
    return motion


_moves = Store.moves


async def _recording_moves(self: Store, name: str, group_id: str, *args: Any) -> list[Motion]:
    motions = await _moves(self, name, group_id, *args)  # a batch (finish_jobs, end_jobs)
    for motion in motions:
        if motion.finished:
            await self.redis.rpush(FINISHED, f"{group_id} {name} {os.getpid()}")
    return motions


if os.environ.get("CHAOS_WORKER"):  # in the worker processes only
    Store.move = _recording_move  # type: ignore[method-assign]
    Store.moves = _recording_moves  # type: ignore[method-assign]


# The records go through a client that re-sends a command whose reply was lost (the
# nonce makes a record written twice count once): ctx['redis'] is arq's pool as
# configured, which, as in arq, does not.
_LOG_REDIS: list[ArqRedis] = []


async def _log(ctx: dict[str, Any], what: str, tag: str) -> None:
    record = f"{what} {tag} {time.time():.6f} {ctx['job_try']} {os.getpid()} {ctx['job_id']} {uuid.uuid4().hex}"
    if not _LOG_REDIS:
        _LOG_REDIS.append(reconnecting_client(ctx["redis"]))
    await _LOG_REDIS[0].rpush(LOG, record)


async def step(ctx: dict[str, Any], tag: str, kind: str, retries: int = 0) -> str:
    await _log(ctx, "start", tag)
    try:
        await asyncio.sleep(random.uniform(0.002, 0.03))
        if kind == "retry" and ctx["job_try"] <= retries:
            raise Retry(defer=random.uniform(0.01, 0.1))
        if kind == "fail":
            raise ValueError(f"{tag} fails on purpose")
        if kind == "slow":
            await asyncio.sleep(JOB_TIMEOUT * 3)
        return tag
    finally:
        await _log(ctx, "end", tag)


# A hook sees no job arguments (ctx has none), so a quarter of all runs, chosen at
# random, get user hooks that all raise.


async def on_job_start(ctx: dict[str, Any]) -> None:
    ctx["chaos_hookfail"] = random.random() < 0.25
    if ctx["chaos_hookfail"]:
        raise RuntimeError("on_job_start fails on purpose")


async def on_job_end(ctx: dict[str, Any]) -> None:
    if ctx.get("chaos_hookfail"):
        raise RuntimeError("on_job_end fails on purpose")


async def after_job_end(ctx: dict[str, Any]) -> None:
    if ctx.get("chaos_hookfail"):
        raise RuntimeError("after_job_end fails on purpose")


WorkerSettings = astages.worker_settings(
    functions=[step],
    redis_settings=RedisSettings.from_dsn(URL),
    max_jobs=20,
    poll_delay=0.02,
    max_tries=MAX_TRIES,
    job_timeout=JOB_TIMEOUT,
    keep_result=120,
    on_job_start=on_job_start,
    on_job_end=on_job_end,
    after_job_end=after_job_end,
    sweep_interval=1.0,
    sweep_grace=1.0,
)
