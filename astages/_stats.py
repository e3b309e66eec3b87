"""A small per-prefix counter hash, ``<prefix>:stats``, that the sweeper and the Cleaner
add their actions to (``sweeper:<action>``, ``cleaner:<action>``); astages.metrics
exports it. One HINCRBY per kind of action and pass, never per job."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from astages._keys import Keys


def stats_key(keys: Keys) -> str:
    return f"{keys.prefix}:stats"


async def count_actions(redis: Any, keys: Keys, who: str, counts: Mapping[str, int]) -> None:
    """Add ``counts`` (action -> how many, zeros skipped) to ``<prefix>:stats`` as ``<who>:<action>``."""
    todo = {action: n for action, n in counts.items() if n}
    if not todo:
        return
    async with redis.pipeline(transaction=False) as pipe:
        for action, n in todo.items():
            pipe.hincrby(stats_key(keys), f"{who}:{action}", n)
        await pipe.execute()
