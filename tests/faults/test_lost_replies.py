"""Every mutating public call, run through a proxy that loses replies (Redis executed the
command, the client's connection drops before the reply arrives) with astages' retry
policy: the call is re-sent and must have the effect of ONE call and return (or raise)
what the first call would have. Each case runs twice from the same state, once directly
and once through the proxy with every script call's reply lost once; the group's keys
and arq's queue and job records must end the same.

The real server only (a proxy needs a TCP server)."""

from __future__ import annotations

import asyncio
import json
import pickle
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import pytest
from arq.connections import ArqRedis, RedisSettings, create_pool
from arq.constants import job_key_prefix
from proxy import LostReplyProxy, command_named, every_script_once
from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError

from astages import (
    StagedGroup,
    StagedGroupStage,
    StagedJob,
    within_a_grouping,
)
from astages._keys import Keys
from astages._scripts import Motion, Store
from astages.runner import reconnecting

FAULTS: dict[str, int] = {}  # case -> lost replies injected (read by conftest's summary)
AT = 4_000_000_000  # epoch seconds, a fixed time far ahead (the same in both runs)


async def work(ctx: Any, tag: Any = None) -> Any:
    """A job (never run here)."""
    return tag


async def done(ctx: Any, summary: Any) -> None:
    """A callback (never run here)."""


# -- state built before the call (directly, no fault) ---------------------------------


async def pending(redis: ArqRedis, sizes: tuple[int, ...] = (2, 1)) -> dict[str, Any]:
    """A pending group with stages 1.. of the given sizes."""
    group = await StagedGroup.create(redis, "lost replies")
    jobs = []
    for n, size in enumerate(sizes, start=1):
        stage = await group.stage(n)
        jobs.append([j.id for j in await stage.enqueue_many([(work, (f"{n}-{i}",)) for i in range(size)])])
    return {"gid": group.id, "jobs": jobs}


async def running(redis: ArqRedis, sizes: tuple[int, ...] = (2, 1)) -> dict[str, Any]:
    ctx = await pending(redis, sizes)
    await (await StagedGroup.load(redis, ctx["gid"])).initiate()
    return ctx


async def one_failed(redis: ArqRedis) -> dict[str, Any]:
    """A running group whose stage 1 had a failure (and still has an open job)."""
    ctx = await running(redis, (2, 1))
    store = Store(redis, Keys())
    await store.run("start_job", ctx["gid"], 1, 1, 1)
    await store.move("finish_job", ctx["gid"], 1, 1, 1, "f", "boom")
    return ctx


async def cancelled_stage(redis: ArqRedis) -> dict[str, Any]:
    ctx = await pending(redis, (2, 1))
    await (await (await group_of(redis, ctx)).get_stage(1)).cancel()
    return ctx


async def empty_stages(redis: ArqRedis) -> dict[str, Any]:
    return await pending(redis, (0, 0))


async def nothing(redis: ArqRedis) -> dict[str, Any]:
    return {}


async def group_of(redis: ArqRedis, ctx: dict[str, Any]) -> StagedGroup:
    return await StagedGroup.load(redis, ctx["gid"])


async def stage_of(redis: ArqRedis, ctx: dict[str, Any], n: int) -> StagedGroupStage:
    return StagedGroupStage(await group_of(redis, ctx), n)


async def job_of(redis: ArqRedis, ctx: dict[str, Any], n: int, i: int) -> StagedJob:
    return await StagedJob.load(redis, ctx["jobs"][n - 1][i])


# -- the calls ------------------------------------------------------------------------


async def buffered_grouping(redis: ArqRedis, ctx: dict[str, Any]) -> Any:
    async with within_a_grouping(redis, "buffered") as group:
        first = await group.stage(1)
        second = await group.stage(2)
        jobs = [await first.enqueue(work, i) for i in range(20)]
        jobs += [await second.enqueue(work, "x"), await first.enqueue(work, "late")]
    return [group, *jobs]


async def unbuffered_grouping(redis: ArqRedis, ctx: dict[str, Any]) -> Any:
    async with within_a_grouping(redis, "direct") as group:
        first = await group.stage(1)
        jobs = await first.enqueue_many([(work, (i,)) for i in range(3)])
        await group.on_complete(done)
        await first.initiate()  # the block's later jobs are recorded and sent at once
        jobs.append(await first.enqueue(work, "sent"))
        jobs.append(await (await group.stage(2)).enqueue(work, "next"))
    return [group, *jobs]


async def create(redis: ArqRedis, ctx: dict[str, Any]) -> Any:
    return await StagedGroup.create(redis, "made", keep_for=30, failure_policy="halt")


async def new_stage(redis: ArqRedis, ctx: dict[str, Any]) -> Any:
    return await (await group_of(redis, ctx)).stage(3)


async def handle_enqueue_new_stage(redis: ArqRedis, ctx: dict[str, Any]) -> Any:
    return await (await group_of(redis, ctx)).stage(3, name="third").enqueue(work, "made")


async def handle_on_complete_new_stage(redis: ArqRedis, ctx: dict[str, Any]) -> Any:
    return await (await group_of(redis, ctx)).stage(3).on_complete(done)


async def handle_policy_new_stage(redis: ArqRedis, ctx: dict[str, Any]) -> Any:
    return await (await group_of(redis, ctx)).stage(3).set_failure_policy("halt")


async def rename_stage(redis: ArqRedis, ctx: dict[str, Any]) -> Any:
    return await (await group_of(redis, ctx)).stage(1, name="renamed")


async def enqueue(redis: ArqRedis, ctx: dict[str, Any]) -> Any:
    return await (await stage_of(redis, ctx, 2)).enqueue(work, "one")


async def enqueue_running(redis: ArqRedis, ctx: dict[str, Any]) -> Any:
    return await (await stage_of(redis, ctx, 1)).enqueue(work, "sent")


async def enqueue_many(redis: ArqRedis, ctx: dict[str, Any]) -> Any:
    return await (await stage_of(redis, ctx, 1)).enqueue_many([(work, (i,)) for i in range(3)])


async def enqueue_at(redis: ArqRedis, ctx: dict[str, Any]) -> Any:
    return await (await stage_of(redis, ctx, 1)).enqueue_at(AT, work, "at")


async def enqueue_in(redis: ArqRedis, ctx: dict[str, Any]) -> Any:
    return await (await stage_of(redis, ctx, 1)).enqueue_in(30, work, "in")


def group_callback(event: str) -> Callable[[ArqRedis, dict[str, Any]], Awaitable[Any]]:
    async def call(redis: ArqRedis, ctx: dict[str, Any]) -> Any:
        return await getattr(await group_of(redis, ctx), f"on_{event}")(done, event)

    return call


async def stage_on_complete(redis: ArqRedis, ctx: dict[str, Any]) -> Any:
    return await (await stage_of(redis, ctx, 1)).on_complete(done, "stage")


async def group_policy(redis: ArqRedis, ctx: dict[str, Any]) -> Any:
    return await (await group_of(redis, ctx)).set_failure_policy("halt")


async def stage_policy(redis: ArqRedis, ctx: dict[str, Any]) -> Any:
    return await (await stage_of(redis, ctx, 2)).set_failure_policy("halt")


async def group_initiate(redis: ArqRedis, ctx: dict[str, Any]) -> Any:
    return await (await group_of(redis, ctx)).initiate()


async def stage_initiate(redis: ArqRedis, ctx: dict[str, Any]) -> Any:
    return await (await stage_of(redis, ctx, 1)).initiate()


async def group_cancel(redis: ArqRedis, ctx: dict[str, Any]) -> Any:
    return await (await group_of(redis, ctx)).cancel()


async def stage_cancel(redis: ArqRedis, ctx: dict[str, Any]) -> Any:
    return await (await stage_of(redis, ctx, 1)).cancel()


async def group_delete(redis: ArqRedis, ctx: dict[str, Any]) -> Any:
    return await (await group_of(redis, ctx)).delete()


async def stage_delete(redis: ArqRedis, ctx: dict[str, Any]) -> Any:
    return await (await stage_of(redis, ctx, 1)).delete()


async def job_delete(redis: ArqRedis, ctx: dict[str, Any]) -> Any:
    return await (await job_of(redis, ctx, 1, 0)).delete()


async def last_job_delete(redis: ArqRedis, ctx: dict[str, Any]) -> Any:
    """Deletes the only job of running stage 1: the stage completes and stage 2 starts."""
    return await (await job_of(redis, ctx, 1, 0)).delete()


async def job_enqueue(redis: ArqRedis, ctx: dict[str, Any]) -> Any:
    return await (await job_of(redis, ctx, 1, 0)).enqueue_job()


async def job_enqueue_pending_stage(redis: ArqRedis, ctx: dict[str, Any]) -> Any:
    return await (await job_of(redis, ctx, 2, 0)).enqueue_job()


async def retry_waiting(redis: ArqRedis) -> dict[str, Any]:
    """A running group whose first job waits for its retry."""
    ctx = await running(redis, (2, 1))
    store = Store(redis, Keys())
    await store.run("start_job", ctx["gid"], 1, 1, 1)
    await store.move("finish_job", ctx["gid"], 1, 1, 1, "e", "")
    return ctx


async def job_retry(redis: ArqRedis, ctx: dict[str, Any]) -> Any:
    return await (await job_of(redis, ctx, 1, 0)).retry()


async def job_retry_not_failed(redis: ArqRedis, ctx: dict[str, Any]) -> Any:
    return await (await job_of(redis, ctx, 1, 1)).retry()


async def stage_retry_failed(redis: ArqRedis, ctx: dict[str, Any]) -> Any:
    return await (await stage_of(redis, ctx, 1)).retry_failed()


async def job_message(redis: ArqRedis, ctx: dict[str, Any]) -> Any:
    return await (await job_of(redis, ctx, 1, 1)).set_status_message("half way")


async def create_limited(redis: ArqRedis, ctx: dict[str, Any]) -> Any:
    return await StagedGroup.create(redis, "limited", max_in_flight=3, rate="10/s", priority=5, window=20)


async def group_limits(redis: ArqRedis, ctx: dict[str, Any]) -> Any:
    return await (await group_of(redis, ctx)).set_limits(max_in_flight=2, rate="5/s", priority=1, window=None)


async def stage_limits(redis: ArqRedis, ctx: dict[str, Any]) -> Any:
    return await (await stage_of(redis, ctx, 1)).set_limits(max_in_flight=1, rate="5/s")


async def handle_limits_new_stage(redis: ArqRedis, ctx: dict[str, Any]) -> Any:
    return await (await group_of(redis, ctx)).stage(3).set_limits(max_in_flight=1)


async def worker_shared_call(redis: ArqRedis, ctx: dict[str, Any]) -> Any:
    """A worker's shared call (arq's Worker, see astages/worker.py): a run marked, a run
    reported before its mark went (an outcome in capitals) and a failure, in one
    finish_jobs call; the last report completes stage 1 and starts stage 2. A per-job
    script sent again answers 'dup' for what it did already, so only the effect is
    compared: it must be one call's."""
    store = Store(redis, Keys(), 100)
    await store.moves("finish_jobs", ctx["gid"], [("1:2:1:S",), ("1:3:1:f", "boom")], 1, "1:1:1")
    await store.moves("finish_jobs", ctx["gid"], [("1:1:1:s",)], 0)


def _three_jobs_running(redis: ArqRedis) -> Awaitable[dict[str, Any]]:
    return running(redis, (3, 1))


@dataclass(frozen=True)
class Case:
    name: str
    setup: Callable[[ArqRedis], Awaitable[dict[str, Any]]]
    call: Callable[[ArqRedis, dict[str, Any]], Awaitable[Any]]


def _one_job_running(redis: ArqRedis) -> Awaitable[dict[str, Any]]:
    return running(redis, (1, 1))


CASES = [
    Case("StagedGroup.create", nothing, create),
    Case("within_a_grouping, buffered", nothing, buffered_grouping),
    Case("within_a_grouping, not buffered", nothing, unbuffered_grouping),
    Case("group.stage(n)", pending, new_stage),
    Case("await group.stage(n, name=), renaming", pending, rename_stage),
    Case("group.stage(n).enqueue, missing stage (made)", pending, handle_enqueue_new_stage),
    Case("group.stage(n).on_complete, missing stage (made)", pending, handle_on_complete_new_stage),
    Case("group.stage(n).set_failure_policy, missing stage (made)", pending, handle_policy_new_stage),
    Case("stage.enqueue, pending stage", pending, enqueue),
    Case("stage.enqueue, running stage", running, enqueue_running),
    Case("stage.enqueue_many, running stage", running, enqueue_many),
    Case("stage.enqueue_many", pending, enqueue_many),
    Case("stage.enqueue_at", pending, enqueue_at),
    Case("stage.enqueue_in, running stage", running, enqueue_in),
    Case("group.on_complete", pending, group_callback("complete")),
    Case("group.on_success", running, group_callback("success")),
    Case("group.on_failure", pending, group_callback("failure")),
    Case("group.on_failure after a failure (fires at once)", one_failed, group_callback("failure")),
    Case("stage.on_complete", pending, stage_on_complete),
    Case("group.set_failure_policy", pending, group_policy),
    Case("stage.set_failure_policy", pending, stage_policy),
    Case("group.initiate", pending, group_initiate),
    Case("group.initiate, every stage empty (group ends)", empty_stages, group_initiate),
    Case("stage.initiate", pending, stage_initiate),
    Case("stage.initiate, empty stage (completes at once)", empty_stages, stage_initiate),
    Case("stage.initiate, cancelled stage (raises)", cancelled_stage, stage_initiate),
    Case("group.cancel", running, group_cancel),
    Case("stage.cancel, running stage", running, stage_cancel),
    Case("stage.cancel, pending stage", pending, stage_cancel),
    Case("stage.cancel, cancelled stage (raises)", cancelled_stage, stage_cancel),
    Case("group.delete", running, group_delete),
    Case("stage.delete", running, stage_delete),
    Case("job.delete", running, job_delete),
    Case("job.delete, last open job of the stage", _one_job_running, last_job_delete),
    Case("job.enqueue_job, job waiting for its retry", retry_waiting, job_enqueue),
    Case("job.enqueue_job, job of a pending stage (raises)", pending, job_enqueue_pending_stage),
    Case("job.set_status_message", running, job_message),
    Case("job.retry, failed job of a running stage", one_failed, job_retry),
    Case("job.retry, job not failed (raises)", one_failed, job_retry_not_failed),
    Case("stage.retry_failed", one_failed, stage_retry_failed),
    Case("StagedGroup.create with flow limits", nothing, create_limited),
    Case("group.set_limits, running group", running, group_limits),
    Case("stage.set_limits, running stage", running, stage_limits),
    Case("group.stage(n).set_limits, missing stage (made)", pending, handle_limits_new_stage),
    Case("a worker's shared call (finish_jobs: mark, unmarked, failure)", _three_jobs_running, worker_shared_call),
]


# -- comparing ------------------------------------------------------------------------

_MS = re.compile(r"\d{12,}")  # epoch milliseconds, a stream id, ... (differ between runs)
_GROUP_ID = re.compile(r"[0-9a-f]{32}")


def _mask(value: Any, ids: dict[str, str]) -> Any:
    if isinstance(value, bytes):
        try:
            value = value.decode()
        except UnicodeDecodeError:
            return value
    if isinstance(value, str):
        for real, alias in ids.items():
            value = value.replace(real, alias)
        return _MS.sub("T", value)
    if isinstance(value, bool) or value is None:
        return value
    if isinstance(value, int | float):
        return "T" if value >= 10**11 else value
    if isinstance(value, dict):
        return {_mask(k, ids): _mask(v, ids) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_mask(v, ids) for v in value]
    return value


def _payload(raw: bytes) -> Any:
    job = pickle.loads(raw)
    job.pop("et", None)  # when it was enqueued
    return job


def _spec(raw: bytes) -> Any:
    head, expires, rest = raw.split(b"|", 2)
    qlen, rest = rest.split(b"|", 1)
    return [head, expires, rest[: int(qlen)], _payload(rest[int(qlen) :])]


async def dump(redis: ArqRedis) -> dict[str, Any]:
    """Every key but the reply keys of re-sent calls, normalized: group ids, times and
    enqueue times masked, TTLs as 'has one or not'."""
    out: dict[str, Any] = {}
    raw_keys = sorted(k.decode() for k in await redis.keys("*"))
    ids = {}
    for key in raw_keys:
        if m := re.match(r"astages:\{([^}]*)\}", key):
            ids.setdefault(m.group(1), f"G{len(ids)}")
    for key in raw_keys:
        if key.startswith("astages:reply:"):
            continue
        kind = (await redis.type(key)).decode()
        value: Any
        if kind == "string":
            value = await redis.get(key)
            if key.startswith(job_key_prefix):
                value = _payload(value)
            elif ":summary:" in key:
                value = json.loads(value)
        elif kind == "hash":
            value = await redis.hgetall(key)
            if key.endswith((":spec", ":callbacks")):
                value = {k: _spec(v) for k, v in value.items()}
        elif kind == "list":
            value = await redis.lrange(key, 0, -1)
        elif kind == "zset":
            value = await redis.zrange(key, 0, -1, withscores=True)
        elif kind == "set":
            value = sorted(await redis.smembers(key))
        elif kind == "stream":
            value = [fields for _, fields in await redis.xrange(key)]
        else:
            value = kind
        value = _mask(value, ids)
        if kind == "zset":
            value.sort()  # by member: scores that are times are masked, their order is timing
        out[_mask(key, ids)] = [kind, await redis.pttl(key) > 0, value]
    return out


def outcome(value: Any) -> Any:
    """A call's return value, comparable between runs."""
    if isinstance(value, BaseException):
        return ["raised", type(value).__name__, _GROUP_ID.sub("G", str(value))]
    if isinstance(value, StagedGroup):
        return ["group", value.description == value.id or value.description]
    if isinstance(value, StagedGroupStage):
        return ["stage", value.number]
    if isinstance(value, StagedJob):
        return ["job", str(value.id).split(":", 2)[-1]]
    if isinstance(value, Motion):
        return ["motion", value.outcome, value.stage, value.unsent]
    if isinstance(value, list):
        return [outcome(v) for v in value]
    return value


async def settled(call: Awaitable[Any]) -> Any:
    try:
        return await asyncio.wait_for(call, 30)
    except TimeoutError:
        raise
    except Exception as e:  # the astages error the call raised, compared between runs
        return e


@dataclass
class Run:
    outcome: Any
    dump: dict[str, Any]
    faults: int = 0


async def run_case(case: Case, real_redis: ArqRedis, redis_server: Any, faulty: bool) -> Run:
    await real_redis.flushdb()
    ctx = await case.setup(real_redis)
    if not faulty:
        result = await settled(case.call(real_redis, ctx))
        return Run(outcome(result), await dump(real_redis))
    async with LostReplyProxy(redis_server.host, redis_server.port, every_script_once()) as proxy:
        redis = await create_pool(
            reconnecting(RedisSettings(host="127.0.0.1", port=proxy.port, database=redis_server.db))
        )
        try:
            result = await settled(case.call(redis, ctx))
        finally:
            await redis.aclose()
    return Run(outcome(result), await dump(real_redis), proxy.faults)


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
async def test_lost_reply_has_the_effect_of_one_call(case: Case, real_redis: ArqRedis, redis_server: Any) -> None:
    """A mutating call whose every script reply is lost once (and re-sent) leaves the
    state one call leaves, and returns or raises what one call does."""
    clean = await run_case(case, real_redis, redis_server, faulty=False)
    faulty = await run_case(case, real_redis, redis_server, faulty=True)
    FAULTS[case.name] = faulty.faults
    print(f"{case.name}: {faulty.faults} lost replies")
    assert faulty.faults >= 1, "no reply was lost: the case tests nothing"
    assert faulty.outcome == clean.outcome
    assert faulty.dump == clean.dump


async def test_proxy_loses_a_reply_after_redis_executed_the_command(redis_server: Any, real_redis: ArqRedis) -> None:
    """The proxy's fault: a plain INCR with no retry raises ConnectionError, and Redis
    incremented once."""
    async with LostReplyProxy(redis_server.host, redis_server.port, command_named("INCR")) as proxy:
        client = Redis(host="127.0.0.1", port=proxy.port, db=redis_server.db)
        try:
            with pytest.raises(RedisConnectionError):
                await client.execute_command("INCR", "counter")
            assert await client.execute_command("INCR", "counter") == 2  # a new connection; this reply arrives
        finally:
            await client.aclose()
    assert proxy.faults == 1
    assert await real_redis.get("counter") == b"2"


async def test_enqueue_resent_after_another_call_recorded_lands_once(redis_server: Any, real_redis: ArqRedis) -> None:
    """Job A whose reply was lost, re-sent after job B of the same stage was recorded,
    is recorded once (a stage remembering only its last request took A's re-send for new)."""
    ctx = await pending(real_redis, (1,))
    other = await stage_of(real_redis, ctx, 1)
    handles = []

    async def meanwhile() -> None:
        handles.append(await other.enqueue(work, "B"))

    async with LostReplyProxy(redis_server.host, redis_server.port, every_script_once(), meanwhile) as proxy:
        redis = await create_pool(
            reconnecting(RedisSettings(host="127.0.0.1", port=proxy.port, database=redis_server.db))
        )
        try:
            job_a = await (await stage_of(redis, ctx, 1)).enqueue(work, "A")
        finally:
            await redis.aclose()
    assert proxy.faults == 1
    jobs = await (await stage_of(real_redis, ctx, 1)).jobs()
    assert [j.args for j in jobs] == [("1-0",), ("A",), ("B",)]
    assert [str(j.id) for j in jobs] == [ctx["jobs"][0][0], str(job_a.id), str(handles[0].id)]
