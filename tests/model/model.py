"""A small pure-Python model of astages' state machine (see test_stateful.py).

It knows nothing of Redis: groups, stages and jobs with their statuses and try numbers,
which jobs arq holds (queue entry + job record), which callbacks fired. Each operation
returns what the real call must do: ``None`` (it succeeds) or the exception class it must
raise. The rules are the intended semantics (issue 10), read from the scripts' headers
and the README, not from their code paths.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from astages.exceptions import (
    AstagesError,
    GroupFinished,
    GroupNotFound,
    JobNotFound,
    JobNotPending,
    StageComplete,
    StageNotFound,
)

STATUS = {
    "p": "pending",
    "q": "queued",
    "r": "running",
    "e": "pending_re_run",
    "s": "successful",
    "f": "failed",
    "c": "cancelled",
}
OPEN = frozenset("pqre")
FINAL = frozenset("sfc")
ENDED = frozenset({"complete", "failed", "cancelled"})


@dataclass(eq=False)
class JobM:
    handle: Any  # the StagedJob enqueue returned
    group: GroupM
    stage: int
    seq: int
    code: str = "p"  # one letter of STATUS
    tries: int = 0
    in_arq: bool = False  # arq's queue entry and job record exist
    in_progress: bool = False  # arq has a run under way (arq:in-progress:<id>)
    deleted: bool = False
    concurrent: bool = False  # recorded by calls made at once (no order among them)

    def __repr__(self) -> str:
        return f"<job {self.group.gid[-6:]}:{self.stage}:{self.seq} {self.stored}{' arq' if self.in_arq else ''}>"

    @property
    def stored(self) -> str:
        """The code the stage's :open/:done hash holds ("p", "q", "r2", "s1", ...)."""
        return self.code if self.code in "pq" else f"{self.code}{self.tries}"

    @property
    def alive(self) -> bool:
        return not self.deleted and self.group.alive

    @property
    def final(self) -> bool:
        return self.code in FINAL


@dataclass(eq=False)
class StageM:
    number: int
    status: str = "pending"
    jobs: list[JobM] = field(default_factory=list)
    retried: int = 0
    max_failed: int | None = None  # the stage's own policy (None: the group's)

    def open_jobs(self) -> list[JobM]:
        return [j for j in self.jobs if j.code in OPEN]

    def count(self, code: str) -> int:
        return sum(1 for j in self.jobs if j.code == code)


@dataclass(eq=False)
class GroupM:
    handle: Any  # the StagedGroup
    keep_for: int
    ttl: bool
    max_failed: int  # -1: continue
    status: str = "pending"
    stages: dict[int, StageM] = field(default_factory=dict)
    callbacks: dict[str, str] = field(default_factory=dict)  # field -> event
    fired: set[str] = field(default_factory=set)  # callback fields enqueued so far
    failed_once: bool = False
    deleted: bool = False  # deleted, ended without keep_for, or expired
    expired: bool = False
    ends: int = 0  # how often the group ended (must stay <= 1)

    def __repr__(self) -> str:
        stages = {n: (s.status, [j.stored for j in s.jobs]) for n, s in sorted(self.stages.items())}
        policy = f"keep={self.keep_for} ttl={self.ttl} max_failed={self.max_failed}"
        return f"<group {self.gid[-6:]} {self.status} {policy} {stages}>"

    @property
    def gid(self) -> str:
        return str(self.handle.id)

    @property
    def alive(self) -> bool:
        """Its hash exists (pending, running, or ended and kept)."""
        return not self.deleted

    @property
    def ended(self) -> bool:
        return self.status in ENDED

    def numbers(self) -> list[int]:
        return sorted(self.stages)


class Model:
    """Every transition of the model; ``fired`` collects callbacks enqueued by a step."""

    def __init__(self) -> None:
        self.groups: list[GroupM] = []
        self.jobs: list[JobM] = []
        self.fired_now: list[tuple[GroupM, str]] = []

    # -- helpers (the model's own advance; see README "How it works") ---------------

    def _send(self, job: JobM) -> None:
        job.code, job.in_arq = "q", True

    def _unsend(self, job: JobM) -> None:
        job.in_arq = False

    def _fire(self, g: GroupM, event: str) -> None:
        for fld, ev in g.callbacks.items():
            if ev == event:
                self.fired_now.append((g, fld))

    def _complete_stage(self, g: GroupM, s: StageM) -> None:
        s.status = "complete"
        self._fire(g, f"stage.{s.number}")

    def _cancel_stage(self, g: GroupM, s: StageM) -> None:
        for j in s.open_jobs():
            # a run arq has under way is asked to abort; any other try leaves arq's queue
            if j.code in "qe" or (j.code == "r" and not j.in_progress):
                self._unsend(j)
            j.code = "c"
        s.status = "cancelled"
        self._fire(g, f"stage.{s.number}")

    def _finish_group(self, g: GroupM, outcome: str) -> None:
        bad = any(j.code in "fc" for s in g.stages.values() for j in s.jobs)
        self._fire(g, "complete")
        if outcome == "complete" and not bad:
            self._fire(g, "success")
        g.status = outcome
        g.ends += 1
        if not g.keep_for:
            g.deleted = True

    def _advance(self, g: GroupM) -> None:
        while True:
            running = [g.stages[n] for n in g.numbers() if g.stages[n].status == "running"]
            if running:
                for s in running:
                    for j in s.jobs:
                        if j.code == "p":
                            self._send(j)
                return
            pending = [g.stages[n] for n in g.numbers() if g.stages[n].status == "pending"]
            if not pending:
                self._finish_group(g, "complete")
                return
            s = pending[0]
            s.status = "running"
            for j in s.jobs:
                if j.code == "p":
                    self._send(j)
            if s.open_jobs():
                return
            self._complete_stage(g, s)

    def _after_job_left(self, g: GroupM, s: StageM) -> None:
        if s.status != "running" or s.open_jobs():
            return
        self._complete_stage(g, s)
        if g.status == "running":
            self._advance(g)

    def _stop(self, g: GroupM, outcome: str) -> None:
        for n in g.numbers():
            if g.stages[n].status in ("pending", "running"):
                self._cancel_stage(g, g.stages[n])
        self._finish_group(g, outcome)

    def _breached(self, g: GroupM, s: StageM) -> bool:
        limit = s.max_failed if s.max_failed is not None else g.max_failed
        return limit >= 0 and s.count("f") > limit

    # -- operations ---------------------------------------------------------------------

    def create_group(self, handle: Any, keep_for: int, ttl: bool, max_failed: int) -> GroupM:
        g = GroupM(handle, keep_for, ttl, max_failed)
        self.groups.append(g)
        return g

    def ensure_stage(self, g: GroupM, n: int) -> type[AstagesError] | None:
        if not g.alive:
            return GroupNotFound
        if n in g.stages:
            return None
        if g.ended:
            return GroupFinished
        g.stages[n] = StageM(n)
        return None

    def _stage_error(self, g: GroupM, n: int) -> type[AstagesError] | None:
        if not g.alive:
            return GroupNotFound
        s = g.stages.get(n)
        if s is None:
            return StageNotFound
        if s.status in ("complete", "cancelled"):
            return StageComplete
        return None

    def enqueue_error(self, g: GroupM, n: int) -> type[AstagesError] | None:
        return self._stage_error(g, n)

    def enqueued(self, g: GroupM, n: int, handles: list[Any]) -> list[JobM]:
        """Record jobs the real enqueue returned (in their recorded order)."""
        s = g.stages[n]
        out = []
        for h in handles:
            j = JobM(h, g, n, int(h.ref.seq))
            s.jobs.append(j)
            self.jobs.append(j)
            if s.status == "running":
                self._send(j)
            out.append(j)
        return out

    def add_callback(self, g: GroupM, event: str) -> type[AstagesError] | None:
        """Checks only; the caller then registers the field it found (``registered``)."""
        if not g.alive:
            return GroupNotFound
        if g.ended:
            return GroupFinished
        if event.startswith("stage."):
            s = g.stages.get(int(event.split(".", 1)[1]))
            if s is None:
                return StageNotFound
            if s.status in ("complete", "cancelled"):
                return StageComplete
        return None

    def registered(self, g: GroupM, fld: str, event: str) -> None:
        g.callbacks[fld] = event
        if event == "failure" and g.failed_once:
            self.fired_now.append((g, fld))

    def initiate_group(self, g: GroupM) -> type[AstagesError] | None:
        if not g.alive:
            return GroupNotFound
        if g.ended:
            return None
        g.status = "running"
        self._advance(g)
        return None

    def initiate_stage(self, g: GroupM, n: int) -> type[AstagesError] | None:
        err = self._stage_error(g, n)
        if err:
            return err
        s = g.stages[n]
        g.status = "running"
        s.status = "running"
        for j in s.jobs:
            if j.code == "p":
                self._send(j)
        self._after_job_left(g, s)
        return None

    def cancel_stage(self, g: GroupM, n: int) -> type[AstagesError] | None:
        err = self._stage_error(g, n)
        if err:
            return err
        self._cancel_stage(g, g.stages[n])
        if g.status == "running":
            self._advance(g)
        return None

    def cancel_group(self, g: GroupM) -> type[AstagesError] | None:
        if not g.alive:
            return GroupNotFound
        if not g.ended:
            self._stop(g, "cancelled")
        return None

    def delete_group(self, g: GroupM) -> bool:
        if not g.alive:
            return False
        for s in g.stages.values():
            for j in s.jobs:
                if j.code in "qe":
                    self._unsend(j)
        g.deleted = True
        return True

    def delete_stage(self, g: GroupM, n: int) -> type[AstagesError] | None:
        if not g.alive or n not in g.stages:
            return StageNotFound
        s = g.stages.pop(n)
        for j in s.jobs:
            j.deleted = True
            if j.code in "qe":
                self._unsend(j)
        if g.status == "running":
            self._advance(g)
        return None

    def delete_job(self, j: JobM) -> type[AstagesError] | None:
        g = j.group
        if not j.alive:
            return JobNotFound
        s = g.stages[j.stage]
        was_open = j.code in OPEN
        if j.code in "qe":
            self._unsend(j)
        j.deleted = True
        s.jobs.remove(j)
        if was_open:
            self._after_job_left(g, s)
        return None

    def enqueue_job(self, j: JobM) -> type[AstagesError] | None:
        """Intended: only a pending job of a running stage is sent."""
        if not j.alive:
            return JobNotFound
        if j.final or j.code in "qr":
            return JobNotPending
        if j.code == "p":
            if j.group.stages[j.stage].status != "running":
                return AstagesError  # the stage has not started: never send it early
            self._send(j)
        return None  # 'e': moved to the front of its queue

    def start_job(self, j: JobM, tries: int) -> str:
        if not j.alive:
            return "gone"
        if j.final:
            return "final"
        j.code, j.tries = "r", tries
        return "run"

    def finish_job(self, j: JobM, tries: int, outcome: str) -> str:
        g = j.group
        if not j.alive:
            return "gone"
        if j.final:
            return "dup"
        if j.tries > tries:
            return "stale"
        s = g.stages[j.stage]
        if outcome == "e":
            if j.code == "e" and j.tries == tries:
                return "dup"
            j.code, j.tries = "e", tries
            s.retried += 1
            return "retry"
        j.code, j.tries = outcome, tries
        if outcome == "f":
            if not g.failed_once:
                g.failed_once = True
                self._fire(g, "failure")
            if not g.ended and self._breached(g, s):
                self._stop(g, "failed")
                return "finished"
        self._after_job_left(g, s)
        return "moved"
