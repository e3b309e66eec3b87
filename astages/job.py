"""StagedJob: one job of a stage, or a plain arq job run outside any stage."""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from arq.jobs import DeserializationError, deserialize_job_raw

from astages._keys import DEFAULT_PREFIX, JobRef, Keys
from astages._scripts import Motion, Store, text
from astages.exceptions import CorruptRecord, InvalidStatusMessage, JobNotFound, JobNotPending, StageNotRunning
from astages.models import JobInfo, JobStatus, Schedule, decode_code, decode_spec, ms_to_datetime

if TYPE_CHECKING:
    from arq.connections import ArqRedis

    from astages.stage import StagedGroupStage

__all__ = ["MESSAGE_LIMIT", "StagedJob"]

# Longest status message, in characters: a message is a status line, not a log.
MESSAGE_LIMIT = 65_536
# The ctx key under which the worker wrapper leaves the running job's handle.
CTX_JOB = "astages_job"


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
        self.schedule = schedule or Schedule()

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
        run before the stages ahead of it ended."""
        store, ref = self._bound()
        outcome = text(await store.run("enqueue_job", ref.group_id, ref.stage, ref.seq))
        if outcome == "gone":
            raise JobNotFound(str(self.id))
        if outcome == "not_running":
            raise StageNotRunning(ref.group_id, ref.stage)
        if outcome in ("final", "busy"):
            raise JobNotPending(str(self.id), (await self.status()).value)

    async def delete(self) -> Motion:
        """Delete the job; a job not yet started leaves arq's queue. Deleting the last
        open job of a running stage completes the stage and moves the group on."""
        store, ref = self._bound()
        motion = await store.move("delete_job", ref.group_id, ref.stage, ref.seq)
        if motion.outcome == "gone":
            raise JobNotFound(str(self.id))
        return motion
