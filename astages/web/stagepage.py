"""A stage's page: one page of its jobs, never a read of the whole stage.

- In enqueue (queue time) order: LRANGE of one page; exact page numbers.
- Filtered by status: a walk of the job list in enqueue order, ``SCAN_CHUNK`` statuses
  per round trip and at most ``SCAN_BUDGET`` per request, resumed from a cursor (keyset
  paging: First/Prev/Next/Last); the number of matches comes from the stage's O(1)
  counters.
- Sorted by function, status or message: within a window of ``WINDOW`` consecutive jobs
  in enqueue order (the whole stage when it is no bigger), as the page says.
"""

from __future__ import annotations

import datetime as dt
import functools
import math
from dataclasses import dataclass, field
from typing import Any

from astages._keys import JobRef
from astages._scripts import Store, text
from astages.exceptions import CorruptRecord
from astages.group import StagedGroup
from astages.job import StagedJob
from astages.models import CODES, GroupStatus, JobStatus, StageInfo, StageProgress, StageStatus
from astages.stage import StagedGroupStage
from astages.web._shared import ORDERS, held_label, iso, jsonable, pick, progress_json, short_repr, to_int
from astages.web.groups import StageView, times_json

# How a job whose stored spec cannot be read is listed.
UNREADABLE = "(unreadable spec)"

JOB_PAGE_SIZE = 50
WINDOW = 1_000
SCAN_CHUNK = 1_000
SCAN_BUDGET = 20_000
FEW = 5_000  # a status held by at most this many jobs is read from its own hash
JOB_SORTS = ("queued", "function", "status", "message")
STATUS_ORDER = {status.value: i for i, status in enumerate(JobStatus)}
LETTER = {status: letter for letter, status in CODES.items()}


@dataclass(frozen=True, slots=True)
class JobRow:
    index: int  # position in the stage's enqueue order, from 0
    seq: int
    id: str
    function: str
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    queue_time: dt.datetime | None
    status: str  # a JobStatus value, or "deleted"
    tries: int
    message: str

    @property
    def call(self) -> str:
        """The arguments as a call would show them: ``1, 'a', size=3``."""
        parts = [short_repr(a) for a in self.args] + [f"{k}={short_repr(v)}" for k, v in self.kwargs.items()]
        return ", ".join(parts)

    def as_json(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "seq": self.seq,
            "id": self.id,
            "function": self.function,
            "args": jsonable(self.args),
            "kwargs": jsonable(self.kwargs),
            "queue_time": iso(self.queue_time),
            "status": self.status,
            "tries": self.tries,
            "message": self.message,
        }


@dataclass(frozen=True, slots=True)
class StageQuery:
    """What the stage page was asked for; see the module docstring for the costs."""

    sort: str = "queued"
    order: str = "asc"
    status: str | None = None  # a JobStatus value to filter by
    page: int = 1  # in "pages" and "window" modes
    window: int = 0  # in "window" mode
    after: int | None = None  # in "scan" mode: rows after this list index (display order)
    before: int | None = None  # in "scan" mode: rows before this list index

    @classmethod
    def of(cls, params: Any) -> StageQuery:
        status = params.get("status") or None
        if status not in {s.value for s in JobStatus}:
            status = None
        after = params.get("after")
        before = params.get("before")
        return cls(
            sort=pick(params.get("sort"), JOB_SORTS),
            order=pick(params.get("order"), ORDERS),
            status=status,
            page=to_int(params.get("page"), 1, 1),
            window=to_int(params.get("window"), 0, 0),
            after=None if after is None else to_int(after, -1),
            before=None if before is None else to_int(before, -1),
        )

    @property
    def mode(self) -> str:
        """``pages`` (exact, offset), ``scan`` (filter, keyset) or ``window`` (sort in a window)."""
        if self.sort != "queued":
            return "window"
        return "scan" if self.status else "pages"

    def params(self, **changes: Any) -> dict[str, str]:
        """Query parameters for a link to this view with ``changes``; defaults left out."""
        merged = {
            "sort": self.sort,
            "order": self.order,
            "status": self.status,
            "page": self.page,
            "window": self.window,
            "after": self.after,
            "before": self.before,
        } | changes
        defaults = {"sort": "queued", "order": "asc", "page": 1, "window": 0}
        return {k: str(v) for k, v in merged.items() if v is not None and defaults.get(k) != v}


@dataclass(frozen=True, slots=True)
class StagePage(StageView):
    group_id: str
    group_description: str
    group_status: GroupStatus
    info: StageInfo
    num_jobs: int
    query: StageQuery
    rows: tuple[JobRow, ...]
    matches: int  # jobs in the view: all, or those with the filtered status (O(1) counters)
    page: int = 1
    pages: int = 1
    windows: int = 1
    window_start: int = 0
    window_end: int = 0  # exclusive
    scanned: tuple[int, int] | None = None  # list indices the scan looked at, inclusive
    has_next: bool = False
    has_prev: bool = False
    next_after: int | None = None
    prev_before: int | None = None
    notes: tuple[str, ...] = field(default=())

    @property
    def live(self) -> bool:
        return self.status is StageStatus.RUNNING

    @property
    def actionable(self) -> bool:
        """Initiate and Cancel Stage apply: neither the stage nor its group has ended."""
        return not self.status.ended and not self.group_status.ended

    @property
    def retryable(self) -> bool:
        """Retry Failed applies: a running stage of a live group with failed jobs."""
        return self.status is StageStatus.RUNNING and not self.group_status.ended and self.progress.failed > 0

    def as_json(self) -> dict[str, Any]:
        return {
            "group": {"id": self.group_id, "description": self.group_description, "status": self.group_status.value},
            "number": self.number,
            "name": self.name,
            "status": self.status.value,
            "num_jobs": self.num_jobs,
            "progress": progress_json(self.progress),
            "held": held_label(self.info.held),
            **times_json(self.info),
            "live": self.live,
            "query": {
                "sort": self.query.sort,
                "order": self.query.order,
                "status": self.query.status,
                "mode": self.query.mode,
            },
            "matches": self.matches,
            "page": self.page,
            "pages": self.pages,
            "window": {
                "index": self.query.window,
                "count": self.windows,
                "start": self.window_start,
                "end": self.window_end,
            },
            "next_after": self.next_after if self.has_next else None,
            "prev_before": self.prev_before if self.has_prev else None,
            "notes": list(self.notes),
            "jobs": [row.as_json() for row in self.rows],
        }


async def _rows(stage: StagedGroupStage, indexed: list[tuple[int, StagedJob]]) -> list[JobRow]:
    statuses = await stage.job_statuses([job for _, job in indexed])
    rows = []
    for (index, job), (status, tries, message) in zip(indexed, statuses, strict=True):
        assert job.ref is not None
        rows.append(
            JobRow(
                index=index,
                seq=job.ref.seq,
                id=str(job.id),
                function=job.function,
                args=job.args,
                kwargs=job.kwargs,
                queue_time=job.queue_time,
                status=status,
                tries=tries,
                message=message,
            )
        )
    return rows


def _handle(store: Store, ref: JobRef, spec: bytes) -> StagedJob:
    """A job's handle for a listing; a job whose stored spec cannot be read is listed
    under that name instead of hiding the whole page (its own page says why)."""
    try:
        return StagedJob.from_spec(store, ref, spec)
    except CorruptRecord:
        return StagedJob(store, ref, UNREADABLE, (), {})


async def _page(store: Store, stage: StagedGroupStage, offset: int, limit: int) -> list[tuple[int, StagedJob]]:
    """(list index, handle) of a page of the stage's jobs in enqueue order; a job with an
    unreadable spec is listed too (see _handle), one deleted meanwhile is left out."""
    group_id, number = stage.group.id, stage.number
    seqs = await store.redis.lrange(store.keys.stage_part(group_id, number, "jobs"), offset, offset + limit - 1)
    return await _jobs_at(store, stage, list(enumerate(seqs, start=offset)))


async def _jobs_at(
    store: Store, stage: StagedGroupStage, picks: list[tuple[int, bytes]]
) -> list[tuple[int, StagedJob]]:
    """Handles of jobs at (list index, seq), one HMGET of their specs; deleted ones left out."""
    if not picks:
        return []
    group_id, number = stage.group.id, stage.number
    specs = await store.redis.hmget(store.keys.stage_part(group_id, number, "spec"), [seq for _, seq in picks])
    out = []
    for (index, seq), spec in zip(picks, specs, strict=True):
        if spec is not None:
            out.append((index, _handle(store, JobRef(group_id, number, int(seq)), spec)))
    return out


async def _scan(
    store: Store, stage: StagedGroupStage, letter: str, start: int, step: int, want: int, num_jobs: int
) -> tuple[list[tuple[int, bytes]], int, bool]:
    """Walk the job list from index ``start`` in direction ``step`` (+1/-1), collecting up to
    ``want`` jobs whose status code starts with ``letter``. Returns the matches (index, seq),
    the last index looked at, and whether the scan reached the end of the list."""
    keys, redis = store.keys, store.redis
    list_key = keys.stage_part(stage.group.id, stage.number, "jobs")
    open_key = keys.stage_part(stage.group.id, stage.number, "open")
    done_key = keys.stage_part(stage.group.id, stage.number, "done")
    found: list[tuple[int, bytes]] = []
    position = start
    last = start - step
    spent = 0
    while 0 <= position < num_jobs and len(found) < want and spent < SCAN_BUDGET:
        if step > 0:
            low, high = position, min(num_jobs - 1, position + SCAN_CHUNK - 1)
        else:
            low, high = max(0, position - SCAN_CHUNK + 1), position
        async with redis.pipeline(transaction=False) as pipe:
            pipe.lrange(list_key, low, high)
            seqs_reply = await pipe.execute()
        seqs: list[bytes] = seqs_reply[0]
        if not seqs:
            break
        async with redis.pipeline(transaction=False) as pipe:
            pipe.hmget(open_key, seqs)
            pipe.hmget(done_key, seqs)
            opens, dones = await pipe.execute()
        chunk = list(zip(range(low, low + len(seqs)), seqs, opens, dones, strict=True))
        if step < 0:
            chunk.reverse()
        for index, seq, open_code, done_code in chunk:
            last = index
            code = open_code or done_code
            if code is not None and text(code)[:1] == letter:
                found.append((index, seq))
                if len(found) >= want:
                    break
        spent += len(seqs)
        position = last + step
    reached_end = not (0 <= last + step < num_jobs)
    return found, last, reached_end


async def _few(store: Store, stage: StagedGroupStage, letter: str, matches: int) -> list[int] | None:
    """The seqs of every job with status ``letter``, ascending, when a small hash holds
    them all: ``:open`` for a status not final, ``:err`` for failed ones. None when that
    hash is bigger than FEW (then the job list is walked instead)."""
    keys = store.keys
    source = "err" if letter == "f" else "open" if letter in "pqre" else None
    if source is None:
        return None
    key = keys.stage_part(stage.group.id, stage.number, source)
    size = int(await store.redis.hlen(key))
    if size > FEW or (source == "err" and size != matches):
        return None
    if source == "open":
        codes = await store.redis.hgetall(key)
        return sorted(int(seq) for seq, code in codes.items() if text(code)[:1] == letter)
    seqs = await store.redis.hkeys(key)
    done = await store.redis.hmget(keys.stage_part(stage.group.id, stage.number, "done"), seqs)
    return sorted(int(seq) for seq, code in zip(seqs, done, strict=True) if code and text(code)[:1] == letter)


async def _few_page(
    store: Store, stage: StagedGroupStage, query: StageQuery, seqs: list[int], num_jobs: int, page_size: int
) -> dict[str, Any]:
    """One page of the matching ``seqs`` (exact; the job list is in ascending seq order)."""
    redis = store.redis
    list_key = store.keys.stage_part(stage.group.id, stage.number, "jobs")
    ordered = seqs if query.order == "asc" else seqs[::-1]
    cursor = query.after if query.after is not None else query.before
    if cursor is None:
        low, high = 0, min(page_size, len(ordered))
    else:
        if 0 <= cursor < num_jobs:
            raw = await redis.lindex(list_key, cursor)
            pivot = float(int(raw)) if raw is not None else math.inf
        else:
            pivot = math.inf if cursor >= num_jobs else -math.inf
        # Position of the pivot in display order: how many matches come before it.
        before_pivot = sum(1 for seq in ordered if (seq < pivot if query.order == "asc" else seq > pivot))
        at_pivot = before_pivot + (1 if pivot in seqs else 0)
        if query.after is not None:
            low, high = at_pivot, min(at_pivot + page_size, len(ordered))
        else:
            low, high = max(0, before_pivot - page_size), before_pivot
    chosen = ordered[low:high]
    async with redis.pipeline(transaction=False) as pipe:
        for seq in chosen:
            pipe.lpos(list_key, str(seq))
        positions = await pipe.execute() if chosen else []
    picks = [(int(at), str(seq).encode()) for seq, at in zip(chosen, positions, strict=True) if at is not None]
    rows = await _rows(stage, await _jobs_at(store, stage, picks))
    step = 1 if query.order == "asc" else -1
    first = picks[0][0] if picks else (cursor if cursor is not None else 0)
    last = picks[-1][0] if picks else (cursor - step if cursor is not None else 0)
    return {
        "rows": tuple(rows),
        "has_prev": low > 0,
        "has_next": high < len(ordered),
        "prev_before": first,
        "next_after": last,
    }


async def _filtered(
    store: Store,
    stage: StagedGroupStage,
    query: StageQuery,
    progress: StageProgress,
    num_jobs: int,
    page_size: int,
) -> dict[str, Any]:
    """One page of the jobs with status ``query.status``, in enqueue order (either way)."""
    assert query.status is not None
    wanted = JobStatus(query.status)
    matches = int(getattr(progress, wanted.value, 0))
    if matches == 0:
        return {"rows": (), "matches": 0}
    seqs = await _few(store, stage, LETTER[wanted], matches)
    if seqs is not None:
        return await _few_page(store, stage, query, seqs, num_jobs, page_size) | {"matches": matches}
    step = 1 if query.order == "asc" else -1
    if query.after is not None:
        start, direction, flip = query.after + step, step, False
    elif query.before is not None:
        start, direction, flip = query.before - step, -step, True
    else:
        start, direction, flip = (0 if step > 0 else num_jobs - 1), step, False
    picks, last, reached_end = await _scan(store, stage, LETTER[wanted], start, direction, page_size, num_jobs)
    if flip:
        picks.reverse()
    rows = await _rows(stage, await _jobs_at(store, stage, picks))
    notes: list[str] = []
    scanned = (min(start, last), max(start, last)) if picks or not reached_end else None
    if len(picks) < page_size and not reached_end and scanned is not None:
        notes.append(
            f"Looked at jobs #{scanned[0] + 1:,} to #{scanned[1] + 1:,} of {num_jobs:,} without filling the page "
            f"(at most {SCAN_BUDGET:,} per request); Next and Prev go on from there."
        )
    display_start = 0 if step > 0 else num_jobs - 1
    if flip:
        assert query.before is not None
        prev_before, has_prev = last, not reached_end
        next_after, has_next = start, 0 <= query.before < num_jobs
    else:
        next_after, has_next = last, not reached_end
        prev_before, has_prev = start, start != display_start
    return {
        "rows": tuple(rows),
        "matches": matches,
        "scanned": scanned,
        "has_next": has_next,
        "has_prev": has_prev,
        "next_after": next_after,
        "prev_before": prev_before,
        "notes": tuple(notes),
    }


async def stage_page(
    store: Store, group_id: str, number: int, query: StageQuery, page_size: int = JOB_PAGE_SIZE
) -> StagePage:
    """The stage page for ``query``; GroupNotFound / StageNotFound when gone."""
    group = await StagedGroup.load(store.redis, group_id, prefix=store.keys.prefix)
    stage = StagedGroupStage(group, number)
    info = await stage.info()  # StageNotFound when there is no such stage
    progress = info.progress
    group_status = await group.status()
    num_jobs = await stage.num_jobs()
    make = functools.partial(
        StagePage,
        group_id=group.id,
        group_description=group.description,
        group_status=group_status,
        info=info,
        num_jobs=num_jobs,
        query=query,
    )
    mode = query.mode
    if mode == "pages":
        pages = max(1, math.ceil(num_jobs / page_size))
        page = min(query.page, pages)
        offset = (page - 1) * page_size
        if query.order == "desc":
            high = num_jobs - 1 - offset
            low = max(0, high - page_size + 1)
            indexed = (await _page(store, stage, low, high - low + 1) if high >= 0 else [])[::-1]
        else:
            indexed = await _page(store, stage, offset, page_size)
        rows = await _rows(stage, indexed)
        return make(rows=tuple(rows), matches=num_jobs, page=page, pages=pages)

    if mode == "scan":
        return make(**await _filtered(store, stage, query, progress, num_jobs, page_size))

    # window: sort one window of WINDOW consecutive jobs in enqueue order.
    windows = max(1, math.ceil(num_jobs / WINDOW))
    window = min(query.window, windows - 1)
    start = window * WINDOW
    in_window = await _page(store, stage, start, WINDOW)
    every = await _rows(stage, in_window)
    if query.status:
        every = [row for row in every if row.status == query.status]
    if query.sort == "function":
        every.sort(key=lambda row: (row.function, row.index))
    elif query.sort == "status":
        every.sort(key=lambda row: (STATUS_ORDER.get(row.status, len(STATUS_ORDER)), row.index))
    else:
        every.sort(key=lambda row: (row.message, row.index))
    if query.order == "desc":
        every.reverse()
    pages = max(1, math.ceil(len(every) / page_size))
    page = min(query.page, pages)
    rows = every[(page - 1) * page_size : page * page_size]
    window_notes: tuple[str, ...] = ()
    if windows > 1:
        window_notes = (
            f"Sorted within jobs #{start + 1:,} to #{start + len(in_window):,} of {num_jobs:,} "
            f"(a window of {WINDOW:,} in enqueue order); pick another window below.",
        )
    return make(
        rows=tuple(rows),
        matches=len(every),
        page=page,
        pages=pages,
        windows=windows,
        window_start=start,
        window_end=start + len(in_window),
        notes=window_notes,
    )
