"""Jinja2 environment (autoescaped), template helpers and the page renderer."""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlencode

import jinja2
from starlette.requests import Request
from starlette.responses import HTMLResponse

from astages.models import StageProgress
from astages.web._shared import held_label, seconds
from astages.web.grouppage import stage_duration
from astages.web.groups import GROUP_SEARCH_LIMIT, GROUP_SORT_LIMIT
from astages.web.opspage import CHART_HEIGHT, CHART_WIDTH, rate_label
from astages.web.security import CSRF_COOKIE, FLASH_COOKIE, cookie_path, new_nonce

if TYPE_CHECKING:
    from astages.web.app import Dashboard

TEMPLATES = Path(__file__).parent / "templates"
STATIC = Path(__file__).parent / "static"


def ago(when: dt.datetime | None, now: dt.datetime | None = None) -> str:
    """``5 minutes ago``, ``about 3 hours ago``, ``just now``."""
    if when is None:
        return ""
    now = now or dt.datetime.now(tz=dt.UTC)
    seconds = (now - when).total_seconds()
    future = seconds < 0
    seconds = abs(seconds)

    def say(amount: int, unit: str, about: bool = False) -> str:
        text = f"{'about ' if about else ''}{amount} {unit}{'' if amount == 1 else 's'}"
        return f"in {text}" if future else f"{text} ago"

    if seconds < 10:
        return "just now"
    if seconds < 60:
        return say(int(seconds), "second")
    if seconds < 3600:
        return say(int(seconds // 60), "minute")
    if seconds < 86400:
        return say(round(seconds / 3600), "hour", about=True)
    return say(round(seconds / 86400), "day", about=True)


def stamp(when: dt.datetime | None) -> str:
    """``2026-11-29 07:05:33 UTC``."""
    if when is None:
        return ""
    return when.astimezone(dt.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def clock(when: dt.datetime | None) -> str:
    """``07:05:33`` (UTC)."""
    return "" if when is None else when.astimezone(dt.UTC).strftime("%H:%M:%S")


def number(value: int) -> str:
    return f"{value:,}"


def merge(query: Mapping[str, Any], **changes: Any) -> dict[str, Any]:
    """``query`` with ``changes`` applied; a None change drops the parameter."""
    out = {**query, **changes}
    return {k: v for k, v in out.items() if v is not None}


def pyrepr(value: Any, limit: int = 2_000) -> str:
    """``repr(value)``, cut at ``limit`` characters."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "…"


# Bar segments, left to right: what is done first, then what is still to do.
SEGMENTS = ("successful", "failed", "cancelled", "running", "pending_re_run", "queued", "pending")


# The least width of the failed segment (of 1000): a few failures among many jobs still show.
MIN_FAILED = 20


def segments(progress: StageProgress, width: int = 1000) -> list[tuple[str, int, int]]:
    """(status, x, width) of each non-empty segment of a progress bar ``width`` wide. The
    failed segment is at least ``MIN_FAILED`` wide (taken from the widest other one), so a
    group or stage with failures never looks all green; static/astages.js draws the same."""
    total = progress.total
    if total == 0:
        return []
    sizes: list[list[Any]] = []
    x = done = 0
    for name in SEGMENTS:
        count = int(getattr(progress, name, 0))
        if count:
            done += count
            end = round(width * done / total)
            sizes.append([name, end - x])
            x = end
    failed = next((s for s in sizes if s[0] == "failed"), None)
    if failed is not None and failed[1] < MIN_FAILED:
        others = [s for s in sizes if s is not failed]
        widest = max(others, key=lambda s: s[1], default=None)
        give = min(MIN_FAILED - failed[1], max(0, widest[1] - 1)) if widest is not None else 0
        failed[1] += give
        if widest is not None:
            widest[1] -= give
    out = []
    x = 0
    for name, size in sizes:
        out.append((name, x, size))
        x += size
    return out


def span(value: float | None) -> str:
    """Seconds as a duration label (``seconds``); ``—`` for none."""
    return seconds(None if value is None else dt.timedelta(seconds=value))


def environment() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(TEMPLATES),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters["ago"] = ago
    env.filters["stamp"] = stamp
    env.filters["number"] = number
    env.filters["clock"] = clock
    env.filters["seconds"] = seconds
    env.filters["merge"] = merge
    env.filters["pyrepr"] = pyrepr
    env.filters["span"] = span
    env.filters["rate"] = rate_label
    env.globals["segments"] = segments
    env.globals["held_label"] = held_label
    env.globals["stage_span"] = stage_duration
    env.globals["limit"] = GROUP_SORT_LIMIT
    env.globals["search_limit"] = GROUP_SEARCH_LIMIT
    env.globals["chart_width"] = CHART_WIDTH
    env.globals["chart_height"] = CHART_HEIGHT
    return env


def url(request: Request, name: str, query: Mapping[str, Any] | None = None, **params: Any) -> str:
    """The path of route ``name`` of this app, under whatever prefix it is mounted at."""
    root = str(request.scope.get("root_path", ""))
    path = str(request.app.url_path_for(name, **{k: str(v) for k, v in params.items()}))
    if query:
        clean = {k: v for k, v in query.items() if v is not None}
        if clean:
            path += "?" + urlencode(clean)
    return root + path


def here(request: Request) -> str:
    """The path and query of this request (where an action returns to)."""
    return request.url.path + (f"?{request.url.query}" if request.url.query else "")


def render(
    request: Request, name: str, context: dict[str, Any], status_code: int = 200, live_url: str | None = None
) -> HTMLResponse:
    """Render template ``name``; hands out the CSRF cookie and consumes the flash message."""
    dashboard: Dashboard = request.app.state.astages
    nonce = request.cookies.get(CSRF_COOKIE)
    fresh = not nonce
    if not nonce:
        nonce = new_nonce()
    flash = dashboard.signer.read_flash(request.cookies.get(FLASH_COOKIE))

    def link(route: str, query: Mapping[str, Any] | None = None, **params: Any) -> str:
        return url(request, route, query, **params)

    html = dashboard.env.get_template(name).render(
        request=request,
        title=dashboard.title,
        url=link,
        here=here(request),
        query=dict(request.query_params),
        csrf=dashboard.signer.csrf_token(nonce),
        flash=flash,
        live_url=live_url,
        poll_ms=dashboard.poll_ms,
        key_prefix=dashboard.store.keys.prefix,
        static=lambda file: url(request, "static", path=file),
        **context,
    )
    response = HTMLResponse(html, status_code=status_code)
    path = cookie_path(request)
    if fresh:
        response.set_cookie(CSRF_COOKIE, nonce, httponly=True, samesite="strict", path=path)
    if FLASH_COOKIE in request.cookies:
        response.delete_cookie(FLASH_COOKIE, path=path)
    return response
