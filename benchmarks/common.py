"""What every benchmark shares: the Redis database, worker processes, medians and tables."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from arq.connections import ArqRedis, RedisSettings, create_pool

DEFAULT_URL = "redis://127.0.0.1:6379/10"
ROOT = Path(__file__).resolve().parent.parent
# How often a client checks whether its work is done (both sides use the same).
WAIT_POLL_S = 0.002


@dataclass
class Config:
    """How big and how often: ``quick`` shrinks every size (about a minute in all);
    ``scale`` shrinks further still (the CI smoke run)."""

    url: str = DEFAULT_URL
    quick: bool = False
    reps: int = 5
    scale: float = 1.0
    workers: tuple[int, ...] = (1, 2, 4)  # scale-out counts

    def size(self, full: int, quick: int) -> int:
        return max(10, int((quick if self.quick else full) * self.scale))


@dataclass
class Table:
    """One benchmark's result: a titled table plus figures for the plot and the README."""

    title: str
    headers: list[str]
    rows: list[list[Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    data: dict[str, Any] = field(default_factory=dict)

    def render(self) -> str:
        cells = [[fmt(c) for c in row] for row in self.rows]
        widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(self.headers)]
        line = "| " + " | ".join(h.ljust(w) for h, w in zip(self.headers, widths, strict=True)) + " |"
        sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
        body = ["| " + " | ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)) + " |" for r in cells]
        return "\n".join([f"### {self.title}", "", line, sep, *body, "", *(f"- {n}" for n in self.notes)])

    def as_dict(self) -> dict[str, Any]:
        return {"title": self.title, "headers": self.headers, "rows": self.rows, "notes": self.notes, "data": self.data}


def fmt(value: Any) -> str:
    if isinstance(value, float):
        if value == 0:
            return "0"
        if abs(value) >= 1000:
            return f"{value:,.0f}"
        if abs(value) >= 10:
            return f"{value:.1f}"
        return f"{value:.3g}" if abs(value) < 1 else f"{value:.2f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of process ``pid`` so far (Linux; 0 elsewhere)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def load_average() -> str:
    try:
        return " ".join(f"{x:.1f}" for x in os.getloadavg())
    except OSError:
        return "?"


def median(values: Iterable[float]) -> float:
    data = list(values)
    return statistics.median(data) if data else float("nan")


async def connect(cfg: Config, queue: str = "arq:queue") -> ArqRedis:
    return await create_pool(RedisSettings.from_dsn(cfg.url), default_queue_name=queue)


async def flush(redis: ArqRedis) -> None:
    """Empty the benchmark database (only this one: never FLUSHALL)."""
    await redis.flushdb()


async def key_memory(redis: ArqRedis, pattern: str) -> tuple[int, int]:
    """(bytes by MEMORY USAGE, number of keys) of every key matching ``pattern``."""
    total = count = 0
    async for key in redis.scan_iter(match=pattern, count=1000):
        total += int(await redis.memory_usage(key, samples=0) or 0)
        count += 1
    return total, count


async def command_stats(redis: ArqRedis) -> dict[str, tuple[int, int]]:
    """``INFO commandstats`` as {command: (calls, usec)} (server-wide)."""
    raw = await redis.info("commandstats")
    return {k.removeprefix("cmdstat_"): (int(v["calls"]), int(v["usec"])) for k, v in raw.items()}


def stats_diff(before: dict[str, tuple[int, int]], after: dict[str, tuple[int, int]]) -> dict[str, tuple[int, int]]:
    out = {}
    for name, (calls, usec) in after.items():
        c0, u0 = before.get(name, (0, 0))
        if calls - c0:
            out[name] = (calls - c0, usec - u0)
    return out


@dataclass
class RedisCost:
    """What the Redis server did between ``start`` and ``stop`` (server-wide): commands run
    (scripts and the commands they run each count), script calls, and the server's CPU."""

    commands: int = 0
    scripts: int = 0
    cpu_us: float = 0.0

    @classmethod
    async def _read(cls, redis: ArqRedis) -> RedisCost:
        stats = await redis.info("commandstats")
        cpu = await redis.info("cpu")
        calls = {k.removeprefix("cmdstat_"): int(v["calls"]) for k, v in stats.items()}
        return cls(
            sum(calls.values()),
            sum(calls.get(k, 0) for k in ("eval", "evalsha", "fcall")),
            (float(cpu["used_cpu_user"]) + float(cpu["used_cpu_sys"])) * 1e6,
        )

    @classmethod
    async def start(cls, redis: ArqRedis) -> RedisCost:
        return await cls._read(redis)

    async def stop(self, redis: ArqRedis) -> RedisCost:
        now = await self._read(redis)
        return RedisCost(now.commands - self.commands, now.scripts - self.scripts, now.cpu_us - self.cpu_us)


@dataclass
class Run:
    """One job run, as a benchmark worker noted it."""

    run: str
    stage: int
    index: int
    job_try: int
    start: float
    end: float
    ok: bool
    score: float  # arq's queue score (s): when the job was sent, for a job due at once


class Workers:
    """``count`` worker processes of one kind (``plain``; ``astages``: arq's Worker with
    astages' settings; ``lean``: ``astages worker``) serving ``queue``.

    ``async with Workers(...) as w:`` starts them and waits until each is polling; leaving
    stops them (SIGINT, as an operator would), after which ``w.runs`` holds every job run
    they noted and ``w.errors`` any error line they logged."""

    def __init__(self, cfg: Config, kind: str, queue: str, count: int = 1) -> None:
        self.cfg = cfg
        self.kind = kind
        self.queue = queue
        self.count = count
        self.procs: list[subprocess.Popen[bytes]] = []
        self.dir = Path(tempfile.mkdtemp(prefix=f"bench-{kind}-"))
        self.runs: list[Run] = []
        self.errors: list[str] = []
        self.warnings: list[str] = []

    def _spawn(self, i: int) -> subprocess.Popen[bytes]:
        env = {
            **os.environ,
            "BENCH_REDIS_URL": self.cfg.url,
            "BENCH_QUEUE": self.queue,
            "BENCH_RUNS_FILE": str(self.dir / f"runs-{i}.txt"),
            "PYTHONPATH": str(ROOT),
        }
        with open(self.dir / f"stderr-{i}.txt", "wb") as err:
            return subprocess.Popen(
                [sys.executable, "-m", "benchmarks.worker", self.kind],
                cwd=ROOT,
                env=env,
                stdout=subprocess.DEVNULL,
                stderr=err,
            )

    def pids(self) -> list[int]:
        return [p.pid for p in self.procs]

    async def __aenter__(self) -> Workers:
        self.procs = [self._spawn(i) for i in range(self.count)]
        deadline = time.monotonic() + 60
        while not all((self.dir / f"runs-{i}.txt.ready").exists() for i in range(self.count)):
            if time.monotonic() > deadline or any(p.poll() is not None for p in self.procs):
                await self.stop()
                raise RuntimeError(f"benchmark workers did not start; see {self.dir}")
            await asyncio.sleep(0.05)
        return self

    async def stop(self) -> None:
        if self.procs:
            await asyncio.sleep(0.5)  # let arq finish its hooks for the last jobs before the signal
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGINT)
        for p in self.procs:
            while p.poll() is None:  # noqa: ASYNC110 - a child process, not an event
                await asyncio.sleep(0.02)
        for i in range(self.count):
            path = self.dir / f"runs-{i}.txt"
            if path.exists():
                for line in path.read_text().splitlines():
                    run, stage, index, job_try, start, end, ok, score = line.split()
                    numbers = int(stage), int(index), int(job_try), float(start), float(end)
                    self.runs.append(Run(run, *numbers, ok == "1", float(score)))
            errors, warnings = log_problems((self.dir / f"stderr-{i}.txt").read_text(errors="replace"))
            self.errors.extend(errors)
            self.warnings.extend(warnings)

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()


LOG_LINE = re.compile(r"^\d{4}-\d\d-\d\d [\d:,]+ \S+ ([A-Z]+) (.*)")


def log_problems(text: str) -> tuple[list[str], list[str]]:
    """(errors, warnings) in a worker's log: ERROR records and uncaught tracebacks are
    errors; a WARNING record (with its traceback's last line) is a warning."""
    errors: list[str] = []
    warnings: list[str] = []
    level, message, tail = "", "", ""
    for line in [*text.splitlines(), "2000-01-01 00:00:00,000 end END ."]:
        m = LOG_LINE.match(line)
        if m is None:
            if line.startswith("Traceback") and not level:
                level, message = "ERROR", "uncaught exception"
            if line.strip():
                tail = line.strip()
            continue
        if level in ("ERROR", "CRITICAL"):
            errors.append(f"{message} ({tail})" if tail else message)
        elif level == "WARNING":
            warnings.append(f"{message} ({tail})" if tail else message)
        level, message, tail = m.group(1), m.group(2), ""
    return errors, warnings


def check_runs(runs: Sequence[Run], run: str, stages: int, per_stage: int, flaky: bool, staged: bool) -> dict[str, Any]:
    """Check one workload's job runs: every job ran once (a flaky one twice: its failed
    first try and its success), and, for a staged workload, every run of stage k ended
    before the first run of stage k+1 started. Returns the counts and the stage gaps (s):
    from the last run of stage k ending to the first run of stage k+1 starting."""
    mine = [r for r in runs if r.run == run]
    per_job: dict[tuple[int, int], list[Run]] = {}
    for r in mine:
        per_job.setdefault((r.stage, r.index), []).append(r)
    missing = stages * per_stage - len(per_job)
    twice = 0
    for (_, index), rs in per_job.items():
        expected = 2 if flaky and index % 10 == 0 else 1
        if len(rs) != expected or sum(r.ok for r in rs) != 1:
            twice += 1
    gaps: list[float] = []
    queued: list[float] = []
    overlaps = 0
    if staged:
        for s in range(1, stages):
            last_end = max((r.end for r in mine if r.stage == s), default=0.0)
            first = min((r for r in mine if r.stage == s + 1), key=lambda r: r.start, default=None)
            if first is None:
                continue
            gaps.append(first.start - last_end)
            queued.append(min(r.score for r in mine if r.stage == s + 1) - last_end)
            if first.start < last_end:
                overlaps += 1
    return {"missing": missing, "wrong_count": twice, "overlaps": overlaps, "gaps": gaps, "queued": queued}
