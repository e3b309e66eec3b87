"""The Lua scripts: loaded once from ``lua/``, called with the shared leading arguments.

Each ``lua/<name>.lua`` is one state transition; ``lua/_lib.lua`` (its helpers and the
key layout) is prepended to each. Scripts run with EVALSHA and redis-py's NOSCRIPT
fallback, so a SCRIPT FLUSH or a server restart costs one extra round trip. Every script
is idempotent for a given job and try, so a call that failed on a dropped connection is
safe to repeat.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from typing import Any

from arq.connections import ArqRedis
from arq.constants import expires_extra_ms as ARQ_EXPIRES_EXTRA_MS
from arq.constants import job_key_prefix as ARQ_JOB_KEY_PREFIX
from redis.commands.core import AsyncScript
from redis.exceptions import NoScriptError, ResponseError

from astages._keys import Keys
from astages.exceptions import CorruptRecord, GroupFinished, GroupNotFound, StageComplete, StageNotFound

# How often a script call is tried when the server's script cache keeps being flushed
# (redis-py reloads a script once on NOSCRIPT; every script is safe to repeat).
NOSCRIPT_TRIES = 3

# How many jobs one script call hands to arq: a bigger stage is sent in chunks, so
# Redis is never blocked for long (about 5 ms per 1,000 jobs).
SEND_LIMIT = 1000


def _load() -> dict[str, bytes]:
    """Every ``lua/<name>.lua`` but the shared ``_lib.lua``, with the lib prepended."""
    folder = resources.files("astages") / "lua"
    lib = (folder / "_lib.lua").read_text(encoding="utf-8")
    return {
        entry.name.removesuffix(".lua"): (lib + "\n" + entry.read_text(encoding="utf-8")).encode()
        for entry in folder.iterdir()
        if entry.name.endswith(".lua") and not entry.name.startswith("_")
    }


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


@dataclass(frozen=True, slots=True)
class Motion:
    """What a transition did to its group: ``outcome`` names it (see finish_job.lua),
    ``stage`` is the stage concerned, ``unsent`` the jobs still waiting for a chunk."""

    outcome: str
    stage: str
    unsent: int

    @property
    def finished(self) -> bool:
        return self.outcome == "finished"

    @classmethod
    def of(cls, reply: Any) -> Motion:
        outcome, stage, unsent = reply
        return cls(text(outcome), text(stage), int(unsent))


class Store:
    """A Redis connection, a key prefix and the scripts: what every astages object uses."""

    __slots__ = ("expires_extra_ms", "keys", "redis")

    def __init__(self, redis: ArqRedis, keys: Keys) -> None:
        # Typed Any: redis-py's asyncio stubs give every reply as "Awaitable[T] | T".
        self.redis: Any = redis
        self.keys = keys
        self.expires_extra_ms = int(getattr(redis, "expires_extra_ms", ARQ_EXPIRES_EXTRA_MS))

    async def run(self, name: str, group_id: str, *args: Any) -> Any:
        """Run script ``name`` for ``group_id`` with its own ``args`` (ARGV[5..])."""
        keys = (self.keys.group(group_id), self.keys.index)
        argv = (self.keys.job_id_base(group_id), ARQ_JOB_KEY_PREFIX, self.expires_extra_ms, SEND_LIMIT, *args)
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
