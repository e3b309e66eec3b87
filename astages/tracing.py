"""OpenTelemetry spans for staged runs (the ``tracing`` extra: ``opentelemetry-api``).

One trace shows a whole staged run: a span for the group, one per stage (child of the
group's) and one per run of a staged job (child of its stage's)::

    astages group <description>          created .. ended
      astages stage 1                    started .. ended
        <function name>  try 1           one run of a job, in the worker that ran it
        <function name>  try 2
      astages stage 2
        ...

Trace context. A group's trace id is its id (a UUIDv7: 128 bits) and the span ids of its
group and stage spans are derived from it (``group_span_id``, ``stage_span_id``), so any
process can parent a span on a stage without asking anyone. When the code creating a group
runs inside a span (a web request, say), the group joins that trace instead: the caller's
trace id, span id and flags are kept in the group hash's ``trace`` field (written by
create_group.lua) and the group span is that span's child.

Who emits what:

- job span: the worker that runs the job, around the function (it is the current span
  while the function runs, so the function's own spans nest under it). A worker reads the
  group hash (``trace``, ``created``, ``initiated``) and the stage's ``started`` once per
  group and stage it runs jobs of (one pipelined round trip, cached for ``CACHE_GROUPS``
  groups), never once per job.
- stage span: the worker whose report ended the stage (its reply says so: ``complete``,
  ``running`` (the group moved on) or ``finished``), from the stage's ``started`` to the
  time the reply came back (the script's own end time differs by at most the round trip).
- group span: the worker whose report finished the group, from ``created`` to the reply.

Approximated or not covered: a stage or group ended by a cancel, a delete, the sweeper (a
lost job's settlement) or a failure policy's stop of *another* stage gets no span from
this version (its job spans still share the trace, under a parent that is not exported);
an empty stage (completed as the group moved past it) gets none; when the report that
finished a group was a failure, the group and stage outcome is recorded as ``ended`` (it
is ``complete``, or ``failed`` by the failure policy: the reply does not tell which).
Stage and group spans need the OpenTelemetry SDK (their span ids are chosen, which the
bare API cannot do); with another provider only job spans are made.

Cost: without the extra installed (or with ``ASTAGES_TRACING=0``, or no tracer provider
configured when the worker starts) ``ACTIVE`` is None and a staged job pays one check of
it; nothing else runs.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from redis.exceptions import RedisError

from astages._keys import JobRef, Keys

try:  # the one guarded import: the extra may not be installed
    from opentelemetry import context as otel_context
    from opentelemetry import trace as otel_trace
except ImportError:  # pragma: no cover - exercised by the no-extra cost check
    otel_trace = None  # type: ignore[assignment]
    otel_context = None  # type: ignore[assignment]

__all__ = [
    "ACTIVE",
    "CACHE_GROUPS",
    "TRACE_FIELD",
    "Tracing",
    "disable",
    "enable",
    "group_span_id",
    "parent_field",
    "setup",
    "stage_span_id",
    "trace_id_of",
]

logger = logging.getLogger("astages.tracing")

# The group hash field that keeps the creating caller's span: "<trace id>-<span id>-<flags>" (hex).
TRACE_FIELD = "trace"
# How many groups a worker keeps the trace context and times of (least recently used dropped).
CACHE_GROUPS = 4096
# The tracer (and the process-wide switch the worker checks once per job): None when off.
ACTIVE: Tracing | None = None

SAMPLED = 0x01


def _hash(text: str, size: int) -> int:
    value = int.from_bytes(hashlib.blake2b(text.encode(), digest_size=size).digest(), "big")
    return value or 1  # 0 is the invalid id


def trace_id_of(group_id: str) -> int:
    """The trace id of a group created outside any span: its id (32 hex digits)."""
    try:
        value = int(group_id, 16) if len(group_id) == 32 else 0
    except ValueError:
        value = 0
    return value or _hash(group_id, 16)


def group_span_id(group_id: str) -> int:
    """The span id of the group's span."""
    return _hash(f"{group_id}/group", 8)


def stage_span_id(group_id: str, number: int) -> int:
    """The span id of stage ``number``'s span: any process derives it, nothing is read."""
    return _hash(f"{group_id}/stage/{number}", 8)


def parent_field() -> str:
    """What create_group stores in the ``trace`` field: the caller's current span as
    ``<trace id>-<span id>-<flags>`` (hex), or '' (no span, or the extra not installed)."""
    if otel_trace is None:
        return ""
    sc = otel_trace.get_current_span().get_span_context()
    if not sc.is_valid:
        return ""
    return f"{sc.trace_id:032x}-{sc.span_id:016x}-{int(sc.trace_flags):02x}"


def _parse_parent(raw: Any) -> tuple[int, int, int] | None:
    """(trace id, span id, flags) of a ``trace`` field; None when absent or unreadable."""
    if not raw:
        return None
    try:
        text = raw.decode() if isinstance(raw, bytes) else str(raw)
        trace_hex, span_hex, flags_hex = text.split("-")
        trace_id, span_id, flags = int(trace_hex, 16), int(span_hex, 16), int(flags_hex, 16)
    except ValueError:
        return None
    if not trace_id or not span_id:
        return None
    return trace_id, span_id, flags


def _ms(raw: Any) -> int | None:
    try:
        return int(raw) if raw is not None else None
    except (TypeError, ValueError):
        return None


@dataclass(slots=True)
class _Group:
    """What a worker knows of a group's trace: ids, flags and times (epoch ms)."""

    group_id: str
    trace_id: int
    parent: int  # the caller's span id (0: the group span is a root)
    flags: int
    created: int | None
    initiated: int | None
    started: dict[int, int | None] = field(default_factory=dict)  # stage -> its 'started'
    ended: set[int] = field(default_factory=set)  # stages whose span this process emitted


class _FixedIds:
    """The id generator of astages' own tracer: random ids (the provider's generator) but
    for the group and stage spans, whose ids are set just before they are made."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.trace_id: int | None = None
        self.span_id: int | None = None

    def generate_trace_id(self) -> int:
        return self.trace_id if self.trace_id is not None else int(self.inner.generate_trace_id())

    def generate_span_id(self) -> int:
        return self.span_id if self.span_id is not None else int(self.inner.generate_span_id())

    def is_trace_id_random(self) -> bool:
        return self.trace_id is None and bool(getattr(self.inner, "is_trace_id_random", lambda: False)())


class Tracing:
    """The spans of staged runs, made with ``provider`` (the global tracer provider when
    None). One per process (``ACTIVE``): its cache is shared by the process' workers."""

    def __init__(self, provider: Any = None, cache: int = CACHE_GROUPS) -> None:
        if otel_trace is None:
            raise RuntimeError("astages tracing needs the tracing extra: pip install 'astages[tracing]'")
        provider = provider if provider is not None else otel_trace.get_tracer_provider()
        from astages import __version__

        self.tracer: Any = provider.get_tracer("astages", __version__)
        # Stage and group spans have chosen ids: only the SDK's tracer lets us choose them.
        self.fixed: _FixedIds | None = None
        if hasattr(self.tracer, "id_generator"):
            self.fixed = _FixedIds(self.tracer.id_generator)
            self.tracer.id_generator = self.fixed
        self.cache = cache
        self._groups: OrderedDict[str, _Group] = OrderedDict()

    # -- trace context ------------------------------------------------------------------

    async def group(self, redis: Any, keys: Keys, group_id: str, stage: int) -> _Group | None:
        """The group's trace context and times, with stage ``stage``'s start: from the
        cache, else one pipelined read (None when Redis could not be read)."""
        entry = self._groups.get(group_id)
        if entry is not None and stage in entry.started:
            self._groups.move_to_end(group_id)
            return entry
        try:
            async with redis.pipeline(transaction=False) as pipe:
                pipe.hmget(keys.group(group_id), TRACE_FIELD, "created", "initiated")
                pipe.hget(keys.stage(group_id, stage), "started")
                (raw, created, initiated), started = await pipe.execute()
        except RedisError:
            logger.debug("could not read the trace context of group %s", group_id, exc_info=True)
            return None
        if entry is None:
            parent = _parse_parent(raw)
            trace_id, span_id, flags = parent if parent else (trace_id_of(group_id), 0, SAMPLED)
            entry = _Group(group_id, trace_id, span_id, flags, _ms(created), _ms(initiated))
            self._groups[group_id] = entry
            while len(self._groups) > self.cache:
                self._groups.popitem(last=False)
        entry.started[stage] = _ms(started)
        return entry

    def _context(self, trace_id: int, span_id: int, flags: int) -> Any:
        assert otel_trace is not None
        sc = otel_trace.SpanContext(trace_id, span_id, is_remote=True, trace_flags=otel_trace.TraceFlags(flags))
        return otel_trace.set_span_in_context(otel_trace.NonRecordingSpan(sc))

    # -- job spans ----------------------------------------------------------------------

    async def job(
        self,
        redis: Any,
        keys: Keys,
        ctx: dict[str, Any],
        ref: JobRef,
        name: str,
        max_tries: int,
        retry_jobs: bool,
        call: Callable[[], Awaitable[Any]],
    ) -> Any:
        """Run ``call`` (one try of a staged job) inside its span, the child of its stage's."""
        assert otel_trace is not None
        g = await self.group(redis, keys, ref.group_id, ref.stage)
        parent = None
        if g is not None:
            parent = self._context(g.trace_id, stage_span_id(ref.group_id, ref.stage), g.flags)
        job_try = int(ctx.get("job_try") or 1)
        span = self.tracer.start_span(
            name,
            context=parent,
            kind=otel_trace.SpanKind.CONSUMER,
            attributes={
                "astages.group_id": ref.group_id,
                "astages.stage": ref.stage,
                "astages.seq": ref.seq,
                "astages.try": job_try,
                "arq.job_id": str(ctx.get("job_id", "")),
            },
        )
        outcome = "failed"
        try:
            with otel_trace.use_span(span, end_on_exit=False, record_exception=False, set_status_on_exception=False):
                result = await call()
            outcome = "successful"
            return result
        except BaseException as e:
            from arq import Retry
            from arq.worker import RetryJob

            if isinstance(e, Retry | RetryJob) and retry_jobs and job_try < max_tries:
                outcome = "retry"
            elif isinstance(e, Exception):
                span.record_exception(e)
                span.set_status(otel_trace.Status(otel_trace.StatusCode.ERROR, f"{type(e).__name__}: {e}"[:500]))
            else:
                outcome = "cancelled"  # a timeout or the worker stopping: arq decides which
            raise
        finally:
            span.set_attribute("astages.outcome", outcome)
            span.end()

    # -- stage and group spans ----------------------------------------------------------

    def reported(self, group_id: str, reports: Sequence[tuple[Any, Any]], motions: Sequence[Any]) -> None:
        """After reports of jobs of ``group_id``: ``reports`` is (stage, outcome code) per
        job and ``motions`` their replies, in order. Emits the span of a stage a report
        ended and of the group a report finished. Never raises."""
        g = self._groups.get(group_id)
        if g is None or self.fixed is None:
            return
        try:
            end = time.time_ns()
            for (stage, code), motion in zip(reports, motions, strict=False):
                if motion.outcome not in ("complete", "running", "finished"):
                    continue
                certain = motion.outcome != "finished" or code in ("s", b"s")
                self._stage_span(g, int(stage), end, "complete" if certain else "ended")
                if motion.outcome == "finished":
                    self._group_span(g, end, "complete" if certain else "ended")
                    self._groups.pop(group_id, None)
                    return
        except Exception:
            logger.warning("could not emit the spans of group %s", group_id, exc_info=True)

    def _emit(
        self, name: str, trace_id: int, span_id: int, parent: Any, start_ms: int | None, end: int, **attrs: Any
    ) -> None:
        assert self.fixed is not None and otel_context is not None
        start = end if start_ms is None else min(start_ms * 1_000_000, end)
        self.fixed.trace_id, self.fixed.span_id = trace_id, span_id
        try:
            span = self.tracer.start_span(
                name,
                context=parent if parent is not None else otel_context.Context(),
                attributes=attrs,
                start_time=start,
            )
        finally:
            self.fixed.trace_id = self.fixed.span_id = None
        span.end(end_time=end)

    def _stage_span(self, g: _Group, number: int, end: int, outcome: str) -> None:
        if number in g.ended:
            return
        g.ended.add(number)
        parent = self._context(g.trace_id, group_span_id(g.group_id), g.flags)
        self._emit(
            f"astages stage {number}",
            g.trace_id,
            stage_span_id(g.group_id, number),
            parent,
            g.started.get(number),
            end,
            **{"astages.group_id": g.group_id, "astages.stage": number, "astages.outcome": outcome},
        )

    def _group_span(self, g: _Group, end: int, outcome: str) -> None:
        parent = self._context(g.trace_id, g.parent, g.flags) if g.parent else None
        attrs: dict[str, Any] = {"astages.group_id": g.group_id, "astages.outcome": outcome}
        if g.initiated is not None:
            attrs["astages.initiated_ms"] = g.initiated
        self._emit("astages group", g.trace_id, group_span_id(g.group_id), parent, g.created, end, **attrs)


def enable(provider: Any = None, cache: int = CACHE_GROUPS) -> Tracing:
    """Turn tracing on for this process with ``provider`` (the global one when None)."""
    global ACTIVE
    ACTIVE = Tracing(provider, cache)
    return ACTIVE


def disable() -> None:
    """Turn tracing off for this process."""
    global ACTIVE
    ACTIVE = None


def setup() -> Tracing | None:
    """At worker start-up: turn tracing on when the extra is installed, a tracer provider
    is configured (not OpenTelemetry's default no-op one) and ``ASTAGES_TRACING`` is not
    ``0``; keep what ``enable`` set. Returns ``ACTIVE``."""
    global ACTIVE
    if ACTIVE is not None or otel_trace is None or os.environ.get("ASTAGES_TRACING", "1") == "0":
        return ACTIVE
    provider = otel_trace.get_tracer_provider()
    if isinstance(provider, otel_trace.ProxyTracerProvider | otel_trace.NoOpTracerProvider):
        return None
    ACTIVE = Tracing(provider)
    return ACTIVE
