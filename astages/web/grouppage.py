"""A group's page: its stages (from ``groups.group_detail``), the summary of an ended
group kept with ``keep_for``, and one page of its event timeline.

The timeline is the group's capped Redis stream, oldest first, paged forward by stream
id (``after=``): one XRANGE per page, plus one XREVRANGE for the "Latest" link.
"""

from __future__ import annotations

import datetime as dt
import re
from dataclasses import dataclass
from typing import Any

from astages._keys import JobRef
from astages._scripts import Store, text
from astages.group import StagedGroup
from astages.models import Event, GroupSummary, StageSummary
from astages.web._shared import iso, seconds
from astages.web.groups import GroupRow, group_detail

EVENT_PAGE_SIZE = 50
EVENT_PAGE_MAX = 500
STREAM_ID = re.compile(r"\d{1,20}(-\d{1,20})?")


def stream_id(raw: str | None) -> str | None:
    """``raw`` when it is a stream id (``<ms>-<seq>`` or ``<ms>``), else None."""
    return raw if raw is not None and STREAM_ID.fullmatch(raw) else None


@dataclass(frozen=True, slots=True)
class EventRow:
    """One timeline entry, with what a page needs to show and link it."""

    event: Event
    stage: int | None  # the stage it concerns (job and stage events)
    seq: int | None  # the job's seq (job events)

    @classmethod
    def of(cls, event: Event) -> EventRow:
        stage = seq = None
        if event.kind == "job":
            head, _, tail = event.subject.partition(":")
            stage, seq = _int(head), _int(tail)
        elif event.kind == "stage":
            stage = _int(event.subject)
        return cls(event, stage, seq)

    @property
    def label(self) -> str:
        if self.seq is not None:
            return f"stage {self.stage} · job {self.seq}"
        if self.stage is not None:
            name = self.event.details.get("name") if self.event.kind == "stage" else None
            return f"stage {self.stage}" + (f" ({name})" if name else "")
        return "group"

    @property
    def note(self) -> str:
        """The event's details as words (``try 2``, ``5 jobs``); the error is apart."""
        parts = []
        for key, value in self.event.details.items():
            if key == "error" or (key == "name" and self.event.kind == "stage"):
                continue  # the error is apart; a stage's name is in its label
            if key == "try":
                parts.append(f"try {value}")
            elif key == "jobs":
                parts.append(f"{value} job{'' if value == '1' else 's'}")
            else:
                parts.append(f"{key}: {value}")
        return " · ".join(parts)

    @property
    def error(self) -> str:
        """The first line of a failed job's error (its start is kept in the event)."""
        lines = self.event.details.get("error", "").strip().splitlines()
        return lines[0] if lines else ""

    def as_json(self, link: str | None) -> dict[str, Any]:
        event = self.event
        return {
            "id": event.id,
            "at": iso(event.at),
            "kind": event.kind,
            "subject": event.subject,
            "stage": self.stage,
            "seq": self.seq,
            "from": event.from_status,
            "to": event.to_status,
            "details": event.details,
            "label": self.label,
            "note": self.note,
            "error": self.error,
            "url": link,
        }


def _int(raw: str) -> int | None:
    try:
        return int(raw)
    except ValueError:
        return None


@dataclass(frozen=True, slots=True)
class Timeline:
    """One page of a group's events, oldest first."""

    rows: tuple[EventRow, ...]
    after: str | None  # the cursor this page was read after (None: from the start)
    size: int
    more: bool  # newer events exist beyond this page
    latest: str | None  # the cursor of the page of the newest events, when not this one

    @property
    def next_after(self) -> str | None:
        """The cursor of the next page (and of live updates): the last id shown."""
        return self.rows[-1].event.id if self.rows else self.after


async def timeline(store: Store, group: StagedGroup, after: str | None, size: int = EVENT_PAGE_SIZE) -> Timeline:
    """Up to ``size`` events of ``group`` after stream id ``after`` (from the start when None)."""
    events = await group.events(size + 1, after=after or "-")
    more = len(events) > size
    rows = tuple(EventRow.of(event) for event in events[:size])
    latest = None
    if more:
        tail = await store.redis.xrevrange(store.keys.events(group.id), count=size + 1)
        latest = text(tail[-1][0]) if len(tail) > size else None
    return Timeline(rows, after, size, more, latest)


@dataclass(frozen=True, slots=True)
class GroupPage:
    """The group page's data: its stages, its final summary if kept, its timeline."""

    group: GroupRow
    summary: GroupSummary | None
    failed_jobs: tuple[tuple[str, JobRef | None], ...]  # summary's failed job ids, parsed
    timeline: Timeline


async def group_page(store: Store, group_id: str, after: str | None) -> GroupPage:
    """GroupNotFound when the group is gone (finished without keep_for, or deleted)."""
    row = await group_detail(store, group_id)
    group = StagedGroup(store, group_id, row.description, row.created_at)
    summary = await group.summary() if row.ended else None
    failed = tuple((job_id, store.keys.parse_job_id(job_id)) for job_id in (summary.failed_jobs if summary else ()))
    return GroupPage(row, summary, failed, await timeline(store, group, after))


def stage_duration(stage: StageSummary) -> dt.timedelta | None:
    if stage.started is None:
        return None
    return (stage.finished or stage.started) - stage.started


def summary_json(summary: GroupSummary) -> dict[str, Any]:
    return {
        "outcome": summary.outcome,
        "at": iso(summary.at),
        "successful": summary.successful,
        "failed": summary.failed,
        "cancelled": summary.cancelled,
        "stages": [
            {
                "number": s.number,
                "name": s.name,
                "status": s.status,
                "total": s.total,
                "successful": s.successful,
                "failed": s.failed,
                "cancelled": s.cancelled,
                "retried": s.retried,
                "started": iso(s.started),
                "finished": iso(s.finished),
                "duration": seconds(stage_duration(s)),
            }
            for s in summary.stages
        ],
        "failed_jobs": list(summary.failed_jobs),
    }
