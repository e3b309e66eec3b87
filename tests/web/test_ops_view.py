"""The operations view (/ops and /api/ops): queues, workers, throughput charts; and the
groups list's search, status filter, failed column; dark mode."""

from __future__ import annotations

import datetime as dt
import html
import re

import httpx
import pytest
from arq.connections import ArqRedis
from click.testing import CliRunner

import astages
import astages.web.groups as groups_module
from astages._keys import Keys
from astages.ops import sample
from astages.web import create_app
from astages.web.serve import WebSettings
from astages.web.templating import MIN_FAILED, segments
from web.helpers import XSS, make_sample, work

KEYS = Keys()


async def finish(job: astages.StagedJob, outcome: str) -> None:
    """Report a job's end as a worker would (start, then finish)."""
    assert job.ref is not None
    store = job.stage().group.store
    await store.run("start_job", job.ref.group_id, job.ref.stage, job.ref.seq, 1)
    await store.move("finish_job", job.ref.group_id, job.ref.stage, job.ref.seq, 1, outcome, "ValueError: no")


def health_report(ago: float = 5) -> bytes:
    at = dt.datetime.now() - dt.timedelta(seconds=ago)
    return f"{at:%b-%d %H:%M:%S} j_complete=12 j_failed=3 j_retried=1 j_ongoing=2 queued=5".encode()


async def _sampled(redis: ArqRedis) -> astages.StagedGroup:
    """A running group with 2 jobs successful and 1 failed between two samples."""
    made = await make_sample(redis)
    await sample(redis, KEYS)
    jobs = await (await made.running.stage(1)).jobs()
    await finish(jobs[0], "s")
    await finish(jobs[1], "s")
    await finish(jobs[2], "f")
    await sample(redis, KEYS)
    return made.running


async def test_ops_page_shows_queue_worker_and_chart(client: httpx.AsyncClient, redis: ArqRedis) -> None:
    """/ops lists the default queue (length, due, deferred), its live worker's report and a throughput chart."""
    await _sampled(redis)
    await redis.psetex("arq:queue:health-check", 3_601_000, health_report())
    page = await client.get("/ops")
    assert page.status_code == 200
    assert page.headers["content-security-policy"].startswith("default-src 'none'")
    row = re.search(r'<tr data-queue="arq:queue">(.*?)</tr>', page.text, re.S)
    assert row, page.text
    cells = re.findall(r'data-live="by_queue\.arq:queue\.(\w+)" data-format="number">(\d+)<', row.group(1))
    assert dict(cells) == {"jobs": "5", "due": "5", "deferred": "0"}  # reports leave arq's queue to arq
    assert "alive" in row.group(1)
    assert 'data-worker="arq:queue"' in page.text and "j_complete=12" in page.text
    line = r'class="line line-successful" data-live-points="chart.successful" points="([^"]*)"'
    successful = re.search(line, page.text)
    assert successful and len(successful.group(1).split()) == 2  # one interval: a step of two points
    assert 'href="/ops"' in page.text  # the header links the view


async def test_ops_json_has_queues_workers_totals_and_rates(client: httpx.AsyncClient, redis: ArqRedis) -> None:
    """/api/ops: queues, workers with their counts and age, totals, the window's rates and chart points."""
    await _sampled(redis)
    await redis.psetex("arq:queue:health-check", 3_601_000, health_report(ago=30))
    data = (await client.get("/api/ops", params={"window": "6h"})).json()
    assert data["live"] is True and data["window"] == "6h"
    queue = next(q for q in data["queues"] if q["name"] == "arq:queue")
    assert (queue["jobs"], queue["due"], queue["deferred"]) == (5, 5, 0)
    assert queue["oldest_age_seconds"] is not None
    (worker,) = data["workers"]
    assert worker["queue"] == "arq:queue" and worker["counts"]["j_failed"] == 3
    assert 29 <= worker["age_seconds"] <= 35 and worker["expires_in_seconds"] > 3500
    assert data["samples"] == 2 and data["in_window"] == {"successful": 2, "failed": 1}
    (rate,) = data["rates"]
    assert rate["successful"] > 0 and rate["failed"] > 0
    assert data["chart"]["successful"] and data["chart"]["failed"]
    assert data["totals"] == {"successful": 0, "failed": 0, "cancelled": 0, "retried": 0}  # the group still runs
    assert (await client.get("/api/ops", params={"window": "bogus"})).json()["window"] == "1h"


async def test_ops_page_without_samples_or_workers_says_why(client: httpx.AsyncClient) -> None:
    """With no samples and no health-check key the view explains where both come from."""
    page = await client.get("/ops")
    assert page.status_code == 200
    text = html.unescape(page.text)
    assert "two are needed" in text and "No worker seen" in text
    assert '<tr data-queue="arq:queue">' in page.text


async def test_configured_and_stage_queues_are_shown(redis: ArqRedis) -> None:
    """create_app(queues=...) adds queues; a running stage's queue is found by itself; a deferred job is deferred."""
    async with astages.within_a_grouping(redis, "thumbs") as group:
        await (await group.stage(1)).enqueue_to("arq:thumbs", work, 1)
        await (await group.stage(1)).enqueue_to("arq:thumbs", work, 2, _defer_by=3600)
    app = create_app(redis, queues=["arq:reports", "arq:reports"])
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://dash") as client:
        data = (await client.get("/api/ops")).json()
    queues = {q["name"]: q for q in data["queues"]}
    assert set(queues) == {"arq:queue", "arq:reports", "arq:thumbs"}
    assert (queues["arq:thumbs"]["due"], queues["arq:thumbs"]["deferred"]) == (1, 1)


def test_web_command_takes_queues() -> None:
    """``astages web --queue`` reaches the settings (and create_app) the server is made with."""
    settings = WebSettings.of("redis://x", "127.0.0.1", 8080, environ={}, queues=("arq:a", "arq:b"))
    assert settings.queues == ("arq:a", "arq:b")
    result = CliRunner().invoke(
        __import__("astages.cli", fromlist=["main"]).main, ["web", "--help"], env={"COLUMNS": "200"}
    )
    assert "--queue" in result.output


async def test_groups_search_by_description_or_id(client: httpx.AsyncClient, redis: ArqRedis) -> None:
    """?q= finds groups by a substring of the description (any case) or of the id, in the page and the JSON."""
    made = await make_sample(redis)
    page = await client.get("/", params={"q": "NIGHTLY"})
    assert "nightly import" in page.text and XSS not in page.text and "&lt;script&gt;" not in page.text
    assert "1 group matches" in html.unescape(page.text)
    data = (await client.get("/api/groups", params={"q": made.pending.id[-12:]})).json()
    assert [g["id"] for g in data["groups"]] == [made.pending.id] and data["q"] == made.pending.id[-12:]
    none = await client.get("/", params={"q": "no such thing"})
    assert "No group matches." in none.text


async def test_search_beyond_the_newest_finds_a_full_id(
    client: httpx.AsyncClient, redis: ArqRedis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The search looks at the newest GROUP_SEARCH_LIMIT groups and says so; an id given in full is found anyway."""
    monkeypatch.setattr(groups_module, "GROUP_SEARCH_LIMIT", 1)
    monkeypatch.setattr(groups_module.search, "__defaults__", (1,))
    made = await make_sample(redis)  # running first, then pending (newest)
    data = (await client.get("/api/groups", params={"q": "nightly"})).json()
    assert data["groups"] == [] and data["search_limited"] is True
    data = (await client.get("/api/groups", params={"q": made.running.id})).json()
    assert [g["id"] for g in data["groups"]] == [made.running.id]


async def test_groups_filter_by_status(client: httpx.AsyncClient, redis: ArqRedis) -> None:
    """?status= keeps the groups of that status; an unknown status is ignored; search and filter combine."""
    made = await make_sample(redis)
    pending = (await client.get("/api/groups", params={"status": "pending"})).json()
    assert [g["id"] for g in pending["groups"]] == [made.pending.id] and pending["status"] == "pending"
    running = await client.get("/", params={"status": "running"})
    assert "nightly import" in running.text and "&lt;script&gt;" not in running.text
    assert 'class="chip st-running on"' in running.text
    every = (await client.get("/api/groups", params={"status": "bogus"})).json()
    assert every["total"] == 2 and every["status"] == ""
    both = (await client.get("/api/groups", params={"status": "pending", "q": "nightly"})).json()
    assert both["groups"] == []


async def test_a_group_with_failures_does_not_look_all_green(client: httpx.AsyncClient, redis: ArqRedis) -> None:
    """The failed column counts a group's failures, a 'with failures' badge shows, its bar has a visible red part."""
    made = await make_sample(redis, jobs=100)
    jobs = await (await made.running.stage(1)).jobs()
    for job in jobs[:99]:
        await finish(job, "s")
    await finish(jobs[99], "f")
    page = await client.get("/")
    row = re.search(rf'<tr data-live-row="by_id\.{made.running.id}">(.*?)</tr>', page.text, re.S)
    assert row
    assert re.search(r'class="fails some"[^>]*>1<', row.group(1))
    assert re.search(r'class="badge st-failed with-failures" data-live-shown="[^"]+">', row.group(1))  # not hidden
    failed = re.search(r'class="seg seg-failed" data-seg="failed" x="\d+" y="0" width="(\d+)"', row.group(1))
    assert failed and int(failed.group(1)) >= MIN_FAILED
    other = re.search(rf'<tr data-live-row="by_id\.{made.pending.id}">(.*?)</tr>', page.text, re.S)
    assert other and 'class="fails"' in other.group(1) and "with-failures" in other.group(1)
    assert re.search(r"with-failures[^>]*hidden", other.group(1))
    data = (await client.get("/api/groups")).json()
    assert {g["id"]: g["failed"] for g in data["groups"]} == {made.running.id: 1, made.pending.id: 0}


def test_failed_segment_keeps_a_least_width() -> None:
    """segments(): 1 failure in 10,000 jobs still gets MIN_FAILED of the bar, taken from the widest part."""
    progress = astages.StageProgress(successful=9_999, failed=1)
    got = segments(progress)
    assert got == [("successful", 0, 1000 - MIN_FAILED), ("failed", 1000 - MIN_FAILED, MIN_FAILED)]
    assert segments(astages.StageProgress(successful=5)) == [("successful", 0, 1000)]


async def test_dark_mode_follows_the_system(client: httpx.AsyncClient) -> None:
    """The stylesheet has a prefers-color-scheme: dark palette (no script, no cookie)."""
    css = await client.get("/static/astages.css")
    assert css.status_code == 200
    assert "@media (prefers-color-scheme: dark)" in css.text and "color-scheme: light dark" in css.text
