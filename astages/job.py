"""StagedJob: one job of a stage, or a plain arq job run outside any stage."""

from __future__ import annotations

import asyncio
import datetime as dt
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from arq.constants import in_progress_key_prefix, result_key_prefix
from arq.jobs import DeserializationError, deserialize_job_raw, deserialize_result

from astages._keys import DEFAULT_PREFIX, JobRef, Keys
from astages._scripts import Motion, Store, text
from astages.exceptions import (
    CorruptRecord,
    InFlightCapReached,
    InvalidStatusMessage,
    JobFailed,
    JobNotFound,
    JobNotPending,
    NotRetryable,
    ResultNotAvailable,
    StageNotRunning,
)
from astages.models import JobInfo, JobStatus, Schedule, decode_code, decode_spec, ms_to_datetime

if TYPE_CHECKING:
    from arq.connections import ArqRedis

    from astages.stage import StagedGroupStage

__all__ = ["MESSAGE_LIMIT", "RESULT_SETTLE", "JobResult", "StagedJob"]

# Longest status message, in characters: a message is a status line, not a log.
MESSAGE_LIMIT = 65_536
# The ctx key under which the worker wrapper leaves the running job's handle.
CTX_JOB = "astages_job"
# How long (seconds) a result read waits for arq to write the result of a job that astages
# already records as ended (a worker reports a job's outcome just before arq writes its
# result, so a later stage can start in between).
RESULT_SETTLE = 5.0


@dataclass(frozen=True, slots=True)
class JobResult:
    """What one staged job gave, as ``stage.results()`` and ``job.outcome()`` read it.

    ``reason`` is None when ``value`` is the job's result: the job succeeded and arq still
    keeps its result (arq's ``keep_result``, 3600 s by default, per function with
    ``arq.func(..., keep_result=)``, or ``keep_result_forever``). Otherwise ``value`` is
    None and ``reason`` says why:

    - ``failed``: the job failed; ``error`` is the error it ended with.
    - ``not_final``: it has not ended (pending, queued, running, waiting for a retry).
    - ``cancelled``: it was cancelled (with its stage or group).
    - ``not_kept``: it succeeded but arq keeps no result (``keep_result=0``, or its time ran out).
    - ``being_written``: it ended but arq had not yet written its result when the read
      gave up waiting (``RESULT_SETTLE``; a worker that died after its report).
    - ``unreadable``: arq's result could not be deserialized here (``error`` says why).
    - ``gone``: neither a record nor a kept result: the job or its stage was deleted, or
      its group ended and was deleted and arq keeps no result.

    ``status`` is the job's status (None when astages has no record of it: then status,
    value and error come from arq's kept result alone)."""

    job_id: str
    status: JobStatus | None
    reason: str | None
    value: Any = None
    error: str | None = None

    @property
    def ok(self) -> bool:
        """True when ``value`` is the job's result."""
        return self.reason is None

    def unwrap(self) -> Any:
        """The job's result; JobFailed for a failed job, else ResultNotAvailable with the reason."""
        if self.reason is None:
            return self.value
        if self.reason == "failed":
            raise JobFailed(self.job_id, self.error or "")
        raise ResultNotAvailable(self.job_id, self.reason, _REASONS.get(self.reason, self.error or self.reason))


_REASONS = {
    "not_final": "it has not ended yet (pending, queued, running or waiting for a retry)",
    "cancelled": "it was cancelled",
    "not_kept": "arq keeps no result for it (keep_result=0, or its keep_result time ran out)",
    "being_written": "it ended but arq has not written its result yet; ask again in a moment",
    "gone": "there is no record of it and no kept result (the job or its stage was deleted, "
    "or its group ended and was deleted)",
}


def _describe(error: object) -> str:
    if isinstance(error, BaseException):
        return f"{type(error).__name__}: {error}" if str(error) else type(error).__name__
    return str(error)


def _job_result(
    job_id: str,
    open_code: bytes | None,
    done_code: bytes | None,
    err: bytes | None,
    raw: bytes | None,
    in_progress: int,
    deserializer: Any,
) -> JobResult:
    """A JobResult from what astages and arq hold for one job."""
    kept: Any = None
    unreadable = ""
    if raw is not None:
        try:
            kept = deserialize_result(raw, deserializer=deserializer)
        except Exception as e:  # a user's result class that is not importable here, ...
            unreadable = f"arq's result could not be read: {_describe(e)}"
    if open_code is not None:
        return JobResult(job_id, decode_code(open_code)[0], "not_final")
    if done_code is None:  # no record: arq's kept result alone
        if kept is None:
            return JobResult(job_id, None, "unreadable" if unreadable else "gone", error=unreadable or None)
        if kept.success:
            return JobResult(job_id, None, None, kept.result)
        return JobResult(job_id, JobStatus.FAILED, "failed", error=_describe(kept.result))
    status = decode_code(done_code)[0]
    if status is JobStatus.FAILED:
        error = text(err) if err is not None else (_describe(kept.result) if kept is not None else "")
        return JobResult(job_id, status, "failed", error=error)
    if status is JobStatus.CANCELLED:
        return JobResult(job_id, status, "cancelled")
    if kept is not None and kept.success:
        return JobResult(job_id, status, None, kept.result)
    if unreadable:
        return JobResult(job_id, status, "unreadable", error=unreadable)
    return JobResult(job_id, status, "being_written" if in_progress else "not_kept")


async def read_results(store: Store, refs: Sequence[JobRef], settle: float = RESULT_SETTLE) -> list[JobResult]:
    """The results of ``refs`` (jobs of one stage), in one pipelined round trip, plus a
    short wait for a result arq is still writing (see ``RESULT_SETTLE``)."""
    if not refs:
        return []
    ids = [store.keys.job_id(r.group_id, r.stage, r.seq) for r in refs]
    seqs = [str(r.seq) for r in refs]
    part = store.keys.stage_part
    ref0 = refs[0]
    deserializer = getattr(store.redis, "job_deserializer", None)
    async with store.redis.pipeline(transaction=False) as pipe:
        pipe.hmget(part(ref0.group_id, ref0.stage, "open"), seqs)
        pipe.hmget(part(ref0.group_id, ref0.stage, "done"), seqs)
        pipe.hmget(part(ref0.group_id, ref0.stage, "err"), seqs)
        for job_id in ids:
            pipe.get(result_key_prefix + job_id)
            pipe.exists(in_progress_key_prefix + job_id)
        opens, dones, errs, *arq = await pipe.execute()
    results = [
        _job_result(ids[i], opens[i], dones[i], errs[i], arq[2 * i], arq[2 * i + 1], deserializer)
        for i in range(len(ids))
    ]
    deadline = time.monotonic() + settle
    while (
        waiting := [i for i, r in enumerate(results) if r.reason == "being_written"]
    ) and time.monotonic() < deadline:
        await asyncio.sleep(0.01)
        async with store.redis.pipeline(transaction=False) as pipe:
            for i in waiting:
                pipe.get(result_key_prefix + ids[i])
                pipe.exists(in_progress_key_prefix + ids[i])
            again = await pipe.execute()
        for k, i in enumerate(waiting):
            results[i] = _job_result(ids[i], None, dones[i], errs[i], again[2 * k], again[2 * k + 1], deserializer)
    return results


# Why a retry was refused, by the reply code of retry_jobs.lua.
_NOT_RETRYABLE = {
    "group_ended": "its group has ended (an ended group, kept readable, takes no changes)",
    "stage:complete": "its stage is complete; a failed job is retried while its stage runs (other jobs of "
    "the stage still open): a stage completes once its last job is final, and the group moves on",
    "stage:cancelled": "its stage was cancelled",
    "stage:pending": "its stage has not started",
    "busy": "the worker is still writing the end of its failed try; retry in a moment",
    "capped:stage": "its stage's max_in_flight is reached (a retry never goes past a cap); retry once jobs "
    "in flight have ended",
    "capped:group": "its group's max_in_flight is reached (a retry never goes past a cap); retry once jobs "
    "in flight have ended",
}


def retry_refusal(code: str) -> str:
    """The reason a retry_jobs.lua reply code stands for."""
    if code.startswith("not_failed:"):
        return f"it is {code.removeprefix('not_failed:')}, not failed (only a failed job is retried)"
    if code.startswith("bad_spec:"):
        return f"its stored spec cannot be sent to arq: {code.removeprefix('bad_spec:')}"
    return _NOT_RETRYABLE.get(code, code)


_NOW = Schedule()  # the default schedule (frozen: one for every handle)


class StagedJob:
    """A staged job's handle. Identity and arguments are fixed; status and message are
    read from Redis by the async accessors, so they are always current.

    A handle made for a job that is not part of a stage (``perform_job`` in a plain arq
    job) is *blank*: it has the job's arguments and nothing else."""

    __slots__ = ("_store", "args", "function", "kwargs", "queue_name", "queue_time", "ref", "schedule")

    def __init__(
        self,
        store: Store | None,
        ref: JobRef | None,
        function: str,
        args: tuple[Any, ...],
        kwargs: Mapping[str, Any],
        queue_name: str = "",
        queue_time: dt.datetime | None = None,
        schedule: Schedule | None = None,
    ) -> None:
        self._store = store
        self.ref = ref
        self.function = function
        self.args = tuple(args)
        self.kwargs = dict(kwargs)
        self.queue_name = queue_name
        self.queue_time = queue_time
        self.schedule = schedule or _NOW

    def __repr__(self) -> str:
        return f"<StagedJob {self.id or '(not staged)'} {self.function}>"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, StagedJob) and other.ref is not None and other.ref == self.ref

    def __hash__(self) -> int:
        return hash(self.ref)

    # -- identity -------------------------------------------------------------------

    @property
    def id(self) -> str | None:
        """The arq job id, or None for a job that is not part of a stage."""
        if self.ref is None or self._store is None:
            return None
        return self._store.keys.job_id(self.ref.group_id, self.ref.stage, self.ref.seq)

    @property
    def class_name(self) -> str:
        """The seed's name for the job's function name."""
        return self.function

    @property
    def blank(self) -> bool:
        """True for a handle that is not bound to a staged job (the seed's ``blank?``)."""
        return self.ref is None

    def _bound(self) -> tuple[Store, JobRef]:
        if self._store is None or self.ref is None:
            raise JobNotFound("(a job that is not part of a stage)")
        return self._store, self.ref

    # -- loading --------------------------------------------------------------------

    @classmethod
    def from_spec(cls, store: Store, ref: JobRef, spec: bytes | None) -> StagedJob:
        if spec is None:
            raise JobNotFound(store.keys.job_id(ref.group_id, ref.stage, ref.seq))
        key = store.keys.stage_part(ref.group_id, ref.stage, "spec")
        try:
            schedule, queue, payload = decode_spec(spec)
            function, args, kwargs, _, enqueue_ms = deserialize_job_raw(
                payload, deserializer=getattr(store.redis, "job_deserializer", None)
            )
        except (ValueError, IndexError, DeserializationError) as e:
            raise CorruptRecord(f"{key} #{ref.seq}", str(e)) from e
        return cls(store, ref, function, args, kwargs, queue, ms_to_datetime(enqueue_ms), schedule)

    @classmethod
    async def load(cls, redis: ArqRedis, job_id: str, *, prefix: str = DEFAULT_PREFIX) -> StagedJob:
        """The staged job with this arq job id; JobNotFound when there is none."""
        store = Store(redis, Keys(prefix))
        ref = store.keys.parse_job_id(job_id)
        if ref is None:
            raise JobNotFound(job_id)
        spec = await store.redis.hget(store.keys.stage_part(ref.group_id, ref.stage, "spec"), str(ref.seq))
        return cls.from_spec(store, ref, spec)

    @classmethod
    async def perform_job(cls, ctx: Mapping[str, Any], *args: Any, **kwargs: Any) -> StagedJob:
        """The handle of the job running in ``ctx``, with its original arguments.

        Works the same whether or not the job was enqueued as part of a stage: outside a
        stage the handle is blank (``exists()`` is False) and its message is not kept."""
        job = ctx.get(CTX_JOB)
        if isinstance(job, StagedJob):
            return job
        redis = ctx.get("redis")
        keys = Keys()
        ref = keys.parse_job_id(str(ctx.get("job_id", "")))
        if ref is None or redis is None:
            return cls(None, None, "", args, kwargs)
        return cls(Store(redis, keys), ref, "", args, kwargs, queue_time=ctx.get("enqueue_time"))

    # -- state ----------------------------------------------------------------------

    async def _codes(self) -> tuple[bytes | None, bytes | None]:
        store, ref = self._bound()
        await store.flush()
        async with store.redis.pipeline(transaction=False) as pipe:
            pipe.hget(store.keys.stage_part(ref.group_id, ref.stage, "open"), str(ref.seq))
            pipe.hget(store.keys.stage_part(ref.group_id, ref.stage, "done"), str(ref.seq))
            open_code, done_code = await pipe.execute()
        return open_code, done_code

    async def exists(self) -> bool:
        if self.blank:
            return False
        open_code, done_code = await self._codes()
        return open_code is not None or done_code is not None

    async def status(self) -> JobStatus:
        open_code, done_code = await self._codes()
        code = open_code or done_code
        if code is None:
            raise JobNotFound(str(self.id))
        return decode_code(code)[0]

    async def completed(self) -> bool:
        """Failed or successful (the seed's ``completed?``)."""
        return (await self.status()).completed

    async def queued(self) -> bool:
        """Queued, running or waiting for a retry (the seed's ``queued?``)."""
        return (await self.status()).queued

    async def pending(self) -> bool:
        """Pending or waiting for a retry (the seed's ``pending?``)."""
        return (await self.status()).pending

    async def status_message(self) -> str:
        """The job's own message ("" when it set none)."""
        store, ref = self._bound()
        await store.flush()
        raw = await store.redis.hget(store.keys.stage_part(ref.group_id, ref.stage, "msg"), str(ref.seq))
        return "" if raw is None else text(raw)

    async def set_status_message(self, message: str) -> bool:
        """Set the job's message. Returns False (and writes nothing) when the job is not
        part of a stage or its record is gone."""
        if not isinstance(message, str) or len(message) > MESSAGE_LIMIT:
            raise InvalidStatusMessage(message, MESSAGE_LIMIT)
        if self.blank:
            return False
        store, ref = self._bound()
        return bool(await store.run("set_message", ref.group_id, ref.stage, ref.seq, message))

    async def error(self) -> str | None:
        """The error a failed job ended with, else None."""
        store, ref = self._bound()
        await store.flush()
        raw = await store.redis.hget(store.keys.stage_part(ref.group_id, ref.stage, "err"), str(ref.seq))
        return None if raw is None else text(raw)

    async def info(self) -> JobInfo:
        """A snapshot of everything known about the job, in one round trip."""
        store, ref = self._bound()
        await store.flush()
        seq = str(ref.seq)
        async with store.redis.pipeline(transaction=False) as pipe:
            for part in ("spec", "open", "done", "msg", "err"):
                pipe.hget(store.keys.stage_part(ref.group_id, ref.stage, part), seq)
            spec, open_code, done_code, msg, err = await pipe.execute()
        full = StagedJob.from_spec(store, ref, spec)
        code = open_code or done_code
        if code is None:
            raise JobNotFound(str(self.id))
        status, tries = decode_code(code)
        return JobInfo(
            id=str(self.id),
            group_id=ref.group_id,
            stage=ref.stage,
            function=full.function,
            args=full.args,
            kwargs=full.kwargs,
            queue_name=full.queue_name,
            queue_time=full.queue_time or ms_to_datetime(0),
            schedule=full.schedule,
            status=status,
            tries=tries,
            status_message="" if msg is None else text(msg),
            error=None if err is None else text(err),
        )

    # -- navigation and actions -----------------------------------------------------

    def stage(self) -> StagedGroupStage:
        """The stage the job belongs to (the seed's ``staged_group_stage``)."""
        from astages.group import StagedGroup
        from astages.stage import StagedGroupStage

        store, ref = self._bound()
        return StagedGroupStage(StagedGroup(store, ref.group_id), ref.stage)

    async def enqueue_job(self) -> None:
        """Send the job to arq now: a pending job of a running stage is queued (ahead of
        the stage's jobs not yet sent); a job waiting for a retry is moved to the front of
        its queue. A job of a pending stage is not sent (``StageNotRunning``): it would
        run before the stages ahead of it ended. It goes past its stage's window and rate
        but not past a full max_in_flight cap (``InFlightCapReached``)."""
        store, ref = self._bound()
        outcome = text(await store.run("enqueue_job", ref.group_id, ref.stage, ref.seq))
        if outcome == "gone":
            raise JobNotFound(str(self.id))
        if outcome == "not_running":
            raise StageNotRunning(ref.group_id, ref.stage)
        if outcome == "capped":
            raise InFlightCapReached(str(self.id))
        if outcome in ("final", "busy"):
            raise JobNotPending(str(self.id), (await self.status()).value)

    async def outcome(self, *, settle: float = RESULT_SETTLE) -> JobResult:
        """What the job gave, as a JobResult (see its doc for the reasons a value is
        missing); never raises for a missing result. Works after the job's group ended and
        was deleted while arq still keeps the result."""
        if self.blank:
            raise JobNotFound("(a job that is not part of a stage)")
        store, ref = self._bound()
        await store.flush()
        (result,) = await read_results(store, [ref], settle)
        return result

    async def result(self, *, settle: float = RESULT_SETTLE) -> Any:
        """The job's result: what its function returned, read from arq's kept result
        (``arq:result:<id>``), which arq keeps for ``keep_result`` seconds (3600 by
        default; ``keep_result_forever``; per function with ``arq.func(...,
        keep_result=)``). Raises JobFailed (with the job's error) for a failed job, and
        ResultNotAvailable with ``reason`` ``not_final``, ``cancelled``, ``not_kept``,
        ``being_written``, ``unreadable`` or ``gone`` otherwise (see JobResult). A job
        astages records as ended whose result arq is still writing is waited for, up
        to ``settle`` seconds."""
        return (await self.outcome(settle=settle)).unwrap()

    async def retry(self) -> None:
        """Run a failed job again: it goes back to ``queued`` and to arq under the same id
        (a new arq record and queue entry, due now; arq's kept result and try counter for
        the id are cleared, so arq runs it from try 1 with its full ``max_tries``); its
        error is dropped, the stage's counters move (one failure less, one retry more), and
        a job event (failed to queued, ``retry``) is written; all in one atomic call.

        Allowed while the job's stage runs and its group has not ended: a stage completes
        once its last job is final, so a failed job is retried while other jobs of its
        stage are still open. A job that fails again is a new failure for the failure
        policy (it counts the stage's failed jobs at that moment); ``on_failure`` callbacks
        still fire once per group. Otherwise raises NotRetryable with the reason (a job
        that is not failed, a stage complete, cancelled or not started, an ended group, a
        failed try whose end arq is still writing, or a stage or group whose
        ``max_in_flight`` is reached: a retry passes the window and the rate, never a
        cap), or JobNotFound."""
        store, ref = self._bound()
        code = text(await store.run("retry_jobs", ref.group_id, ref.stage, str(ref.seq)))
        if code == "retried":
            return
        if code in ("gone", "job_gone", "stage_gone"):
            raise JobNotFound(str(self.id))
        raise NotRetryable(f"job {self.id!r}", retry_refusal(code))

    async def delete(self) -> Motion:
        """Delete the job; a job not yet started leaves arq's queue. Deleting the last
        open job of a running stage completes the stage and moves the group on."""
        store, ref = self._bound()
        motion = await store.move("delete_job", ref.group_id, ref.stage, ref.seq)
        if motion.outcome == "gone":
            raise JobNotFound(str(self.id))
        return motion
