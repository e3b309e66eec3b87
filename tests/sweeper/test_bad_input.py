"""The bad-input table of docs/operations.md ("Bad input"): each user mistake gets a clear
error or a clear job failure, never a stuck group or a crashed worker (real Redis)."""

from __future__ import annotations

import asyncio
import datetime as dt
import math
import secrets
import time

import arq.worker
import pytest
from helpers import keys_left, run_burst, start_unsent, stop_when_idle, wait_for
from redis.exceptions import ResponseError

import astages
from astages import (
    AstagesError,
    Cleaner,
    CorruptRecord,
    GroupNotFound,
    GroupStatus,
    InvalidJobFunction,
    InvalidQueue,
    InvalidSchedule,
    InvalidStageNumber,
    InvalidStatusMessage,
    JobNotFound,
    JobStatus,
    StagedGroup,
    StagedJob,
    StageNotFound,
    StageStatus,
)
from astages._scripts import raise_code
from astages.models import decode_spec

OUTCOMES: dict[str, str] = {}


async def work(ctx, tag):
    """Records the job's outcome in the test (the group deletes itself when done)."""
    OUTCOMES[tag] = "ran"
    return tag


async def noisy(ctx, tag, message):
    """Sets the status message it is given."""
    job = await StagedJob.perform_job(ctx, tag, message)
    try:
        await job.set_status_message(message)
    except AstagesError as e:
        OUTCOMES[tag] = type(e).__name__
        raise
    OUTCOMES[tag] = "ran"


RELEASE = asyncio.Event()


async def hold(ctx, tag):
    """Waits until the test releases it (keeps its group alive to be looked at)."""
    await asyncio.wait_for(RELEASE.wait(), 20)
    OUTCOMES[tag] = "ran"


@pytest.fixture(autouse=True)
def _clear():
    OUTCOMES.clear()
    RELEASE.clear()


async def test_wrong_types_raise_clear_errors(real_redis):
    """Wrong types raise an AstagesError subclass naming the mistake; nothing is recorded."""
    group = await StagedGroup.create(real_redis, "bad types")
    stage = await group.stage(1)
    with pytest.raises(InvalidStageNumber, match="must be an int, not str"):
        await group.stage("1")  # type: ignore[arg-type]
    with pytest.raises(InvalidStageNumber):
        await group.stage(1.5)  # type: ignore[arg-type]
    with pytest.raises(AstagesError, match="description must be a str"):
        await StagedGroup.create(real_redis, 5)  # type: ignore[arg-type]
    with pytest.raises(InvalidJobFunction, match="not int"):
        await stage.enqueue(42)  # type: ignore[arg-type]
    with pytest.raises(InvalidJobFunction):
        await stage.enqueue(print)  # a plain (not async) function
    with pytest.raises(InvalidQueue):
        await stage.enqueue_to(5, work, 1)  # type: ignore[arg-type]
    with pytest.raises(InvalidStatusMessage, match="must be a str, not int"):
        await (await stage.enqueue(work, "m")).set_status_message(5)  # type: ignore[arg-type]
    with pytest.raises(InvalidStatusMessage, match="limited to 65536 characters"):
        await (await stage.enqueue(work, "m")).set_status_message("x" * 1_000_000)
    assert await stage.num_jobs() == 2


async def test_unknown_ids_raise_not_found(real_redis):
    """Unknown group and job ids raise GroupNotFound / JobNotFound and create nothing."""
    with pytest.raises(GroupNotFound):
        await StagedGroup.load(real_redis, "no-such-group")
    with pytest.raises(JobNotFound):
        await StagedJob.load(real_redis, "astages:no-such-group:1:1")
    with pytest.raises(JobNotFound):
        await StagedJob.load(real_redis, "not a staged job id")
    assert await keys_left(real_redis) == []


async def test_deleted_stage_group_and_job(real_redis):
    """Using a deleted stage, group or job raises StageNotFound / GroupNotFound / JobNotFound."""
    group = await StagedGroup.create(real_redis, "deleted")
    stage = await group.stage(1)
    job = await stage.enqueue(work, "j")
    await job.delete()
    with pytest.raises(JobNotFound):
        await job.status()
    await stage.delete()
    for action in (lambda: stage.enqueue(work, 1), stage.status, stage.initiate, stage.delete):
        with pytest.raises(StageNotFound, match=r"call group\.stage"):
            await action()
    await group.delete()
    with pytest.raises(GroupNotFound):
        await group.stage(1)
    with pytest.raises(GroupNotFound):
        await group.initiate()


async def test_unregistered_function_name_fails_the_job_not_the_group(real_redis):
    """A job naming a function no worker has ends failed (arq: 'not found', no hook; the sweeper settles it)."""
    async with astages.within_a_grouping(real_redis, "unregistered") as group:
        stage = await group.stage(1)
        missing = await stage.enqueue("no_such_function", "x")
        await stage.enqueue(work, "ok")
        await (await group.stage(2)).enqueue(hold, "after")
    settings = astages.worker_settings(functions=[work, hold], sweep_interval=0.2, sweep_grace=0.1)
    worker = arq.worker.Worker(**settings, redis_pool=real_redis, poll_delay=0.01, handle_signals=False)
    task = asyncio.ensure_future(worker.main())
    try:

        async def missing_failed() -> bool:
            return await missing.status() is JobStatus.FAILED

        await wait_for(missing_failed, within=10, what="the sweeper to fail the job")
        assert "function 'no_such_function' not found" in (await missing.error() or "")
        RELEASE.set()

        async def gone() -> bool:
            return not await group.exists()

        await wait_for(gone, within=10, what="the group to finish")
    finally:
        await stop_when_idle(worker, task)
    assert OUTCOMES == {"ok": "ran", "after": "ran"}


async def test_bad_status_message_inside_a_job_fails_that_job(real_redis):
    """A job setting a 1 MB or non-str message fails with InvalidStatusMessage; its stage and group go on."""
    async with astages.within_a_grouping(real_redis, "messages") as group:
        stage = await group.stage(1)
        await stage.enqueue(noisy, "big", "x" * 1_000_000)
        await stage.enqueue(noisy, "int", 5)
        await stage.enqueue(noisy, "fine", "ok")
        await (await group.stage(2)).enqueue(work, "after")
    worker = await run_burst(real_redis, [noisy, work])
    assert OUTCOMES == {"big": "InvalidStatusMessage", "int": "InvalidStatusMessage", "fine": "ran", "after": "ran"}
    assert worker.jobs_failed == 2
    assert not await group.exists()


async def test_planted_garbage_is_reported_and_removable(real_redis):
    """Data astages did not write: reads raise CorruptRecord or Redis' WRONGTYPE, check names the group,
    the worker survives, and delete() or purge_all removes it."""
    async with astages.within_a_grouping(real_redis, "garbage") as group:
        stage = await group.stage(1)
        job = await stage.enqueue(work, "g")
    keys = group.store.keys
    await real_redis.hset(keys.stage_part(group.id, 1, "spec"), str(job.ref.seq), b"garbage")
    with pytest.raises(CorruptRecord, match="was not written by astages"):
        await job.info()
    await real_redis.hset(keys.stage_part(group.id, 1, "open"), str(job.ref.seq), b"zz")
    with pytest.raises(CorruptRecord, match="not a job status code"):
        await job.status()
    assert "unknown status code" in " ".join((await Cleaner.check(real_redis))[group.id])
    await real_redis.delete(keys.group(group.id))
    await real_redis.set(keys.group(group.id), b"garbage")
    with pytest.raises(ResponseError, match="WRONGTYPE"):
        await group.status()
    assert (await Cleaner.check(real_redis))[group.id][0].startswith("corrupt record")
    worker = await run_burst(real_redis, [work])  # the job's arq record still exists: the worker runs it
    assert worker.jobs_complete + worker.jobs_failed == 1
    assert (await astages.sweeper.sweep(real_redis, grace=0)).errors == 1  # skipped, logged, not raised
    assert await group.delete()
    assert await keys_left(real_redis) == []


async def test_garbage_in_the_index_and_stage_list(real_redis):
    """Garbage in the index or a stage list is reported by check and dropped by cleanup_jobs."""
    group = await StagedGroup.create(real_redis, "lists")
    await group.stage(1)
    keys = group.store.keys
    await real_redis.zadd(keys.stages(group.id), {"not-a-number": 5})
    assert "unreadable" in (await Cleaner.check(real_redis))[group.id][0]
    report = await Cleaner.cleanup_jobs(real_redis)
    assert report.stages_dropped == (f"{group.id}:not-a-number",)
    assert await Cleaner.check(real_redis) == {}


# -- out-of-range times and unusable specs (issue 10, item 3) ---------------------------

CALLS: list[str] = []


async def note(ctx, summary, tag):
    """A callback: records that it ran (once per run)."""
    CALLS.append(tag)


@pytest.fixture(autouse=True)
def _clear_calls():
    CALLS.clear()


# Every value the bad-input table lists: refused with InvalidSchedule, nothing recorded.
BAD_SCHEDULES = {
    "enqueue_at(time.time() * 1e6)": lambda s: s.enqueue_at(time.time() * 1e6, work, "x"),
    "enqueue_at(-1)": lambda s: s.enqueue_at(-1, work, "x"),
    "enqueue_at(1900)": lambda s: s.enqueue_at(dt.datetime(1900, 1, 1, tzinfo=dt.UTC), work, "x"),
    "enqueue_at(3001)": lambda s: s.enqueue_at(dt.datetime(3001, 1, 1, tzinfo=dt.UTC), work, "x"),
    "enqueue_at(nan)": lambda s: s.enqueue_at(math.nan, work, "x"),
    "enqueue_at(inf)": lambda s: s.enqueue_at(math.inf, work, "x"),
    "enqueue_in(1e14)": lambda s: s.enqueue_in(1e14, work, "x"),
    "enqueue_in(nan)": lambda s: s.enqueue_in(math.nan, work, "x"),
    "enqueue_in(inf)": lambda s: s.enqueue_in(math.inf, work, "x"),
    "enqueue_in(-inf)": lambda s: s.enqueue_in(-math.inf, work, "x"),
    "enqueue_in(timedelta.max)": lambda s: s.enqueue_in(dt.timedelta.max, work, "x"),
    "_defer_until=1e14": lambda s: s.enqueue(work, "x", _defer_until=1e14),
    "_defer_until=datetime.max": lambda s: s.enqueue(work, "x", _defer_until=dt.datetime.max),
    "_defer_by=10**15": lambda s: s.enqueue(work, "x", _defer_by=10**15),
    "_defer_by=nan": lambda s: s.enqueue(work, "x", _defer_by=math.nan),
    "_expires=1e14": lambda s: s.enqueue(work, "x", _expires=1e14),
    "_expires=-1": lambda s: s.enqueue(work, "x", _expires=-1),
    "_expires=inf": lambda s: s.enqueue(work, "x", _expires=math.inf),
    "_expires=nan": lambda s: s.enqueue(work, "x", _expires=math.nan),
    "_job_try=0": lambda s: s.enqueue(work, "x", _job_try=0),
    "_job_try=2.5": lambda s: s.enqueue(work, "x", _job_try=2.5),
    "_job_try='2'": lambda s: s.enqueue(work, "x", _job_try="2"),
    "_job_try=10**30": lambda s: s.enqueue(work, "x", _job_try=10**30),
    "enqueue_many _expires=1e14": lambda s: s.enqueue_many([(work, ("ok",)), (work, ("x",), {"_expires": 1e14})]),
    "stage callback _defer_by=10**15": lambda s: s.on_complete(note, "x", _defer_by=10**15),
    "group callback _defer_by=10**15": lambda s: s.group.on_complete(note, "x", _defer_by=10**15),
    "group callback _defer_until=nan": lambda s: s.group.on_failure(note, "x", _defer_until=math.nan),
    "group callback _expires=1e14": lambda s: s.group.on_success(note, "x", _expires=1e14),
}


@pytest.mark.parametrize("call", BAD_SCHEDULES.values(), ids=BAD_SCHEDULES.keys())
async def test_out_of_range_schedule_is_refused_and_records_nothing(real_redis, call):
    """An out-of-range, NaN or infinite time, delay or expiry (or a bad _job_try): InvalidSchedule, nothing recorded."""
    group = await StagedGroup.create(real_redis, "bad schedule")
    stage = await group.stage(1)
    with pytest.raises(InvalidSchedule, match=r"not|between|at most|from"):
        await call(stage)
    keys = group.store.keys
    assert await stage.num_jobs() == 0
    assert await real_redis.hlen(keys.callbacks(group.id)) == 0


async def test_refused_schedules_leave_the_group_to_end_once(real_redis):
    """After every bad value was refused, the group runs to its end and each callback fires exactly once."""
    group = await StagedGroup.create(real_redis, "refused")
    s1 = await group.stage(1)
    await s1.enqueue(work, "a")
    await s1.enqueue_in(-5, work, "negative delay")  # a negative delay means now, as in arq
    await s1.enqueue_at(time.time() - 60, work, "past time")
    await (await group.stage(2)).enqueue(work, "b")
    await group.on_complete(note, "complete")
    await s1.on_complete(note, "stage1")
    for call in BAD_SCHEDULES.values():
        with pytest.raises(InvalidSchedule):
            await call(s1)
    await group.initiate()
    await run_burst(real_redis, [work, note])
    assert not await group.exists()
    assert sorted(CALLS) == ["complete", "stage1"]
    assert OUTCOMES == {"a": "ran", "negative delay": "ran", "past time": "ran", "b": "ran"}


async def _respec(redis, key: str, field: str | bytes, make) -> None:
    """Rewrite one stored spec with ``make(queue bytes, payload)`` (as another version, or a hand, might)."""
    _, queue, payload = decode_spec(await redis.hget(key, field))
    await redis.hset(key, field, make(queue.encode(), payload))


# Stored specs no script can send: (name, make(queue, payload) -> spec, what the error says)
PLANTED = [
    ("time*1e6", lambda q, p: b"a1780000000000000000000|0|%d|" % len(q) + q + p, "out of range"),
    ("year 5138", lambda q, p: b"a100000000000000|0|%d|" % len(q) + q + p, "not between epoch 0"),
    ("before 1970", lambda q, p: b"a-5|0|%d|" % len(q) + q + p, "not between epoch 0"),
    ("in 1e14 s", lambda q, p: b"i100000000000000000|0|%d|" % len(q) + q + p, "out of range"),
    ("in 1e13 ms", lambda q, p: b"i10000000000000|0|%d|" % len(q) + q + p, "longer than 100 years"),
    ("expires 1e14 s", lambda q, p: b"n0|100000000000000000|%d|" % len(q) + q + p, "out of range"),
    ("expires 1e13 ms", lambda q, p: b"n0|10000000000000|%d|" % len(q) + q + p, "longer than 100 years"),
    ("exponent", lambda q, p: b"a1.78e+15|0|%d|" % len(q) + q + p, "cannot be parsed"),
    ("nan", lambda q, p: b"anan|0|%d|" % len(q) + q + p, "cannot be parsed"),
    ("garbage", lambda q, p: b"garbage", "cannot be parsed"),
    ("queue cut", lambda q, p: b"n0|0|999|" + q + p[:3], "cut short"),
    ("no payload", lambda q, p: b"n0|0|%d|" % len(q) + q, "cut short"),
]


async def test_planted_unusable_specs_fail_their_jobs_and_the_group_ends(real_redis):
    """Stored specs no script can send fail their jobs with the reason when their stage starts (a stage of only
    such jobs completes at once); the group ends, each callback fires once, a bad callback is skipped with an
    event, and a sweeper pass finds nothing to repair."""
    group = await StagedGroup.create(real_redis, "planted", keep_for=60)
    s1, s2, s3 = await group.stage(1), await group.stage(2), await group.stage(3)
    await s1.enqueue(work, "s1-ok")
    bad = {name: await s1.enqueue(work, name) for name, _, _ in PLANTED}
    only_bad = [await s2.enqueue(work, f"s2-{i}") for i in range(3)]
    await s3.enqueue(work, "s3-ok")
    await group.on_complete(note, "complete")
    await group.on_failure(note, "failure")
    await group.on_complete(note, "bad callback")
    await s1.on_complete(note, "stage1")
    await s2.on_complete(note, "stage2")
    keys = group.store.keys
    for name, make, _ in PLANTED:
        await _respec(real_redis, keys.stage_part(group.id, 1, "spec"), str(bad[name].ref.seq), make)
    for job in only_bad:
        await _respec(real_redis, keys.stage_part(group.id, 2, "spec"), str(job.ref.seq), PLANTED[0][1])
    fields = await real_redis.hgetall(keys.callbacks(group.id))
    (field,) = [f for f, spec in fields.items() if b"bad callback" in spec]
    await _respec(real_redis, keys.callbacks(group.id), field, lambda q, p: b"i1000000000000000000|0|1|q" + p)

    await group.initiate()
    await run_burst(real_redis, [work, note])

    assert await group.status() is GroupStatus.COMPLETE
    assert sorted(CALLS) == ["complete", "failure", "stage1", "stage2"]
    assert OUTCOMES == {"s1-ok": "ran", "s3-ok": "ran"}
    for name, _, why in PLANTED:
        assert await bad[name].status() is JobStatus.FAILED, name
        assert "not sent to arq" in (await bad[name].error() or "") and why in (await bad[name].error() or ""), name
    progress = await group.progress()
    assert (progress[1].failed, progress[2].failed, progress[3].successful) == (len(PLANTED), 3, 1)
    skipped = [e for e in await group.events(1000) if e.to_status == "callback_skipped"]
    assert [e.details["callback"] for e in skipped] == [field.decode()]
    assert "out of range" in skipped[0].details["error"]
    report = await astages.sweeper.sweep(real_redis, grace=0)
    assert report.errors == 0
    assert await Cleaner.check(real_redis) == {}


async def test_unusable_spec_breaching_the_failure_policy_stops_the_group_once(real_redis):
    """A job failed for its unusable spec counts for the failure policy: a halting group ends failed, once."""
    group = await StagedGroup.create(real_redis, "halt", failure_policy="halt", keep_for=60)
    s1 = await group.stage(1)
    job = await s1.enqueue(work, "bad")
    await s1.enqueue(work, "never")
    await (await group.stage(2)).enqueue(work, "never either")
    await group.on_complete(note, "complete")
    await group.on_failure(note, "failure")
    keys = group.store.keys
    await _respec(real_redis, keys.stage_part(group.id, 1, "spec"), str(job.ref.seq), PLANTED[0][1])
    await group.initiate()
    await run_burst(real_redis, [work, note])
    assert await group.status() is GroupStatus.FAILED
    assert sorted(CALLS) == ["complete", "failure"]
    assert OUTCOMES == {}


async def test_unusable_specs_in_a_later_chunk_complete_the_stage(real_redis):
    """A stage sent in chunks whose last chunk holds only unusable specs completes when that chunk is sent
    (by the first report, which tops the stage's window up)."""
    group = await StagedGroup.create(real_redis, "chunks")
    s1 = await group.stage(1)
    first = [await s1.enqueue(work, f"first-{i}") for i in range(2)]
    later = [await s1.enqueue(work, f"later-{i}") for i in range(3)]
    await (await group.stage(2)).enqueue(work, "next")
    keys = group.store.keys
    for job in later:
        await _respec(real_redis, keys.stage_part(group.id, 1, "spec"), str(job.ref.seq), PLANTED[0][1])
    await start_unsent(group, 1, send=2)  # the first chunk only
    for job in first:  # the sent jobs finish; the first report sends the rest
        await group.store.run("start_job", group.id, 1, job.ref.seq, 1)
        motion = await group.store.move("finish_job", group.id, 1, job.ref.seq, 1, "s", "")
    assert (motion.outcome, motion.stage) == ("running", "2")
    assert await s1.status() is StageStatus.COMPLETE
    assert [await job.status() for job in later] == [JobStatus.FAILED] * 3


async def test_scripts_refuse_an_unusable_spec_before_any_write(real_redis):
    """enqueue and add_callback given a spec no script could send raise CorruptRecord and write nothing."""
    group = await StagedGroup.create(real_redis, "raw")
    stage = await group.stage(1)
    await stage.enqueue(work, "ok")
    keys = group.store.keys
    pattern = keys.group(group.id) + "*"
    before = {k: await real_redis.dump(k) for k in await real_redis.keys(pattern)}
    good = await real_redis.hget(keys.stage_part(group.id, 1, "spec"), "1")
    for spec in (b"a1780000000000000000000|0|9|arq:queuex", b"garbage", b"i1e14|0|9|arq:queuex"):
        reply = await group.store.run("enqueue", group.id, 1, secrets.token_hex(8), "", good, spec)
        with pytest.raises(CorruptRecord, match=r"job 2 of the call: .*; nothing was recorded"):
            raise_code(reply, group.id, 1)
        for event in ("complete", "stage.1"):
            reply = await group.store.run("add_callback", group.id, event, spec)
            with pytest.raises(CorruptRecord, match="nothing was recorded"):
                raise_code(reply, group.id, None)
    assert {k: await real_redis.dump(k) for k in await real_redis.keys(pattern)} == before
    assert await stage.num_jobs() == 1


@pytest.mark.parametrize(
    "options", [{"keep_for": 10**17}, {"events": 10**20}, {"ttl": 10**14}, {"ttl": 10**20}], ids=str
)
async def test_huge_group_options_never_stop_a_script_half_way(real_redis, options):
    """A group whose keep_for, events cap or ttl is far past any use (create() refuses
    them; written here as another client or an older version could) still ends, each
    callback firing once."""
    from astages._keys import Keys
    from astages._scripts import Store
    from astages.group import new_group_id
    from astages.models import now_ms

    created = now_ms()
    group_id = new_group_id(created)
    deadline = created + options["ttl"] * 1000 if "ttl" in options else ""
    await Store(real_redis, Keys()).run(
        "create_group",
        group_id,
        "huge",
        created,
        options.get("keep_for", 0),
        options.get("events", 1000),
        -1,
        -1,
        deadline,
    )
    group = await StagedGroup.load(real_redis, group_id)
    s1 = await group.stage(1)
    await s1.enqueue(work, "a")
    await s1.on_complete(note, "stage1")
    await group.on_complete(note, "complete")
    await group.initiate()
    await run_burst(real_redis, [work, note])
    assert sorted(CALLS) == ["complete", "stage1"]
    assert OUTCOMES == {"a": "ran"}
    if "keep_for" in options:
        assert await group.status() is GroupStatus.COMPLETE
        assert 0 < await real_redis.ttl(group.store.keys.group(group.id)) <= 100 * 366 * 86400
    else:
        assert not await group.exists()
