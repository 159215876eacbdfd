"""What the studies under pipelines/ share: run a CLI step, read a knn-eval report's metrics, write
the mean ± sd cells of a table, and write the results (JSON, markdown, plot)."""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def cli(*args: str, log: Path) -> float:
    """Run `cospress ARGS` in its own process (output appended to `log`); return its wall time in s."""
    print("+ cospress " + " ".join(args), flush=True)
    t0 = time.perf_counter()
    with log.open("a") as f:
        f.write("+ cospress " + " ".join(args) + "\n")
        f.flush()
        subprocess.run([sys.executable, "-m", "cospress", *args], check=True, stdout=f,
                       stderr=subprocess.STDOUT, cwd=ROOT)  # fmt: skip
    return time.perf_counter() - t0


def metrics(report: dict) -> dict:
    """kNN top-1, OOD AUROC / FPR95 and fidelity (Spearman, 10-NN overlap) of a knn-eval report."""
    fid = report.get("fidelity") or {}
    return {"top1": report["top1"], "auroc": report["auroc"], "fpr95": report["fpr95"],
            "spearman": fid.get("spearman"), "overlap10": fid.get("knn10_overlap")}  # fmt: skip


def ms(values: list[float], digits: int, scale: float = 1.0) -> str:
    """Mean ± sd of the values that are not None (one value: itself; none: a dash)."""
    vals = [v * scale for v in values if v is not None]
    if len(vals) < 2:
        return f"{vals[0]:.{digits}f}" if vals else "—"
    return f"{statistics.mean(vals):.{digits}f} ± {statistics.stdev(vals):.{digits}f}"


def summary_cells(rows: list[dict]) -> str:
    """The kNN | AUROC | FPR95 | Spearman | overlap cells (mean ± sd) of one arm's rows."""
    return (
        f"{ms([r['top1'] for r in rows], 2)} | {ms([r['auroc'] for r in rows], 3)} "
        f"| {ms([r['fpr95'] for r in rows], 1, 100)} | {ms([r['spearman'] for r in rows], 3)} "
        f"| {ms([r['overlap10'] for r in rows], 3)}"
    )


def teacher_cells(teacher: dict) -> str:
    return f"{teacher['top1']:.2f} | {teacher['auroc']:.3f} | {100 * teacher['fpr95']:.1f} | 1 | 1"


def write_results(out: Path, text: str, plot: Callable[[Path], None], png: str, doc: str | None) -> None:
    """results.md and the plot in ``out`` (and the markdown in ``doc`` too), then print the table."""
    (out / "results.md").write_text(text)
    plot(out / png)
    if doc:
        Path(doc).write_text(text)
    print(text)


def save_rows(out: Path, teacher: dict, rows: list[dict]) -> None:
    (out / "results.json").write_text(json.dumps({"teacher": teacher, "rows": rows}, indent=1))


METRIC_COLUMNS = "kNN top-1 % | OOD AUROC | FPR95 % | Spearman ρ | 10-NN overlap"
PLOTTED = (("top1", "kNN top-1 %"), ("auroc", "OOD AUROC"), ("spearman", "Spearman ρ to the teacher"))


def row_cells(r: dict) -> str:
    """The kNN | AUROC | FPR95 | Spearman | overlap cells of one run."""
    return f"{r['top1']:.2f} | {r['auroc']:.3f} | {100 * r['fpr95']:.1f} | {r['spearman']:.3f} | {r['overlap10']:.3f}"


def plot_metrics(path: Path, teacher: dict, draw: Callable, legend_size: int = 8) -> None:
    """Three panels (kNN, AUROC, Spearman); ``draw(ax, key)`` draws a study's points on each, the
    teacher is a dotted line (not on Spearman: it is 1)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for ax, (key, label) in zip(axes, PLOTTED, strict=True):
        draw(ax, key)
        if key != "spearman":
            ax.axhline(teacher[key], color="gray", ls=":", label="teacher")
        ax.set_title(label)
    axes[0].legend(fontsize=legend_size)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
