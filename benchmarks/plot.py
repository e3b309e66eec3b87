"""Draw ``benchmarks/results.png`` from saved results: ``python -m benchmarks.plot [results.json]``."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent


def _table(results: dict[str, Any], bench: str, index: int = 0) -> dict[str, Any] | None:
    tables = results.get("benchmarks", {}).get(bench)
    return tables[index] if tables and len(tables) > index else None


def plot(path: Path | None, results: dict[str, Any] | None = None, out: Path | None = None) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if results is None:
        assert path is not None
        results = json.loads(path.read_text())
    out = out or HERE / ("results-quick.png" if results.get("quick") else "results.png")
    fig, axes = plt.subplots(2, 2, figsize=(12, 8.5))
    fig.suptitle(
        "astages vs plain arq (" + ", ".join(str(results["machine"].get(k, "")) for k in ("cpu", "cores")) + " cores)"
    )

    ax = axes[0][0]
    t = _table(results, "throughput")
    if t:
        res = t["data"]["results"]
        names = list(res)
        values = [res[n]["jobs_per_s"] for n in names]
        colors = ["tab:green" if n.startswith("astages") else "tab:blue" for n in names]
        ax.barh(range(len(names)), values, color=colors)
        ax.set_yticks(range(len(names)), [n.replace(", ", ",\n", 1) for n in names], fontsize=8)
        ax.invert_yaxis()
        for i, n in enumerate(names):
            ratio = res[n]["ratio"]
            if ratio is not None and n != res[n]["reference"]:
                ax.text(values[i], i, f" x{ratio:.2f} time", va="center", fontsize=8)
        ax.set_xlabel("jobs/s (higher is better)")
        ax.set_title(f"Throughput, {t['data']['stages']} x {t['data']['per_stage']:,} jobs, 1 worker")

    ax = axes[0][1]
    t = _table(results, "flat")
    if t:
        rows = t["data"]["rows"]
        sizes = [r["jobs"] for r in rows]
        ax.plot(sizes, [r["redis_us"] for r in rows], "o-", label="Redis us per job completion")
        ax.plot(sizes, [r["client_us"] for r in rows], "s--", label="client us per job (wrapper, 50 in flight)")
        ax.set_xscale("log")
        ax.set_ylim(bottom=0)
        ax.set_xlabel("jobs in the stage")
        ax.set_title("Cost per job completion by stage size")
        ax.legend(fontsize=8)

    ax = axes[1][0]
    t = _table(results, "throughput", 1)
    if t:
        for name, d in t["data"].items():
            gaps = d["gaps_ms"]
            if gaps:
                ax.hist(gaps, bins=20, alpha=0.6, label=name)
        ref = t["data"].get("arq, stage by stage", {}).get("gaps_ms")
        if ref:
            ref = sorted(ref)
            ax.axvline(ref[len(ref) // 2], color="red", linestyle=":", label="target (arq's median gap)")
        ax.set_xlabel("ms from the last job of a stage to the first job of the next")
        ax.set_title("Stage gap")
        ax.legend(fontsize=7)

    ax = axes[1][1]
    t = _table(results, "scale")
    if t:
        data = t["data"]
        counts = [int(k) for k in data]
        lines = (
            ("astages via arq", "o-"),
            ("astages worker", "D-"),
            ("arq, stage by stage", "s--"),
            ("arq, no stages (floor)", "^:"),
        )
        for name, style in lines:
            if all(name in data[str(k)] for k in counts):
                ax.plot(counts, [data[str(k)][name]["jobs_per_s"] for k in counts], style, label=name)
        ax.set_xticks(counts)
        ax.set_ylim(bottom=0)
        ax.set_xlabel("worker processes")
        ax.set_ylabel("jobs/s")
        ax.set_title("Scale-out")
        ax.legend(fontsize=8)

    fig.tight_layout()
    fig.savefig(out, dpi=90)
    plt.close(fig)
    return out


if __name__ == "__main__":
    print(plot(Path(sys.argv[1]) if len(sys.argv) > 1 else HERE / "results.json"))
