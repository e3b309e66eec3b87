"""The astages command through click's runner, against the real Redis server."""

from __future__ import annotations

import contextlib
import json
from typing import Any

from arq.connections import ArqRedis
from cli_helpers import (
    crash,
    db_url_fixture,  # noqa: F401 - the db_url fixture
    make_group,
    noop,
    on_redis,
)
from click.testing import CliRunner
from helpers import keys_left

import astages
from astages.cli import main
from astages.testing import GroupStuck, run_group


def invoke(*args: str, input: str | None = None) -> Any:
    return CliRunner().invoke(main, list(args), input=input, env={"REDIS_URL": None})


def test_groups_lists_live_groups_with_progress(db_url: str) -> None:
    """groups shows each group's stage and job counts, newest first (--oldest: oldest first), as a table and JSON."""
    first = make_group(db_url, "first")
    make_group(db_url, "second", initiate=False)
    result = invoke("groups", "--redis-url", db_url, "--oldest")
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0].split() == ["ID", "DESCRIPTION", "CREATED", "STATUS", "STAGE", "JOBS", "FAILED", "CANCELLED"]
    assert lines[1].startswith(first) and "running" in lines[1] and "0/4" in lines[1]
    assert "second" in lines[2] and "pending" in lines[2]
    data = json.loads(invoke("groups", "--redis-url", db_url, "--json", "--oldest").output)
    assert data["total"] == 2
    assert [g["description"] for g in data["groups"]] == ["first", "second"]
    assert data["groups"][0]["current_stage"] == 1
    assert data["groups"][0]["jobs"]["queued"] == 3
    page = invoke("groups", "--redis-url", db_url, "--limit", "1", "--offset", "1", "--oldest")
    assert "second" in page.output and "groups 2-2 of 2" in page.output


def test_groups_on_an_empty_server(db_url: str) -> None:
    """groups says so when there is none."""
    result = invoke("groups", "--redis-url", db_url)
    assert (result.exit_code, result.output) == (0, "no groups\n")


def test_show_lists_stages_jobs_messages_and_errors(db_url: str) -> None:
    """show prints every stage and its jobs with statuses, messages and the first error line."""

    async def action(redis: ArqRedis) -> str:
        group = await astages.StagedGroup.create(redis, "mixed")
        await (await group.stage(1)).enqueue_many([(noop, (1,)), (crash, (2,))])
        await (await group.stage(2)).enqueue_to("elsewhere", noop, 3)
        await group.initiate()
        with contextlib.suppress(GroupStuck):  # stage 2's job waits in a queue no worker here drains
            await run_group(redis, group, [noop, crash])
        return group.id

    group_id = on_redis(db_url, action)
    result = invoke("show", group_id[:20], "--redis-url", db_url)
    assert result.exit_code == 0, result.output
    out = result.output
    assert f"group {group_id}  'mixed'  running" in out
    assert "stage 1  complete  2 jobs: 1 successful, 1 failed" in out
    assert "noop 1 done" in out
    assert "crash 2 starting | ValueError: crash 2 went wrong" in out
    assert "stage 2  running  1 job: 1 queued" in out
    data = json.loads(invoke("show", group_id, "--redis-url", db_url, "--json").output)
    crashed = data["stages"][0]["jobs"][1]
    assert (crashed["function"], crashed["args"], crashed["status"], crashed["tries"]) == ("crash", [2], "failed", 1)
    assert "ValueError: crash 2 went wrong" in crashed["error"]
    assert data["stages"][1]["jobs"][0]["queue"] == "elsewhere"
    limited = invoke("show", group_id, "--redis-url", db_url, "--limit", "1")
    assert "... 1 more (--limit N or --all)" in limited.output


def test_unknown_or_ambiguous_group_is_one_line_and_exit_1(db_url: str) -> None:
    """An unknown id, or a prefix of several ids, is one error line and exit status 1."""
    make_group(db_url, "a")
    make_group(db_url, "b")
    for args, expected in [
        (["show", "nope"], "Error: group 'nope' does not exist"),
        (["watch", "nope"], "Error: group 'nope' does not exist"),
        (["initiate", "nope"], "Error: group 'nope' does not exist"),
        (["delete", "nope"], "Error: group 'nope' does not exist"),
        (["show", ""], "Error: group '' does not exist"),
        (["show", "0"], "Error: '0' matches 2 groups"),
    ]:
        result = invoke(*args, "--redis-url", db_url)
        assert result.exit_code == 1, (args, result.output)
        assert result.output.startswith(expected), (args, result.output)
        assert result.output.count("\n") == 1 and "Traceback" not in result.output
        if "does not exist" in expected:  # where it looked: the wrong server or database is the usual cause
            assert result.output.rstrip().endswith(f"(looked in Redis at {db_url})"), result.output


def test_unreachable_or_invalid_redis_is_one_line_and_exit_1() -> None:
    """A server that does not answer, or a URL that is not Redis, is one error line."""
    for url, expected in [
        ("redis://127.0.0.1:1/0", "Error: cannot reach Redis at redis://127.0.0.1:1/0: "),
        ("http://example.com", "Error: 'http://example.com' is not a Redis URL"),
        ("redis://user:secret@127.0.0.1:1/0", "Error: cannot reach Redis at redis://***@127.0.0.1:1/0: "),
    ]:
        for command in ("groups", "cleanup"):
            result = invoke(command, "--redis-url", url)
            assert result.exit_code == 1, result.output
            assert result.output.startswith(expected), result.output
            assert result.output.count("\n") == 1 and "secret" not in result.output


def test_redis_url_comes_from_the_environment(db_url: str) -> None:
    """REDIS_URL is used when --redis-url is not given."""
    make_group(db_url, "from env")
    result = CliRunner().invoke(main, ["groups", "--json"], env={"REDIS_URL": db_url})
    assert json.loads(result.output)["groups"][0]["description"] == "from env"


def test_initiate_and_delete(db_url: str) -> None:
    """initiate starts a pending group; delete removes it; an empty group finishes on initiate."""
    group_id = make_group(db_url, initiate=False)
    result = invoke("initiate", group_id, "--redis-url", db_url)
    assert result.output == f"group {group_id}: stage 1 is running\n"
    assert invoke("delete", group_id, "--redis-url", db_url, "--yes").output == f"deleted group {group_id}\n"
    assert invoke("show", group_id, "--redis-url", db_url).exit_code == 1
    assert on_redis(db_url, lambda redis: redis.zcard("arq:queue")) == 0  # its queued jobs left arq's queue

    async def empty(redis: ArqRedis) -> str:
        group = await astages.StagedGroup.create(redis, "empty")
        await group.stage(1)
        return group.id

    empty_id = on_redis(db_url, empty)
    result = invoke("initiate", empty_id, "--redis-url", db_url)
    assert result.output == f"group {empty_id} had no stage left to run: it finished and was deleted\n"


def test_purge_asks_first_and_deletes_every_astages_key(db_url: str) -> None:
    """purge aborts on no, and with --yes deletes every astages key but nothing else."""
    group_id = make_group(db_url)
    on_redis(db_url, lambda redis: redis.set("unrelated", "1"))
    refused = invoke("purge", "--redis-url", db_url, input="n\n")
    assert refused.exit_code == 1 and "(1 live group)" in refused.output and "Aborted" in refused.output
    assert invoke("show", group_id, "--redis-url", db_url).exit_code == 0
    result = invoke("purge", "--redis-url", db_url, "--yes", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["deleted_keys"] > 0
    assert on_redis(db_url, keys_left) == []
    assert on_redis(db_url, lambda redis: redis.get("unrelated")) == b"1"
    confirmed = invoke("purge", "--redis-url", db_url, input="y\n")
    assert confirmed.exit_code == 0 and confirmed.output.endswith("deleted 0 keys\n")


def test_cleanup_reports_repairs(db_url: str) -> None:
    """cleanup recreates a group whose hash was lost and reports it; then there is nothing to do."""
    group_id = make_group(db_url)
    on_redis(db_url, lambda redis: redis.delete(f"astages:{{{group_id}}}"))
    data = json.loads(invoke("cleanup", "--redis-url", db_url, "--json").output)
    assert data["repaired"] >= 1 and group_id in data["groups_recreated"]
    assert data["errors"] == []
    assert invoke("cleanup", "--redis-url", db_url).output == "nothing to repair\n"
    assert invoke("show", group_id, "--redis-url", db_url).exit_code == 0


def test_watch_returns_once_a_kept_group_ended(db_url: str) -> None:
    """watch stops at a group that ended but is kept (keep_for), saying how it ended."""

    async def action(redis: ArqRedis) -> str:
        async with astages.within_a_grouping(redis, "kept", keep_for=60) as group:
            await (await group.stage(1)).enqueue(noop, 1)
        await run_group(redis, group, [noop])
        return group.id

    group_id = on_redis(db_url, action)
    result = invoke("watch", group_id, "--redis-url", db_url, "--interval", "0.05")
    assert result.exit_code == 0, result.output
    assert "1/1" in result.output
    assert f"group {group_id} ended: complete at " in result.output
    assert result.output.endswith(": 1 successful, 0 failed, 0 cancelled\n")


def test_groups_lists_newest_first_by_default(db_url: str) -> None:
    """groups (as the dashboard) lists the newest group first; --offset pages in that order."""
    make_group(db_url, "older", initiate=False)
    make_group(db_url, "newer", initiate=False)
    data = json.loads(invoke("groups", "--redis-url", db_url, "--json").output)
    assert [g["description"] for g in data["groups"]] == ["newer", "older"] and data["order"] == "newest"
    page = invoke("groups", "--redis-url", db_url, "--limit", "1", "--offset", "1")
    assert "older" in page.output and "newer" not in page.output
    assert "newest first" in invoke("groups", "--help").output


def test_delete_asks_first(db_url: str) -> None:
    """delete asks before deleting (as cancel and purge do): no keeps the group, yes or --yes deletes it."""
    group_id = make_group(db_url, "keep me")
    refused = invoke("delete", group_id[:10], "--redis-url", db_url, input="n\n")
    assert refused.exit_code == 1 and "Aborted" in refused.output
    assert f"Delete group {group_id} 'keep me' (running, 2 stages, 4 jobs, 4 not final)?" in refused.output
    assert invoke("show", group_id, "--redis-url", db_url).exit_code == 0
    confirmed = invoke("delete", group_id[:10], "--redis-url", db_url, input="y\n")
    assert confirmed.exit_code == 0 and confirmed.output.endswith(f"deleted group {group_id}\n")
    assert invoke("show", group_id, "--redis-url", db_url).exit_code == 1


def test_stage_names_and_plurals_in_show_groups_and_wait(db_url: str) -> None:
    """show, groups and wait name named stages, and say "1 job" / "2 jobs"."""

    async def action(redis: ArqRedis) -> str:
        group = await astages.StagedGroup.create(redis, "named", keep_for=60)
        await group.stage(1, name="fetch").enqueue(noop, 1)
        await group.stage(2).enqueue_many([(noop, (2,)), (noop, (3,))])
        await group.initiate()
        return group.id

    group_id = on_redis(db_url, action)
    shown = invoke("show", group_id, "--redis-url", db_url)
    assert "\nstage 1 (fetch)  running  1 job: 1 queued" in shown.output
    assert "\nstage 2  pending  2 jobs: 2 pending" in shown.output
    assert json.loads(invoke("show", group_id, "--redis-url", db_url, "--json").output)["stages"][0]["name"] == "fetch"
    listed = invoke("groups", "--redis-url", db_url)
    assert "1/2 fetch" in listed.output

    async def cancel(redis: ArqRedis) -> None:
        await (await astages.StagedGroup.load(redis, group_id)).cancel()

    on_redis(db_url, cancel)
    waited = invoke("wait", group_id, "--redis-url", db_url)
    lines = waited.output.splitlines()
    assert lines[1].split()[:3] == ["STAGE", "NAME", "STATUS"]
    assert lines[2].split()[:3] == ["1", "fetch", "cancelled"] and lines[3].split()[:3] == ["2", "-", "cancelled"]
    data = json.loads(invoke("wait", group_id, "--redis-url", db_url, "--json").output)
    assert [s["name"] for s in data["stages"]] == ["fetch", None]
