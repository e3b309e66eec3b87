"""Operations readers: arq's queues, arq's workers, and the jobs astages finished over time.

Shared by the dashboard's operations view (``astages.web.opspage``) and meant for
``astages.metrics`` too, so each is read one way only:

- ``read_queues(redis, names)``: per arq queue (a sorted set scored by the time a job is
  due, in epoch ms) its length, the jobs due now and those deferred (ZCOUNT against Redis'
  clock), and its earliest score; one pipelined round trip, three commands per queue.
- ``read_workers(redis, queues)``: arq's health-check key of each queue
  (``<queue>:health-check``, a string a live worker of that queue rewrites every
  ``health_check_interval`` seconds with a TTL of the interval plus a second; every worker
  of one queue writes the same key, so it says that *a* worker of the queue is alive, and
  what the last one to report counted).
- ``stage_queues(redis, keys)``: the queues the running stages of the newest live groups
  send to (one job spec per running stage; bounded by ``QUEUE_LOOKUP_GROUPS``).
- ``cumulative(redis, keys)``: jobs finished so far under a prefix: ``<prefix>:totals``
  (what every ended or deleted group counted, added once per group by the Lua scripts,
  see lua/_lib.lua) plus the stage counters of the live groups, read in one MULTI so a
  group that ends meanwhile is counted once. O(groups + stages), never O(jobs).
- ``sample(redis, keys)``: appends ``cumulative`` to the capped stream ``<prefix>:series``
  (the sweeper calls it once per pass); ``read_series`` and ``rates`` turn consecutive
  samples into jobs per second.
"""

from __future__ import annotations

import datetime as dt
import itertools
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from arq.constants import default_queue_name, health_check_key_suffix

from astages._keys import Keys
from astages._scripts import text
from astages.models import decode_spec

__all__ = [
    "QUEUE_LOOKUP_GROUPS",
    "SERIES_CAP",
    "SERIES_FIELDS",
    "TOTAL_FIELDS",
    "QueueStats",
    "Rate",
    "Sample",
    "WorkerHealth",
    "cumulative",
    "default_queue",
    "rates",
    "read_queues",
    "read_series",
    "read_totals",
    "read_workers",
    "redis_now_ms",
    "sample",
    "stage_queues",
]

# Samples kept in <prefix>:series (MAXLEN ~): a day at the sweeper's default 30 s interval.
SERIES_CAP = 2880
TOTAL_FIELDS = ("successful", "failed", "cancelled", "retried")
SERIES_FIELDS = ("successful", "failed", "cancelled")
# stage_queues looks at the running stages of this many newest groups at most.
QUEUE_LOOKUP_GROUPS = 200

_HEALTH = re.compile(r"^(?P<at>[A-Z][a-z]{2}-\d{2} \d{2}:\d{2}:\d{2}) (?P<rest>.*)$")
_FIELD = re.compile(r"(\w+)=(-?\d+)")


def as_int(raw: Any) -> int:
    """A counter as read from Redis (missing or not a number: 0)."""
    try:
        return int(raw)
    except (TypeError, ValueError):
        return 0


def default_queue(redis: Any) -> str:
    """The queue an ArqRedis enqueues to by default (arq's ``arq:queue`` unless set)."""
    return str(getattr(redis, "default_queue_name", None) or default_queue_name)


async def redis_now_ms(redis: Any) -> int:
    """Redis' clock in epoch ms (every reader here measures against it, not ours)."""
    secs, micros = await redis.time()
    return int(secs) * 1000 + int(micros) // 1000


# -- arq's queues ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class QueueStats:
    """An arq queue at ``now_ms``: ``jobs`` in it (running ones too: arq removes a job
    when it ends), ``due`` (score not after now) and ``deferred`` (later), and the score
    of its earliest job."""

    name: str
    jobs: int
    due: int
    deferred: int
    earliest_ms: int | None
    now_ms: int

    @property
    def oldest_age(self) -> float | None:
        """Seconds the earliest due job has been due (None when none is due)."""
        if self.earliest_ms is None or self.earliest_ms > self.now_ms:
            return None
        return (self.now_ms - self.earliest_ms) / 1000

    @property
    def next_due_in(self) -> float | None:
        """Seconds until the earliest job is due, when every job is deferred."""
        if self.earliest_ms is None or self.earliest_ms <= self.now_ms:
            return None
        return (self.earliest_ms - self.now_ms) / 1000

    def as_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "jobs": self.jobs,
            "due": self.due,
            "deferred": self.deferred,
            "oldest_age_seconds": self.oldest_age,
            "next_due_in_seconds": self.next_due_in,
        }


async def read_queues(redis: Any, names: Iterable[str], now_ms: int | None = None) -> list[QueueStats]:
    """The queues ``names`` (sorted, each once) in one round trip; a key that is not a
    sorted set is left out (not an arq queue), a missing one is an empty queue."""
    wanted = sorted(set(names))
    if now_ms is None:
        now_ms = await redis_now_ms(redis)
    if not wanted:
        return []
    async with redis.pipeline(transaction=False) as pipe:
        for q in wanted:
            pipe.zcard(q)
            pipe.zcount(q, "-inf", now_ms)
            pipe.zrange(q, 0, 0, withscores=True)
        replies = await pipe.execute(raise_on_error=False)
    out = []
    for i, q in enumerate(wanted):
        jobs, due, first = replies[3 * i : 3 * i + 3]
        if any(isinstance(r, Exception) for r in (jobs, due, first)):
            continue
        out.append(
            QueueStats(
                name=q,
                jobs=as_int(jobs),
                due=as_int(due),
                deferred=as_int(jobs) - as_int(due),
                earliest_ms=int(float(first[0][1])) if first else None,
                now_ms=now_ms,
            )
        )
    return out


# -- arq's workers -----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class WorkerHealth:
    """A queue's health-check key as arq's worker last wrote it: ``report`` is the text
    (``"Dec-02 05:12:33 j_complete=3 j_failed=0 j_retried=0 j_ongoing=1 queued=2"``),
    ``counts`` its numbers, ``reported`` its time as the worker's clock wrote it (local,
    no year), ``age`` the seconds since then read in this process's time zone (None when
    the text has no time), ``expires_in`` the key's TTL left (the worker is taken as gone
    once it runs out)."""

    queue: str
    key: str
    report: str
    counts: dict[str, int]
    reported: str
    age: float | None
    expires_in: float | None

    def as_json(self) -> dict[str, Any]:
        return {
            "queue": self.queue,
            "key": self.key,
            "report": self.report,
            "counts": self.counts,
            "reported": self.reported,
            "age_seconds": self.age,
            "expires_in_seconds": self.expires_in,
        }


def parse_health(report: str, now: dt.datetime | None = None) -> tuple[str, dict[str, int], float | None]:
    """(time as written, the ``name=number`` counts, age in seconds) of an arq health report.
    arq writes the worker's local time as ``%b-%d %H:%M:%S``: it is read as this process's
    local time in the most recent year that does not put it in the future by more than a day."""
    counts = {name: int(value) for name, value in _FIELD.findall(report)}
    m = _HEALTH.match(report)
    if m is None:
        return "", counts, None
    now = now or dt.datetime.now()
    try:
        at = dt.datetime.strptime(f"{now.year}-{m['at']}", "%Y-%b-%d %H:%M:%S")
    except ValueError:
        return m["at"], counts, None
    if at - now > dt.timedelta(days=1):
        try:
            at = at.replace(year=now.year - 1)
        except ValueError:  # Feb 29
            return m["at"], counts, None
    return m["at"], counts, max(0.0, (now - at).total_seconds())


async def read_workers(
    redis: Any, queues: Iterable[str], now: dt.datetime | None = None, health_keys: Sequence[str] = ()
) -> list[WorkerHealth]:
    """The health-check keys of ``queues`` (``<queue>:health-check``) and any other
    ``health_keys`` (a worker's ``health_check_key`` when set; named ``<queue>:...``)
    that exist, in one round trip."""
    pairs = [(q, q + health_check_key_suffix) for q in sorted(set(queues))]
    pairs += [(k.removesuffix(health_check_key_suffix), k) for k in health_keys if k not in {p[1] for p in pairs}]
    if not pairs:
        return []
    async with redis.pipeline(transaction=False) as pipe:
        for _, key in pairs:
            pipe.get(key)
            pipe.pttl(key)
        replies = await pipe.execute(raise_on_error=False)
    out = []
    for i, (queue, key) in enumerate(pairs):
        raw, ttl = replies[2 * i], replies[2 * i + 1]
        if raw is None or isinstance(raw, Exception):
            continue
        report = text(raw)
        reported, counts, age = parse_health(report, now)
        left = as_int(ttl) if not isinstance(ttl, Exception) else -1
        out.append(WorkerHealth(queue, key, report, counts, reported, age, left / 1000 if left >= 0 else None))
    return out


async def stage_queues(redis: Any, keys: Keys, limit: int = QUEUE_LOOKUP_GROUPS) -> set[str]:
    """The arq queues the running stages of the ``limit`` newest live groups send to: one
    job spec of each running stage (any one job's queue; a stage can mix queues, its
    others are missed). Three pipelined round trips."""
    ids = [text(i) for i in await redis.zrevrange(keys.index, 0, limit - 1)]
    if not ids:
        return set()
    async with redis.pipeline(transaction=False) as pipe:
        for gid in ids:
            pipe.hget(keys.group(gid), "status")
            pipe.zrange(keys.stages(gid), 0, -1)
        replies = await pipe.execute(raise_on_error=False)
    stages: list[tuple[str, int]] = []
    for i, gid in enumerate(ids):
        status, numbers = replies[2 * i], replies[2 * i + 1]
        if status == b"running" and not isinstance(numbers, Exception):
            stages += [(gid, as_int(n)) for n in numbers]
    if not stages:
        return set()
    async with redis.pipeline(transaction=False) as pipe:
        for gid, n in stages:
            pipe.hget(keys.stage(gid, n), "status")
        statuses = await pipe.execute(raise_on_error=False)
    running = [s for s, st in zip(stages, statuses, strict=True) if st == b"running"]
    if not running:
        return set()
    async with redis.pipeline(transaction=False) as pipe:
        for gid, n in running:
            pipe.hrandfield(keys.stage_part(gid, n, "spec"), 1, withvalues=True)
        specs = await pipe.execute(raise_on_error=False)
    found: set[str] = set()
    for spec in specs:
        if not isinstance(spec, list) or len(spec) < 2:
            continue
        try:
            found.add(decode_spec(spec[1])[1])
        except (ValueError, IndexError, UnicodeDecodeError):
            continue
    return found


# -- jobs finished over time -------------------------------------------------------------


async def read_totals(redis: Any, keys: Keys) -> dict[str, int]:
    """``<prefix>:totals``: the jobs of every group that ended or was deleted (O(1))."""
    raw = await redis.hgetall(keys.totals)
    got = {text(k): as_int(v) for k, v in raw.items()}
    return {name: got.get(name, 0) for name in TOTAL_FIELDS}


async def cumulative(redis: Any, keys: Keys) -> dict[str, int]:
    """Jobs finished so far (``TOTAL_FIELDS``): the totals of the groups gone plus the
    stage counters of the live ones (a kept, ended group is in the totals already and
    skipped). O(groups + stages) in two round trips, the second one MULTI: a group that
    ends between them is in the totals or in its counters, never both."""
    ids = [text(i) for i in await redis.zrange(keys.index, 0, -1)]
    async with redis.pipeline(transaction=False) as pipe:
        for gid in ids:
            pipe.zrange(keys.stages(gid), 0, -1)
        numbers = await pipe.execute(raise_on_error=False)
    stages = [
        (gid, [as_int(n) for n in ns]) for gid, ns in zip(ids, numbers, strict=True) if not isinstance(ns, Exception)
    ]
    async with redis.pipeline(transaction=True) as pipe:
        pipe.hgetall(keys.totals)
        for gid, ns in stages:
            pipe.hget(keys.group(gid), "status")
            for n in ns:
                pipe.hmget(keys.stage(gid, n), list(TOTAL_FIELDS))
        replies = iter(await pipe.execute(raise_on_error=False))
    raw_totals = next(replies)
    out = dict.fromkeys(TOTAL_FIELDS, 0)
    if isinstance(raw_totals, dict):
        for k, v in raw_totals.items():
            if text(k) in out:
                out[text(k)] += as_int(v)
    for _, ns in stages:
        status = next(replies)
        rows = [next(replies) for _ in ns]
        if status not in (b"pending", b"running"):
            continue  # ended (counted in the totals as it ended) or gone meanwhile
        for row in rows:
            if isinstance(row, Exception):
                continue
            for name, value in zip(TOTAL_FIELDS, row, strict=True):
                out[name] += as_int(value)
    return out


@dataclass(frozen=True, slots=True)
class Sample:
    """Cumulative job counts at ``at_ms`` (Redis' clock: the stream entry's id)."""

    at_ms: int
    successful: int
    failed: int
    cancelled: int


@dataclass(frozen=True, slots=True)
class Rate:
    """Jobs per second between two consecutive samples (a counter that went back, a
    stage or job deleted, counts as no jobs)."""

    start_ms: int
    end_ms: int
    successful: float
    failed: float


async def sample(redis: Any, keys: Keys, cap: int = SERIES_CAP) -> dict[str, int]:
    """Append the cumulative counts to ``<prefix>:series`` (capped near ``cap``); returns them."""
    counts = await cumulative(redis, keys)
    await redis.xadd(keys.series, {name: counts[name] for name in SERIES_FIELDS}, maxlen=cap, approximate=True)
    return counts


async def read_series(redis: Any, keys: Keys, count: int = SERIES_CAP, since_ms: int | None = None) -> list[Sample]:
    """The newest ``count`` samples (those taken at ``since_ms`` or later when given), oldest first."""
    low = "-" if since_ms is None else str(max(0, since_ms))
    raw = await redis.xrevrange(keys.series, max="+", min=low, count=count)
    out = []
    for entry_id, fields in reversed(raw):
        values = {text(k): as_int(v) for k, v in fields.items()}
        out.append(
            Sample(
                at_ms=as_int(text(entry_id).split("-")[0]),
                successful=values.get("successful", 0),
                failed=values.get("failed", 0),
                cancelled=values.get("cancelled", 0),
            )
        )
    return out


def rates(samples: Sequence[Sample]) -> list[Rate]:
    """Jobs per second between each two consecutive samples."""
    out = []
    for before, after in itertools.pairwise(samples):
        span = (after.at_ms - before.at_ms) / 1000
        if span <= 0:
            continue
        out.append(
            Rate(
                start_ms=before.at_ms,
                end_ms=after.at_ms,
                successful=max(0, after.successful - before.successful) / span,
                failed=max(0, after.failed - before.failed) / span,
            )
        )
    return out
