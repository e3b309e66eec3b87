"""The dashboard's buttons: each a POST with a CSRF token that redirects back with a message.

A destructive action posted without ``confirmed=1`` (the page's script sets it once the
user said yes; without JavaScript) answers with a confirmation page instead of acting.
"""

from __future__ import annotations

import dataclasses
import importlib
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from starlette.requests import Request
from starlette.responses import RedirectResponse, Response

from astages._scripts import Motion, text
from astages.exceptions import AstagesError, GroupNotFound, JobNotFound, StageNotFound
from astages.group import StagedGroup
from astages.job import StagedJob
from astages.models import GroupStatus, GroupSummary
from astages.stage import StagedGroupStage
from astages.web._shared import stage_of
from astages.web.security import CSRF_COOKIE, CSRF_FIELD, FLASH_COOKIE, cookie_path, safe_next, same_origin
from astages.web.templating import render, url

if TYPE_CHECKING:
    from astages._scripts import Store
    from astages.web.app import Dashboard

DELETE_BATCH = 200
ANNOUNCED_WITHIN = 2.0  # seconds to wait for the summary a cancel that ended the group published


@dataclass(frozen=True, slots=True)
class Outcome:
    """What an action did: the message to show, and where to go when the page the user
    came from no longer exists."""

    message: str
    kind: str = "success"
    go: str | None = None


Work = Callable[[], Awaitable[Outcome]]


def _dashboard(request: Request) -> Dashboard:
    dashboard: Dashboard = request.app.state.astages
    return dashboard


def _number(raw: str) -> int | None:
    try:
        return int(raw)
    except ValueError:
        return None


async def _act(request: Request, work: Work, *, confirm: str | None = None) -> Response:
    """Check the token, ask for confirmation when ``confirm`` is set, run ``work``, and
    redirect back with its message."""
    dashboard = _dashboard(request)
    form = await request.form()
    token = form.get(CSRF_FIELD)
    if not same_origin(request, dashboard.trusted_origins) or not dashboard.signer.check_csrf(
        request.cookies.get(CSRF_COOKIE), token if isinstance(token, str) else None
    ):
        return render(
            request,
            "error.html",
            {
                "status": 403,
                "heading": "Refused",
                "detail": "This form expired or was sent from another site. Reload the page and try again.",
            },
            status_code=403,
        )
    home = url(request, "groups")
    raw_next = form.get("next")
    back = safe_next(raw_next if isinstance(raw_next, str) else None, request.scope.get("root_path", ""), home)
    if confirm is not None and form.get("confirmed") != "1":
        return render(request, "confirm.html", {"question": confirm, "action": request.url.path, "back": back})
    try:
        outcome = await work()
    except (GroupNotFound, StageNotFound, JobNotFound) as e:
        outcome = Outcome(f"Nothing done: {_gone(e)}", "error", home)
    except AstagesError as e:
        outcome = Outcome(f"Nothing done: {e}", "error")
    response = RedirectResponse(outcome.go or back, status_code=303)
    response.set_cookie(
        FLASH_COOKIE,
        dashboard.signer.flash(outcome.message, outcome.kind),
        httponly=True,
        samesite="strict",
        path=cookie_path(request),
    )
    return response


def _gone(e: AstagesError) -> str:
    if isinstance(e, GroupNotFound):
        return "that group no longer exists (it finished or was deleted)."
    if isinstance(e, StageNotFound):
        return f"stage {e.number} no longer exists."
    return "that job no longer exists."


def _moved(motion: Motion, what: str) -> str:
    if motion.finished:
        return f"{what}; every stage is complete, so the group finished and was deleted."
    if motion.outcome == "running" and motion.stage:
        return f"{what}; stage {motion.stage} is running."
    return f"{what}."


async def _group(request: Request) -> StagedGroup:
    """The group the path names (GroupNotFound when it is gone)."""
    store = _dashboard(request).store
    return await StagedGroup.load(store.redis, request.path_params["group_id"], prefix=store.keys.prefix)


# -- all groups ------------------------------------------------------------------------------


async def delete_all_groups(request: Request) -> Response:
    store = _dashboard(request).store

    async def work() -> Outcome:
        deleted = 0
        while True:
            ids = [text(i) for i in await store.redis.zrange(store.keys.index, 0, DELETE_BATCH - 1)]
            if not ids:
                break
            for group_id in ids:
                deleted += bool(await StagedGroup(store, group_id).delete())
        return Outcome(f"Deleted {deleted:,} group{'' if deleted == 1 else 's'}.")

    return await _act(request, work, confirm="Delete every group, with all their stages and jobs?")


def _cleaner() -> Any:
    """``astages.cleaner.Cleaner``, imported when a button needs it."""
    try:
        module = importlib.import_module("astages.cleaner")
    except ImportError:
        return None
    return getattr(module, "Cleaner", None)


def _report(report: Any) -> str:
    """A cleaner's report as one line: a count, or a dataclass's non-empty fields."""
    if isinstance(report, int):
        return f"{report:,} key{'' if report == 1 else 's'} deleted"
    if dataclasses.is_dataclass(report) and not isinstance(report, type):
        parts = [
            f"{name.replace('_', ' ')} {_count(value)}"
            for name, value in dataclasses.asdict(report).items()
            if value not in ((), [], 0, None, "")
        ]
        return "; ".join(parts) if parts else "nothing to repair"
    return "done" if report is None else str(report)


def _count(value: Any) -> str:
    if isinstance(value, list | tuple | set | frozenset | dict):
        return f"{len(value):,}"
    return str(value)


async def _clean(request: Request, method: str, done: str, confirm: str) -> Response:
    store = _dashboard(request).store

    async def work() -> Outcome:
        cleaner = _cleaner()
        if cleaner is None or not hasattr(cleaner, method):
            return Outcome(f"Nothing done: this astages has no Cleaner.{method}.", "error")
        report = await getattr(cleaner, method)(store.redis, prefix=store.keys.prefix)
        return Outcome(f"{done}: {_report(report)}.")

    return await _act(request, work, confirm=confirm)


async def cleanup_jobs(request: Request) -> Response:
    return await _clean(
        request,
        "cleanup_jobs",
        "Cleaned up jobs",
        "Clean up jobs: repair the records of groups, stages and jobs that lost a parent or index entry?",
    )


async def purge(request: Request) -> Response:
    return await _clean(
        request, "purge_all", "Purged", "Purge: delete every astages key under this prefix, whatever its state?"
    )


# -- a group -----------------------------------------------------------------------------


async def initiate_group(request: Request) -> Response:
    async def work() -> Outcome:
        group = await _group(request)
        motion = await group.initiate()
        return Outcome(
            _moved(motion, f"Initiated {group.description!r}"), go=url(request, "groups") if motion.finished else None
        )

    return await _act(request, work)


async def delete_group(request: Request) -> Response:
    async def work() -> Outcome:
        group = await _group(request)
        await group.delete()
        return Outcome(f"Deleted group {group.description!r}.", go=url(request, "groups"))

    return await _act(request, work, confirm="Delete this group, with all its stages and jobs?")


async def cancel_group(request: Request) -> Response:
    store = _dashboard(request).store

    async def work() -> Outcome:
        group = await _group(request)
        status = await group.status()
        if status.ended:
            return Outcome(f"Nothing done: group {group.description!r} had already ended ({status.value}).", "error")
        count, summary, kept = await _cancelling(store, group, None, group.cancel)
        message = f"Cancelled group {group.description!r}: {_jobs(count)} cancelled; {_ended(summary, kept)}"
        return Outcome(message, go=None if kept else url(request, "groups"))

    return await _act(
        request,
        work,
        confirm="Cancel this group? Its unfinished jobs are cancelled (running ones aborted where the worker "
        "allows it) and its later stages never start.",
    )


async def _cancelling(
    store: Store, group: StagedGroup, number: int | None, cancel: Callable[[], Awaitable[Motion]]
) -> tuple[int, GroupSummary | None, bool]:
    """Run ``cancel`` (of the group, or of its stage ``number``) and count the jobs it
    cancelled: cancelled counters after minus before, read from the group when it is
    still there, else from the summary its end published (subscribed before the cancel,
    as ``group.wait()`` does). Returns (jobs cancelled, summary if the group ended,
    whether the group is still readable)."""
    before = await group.progress()
    pubsub = store.redis.pubsub(ignore_subscribe_messages=True)
    try:
        await pubsub.subscribe(store.keys.finished_channel(group.id))
        motion = await cancel()
        after: dict[int, int] | None = None
        summary: GroupSummary | None = None
        kept = await group.exists()
        if kept:
            after = {n: p.cancelled for n, p in (await group.progress()).items()}
            if (await group.status()).ended:
                summary = await group.summary()
        elif motion.finished:
            summary = await _announced(pubsub)
            if summary is not None:
                after = {s.number: s.cancelled for s in summary.stages}
    finally:
        await pubsub.aclose()
    scope = [number] if number is not None else list(before)
    if after is None:  # the end was not heard: what was open when we looked
        return sum(before[n].open for n in scope if n in before), summary, kept
    return sum(after.get(n, 0) - (before[n].cancelled if n in before else 0) for n in scope), summary, kept


async def _announced(pubsub: Any) -> GroupSummary | None:
    """The summary published on the group's channel, if it comes within ANNOUNCED_WITHIN."""
    deadline = time.monotonic() + ANNOUNCED_WITHIN
    while (left := deadline - time.monotonic()) > 0:
        message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=left)
        if message is not None and message.get("type") == "message":
            return GroupSummary.from_json(message["data"])
    return None


def _jobs(count: int) -> str:
    return f"{count:,} job{'' if count == 1 else 's'}"


def _ended(summary: GroupSummary | None, kept: bool) -> str:
    """Whether the group ended, as the end of a message."""
    if summary is None and kept:
        return "the group goes on."
    outcome = f" ({summary.outcome})" if summary is not None else ""
    if kept:
        return f"the group ended{outcome} and is kept, readable, until it expires."
    return f"the group ended{outcome} and was deleted."


# -- a stage -----------------------------------------------------------------------------


async def _stage(request: Request) -> tuple[StagedGroup, StagedGroupStage]:
    """The group the path names (GroupNotFound when it is gone, or for a stage number
    that is not a number) and a handle on its stage."""
    store = _dashboard(request).store
    group_id, number = request.path_params["group_id"], _number(request.path_params["number"])
    if number is None:
        raise GroupNotFound(group_id)
    return await _group(request), stage_of(store, group_id, number)


async def initiate_stage(request: Request) -> Response:
    async def work() -> Outcome:
        _, stage = await _stage(request)
        motion = await stage.initiate()
        return Outcome(
            _moved(motion, f"Initiated stage {stage.number}"), go=url(request, "groups") if motion.finished else None
        )

    return await _act(request, work)


async def delete_stage(request: Request) -> Response:
    async def work() -> Outcome:
        group, stage = await _stage(request)
        motion = await stage.delete()
        go = url(request, "groups") if motion.finished else url(request, "group", group_id=group.id)
        return Outcome(_moved(motion, f"Deleted stage {stage.number}"), go=go)

    return await _act(request, work, confirm="Delete this stage and all its jobs?")


async def cancel_stage(request: Request) -> Response:
    store = _dashboard(request).store

    async def work() -> Outcome:
        group, stage = await _stage(request)
        number = stage.number
        await stage.status()  # StageNotFound before anything is counted
        count, summary, kept = await _cancelling(store, group, number, stage.cancel)
        after = _ended(summary, kept)
        if summary is None and kept:
            current = await group.current_stage()
            if await group.status() is GroupStatus.PENDING:
                after = "the group is still pending (not initiated)."
            elif current is not None:
                after = f"stage {current.number} is running."
        return Outcome(
            f"Cancelled stage {number}: {_jobs(count)} cancelled; {after}",
            go=None if kept else url(request, "groups"),
        )

    return await _act(
        request,
        work,
        confirm="Cancel this stage? Its unfinished jobs are cancelled (running ones aborted where the worker "
        "allows it) and the group moves on to its next stage.",
    )


async def retry_failed(request: Request) -> Response:
    async def work() -> Outcome:
        _, stage = await _stage(request)
        retried = await stage.retry_failed()
        if retried == 0:
            return Outcome(f"Nothing done: stage {stage.number} has no failed job to retry now.", "error")
        return Outcome(f"Retried {_jobs(retried)} of stage {stage.number}: sent to arq again.")

    return await _act(request, work, confirm="Retry every failed job of this stage?")


# -- a job --------------------------------------------------------------------------------


async def _job(request: Request) -> StagedJob:
    store = _dashboard(request).store
    group, stage = await _stage(request)
    seq = _number(request.path_params["seq"])
    if seq is None:
        raise GroupNotFound(group.id)
    return await StagedJob.load(store.redis, store.keys.job_id(group.id, stage.number, seq), prefix=store.keys.prefix)


async def queue_job(request: Request) -> Response:
    async def work() -> Outcome:
        job = await _job(request)
        await job.enqueue_job()
        return Outcome(f"Sent job {job.function} to arq's queue {job.queue_name!r}.")

    return await _act(request, work)


async def delete_job(request: Request) -> Response:
    async def work() -> Outcome:
        job = await _job(request)
        assert job.ref is not None
        motion = await job.delete()
        if motion.finished:
            go = url(request, "groups")
        else:
            go = url(request, "stage", group_id=job.ref.group_id, number=job.ref.stage)
        return Outcome(_moved(motion, f"Deleted job {job.function}"), go=go)

    return await _act(request, work, confirm="Delete this job?")


async def retry_job(request: Request) -> Response:
    async def work() -> Outcome:
        job = await _job(request)
        await job.retry()
        return Outcome(f"Retried job {job.function}: sent to arq's queue {job.queue_name!r} again.")

    return await _act(request, work)
