"""The API a new user meets first (issue 12): stage handles used without an await of their
own, create versus look-up, stage names, and errors that say what was attempted."""

from __future__ import annotations

import pytest
from helpers import run_burst

import astages
from astages import StagedGroup, StageStatus

SEEN: list[object] = []


@pytest.fixture(autouse=True)
def _clear():
    SEEN.clear()


async def work(ctx, tag=None):
    return tag


async def done(ctx, summary):
    """A callback."""


async def peek(ctx, tag):
    """Reads stage 9 of its own group through group.stage(9), as a job would."""
    job = await astages.StagedJob.perform_job(ctx, tag)
    handle = job.stage().group.stage(9)
    SEEN.append(await handle.exists())
    try:
        await handle.status()
    except astages.StageNotFound as e:
        SEEN.append(type(e).__name__)
    SEEN.append(await handle.num_jobs())


# -- a handle used as it is ------------------------------------------------------------


async def test_stage_handle_enqueues_without_its_own_await(redis):
    """group.stage(n).enqueue(...) makes the missing stage and records the job in it."""
    group = await StagedGroup.create(redis, "direct")
    job = await group.stage(2).enqueue(work, "a")
    jobs = await group.stage(2).enqueue_many([(work, ("b",)), (work, ("c",))])
    assert list(await group.stages()) == [2]
    stage = await group.get_stage(2)
    assert [j.id for j in await stage.jobs()] == [job.id, *(j.id for j in jobs)]
    assert await stage.status() is StageStatus.PENDING


async def test_await_stage_keeps_working_and_returns_a_look_up_handle(redis):
    """await group.stage(n) makes the stage at once; the handle it gives does not make it again once deleted."""
    group = await StagedGroup.create(redis, "awaited")
    stage = await group.stage(1)
    assert isinstance(stage, astages.StagedGroupStage)
    assert await stage.exists() and list(await group.stages()) == [1]
    await stage.delete()
    with pytest.raises(astages.StageNotFound):
        await stage.enqueue(work, 1)
    assert await group.num_stages() == 0


async def test_every_scheduling_variant_of_a_handle_makes_its_stage(redis):
    """enqueue_to/at/in (and their _with_queue forms) through group.stage(n) make the stage too."""
    group = await StagedGroup.create(redis, "variants")
    await group.stage(1).enqueue_to("arq:queue", work)
    await group.stage(2).enqueue_at(4_000_000_000, work)
    await group.stage(3).enqueue_in(5, work)
    await group.stage(4).enqueue_at_with_queue("arq:queue", 4_000_000_000, work)
    await group.stage(5).enqueue_in_with_queue("arq:queue", 5, work)
    assert {n: (await s.num_jobs()) for n, s in (await group.stages()).items()} == {1: 1, 2: 1, 3: 1, 4: 1, 5: 1}


async def test_handle_on_complete_policy_and_initiate_make_the_stage(redis):
    """on_complete, set_failure_policy and initiate through group.stage(n) make the missing stage."""
    group = await StagedGroup.create(redis, "writes")
    await group.stage(1).on_complete(done)
    await group.stage(2).set_failure_policy("halt")
    assert list(await group.stages()) == [1, 2]
    assert await redis.hget(f"astages:{{{group.id}}}:callbacks", "stage.1:1") is not None
    assert await redis.hget(f"astages:{{{group.id}}}:s:2", "max_failed") == b"0"
    later = await StagedGroup.create(redis, "initiated")
    motion = await later.stage(3).initiate()  # an empty stage: it completes and the group ends
    assert motion.finished


async def test_cancel_and_delete_through_a_handle_never_make_the_stage(redis):
    """cancel() and delete() on a missing stage raise StageNotFound and make nothing."""
    group = await StagedGroup.create(redis, "no writes")
    with pytest.raises(astages.StageNotFound):
        await group.stage(1).cancel()
    with pytest.raises(astages.StageNotFound):
        await group.stage(1).delete()
    assert await group.num_stages() == 0


async def test_handle_inside_within_a_grouping_is_buffered(redis):
    """group.stage(n).enqueue in within_a_grouping makes the stage and buffers its jobs."""
    async with astages.within_a_grouping(redis, "block") as group:
        for i in range(5):
            await group.stage(1).enqueue(work, i)
        await group.stage(2).enqueue(work, "next")
    stage = await group.get_stage(1)
    assert [j.args[0] for j in await stage.jobs()] == [0, 1, 2, 3, 4]
    assert await stage.status() is StageStatus.RUNNING
    assert await (await group.get_stage(2)).num_jobs() == 1


async def test_a_missing_group_raises_group_not_found_through_a_handle(redis):
    """A handle of a deleted group makes nothing: GroupNotFound, no key left."""
    group = await StagedGroup.create(redis, "gone")
    await group.delete()
    with pytest.raises(astages.GroupNotFound):
        await group.stage(1).enqueue(work)
    with pytest.raises(astages.GroupNotFound):
        await group.stage(1)
    with pytest.raises(astages.GroupNotFound):
        await group.stage(1).on_complete(done)
    assert await redis.keys("astages:{*") == []


# -- reading creates nothing -----------------------------------------------------------


async def test_reading_through_a_handle_creates_nothing(redis):
    """status/progress/info raise StageNotFound, exists/num_jobs/jobs read empty, and no stage appears."""
    group = await StagedGroup.create(redis, "reads", keep_for=60)
    await group.stage(1).enqueue(work)
    handle = group.stage(9)
    for read in (handle.status, handle.progress, handle.info):
        with pytest.raises(astages.StageNotFound):
            await read()
    assert not await handle.exists()
    assert await handle.num_jobs() == 0 and await handle.jobs() == []
    assert list(await group.stages()) == [1]
    with pytest.raises(astages.StageNotFound):
        await (await group.get_stage(1)).group.get_stage(9)
    await group.cancel()
    summary = await group.summary()
    assert summary is not None and [s.number for s in summary.stages] == [1]


async def test_a_job_reading_a_stage_it_names_adds_no_stage(real_redis):
    """A job that reads group.stage(9) of its group sees it missing, and the group's summary has no stage 9."""
    group = await StagedGroup.create(real_redis, "from a job", keep_for=60)
    await group.stage(1).enqueue(peek, "p")
    await group.initiate()
    await run_burst(real_redis, [peek])
    assert SEEN == [False, "StageNotFound", 0]
    summary = await group.wait(10)
    assert [s.number for s in summary.stages] == [1]


async def test_job_stage_and_get_stage_handles_never_create(redis):
    """Handles from get_stage, stages() and job.stage() raise StageNotFound on a deleted stage, making nothing."""
    group = await StagedGroup.create(redis, "look-ups")
    job = await group.stage(1).enqueue(work)
    await group.stage(2).enqueue(work)
    handles = [job.stage(), await group.get_stage(1), (await group.stages())[1]]
    await (await group.get_stage(1)).delete()
    for handle in handles:
        with pytest.raises(astages.StageNotFound):
            await handle.enqueue(work)
        with pytest.raises(astages.StageNotFound):
            await handle.on_complete(done)
        with pytest.raises(astages.StageNotFound):
            await handle
    assert list(await group.stages()) == [2]


# -- names -----------------------------------------------------------------------------


async def test_stage_names_are_stored_and_shown(redis):
    """A name given by await group.stage(n, name=) or by a write shows in info(), the summary and stage events."""
    group = await StagedGroup.create(redis, "named", keep_for=60)
    fetch = await group.stage(1, name="fetch")
    assert fetch.name == "fetch" and (await fetch.info()).name == "fetch"
    await group.stage(2, name="resize").enqueue(work)
    await group.stage(3).enqueue(work)
    infos = {n: await s.info() for n, s in (await group.stages()).items()}
    assert {n: i.name for n, i in infos.items()} == {1: "fetch", 2: "resize", 3: None}
    assert infos[1].label == "stage 1 (fetch)" and infos[3].label == "stage 3"
    await group.cancel()
    summary = await group.summary()
    assert summary is not None
    assert [(s.number, s.name) for s in summary.stages] == [(1, "fetch"), (2, "resize"), (3, None)]
    stage_events = [(e.subject, e.to_status, e.details.get("name")) for e in await group.events() if e.kind == "stage"]
    assert ("2", "cancelled", "resize") in stage_events and ("3", "cancelled", None) in stage_events


async def test_a_name_renames_and_none_leaves_it(redis):
    """A different name renames an existing stage (await or write); name=None and an unnamed handle leave it."""
    group = await StagedGroup.create(redis, "renamed")
    await group.stage(1, name="first")
    await group.stage(1).enqueue(work)
    assert (await group.stage(1).info()).name == "first"
    await group.stage(1, name="second")
    assert (await group.stage(1).info()).name == "second"
    await group.stage(1, name="third").enqueue(work)
    assert (await group.stage(1).info()).name == "third"
    await group.stage(1, name="fourth").on_complete(done)
    await group.stage(1, name=None).set_failure_policy("halt")
    assert (await group.stage(1).info()).name == "fourth"
    await group.stage(1, name="fifth").set_failure_policy("halt")
    assert (await group.stage(1).info()).name == "fifth"


@pytest.mark.parametrize("name", ["", "   ", "x" * 101, 7, b"fetch"])
async def test_a_bad_stage_name_is_refused_before_anything_is_written(redis, name):
    """An empty, blank, over-100-character or non-str name raises InvalidStageName and makes no stage."""
    group = await StagedGroup.create(redis, "bad names")
    with pytest.raises(astages.InvalidStageName, match="stage name"):
        group.stage(1, name=name)
    with pytest.raises(astages.InvalidStageName):
        await group.stage(1, name=name)
    assert await group.num_stages() == 0
    assert (await group.stage(1, name="x" * 100)).name == "x" * 100


async def test_an_ended_group_takes_no_new_or_renamed_stage(redis):
    """A kept, ended group refuses a new stage and a renaming with GroupFinished; reading it still works."""
    group = await StagedGroup.create(redis, "ended", keep_for=60)
    await group.stage(1, name="only")
    await group.cancel()
    with pytest.raises(astages.GroupFinished):
        await group.stage(2)
    with pytest.raises(astages.GroupFinished):
        await group.stage(1, name="other")
    with pytest.raises(astages.GroupFinished):
        await group.stage(2).enqueue(work)
    assert (await group.stage(1)).number == 1
    assert (await group.stage(1).info()).name == "only"


# -- errors ----------------------------------------------------------------------------


async def test_job_id_option_has_its_own_message(redis):
    """_job_id= raises InvalidJobOption (still an InvalidJobFunction) saying astages chooses staged job ids."""
    group = await StagedGroup.create(redis, "ids")
    stage = await group.stage(1)
    for call in (
        lambda: stage.enqueue(work, 1, _job_id="x"),
        lambda: stage.enqueue_many([(work, (1,), {"_job_id": "x"})]),
        lambda: stage.on_complete(done, _job_id="x"),
        lambda: group.on_complete(done, _job_id="x"),
    ):
        with pytest.raises(astages.InvalidJobOption, match="astages chooses the arq job id") as raised:
            await call()
        assert isinstance(raised.value, astages.InvalidJobFunction)
        assert "function name" not in str(raised.value)
    assert await stage.num_jobs() == 0


async def test_stage_complete_says_what_was_attempted(redis):
    """Cancelling or starting an ended stage says so; enqueueing keeps its message; all are StageComplete."""
    group = await StagedGroup.create(redis, "ended stage")
    stage = await group.stage(1)
    await stage.enqueue(work)
    await group.stage(2).enqueue(work)
    await stage.cancel()
    with pytest.raises(astages.StageComplete, match="cancelled already: there is nothing left to cancel") as raised:
        await stage.cancel()
    assert raised.value.attempted == "cancel" and raised.value.status == "cancelled"
    with pytest.raises(astages.StageComplete, match="cannot be started again"):
        await stage.initiate()
    with pytest.raises(astages.StageComplete, match="takes no new jobs"):
        await stage.enqueue(work)


async def test_watch_board_labels_stages_by_name(redis):
    """astages watch's rows label a stage with its name, while it runs and from the end summary."""
    from astages._board import Board, ended_rows, snapshot

    group = await StagedGroup.create(redis, "board", keep_for=60)
    await group.stage(1, name="fetch").enqueue(work)
    await group.stage(2).enqueue(work)
    rows = await snapshot(group)
    assert rows is not None and [r.label for r in rows] == ["fetch", ""]
    assert Board(live=False).line(rows[0], 5).startswith("stage 1 fetch  [")
    await group.cancel()
    summary = await group.summary()
    assert summary is not None and [r.label for r in ended_rows(summary)] == ["fetch", ""]


async def test_a_handle_runs_as_a_coroutine_where_one_is_needed(redis):
    """asyncio.create_task(group.stage(n)) works as when stage() was a coroutine: it makes the stage once."""
    import asyncio

    group = await StagedGroup.create(redis, "task")
    stage = await asyncio.create_task(group.stage(1, name="made"))
    assert isinstance(stage, astages.StagedGroupStage) and (await stage.info()).name == "made"
    assert [s.number for s in await asyncio.gather(group.stage(2), group.stage(3))] == [2, 3]
    assert list(await group.stages()) == [1, 2, 3]
    unused = group.stage(4)
    unused.close()  # closing a handle never run does nothing (and warns of nothing)
    assert await group.num_stages() == 3
