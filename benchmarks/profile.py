"""Profile the per-job path of a worker with py-spy: ``python -m benchmarks.profile [plain] [astages] [lean]``.

For each kind of worker (plain arq; astages via arq's Worker; ``lean``: astages worker):
start it, queue N no-op jobs in a queue it does not serve
(plain: with ``enqueue_job``; astages: one stage, recorded and started), attach
``py-spy record``, move the jobs to the worker's queue (RENAME) and sample it until the
queue is empty. The sampled stacks
are summed into where the worker's time went: astages' script calls (start and report on
arq's Worker; claim and end on astages worker), the rest of astages' wrapper and hooks,
arq's own job handling, arq claiming jobs, the event loop, idle. ``--raw DIR`` keeps
py-spy's collapsed stacks (for a flame graph).
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import astages
from benchmarks.common import Config, Table, Workers, connect, flush
from benchmarks.throughput import QUEUES, wait_empty

# (category, frames that mark it): the first rule with a frame on a sample's stack wins.
RULES = [
    ("astages worker: claim_jobs script call", ("HardenedWorker._claim_lean (astages/runner.py",), ()),
    ("astages worker: end_jobs script call", ("EndJobs._batch (astages/worker.py",), ()),
    ("astages worker: running a job (as arq does)", ("HardenedWorker._run_lean (astages/runner.py",), ()),
    ("astages worker: taking jobs, poll loop", ("HardenedWorker.",), ()),
    ("astages: finish_job script call", ("_report (astages/worker.py",), ()),
    ("astages: finish_job script call", ("Coalescer._finishes (astages/worker.py",), ()),
    ("astages: start_job script call", ("Coalescer._starts (astages/worker.py",), ()),
    ("astages: start_job script call", ("Store.run (astages/_scripts.py",), ("_run_staged",)),
    ("astages: rest of the wrapper and hooks", ("astages/worker.py",), ()),
    ("arq: run_job (its Redis work, bookkeeping)", ("Worker.run_job (arq/worker.py",), ()),
    ("arq: start_jobs (claiming each job)", ("Worker.start_jobs (arq/worker.py",), ()),
    ("arq: poll loop, heartbeat", ("Worker._poll_iteration (arq/worker.py", "Worker.main (arq/worker.py"), ()),
]


def categorise(frames: list[str]) -> str:
    if "select (selectors.py" in frames[-1] or "poll' of 'select.epoll" in frames[-1]:
        return "idle (waiting for Redis)"
    for name, markers, also in RULES:
        if any(any(m in f for m in markers) for f in frames) and all(any(a in f for f in frames) for a in also):
            return name
    return "event loop, other"


def summarise(raw: str) -> tuple[Counter[str], Counter[str], int]:
    """(samples per category, samples per leaf function, total samples)."""
    cats: Counter[str] = Counter()
    leaves: Counter[str] = Counter()
    total = 0
    for line in raw.splitlines():
        stack, _, n = line.rpartition(" ")
        if not n.isdigit():
            continue
        count = int(n)
        frames = stack.split(";")
        total += count
        cats[categorise(frames)] += count
        leaf = frames[-1]
        leaves[leaf.split(" (")[0] + " (" + leaf.rsplit("(", 1)[-1].split(":")[0] + ")"] += count
    return cats, leaves, total


def _read(path: Path) -> str:
    return path.read_text() if path.exists() else ""


def py_spy() -> str:
    found = shutil.which("py-spy") or shutil.which("py-spy", path=str(Path(sys.executable).parent))
    if found is None:
        raise RuntimeError("py-spy is not installed (pip install -e '.[bench]')")
    return found


def _attach(pid: int, rate: int, out: Path) -> subprocess.Popen[bytes]:
    command = [py_spy(), "record", "--pid", str(pid), "--rate", str(rate), "--format", "raw"]
    with open(out.with_suffix(".log"), "wb") as log:
        return subprocess.Popen([*command, "--output", str(out)], stdout=log, stderr=log)


def _keep(folder: Path, kind: str, raw: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{kind}.txt").write_text(raw)


async def profile(cfg: Config, kind: str, n: int, rate: int = 250) -> tuple[str, float]:
    """py-spy's collapsed stacks of one ``kind`` worker running ``n`` queued jobs, and the time."""
    queue = QUEUES[kind]
    hold = queue + ":hold"  # the jobs wait here, then move to the worker's queue at once
    redis = await connect(cfg, hold)
    await flush(redis)
    out = Path(tempfile.mkdtemp(prefix="bench-prof-")) / f"{kind}.txt"
    try:
        async with Workers(cfg, kind, queue, 1) as workers:
            if kind in ("astages", "lean"):
                # no window: the whole stage is in the held queue before it moves (else the
                # jobs the window sends later would go to the held queue)
                group = await astages.StagedGroup.create(redis, "profile", window=None)
                stage = await group.stage(1)
                await stage.enqueue_many(("noop", ("profile", 1, i)) for i in range(n))
                await group.initiate()
            else:
                for i in range(n):
                    await redis.enqueue_job("noop", "profile", 1, i)
            spy = _attach(workers.pids()[0], rate, out)
            await asyncio.sleep(1.0)
            t0 = time.perf_counter()
            await redis.rename(hold, queue)
            await wait_empty(redis, queue)
            elapsed = time.perf_counter() - t0
            spy.send_signal(signal.SIGINT)
            await asyncio.to_thread(spy.wait)
    finally:
        await flush(redis)
        await redis.aclose()
    return _read(out), elapsed


KINDS = ("plain", "astages", "lean")
NAMES = {"plain": "plain arq worker", "astages": "astages-via-arq worker", "lean": "astages worker"}


async def run(cfg: Config, kinds: tuple[str, ...] = KINDS, keep: Path | None = None) -> list[Table]:
    n = cfg.size(5_000, 1_000)
    tables = []
    for kind in kinds:
        raw, elapsed = await profile(cfg, kind, n)
        if not raw.strip():  # py-spy could not attach in time: once more
            raw, elapsed = await profile(cfg, kind, n)
        if keep is not None:
            _keep(keep, kind, raw)
        cats, leaves, total = summarise(raw)
        t = Table(
            f"Where a {NAMES[kind]}'s time goes: {n:,} queued no-op jobs, {elapsed:.2f} s under py-spy "
            f"({total:,} samples)",
            ["category", "samples", "share"],
        )
        for name, count in cats.most_common():
            t.rows.append([name, count, f"{100 * count / max(total, 1):.1f}%"])
        busy = {k: v for k, v in leaves.items() if "selectors" not in k}
        t.notes.append("sampled at 250 Hz; read the shares, not the time (py-spy pauses the process to sample it)")
        t.notes.append("hottest leaf functions: " + ", ".join(f"{k} {v}" for k, v in Counter(busy).most_common(6)))
        t.data = {"categories": dict(cats), "total": total, "elapsed": elapsed, "n": n}
        tables.append(t)
    return tables


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.profile", description=__doc__)
    parser.add_argument("kind", nargs="*", help="plain, astages, lean (default: all three)")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--redis-url", default=Config.url)
    parser.add_argument("--raw", type=Path, help="keep py-spy's collapsed stacks in this folder")
    args = parser.parse_args()
    cfg = Config(url=args.redis_url, quick=args.quick)
    for table in asyncio.run(run(cfg, tuple(args.kind or KINDS), args.raw)):
        print(table.render(), "\n")


if __name__ == "__main__":
    main()
