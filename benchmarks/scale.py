"""Target 6: the staged workload on 1, 2 and 4 worker processes.

Each worker count runs astages (3 stages, one ``stage.enqueue`` per job; run by arq's
Worker, and by ``astages worker``) and plain arq (stage by stage, and with no stages),
one side at a time so the other side's idle
workers do not poll beside it. Every run is checked for jobs run twice or missing and
for a stage starting before the previous one ended; worker logs are checked for errors.
"""

from __future__ import annotations

from typing import Any

from benchmarks.common import Config, Table, median
from benchmarks.throughput import measure

ASTAGES = ["astages via arq"]
LEAN = ["astages worker"]
PLAIN = ["arq, stage by stage", "arq, no stages (floor)"]


async def run(cfg: Config) -> list[Table]:
    stages, per_stage = 3, cfg.size(1000, 200)
    reps = Config(url=cfg.url, quick=cfg.quick, reps=1 if cfg.quick else min(cfg.reps, 3), scale=cfg.scale)
    counts = cfg.workers
    results: dict[int, dict[str, Any]] = {}
    for k in counts:
        res = await measure(reps, stages, per_stage, workers=k, variants=PLAIN)
        res_a = await measure(reps, stages, per_stage, workers=k, variants=ASTAGES)
        res_l = await measure(reps, stages, per_stage, workers=k, variants=LEAN)
        errors = res.pop("_errors") + res_a.pop("_errors") + res_l.pop("_errors")
        warnings = res.pop("_warnings") + res_a.pop("_warnings") + res_l.pop("_warnings")
        results[k] = {**res, **res_a, **res_l, "_errors": errors, "_warnings": warnings}
    t = Table(
        f"Scale-out: {stages} x {per_stage:,} jobs on {', '.join(map(str, counts))} worker processes "
        f"(jobs/s, median of {reps.reps})",
        [
            "workers",
            "astages via arq",
            "astages worker",
            "arq stage by stage",
            "arq no stages",
            "via arq / arq time",
            "astages worker / arq time",
            "stage gap ms: via arq / astages worker / arq",
            "run twice",
            "order broken",
            "errors",
        ],
    )
    for k, res in results.items():
        a, w, p = res["astages via arq"], res["astages worker"], res["arq, stage by stage"]
        f = res["arq, no stages (floor)"]
        t.rows.append(
            [
                k,
                a["jobs_per_s"],
                w["jobs_per_s"],
                p["jobs_per_s"],
                f["jobs_per_s"],
                round(a["median_s"] / p["median_s"], 3),
                round(w["median_s"] / p["median_s"], 3),
                " / ".join(_gap(r) for r in (a, w, p)),
                sum(r["wrong_count"] + r["missing"] for r in (a, w, p)),
                a["overlaps"] + w["overlaps"] + p["overlaps"],
                len(res["_errors"]),
            ]
        )
    t.notes.append("the machine has 2 cores shared by the client, the workers and Redis")
    t.notes.append("stage gap: median over every stage change of the runs (see the throughput benchmark)")
    t.data = {str(k): {name: r for name, r in res.items()} for k, res in results.items()}
    return [t]


def _gap(result: dict[str, Any]) -> str:
    gaps = result.get("gaps_ms") or []
    return f"{median(gaps):.1f}" if gaps else "-"
