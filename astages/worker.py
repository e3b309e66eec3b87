"""arq glue: the function wrapper and hooks that drive the state machine.

``worker_settings(functions=[...], **arq_options)`` returns a dict arq accepts as worker
settings (``arq app.WorkerSettings``, ``Worker(**settings)``). Each function is wrapped:

- a job whose id is not a staged job id runs untouched (no Redis work at all);
- a staged job is marked running, runs, and reports its outcome; a worker's marks and
  reports share script calls (``Coalescer``). A run that could have ended already (arq
  re-delivers a job when a worker dies between our report and its own clean-up) is
  checked before it runs; a first try (or a retry this worker reported) runs at once
  and its mark rides in the next report call (``_start``). A success or failure does not
  hold its job while the report waits, when arq keeps its result for the sweeper
  (``_report``);
- an outcome the wrapper cannot see (the job was cancelled: a timeout, or the worker
  shutting down) or could not report (Redis unreachable) is settled in
  ``after_job_end`` from arq's own record of the job.

No hook ever raises into arq (an exception in a hook stops arq's worker loop): errors
are logged, and the sweeper finishes what a hook could not.

astages' own calls (start, report, settle, the sweeper, a callback's summary) go through
a client of astages' own, made at worker start-up from arq's pool (same server,
database, credentials) with a reconnect-and-retry policy (``reconnecting_client``): each
is an idempotent script or a read, so sending it again after a lost reply is safe. arq's
pool, which a job gets as ``ctx['redis']``, keeps what the user configured: astages adds
no retry policy to it, so a job's own command is never sent twice behind its back.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import traceback
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass
from typing import Any

from arq import Retry
from arq.constants import default_queue_name, result_key_prefix
from arq.jobs import deserialize_result
from arq.utils import to_seconds
from arq.worker import Function, RetryJob, func
from redis.exceptions import RedisError

from astages import tracing
from astages._keys import DEFAULT_PREFIX, CallbackRef, JobRef, Keys
from astages._scripts import FIRST_CHUNK, Motion, Store, raise_code, text
from astages.exceptions import CorruptRecord, JobNotRun, RetriesExhausted
from astages.job import CTX_JOB, StagedJob
from astages.models import GroupSummary
from astages.runner import reconnecting_client
from astages.sweeper import DEFAULT_GRACE, DEFAULT_INTERVAL, Sweeper

__all__ = ["worker_settings"]

logger = logging.getLogger("astages.worker")

Hook = Callable[[dict[str, Any]], Awaitable[Any]]

# ctx keys the wrapper leaves for after_job_end (one ctx dict per job run).
# CTX_OUTCOME holds this try's outcome once known: ("s" | "f" | "e", error text).
CTX_REF = "astages_ref"
CTX_REPORTED = "astages_reported"
CTX_OUTCOME = "astages_outcome"
CTX_MAX_TRIES = "astages_max_tries"
# worker ctx key of the background sweeper task
CTX_SWEEPER = "astages_sweeper"
# worker ctx key of astages' own client (with the retry policy arq's pool does not get)
CTX_REDIS = "astages_redis"
# worker ctx key of the Coalescer that shares script calls between jobs
CTX_COALESCE = "astages_coalesce"
# worker ctx key of the Store on astages' own client that the worker's jobs share
CTX_STORE = "astages_store"
# worker ctx key of a callable that makes the worker poll at once (astages worker only)
CTX_WAKE = "astages_wake"
# job ctx keys of the lean path (astages worker): the verdict its claim script gave,
# and that its outcome is reported by the script that does arq's bookkeeping
CTX_VERDICT = "astages_verdict"
CTX_LEAN = "astages_lean"
# the attribute a wrapped function's coroutine carries (what astages worker looks for)
RUNTIME_ATTR = "_astages_runtime"

ARQ_DEFAULT_MAX_TRIES = 5
ARQ_DEFAULT_MAX_JOBS = 10
ARQ_DEFAULT_KEEP_RESULT_S = 3600
ERROR_LIMIT = 4_000


def describe_error(exc: BaseException) -> str:
    """``Type: message`` and the innermost frames, bounded."""
    head = f"{type(exc).__name__}: {exc}"
    tail = "".join(traceback.format_exception(exc)[-3:])
    full = head if not tail else f"{head}\n{tail}"
    return full[:ERROR_LIMIT]


def _own(ctx: dict[str, Any]) -> Any:
    """astages' own client in a worker's ctx (arq's pool when there is none: a ctx made
    outside a worker started with these settings)."""
    return ctx.get(CTX_REDIS) or ctx["redis"]


@dataclass(frozen=True, slots=True)
class _Runtime:
    keys: Keys
    max_tries: int
    retry_jobs: bool
    queue_name: str
    keep_result_s: float = 3600.0  # arq's keep_result of the worker
    keep_result_forever: bool = False
    sweep_interval: float | None = None  # the sweeper's (None or 0: no sweeper)


# How long (s) a worker's reports may wait to share a script call: at most one
# finish_jobs call per group per window (the first call after a quiet window goes at
# once, as does a report that may end its stage, and a group's reports once they hold
# half of the worker's job slots). arq's Worker takes jobs one at a time, so without a
# window its jobs' reports hardly ever meet in one turn.
COALESCE_WINDOW = 0.040
# The window (s) of reports of a stage near its end: its open jobs, less the reports since
# the last reply, fit in the worker's job slots. With several workers a worker does not
# know the others' reports, so its last one may wait for a window: at most this long.
TAIL_WINDOW = 0.005
# How many groups (stages) the Coalescer remembers what it heard of.
STAGES_KEPT = 10_000
# How long (s) after a reply said its group exists a worker runs a group's first tries
# without waiting for their marks (see Coalescer.fresh).
LIVE_FOR = 0.1
# How long (s) a worker shutting down waits for its reports to be sent.
SHUTDOWN_DRAIN_S = 10.0
# How long (s) astages worker lets its poll claim a new stage's first chunk before it
# sends the rest of the stage.
SEND_ON_DELAY = 0.002
# How long (s) arq's Worker, whose report started a stage, holds the rest of the stage
# back while it takes the first jobs (the first chunk is in arq's queue): arq takes a job
# with several round trips, and each would wait behind a chunk being sent. The rest goes
# as soon as this worker starts a job of the group, or after this long.
PICKUP_WAIT = 0.05


class Coalescer:
    """Per-job script calls of one worker share script calls: within a window
    (``COALESCE_WINDOW``) a group's reports go as one ``finish_jobs`` call; the checked
    starts of one event-loop turn go as one ``start_jobs`` call (each applies
    start_job.lua's / finish_job.lua's transition per job, in order, and returns each
    job's own reply); a lone call uses the single-job script.

    Most runs need no checked start (``runs_at_once``, see ``_start``): a first try of a
    group a reply said exists within ``LIVE_FOR``, and the retry of a try this worker
    reported 'retry' for. Such a run's mark as running waits for the window and rides in
    the group's next ``finish_jobs`` call (or goes in one of its own); a run reported
    before its mark went is not marked, its report says so (an outcome in capitals: its
    events still show it running first).

    A report goes at once (no window) when it may end its stage or hold it up: when this
    worker has not heard how many jobs of the stage are open, or its reports since
    account for all of them but the retries it reports. So one worker's stage never waits
    for the window at its end. Near its end (its open jobs, less this worker's reports
    since, fit in ``2 * batch``, the worker's ``max_jobs``), a stage's reports wait for
    ``TAIL_WINDOW`` at most: with several workers, a worker does not know the others'
    reports, and a stage's last report waits at most that long. The reports of a group
    also go at once when they hold ``batch`` job slots (half of the worker's
    ``max_jobs``), so a small worker's slots are not held by reports waiting for the
    window.

    A detached report (see ``_report``) has no caller waiting; ``drain`` sends what waits
    when the worker shuts down. A caller waits for its own reply; a caller cancelled
    meanwhile (a timeout) leaves the call to go on for the others (its report, if lost to
    it, is settled by after_job_end: every per-job transition is idempotent). An error
    fails every caller of that call, as the single call would have. ``wake`` (if set) is
    called when a report moved a group on to a new stage or queued a retry, so the worker
    polls at once.

    A report that started a stage queued its first chunk (``FIRST_CHUNK`` jobs); the rest
    goes in the background, in chunks. With ``wake`` (astages worker) it goes after
    ``SEND_ON_DELAY``; on arq's Worker once this worker starts a job of the group, or
    after ``PICKUP_WAIT``: arq takes a job with several round trips, and each would wait
    behind a chunk being sent."""

    def __init__(
        self,
        redis: Any,
        keys: Keys,
        wake: Callable[[], None] | None = None,
        window: float | None = None,
        batch: int = ARQ_DEFAULT_MAX_JOBS // 2,
    ) -> None:
        self.window = COALESCE_WINDOW if window is None else window
        self.batch = max(1, batch)
        self._last = 0.0
        self._flushing: asyncio.Handle | None = None
        self.store = Store(redis, keys)
        # a report that starts a stage hands it a small first chunk (see FIRST_CHUNK)
        self.reports = Store(redis, keys, FIRST_CHUNK)
        self.wake = wake
        self._pending: dict[tuple[str, str], list[tuple[tuple[Any, ...], asyncio.Future[Any]]]] = {}
        self._marks: dict[str, dict[tuple[int, int], int]] = {}  # group -> (stage, seq) -> try, not sent
        self._open: dict[tuple[str, int], int] = {}  # (group, stage) -> its open jobs, less reports since
        self._retrying: dict[tuple[str, int], int] = {}  # (group, stage) -> retry reports not sent
        self._retried: dict[tuple[str, int, int], int] = {}  # (group, stage, seq) -> try answered 'retry'
        self._alive: dict[str, float] = {}  # group -> when a reply last said it exists (loop time)
        # group -> set when this worker starts a job of it (the rest of a stage waits for it)
        self._picking: dict[str, asyncio.Event] = {}
        self.pickup_wait = PICKUP_WAIT
        self._tasks: set[asyncio.Task[None]] = set()

    def fresh(self, group_id: str) -> bool:
        """Whether a reply said within ``LIVE_FOR`` that the group exists."""
        heard = self._alive.get(group_id)
        return heard is not None and asyncio.get_running_loop().time() - heard <= LIVE_FOR

    def _hear(self, group_id: str, exists: bool) -> None:
        if not exists:
            self._alive.pop(group_id, None)
            return
        if group_id not in self._alive and len(self._alive) >= STAGES_KEPT:
            self._alive.clear()  # bounded: a group forgotten only has its next start checked first
        self._alive[group_id] = asyncio.get_running_loop().time()

    async def start(self, ref: JobRef, job_try: int) -> str:
        """start_job's verdict for try ``job_try`` of ``ref``: a checked start goes at once
        (with the others of this turn: the job waits for it)."""
        self._picked(ref.group_id)
        return text(await self._call("start", ref.group_id, (ref.stage, ref.seq, job_try)))

    def runs_at_once(self, ref: JobRef, job_try: int) -> bool:
        """Whether try ``job_try`` of ``ref`` may run before its mark goes: the group is
        ``fresh``, and it is a first try, or the retry of a try whose report this worker
        sent and had answered (see ``_start``)."""
        if not self.fresh(ref.group_id):
            return False
        if job_try == 1:
            return True
        return self._retried.pop((ref.group_id, ref.stage, ref.seq), None) == job_try - 1

    def mark(self, ref: JobRef, job_try: int) -> None:
        """Mark try ``job_try`` of ``ref`` running, without waiting (see the class)."""
        self._marks.setdefault(ref.group_id, {})[(ref.stage, ref.seq)] = job_try
        self._schedule(self.window)
        self._picked(ref.group_id)

    def _picked(self, group_id: str) -> None:
        """This worker starts a job of the group: the rest of a stage it started goes now."""
        picking = self._picking.get(group_id)
        if picking is not None:
            picking.set()

    def finish(
        self, ref: JobRef, job_try: int, outcome: str, error: str, detach: bool = False
    ) -> asyncio.Future[Motion] | None:
        """finish_job's motion for try ``job_try`` of ``ref`` (a future: no coroutine per
        report). ``detach``: no caller waits for a final report that cannot end its stage
        (None is returned; see ``_report``); one that may end it is waited for, so the
        next stage is queued before arq ends the job (a burst worker stops at an empty
        queue)."""
        marks = self._marks.get(ref.group_id)
        if marks and marks.pop((ref.stage, ref.seq), None) is not None:
            outcome = outcome.upper()  # not marked yet: the report says so (finish_jobs.lua)
        key = (ref.group_id, ref.stage)
        left = self._open.get(key)
        retry = outcome in "eE"
        if retry:  # a retry stays open
            retrying = self._retrying[key] = self._retrying.get(key, 0) + 1
        else:
            retrying = self._retrying.get(key, 0)
            if left is not None:
                left -= 1
                self._open[key] = left
        # at once when the stage's open jobs are all reported here (but for retries, which
        # wait for this report to run again), or when reports hold half the job slots;
        # within TAIL_WINDOW when the stage's open jobs fit in the worker's slots
        may_end = left is None or left <= retrying
        if may_end or len(self._pending.get(("finish", ref.group_id), ())) + 1 >= self.batch:
            window = 0.0
        elif left is not None and left - retrying <= 2 * self.batch:
            window = min(self.window, TAIL_WINDOW)
        else:
            window = self.window
        report = self._call("finish", ref.group_id, (ref.stage, ref.seq, job_try, outcome, error), window)
        if detach and not may_end and not retry:
            report.add_done_callback(_detached)
            return None
        return report

    def _call(self, kind: str, group_id: str, args: tuple[Any, ...], window: float = 0.0) -> asyncio.Future[Any]:
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._pending.setdefault((kind, group_id), []).append((args, fut))
        self._schedule(window)
        return fut

    def _schedule(self, window: float) -> None:
        """A flush after every callback of this turn, and at most one per ``window`` (calls
        made while a window is open wait for its end and go together); a shorter window
        brings a flush that waits forward, and 0 means no waiting."""
        loop = asyncio.get_running_loop()
        due = self._last + window if window > 0 else 0.0
        if isinstance(self._flushing, asyncio.TimerHandle) and due < self._flushing.when():
            self._flushing.cancel()
            self._flushing = None
        if self._flushing is None:
            wait = due - loop.time()
            self._flushing = loop.call_later(wait, self._flush) if wait > 0 else loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._flushing = None
        loop = asyncio.get_running_loop()
        self._last = loop.time()
        pending, self._pending = self._pending, {}
        marks, self._marks = self._marks, {}
        self._retrying.clear()
        for (kind, group_id), calls in pending.items():
            head: tuple[Any, ...] = ()
            if kind == "finish":  # the group's marks ride along
                head = self._flat_marks(marks.pop(group_id, None))
            self._spawn(self._send(kind, group_id, calls, head))
        for group_id, group_marks in marks.items():
            if group_marks:
                self._spawn(self._send_marks(group_id, self._flat_marks(group_marks)))

    @staticmethod
    def _flat_marks(marks: dict[tuple[int, int], int] | None) -> tuple[Any, ...]:
        """How many marks, then each as finish_jobs.lua takes it."""
        if not marks:
            return (0,)
        return (len(marks), *(f"{stage}:{seq}:{job_try}" for (stage, seq), job_try in marks.items()))

    async def drain(self) -> None:
        """Send what waits for the window now, and wait for the calls under way (a worker
        shutting down: its detached reports go before it closes)."""
        if self._flushing is not None:
            self._flushing.cancel()
        if self._pending or self._marks:
            self._flush()
        for picking in self._picking.values():
            picking.set()  # the rest of a stage goes now
        while self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    def _spawn(self, coroutine: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _send_marks(self, group_id: str, flat: tuple[Any, ...]) -> None:
        """Marks with no report to ride in: one finish_jobs call with no report (the
        runs are under way; their reports settle them)."""
        try:
            await self.store.run_now("finish_jobs", group_id, *flat, 0)
        except Exception:
            logger.warning("could not mark %d job(s) of group %s running", flat[0], group_id, exc_info=True)

    async def _send(
        self,
        kind: str,
        group_id: str,
        calls: list[tuple[tuple[Any, ...], asyncio.Future[Any]]],
        head: tuple[Any, ...] = (),
    ) -> None:
        try:
            replies = await self._batch(kind, group_id, [args for args, _ in calls], head)
        except BaseException as e:
            for _, fut in calls:
                if not fut.done():
                    fut.set_exception(e)
            if not isinstance(e, Exception):
                raise
            return
        for (_, fut), reply in zip(calls, replies, strict=True):
            if not fut.done():
                fut.set_result(reply)

    async def _batch(
        self, kind: str, group_id: str, calls: list[tuple[Any, ...]], head: tuple[Any, ...] = ()
    ) -> list[Any]:
        """One script call for the ``calls`` of one kind and group (after ``head``, the
        marks that ride in a finish_jobs call): each call's reply."""
        if kind == "start":
            return await self._starts(group_id, calls)
        return list(await self._finishes(group_id, calls, head or (0,)))

    def _heard(self, group_id: str, calls: list[tuple[Any, ...]], motions: list[Motion]) -> None:
        """What the reports' replies tell of their group and its stages' open jobs (see
        the class): the last word of each stage counts."""
        told: dict[int, Motion] = {}
        for args, motion in zip(calls, motions, strict=True):
            told[args[0]] = motion
            if motion.outcome == "retry":
                if len(self._retried) >= STAGES_KEPT:
                    self._retried.clear()  # bounded: a retry forgotten is only checked first
                self._retried[(group_id, args[0], args[1])] = args[2]
        ended = False
        for stage, motion in told.items():
            key = (group_id, stage)
            if motion.outcome != "open" or motion.open < 0:
                if motion.outcome != "dup" and motion.outcome != "stale" and motion.outcome != "retry":
                    self._open.pop(key, None)  # the stage ended, or is not running
                ended = ended or motion.outcome == "finished" or (motion.outcome == "gone" and not motion.stage)
                continue
            # less the reports of the stage made since this call went
            waiting = sum(1 for args, _ in self._pending.get(("finish", group_id), ()) if args[0] == stage)
            if len(self._open) >= STAGES_KEPT:
                self._open.clear()  # bounded: a stage forgotten only makes its next report go at once
            self._open[key] = motion.open - waiting
            if waiting and motion.open <= waiting:
                self._schedule(0.0)  # reports waiting for the window may end the stage
            elif waiting and motion.open - waiting <= 2 * self.batch:
                self._schedule(min(self.window, TAIL_WINDOW))  # the stage is near its end
        self._hear(group_id, not ended)  # ('gone' with no stage: no such group)

    def _send_on(self, group_id: str, motions: list[Motion]) -> None:
        """Send on the stage a report started, and wake the worker when a report queued
        jobs (a new stage, a retry)."""
        woke = False
        if self.wake is not None and any(m.outcome in ("running", "retry") for m in motions):
            self.wake()  # the first chunk is queued
            woke = True
        if max(m.unsent for m in motions) <= 0:
            return
        # the rest in the background, in chunks of FIRST_CHUNK: a chunk holds Redis for a
        # few ms, and the claims of the first jobs go between them (the woken worker's once
        # it had a moment to claim; arq's Worker's once it took a job, see PICKUP_WAIT); a
        # worker gone meanwhile leaves it to the sweeper
        if woke:
            self._spawn(self._send_more(group_id, SEND_ON_DELAY))
        elif not self.pickup_wait:
            self._spawn(self._send_more(group_id, 0.0))
        elif group_id not in self._picking:  # (one waits already: it sends the rest)
            picking = self._picking[group_id] = asyncio.Event()
            self._spawn(self._send_more(group_id, self.pickup_wait, picking))

    async def _send_more(self, group_id: str, delay: float, picking: asyncio.Event | None = None) -> None:
        """Send on the running stage(s) of the group until nothing is left to send, after
        ``delay``, or once ``picking`` is set (this worker started a job of the group) if
        that comes first."""
        if picking is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(picking.wait(), delay)
            if self._picking.get(group_id) is picking:
                del self._picking[group_id]
        elif delay:
            await asyncio.sleep(delay)
        try:
            while True:
                reply = await self.reports.run_now("send_more", group_id)
                raise_code(reply, group_id, None)
                if Motion.of(reply).unsent <= 0:
                    return
        except Exception:
            logger.warning("could not send group %s on; the sweeper will", group_id, exc_info=True)

    async def _starts(self, group_id: str, calls: list[tuple[Any, ...]]) -> list[Any]:
        if len(calls) == 1:
            verdicts = [await self.store.run("start_job", group_id, *calls[0])]
        else:
            flat = [a for args in calls for a in args]
            verdicts = list(await self.store.run_now("start_jobs", group_id, len(calls), *flat))
        self._hear(group_id, any(text(v) != "gone" for v in verdicts))  # all gone: maybe the group
        return verdicts

    async def _finishes(self, group_id: str, calls: list[tuple[Any, ...]], marks: tuple[Any, ...]) -> list[Motion]:
        if len(calls) == 1 and marks == (0,):  # (the rest of a stage it started: _send_on)
            reply = await self.reports.run_now("finish_job", group_id, *calls[0])
            raise_code(reply, group_id, calls[0][0])
            motions = [Motion.of(reply)]
        else:  # one argument per report, and its error after a failure (finish_jobs.lua)
            packed = [
                (f"{n}:{seq}:{job_try}:{outcome}", error) if outcome in "fF" else (f"{n}:{seq}:{job_try}:{outcome}",)
                for n, seq, job_try, outcome, error in calls
            ]
            motions = await self.reports.moves("finish_jobs", group_id, packed, *marks)
        self._heard(group_id, calls, motions)
        if tracing.ACTIVE is not None:  # spans of a stage or group a report ended
            tracing.ACTIVE.reported(group_id, [(c[0], c[3].lower()) for c in calls], motions)
        self._send_on(group_id, motions)
        return motions


class EndJobs(Coalescer):
    """astages worker's lean path: the ends of staged runs of one worker in one event-loop
    turn share one ``end_jobs`` call per group (arq's bookkeeping and astages' report,
    see lua/end_jobs.lua). It goes through arq's pool, as arq's own bookkeeping does (no
    retry policy: a lost reply is resolved by the caller); sending a stage on goes
    through astages' own client."""

    def __init__(self, arq_pool: Any, own: Any, keys: Keys, queue_name: str, wake: Callable[[], None] | None) -> None:
        super().__init__(own or arq_pool, keys, wake, window=0.0)  # its claims come in batches
        self.pickup_wait = 0.0  # its starts are claims (see HardenedWorker): the rest goes at once
        self.arq = Store(arq_pool, keys, FIRST_CHUNK)
        self.queue_name = queue_name

    async def end(self, group_id: str, args: tuple[Any, ...]) -> Motion:
        """End one run: ``args`` as one job's arguments of end_jobs.lua."""
        motion: Motion = await self._call("end", group_id, args)
        return motion

    async def _batch(
        self, kind: str, group_id: str, calls: list[tuple[Any, ...]], head: tuple[Any, ...] = ()
    ) -> list[Any]:
        if kind != "end":
            return await super()._batch(kind, group_id, calls, head)
        motions = await self.arq.moves("end_jobs", group_id, calls, self.queue_name)
        if tracing.ACTIVE is not None:  # spans of a stage or group a report ended
            tracing.ACTIVE.reported(group_id, [(c[1], c[8]) for c in calls], motions)
        self._send_on(group_id, motions)
        return motions


async def _start(ctx: dict[str, Any], store: Store, ref: JobRef, job_try: int) -> str:
    """Mark a run running: 'run', or why it must not run (see start_one in _lib.lua).

    On arq's Worker (a coalescer in ctx) a first try of a group the worker heard from
    within ``LIVE_FOR``, or the retry of a try this worker reported 'retry' for, runs
    without waiting: its mark goes with the worker's next call. Neither check it skips
    can fail for it. A job that ended already is refused only when arq delivers it
    again, and arq counts every pick-up (a run after a crash is a try this worker did not
    see end in 'retry'). A job gone from astages (deleted, cancelled, its group purged or
    expired) is refused by arq itself when astages took its record out of arq; the rest
    (a group purged or expired behind the worker's back) is caught by the group's next
    reply, as the reply to a check would."""
    coalescer: Coalescer | None = ctx.get(CTX_COALESCE)
    if coalescer is not None:
        if coalescer.runs_at_once(ref, job_try):
            coalescer.mark(ref, job_try)
            return "run"
        return await coalescer.start(ref, job_try)
    return text(await store.run("start_job", ref.group_id, ref.stage, ref.seq, job_try))


async def _report(
    ctx: dict[str, Any], store: Store, ref: JobRef, outcome: str, error: str = "", *, detach: bool = False
) -> None:
    """Report a try's outcome; on a Redis error leave it in ctx for after_job_end. On the
    lean path (astages worker) it is only left in ctx: the script that does arq's
    bookkeeping after the job reports it.

    ``detach`` (a final outcome of a function whose results arq keeps long enough, see
    ``_detaches``): unless the report may end its stage, it goes with the worker's next
    shared call and the job does not wait for it, so arq takes the job out of its queue
    at once. arq's result is the record until the report lands: a worker that dies
    meanwhile leaves the job to the sweeper, which settles it from that result."""
    ctx[CTX_OUTCOME] = (outcome, error)
    if ctx.get(CTX_LEAN):
        return
    coalescer: Coalescer | None = ctx.get(CTX_COALESCE)
    try:
        if coalescer is not None:
            report = coalescer.finish(ref, ctx["job_try"], outcome, error, detach=detach)
            if report is not None:
                await report
        else:
            await store.move("finish_job", ref.group_id, ref.stage, ref.seq, ctx["job_try"], outcome, error)
    except RedisError:
        logger.warning("could not report %s of job %s; will retry after the job", outcome, ctx["job_id"], exc_info=True)
        return
    ctx[CTX_REPORTED] = True


def _detached(report: asyncio.Future[Motion]) -> None:
    """A detached report's end: an error is logged (the sweeper settles the job from arq's
    result)."""
    if not report.cancelled() and report.exception() is not None:
        logger.warning("a report failed; the sweeper settles it from arq's result", exc_info=report.exception())


def _detaches(function: Function, runtime: _Runtime) -> bool:
    """Whether the final reports of ``function``'s runs may be detached (see ``_report``):
    arq keeps its results for two sweeper intervals at least, so the sweeper finds the
    result of a run whose report was lost with its worker."""
    if not runtime.sweep_interval:
        return False
    if function.keep_result_forever or (function.keep_result_forever is None and runtime.keep_result_forever):
        return True
    keep = runtime.keep_result_s if function.keep_result_s is None else function.keep_result_s
    return keep >= 2 * runtime.sweep_interval


def _wrap(function: Function, runtime: _Runtime) -> Function:
    coroutine = function.coroutine
    max_tries = runtime.max_tries if function.max_tries is None else function.max_tries
    detach = _detaches(function, runtime)

    async def run(ctx: dict[str, Any], *args: Any, **kwargs: Any) -> Any:
        job_id = str(ctx.get("job_id", ""))
        ref = runtime.keys.parse_job_id(job_id)
        if ref is None:
            callback = runtime.keys.parse_callback_id(job_id)
            if callback is not None:
                summary = await _callback_summary(ctx, callback, runtime)
                return await coroutine(ctx, summary, *args, **kwargs)
            return await coroutine(ctx, *args, **kwargs)
        return await _run_staged(ctx, ref, function.name, coroutine, max_tries, runtime, args, kwargs, detach)

    functools.update_wrapper(run, coroutine)
    setattr(run, RUNTIME_ATTR, runtime)  # astages worker's lean path looks for it
    return Function(
        name=function.name,
        coroutine=run,
        timeout_s=function.timeout_s,
        keep_result_s=function.keep_result_s,
        keep_result_forever=function.keep_result_forever,
        max_tries=function.max_tries,
    )


async def _callback_summary(ctx: dict[str, Any], callback: CallbackRef, runtime: _Runtime) -> GroupSummary:
    """The summary a group callback receives (written by the script that fired it)."""
    raw = await _own(ctx).get(runtime.keys.summary(callback.group_id, callback.event))
    if raw is None:
        raise CorruptRecord(
            runtime.keys.summary(callback.group_id, callback.event),
            "the summary of this callback is gone (it expires a day after the event, or keep_for)",
        )
    return GroupSummary.from_json(raw)


async def _run_staged(
    ctx: dict[str, Any],
    ref: JobRef,
    name: str,
    coroutine: Callable[..., Awaitable[Any]],
    max_tries: int,
    runtime: _Runtime,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    detach: bool = False,
) -> Any:
    store: Store = ctx.get(CTX_STORE) or Store(_own(ctx), runtime.keys)
    job_try = int(ctx["job_try"])
    ctx[CTX_REF] = ref
    ctx[CTX_MAX_TRIES] = max_tries
    verdict = ctx.get(CTX_VERDICT)  # the lean path's claim marked it running already
    if verdict is None:
        try:
            verdict = await _start(ctx, store, ref, job_try)
        except RedisError:
            logger.warning("could not mark job %s running; running it anyway", ctx["job_id"], exc_info=True)
            verdict = "run"
    if verdict != "run":
        # 'final': arq delivered again a job that already ended (a crash after its report,
        # a cancel racing its pick-up); 'gone': it, its stage or its group was deleted. The
        # function does not run, and arq's result says so: a failure naming why, not a
        # success with None (as arq itself fails a job it cannot run, e.g. one expired).
        logger.info("staged job %s is %s; not running it", ctx["job_id"], verdict)
        ctx[CTX_REPORTED] = True
        if verdict == "final":
            reason = "it had already ended (arq delivered it again); astages keeps its outcome"
        else:
            reason = "it no longer exists in astages (the job, its stage or its group was deleted)"
        raise JobNotRun(str(ctx["job_id"]), reason)
    ctx[CTX_JOB] = StagedJob(store, ref, name, args, kwargs, runtime.queue_name, ctx.get("enqueue_time"))
    tracer = tracing.ACTIVE
    try:
        if tracer is None:
            result = await coroutine(ctx, *args, **kwargs)
        else:  # the run inside its span (astages/tracing.py)
            call = functools.partial(coroutine, ctx, *args, **kwargs)
            result = await tracer.job(store.redis, runtime.keys, ctx, ref, name, max_tries, runtime.retry_jobs, call)
    except (Retry, RetryJob) as e:
        if not runtime.retry_jobs:
            await _report(ctx, store, ref, "f", describe_error(e))
            raise
        if job_try >= max_tries:
            # arq would re-queue it only to fail it at pickup, with no hook: end it now.
            exhausted = RetriesExhausted(max_tries)
            await _report(ctx, store, ref, "f", str(exhausted))
            raise exhausted from e
        await _report(ctx, store, ref, "e")
        raise
    except asyncio.CancelledError:
        # A timeout (a failure) or the worker shutting down (re-run): arq knows which,
        # and after_job_end reads it once arq has written it.
        raise
    except Exception as e:
        await _report(ctx, store, ref, "f", describe_error(e), detach=detach)
        raise
    await _report(ctx, store, ref, "s", detach=detach)
    return result


async def _settle(ctx: dict[str, Any], runtime: _Runtime) -> None:
    """After arq wrote its own record of a staged run: report what the wrapper could not."""
    ref: JobRef | None = ctx.get(CTX_REF)
    if ref is None or ctx.get(CTX_REPORTED):
        return
    store = Store(_own(ctx), runtime.keys)
    job_id = ctx["job_id"]
    job_try = int(ctx["job_try"])
    pending = ctx.get(CTX_OUTCOME)
    if pending is not None and pending[0] != "e":
        outcome, error = pending
    else:
        # Nothing reported, or a retry whose report was cut short (a timeout can strike
        # while it is sent, and then arq fails the job for good): arq's record decides.
        outcome, error = await _arq_outcome(store, job_id, job_try, ctx.get(CTX_MAX_TRIES, runtime.max_tries), runtime)
        ctx[CTX_OUTCOME] = (outcome, error)
    motion = await store.move("finish_job", ref.group_id, ref.stage, ref.seq, job_try, outcome, error)
    ctx[CTX_REPORTED] = True
    if tracing.ACTIVE is not None:
        tracing.ACTIVE.reported(ref.group_id, [(ref.stage, outcome)], [motion])


async def _arq_outcome(store: Store, job_id: str, job_try: int, max_tries: int, runtime: _Runtime) -> tuple[str, str]:
    """What arq made of a run the wrapper saw cancelled: (outcome code, error)."""
    redis = store.redis
    async with redis.pipeline(transaction=False) as pipe:
        pipe.get(result_key_prefix + job_id)
        pipe.zscore(runtime.queue_name, job_id)
        raw, score = await pipe.execute()
    if raw is not None:
        try:
            result = deserialize_result(raw, deserializer=getattr(redis, "job_deserializer", None))
        except Exception as e:
            return "f", f"arq's result could not be read: {e}"
        if result.success:
            return "s", ""
        return "f", describe_error(result.result) if isinstance(result.result, BaseException) else str(result.result)
    if score is not None:
        if job_try >= max_tries:
            return "f", f"max {max_tries} retries exceeded (cancelled on its last try)"
        return "e", ""
    return "f", "cancelled or timed out (arq kept no result)"


def _guard(name: str, hook: Hook | None, before: Callable[[dict[str, Any]], Awaitable[None]] | None = None) -> Hook:
    """A hook that runs ``before`` then the user's ``hook``, logging instead of raising."""

    async def guarded(ctx: dict[str, Any]) -> None:
        if before is not None and not ctx.get(CTX_REPORTED):  # (a reported run has nothing to settle)
            try:
                await before(ctx)
            except Exception:
                logger.exception("astages %s failed for job %s; the sweeper will settle it", name, ctx.get("job_id"))
        if hook is not None:
            try:
                await hook(ctx)
            except Exception:
                logger.exception(
                    "%s hook failed for job %s (logged: a hook error would stop arq)", name, ctx.get("job_id")
                )

    guarded.__name__ = f"astages_{name}"
    return guarded


def _startup(hook: Hook | None, prefix: str, interval: float | None, grace: float, max_jobs: int) -> Hook:
    """astages' own client made (no round trip), the user's on_startup, then the sweeper
    started in the background."""

    async def on_startup(ctx: dict[str, Any]) -> None:
        ctx[CTX_REDIS] = reconnecting_client(ctx["redis"])
        ctx[CTX_STORE] = Store(ctx[CTX_REDIS], Keys(prefix))
        ctx[CTX_COALESCE] = Coalescer(ctx[CTX_REDIS], Keys(prefix), ctx.get(CTX_WAKE), batch=max_jobs // 2)
        tracing.setup()  # on when the tracing extra is installed and a tracer provider configured
        if hook is not None:
            await hook(ctx)  # the user's own start-up failing stops the worker, as in arq
        if not interval:
            return
        try:
            sweeper = Sweeper(ctx[CTX_REDIS], prefix=prefix, grace=grace)
            ctx[CTX_SWEEPER] = asyncio.get_running_loop().create_task(sweeper.run(interval), name="astages-sweeper")
        except Exception:
            logger.exception("could not start the astages sweeper; jobs still run")

    on_startup.__name__ = "astages_on_startup"
    return on_startup


def _shutdown(hook: Hook | None) -> Hook:
    """The sweeper stopped, the user's on_shutdown, then astages' own client closed."""

    async def on_shutdown(ctx: dict[str, Any]) -> None:
        task: asyncio.Task[None] | None = ctx.pop(CTX_SWEEPER, None)
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        coalescer: Coalescer | None = ctx.get(CTX_COALESCE)
        if coalescer is not None:
            try:  # the reports still waiting for the window (the sweeper settles what fails)
                await asyncio.wait_for(coalescer.drain(), SHUTDOWN_DRAIN_S)
            except Exception:
                logger.warning("could not send every report before shutting down", exc_info=True)
        try:
            if hook is not None:
                await hook(ctx)
        finally:
            ctx.pop(CTX_COALESCE, None)
            ctx.pop(CTX_STORE, None)
            own = ctx.pop(CTX_REDIS, None)
            if own is not None:
                await own.aclose(close_connection_pool=True)

    on_shutdown.__name__ = "astages_on_shutdown"
    return on_shutdown


def worker_settings(
    *,
    functions: Sequence[Callable[..., Any] | Function],
    prefix: str = DEFAULT_PREFIX,
    sweep_interval: float | None = DEFAULT_INTERVAL,
    sweep_grace: float = DEFAULT_GRACE,
    **settings: Any,
) -> dict[str, Any]:
    """arq worker settings (a dict) that run ``functions`` with astages' bookkeeping.

    Any ``arq.Worker`` option may be given; the user's own ``on_startup``,
    ``on_shutdown``, ``on_job_start``, ``on_job_end`` and ``after_job_end`` hooks still
    run (errors in the job hooks are logged rather than stopping the worker). ``prefix``
    must match the one groups were made with. The worker sweeps (see
    ``astages.sweeper``) about every ``sweep_interval`` seconds between all workers of
    one Redis (None or 0: never). ``redis_settings`` (or ``redis_pool``) are arq's, as
    given: astages' own calls go through a client of their own with a reconnect-and-retry
    policy (see ``astages.runner.reconnecting_client``), made in ``on_startup`` and closed
    in ``on_shutdown``."""
    runtime = _Runtime(
        keys=Keys(prefix),
        max_tries=int(settings.get("max_tries", ARQ_DEFAULT_MAX_TRIES)),
        retry_jobs=bool(settings.get("retry_jobs", True)),
        queue_name=str(settings.get("queue_name") or default_queue_name),
        keep_result_s=float(to_seconds(settings.get("keep_result", ARQ_DEFAULT_KEEP_RESULT_S)) or 0),
        keep_result_forever=bool(settings.get("keep_result_forever", False)),
        sweep_interval=sweep_interval,
    )
    wrapped = [_wrap(f if isinstance(f, Function) else func(f), runtime) for f in functions]
    out = dict(settings)
    out["functions"] = wrapped
    for name in ("on_job_start", "on_job_end"):  # arq calls no hook it was not given
        hook = settings.get(name)
        out[name] = None if hook is None else _guard(name, hook)
    out["after_job_end"] = _guard(
        "after_job_end", settings.get("after_job_end"), functools.partial(_settle, runtime=runtime)
    )
    max_jobs = int(settings.get("max_jobs", ARQ_DEFAULT_MAX_JOBS))
    out["on_startup"] = _startup(settings.get("on_startup"), prefix, sweep_interval, sweep_grace, max_jobs)
    out["on_shutdown"] = _shutdown(settings.get("on_shutdown"))
    return out
