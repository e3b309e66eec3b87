"""Worker settings for the end-to-end tests (run with ``python -m arq e2e_app.WorkerSettings``).

Every job appends "start <tag> <t>" and "end <tag> <t>" to the Redis list ``e2e:log`` so
the tests can check ordering and exactly-once execution across processes."""

from __future__ import annotations

import os
import time
from typing import Any

from arq import Retry
from arq.connections import RedisSettings

import astages

LOG = "e2e:log"


async def _log(ctx: dict[str, Any], what: str, tag: str) -> None:
    await ctx["redis"].rpush(LOG, f"{what} {tag} {time.time():.6f} {ctx['job_try']}")


async def step(ctx: dict[str, Any], tag: str, retries: int = 0, fail: bool = False) -> str:
    """Logs its start and end; raises Retry on its first ``retries`` tries."""
    await _log(ctx, "start", tag)
    if ctx["job_try"] <= retries:
        raise Retry(defer=0.05)
    if fail:
        raise ValueError(f"{tag} fails on purpose")
    await _log(ctx, "end", tag)
    return tag


WorkerSettings = astages.worker_settings(
    functions=[step],
    redis_settings=RedisSettings.from_dsn(os.environ.get("E2E_REDIS_URL", "redis://127.0.0.1:6379/15")),
    max_jobs=50,
    poll_delay=0.01,
    max_tries=3,
)
