"""Progress bars per stage, drawn in place on a terminal (``astages watch``, ``astages demo``).

A snapshot costs one round trip for the stage list and one ``stage.info()`` per stage
(status, counts and start/end times in one O(1) read). On a terminal the bars are
redrawn in place; anywhere else (a pipe, a log, a test) a line is printed when a stage
starts or completes, so the output stays readable.
"""

from __future__ import annotations

import datetime as dt
import shutil
import sys
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import IO

import click

from astages._flow import HELD
from astages.exceptions import AstagesError
from astages.group import StagedGroup
from astages.models import GroupSummary, StageInfo, StageProgress, StageStatus

__all__ = ["Board", "StageRow", "bar", "ended_rows", "finished", "seconds", "snapshot"]


@dataclass(frozen=True, slots=True)
class StageRow:
    """What one bar shows. ``progress`` is None once the group finished before the stage's
    last counts could be read (every job of it is final then, but the split is unknown)."""

    number: int
    status: str
    progress: StageProgress | None
    label: str = ""
    duration: float | None = None  # seconds from the stage's start to its end (or to now)
    held: str | None = None  # what holds its waiting jobs back (StageInfo.held), if anything

    @property
    def done(self) -> bool:
        return self.status in ("complete", "cancelled")

    @classmethod
    def of(cls, info: StageInfo, label: str = "") -> StageRow:
        """The row of a stage; its label is ``label``, else the stage's name."""
        label = label or info.name or ""
        return cls(info.number, info.status.value, info.progress, label, seconds(info.duration), info.held)


def seconds(duration: dt.timedelta | None) -> float | None:
    return None if duration is None else duration.total_seconds()


async def snapshot(group: StagedGroup, labels: Mapping[int, str] | None = None) -> list[StageRow] | None:
    """Every stage's status, counts and duration, or None when the group no longer exists.
    A stage's label is ``labels[number]``, else its name."""
    labels = labels or {}
    try:
        stages = await group.stages()
        return [StageRow.of(await stage.info(), labels.get(number, "")) for number, stage in stages.items()]
    except AstagesError:
        return None  # the group (or a stage) vanished while we read: it finished or was deleted


def ended_rows(summary: GroupSummary, labels: Mapping[int, str] | None = None) -> list[StageRow]:
    """The rows as the group's end summary tells them (a group that is not kept is gone)."""
    labels = labels or {}
    rows = []
    for s in summary.stages:
        progress = StageProgress(successful=s.successful, failed=s.failed, cancelled=s.cancelled, retried=s.retried)
        duration = seconds(s.finished - s.started) if s.started and s.finished else None
        label = labels.get(s.number) or s.name or ""
        rows.append(StageRow(s.number, s.status, progress, label, duration))
    return rows


def finished(rows: list[StageRow]) -> list[StageRow]:
    """The rows as they ended once their group finished (every stage complete)."""
    return [row if row.done else replace(row, status=StageStatus.COMPLETE.value, progress=None) for row in rows]


def bar(done: int, total: int, width: int, *, fill: str = "█", empty: str = "░") -> str:
    """A bar ``width`` characters wide, ``done/total`` of it filled."""
    if width <= 0:
        return ""
    filled = width if total <= 0 else min(width, round(width * done / total))
    return fill * filled + empty * (width - filled)


def _unicode(stream: IO[str]) -> bool:
    encoding = (getattr(stream, "encoding", None) or "").lower().replace("-", "")
    return encoding in ("utf8", "utf_8")


class Board:
    """Draws a list of StageRow, in place on a terminal, as lines elsewhere."""

    def __init__(self, stream: IO[str] | None = None, *, live: bool | None = None, color: bool | None = None) -> None:
        self.stream = stream or sys.stdout
        try:
            isatty = self.stream.isatty()
        except (AttributeError, ValueError):  # a closed or minimal stream
            isatty = False
        self.live = isatty if live is None else live
        self.color = self.live if color is None else color
        self.unicode = _unicode(self.stream)
        self._drawn = 0
        self._seen: dict[int, str] = {}

    def _style(self, text: str, **styles: object) -> str:
        return click.style(text, **styles) if self.color else text  # type: ignore[arg-type]

    def line(self, row: StageRow, label_width: int = 0) -> str:
        fill, empty = ("█", "░") if self.unicode else ("#", "-")
        ok, ko, again = ("✓", "✗", "↻") if self.unicode else ("ok ", "failed ", "retried ")
        name = f"stage {row.number}" + (f" {row.label:<{label_width}}" if label_width else "")
        columns = shutil.get_terminal_size((100, 20)).columns
        width = max(10, min(40, columns - len(name) - 48))
        p = row.progress
        if p is None:
            return (
                f"{name}  [{self._style(bar(1, 1, width, fill=fill, empty=empty), fg='green')}]  done (group finished)"
            )
        colour = {StageStatus.COMPLETE.value: "green", StageStatus.CANCELLED.value: "magenta"}.get(
            row.status, "yellow" if row.status == StageStatus.RUNNING.value else "bright_black"
        )
        drawn = self._style(bar(p.finished, p.total, width, fill=fill, empty=empty), fg=colour)
        counts = f"{p.finished:>{len(str(p.total))}}/{p.total}"
        tail = f"{ok}{p.successful} {ko}{p.failed} {again}{p.retried}"
        if p.cancelled:
            tail += f" cancelled {p.cancelled}"
        if p.failed:
            tail = tail.replace(f"{ko}{p.failed}", self._style(f"{ko}{p.failed}", fg="red"))
        took = "" if row.duration is None else f" {row.duration:.2f}s"
        flow = ""
        if row.status == StageStatus.RUNNING.value and p.pending:
            held = "" if row.held is None else f", held by {HELD.get(row.held, row.held)}"
            flow = f"  ({p.in_flight:,} in flight, {p.pending:,} waiting{held})"
        return f"{name}  [{drawn}]  {counts}  {tail}  {row.status}{took}{flow}"

    def draw(self, rows: list[StageRow]) -> None:
        label_width = max((len(row.label) for row in rows), default=0)
        if self.live:
            out = []
            if self._drawn:
                out.append(f"\x1b[{self._drawn}F")
            out.extend(f"\x1b[2K{self.line(row, label_width)}\n" for row in rows)
            self.stream.write("".join(out))
            self.stream.flush()
            self._drawn = len(rows)
            return
        for row in rows:
            key = "done" if row.done else row.status
            if row.status != StageStatus.PENDING.value and self._seen.get(row.number) != key:
                self._seen[row.number] = key
                self.stream.write(self.line(row, label_width) + "\n")
        self.stream.flush()
