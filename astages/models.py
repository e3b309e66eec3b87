"""Statuses, the job spec format and the read-only snapshots astages returns."""

from __future__ import annotations

import datetime as dt
import json
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from astages.exceptions import CorruptRecord, InvalidQueue, InvalidSchedule

__all__ = [
    "Event",
    "FailurePolicy",
    "GroupStatus",
    "GroupSummary",
    "JobInfo",
    "JobStatus",
    "StageInfo",
    "StageProgress",
    "StageStatus",
    "StageSummary",
]


class JobStatus(str, Enum):
    """Where a staged job is in its life (the seed's statuses)."""

    PENDING = "pending"
    QUEUED = "queued"
    RUNNING = "running"
    PENDING_RE_RUN = "pending_re_run"
    FAILED = "failed"
    SUCCESSFUL = "successful"
    CANCELLED = "cancelled"

    @property
    def completed(self) -> bool:
        """Failed, successful or cancelled: the job is final."""
        return self in (JobStatus.FAILED, JobStatus.SUCCESSFUL, JobStatus.CANCELLED)

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
    CANCELLED = "cancelled"

    @property
    def ended(self) -> bool:
        return self in (StageStatus.COMPLETE, StageStatus.CANCELLED)


class GroupStatus(str, Enum):
    """A group is pending until initiated, running, then ends complete (every job
    final), failed (stopped by its failure policy) or cancelled. An ended group is only
    seen when it was made with ``keep_for``; otherwise it deletes itself."""

    PENDING = "pending"
    RUNNING = "running"
    COMPLETE = "complete"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def ended(self) -> bool:
        return self in (GroupStatus.COMPLETE, GroupStatus.FAILED, GroupStatus.CANCELLED)


# One-letter codes the scripts store (see lua/_lib.lua), with the try number after it.
CODES = {
    "p": JobStatus.PENDING,
    "q": JobStatus.QUEUED,
    "r": JobStatus.RUNNING,
    "e": JobStatus.PENDING_RE_RUN,
    "s": JobStatus.SUCCESSFUL,
    "f": JobStatus.FAILED,
    "c": JobStatus.CANCELLED,
}


def decode_code(code: bytes | str) -> tuple[JobStatus, int]:
    """A stored status code as (status, try number; 0 when not run yet)."""
    raw = code.decode() if isinstance(code, bytes) else code
    try:
        return CODES[raw[0]], int(raw[1:] or 0)
    except (KeyError, IndexError, ValueError):
        raise CorruptRecord("a job's status", f"{raw!r} is not a job status code") from None


def ms_to_datetime(ms: int) -> dt.datetime:
    return dt.datetime.fromtimestamp(ms / 1000, tz=dt.UTC)


def now_ms() -> int:
    return int(dt.datetime.now(tz=dt.UTC).timestamp() * 1000)


# Bounds of a job's schedule (lua/_lib.lua checks the same before it sends a job): a time
# between epoch 0 and 3000-01-01 UTC, a delay or an expiry of at most 100 years. Within
# them every score and TTL the scripts compute is a whole number Redis accepts.
MAX_TIME_MS = 32_503_680_000_000
MAX_DELAY_MS = 3_155_760_000_000


@dataclass(frozen=True, slots=True)
class Schedule:
    """When a job goes to arq's queue once sent: now, at a time, or after a delay."""

    kind: str = "n"  # "n" now, "a" at epoch ms, "i" in ms after it is sent
    ms: int = 0
    expires_ms: int = 0  # arq's _expires; 0 means arq's default

    def check(self) -> None:
        """Raise ValueError unless this schedule is one the scripts can send."""
        if self.kind not in ("n", "a", "i"):
            raise ValueError(f"{self.kind!r} is not a schedule kind")
        if self.kind == "a" and not 0 <= self.ms <= MAX_TIME_MS:
            raise ValueError(f"time {self.ms} ms is not between epoch 0 and the year 3000")
        if self.kind == "i" and not -MAX_DELAY_MS <= self.ms <= MAX_DELAY_MS:
            raise ValueError(f"delay {self.ms} ms is longer than 100 years")
        if not 0 <= self.expires_ms <= MAX_DELAY_MS:
            raise ValueError(f"expiry {self.expires_ms} ms is not between 0 and 100 years")

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
    try:
        schedule.check()
    except ValueError as e:
        raise InvalidSchedule(schedule, f"a job's schedule must be one astages can send ({e})") from None
    q = queue.encode()
    return f"{schedule.kind}{schedule.ms}|{schedule.expires_ms}|{len(q)}|".encode() + q + payload


def decode_spec(spec: bytes) -> tuple[Schedule, str, bytes]:
    head, rest = spec.split(b"|", 1)
    expires, rest = rest.split(b"|", 1)
    qlen, rest = rest.split(b"|", 1)
    n = int(qlen)
    schedule = Schedule(head[:1].decode(), int(head[1:]), int(expires))
    schedule.check()  # out of range: the record is unusable (a ValueError, as a bad number)
    if not 0 < n <= len(rest):
        raise ValueError("the queue name is cut short")
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
    cancelled: int = 0
    retried: int = 0  # retries so far (a job retried twice counts 2)

    @property
    def total(self) -> int:
        return self.finished + self.pending + self.queued + self.running + self.pending_re_run

    @property
    def finished(self) -> int:
        return self.successful + self.failed + self.cancelled

    @property
    def open(self) -> int:
        return self.total - self.finished

    @property
    def in_flight(self) -> int:
        """Jobs sent to arq and not final: queued, running or waiting for a retry (what
        a window and a max_in_flight cap bound)."""
        return self.queued + self.running + self.pending_re_run

    @property
    def waiting(self) -> int:
        """Jobs not sent yet (pending): of a running stage, those waiting for its window,
        a cap or a rate (see ``StageInfo.held``)."""
        return self.pending

    @classmethod
    def of(cls, raw: dict[bytes, bytes]) -> StageProgress:
        def get(name: str) -> int:
            return int(raw.get(name.encode(), 0))

        return cls(*(get(name) for name in cls.__slots__))

    def __add__(self, other: StageProgress) -> StageProgress:
        return StageProgress(*(getattr(self, n) + getattr(other, n) for n in self.__slots__))

    def as_dict(self) -> dict[str, int]:
        return {name: getattr(self, name) for name in self.__slots__} | {"total": self.total}


def _held(raw: dict[bytes, bytes]) -> str | None:
    """What holds a running stage's waiting jobs back, from its hash (None: nothing)."""
    held = raw.get(b"held")
    if not held or raw.get(b"status") != b"running" or int(raw.get(b"pending", 0)) == 0:
        return None
    return held.decode(errors="replace")


@dataclass(frozen=True, slots=True)
class StageInfo:
    """A stage at one moment: status, times, counts and name (one Redis read)."""

    number: int
    status: StageStatus
    created: dt.datetime | None
    started: dt.datetime | None
    finished: dt.datetime | None
    progress: StageProgress
    name: str | None = None  # the name it was given (group.stage(n, name=...)), if any
    # Flow control (set_limits): the stage's own cap and rate, and what held it back at
    # its last top-up while jobs waited ('window', 'stage_cap', 'group_cap', 'rate'; None
    # when nothing did: every job sent, or the stage not running).
    max_in_flight: int | None = None
    rate: str | None = None
    held: str | None = None

    @property
    def label(self) -> str:
        """``stage 2`` or ``stage 2 (fetch)``: how the stage is shown."""
        return f"stage {self.number}" + ("" if self.name is None else f" ({self.name})")

    @property
    def duration(self) -> dt.timedelta | None:
        """From start to end (or to now while it runs); None before it starts."""
        if self.started is None:
            return None
        end = self.finished or dt.datetime.now(tz=dt.UTC)
        return end - self.started

    @classmethod
    def of(cls, number: int, raw: dict[bytes, bytes]) -> StageInfo:
        def when(name: str) -> dt.datetime | None:
            value = raw.get(name.encode())
            return None if value is None else ms_to_datetime(int(value))

        return cls(
            number=number,
            status=StageStatus(raw[b"status"].decode()),
            created=when("created"),
            started=when("started"),
            finished=when("finished"),
            progress=StageProgress.of(raw),
            name=None if raw.get(b"name") is None else raw[b"name"].decode(errors="replace"),
            max_in_flight=None if raw.get(b"max_in_flight") is None else int(float(raw[b"max_in_flight"])),
            rate=None if raw.get(b"rate") is None else raw[b"rate"].decode(errors="replace"),
            held=_held(raw),
        )


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


@dataclass(frozen=True, slots=True)
class FailurePolicy:
    """When failures stop a group. The default, ``continue``, is the seed's: a failed
    job counts as complete and the next stage still runs. Otherwise the group halts
    (its unfinished jobs are cancelled, later stages never start, it ends ``failed``)
    when a stage has more than ``max_failed`` failed jobs, or when more than
    ``max_ratio`` (0..1) of a stage's jobs failed."""

    max_failed: int | None = None
    max_ratio: float | None = None

    def __post_init__(self) -> None:
        if self.max_failed is not None and (isinstance(self.max_failed, bool) or self.max_failed < 0):
            raise ValueError(f"max_failed must be an int >= 0, not {self.max_failed!r}")
        if self.max_ratio is not None and not 0 <= self.max_ratio < 1:
            raise ValueError(f"max_ratio must be in [0, 1), not {self.max_ratio!r}")

    @classmethod
    def of(cls, value: FailurePolicy | str | None) -> FailurePolicy:
        """A policy from ``"continue"``, ``"halt"`` (the first failure halts) or itself."""
        if value is None or value == "continue":
            return cls()
        if value == "halt":
            return cls(max_failed=0)
        if isinstance(value, FailurePolicy):
            return value
        raise ValueError(f"a failure policy is 'continue', 'halt' or a FailurePolicy, not {value!r}")

    def script_args(self) -> tuple[int | float, int | float]:
        return (
            -1 if self.max_failed is None else self.max_failed,
            -1 if self.max_ratio is None else self.max_ratio,
        )


@dataclass(frozen=True, slots=True)
class StageSummary:
    number: int
    status: str
    total: int
    successful: int
    failed: int
    cancelled: int
    retried: int
    started: dt.datetime | None
    finished: dt.datetime | None
    name: str | None = None  # the stage's name, if it was given one

    @property
    def label(self) -> str:
        """``stage 2`` or ``stage 2 (fetch)``: how the stage is shown."""
        return f"stage {self.number}" + ("" if self.name is None else f" ({self.name})")


@dataclass(frozen=True, slots=True)
class GroupSummary:
    """What a group came to: sent to callbacks, returned by ``wait()``, kept on a group
    made with ``keep_for``. ``outcome`` is complete, failed, cancelled, or running for
    a failure or stage callback (the group goes on); ``stage`` is set for a stage callback."""

    group_id: str
    description: str
    outcome: str
    at: dt.datetime
    stages: tuple[StageSummary, ...]
    failed_jobs: tuple[str, ...]
    stage: int | None = None

    @property
    def successful(self) -> int:
        return sum(s.successful for s in self.stages)

    @property
    def failed(self) -> int:
        return sum(s.failed for s in self.stages)

    @property
    def cancelled(self) -> int:
        return sum(s.cancelled for s in self.stages)

    @classmethod
    def from_json(cls, raw: bytes | str) -> GroupSummary:
        data = json.loads(raw)

        def when(value: Any) -> dt.datetime | None:
            return None if value is None else ms_to_datetime(int(value))

        stages = data.get("stages") or []
        return cls(
            group_id=str(data["group_id"]),
            description=str(data.get("description") or data["group_id"]),
            outcome=str(data["outcome"]),
            at=ms_to_datetime(int(data.get("at") or 0)),
            stages=tuple(
                StageSummary(
                    number=int(s["number"]),
                    status=str(s.get("status")),
                    total=int(s.get("total", 0)),
                    successful=int(s.get("successful", 0)),
                    failed=int(s.get("failed", 0)),
                    cancelled=int(s.get("cancelled", 0)),
                    retried=int(s.get("retried", 0)),
                    started=when(s.get("started")),
                    finished=when(s.get("finished")),
                    name=None if s.get("name") is None else str(s["name"]),
                )
                for s in (stages if isinstance(stages, list) else [])
            ),
            failed_jobs=tuple(data.get("failed_jobs") or ()),  # cjson writes [] as {}
            stage=None if data.get("stage") is None else int(data["stage"]),
        )


@dataclass(frozen=True, slots=True)
class Event:
    """One entry of a group's event timeline: a job or stage transition."""

    id: str
    at: dt.datetime
    kind: str  # job, stage or group
    subject: str  # "<stage>:<seq>" for a job, the stage number, or the group id
    from_status: str | None
    to_status: str
    details: dict[str, str]

    @classmethod
    def of(cls, entry_id: bytes | str, fields: dict[bytes, bytes]) -> Event:
        eid = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
        data = {k.decode(): v.decode(errors="replace") for k, v in fields.items()}
        kind = next((k for k in ("job", "stage", "group") if k in data), "group")
        subject = data.pop(kind, "")
        from_status = data.pop("from", None)
        to_status = data.pop("to", "")
        return cls(eid, ms_to_datetime(int(eid.split("-")[0])), kind, subject, from_status, to_status, data)
