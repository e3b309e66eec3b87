"""StagedGroupStage: a numbered stage of a group, holding jobs."""

from __future__ import annotations

import datetime as dt
import math
import secrets
from collections.abc import Awaitable, Callable, Coroutine, Generator, Iterable, Sequence
from types import EllipsisType
from typing import TYPE_CHECKING, Any, TypeVar

from arq.jobs import serialize_job
from arq.worker import Function

from astages._flow import FlowLimits, Rate, cap_arg, rate_args
from astages._keys import JobRef
from astages._scripts import Motion, Store, raise_code, text
from astages.exceptions import (
    GroupNotFound,
    InvalidJobFunction,
    InvalidJobOption,
    InvalidQueue,
    InvalidSchedule,
    InvalidStageName,
    NotRetryable,
    StageComplete,
    StageNotFound,
)
from astages.job import RESULT_SETTLE, JobResult, StagedJob, read_results, retry_refusal
from astages.models import (
    MAX_DELAY_MS,
    MAX_TIME_MS,
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

__all__ = ["NAME_LIMIT", "JobCall", "StagedGroupStage", "check_name", "function_name", "make_spec", "refuse_job_id"]

T = TypeVar("T")

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


# The values a schedule takes (bounds in astages/models.py; lua/_lib.lua checks the same):
_DELAY = "a delay is a timedelta or a number of seconds, at most 100 years (a negative one means now)"
_EXPIRY = "an expiry (_expires) is a timedelta or a number of seconds, from 0 (arq's default) to 100 years"
_TIME = "a time is a datetime or epoch seconds, between 1970 and the year 3000"
# A job's try number (_job_try) arq starts counting from, at most.
MAX_JOB_TRY = 1_000_000


def _seconds(value: object, expected: str) -> float:
    """``value`` (a timedelta or a number of seconds) in seconds: finite, else InvalidSchedule."""
    if isinstance(value, dt.timedelta):
        return value.total_seconds()
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidSchedule(value, expected)
    if not math.isfinite(value):
        raise InvalidSchedule(value, expected)
    return float(value)


def _seconds_ms(value: dt.timedelta | float | int) -> int:
    """A delay in ms; a negative delay (a time already past) is 0, as in arq."""
    seconds = _seconds(value, _DELAY)
    if seconds * 1000 > MAX_DELAY_MS:
        raise InvalidSchedule(value, _DELAY)
    return max(0, int(seconds * 1000))


def _expires_ms(value: dt.timedelta | float | int) -> int:
    """An expiry in ms (0: arq's default)."""
    seconds = _seconds(value, _EXPIRY)
    if not 0 <= seconds * 1000 <= MAX_DELAY_MS:
        raise InvalidSchedule(value, _EXPIRY)
    return int(seconds * 1000)


def _at_ms(value: dt.datetime | float | int) -> int:
    if isinstance(value, dt.datetime):
        try:
            seconds = (value if value.tzinfo is not None else value.astimezone()).timestamp()
        except (OverflowError, ValueError, OSError):
            raise InvalidSchedule(value, _TIME) from None
    else:
        seconds = _seconds(value, _TIME)
    if not 0 <= seconds * 1000 <= MAX_TIME_MS:
        raise InvalidSchedule(value, _TIME)
    return int(seconds * 1000)


def _job_try(value: object) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_JOB_TRY:
        raise InvalidSchedule(value, f"_job_try is None or an int from 1 to {MAX_JOB_TRY:,}")
    return value


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
    if options.get("_defer_until") is not None:
        schedule = Schedule("a", _at_ms(options["_defer_until"]), schedule.expires_ms)
    elif options.get("_defer_by") is not None:
        schedule = Schedule("i", _seconds_ms(options["_defer_by"]), schedule.expires_ms)
    if options.get("_expires") is not None:
        schedule = Schedule(schedule.kind, schedule.ms, _expires_ms(options["_expires"]))
    job_try = _job_try(options.get("_job_try"))
    name = function_name(function)
    queued_at = now_ms()
    serializer = getattr(redis, "job_serializer", None)
    payload = serialize_job(name, tuple(args), kwargs, job_try, queued_at, serializer=serializer)
    job = StagedJob(store, None, name, tuple(args), kwargs, queue, ms_to_datetime(queued_at), schedule)
    return encode_spec(schedule, queue, payload), job


# Longest stage name, in characters: a name is a label, not a description.
NAME_LIMIT = 100


def check_name(name: object) -> str | None:
    """A stage name as given (None: no name), or InvalidStageName."""
    if name is None:
        return None
    if not isinstance(name, str) or not name.strip() or len(name) > NAME_LIMIT:
        raise InvalidStageName(name, NAME_LIMIT)
    return name


def refuse_job_id(kwargs: dict[str, Any]) -> None:
    """``_job_id`` is astages' to choose for a staged job: a clear error before anything else."""
    if "_job_id" in kwargs:
        raise InvalidJobOption("_job_id")


class StagedGroupStage(Coroutine[Any, Any, "StagedGroupStage"]):
    """A stage of a group. Its jobs all finish (retries included) before the group's next
    stage starts.

    Which handles create the stage:

    - ``group.stage(n)`` (or ``group.stage(n, name="fetch")``) is used as it is, with no
      await of its own: its writing calls (``enqueue*``, ``on_complete``,
      ``set_failure_policy``, ``initiate``) make stage ``n`` when the group has none by
      that number (in the same script call for ``enqueue*`` and ``on_complete``), and give
      it the name when one is passed. Its reading calls (``exists``, ``status``,
      ``progress``, ``info``, ``jobs``, ``num_jobs``) and ``cancel``/``delete`` never
      create anything: a missing stage raises StageNotFound (``exists()`` is False,
      ``num_jobs()`` 0, ``jobs()`` empty).
    - ``await group.stage(n)`` makes (or names) the stage at once and returns a look-up
      handle on it.
    - A look-up handle (``await group.get_stage(n)``, ``await group.stage(n)``,
      ``group.stages()``, ``job.stage()``, ``StagedGroupStage(group, n)``) never creates:
      once its stage is deleted every call raises StageNotFound.

    A handle is also a coroutine object, so code that needs one where ``group.stage(n)``
    used to be a coroutine (``asyncio.create_task(group.stage(n))``, ``asyncio.run``)
    keeps working: run that way, it does what ``await group.stage(n)`` does, once.
    """

    __slots__ = ("_creates", "_running", "group", "name", "number")

    def __init__(self, group: StagedGroup, number: int, *, name: str | None = None, creates: bool = False) -> None:
        self.group = group
        self.number = number
        self.name = check_name(name)  # the name this handle gives the stage, if any
        self._creates = creates
        self._running: Coroutine[Any, Any, StagedGroupStage] | None = None  # when run as a coroutine object

    def __repr__(self) -> str:
        named = "" if self.name is None else f" {self.name!r}"
        return f"<StagedGroupStage {self.number}{named} of {self.group.id}>"

    def __await__(self) -> Generator[Any, None, StagedGroupStage]:
        """``await group.stage(n)``: the stage made (or named) now, as a look-up handle.
        Awaiting a look-up handle checks that its stage exists (StageNotFound)."""
        return self._resolve().__await__()

    # The coroutine protocol (create_task, asyncio.run): one _resolve() driven step by step.

    def _coroutine(self) -> Coroutine[Any, Any, StagedGroupStage]:
        if self._running is None:
            self._running = self._resolve()
        return self._running

    def send(self, value: Any) -> Any:
        return self._coroutine().send(value)

    def throw(self, typ: Any, val: Any = None, tb: Any = None) -> Any:
        if val is None and tb is None:
            return self._coroutine().throw(typ)
        return self._coroutine().throw(typ, val, tb)  # the old signature

    def close(self) -> None:
        if self._running is not None:
            self._running.close()

    async def _resolve(self) -> StagedGroupStage:
        if self._creates:
            await self._make()
            return StagedGroupStage(self.group, self.number, name=self.name)
        if not await self.exists():
            if not await self.group.exists():
                raise GroupNotFound(self.group.id)
            raise StageNotFound(self.group.id, self.number)
        return self

    async def _make(self) -> None:
        """Make (or name) the stage: one ensure_stage call."""
        reply = await self._store.run("ensure_stage", self.group.id, self.number, self.name or "")
        raise_code(reply, self.group.id, self.number)

    @property
    def _make_arg(self) -> str:
        """What enqueue.lua / add_callback.lua read as "make the stage when missing"."""
        return "+" + (self.name or "") if self._creates else ""

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

    async def results(
        self, offset: int = 0, limit: int | None = None, *, settle: float = RESULT_SETTLE
    ) -> list[JobResult]:
        """What the stage's jobs gave, one JobResult per job in enqueue order (a page of
        them with ``offset``/``limit``): two round trips per page (the page's job seqs,
        then their statuses, errors and arq's kept results ``arq:result:<id>`` in one
        pipeline), whatever the stage's size. ``result.value`` is a successful job's
        return value while arq keeps it (``keep_result``, 3600 s by default, or
        ``keep_result_forever``); otherwise ``result.reason`` says why there is none
        (failed, with ``result.error``; not_final, cancelled, not_kept, being_written,
        unreadable; see JobResult). A job astages records as ended whose result arq is
        still writing (a later stage can start just before arq writes the result of the
        earlier stage's last job) is waited for, up to ``settle`` seconds.

        A stage's results are readable while its group lives (or is kept with
        ``keep_for``): read them from a job of a later stage (fan out, then aggregate),
        or from a stage callback. A missing stage raises StageNotFound."""
        await self._store.flush()
        stop = -1 if limit is None else offset + limit - 1
        if limit is not None and limit <= 0:
            return []
        async with self._store.redis.pipeline(transaction=False) as pipe:
            pipe.exists(self._key())
            pipe.lrange(self._key("jobs"), offset, stop)
            exists, seqs = await pipe.execute()
        if not exists:
            raise StageNotFound(self.group.id, self.number)
        refs = [JobRef(self.group.id, self.number, int(seq)) for seq in seqs]
        return await read_results(self._store, refs, settle)

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
        refuse_job_id(kwargs)
        return make_spec(self._store, function, args, kwargs, schedule)

    async def _record(self, batch: list[tuple[bytes, StagedJob]]) -> list[StagedJob]:
        # ARGV[7]: make the stage when missing ("+<name>", a creating handle), else a
        # random token (not read; kept for a buffer's calls of an older version)
        make = self._make_arg or secrets.token_hex(8)
        reply = await self._store.run("enqueue", self.group.id, self.number, make, "", *(spec for spec, _ in batch))
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
            try:
                seq = await buffer.seq(self._store, self.number)
            except StageNotFound:
                if not self._creates:
                    raise
                await self._make()  # a creating handle's first job in the block
                seq = await buffer.seq(self._store, self.number)
            job.ref = JobRef(self.group.id, self.number, seq)
            await buffer.add(self._store, self.number, seq, spec)
            return job
        (job,) = await self._record([(spec, job)])
        return job

    async def enqueue(self, function: JobFunction, *args: Any, **kwargs: Any) -> StagedJob:
        """Add a job. A pending stage records it (it is sent when the stage starts); a
        running stage sends it to arq at once. ``kwargs`` go to the function, except
        arq's own ``_queue_name``, ``_defer_until``, ``_defer_by``, ``_expires``, ``_job_try``.
        A time, delay or expiry out of range (see ``enqueue_at``/``enqueue_in``; an expiry
        is 0 to 100 years), NaN or infinite, or a ``_job_try`` that is not an int from 1,
        raises InvalidSchedule and records nothing."""
        return await self._enqueue(Schedule(), function, args, kwargs)

    async def enqueue_to(self, queue: str, function: JobFunction, *args: Any, **kwargs: Any) -> StagedJob:
        """Add a job for arq queue ``queue``."""
        return await self._enqueue(Schedule(), function, args, {**kwargs, "_queue_name": queue})

    async def enqueue_at(
        self, when: dt.datetime | float, function: JobFunction, *args: Any, **kwargs: Any
    ) -> StagedJob:
        """Add a job that runs at ``when`` (a datetime or epoch seconds, between 1970 and
        the year 3000), or when its stage starts if that is later."""
        return await self._enqueue(Schedule("a", _at_ms(when)), function, args, kwargs)

    async def enqueue_at_with_queue(
        self, queue: str, when: dt.datetime | float, function: JobFunction, *args: Any, **kwargs: Any
    ) -> StagedJob:
        return await self._enqueue(Schedule("a", _at_ms(when)), function, args, {**kwargs, "_queue_name": queue})

    async def enqueue_in(
        self, delay: dt.timedelta | float, function: JobFunction, *args: Any, **kwargs: Any
    ) -> StagedJob:
        """Add a job that runs ``delay`` (a timedelta or seconds, at most 100 years; a
        negative delay means at once) after it is sent to arq."""
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

    async def _made_first(self, call: Callable[[], Awaitable[T]]) -> T:
        """Run ``call`` (a script that needs the stage); a creating handle makes the stage
        first when it is missing (one more round trip then), or names it first."""
        if self._creates and self.name is not None:
            await self._make()
            return await call()
        try:
            return await call()
        except StageNotFound:
            if not self._creates:
                raise
        await self._make()
        return await call()

    async def initiate(self) -> Motion:
        """Start the stage: send its pending jobs to arq. An empty stage completes at once
        and the group moves on. An ended stage raises StageComplete."""

        async def run() -> Motion:
            try:
                return await self._store.move("initiate_stage", self.group.id, self.number)
            except StageComplete as e:
                raise StageComplete(e.group_id, e.number, e.status, "initiate") from None

        return await self._made_first(run)

    async def cancel(self) -> Motion:
        """Cancel the stage: its jobs not yet final become ``cancelled`` (jobs not started
        leave arq's queue; running ones are aborted when the worker allows aborts), its
        callbacks fire, and a running group moves on to its next stage. An ended stage
        raises StageComplete; a missing one StageNotFound (cancel never creates)."""
        try:
            return await self._store.move("cancel_stage", self.group.id, self.number)
        except StageComplete as e:
            raise StageComplete(e.group_id, e.number, e.status, "cancel") from None

    async def on_complete(self, function: JobFunction, *args: Any, **kwargs: Any) -> None:
        """Enqueue ``function(ctx, summary, *args, **kwargs)`` once, when this stage
        completes or is cancelled (``summary.stage`` is its number)."""
        kwargs = dict(kwargs)
        refuse_job_id(kwargs)
        spec, _ = make_spec(self._store, function, args, kwargs, Schedule())
        reply = await self._store.run("add_callback", self.group.id, f"stage.{self.number}", spec, self._make_arg)
        raise_code(reply, self.group.id, self.number)

    async def set_failure_policy(self, policy: FailurePolicy | str | None) -> None:
        """This stage's own failure policy (None: follow the group's)."""
        args: tuple[Any, ...] = ("", "") if policy is None else FailurePolicy.of(policy).script_args()

        async def run() -> None:
            reply = await self._store.run("configure", self.group.id, self.number, *args)
            raise_code(reply, self.group.id, self.number)

        await self._made_first(run)

    async def set_limits(
        self, *, max_in_flight: int | EllipsisType | None = ..., rate: str | Rate | EllipsisType | None = ...
    ) -> Motion:
        """This stage's own flow limits, on top of its group's (an argument left out
        stays as it is; None removes it): ``max_in_flight`` (its jobs sent to arq and not
        final, across every worker) and ``rate`` (``"50/s"``, ``"600/m"``, ``"10/h"``;
        its jobs are given scores one interval apart). A running stage is topped up at
        once. See ``StagedGroup.set_limits``."""
        iv, rate_text = rate_args(rate)
        args = (cap_arg(max_in_flight), iv, rate_text, "-", "-")

        async def run() -> Motion:
            return await self._store.move("set_limits", self.group.id, self.number, *args)

        return await self._made_first(run)

    async def limits(self) -> FlowLimits:
        """The stage's own flow limits (its window is its group's: ``group.limits()``)."""
        await self._store.flush()
        raw = await self._store.redis.hgetall(self._key())
        if not raw:
            raise StageNotFound(self.group.id, self.number)
        return FlowLimits.of(raw, group=False)

    async def retry_failed(self) -> int:
        """Retry every failed job of the stage in one atomic call (see ``StagedJob.retry``
        for what a retry does) and return how many were retried. Allowed while the stage
        runs and its group has not ended (NotRetryable otherwise; StageNotFound,
        GroupNotFound). A failed job whose try arq is still writing the end of (a few
        ms after its failure), or whose stored spec cannot be sent, stays failed and is
        not counted: call again. So do the failed jobs left once the stage's or group's
        ``max_in_flight`` is reached (a retry never goes past a cap)."""
        reply = await self._store.run("retry_jobs", self.group.id, self.number, "*")
        if isinstance(reply, list):
            return int(reply[1])
        code = text(reply)
        if code == "gone":
            raise GroupNotFound(self.group.id)
        if code == "stage_gone":
            raise StageNotFound(self.group.id, self.number)
        reason = retry_refusal(code).replace("its stage", "the stage").replace("its group", "the group")
        raise NotRetryable(f"stage {self.number} of group {self.group.id!r}", reason)

    async def delete(self) -> Motion:
        """Delete the stage and its jobs (jobs not yet started leave arq's queue). A
        running group moves on to its next stage."""
        motion = await self._store.move("delete_stage", self.group.id, self.number)
        if motion.outcome == "gone":
            raise StageNotFound(self.group.id, self.number)
        return motion
