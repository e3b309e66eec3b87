"""Run every benchmark: ``python -m benchmarks [--quick] [--only NAME ...] [--save] [--plot]``.

Prints one table per target. ``--save`` writes the figures to ``benchmarks/results.json``
(``results-quick.json`` with ``--quick``; benchmarks not run this time keep their saved
figures); ``--plot`` draws ``benchmarks/results.png`` from them (needs the ``bench``
extra: ``pip install -e '.[bench]'``).

Uses Redis database 10 of 127.0.0.1:6379 by default (``--redis-url``) and flushes that
database, and only that one, before and after each benchmark.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import subprocess
import time
from pathlib import Path
from typing import Any

from redis.exceptions import NoScriptError

from benchmarks import flat, initiate, memory, million, scale, throughput
from benchmarks.common import DEFAULT_URL, Config, Table, connect, load_average

HERE = Path(__file__).resolve().parent
BENCHMARKS = {
    "throughput": throughput.run,  # targets 1 and 5
    "flat": flat.run,  # target 2
    "initiate": initiate.run,  # target 3
    "memory": memory.run,  # target 4
    "scale": scale.run,  # target 6
    "million": million.run,  # target 6 at 1,000,000 jobs (only with --only million)
}
# Run only when named with --only (minutes, hundreds of MB of Redis memory).
OPT_IN = {"million"}


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def _commit() -> str:
    try:
        git = ["git", "rev-parse", "--short", "HEAD"]
        return subprocess.run(git, capture_output=True, text=True, cwd=HERE).stdout.strip()
    except OSError:
        return ""


async def machine(cfg: Config) -> dict[str, Any]:
    redis = await connect(cfg)
    try:
        server = await redis.info("server")
    finally:
        await redis.aclose()
    import arq
    import redis as redis_py

    return {
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "os": f"{platform.system()} {platform.release()}",
        "redis": server.get("redis_version"),
        "arq": getattr(arq, "VERSION", "?"),
        "redis-py": redis_py.__version__,
        "commit": _commit(),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }


def _load(path: Path | None) -> dict[str, Any]:
    return json.loads(path.read_text()) if path is not None and path.exists() else {}


def _dump(path: Path, results: dict[str, Any]) -> None:
    path.write_text(json.dumps(results, indent=1, default=str) + "\n")


async def main_async(cfg: Config, names: list[str], save: Path | None) -> dict[str, Any]:
    info = await machine(cfg)
    print("machine: " + ", ".join(f"{k} {v}" for k, v in info.items()), flush=True)
    out: dict[str, Any] = {"machine": info, "quick": cfg.quick, "reps": cfg.reps, "benchmarks": {}}
    old = _load(save)  # keep the benchmarks not run this time
    if old.get("quick") == cfg.quick:
        out["benchmarks"] = old.get("benchmarks", {})
    for name in names:
        t0 = time.perf_counter()
        load = load_average()
        for attempt in range(3):
            try:
                tables: list[Table] = await BENCHMARKS[name](cfg)
                break
            except NoScriptError:
                # Another client of a shared server ran SCRIPT FLUSH twice within one of
                # our calls (redis-py reloads a script once); start this benchmark again.
                if attempt == 2:
                    raise
                print(f"({name}: the server's script cache was flushed under us; again)", flush=True)
        for table in tables:
            print("\n" + table.render(), flush=True)
        print(f"\n({name}: {time.perf_counter() - t0:.1f} s)", flush=True)
        out["benchmarks"][name] = [t.as_dict() for t in tables]
        out["benchmarks"][name][0]["run"] = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "load": load}
        if save is not None:
            _dump(save, out)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="small sizes, about a minute in all")
    parser.add_argument("--only", nargs="+", choices=list(BENCHMARKS), help="run only these")
    parser.add_argument("--reps", type=int, help="repetitions of each timed workload (default 5, quick 3)")
    parser.add_argument("--redis-url", default=DEFAULT_URL, help=f"the database to use and flush ({DEFAULT_URL})")
    # the CI smoke run shrinks further
    parser.add_argument("--scale", type=float, default=1.0, help=argparse.SUPPRESS)
    parser.add_argument("--scale-workers", type=int, nargs="+", default=[1, 2, 4], help="scale-out worker counts")
    parser.add_argument("--out", type=Path, help="write the results here (instead of --save's file)")
    parser.add_argument("--save", action="store_true", help="write results.json (results-quick.json with --quick)")
    parser.add_argument("--plot", action="store_true", help="draw results.png from the saved results")
    args = parser.parse_args()
    cfg = Config(
        url=args.redis_url,
        quick=args.quick,
        reps=args.reps or (3 if args.quick else 5),
        scale=args.scale,
        workers=tuple(args.scale_workers),
    )
    names = args.only or [name for name in BENCHMARKS if name not in OPT_IN]
    path = args.out or HERE / ("results-quick.json" if args.quick else "results.json")
    results = asyncio.run(main_async(cfg, names, path if args.save or args.out else None))
    if args.save or args.out:
        print(f"\nwrote {path}")
    if args.plot:
        from benchmarks.plot import plot

        print(f"wrote {plot(path if path.exists() else None, results)}")


if __name__ == "__main__":
    main()
