"""Catch the summary a group's end publishes, subscribed before the action that ends it.

``group.wait()`` subscribes and then reads the group, so it never misses an end; but it
cannot tell its caller when the subscription is active. A caller that is about to end
the group itself (``astages cancel``) or to start the workers that will (``astages
demo``) needs that: a group that is not kept with ``keep_for`` is deleted in the same
step that ends it, so the summary published on its channel is the only record of how
it ended. ``EndListener`` returns from ``__aenter__`` once Redis has confirmed the
subscription.
"""

from __future__ import annotations

import json
from types import TracebackType
from typing import Any

import anyio

from astages.group import StagedGroup
from astages.models import GroupSummary

__all__ = ["EndListener"]


class EndListener:
    """``async with EndListener(group) as ending: ...; summary = await ending.summary(5)``"""

    def __init__(self, group: StagedGroup) -> None:
        self.group = group
        self.deleted = False
        self._pubsub: Any = None  # redis-py's PubSub (its aclose is untyped)

    async def __aenter__(self) -> EndListener:
        pubsub = self.group.redis.pubsub()
        self._pubsub = pubsub
        try:
            await pubsub.subscribe(self.group.store.keys.finished_channel(self.group.id))
            with anyio.fail_after(10):
                async for message in pubsub.listen():
                    if message.get("type") == "subscribe":
                        break
        except BaseException:
            await pubsub.aclose()
            raise
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._pubsub is not None:
            await self._pubsub.aclose()

    async def summary(self, timeout: float) -> GroupSummary | None:  # noqa: ASYNC109 - a bound on one read
        """The summary of the group's end, once published; None when the group was deleted
        (``self.deleted`` is then True) or nothing came within ``timeout`` seconds."""
        assert self._pubsub is not None, "use EndListener in an async with block"
        with anyio.move_on_after(timeout):
            async for message in self._pubsub.listen():
                if message.get("type") != "message":
                    continue
                if json.loads(message["data"]).get("outcome") == "deleted":
                    self.deleted = True
                    return None
                return GroupSummary.from_json(message["data"])
        return None
