"""The benchmarks still run: ``python -m benchmarks --quick``, shrunk to a smoke run."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

from conftest import Server

ROOT = Path(__file__).resolve().parent.parent


def test_quick_benchmarks_run_and_check_their_workloads(redis_server: Server, tmp_path: Path) -> None:
    """Every benchmark runs end to end on a tiny workload, the checks find nothing wrong, and
    the plot is drawn from the results (when matplotlib, of the bench extra, is there)."""
    out = tmp_path / "results.json"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "benchmarks",
            "--quick",
            "--reps",
            "1",
            "--scale",
            "0.05",
            "--scale-workers",
            "1",
            "2",
            "--redis-url",
            redis_server.url,
            "--out",
            str(out),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for title in ("Throughput", "Stage gap", "Flat cost", "Recording and starting", "Redis memory", "Scale-out"):
        assert f"### {title}" in proc.stdout
    results = json.loads(out.read_text())["benchmarks"]
    throughput = results["throughput"][0]["data"]["results"]
    for name, r in throughput.items():
        assert r["missing"] == 0 and r["wrong_count"] == 0 and r["overlaps"] == 0, name
    assert results["throughput"][0]["data"]["errors"] == []
    assert results["memory"][0]["data"]["left"] == 0
    assert results["initiate"][0]["data"]["sent_ok"]

    if importlib.util.find_spec("matplotlib") is not None:  # the bench extra: draw the plot too
        png = tmp_path / "plot.png"
        code = "from pathlib import Path; from benchmarks.plot import plot; "
        code += f"plot(Path({str(out)!r}), out=Path({str(png)!r}))"
        subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, timeout=60)
        assert png.stat().st_size > 10_000
