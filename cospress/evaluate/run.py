"""The knn-eval runner: load model -> bank -> queries -> kNN -> OOD -> fidelity -> robustness -> report.

`run_knn_eval(cfg)` is what `cospress knn-eval` calls; it writes report.json, report.md, the plots
and config.yaml into `cfg.out` and returns the report dict.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cospress.config import save_config, to_dict
from cospress.data.device_decode import resolve_decode
from cospress.evaluate import fidelity as fid
from cospress.evaluate import knn, ood, robustness
from cospress.evaluate.config import EvalConfig, validate
from cospress.evaluate.embed import (
    Embeddings,
    Queries,
    embed_bank,
    embed_ood_sets,
    embed_queries,
    embed_source,
)
from cospress.evaluate.images import load_pixels
from cospress.evaluate.models import LoadedModel, load_model, pixel_features_fn
from cospress.evaluate.report import PlotData, write_report
from cospress.runtime import pick_device, seed_everything, tune_malloc

log = logging.getLogger(__name__)

ATTACK_EPS = (1 / 255, 2 / 255, 4 / 255)


def run_knn_eval(cfg: EvalConfig) -> dict:
    """Evaluate a model by kNN; write the report into cfg.out and return it as a dict."""
    tune_malloc()
    validate(cfg)
    timer, t_all = _Timer(), time.perf_counter()
    seed_everything(cfg.seed)
    device = pick_device(cfg.device)
    ks, main_k, temperature = _protocol(cfg)
    emb_kw = _embed_kwargs(cfg, device)
    data: dict[str, Any] = {}  # what was embedded: {"train" | "test" | "oodI": description}

    with timer("load_model"):
        loaded = load_model(cfg.model, device)
    model = loaded.model
    held = np.asarray(sorted(set(cfg.ood_classes)), dtype=np.int64)
    with timer("embed_train"):
        bank, bank_labels = embed_bank(cfg, model, emb_kw, held, data)
    with timer("embed_test"):
        queries = embed_queries(cfg, model, emb_kw, held, data)
    num_classes = int(max(bank_labels.max(), queries.labels.max())) + 1

    with timer("knn"):
        index = knn.build_index(bank, kind=cfg.index, nlist=cfg.nlist, nprobe=cfg.nprobe, seed=cfg.seed)
        max_k = max(*ks, cfg.ood_k)
        id_res = knn.search(index, queries.emb.features[queries.id_mask], max_k)
        id_labels = queries.labels[queries.id_mask]
        knn_metrics = knn.knn_classify(id_res, bank_labels, id_labels, ks, temperature, num_classes)
    counts = {"bank": len(bank), "test_in_distribution": int(queries.id_mask.sum())}

    with timer("ood"):
        ood_sets = embed_ood_sets(cfg, model, emb_kw, queries, data)
        ood_report, plots = _ood(index, id_res, ood_sets, max_k, cfg.ood_k)
        counts.update({f"ood:{name}": len(f) for name, f in ood_sets.items()})
    report = _headline(cfg, knn_metrics, main_k, temperature, ood_report)

    teacher_spec = cfg.fidelity_teacher or loaded.teacher_spec
    if teacher_spec and teacher_spec.lower() != "none":
        with timer("fidelity"):
            report["fidelity"], plots.similarity_pairs = _fidelity(
                cfg, teacher_spec, model, queries, emb_kw, loaded.meta
            )

    classifier = _Classifier(index, bank_labels, main_k, temperature, num_classes)
    rob = _robustness(cfg, model, queries, classifier, emb_kw, timer)
    if rob:
        report["robustness"] = rob

    report.update(config=to_dict(cfg), model=_model_entry(cfg, loaded), data=data, counts=counts)
    report.update(device=str(device), timings={**timer, "total": time.perf_counter() - t_all})
    _write(cfg, report, plots)
    return report


# ---------------------------------------------------------------------------------------------- set-up


class _Timer(dict):
    """Seconds spent in each named section, summed over its uses."""

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        yield
        self[name] = self.get(name, 0.0) + time.perf_counter() - start


def _protocol(cfg: EvalConfig) -> tuple[list[int], int, float]:
    """(the k values scored, the headline k, the temperature) of cfg's protocol and overrides."""
    protocol = knn.PROTOCOLS[cfg.protocol]
    ks = list(cfg.k or protocol["ks"])
    main_k = protocol["main_k"] if protocol["main_k"] in ks else ks[0]
    temperature = float(cfg.temperature if cfg.temperature is not None else protocol["temperature"])
    return ks, main_k, temperature


def _embed_kwargs(cfg: EvalConfig, device: torch.device) -> dict[str, Any]:
    """The keyword arguments of every :func:`embed_source` call of the run."""
    cache_dir = None if (cfg.cache_dir or "").lower() in ("", "none") else cfg.cache_dir
    return dict(
        batch_size=cfg.batch_size,
        workers=cfg.workers,
        device=device,
        precision=cfg.precision,
        crop_pct=cfg.crop_pct,
        cache_dir=cache_dir,
        seed=cfg.seed,
        decode=resolve_decode(cfg.decode, device),
    )


def _subset(rows: np.ndarray, cap: int, seed: int) -> np.ndarray:
    """At most `cap` of rows, drawn deterministically by seed, in increasing order."""
    if len(rows) <= cap:
        return rows
    return np.sort(np.random.default_rng(seed).choice(rows, size=cap, replace=False))


def _ood(index, id_res, ood_sets: dict[str, np.ndarray], max_k: int, ood_k: int) -> tuple[dict, PlotData]:
    plots = PlotData()
    sets = {name: f for name, f in ood_sets.items() if len(f)}
    if not sets:
        return {}, plots
    id_scores = ood.knn_scores(id_res.sims, ood_k)
    per_set = {name: ood.knn_scores(knn.search(index, f, max_k).sims, ood_k) for name, f in sets.items()}
    pooled = {s: np.concatenate([v[s] for v in per_set.values()]) for s in id_scores}
    result: dict[str, Any] = {"ood": {s: ood.ood_metrics(id_scores[s], pooled[s]) for s in id_scores}}
    if len(per_set) > 1:
        result["ood_sets"] = {
            name: {s: ood.ood_metrics(id_scores[s], v[s]) for s in id_scores} for name, v in per_set.items()
        }
    plots.ood_scores = {s: (id_scores[s], pooled[s]) for s in id_scores}
    return result, plots


def _headline(
    cfg: EvalConfig, knn_metrics: dict, main_k: int, temperature: float, ood_report: dict
) -> dict[str, Any]:
    """The report's first keys: the headline top-1 (and AUROC / FPR95), the kNN and OOD tables."""
    report: dict[str, Any] = {
        "top1": knn_metrics[main_k]["top1"],
        "protocol": cfg.protocol,
        "main_k": main_k,
        "temperature": temperature,
        "knn": {str(k): m for k, m in knn_metrics.items()},
    }
    if ood_report:
        report["auroc"] = ood_report["ood"]["max_cos"]["auroc"]
        report["fpr95"] = ood_report["ood"]["max_cos"]["fpr95"]
        report.update(ood_report)
    return report


def _model_entry(cfg: EvalConfig, loaded: LoadedModel) -> dict[str, Any]:
    return {
        "spec": cfg.model,
        "kind": loaded.kind,
        **loaded.model.describe(),
        "teacher_spec": loaded.teacher_spec,
    }


def _write(cfg: EvalConfig, report: dict, plots: PlotData) -> None:
    """config.yaml, report.json, report.md and the plots into cfg.out."""
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out / "config.yaml")
    write_report(out, report, plots)
    log.info(
        "kNN top-1 (k=%d) %.2f%%%s",
        report["main_k"],
        report["top1"],
        f", AUROC {report['auroc']:.4f}" if "auroc" in report else "",
    )


# ---------------------------------------------------------------------------------------------- fidelity


def _fidelity(
    cfg: EvalConfig, teacher_spec: str, model: Any, queries: Queries, emb_kw: dict, loaded_meta: dict
) -> tuple[dict[str, Any], tuple[np.ndarray, np.ndarray]]:
    """(fidelity metrics, similarity pairs for the plot) of the model against ``teacher_spec``."""
    test = queries.emb
    rows = _subset(np.flatnonzero(test.valid), cfg.fidelity_max, cfg.seed + 2)
    teacher = model if teacher_spec == cfg.model else load_model(teacher_spec, emb_kw["device"]).model
    t_emb = embed_source(teacher, queries.src, rows, **emb_kw)
    ok = t_emb.valid
    s, t = test.features[rows][ok], t_emb.features[ok]
    metrics = fid.fidelity_metrics(s, t, k=10, seed=cfg.seed)
    metrics["teacher"] = teacher_spec
    metrics["teacher_fingerprint"] = teacher.fingerprint()
    recorded = (loaded_meta.get("teacher") or {}) if isinstance(loaded_meta.get("teacher"), dict) else {}
    if recorded.get("fingerprint") and recorded["fingerprint"] != metrics["teacher_fingerprint"]:
        log.warning(
            "fidelity teacher %s is not the teacher the student was distilled from (fingerprint %s...)",
            teacher_spec,
            recorded["fingerprint"][:12],
        )
    log.info(
        "fidelity to %s: spearman %.4f, 10-NN overlap %.3f",
        teacher_spec,
        metrics["spearman"],
        metrics["knn10_overlap"],
    )
    return metrics, fid.similarity_sample(s, t, seed=cfg.seed)


# ---------------------------------------------------------------------------------------------- robustness


@dataclass
class _Classifier:
    """The bank's index and its weighted vote at the headline k."""

    index: Any
    bank_labels: np.ndarray
    k: int
    temperature: float
    num_classes: int

    def top1(self, features: np.ndarray, labels: np.ndarray) -> float:
        """Top-1 accuracy % of queries features [Q, D] with true labels [Q]."""
        res = knn.search(self.index, features, self.k)
        pred = knn.predict(res, self.bank_labels, self.k, self.temperature, self.num_classes)
        return float(100 * (pred == labels).mean())


def _robustness(
    cfg: EvalConfig, model: Any, queries: Queries, classifier: _Classifier, emb_kw: dict, timer: _Timer
) -> dict[str, Any]:
    """kNN accuracy under corruptions and under the feature attack, on subsets of the test images."""
    rob: dict[str, Any] = {}
    id_rows = np.flatnonzero(queries.id_mask)
    if cfg.robustness:
        with timer("robustness"):
            rows = _subset(id_rows, cfg.robustness_max, cfg.seed)
            rob.update(_corruptions(model, queries, rows, classifier, emb_kw))
    if cfg.attack:
        with timer("attack"):
            rows = _subset(id_rows, min(cfg.attack_max, cfg.robustness_max), cfg.seed + 1)
            rob["attack"] = _attack(model, queries, rows, classifier, cfg)
            rob["attack_images"] = int(len(rows))
    return rob


def _corruptions(
    model: Any, queries: Queries, rows: np.ndarray, classifier: _Classifier, emb_kw: dict
) -> dict[str, Any]:
    """kNN top-1 of test ``rows`` clean and under each corruption at each severity."""
    labels = queries.labels[rows]

    def top1(emb: Embeddings) -> float:
        return classifier.top1(emb.features[emb.valid], labels[emb.valid])

    results: dict[str, dict[str, float]] = {}
    for name in robustness.CORRUPTIONS:
        results[name] = {}
        for sev in robustness.SEVERITIES:
            emb = embed_source(model, queries.src, rows, corruption=name, severity=sev, **emb_kw)
            results[name][str(sev)] = top1(emb)
        log.info("robustness %s: %s", name, results[name])
    values = [v for by_sev in results.values() for v in by_sev.values()]
    clean = Embeddings(queries.emb.features[rows], queries.emb.valid[rows], rows)
    return {
        "num_images": int(len(rows)),
        "clean_top1": top1(clean),
        "corruptions": results,
        "mean_corruption_top1": float(np.mean(values)),
    }


def _attack(
    model: Any, queries: Queries, rows: np.ndarray, classifier: _Classifier, cfg: EvalConfig
) -> dict[str, dict[str, float]]:
    """Feature-space PGD-L-inf at each of ATTACK_EPS: {"N/255": eps, mean 1 - cos, kNN top-1 %}."""
    f = pixel_features_fn(model)
    device = next(model.parameters()).device
    out: dict[str, dict[str, float]] = {}
    batches = [rows[i : i + cfg.batch_size] for i in range(0, len(rows), cfg.batch_size)]
    for eps in ATTACK_EPS:
        dists, feats = [], []
        for b in batches:
            x = load_pixels(queries.src, b, model.input_size, cfg.crop_pct).to(device)
            adv = robustness.feature_pgd(f, x, eps=eps, steps=10, seed=cfg.seed)
            with torch.no_grad():
                fa, fc = f(adv).float(), f(x).float()
            dists.append(robustness.cosine_distance(fa, fc).cpu().numpy())
            feats.append(knn.l2_normalize(fa.cpu().numpy()))
        name = f"{round(eps * 255)}/255"
        out[name] = {
            "eps": eps,
            "cos_distance": float(np.concatenate(dists).mean()),
            "top1": classifier.top1(np.concatenate(feats), queries.labels[rows]),
        }
        log.info("PGD eps %s: 1 - cos %.4f, top-1 %.2f", name, out[name]["cos_distance"], out[name]["top1"])
    return out
