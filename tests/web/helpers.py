"""Helpers for the dashboard's tests: sample groups, and reading tokens and messages off pages."""

from __future__ import annotations

import html
import re
from dataclasses import dataclass

import httpx
from arq.connections import ArqRedis

import astages

XSS = "<script>alert(1)</script>"


async def work(ctx: dict[str, object], index: int, label: str = "") -> int:
    """A job function for the sample groups."""
    job = await astages.StagedJob.perform_job(ctx, index, label)
    await job.set_status_message(f"did {index}")
    return index


@dataclass(frozen=True)
class Sample:
    """Groups made for a test: ``running`` (stage 1 queued, stage 2 pending) and
    ``pending`` (never initiated), whose description is an XSS probe."""

    running: astages.StagedGroup
    pending: astages.StagedGroup


async def make_sample(redis: ArqRedis, jobs: int = 5) -> Sample:
    running = await astages.StagedGroup.create(redis, "nightly import")
    s1 = await running.stage(1)
    await s1.enqueue_many([(work, (i, "photo")) for i in range(jobs)])
    s2 = await running.stage(2)
    await s2.enqueue(work, 99, label=XSS)
    await running.initiate()
    pending = await astages.StagedGroup.create(redis, XSS)
    p1 = await pending.stage(1)
    await p1.enqueue(work, 1, XSS)
    return Sample(running, pending)


def csrf_of(page: str) -> str:
    """The CSRF token in a rendered page's forms."""
    found = re.search(r'name="csrf" value="([^"]+)"', page)
    assert found, "no form with a CSRF token on the page"
    return html.unescape(found.group(1))


def flash_of(page: str) -> str | None:
    found = re.search(r'<div class="flash[^"]*" role="status">(.*?)</div>', page, re.S)
    return html.unescape(found.group(1)) if found else None


async def post_form(
    client: httpx.AsyncClient, page: str, action: str, *, confirmed: bool = True, **extra: str
) -> httpx.Response:
    """Open ``page`` (for its token and cookie), then post its form to ``action``."""
    shown = await client.get(page)
    assert shown.status_code == 200, shown.text
    data = {"csrf": csrf_of(shown.text), "next": page, **extra}
    if confirmed:
        data["confirmed"] = "1"
    return await client.post(action, data=data)
