"""Helpers the dashboard's reads share: JSON shaping, progress sums, parameter parsing."""

from __future__ import annotations

import datetime as dt
import math
import reprlib
from typing import Any

from astages._scripts import Store
from astages.group import StagedGroup
from astages.models import StageProgress
from astages.stage import StagedGroupStage

ORDERS = ("asc", "desc")

REPR = reprlib.Repr()
REPR.maxstring = 120
REPR.maxother = 120
REPR.maxlong = 60


def short_repr(value: Any) -> str:
    """A bounded repr of a job argument (a table cell, not a dump)."""
    return REPR.repr(value)


def jsonable(value: Any) -> Any:
    """``value`` as JSON types; anything else becomes its bounded repr."""
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, dt.datetime):
        return value.isoformat()
    return short_repr(value)


def iso(value: dt.datetime | None) -> str | None:
    return None if value is None else value.isoformat()


def seconds(span: dt.timedelta | None) -> str:
    """A duration as a label: ``0.4 s``, ``12 s``, ``3 min 05 s``, ``2 h 03 min``; ``—`` for none."""
    if span is None:
        return "—"
    total = max(0.0, span.total_seconds())
    if total < 10:
        return f"{total:.1f} s"
    whole = int(total)
    if whole < 60:
        return f"{whole} s"
    if whole < 3600:
        return f"{whole // 60} min {whole % 60:02d} s"
    if whole < 86400:
        return f"{whole // 3600} h {whole % 3600 // 60:02d} min"
    return f"{whole // 86400} d {whole % 86400 // 3600:02d} h"


def progress_json(progress: StageProgress) -> dict[str, Any]:
    out: dict[str, Any] = progress.as_dict()
    out["finished"] = progress.finished
    out["percent"] = percent(progress)
    out["in_flight"] = progress.in_flight
    out["waiting"] = progress.waiting
    return out


def held_label(held: str | None) -> str:
    """What holds a running stage's waiting jobs back, as the stage page's Flow row ends."""
    return f"· held by {held.replace('_', ' ')}" if held else ""


def percent(progress: StageProgress) -> int:
    """Finished jobs as a whole percentage (100 for an empty stage)."""
    if progress.total == 0:
        return 100
    return math.floor(100 * progress.finished / progress.total)


def add(a: StageProgress, b: StageProgress) -> StageProgress:
    return StageProgress(**{name: getattr(a, name) + getattr(b, name) for name in a.as_dict() if name != "total"})


def pick(value: str | None, choices: tuple[str, ...]) -> str:
    """``value`` when it is one of ``choices``, else the first choice."""
    return value if value in choices else choices[0]


def to_int(value: str | None, default: int, low: int | None = None) -> int:
    try:
        number = int(value) if value is not None else default
    except ValueError:
        number = default
    return number if low is None else max(low, number)


def stage_of(store: Store, group_id: str, number: int) -> StagedGroupStage:
    """A handle on stage ``number`` that creates nothing (unlike ``group.stage(n)``)."""
    return StagedGroupStage(StagedGroup(store, group_id), number)
