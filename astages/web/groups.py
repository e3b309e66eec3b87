"""The groups list and a group's page: one snapshot each, in a few round trips.

Sorted by creation time with ZRANGE, by description with Redis' ``SORT ... BY`` (server
side, one page in the reply); by number of stages or by progress among the
``GROUP_SORT_LIMIT`` newest groups (a bound the page states when it applies).
Searched (a substring of the description or the id, any case) and filtered by status
among the ``GROUP_SEARCH_LIMIT`` newest groups, plus an exact group id wherever it is in
the index: one HMGET per group looked at, never a scan of the keyspace.
"""

from __future__ import annotations

import datetime as dt
import math
from dataclasses import dataclass
from typing import Any

from astages._scripts import Store, text
from astages.exceptions import GroupNotFound
from astages.group import StagedGroup
from astages.models import StageInfo, StageProgress, StageStatus, ms_to_datetime
from astages.web._shared import add, iso, percent, progress_json, seconds

GROUP_PAGE_SIZE = 20
GROUP_SORT_LIMIT = 5_000
GROUP_SORTS = ("created", "description", "stages", "progress")
GROUP_SEARCH_LIMIT = 5_000
GROUP_STATUSES = ("pending", "running", "complete", "failed", "cancelled")
GROUP_ID_LENGTH = 32


class StageView:
    """``number``, ``status``, ``progress`` and ``name`` of the stage whose ``info`` a row or page holds."""

    __slots__ = ()
    info: StageInfo

    @property
    def number(self) -> int:
        return self.info.number

    @property
    def status(self) -> StageStatus:
        return self.info.status

    @property
    def progress(self) -> StageProgress:
        return self.info.progress

    @property
    def name(self) -> str | None:
        return self.info.name


@dataclass(frozen=True, slots=True)
class StageRow(StageView):
    """A stage as its hash says: what ``stage.info()`` returns, from the same one read."""

    info: StageInfo

    def as_json(self) -> dict[str, Any]:
        return {
            "number": self.number,
            "name": self.name,
            "status": self.status.value,
            "num_jobs": self.progress.total,
            "progress": progress_json(self.progress),
            **times_json(self.info),
        }


def times_json(info: StageInfo) -> dict[str, Any]:
    """A stage's times for the JSON API; ``duration`` is a label (live on the pages)."""
    duration = info.duration
    return {
        "created": iso(info.created),
        "started": iso(info.started),
        "finished": iso(info.finished),
        "duration_seconds": None if duration is None else round(duration.total_seconds(), 3),
        "duration": seconds(duration),
    }


@dataclass(frozen=True, slots=True)
class GroupRow:
    id: str
    description: str
    created_at: dt.datetime | None
    status: str
    stages: tuple[StageRow, ...]

    @property
    def num_stages(self) -> int:
        return len(self.stages)

    @property
    def progress(self) -> StageProgress:
        total = StageProgress()
        for stage in self.stages:
            total = add(total, stage.progress)
        return total

    @property
    def current_stage(self) -> int | None:
        for stage in self.stages:
            if not stage.status.ended:
                return stage.number
        return None

    @property
    def current_stage_name(self) -> str | None:
        for stage in self.stages:
            if not stage.status.ended:
                return stage.name
        return None

    @property
    def live(self) -> bool:
        return self.status == "running"

    @property
    def ended(self) -> bool:
        """Complete, failed or cancelled: only seen for a group made with ``keep_for``."""
        return self.status in ("complete", "failed", "cancelled")

    def as_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "description": self.description,
            "created_at": iso(self.created_at),
            "status": self.status,
            "ended": self.ended,
            "num_stages": self.num_stages,
            "current_stage": self.current_stage,
            "current_stage_name": self.current_stage_name,
            "progress": progress_json(self.progress),
            "failed": self.progress.failed,
        }


@dataclass(frozen=True, slots=True)
class GroupsPage:
    rows: tuple[GroupRow, ...]
    total: int
    sort: str
    order: str
    page: int
    page_size: int
    sort_limited: bool  # sorted among the GROUP_SORT_LIMIT newest groups only
    q: str = ""  # the search: a substring of the description or the id
    status: str = ""  # the status filter ("" for any)
    search_limited: bool = False  # searched among the GROUP_SEARCH_LIMIT newest groups only

    @property
    def filtered(self) -> bool:
        return bool(self.q or self.status)

    @property
    def pages(self) -> int:
        return max(1, math.ceil(self.total / self.page_size))

    @property
    def live(self) -> bool:
        return any(row.live for row in self.rows)

    def as_json(self) -> dict[str, Any]:
        return {
            "total": self.total,
            "page": self.page,
            "pages": self.pages,
            "page_size": self.page_size,
            "sort": self.sort,
            "order": self.order,
            "sort_limited": self.sort_limited,
            "q": self.q,
            "status": self.status,
            "search_limited": self.search_limited,
            "live": self.live,
            "groups": [row.as_json() for row in self.rows],
        }


async def group_rows(store: Store, ids: list[str]) -> list[GroupRow]:
    """The rows of groups ``ids`` (gone ones left out), in two round trips."""
    if not ids:
        return []
    redis, keys = store.redis, store.keys
    async with redis.pipeline(transaction=False) as pipe:
        for group_id in ids:
            pipe.hmget(keys.group(group_id), ["description", "created", "status"])
            pipe.zrange(keys.stages(group_id), 0, -1)
        replies = await pipe.execute()
    heads = replies[0::2]
    numbers = [[int(n) for n in raw] for raw in replies[1::2]]
    async with redis.pipeline(transaction=False) as pipe:
        for group_id, stage_numbers in zip(ids, numbers, strict=True):
            for n in stage_numbers:
                pipe.hgetall(keys.stage(group_id, n))
        stage_hashes = iter(await pipe.execute())
    rows = []
    for group_id, (description, created, status), stage_numbers in zip(ids, heads, numbers, strict=True):
        stages = []
        for n in stage_numbers:
            raw = next(stage_hashes)
            if raw:
                stages.append(StageRow(StageInfo.of(n, raw if b"status" in raw else {**raw, b"status": b"pending"})))
        if created is None:
            continue
        rows.append(
            GroupRow(
                id=group_id,
                description=text(description) if description is not None else group_id,
                created_at=ms_to_datetime(int(created)),
                status=text(status) if status is not None else "pending",
                stages=tuple(stages),
            )
        )
    return rows


@dataclass(frozen=True, slots=True)
class _Found:
    id: str
    description: str
    created: int


async def search(store: Store, q: str, status: str, limit: int = GROUP_SEARCH_LIMIT) -> tuple[list[_Found], bool]:
    """The groups among the ``limit`` newest (and the group whose id is ``q``) whose
    description or id holds ``q`` (any case) and whose status is ``status`` ("" for
    any), newest first; and whether groups beyond ``limit`` were left unsearched."""
    redis, keys = store.redis, store.keys
    async with redis.pipeline(transaction=False) as pipe:
        pipe.zcard(keys.index)
        pipe.zrevrange(keys.index, 0, limit - 1)
        pipe.zscore(keys.index, q[:GROUP_ID_LENGTH] if q else "")
        total, raw, exact = await pipe.execute()
    ids = [text(i) for i in raw]
    if q and exact is not None and q not in ids:
        ids.insert(0, q)  # an id given in full is found wherever it is
    async with redis.pipeline(transaction=False) as pipe:
        for group_id in ids:
            pipe.hmget(keys.group(group_id), ["description", "created", "status"])
        heads = await pipe.execute(raise_on_error=False)
    needle = q.casefold()
    found = []
    for group_id, head in zip(ids, heads, strict=True):
        if isinstance(head, Exception) or head[1] is None:
            continue  # gone meanwhile, or not a group's hash
        description = text(head[0]) if head[0] is not None else group_id
        if needle and needle not in description.casefold() and needle not in group_id:
            continue
        if status and (text(head[2]) if head[2] is not None else "pending") != status:
            continue
        found.append(_Found(group_id, description, int(head[1])))
    found.sort(key=lambda f: f.created, reverse=True)
    return found, int(total) > limit


async def groups_page(
    store: Store,
    sort: str,
    order: str,
    page: int,
    page_size: int = GROUP_PAGE_SIZE,
    q: str = "",
    status: str = "",
) -> GroupsPage:
    """One page of the groups list, sorted by ``sort`` (see GROUP_SORTS), of the groups
    that match the search ``q`` and the status ``status`` when given (see ``search``)."""
    if q or status:
        return await _filtered_page(store, sort, order, page, page_size, q, status)
    redis, keys = store.redis, store.keys
    total = await StagedGroup.count(redis, prefix=keys.prefix)
    pages = max(1, math.ceil(total / page_size))
    page = min(max(1, page), pages)
    offset = (page - 1) * page_size
    desc = order == "desc"
    limited = False
    if sort == "created":
        if desc:
            raw = await redis.zrevrange(keys.index, offset, offset + page_size - 1)
        else:
            raw = await redis.zrange(keys.index, offset, offset + page_size - 1)
        rows = await group_rows(store, [text(i) for i in raw])
    elif sort == "description":
        by = f"{keys.prefix}:{{*}}->description"
        raw = await redis.sort(keys.index, start=offset, num=page_size, by=by, alpha=True, desc=desc)
        rows = await group_rows(store, [text(i) for i in raw])
    else:
        ids = [text(i) for i in await redis.zrevrange(keys.index, 0, GROUP_SORT_LIMIT - 1)]
        limited = total > GROUP_SORT_LIMIT
        every = await group_rows(store, ids)
        if sort == "stages":
            every.sort(key=lambda row: (row.num_stages, row.created_at or ms_to_datetime(0)), reverse=desc)
        else:
            every.sort(key=lambda row: (percent(row.progress), row.progress.total), reverse=desc)
        rows = every[offset : offset + page_size]
    return GroupsPage(tuple(rows), total, sort, order, page, page_size, limited)


async def _filtered_page(
    store: Store, sort: str, order: str, page: int, page_size: int, q: str, status: str
) -> GroupsPage:
    found, limited = await search(store, q, status)
    total = len(found)
    pages = max(1, math.ceil(total / page_size))
    page = min(max(1, page), pages)
    offset = (page - 1) * page_size
    desc = order == "desc"
    if sort in ("created", "description"):
        if sort == "description":
            found.sort(key=lambda f: f.description.casefold(), reverse=desc)
        elif not desc:
            found.reverse()
        rows = await group_rows(store, [f.id for f in found[offset : offset + page_size]])
    else:
        every = await group_rows(store, [f.id for f in found])
        if sort == "stages":
            every.sort(key=lambda row: (row.num_stages, row.created_at or ms_to_datetime(0)), reverse=desc)
        else:
            every.sort(key=lambda row: (percent(row.progress), row.progress.total), reverse=desc)
        rows = every[offset : offset + page_size]
    return GroupsPage(tuple(rows), total, sort, order, page, page_size, False, q, status, limited)


async def group_detail(store: Store, group_id: str) -> GroupRow:
    """The group and its stages; GroupNotFound when it is gone."""
    group = await StagedGroup.load(store.redis, group_id, prefix=store.keys.prefix)
    rows = await group_rows(store, [group.id])
    if not rows:
        raise GroupNotFound(group_id)
    return rows[0]
