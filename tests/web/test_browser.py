"""A real headless Chromium on a real uvicorn server, with a real Redis and real arq workers:
click through groups -> group -> stage -> job, press Initiate on a pending stage and watch
it run, confirm a deletion, watch the timeline grow, cancel a group; the operations view,
search, status filter and dark mode; screenshot each page (the README's are in docs/img/)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import uvicorn
from arq import func
from arq.connections import ArqRedis, create_pool
from arq.worker import Worker
from helpers import wait_for
from playwright.async_api import Page, async_playwright, expect

import astages
from astages.sweeper import Sweeper
from astages.web import create_app

CHROMIUM = os.environ.get("ASTAGES_TEST_CHROMIUM", "/usr/bin/chromium")
# Screenshots go to a temporary folder; ASTAGES_WEB_SCREENSHOTS=docs/img refreshes the README's.
SHOTS_ENV = "ASTAGES_WEB_SCREENSHOTS"
SLOW_QUEUE = "arq:thumbnails"
IDLE_QUEUE = "arq:reports"  # no worker serves it: a job there stays queued
RELEASE: dict[str, asyncio.Event] = {}


async def resize(ctx: dict[str, Any], index: int, size: str) -> str:
    job = await astages.StagedJob.perform_job(ctx, index, size)
    await job.set_status_message(f"resized photo {index} to {size}")
    return f"photo-{index}-{size}.jpg"


async def thumbnail(ctx: dict[str, Any], index: int) -> int:
    job = await astages.StagedJob.perform_job(ctx, index)
    if index == 2:
        raise ValueError(f"photo {index} is not an image")
    if index >= 4:
        await job.set_status_message(f"rendering thumbnail {index}…")
        await RELEASE["thumbnails"].wait()
    await job.set_status_message(f"thumbnail {index} done")
    return index


async def summarise(ctx: dict[str, Any], count: int) -> int:
    return count


FUNCTIONS = [resize, func(thumbnail, max_tries=1), summarise]


@contextlib.asynccontextmanager
async def worker(redis_server: Any, queue: str, max_jobs: int) -> AsyncIterator[Worker]:
    """An arq worker with astages' settings, in this process, on its own connection pool."""
    pool = await create_pool(redis_server.settings)
    settings = astages.worker_settings(functions=FUNCTIONS, sweep_interval=None, poll_delay=0.05)
    running = Worker(
        **settings, redis_pool=pool, queue_name=queue, max_jobs=max_jobs, burst=False, handle_signals=False
    )
    task = asyncio.create_task(running.main())
    try:
        yield running
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await running.close()


@contextlib.asynccontextmanager
async def server(redis: ArqRedis) -> AsyncIterator[str]:
    """The dashboard on uvicorn at 127.0.0.1 on a free port; yields its base URL."""
    app = create_app(redis, poll_ms=250)
    config = uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", lifespan="off")
    instance = uvicorn.Server(config)
    task = asyncio.create_task(instance.serve())
    try:
        async with asyncio.timeout(10):
            while not instance.started:
                if task.done():
                    task.result()
                await asyncio.sleep(0.01)
        port = instance.servers[0].sockets[0].getsockname()[1]
        yield f"http://127.0.0.1:{port}"
    finally:
        instance.should_exit = True
        await task


async def make_groups(redis: ArqRedis) -> tuple[astages.StagedGroup, astages.StagedGroup]:
    """A pending import (stage 1 to run from the browser) and a running thumbnail group."""
    thumbs = await astages.StagedGroup.create(redis, "Thumbnails for November", keep_for=600)
    t1 = await thumbs.stage(1)
    for i in range(8):
        await t1.enqueue_to(SLOW_QUEUE, thumbnail, i)
    await (await thumbs.stage(2)).enqueue_to(IDLE_QUEUE, summarise, 8)
    await thumbs.initiate()
    photos = await astages.StagedGroup.create(redis, "Nightly photo import")
    p1 = await photos.stage(1)
    await p1.enqueue_many([(resize, (i, size)) for i in range(6) for size in ("large",)])
    await (await photos.stage(2)).enqueue_to(IDLE_QUEUE, summarise, 6)
    return photos, thumbs


@pytest.fixture
def shots(tmp_path: Path) -> Path:
    """Where the screenshots go."""
    folder = Path(os.environ.get(SHOTS_ENV) or tmp_path)
    folder.mkdir(parents=True, exist_ok=True)
    return folder


async def shoot(page: Page, folder: Path, name: str) -> None:
    await page.screenshot(path=str(folder / name), full_page=True)
    assert (folder / name).stat().st_size > 10_000


@pytest.fixture
def chromium() -> str:
    """Debian's chromium; missing, the test fails (never skips)."""
    assert Path(CHROMIUM).exists(), f"{CHROMIUM} is missing: apt-get install chromium (.ci/run does)"
    return CHROMIUM


async def test_click_through_and_initiate_in_chromium(
    real_redis: ArqRedis, redis_server: Any, chromium: str, shots: Path
) -> None:
    """Groups -> group -> stage -> job in Chromium; Initiate runs a pending stage live; Delete confirms."""
    RELEASE["thumbnails"] = asyncio.Event()
    photos, thumbs = await make_groups(real_redis)
    async with (
        server(real_redis) as base,
        worker(redis_server, "arq:queue", 4),
        worker(redis_server, SLOW_QUEUE, 2),
        async_playwright() as driver,
    ):
        browser = await driver.chromium.launch(
            executable_path=chromium,
            args=["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"],
        )
        try:
            page = await browser.new_page(viewport={"width": 1280, "height": 760})
            errors: list[str] = []
            page.on("pageerror", lambda e: errors.append(str(e)))

            def console(message: Any) -> None:
                # A poll may see its group go (a 404 the page handles); anything else is a bug.
                polled = "/api/" in str(message.location.get("url", ""))
                if message.type == "error" and not polled:
                    errors.append(f"{message.text} at {message.location}")

            page.on("console", console)

            # Groups list: the running group's figures come in live.
            await page.goto(base + "/")
            await expect(page.get_by_role("link", name="Nightly photo import")).to_be_visible()
            row = page.locator("tr", has=page.get_by_role("link", name="Thumbnails for November"))
            await expect(row.locator("[data-live$='.progress.finished']")).to_have_text("4", timeout=15_000)
            await shoot(page, shots, "groups.png")

            # Group page of the running group, then the pending one.
            await page.get_by_role("link", name="Thumbnails for November").click()
            await expect(page.locator("h1")).to_have_text("Thumbnails for November")
            await expect(page.locator("[data-live='by_number.1.progress.running']")).to_have_text("2")
            await shoot(page, shots, "group.png")
            await page.get_by_role("link", name="Groups", exact=True).click()
            await page.get_by_role("link", name="Nightly photo import").click()
            await expect(page.locator("h1")).to_have_text("Nightly photo import")

            # Stage 1 is pending; a job of it offers no Queue Job (it would run early).
            await page.get_by_role("link", name="Stage 1", exact=True).click()
            await expect(page.locator("h1")).to_have_text("Stage 1")
            await expect(page.locator("td[data-live='status']")).to_have_text("pending")
            await page.get_by_role("link", name="resize", exact=True).first.click()
            await expect(page.get_by_role("button", name="Delete Job")).to_be_visible()
            await expect(page.get_by_role("button", name="Queue Job")).to_have_count(0)
            await page.get_by_role("link", name="Stage 1", exact=True).click()

            # Initiate: the stage runs and the page follows it to the end without a click.
            await page.get_by_role("button", name="Initiate").click()
            await expect(page.locator(".flash")).to_contain_text("Initiated stage 1")
            await expect(page.locator("td[data-live='status']")).to_have_text("complete", timeout=20_000)
            await expect(page.locator(".badge", has_text="successful")).to_have_count(6)
            await expect(page.get_by_text("resized photo 5 to large")).to_be_visible()
            assert await (await photos.stage(1)).status() is astages.StageStatus.COMPLETE
            await shoot(page, shots, "stage.png")

            # A finished job shows arq's record: its try and result.
            await page.get_by_role("link", name="resize", exact=True).first.click()
            await expect(page.locator("h1")).to_have_text("resize")
            await expect(page.get_by_text("'photo-0-large.jpg'")).to_be_visible()
            await shoot(page, shots, "job.png")

            # The running group's stage page shows a failed job's error on its job page.
            await page.goto(f"{base}/groups/{thumbs.id}/stages/1?status=failed")
            await page.get_by_role("link", name="thumbnail", exact=True).first.click()
            await expect(page.locator("pre.error").first).to_contain_text("ValueError: photo 2 is not an image")

            # Delete asks first: dismissed, nothing happens; accepted, the job goes.
            await page.goto(f"{base}/groups/{photos.id}/stages/2")
            await page.get_by_role("link", name="summarise", exact=True).click()
            page.once("dialog", lambda dialog: asyncio.ensure_future(dialog.dismiss()))
            await page.get_by_role("button", name="Delete Job").click()
            await expect(page.locator("h1")).to_have_text("summarise")
            page.once("dialog", lambda dialog: asyncio.ensure_future(dialog.accept()))
            await page.get_by_role("button", name="Delete Job").click()
            # It was the group's last open job: the group finished, so the list is shown.
            await expect(page.locator(".flash")).to_contain_text("Deleted job summarise")
            await expect(page.locator(".flash")).to_contain_text("the group finished")
            await expect(page.locator("h1")).to_have_text("Staged groups")
            assert not await photos.exists()
            # Live figures: the running group's page follows its jobs without reloading.
            # Its timeline gains the new events as they happen.
            await page.goto(f"{base}/groups/{thumbs.id}")
            await page.evaluate("window.notReloaded = true")
            timeline = page.locator(".timeline")
            await expect(timeline.get_by_role("link", name="stage 2", exact=True)).to_have_count(0)
            RELEASE["thumbnails"].set()
            await expect(page.locator("[data-live='by_number.1.status']")).to_have_text("complete", timeout=15_000)
            await expect(page.locator("[data-live='by_number.1.progress.successful']")).to_have_text("7")
            await expect(page.locator("[data-live='by_number.2.progress.queued']")).to_have_text("1")
            await expect(timeline.get_by_role("link", name="stage 2", exact=True)).to_have_count(1)
            await expect(timeline.locator("tr", has_text="photo 2 is not an image")).to_have_count(1)
            assert await page.evaluate("window.notReloaded === true")

            # Cancel Group (it asks first): the kept group shows its outcome, failed job linked.
            page.once("dialog", lambda dialog: asyncio.ensure_future(dialog.accept()))
            await page.get_by_role("button", name="Cancel Group").click()
            await expect(page.locator(".flash")).to_contain_text("1 job cancelled; the group ended (cancelled)")
            await expect(page.locator(".outcome h2 .badge")).to_have_text("cancelled")
            await expect(page.locator(".failed-jobs a")).to_have_count(1)
            assert await thumbs.status() is astages.GroupStatus.CANCELLED
            await shoot(page, shots, "group-ended.png")
            assert errors == []
        finally:
            RELEASE["thumbnails"].set()
            await browser.close()


async def test_operations_view_search_filter_and_dark_mode_in_chromium(
    real_redis: ArqRedis, redis_server: Any, chromium: str, shots: Path
) -> None:
    """Operations view in Chromium: a queue, its live worker, a throughput chart that follows new
    samples; the groups list's search, status filter and failed column; dark mode from the system."""
    RELEASE["thumbnails"] = asyncio.Event()
    photos, thumbs = await make_groups(real_redis)
    sweeper = Sweeper(real_redis)
    await sweeper.sweep()  # the first sample: nothing finished yet
    async with (
        server(real_redis) as base,
        worker(redis_server, SLOW_QUEUE, 2),
        async_playwright() as driver,
    ):
        progress = (await thumbs.stage(1)).progress

        async def four_finished() -> bool:
            return (await progress()).finished == 4

        await wait_for(four_finished, 15, "thumbnails 0-3 to finish")
        await sweeper.sweep()  # the second: 3 successful, 1 failed since the first
        browser = await driver.chromium.launch(
            executable_path=chromium,
            args=["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"],
        )
        try:
            page = await browser.new_page(viewport={"width": 1280, "height": 900})
            errors: list[str] = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)

            # The groups list: the thumbnails group shows its failure; the pending one none.
            await page.goto(base + "/")
            thumbs_row = page.locator("tr", has=page.get_by_role("link", name="Thumbnails for November"))
            await expect(thumbs_row.locator(".fails")).to_have_text("1")
            await expect(thumbs_row.locator(".with-failures")).to_be_visible()
            await expect(thumbs_row.locator(".seg-failed")).to_have_count(1)
            photos_row = page.locator("tr", has=page.get_by_role("link", name="Nightly photo import"))
            await expect(photos_row.locator(".with-failures")).to_be_hidden()

            # Search by description, then by id; the status filter.
            await page.get_by_role("searchbox", name="Search groups by description or id").fill("thumbNAILS")
            await page.get_by_role("button", name="Search").click()
            await expect(page).to_have_url(re.compile(r"q=thumbNAILS"))
            await expect(page.get_by_role("link", name="Thumbnails for November")).to_be_visible()
            await expect(page.get_by_role("link", name="Nightly photo import")).to_have_count(0)
            await page.get_by_role("searchbox", name="Search groups by description or id").fill(photos.id[-8:])
            await page.get_by_role("button", name="Search").click()
            await expect(page.get_by_role("link", name="Nightly photo import")).to_be_visible()
            await expect(page.get_by_role("link", name="Thumbnails for November")).to_have_count(0)
            await page.get_by_role("link", name="clear search").click()
            await page.get_by_role("link", name="pending", exact=True).click()
            await expect(page).to_have_url(re.compile(r"status=pending"))
            await expect(page.get_by_role("link", name="Nightly photo import")).to_be_visible()
            await expect(page.get_by_role("link", name="Thumbnails for November")).to_have_count(0)
            await page.get_by_role("link", name="running", exact=True).click()
            await expect(page.get_by_role("link", name="Thumbnails for November")).to_be_visible()
            await expect(page.get_by_role("link", name="Nightly photo import")).to_have_count(0)

            # The operations view: the thumbnails queue, its live worker, the chart.
            await page.get_by_role("link", name="Operations").click()
            await expect(page.locator("h1")).to_have_text("Operations")
            queue = page.locator(f'tr[data-queue="{SLOW_QUEUE}"]')
            await expect(queue).to_be_visible()
            await expect(queue.locator("[data-live$='.jobs']")).to_have_text("4")  # 4 and 5 run, 6 and 7 wait
            await expect(queue.locator("[data-live$='.due']")).to_have_text("4")
            await expect(queue.locator(".badge")).to_have_text("alive")
            idle = page.locator(f'tr[data-queue="{IDLE_QUEUE}"]')
            await expect(idle).to_have_count(0)  # no running stage sends there
            await expect(page.locator(f'tr[data-worker="{SLOW_QUEUE}"] code.report')).to_contain_text("j_ongoing=")
            successful = page.locator("polyline.line-successful")
            assert len((await successful.get_attribute("points") or "").split()) == 2
            box = await page.locator("svg.rates").bounding_box()
            assert box is not None and box["height"] > 100 and box["width"] > 600
            await shoot(page, shots, "ops.png")

            # A new sample reaches the open page: the chart gains an interval without a reload.
            await page.evaluate("window.notReloaded = true")
            RELEASE["thumbnails"].set()

            async def stage_done() -> bool:
                return (await progress()).finished == 8

            await wait_for(stage_done, 15, "the thumbnails to finish")
            await sweeper.sweep()
            await expect(successful).to_have_attribute("points", re.compile(r"^(\S+ ){3}\S+$"), timeout=10_000)
            assert await page.evaluate("window.notReloaded === true")

            # Dark mode follows the system's setting.
            light = await page.evaluate("getComputedStyle(document.documentElement).backgroundColor")
            await page.emulate_media(color_scheme="dark")
            dark = await page.evaluate("getComputedStyle(document.documentElement).backgroundColor")
            assert light == "rgb(246, 247, 249)" and dark == "rgb(17, 20, 27)"
            card = await page.evaluate("getComputedStyle(document.querySelector('.chart')).backgroundColor")
            assert card == "rgb(26, 31, 43)"
            await shoot(page, shots, "ops-dark.png")
            assert errors == []
        finally:
            RELEASE["thumbnails"].set()
            await browser.close()
