"""``astages initiate``, ``delete``, ``cancel``, ``cleanup`` and ``purge``: commands that change groups."""

from __future__ import annotations

import dataclasses
from typing import Any

import click
from arq.connections import ArqRedis

from astages._connection import safe_url
from astages._ending import EndListener
from astages.cli import (
    CommandError,
    echo_json,
    find_group,
    json_option,
    main,
    plural,
    redis_options,
    run_async,
    with_redis,
)
from astages.exceptions import GroupNotFound
from astages.group import StagedGroup

# -- astages cancel ----------------------------------------------------------------------


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
        group = await find_group(redis, group_id, prefix)
        status = await group.status()
        if status.ended:
            raise CommandError(f"group {group.id} already ended ({status.value}): nothing to cancel")
        if number is None:
            left = sum(p.open for p in (await group.progress()).values())
            what = f"{status.value}, {plural(left, 'job')} not final"
            return group, f"Cancel group {group.id} {group.description!r} ({what})?"
        info = await (await group.get_stage(number)).info()
        what = f"{info.label} ({info.status.value}, {plural(info.progress.open, 'job')} not final)"
        return group, f"Cancel {what} of group {group.id} {group.description!r}?"

    if not yes:
        group, question = run_async(with_redis(redis_url, find), redis_url)
        click.confirm(question, abort=True, err=True)
        group_id = group.id

    async def action(redis: ArqRedis) -> dict[str, Any]:
        group, _ = await find(redis)
        if number is None:
            return await _cancel_group(group)
        return await _cancel_stage(group, number)

    data = run_async(with_redis(redis_url, action), redis_url)
    if as_json:
        echo_json(data)
        return
    what = f"stage {data['stage']} of group {data['group']}" if data["stage"] is not None else f"group {data['group']}"
    line = f"cancelled {what}: {plural(data['cancelled'], 'job')} cancelled"
    if data["running"]:
        were = "was" if data["running"] == 1 else "were"
        line += f" ({data['running']} {were} running: aborted if their worker allows aborts)"
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
        group = await find_group(redis, group_id, prefix)
        motion = await group.initiate()
        if motion.finished:
            return f"group {group.id} had no stage left to run: it finished and was deleted"
        return f"group {group.id}: stage {motion.stage} is running"

    click.echo(run_async(with_redis(redis_url, action), redis_url))


@main.command()
@redis_options
@click.argument("group_id", metavar="GROUP")
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
def delete(redis_url: str, prefix: str, group_id: str, yes: bool) -> None:
    """Delete a group, its stages and jobs (jobs not yet started leave arq's queue).

    No callback fires and its jobs are not cancelled first (see cancel for that). Asks
    first unless --yes is given. GROUP is a group id, or the start of one."""

    async def question(redis: ArqRedis) -> tuple[StagedGroup, str]:
        group = await find_group(redis, group_id, prefix)
        status = await group.status()
        progress = (await group.progress()).values()
        jobs = sum(p.total for p in progress)
        left = sum(p.open for p in progress)
        what = f"{status.value}, {plural(len(progress), 'stage')}, {plural(jobs, 'job')}, {left} not final"
        return group, f"Delete group {group.id} {group.description!r} ({what})? No callback fires."

    if not yes:
        group, ask = run_async(with_redis(redis_url, question), redis_url)
        click.confirm(ask, abort=True, err=True)
        group_id = group.id

    async def action(redis: ArqRedis) -> str:
        group = await find_group(redis, group_id, prefix)
        if not await group.delete():
            raise GroupNotFound(group.id)
        return f"deleted group {group.id}"

    click.echo(run_async(with_redis(redis_url, action), redis_url))


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

    data = run_async(with_redis(redis_url, action), redis_url)
    errors = data.pop("errors", ())
    if as_json:
        echo_json(data | {"errors": [{"group": g, "error": why} for g, why in errors]})
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
        groups = run_async(with_redis(redis_url, lambda redis: StagedGroup.count(redis, prefix=prefix)), redis_url)
        live = plural(groups, "live group")
        click.confirm(f"Delete every {prefix}:* key ({live}) on {safe_url(redis_url)}?", abort=True, err=True)
    deleted = run_async(with_redis(redis_url, lambda redis: Cleaner.purge_all(redis, prefix=prefix)), redis_url)
    if as_json:
        echo_json({"deleted_keys": deleted})
    else:
        click.echo(f"deleted {plural(deleted, 'key')}")
