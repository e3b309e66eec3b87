"""The Lua scripts: loaded once from ``lua/``, called with the shared leading arguments.

Each ``lua/<name>.lua`` is one state transition; ``lua/_lib.lua`` (its helpers and the
key layout) is prepended to each. Scripts run with EVALSHA and redis-py's NOSCRIPT
fallback, so a SCRIPT FLUSH or a server restart costs one extra round trip.

A command whose reply was lost on a dropped connection is sent again by the retry policy
(``astages.runner.reconnecting``), after Redis may have run it. The scripts a worker runs
for each job (``REPEATABLE``) are idempotent per job and try. Every other script (the
calls a user makes) runs once per call: the call carries a random token, and the script
keeps its reply under ``<prefix>:reply:<token>`` for a minute, so the same call re-sent
gets the first reply back without acting again (see ``once`` in ``lua/_lib.lua``).
"""

from __future__ import annotations

import asyncio
import secrets
from importlib import resources
from typing import Any, NamedTuple

from arq.connections import ArqRedis
from arq.constants import expires_extra_ms as ARQ_EXPIRES_EXTRA_MS
from arq.constants import job_key_prefix as ARQ_JOB_KEY_PREFIX
from redis.commands.core import AsyncScript
from redis.exceptions import NoScriptError, ResponseError

from astages._keys import Keys
from astages.exceptions import CorruptRecord, GroupFinished, GroupNotFound, StageComplete, StageNotFound
from astages.models import now_ms

# How often a script call is tried when the server's script cache keeps being flushed
# (redis-py reloads a script once on NOSCRIPT; every script is safe to repeat).
NOSCRIPT_TRIES = 3

# How many jobs one script call hands to arq: a bigger stage is sent in chunks, so
# Redis is never blocked for long (about 5 ms per 1,000 jobs).
SEND_LIMIT = 1000
# ... in a worker's report that starts a stage: its first jobs are in arq's queue sooner
# (and taken while the rest is sent on in chunks of SEND_LIMIT).
FIRST_CHUNK = 100


# Scripts safe to repeat as they are, run on every job's path (a worker's start and
# report, sending a big stage on) or by the maintenance passes (the sweeper's probe,
# nudge and unindex, the Cleaner's repair): they pay nothing for lost replies. Every
# other script runs once per call (see the module doc).
REPEATABLE = frozenset(
    {
        "start_job",
        "finish_job",
        "start_jobs",
        "finish_jobs",
        "claim_jobs",
        "end_jobs",
        "probe_jobs",
        "send_more",
        "nudge",
        "repair_group",
        "unindex",
    }
)


def _once(body: str) -> str:
    """A script's text made to run once per call: its body becomes a function that
    ``once`` (in ``_lib.lua``) runs unless the call's reply is kept already."""
    return f"local function body()\n{body}\nend\nreturn once(body)\n"


def _load() -> dict[str, bytes]:
    """Every ``lua/<name>.lua`` but the shared ``_lib.lua``, with the lib prepended."""
    folder = resources.files("astages") / "lua"
    lib = (folder / "_lib.lua").read_text(encoding="utf-8")
    scripts = {}
    for entry in folder.iterdir():
        if entry.name.endswith(".lua") and not entry.name.startswith("_"):
            name = entry.name.removesuffix(".lua")
            body = entry.read_text(encoding="utf-8")
            scripts[name] = (lib + "\n" + (body if name in REPEATABLE else _once(body))).encode()
    return scripts


def _token() -> str:
    """A call's random token (64 bits: no two calls within a reply's life share one)."""
    return secrets.token_hex(8)


class _Script(AsyncScript):
    """An AsyncScript that needs no client to be made (its text is bytes)."""

    def __init__(self, text: bytes) -> None:
        super().__init__(None, text)  # type: ignore[arg-type]


SCRIPTS: dict[str, AsyncScript] = {name: _Script(text) for name, text in _load().items()}


def text(value: Any) -> str:
    """A script reply element as str."""
    if isinstance(value, bytes):
        return value.decode()
    return str(value)


class Motion(NamedTuple):
    """What a transition did to its group: ``outcome`` names it (see finish_job.lua),
    ``stage`` is the stage concerned, ``unsent`` the jobs still waiting for a chunk, and
    ``open`` (a report's 'open' of a running stage) how many of that stage's jobs are
    open (-1: not told). A named tuple: a worker makes one per report."""

    outcome: str
    stage: str
    unsent: int
    open: int = -1

    @property
    def finished(self) -> bool:
        return self.outcome == "finished"

    @classmethod
    def of(cls, reply: Any) -> Motion:
        if len(reply) > 3:
            return cls(text(reply[0]), text(reply[1]), reply[2], reply[3])
        outcome, stage, unsent = reply
        return cls(text(outcome), text(stage), int(unsent))


# Scripts after which the stages of a group filled in within_a_grouping are all still
# pending, so enqueued jobs may keep being buffered (any other call ends the buffering).
_KEEPS_STAGES_PENDING = frozenset(
    {"create_group", "ensure_stage", "add_callback", "configure", "set_limits", "set_message", "enqueue", "reserve"}
)


class Store:
    """A Redis connection, a key prefix and the scripts: what every astages object uses."""

    __slots__ = ("buffer", "expires_extra_ms", "keys", "redis", "send_limit")

    def __init__(self, redis: ArqRedis, keys: Keys, send_limit: int | None = None) -> None:
        # Typed Any: redis-py's asyncio stubs give every reply as "Awaitable[T] | T".
        self.redis: Any = redis
        self.keys = keys
        self.expires_extra_ms = int(getattr(redis, "expires_extra_ms", ARQ_EXPIRES_EXTRA_MS))
        # Jobs enqueued inside within_a_grouping, not yet written (see RecordBuffer).
        self.buffer: RecordBuffer | None = None
        # How many jobs one call hands to arq (None: SEND_LIMIT; see FIRST_CHUNK).
        self.send_limit = send_limit

    async def flush(self) -> None:
        """Write the jobs buffered inside within_a_grouping; every read and every other
        script call does this first, so nothing ever sees the buffer's jobs missing."""
        if self.buffer is not None:
            await self.buffer.flush(self)

    async def run(self, name: str, group_id: str, *args: Any) -> Any:
        """Run script ``name`` for ``group_id`` with its own ``args`` (ARGV[6..]); it hands
        at most ``send_limit`` jobs to arq."""
        await self.flush()
        if name not in _KEEPS_STAGES_PENDING and self.buffer is not None:
            # a stage may start now: later jobs must be recorded (and sent) at once,
            # those of tasks still reserving their ids in the buffer included
            self.buffer.closed = True
            self.buffer = None
        return await self.run_now(name, group_id, *args)

    async def run_now(self, name: str, group_id: str, *args: Any) -> Any:
        """``run`` without writing buffered jobs first (the buffer's own calls)."""
        keys: tuple[str, ...] = (self.keys.group(group_id), self.keys.index)
        if name not in REPEATABLE:
            # the call's reply key: the same command re-sent after a lost reply finds it
            keys = (*keys, self.keys.reply(_token()))
        argv = (
            self.keys.job_id_base(group_id),
            ARQ_JOB_KEY_PREFIX,
            self.expires_extra_ms,
            SEND_LIMIT if self.send_limit is None else self.send_limit,
            now_ms(),
            *args,
        )
        try:
            for _ in range(NOSCRIPT_TRIES - 1):
                try:
                    return await SCRIPTS[name](keys=keys, args=argv, client=self.redis)
                except NoScriptError:
                    continue  # flushed again between redis-py's reload and its retry
            return await SCRIPTS[name](keys=keys, args=argv, client=self.redis)
        except ResponseError as e:
            if "WRONGTYPE" in str(e):  # a key of the group holds data astages did not write
                raise CorruptRecord(keys[0], f"{name}: {e}") from e
            raise

    async def move(self, name: str, group_id: str, *args: Any) -> Motion:
        """Run a transition that may move the group on, and finish sending a big stage."""
        reply = await self.run(name, group_id, *args)
        raise_code(reply, group_id, args[0] if args else None)
        motion = Motion.of(reply)
        while motion.unsent > 0:
            reply = await self.run("send_more", group_id)
            raise_code(reply, group_id, None)
            motion = Motion.of(reply)
        return motion

    async def moves(self, name: str, group_id: str, calls: list[tuple[Any, ...]], *head: Any) -> list[Motion]:
        """Run a batch of per-job transitions of one group (``head``, then how many, then
        each call's arguments): each one's motion, in order. The caller sends on a stage
        left unsent (the last motion's ``unsent``)."""
        flat = [a for args in calls for a in args]
        replies = await self.run_now(name, group_id, *head, len(calls), *flat)
        return [Motion.of(reply) for reply in replies]


class RecordBuffer:
    """Jobs enqueued one ``await stage.enqueue(...)`` at a time inside
    ``within_a_grouping`` are written in batches instead of one round trip each.

    Inside the block every stage is pending, so a job is only recorded, never sent; its
    seq (and so its id) comes from a range reserved in the stage, so the handle
    ``enqueue`` returns is complete at once. The buffer is written when it holds
    ``RECORD_BATCH`` jobs, before any other script call or read through the same group
    (``Store.flush``), and when the block ends. An exception in the block drops it with
    the group. Once a call that may start a stage ends the buffering, the buffer is
    ``closed``: a job added by a task that was still reserving its seq is written at once.
    A write that fails keeps what it did not write (the next flush writes it; a run whose
    reply was lost is not recorded twice: enqueue.lua skips reserved seqs it has)."""

    def __init__(self, group_id: str, batch: int) -> None:
        self.group_id = group_id
        self.batch = batch
        self.pending: list[tuple[int, int, bytes]] = []  # (stage, seq, spec) in enqueue order
        self._ranges: dict[int, tuple[int, int, int]] = {}  # stage -> (next seq, last reserved, size)
        self._lock = asyncio.Lock()
        self.closed = False

    async def seq(self, store: Store, number: int) -> int:
        """The next seq of stage ``number``, reserving a range when the last is used up
        (16, doubling to 1,024: a small stage leaves no gap in its numbering)."""
        nxt, last, size = self._ranges.get(number, (1, 0, 8))
        if nxt > last:
            size = min(1024, 2 * size)
            reply = await store.run_now("reserve", self.group_id, number, size)
            raise_code(reply, self.group_id, number)
            last = int(reply)
            nxt = last - size + 1
        self._ranges[number] = (nxt + 1, last, size)
        return nxt

    async def add(self, store: Store, number: int, seq: int, spec: bytes) -> None:
        self.pending.append((number, seq, spec))
        if self.closed or len(self.pending) >= self.batch:
            await self.flush(store)

    async def flush(self, store: Store) -> None:
        """Write what is buffered; also waits for a write another task has under way, so
        a read after it sees every job enqueued before it."""
        if not self.pending and not self._lock.locked():
            return
        async with self._lock:
            todo, self.pending = self.pending, []
            start = 0
            try:
                while start < len(todo):
                    # one call per run of consecutive seqs of one stage (usually: a whole stage)
                    number, first, _ = todo[start]
                    end = start + 1
                    while end < len(todo) and todo[end][0] == number and todo[end][1] == first + (end - start):
                        end += 1
                    specs = [spec for _, _, spec in todo[start:end]]
                    reply = await store.run_now("enqueue", self.group_id, number, "", first, *specs)
                    raise_code(reply, self.group_id, number)
                    start = end
            except BaseException:
                self.pending[:0] = todo[start:]  # not written (or not known to be): kept
                raise


def raise_code(reply: Any, group_id: str, number: Any) -> None:
    """Turn a script's error code into its exception (the one place that does)."""
    if not isinstance(reply, bytes | str):
        return
    code = text(reply)
    if code == "GROUP_GONE":
        raise GroupNotFound(group_id)
    if code == "STAGE_GONE":
        raise StageNotFound(group_id, int(number))
    if code == "GROUP_FINISHED":
        raise GroupFinished(group_id)
    if code == "STAGE_COMPLETE":
        raise StageComplete(group_id, int(number))
    if code == "STAGE_CANCELLED":
        raise StageComplete(group_id, int(number), "cancelled")
    if code.startswith("BAD_SPEC:"):
        # a spec make_spec did not make (another version's, or hand-made): nothing was written
        where = f"group {group_id!r}" if number is None else f"stage {number} of group {group_id!r}"
        index, _, why = code.removeprefix("BAD_SPEC:").partition(":")
        detail = f"job {index} of the call: {why}" if why and index.isdigit() else code.removeprefix("BAD_SPEC:")
        raise CorruptRecord(f"a job spec for {where}", f"{detail}; nothing was recorded")
