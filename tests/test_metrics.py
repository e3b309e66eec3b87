"""Prometheus metrics: astages.metrics, the dashboard's /metrics, the `astages metrics`
exporter, and the shipped Grafana dashboard and alert rules."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from arq.connections import ArqRedis
from helpers import run_burst
from prometheus_client.parser import text_string_to_metric_families
from redis.asyncio.client import Pipeline

from astages import Cleaner, StagedGroup
from astages.metrics import METRIC_NAMES, Metrics
from astages.sweeper import Sweeper
from astages.web import create_app

ROOT = Path(__file__).resolve().parent.parent
GRAFANA = ROOT / "docs" / "grafana" / "astages-dashboard.json"
ALERTS = ROOT / "docs" / "prometheus" / "astages-alerts.yml"
NAME = re.compile(r"\bastages_[a-z_]+\b")


async def noop(ctx: dict[str, Any]) -> None:
    return None


async def flaky(ctx: dict[str, Any]) -> None:
    from arq import Retry

    if ctx["job_try"] == 1:
        raise Retry(defer=0)


async def boom(ctx: dict[str, Any]) -> None:
    raise ValueError("boom")


def samples(text: bytes) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Every sample of an exposition: (name, labels) -> value."""
    out = {}
    for family in text_string_to_metric_families(text.decode()):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def value(got: dict[tuple[str, frozenset[tuple[str, str]]], float], metric: str, /, **labels: str) -> float:
    return got[(metric, frozenset(labels.items()))]


def names(got: dict[tuple[str, frozenset[tuple[str, str]]], float]) -> set[str]:
    return {name for name, _ in got}


async def running_group(redis: ArqRedis, jobs: int = 2, **options: Any) -> StagedGroup:
    group = await StagedGroup.create(redis, "metrics", **options)
    for _ in range(jobs):
        await group.stage(1, name="fetch").enqueue(noop)
    await group.stage(2).enqueue_to("other:queue", noop)
    await group.initiate()
    return group


async def test_groups_and_jobs_by_status_per_stage_and_queue(redis: ArqRedis) -> None:
    """Groups by status, jobs by queue and status, and per-stage series of a running group."""
    group = await running_group(redis)
    got = samples(await Metrics(redis).render())
    assert value(got, "astages_groups", status="running") == 1
    assert value(got, "astages_groups", status="complete") == 0
    assert value(got, "astages_jobs", queue="arq:queue", status="queued") == 2
    assert value(got, "astages_jobs", queue="other:queue", status="pending") == 1
    stage1 = {"group": group.id, "stage": "1", "name": "fetch", "queue": "arq:queue"}
    assert value(got, "astages_stage_jobs", **stage1, status="queued") == 2
    assert value(got, "astages_stage_jobs", group=group.id, stage="2", name="", queue="other:queue", status="pending")
    assert value(got, "astages_stage_running_seconds", **stage1) >= 0
    assert value(got, "astages_arq_queue_jobs", queue="arq:queue") == 2
    assert value(got, "astages_arq_queue_due_jobs", queue="arq:queue") == 2
    assert value(got, "astages_arq_queue_wait_seconds_bucket", queue="arq:queue", le="+Inf") == 2
    assert value(got, "astages_arq_worker_alive", queue="arq:queue") == 0
    assert value(got, "astages_scrape_groups") == 1


async def test_every_name_written_is_declared_and_every_declared_name_is_written(real_redis: ArqRedis) -> None:
    """METRIC_NAMES (what the dashboard and alert checks use) is exactly what a scrape writes."""
    metrics = Metrics(real_redis)
    await metrics.render()  # first scrape: notes what has ended before it
    await running_group(real_redis, keep_for=60)
    await run_burst(real_redis, [noop])
    await Sweeper(real_redis).sweep()
    await Cleaner.cleanup_jobs(real_redis)
    got = samples(await metrics.render())
    assert names(got) == METRIC_NAMES


async def test_finished_jobs_retries_and_failures_count_groups_that_deleted_themselves(real_redis: ArqRedis) -> None:
    """Finished and retried jobs stay counted after their group is gone, and after the totals are purged."""
    metrics = Metrics(real_redis)
    group = await StagedGroup.create(real_redis, "counted")
    await group.stage(1).enqueue(noop)
    await group.stage(1).enqueue(flaky)
    await group.stage(2).enqueue(boom)
    await group.initiate()
    before = samples(await metrics.render())
    assert value(before, "astages_jobs_finished_total", status="successful") == 0
    await run_burst(real_redis, [noop, flaky, boom])
    assert not await real_redis.exists(f"astages:{{{group.id}}}")  # it deleted itself
    got = samples(await metrics.render())
    assert value(got, "astages_jobs_finished_total", status="successful") == 2
    assert value(got, "astages_jobs_finished_total", status="failed") == 1
    assert value(got, "astages_job_retries_total") == 1
    assert value(got, "astages_groups", status="running") == 0
    await real_redis.delete("astages:totals")  # as a purge does: the counts read go back to 0
    got = samples(await metrics.render())
    assert value(got, "astages_jobs_finished_total", status="successful") == 2  # a counter never goes down
    assert value(got, "astages_job_retries_total") == 1


async def test_stage_durations_are_observed_once(real_redis: ArqRedis) -> None:
    """A stage seen ended is observed once in astages_stage_duration_seconds, not again at the next scrape."""
    metrics = Metrics(real_redis)
    group = await StagedGroup.create(real_redis, "timed", keep_for=60)
    await group.stage(1).enqueue(noop)
    await group.stage(2).enqueue(noop)
    await group.initiate()
    await metrics.render()
    await run_burst(real_redis, [noop])
    for _ in range(2):
        got = samples(await metrics.render())
        assert value(got, "astages_stage_duration_seconds_count", queue="arq:queue") == 2
        assert value(got, "astages_stage_duration_seconds_bucket", queue="arq:queue", le="+Inf") == 2
        assert value(got, "astages_stage_duration_seconds_sum", queue="arq:queue") < 60
    assert value(got, "astages_groups", status="complete") == 1


async def test_per_stage_series_are_bounded(redis: ArqRedis) -> None:
    """At most stage_series stages get per-stage series (oldest groups first); the rest are counted as dropped."""
    groups = [await running_group(redis) for _ in range(3)]
    got = samples(await Metrics(redis, stage_series=3).render())
    shown = {(dict(labels)["group"], dict(labels)["stage"]) for name, labels in got if name == "astages_stage_jobs"}
    assert shown == {(groups[0].id, "1"), (groups[0].id, "2"), (groups[1].id, "1")}
    assert value(got, "astages_stage_series_dropped") == 3
    assert value(got, "astages_jobs", queue="arq:queue", status="queued") == 6  # the totals count every stage


async def test_queue_age_wait_buckets_and_live_workers(redis: ArqRedis) -> None:
    """arq queue length, oldest due job age, time-in-queue buckets (ZCOUNT) and the health-check key."""
    secs, _ = await redis.time()
    now = int(secs) * 1000
    await redis.zadd("arq:queue", {"a": now - 120_000, "b": now - 20_000, "c": now + 600_000})
    await redis.set("arq:queue:health-check", b"Dec-02 05:00:00 j_complete=1 j_failed=0", px=60_000)
    got = samples(await Metrics(redis).render())
    assert value(got, "astages_arq_queue_jobs", queue="arq:queue") == 3
    assert value(got, "astages_arq_queue_due_jobs", queue="arq:queue") == 2
    assert 119 <= value(got, "astages_arq_queue_oldest_due_seconds", queue="arq:queue") < 180
    assert value(got, "astages_arq_queue_wait_seconds_bucket", queue="arq:queue", le="10.0") == 0
    assert value(got, "astages_arq_queue_wait_seconds_bucket", queue="arq:queue", le="30.0") == 1
    assert value(got, "astages_arq_queue_wait_seconds_bucket", queue="arq:queue", le="300.0") == 2
    assert value(got, "astages_arq_worker_alive", queue="arq:queue") == 1


async def test_sweeper_and_cleaner_actions_are_counted(real_redis: ArqRedis) -> None:
    """Each sweeper pass and Cleaner repair adds to <prefix>:stats, exported as *_actions_total."""
    await Sweeper(real_redis).sweep()
    await Sweeper(real_redis).sweep()
    await real_redis.zadd("astages:groups", {"0" * 32: 1})  # an index entry with no group: dropped
    await Cleaner.cleanup_jobs(real_redis)
    got = samples(await Metrics(real_redis).render())
    assert value(got, "astages_sweeper_actions_total", action="passes") == 2
    assert value(got, "astages_cleaner_actions_total", action="cleanups") == 1
    assert value(got, "astages_cleaner_actions_total", action="index_dropped") == 1


class _Recorder:
    """Records every command the pipelines send."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.commands: list[tuple[str, str]] = []
        original = Pipeline.execute

        async def execute(pipe: Pipeline, raise_on_error: bool = True) -> Any:
            for args, _ in pipe.command_stack:
                self.commands.append((str(args[0]).upper(), str(args[1]) if len(args) > 1 else ""))
            return await original(pipe, raise_on_error)

        monkeypatch.setattr(Pipeline, "execute", execute)


async def test_a_scrape_never_reads_a_job_list(real_redis: ArqRedis, monkeypatch: pytest.MonkeyPatch) -> None:
    """A scrape sends O(groups + stages) commands, none on a stage's jobs/open/done, one spec read per new stage."""
    for _ in range(5):
        await running_group(real_redis, jobs=30)
    metrics = Metrics(real_redis)
    recorder = _Recorder(monkeypatch)
    await metrics.render()
    first = list(recorder.commands)
    recorder.commands.clear()
    await metrics.render()
    second = recorder.commands
    for command, key in first + second:
        assert not re.search(r":s:\d+:(jobs|open|done|msg|err)$", key), (command, key)
        assert not key.endswith(":spec") or command == "HRANDFIELD", (command, key)
        assert command not in {"LRANGE", "HKEYS", "HVALS", "SCAN", "KEYS", "XRANGE", "SMEMBERS"}, command
    assert sum(c == "HRANDFIELD" for c, _ in first) == 10  # one per stage, the first time
    assert not any(c == "HRANDFIELD" for c, _ in second)
    assert len(second) < 10 + 5 * 2 + 10 + 2 * 2 + 11 * 2 + 5  # a handful per group, stage and queue


async def test_scraping_1000_groups_is_bounded(real_redis: ArqRedis) -> None:
    """A scrape of 1,000 live groups (3 stages each) stays well under a generous bound (target < 100 ms)."""

    async def one(i: int) -> None:
        group = await StagedGroup.create(real_redis, f"g{i}")
        for n in (1, 2, 3):
            await group.stage(n).enqueue(noop)
        await group.initiate()

    for start in range(0, 1000, 100):
        await asyncio.gather(*(one(i) for i in range(start, start + 100)))
    metrics = Metrics(real_redis)
    await metrics.render()
    times = []
    for _ in range(5):
        started = time.perf_counter()
        got = samples(await metrics.render())
        times.append(time.perf_counter() - started)
    assert value(got, "astages_groups", status="running") == 1000
    assert sorted(times)[2] < 1.0, times  # the median, with room for a loaded machine


async def test_dashboard_serves_metrics(redis: ArqRedis) -> None:
    """GET /metrics on the dashboard app returns the text exposition, behind the login when there is one."""
    await running_group(redis)
    app = create_app(redis)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://dash") as client:
        reply = await client.get("/metrics")
        assert reply.status_code == 200
        assert reply.headers["content-type"].startswith("text/plain; version=")
        assert value(samples(reply.content), "astages_groups", status="running") == 1
    async with httpx.AsyncClient(transport=httpx.ASGITransport(create_app(redis, queues=["extra"]))) as client:
        got = samples((await client.get("http://dash/metrics")).content)
        assert value(got, "astages_arq_queue_jobs", queue="extra") == 0  # the dashboard's queues are reported
    locked = create_app(redis, login=("ops", "secret"))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(locked), base_url="http://dash") as client:
        assert (await client.get("/metrics")).status_code == 401
        assert (await client.get("/metrics", auth=("ops", "secret"))).status_code == 200


async def test_dashboard_metrics_without_the_extra(fake_redis: ArqRedis, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without prometheus_client, /metrics answers 501 with the install hint; the rest of the dashboard works."""
    monkeypatch.setitem(sys.modules, "astages.metrics", None)
    app = create_app(fake_redis)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://dash") as client:
        reply = await client.get("/metrics")
        assert reply.status_code == 501
        assert "astages[metrics]" in reply.text
        assert (await client.get("/")).status_code == 200


@pytest.fixture
def exporter(redis_server: Any) -> Iterator[tuple[subprocess.Popen[str], str]]:
    """`astages metrics --port 0` running on the test database; yields it and its URL."""
    env = {**os.environ, "REDIS_URL": redis_server.url}
    proc = subprocess.Popen(
        [sys.executable, "-m", "astages", "metrics", "--port", "0"],
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        text=True,
        env=env,
    )
    try:
        assert proc.stderr is not None
        line = proc.stderr.readline()  # blocks until it listens (or exits)
        m = re.search(r"(http://127\.0\.0\.1:\d+/metrics)", line)
        assert m, line
        yield proc, m.group(1)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            proc.wait(10)
        if proc.stderr is not None:
            proc.stderr.close()


async def test_exporter_command_serves_current_state(
    real_redis: ArqRedis, exporter: tuple[subprocess.Popen[str], str]
) -> None:
    """`astages metrics` listens on loopback, reads Redis on each scrape and stops cleanly on SIGTERM."""
    proc, url = exporter
    async with httpx.AsyncClient() as client:
        got = samples((await client.get(url)).content)
        assert value(got, "astages_groups", status="running") == 0
        await running_group(real_redis)
        got = samples((await client.get(url)).content)
        assert value(got, "astages_groups", status="running") == 1
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(10) == 0


def _grafana_exprs(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        for key, item in node.items():
            if key in ("expr", "query", "definition") and isinstance(item, str):
                yield item
            else:
                yield from _grafana_exprs(item)
    elif isinstance(node, list):
        for item in node:
            yield from _grafana_exprs(item)


def test_grafana_dashboard_uses_only_exported_metrics() -> None:
    """Every metric name the sample Grafana dashboard queries is one the exporter writes."""
    dashboard = json.loads(GRAFANA.read_text())
    exprs = list(_grafana_exprs(dashboard))
    assert len(exprs) >= 8
    used = {name for expr in exprs for name in NAME.findall(expr)}
    assert used, exprs
    assert used <= METRIC_NAMES, used - METRIC_NAMES
    assert dashboard["panels"] and dashboard["title"]


def test_alert_rules_use_only_exported_metrics() -> None:
    """The sample alert rules parse, cover a stuck stage, failure ratio and queue age, and use exported names only."""
    rules = [rule for group in yaml.safe_load(ALERTS.read_text())["groups"] for rule in group["rules"]]
    alerts = {rule["alert"] for rule in rules}
    assert {"AstagesStageStuck", "AstagesFailureRatioHigh", "AstagesQueueBacklogOld"} <= alerts
    used = {name for rule in rules for name in NAME.findall(rule["expr"])}
    assert used <= METRIC_NAMES, used - METRIC_NAMES


def test_alert_rules_fire_as_their_unit_tests_say() -> None:
    """promtool checks the alert rules and runs their unit tests (python3 .ci/dev.py test installs it)."""
    promtool = shutil.which("promtool")
    assert promtool, (
        "promtool is not installed: python3 .ci/dev.py test installs it (Debian: apt-get install prometheus)"
    )
    for command in (["check", "rules", str(ALERTS)], ["test", "rules", str(ALERTS.with_suffix(".test.yml"))]):
        done = subprocess.run([promtool, *command], capture_output=True, text=True, timeout=60, check=False)
        assert done.returncode == 0, done.stdout + done.stderr
