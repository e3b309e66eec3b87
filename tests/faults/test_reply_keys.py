"""The reply keys that make a re-sent call act once (``<prefix>:reply:<token>``, see
``once`` in lua/_lib.lua): a call re-sent with the same token gets the first reply, error
codes included; a Lua error keeps none; they expire within a minute; the worker's per-job
scripts write none; the Cleaner's repair and check ignore them and purge_all deletes them."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from arq.connections import ArqRedis

import astages._scripts
from astages import Cleaner, CorruptRecord, StagedGroup, StageNotFound
from astages._keys import Keys
from astages._scripts import REPEATABLE, SCRIPTS, Store
from astages.stage import StagedGroupStage


async def work(ctx: Any, tag: Any = None) -> Any:
    """A job (never run here)."""
    return tag


async def done(ctx: Any, summary: Any) -> None:
    """A callback (never run here)."""


class Tokens:
    """The token the next calls carry (a re-sent call carries its first token)."""

    def __init__(self) -> None:
        self.value = "t0"
        self.count = 0

    def __call__(self) -> str:
        self.count += 1
        return self.value


@pytest.fixture
def tokens(monkeypatch: pytest.MonkeyPatch) -> Iterator[Tokens]:
    made = Tokens()
    monkeypatch.setattr(astages._scripts, "_token", made)
    yield made


async def reply_keys(redis: ArqRedis) -> list[bytes]:
    return sorted(await redis.keys("astages:reply:*"))


async def test_an_error_reply_is_kept_for_the_resent_call(redis: ArqRedis, tokens: Tokens) -> None:
    """A call re-sent with its token gets its first reply, an error code too, even when the
    state has changed since: initiate of a missing stage re-sent after the stage was made
    still raises StageNotFound and starts nothing."""
    group = await StagedGroup.create(redis, "replies")
    tokens.value = "first"
    with pytest.raises(StageNotFound):
        await StagedGroupStage(group, 1).initiate()
    tokens.value = "other"
    await (await group.stage(1)).enqueue(work, 1)
    tokens.value = "first"  # the first call, re-sent
    with pytest.raises(StageNotFound):
        await StagedGroupStage(group, 1).initiate()
    assert (await (await group.get_stage(1)).status()).value == "pending"
    assert await group.status() == "pending"


async def test_a_resent_callback_is_registered_once(redis: ArqRedis, tokens: Tokens) -> None:
    """add_callback re-sent with its token registers nothing more."""
    group = await StagedGroup.create(redis, "replies")
    tokens.value = "cb"
    await group.on_complete(done)
    await group.on_complete(done)
    assert list(await redis.hkeys(Keys().callbacks(group.id))) == [b"complete:1"]


async def test_a_reply_key_expires_within_a_minute(real_redis: ArqRedis) -> None:
    """Each call leaves one reply key, expiring in at most 60 s."""
    group = await StagedGroup.create(real_redis, "replies")
    await group.stage(1)
    keys = await reply_keys(real_redis)
    assert len(keys) == 2
    for key in keys:
        assert 0 < await real_redis.pttl(key) <= 60_000


async def test_a_lua_error_keeps_no_reply(real_redis: ArqRedis, tokens: Tokens) -> None:
    """A script that fails with a Lua error keeps no reply, so the same call sent again
    (once the cause is gone) acts."""
    group = await StagedGroup.create(real_redis, "replies")
    callbacks = Keys().callbacks(group.id)
    await real_redis.set(callbacks, "not a hash")
    tokens.value = "broken"
    with pytest.raises(CorruptRecord):
        await group.on_complete(done)
    assert await real_redis.exists(Keys().reply("broken")) == 0
    await real_redis.delete(callbacks)
    await group.on_complete(done)  # the same token: the call acts now
    assert len(await real_redis.hkeys(callbacks)) == 1
    assert await real_redis.exists(Keys().reply("broken")) == 1


async def test_per_job_scripts_keep_no_reply(real_redis: ArqRedis) -> None:
    """A worker's start and report of a job (and the other per-job scripts) write no reply
    key and are not wrapped: they cost what they did."""
    group = await StagedGroup.create(real_redis, "replies")
    await (await group.stage(1)).enqueue_many([(work, (i,)) for i in range(2)])
    await group.initiate()
    before = await reply_keys(real_redis)
    store = Store(real_redis, Keys())
    await store.run("start_job", group.id, 1, 1, 1)
    await store.move("finish_job", group.id, 1, 1, 1, "s", "")
    await store.move("nudge", group.id)
    assert await reply_keys(real_redis) == before
    for name in REPEATABLE & SCRIPTS.keys():
        assert b"return once(body)" not in SCRIPTS[name].script
    assert b"return once(body)" in SCRIPTS["enqueue"].script


async def test_the_cleaner_ignores_reply_keys_and_purge_all_deletes_them(real_redis: ArqRedis) -> None:
    """Reply keys are no group's: cleanup_jobs repairs nothing for them, check reports
    nothing, and purge_all deletes them with the rest."""
    group = await StagedGroup.create(real_redis, "replies")
    await (await group.stage(1)).enqueue(work, 1)
    assert len(await reply_keys(real_redis)) == 3
    report = await Cleaner.cleanup_jobs(real_redis)
    assert report.repaired == 0 and report.errors == ()
    assert await Cleaner.check(real_redis) == {}
    assert len(await reply_keys(real_redis)) == 3
    await Cleaner.purge_all(real_redis)
    assert await real_redis.keys("astages:*") == []
