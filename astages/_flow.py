"""Flow control (issue 13): windows, max_in_flight caps, rates and priorities.

The scripts do the work (``top_up`` in ``lua/_lib.lua``): a running stage keeps at most a
window of its jobs in flight (sent to arq: queued, running or waiting for a retry), fewer
under a cap; whatever takes a job out of flight tops the window up in the same atomic
step, in enqueue order. A rate spaces the scores of the jobs sent by its interval, so
arq's workers release them evenly; a priority takes seconds off the scores of jobs due
at once. This module checks and encodes the values a user gives, and reads them back.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from types import EllipsisType
from typing import Any

from astages.exceptions import AstagesError

__all__ = [
    "DEFAULT_WINDOW",
    "HELD",
    "MAX_PRIORITY",
    "FlowLimits",
    "Rate",
    "cap_arg",
    "priority_arg",
    "rate_args",
    "window_arg",
]

# A running stage's jobs in flight at most, unless its group says otherwise (the same as
# DEFAULT_WINDOW in lua/_lib.lua; see benchmarks/README.md for how it was chosen).
DEFAULT_WINDOW = 1_000
# The largest cap or window (more is none: arq's queue holds them all anyway).
MAX_JOBS = 10**9
# The largest priority: a day's head start.
MAX_PRIORITY = 86_400
# Rates astages keeps: from one a day to 100,000 a second.
_MIN_INTERVAL_MS = 0.01
_MAX_INTERVAL_MS = 86_400_000.0
_UNITS = {"s": 1.0, "sec": 1.0, "second": 1.0, "m": 60.0, "min": 60.0, "minute": 60.0, "h": 3600.0, "hour": 3600.0}
_RATE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*/\s*([a-z]+)\s*$")

# What holds a stage back (StageInfo.held): the script's word -> how it is shown.
HELD = {
    "window": "window",
    "stage_cap": "stage max_in_flight",
    "group_cap": "group max_in_flight",
    "rate": "rate",
}


@dataclass(frozen=True, slots=True)
class Rate:
    """A rate limit: ``count`` jobs per ``per`` seconds (``Rate.of("50/s")``)."""

    count: float
    per: float
    text: str

    @property
    def interval_ms(self) -> float:
        """Milliseconds between two jobs."""
        return self.per * 1000 / self.count

    @property
    def per_second(self) -> float:
        return self.count / self.per

    @classmethod
    def of(cls, value: str | Rate) -> Rate:
        """A rate from ``"50/s"``, ``"600/m"``, ``"10/h"`` (also ``sec``, ``min``,
        ``hour``); AstagesError for anything else or outside one a day to 100,000 a second."""
        if isinstance(value, Rate):
            return value
        if not isinstance(value, str):
            raise AstagesError(f"a rate is a str such as '50/s', '600/m' or '10/h', not {value!r}")
        match = _RATE.match(value.lower())
        if not match or match.group(2) not in _UNITS:
            raise AstagesError(f"a rate is a str such as '50/s', '600/m' or '10/h', not {value!r}")
        rate = cls(float(match.group(1)), _UNITS[match.group(2)], value.strip())
        if not (rate.count > 0 and _MIN_INTERVAL_MS <= rate.interval_ms <= _MAX_INTERVAL_MS):
            raise AstagesError(f"a rate is from one a day to 100,000 a second, not {value!r}")
        return rate


def _count(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_JOBS:
        raise AstagesError(f"{name} must be None or an int from 1 to {MAX_JOBS:,}, not {value!r}")
    return value


def cap_arg(value: int | EllipsisType | None) -> str:
    """``max_in_flight`` as a script argument: '-' unchanged, '' none, else the cap."""
    if value is ...:
        return "-"
    return "" if value is None else str(_count("max_in_flight", value))


def rate_args(value: str | Rate | EllipsisType | None) -> tuple[str, str]:
    """A rate as the scripts' (interval ms, text): '-' unchanged, '' none."""
    if value is ...:
        return "-", "-"
    if value is None:
        return "", ""
    rate = Rate.of(value)
    return repr(rate.interval_ms), rate.text


def priority_arg(value: int | EllipsisType) -> str:
    if value is ...:
        return "-"
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_PRIORITY:
        raise AstagesError(f"priority must be an int from 0 to {MAX_PRIORITY:,} (seconds of head start), not {value!r}")
    return str(value)


def window_arg(value: int | EllipsisType | None) -> str:
    """The window: '-' unchanged, '0' none (``None``), else the jobs in flight."""
    if value is ...:
        return "-"
    return "0" if value is None else str(_count("window", value))


def _int(raw: Any) -> int | None:
    if raw is None:
        return None
    try:
        return int(float(raw))
    except ValueError:
        return None


def _text(raw: Any) -> str | None:
    if raw is None:
        return None
    return raw.decode(errors="replace") if isinstance(raw, bytes) else str(raw)


@dataclass(frozen=True, slots=True)
class FlowLimits:
    """The flow limits set on a group or a stage (None: not set). ``window`` is the
    group's (None: no window); a stage follows its group's window."""

    max_in_flight: int | None = None
    rate: str | None = None
    priority: int = 0
    window: int | None = DEFAULT_WINDOW

    @classmethod
    def of(cls, raw: dict[bytes, bytes], *, group: bool) -> FlowLimits:
        window: int | None = DEFAULT_WINDOW
        if group and raw.get(b"window") is not None:
            window = _int(raw[b"window"]) or None
        return cls(
            max_in_flight=_int(raw.get(b"max_in_flight")),
            rate=_text(raw.get(b"rate")),
            priority=(_int(raw.get(b"priority")) or 0) if group else 0,
            window=window,
        )

    def describe(self) -> str:
        """``max 20 in flight, 50/s`` (empty when nothing is set)."""
        parts = []
        if self.max_in_flight is not None:
            parts.append(f"max {self.max_in_flight:,} in flight")
        if self.rate is not None:
            parts.append(self.rate)
        if self.priority:
            parts.append(f"priority {self.priority}")
        return ", ".join(parts)


def rate_per_second(text_: str | None) -> float | None:
    """The jobs a second of a stored rate text (None when none or unreadable)."""
    if text_ is None:
        return None
    try:
        return Rate.of(text_).per_second
    except AstagesError:
        return None
