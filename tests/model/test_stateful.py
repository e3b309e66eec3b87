"""Model-based stateful test: random operations on the REAL scripts and a real Redis,
compared after every step with a small pure-Python model (model.py) and Cleaner.check.

Operations (rules): create a group (keep_for, ttl=, failure policy continue / halt /
max_failed=1) directly or with ``within_a_grouping`` (concurrent enqueues inside); make
stages with any small int number (also below the running stage); enqueue one, many, or
several concurrently (asyncio.gather) into pending and running stages (growth), and into
deleted, complete or cancelled ones (refused); group and stage callbacks; initiate the
group or one stage; what a worker does, through the scripts as astages.worker calls them
(start_job with the next try, a duplicate start, re-delivery of a final job, or a mark
in a finish_jobs call; finish_job successful / failed / re-run, duplicated, for a stale
try and for a try whose start was lost, alone, in finish_jobs, or as a run never
marked; several runs of a group in one finish_jobs call, each with its own outcome),
with arq's own clean-up of a finished try; job.enqueue_job; cancel and delete of
jobs, stages and groups; sweeper passes after arq ended a job with a result (success or
failure, written with arq's serialize_result) or with no trace; Cleaner.cleanup_jobs;
time passing for ttl= and kept groups (every key of the group is given a 1 ms TTL: the
deadline reached).

Checked after every step, for every group the model knows:
- group: status (pending, running, or ended and kept: complete / failed / cancelled), the
  group ended at most once, a halted group ends failed and a cancelled one cancelled; the
  index lists exactly the live groups;
- stages: the stage list, each stage's status, its jobs list in enqueue order, each job's
  status and try (its :open / :done code), and the O(1) counters (StageProgress,
  ``retried`` included) equal to the model's;
- nothing early: a stage starts only when every lower-numbered stage is complete or
  cancelled, unless it was initiated by hand (stage.initiate()); a stage
  completes only when every job is final (the model completes it then and only then);
- nothing lost: every job whose handle enqueue returned exists until it, its stage or its
  group is deleted or the group ends;
- arq's queue: the staged jobs in ``arq:queue`` are exactly those the model says arq holds
  (every queued or pending_re_run job, and a running one until its try ended), each with
  its ``arq:job:<id>`` record; no job of a pending stage is there; a stage's queued jobs
  come out of the queue in enqueue order (jobs of calls made at once aside: they
  have no order of their own);
- callbacks: each registered callback's job is enqueued exactly when its event fires
  (stage completed/cancelled, the group's first failure, the group's end, its success),
  never twice, never for an event that did not happen (each enqueued callback is
  consumed after the check, so a second enqueue shows);
- TTL: every key of a ttl= group, and of an ended group kept with keep_for, has a TTL;
  no key of a group that ended unkept, was deleted or expired remains (callback summaries
  aside, which must have a TTL);
- ``Cleaner.check(redis) == {}``, and ``Cleaner.cleanup_jobs`` repairs nothing (but the
  index entry of an expired group).

Profiles: ``ASTAGES_MODEL_EXAMPLES`` (default 100) and ``ASTAGES_MODEL_STEPS`` (default
40); ``ASTAGES_MODEL_EXAMPLES=1000 ASTAGES_MODEL_STEPS=40`` is the long profile.
"""

from __future__ import annotations

import asyncio
import os
import time
from typing import Any

import fakeredis
from arq.connections import ArqRedis, create_pool
from arq.constants import default_queue_name, in_progress_key_prefix, job_key_prefix, result_key_prefix
from arq.jobs import serialize_result
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)
from model import STATUS, GroupM, JobM, Model

import astages
from astages import Cleaner, StagedGroup, Sweeper
from astages._keys import Keys
from astages.cleaner import REPAIRS
from astages.exceptions import AstagesError
from astages.models import FailurePolicy, StageProgress
from astages.stage import StagedGroupStage

# Defects of issue 10 the model still tolerates (item number -> what is tolerated).
# Remove an entry when its fix lands; the test must then pass without it.
# e.g. {8: "an expired group's entry stays in the groups index after a sweeper pass"}
KNOWN_DEFECTS: dict[int, str] = {}

EXAMPLES = int(os.environ.get("ASTAGES_MODEL_EXAMPLES", "100"))
STEPS = int(os.environ.get("ASTAGES_MODEL_STEPS", "40"))
KEYS = Keys()
QUEUE = default_queue_name
MAX_GROUPS = 3


def _t(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class Breach(AssertionError):
    pass


class StagesMachine(RuleBasedStateMachine):
    server: Any = None  # set by the test (the redis_server fixture); None: fakeredis

    def __init__(self) -> None:
        super().__init__()
        self.runner = asyncio.Runner()
        self.redis: ArqRedis = self.runner.run(self._connect())
        self.model = Model()
        self.by_hand: set[tuple[str, int]] = set()  # stages started by stage.initiate()
        self.seen: dict[tuple[str, int], str] = {}  # stage statuses at the last check
        self.lingering: set[str] = set()  # expired groups whose index entry may remain until a pass

    async def _connect(self) -> ArqRedis:
        if self.server is None:  # fakeredis: a fresh server per example
            fake = fakeredis.FakeAsyncRedis(server=fakeredis.FakeServer())
            return ArqRedis(connection_pool=fake.connection_pool)
        redis = await create_pool(self.server.settings)
        await redis.flushdb()
        return redis

    def teardown(self) -> None:
        try:
            self.runner.run(self.redis.aclose())
        finally:
            self.runner.close()

    def run(self, coro: Any) -> Any:
        return self.runner.run(coro)

    def expect(self, error: type[BaseException] | None, coro: Any) -> Any:
        """Run coro; it must raise ``error`` (a subclass of it), or succeed when None."""
        try:
            result = self.run(coro)
        except AstagesError as e:
            if error is None or not isinstance(e, error):
                raise Breach(f"raised {type(e).__name__}: {e}; the model expects {error and error.__name__}") from e
            return e
        if error is not None:
            raise Breach(f"returned {result!r}; the model expects {error.__name__}")
        return result

    # -- picking ----------------------------------------------------------------------

    def _groups(self) -> list[GroupM]:
        return [g for g in self.model.groups if not g.expired]

    def _live(self) -> list[GroupM]:
        return [g for g in self.model.groups if g.alive]

    def _pick_group(self, data: st.DataObject) -> GroupM:
        live = self._live()
        pool = live if live and data.draw(st.integers(0, 9), label="live?") else self._groups()
        return data.draw(st.sampled_from(pool), label="group")

    @staticmethod
    def _rarely(data: st.DataObject) -> bool:
        """True two times in three: ending groups and stages less often leaves the worker
        rules jobs to work on."""
        return data.draw(st.integers(0, 2), label="skip?") > 0

    def _pick_job(self, data: st.DataObject, pool: list[JobM]) -> JobM:
        return data.draw(st.sampled_from(pool), label="job")

    # -- groups -----------------------------------------------------------------------

    @staticmethod
    def _options(keep: bool, ttl: bool, policy: int) -> dict[str, Any]:
        return {
            "keep_for": 600 if keep else 0,
            "ttl": 3600 if ttl else None,
            "failure_policy": (None, "halt", FailurePolicy(max_failed=1))[policy],
        }

    @initialize(keep=st.booleans(), ttl=st.booleans(), policy=st.integers(0, 2))
    def first_group(self, keep: bool, ttl: bool, policy: int) -> None:
        self.create_group(keep, ttl, policy)

    @rule(keep=st.booleans(), ttl=st.booleans(), policy=st.integers(0, 2))
    def create_group(self, keep: bool, ttl: bool, policy: int) -> None:
        if len(self._live()) >= MAX_GROUPS:
            return
        options = self._options(keep, ttl, policy)
        group = self.run(StagedGroup.create(self.redis, "model", **options))
        self.model.create_group(group, options["keep_for"], ttl, (-1, 0, 1)[policy])

    @rule(
        keep=st.booleans(),
        ttl=st.booleans(),
        policy=st.integers(0, 2),
        plan=st.lists(st.tuples(st.integers(-1, 3), st.integers(0, 4), st.booleans()), min_size=1, max_size=4),
    )
    def grouping(self, keep: bool, ttl: bool, policy: int, plan: list[tuple[int, int, bool]]) -> None:
        """within_a_grouping with concurrent enqueue / enqueue_many calls in the block."""
        if len(self._live()) >= MAX_GROUPS:
            return
        options = self._options(keep, ttl, policy)
        handles: dict[int, list[Any]] = {}

        async def block() -> StagedGroup:
            async with astages.within_a_grouping(self.redis, "grouping", **options) as group:
                stages = {n: await group.stage(n) for n, _, _ in plan}
                calls = []
                for n, count, many in plan:
                    if many:
                        calls.append(stages[n].enqueue_many([("job", (n, i)) for i in range(count)]))
                    else:
                        calls.extend(stages[n].enqueue("job", n, i) for i in range(count))
                results = await asyncio.gather(*calls)
                for n, _, _ in plan:
                    handles.setdefault(n, [])
                for r in results:
                    for h in r if isinstance(r, list) else [r]:
                        handles[h.ref.stage].append(h)
                return group

        group = self.run(block())
        g = self.model.create_group(group, options["keep_for"], ttl, (-1, 0, 1)[policy])
        for n in sorted(handles):
            self.model.ensure_stage(g, n)
        for n, hs in handles.items():
            if hs:
                self._record(g, n, hs, concurrent=True)
        self.model.initiate_group(g)

    def _record(self, g: GroupM, n: int, handles: list[Any], concurrent: bool) -> None:
        """Add the jobs enqueue returned to the model, in the order Redis recorded them
        (calls made at once have no order of their own)."""
        if concurrent and len(handles) > 1:
            listed = [int(s) for s in self.run(self.redis.lrange(KEYS.stage_part(g.gid, n, "jobs"), 0, -1))]
            known = {j.seq for j in g.stages[n].jobs}
            new = [s for s in listed if s not in known]
            by_seq = {int(h.ref.seq): h for h in handles}
            if sorted(new) != sorted(by_seq):
                raise Breach(f"stage {n}: enqueue returned jobs {sorted(by_seq)}, the stage recorded {sorted(new)}")
            handles = [by_seq[s] for s in new]
        for j in self.model.enqueued(g, n, handles):
            j.concurrent = concurrent

    # -- stages and enqueueing --------------------------------------------------------

    @precondition(lambda self: self._groups())
    @rule(data=st.data(), n=st.integers(-1, 4))
    def make_stage(self, data: st.DataObject, n: int) -> None:
        g = self._pick_group(data)

        async def make() -> Any:
            return await g.handle.stage(n)

        self.expect(self.model.ensure_stage(g, n), make())

    @precondition(lambda self: self._groups())
    @rule(data=st.data(), n=st.integers(-1, 4), count=st.integers(1, 3), how=st.sampled_from(["one", "many", "gather"]))
    def enqueue(self, data: st.DataObject, n: int, count: int, how: str) -> None:
        g = self._pick_group(data)
        if g.stages and data.draw(st.integers(0, 4), label="existing?"):
            n = data.draw(st.sampled_from(sorted(g.stages)), label="stage")
        creates = data.draw(st.booleans(), label="group.stage(n) handle?")
        if creates:  # group.stage(n).enqueue... makes a missing stage in the same call
            stage = g.handle.stage(n)
            error = self.model.ensure_stage(g, n) or self.model.enqueue_error(g, n)
        else:  # StagedGroupStage(group, n) never creates
            stage = StagedGroupStage(g.handle, n)
            error = self.model.enqueue_error(g, n)
        if how == "one":
            result = self.expect(error, stage.enqueue("job", n))
            handles = [result]
        elif how == "many":
            result = self.expect(error, stage.enqueue_many([("job", (n, i)) for i in range(count)]))
            handles = result
        else:

            async def several() -> list[Any]:
                parts = await asyncio.gather(stage.enqueue_many([("job", (n, 0))] * count), stage.enqueue("job", n))
                return [*parts[0], parts[1]]

            result = self.expect(error, several())
            handles = result
        if error is None:
            self._record(g, n, handles, concurrent=how == "gather")

    @precondition(lambda self: self._groups())
    @rule(data=st.data(), event=st.sampled_from(["complete", "success", "failure", "stage"]))
    def add_callback(self, data: st.DataObject, event: str) -> None:
        g = self._pick_group(data)
        if event == "stage":
            n = data.draw(st.sampled_from(sorted(g.stages) or [0]), label="stage")
            event = f"stage.{n}"
            call = StagedGroupStage(g.handle, n).on_complete("cb")
        else:
            call = getattr(g.handle, f"on_{event}")("cb")
        error = self.model.add_callback(g, event)
        before = set(self.run(self.redis.hkeys(KEYS.callbacks(g.gid)))) if g.alive else set()
        self.expect(error, call)
        if error is None:
            after = set(self.run(self.redis.hkeys(KEYS.callbacks(g.gid))))
            new = [_t(f) for f in after - before]
            if len(new) != 1:
                raise Breach(f"registering a {event} callback added fields {new}")
            self.model.registered(g, new[0], event)

    @precondition(lambda self: self._groups())
    @rule(data=st.data())
    def initiate_group(self, data: st.DataObject) -> None:
        g = self._pick_group(data)
        self.expect(self.model.initiate_group(g), g.handle.initiate())

    @precondition(lambda self: self._groups())
    @rule(data=st.data())
    def initiate_stage(self, data: st.DataObject) -> None:
        g = self._pick_group(data)
        n = data.draw(st.sampled_from(sorted(g.stages) or [0]), label="stage")
        error = self.model.initiate_stage(g, n)
        if error is None:
            self.by_hand.add((g.gid, n))
        self.expect(error, StagedGroupStage(g.handle, n).initiate())

    @precondition(lambda self: self._groups())
    @rule(data=st.data())
    def cancel_stage(self, data: st.DataObject) -> None:
        if self._rarely(data):
            return
        g = self._pick_group(data)
        n = data.draw(st.sampled_from(sorted(g.stages) or [0]), label="stage")
        self.expect(self.model.cancel_stage(g, n), StagedGroupStage(g.handle, n).cancel())

    @precondition(lambda self: self._groups())
    @rule(data=st.data())
    def cancel_group(self, data: st.DataObject) -> None:
        if self._rarely(data):
            return
        g = self._pick_group(data)
        self.expect(self.model.cancel_group(g), g.handle.cancel())

    @precondition(lambda self: self._groups())
    @rule(data=st.data())
    def delete_group(self, data: st.DataObject) -> None:
        if self._rarely(data):
            return
        g = self._pick_group(data)
        expected = self.model.delete_group(g)
        got = self.run(g.handle.delete())
        if got != expected:
            raise Breach(f"group.delete() returned {got}, the model expects {expected}")

    @precondition(lambda self: self._groups())
    @rule(data=st.data())
    def delete_stage(self, data: st.DataObject) -> None:
        if self._rarely(data):
            return
        g = self._pick_group(data)
        n = data.draw(st.sampled_from(sorted(g.stages) or [0]), label="stage")
        self.expect(self.model.delete_stage(g, n), StagedGroupStage(g.handle, n).delete())
        self.seen.pop((g.gid, n), None)
        self.by_hand.discard((g.gid, n))

    @precondition(lambda self: self.model.jobs)
    @rule(data=st.data())
    def delete_job(self, data: st.DataObject) -> None:
        j = self._pick_job(data, self.model.jobs)
        self.expect(self.model.delete_job(j), j.handle.delete())

    @precondition(lambda self: self.model.jobs)
    @rule(data=st.data())
    def enqueue_job(self, data: st.DataObject) -> None:
        j = self._pick_job(data, self.model.jobs)
        self.expect(self.model.enqueue_job(j), j.handle.enqueue_job())

    # -- the worker ---------------------------------------------------------------------

    def _store(self, j: JobM) -> Any:
        return j.handle._store

    def _arq_done(self, j: JobM) -> None:
        """arq's own clean-up once a try ended for good: job record, queue entry and
        in-progress mark go."""
        if j.in_arq or j.in_progress:
            self.run(self.redis.delete(job_key_prefix + j.handle.id, in_progress_key_prefix + j.handle.id))
            self.run(self.redis.zrem(QUEUE, j.handle.id))
            j.in_arq = j.in_progress = False

    @precondition(lambda self: any(j.in_arq or j.final for j in self.model.jobs))
    @rule(data=st.data(), again=st.booleans(), mark=st.booleans())
    def worker_start(self, data: st.DataObject, again: bool, mark: bool) -> None:
        """arq hands a try to a worker: the next try, the same try again, or a final job
        re-delivered; a try that may run at once is marked in a finish_jobs call with no
        report (its verdict is not read: the run is under way)."""
        j = self._pick_job(data, [j for j in self.model.jobs if j.in_arq or j.final])
        tries = j.tries if again and j.tries else j.tries + 1
        mark = mark and j.alive and not j.final
        expected = self.model.start_job(j, tries)
        ref = j.handle.ref
        if mark:
            self.run(self._store(j).run_now("finish_jobs", ref.group_id, 1, f"{ref.stage}:{ref.seq}:{tries}", 0))
            got = expected
        else:
            got = _t(self.run(self._store(j).run("start_job", ref.group_id, ref.stage, ref.seq, tries)))
        if got != expected:
            raise Breach(f"start_job try {tries} of {j.handle.id} returned {got!r}, the model expects {expected!r}")
        if got == "run":
            # arq marks the run under way (the mark outlives this example)
            self.run(self.redis.set(in_progress_key_prefix + j.handle.id, b"1", px=600_000))
            j.in_progress = True
        else:
            self._arq_done(j)  # the wrapper runs nothing; arq ends the job

    @precondition(lambda self: any(j.in_arq or j.tries for j in self.model.jobs))
    @rule(
        data=st.data(),
        outcome=st.sampled_from("sfe"),
        skew=st.sampled_from([0, 0, 0, -1, 1]),
        via=st.sampled_from(["finish_job", "finish_jobs", "unmarked"]),
    )
    def worker_report(self, data: st.DataObject, outcome: str, skew: int, via: str) -> None:
        """A try's outcome: for the current try, a stale one (skew -1) or one whose start
        was never recorded (skew +1); repeated reports come from drawing it again. Sent
        alone, in a finish_jobs call, or as a run never marked (an outcome in capitals)."""
        j = self._pick_job(data, [j for j in self.model.jobs if j.in_arq or j.tries])
        tries = max(1, j.tries + skew)
        expected = self.model.finish_job(j, tries, outcome)
        ref = j.handle.ref
        error = "boom" * (outcome == "f")
        if via == "finish_job":
            motion = self.run(
                self._store(j).move("finish_job", ref.group_id, ref.stage, ref.seq, tries, outcome, error)
            )
        else:
            sent = outcome.upper() if via == "unmarked" else outcome
            packed = (f"{ref.stage}:{ref.seq}:{tries}:{sent}", *([error] if outcome == "f" else []))
            (motion,) = self.run(self._store(j).moves("finish_jobs", ref.group_id, [packed], 0))
        got = motion.outcome
        if expected in ("gone", "dup", "stale", "retry") and got != expected:
            raise Breach(
                f"finish_job {outcome}{tries} of {j.handle.id} returned {got!r}, the model expects {expected!r}"
            )
        if expected not in ("gone", "dup", "stale", "retry") and got in ("gone", "dup", "stale", "retry"):
            raise Breach(
                f"finish_job {outcome}{tries} of {j.handle.id} returned {got!r}, the model expects a transition"
            )
        if outcome in "sf" and expected != "stale":
            self._arq_done(j)
        elif outcome == "e" and expected != "stale" and j.in_progress:
            # arq re-queues the job for its next try: the run is no longer under way
            self.run(self.redis.delete(in_progress_key_prefix + j.handle.id))
            j.in_progress = False

    def _batchable(self) -> list[list[JobM]]:
        """Jobs queued or with a try under way, by group: a worker's shared report call
        takes several (a queued one as a run never marked: its first try ran at once)."""
        by_group: dict[str, list[JobM]] = {}
        for j in self.model.jobs:
            if j.alive and (j.code == "q" or (j.code == "r" and j.tries)):
                by_group.setdefault(j.group.gid, []).append(j)
        return [jobs for jobs in by_group.values() if len(jobs) >= 2]

    @precondition(lambda self: self._batchable())
    @rule(data=st.data())
    def worker_reports_together(self, data: st.DataObject) -> None:
        """Several runs of one group reported in one finish_jobs call (a worker's shared
        call), each with its own outcome, applied in order: the stage is topped up once,
        after its last report, and the state must be what the reports one by one make."""
        pool = data.draw(st.sampled_from(self._batchable()), label="group's runs")
        jobs = data.draw(st.lists(st.sampled_from(pool), min_size=2, max_size=4, unique_by=id), label="runs")
        outcomes = data.draw(st.lists(st.sampled_from("sfe"), min_size=len(jobs), max_size=len(jobs)), label="outcomes")
        packed, expected = [], []
        for j, o in zip(jobs, outcomes, strict=True):
            unmarked = j.code == "q"  # its first try ran before its mark went: capitals
            tries = j.tries + 1 if unmarked else j.tries
            ref = j.handle.ref
            packed.append((f"{ref.stage}:{ref.seq}:{tries}:{o.upper() if unmarked else o}", *(["boom"] * (o == "f"))))
            expected.append(self.model.finish_job(j, tries, o))
        motions = self.run(self._store(jobs[0]).moves("finish_jobs", jobs[0].handle.ref.group_id, packed, 0))
        refused = ("gone", "dup", "stale", "retry")
        for j, o, want, motion in zip(jobs, outcomes, expected, motions, strict=True):
            got = motion.outcome
            if (want in refused or got in refused) and got != want:
                raise Breach(f"finish_jobs {o}{j.tries} of {j.handle.id} returned {got!r}, the model expects {want!r}")
            if o in "sf" and want != "stale":
                self._arq_done(j)
            elif o == "e" and want != "stale" and j.in_progress:
                self.run(self.redis.delete(in_progress_key_prefix + j.handle.id))
                j.in_progress = False

    # -- sweeper, cleaner, time ---------------------------------------------------------

    def _sweepable(self) -> list[JobM]:
        return [
            j
            for j in self.model.jobs
            if j.alive
            and j.in_arq
            and j.code in "qre"
            and j.group.status == "running"
            and j.group.stages[j.stage].status == "running"
        ]

    @precondition(lambda self: self._sweepable())
    @rule(data=st.data(), how=st.sampled_from(["success", "failure", "none"]))
    def sweep_after_arq(self, data: st.DataObject, how: str) -> None:
        """arq ended a job with no hook (a result, or no trace at all); a sweeper pass (two
        when there is no trace: grace 0) settles it."""
        j = self._pick_job(data, self._sweepable())
        job_id = j.handle.id
        self._arq_done(j)
        tries = max(1, j.tries) if how != "none" else j.tries  # a lost job is failed at the try it was at
        if how != "none":
            now = int(time.time() * 1000)
            raw = serialize_result(
                "job",
                (),
                {},
                tries,
                now,
                how == "success",
                None if how == "success" else ValueError("boom"),
                now,
                now,
                job_id,
                QUEUE,
                job_id,
            )
            self.run(self.redis.set(result_key_prefix + job_id, raw, px=600_000))
        sweeper = Sweeper(self.redis, grace=0)
        self.run(sweeper.sweep())
        if how == "none":
            self.run(sweeper.sweep())
        self.model.finish_job(j, max(tries, j.tries), "s" if how == "success" else "f")

    @precondition(lambda self: self._groups())
    @rule()
    def sweep(self) -> None:
        """A sweeper pass over a consistent state changes nothing."""
        report = self.run(Sweeper(self.redis, grace=0).sweep())
        if 8 not in KNOWN_DEFECTS:
            self.lingering.clear()  # a pass prunes the index of expired groups
        if report.settled or report.errors:
            raise Breach(f"a sweeper pass over a consistent state settled {report.settled} ({report.errors} errors)")

    @rule()
    def cleanup(self) -> None:
        report = self.run(Cleaner.cleanup_jobs(self.redis))
        expired = {g.gid for g in self.model.groups if g.expired}
        allowed = {"index_dropped"}
        for name in REPAIRS:
            items = set(getattr(report, name))
            if name in allowed:
                items -= expired
            if items:
                raise Breach(f"Cleaner.cleanup_jobs repaired a consistent state: {name} {sorted(items)}")
        if report.errors:
            raise Breach(f"Cleaner.cleanup_jobs errors: {report.errors}")
        self.lingering.clear()

    @precondition(lambda self: any(g.alive and (g.ttl or g.ended) for g in self.model.groups))
    @rule(data=st.data())
    def time_passes(self, data: st.DataObject) -> None:
        """The TTL of a ttl= group (its deadline) or of an ended kept group runs out."""
        g = data.draw(st.sampled_from([g for g in self.model.groups if g.alive and (g.ttl or g.ended)]), label="group")

        async def expire() -> None:
            keys = [k async for k in self.redis.scan_iter(match=KEYS.group(g.gid) + "*") if b":summary:" not in k]
            for k in keys:
                await self.redis.pexpire(k, 1)
            deadline = time.monotonic() + 5
            while keys and await self.redis.exists(*keys):
                if time.monotonic() > deadline:
                    raise Breach(f"keys of {g.gid} did not expire")
                await asyncio.sleep(0.002)

        self.run(expire())
        g.deleted = g.expired = True
        self.lingering.add(g.gid)

    # -- the invariants -----------------------------------------------------------------

    @invariant()
    def matches_the_model(self) -> None:
        self.run(self._check())

    async def _check(self) -> None:
        r = self.redis
        problems: list[str] = []
        # callbacks first: what this step enqueued
        queue = {_t(m): s for m, s in await r.zrange(QUEUE, 0, -1, withscores=True)}
        by_gid = {g.gid: g for g in self.model.groups}
        fired = {(g.gid, f) for g, f in self.model.fired_now}
        self.model.fired_now.clear()
        seen_cb = set()
        for member in queue:
            cb = KEYS.parse_callback_id(member)
            if cb is None or cb.group_id not in by_gid:
                continue
            seen_cb.add((cb.group_id, cb.field))
            if not await r.exists(job_key_prefix + member):
                problems.append(f"callback {member} queued without its arq job record")
            await r.delete(job_key_prefix + member)
            await r.zrem(QUEUE, member)
        for gid, f in sorted(seen_cb - fired):
            problems.append(
                f"callback {f} of {gid} enqueued, the model fires nothing"
                f" ({'again' if f in by_gid[gid].fired else 'never fired'})"
            )
        for gid, f in sorted(fired - seen_cb):
            problems.append(f"callback {f} of {gid} should have been enqueued now")
        for gid, f in seen_cb:
            by_gid[gid].fired.add(f)

        # arq's queue and job records
        by_id = {j.handle.id: j for j in self.model.jobs}
        in_queue = set()
        for member in queue:
            ref = KEYS.parse_job_id(member)
            if ref is None or ref.group_id not in by_gid or by_gid[ref.group_id].expired:
                continue
            if member not in by_id:
                problems.append(f"{member} is in arq's queue but no enqueue returned it")
                continue
            in_queue.add(member)
        expected = {i for i, j in by_id.items() if j.in_arq and not j.group.expired}
        for i in sorted(in_queue - expected):
            problems.append(f"{i} ({by_id[i].stored}) is in arq's queue, the model says arq does not hold it")
        for i in sorted(expected - in_queue):
            problems.append(f"{i} ({by_id[i].stored}) is not in arq's queue, the model says arq holds it")
        for i in sorted(expected & in_queue):
            if not await r.exists(job_key_prefix + i):
                problems.append(f"{i} is queued without its arq job record")

        # groups
        index = {_t(m) for m in await r.zrange(KEYS.index, 0, -1)}
        for g in self.model.groups:
            problems += [f"{g.gid}: {p}" for p in await self._check_group(g, index, queue)]
        breaches = await Cleaner.check(r)
        if breaches:
            problems.append(f"Cleaner.check: {breaches}")
        if problems:
            raise Breach("\n".join(problems))

    async def _check_group(self, g: GroupM, index: set[str], queue: dict[str, float]) -> list[str]:
        r = self.redis
        out: list[str] = []
        if g.ends > 1:
            out.append(f"ended {g.ends} times")
        keys = [_t(k) async for k in r.scan_iter(match=KEYS.group(g.gid) + "*")]
        if not g.alive:
            if g.gid in index and g.gid not in self.lingering:
                out.append("gone but still in the groups index")
            for k in keys:
                if ":summary:" in k and await r.pttl(k) > 0:
                    continue
                out.append(f"gone but key {k} remains (pttl {await r.pttl(k)})")
            return out
        if g.gid not in index:
            out.append("live but not in the groups index")
        if g.ttl or g.ended:
            for k in keys:
                if await r.pttl(k) < 0:
                    out.append(f"key {k} has no TTL ({'ttl=' if g.ttl else 'kept'} group)")
        status = _t(await r.hget(KEYS.group(g.gid), "status"))
        if status != g.status:
            out.append(f"group status {status}, the model says {g.status}")
        numbers = [int(n) for n in await r.zrange(KEYS.stages(g.gid), 0, -1)]
        if numbers != g.numbers():
            out.append(f"stages {numbers}, the model says {g.numbers()}")
        for n in g.numbers():
            s = g.stages[n]
            where = f"stage {n}"
            raw = await r.hgetall(KEYS.stage(g.gid, n))
            st_ = _t(raw.get(b"status", b"(none)"))
            if st_ != s.status:
                out.append(f"{where} is {st_}, the model says {s.status}")
            started = st_ == "running" and self.seen.get((g.gid, n)) in (None, "pending")
            self.seen[(g.gid, n)] = st_
            if started and (g.gid, n) not in self.by_hand:
                # a stage made later with a lower number may wait while this one runs; a
                # stage that starts must find every lower one ended
                early = [m for m in g.numbers() if m < n and g.stages[m].status not in ("complete", "cancelled")]
                if early:
                    out.append(f"{where} started while lower stages {early} have not ended")
            listed = [int(x) for x in await r.lrange(KEYS.stage_part(g.gid, n, "jobs"), 0, -1)]
            if listed != [j.seq for j in s.jobs]:
                out.append(f"{where} lists jobs {listed}, enqueue order is {[j.seq for j in s.jobs]}")
            opens = {int(k): _t(v) for k, v in (await r.hgetall(KEYS.stage_part(g.gid, n, "open"))).items()}
            dones = {int(k): _t(v) for k, v in (await r.hgetall(KEYS.stage_part(g.gid, n, "done"))).items()}
            for j in s.jobs:
                got = opens.get(j.seq) or dones.get(j.seq)
                if got != j.stored:
                    out.append(f"{where} job {j.seq} is {got}, the model says {j.stored}")
                if (j.seq in dones) != j.final:
                    out.append(f"{where} job {j.seq} in the wrong hash")
            progress = StageProgress.of(raw)
            for code, name in STATUS.items():
                if getattr(progress, name) != s.count(code):
                    out.append(f"{where} counter {name} = {getattr(progress, name)}, its jobs say {s.count(code)}")
            if progress.retried != s.retried:
                out.append(f"{where} retried = {progress.retried}, the model says {s.retried}")
            # arq takes a stage's queued jobs in enqueue order
            queued = [j.handle.id for j in s.jobs if j.code == "q" and j.handle.id in queue and not j.concurrent]
            taken = sorted(queued, key=lambda i: (queue[i], i))
            if taken != queued and 10 not in KNOWN_DEFECTS:
                out.append(f"{where}: arq takes its queued jobs in the order {taken}, enqueue order is {queued}")
        if g.ended and g.keep_for:
            summary = await r.hget(KEYS.group(g.gid), "summary")
            if summary is None:
                out.append("ended and kept, but no summary")
        return out


StagesMachine.TestCase.settings = settings(
    max_examples=EXAMPLES,
    stateful_step_count=STEPS,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)


def test_scripts_match_the_model(redis_server: Any) -> None:
    """Random operations on the real scripts keep Redis equal to the model and Cleaner.check clean."""
    StagesMachine.server = redis_server
    run_state_machine_as_test(StagesMachine, settings=StagesMachine.TestCase.settings)


def test_scripts_match_the_model_on_fakeredis() -> None:
    """The same on fakeredis (its Lua), with a quarter of the examples."""
    StagesMachine.server = None
    run_state_machine_as_test(
        StagesMachine, settings=settings(StagesMachine.TestCase.settings, max_examples=max(1, EXAMPLES // 4))
    )
