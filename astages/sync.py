"""Build and start a group from synchronous code (Django, Flask, scripts)::

    import astages.sync

    with astages.sync.within_a_grouping("redis://localhost:6379/0", "nightly import") as group:
        for url in urls:
            group.stage(1, name="fetch").enqueue("fetch", url)
        group.stage(2).enqueue("aggregate")
        group.on_complete("report")
    summary = astages.sync.wait("redis://localhost:6379/0", group.id, timeout=600)

Each block runs the async API in an event loop of its own, in a helper thread
(``anyio.from_thread.start_blocking_portal``, one portal per block, with one connection);
every call of the async API is a plain call here and does exactly what it does there
(same rules, same errors). Handles returned inside the block (groups, stages, jobs) are
usable until the block ends; ``id``, ``number``, ``args`` and the like stay readable after.
Leaving the block starts the group, as ``astages.within_a_grouping`` does; an exception in
the block deletes it (nothing was sent) and propagates.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from anyio.from_thread import BlockingPortal, start_blocking_portal
from arq.connections import ArqRedis, RedisSettings, create_pool

from astages._keys import DEFAULT_PREFIX
from astages.group import StagedGroup
from astages.group import within_a_grouping as _async_grouping
from astages.job import StagedJob
from astages.models import GroupSummary
from astages.runner import reconnecting
from astages.stage import StagedGroupStage

__all__ = ["Blocking", "wait", "within_a_grouping"]

Server = str | RedisSettings


def _settings(redis: Server) -> RedisSettings:
    if isinstance(redis, RedisSettings):
        return redis
    if isinstance(redis, str):
        try:
            return RedisSettings.from_dsn(redis)
        except (RuntimeError, ValueError) as e:
            raise ValueError(f"{redis!r} is not a Redis URL (redis://host:port/db, rediss://, unix://)") from e
    raise TypeError(
        "astages.sync takes a Redis URL or arq RedisSettings, not "
        f"{type(redis).__name__}: a connection belongs to the event loop that made it, and each "
        "block runs its own"
    )


async def _pool(settings: RedisSettings) -> ArqRedis:
    # astages' retry policy: a call whose reply was lost is sent again and acts once
    return await create_pool(reconnecting(settings))


class Blocking:
    """A handle of the async API (``StagedGroup``, ``StagedGroupStage``, ``StagedJob``)
    whose coroutine methods are plain calls, run in the block's event loop. Attributes
    and plain methods are the handle's own; handles they return are wrapped too."""

    __slots__ = ("_portal", "_target")

    def __init__(self, portal: BlockingPortal, target: Any) -> None:
        self._portal = portal
        self._target = target

    def __repr__(self) -> str:
        return f"<blocking {self._target!r}>"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Blocking) and other._target == self._target

    def __hash__(self) -> int:
        return hash(self._target)

    @property
    def target(self) -> Any:
        """The async handle this one wraps."""
        return self._target

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._target, name)
        if not callable(attr):
            return attr
        portal = self._portal
        if inspect.iscoroutinefunction(attr):

            @functools.wraps(attr)
            def call(*args: Any, **kwargs: Any) -> Any:
                return _wrap(portal, portal.call(functools.partial(attr, *args, **kwargs)))

            return call

        @functools.wraps(attr)
        def plain(*args: Any, **kwargs: Any) -> Any:
            return _wrap(portal, attr(*args, **kwargs))

        return plain


def _wrap(portal: BlockingPortal, value: Any) -> Any:
    if isinstance(value, StagedGroup | StagedGroupStage | StagedJob):
        return Blocking(portal, value)
    if isinstance(value, list) and value and isinstance(value[0], StagedGroupStage | StagedJob):
        return [Blocking(portal, v) for v in value]
    return value


@contextmanager
def within_a_grouping(
    redis: Server,
    description: str = "",
    *,
    prefix: str = DEFAULT_PREFIX,
    **options: Any,
) -> Iterator[Any]:
    """``astages.within_a_grouping`` for synchronous code: a group (a ``Blocking``
    ``StagedGroup``) whose ``stage(n).enqueue(...)``, ``on_complete(...)`` and every
    other call are plain calls. ``redis`` is a Redis URL or arq ``RedisSettings``;
    ``options`` are those of ``StagedGroup.create`` (``keep_for``, ``events``,
    ``failure_policy``, ``ttl``). The group starts when the block ends."""
    settings = _settings(redis)
    with start_blocking_portal() as portal:
        pool = portal.call(_pool, settings)
        try:
            grouping = _async_grouping(pool, description, prefix=prefix, **options)
            with portal.wrap_async_context_manager(grouping) as group:
                yield Blocking(portal, group)
        finally:
            portal.call(pool.aclose)


@contextmanager
def _session(redis: Server) -> Iterator[Callable[..., Any]]:
    """A portal and a connection: yields ``call(f, *args)``, which runs ``f(pool, *args)``."""
    settings = _settings(redis)
    with start_blocking_portal() as portal:
        pool = portal.call(_pool, settings)
        try:

            def call(function: Callable[..., Any], *args: Any) -> Any:
                return portal.call(function, pool, *args)

            yield call
        finally:
            portal.call(pool.aclose)


def wait(redis: Server, group_id: str, timeout: float | None = None, *, prefix: str = DEFAULT_PREFIX) -> GroupSummary:
    """Block until group ``group_id`` ends and return its summary (``StagedGroup.wait``):
    GroupNotFound when it is gone (deleted, or it ended before the call and was not made
    with ``keep_for``: give a group you wait for from another call a ``keep_for``),
    TimeoutError after ``timeout`` seconds."""

    async def waiting(pool: ArqRedis) -> GroupSummary:
        group = await StagedGroup.load(pool, group_id, prefix=prefix)
        return await group.wait(timeout)

    with _session(redis) as call:
        summary: GroupSummary = call(waiting)
        return summary
