"""Run a staged group to completion in this process and record how every job ended.

``run_group`` is the engine of ``astages.testing`` (the harness users test their stages
with) and of ``astages demo``. It needs no pytest.

How a job's outcome is collected. A finished group deletes itself, records included, so
the outcome of the job that finishes a group can never be read back from Redis. Every
job run is therefore watched from three places:

1. an *inner* wrapper around the user's function reads the job's status message once the
   function has returned or raised, before astages reports the try (so the record still
   exists);
2. an *outer* wrapper around the function astages hands to arq sees what arq will see
   (a result, ``Retry``, ``RetriesExhausted``, any other exception) and derives the
   outcome astages records for it, in the same way the worker does;
3. the ``after_job_end`` hook (run after astages has reported the try) reads the job's
   record. While the record exists it is the truth (status, tries, message, error); once
   the group is gone the outcome derived in (1) and (2) is used. A cancelled run (a
   timeout) is read from arq's result, as the worker itself does.

The latest try of a job wins; a report for an older try than the record shows is ignored.

Callback runs (``on_complete``, ``on_success``, ``on_failure``, stage callbacks) are kept
too, from the same wrappers and hook (``GroupRun.callbacks``). A callback whose function
the worker does not have never reaches a hook (arq fails it at pick-up): it is found from
the group's registered callbacks before the run and from arq's kept results after it, and
``run_group`` raises ``CallbackNotRegistered`` naming it.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

from arq import Retry
from arq.connections import ArqRedis
from arq.constants import default_queue_name, result_key_prefix
from arq.jobs import deserialize_job_raw, deserialize_result
from arq.typing import WorkerCoroutine
from arq.worker import Function, RetryJob, Worker, func
from redis.exceptions import RedisError

from astages._connection import connect, fake_redis, safe_url
from astages._keys import DEFAULT_PREFIX, CallbackRef, Keys
from astages.exceptions import AstagesError, GroupNotFound, JobNotFound, RetriesExhausted
from astages.group import StagedGroup
from astages.job import StagedJob
from astages.models import GroupSummary, JobStatus, StageProgress, decode_spec
from astages.stage import StagedGroupStage
from astages.worker import describe_error, worker_settings

__all__ = [
    "CallbackNotRegistered",
    "CallbackRun",
    "GroupNotInitiated",
    "GroupRun",
    "GroupStuck",
    "GroupTimeout",
    "JobOutcome",
    "StageSummary",
    "connect",
    "fake_redis",
    "run_group",
    "safe_url",
]

# ctx keys of the harness (one ctx dict per job run, shared by the wrappers and hooks).
CTX_CALL = "astages_testing_call"
CTX_STARTED = "astages_testing_started"
CTX_MESSAGE = "astages_testing_message"
CTX_VERDICT = "astages_testing_verdict"

# How often the driver looks at the group, the clock and the deadline (seconds).
TICK = 0.005

Hook = Callable[[dict[str, Any]], Awaitable[Any]]


# -- results --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class JobOutcome:
    """How one staged job ended (its latest try)."""

    id: str
    stage: int
    seq: int
    function: str
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    status: JobStatus
    tries: int
    message: str
    error: str | None
    started_at: float  # epoch seconds, when its first try started
    finished_at: float  # epoch seconds, when its latest try ended

    @property
    def retried(self) -> int:
        """How many times the job was run again (tries after the first)."""
        return max(self.tries - 1, 0)


@dataclass(frozen=True, slots=True)
class CallbackRun:
    """One run of a group's callback: ``event`` is ``complete``, ``success``, ``failure``
    or ``stage.<n>``; ``args`` are the callback's own arguments (after the summary it
    receives, kept in ``summary``); ``status`` is successful or failed, with ``error``."""

    id: str
    event: str
    function: str
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    status: JobStatus
    error: str | None
    summary: GroupSummary | None
    finished_at: float  # epoch seconds

    @property
    def function_missing(self) -> bool:
        """arq failed it because the worker has no function by its name."""
        return self.error is not None and f"function {self.function!r} not found" in self.error


@dataclass(frozen=True, slots=True)
class StageSummary:
    """One stage of a finished run: job counts and how long it took."""

    number: int
    jobs: int
    successful: int
    failed: int
    retried: int
    duration: float  # seconds from its first job's start to its last job's end

    def as_dict(self) -> dict[str, Any]:
        return {
            "stage": self.number,
            "jobs": self.jobs,
            "successful": self.successful,
            "failed": self.failed,
            "retried": self.retried,
            "duration": round(self.duration, 3),
        }


@dataclass(frozen=True, slots=True)
class GroupRun:
    """What ``run_group`` saw: every job that ran, in stage and enqueue order."""

    group_id: str
    description: str
    jobs: tuple[JobOutcome, ...]
    elapsed: float  # seconds the run took
    callbacks: tuple[CallbackRun, ...] = ()  # in the order they ended

    def callback(self, event: str) -> tuple[CallbackRun, ...]:
        """The runs of the callbacks of ``event`` (``complete``, ``stage.2``, ...)."""
        return tuple(run for run in self.callbacks if run.event == event)

    def stage(self, number: int) -> tuple[JobOutcome, ...]:
        """The jobs of stage ``number``, in enqueue order."""
        return tuple(job for job in self.jobs if job.stage == number)

    @property
    def stages(self) -> dict[int, tuple[JobOutcome, ...]]:
        """The jobs of every stage, by stage number in run order."""
        return {n: self.stage(n) for n in sorted({job.stage for job in self.jobs})}

    @property
    def successful(self) -> tuple[JobOutcome, ...]:
        return tuple(job for job in self.jobs if job.status is JobStatus.SUCCESSFUL)

    @property
    def failed(self) -> tuple[JobOutcome, ...]:
        return tuple(job for job in self.jobs if job.status is JobStatus.FAILED)

    @property
    def messages(self) -> list[str]:
        """Every job's last status message, in order ("" for a job that set none)."""
        return [job.message for job in self.jobs]

    def counts(self) -> dict[str, int]:
        """How many jobs ended in each status (only statuses that occur)."""
        out: dict[str, int] = {}
        for job in self.jobs:
            out[job.status.value] = out.get(job.status.value, 0) + 1
        return out

    def find(self, function: str, *args: Any) -> JobOutcome:
        """The first job of ``function`` (whose args start with ``args``, when given)."""
        for job in self.jobs:
            if job.function == function and job.args[: len(args)] == args:
                return job
        raise LookupError(f"no job {function}{args!r} ran in group {self.group_id}")

    def summary(self) -> list[StageSummary]:
        """Per stage: jobs, successful, failed, retried (retries so far) and duration."""
        out = []
        for number, jobs in self.stages.items():
            out.append(
                StageSummary(
                    number=number,
                    jobs=len(jobs),
                    successful=sum(job.status is JobStatus.SUCCESSFUL for job in jobs),
                    failed=sum(job.status is JobStatus.FAILED for job in jobs),
                    retried=sum(job.retried for job in jobs),
                    duration=max(job.finished_at for job in jobs) - min(job.started_at for job in jobs),
                )
            )
        return out


class GroupNotInitiated(AstagesError):
    def __init__(self, group_id: str) -> None:
        self.group_id = group_id
        super().__init__(
            f"group {group_id!r} was never initiated, so none of its jobs is queued: leave the "
            "within_a_grouping block (or await group.initiate()) before running it"
        )


class CallbackNotRegistered(AstagesError):
    """Callbacks of the group name functions the worker was not given: arq fails such a
    callback at pick-up without running it. ``missing`` holds (callback, function name);
    ``run`` is the finished run (None when found before running)."""

    def __init__(self, group_id: str, missing: Sequence[tuple[str, str]], run: GroupRun | None = None) -> None:
        self.group_id = group_id
        self.missing = list(missing)
        self.run = run
        names = ", ".join(f"{callback} -> {function!r}" for callback, function in self.missing)
        super().__init__(
            f"group {group_id!r} has callbacks whose function the worker does not have ({names}): "
            "arq fails them without running them; pass those functions to run_group (the worker's functions)"
        )


class GroupStuck(AstagesError):
    def __init__(self, group_id: str, queue: str, details: Sequence[str]) -> None:
        self.group_id = group_id
        self.queue = queue
        self.details = list(details)
        lines = "".join(f"\n  {line}" for line in details)
        super().__init__(
            f"group {group_id!r} still has open jobs but queue {queue!r} is empty: a job was "
            "sent to another queue (pass queue_name=), or arq dropped it (function not given "
            f"to the worker, job expired){lines}"
        )


class GroupTimeout(AstagesError, TimeoutError):
    def __init__(self, group_id: str, timeout: float, details: Sequence[str]) -> None:
        self.group_id = group_id
        self.timeout = timeout
        self.details = list(details)
        lines = "".join(f"\n  {line}" for line in details)
        super().__init__(f"group {group_id!r} did not finish within {timeout:g}s{lines}")


# -- recording ------------------------------------------------------------------------


@dataclass(slots=True)
class _Recorder:
    """Collects the outcome of every run of the group's jobs (see the module docstring)."""

    redis: ArqRedis
    keys: Keys
    group_id: str
    retry_jobs: bool
    user_hook: Hook | None
    entries: dict[str, JobOutcome] = field(default_factory=dict)
    callbacks: dict[str, CallbackRun] = field(default_factory=dict)

    def inner(self, function: Function) -> Function:
        """Wrap the user's function: note the call and read the message once it ends."""
        coroutine = function.coroutine

        async def run(ctx: dict[str, Any], *args: Any, **kwargs: Any) -> Any:
            ctx[CTX_CALL] = (function.name, args, kwargs)
            ctx[CTX_STARTED] = time.time()
            try:
                return await coroutine(ctx, *args, **kwargs)
            finally:
                job = await StagedJob.perform_job(ctx)
                if not job.blank:
                    with contextlib.suppress(AstagesError, RedisError):
                        ctx[CTX_MESSAGE] = await job.status_message()

        return _rewrap(function, run)

    def outer(self, function: Function) -> Function:
        """Wrap what astages hands to arq: derive the outcome astages records."""
        coroutine = function.coroutine

        async def run(ctx: dict[str, Any], *args: Any, **kwargs: Any) -> Any:
            try:
                result = await coroutine(ctx, *args, **kwargs)
            except RetriesExhausted as e:
                ctx[CTX_VERDICT] = (JobStatus.FAILED, str(e))
                raise
            except (Retry, RetryJob) as e:
                ctx[CTX_VERDICT] = (
                    (JobStatus.PENDING_RE_RUN, None) if self.retry_jobs else (JobStatus.FAILED, describe_error(e))
                )
                raise
            except Exception as e:
                ctx[CTX_VERDICT] = (JobStatus.FAILED, describe_error(e))
                raise
            ctx[CTX_VERDICT] = (JobStatus.SUCCESSFUL, None)
            return result

        return _rewrap(function, run)

    async def after_job_end(self, ctx: dict[str, Any]) -> None:
        try:
            await self._record(ctx)
        finally:
            if self.user_hook is not None:
                await self.user_hook(ctx)

    def _record_callback(self, job_id: str, callback: CallbackRef, ctx: dict[str, Any]) -> None:
        if CTX_CALL not in ctx:
            return
        name, args, kwargs = ctx[CTX_CALL]
        summary = args[0] if args and isinstance(args[0], GroupSummary) else None
        status, error = ctx.get(CTX_VERDICT) or (JobStatus.FAILED, "cancelled or timed out")
        self.callbacks[job_id] = CallbackRun(
            id=job_id,
            event=callback.event,
            function=name,
            args=tuple(args[1:] if summary is not None else args),
            kwargs=dict(kwargs),
            status=status,
            error=error,
            summary=summary,
            finished_at=time.time(),
        )

    async def unrun_callbacks(self) -> None:
        """Callbacks of the group arq ended without a hook (function not found, ...),
        read from arq's kept results."""
        pattern = result_key_prefix + self.keys.job_id_base(self.group_id) + "cb:*"
        deserializer = getattr(self.redis, "job_deserializer", None)
        async for key in self.redis.scan_iter(match=pattern, count=1000):
            job_id = key.decode().removeprefix(result_key_prefix)
            callback = self.keys.parse_callback_id(job_id)
            if callback is None or job_id in self.callbacks:
                continue
            try:
                result = deserialize_result(await self.redis.get(key), deserializer=deserializer)
            except Exception:  # gone or unreadable: nothing to report on
                continue
            error = None if result.success else describe_error(result.result)
            self.callbacks[job_id] = CallbackRun(
                id=job_id,
                event=callback.event,
                function=result.function,
                args=tuple(result.args[1:]) if result.args else (),
                kwargs=dict(result.kwargs),
                status=JobStatus.SUCCESSFUL if result.success else JobStatus.FAILED,
                error=error if isinstance(result.result, BaseException) else str(result.result) or error,
                summary=None,
                finished_at=result.finish_time.timestamp(),
            )

    def callback_runs(self) -> tuple[CallbackRun, ...]:
        return tuple(sorted(self.callbacks.values(), key=lambda run: run.finished_at))

    async def _record(self, ctx: dict[str, Any]) -> None:
        job_id = str(ctx.get("job_id", ""))
        callback = self.keys.parse_callback_id(job_id)
        if callback is not None:
            if callback.group_id == self.group_id:
                self._record_callback(job_id, callback, ctx)
            return
        ref = self.keys.parse_job_id(job_id)
        if ref is None or ref.group_id != self.group_id or CTX_CALL not in ctx:
            return  # not this group's, or astages did not run it (final already, or deleted)
        job_try = int(ctx["job_try"])
        try:
            info = await StagedJob.load(self.redis, job_id, prefix=self.keys.prefix)
            snapshot = await info.info()
        except JobNotFound:
            snapshot = None
        if snapshot is not None and snapshot.tries > job_try:
            return  # a later try has started; it will report
        status: JobStatus
        error: str | None
        # the record speaks for this try once its report landed (a detached report may land
        # after this hook: until then the record still shows the try before, or queued)
        if (
            snapshot is not None
            and snapshot.tries == job_try
            and snapshot.status not in (JobStatus.RUNNING, JobStatus.QUEUED, JobStatus.PENDING_RE_RUN)
        ):
            status, message, error = snapshot.status, snapshot.status_message, snapshot.error
        else:
            verdict = ctx.get(CTX_VERDICT)
            status, error = verdict if verdict is not None else await self._cancelled(job_id)
            message = str(ctx.get(CTX_MESSAGE, ""))
        name, args, kwargs = ctx[CTX_CALL]
        previous = self.entries.get(job_id)
        if previous is not None and previous.tries > job_try:
            return
        self.entries[job_id] = JobOutcome(
            id=job_id,
            stage=ref.stage,
            seq=ref.seq,
            function=name,
            args=tuple(args),
            kwargs=dict(kwargs),
            status=status,
            tries=job_try,
            message=message,
            error=error,
            started_at=previous.started_at if previous is not None else float(ctx[CTX_STARTED]),
            finished_at=time.time(),
        )

    async def _cancelled(self, job_id: str) -> tuple[JobStatus, str | None]:
        """A run the wrappers saw cancelled (a timeout): what arq wrote for it."""
        raw = await self.redis.get(result_key_prefix + job_id)
        if raw is None:
            return JobStatus.FAILED, "cancelled or timed out (arq kept no result)"
        result = deserialize_result(raw, deserializer=getattr(self.redis, "job_deserializer", None))
        if result.success:
            return JobStatus.SUCCESSFUL, None
        error = result.result
        return JobStatus.FAILED, describe_error(error) if isinstance(error, BaseException) else str(error)

    def outcomes(self) -> tuple[JobOutcome, ...]:
        return tuple(sorted(self.entries.values(), key=lambda job: (job.stage, job.seq)))


def _as_function(function: Callable[..., Any] | Function) -> Function:
    return function if isinstance(function, Function) else func(function)


def _rewrap(function: Function, run: Callable[..., Awaitable[Any]]) -> Function:
    functools.update_wrapper(run, function.coroutine)
    return Function(
        name=function.name,
        coroutine=cast(WorkerCoroutine, run),
        timeout_s=function.timeout_s,
        keep_result_s=function.keep_result_s,
        keep_result_forever=function.keep_result_forever,
        max_tries=function.max_tries,
    )


async def _registered_callbacks(group: StagedGroup) -> list[tuple[str, str]]:
    """(callback, function name) of every callback registered on the group now."""
    store = group.store
    raw = await store.redis.hgetall(store.keys.callbacks(group.id))
    deserializer = getattr(store.redis, "job_deserializer", None)
    out = []
    for field_, spec in raw.items():
        try:
            _, _, payload = decode_spec(spec)
            function = deserialize_job_raw(payload, deserializer=deserializer)[0]
        except Exception:  # an unusable spec is skipped when fired (and reported then)
            continue
        out.append((field_.decode() if isinstance(field_, bytes) else str(field_), str(function)))
    return sorted(out)


# -- driving the worker ---------------------------------------------------------------


async def _describe_open(group: StagedGroup, limit: int = 10) -> list[str]:
    """One line per stage that is not complete, and its first open jobs."""
    lines: list[str] = []
    try:
        statuses = await group.stage_statuses()
        for number, status in statuses.items():
            if status.value in ENDED:
                continue
            stage = StagedGroupStage(group, number)
            progress = await stage.progress()
            lines.append(f"stage {number} ({status.value}): {_counts(progress)}")
            jobs = await stage.jobs(0, 200)
            for job, (state, tries, _msg) in zip(jobs, await stage.job_statuses(jobs), strict=True):
                if state in ("successful", "failed", "cancelled", "deleted"):
                    continue
                if len(lines) > limit:
                    lines.append("...")
                    return lines
                lines.append(f"job {job.id} {job.function}{job.args!r}: {state} (try {tries}) in {job.queue_name!r}")
    except AstagesError:
        pass  # the group finished or was deleted while we looked
    return lines


def _counts(progress: StageProgress) -> str:
    return ", ".join(f"{value} {name}" for name, value in progress.as_dict().items() if value and name != "total")


async def _fast_forward(redis: ArqRedis, queue: str) -> None:
    """Nothing is due and nothing runs: bring the next deferred jobs forward to now,
    as if the clock had jumped to them (jobs keep their relative order)."""
    now = int(time.time() * 1000)
    if await redis.zcount(queue, "-inf", now) > 0:
        return
    first = await redis.zrange(queue, 0, 0, withscores=True)
    if not first:
        return
    ids = await redis.zrangebyscore(queue, "-inf", first[0][1])
    if ids:
        await redis.zadd(queue, dict.fromkeys(ids, now), xx=True)


ENDED = frozenset({"complete", "failed", "cancelled"})


async def _over(group: StagedGroup) -> bool:
    """The group finished (and deleted itself), was deleted, or ended and is kept."""
    try:
        status = await group.status()
    except GroupNotFound:
        return True
    return str(getattr(status, "value", status)) in ENDED


def _idle(worker: Worker) -> bool:
    return worker.job_counter == 0 and all(task.done() for task in worker.tasks.values())


async def _stop(worker: Worker, main: asyncio.Future[None], *, graceful: bool) -> None:
    """Stop a worker that runs on the caller's connection without closing it (arq's
    ``Worker.close`` would close the caller's pool)."""
    worker.allow_pick_jobs = False
    if graceful and not main.done():
        await asyncio.gather(*worker.tasks.values(), return_exceptions=True)
    for task in worker.tasks.values():
        task.cancel()
    main.cancel()
    await asyncio.wait([main, *worker.tasks.values()])
    with contextlib.suppress(RedisError):
        await worker.pool.delete(worker.health_check_key)
    if worker.on_shutdown is not None:
        await worker.on_shutdown(worker.ctx)


async def run_group(
    redis: ArqRedis,
    group: StagedGroup | str,
    functions: Sequence[Callable[..., Any] | Function],
    *,
    prefix: str | None = None,
    timeout: float = 60.0,  # noqa: ASYNC109 - checked between ticks, so a timeout can say what is open
    fast_forward: bool = True,
    check_callbacks: bool = True,
    **worker_options: Any,
) -> GroupRun:
    """Run ``group`` to completion with in-process arq burst workers and return how each
    of its jobs ended.

    ``functions`` and ``worker_options`` are what you give ``astages.worker_settings``
    (``max_jobs``, ``max_tries``, ``queue_name``, ``ctx``, hooks, ...). Burst workers run,
    one after another, until the group has ended (it finished and deleted itself, was
    deleted, or ended and is kept) and the queue is empty: like any burst worker they run
    every job in the queue, callbacks included. With ``fast_forward`` (the default)
    deferred jobs never wait in real time: whenever nothing is due and nothing runs, the
    next deferred jobs in the queue (a ``Retry(defer=...)``, ``enqueue_in``,
    ``enqueue_at``) are brought forward to now, in their order.

    The returned ``GroupRun`` has every job's outcome (``jobs``) and every callback run
    (``callbacks``: event, function, arguments, status, error, the summary it received).

    Raises ``GroupNotInitiated`` for a group still being filled, ``GroupStuck`` when the
    queue is empty but the group has open jobs, ``GroupTimeout`` after ``timeout``
    seconds, and ``GroupNotFound`` for a group that does not exist. With
    ``check_callbacks`` (the default) it raises ``CallbackNotRegistered`` before running
    when a callback registered on the group names a function not in ``functions``, and
    after the run when a callback added during it was failed by arq for that reason (its
    ``run`` attribute then holds the GroupRun)."""
    started = time.monotonic()
    if isinstance(group, str):
        group = await StagedGroup.load(redis, group, prefix=prefix or DEFAULT_PREFIX)
    keys = group.store.keys
    if await group.status() == "pending":
        raise GroupNotInitiated(group.id)
    options = dict(worker_options)
    queue = str(options.setdefault("queue_name", getattr(redis, "default_queue_name", None) or default_queue_name))
    options.setdefault("poll_delay", TICK)
    options.setdefault("max_jobs", 20)
    recorder = _Recorder(
        redis=redis,
        keys=keys,
        group_id=group.id,
        retry_jobs=bool(options.get("retry_jobs", True)),
        user_hook=options.pop("after_job_end", None),
    )
    settings = worker_settings(
        functions=[recorder.inner(_as_function(f)) for f in functions],
        prefix=keys.prefix,
        after_job_end=recorder.after_job_end,
        **options,
    )
    settings["functions"] = [recorder.outer(f) for f in settings["functions"]]
    if check_callbacks:
        known = {function.name for function in settings["functions"]}
        missing = [(cb, name) for cb, name in await _registered_callbacks(group) if name not in known]
        if missing:
            raise CallbackNotRegistered(group.id, missing)
    deadline = started + timeout
    while True:
        worker = Worker(**settings, redis_pool=redis, burst=True, handle_signals=False)
        main: asyncio.Future[None] = asyncio.ensure_future(worker.main())
        graceful = True
        try:
            while not main.done():
                await asyncio.wait([main], timeout=TICK)
                if main.done():
                    break
                if fast_forward and _idle(worker):
                    await _fast_forward(redis, queue)
                if time.monotonic() > deadline:
                    graceful = False
                    raise GroupTimeout(group.id, timeout, await _describe_open(group))
        except BaseException:
            graceful = False
            raise
        finally:
            await _stop(worker, main, graceful=graceful)
        if not main.cancelled():
            error = main.exception()
            if error is not None:
                raise error
        if await redis.zcard(queue):
            continue  # the burst ended just before a report sent the next stage
        if await _over(group):
            break
        raise GroupStuck(group.id, queue, await _describe_open(group))
    await recorder.unrun_callbacks()
    run = GroupRun(
        group.id, group.description, recorder.outcomes(), time.monotonic() - started, recorder.callback_runs()
    )
    missing = [(cb.event, cb.function) for cb in run.callbacks if cb.function_missing]
    if check_callbacks and missing:
        raise CallbackNotRegistered(group.id, missing, run)
    return run
