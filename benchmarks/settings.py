"""Worker settings for the benchmarks: the same no-op functions, run by plain arq or by astages.

Read from the environment, so ``benchmarks/worker.py`` (or the ``arq`` CLI:
``arq benchmarks.settings.ASTAGES``) starts a worker for one queue:

- ``BENCH_REDIS_URL``  the Redis database (default ``redis://127.0.0.1:6379/10``)
- ``BENCH_QUEUE``      the arq queue the worker serves
- ``BENCH_RUNS_FILE``  where the worker writes, when it exits, one line per job run:
  ``run stage index try start end ok score`` (times from ``time.time()``; score: arq's
  queue score, when the job was due), so the benchmark
  can check order and duplicates and measure stage gaps without any extra Redis work.
"""

from __future__ import annotations

import atexit
import os
import time
from typing import Any

from arq import Retry
from arq.connections import RedisSettings

import astages

REDIS_URL = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/10")
QUEUE = os.environ.get("BENCH_QUEUE", "arq:queue")
RUNS_FILE = os.environ.get("BENCH_RUNS_FILE", "")

# (run, stage, index, try, start, end, ok, arq score in s) for every job run in this process.
RUNS: list[tuple[str, int, int, int, float, float, int, float]] = []


async def noop(ctx: dict[str, Any], run: str, stage: int, index: int) -> None:
    """Does nothing but note when it ran."""
    t = time.time()
    RUNS.append((run, stage, index, ctx["job_try"], t, t, 1, ctx["score"] / 1000))


async def flaky(ctx: dict[str, Any], run: str, stage: int, index: int) -> None:
    """Every tenth job fails its first try with ``Retry`` (no defer); the others do nothing."""
    t = time.time()
    if index % 10 == 0 and ctx["job_try"] == 1:
        RUNS.append((run, stage, index, ctx["job_try"], t, time.time(), 0, ctx["score"] / 1000))
        raise Retry(defer=0)
    RUNS.append((run, stage, index, ctx["job_try"], t, time.time(), 1, ctx["score"] / 1000))


def _mark_ready() -> None:
    with open(RUNS_FILE + ".ready", "w", encoding="ascii") as f:
        f.write(str(os.getpid()))


async def _ready(ctx: dict[str, Any]) -> None:
    if RUNS_FILE:
        _mark_ready()


def _write_runs() -> None:
    with open(RUNS_FILE, "w", encoding="ascii") as f:
        f.writelines(" ".join(map(str, row)) + "\n" for row in RUNS)


if RUNS_FILE:
    atexit.register(_write_runs)


_COMMON: dict[str, Any] = {
    "redis_settings": RedisSettings.from_dsn(REDIS_URL),
    "queue_name": QUEUE,
    "max_jobs": 100,
    "poll_delay": 0.01,
    "keep_result": 60,
    "on_startup": _ready,
    "handle_signals": True,
}

if os.environ.get("BENCH_COALESCE_MS"):  # experiments: astages' coalescing window
    import astages.worker

    astages.worker.COALESCE_WINDOW = float(os.environ["BENCH_COALESCE_MS"]) / 1000

# Plain arq: the functions as they are.
PLAIN: dict[str, Any] = {**_COMMON, "functions": [noop, flaky]}

# astages: the same functions, wrapped (a job outside any stage would run untouched).
ASTAGES: dict[str, Any] = astages.worker_settings(functions=[noop, flaky], **_COMMON)
