"""Prometheus metrics for astages (the ``metrics`` extra: ``pip install 'astages[metrics]'``).

``Metrics(redis)`` reads the state of every live group in O(groups + stages) and never a
stage's job lists: a few pipelined round trips per scrape (the index; each group's stage
numbers; one MULTI with ``<prefix>:totals``, each group's status and each stage's counters
and times; the arq queues named in the live stages' job specs or configured, their
health-check keys, and one ZCOUNT per wait bucket), and one job spec per stage only the
first time the stage is seen (its queue name, then cached). ``await metrics.render()``
gives the text exposition (the dashboard serves it at ``/metrics``); ``AstagesCollector``
is a prometheus_client ``Collector`` whose ``collect()`` reads Redis on each scrape (what
``astages metrics`` serves).

Everything but one metric is read from Redis at the scrape: gauges, and the
``astages_jobs_finished_total`` / ``astages_job_retries_total`` counters (``<prefix>:totals``,
which the scripts add every group to as it ends or is deleted, plus the live groups' stage
counters: see astages/ops.py; a live stage or job deleted, or the totals purged, takes
counts back, which the ``Metrics`` object keeps them from showing: they never go down
within a process). ``astages_stage_duration_seconds`` is kept by the ``Metrics``
object: a stage's duration is observed the first time a scrape sees it ended, so it starts
empty with the process and misses a stage that ends and whose group deletes itself between
two scrapes (a group's last stage, unless the group is kept with ``keep_for``).

Labels: ``status``; ``queue`` (the arq queue of a stage's jobs, read from one of its job
specs; a stage whose jobs go to several queues is labelled with one of them); ``group``
(the group id), ``stage`` (its number) and ``name`` (its name or "") only on the
``astages_stage_*`` series, which exist only for pending and running groups, at most
``stage_series`` stages (oldest groups first; ``astages_stage_series_dropped`` counts the
rest); ``action`` (sweeper and Cleaner counters, ``<prefix>:stats``).
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import threading
import time
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from arq.constants import default_queue_name
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeHistogramMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from astages import ops
from astages._keys import DEFAULT_PREFIX, Keys
from astages._scripts import text
from astages._stats import stats_key
from astages.models import decode_spec
from astages.ops import TOTAL_FIELDS, as_int

__all__ = ["CONTENT_TYPE_LATEST", "METRIC_NAMES", "AstagesCollector", "Metrics", "Snapshot"]

GROUP_STATUSES = ("pending", "running", "complete", "failed", "cancelled")
JOB_STATUSES = ("pending", "queued", "running", "pending_re_run", "successful", "failed", "cancelled")
FINAL_JOB = ("successful", "failed", "cancelled")
LIVE_GROUP = ("pending", "running")
_STAGE_FIELDS = ("status", "name", "created", "started", "finished", *JOB_STATUSES, "retried")
DURATION_BUCKETS = (1.0, 5.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0, 7200.0, 21600.0, 86400.0)
WAIT_BUCKETS = (0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0, 600.0, 1800.0, 3600.0)
DEFAULT_STAGE_SERIES = 200

# Every metric name the exporter writes (as it appears in the exposition, suffixes included);
# the tests check the shipped Grafana dashboard and alert rules against it.
METRIC_NAMES = frozenset(
    {
        "astages_groups",
        "astages_jobs",
        "astages_stage_jobs",
        "astages_stage_running_seconds",
        "astages_stage_series_dropped",
        "astages_oldest_running_stage_seconds",
        "astages_jobs_finished_total",
        "astages_job_retries_total",
        "astages_stage_duration_seconds_bucket",
        "astages_stage_duration_seconds_sum",
        "astages_stage_duration_seconds_count",
        "astages_arq_queue_jobs",
        "astages_arq_queue_due_jobs",
        "astages_arq_queue_oldest_due_seconds",
        "astages_arq_queue_wait_seconds_bucket",
        "astages_arq_queue_wait_seconds_gsum",
        "astages_arq_queue_wait_seconds_gcount",
        "astages_arq_worker_alive",
        "astages_sweeper_actions_total",
        "astages_cleaner_actions_total",
        "astages_scrape_groups",
        "astages_scrape_seconds",
    }
)


def _ms(raw: Any) -> int | None:
    try:
        return int(raw)
    except (TypeError, ValueError):
        return None


@dataclass(frozen=True, slots=True)
class StageRow:
    """One stage's counters and times, as read from its hash (times in epoch ms)."""

    group: str
    group_status: str
    group_created: int
    number: int
    status: str
    name: str
    queue: str
    started: int | None
    finished: int | None
    counts: dict[str, int]
    retried: int


@dataclass(frozen=True, slots=True)
class QueueRow:
    """An arq queue: its length, the jobs due now, the score of its earliest job, how many
    due jobs have waited at most each of WAIT_BUCKETS, and whether a worker's health check
    key is there."""

    jobs: int
    due: int
    oldest_score: int | None
    waited: tuple[int, ...]
    worker_alive: bool


@dataclass(frozen=True, slots=True)
class Snapshot:
    """What one scrape read (``now_ms`` is Redis' clock)."""

    now_ms: int
    groups: dict[str, str]
    stages: list[StageRow]
    queues: dict[str, QueueRow]
    stats: dict[str, int]
    totals: dict[str, int]  # jobs finished so far (ops.TOTAL_FIELDS): <prefix>:totals + live groups' counters
    seconds: float = 0.0


@dataclass
class _Totals:
    """The counters kept across scrapes."""

    durations: dict[str, list[int]] = field(default_factory=dict)  # queue -> bucket counts (+Inf last)
    duration_sum: dict[str, float] = field(default_factory=dict)
    seen: dict[tuple[str, int], bool] = field(default_factory=dict)  # (group, stage) -> duration observed
    # Jobs finished as read (ops.TOTAL_FIELDS) and what they lost: a live stage or job deleted,
    # or <prefix>:totals purged, takes counts back; the counters exported never go down.
    raw: dict[str, int] = field(default_factory=dict)
    lost: dict[str, int] = field(default_factory=dict)

    def counted(self, name: str) -> int:
        return self.raw.get(name, 0) + self.lost.get(name, 0)

    primed: bool = False


class Metrics:
    """Reads astages' metrics from ``redis`` (an async redis-py client, e.g. ArqRedis) for
    key prefix ``prefix``. ``queues``: arq queues always reported (besides those the live
    stages use). ``stage_series``: at most this many stages get per-stage series. Keep one
    object per process: it holds the ``*_total`` counters between scrapes."""

    def __init__(
        self,
        redis: Any,
        *,
        prefix: str = DEFAULT_PREFIX,
        queues: Iterable[str] = (default_queue_name,),
        stage_series: int = DEFAULT_STAGE_SERIES,
    ) -> None:
        self.redis = redis
        self.keys = Keys(prefix)
        self.queues = tuple(queues)
        self.stage_series = stage_series
        self._queue_of: dict[tuple[str, int], str] = {}
        self._totals = _Totals()
        self._lock = asyncio.Lock()

    # -- reading -------------------------------------------------------------------------

    async def read(self) -> Snapshot:
        """Read the current state (O(groups) commands in 4 round trips) and account the
        counters. Concurrent calls are serialized."""
        async with self._lock:
            snapshot = await self._read()
            self._account(snapshot)
            return snapshot

    async def _read(self) -> Snapshot:
        started = time.perf_counter()
        keys, redis = self.keys, self.redis
        async with redis.pipeline(transaction=False) as pipe:
            pipe.time()
            pipe.zrange(keys.index, 0, -1)
            pipe.hgetall(stats_key(keys))
            (secs, micros), raw_ids, raw_stats = await pipe.execute()
        now_ms = int(secs) * 1000 + int(micros) // 1000
        ids = [text(i) for i in raw_ids]
        async with redis.pipeline(transaction=False) as pipe:
            for gid in ids:
                pipe.zrange(keys.stages(gid), 0, -1)
            numbers = await pipe.execute(raise_on_error=False)
        per_group = [
            (gid, [as_int(n) for n in ns])
            for gid, ns in zip(ids, numbers, strict=True)
            if not isinstance(ns, Exception)
        ]
        unknown = [(gid, n) for gid, ns in per_group for n in ns if (gid, n) not in self._queue_of]
        # One MULTI, as ops.cumulative: a group that ends meanwhile is in <prefix>:totals or
        # in its stage counters, never both.
        async with redis.pipeline(transaction=True) as pipe:
            pipe.hgetall(keys.totals)
            for gid, ns in per_group:
                pipe.hmget(keys.group(gid), "status", "created")
                for n in ns:
                    pipe.hgetall(keys.stage(gid, n))  # the stage's own small hash (cheaper to send than HMGET)
            for gid, n in unknown:
                pipe.hrandfield(keys.stage_part(gid, n, "spec"), 1, withvalues=True)
            replies = iter(await pipe.execute(raise_on_error=False))
        raw_totals = next(replies)
        rows = [(gid, next(replies), [(n, next(replies)) for n in ns]) for gid, ns in per_group]
        for (gid, n), spec in zip(unknown, replies, strict=True):
            queue = _spec_queue(spec)
            if queue:
                self._queue_of[(gid, n)] = queue
        groups: dict[str, str] = {}
        stages: list[StageRow] = []
        for gid, head, stage_rows in rows:
            if isinstance(head, Exception) or head[0] is None:
                continue  # gone meanwhile (or not a hash): not a live group
            groups[gid] = status = text(head[0])
            for n, row in stage_rows:
                if not isinstance(row, dict) or b"status" not in row:
                    continue  # gone meanwhile, or not a stage's hash
                values = {f: row.get(f.encode()) for f in _STAGE_FIELDS}
                stages.append(
                    StageRow(
                        group=gid,
                        group_status=status,
                        group_created=as_int(head[1]),
                        number=n,
                        status=text(values["status"]),
                        name=text(values["name"]) if values["name"] is not None else "",
                        queue=self._queue_of.get((gid, n), ""),
                        started=_ms(values["started"]),
                        finished=_ms(values["finished"]),
                        counts={st: as_int(values[st]) for st in JOB_STATUSES},
                        retried=as_int(values["retried"]),
                    )
                )
        done = {text(k): as_int(v) for k, v in raw_totals.items()} if isinstance(raw_totals, dict) else {}
        totals = {name: done.get(name, 0) for name in TOTAL_FIELDS}
        for st in stages:
            if st.group_status in LIVE_GROUP:  # an ended group is in the totals already
                for name in TOTAL_FIELDS:
                    totals[name] += st.retried if name == "retried" else st.counts[name]
        names = sorted({*self.queues, *(st.queue for st in stages if st.queue)})
        queues = await self._read_queues(names, now_ms)
        stats = {text(k): as_int(v) for k, v in raw_stats.items()}
        live = set(groups)
        for key in [k for k in self._queue_of if k[0] not in live]:
            del self._queue_of[key]
        return Snapshot(now_ms, groups, stages, queues, stats, totals, time.perf_counter() - started)

    async def _read_queues(self, names: Sequence[str], now_ms: int) -> dict[str, QueueRow]:
        """The queues (ops.read_queues), their workers (ops.read_workers) and how long their
        due jobs have waited (a ZCOUNT per bucket: O(log n), no job read)."""
        found = {q.name: q for q in await ops.read_queues(self.redis, names, now_ms)}
        alive = {w.queue for w in await ops.read_workers(self.redis, found)}
        async with self.redis.pipeline(transaction=False) as pipe:
            for queue in found:
                for le in WAIT_BUCKETS:
                    pipe.zcount(queue, now_ms - int(le * 1000), now_ms)
            counts = await pipe.execute(raise_on_error=False)
        out: dict[str, QueueRow] = {}
        for i, (name, stats) in enumerate(found.items()):
            waited = tuple(as_int(x) for x in counts[i * len(WAIT_BUCKETS) : (i + 1) * len(WAIT_BUCKETS)])
            out[name] = QueueRow(stats.jobs, stats.due, stats.earliest_ms, waited, name in alive)
        return out

    # -- counters kept across scrapes -----------------------------------------------------

    def _account(self, snap: Snapshot) -> None:
        """Keep the finished-job counters from going back (see _Totals.lost), and observe
        the duration of each stage seen ended for the first time. The first scrape only
        takes note of the stages (what ended before this process started is not its to count)."""
        t = self._totals
        for name in TOTAL_FIELDS:
            now = snap.totals.get(name, 0)
            if now < t.raw.get(name, 0):
                t.lost[name] = t.lost.get(name, 0) + t.raw[name] - now
            t.raw[name] = now
        seen: dict[tuple[str, int], bool] = {}
        for s in snap.stages:
            key = (s.group, s.number)
            ended = s.status in ("complete", "cancelled") and s.started is not None and s.finished is not None
            before = t.seen.get(key, ended if not t.primed else False)
            if ended and not before:
                assert s.started is not None and s.finished is not None
                seconds = max(0, s.finished - s.started) / 1000
                buckets = t.durations.setdefault(s.queue, [0] * (len(DURATION_BUCKETS) + 1))
                buckets[bisect.bisect_left(DURATION_BUCKETS, seconds)] += 1
                t.duration_sum[s.queue] = t.duration_sum.get(s.queue, 0.0) + seconds
            seen[key] = ended or before
        t.seen = seen
        t.primed = True

    # -- rendering -----------------------------------------------------------------------

    def families(self, snap: Snapshot) -> Iterator[Metric]:
        """The metric families of ``snap`` and the counters kept so far."""
        yield from _gauges(snap, self.stage_series)
        yield from _counters(self._totals, snap)

    async def render(self) -> bytes:
        """Read Redis and return the Prometheus text exposition (``CONTENT_TYPE_LATEST``)."""
        snap = await self.read()
        registry = CollectorRegistry(auto_describe=False)
        registry.register(_Fixed(list(self.families(snap))))
        return generate_latest(registry)


def _spec_queue(reply: Any) -> str:
    if isinstance(reply, Exception) or not reply or len(reply) < 2:
        return ""
    try:
        return decode_spec(reply[1])[1]
    except (ValueError, UnicodeDecodeError):
        return ""


def _gauges(snap: Snapshot, limit: int) -> Iterator[Metric]:
    now = snap.now_ms
    groups = GaugeMetricFamily("astages_groups", "Groups in Redis by status.", labels=["status"])
    by_status = Counter(snap.groups.values())
    for status in sorted({*GROUP_STATUSES, *by_status}):
        groups.add_metric([status], by_status[status])
    yield groups

    jobs = GaugeMetricFamily(
        "astages_jobs", "Jobs of the groups in Redis by queue and status (stage counters).", labels=["queue", "status"]
    )
    totals: Counter[tuple[str, str]] = Counter()
    for s in snap.stages:
        for status, n in s.counts.items():
            totals[(s.queue, status)] += n
    for queue in sorted({s.queue for s in snap.stages}):
        for status in JOB_STATUSES:
            jobs.add_metric([queue, status], totals[(queue, status)])
    yield jobs

    labels = ["group", "stage", "name", "queue"]
    stage_jobs = GaugeMetricFamily(
        "astages_stage_jobs", "Jobs of a stage of a pending or running group by status.", labels=[*labels, "status"]
    )
    running = GaugeMetricFamily(
        "astages_stage_running_seconds", "How long a running stage of a running group has run.", labels=labels
    )
    live = sorted((s for s in snap.stages if s.group_status in LIVE_GROUP), key=lambda s: (s.group_created, s.number))
    for s in live[:limit]:
        values = [s.group, str(s.number), s.name, s.queue]
        for status in JOB_STATUSES:
            stage_jobs.add_metric([*values, status], s.counts[status])
        if s.status == "running" and s.started is not None:
            running.add_metric(values, max(0, now - s.started) / 1000)
    yield stage_jobs
    yield running
    yield GaugeMetricFamily(
        "astages_stage_series_dropped",
        "Stages of pending or running groups left out of the astages_stage_* series (past the limit).",
        value=max(0, len(live) - limit),
    )
    ages = [now - s.started for s in snap.stages if s.status == "running" and s.started is not None]
    yield GaugeMetricFamily(
        "astages_oldest_running_stage_seconds",
        "How long the longest running stage of any group has run (0 when none runs).",
        value=max(0, *ages) / 1000 if ages else 0,
    )

    length = GaugeMetricFamily("astages_arq_queue_jobs", "Jobs in an arq queue (running ones too).", labels=["queue"])
    due = GaugeMetricFamily("astages_arq_queue_due_jobs", "Jobs in an arq queue due now.", labels=["queue"])
    oldest = GaugeMetricFamily(
        "astages_arq_queue_oldest_due_seconds",
        "How long the earliest job of an arq queue has been due (0 when none is due).",
        labels=["queue"],
    )
    wait = GaugeHistogramMetricFamily(
        "astages_arq_queue_wait_seconds",
        "Time in queue (since due) of the due jobs of an arq queue now (running ones too; _gsum is estimated).",
        labels=["queue"],
    )
    alive = GaugeMetricFamily(
        "astages_arq_worker_alive",
        "1 when a worker of the queue wrote its health check within its interval (arq's health-check key).",
        labels=["queue"],
    )
    for name, q in sorted(snap.queues.items()):
        length.add_metric([name], q.jobs)
        due.add_metric([name], q.due)
        age = max(0.0, now - q.oldest_score) / 1000 if q.oldest_score is not None and q.due else 0.0
        oldest.add_metric([name], age)
        buckets = [(_le(le), float(n)) for le, n in zip(WAIT_BUCKETS, q.waited, strict=True)]
        wait.add_metric([name], [*buckets, ("+Inf", float(q.due))], gsum_value=_wait_sum(q.waited, q.due, age))
        alive.add_metric([name], 1 if q.worker_alive else 0)
    yield from (length, due, oldest, wait, alive)

    yield GaugeMetricFamily("astages_scrape_groups", "Groups read by the last scrape.", value=len(snap.groups))
    yield GaugeMetricFamily(
        "astages_scrape_seconds", "How long the last scrape's Redis reads took.", value=snap.seconds
    )


def _wait_sum(waited: Sequence[int], due: int, oldest: float) -> float:
    """The sum of the due jobs' waits, estimated from the buckets (each job at the middle
    of its bucket; those past the last bound halfway to the oldest job's wait): the exact
    sum would read every job's score."""
    total, below, low = 0.0, 0, 0.0
    for high, n in zip((*WAIT_BUCKETS, max(oldest, WAIT_BUCKETS[-1])), (*waited, due), strict=True):
        total += max(0, n - below) * (low + high) / 2
        below, low = max(below, n), high
    return total


def _le(value: float) -> str:
    return repr(float(value))


def _counters(t: _Totals, snap: Snapshot) -> Iterator[Metric]:
    finished = CounterMetricFamily(
        "astages_jobs_finished",
        "Staged jobs that ended, by final status (<prefix>:totals + live groups).",
        labels=["status"],
    )
    for status in FINAL_JOB:
        finished.add_metric([status], t.counted(status))
    yield finished
    yield CounterMetricFamily(
        "astages_job_retries",
        "Retries of staged jobs (<prefix>:totals + live groups).",
        value=t.counted("retried"),
    )
    durations = HistogramMetricFamily(
        "astages_stage_duration_seconds", "Stage durations, started to finished (by queue).", labels=["queue"]
    )
    for queue, counts in sorted(t.durations.items()):
        cumulative, running = [], 0
        for le, n in zip([*(_le(b) for b in DURATION_BUCKETS), "+Inf"], counts, strict=True):
            running += n
            cumulative.append((le, float(running)))
        durations.add_metric([queue], cumulative, sum_value=t.duration_sum[queue])
    yield durations
    for who in ("sweeper", "cleaner"):
        family = CounterMetricFamily(
            f"astages_{who}_actions", f"What the {who} did (from <prefix>:stats).", labels=["action"]
        )
        for key, n in sorted(snap.stats.items()):
            if key.startswith(who + ":"):
                family.add_metric([key[len(who) + 1 :]], n)
        yield family


class _Fixed(Collector):
    """A collector of metric families already read (one per scrape's registry)."""

    def __init__(self, families: list[Metric]) -> None:
        self._families = families

    def collect(self) -> Iterable[Metric]:
        return self._families


class AstagesCollector(Collector):
    """A prometheus_client collector whose ``collect()`` reads Redis (``redis_url``) on each
    scrape, for a synchronous registry (``REGISTRY.register(AstagesCollector(url))``,
    ``start_http_server``): its async reads run on an event loop in a thread of its own.
    ``close()`` stops that loop and closes the connection."""

    def __init__(
        self,
        redis_url: str,
        *,
        prefix: str = DEFAULT_PREFIX,
        queues: Iterable[str] = (default_queue_name,),
        stage_series: int = DEFAULT_STAGE_SERIES,
        timeout: float = 10.0,
    ) -> None:
        self.timeout = timeout
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="astages-metrics", daemon=True)
        self._thread.start()
        self._metrics: Metrics = self._call(self._open(redis_url, prefix, tuple(queues), stage_series))

    async def _open(self, url: str, prefix: str, queues: tuple[str, ...], stage_series: int) -> Metrics:
        from astages._connection import connect

        return Metrics(await connect(url), prefix=prefix, queues=queues, stage_series=stage_series)

    def _call(self, coroutine: Any) -> Any:
        future: Future[Any] = asyncio.run_coroutine_threadsafe(coroutine, self._loop)
        return future.result(self.timeout)

    def describe(self) -> Iterable[Metric]:
        return []  # registering reads nothing from Redis (prometheus_client calls describe, not collect)

    def collect(self) -> Iterable[Metric]:
        snap = self._call(self._metrics.read())
        return list(self._metrics.families(snap))

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._call(self._metrics.redis.aclose())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
        self._loop.close()
