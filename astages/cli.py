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
from astages._board import Board, StageRow, finished, snapshot
from astages._inprocess import ENDED, connect
from astages._keys import DEFAULT_PREFIX
from astages.exceptions import AstagesError, GroupNotFound, StageNotFound
from astages.group import StagedGroup
from astages.models import JobStatus, StageProgress, StageStatus
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


def _value(status: Any) -> str:
    """A status enum's value (or a plain str status) as str."""
    return str(getattr(status, "value", status))


def _when(value: dt.datetime | None) -> str:
    return value.astimezone().strftime("%Y-%m-%d %H:%M:%S") if value else "-"


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
        (s["stage"], s["name"], s["jobs"], s["successful"], s["failed"], s["retried"], f"{s['duration']:.2f}s")
        for s in data["stages"]
    ]
    click.echo()
    click.echo(
        _table(["STAGE", "NAME", "JOBS", "SUCCESSFUL", "FAILED", "RETRIED", "DURATION"], rows, (0, 2, 3, 4, 5, 6))
    )
    click.echo()
    failures = "; ".join(f["error"] for f in data["failures"]) or "none"
    click.echo(
        f"{data['jobs']} jobs in {data['elapsed']:.1f}s: {data['successful']} successful, {data['failed']} failed "
        f"({failures}), {data['retried']} retries."
    )
    report = result.run.stage(4)
    if report:
        click.echo(f"report: {report[0].message}")
    click.echo(f"The group deleted itself when its last stage completed ({data['left_over_keys']} keys left).")


# -- astages groups / show / watch --------------------------------------------------------


async def _group_row(group: StagedGroup) -> dict[str, Any]:
    statuses = await group.stage_statuses()
    totals = StageProgress()
    current = None
    for number, status in statuses.items():
        if current is None and status is not StageStatus.COMPLETE:
            current = number
        p = await StagedGroupStage(group, number).progress()
        totals = StageProgress(**{k: getattr(totals, k) + getattr(p, k) for k in p.as_dict() if k != "total"})
    return {
        "id": group.id,
        "description": group.description,
        "created_at": group.created_at.isoformat() if group.created_at else None,
        "status": _value(await group.status()),
        "stages": len(statuses),
        "current_stage": current,
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
        )
        for r in rows
    ]
    click.echo(_table(["ID", "DESCRIPTION", "CREATED", "STATUS", "STAGE", "JOBS", "FAILED"], table, (5, 6)))
    if offset or len(rows) < total:
        click.echo(f"groups {offset + 1}-{offset + len(rows)} of {total} (--offset, --limit)")


async def _stage_detail(stage: StagedGroupStage, limit: int | None) -> dict[str, Any]:
    status = await stage.status()
    progress = await stage.progress()
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
    return {"number": stage.number, "status": status.value, "progress": progress.as_dict(), "jobs": rows}


@main.command()
@redis_options
@click.argument("group_id", metavar="GROUP")
@click.option("--limit", type=click.IntRange(0), default=20, show_default=True, help="Jobs to show per stage.")
@click.option("--all", "show_all", is_flag=True, help="Show every job of every stage.")
@json_option
def show(redis_url: str, prefix: str, group_id: str, limit: int, show_all: bool, as_json: bool) -> None:
    """Show a group: its stages, and their jobs with statuses and messages.

    GROUP is a group id, or the start of one."""

    async def action(redis: ArqRedis) -> dict[str, Any]:
        group = await _find_group(redis, group_id, prefix)
        stages = [await _stage_detail(stage, None if show_all else limit) for stage in (await group.stages()).values()]
        return {
            "id": group.id,
            "description": group.description,
            "created_at": group.created_at.isoformat() if group.created_at else None,
            "status": _value(await group.status()),
            "stages": stages,
        }

    data = run_async(_with_redis(redis_url, action), redis_url)
    if as_json:
        _echo_json(data)
        return
    created = _when(dt.datetime.fromisoformat(data["created_at"]) if data["created_at"] else None)
    click.echo(f"group {data['id']}  {data['description']!r}  {data['status']}  created {created}")
    for stage in data["stages"]:
        p = stage["progress"]
        counts = ", ".join(f"{v} {k}" for k, v in p.items() if v and k != "total") or "no jobs"
        click.echo(f"\nstage {stage['number']}  {stage['status']}  {p['total']} jobs: {counts}")
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
    """Show live progress bars per stage until the group finishes.

    GROUP is a group id, or the start of one."""

    async def action(redis: ArqRedis) -> str:
        group = await _find_group(redis, group_id, prefix)
        click.echo(f"group {group.id}  {group.description!r}")
        board = Board()
        rows: list[StageRow] = []
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            frame = await snapshot(group)
            if frame is None:
                board.draw(finished(rows))
                return f"group {group.id} finished (or was deleted)"
            rows = frame
            board.draw(rows)
            try:
                status = _value(await group.status())
            except GroupNotFound:
                status = "finished"
            if status in ENDED:  # an ended group kept with keep_for
                return f"group {group.id} ended: {status}"
            if deadline is not None and time.monotonic() > deadline:
                raise CommandError(f"group {group.id} did not finish within {timeout:g}s")
            await asyncio.sleep(interval)

    click.echo(run_async(_with_redis(redis_url, action), redis_url))


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
