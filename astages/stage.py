"""StagedGroupStage: a numbered stage of a group, holding jobs."""

from __future__ import annotations

import datetime as dt
import secrets
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any

from arq.jobs import serialize_job
from arq.worker import Function

from astages._keys import JobRef
from astages._scripts import Motion, Store, raise_code, text
from astages.exceptions import InvalidJobFunction, InvalidQueue, InvalidSchedule, StageNotFound
from astages.job import StagedJob
from astages.models import (
    FailurePolicy,
    Schedule,
    StageInfo,
    StageProgress,
    StageStatus,
    decode_code,
    encode_spec,
    ms_to_datetime,
    now_ms,
)

if TYPE_CHECKING:
    from astages.group import StagedGroup

__all__ = ["JobCall", "StagedGroupStage", "function_name", "make_spec"]

# How many jobs one script call records (Lua's unpack() takes about 8,000 values).
RECORD_BATCH = 2_000

# arq's own enqueue options a staged job accepts (``_job_id`` is astages' to choose).
_ARQ_OPTIONS = frozenset({"_queue_name", "_defer_until", "_defer_by", "_expires", "_job_try"})

JobFunction = str | Function | Callable[..., Any]
# One job for enqueue_many: (function, args) or (function, args, kwargs).
JobCall = tuple[JobFunction, Sequence[Any]] | tuple[JobFunction, Sequence[Any], dict[str, Any]]


def function_name(function: object) -> str:
    """The name arq knows a job function by (arq uses ``__qualname__``)."""
    if isinstance(function, str) and function:
        return function
    if isinstance(function, Function):
        return function.name
    import inspect

    if inspect.iscoroutinefunction(function):
        return str(function.__qualname__)
    raise InvalidJobFunction(function)


def _seconds_ms(value: dt.timedelta | float | int) -> int:
    if isinstance(value, dt.timedelta):
        return int(value.total_seconds() * 1000)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidSchedule(value, "a delay is a timedelta or a number of seconds")
    return int(value * 1000)


def _at_ms(value: dt.datetime | float | int) -> int:
    if isinstance(value, dt.datetime):
        if value.tzinfo is None:
            value = value.astimezone()
        return int(value.timestamp() * 1000)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidSchedule(value, "a time is a datetime or epoch seconds")
    return int(value * 1000)


def make_spec(
    store: Store, function: JobFunction, args: Sequence[Any], kwargs: dict[str, Any], schedule: Schedule
) -> tuple[bytes, StagedJob]:
    """The stored spec of a new job (or callback) and its handle (bound once its seq is
    known). Pops arq's own options out of ``kwargs``."""
    redis = store.redis
    options = {k: kwargs.pop(k) for k in list(kwargs) if k in _ARQ_OPTIONS}
    if "_job_id" in kwargs:
        raise InvalidJobFunction("_job_id= (astages chooses the ids of staged jobs)")
    queue = options.get("_queue_name") or getattr(redis, "default_queue_name", "arq:queue")
    if not isinstance(queue, str):
        raise InvalidQueue(queue)
    if "_defer_until" in options:
        schedule = Schedule("a", _at_ms(options["_defer_until"]), schedule.expires_ms)
    elif "_defer_by" in options:
        schedule = Schedule("i", _seconds_ms(options["_defer_by"]), schedule.expires_ms)
    if options.get("_expires") is not None:
        schedule = Schedule(schedule.kind, schedule.ms, _seconds_ms(options["_expires"]))
    name = function_name(function)
    queued_at = now_ms()
    serializer = getattr(redis, "job_serializer", None)
    payload = serialize_job(name, tuple(args), kwargs, options.get("_job_try"), queued_at, serializer=serializer)
    job = StagedJob(store, None, name, tuple(args), kwargs, queue, ms_to_datetime(queued_at), schedule)
    return encode_spec(schedule, queue, payload), job


class StagedGroupStage:
    """A stage of a group. Its jobs all finish (retries included) before the group's next
    stage starts. Get one with ``await group.stage(number)``."""

    __slots__ = ("group", "number")

    def __init__(self, group: StagedGroup, number: int) -> None:
        self.group = group
        self.number = number

    def __repr__(self) -> str:
        return f"<StagedGroupStage {self.number} of {self.group.id}>"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, StagedGroupStage) and (other.group.id, other.number) == (self.group.id, self.number)

    def __hash__(self) -> int:
        return hash((self.group.id, self.number))

    @property
    def _store(self) -> Store:
        return self.group.store

    def _key(self, part: str | None = None) -> str:
        keys = self._store.keys
        if part is None:
            return keys.stage(self.group.id, self.number)
        return keys.stage_part(self.group.id, self.number, part)

    @property
    def staged_group(self) -> StagedGroup:
        """The seed's name for ``group``."""
        return self.group

    # -- reading --------------------------------------------------------------------

    async def exists(self) -> bool:
        await self._store.flush()
        return bool(await self._store.redis.exists(self._key()))

    async def status(self) -> StageStatus:
        await self._store.flush()
        raw = await self._store.redis.hget(self._key(), "status")
        if raw is None:
            raise StageNotFound(self.group.id, self.number)
        return StageStatus(text(raw))

    async def num_jobs(self) -> int:
        await self._store.flush()
        return int(await self._store.redis.llen(self._key("jobs")))

    async def progress(self) -> StageProgress:
        """Counts per job status, from the stage's counters (O(1), no job is read)."""
        await self._store.flush()
        raw = await self._store.redis.hgetall(self._key())
        if not raw:
            raise StageNotFound(self.group.id, self.number)
        return StageProgress.of(raw)

    async def info(self) -> StageInfo:
        """Status, created/started/finished times and counts per status, in one read."""
        await self._store.flush()
        raw = await self._store.redis.hgetall(self._key())
        if not raw:
            raise StageNotFound(self.group.id, self.number)
        return StageInfo.of(self.number, raw)

    async def jobs(self, offset: int = 0, limit: int | None = None) -> list[StagedJob]:
        """The stage's jobs in the order they were enqueued (a page of them when
        ``offset``/``limit`` are given)."""
        await self._store.flush()
        store = self._store
        stop = -1 if limit is None else offset + limit - 1
        seqs = await store.redis.lrange(self._key("jobs"), offset, stop)
        if not seqs:
            return []
        specs = await store.redis.hmget(self._key("spec"), seqs)
        return [
            StagedJob.from_spec(store, JobRef(self.group.id, self.number, int(seq)), spec)
            for seq, spec in zip(seqs, specs, strict=True)
        ]

    async def job_statuses(self, jobs: Sequence[StagedJob]) -> list[tuple[str, int, str]]:
        """(status, tries, message) for each of ``jobs`` (jobs of this stage), in one round trip."""
        await self._store.flush()
        seqs = [str(job.ref.seq) for job in jobs if job.ref is not None]
        if not seqs:
            return []
        async with self._store.redis.pipeline(transaction=False) as pipe:
            pipe.hmget(self._key("open"), seqs)
            pipe.hmget(self._key("done"), seqs)
            pipe.hmget(self._key("msg"), seqs)
            opens, dones, msgs = await pipe.execute()
        out = []
        for open_code, done_code, msg in zip(opens, dones, msgs, strict=True):
            code = open_code or done_code
            status, tries = decode_code(code) if code else (None, 0)
            out.append((status.value if status else "deleted", tries, "" if msg is None else text(msg)))
        return out

    # -- enqueueing -----------------------------------------------------------------

    def _spec(
        self, function: JobFunction, args: Sequence[Any], kwargs: dict[str, Any], schedule: Schedule
    ) -> tuple[bytes, StagedJob]:
        return make_spec(self._store, function, args, kwargs, schedule)

    async def _record(self, batch: list[tuple[bytes, StagedJob]]) -> list[StagedJob]:
        token = secrets.token_hex(8)  # makes a repeated call (lost reply, retried) harmless
        reply = await self._store.run("enqueue", self.group.id, self.number, token, "", *(spec for spec, _ in batch))
        raise_code(reply, self.group.id, self.number)
        first = int(reply[0])
        for i, (_, job) in enumerate(batch):
            job.ref = JobRef(self.group.id, self.number, first + i)
        return [job for _, job in batch]

    async def _enqueue(
        self, schedule: Schedule, function: JobFunction, args: Sequence[Any], kwargs: dict[str, Any]
    ) -> StagedJob:
        spec, job = self._spec(function, args, kwargs, schedule)
        buffer = self._store.buffer
        if buffer is not None and buffer.group_id == self.group.id:  # inside within_a_grouping
            seq = await buffer.seq(self._store, self.number)
            job.ref = JobRef(self.group.id, self.number, seq)
            await buffer.add(self._store, self.number, seq, spec)
            return job
        (job,) = await self._record([(spec, job)])
        return job

    async def enqueue(self, function: JobFunction, *args: Any, **kwargs: Any) -> StagedJob:
        """Add a job. A pending stage records it (it is sent when the stage starts); a
        running stage sends it to arq at once. ``kwargs`` go to the function, except
        arq's own ``_queue_name``, ``_defer_until``, ``_defer_by``, ``_expires``, ``_job_try``."""
        return await self._enqueue(Schedule(), function, args, kwargs)

    async def enqueue_to(self, queue: str, function: JobFunction, *args: Any, **kwargs: Any) -> StagedJob:
        """Add a job for arq queue ``queue``."""
        return await self._enqueue(Schedule(), function, args, {**kwargs, "_queue_name": queue})

    async def enqueue_at(
        self, when: dt.datetime | float, function: JobFunction, *args: Any, **kwargs: Any
    ) -> StagedJob:
        """Add a job that runs at ``when`` (a datetime or epoch seconds), or when its
        stage starts if that is later."""
        return await self._enqueue(Schedule("a", _at_ms(when)), function, args, kwargs)

    async def enqueue_at_with_queue(
        self, queue: str, when: dt.datetime | float, function: JobFunction, *args: Any, **kwargs: Any
    ) -> StagedJob:
        return await self._enqueue(Schedule("a", _at_ms(when)), function, args, {**kwargs, "_queue_name": queue})

    async def enqueue_in(
        self, delay: dt.timedelta | float, function: JobFunction, *args: Any, **kwargs: Any
    ) -> StagedJob:
        """Add a job that runs ``delay`` (a timedelta or seconds) after it is sent to arq."""
        return await self._enqueue(Schedule("i", _seconds_ms(delay)), function, args, kwargs)

    async def enqueue_in_with_queue(
        self, queue: str, delay: dt.timedelta | float, function: JobFunction, *args: Any, **kwargs: Any
    ) -> StagedJob:
        return await self._enqueue(Schedule("i", _seconds_ms(delay)), function, args, {**kwargs, "_queue_name": queue})

    async def enqueue_many(self, calls: Iterable[JobCall]) -> list[StagedJob]:
        """Add many jobs in few round trips: each call is ``(function, args)`` or
        ``(function, args, kwargs)``. Same rules as ``enqueue``."""
        jobs: list[StagedJob] = []
        batch: list[tuple[bytes, StagedJob]] = []
        for call in calls:
            function, args = call[0], call[1]
            kwargs = dict(call[2]) if len(call) > 2 else {}
            batch.append(self._spec(function, args, kwargs, Schedule()))
            if len(batch) >= RECORD_BATCH:
                jobs.extend(await self._record(batch))
                batch = []
        if batch:
            jobs.extend(await self._record(batch))
        return jobs

    # -- actions --------------------------------------------------------------------

    async def initiate(self) -> Motion:
        """Start the stage: send its pending jobs to arq. An empty stage completes at once
        and the group moves on."""
        return await self._store.move("initiate_stage", self.group.id, self.number)

    async def cancel(self) -> Motion:
        """Cancel the stage: its jobs not yet final become ``cancelled`` (jobs not started
        leave arq's queue; running ones are aborted when the worker allows aborts), its
        callbacks fire, and a running group moves on to its next stage."""
        return await self._store.move("cancel_stage", self.group.id, self.number)

    async def on_complete(self, function: JobFunction, *args: Any, **kwargs: Any) -> None:
        """Enqueue ``function(ctx, summary, *args, **kwargs)`` once, when this stage
        completes or is cancelled (``summary.stage`` is its number)."""
        spec, _ = make_spec(self._store, function, args, dict(kwargs), Schedule())
        reply = await self._store.run("add_callback", self.group.id, f"stage.{self.number}", spec)
        raise_code(reply, self.group.id, self.number)

    async def set_failure_policy(self, policy: FailurePolicy | str | None) -> None:
        """This stage's own failure policy (None: follow the group's)."""
        args: tuple[Any, ...] = ("", "") if policy is None else FailurePolicy.of(policy).script_args()
        reply = await self._store.run("configure", self.group.id, self.number, *args)
        raise_code(reply, self.group.id, self.number)

    async def delete(self) -> Motion:
        """Delete the stage and its jobs (jobs not yet started leave arq's queue). A
        running group moves on to its next stage."""
        motion = await self._store.move("delete_stage", self.group.id, self.number)
        if motion.outcome == "gone":
            raise StageNotFound(self.group.id, self.number)
        return motion
