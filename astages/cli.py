"""The ``astages`` command."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime as dt
import json
import sys
import time
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from typing import Any, TypeVar

import click
from arq.connections import ArqRedis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from astages import __version__
from astages._board import Board, StageRow, ended_rows, finished, seconds, snapshot
from astages._ending import EndListener
from astages._inprocess import connect
from astages._keys import DEFAULT_PREFIX, Keys
from astages.exceptions import AstagesError, GroupNotFound, StageNotFound
from astages.group import StagedGroup
from astages.models import Event, GroupSummary, JobStatus, StageProgress
from astages.stage import StagedGroupStage


@click.group()
@click.version_option(__version__, prog_name="astages")
def main() -> None:
    """Run and inspect staged arq job groups."""


@main.command("worker")
@click.argument("worker-settings", type=str, required=True)
@click.option("--burst/--no-burst", default=None, help="Batch mode: exit once no jobs are found in any queue.")
@click.option("--check", is_flag=True, help="Health Check: run a health check and exit.")
@click.option(
    "--watch",
    type=click.Path(exists=True, dir_okay=True, file_okay=False),
    help="Watch a directory and reload the worker upon changes.",
)
@click.option("-v", "--verbose", is_flag=True, help="Enable verbose output.")
@click.option("--custom-log-dict", type=str, help="Import path for a dictionary in logdict form, to configure logging.")
def worker(
    *,
    worker_settings: str,
    burst: bool | None,
    check: bool,
    watch: str | None,
    verbose: bool,
    custom_log_dict: str | None,
) -> None:
    """Run an arq worker that survives dropped Redis connections (the options of arq's CLI).

    WORKER_SETTINGS is the import path of the settings, e.g. app.WorkerSettings (a class
    or the dict astages.worker_settings returns)."""
    from astages.runner import main as run

    code = run(worker_settings, burst=burst, check=check, watch=watch, verbose=verbose, custom_log_dict=custom_log_dict)
    raise SystemExit(code)


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
    where = f" at {_safe_url(redis_url)}" if redis_url else ""
    try:
        return asyncio.run(coroutine)
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


def _safe_url(url: str) -> str:
    """The URL without its password."""
    if "@" not in url:
        return url
    scheme, _, rest = url.partition("://")
    return f"{scheme}://***@{rest.rpartition('@')[2]}"


async def _with_redis(url: str, action: Callable[[ArqRedis], Awaitable[T]]) -> T:
    redis = await connect(url)
    try:
        return await action(redis)
    finally:
        await redis.aclose()


async def _find_group(redis: ArqRedis, ident: str, prefix: str) -> StagedGroup:
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
        raise CommandError(f"{ident!r} matches {len(matches)} groups ({ids}); give more of the id")
    raise GroupNotFound(ident)


def _jsonable(value: Any) -> Any:
    """Job arguments as JSON when they are JSON, else their repr."""
    try:
        json.dumps(value)
    except (TypeError, ValueError):
        return repr(value)
    return value


def _echo_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, default=repr))


def _table(headers: Sequence[str], rows: Sequence[Sequence[Any]], right: Sequence[int] = ()) -> str:
    cells = [[str(c) for c in row] for row in rows]
    widths = [max([len(h), *(len(r[i]) for r in cells)]) for i, h in enumerate(headers)]

    def fmt(row: Sequence[str]) -> str:
        parts = [c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True))]
        return "  ".join(parts).rstrip()

    return "\n".join([fmt(headers), *(fmt(r) for r in cells)])


def _short(text: str, width: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 1] + "…"


def _when(value: dt.datetime | None) -> str:
    return value.astimezone().strftime("%Y-%m-%d %H:%M:%S") if value else "-"


def _iso(value: dt.datetime | None) -> str | None:
    return value.isoformat() if value else None


def _secs(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}s"


def _summary_dict(summary: GroupSummary) -> dict[str, Any]:
    """A group's end summary as JSON."""
    return {
        "group_id": summary.group_id,
        "description": summary.description,
        "outcome": summary.outcome,
        "at": _iso(summary.at),
        "successful": summary.successful,
        "failed": summary.failed,
        "cancelled": summary.cancelled,
        "stages": [
            {
                "number": s.number,
                "status": s.status,
                "jobs": s.total,
                "successful": s.successful,
                "failed": s.failed,
                "cancelled": s.cancelled,
                "retried": s.retried,
                "started": _iso(s.started),
                "finished": _iso(s.finished),
                "duration": seconds(s.finished - s.started) if s.started and s.finished else None,
            }
            for s in summary.stages
        ],
        "failed_jobs": list(summary.failed_jobs),
    }


def _outcome_line(summary: GroupSummary) -> str:
    return (
        f"{summary.outcome} at {_when(summary.at)}: {summary.successful} successful, "
        f"{summary.failed} failed, {summary.cancelled} cancelled"
    )


def _failed_jobs_line(summary: GroupSummary, most: int = 5) -> str | None:
    if not summary.failed_jobs:
        return None
    ids = ", ".join(summary.failed_jobs[:most])
    more = len(summary.failed_jobs) - most
    return f"failed jobs: {ids}" + (f" and {more} more" if more > 0 else "")


# -- astages demo ------------------------------------------------------------------------


@main.command()
@click.option(
    "--redis-url",
    envvar="REDIS_URL",
    default=None,
    show_envvar=True,
    help="Redis server to run on (default: an in-memory fakeredis server).",
)
@click.option("--photos", type=click.IntRange(1, 100_000), default=200, show_default=True, help="Photos to import.")
@click.option("--quick", is_flag=True, help="No simulated work and no real waiting for retries (for CI).")
@click.option("--verbose", is_flag=True, help="Show the worker's log.")
@json_option
def demo(redis_url: str | None, photos: int, quick: bool, verbose: bool, as_json: bool) -> None:
    """Run a photo import in four stages, with a worker in this process.

    Some jobs retry with arq's Retry and one fails; live progress bars per stage, then a
    summary per stage. Needs no Redis server."""
    from astages.demo import STAGES, quiet_workers, run_demo

    where = _safe_url(redis_url) if redis_url else "fakeredis (in memory)"
    board = None if as_json else Board()
    if not as_json:
        click.echo(f"astages demo: importing {photos} photos in {len(STAGES)} stages on {where}")

    def announce(group: StagedGroup) -> None:
        if not as_json and redis_url:
            click.echo(f"group {group.id} (try `astages watch {group.id[:12]}` in another terminal)")

    with quiet_workers(verbose):
        result = run_async(run_demo(redis_url, photos=photos, quick=quick, board=board, on_group=announce), redis_url)
    if as_json:
        _echo_json(result.as_dict())
        return
    data = result.as_dict()
    rows = [
        (
            s["stage"],
            s["name"],
            s["jobs"],
            s["successful"],
            s["failed"],
            s["cancelled"],
            s["retried"],
            _secs(s["duration"]),
        )
        for s in data["stages"]
    ]
    click.echo()
    headers = ["STAGE", "NAME", "JOBS", "SUCCESSFUL", "FAILED", "CANCELLED", "RETRIED", "DURATION"]
    click.echo(_table(headers, rows, (0, 2, 3, 4, 5, 6, 7)))
    click.echo()
    failures = "; ".join(f["error"] for f in data["failures"]) or "none"
    cancelled = f", {data['cancelled']} cancelled" if data["cancelled"] else ""
    click.echo(
        f"{data['jobs']} jobs in {data['elapsed']:.1f}s: {data['successful']} successful, {data['failed']} failed "
        f"({failures}){cancelled}, {data['retried']} retries."
    )
    report = result.run.stage(4)
    if report:
        click.echo(f"report: {report[0].message}")
    ended = f"ended {data['outcome']} and" if data["outcome"] else "finished and"
    click.echo(f"The group {ended} deleted itself ({data['left_over_keys']} keys left).")


# -- astages groups / show / watch --------------------------------------------------------


async def _group_row(group: StagedGroup) -> dict[str, Any]:
    status = await group.status()
    statuses = await group.stage_statuses()
    totals = sum((await group.progress()).values(), StageProgress())  # O(stages): counters only
    return {
        "id": group.id,
        "description": group.description,
        "created_at": _iso(group.created_at),
        "status": status.value,
        "stages": len(statuses),
        "current_stage": next((n for n, s in statuses.items() if not s.ended), None),
        "jobs": totals.as_dict() | {"finished": totals.finished},
    }


@main.command()
@redis_options
@click.option("--limit", type=click.IntRange(1), default=50, show_default=True, help="Groups to show.")
@click.option("--offset", type=click.IntRange(0), default=0, show_default=True, help="Groups to skip (oldest first).")
@json_option
def groups(redis_url: str, prefix: str, limit: int, offset: int, as_json: bool) -> None:
    """List live groups, oldest first, with their progress."""

    async def action(redis: ArqRedis) -> tuple[int, list[dict[str, Any]]]:
        rows = []
        for group in await StagedGroup.list(redis, offset, limit, prefix=prefix):
            with contextlib.suppress(GroupNotFound, StageNotFound):  # it finished while we read
                rows.append(await _group_row(group))
        return await StagedGroup.count(redis, prefix=prefix), rows

    total, rows = run_async(_with_redis(redis_url, action), redis_url)
    if as_json:
        _echo_json({"total": total, "offset": offset, "groups": rows})
        return
    if not rows:
        click.echo("no groups" if total == 0 else f"no groups at offset {offset} (there are {total})")
        return
    table = [
        (
            r["id"],
            _short(r["description"], 32),
            _when(dt.datetime.fromisoformat(r["created_at"]) if r["created_at"] else None),
            r["status"],
            f"{r['current_stage'] or '-'}/{r['stages']}",
            f"{r['jobs']['finished']}/{r['jobs']['total']}",
            r["jobs"]["failed"],
            r["jobs"]["cancelled"],
        )
        for r in rows
    ]
    headers = ["ID", "DESCRIPTION", "CREATED", "STATUS", "STAGE", "JOBS", "FAILED", "CANCELLED"]
    click.echo(_table(headers, table, (5, 6, 7)))
    if offset or len(rows) < total:
        click.echo(f"groups {offset + 1}-{offset + len(rows)} of {total} (--offset, --limit)")


async def _stage_detail(stage: StagedGroupStage, limit: int | None) -> dict[str, Any]:
    info = await stage.info()
    jobs = await stage.jobs(0, limit) if limit != 0 else []
    rows = []
    for job, (state, tries, message) in zip(jobs, await stage.job_statuses(jobs), strict=True):
        error = await job.error() if state == JobStatus.FAILED.value else None
        rows.append(
            {
                "id": job.id,
                "function": job.function,
                "args": [_jsonable(a) for a in job.args],
                "kwargs": {k: _jsonable(v) for k, v in job.kwargs.items()},
                "queue": job.queue_name,
                "status": state,
                "tries": tries,
                "message": message,
                "error": error,
            }
        )
    return {
        "number": stage.number,
        "status": info.status.value,
        "started": _iso(info.started),
        "finished": _iso(info.finished),
        "duration": seconds(info.duration),
        "progress": info.progress.as_dict(),
        "jobs": rows,
    }


@main.command()
@redis_options
@click.argument("group_id", metavar="GROUP")
@click.option("--limit", type=click.IntRange(0), default=20, show_default=True, help="Jobs to show per stage.")
@click.option("--all", "show_all", is_flag=True, help="Show every job of every stage.")
@json_option
def show(redis_url: str, prefix: str, group_id: str, limit: int, show_all: bool, as_json: bool) -> None:
    """Show a group: its stages (counts, duration), and their jobs with statuses and messages.

    A group that ended and is kept (keep_for) also shows its outcome. GROUP is a group
    id, or the start of one."""

    async def action(redis: ArqRedis) -> tuple[dict[str, Any], GroupSummary | None]:
        group = await _find_group(redis, group_id, prefix)
        status = await group.status()
        stages = [await _stage_detail(stage, None if show_all else limit) for stage in (await group.stages()).values()]
        summary = await group.summary() if status.ended else None
        data = {
            "id": group.id,
            "description": group.description,
            "created_at": _iso(group.created_at),
            "status": status.value,
            "summary": None if summary is None else _summary_dict(summary),
            "stages": stages,
        }
        return data, summary

    data, summary = run_async(_with_redis(redis_url, action), redis_url)
    if as_json:
        _echo_json(data)
        return
    created = _when(dt.datetime.fromisoformat(data["created_at"]) if data["created_at"] else None)
    click.echo(f"group {data['id']}  {data['description']!r}  {data['status']}  created {created}")
    if summary is not None:
        click.echo(f"outcome: {_outcome_line(summary)}")
        failed_jobs = _failed_jobs_line(summary)
        if failed_jobs:
            click.echo(failed_jobs)
    for stage in data["stages"]:
        p = stage["progress"]
        counts = ", ".join(f"{v} {k}" for k, v in p.items() if v and k != "total") or "no jobs"
        took = ""
        if stage["duration"] is not None:
            took = f"  in {stage['duration']:.2f}s" if stage["finished"] else f"  for {stage['duration']:.2f}s so far"
        click.echo(f"\nstage {stage['number']}  {stage['status']}  {p['total']} jobs: {counts}{took}")
        if not stage["jobs"]:
            continue
        rows = []
        for job in stage["jobs"]:
            call = _short(f"{job['function']}({', '.join(map(repr, job['args']))})", 40)
            note = job["message"] or ""
            if job["error"]:
                note = (note + " | " if note else "") + job["error"].strip().splitlines()[0]
            rows.append((job["id"].rsplit(":", 1)[-1], call, job["status"], job["tries"], _short(note, 60)))
        click.echo(_table(["#", "JOB", "STATUS", "TRIES", "MESSAGE"], rows, (0, 3)))
        if len(stage["jobs"]) < p["total"]:
            click.echo(f"... {p['total'] - len(stage['jobs'])} more (--limit N or --all)")


@main.command()
@redis_options
@click.argument("group_id", metavar="GROUP")
@click.option("--interval", type=click.FloatRange(0.05), default=0.5, show_default=True, help="Seconds between frames.")
@click.option("--timeout", type=click.FloatRange(0), default=None, help="Give up (exit 1) after this many seconds.")
def watch(redis_url: str, prefix: str, group_id: str, interval: float, timeout: float | None) -> None:
    """Show live progress bars per stage until the group ends, then how it ended.

    The end is heard at once (group.wait(), pub/sub); the bars are redrawn every
    --interval. GROUP is a group id, or the start of one."""

    async def action(redis: ArqRedis) -> str:
        group = await _find_group(redis, group_id, prefix)
        async with group.ending() as end:  # subscribed before anything is shown
            click.echo(f"group {group.id}  {group.description!r}")
            return await follow(group, asyncio.ensure_future(end.result()))

    async def follow(group: StagedGroup, ending: asyncio.Future[GroupSummary]) -> str:
        board = Board()
        rows: list[StageRow] = []
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            while not ending.done():
                frame = await snapshot(group)
                if frame is None:  # gone: its end (or deletion) is being announced
                    await asyncio.wait([ending], timeout=GONE_GRACE)
                    if not ending.done():
                        break  # it expired (keep_for ran out) or ended unheard
                    continue
                rows = frame
                board.draw(rows)
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    raise CommandError(f"group {group.id} did not finish within {timeout:g}s")
                await asyncio.wait([ending], timeout=interval if left is None else min(interval, left))
            summary = _ended(ending)
        finally:
            await _stop_task(ending)
        if summary is None:
            board.draw(finished(rows))
            return f"group {group.id} finished (or was deleted)"
        board.draw(ended_rows(summary))
        return f"group {group.id} ended: {_outcome_line(summary)}"

    click.echo(run_async(_with_redis(redis_url, action), redis_url))


# Seconds to wait for a group's end to be announced once its records are gone.
GONE_GRACE = 2.0


def _ended(waiter: asyncio.Future[GroupSummary]) -> GroupSummary | None:
    """What a finished ``group.wait()`` task returned: the summary, or None when the
    group is gone (deleted, or ended unkept before the wait began)."""
    if not waiter.done():
        return None
    error = waiter.exception()
    if isinstance(error, GroupNotFound):
        return None
    if error is not None:
        raise error
    return waiter.result()


async def _stop_task(task: asyncio.Future[Any]) -> None:
    """Cancel ``task`` if it still runs and let it unwind (closing what it opened)."""
    if not task.done():
        task.cancel()
    await asyncio.wait([task])
    if not task.cancelled():
        task.exception()  # retrieved, so asyncio does not log it


# -- astages wait / events / cancel -----------------------------------------------------


@main.command("wait")
@redis_options
@click.argument("group_id", metavar="GROUP")
@click.option("--timeout", type=click.FloatRange(0), default=None, help="Give up (exit 2) after this many seconds.")
@json_option
def wait_command(redis_url: str, prefix: str, group_id: str, timeout: float | None, as_json: bool) -> None:
    """Wait until a group ends (woken by pub/sub, no polling) and print its summary.

    Exit status: 0 when it completed with no failed or cancelled job, 1 when it ended
    failed or cancelled or any job failed or was cancelled (or on an error), 2 when
    --timeout ran out. A group that already ended can be waited for only when it is kept
    (keep_for). GROUP is a group id, or the start of one."""

    async def action(redis: ArqRedis) -> tuple[str, GroupSummary | None]:
        group = await _find_group(redis, group_id, prefix)
        try:
            return group.id, await group.wait(timeout)
        except TimeoutError:
            return group.id, None

    found, summary = run_async(_with_redis(redis_url, action), redis_url)
    if summary is None:
        click.echo(f"Error: group {found} did not end within {timeout:g}s", err=True)
        raise SystemExit(2)
    if as_json:
        _echo_json(_summary_dict(summary))
    else:
        click.echo(f"group {summary.group_id}  {summary.description!r}  ended {_outcome_line(summary)}")
        rows = [
            (
                s["number"],
                s["status"],
                s["jobs"],
                s["successful"],
                s["failed"],
                s["cancelled"],
                s["retried"],
                _secs(s["duration"]),
            )
            for s in _summary_dict(summary)["stages"]
        ]
        if rows:
            headers = ["STAGE", "STATUS", "JOBS", "SUCCESSFUL", "FAILED", "CANCELLED", "RETRIED", "DURATION"]
            click.echo(_table(headers, rows, (0, 2, 3, 4, 5, 6, 7)))
        failed_jobs = _failed_jobs_line(summary)
        if failed_jobs:
            click.echo(failed_jobs)
    clean = summary.outcome == "complete" and not summary.failed and not summary.cancelled
    raise SystemExit(0 if clean else 1)


def _event_dict(event: Event) -> dict[str, Any]:
    return {
        "id": event.id,
        "at": _iso(event.at),
        "kind": event.kind,
        "subject": event.subject,
        "from": event.from_status,
        "to": event.to_status,
        "details": event.details,
    }


def _event_line(event: Event) -> str:
    at = event.at.astimezone().strftime("%Y-%m-%d %H:%M:%S.%f")[:-3]
    move = f"{event.from_status or ''} -> {event.to_status}".strip()
    details = " ".join(f"{k}={_short(v, 80)}" for k, v in event.details.items())
    return f"{at}  {event.kind:<5}  {event.subject:<8}  {move:<28}  {details}".rstrip()


def _echo_event(event: Event, as_json: bool) -> None:
    click.echo(json.dumps(_event_dict(event)) if as_json else _event_line(event))


# Longest a blocking XREAD waits before it is issued again (milliseconds).
XREAD_BLOCK_MS = 10_000


async def _follow(group: StagedGroup, key: str, after: str, as_json: bool) -> str:
    """Print the group's new events (blocking XREAD) until it ends; say how it ended."""
    redis = group.redis
    ending = asyncio.ensure_future(group.wait())
    reader: asyncio.Future[Any] | None = None
    try:
        while True:
            reader = asyncio.ensure_future(redis.xread({key: after}, count=500, block=XREAD_BLOCK_MS))
            await asyncio.wait([reader, ending], return_when=asyncio.FIRST_COMPLETED)
            if not reader.done():
                break  # the group ended; its last events are read below
            for _stream, entries in reader.result() or []:
                for entry_id, fields in entries:
                    event = Event.of(entry_id, fields)
                    _echo_event(event, as_json)
                    after = event.id
        await _stop_task(reader)
        # A kept group still has its stream: print what came before its end was heard.
        with contextlib.suppress(GroupNotFound):
            for event in await group.events(10_000, after=after):
                _echo_event(event, as_json)
        summary = _ended(ending)
    finally:
        if reader is not None:
            await _stop_task(reader)
        await _stop_task(ending)
    if summary is None:
        return f"group {group.id} is gone (it finished, or was deleted)"
    return f"group {group.id} ended: {_outcome_line(summary)}"


@main.command()
@redis_options
@click.argument("group_id", metavar="GROUP")
@click.option("--count", type=click.IntRange(0), default=50, show_default=True, help="Latest events to print first.")
@click.option("--follow", "-f", is_flag=True, help="Then print new events as they come, until the group ends.")
@json_option
def events(redis_url: str, prefix: str, group_id: str, count: int, follow: bool, as_json: bool) -> None:
    """Print a group's timeline: time, kind, subject, from -> to, details.

    Job transitions (running, pending_re_run, successful, failed, queued, deleted) and
    stage transitions (running, complete, cancelled), oldest first. --follow waits on
    the group's event stream (blocking XREAD) and stops when the group ends. With --json:
    a JSON list, or with --follow one JSON object per line (the end goes to stderr).
    GROUP is a group id, or the start of one."""

    async def action(redis: ArqRedis) -> str | None:
        group = await _find_group(redis, group_id, prefix)
        key = Keys(prefix).events(group.id)
        latest = [Event.of(i, f) for i, f in reversed(await redis.xrevrange(key, count=max(count, 1)))]
        shown = latest[-count:] if count else []
        if not follow:
            if as_json:
                _echo_json([_event_dict(e) for e in shown])
            elif not shown:
                click.echo(f"no events for group {group.id}")
            for event in [] if as_json else shown:
                click.echo(_event_line(event))
            return None
        for event in shown:
            _echo_event(event, as_json)
        return await _follow(group, key, latest[-1].id if latest else "0-0", as_json)

    end = run_async(_with_redis(redis_url, action), redis_url)
    if end is not None:
        click.echo(end, err=as_json)


@main.command()
@redis_options
@click.argument("group_id", metavar="GROUP")
@click.option("--stage", "number", type=int, default=None, help="Cancel only this stage (the group goes on).")
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
@json_option
def cancel(redis_url: str, prefix: str, group_id: str, number: int | None, yes: bool, as_json: bool) -> None:
    """Cancel a group, or one of its stages.

    Jobs not yet final become cancelled: those not started leave arq's queue, running
    ones are aborted when their worker has allow_abort_jobs (else they finish, and their
    outcome changes nothing). A cancelled group ends at once and its callbacks fire; a
    cancelled stage ends and the group moves on. GROUP is a group id, or the start of one."""

    async def find(redis: ArqRedis) -> tuple[StagedGroup, str]:
        group = await _find_group(redis, group_id, prefix)
        status = await group.status()
        if status.ended:
            raise CommandError(f"group {group.id} already ended ({status.value}): nothing to cancel")
        if number is None:
            left = sum(p.open for p in (await group.progress()).values())
            return group, f"Cancel group {group.id} {group.description!r} ({status.value}, {left} jobs not final)?"
        info = await (await group.get_stage(number)).info()
        what = f"stage {number} ({info.status.value}, {info.progress.open} jobs not final)"
        return group, f"Cancel {what} of group {group.id} {group.description!r}?"

    if not yes:
        group, question = run_async(_with_redis(redis_url, find), redis_url)
        click.confirm(question, abort=True, err=True)
        group_id = group.id

    async def action(redis: ArqRedis) -> dict[str, Any]:
        group, _ = await find(redis)
        if number is None:
            return await _cancel_group(group)
        return await _cancel_stage(group, number)

    data = run_async(_with_redis(redis_url, action), redis_url)
    if as_json:
        _echo_json(data)
        return
    what = f"stage {data['stage']} of group {data['group']}" if data["stage"] is not None else f"group {data['group']}"
    line = f"cancelled {what}: {data['cancelled']} jobs cancelled"
    if data["running"]:
        line += f" ({data['running']} were running: aborted if their worker allows aborts)"
    if data["outcome"]:
        line += f"; the group ended: {data['outcome']}"
    elif data["next_stage"] is not None:
        line += f"; the group goes on with stage {data['next_stage']}"
    else:
        line += f"; the group is {data['status']}"
    click.echo(line)


async def _cancel_group(group: StagedGroup) -> dict[str, Any]:
    before = await group.progress()
    async with EndListener(group) as end:
        await group.cancel()
        summary = await group.summary() or await end.summary(timeout=5)
    if summary is None:  # the end was not heard: count what was open before
        cancelled = sum(p.open for p in before.values())
    else:
        cancelled = summary.cancelled - sum(p.cancelled for p in before.values())
    return {
        "group": group.id,
        "stage": None,
        "cancelled": cancelled,
        "running": sum(p.running for p in before.values()),
        "outcome": summary.outcome if summary else "cancelled",
        "next_stage": None,
        "status": "cancelled",
    }


async def _cancel_stage(group: StagedGroup, number: int) -> dict[str, Any]:
    stage = await group.get_stage(number)
    before = await stage.info()
    async with EndListener(group) as end:
        motion = await stage.cancel()
        summary = None
        if motion.finished:
            summary = await group.summary() or await end.summary(timeout=5)
    after = next((s for s in summary.stages if s.number == number), None) if summary else None
    if after is not None:
        cancelled = after.cancelled
    elif summary is None:
        cancelled = (await stage.info()).progress.cancelled
    else:
        cancelled = before.progress.open
    status = None if summary else (await group.status()).value
    return {
        "group": group.id,
        "stage": number,
        "cancelled": cancelled - before.progress.cancelled,
        "running": before.progress.running,
        "outcome": summary.outcome if summary else None,
        "next_stage": int(motion.stage) if motion.outcome == "running" and motion.stage else None,
        "status": status or (summary.outcome if summary else "ended"),
    }


# -- astages initiate / delete / cleanup / purge -----------------------------------------


@main.command()
@redis_options
@click.argument("group_id", metavar="GROUP")
def initiate(redis_url: str, prefix: str, group_id: str) -> None:
    """Start a group: its first stage that is not complete runs.

    Also sends on a stage whose sending stopped. GROUP is a group id, or the start of one."""

    async def action(redis: ArqRedis) -> str:
        group = await _find_group(redis, group_id, prefix)
        motion = await group.initiate()
        if motion.finished:
            return f"group {group.id} had no stage left to run: it finished and was deleted"
        return f"group {group.id}: stage {motion.stage} is running"

    click.echo(run_async(_with_redis(redis_url, action), redis_url))


@main.command()
@redis_options
@click.argument("group_id", metavar="GROUP")
def delete(redis_url: str, prefix: str, group_id: str) -> None:
    """Delete a group, its stages and jobs (jobs not yet started leave arq's queue).

    GROUP is a group id, or the start of one."""

    async def action(redis: ArqRedis) -> str:
        group = await _find_group(redis, group_id, prefix)
        if not await group.delete():
            raise GroupNotFound(group.id)
        return f"deleted group {group.id}"

    click.echo(run_async(_with_redis(redis_url, action), redis_url))


@main.command()
@redis_options
@json_option
def cleanup(redis_url: str, prefix: str, as_json: bool) -> None:
    """Repair orphaned records (the gem's Cleaner.cleanup_jobs) and report what was done."""
    from astages.cleaner import Cleaner

    async def action(redis: ArqRedis) -> dict[str, Any]:
        report = await Cleaner.cleanup_jobs(redis, prefix=prefix)
        data = {f.name: getattr(report, f.name) for f in dataclasses.fields(report)}
        return data | {"repaired": report.repaired}

    data = run_async(_with_redis(redis_url, action), redis_url)
    errors = data.pop("errors", ())
    if as_json:
        _echo_json(data | {"errors": [{"group": g, "error": why} for g, why in errors]})
    elif data["repaired"]:
        click.echo(f"repaired {data['repaired']}:")
        for name, items in data.items():
            if name != "repaired" and items:
                click.echo(f"  {name.replace('_', ' ')}: {', '.join(map(str, items))}")
    else:
        click.echo("nothing to repair")
    if errors:
        if not as_json:
            for group_id, why in errors:
                click.echo(f"could not repair group {group_id}: {why}", err=True)
        raise SystemExit(1)


@main.command()
@redis_options
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
@json_option
def purge(redis_url: str, prefix: str, yes: bool, as_json: bool) -> None:
    """Delete every key astages owns under the prefix: every group, running or not.

    arq's own keys stay; a staged job already in arq's queue is then not run."""
    from astages.cleaner import Cleaner

    if not yes:
        groups = run_async(_with_redis(redis_url, lambda redis: StagedGroup.count(redis, prefix=prefix)), redis_url)
        click.confirm(
            f"Delete every {prefix}:* key ({groups} live groups) on {_safe_url(redis_url)}?", abort=True, err=True
        )
    deleted = run_async(_with_redis(redis_url, lambda redis: Cleaner.purge_all(redis, prefix=prefix)), redis_url)
    if as_json:
        _echo_json({"deleted_keys": deleted})
    else:
        click.echo(f"deleted {deleted} keys")


@main.command()
@redis_options
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on (loopback without a login).")
@click.option("--port", type=click.IntRange(0, 65535), default=8080, show_default=True, help="Port to listen on.")
@click.option("--root-path", default="", help="Path prefix when a proxy serves the dashboard under a sub-path.")
def web(redis_url: str, prefix: str, host: str, port: int, root_path: str) -> None:
    """Serve the web dashboard (needs the extra: pip install 'astages[web]').

    Set ASTAGES_WEB_PASSWORD (user ASTAGES_WEB_USER, default astages) to require HTTP basic
    auth; an address that is not loopback needs it. ASTAGES_WEB_SECRET keeps forms valid
    across restarts."""
    try:
        import jinja2  # noqa: F401
        import starlette  # noqa: F401
        import uvicorn  # noqa: F401

        from astages.web.serve import WebSettings, serve
    except ImportError as e:
        raise CommandError(f"the dashboard needs the web extra: pip install 'astages[web]' ({e})") from None
    try:
        settings = WebSettings.of(redis_url, host, port, prefix, root_path)
    except ValueError as e:
        raise CommandError(str(e)) from None
    where = f"http://{host}:{port}{settings.root_path}/"
    click.echo(f"astages dashboard on {where} (Redis {_safe_url(redis_url)})", err=True)
    run_async(serve(settings), redis_url)
