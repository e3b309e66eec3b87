"""Every page and its JSON twin: content, sorting, pagination, escaping, 404s."""

from __future__ import annotations

import re

import httpx
from arq.connections import ArqRedis
from helpers import start_unsent

import astages
from web.helpers import XSS, make_sample, work


async def _keys(redis: ArqRedis) -> list[bytes]:
    return sorted(await redis.keys("*"))


async def test_groups_list_shows_each_group(client: httpx.AsyncClient, redis: ArqRedis) -> None:
    """The groups list names each group with its stages, age and progress."""
    sample = await make_sample(redis)
    page = await client.get("/")
    assert page.status_code == 200
    assert "nightly import" in page.text
    assert f'href="/groups/{sample.running.id}"' in page.text
    assert "just now" in page.text
    assert "0</span>\n        / <span" in page.text or "/ <span" in page.text
    assert "Delete All Groups" in page.text and "Cleanup Jobs" in page.text and "Purge" in page.text
    assert page.headers["content-security-policy"].startswith("default-src 'none'")


async def test_every_value_is_escaped(client: httpx.AsyncClient, redis: ArqRedis) -> None:
    """A description, argument or message with markup is shown as text on every page."""
    sample = await make_sample(redis)
    job = (await (await sample.pending.stage(1)).jobs())[0]
    await job.set_status_message(XSS)
    assert job.ref is not None
    pages = [
        "/",
        f"/groups/{sample.pending.id}",
        f"/groups/{sample.pending.id}/stages/1",
        f"/groups/{sample.pending.id}/stages/1/jobs/{job.ref.seq}",
        f"/groups/{sample.running.id}/stages/2",
    ]
    for path in pages:
        page = await client.get(path)
        assert page.status_code == 200, path
        assert XSS not in page.text, path
        assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page.text, path


async def test_unknown_ids_give_404_and_create_nothing(client: httpx.AsyncClient, redis: ArqRedis) -> None:
    """An unknown group, stage or job is a 404 page (or JSON 404), and looking writes nothing."""
    sample = await make_sample(redis)
    before = await _keys(redis)
    gid = sample.running.id
    for path in [
        "/groups/nope",
        f"/groups/{gid}/stages/7",
        f"/groups/{gid}/stages/x",
        f"/groups/{gid}/stages/1/jobs/999",
        f"/groups/{gid}/stages/1/jobs/x",
        "/groups/nope/stages/1/jobs/0",
        "/no/such/page",
    ]:
        page = await client.get(path)
        assert page.status_code == 404, path
        assert "Not found" in page.text
    assert "There is no group &#39;nope&#39;" in (await client.get("/groups/nope")).text
    assert "has no stage 7." in (await client.get(f"/groups/{gid}/stages/7")).text
    for path in ["/api/groups/nope", f"/api/groups/{gid}/stages/7", f"/api/groups/{gid}/stages/1/jobs/999"]:
        reply = await client.get(path)
        assert reply.status_code == 404
        assert reply.json()["error"] == "not_found"
    assert await _keys(redis) == before


async def test_group_page_lists_stages_with_progress(client: httpx.AsyncClient, redis: ArqRedis) -> None:
    """The group page shows each stage's status, job count and counts per status."""
    sample = await make_sample(redis, jobs=4)
    page = await client.get(f"/groups/{sample.running.id}")
    assert page.status_code == 200
    assert "Stage 1" in page.text and "Stage 2" in page.text
    assert "Initiate Group" in page.text
    data = (await client.get(f"/api/groups/{sample.running.id}")).json()
    assert data["status"] == "running"
    assert data["live"] is True
    assert [(s["number"], s["status"], s["num_jobs"]) for s in data["stages"]] == [(1, "running", 4), (2, "pending", 1)]
    assert data["stages"][0]["progress"]["queued"] == 4
    assert data["current_stage"] == 1


async def test_stage_page_and_job_page(client: httpx.AsyncClient, redis: ArqRedis) -> None:
    """The stage page lists its jobs with links; the job page shows the job and arq's view."""
    sample = await make_sample(redis, jobs=3)
    gid = sample.running.id
    page = await client.get(f"/groups/{gid}/stages/1")
    assert page.status_code == 200
    links = re.findall(rf'href="(/groups/{gid}/stages/1/jobs/\d+)"', page.text)
    assert len(links) == 3
    assert "Initiate" in page.text and "Delete" in page.text
    job_page = await client.get(links[0])
    assert job_page.status_code == 200
    assert "work" in job_page.text and "&#39;photo&#39;" in job_page.text
    assert "arq's record" in job_page.text
    assert "Queue Job" not in job_page.text  # queued already
    assert 'data-live-url="/api/groups/' in job_page.text
    data = (await client.get("/api" + links[0])).json()
    assert data["status"] == "queued"
    assert data["arq"]["status"] == "queued"
    assert data["function"] == "work"
    assert data["args"] == [0, "photo"]


async def test_queue_job_button_only_when_pending(client: httpx.AsyncClient, redis: ArqRedis) -> None:
    """A pending job's page offers Queue Job once its stage runs; a pending stage offers Initiate."""
    sample = await make_sample(redis)
    job = (await (await sample.pending.stage(1)).jobs())[0]
    assert job.ref is not None
    page = await client.get(f"/groups/{sample.pending.id}/stages/1/jobs/{job.ref.seq}")
    assert "Queue Job" not in page.text and "Delete Job" in page.text  # its stage has not started
    await start_unsent(sample.pending, 1)
    page = await client.get(f"/groups/{sample.pending.id}/stages/1/jobs/{job.ref.seq}")
    assert "Queue Job" in page.text and "Delete Job" in page.text
    assert "data-live-url" not in page.text  # nothing to follow until it is sent
    data = (await client.get(f"/api/groups/{sample.pending.id}/stages/1/jobs/{job.ref.seq}")).json()
    assert data["arq"]["status"] == "not_found"
    assert data["kwargs"] == {}


async def test_groups_sort_and_paginate(fake_client: httpx.AsyncClient, fake_redis: ArqRedis) -> None:
    """The groups list sorts by each column both ways and pages 20 at a time."""
    for i in range(45):
        group = await astages.StagedGroup.create(fake_redis, f"group {i:02d}")
        for n in range(1, 1 + i % 4):
            await (await group.stage(n)).enqueue(work, n)
    first = (await fake_client.get("/api/groups")).json()
    assert first["total"] == 45 and first["pages"] == 3 and len(first["groups"]) == 20
    assert first["groups"][0]["description"] == "group 44"  # newest first
    last = (await fake_client.get("/api/groups?page=3")).json()
    assert len(last["groups"]) == 5 and last["groups"][-1]["description"] == "group 00"
    by_description = (await fake_client.get("/api/groups?sort=description")).json()
    assert [g["description"] for g in by_description["groups"]][:3] == ["group 00", "group 01", "group 02"]
    desc = (await fake_client.get("/api/groups?sort=description&order=desc&page=2")).json()
    assert desc["groups"][0]["description"] == "group 24"
    stages = (await fake_client.get("/api/groups?sort=stages&order=desc")).json()
    assert {g["num_stages"] for g in stages["groups"]} == {3, 2}
    oldest = (await fake_client.get("/api/groups?sort=created&order=asc")).json()
    assert oldest["groups"][0]["description"] == "group 00"
    progress = (await fake_client.get("/api/groups?sort=progress")).json()
    assert progress["groups"][0]["progress"]["percent"] == 0
    page = await fake_client.get("/?page=2")
    for label in ("First", "Prev", "Next", "Last"):
        assert f">{label}</a>" in page.text
    assert 'aria-current="page">2<' in page.text
    assert "?sort=description&amp;order=asc" in page.text
    flipped = await fake_client.get("/?sort=description&order=asc")
    assert "?sort=description&amp;order=desc" in flipped.text
    beyond = (await fake_client.get("/api/groups?page=99")).json()
    assert beyond["page"] == 3


async def test_stage_sorts_filters_and_pages(fake_client: httpx.AsyncClient, fake_redis: ArqRedis) -> None:
    """A stage's jobs page by 50, sort by queue time, function, status or message, and filter by status."""
    group = await astages.StagedGroup.create(fake_redis, "big")
    stage = await group.stage(1)
    jobs = await stage.enqueue_many([("beta" if i % 2 else "alpha", (i,)) for i in range(120)])
    await start_unsent(group, 1, send=7)  # 7 queued, the rest pending
    for job in jobs[100:103]:
        await job.set_status_message(f"zz {job.args[0]}")
    base = f"/api/groups/{group.id}/stages/1"
    page1 = (await fake_client.get(base)).json()
    assert page1["pages"] == 3 and len(page1["jobs"]) == 50 and page1["jobs"][0]["index"] == 0
    page3 = (await fake_client.get(base + "?page=3")).json()
    assert [j["index"] for j in page3["jobs"]] == list(range(100, 120))
    newest = (await fake_client.get(base + "?order=desc")).json()
    assert newest["jobs"][0]["index"] == 119
    by_function = (await fake_client.get(base + "?sort=function")).json()
    assert {j["function"] for j in by_function["jobs"]} == {"alpha"}
    by_function_desc = (await fake_client.get(base + "?sort=function&order=desc")).json()
    assert by_function_desc["jobs"][0]["function"] == "beta"
    by_status = (await fake_client.get(base + "?sort=status&order=desc")).json()
    assert [j["status"] for j in by_status["jobs"][:7]] == ["queued"] * 7
    by_message = (await fake_client.get(base + "?sort=message&order=desc")).json()
    assert [j["message"] for j in by_message["jobs"][:3]] == ["zz 102", "zz 101", "zz 100"]
    queued = (await fake_client.get(base + "?status=queued")).json()
    assert queued["matches"] == 7 and [j["index"] for j in queued["jobs"]] == list(range(7))
    assert queued["next_after"] is None
    pending = (await fake_client.get(base + "?status=pending")).json()
    assert pending["matches"] == 113 and pending["jobs"][0]["index"] == 7 and len(pending["jobs"]) == 50
    following = (await fake_client.get(base + f"?status=pending&after={pending['next_after']}")).json()
    assert following["jobs"][0]["index"] == 57
    back = (await fake_client.get(base + f"?status=pending&before={following['prev_before']}")).json()
    assert [j["index"] for j in back["jobs"]] == [j["index"] for j in pending["jobs"]]
    last = (await fake_client.get(base + "?status=pending&before=120")).json()
    assert last["jobs"][-1]["index"] == 119 and len(last["jobs"]) == 50
    failed = (await fake_client.get(base + "?status=failed")).json()
    assert failed["matches"] == 0 and failed["jobs"] == []
    html_page = await fake_client.get(f"/groups/{group.id}/stages/1?status=pending")
    assert "113</b>" in html_page.text and 'rel="next"' in html_page.text


async def test_stage_window_note(fake_client: httpx.AsyncClient, fake_redis: ArqRedis) -> None:
    """Sorting a stage bigger than the window says which jobs it sorted, and links the next window."""
    group = await astages.StagedGroup.create(fake_redis, "windowed")
    stage = await group.stage(1)
    await stage.enqueue_many([("f", (i,)) for i in range(1_200)])
    page = await fake_client.get(f"/groups/{group.id}/stages/1?sort=status")
    assert "Sorted within jobs #1 to #1,000 of 1,200" in page.text
    assert "window=1" in page.text
    second = (await fake_client.get(f"/api/groups/{group.id}/stages/1?sort=status&window=1")).json()
    assert second["window"] == {"index": 1, "count": 2, "start": 1000, "end": 1200}
    assert second["jobs"][0]["index"] == 1000


async def test_static_files_and_live_url(fake_client: httpx.AsyncClient, fake_redis: ArqRedis) -> None:
    """Pages with running work name their JSON URL for polling; the CSS and script are served."""
    sample = await make_sample(fake_redis)
    running = await fake_client.get(f"/groups/{sample.running.id}/stages/1")
    assert f'data-live-url="/api/groups/{sample.running.id}/stages/1"' in running.text
    pending = await fake_client.get(f"/groups/{sample.pending.id}/stages/1")
    assert "data-live-url" not in pending.text
    for name in ("astages.css", "astages.js"):
        assert (await fake_client.get(f"/static/{name}")).status_code == 200


async def test_a_job_with_an_unreadable_spec_does_not_hide_its_stage(
    client: httpx.AsyncClient, redis: ArqRedis
) -> None:
    """A stage holding a job whose stored spec cannot be read (planted, or another
    version's) still lists its jobs, that one as unreadable, in every view (the page
    answered 404 for the whole stage); the job's own page says it is not readable."""
    group = await astages.StagedGroup.create(redis, "planted")
    jobs = await group.stage(1).enqueue_many([(work, (i, "photo")) for i in range(3)])
    assert jobs[1].ref is not None
    await redis.hset(group.store.keys.stage_part(group.id, 1, "spec"), str(jobs[1].ref.seq), b"garbage")
    base = f"/groups/{group.id}/stages/1"
    for query in ("", "?order=desc", "?sort=function"):
        page = await client.get(base + query)
        assert page.status_code == 200, query
        assert "(unreadable spec)" in page.text and page.text.count(">work<") == 2, query
    data = (await client.get("/api" + base)).json()
    assert [j["function"] for j in data["jobs"]] == ["work", "(unreadable spec)", "work"]
    assert (await client.get(f"{base}/jobs/{jobs[1].ref.seq}")).status_code == 404
