"""Every button: it needs a valid CSRF token, confirms destructive actions, acts, and
returns to the page it came from with a message."""

from __future__ import annotations

import base64

import httpx
import pytest
from arq.connections import ArqRedis
from helpers import keys_left, start_unsent
from starlette.applications import Starlette
from starlette.routing import Mount

import astages
from astages.web import create_app
from web.helpers import XSS, csrf_of, flash_of, make_sample, post_form


async def _follow(client: httpx.AsyncClient, reply: httpx.Response) -> httpx.Response:
    assert reply.status_code == 303, reply.text
    return await client.get(reply.headers["location"])


async def test_initiate_pending_group(client: httpx.AsyncClient, redis: ArqRedis) -> None:
    """Initiate Group starts the first stage and says so on the page it came from."""
    sample = await make_sample(redis)
    page = f"/groups/{sample.pending.id}"
    reply = await post_form(client, page, f"/groups/{sample.pending.id}/initiate", confirmed=False)
    assert reply.headers["location"] == page
    shown = await _follow(client, reply)
    assert "stage 1 is running" in (flash_of(shown.text) or "")
    assert await (await sample.pending.stage(1)).status() == astages.StageStatus.RUNNING
    again = await client.get(page)
    assert flash_of(again.text) is None  # a message is shown once


async def test_initiate_stage_then_queue_and_delete_job(client: httpx.AsyncClient, redis: ArqRedis) -> None:
    """Initiate on a pending stage sends it; Queue Job sends one pending job; Delete Job removes one."""
    sample = await make_sample(redis)
    stage = await sample.running.stage(2)
    (job,) = await stage.jobs()
    assert job.ref is not None
    job_page = f"/groups/{sample.running.id}/stages/2/jobs/{job.ref.seq}"
    assert "Queue Job" not in (await client.get(job_page)).text  # stage 2 has not started
    refused = await post_form(client, job_page, job_page + "/queue", confirmed=False)
    assert "has not started" in (flash_of((await _follow(client, refused)).text) or "")
    assert await job.status() == astages.JobStatus.PENDING
    await start_unsent(sample.running, 2)  # stage 2 runs, its job not sent yet
    assert "Queue Job" in (await client.get(job_page)).text
    reply = await post_form(client, job_page, job_page + "/queue", confirmed=False)
    shown = await _follow(client, reply)
    assert "Sent job work" in (flash_of(shown.text) or "")
    assert await job.status() == astages.JobStatus.QUEUED
    again = await post_form(client, job_page, job_page + "/queue", confirmed=False)
    assert "Nothing done" in (flash_of((await _follow(client, again)).text) or "")
    reply = await post_form(client, job_page, job_page + "/delete")
    assert reply.headers["location"] == f"/groups/{sample.running.id}/stages/2"
    assert not await job.exists()

    stage_page = f"/groups/{sample.pending.id}/stages/1"
    reply = await post_form(client, stage_page, stage_page + "/initiate", confirmed=False)
    assert "Initiated stage 1" in (flash_of((await _follow(client, reply)).text) or "")
    assert await (await sample.pending.stage(1)).status() == astages.StageStatus.RUNNING


async def test_delete_stage_and_group(client: httpx.AsyncClient, redis: ArqRedis) -> None:
    """Delete on a stage returns to its group; Delete on a group returns to the list."""
    sample = await make_sample(redis)
    gid = sample.running.id
    reply = await post_form(client, f"/groups/{gid}/stages/2", f"/groups/{gid}/stages/2/delete")
    assert reply.headers["location"] == f"/groups/{gid}"
    assert "Deleted stage 2" in (flash_of((await _follow(client, reply)).text) or "")
    reply = await post_form(client, f"/groups/{gid}", f"/groups/{gid}/delete")
    assert reply.headers["location"] == "/"
    shown = await _follow(client, reply)
    assert "Deleted group 'nightly import'" in (flash_of(shown.text) or "")
    assert not await sample.running.exists()
    gone = await post_form(client, "/", f"/groups/{gid}/initiate", confirmed=False)
    assert "no longer exists" in (flash_of((await _follow(client, gone)).text) or "")


async def test_delete_all_groups(client: httpx.AsyncClient, redis: ArqRedis) -> None:
    """Delete All Groups deletes every group and says how many."""
    await make_sample(redis)
    reply = await post_form(client, "/", "/actions/delete-all-groups")
    assert flash_of((await _follow(client, reply)).text) == "Deleted 2 groups."
    assert await astages.StagedGroup.count(redis) == 0
    assert await keys_left(redis) == []


async def test_cleanup_and_purge(client: httpx.AsyncClient, redis: ArqRedis) -> None:
    """Cleanup Jobs runs the cleaner's repair; Purge deletes every astages key."""
    sample = await make_sample(redis)
    await redis.delete(f"astages:{{{sample.pending.id}}}:stages")  # an orphaned stage to repair
    reply = await post_form(client, "/", "/actions/cleanup-jobs")
    message = flash_of((await _follow(client, reply)).text) or ""
    assert message.startswith("Cleaned up jobs:"), message
    reply = await post_form(client, "/", "/actions/purge")
    message = flash_of((await _follow(client, reply)).text) or ""
    assert message.startswith("Purged:") and "keys deleted" in message, message
    assert await keys_left(redis) == []


async def test_destructive_action_asks_first(fake_client: httpx.AsyncClient, fake_redis: ArqRedis) -> None:
    """A destructive POST without confirmation answers with a confirmation page and changes nothing."""
    sample = await make_sample(fake_redis)
    page = f"/groups/{sample.pending.id}"
    reply = await post_form(fake_client, page, page + "/delete", confirmed=False)
    assert reply.status_code == 200
    assert "Are you sure?" in reply.text and 'name="confirmed" value="1"' in reply.text
    assert XSS not in reply.text
    assert await sample.pending.exists()
    confirmed = await fake_client.post(
        page + "/delete", data={"csrf": csrf_of(reply.text), "next": page, "confirmed": "1"}
    )
    assert confirmed.status_code == 303 and not await sample.pending.exists()


@pytest.mark.parametrize(
    ("token", "headers"),
    [
        (None, {}),
        ("forged", {}),
        ("valid", {"origin": "https://evil.example"}),
        ("valid", {"sec-fetch-site": "cross-site"}),
        ("valid", {"origin": "null"}),
    ],
)
async def test_csrf_rejected(
    fake_client: httpx.AsyncClient, fake_redis: ArqRedis, token: str | None, headers: dict[str, str]
) -> None:
    """A POST without a valid token, or from another site, is refused with 403 and does nothing."""
    sample = await make_sample(fake_redis)
    page = await fake_client.get("/")
    data = {"confirmed": "1", "next": "/"}
    if token == "valid":
        data["csrf"] = csrf_of(page.text)
    elif token is not None:
        data["csrf"] = token
    reply = await fake_client.post(f"/groups/{sample.pending.id}/delete", data=data, headers=headers)
    assert reply.status_code == 403
    assert await sample.pending.exists()


async def test_token_without_its_cookie_is_refused(fake_client: httpx.AsyncClient, fake_redis: ArqRedis) -> None:
    """A token copied into another browser (without the cookie it was made for) is refused."""
    sample = await make_sample(fake_redis)
    token = csrf_of((await fake_client.get("/")).text)
    fake_client.cookies.clear()
    reply = await fake_client.post(f"/groups/{sample.pending.id}/delete", data={"csrf": token, "confirmed": "1"})
    assert reply.status_code == 403


async def test_actions_need_post(fake_client: httpx.AsyncClient, fake_redis: ArqRedis) -> None:
    """GET on an action changes nothing (405)."""
    sample = await make_sample(fake_redis)
    assert (await fake_client.get(f"/groups/{sample.pending.id}/delete")).status_code == 405
    assert await sample.pending.exists()


async def test_next_cannot_leave_the_app(fake_client: httpx.AsyncClient, fake_redis: ArqRedis) -> None:
    """The return address must be a path of the dashboard (no open redirect)."""
    sample = await make_sample(fake_redis)
    for evil in ("https://evil.example/", "//evil.example/x", "/\\evil"):
        reply = await post_form(fake_client, "/", f"/groups/{sample.pending.id}/initiate", next=evil)
        assert reply.headers["location"] == "/", evil


async def test_mounted_under_a_prefix(fake_redis: ArqRedis) -> None:
    """Mounted under /ops/stages, every link, form and redirect keeps the prefix."""
    sample = await make_sample(fake_redis)
    outer = Starlette(routes=[Mount("/ops/stages", app=create_app(fake_redis))])
    async with httpx.AsyncClient(transport=httpx.ASGITransport(outer), base_url="http://dash") as client:
        page = await client.get("/ops/stages/")
        assert page.status_code == 200
        assert f'href="/ops/stages/groups/{sample.running.id}"' in page.text
        assert 'href="/ops/stages/static/astages.css"' in page.text
        assert 'action="/ops/stages/actions/purge"' in page.text
        assert 'name="next" value="/ops/stages/"' in page.text
        assert page.headers["set-cookie"].count("Path=/ops/stages") == 1
        stage = await client.get(f"/ops/stages/groups/{sample.running.id}/stages/1")
        assert f'data-live-url="/ops/stages/api/groups/{sample.running.id}/stages/1"' in stage.text
        assert (await client.get("/ops/stages/static/astages.js")).status_code == 200
        assert (await client.get(f"/ops/stages/api/groups/{sample.running.id}")).json()["id"] == sample.running.id
        reply = await post_form(
            client, f"/ops/stages/groups/{sample.pending.id}", f"/ops/stages/groups/{sample.pending.id}/delete"
        )
        assert reply.headers["location"] == "/ops/stages/"
        assert not await sample.pending.exists()


async def test_basic_auth_login(fake_redis: ArqRedis) -> None:
    """With a login set, every request needs it; the right one gets in."""
    app = create_app(fake_redis, login=("ops", "s3cret"))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://dash") as client:
        refused = await client.get("/")
        assert refused.status_code == 401 and refused.headers["www-authenticate"].startswith("Basic")
        assert (await client.get("/api/groups")).status_code == 401
        assert (await client.get("/", auth=("ops", "wrong"))).status_code == 401
        bad = {"authorization": "Basic " + base64.b64encode(b"garbage").decode() + "!"}
        assert (await client.get("/", headers=bad)).status_code == 401
        assert (await client.get("/", auth=("ops", "s3cret"))).status_code == 200


async def test_trusted_origin_behind_a_host_rewriting_proxy(fake_redis: ArqRedis) -> None:
    """Behind a reverse proxy that rewrites Host, a form posted from the public origin is
    accepted once that origin is trusted, and still refused from any other origin."""
    sample = await make_sample(fake_redis)
    app = create_app(fake_redis, trusted_origins=["https://Ops.Example.com/"])
    # the proxy forwards to 127.0.0.1:8080 with that Host; the browser is on https://ops.example.com
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://127.0.0.1:8080") as client:
        page = await client.get("/")
        data = {"confirmed": "1", "next": "/", "csrf": csrf_of(page.text)}
        target = f"/groups/{sample.pending.id}/delete"
        refused = await client.post(target, data=data, headers={"origin": "https://evil.example"})
        assert refused.status_code == 403 and await sample.pending.exists()
        accepted = await client.post(target, data=data, headers={"origin": "https://ops.example.com"})
        assert accepted.status_code == 303 and not await sample.pending.exists()


def test_a_trusted_origin_must_be_an_origin() -> None:
    """A trusted origin that is not scheme://host[:port] is refused with a clear error."""
    from astages.web.serve import WebSettings

    with pytest.raises(ValueError, match="scheme://host"):
        create_app(None, trusted_origins=["ops.example.com"])  # type: ignore[arg-type]
    settings = WebSettings.of(
        "redis://", "127.0.0.1", 8080, environ={"ASTAGES_WEB_TRUSTED_ORIGINS": "https://a.example, http://b:81"}
    )
    assert settings.trusted_origins == ("https://a.example", "http://b:81")
