"""The ``astages`` command: the click group, the options and helpers its commands share
(connection, one-line errors, text and JSON output).

The commands live in private modules by concern and register themselves on ``main`` when
imported (at the end of this module): ``_cli_inspect`` (groups, show, watch, wait,
events), ``_cli_actions`` (initiate, delete, cancel, cleanup, purge) and ``_cli_run``
(worker, demo, web) and ``_cli_metrics`` (metrics)."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import sys
from collections.abc import Awaitable, Callable, Coroutine, Mapping, Sequence
from typing import Any, TypeVar

import click
from arq.connections import ArqRedis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from astages import __version__
from astages._board import seconds
from astages._connection import connect, safe_url
from astages._keys import DEFAULT_PREFIX
from astages.exceptions import AstagesError, GroupNotFound
from astages.group import StagedGroup
from astages.models import GroupSummary


@click.group()
@click.version_option(__version__, prog_name="astages")
def main() -> None:
    """Run and inspect staged arq job groups."""


# -- shared by every command: the connection options and one-line errors --------------

T = TypeVar("T")
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"


class CommandError(click.ClickException):
    """One line on stderr (``Error: ...``) and exit status 1; never a traceback."""


def redis_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """``--redis-url`` (or ``REDIS_URL``) and ``--prefix``, for any command that talks to Redis."""
    command = click.option(
        "--prefix", default=DEFAULT_PREFIX, show_default=True, help="Key prefix the groups were made with."
    )(command)
    return click.option(
        "--redis-url",
        envvar="REDIS_URL",
        default=DEFAULT_REDIS_URL,
        show_default=True,
        show_envvar=True,
        help="Redis server to use.",
    )(command)


def json_option(command: Callable[..., Any]) -> Callable[..., Any]:
    return click.option("--json", "as_json", is_flag=True, help="Print JSON instead of text.")(command)


def run_async(coroutine: Coroutine[Any, Any, T], redis_url: str | None = None) -> T:
    """Run a command's coroutine; errors become one clear line and a non-zero exit."""
    where = f" at {safe_url(redis_url)}" if redis_url else ""
    try:
        return asyncio.run(coroutine)
    except GroupNotFound as e:
        # say where it looked: the wrong server or database is the usual reason
        raise CommandError(f"{e} (looked in Redis{where})" if where else str(e)) from None
    except AstagesError as e:
        raise CommandError(str(e)) from None
    except ValueError as e:
        raise CommandError(str(e)) from None
    except (RedisConnectionError, RedisTimeoutError, OSError) as e:
        raise CommandError(f"cannot reach Redis{where}: {e}") from None
    except RedisError as e:
        raise CommandError(f"Redis{where} answered with an error: {e}") from None
    except KeyboardInterrupt:
        click.echo("interrupted", err=True)
        sys.exit(130)


async def with_redis(url: str, action: Callable[[ArqRedis], Awaitable[T]]) -> T:
    redis = await connect(url)
    try:
        return await action(redis)
    finally:
        await redis.aclose()


async def find_group(redis: ArqRedis, ident: str, prefix: str) -> StagedGroup:
    """The group with id ``ident``, or the only live group whose id starts with it."""
    try:
        return await StagedGroup.load(redis, ident, prefix=prefix)
    except GroupNotFound:
        if not ident:
            raise
    matches = [g for g in await StagedGroup.list(redis, prefix=prefix) if g.id.startswith(ident)]
    if len(matches) == 1:
        return matches[0]
    if len(matches) > 1:
        ids = ", ".join(g.id for g in matches[:5])
        raise CommandError(f"{ident!r} matches {plural(len(matches), 'group')} ({ids}); give more of the id")
    raise GroupNotFound(ident)


def jsonable(value: Any) -> Any:
    """Job arguments as JSON when they are JSON, else their repr."""
    try:
        json.dumps(value)
    except (TypeError, ValueError):
        return repr(value)
    return value


def echo_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, default=repr))


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]], right: Sequence[int] = ()) -> str:
    cells = [[str(c) for c in row] for row in rows]
    widths = [max([len(h), *(len(r[i]) for r in cells)]) for i, h in enumerate(headers)]

    def fmt(row: Sequence[str]) -> str:
        parts = [c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True))]
        return "  ".join(parts).rstrip()

    return "\n".join([fmt(headers), *(fmt(r) for r in cells)])


def plural(count: int, word: str, many: str | None = None) -> str:
    """``1 job``, ``2 jobs`` (``many``: the plural when it is not ``word + "s"``)."""
    return f"{count} {word if count == 1 else many or word + 's'}"


def stage_label(number: int, name: str | None) -> str:
    """``stage 2`` or ``stage 2 (fetch)``."""
    return f"stage {number}" + ("" if name is None else f" ({name})")


def short(text: str, width: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 1] + "…"


def when(value: dt.datetime | None) -> str:
    return value.astimezone().strftime("%Y-%m-%d %H:%M:%S") if value else "-"


def iso(value: dt.datetime | None) -> str | None:
    return value.isoformat() if value else None


def secs(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}s"


def summary_dict(summary: GroupSummary) -> dict[str, Any]:
    """A group's end summary as JSON."""
    return {
        "group_id": summary.group_id,
        "description": summary.description,
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
                "jobs": s.total,
                "successful": s.successful,
                "failed": s.failed,
                "cancelled": s.cancelled,
                "retried": s.retried,
                "started": iso(s.started),
                "finished": iso(s.finished),
                "duration": seconds(s.finished - s.started) if s.started and s.finished else None,
            }
            for s in summary.stages
        ],
        "failed_jobs": list(summary.failed_jobs),
    }


def stages_table(stages: Sequence[Mapping[str, Any]], *, number: str = "number", label: str = "status") -> str:
    """Per stage (dicts with the keys ``number`` and ``label`` name, jobs, successful,
    failed, cancelled, retried and duration): its counts and how long it took. A NAME
    column shows stage names when a stage has one (key ``name``)."""
    named = label != "name" and any(s.get("name") for s in stages)
    rows = [
        (
            s[number],
            *((s.get("name") or "-",) if named else ()),
            s[label],
            s["jobs"],
            s["successful"],
            s["failed"],
            s["cancelled"],
            s["retried"],
            secs(s["duration"]),
        )
        for s in stages
    ]
    headers = ["STAGE", *(["NAME"] if named else []), label.upper()]
    headers += ["JOBS", "SUCCESSFUL", "FAILED", "CANCELLED", "RETRIED", "DURATION"]
    return table(headers, rows, (0, *range(len(headers) - 6, len(headers))))


def outcome_line(summary: GroupSummary) -> str:
    return (
        f"{summary.outcome} at {when(summary.at)}: {summary.successful} successful, "
        f"{summary.failed} failed, {summary.cancelled} cancelled"
    )


def failed_jobs_line(summary: GroupSummary, most: int = 5) -> str | None:
    if not summary.failed_jobs:
        return None
    ids = ", ".join(summary.failed_jobs[:most])
    more = len(summary.failed_jobs) - most
    return f"failed jobs: {ids}" + (f" and {more} more" if more > 0 else "")


# The commands, registered on ``main`` by importing their modules (they import the above).
from astages import _cli_actions, _cli_inspect, _cli_metrics, _cli_run  # noqa: E402, F401
