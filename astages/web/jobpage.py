"""A job's page: astages' record of the job and arq's own (arq:job, arq:result, arq:retry)."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Any

from arq.connections import ArqRedis
from arq.constants import in_progress_key_prefix, retry_key_prefix
from arq.jobs import DeserializationError, Job, JobResult

from astages._scripts import Store, text
from astages.group import StagedGroup
from astages.job import StagedJob
from astages.models import JobInfo, ms_to_datetime
from astages.web._shared import iso, jsonable


@dataclass(frozen=True, slots=True)
class ArqView:
    """arq's own record of a job: its queue entry, try counter, and result once finished."""

    status: str  # arq's JobStatus value
    job_try: int | None
    score: dt.datetime | None  # when arq's queue will run it
    in_progress: bool
    result_known: bool = False
    success: bool | None = None
    result: str | None = None
    start_time: dt.datetime | None = None
    finish_time: dt.datetime | None = None
    problem: str | None = None  # a record arq wrote that this process cannot decode

    def as_json(self) -> dict[str, Any]:
        return {
            "status": self.status,
            "job_try": self.job_try,
            "score": iso(self.score),
            "in_progress": self.in_progress,
            "result_known": self.result_known,
            "success": self.success,
            "result": self.result,
            "start_time": iso(self.start_time),
            "finish_time": iso(self.finish_time),
            "problem": self.problem,
        }


@dataclass(frozen=True, slots=True)
class JobDetail:
    info: JobInfo
    group_description: str
    seq: int
    arq: ArqView
    stage_status: str = ""

    @property
    def sendable(self) -> bool:
        """Queue Job applies: a pending job of a running stage (one of a stage that has
        not started would run before the stages ahead of it)."""
        return self.info.status.value == "pending" and self.stage_status == "running"

    @property
    def retryable(self) -> bool:
        """Retry Job applies: a failed job of a running stage (see ``StagedJob.retry``)."""
        return self.info.status.value == "failed" and self.stage_status == "running"

    @property
    def live(self) -> bool:
        """Handed to arq and not final: queued, running or waiting for a retry."""
        return self.info.status.queued

    def as_json(self) -> dict[str, Any]:
        info = self.info
        return {
            "id": info.id,
            "group": {"id": info.group_id, "description": self.group_description},
            "stage": info.stage,
            "seq": self.seq,
            "function": info.function,
            "args": jsonable(info.args),
            "kwargs": jsonable(info.kwargs),
            "queue_name": info.queue_name,
            "queue_time": iso(info.queue_time),
            "schedule": info.schedule.describe(),
            "status": info.status.value,
            "stage_status": self.stage_status,
            "tries": info.tries,
            "status_message": info.status_message,
            "error": info.error,
            "live": self.live,
            "arq": self.arq.as_json(),
        }


async def arq_view(redis: ArqRedis, job_id: str, queue_name: str) -> ArqView:
    """What arq's own keys say about ``job_id`` (arq:job, arq:result, arq:retry, in-progress)."""
    deserializer = getattr(redis, "job_deserializer", None)
    job = Job(job_id, redis, _queue_name=queue_name, _deserializer=deserializer)
    status = (await job.status()).value
    async with redis.pipeline(transaction=False) as pipe:
        pipe.get(retry_key_prefix + job_id)
        pipe.exists(in_progress_key_prefix + job_id)
        retry, in_progress = await pipe.execute()
    job_try = None if retry is None else int(retry)
    try:
        info = await job.info()
    except DeserializationError as e:
        return ArqView(status, job_try, None, bool(in_progress), problem=str(e))
    if info is None:
        return ArqView(status, job_try, None, bool(in_progress))
    score = None if info.score is None else ms_to_datetime(int(info.score))
    if job_try is None and info.job_try:
        job_try = int(info.job_try)
    if isinstance(info, JobResult):
        return ArqView(
            status,
            job_try if job_try is not None else info.job_try,
            score,
            bool(in_progress),
            result_known=True,
            success=info.success,
            result=_bounded(repr(info.result)),
            start_time=info.start_time,
            finish_time=info.finish_time,
        )
    return ArqView(status, job_try, score, bool(in_progress))


def _bounded(value: str, limit: int = 4_000) -> str:
    return value if len(value) <= limit else value[:limit] + "…"


async def job_detail(store: Store, group_id: str, number: int, seq: int) -> JobDetail:
    """The job page; GroupNotFound / JobNotFound when gone."""
    group = await StagedGroup.load(store.redis, group_id, prefix=store.keys.prefix)
    job_id = store.keys.job_id(group_id, number, seq)
    job = await StagedJob.load(store.redis, job_id, prefix=store.keys.prefix)
    info = await job.info()
    view = await arq_view(store.redis, job_id, info.queue_name)
    stage_status = await store.redis.hget(store.keys.stage(group_id, number), "status")
    return JobDetail(info, group.description, seq, view, "" if stage_status is None else text(stage_status))
