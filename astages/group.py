"""StagedGroup: numbered stages run one after another, then the group deletes itself."""

from __future__ import annotations

import builtins
import datetime as dt
import secrets
import uuid
from typing import TYPE_CHECKING, Any

from astages._keys import DEFAULT_PREFIX, Keys
from astages._scripts import Motion, Store, raise_code, text
from astages.exceptions import AstagesError, GroupNotFound, InvalidStageNumber
from astages.models import StageStatus, ms_to_datetime, now_ms
from astages.stage import StagedGroupStage

if TYPE_CHECKING:
    from arq.connections import ArqRedis

__all__ = ["StagedGroup", "within_a_grouping"]


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
    async def create(cls, redis: ArqRedis, description: str = "", *, prefix: str = DEFAULT_PREFIX) -> StagedGroup:
        """A new, empty, pending group."""
        if not isinstance(description, str):
            raise AstagesError(f"a group description must be a str, not {type(description).__name__}")
        store = Store(redis, Keys(prefix))
        created = now_ms()
        group_id = new_group_id(created)
        await store.run("create_group", group_id, description or group_id, created)
        return cls(store, group_id, description, ms_to_datetime(created))

    @classmethod
    def within_a_grouping(cls, redis: ArqRedis, description: str = "", *, prefix: str = DEFAULT_PREFIX) -> _Grouping:
        """Same as ``astages.within_a_grouping``."""
        return within_a_grouping(redis, description, prefix=prefix)

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
        cls, redis: ArqRedis, offset: int = 0, limit: int | None = None, *, prefix: str = DEFAULT_PREFIX
    ) -> builtins.list[StagedGroup]:
        """Live groups, oldest first (a page of them when ``offset``/``limit`` are given)."""
        store = Store(redis, Keys(prefix))
        stop = -1 if limit is None else offset + limit - 1
        ids = [text(i) for i in await store.redis.zrange(store.keys.index, offset, stop)]
        if not ids:
            return []
        async with store.redis.pipeline(transaction=False) as pipe:
            for group_id in ids:
                pipe.hmget(store.keys.group(group_id), ["description", "created"])
            rows = await pipe.execute()
        groups = []
        for group_id, (description, created) in zip(ids, rows, strict=True):
            if created is not None:
                groups.append(cls(store, group_id, text(description), ms_to_datetime(int(created))))
        return groups

    @classmethod
    async def count(cls, redis: ArqRedis, *, prefix: str = DEFAULT_PREFIX) -> int:
        """How many groups are live."""
        store = Store(redis, Keys(prefix))
        return int(await store.redis.zcard(store.keys.index))

    # -- reading --------------------------------------------------------------------

    async def exists(self) -> bool:
        """False once the group was deleted or finished (the seed's ``blank?`` negated)."""
        return bool(await self.redis.exists(self._key))

    async def status(self) -> str:
        """``pending`` until initiated, then ``running``."""
        raw = await self.redis.hget(self._key, "status")
        if raw is None:
            raise GroupNotFound(self.id)
        return text(raw)

    async def _numbers(self) -> builtins.list[int]:
        return [int(n) for n in await self.redis.zrange(self.store.keys.stages(self.id), 0, -1)]

    async def stage(self, number: int) -> StagedGroupStage:
        """Stage ``number``, created (pending, empty) when the group has none by that number."""
        number = _check_number(number)
        reply = await self.store.run("ensure_stage", self.id, number)
        raise_code(reply, self.id, number)
        return StagedGroupStage(self, number)

    async def stages(self) -> dict[int, StagedGroupStage]:
        """Every stage, by number, in run order."""
        if not await self.exists():
            raise GroupNotFound(self.id)
        return {n: StagedGroupStage(self, n) for n in await self._numbers()}

    async def num_stages(self) -> int:
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
        """The first stage (lowest number) that is not complete, or None."""
        for n, status in (await self.stage_statuses()).items():
            if status is not StageStatus.COMPLETE:
                return StagedGroupStage(self, n)
        return None

    async def last_stage(self) -> StagedGroupStage | None:
        """The highest-numbered stage, or None when the group has no stage."""
        raw = await self.redis.zrange(self.store.keys.stages(self.id), -1, -1)
        return StagedGroupStage(self, int(raw[0])) if raw else None

    # -- actions --------------------------------------------------------------------

    async def initiate(self) -> Motion:
        """Start the first stage that is not complete (or go on sending it). With no stage
        left to run, the group finishes and is deleted."""
        return await self.store.move("initiate_group", self.id)

    async def delete(self) -> bool:
        """Delete the group, its stages and jobs (jobs not yet started leave arq's queue).
        Returns False when there was no such group."""
        return bool(await self.store.run("delete_group", self.id))


class _Grouping:
    """``async with within_a_grouping(redis, description) as group:``"""

    def __init__(self, redis: ArqRedis, description: str, prefix: str) -> None:
        self._redis = redis
        self._description = description
        self._prefix = prefix
        self._group: StagedGroup | None = None

    async def __aenter__(self) -> StagedGroup:
        self._group = await StagedGroup.create(self._redis, self._description, prefix=self._prefix)
        return self._group

    async def __aexit__(self, exc_type: object, exc: object, tb: object) -> None:
        assert self._group is not None
        if exc_type is not None:
            await self._group.delete()
            return
        await self._group.initiate()


def within_a_grouping(redis: ArqRedis, description: str = "", *, prefix: str = DEFAULT_PREFIX) -> _Grouping:
    """Create a group, let the block fill its stages, then initiate it.

    Inside the block every stage is pending, so ``enqueue`` only records jobs. Leaving
    the block starts the first stage. An exception in the block deletes the group
    (nothing was sent yet) and propagates."""
    return _Grouping(redis, description, prefix)
