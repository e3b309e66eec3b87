"""The dashboard's pages (HTML) and their JSON twins under ``/api``."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from astages.group import StagedGroup
from astages.models import JobStatus
from astages.web._shared import ORDERS, pick, to_int
from astages.web.grouppage import (
    EVENT_PAGE_MAX,
    EVENT_PAGE_SIZE,
    EventRow,
    GroupPage,
    group_page,
    stream_id,
    summary_json,
    timeline,
)
from astages.web.groups import GROUP_SORTS, GROUP_STATUSES, GroupsPage, groups_page
from astages.web.jobpage import job_detail
from astages.web.opspage import WINDOWS, OpsPage, ops_page
from astages.web.stagepage import StagePage, StageQuery, stage_page
from astages.web.templating import render, url

if TYPE_CHECKING:
    from astages._scripts import Store
    from astages.web.app import Dashboard


def _store(request: Request) -> Store:
    dashboard: Dashboard = request.app.state.astages
    return dashboard.store


def _int(raw: str) -> int:
    """A path segment that must be an integer; 404 otherwise."""
    try:
        return int(raw)
    except ValueError:
        raise HTTPException(404, f"{raw!r} is not a number") from None


def _path(request: Request) -> tuple[str, int, int]:
    params = request.path_params
    return params["group_id"], _int(params.get("number", "0")), _int(params.get("seq", "0"))


def _json(data: dict[str, Any]) -> JSONResponse:
    return JSONResponse(data, headers={"cache-control": "no-store"})


def _query(request: Request) -> dict[str, str]:
    return dict(request.query_params)


SEARCH_MAX = 200  # characters of a search kept


# -- operations -----------------------------------------------------------------------------


async def _ops(request: Request) -> OpsPage:
    dashboard: Dashboard = request.app.state.astages
    window = pick(request.query_params.get("window"), tuple(WINDOWS))
    return await ops_page(dashboard.store, dashboard.queues, window)


async def ops_html(request: Request) -> Response:
    """Queues, workers, and jobs finished over time."""
    data = await _ops(request)
    live = url(request, "api_ops", {"window": data.window})
    dashboard: Dashboard = request.app.state.astages
    context = {"data": data, "windows": tuple(WINDOWS), "queues_given": bool(dashboard.queues)}
    return render(request, "ops.html", context, live_url=live)


async def ops_json(request: Request) -> Response:
    return _json((await _ops(request)).as_json())


# -- groups list ---------------------------------------------------------------------------


async def _groups(request: Request) -> GroupsPage:
    params = request.query_params
    sort = pick(params.get("sort"), GROUP_SORTS)
    default_order = "desc" if sort == "created" else "asc"
    order = params.get("order") if params.get("order") in ORDERS else default_order
    page = to_int(params.get("page"), 1, 1)
    q = (params.get("q") or "").strip()[:SEARCH_MAX]
    status = params.get("status") or ""
    status = status if status in GROUP_STATUSES else ""
    return await groups_page(_store(request), sort, str(order), page, q=q, status=status)


async def groups_html(request: Request) -> Response:
    data = await _groups(request)
    live = url(request, "api_groups", _query(request)) if data.live else None
    context = {"data": data, "pager": pager(data.page, data.pages), "statuses": GROUP_STATUSES}
    return render(request, "groups.html", context, live_url=live)


async def groups_json(request: Request) -> Response:
    return _json((await _groups(request)).as_json())


# -- a group ------------------------------------------------------------------------------


async def _group(request: Request) -> GroupPage:
    group_id, _, _ = _path(request)
    return await group_page(_store(request), group_id, stream_id(request.query_params.get("after")))


def _event_link(request: Request, group_id: str, row: EventRow) -> str | None:
    if row.seq is not None:
        return url(request, "job", group_id=group_id, number=row.stage, seq=row.seq)
    if row.stage is not None:
        return url(request, "stage", group_id=group_id, number=row.stage)
    return None


async def group_html(request: Request) -> Response:
    data = await _group(request)
    group = data.group
    live = url(request, "api_group", group_id=group.id) if group.live else None
    return render(
        request,
        "group.html",
        {
            "group": group,
            "summary": data.summary,
            "failed_jobs": data.failed_jobs,
            "timeline": data.timeline,
            "event_link": lambda row: _event_link(request, group.id, row),
        },
        live_url=live,
    )


async def group_json(request: Request) -> Response:
    data = await _group(request)
    group = data.group
    out = group.as_json()
    out["live"] = group.live
    out["stages"] = [stage.as_json() for stage in group.stages]
    out["summary"] = summary_json(data.summary) if data.summary is not None else None
    out["events_url"] = url(request, "api_events", group_id=group.id)
    return _json(out)


async def events_json(request: Request) -> Response:
    """``/api/groups/<id>/events?after=<stream id>&count=<n>``: the timeline, oldest first."""
    group_id, _, _ = _path(request)
    store = _store(request)
    group = await StagedGroup.load(store.redis, group_id, prefix=store.keys.prefix)
    params = request.query_params
    after = stream_id(params.get("after"))
    size = min(EVENT_PAGE_MAX, to_int(params.get("count"), EVENT_PAGE_SIZE, 1))
    page = await timeline(store, group, after, size)
    return _json(
        {
            "group_id": group_id,
            "after": page.after,
            "count": len(page.rows),
            "more": page.more,
            "next_after": page.next_after,
            "latest_after": page.latest,
            "events": [row.as_json(_event_link(request, group_id, row)) for row in page.rows],
        }
    )


# -- a stage ------------------------------------------------------------------------------


async def _stage(request: Request) -> StagePage:
    group_id, number, _ = _path(request)
    query = StageQuery.of(request.query_params)
    return await stage_page(_store(request), group_id, number, query)


async def stage_html(request: Request) -> Response:
    data = await _stage(request)
    live = url(request, "api_stage", _query(request), group_id=data.group_id, number=data.number) if data.live else None
    return render(
        request,
        "stage.html",
        {"data": data, "q": data.query, "pager": pager(data.page, data.pages), "statuses": JobStatus},
        live_url=live,
    )


async def stage_json(request: Request) -> Response:
    return _json((await _stage(request)).as_json())


# -- a job ----------------------------------------------------------------------------------


async def job_html(request: Request) -> Response:
    group_id, number, seq = _path(request)
    job = await job_detail(_store(request), group_id, number, seq)
    live = url(request, "api_job", group_id=group_id, number=number, seq=seq) if job.live else None
    return render(request, "job.html", {"job": job, "info": job.info, "arq": job.arq}, live_url=live)


async def job_json(request: Request) -> Response:
    group_id, number, seq = _path(request)
    return _json((await job_detail(_store(request), group_id, number, seq)).as_json())


# -- pagination -----------------------------------------------------------------------------


def pager(page: int, pages: int, width: int = 7) -> list[int]:
    """Up to ``width`` page numbers around ``page`` (the original shows 7)."""
    if pages <= width:
        return list(range(1, pages + 1))
    start = max(1, min(page - width // 2, pages - width + 1))
    return list(range(start, start + width))
