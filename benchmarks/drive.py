"""Drive staged jobs through astages' per-job path without arq, to isolate astages' own cost.

``run_like_worker`` calls the wrapped job function and the ``after_job_end`` hook exactly
as arq's worker does (the same code, the same two script calls per job), with
``concurrency`` jobs in flight, and counts the client's Redis round trips.
``complete_pipelined`` sends the same two script calls per job, but many per round trip:
a fast way to finish a big stage when only the server's work is being measured.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from arq.connections import ArqRedis
from arq.constants import job_key_prefix
from redis.exceptions import NoScriptError

import astages
from astages._keys import Keys
from astages._scripts import SCRIPTS, SEND_LIMIT, Store


async def _noop(ctx: dict[str, Any], *args: Any) -> None:
    return None


_noop.__qualname__ = "noop"


class RoundTrips:
    """Counts the commands (round trips) a client sends while it is installed."""

    def __init__(self, redis: ArqRedis) -> None:
        self.redis = redis
        self.count = 0
        self._original: Callable[..., Awaitable[Any]] | None = None

    def __enter__(self) -> RoundTrips:
        original = self.redis.execute_command
        self._original = original

        async def counted(*args: Any, **kwargs: Any) -> Any:
            self.count += 1
            return await original(*args, **kwargs)

        self.redis.execute_command = counted  # type: ignore[method-assign]
        return self

    def __exit__(self, *exc: object) -> None:
        del self.redis.execute_command


async def run_like_worker(
    redis: ArqRedis, group_id: str, stage: int, seqs: Sequence[int], concurrency: int = 50
) -> tuple[float, int]:
    """Run jobs ``seqs`` of a stage through astages' worker wrapper and hooks (no arq).
    Returns (wall seconds, client round trips)."""
    settings = astages.worker_settings(functions=[_noop])
    function = settings["functions"][0]
    after = settings["after_job_end"]
    keys = Keys()
    todo = iter(seqs)

    async def lane() -> None:
        for seq in todo:
            ctx = {"redis": redis, "job_id": keys.job_id(group_id, stage, seq), "job_try": 1, "enqueue_time": None}
            await function.coroutine(ctx, seq)
            await after(ctx)

    with RoundTrips(redis) as trips:
        t0 = time.perf_counter()
        await asyncio.gather(*(lane() for _ in range(concurrency)))
        elapsed = time.perf_counter() - t0
    return elapsed, trips.count


async def complete_pipelined(redis: ArqRedis, group_id: str, stage: int, seqs: Sequence[int], batch: int = 500) -> None:
    """start_job + finish_job('s') for each of ``seqs``, ``batch`` jobs per round trip.

    Both scripts are idempotent for a job and try, so a batch that met an empty script
    cache (another client of the server ran SCRIPT FLUSH) is simply sent again."""
    store = Store(redis, Keys())
    keys = (store.keys.group(group_id), store.keys.index)
    base = (store.keys.job_id_base(group_id), job_key_prefix, store.expires_extra_ms, SEND_LIMIT, "")
    start, finish = SCRIPTS["start_job"], SCRIPTS["finish_job"]
    for i in range(0, len(seqs), batch):
        for _ in range(5):
            async with redis.pipeline(transaction=False) as pipe:
                for seq in seqs[i : i + batch]:
                    pipe.evalsha(start.sha, 2, *keys, *base, stage, seq, 1)
                    pipe.evalsha(finish.sha, 2, *keys, *base, stage, seq, 1, "s", "")
                replies = await pipe.execute(raise_on_error=False)
            if not any(isinstance(r, NoScriptError) for r in replies):
                break
            await redis.script_load(start.script)
            await redis.script_load(finish.script)
        for reply in replies:
            if isinstance(reply, Exception):
                raise reply
