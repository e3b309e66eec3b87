"""``astages groups``, ``show``, ``watch``, ``wait`` and ``events``: commands that read groups."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import time
from typing import Any

import click
from arq.connections import ArqRedis

from astages._board import Board, StageRow, ended_rows, finished, seconds, snapshot
from astages._flow import HELD, FlowLimits
from astages._keys import Keys
from astages.cli import (
    CommandError,
    echo_json,
    failed_jobs_line,
    find_group,
    iso,
    json_option,
    jsonable,
    main,
    outcome_line,
    plural,
    redis_options,
    run_async,
    short,
    stage_label,
    stages_table,
    summary_dict,
    table,
    when,
    with_redis,
)
from astages.exceptions import GroupNotFound, StageNotFound
from astages.group import StagedGroup
from astages.models import Event, GroupSummary, JobStatus, StageInfo, StageProgress
from astages.stage import StagedGroupStage

# -- astages groups / show / watch --------------------------------------------------------


async def _group_row(group: StagedGroup) -> dict[str, Any]:
    status = await group.status()
    statuses = await group.stage_statuses()
    totals = sum((await group.progress()).values(), StageProgress())  # O(stages): counters only
    current = next((n for n, s in statuses.items() if not s.ended), None)
    name = None
    if current is not None:
        name = await group.redis.hget(group.store.keys.stage(group.id, current), "name")
    return {
        "id": group.id,
        "description": group.description,
        "created_at": iso(group.created_at),
        "status": status.value,
        "stages": len(statuses),
        "current_stage": current,
        "current_stage_name": None if name is None else name.decode(errors="replace"),
        "jobs": totals.as_dict() | {"finished": totals.finished},
    }


@main.command()
@redis_options
@click.option("--limit", type=click.IntRange(1), default=50, show_default=True, help="Groups to show.")
@click.option("--offset", type=click.IntRange(0), default=0, show_default=True, help="Groups to skip, in listed order.")
@click.option("--oldest", is_flag=True, help="List the oldest groups first.")
@json_option
def groups(redis_url: str, prefix: str, limit: int, offset: int, oldest: bool, as_json: bool) -> None:
    """List live groups with their progress, newest first (as the dashboard does; --oldest
    for oldest first). STAGE is the current stage (its name, if it has one) of all."""

    async def action(redis: ArqRedis) -> tuple[int, list[dict[str, Any]]]:
        rows = []
        for group in await StagedGroup.list(redis, offset, limit, prefix=prefix, newest_first=not oldest):
            with contextlib.suppress(GroupNotFound, StageNotFound):  # it finished while we read
                rows.append(await _group_row(group))
        return await StagedGroup.count(redis, prefix=prefix), rows

    total, rows = run_async(with_redis(redis_url, action), redis_url)
    if as_json:
        echo_json({"total": total, "offset": offset, "order": "oldest" if oldest else "newest", "groups": rows})
        return
    if not rows:
        click.echo("no groups" if total == 0 else f"no groups at offset {offset} (there are {total})")
        return
    cells = [
        (
            r["id"],
            short(r["description"], 32),
            when(dt.datetime.fromisoformat(r["created_at"]) if r["created_at"] else None),
            r["status"],
            f"{r['current_stage'] or '-'}/{r['stages']}" + (f" {name}" if (name := r["current_stage_name"]) else ""),
            f"{r['jobs']['finished']}/{r['jobs']['total']}",
            r["jobs"]["failed"],
            r["jobs"]["cancelled"],
        )
        for r in rows
    ]
    headers = ["ID", "DESCRIPTION", "CREATED", "STATUS", "STAGE", "JOBS", "FAILED", "CANCELLED"]
    click.echo(table(headers, cells, (5, 6, 7)))
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
                "args": [jsonable(a) for a in job.args],
                "kwargs": {k: jsonable(v) for k, v in job.kwargs.items()},
                "queue": job.queue_name,
                "status": state,
                "tries": tries,
                "message": message,
                "error": error,
            }
        )
    return {
        "number": stage.number,
        "name": info.name,
        "status": info.status.value,
        "started": iso(info.started),
        "finished": iso(info.finished),
        "duration": seconds(info.duration),
        "progress": info.progress.as_dict(),
        "flow": flow_dict(info),
        "jobs": rows,
    }


def flow_dict(info: StageInfo) -> dict[str, Any]:
    """A stage's flow control as shown: in flight, waiting, what holds it back, its own limits."""
    p = info.progress
    return {
        "in_flight": p.in_flight,
        "waiting": p.waiting,
        "held_by": None if info.held is None else HELD.get(info.held, info.held),
        "max_in_flight": info.max_in_flight,
        "rate": info.rate,
    }


def limits_dict(limits: FlowLimits) -> dict[str, Any]:
    return {
        "window": limits.window,
        "max_in_flight": limits.max_in_flight,
        "rate": limits.rate,
        "priority": limits.priority,
    }


def flow_line(flow: dict[str, Any], status: str) -> str:
    """``  1,000 in flight, 99,000 waiting (held by window); stage max 20 in flight, 50/s``,
    or '' for a stage with nothing to say (not running, no limit of its own)."""
    own = ", ".join(
        part
        for part in (
            None if flow["max_in_flight"] is None else f"max {flow['max_in_flight']:,} in flight",
            flow["rate"],
        )
        if part
    )
    parts = []
    if status == "running":
        held = f" (held by {flow['held_by']})" if flow["held_by"] else ""
        parts.append(f"{flow['in_flight']:,} in flight, {flow['waiting']:,} waiting to be sent{held}")
    if own:
        parts.append(f"stage limits: {own}")
    return ("  " + "; ".join(parts)) if parts else ""


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
        group = await find_group(redis, group_id, prefix)
        status = await group.status()
        stages = [await _stage_detail(stage, None if show_all else limit) for stage in (await group.stages()).values()]
        summary = await group.summary() if status.ended else None
        data = {
            "id": group.id,
            "description": group.description,
            "created_at": iso(group.created_at),
            "status": status.value,
            "summary": None if summary is None else summary_dict(summary),
            "limits": limits_dict(await group.limits()),
            "stages": stages,
        }
        return data, summary

    data, summary = run_async(with_redis(redis_url, action), redis_url)
    if as_json:
        echo_json(data)
        return
    created = when(dt.datetime.fromisoformat(data["created_at"]) if data["created_at"] else None)
    click.echo(f"group {data['id']}  {data['description']!r}  {data['status']}  created {created}")
    limits = data["limits"]
    click.echo(
        "limits: window "
        + ("none" if limits["window"] is None else f"{limits['window']:,}")
        + "".join(f", {k} {v}" for k, v in limits.items() if k != "window" and v)
    )
    if summary is not None:
        click.echo(f"outcome: {outcome_line(summary)}")
        failed_jobs = failed_jobs_line(summary)
        if failed_jobs:
            click.echo(failed_jobs)
    for stage in data["stages"]:
        p = stage["progress"]
        counts = ", ".join(f"{v} {k}" for k, v in p.items() if v and k != "total") or "no jobs"
        took = ""
        if stage["duration"] is not None:
            took = f"  in {stage['duration']:.2f}s" if stage["finished"] else f"  for {stage['duration']:.2f}s so far"
        label = stage_label(stage["number"], stage["name"])
        click.echo(f"\n{label}  {stage['status']}  {plural(p['total'], 'job')}: {counts}{took}")
        flow = flow_line(stage["flow"], stage["status"])
        if flow:
            click.echo(flow)
        if not stage["jobs"]:
            continue
        rows = []
        for job in stage["jobs"]:
            call = short(f"{job['function']}({', '.join(map(repr, job['args']))})", 40)
            note = job["message"] or ""
            if job["error"]:
                note = (note + " | " if note else "") + job["error"].strip().splitlines()[0]
            seq = job["id"].rsplit(":", 1)[-1].lstrip("0") or "0"  # the id's seq is zero-padded
            rows.append((seq, call, job["status"], job["tries"], short(note, 60)))
        click.echo(table(["#", "JOB", "STATUS", "TRIES", "MESSAGE"], rows, (0, 3)))
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
        group = await find_group(redis, group_id, prefix)
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
        return f"group {group.id} ended: {outcome_line(summary)}"

    click.echo(run_async(with_redis(redis_url, action), redis_url))


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


# -- astages wait / events ----------------------------------------------------------------


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
        group = await find_group(redis, group_id, prefix)
        try:
            return group.id, await group.wait(timeout)
        except TimeoutError:
            return group.id, None

    found, summary = run_async(with_redis(redis_url, action), redis_url)
    if summary is None:
        click.echo(f"Error: group {found} did not end within {timeout:g}s", err=True)
        raise SystemExit(2)
    if as_json:
        echo_json(summary_dict(summary))
    else:
        click.echo(f"group {summary.group_id}  {summary.description!r}  ended {outcome_line(summary)}")
        stages = summary_dict(summary)["stages"]
        if stages:
            click.echo(stages_table(stages))
        failed_jobs = failed_jobs_line(summary)
        if failed_jobs:
            click.echo(failed_jobs)
    clean = summary.outcome == "complete" and not summary.failed and not summary.cancelled
    raise SystemExit(0 if clean else 1)


def _event_dict(event: Event) -> dict[str, Any]:
    return {
        "id": event.id,
        "at": iso(event.at),
        "kind": event.kind,
        "subject": event.subject,
        "from": event.from_status,
        "to": event.to_status,
        "details": event.details,
    }


def _event_line(event: Event) -> str:
    at = event.at.astimezone().strftime("%Y-%m-%d %H:%M:%S.%f")[:-3]
    move = f"{event.from_status or ''} -> {event.to_status}".strip()
    details = " ".join(f"{k}={short(v, 80)}" for k, v in event.details.items())
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
    return f"group {group.id} ended: {outcome_line(summary)}"


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
        group = await find_group(redis, group_id, prefix)
        key = Keys(prefix).events(group.id)
        latest = [Event.of(i, f) for i, f in reversed(await redis.xrevrange(key, count=max(count, 1)))]
        shown = latest[-count:] if count else []
        if not follow:
            if as_json:
                echo_json([_event_dict(e) for e in shown])
            elif not shown:
                click.echo(f"no events for group {group.id}")
            for event in [] if as_json else shown:
                click.echo(_event_line(event))
            return None
        for event in shown:
            _echo_event(event, as_json)
        return await _follow(group, key, latest[-1].id if latest else "0-0", as_json)

    end = run_async(with_redis(redis_url, action), redis_url)
    if end is not None:
        click.echo(end, err=as_json)
