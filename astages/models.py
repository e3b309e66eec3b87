"""Statuses, the job spec format and the read-only snapshots astages returns."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from astages.exceptions import InvalidQueue

__all__ = ["JobInfo", "JobStatus", "StageProgress", "StageStatus"]


class JobStatus(str, Enum):
    """Where a staged job is in its life (the seed's statuses)."""

    PENDING = "pending"
    QUEUED = "queued"
    RUNNING = "running"
    PENDING_RE_RUN = "pending_re_run"
    FAILED = "failed"
    SUCCESSFUL = "successful"

    @property
    def completed(self) -> bool:
        """Failed or successful: the job is final."""
        return self in (JobStatus.FAILED, JobStatus.SUCCESSFUL)

    @property
    def queued(self) -> bool:
        """Handed to arq: queued, running or waiting for a retry."""
        return self in (JobStatus.QUEUED, JobStatus.RUNNING, JobStatus.PENDING_RE_RUN)

    @property
    def pending(self) -> bool:
        """Waiting to run: pending or waiting for a retry."""
        return self in (JobStatus.PENDING, JobStatus.PENDING_RE_RUN)


class StageStatus(str, Enum):
    PENDING = "pending"
    RUNNING = "running"
    COMPLETE = "complete"


# One-letter codes the scripts store (see lua/_lib.lua), with the try number after it.
CODES = {
    "p": JobStatus.PENDING,
    "q": JobStatus.QUEUED,
    "r": JobStatus.RUNNING,
    "e": JobStatus.PENDING_RE_RUN,
    "s": JobStatus.SUCCESSFUL,
    "f": JobStatus.FAILED,
}


def decode_code(code: bytes | str) -> tuple[JobStatus, int]:
    """A stored status code as (status, try number; 0 when not run yet)."""
    raw = code.decode() if isinstance(code, bytes) else code
    status = CODES[raw[0]]
    return status, int(raw[1:] or 0)


def ms_to_datetime(ms: int) -> dt.datetime:
    return dt.datetime.fromtimestamp(ms / 1000, tz=dt.UTC)


def now_ms() -> int:
    return int(dt.datetime.now(tz=dt.UTC).timestamp() * 1000)


@dataclass(frozen=True, slots=True)
class Schedule:
    """When a job goes to arq's queue once sent: now, at a time, or after a delay."""

    kind: str = "n"  # "n" now, "a" at epoch ms, "i" in ms after it is sent
    ms: int = 0
    expires_ms: int = 0  # arq's _expires; 0 means arq's default

    def describe(self) -> str:
        if self.kind == "a":
            return f"at {ms_to_datetime(self.ms).isoformat()}"
        if self.kind == "i":
            return f"{self.ms / 1000:g}s after it is sent"
        return "when its stage starts"


def encode_spec(schedule: Schedule, queue: str, payload: bytes) -> bytes:
    """``<kind><ms>|<expires>|<queue length>|<queue><payload>``, as lua/_lib.lua parses it."""
    if not isinstance(queue, str) or not queue:
        raise InvalidQueue(queue)
    q = queue.encode()
    return f"{schedule.kind}{schedule.ms}|{schedule.expires_ms}|{len(q)}|".encode() + q + payload


def decode_spec(spec: bytes) -> tuple[Schedule, str, bytes]:
    head, rest = spec.split(b"|", 1)
    expires, rest = rest.split(b"|", 1)
    qlen, rest = rest.split(b"|", 1)
    n = int(qlen)
    schedule = Schedule(head[:1].decode(), int(head[1:]), int(expires))
    return schedule, rest[:n].decode(), rest[n:]


@dataclass(frozen=True, slots=True)
class StageProgress:
    """Counts of a stage's jobs per status, read in O(1) from the stage's counters."""

    pending: int = 0
    queued: int = 0
    running: int = 0
    pending_re_run: int = 0
    successful: int = 0
    failed: int = 0
    retried: int = 0  # retries so far (a job retried twice counts 2)

    @property
    def total(self) -> int:
        return self.pending + self.queued + self.running + self.pending_re_run + self.successful + self.failed

    @property
    def finished(self) -> int:
        return self.successful + self.failed

    @property
    def open(self) -> int:
        return self.total - self.finished

    @classmethod
    def of(cls, raw: dict[bytes, bytes]) -> StageProgress:
        def get(name: str) -> int:
            return int(raw.get(name.encode(), 0))

        return cls(*(get(name) for name in cls.__slots__))

    def as_dict(self) -> dict[str, int]:
        return {name: getattr(self, name) for name in self.__slots__} | {"total": self.total}


@dataclass(frozen=True, slots=True)
class JobInfo:
    """Everything known about a staged job at one moment."""

    id: str
    group_id: str
    stage: int
    function: str
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    queue_name: str
    queue_time: dt.datetime
    schedule: Schedule
    status: JobStatus
    tries: int
    status_message: str
    error: str | None = field(default=None)
