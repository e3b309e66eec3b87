"""``create_app(redis, ...)``: the dashboard as an ASGI app, mountable under any prefix."""

from __future__ import annotations

import secrets
from collections.abc import Iterable
from dataclasses import dataclass

import jinja2
from arq.connections import ArqRedis
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from astages._keys import DEFAULT_PREFIX, Keys
from astages._scripts import Store
from astages.exceptions import CorruptRecord, GroupNotFound, JobNotFound, StageNotFound
from astages.web import actions, pages
from astages.web.security import BasicAuth, SecurityHeaders, Signer, normal_origin
from astages.web.templating import STATIC, environment, render

__all__ = ["Dashboard", "create_app"]


@dataclass(frozen=True, slots=True)
class Dashboard:
    """Everything the dashboard's requests share; kept on ``app.state.astages``."""

    store: Store
    env: jinja2.Environment
    signer: Signer
    title: str
    poll_ms: int
    trusted_origins: frozenset[str] = frozenset()
    queues: tuple[str, ...] = ()  # arq queues the operations view always shows


def create_app(
    redis: ArqRedis,
    *,
    prefix: str = DEFAULT_PREFIX,
    login: tuple[str, str] | None = None,
    secret: bytes | None = None,
    title: str = "astages",
    poll_ms: int = 2000,
    debug: bool = False,
    trusted_origins: Iterable[str] = (),
    queues: Iterable[str] = (),
) -> Starlette:
    """The dashboard for the groups under key prefix ``prefix`` of ``redis``.

    Mount it anywhere (``Mount("/stages", app=create_app(redis))``). ``login=(user,
    password)`` requires HTTP basic auth; ``secret`` signs the CSRF tokens and messages
    (random per app when not given, which is fine for one process). The caller owns
    ``redis`` and closes it. ``trusted_origins`` (``https://ops.example.com``): the
    origins the dashboard's pages are served from when a reverse proxy in front of it
    rewrites the ``Host`` header (its forms are otherwise refused as cross-site).
    ``queues``: arq queues the operations view (``/ops``) shows besides the default queue
    and those the running stages send to."""
    dashboard = Dashboard(
        store=Store(redis, Keys(prefix)),
        env=environment(),
        signer=Signer(secret or secrets.token_bytes(32)),
        title=title,
        poll_ms=poll_ms,
        trusted_origins=frozenset(normal_origin(o) for o in trusted_origins),
        queues=tuple(dict.fromkeys(queues)),
    )
    routes = [
        Route("/", pages.groups_html, name="groups"),
        Route("/groups/{group_id}", pages.group_html, name="group"),
        Route("/groups/{group_id}/stages/{number}", pages.stage_html, name="stage"),
        Route("/groups/{group_id}/stages/{number}/jobs/{seq}", pages.job_html, name="job"),
        Route("/metrics", metrics_text, name="metrics"),
        Route("/ops", pages.ops_html, name="ops"),
        Route("/api/ops", pages.ops_json, name="api_ops"),
        Route("/api/groups", pages.groups_json, name="api_groups"),
        Route("/api/groups/{group_id}", pages.group_json, name="api_group"),
        Route("/api/groups/{group_id}/events", pages.events_json, name="api_events"),
        Route("/api/groups/{group_id}/stages/{number}", pages.stage_json, name="api_stage"),
        Route("/api/groups/{group_id}/stages/{number}/jobs/{seq}", pages.job_json, name="api_job"),
        Route("/actions/delete-all-groups", actions.delete_all_groups, methods=["POST"], name="delete_all_groups"),
        Route("/actions/cleanup-jobs", actions.cleanup_jobs, methods=["POST"], name="cleanup_jobs"),
        Route("/actions/purge", actions.purge, methods=["POST"], name="purge"),
        Route("/groups/{group_id}/initiate", actions.initiate_group, methods=["POST"], name="initiate_group"),
        Route("/groups/{group_id}/delete", actions.delete_group, methods=["POST"], name="delete_group"),
        Route("/groups/{group_id}/cancel", actions.cancel_group, methods=["POST"], name="cancel_group"),
        Route(
            "/groups/{group_id}/stages/{number}/initiate",
            actions.initiate_stage,
            methods=["POST"],
            name="initiate_stage",
        ),
        Route("/groups/{group_id}/stages/{number}/delete", actions.delete_stage, methods=["POST"], name="delete_stage"),
        Route("/groups/{group_id}/stages/{number}/cancel", actions.cancel_stage, methods=["POST"], name="cancel_stage"),
        Route(
            "/groups/{group_id}/stages/{number}/jobs/{seq}/queue", actions.queue_job, methods=["POST"], name="queue_job"
        ),
        Route(
            "/groups/{group_id}/stages/{number}/retry-failed",
            actions.retry_failed,
            methods=["POST"],
            name="retry_failed",
        ),
        Route(
            "/groups/{group_id}/stages/{number}/jobs/{seq}/retry", actions.retry_job, methods=["POST"], name="retry_job"
        ),
        Route(
            "/groups/{group_id}/stages/{number}/jobs/{seq}/delete",
            actions.delete_job,
            methods=["POST"],
            name="delete_job",
        ),
        Mount("/static", app=StaticFiles(directory=STATIC), name="static"),
    ]
    middleware = [Middleware(SecurityHeaders)]
    if login is not None:
        user, password = login
        middleware.insert(0, Middleware(BasicAuth, user=user, password=password))
    app = Starlette(
        debug=debug,
        routes=routes,
        middleware=middleware,
        exception_handlers={
            GroupNotFound: not_found,
            StageNotFound: not_found,
            JobNotFound: not_found,
            CorruptRecord: not_found,
            HTTPException: http_error,
        },
    )
    app.state.astages = dashboard
    return app


async def metrics_text(request: Request) -> Response:
    """Prometheus metrics (the metrics extra), read from Redis on each scrape (astages.metrics)."""
    try:
        from astages import ops
        from astages.metrics import CONTENT_TYPE_LATEST, Metrics
    except ImportError:
        message = "the metrics need the metrics extra: pip install 'astages[metrics]'\n"
        return Response(message, status_code=501, media_type="text/plain")
    state = request.app.state
    if getattr(state, "astages_metrics", None) is None:  # one per app: it keeps the counters between scrapes
        dashboard: Dashboard = state.astages
        store = dashboard.store
        queues = (ops.default_queue(store.redis), *dashboard.queues)
        state.astages_metrics = Metrics(store.redis, prefix=store.keys.prefix, queues=queues)
    body = await state.astages_metrics.render()
    return Response(body, headers={"Content-Type": CONTENT_TYPE_LATEST})


def _is_api(request: Request) -> bool:
    root = request.scope.get("root_path", "")
    return request.url.path.startswith(root + "/api/")


def _missing(exc: Exception) -> str:
    if isinstance(exc, GroupNotFound):
        return (
            f"There is no group {exc.group_id!r}: it finished (a finished group deletes itself "
            "unless it was made with keep_for, then expires), was deleted, or never was."
        )
    if isinstance(exc, StageNotFound):
        return f"Group {exc.group_id!r} has no stage {exc.number}."
    if isinstance(exc, JobNotFound):
        return f"There is no job {exc.job_id!r}: it was deleted, or its group finished."
    return str(exc)


async def not_found(request: Request, exc: Exception) -> Response:
    """An unknown group, stage or job: a 404 page (nothing is created by looking)."""
    message = _missing(exc)
    if _is_api(request):
        return JSONResponse({"error": "not_found", "detail": message}, status_code=404)
    return render(request, "error.html", {"status": 404, "heading": "Not found", "detail": message}, status_code=404)


async def http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    if _is_api(request):
        return JSONResponse({"error": exc.detail}, status_code=exc.status_code, headers=exc.headers)
    heading = "Not found" if exc.status_code == 404 else str(exc.detail)
    return render(
        request,
        "error.html",
        {"status": exc.status_code, "heading": heading, "detail": str(exc.detail)},
        status_code=exc.status_code,
    )
