"""The sweeper: finish staged jobs whose astages record no longer matches arq's.

arq ends some jobs without running any hook (retries exhausted at pickup, function not
found, job key expired, payload unreadable), a killed worker runs nothing, and a report
can fail on a dropped connection. Each leaves a job *open* (queued, running or
pending_re_run) in astages while arq is done with it, and its stage would never
complete. One pass of the sweeper looks at every open job of every running stage of
every live group, compares it with arq's keys (``arq:job:<id>``, ``arq:in-progress:<id>``,
``arq:result:<id>`` and the job's queue) and settles it through the same idempotent
scripts the worker uses:

==================================================  =======================================
what arq has                                        what the sweeper does
==================================================  =======================================
a result (``arq:result:<id>``)                      ``finish_job`` with that result:
                                                    successful or failed (its error)
a job record or an in-progress key                  nothing: arq will run it, or runs it
nothing at all, seen twice ``grace`` seconds apart  ``finish_job`` failed, and a status
                                                    message saying why (*lost*)
==================================================  =======================================

A lost job is *failed*, not re-sent (the default, and for now the only policy): its
function may have run already, partly or wholly (a lost report is the usual cause), so
running it again is not safe to assume; failing it lets the group move on, keeps what
happened visible (the job's error and status message say why), and a stage that wants
the job run again can read the failure and re-enqueue it in a later stage.

The sweeper also moves on a running group that nothing else will move: a stage with
jobs waiting to be sent and none in flight (its chunked sending stopped: the process that
started it died) is sent on, as far as its window, caps and rate let, and a running stage
with no open job completes (``nudge.lua``). A stage whose jobs wait for a window with
jobs in flight is not stuck: each report tops the window up.

Cost: a pass reads the index of *live* groups (finished groups delete themselves and
leave it), two round trips per running group, and per running stage its open jobs in
batches of ``batch``, one read-only script call per batch that returns only the jobs
arq no longer holds (``probe_jobs.lua``). It never grows with the number of finished
groups. At its end a pass samples the prefix's cumulative job counts into
``<prefix>:series`` (``astages.ops.sample``: O(groups + stages)), the dashboard's charts.
Several sweepers at once are harmless (every settlement is an idempotent script; a
stale or duplicate one changes nothing); the periodic loop also takes a lock so that
the workers of one Redis sweep about once per interval between them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from dataclasses import dataclass, field
from typing import Any

from arq.connections import ArqRedis
from arq.constants import in_progress_key_prefix, result_key_prefix
from arq.jobs import deserialize_result
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from astages._keys import DEFAULT_PREFIX, Keys
from astages._scripts import Store, text
from astages._stats import count_actions
from astages.exceptions import AstagesError, GroupNotFound
from astages.models import decode_spec
from astages.ops import sample

__all__ = ["DEFAULT_GRACE", "DEFAULT_INTERVAL", "SweepReport", "Sweeper", "lock_key", "suspects_key", "sweep"]

logger = logging.getLogger("astages.sweeper")

# Seconds between two passes of a worker's sweeper (across all workers of one Redis).
DEFAULT_INTERVAL = 30.0
# A job arq has no trace of is failed only when a second look, this many seconds after
# the first, still finds no trace (a report may be on its way from after_job_end).
DEFAULT_GRACE = 5.0
# Open jobs read per round trip.
DEFAULT_BATCH = 500
# Groups read per page of the index.
GROUP_PAGE = 500
# Group statuses with nothing for the sweeper to do once read from the index.
FINAL_GROUP = {b"complete": True, b"failed": True, b"cancelled": True}

ERROR_LIMIT = 4_000


def lock_key(keys: Keys) -> str:
    """The periodic sweep's lock (expires by itself)."""
    return f"{keys.prefix}:sweeper:lock"


def suspects_key(keys: Keys) -> str:
    """Hash of jobs seen with no trace in arq: job id -> "<code>|<first seen ms>"."""
    return f"{keys.prefix}:sweeper:suspects"


@dataclass(frozen=True, slots=True)
class SweepReport:
    """What one pass found and did. ``settled`` maps each job it finished to the
    outcome its script reported (``running``/``finished`` when it moved the group on)."""

    groups: int = 0
    stages: int = 0
    jobs: int = 0
    from_results: int = 0
    lost: int = 0
    suspects: int = 0
    nudged: int = 0
    errors: int = 0
    settled: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0
    unindexed: int = 0  # groups whose keys expired (keep_for, ttl=), dropped from the index

    def merge(self, other: SweepReport) -> SweepReport:
        return SweepReport(
            groups=self.groups + other.groups,
            stages=self.stages + other.stages,
            jobs=self.jobs + other.jobs,
            from_results=self.from_results + other.from_results,
            lost=self.lost + other.lost,
            suspects=other.suspects,
            nudged=self.nudged + other.nudged,
            errors=self.errors + other.errors,
            settled={**self.settled, **other.settled},
            seconds=self.seconds + other.seconds,
            unindexed=self.unindexed + other.unindexed,
        )


@dataclass
class _Pass:
    groups: int = 0
    stages: int = 0
    jobs: int = 0
    from_results: int = 0
    lost: int = 0
    nudged: int = 0
    errors: int = 0
    unindexed: int = 0
    settled: dict[str, str] = field(default_factory=dict)
    suspects: dict[str, str] = field(default_factory=dict)  # job id -> code, seen this pass


def _describe(result: Any) -> str:
    if isinstance(result, BaseException):
        return f"{type(result).__name__}: {result}"[:ERROR_LIMIT]
    return str(result)[:ERROR_LIMIT]


def _try_of(code: str) -> int:
    try:
        return int(code[1:] or 0)
    except ValueError:
        return 0


class Sweeper:
    """Reconciles astages' open jobs with arq's keys. ``await Sweeper(redis).sweep()``
    runs one pass; ``run(interval)`` runs passes until cancelled (what workers do)."""

    def __init__(
        self,
        redis: ArqRedis,
        *,
        prefix: str = DEFAULT_PREFIX,
        grace: float = DEFAULT_GRACE,
        batch: int = DEFAULT_BATCH,
    ) -> None:
        self.redis: Any = redis  # redis-py's types mix sync and async replies
        self.keys = Keys(prefix)
        self.store = Store(redis, self.keys)
        self.grace_ms = int(grace * 1000)
        self.batch = batch
        # How long a suspect is remembered: past the next pass, then it expires, so no
        # key outlives the groups once every worker has stopped.
        self.suspects_ms = max(2 * self.grace_ms, int(2 * DEFAULT_INTERVAL * 1000))

    # -- one pass -------------------------------------------------------------------

    async def sweep(self) -> SweepReport:
        """One pass over every live group; never raises for one broken group (it is
        counted in ``errors`` and logged)."""
        started = time.perf_counter()
        state = _Pass()
        cursor = 0
        while True:
            # ZSCAN: every group live for the whole pass is seen, whatever else finishes.
            cursor, page = await self.redis.zscan(self.keys.index, cursor, count=GROUP_PAGE)
            ids = [text(raw) for raw, _ in page]
            async with self.redis.pipeline(transaction=False) as pipe:
                for group_id in ids:
                    pipe.hget(self.keys.group(group_id), "status")
                statuses = await pipe.execute(raise_on_error=False)
            for group_id, status in zip(ids, statuses, strict=True):
                if status is None:
                    # its keys expired (kept, or ttl=): drop the entry, unless it is back
                    state.unindexed += int(await self.store.run("unindex", group_id))
                    continue
                if status == b"pending" or FINAL_GROUP.get(status, False):
                    continue  # being built, ended (kept with keep_for), or gone: nothing sent
                try:
                    await self._group(group_id, state)
                except GroupNotFound:
                    pass  # it finished or was deleted meanwhile
                except (RedisConnectionError, RedisTimeoutError):
                    raise
                except (RedisError, AstagesError, ValueError, KeyError, IndexError) as e:
                    # a corrupt record (wrong type, planted data): skip the group, go on
                    state.errors += 1
                    logger.warning("sweeper skipped group %s: %s", group_id, e)
            if cursor == 0:
                break
        suspects = await self._forget_resolved(state.suspects)
        await self._sample()
        done = {"passes": 1, "from_results": state.from_results, "lost": state.lost, "nudged": state.nudged}
        await count_actions(
            self.redis, self.keys, "sweeper", {**done, "errors": state.errors, "unindexed": state.unindexed}
        )
        return SweepReport(
            groups=state.groups,
            stages=state.stages,
            jobs=state.jobs,
            from_results=state.from_results,
            lost=state.lost,
            suspects=suspects,
            nudged=state.nudged,
            errors=state.errors,
            settled=state.settled,
            seconds=time.perf_counter() - started,
            unindexed=state.unindexed,
        )

    async def _sample(self) -> None:
        """End of a pass: add the prefix's cumulative job counts to its series (the
        dashboard's throughput chart; astages.ops.sample, O(groups + stages))."""
        try:
            await sample(self.redis, self.keys)
        except (RedisConnectionError, RedisTimeoutError):
            raise
        except RedisError as e:  # a planted key of the wrong type: the pass still counts
            logger.warning("sweeper could not sample the job counts: %s", e)

    async def _group(self, group_id: str, state: _Pass) -> None:
        keys = self.keys
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.hget(keys.group(group_id), "status")
            pipe.zrange(keys.stages(group_id), 0, -1)
            status, numbers = await pipe.execute()
        if status is None or text(status) != "running":
            return  # pending (being built), finished meanwhile, or another status
        state.groups += 1
        async with self.redis.pipeline(transaction=False) as pipe:
            for n in numbers:
                sk = keys.stage(group_id, int(n))
                pipe.hmget(sk, ["status", "cursor", "held", "queued", "running", "pending_re_run"])
                pipe.llen(f"{sk}:jobs")
                pipe.hlen(f"{sk}:open")
            rows = await pipe.execute()
        running: list[tuple[int, int]] = []  # (number, open jobs)
        stuck = False
        for i, n in enumerate(numbers):
            (st, cursor, held, *flight), total, open_jobs = rows[3 * i], rows[3 * i + 1], rows[3 * i + 2]
            if st is None or text(st) != "running":
                continue
            running.append((int(n), int(open_jobs)))
            in_flight = sum(int(c or 0) for c in flight)
            waiting = int(cursor or 0) < int(total)
            if (waiting and (in_flight == 0 or not held)) or int(open_jobs) == 0:
                # jobs wait with none in flight (no report will top the window up) or with
                # no limit holding them (chunked sending stopped half-way), or nothing is
                # left to wait for; jobs a window, cap or rate holds back are not stuck
                stuck = True
        if stuck or not running:
            motion = await self.store.move("nudge", group_id)
            state.nudged += 1
            logger.info("sweeper moved group %s on: %s stage %s", group_id, motion.outcome, motion.stage)
            if motion.finished:
                return
        for number, open_jobs in running:
            if open_jobs:
                state.stages += 1
                await self._stage(group_id, number, state)

    async def _stage(self, group_id: str, number: int, state: _Pass) -> None:
        """Settle what can be settled of a running stage's open jobs, ``batch`` at a time
        (each batch one atomic look, ``probe_jobs.lua``, that returns only the jobs arq
        no longer holds)."""
        cursor = "0"
        while True:
            reply = await self.store.run(
                "probe_jobs", group_id, number, cursor, self.batch, in_progress_key_prefix, result_key_prefix
            )
            cursor, looked = text(reply[0]), int(reply[1])
            state.jobs += looked
            found = [text(x) for x in reply[2:]]
            lost: list[tuple[str, str]] = []
            for seq, code, what in zip(found[::3], found[1::3], found[2::3], strict=True):
                job_id = self.keys.job_id(group_id, number, int(seq))
                if what == "result":
                    await self._settle_from_result(group_id, number, seq, job_id, code, state)
                else:
                    state.suspects[job_id] = code
                    lost.append((seq, job_id))
            if lost:
                await self._settle_lost(group_id, number, lost, state)
            if cursor == "0":
                return

    async def _settle_from_result(
        self, group_id: str, number: int, seq: str, job_id: str, code: str, state: _Pass
    ) -> None:
        raw = await self.redis.get(result_key_prefix + job_id)
        if raw is None:
            return  # expired meanwhile: the next pass sees a lost job
        try:
            result = deserialize_result(raw, deserializer=getattr(self.redis, "job_deserializer", None))
        except Exception as e:  # arq's record is unreadable: the job is still final
            outcome, error, job_try = "f", f"arq's result could not be read: {e}", _try_of(code)
        else:
            outcome = "s" if result.success else "f"
            error = "" if result.success else _describe(result.result)
            job_try = max(int(result.job_try or 0), _try_of(code))
        motion = await self.store.move("finish_job", group_id, number, seq, job_try, outcome, error)
        state.from_results += 1
        state.settled[job_id] = motion.outcome
        logger.info("sweeper settled job %s from arq's result (%s): %s", job_id, outcome, motion.outcome)

    async def _settle_lost(self, group_id: str, number: int, lost: list[tuple[str, str]], state: _Pass) -> None:
        """Fail the jobs first seen with no trace ``grace`` ago, still the same; note the rest."""
        key = suspects_key(self.keys)
        # Redis' clock, not this process's: the next look may be another worker's, whose
        # clock may differ by more than the grace.
        seconds, micros = await self.redis.time()
        now = int(seconds) * 1000 + int(micros) // 1000
        seen = await self.redis.hmget(key, [job_id for _, job_id in lost])
        first_seen: dict[str, str] = {}
        for (seq, job_id), mark in zip(lost, seen, strict=True):
            code = state.suspects[job_id]
            if mark is None or text(mark).split("|")[0] != code:
                first_seen[job_id] = f"{code}|{now}"
                continue
            if now - int(text(mark).split("|")[1]) < self.grace_ms:
                continue
            why = await self._why_lost(group_id, number, seq, code)
            motion = await self.store.move("finish_job", group_id, number, seq, _try_of(code), "f", why)
            if motion.outcome not in ("dup", "stale", "gone"):
                with contextlib.suppress(RedisError):
                    await self.store.run("set_message", group_id, number, seq, why)
            state.lost += 1
            state.settled[job_id] = motion.outcome
            del state.suspects[job_id]
            await self.redis.hdel(key, job_id)
            logger.warning("sweeper failed lost job %s: %s (%s)", job_id, why, motion.outcome)
        if first_seen:
            async with self.redis.pipeline(transaction=True) as pipe:
                pipe.hset(key, mapping=first_seen)
                pipe.pexpire(key, self.suspects_ms)
                await pipe.execute()

    async def _why_lost(self, group_id: str, number: int, seq: str, code: str) -> str:
        spec = await self.redis.hget(self.keys.stage_part(group_id, number, "spec"), seq)
        queued = False
        if spec is not None:
            with contextlib.suppress(ValueError, IndexError):
                _, queue, _ = decode_spec(spec)
                queued = await self.redis.zscore(queue, self.keys.job_id(group_id, number, int(seq))) is not None
        if queued:
            return (
                "lost: arq's record of the job expired before it ran (it waited longer than "
                "arq's expires_extra_ms; give long stages _expires=); failed by the astages sweeper"
            )
        state = {"q": "queued", "r": "running", "e": "waiting for a retry"}[code[:1]]
        return (
            f"lost: the job was {state} but arq has no record of it (no job, no result, not "
            "in progress): its outcome was never reported and arq kept no result "
            "(keep_result=0?), or arq's keys were deleted; failed by the astages sweeper"
        )

    async def _forget_resolved(self, suspects: dict[str, str]) -> int:
        """Drop suspects this pass no longer saw (they finished or came back)."""
        key = suspects_key(self.keys)
        known = [text(k) for k in await self.redis.hkeys(key)]
        gone = [job_id for job_id in known if job_id not in suspects]
        if gone:
            await self.redis.hdel(key, *gone)
        return len(suspects)

    # -- the periodic loop ------------------------------------------------------------

    async def run(self, interval: float = DEFAULT_INTERVAL) -> None:
        """Sweep about every ``interval`` seconds until cancelled; the workers sharing a
        Redis take turns (a lock), and no error ever leaves this loop."""
        delay = interval * random.uniform(0.5, 1.0)
        failures = 0
        lock = lock_key(self.keys)
        self.suspects_ms = max(2 * self.grace_ms, int(2 * interval * 1000))
        while True:
            await asyncio.sleep(delay)
            holding = False
            try:
                holding = bool(await self.redis.set(lock, b"1", nx=True, px=max(1, int(interval * 900))))
                if holding:
                    report = await self.sweep()
                    if report.settled or report.nudged or report.errors:
                        logger.info("sweeper pass: %s", _summary(report))
                    if not report.suspects and not await self.redis.exists(self.keys.index):
                        await self.redis.delete(lock)  # nothing live: leave no key behind
                failures = 0
                delay = interval * random.uniform(0.5, 1.0)
            except asyncio.CancelledError:
                if holding:  # stopped mid-pass: let another worker sweep
                    with contextlib.suppress(Exception):
                        await asyncio.wait_for(self.redis.delete(lock), 1.0)
                raise
            except Exception:
                failures += 1
                delay = min(interval, 0.5 * 2**failures) * random.uniform(0.5, 1.0)
                logger.warning("sweeper pass failed; next try in %.1fs", delay, exc_info=True)


def _summary(report: SweepReport) -> str:
    return (
        f"{report.groups} groups, {report.jobs} open jobs looked at, {report.from_results} settled "
        f"from arq results, {report.lost} lost, {report.nudged} nudged, {report.errors} errors, "
        f"{report.suspects} suspects, {report.seconds * 1000:.1f} ms"
    )


async def sweep(
    redis: ArqRedis, *, prefix: str = DEFAULT_PREFIX, grace: float = DEFAULT_GRACE, settle_lost: bool = True
) -> SweepReport:
    """Sweep on demand: one pass, and when it found jobs arq has no trace of and
    ``settle_lost`` is set, a second pass ``grace`` seconds later that fails those still
    without trace. Returns the merged report."""
    sweeper = Sweeper(redis, prefix=prefix, grace=grace)
    report = await sweeper.sweep()
    if report.suspects and settle_lost:
        await asyncio.sleep(grace)
        report = report.merge(await sweeper.sweep())
    return report
