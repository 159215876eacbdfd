"""Write an evaluation: report.json (every number), report.md (tables) and PNG plots."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cospress.evaluate.ood import roc_curve
from cospress.utils import atomic_write_bytes, atomic_write_json

log = logging.getLogger(__name__)


@dataclass
class PlotData:
    """Raw arrays behind the plots (none of them goes into report.json).

    ood_scores: {score name: (id scores [N_id], ood scores [N_ood])};
    similarity_pairs: (student cosines [P], teacher cosines [P]) for the same image pairs.
    """

    ood_scores: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)
    similarity_pairs: tuple[np.ndarray, np.ndarray] | None = None


def _fmt(x: Any, digits: int = 2) -> str:
    if x is None:
        return "—"
    if isinstance(x, float):
        return f"{x:.{digits}f}"
    return str(x)


def markdown(report: dict) -> str:
    """Human-readable tables of a report dict (the structure written to report.json)."""
    lines = [f"# kNN evaluation of `{report['config'].get('model')}`", ""]
    model = report.get("model") or {}
    if "params" in model:
        lines += [
            f"{model.get('name')} at {model.get('input_size')} px: {model['params'] / 1e6:.2f} M parameters, "
            f"{model['gflops_per_image']:.3f} GFLOPs per image (forward)",
            "",
        ]
    for section in (
        _md_counts,
        _md_knn,
        _md_linear,
        _md_ood,
        _md_fidelity,
        _md_robustness,
        _md_attack,
        _md_timings,
    ):
        lines += section(report)
    return "\n".join(lines)


def _md_counts(report: dict) -> list[str]:
    counts = report.get("counts", {})
    if not counts:
        return []
    return ["| set | images |", "|---|---|"] + [f"| {k} | {v} |" for k, v in counts.items()] + [""]


def _md_knn(report: dict) -> list[str]:
    knn = report.get("knn") or {}
    if not knn:
        return []
    cols = [c for c in ("top1", "top5", "mean_per_class") if any(c in m for m in knn.values())]
    names = {"top1": "top-1 %", "top5": "top-5 %", "mean_per_class": "mean per-class %"}
    return [
        f"## kNN classification (T = {report.get('temperature')}, headline k = {report.get('main_k')})",
        "",
        "| k | " + " | ".join(names[c] for c in cols) + " |",
        "|---|" + "---|" * len(cols),
        *(f"| {k} | " + " | ".join(_fmt(m.get(c)) for c in cols) + " |" for k, m in knn.items()),
        "",
    ]


def _md_linear(report: dict) -> list[str]:
    lin = report.get("linear")
    if not lin:
        return []
    grid = "; ".join(
        f"{name}: " + ", ".join(f"{lr}: {_fmt(v)}" for lr, v in by_lr.items())
        for name, by_lr in lin["grid"].items()
    )
    n_lr = len(next(iter(lin["grid"].values())))
    return [
        f"## Linear probe ({lin['features']}, {lin['steps']} steps, best of {len(lin['grid'])} feature "
        f"choices x {n_lr} learning rates)",
        "",
        "| top-1 % | kNN top-1 % | validation top-1 % | lr | train / val / test |",
        "|---|---|---|---|---|",
        f"| {_fmt(lin['top1'])} | {_fmt(report.get('top1'))} | {_fmt(lin['val_top1'])} | {lin['lr']:g} | "
        f"{lin['train']} / {lin['val']} / {lin['test']} |",
        "",
        f"validation top-1 % by feature choice and learning rate: {grid}",
        "",
    ]


def _md_ood(report: dict) -> list[str]:
    ood = report.get("ood") or {}
    if not ood:
        return []
    groups = report.get("ood_groups") or {}
    group_of = {name: g for g, entry in groups.items() for name in entry["sets"]}
    lines = [
        "## OOD detection" + (" (groups: mean of their sets' metrics)" if groups else ""),
        "",
        "| set | score | AUROC | FPR95 % | AUPR-in | AUPR-out |",
        "|---|---|---|---|---|---|",
    ]
    rows = {
        f"{n} ({group_of[n]})" if n in group_of else n: v for n, v in (report.get("ood_sets") or {}).items()
    }
    rows.update({f"**{g} (mean of {len(e['sets'])})**": e["mean"] for g, e in groups.items()})
    for set_name, scores in {**rows, "all pooled" if rows else "all": ood}.items():
        for score, m in scores.items():
            lines.append(
                f"| {set_name} | {score} | {_fmt(m['auroc'], 4)} | {_fmt(100 * m['fpr95'], 1)} | "
                f"{_fmt(m['aupr_in'], 4)} | {_fmt(m['aupr_out'], 4)} |"
            )
    return lines + [""]


def _md_fidelity(report: dict) -> list[str]:
    fid = report.get("fidelity")
    if not fid:
        return []
    return [
        f"## Fidelity to `{fid.get('teacher')}` ({fid.get('num_images')} images)",
        "",
        "| Spearman ρ | Pearson r | 10-NN overlap | linear CKA |",
        "|---|---|---|---|",
        f"| {_fmt(fid['spearman'], 4)} | {_fmt(fid['pearson'], 4)} | {_fmt(fid['knn10_overlap'], 4)} | {_fmt(fid['cka'], 4)} |",
        "",
    ]


def _md_robustness(report: dict) -> list[str]:
    rob = report.get("robustness") or {}
    if not rob.get("corruptions"):
        return []
    sev = sorted({s for v in rob["corruptions"].values() for s in v}, key=int)
    lines = [
        f"## Robustness: kNN top-1 % under corruption ({rob.get('num_images')} images, clean {_fmt(rob.get('clean_top1'))})",
        "",
        "| corruption | " + " | ".join(f"sev {s}" for s in sev) + " |",
        "|---|" + "---|" * len(sev),
    ]
    for name, by_sev in rob["corruptions"].items():
        lines.append(f"| {name} | " + " | ".join(_fmt(by_sev.get(s)) for s in sev) + " |")
    return lines + [f"\nmean corruption top-1: {_fmt(rob.get('mean_corruption_top1'))}", ""]


def _md_attack(report: dict) -> list[str]:
    attack = (report.get("robustness") or {}).get("attack")
    if not attack:
        return []
    lines = ["## Feature-space PGD-L∞ (10 steps)", "", "| ε | mean 1 − cos | kNN top-1 % |", "|---|---|---|"]
    lines += [f"| {eps} | {_fmt(m['cos_distance'], 4)} | {_fmt(m['top1'])} |" for eps, m in attack.items()]
    return lines + [""]


def _md_timings(report: dict) -> list[str]:
    timings = report.get("timings") or {}
    if not timings:
        return []
    return (
        ["## Timings (s)", "", "| stage | seconds |", "|---|---|"]
        + [f"| {k} | {_fmt(v, 1)} |" for k, v in timings.items()]
        + [""]
    )


def _plots(out: Path, report: dict, data: PlotData) -> list[Path]:
    """The PNG plots that the report and data allow: ROC, kNN vs k, similarity hexbin, robustness."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    written: list[Path] = []
    for name, plot in (
        ("roc.png", _plot_roc),
        ("knn_vs_k.png", _plot_knn),
        ("similarity_hexbin.png", _plot_similarity),
        ("robustness.png", _plot_robustness),
    ):
        fig = plot(plt, report, data)
        if fig is None:
            continue
        fig.tight_layout()
        fig.savefig(out / name, dpi=110)
        plt.close(fig)
        written.append(out / name)
    return written


def _plot_roc(plt: Any, report: dict, data: PlotData) -> Any:
    if not data.ood_scores:
        return None
    fig, ax = plt.subplots(figsize=(4.8, 4.4))
    for name, (id_s, ood_s) in data.ood_scores.items():
        s = np.r_[id_s, ood_s]
        fpr, tpr, _ = roc_curve(s, np.r_[np.ones(len(id_s), bool), np.zeros(len(ood_s), bool)])
        auc = report["ood"].get(name, {}).get("auroc")
        ax.plot(fpr, tpr, label=f"{name} (AUROC {auc:.3f})" if auc is not None else name)
    ax.plot([0, 1], [0, 1], color="grey", lw=0.8, ls="--")
    ax.axhline(0.95, color="grey", lw=0.6, ls=":")
    ax.set(
        xlabel="false-positive rate (OOD accepted)",
        ylabel="true-positive rate (ID accepted)",
        title="kNN OOD ROC",
    )
    ax.legend(loc="lower right", fontsize=8)
    return fig


def _plot_knn(plt: Any, report: dict, data: PlotData) -> Any:
    knn = report.get("knn") or {}
    if not knn:
        return None
    ks = [int(k) for k in knn]
    fig, ax = plt.subplots(figsize=(4.8, 3.6))
    for metric, style in (("top1", "-o"), ("top5", "-s"), ("mean_per_class", "--^")):
        if metric not in knn[str(ks[0])]:
            continue  # no top-5 for a bank of 5 classes or fewer
        ax.plot(ks, [knn[str(k)][metric] for k in ks], style, label=metric, alpha=0.85)
    ax.set(xlabel="k", ylabel="accuracy %", title=f"kNN accuracy vs k (T = {report.get('temperature')})")
    if len(ks) > 1 and max(ks) / max(min(ks), 1) >= 10:
        ax.set_xscale("log")
    ax.set_xticks(ks, [str(k) for k in ks])
    ax.legend(fontsize=8)
    return fig


def _plot_similarity(plt: Any, report: dict, data: PlotData) -> Any:
    if data.similarity_pairs is None:
        return None
    s, t = data.similarity_pairs
    fig, ax = plt.subplots(figsize=(4.8, 4.4))
    hb = ax.hexbin(t, s, gridsize=60, bins="log", cmap="viridis", mincnt=1)
    lo, hi = float(min(s.min(), t.min())), float(max(s.max(), t.max()))
    ax.plot([lo, hi], [lo, hi], color="red", lw=0.8, ls="--")
    fid = report.get("fidelity") or {}
    ax.set(
        xlabel="teacher cosine similarity",
        ylabel="model cosine similarity",
        title=f"pairwise similarities (ρ = {fid.get('spearman', float('nan')):.3f})",
    )
    fig.colorbar(hb, ax=ax, label="pairs (log)")
    return fig


def _plot_robustness(plt: Any, report: dict, data: PlotData) -> Any:
    rob = report.get("robustness") or {}
    if not rob.get("corruptions"):
        return None
    fig, ax = plt.subplots(figsize=(5.2, 3.8))
    for name, by_sev in rob["corruptions"].items():
        sev = sorted(by_sev, key=int)
        ax.plot(
            [0] + [int(x) for x in sev],
            [rob["clean_top1"]] + [by_sev[x] for x in sev],
            marker="o",
            label=name,
        )
    ax.set(xlabel="severity (0 = clean)", ylabel="kNN top-1 %", title="accuracy under corruption")
    ax.set_xticks(range(6))
    ax.legend(fontsize=8)
    return fig


def write_report(out_dir: str | Path, report: dict, data: PlotData | None = None) -> list[Path]:
    """Write report.json, report.md and the plots into out_dir; returns the paths written."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "report.json", report)
    atomic_write_bytes(out / "report.md", markdown(report).encode())
    paths = [out / "report.json", out / "report.md"] + _plots(out, report, data or PlotData())
    log.info("report written to %s (%d files)", out, len(paths))
    return paths
