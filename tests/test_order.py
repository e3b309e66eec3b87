"""Jobs of a stage run in the order they were enqueued (issue 10, item 10). A stage's jobs are
sent in chunks that share one score, and arq takes jobs of equal score in the string order
of their ids, so the seq in a staged job's id is zero-padded (``...:1:0000000035``)."""

from __future__ import annotations

from arq.constants import default_queue_name
from helpers import run_burst

from astages import StagedGroup
from astages._keys import JobRef, Keys

ORDER: list[int] = []


async def step(ctx, i):
    """Records its place in the run order."""
    ORDER.append(i)


async def test_a_stage_of_1000_jobs_runs_in_enqueue_order(real_redis):
    """One worker taking one job at a time runs a 1,000-job stage in enqueue order (35 before 349)."""
    ORDER.clear()
    group = await StagedGroup.create(real_redis, "order")
    stage = await group.stage(1)
    jobs = await stage.enqueue_many([(step, (i,)) for i in range(1000)])
    await group.initiate()
    queued = await real_redis.zrange(default_queue_name, 0, -1)  # arq's order: score, then id
    assert [m.decode() for m in queued] == [job.id for job in jobs]
    await run_burst(real_redis, [step], max_jobs=1)
    assert list(range(1000)) == ORDER
    assert not await group.exists()


def test_job_ids_sort_as_their_seqs_and_parse_back():
    """Staged job ids of one stage sort as strings in seq order, and parse back to their group, stage and seq."""
    keys = Keys()
    group_id = "0" * 31 + "f"
    seqs = [1, 9, 10, 35, 99, 100, 349, 1000, 9_999_999_999]  # 10 digits: 10 billion jobs a stage
    ids = [keys.job_id(group_id, -2, seq) for seq in seqs]
    assert sorted(ids) == ids
    assert ids[3] == f"astages:{group_id}:-2:0000000035"
    seqs.append(10_000_000_000)  # past the width: still a valid id, only no longer sorted
    ids.append(keys.job_id(group_id, -2, seqs[-1]))
    assert [keys.parse_job_id(i) for i in ids] == [JobRef(group_id, -2, seq) for seq in seqs]
