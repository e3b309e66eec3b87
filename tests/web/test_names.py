"""Stage names and counted words on the dashboard (issue 12)."""

from __future__ import annotations

import httpx
from arq.connections import ArqRedis

import astages
from web.helpers import XSS, work


async def _named(redis: ArqRedis, keep_for: float = 0) -> astages.StagedGroup:
    group = await astages.StagedGroup.create(redis, "named", keep_for=keep_for)
    await group.stage(1, name="fetch").enqueue(work, 1)
    await group.stage(2, name=XSS).enqueue_many([(work, (2,)), (work, (3,))])
    await group.stage(3).enqueue(work, 4)
    await group.initiate()
    return group


async def test_group_and_stage_pages_show_stage_names(client: httpx.AsyncClient, redis: ArqRedis) -> None:
    """The group page, stage page and their JSON show a stage's name (escaped); an unnamed stage shows none."""
    group = await _named(redis)
    page = (await client.get(f"/groups/{group.id}")).text
    assert 'Stage 1</a> <span class="stage-name">fetch</span>' in page
    assert XSS not in page and 'Stage 2</a> <span class="stage-name">&lt;script&gt;' in page
    assert "Stage 3</a></td>" in page
    stage = (await client.get(f"/groups/{group.id}/stages/1")).text
    assert '<h1>Stage 1 <span class="stage-name">fetch</span></h1>' in stage
    assert "<title>Stage 1 (fetch) · named" in stage
    data = (await client.get(f"/api/groups/{group.id}")).json()
    assert [s["name"] for s in data["stages"]] == ["fetch", XSS, None]
    assert (await client.get(f"/api/groups/{group.id}/stages/1")).json()["name"] == "fetch"
    assert (await client.get(f"/api/groups/{group.id}/stages/3")).json()["name"] is None


async def test_groups_list_names_the_current_stage(client: httpx.AsyncClient, redis: ArqRedis) -> None:
    """The groups list names the current stage after its number, and its JSON has current_stage_name."""
    group = await _named(redis)
    page = (await client.get("/")).text
    assert f'{group.id}.current_stage">1</span> <span class="stage-name">fetch</span>' in page
    rows = (await client.get("/api/groups")).json()["groups"]
    assert [r["current_stage_name"] for r in rows] == ["fetch"]


async def test_kept_summary_and_timeline_show_stage_names(client: httpx.AsyncClient, redis: ArqRedis) -> None:
    """An ended, kept group's summary table and its stage events name the stages."""
    group = await _named(redis, keep_for=60)
    await group.cancel()
    page = (await client.get(f"/groups/{group.id}")).text
    assert page.count('Stage 1</a> <span class="stage-name">fetch</span>') == 2  # summary table and stage table
    assert "stage 1 (fetch)" in page  # the timeline's stage events
    data = (await client.get(f"/api/groups/{group.id}")).json()
    assert [s["name"] for s in data["summary"]["stages"]] == ["fetch", XSS, None]


async def test_counts_take_the_singular_for_one(client: httpx.AsyncClient, redis: ArqRedis) -> None:
    """One job or retry reads "1 job" / "1 retry" (kept right by the live update), never "1 jobs"."""
    group = await astages.StagedGroup.create(redis, "single")
    await group.stage(1).enqueue(work, 1)
    listed = (await client.get("/")).text
    assert 'data-one="job" data-many="jobs">job</span>' in listed and "</span> jobs" not in listed
    page = (await client.get(f"/groups/{group.id}")).text
    assert "0 of 1 job finished" in page
    stage = (await client.get(f"/groups/{group.id}/stages/1")).text
    assert 'data-one="retry" data-many="retries">retries</span>' in stage  # 0 retries
    script = (await client.get("/static/astages.js")).text
    assert "data-live-plural" in script
