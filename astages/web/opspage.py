"""The operations view: arq's queues and workers, and jobs finished over time as charts.

Read with ``astages.ops`` in a few round trips: the queues (configured, the default one,
and those of the running stages of the newest live groups), their health-check keys, the
prefix's totals, and the samples the sweeper wrote within the chosen window (at most
``SERIES_CAP``). Nothing here reads a stage's job list or grows with the number of groups
beyond ``QUEUE_LOOKUP_GROUPS``.
"""

from __future__ import annotations

import datetime as dt
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from astages._scripts import Store
from astages.ops import (
    SERIES_CAP,
    QueueStats,
    Rate,
    Sample,
    WorkerHealth,
    default_queue,
    rates,
    read_queues,
    read_series,
    read_totals,
    read_workers,
    redis_now_ms,
    stage_queues,
)
from astages.web._shared import iso, seconds

# The chart windows a page offers: label -> seconds.
WINDOWS = {"1h": 3600, "6h": 6 * 3600, "24h": 24 * 3600}
CHART_WIDTH = 600
CHART_HEIGHT = 160


def nice_ceiling(value: float) -> float:
    """The smallest of 1, 2, 2.5, 5 times a power of ten that is at least ``value`` (> 0)."""
    if value <= 0:
        return 1.0
    power = 10 ** math.floor(math.log10(value))
    for step in (1, 2, 2.5, 5, 10):
        if step * power >= value * (1 - 1e-9):
            return float(step * power)
    return float(10 * power)  # pragma: no cover


def rate_label(per_second: float) -> str:
    """A rate as people read it: ``12.5/s``, ``3/min``, ``0``."""
    if per_second <= 0:
        return "0"
    if per_second >= 1:
        return f"{per_second:,.3g}/s"
    return f"{per_second * 60:,.3g}/min"


@dataclass(frozen=True, slots=True)
class Chart:
    """Step lines of jobs per second (SVG ``points`` in a viewBox of CHART_WIDTH x
    CHART_HEIGHT, drawn to the same scale ``top``), from the window's first sample (or
    its start, with none) to now, so that a few samples fill the chart."""

    successful: str
    failed: str
    top: float
    start_ms: int
    end_ms: int
    intervals: int

    @classmethod
    def of(cls, steps: Sequence[Rate], start_ms: int, end_ms: int) -> Chart:
        if steps:
            start_ms = steps[0].start_ms
        top = nice_ceiling(max([r.successful for r in steps] + [r.failed for r in steps] + [0.0]))
        span = max(1, end_ms - start_ms)

        def line(name: str) -> str:
            out: list[str] = []
            for r in steps:
                y = CHART_HEIGHT - getattr(r, name) / top * CHART_HEIGHT
                for at in (r.start_ms, r.end_ms):
                    x = min(CHART_WIDTH, max(0.0, (at - start_ms) / span * CHART_WIDTH))
                    out.append(f"{x:.1f},{y:.1f}")
            return " ".join(out)

        return cls(line("successful"), line("failed"), top, start_ms, end_ms, len(steps))

    @property
    def top_label(self) -> str:
        return rate_label(self.top)

    @property
    def since(self) -> str:
        """How long ago the chart starts, as a label."""
        return seconds(dt.timedelta(milliseconds=max(0, self.end_ms - self.start_ms)))

    def as_json(self) -> dict[str, Any]:
        return {
            "successful": self.successful,
            "failed": self.failed,
            "top": self.top,
            "top_label": self.top_label,
            "since": self.since,
            "intervals": self.intervals,
        }


@dataclass(frozen=True, slots=True)
class OpsPage:
    now_ms: int
    queues: tuple[QueueStats, ...]
    workers: tuple[WorkerHealth, ...]
    totals: dict[str, int]
    window: str
    samples: tuple[Sample, ...]
    steps: tuple[Rate, ...]
    chart: Chart
    notes: tuple[str, ...] = field(default=())

    @property
    def last(self) -> Sample | None:
        return self.samples[-1] if self.samples else None

    @property
    def recent(self) -> Rate | None:
        return self.steps[-1] if self.steps else None

    @property
    def finished_in_window(self) -> tuple[int, int]:
        """(successful, failed) jobs between the first and the last sample of the window."""
        if len(self.samples) < 2:
            return 0, 0
        first, last = self.samples[0], self.samples[-1]
        return max(0, last.successful - first.successful), max(0, last.failed - first.failed)

    def worker_of(self, queue: str) -> WorkerHealth | None:
        return next((w for w in self.workers if w.queue == queue), None)

    def as_json(self) -> dict[str, Any]:
        last, recent = self.last, self.recent
        done, failed = self.finished_in_window
        return {
            "live": True,
            "now": iso(_at(self.now_ms)),
            "queues": [q.as_json() | {"oldest_age": seconds(_span(q.oldest_age))} for q in self.queues],
            "workers": [w.as_json() | {"age": seconds(_span(w.age))} for w in self.workers],
            "totals": self.totals,
            "window": self.window,
            "samples": len(self.samples),
            "last_sample": None
            if last is None
            else {
                "at": iso(_at(last.at_ms)),
                "successful": last.successful,
                "failed": last.failed,
                "cancelled": last.cancelled,
            },
            "in_window": {"successful": done, "failed": failed},
            "recent": None
            if recent is None
            else {
                "successful_per_second": recent.successful,
                "failed_per_second": recent.failed,
                "successful": rate_label(recent.successful),
                "failed": rate_label(recent.failed),
            },
            "rates": [_rate_json(r) for r in self.steps],
            "chart": self.chart.as_json(),
        }


def _rate_json(r: Rate) -> dict[str, Any]:
    return {"start": iso(_at(r.start_ms)), "end": iso(_at(r.end_ms)), "successful": r.successful, "failed": r.failed}


def _at(ms: int) -> dt.datetime:
    return dt.datetime.fromtimestamp(ms / 1000, tz=dt.UTC)


def _span(value: float | None) -> dt.timedelta | None:
    return None if value is None else dt.timedelta(seconds=value)


async def ops_page(store: Store, queues: Sequence[str], window: str) -> OpsPage:
    """Read the operations view: ``queues`` (configured) with the default queue and the
    running stages' ones, their workers, the totals and the ``window``'s samples."""
    redis, keys = store.redis, store.keys
    now_ms = await redis_now_ms(redis)
    names = {default_queue(redis), *queues, *await stage_queues(redis, keys)}
    queue_rows = await read_queues(redis, names, now_ms)
    workers = await read_workers(redis, names)
    totals = await read_totals(redis, keys)
    start_ms = now_ms - WINDOWS[window] * 1000
    samples = await read_series(redis, keys, count=SERIES_CAP, since_ms=start_ms)
    steps = rates(samples)
    notes = []
    if len(samples) < 2:
        notes.append(
            "Throughput is charted from the samples the sweeper takes at the end of each pass (every "
            "sweep_interval, 30 s by default, among the workers of this Redis): "
            f"{len(samples)} so far in this window, two are needed."
        )
    return OpsPage(
        now_ms=now_ms,
        queues=tuple(queue_rows),
        workers=tuple(workers),
        totals=totals,
        window=window,
        samples=tuple(samples),
        steps=tuple(steps),
        chart=Chart.of(steps, start_ms, now_ms),
        notes=tuple(notes),
    )
