"""StagedGroup: numbered stages run one after another, then the group deletes itself."""

from __future__ import annotations

import builtins
import datetime as dt
import json
import math
import secrets
import uuid
from types import EllipsisType
from typing import TYPE_CHECKING, Any

import anyio

from astages import tracing
from astages._flow import FlowLimits, Rate, cap_arg, priority_arg, rate_args, window_arg
from astages._keys import DEFAULT_PREFIX, Keys
from astages._scripts import Motion, RecordBuffer, Store, raise_code, text
from astages.exceptions import AstagesError, GroupNotFound, InvalidStageNumber, StageNotFound
from astages.models import (
    MAX_DELAY_MS,
    Event,
    FailurePolicy,
    GroupStatus,
    GroupSummary,
    Schedule,
    StageProgress,
    StageStatus,
    ms_to_datetime,
    now_ms,
)
from astages.stage import RECORD_BATCH, JobFunction, StagedGroupStage, make_spec, refuse_job_id

if TYPE_CHECKING:
    from arq.connections import ArqRedis

__all__ = ["DEFAULT_EVENTS", "GroupEnding", "StagedGroup", "within_a_grouping"]

# Default cap of a group's event timeline (a Redis stream trimmed to about this length).
DEFAULT_EVENTS = 1_000
# The largest cap (the scripts cap it there too).
MAX_EVENTS = 10**12


_last_id_ms = 0
_id_seq = 0


def new_group_id(ms: int) -> str:
    """A UUIDv7 (time-ordered, 32 hex digits): ids sort in creation order, so groups
    made in the same millisecond still list in the order they were made (rand_a holds a
    per-process sequence within the millisecond)."""
    global _last_id_ms, _id_seq
    if ms == _last_id_ms:
        _id_seq = (_id_seq + 1) & 0xFFF
    else:
        _last_id_ms, _id_seq = ms, 0
    value = (ms & (2**48 - 1)) << 80 | 0x7 << 76 | _id_seq << 64 | 0b10 << 62 | (secrets.randbits(62))
    return uuid.UUID(int=value).hex


def _check_number(number: object) -> int:
    if isinstance(number, bool) or not isinstance(number, int):
        raise InvalidStageNumber(number)
    return number


class StagedGroup:
    """A group of numbered stages. Stages run in ascending number order; every job of a
    stage, retries included, finishes before the next stage starts; when the last stage
    completes, the group and everything in it is deleted."""

    __slots__ = ("created_at", "description", "id", "store")

    def __init__(
        self, store: Store, group_id: str, description: str = "", created_at: dt.datetime | None = None
    ) -> None:
        self.store = store
        self.id = group_id
        self.description = description or group_id
        self.created_at = created_at

    def __repr__(self) -> str:
        return f"<StagedGroup {self.id} {self.description!r}>"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, StagedGroup) and other.id == self.id

    def __hash__(self) -> int:
        return hash(self.id)

    @property
    def redis(self) -> Any:
        """The group's ArqRedis connection."""
        return self.store.redis

    @property
    def _key(self) -> str:
        return self.store.keys.group(self.id)

    # -- creating and finding -------------------------------------------------------

    @classmethod
    async def create(
        cls,
        redis: ArqRedis,
        description: str = "",
        *,
        prefix: str = DEFAULT_PREFIX,
        keep_for: float = 0,
        events: int = DEFAULT_EVENTS,
        failure_policy: FailurePolicy | str | None = None,
        ttl: float | None = None,
        max_in_flight: int | None = None,
        rate: str | Rate | None = None,
        priority: int = 0,
        window: int | EllipsisType | None = ...,
    ) -> StagedGroup:
        """A new, empty, pending group.

        ``keep_for`` (seconds): keep the ended group readable, with its summary, for that
        long (a Redis TTL) instead of deleting it at once. ``events``: cap of the group's
        event timeline (0: none). ``failure_policy``: ``"continue"`` (default), ``"halt"``
        or a ``FailurePolicy``; a stage may have its own. ``ttl`` (seconds): a safety
        net for a group that never ends (its workers gone, its jobs lost): every key of
        the group expires that long after its creation unless it has ended by then.

        Flow control (see ``set_limits``): ``max_in_flight`` caps the group's jobs sent to
        arq and not final (queued, running or waiting for a retry), across every stage and
        worker; ``rate`` (``"50/s"``, ``"600/m"``, ``"10/h"``) spaces the group's jobs
        evenly; ``priority`` (seconds, 0 to 86,400) puts its jobs ahead of those other
        groups send up to that long after them; ``window`` is how many jobs of a running
        stage are in flight at most (default ``DEFAULT_WINDOW``; None: no window, a stage
        is sent whole as it starts)."""
        if not isinstance(description, str):
            raise AstagesError(f"a group description must be a str, not {type(description).__name__}")
        years = MAX_DELAY_MS // 1000
        if not 0 <= keep_for <= years:  # NaN fails too
            raise AstagesError(
                f"keep_for must be a number of seconds from 0 to {years:,} (100 years), not {keep_for!r}"
            )
        if isinstance(events, bool) or not isinstance(events, int) or not 0 <= events <= MAX_EVENTS:
            raise AstagesError(f"events must be an int from 0 to {MAX_EVENTS:,}, not {events!r}")
        if ttl is not None and not 0 < ttl <= years:
            raise AstagesError(
                f"ttl must be a number of seconds > 0 and at most {years:,} (100 years), or None, not {ttl!r}"
            )
        policy = FailurePolicy.of(failure_policy)
        cap = cap_arg(max_in_flight)
        rate_iv, rate_text = rate_args(rate)
        limits = (cap, rate_iv, rate_text, priority_arg(priority), "" if window is ... else window_arg(window))
        store = Store(redis, Keys(prefix))
        created = now_ms()
        group_id = new_group_id(created)
        await store.run(
            "create_group",
            group_id,
            description or group_id,
            created,
            math.ceil(keep_for),
            int(events),
            *policy.script_args(),
            "" if ttl is None else created + math.ceil(ttl * 1000),
            *limits,
            tracing.parent_field(),
        )
        return cls(store, group_id, description, ms_to_datetime(created))

    @classmethod
    def within_a_grouping(cls, redis: ArqRedis, description: str = "", **options: Any) -> _Grouping:
        """Same as ``astages.within_a_grouping`` (same options)."""
        return within_a_grouping(redis, description, **options)

    @classmethod
    async def load(cls, redis: ArqRedis, group_id: str, *, prefix: str = DEFAULT_PREFIX) -> StagedGroup:
        """The group with this id; GroupNotFound when there is none (nothing is created)."""
        store = Store(redis, Keys(prefix))
        raw = await store.redis.hmget(store.keys.group(group_id), ["description", "created"])
        if raw[1] is None:
            raise GroupNotFound(group_id)
        return cls(store, group_id, text(raw[0]), ms_to_datetime(int(raw[1])))

    @classmethod
    async def list(
        cls,
        redis: ArqRedis,
        offset: int = 0,
        limit: int | None = None,
        *,
        prefix: str = DEFAULT_PREFIX,
        newest_first: bool = False,
    ) -> builtins.list[StagedGroup]:
        """Live groups, oldest first, or newest first with ``newest_first=True`` (a page
        of them when ``offset``/``limit`` are given)."""
        store = Store(redis, Keys(prefix))
        stop = -1 if limit is None else offset + limit - 1
        read = store.redis.zrevrange if newest_first else store.redis.zrange
        ids = [text(i) for i in await read(store.keys.index, offset, stop)]
        if not ids:
            return []
        async with store.redis.pipeline(transaction=False) as pipe:
            for group_id in ids:
                pipe.hmget(store.keys.group(group_id), ["description", "created"])
            rows = await pipe.execute()
        groups, expired = [], []
        for group_id, (description, created) in zip(ids, rows, strict=True):
            if created is None:
                expired.append(group_id)  # a group kept with keep_for whose TTL ran out
            else:
                groups.append(cls(store, group_id, text(description), ms_to_datetime(int(created))))
        if expired:
            await store.redis.zrem(store.keys.index, *expired)
        return groups

    @classmethod
    async def count(cls, redis: ArqRedis, *, prefix: str = DEFAULT_PREFIX) -> int:
        """How many groups are live."""
        store = Store(redis, Keys(prefix))
        return int(await store.redis.zcard(store.keys.index))

    # -- reading --------------------------------------------------------------------

    async def exists(self) -> bool:
        """False once the group was deleted or finished (the seed's ``blank?`` negated)."""
        await self.store.flush()
        return bool(await self.redis.exists(self._key))

    async def status(self) -> GroupStatus:
        """``pending`` until initiated, then ``running``; an ended group is only seen when
        it was made with ``keep_for``."""
        await self.store.flush()
        raw = await self.redis.hget(self._key, "status")
        if raw is None:
            raise GroupNotFound(self.id)
        return GroupStatus(text(raw))

    async def _numbers(self) -> builtins.list[int]:
        await self.store.flush()
        return [int(n) for n in await self.redis.zrange(self.store.keys.stages(self.id), 0, -1)]

    def stage(self, number: int, *, name: str | None = None) -> StagedGroupStage:
        """Stage ``number``: a handle used as it is, ``await group.stage(2).enqueue(...)``.

        Writing through it (``enqueue*``, ``on_complete``, ``set_failure_policy``,
        ``initiate``) creates the stage (pending, empty) when the group has none by that
        number; reading through it (``status``, ``progress``, ``info``, ``jobs``,
        ``num_jobs``, ``exists``) never creates anything (StageNotFound), nor do
        ``cancel`` and ``delete``. ``await group.stage(n)`` creates it at once, as before,
        and returns a look-up handle (see ``get_stage``).

        ``name``: an optional label (a str of 1 to 100 characters) shown by ``info()``,
        summaries, events, the CLI and the dashboard. A stage gets it when a call through
        this handle creates it or writes to it, and an existing stage with another name is
        renamed; ``None`` leaves the name as it is. Raises InvalidStageNumber or
        InvalidStageName at once; GroupNotFound and the like come from the call made."""
        return StagedGroupStage(self, _check_number(number), name=name, creates=True)

    async def get_stage(self, number: int) -> StagedGroupStage:
        """Stage ``number`` if it exists (StageNotFound otherwise); unlike ``stage()``
        it never creates one, and neither does the handle it returns (nor does any handle
        from ``stages()``, ``current_stage()``, ``last_stage()`` or ``job.stage()``)."""
        await self.store.flush()
        number = _check_number(number)
        if await self.redis.zscore(self.store.keys.stages(self.id), number) is None:
            if not await self.exists():
                raise GroupNotFound(self.id)
            raise StageNotFound(self.id, number)
        return StagedGroupStage(self, number)

    async def stages(self) -> dict[int, StagedGroupStage]:
        """Every stage, by number, in run order."""
        if not await self.exists():
            raise GroupNotFound(self.id)
        return {n: StagedGroupStage(self, n) for n in await self._numbers()}

    async def num_stages(self) -> int:
        await self.store.flush()
        return int(await self.redis.zcard(self.store.keys.stages(self.id)))

    async def stage_statuses(self) -> dict[int, StageStatus]:
        """The status of every stage, by number, in one round trip after the list."""
        numbers = await self._numbers()
        async with self.redis.pipeline(transaction=False) as pipe:
            for n in numbers:
                pipe.hget(self.store.keys.stage(self.id, n), "status")
            raw = await pipe.execute()
        return {n: StageStatus(text(s)) for n, s in zip(numbers, raw, strict=True) if s is not None}

    async def current_stage(self) -> StagedGroupStage | None:
        """The first stage (lowest number) that has not ended, or None."""
        for n, status in (await self.stage_statuses()).items():
            if not status.ended:
                return StagedGroupStage(self, n)
        return None

    async def last_stage(self) -> StagedGroupStage | None:
        """The highest-numbered stage, or None when the group has no stage."""
        await self.store.flush()
        raw = await self.redis.zrange(self.store.keys.stages(self.id), -1, -1)
        return StagedGroupStage(self, int(raw[0])) if raw else None

    # -- actions --------------------------------------------------------------------

    async def initiate(self) -> Motion:
        """Start the first stage that is not complete (or go on sending it). With no stage
        left to run, the group finishes and is deleted."""
        return await self.store.move("initiate_group", self.id)

    async def delete(self) -> bool:
        """Delete the group, its stages and jobs (jobs not yet started leave arq's queue).
        No callback fires. Returns False when there was no such group."""
        return bool(await self.store.run("delete_group", self.id))

    async def cancel(self) -> Motion:
        """Cancel the group: jobs not yet final become ``cancelled`` (jobs not started
        leave arq's queue at once; running ones are aborted when the worker has
        ``allow_abort_jobs``), later stages never start, and the group ends as
        ``cancelled``: its callbacks fire once and waiters wake."""
        return await self.store.move("cancel_group", self.id)

    async def set_failure_policy(self, policy: FailurePolicy | str | None) -> None:
        """The group's failure policy (its stages follow it unless they have their own)."""
        reply = await self.store.run("configure", self.id, "", *FailurePolicy.of(policy).script_args())
        raise_code(reply, self.id, None)

    async def set_limits(
        self,
        *,
        max_in_flight: int | EllipsisType | None = ...,
        rate: str | Rate | EllipsisType | None = ...,
        priority: int | EllipsisType = ...,
        window: int | EllipsisType | None = ...,
    ) -> Motion:
        """Change the group's flow limits (an argument left out stays as it is; None
        removes a cap, a rate or the window). A running group is topped up at once, so a
        raised limit sends more jobs now; a lowered one lets jobs in flight finish.

        ``max_in_flight``: the group's jobs in flight at most, every stage counted, across
        every worker. ``rate``: ``"50/s"``, ``"600/m"`` or ``"10/h"``: the group's jobs
        are sent with scores one interval apart, so arq releases them evenly (to about
        a worker's poll delay). ``priority``: seconds of head start (0 to 86,400) its jobs
        get in arq's queue over jobs other groups send at the same time; bounded, so a
        group without priority is delayed by at most that much. ``window``: how many jobs
        of a running stage are in flight at most (None: no window)."""
        iv, rate_text = rate_args(rate)
        args = ("", cap_arg(max_in_flight), iv, rate_text, priority_arg(priority), window_arg(window))
        return await self.store.move("set_limits", self.id, *args)

    async def limits(self) -> FlowLimits:
        """The group's flow limits (see ``set_limits``)."""
        await self.store.flush()
        raw = await self.redis.hgetall(self._key)
        if not raw:
            raise GroupNotFound(self.id)
        return FlowLimits.of(raw, group=True)

    async def _callback(self, event: str, function: JobFunction, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        refuse_job_id(kwargs)
        spec, _ = make_spec(self.store, function, args, kwargs, Schedule())
        reply = await self.store.run("add_callback", self.id, event, spec)
        raise_code(reply, self.id, None)

    async def on_complete(self, function: JobFunction, *args: Any, **kwargs: Any) -> None:
        """Enqueue ``function(ctx, summary, *args, **kwargs)`` once, when the group ends
        (complete, failed or cancelled: ``summary.outcome`` says which)."""
        await self._callback("complete", function, args, kwargs)

    async def on_success(self, function: JobFunction, *args: Any, **kwargs: Any) -> None:
        """Enqueue ``function(ctx, summary, ...)`` once, when the group completes with no
        failed or cancelled job."""
        await self._callback("success", function, args, kwargs)

    async def on_failure(self, function: JobFunction, *args: Any, **kwargs: Any) -> None:
        """Enqueue ``function(ctx, summary, ...)`` once, at the group's first job that
        fails for good (retries exhausted or not retried); at once if one already has."""
        await self._callback("failure", function, args, kwargs)

    async def progress(self) -> dict[int, StageProgress]:
        """Counts per job status for every stage (O(stages), no job is read)."""
        numbers = await self._numbers()
        async with self.redis.pipeline(transaction=False) as pipe:
            for n in numbers:
                pipe.hgetall(self.store.keys.stage(self.id, n))
            rows = await pipe.execute()
        return {n: StageProgress.of(raw) for n, raw in zip(numbers, rows, strict=True) if raw}

    async def summary(self) -> GroupSummary | None:
        """The final summary of an ended group kept with ``keep_for`` (else None)."""
        await self.store.flush()
        raw = await self.redis.hget(self._key, "summary")
        return None if raw is None else GroupSummary.from_json(raw)

    async def events(self, count: int = 100, *, after: str = "-", newest: bool = False) -> builtins.list[Event]:
        """The group's timeline, oldest first: up to ``count`` events after event id
        ``after``, or with ``newest=True`` the latest ``count`` events."""
        await self.store.flush()
        key = self.store.keys.events(self.id)
        if newest:
            rows = list(reversed(await self.redis.xrevrange(key, count=count)))
        else:
            start = after if after == "-" else f"({after}"
            rows = await self.redis.xrange(key, min=start, count=count)
        return [Event.of(entry_id, fields) for entry_id, fields in rows]

    def ending(self) -> GroupEnding:
        """``async with group.ending() as ending:`` is subscribed to the group's end when
        the block starts; end it or start its workers inside, then
        ``await ending.wait(timeout)``. A group that is not kept is deleted in the step
        that ends it, so its published summary is the only record of how it ended."""
        return GroupEnding(self)

    async def wait(self, timeout: float | None = None) -> GroupSummary:  # noqa: ASYNC109 - the issue fixes this API
        """Wait until the group ends and return its summary; woken by a Redis pub/sub
        message, not by polling. Works from any process.

        Raises GroupNotFound when the group is gone (deleted, or it ended before the
        call and was not made with ``keep_for``), and TimeoutError after ``timeout``."""
        async with self.ending() as ending:
            return await ending.result(timeout)


class GroupEnding:
    """A subscription to one group's end, confirmed by Redis before the block starts
    (a check made after ``__aenter__`` cannot miss the end)."""

    def __init__(self, group: StagedGroup) -> None:
        self.group = group
        self.deleted = False
        self._pubsub: Any = None  # redis-py's PubSub

    async def __aenter__(self) -> GroupEnding:
        pubsub = self.group.redis.pubsub()
        self._pubsub = pubsub
        try:
            await pubsub.subscribe(self.group.store.keys.finished_channel(self.group.id))
            with anyio.fail_after(10):
                async for message in pubsub.listen():
                    if message.get("type") == "subscribe":
                        break
        except BaseException:
            await pubsub.aclose()
            raise
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        if self._pubsub is not None:
            await self._pubsub.aclose()

    async def summary(self, timeout: float | None = None) -> GroupSummary | None:  # noqa: ASYNC109
        """The summary the group's end publishes; None when the group was deleted
        (``self.deleted`` is then True) or nothing came within ``timeout`` seconds."""
        if self._pubsub is None:
            raise AstagesError("use group.ending() in an async with block")
        with anyio.move_on_after(timeout):
            async for message in self._pubsub.listen():
                if message.get("type") != "message":
                    continue
                if json.loads(message["data"]).get("outcome") == "deleted":
                    self.deleted = True
                    return None
                return GroupSummary.from_json(message["data"])
        return None

    async def result(self, timeout: float | None = None) -> GroupSummary:  # noqa: ASYNC109
        """What ``group.wait()`` returns: the kept summary of a group that has ended,
        else the summary its end publishes. Raises GroupNotFound when the group is gone
        and TimeoutError when ``timeout`` runs out."""
        group = self.group
        raw = await group.redis.hmget(group.store.keys.group(group.id), ["status", "summary"])
        if raw[0] is None:
            # Gone: it may have ended since the subscription was confirmed, and then its
            # summary is on the subscription already.
            summary = await self._published()
            if summary is None:
                raise GroupNotFound(group.id)
            return summary
        if raw[1] is not None:
            return GroupSummary.from_json(raw[1])
        return await self.wait(timeout)

    async def _published(self) -> GroupSummary | None:
        """The summary published before now, if any: Redis answers a PING on the
        subscription after every message it published to it before the PING."""
        await self._pubsub.ping()
        with anyio.fail_after(10):
            async for message in self._pubsub.listen():
                kind = message.get("type")
                if kind == "pong":
                    return None
                if kind == "message":
                    if json.loads(message["data"]).get("outcome") == "deleted":
                        self.deleted = True
                        return None
                    return GroupSummary.from_json(message["data"])
        return None  # pragma: no cover - fail_after raises first

    async def wait(self, timeout: float | None = None) -> GroupSummary:  # noqa: ASYNC109
        """Like ``summary`` but raises GroupNotFound when the group was deleted and
        TimeoutError when ``timeout`` ran out."""
        summary = await self.summary(timeout)
        if summary is not None:
            return summary
        if self.deleted:
            raise GroupNotFound(self.group.id)
        raise TimeoutError(f"group {self.group.id} did not end within {timeout}s")


class _Grouping:
    """``async with within_a_grouping(redis, description) as group:``"""

    def __init__(self, redis: ArqRedis, description: str, options: dict[str, Any]) -> None:
        self._redis = redis
        self._description = description
        self._options = options
        self._group: StagedGroup | None = None

    async def __aenter__(self) -> StagedGroup:
        self._group = await StagedGroup.create(self._redis, self._description, **self._options)
        # Jobs enqueued one at a time in the block are written in batches (RecordBuffer).
        self._group.store.buffer = RecordBuffer(self._group.id, RECORD_BATCH)
        return self._group

    async def __aexit__(self, exc_type: object, exc: object, tb: object) -> None:
        assert self._group is not None
        store = self._group.store
        if exc_type is not None:
            store.buffer = None  # nothing buffered was written or sent: drop it with the group
            await self._group.delete()
            return
        try:
            await store.flush()
        except BaseException:
            # the block's jobs could not all be recorded: as for an exception in the block
            store.buffer = None
            await self._group.delete()
            raise
        store.buffer = None
        await self._group.initiate()


def within_a_grouping(
    redis: ArqRedis,
    description: str = "",
    *,
    prefix: str = DEFAULT_PREFIX,
    keep_for: float = 0,
    events: int = DEFAULT_EVENTS,
    failure_policy: FailurePolicy | str | None = None,
    ttl: float | None = None,
    max_in_flight: int | None = None,
    rate: str | Rate | None = None,
    priority: int = 0,
    window: int | EllipsisType | None = ...,
) -> _Grouping:
    """Create a group, let the block fill its stages, then initiate it.

    Inside the block every stage is pending, so ``enqueue`` only records jobs. Leaving
    the block starts the first stage. An exception in the block deletes the group
    (nothing was sent yet) and propagates. Options as for ``StagedGroup.create``."""
    options = {
        "prefix": prefix,
        "keep_for": keep_for,
        "events": events,
        "failure_policy": failure_policy,
        "ttl": ttl,
        "max_in_flight": max_in_flight,
        "rate": rate,
        "priority": priority,
        "window": window,
    }
    return _Grouping(redis, description, options)
