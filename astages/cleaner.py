"""Maintenance (the gem's Cleaner): purge, orphan repair and the invariant check.

- ``Cleaner.purge_all(redis)`` deletes every key astages owns under its prefix, and
  nothing else (arq's keys, and any staged job already in arq's queue, stay; such a job
  is not run: its record is gone).
- ``Cleaner.cleanup_jobs(redis)`` repairs orphans as the gem does: a job whose stage
  hash is gone gets its stage back, a stage whose group is gone gets its group back,
  ids missing from their parent's list are re-added; entries with nothing behind them
  are dropped. A staged job's arq id names its group and stage, so the repair recreates
  the missing parent under the same ids (the gem made new ones). It returns a
  ``CleanupReport`` of what it did.
- ``Cleaner.check(redis)`` returns, per group, every breach of the invariants the state
  machine keeps (see ``check``); an empty dict means all is well.

All three walk keys with SCAN (never KEYS). Each group is read or repaired atomically
(one MULTI, one script), so they are safe while workers run.

The reply keys of recent calls (``<prefix>:reply:<token>``, kept a minute so that a call
re-sent after its reply was lost acts once; see ``astages._scripts``) belong to no group:
repair and check never look at them (they walk ``<prefix>:{*`` and the index), and
purge_all deletes them with the rest.
"""

from __future__ import annotations

import re
from collections import Counter, defaultdict
from dataclasses import dataclass
from typing import Any

from arq.connections import ArqRedis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from astages._keys import DEFAULT_PREFIX, Keys
from astages._scripts import Store, text
from astages._stats import count_actions
from astages.exceptions import AstagesError
from astages.models import CODES, JobStatus

__all__ = ["CleanupReport", "Cleaner"]

SCAN_COUNT = 1_000
# Job codes of a job arq holds (queued, running, pending_re_run).
WITH_ARQ = frozenset("qre")


def _glob_escape(text_: str) -> str:
    return re.sub(r"([*?\[\]\\])", r"\\\1", text_)


@dataclass(frozen=True, slots=True)
class CleanupReport:
    """What ``Cleaner.cleanup_jobs`` repaired. Stages are named ``<group id>:<number>``,
    jobs by their arq job id; ``errors`` lists (group id, why) for groups it could not
    repair (data astages did not write)."""

    groups_recreated: tuple[str, ...] = ()
    groups_reindexed: tuple[str, ...] = ()
    index_dropped: tuple[str, ...] = ()
    stages_recreated: tuple[str, ...] = ()
    stages_relinked: tuple[str, ...] = ()
    stages_dropped: tuple[str, ...] = ()
    jobs_relinked: tuple[str, ...] = ()
    errors: tuple[tuple[str, str], ...] = ()

    @property
    def repaired(self) -> int:
        """How many repairs were made in all."""
        return sum(len(getattr(self, name)) for name in REPAIRS)


# repair_group.lua's kinds -> CleanupReport fields
_KINDS = {
    "group_recreated": "groups_recreated",
    "group_reindexed": "groups_reindexed",
    "index_dropped": "index_dropped",
    "stage_recreated": "stages_recreated",
    "stage_relinked": "stages_relinked",
    "stage_dropped": "stages_dropped",
    "job_relinked": "jobs_relinked",
}
# The CleanupReport fields that list repairs (every field but errors).
REPAIRS = tuple(_KINDS.values())


class Cleaner:
    """Operations over every astages key of one prefix (class methods only)."""

    @classmethod
    async def purge_all(cls, redis: ArqRedis, *, prefix: str = DEFAULT_PREFIX) -> int:
        """Delete every key astages owns under ``prefix`` (SCAN + UNLINK); nothing else is
        touched. Returns how many keys were deleted."""
        deleted = 0
        batch: list[bytes] = []
        async for key in redis.scan_iter(match=_glob_escape(prefix) + ":*", count=SCAN_COUNT):
            batch.append(key)
            if len(batch) >= SCAN_COUNT:
                deleted += int(await redis.unlink(*batch))
                batch = []
        if batch:
            deleted += int(await redis.unlink(*batch))
        return deleted

    @classmethod
    async def _group_keys(cls, redis: ArqRedis, keys: Keys) -> dict[str, set[str]]:
        """Every group id that has a key (or an index entry), with the stage numbers found."""
        pattern = re.compile(re.escape(keys.prefix) + r":\{([^}]*)\}(?::s:([^:]*))?")
        found: dict[str, set[str]] = defaultdict(set)
        async for raw in redis.scan_iter(match=_glob_escape(keys.prefix) + ":{*", count=SCAN_COUNT):
            m = pattern.match(text(raw))
            if m is None:
                continue
            found[m.group(1)]
            if m.group(2) is not None:
                found[m.group(1)].add(m.group(2))
        async for member, _ in redis.zscan_iter(keys.index, count=SCAN_COUNT):
            found[text(member)]
        return found

    @classmethod
    async def cleanup_jobs(cls, redis: ArqRedis, *, prefix: str = DEFAULT_PREFIX) -> CleanupReport:
        """Repair orphans (see the module doc) and report what was done. A recreated group
        that runs is moved on at once (a stage whose jobs are all final completes)."""
        keys = Keys(prefix)
        store = Store(redis, keys)
        done: dict[str, list[str]] = defaultdict(list)
        errors: list[tuple[str, str]] = []
        for group_id, numbers in (await cls._group_keys(redis, keys)).items():
            bad = sorted(n for n in numbers if not _is_int(n))
            if bad:
                errors.append((group_id, f"stage keys with a number that is not an int: {bad}"))
            try:
                reply = await store.run("repair_group", group_id, *sorted((n for n in numbers if _is_int(n)), key=int))
                kinds = [text(x) for x in reply]
                for kind, detail in zip(kinds[::2], kinds[1::2], strict=True):
                    done[_KINDS[kind]].append(detail)
                status: Any = await store.redis.hget(keys.group(group_id), "status")
                if kinds and status == b"running":
                    await store.move("nudge", group_id)
            except (RedisConnectionError, RedisTimeoutError):
                raise
            except (RedisError, AstagesError) as e:
                errors.append((group_id, f"{type(e).__name__}: {e}"))
        await count_actions(redis, keys, "cleaner", {"cleanups": 1, "errors": len(errors)})
        await count_actions(redis, keys, "cleaner", {kind: len(done[field]) for kind, field in _KINDS.items()})
        return CleanupReport(**{field: tuple(items) for field, items in done.items()}, errors=tuple(errors))

    @classmethod
    async def check(cls, redis: ArqRedis, *, prefix: str = DEFAULT_PREFIX) -> dict[str, tuple[str, ...]]:
        """Every breach of the invariants, per group id (only groups with a breach; an empty
        dict means all is well). Checked for every live group, each read atomically:

        - the group is indexed and its hash exists; every listed stage exists;
        - per stage, open + finished = total, and its counters match its jobs;
        - every job is in exactly one state (one of :open/:done, and in the job list once);
        - open jobs have an open status, finished ones a final status;
        - a complete stage has no open job;
        - no job is queued, running or finished in a stage that was not initiated, and no
          stage runs in a group that was not initiated;
        - flow control: a running stage's jobs in flight are within its max_in_flight, its
          group's (every running stage counted) within the group's, and every pending job
          of a running stage is at or after its cursor (waiting for the window)."""
        keys = Keys(prefix)
        out: dict[str, tuple[str, ...]] = {}
        async for member, _ in redis.zscan_iter(keys.index, count=SCAN_COUNT):
            group_id = text(member)
            try:
                breaches = await cls._check_group(redis, keys, group_id)
            except (RedisConnectionError, RedisTimeoutError):
                raise
            except (RedisError, ValueError, KeyError, IndexError) as e:
                breaches = [f"unreadable: {type(e).__name__}: {e}"]
            if breaches:
                out[group_id] = tuple(breaches)
        return out

    @classmethod
    async def _check_group(cls, redis: ArqRedis, keys: Keys, group_id: str) -> list[str]:
        for _ in range(5):
            numbers = [text(n) for n in await redis.zrange(keys.stages(group_id), 0, -1)]
            async with redis.pipeline(transaction=True) as pipe:
                pipe.zscore(keys.index, group_id)
                pipe.hgetall(keys.group(group_id))
                pipe.zrange(keys.stages(group_id), 0, -1)
                for n in numbers:
                    sk = keys.stage(group_id, int(n))
                    pipe.hgetall(sk)
                    pipe.lrange(f"{sk}:jobs", 0, -1)
                    pipe.hgetall(f"{sk}:open")
                    pipe.hgetall(f"{sk}:done")
                replies = await pipe.execute(raise_on_error=False)
            failed = [r for r in replies if isinstance(r, ResponseError)]
            if failed:
                return [f"corrupt record: {failed[0]}"]
            indexed, group, listed = replies[0], replies[1], [text(n) for n in replies[2]]
            if listed != numbers:
                continue  # a stage was added or deleted meanwhile: read again
            if indexed is None or (not group and not numbers):
                # finished or deleted meanwhile; or an index entry with nothing behind it
                # (a group kept with keep_for whose keys expired): cleanup_jobs drops it
                return []
            return _group_breaches(group, numbers, replies[3:])
        return ["stages keep changing; not checked"]


def _is_int(value: str) -> bool:
    try:
        int(value)
    except ValueError:
        return False
    return True


def _group_breaches(group: dict[bytes, bytes], numbers: list[str], rows: list[Any]) -> list[str]:
    if not group:
        return ["the group's hash is missing but its stages exist"]
    out: list[str] = []
    group_status = text(group.get(b"status", b""))
    in_flight = 0  # of the group's running stages (its max_in_flight counts them all)
    for i, n in enumerate(numbers):
        stage, jobs, open_, done = rows[4 * i : 4 * i + 4]
        where = f"stage {n}"
        if not stage:
            out.append(f"{where} is listed but its hash is missing")
            continue
        status = text(stage.get(b"status", b""))
        seqs = [text(s) for s in jobs]
        opens = {text(k): text(v) for k, v in open_.items()}
        dones = {text(k): text(v) for k, v in done.items()}
        if len(opens) + len(dones) != len(seqs):
            out.append(f"{where}: open {len(opens)} + finished {len(dones)} != total {len(seqs)}")
        both = sorted(set(opens) & set(dones), key=int)
        if both:
            out.append(f"{where}: jobs both open and finished: {both[:10]}")
        listed = Counter(seqs)
        twice = sorted((s for s, c in listed.items() if c > 1), key=int)
        if twice:
            out.append(f"{where}: jobs listed more than once: {twice[:10]}")
        stateless = sorted((s for s in listed if s not in opens and s not in dones), key=int)
        if stateless:
            out.append(f"{where}: jobs in no state: {stateless[:10]}")
        unlisted = sorted((s for s in {**opens, **dones} if s not in listed), key=int)
        if unlisted:
            out.append(f"{where}: jobs missing from the stage's job list: {unlisted[:10]}")
        counts: Counter[str] = Counter()
        for part, codes, final in (("open", opens, False), ("finished", dones, True)):
            for seq, code in codes.items():
                job = CODES.get(code[:1])
                if job is None:
                    out.append(f"{where}: job {seq} has an unknown status code {code!r}")
                    continue
                counts[job.value] += 1
                if job.completed != final:
                    out.append(f"{where}: {part} job {seq} has status {job.value}")
        for job_status in JobStatus:
            name = job_status.value
            recorded = int(stage.get(name.encode(), 0))
            if recorded != counts[name]:
                out.append(f"{where}: counter {name} is {recorded}, its jobs say {counts[name]}")
        if status == "complete" and opens:
            out.append(f"{where} is complete but has {len(opens)} open jobs")
        if status == "pending":
            sent = sorted((s for s, c in opens.items() if c[:1] in WITH_ARQ), key=int) + sorted(dones, key=int)
            if sent:
                out.append(f"{where} was not initiated but jobs were sent or finished: {sent[:10]}")
        if status in ("running", "complete") and group_status == "pending":
            out.append(f"{where} is {status} in a group that was not initiated")
        if status == "running":
            out.extend(_flow_breaches(where, stage, seqs, opens))
            in_flight += counts["queued"] + counts["running"] + counts["pending_re_run"]
    group_cap = _cap(group.get(b"max_in_flight"))
    if group_cap is not None:  # lowered under the jobs then in flight: they drain first
        group_cap = max(group_cap, _cap(group.get(b"cap_drain")) or 0)
    if group_cap is not None and in_flight > group_cap:
        out.append(f"the group has {in_flight} jobs in flight > its max_in_flight {group_cap}")
    return out


def _cap(raw: bytes | None) -> int | None:
    try:
        return None if raw is None else int(float(raw))
    except ValueError:
        return None


def _flow_breaches(where: str, stage: dict[bytes, bytes], seqs: list[str], opens: dict[str, str]) -> list[str]:
    """Flow control's invariants of a running stage (issue 13): its jobs in flight are
    within its max_in_flight, and every pending job is at or after its cursor (waiting
    for the window), none skipped before it."""
    out = []
    flight = sum(1 for code in opens.values() if code[:1] in WITH_ARQ)
    cap = _cap(stage.get(b"max_in_flight"))
    if cap is not None:  # lowered under the jobs then in flight: they drain first
        cap = max(cap, _cap(stage.get(b"cap_drain")) or 0)
    if cap is not None and flight > cap:
        out.append(f"{where}: in flight {flight} > max_in_flight {cap}")
    cursor = _cap(stage.get(b"cursor")) or 0
    skipped = [s for s in seqs[:cursor] if opens.get(s) == "p"]
    if skipped:
        out.append(f"{where}: pending jobs before the cursor (never to be sent): {skipped[:10]}")
    return out
