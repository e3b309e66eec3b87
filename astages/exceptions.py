"""The errors astages raises. Every one is an ``AstagesError``::

AstagesError
├── GroupNotFound          the group does not exist (never created, deleted or finished)
├── StageNotFound          the stage does not exist in its group (or was deleted)
├── JobNotFound            the staged job does not exist (or was deleted)
├── GroupFinished          the group ended (it was kept with keep_for) and takes no changes
├── StageComplete          a complete (or cancelled) stage takes no new jobs, callbacks,
│                          cancel or start
├── JobNotPending          the job cannot be sent to arq in its current status
├── StageNotRunning        a job of a stage that has not started cannot be sent
├── InFlightCapReached     a job cannot be sent now: its stage's or group's
│                          max_in_flight is reached (it is sent in its turn)
├── InvalidStageNumber     a stage number that is not an int
├── InvalidStageName       a stage name that is not a short, non-empty str
├── InvalidJobFunction     neither a function name nor a coroutine function
│   └── InvalidJobOption   an arq option astages sets itself (_job_id)
├── InvalidStatusMessage   a status message that is not a str, or too long
├── InvalidQueue           a queue name astages cannot store
├── InvalidSchedule        a time or delay that is not one
├── CorruptRecord          data under an astages key that astages did not write
├── RetriesExhausted       (raised inside a worker) a Retry on the last allowed try
├── JobNotRun              (raised inside a worker) arq delivered a staged job that no
│                          longer exists or already ended; it is not run
├── NotRetryable           a job (or a stage's failed jobs) that cannot be retried now,
│                          with the reason
└── ResultNotAvailable     a job has no result to give (not final yet, cancelled, not
    │                      kept by arq or expired, or gone), with the reason
    └── JobFailed          the job failed: its error instead of a result
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "AstagesError",
    "CorruptRecord",
    "GroupFinished",
    "GroupNotFound",
    "InFlightCapReached",
    "InvalidJobFunction",
    "InvalidJobOption",
    "InvalidQueue",
    "InvalidSchedule",
    "InvalidStageName",
    "InvalidStageNumber",
    "InvalidStatusMessage",
    "JobNotFound",
    "JobNotPending",
    "JobFailed",
    "JobNotRun",
    "NotRetryable",
    "ResultNotAvailable",
    "RetriesExhausted",
    "StageComplete",
    "StageNotFound",
    "StageNotRunning",
]


def _rebuild(cls: type[AstagesError], args: tuple[Any, ...]) -> AstagesError:
    """Unpickle an astages error without calling its ``__init__`` (whose parameters are
    not its ``args``); its attributes come back through ``__setstate__``."""
    error = cls.__new__(cls)
    error.args = args
    return error


class AstagesError(Exception):
    """Base class of every error astages raises.

    Every subclass pickles with its message and attributes (arq pickles a failed job's
    exception into its result), whatever its ``__init__`` takes."""

    def __reduce__(self) -> tuple[Any, ...]:
        return (_rebuild, (type(self), self.args), dict(self.__dict__))


class GroupNotFound(AstagesError):
    def __init__(self, group_id: str) -> None:
        self.group_id = group_id
        super().__init__(
            f"group {group_id!r} does not exist: it was never created, was deleted, "
            "or finished (a finished group deletes itself)"
        )


class StageNotFound(AstagesError):
    def __init__(self, group_id: str, number: int) -> None:
        self.group_id = group_id
        self.number = number
        super().__init__(
            f"stage {number} of group {group_id!r} does not exist (it was deleted); "
            "call group.stage(number) to create a stage"
        )


class JobNotFound(AstagesError):
    def __init__(self, job_id: str) -> None:
        self.job_id = job_id
        super().__init__(f"staged job {job_id!r} does not exist (it was deleted, or its group finished)")


class GroupFinished(AstagesError):
    def __init__(self, group_id: str) -> None:
        self.group_id = group_id
        super().__init__(f"group {group_id!r} has ended (it is kept for reading only); create a new group for new work")


class StageComplete(AstagesError):
    """The stage has ended (``status``: complete or cancelled); ``attempted`` is what was
    refused: ``"enqueue"`` (new jobs or callbacks), ``"cancel"`` or ``"initiate"``."""

    def __init__(self, group_id: str, number: int, status: str = "complete", attempted: str = "enqueue") -> None:
        self.group_id = group_id
        self.number = number
        self.status = status
        self.attempted = attempted
        stage = f"stage {number} of group {group_id!r}"
        if attempted == "cancel":
            text = f"{stage} is {status} already: there is nothing left to cancel"
        elif attempted == "initiate":
            text = f"{stage} is {status} and cannot be started again; put new work in a later stage"
        else:
            text = f"{stage} is {status} and takes no new jobs or callbacks; use a later stage instead"
        super().__init__(text)


class JobNotPending(AstagesError):
    def __init__(self, job_id: str, status: str) -> None:
        self.job_id = job_id
        self.status = status
        super().__init__(f"job {job_id!r} is {status}; only a pending job (or one waiting for a retry) can be sent")


class InvalidStageNumber(AstagesError, TypeError):
    def __init__(self, number: object) -> None:
        self.number = number
        super().__init__(f"a stage number must be an int, not {type(number).__name__} ({number!r})")


class InvalidJobFunction(AstagesError, TypeError):
    def __init__(self, function: object) -> None:
        self.function = function
        super().__init__(
            f"a job function must be a function name (str), an async def function or an "
            f"arq.func(...) object, not {type(function).__name__} ({function!r})"
        )


class InvalidJobOption(InvalidJobFunction):
    """An arq enqueue option astages sets itself for staged jobs (``_job_id``)."""

    def __init__(self, option: str) -> None:
        self.function = None
        self.option = option
        Exception.__init__(
            self,
            f"{option}= is not accepted for a staged job: astages chooses the arq job id of every job it "
            "stages (the returned job's .id tells it); to choose an id yourself, enqueue a plain arq job "
            "with redis.enqueue_job",
        )


class InvalidStageName(AstagesError, ValueError):
    def __init__(self, name: object, limit: int) -> None:
        self.name = name
        self.limit = limit
        if not isinstance(name, str):
            text = f"a stage name must be a str (or None for no name), not {type(name).__name__} ({name!r})"
        elif not name.strip():
            text = "a stage name must not be empty (give None for a stage without a name)"
        else:
            text = f"a stage name is limited to {limit} characters, this one has {len(name)}"
        super().__init__(text)


class InvalidStatusMessage(AstagesError, ValueError):
    def __init__(self, message: object, limit: int) -> None:
        self.limit = limit
        if isinstance(message, str):
            text = f"a status message is limited to {limit} characters, this one has {len(message)}"
        else:
            text = f"a status message must be a str, not {type(message).__name__}"
        super().__init__(text)


class InvalidQueue(AstagesError, ValueError):
    def __init__(self, queue: object) -> None:
        self.queue = queue
        super().__init__(f"a queue name must be a non-empty str, not {queue!r}")


class InvalidSchedule(AstagesError, TypeError):
    def __init__(self, value: object, expected: str) -> None:
        self.value = value
        super().__init__(f"{expected}, not {type(value).__name__} ({value!r})")


class CorruptRecord(AstagesError):
    def __init__(self, key: str, detail: str) -> None:
        self.key = key
        self.detail = detail
        super().__init__(f"the record under {key!r} was not written by astages: {detail}")


class RetriesExhausted(AstagesError):
    def __init__(self, max_tries: int) -> None:
        self.max_tries = max_tries
        super().__init__(f"max {max_tries} retries exceeded")


class StageNotRunning(AstagesError):
    def __init__(self, group_id: str, number: int) -> None:
        self.group_id = group_id
        self.number = number
        super().__init__(
            f"stage {number} of group {group_id!r} has not started, so its jobs are not sent yet (one sent now "
            "would run before the stages ahead of it ended); initiate the group, or the stage"
        )


class InFlightCapReached(AstagesError):
    def __init__(self, job_id: str) -> None:
        self.job_id = job_id
        super().__init__(
            f"job {job_id!r} is not sent now: its stage's or group's max_in_flight is reached; it is sent "
            "in its turn, or raise the cap (set_limits)"
        )


class JobNotRun(AstagesError):
    """(raised inside a worker) arq delivered a staged job that astages does not run: it
    no longer exists, or it already ended. arq records this as the job's failed result,
    so the result says why the function did not run (rather than a success with None)."""

    def __init__(self, job_id: str, reason: str) -> None:
        self.job_id = job_id
        self.reason = reason
        super().__init__(f"staged job {job_id!r} was not run: {reason}")


class NotRetryable(AstagesError):
    """A retry was refused: ``what`` is the job id (or "stage <n> of group <id>"),
    ``reason`` says why. Nothing was changed."""

    def __init__(self, what: str, reason: str) -> None:
        self.what = what
        self.reason = reason
        super().__init__(f"{what} cannot be retried: {reason}")


class ResultNotAvailable(AstagesError):
    """``job.result()`` has no value to give. ``reason`` is one of ``not_final`` (the job
    has not ended: pending, queued, running or waiting for a retry), ``cancelled``,
    ``not_kept`` (it ended successfully but arq keeps no result for it: ``keep_result=0``,
    or its ``keep_result`` time ran out), ``being_written`` (it ended and arq has not yet
    written its result; ask again in a moment), ``gone`` (no record of the job and no kept
    result: the job or its stage was deleted, or its group ended and was deleted) or
    ``failed`` (``JobFailed``)."""

    def __init__(self, job_id: str, reason: str, detail: str = "") -> None:
        self.job_id = job_id
        self.reason = reason
        self.detail = detail
        super().__init__(f"job {job_id!r} has no result: {detail or reason}")


class JobFailed(ResultNotAvailable):
    """``job.result()`` of a job that failed: ``error`` is the error it ended with."""

    def __init__(self, job_id: str, error: str) -> None:
        self.error = error
        super().__init__(job_id, "failed", f"it failed: {error}")
        self.args = (f"job {job_id!r} failed: {error}",)
