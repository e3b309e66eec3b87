"""``astages demo``: a photo import in four stages, run end to end in this process.

1. fetch   one job per photo; some get "server busy" and retry with arq's ``Retry``, one
           photo is missing and fails for good;
2. resize  one job per photo; it looks up its fetch job and skips a photo that failed;
3. index   one job per batch of ten photos;
4. report  one job that reads the earlier stages' counters and sums up.

A worker runs in the same process (``astages._inprocess.run_group``) while progress bars
are drawn from each stage's O(1) ``stage.info()``. A finished group deletes itself, so
the summary comes from what its end published (per stage: counts, start and end, the
real stage durations) and from the outcome of every job (messages, errors). Without a
Redis URL everything runs on an in-memory fakeredis server.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from arq import Retry
from arq.connections import ArqRedis

from astages import _board
from astages._connection import connect, safe_url
from astages._ending import EndListener
from astages._inprocess import GroupRun, run_group
from astages.group import StagedGroup, within_a_grouping
from astages.job import StagedJob
from astages.models import GroupSummary, JobStatus, StageProgress

__all__ = ["DEMO_QUEUE", "STAGES", "DemoResult", "run_demo"]

# The demo's own arq queue, so a real worker on the same server never takes its jobs.
DEMO_QUEUE = "astages:demo:queue"
STAGES = {1: "fetch", 2: "resize", 3: "index", 4: "report"}
BATCH = 10


@dataclass(frozen=True, slots=True)
class Pace:
    """How long the fake work takes (seconds)."""

    work: tuple[float, float]
    retry_defer: float


NORMAL = Pace(work=(0.005, 0.05), retry_defer=0.3)
QUICK = Pace(work=(0.0, 0.0), retry_defer=0.05)


def _pace(ctx: dict[str, Any]) -> Pace:
    pace = ctx.get("demo_pace")
    return pace if isinstance(pace, Pace) else NORMAL


async def _work(ctx: dict[str, Any], seed: int) -> None:
    low, high = _pace(ctx).work
    if high > 0:
        await asyncio.sleep(random.Random(seed).uniform(low, high))


class PhotoMissing(Exception):
    """The source answered 404 for a photo."""


def missing_photo(photos: int) -> int:
    """The one photo the demo's source does not have."""
    return 13 if photos > 13 else photos - 1


async def fetch_photo(ctx: dict[str, Any], photo: int, photos: int) -> int:
    job = await StagedJob.perform_job(ctx, photo, photos)
    await _work(ctx, photo)
    if photo == missing_photo(photos):
        await job.set_status_message(f"photo {photo}: not found")
        raise PhotoMissing(f"photo {photo}: the source answered 404")
    if photo % 11 == 3 and ctx["job_try"] < 2:
        await job.set_status_message(f"photo {photo}: server busy, retrying")
        raise Retry(defer=_pace(ctx).retry_defer)
    size = random.Random(photo).randint(80, 900)
    await job.set_status_message(f"fetched photo {photo} ({size} kB)")
    return size


async def resize_photo(ctx: dict[str, Any], photo: int, fetch_job_id: str) -> bool:
    job = await StagedJob.perform_job(ctx, photo, fetch_job_id)
    fetched = await StagedJob.load(ctx["redis"], fetch_job_id)
    if await fetched.status() is JobStatus.FAILED:
        await job.set_status_message(f"photo {photo}: skipped, it was not fetched")
        return False
    await _work(ctx, 1000 + photo)
    if photo % 17 == 5 and ctx["job_try"] < 2:
        raise Retry(defer=_pace(ctx).retry_defer)
    await job.set_status_message(f"photo {photo}: 3 sizes written")
    return True


async def index_batch(ctx: dict[str, Any], first: int, last: int) -> int:
    job = await StagedJob.perform_job(ctx, first, last)
    await _work(ctx, 2000 + first)
    if first == BATCH and ctx["job_try"] < 2:
        raise Retry(defer=_pace(ctx).retry_defer)
    await job.set_status_message(f"indexed photos {first}-{last}")
    return last - first + 1


async def publish_report(ctx: dict[str, Any], photos: int) -> str:
    job = await StagedJob.perform_job(ctx, photos)
    progress = await job.stage().group.progress()
    fetch, resize, index = (progress[n] for n in (1, 2, 3))
    text = (
        f"{fetch.successful} of {photos} photos published, {fetch.failed} missing; "
        f"{fetch.retried + resize.retried + index.retried} retries on the way"
    )
    await job.set_status_message(text)
    return text


FUNCTIONS: list[Callable[..., Any]] = [fetch_photo, resize_photo, index_batch, publish_report]


async def build(redis: ArqRedis, photos: int) -> StagedGroup:
    """The demo group, filled and initiated."""
    async with within_a_grouping(redis, f"astages demo: import {photos} photos") as group:
        fetches = await (await group.stage(1)).enqueue_many((fetch_photo, (photo, photos)) for photo in range(photos))
        await (await group.stage(2)).enqueue_many(
            (resize_photo, (photo, job.id)) for photo, job in zip(range(photos), fetches, strict=True)
        )
        await (await group.stage(3)).enqueue_many(
            (index_batch, (first, min(first + BATCH, photos) - 1)) for first in range(0, photos, BATCH)
        )
        await (await group.stage(4)).enqueue(publish_report, photos)
    return group


@dataclass(frozen=True, slots=True)
class DemoResult:
    run: GroupRun
    redis: str  # where it ran
    left_over: int  # astages keys left behind (0: the group cleaned up after itself)
    ending: GroupSummary | None = None  # what the group's end published (None if missed)

    @property
    def stages(self) -> list[dict[str, Any]]:
        """Per stage: jobs, successful, failed, cancelled, retried and duration (seconds
        from the stage's start to its end, as the stage recorded them)."""
        if self.ending is None:  # not seen: every job's outcome, first start to last end
            return [
                s.as_dict() | {"name": STAGES.get(s.number, ""), "status": "complete", "cancelled": 0}
                for s in self.run.summary()
            ]
        return [
            {
                "stage": s.number,
                "name": STAGES.get(s.number, ""),
                "status": s.status,
                "jobs": s.total,
                "successful": s.successful,
                "failed": s.failed,
                "cancelled": s.cancelled,
                "retried": s.retried,
                "duration": round((s.finished - s.started).total_seconds(), 3) if s.started and s.finished else None,
            }
            for s in self.ending.stages
        ]

    def as_dict(self) -> dict[str, Any]:
        stages = self.stages
        return {
            "group": self.run.group_id,
            "description": self.run.description,
            "redis": self.redis,
            "outcome": self.ending.outcome if self.ending else None,
            "elapsed": round(self.run.elapsed, 3),
            "jobs": sum(s["jobs"] for s in stages),
            "successful": sum(s["successful"] for s in stages),
            "failed": sum(s["failed"] for s in stages),
            "cancelled": sum(s["cancelled"] for s in stages),
            "retried": sum(s["retried"] for s in stages),
            "left_over_keys": self.left_over,
            "stages": stages,
            "failures": [
                {"id": job.id, "message": job.message, "error": _first_line(job.error)} for job in self.run.failed
            ],
        }


def _first_line(text: str | None) -> str:
    return (text or "").strip().splitlines()[0] if text else ""


@contextlib.contextmanager
def quiet_workers(verbose: bool) -> Iterator[None]:
    """Keep arq's and astages' worker logs (a traceback for the failing job) off the
    screen unless asked for."""
    if verbose:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
        yield
        return
    saved = []
    for name in ("arq", "astages"):
        logger = logging.getLogger(name)
        saved.append((logger, logger.propagate, list(logger.handlers)))
        logger.handlers = [logging.NullHandler()]
        logger.propagate = False
    try:
        yield
    finally:
        for logger, propagate, handlers in saved:
            logger.handlers = handlers
            logger.propagate = propagate


async def run_demo(
    url: str | None,
    *,
    photos: int = 200,
    quick: bool = False,
    board: _board.Board | None = None,
    interval: float = 0.1,
    on_group: Any = None,
) -> DemoResult:
    """Build the demo group on ``url`` (fakeredis when None), run it with an in-process
    worker and return the outcome; ``board`` (when given) gets a frame every ``interval``
    seconds. ``on_group(group)`` is called once the group is initiated."""
    if photos < 1:
        raise ValueError("the demo needs at least one photo")
    redis = await connect(url, default_queue_name=DEMO_QUEUE)
    try:
        group = await build(redis, photos)
        if on_group is not None:
            on_group(group)
        pace = QUICK if quick else NORMAL
        async with EndListener(group) as end:
            run = await _run(redis, group, pace, quick, board, interval)
            ending = await end.summary(timeout=5)
        if board is not None:
            board.draw(_board.ended_rows(ending, STAGES) if ending else _final_rows(run))
        left_over = len(await redis.keys("astages:{" + group.id + "}*"))
        return DemoResult(run, "fakeredis (in memory)" if not url else safe_url(url), left_over, ending)
    finally:
        await redis.aclose()


async def _run(
    redis: ArqRedis, group: StagedGroup, pace: Pace, quick: bool, board: _board.Board | None, interval: float
) -> GroupRun:
    """Run the group with an in-process worker, drawing a frame every ``interval`` seconds."""
    runner = asyncio.ensure_future(
        run_group(
            redis,
            group,
            FUNCTIONS,
            timeout=300,
            fast_forward=quick,
            max_jobs=40,
            poll_delay=0.01,
            keep_result=0,
            ctx={"demo_pace": pace},
        )
    )
    try:
        while not runner.done():
            if board is not None:
                frame = await _board.snapshot(group, STAGES)
                if frame is not None:
                    board.draw(frame)
            await asyncio.wait([runner], timeout=interval)
        return runner.result()
    finally:
        if not runner.done():
            runner.cancel()
            await asyncio.wait([runner])
            await group.delete()


def _final_rows(run: GroupRun) -> list[_board.StageRow]:
    """Full bars built from every job's outcome, when the group's end was not heard."""
    out = []
    for summary in run.summary():
        progress = StageProgress(successful=summary.successful, failed=summary.failed, retried=summary.retried)
        out.append(_board.StageRow(summary.number, "complete", progress, STAGES.get(summary.number, "")))
    return out
