"""Progress bars per stage, drawn in place on a terminal (``astages watch``, ``astages demo``).

A snapshot costs one round trip for the stage list and one O(1) ``stage.progress()`` per
stage. On a terminal the bars are redrawn in place; anywhere else (a pipe, a log, a test)
a line is printed when a stage starts or completes, so the output stays readable.
"""

from __future__ import annotations

import shutil
import sys
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import IO

import click

from astages.exceptions import AstagesError
from astages.group import StagedGroup
from astages.models import StageProgress, StageStatus
from astages.stage import StagedGroupStage

__all__ = ["Board", "StageRow", "bar", "snapshot"]


@dataclass(frozen=True, slots=True)
class StageRow:
    """What one bar shows. ``progress`` is None once the group finished before the stage's
    last counts could be read (every job of it is final then, but the split is unknown)."""

    number: int
    status: str
    progress: StageProgress | None
    label: str = ""

    @property
    def done(self) -> bool:
        return self.status in ("complete", "cancelled")


async def snapshot(group: StagedGroup, labels: Mapping[int, str] | None = None) -> list[StageRow] | None:
    """Every stage's status and counts, or None when the group no longer exists."""
    labels = labels or {}
    try:
        statuses = await group.stage_statuses()
        rows = []
        for number, status in statuses.items():
            progress = await StagedGroupStage(group, number).progress()
            rows.append(StageRow(number, status.value, progress, labels.get(number, "")))
    except AstagesError:
        return None  # a stage vanished while we read: the group finished or was deleted
    if not rows and not await group.exists():
        return None
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
        colour = "green" if row.done else ("yellow" if row.status == StageStatus.RUNNING.value else "bright_black")
        drawn = self._style(bar(p.finished, p.total, width, fill=fill, empty=empty), fg=colour)
        counts = f"{p.finished:>{len(str(p.total))}}/{p.total}"
        tail = f"{ok}{p.successful} {ko}{p.failed} {again}{p.retried}"
        cancelled = int(getattr(p, "cancelled", 0))
        if cancelled:
            tail += f" cancelled {cancelled}"
        if p.failed:
            tail = tail.replace(f"{ko}{p.failed}", self._style(f"{ko}{p.failed}", fg="red"))
        return f"{name}  [{drawn}]  {counts}  {tail}  {row.status}"

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
