"""Cancellation, kept groups and the event timeline on the dashboard: Cancel Group and
Cancel Stage, the cancelled status everywhere, an ended group's summary, stage durations,
and the timeline page by page (HTML and ``/api/groups/<id>/events``)."""

from __future__ import annotations

import re
from typing import Any

import httpx
from arq import func
from arq.connections import ArqRedis
from helpers import run_burst

import astages
from astages import GroupStatus, JobStatus, StageStatus
from web.helpers import XSS, csrf_of, flash_of, make_sample, post_form, work


async def _follow(client: httpx.AsyncClient, reply: httpx.Response) -> httpx.Response:
    assert reply.status_code == 303, reply.text
    return await client.get(reply.headers["location"])


async def flaky(ctx: dict[str, Any], index: int) -> int:
    """Fails for odd indexes, with markup in its error."""
    await astages.StagedJob.perform_job(ctx, index)
    if index % 2:
        raise ValueError(f"bad {index} {XSS}")
    return index


async def _kept(redis: ArqRedis, jobs: int = 3, **options: Any) -> astages.StagedGroup:
    """A running group kept for an hour after it ends: stage 1 (``jobs`` jobs), stage 2 (one)."""
    group = await astages.StagedGroup.create(redis, "kept import", keep_for=3600, **options)
    await (await group.stage(1)).enqueue_many([(work, (i,)) for i in range(jobs)])
    await (await group.stage(2)).enqueue(work, 99)
    await group.initiate()
    return group


async def test_cancel_group_counts_jobs_and_says_it_ended(client: httpx.AsyncClient, redis: ArqRedis) -> None:
    """Cancel Group asks first, cancels every unfinished job, says how many and that the group ended."""
    sample = await make_sample(redis, jobs=5)
    page = f"/groups/{sample.running.id}"
    shown = await client.get(page)
    assert "Cancel Group" in shown.text
    asked = await post_form(client, page, page + "/cancel", confirmed=False)
    assert asked.status_code == 200 and "Are you sure?" in asked.text and "Cancel this group?" in asked.text
    assert await sample.running.status() is GroupStatus.RUNNING
    reply = await post_form(client, page, page + "/cancel")
    assert reply.headers["location"] == "/"  # not kept: the group is gone
    message = flash_of((await _follow(client, reply)).text)
    assert message == (
        "Cancelled group 'nightly import': 6 jobs cancelled; the group ended (cancelled) and was deleted."
    )
    assert not await sample.running.exists()
    assert not await redis.zcard("arq:queue")  # the queued jobs left arq's queue


async def test_cancelled_group_kept_shows_its_outcome(client: httpx.AsyncClient, redis: ArqRedis) -> None:
    """A cancelled group kept with keep_for stays on its page: cancelled, with its summary, without Cancel."""
    group = await _kept(redis, jobs=3)
    page = f"/groups/{group.id}"
    reply = await post_form(client, page, page + "/cancel")
    assert reply.headers["location"] == page
    shown = await _follow(client, reply)
    assert flash_of(shown.text) == (
        "Cancelled group 'kept import': 4 jobs cancelled; the group ended (cancelled) and is kept, readable, "
        "until it expires."
    )
    assert '<span class="badge st-cancelled" data-live="status" data-badge>cancelled</span>' in shown.text
    assert 'class="outcome outcome-cancelled"' in shown.text
    assert "<b>4</b> cancelled" in shown.text
    assert "Cancel Group" not in shown.text and "Initiate Group" not in shown.text
    assert "data-live-url" not in shown.text  # nothing runs any more
    data = (await client.get("/api" + page)).json()
    assert data["status"] == "cancelled" and data["ended"] is True and data["live"] is False
    assert data["summary"]["outcome"] == "cancelled"
    assert [(s["number"], s["status"], s["cancelled"]) for s in data["summary"]["stages"]] == [
        (1, "cancelled", 3),
        (2, "cancelled", 1),
    ]
    assert [(s["number"], s["progress"]["cancelled"]) for s in data["stages"]] == [(1, 3), (2, 1)]
    listed = (await client.get("/api/groups")).json()
    assert [(g["id"], g["status"], g["progress"]["cancelled"]) for g in listed["groups"]] == [
        (group.id, "cancelled", 4)
    ]
    again = await post_form(client, page, page + "/cancel")
    assert flash_of((await _follow(client, again)).text) == (
        "Nothing done: group 'kept import' had already ended (cancelled)."
    )


async def test_cancel_stage_moves_the_group_on(client: httpx.AsyncClient, redis: ArqRedis) -> None:
    """Cancel Stage cancels a running stage's jobs, says how many and which stage runs next."""
    sample = await make_sample(redis, jobs=5)
    gid = sample.running.id
    page = f"/groups/{gid}/stages/1"
    shown = await client.get(page)
    assert "Cancel Stage" in shown.text and "Initiate" in shown.text
    asked = await post_form(client, page, page + "/cancel", confirmed=False)
    assert "Cancel this stage?" in asked.text
    reply = await post_form(client, page, page + "/cancel")
    assert reply.headers["location"] == page
    after = await _follow(client, reply)
    assert flash_of(after.text) == "Cancelled stage 1: 5 jobs cancelled; stage 2 is running."
    assert "Cancel Stage" not in after.text and ">Initiate<" not in after.text
    assert re.search(r'st-cancelled[^"]*" href="[^"]*status=cancelled">cancelled <b[^>]*>5</b>', after.text)
    assert await (await sample.running.get_stage(2)).status() is StageStatus.RUNNING
    filtered = (await client.get(f"/api{page}?status=cancelled")).json()
    assert filtered["matches"] == 5 and {j["status"] for j in filtered["jobs"]} == {"cancelled"}
    assert filtered["status"] == "cancelled" and filtered["finished"] is not None
    job_page = await client.get(f"/groups/{gid}/stages/1/jobs/{filtered['jobs'][0]['seq']}")
    assert '<span class="badge st-cancelled" data-live="status" data-badge>cancelled</span>' in job_page.text
    assert "Queue Job" not in job_page.text
    group_page = await client.get(f"/groups/{gid}")
    assert 'data-live="by_number.1.progress.cancelled" data-format="number">5</td>' in group_page.text

    # Cancelling the last stage ends the group (complete: its stages all ended) and deletes it.
    last = f"/groups/{gid}/stages/2"
    reply = await post_form(client, last, last + "/cancel")
    assert reply.headers["location"] == "/"
    assert flash_of((await _follow(client, reply)).text) == (
        "Cancelled stage 2: 1 job cancelled; the group ended (complete) and was deleted."
    )


async def test_cancel_stage_of_a_pending_group(client: httpx.AsyncClient, redis: ArqRedis) -> None:
    """Cancel Stage on a group never initiated cancels that stage only; a cancelled stage offers neither button."""
    sample = await make_sample(redis)
    page = f"/groups/{sample.pending.id}/stages/1"
    reply = await post_form(client, page, page + "/cancel")
    assert flash_of((await _follow(client, reply)).text) == (
        "Cancelled stage 1: 1 job cancelled; the group is still pending (not initiated)."
    )
    assert await sample.pending.status() is GroupStatus.PENDING
    again = await post_form(client, page, page + "/cancel")
    message = flash_of((await _follow(client, again)).text) or ""
    assert message.startswith("Nothing done:") and "cancelled" in message


async def test_cancel_refuses_without_token_and_gone_ids(fake_client: httpx.AsyncClient, fake_redis: ArqRedis) -> None:
    """Cancel needs a valid token; cancelling a gone group or stage does nothing and says so."""
    sample = await make_sample(fake_redis)
    gid = sample.running.id
    for action in (f"/groups/{gid}/cancel", f"/groups/{gid}/stages/1/cancel"):
        refused = await fake_client.post(action, data={"confirmed": "1", "csrf": "forged"})
        assert refused.status_code == 403
        assert (await fake_client.get(action)).status_code == 405
    assert await sample.running.status() is GroupStatus.RUNNING
    token = csrf_of((await fake_client.get("/")).text)
    for action in (f"/groups/{gid}/stages/7/cancel", "/groups/nope/cancel", f"/groups/{gid}/stages/x/cancel"):
        reply = await fake_client.post(action, data={"csrf": token, "confirmed": "1", "next": "/"})
        message = flash_of((await _follow(fake_client, reply)).text) or ""
        assert message.startswith("Nothing done:") and "no longer exists" in message, action


async def test_ended_group_summary_links_failed_jobs(client: httpx.AsyncClient, redis: ArqRedis) -> None:
    """A kept group that ended complete shows its per-stage counts and its failed jobs as links."""
    group = await astages.StagedGroup.create(redis, "kept", keep_for=3600)
    await (await group.stage(1)).enqueue_many([(flaky, (i,)) for i in range(4)])
    await group.initiate()
    await run_burst(redis, [func(flaky, max_tries=1)])
    assert await group.status() is GroupStatus.COMPLETE
    page = await client.get(f"/groups/{group.id}")
    assert page.status_code == 200
    assert 'class="outcome outcome-complete"' in page.text
    assert "<b>2</b> successful · <b>2</b> failed · <b>0</b> cancelled" in page.text
    links = re.findall(rf'<li><a href="(/groups/{group.id}/stages/1/jobs/\d+)"><code>astages:', page.text)
    assert len(links) == 2
    for link in links:
        job = (await client.get("/api" + link)).json()
        assert job["status"] == JobStatus.FAILED.value
    assert XSS not in page.text and "bad 1 &lt;script&gt;" in page.text  # the timeline's error, escaped
    durations = (await client.get(f"/api/groups/{group.id}")).json()
    assert durations["stages"][0]["duration_seconds"] >= 0 and durations["stages"][0]["finished"] is not None
    assert durations["summary"]["failed_jobs"][0].startswith(f"astages:{group.id}:1:")


async def test_stage_durations_on_group_and_stage_pages(client: httpx.AsyncClient, redis: ArqRedis) -> None:
    """The group and stage pages show when a stage started and how long it has run; a pending one shows none."""
    sample = await make_sample(redis)
    gid = sample.running.id
    data = (await client.get(f"/api/groups/{gid}")).json()
    running, pending = data["stages"]
    assert running["started"] is not None and running["duration_seconds"] >= 0 and running["duration"].endswith("s")
    assert pending["started"] is None and pending["duration"] == "—"
    page = await client.get(f"/groups/{gid}")
    assert 'data-live="by_number.1.duration"' in page.text
    stage = await client.get(f"/groups/{gid}/stages/1")
    assert "<th>Started</th>" in stage.text and 'data-live="duration"' in stage.text
    pending_stage = await client.get(f"/groups/{gid}/stages/2")
    assert "not yet" in pending_stage.text
    assert (await client.get(f"/api/groups/{gid}/stages/1")).json()["started"] == running["started"]


async def test_timeline_pages_by_stream_id(fake_client: httpx.AsyncClient, fake_redis: ArqRedis) -> None:
    """The timeline lists events oldest first, pages forward with after=, and offers Newer, Latest and Earliest."""
    group = await astages.StagedGroup.create(fake_redis, "timeline")
    stage = await group.stage(1)
    jobs = await stage.enqueue_many([(work, (i,)) for i in range(60)])
    await group.initiate()  # one stage event
    for job in jobs[:55]:
        await job.delete()  # one event each
    api = f"/api/groups/{group.id}/events"
    first = (await fake_client.get(api)).json()
    assert first["count"] == 50 and first["more"] is True and first["after"] is None
    assert first["events"][0]["kind"] == "stage" and first["events"][0]["to"] == "running"
    assert first["events"][0]["note"] == "60 jobs" and first["events"][0]["url"] == f"/groups/{group.id}/stages/1"
    deleted = first["events"][1]
    assert (deleted["kind"], deleted["from"], deleted["to"], deleted["label"]) == (
        "job",
        "queued",
        "deleted",
        f"stage 1 · job {jobs[0].ref.seq if jobs[0].ref else None}",
    )
    assert deleted["url"] == f"/groups/{group.id}/stages/1/jobs/{deleted['seq']}"
    second = (await fake_client.get(api, params={"after": first["next_after"]})).json()
    assert second["count"] == 6 and second["more"] is False
    assert [e["id"] for e in second["events"]] == [
        e["id"] for e in (await fake_client.get(api + "?count=500")).json()["events"][50:]
    ]
    small = (await fake_client.get(api, params={"count": 2, "after": "junk"})).json()
    assert small["after"] is None and [e["id"] for e in small["events"]] == [e["id"] for e in first["events"][:2]]
    assert first["latest_after"] is not None
    latest = (await fake_client.get(api, params={"after": first["latest_after"]})).json()
    assert (
        latest["count"] == 50 and latest["more"] is False and latest["events"][-1]["id"] == second["events"][-1]["id"]
    )

    page = await fake_client.get(f"/groups/{group.id}")
    assert page.text.count("<tr data-event=") == 50
    newer = re.search(r'<a class="newer" href="([^"]+)" rel="next">Newer</a>', page.text)
    assert newer and f"after={first['next_after']}" in newer.group(1)
    assert ">Latest</a>" in page.text and ">Earliest</a>" not in page.text
    following = await fake_client.get(newer.group(1).replace("&amp;", "&").split("#")[0])
    assert following.text.count("<tr data-event=") == 6 and ">Earliest</a>" in following.text
    assert 'class="newer" href="' in following.text and 'rel="next" hidden>Newer' in following.text
    assert (await fake_client.get("/api/groups/nope/events")).status_code == 404


async def test_timeline_empty_and_live(fake_client: httpx.AsyncClient, fake_redis: ArqRedis) -> None:
    """A group with no event says so; a running group's page names the events URL its script polls."""
    quiet = await astages.StagedGroup.create(fake_redis, "quiet", events=0)
    await (await quiet.stage(1)).enqueue(work, 1)
    await quiet.initiate()
    page = await fake_client.get(f"/groups/{quiet.id}")
    assert '<p class="empty events-empty">No events yet.</p>' in page.text
    assert f'data-events-url="/api/groups/{quiet.id}/events" data-after="" data-room="50"' in page.text
    sample = await make_sample(fake_redis)
    pending = await fake_client.get(f"/groups/{sample.pending.id}")
    assert "data-events-url" not in pending.text  # nothing runs, nothing to follow
    assert (await fake_client.get(f"/api/groups/{quiet.id}/events")).json()["events"] == []
