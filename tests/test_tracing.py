"""OpenTelemetry tracing (issue 14, the tracing extra): one trace per staged run, with a
group span, its stage spans and a span per run of each job, on both worker paths."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import pytest
from arq import Retry
from arq.connections import ArqRedis
from arq.constants import default_queue_name
from helpers import run_burst
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

import astages
from astages import tracing
from astages.runner import HardenedWorker


async def step(ctx: dict[str, Any], tag: str) -> str:
    return tag


async def flaky(ctx: dict[str, Any], tag: str) -> str:
    if ctx["job_try"] == 1:
        raise Retry(defer=0)
    return tag


async def broken(ctx: dict[str, Any], tag: str) -> str:
    raise ValueError(f"broken {tag}")


async def nested(ctx: dict[str, Any], tag: str) -> str:
    """A job making a span of its own (as an instrumented client would)."""
    from opentelemetry import trace

    assert tracing.ACTIVE is not None
    with tracing.ACTIVE.tracer.start_as_current_span("inner"):
        await asyncio.sleep(0)
    del trace
    return tag


FUNCTIONS = [step, flaky, broken, nested]


@pytest.fixture
def provider() -> Iterator[tuple[TracerProvider, InMemorySpanExporter]]:
    """A tracer provider of the test's own (the global one is never set) feeding an in-memory exporter."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    yield provider, exporter
    tracing.disable()
    provider.shutdown()


@pytest.fixture
def spans(provider: tuple[TracerProvider, InMemorySpanExporter]) -> InMemorySpanExporter:
    """Tracing on, its spans kept in memory."""
    tracing.enable(provider[0])
    return provider[1]


def by_kind(finished: tuple[ReadableSpan, ...]) -> dict[str, list[ReadableSpan]]:
    out: dict[str, list[ReadableSpan]] = {"group": [], "stage": [], "job": [], "other": []}
    for s in finished:
        if s.name == "astages group":
            out["group"].append(s)
        elif s.name.startswith("astages stage "):
            out["stage"].append(s)
        elif s.attributes and "astages.seq" in s.attributes:
            out["job"].append(s)
        else:
            out["other"].append(s)
    return out


async def two_stages(redis: ArqRedis, first: Any = flaky) -> astages.StagedGroup:
    async with astages.within_a_grouping(redis, "traced") as group:
        await (await group.stage(1)).enqueue_many([(step, ("a",)), (first, ("b",))])
        await (await group.stage(2)).enqueue_many([(step, ("c",)), (step, ("d",))])
    return group


def check_tree(group: astages.StagedGroup, finished: tuple[ReadableSpan, ...], jobs: int) -> dict[str, Any]:
    """The spans form one tree: group -> stages -> jobs, with consistent times."""
    kinds = by_kind(finished)
    (g,) = kinds["group"]
    assert g.context is not None
    trace_id = g.context.trace_id
    assert g.context.span_id == tracing.group_span_id(group.id)
    assert {s.context.trace_id for s in finished if s.context} == {trace_id}
    stages = {s.attributes["astages.stage"]: s for s in kinds["stage"] if s.attributes}
    assert sorted(stages) == [1, 2]
    for n, s in stages.items():
        assert s.parent is not None and s.parent.span_id == g.context.span_id
        assert s.context is not None and s.context.span_id == tracing.stage_span_id(group.id, n)
    assert len(kinds["job"]) == jobs
    for j in kinds["job"]:
        assert j.attributes is not None
        stage = stages[j.attributes["astages.stage"]]
        assert j.parent is not None and stage.context is not None
        assert j.parent.span_id == stage.context.span_id and j.parent.is_remote
        assert j.kind is SpanKind.CONSUMER
        assert j.attributes["astages.group_id"] == group.id
        assert str(j.attributes["arq.job_id"]).startswith(f"astages:{group.id}:")
        assert stage.start_time is not None and j.start_time is not None and j.end_time is not None
        # stage and group times are the scripts' (ms, the server's clock): within 5 ms
        assert stage.start_time <= j.start_time + 5_000_000
        assert stage.end_time is not None and j.end_time <= stage.end_time + 5_000_000
    assert g.start_time is not None and g.end_time is not None
    assert stages[1].start_time is not None and stages[1].end_time is not None and stages[2].start_time is not None
    assert g.start_time <= stages[1].start_time and stages[1].end_time <= stages[2].start_time + 5_000_000
    return {"group": g, "stages": stages, "jobs": kinds["job"], "other": kinds["other"]}


async def test_staged_run_is_one_trace(real_redis: ArqRedis, spans: InMemorySpanExporter) -> None:
    """arq's worker: a staged run is one trace (group id as trace id): group, stage and job spans, retries included."""
    group = await two_stages(real_redis)
    await run_burst(real_redis, FUNCTIONS, sweep_interval=0)
    tree = check_tree(group, spans.get_finished_spans(), jobs=5)
    assert tree["group"].context.trace_id == int(group.id, 16)
    assert tree["group"].parent is None
    assert tree["group"].attributes["astages.outcome"] == "complete"
    tries = sorted((j.name, j.attributes["astages.try"], j.attributes["astages.outcome"]) for j in tree["jobs"])
    assert tries == [
        ("flaky", 1, "retry"),
        ("flaky", 2, "successful"),
        ("step", 1, "successful"),
        ("step", 1, "successful"),
        ("step", 1, "successful"),
    ]
    assert all(s.attributes["astages.outcome"] == "complete" for s in tree["stages"].values())


async def test_lean_worker_traces_the_same(real_redis: ArqRedis, spans: InMemorySpanExporter) -> None:
    """astages worker's lean path (claim_jobs/end_jobs) makes the same tree of spans."""
    group = await two_stages(real_redis)
    settings = astages.worker_settings(functions=FUNCTIONS, handle_signals=False, sweep_interval=0)
    for _ in range(20):
        worker = HardenedWorker(**settings, redis_pool=real_redis, burst=True, poll_delay=0, max_jobs=20)
        try:
            await asyncio.wait_for(worker.main(), 30)
        finally:
            await worker.close()
        if not await real_redis.zcard(default_queue_name):
            break
    check_tree(group, spans.get_finished_spans(), jobs=5)


async def test_failed_job_span_records_the_error(real_redis: ArqRedis, spans: InMemorySpanExporter) -> None:
    """A failed job's span has status ERROR, the exception as an event and outcome 'failed'."""
    group = await two_stages(real_redis, first=broken)
    await run_burst(real_redis, FUNCTIONS, sweep_interval=0)
    tree = check_tree(group, spans.get_finished_spans(), jobs=4)
    (failed,) = [j for j in tree["jobs"] if j.name == "broken"]
    assert failed.status.status_code is StatusCode.ERROR
    assert "ValueError: broken b" in (failed.status.description or "")
    assert [e.name for e in failed.events] == ["exception"]
    assert failed.attributes["astages.outcome"] == "failed"


async def test_group_joins_the_callers_trace(
    real_redis: ArqRedis, provider: tuple[TracerProvider, InMemorySpanExporter]
) -> None:
    """A group created inside a span is that span's child, in its trace; its jobs' own spans nest under theirs."""
    active = tracing.enable(provider[0])
    with active.tracer.start_as_current_span("request") as request:
        async with astages.within_a_grouping(real_redis, "from a request") as group:
            await (await group.stage(1)).enqueue(nested, "x")
            await (await group.stage(2)).enqueue(step, "y")
    stored = await real_redis.hget(f"astages:{{{group.id}}}", tracing.TRACE_FIELD)
    rc = request.get_span_context()
    assert stored == f"{rc.trace_id:032x}-{rc.span_id:016x}-{int(rc.trace_flags):02x}".encode()
    await run_burst(real_redis, FUNCTIONS, sweep_interval=0)
    finished = provider[1].get_finished_spans()
    tree = check_tree(group, tuple(s for s in finished if s.name != "request"), jobs=2)
    assert tree["group"].context.trace_id == rc.trace_id
    assert tree["group"].parent.span_id == rc.span_id
    (inner,) = [s for s in tree["other"] if s.name == "inner"]
    (job,) = [j for j in tree["jobs"] if j.name == "nested"]
    assert inner.parent is not None and inner.parent.span_id == job.context.span_id


async def test_trace_context_read_once_per_group_and_stage(
    real_redis: ArqRedis, spans: InMemorySpanExporter, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A worker reads a group's trace context once per stage it runs jobs of, not once per job."""
    reads: list[tuple[str, int]] = []
    assert tracing.ACTIVE is not None
    real = tracing.Tracing.group

    async def counted(self: tracing.Tracing, redis: Any, keys: Any, group_id: str, stage: int) -> Any:
        if group_id not in self._groups or stage not in self._groups[group_id].started:
            reads.append((group_id, stage))
        return await real(self, redis, keys, group_id, stage)

    monkeypatch.setattr(tracing.Tracing, "group", counted)
    async with astages.within_a_grouping(real_redis, "many") as group:
        await (await group.stage(1)).enqueue_many([(step, (str(i),)) for i in range(30)])
        await (await group.stage(2)).enqueue_many([(step, (str(i),)) for i in range(30)])
    await run_burst(real_redis, FUNCTIONS, sweep_interval=0)
    check_tree(group, spans.get_finished_spans(), jobs=60)
    assert sorted(set(reads)) == [(group.id, 1), (group.id, 2)]
    assert len(reads) <= 4  # jobs started in one event-loop turn may race the first read


async def test_off_without_a_configured_provider(real_redis: ArqRedis) -> None:
    """With OpenTelemetry's default (no-op) provider, worker start-up leaves tracing off and jobs still run."""
    tracing.disable()
    group = await two_stages(real_redis)
    worker = await run_burst(real_redis, FUNCTIONS, sweep_interval=0)
    assert tracing.ACTIVE is None
    assert (worker.jobs_complete, worker.jobs_retried) == (4, 1)
    assert await real_redis.hget(f"astages:{{{group.id}}}", tracing.TRACE_FIELD) is None


def test_without_the_extra_installed() -> None:
    """Without opentelemetry importable, astages imports, tracing stays off and a group stores no trace field."""
    code = (
        "import sys; sys.modules['opentelemetry'] = None\n"
        "import astages, astages.worker, astages.runner\n"
        "from astages import tracing\n"
        "assert tracing.otel_trace is None and tracing.setup() is None and tracing.ACTIVE is None\n"
        "assert tracing.parent_field() == ''\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60)
    assert done.returncode == 0, done.stderr
