"""The knn-eval runner: load model -> bank -> queries -> kNN -> OOD -> fidelity -> robustness -> report.

`run_knn_eval(cfg)` is what `cospress knn-eval` calls; it writes report.json, report.md, the plots
and config.yaml into `cfg.out` and returns the report dict.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cospress.config import save_config, to_dict
from cospress.data.device_decode import resolve_decode
from cospress.data.sources import open_source
from cospress.evaluate import fidelity as fid
from cospress.evaluate import knn, ood, robustness
from cospress.evaluate.config import EvalConfig
from cospress.evaluate.embed import (
    BankSource,
    Embeddings,
    Queries,
    embed_bank,
    embed_ood_sets,
    embed_queries,
    embed_source,
    open_bank,
)
from cospress.evaluate.images import load_pixels
from cospress.evaluate.labels import ClassMap, match_classes
from cospress.evaluate.linear import linear_probe
from cospress.evaluate.models import LoadedModel, load_model, pixel_features_fn
from cospress.evaluate.report import PlotData, write_report
from cospress.models.cost import model_cost
from cospress.runtime import pick_device, seed_everything, tune_malloc
from cospress.utils import redact_config

log = logging.getLogger(__name__)

ATTACK_EPS = (1 / 255, 2 / 255, 4 / 255)
Progress = Callable[[int, int], None]  # (passes done, passes in all)


def run_knn_eval(cfg: EvalConfig, progress: Progress | None = None) -> dict:
    """Evaluate a model by kNN; write the report into cfg.out and return it as a dict.

    progress(done, total) counts the robustness images (a corruption pass or an attack batch each call).
    """
    cfg.validate()  # the settings, once, before anything loads
    tune_malloc()
    timer, t_all = _Timer(), time.perf_counter()
    seed_everything(cfg.seed)
    device = pick_device(cfg.device)
    ks, main_k, temperature = _protocol(cfg)
    data: dict[str, Any] = {}  # what was embedded: {"train" | "test" | "oodI": description}

    with timer("load_model"):
        loaded = load_model(cfg.model, device)
    model = loaded.model
    emb_kw, attack_batch = _embed_kwargs(cfg, model, device)
    bank_src, test_src, classes = _open_sets(cfg, model)
    with timer("embed_train"):
        bank, bank_labels, bank_patch = embed_bank(bank_src, model, emb_kw, classes, data)
    with timer("embed_test"):
        queries = embed_queries(cfg, test_src, model, emb_kw, classes, data)
    num_classes = classes.num_classes

    with timer("knn"):
        index = knn.build_index(bank, kind=cfg.index, nlist=cfg.nlist, nprobe=cfg.nprobe, seed=cfg.seed)
        max_k = max(*ks, cfg.ood_k)
        id_feats, id_labels = queries.emb.features[queries.id_mask], queries.labels[queries.id_mask]
        id_res = knn.search(index, id_feats, max_k)
        knn_metrics = knn.knn_classify(id_res, bank_labels, id_labels, ks, temperature, num_classes)
    counts = {"bank": len(bank), "test_in_distribution": int(queries.id_mask.sum())}

    with timer("ood"):
        ood_sets, groups = embed_ood_sets(cfg, model, emb_kw, queries, data)
        ood_report, plots = _ood(index, id_res.sims, max_k, cfg.ood_k, ood_sets, groups)
        counts.update({f"ood:{name}": len(f) for name, f in ood_sets.items()})
    report = _headline(cfg, knn_metrics, main_k, temperature, ood_report)
    if cfg.linear:
        with timer("linear"):
            report["linear"] = _linear(bank, bank_labels, bank_patch, queries, num_classes, cfg.seed)

    teacher_spec = cfg.fidelity_teacher or loaded.teacher_spec
    if teacher_spec and teacher_spec.lower() != "none":
        with timer("fidelity"):
            report["fidelity"], plots.similarity_pairs = _fidelity(
                cfg, teacher_spec, model, queries, emb_kw, loaded.meta
            )

    if cfg.robustness:
        classifier = _Classifier(index, bank_labels, main_k, temperature, num_classes)
        plan = _RobustnessPlan(cfg, queries, emb_kw, attack_batch, progress or (lambda done, total: None))
        report["robustness"] = _robustness(plan, model, classifier, timer)

    report.update(
        config=redact_config(to_dict(cfg)), model=_model_entry(cfg, loaded), data=data, counts=counts
    )
    report.update(classes=classes.names, batch_sizes={"embed": emb_kw["batch_size"], "attack": attack_batch})
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


def _linear(
    bank: np.ndarray,
    labels: np.ndarray,
    patch: np.ndarray | None,
    queries: Queries,
    num_classes: int,
    seed: int,
) -> dict:
    """The linear probe of the bank (CLS, and mean patch tokens or None) scored on the
    in-distribution test queries: CLS + mean patch joins the grid when both sides have it."""
    mask, test_patch = queries.id_mask, queries.emb.mean_patch
    return linear_probe(
        bank, labels, queries.emb.features[mask], queries.labels[mask], num_classes, seed,
        train_patch=patch, test_patch=None if test_patch is None else test_patch[mask],
    )  # fmt: skip


def _embed_kwargs(cfg: EvalConfig, model: Any, device: torch.device) -> tuple[dict[str, Any], int]:
    """(the keyword arguments of every :func:`embed_source` call of the run, the attack's batch):
    batch sizes fit ``cfg.memory_budget_mb`` of activations at the model's input size."""
    cache_dir = None if (cfg.cache_dir or "").lower() in ("", "none") else cfg.cache_dir
    embed_batch, attack_batch = robustness.batch_sizes(
        model, model.input_size, cfg.memory_budget_mb, cfg.batch_size
    )
    if embed_batch < cfg.batch_size:
        log.info(
            "batches of %d images (%d for the attack) fit --memory-budget-mb %d at %d px",
            embed_batch, attack_batch, cfg.memory_budget_mb, model.input_size,
        )  # fmt: skip
    kwargs = dict(
        batch_size=embed_batch,
        workers=cfg.workers,
        device=device,
        precision=cfg.precision,
        crop_pct=cfg.crop_pct,
        cache_dir=cache_dir,
        seed=cfg.seed,
        decode=resolve_decode(cfg.decode, device),
    )
    return kwargs, attack_batch


def _open_sets(cfg: EvalConfig, model: Any) -> tuple[BankSource, Any, ClassMap]:
    """(the bank, the test source, how their classes match), before anything is embedded."""
    bank_src = open_bank(cfg, model)
    test_src = open_source(cfg.test, limit=cfg.limit_test)
    classes = match_classes(
        bank_src.names,
        bank_src.labels,
        test_src.class_names(),
        np.asarray(test_src.labels(), dtype=np.int64),
        cfg.ood_classes,
        (bank_src.spec, cfg.test),
    )
    return bank_src, test_src, classes


def _subset(rows: np.ndarray, cap: int, seed: int) -> np.ndarray:
    """At most `cap` of rows, drawn deterministically by seed, in increasing order."""
    if len(rows) <= cap:
        return rows
    return np.sort(np.random.default_rng(seed).choice(rows, size=cap, replace=False))


def _ood(index, id_sims, max_k, ood_k, sets, groups) -> tuple[dict[str, Any], PlotData]:
    """(the OOD report entries, the ROC plot's data) of the OOD sets, searched in the bank's index."""
    report, roc = ood.score_sets(lambda f: knn.search(index, f, max_k).sims, id_sims, sets, ood_k, groups)
    return report, PlotData(ood_scores=roc)


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
        **model_cost(loaded.model),
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
    # the teacher's own batch for --memory-budget-mb: a 64 px student's batch of a 112 px CNN teacher
    # took 13 GB (measured: knn-eval of a ViT-Ti @64 student with efficientnet_lite0 @112 as the teacher)
    t_batch, _ = robustness.batch_sizes(teacher, teacher.input_size, cfg.memory_budget_mb, cfg.batch_size)
    t_emb = embed_source(teacher, queries.src, rows, **{**emb_kw, "batch_size": t_batch})
    ok = t_emb.valid
    s, t = test.features[rows][ok], t_emb.features[ok]
    metrics = fid.fidelity_metrics(s, t, k=10, seed=cfg.seed)
    metrics["teacher"] = teacher_spec
    metrics["teacher_batch_size"] = t_batch
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


@dataclass
class _RobustnessPlan:
    """What the robustness passes need besides the model and the classifier."""

    cfg: EvalConfig
    queries: Queries
    emb_kw: dict
    attack_batch: int
    progress: Progress
    done: int = 0
    total: int = 0

    def step(self, images: int) -> None:
        self.done += images
        self.progress(self.done, self.total)


def _robustness(plan: _RobustnessPlan, model: Any, classifier: _Classifier, timer: _Timer) -> dict[str, Any]:
    """kNN accuracy under corruptions (and the feature attack with cfg.attack), on test subsets."""
    cfg, queries = plan.cfg, plan.queries
    id_rows = np.flatnonzero(queries.id_mask)
    rows = _subset(id_rows, cfg.robustness_max, cfg.seed)
    attack_rows = _subset(id_rows, min(cfg.attack_max, cfg.robustness_max), cfg.seed + 1)
    passes = len(robustness.CORRUPTIONS) * len(robustness.SEVERITIES)
    plan.total = passes * len(rows) + (len(ATTACK_EPS) * len(attack_rows) if cfg.attack else 0)
    log.info(
        "robustness: %d corruption passes of %d images%s",
        passes, len(rows), f", then the attack on {len(attack_rows)} images" if cfg.attack else "",
    )  # fmt: skip
    with timer("robustness"):
        rob = _corruptions(model, queries, rows, classifier, plan)
    if cfg.attack:
        with timer("attack"):
            rob["attack"] = _attack(model, queries, attack_rows, classifier, plan)
            rob["attack_images"] = int(len(attack_rows))
    return rob


def _corruptions(
    model: Any, queries: Queries, rows: np.ndarray, classifier: _Classifier, plan: _RobustnessPlan
) -> dict[str, Any]:
    """kNN top-1 of test ``rows`` clean and under each corruption at each severity."""
    labels = queries.labels[rows]

    def top1(emb: Embeddings) -> float:
        return classifier.top1(emb.features[emb.valid], labels[emb.valid])

    results: dict[str, dict[str, float]] = {}
    for name in robustness.CORRUPTIONS:
        results[name] = {}
        for sev in robustness.SEVERITIES:
            emb = embed_source(model, queries.src, rows, corruption=name, severity=sev, **plan.emb_kw)
            results[name][str(sev)] = top1(emb)
            plan.step(len(rows))
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
    model: Any, queries: Queries, rows: np.ndarray, classifier: _Classifier, plan: _RobustnessPlan
) -> dict[str, dict[str, float]]:
    """Feature-space PGD-L-inf at each of ATTACK_EPS: {"N/255": eps, mean 1 - cos, kNN top-1 %}.

    Batches of plan.attack_batch images: a forward + backward in fp32 keeps every activation."""
    cfg = plan.cfg
    f = pixel_features_fn(model)
    device = next(model.parameters()).device
    out: dict[str, dict[str, float]] = {}
    batches = [rows[i : i + plan.attack_batch] for i in range(0, len(rows), plan.attack_batch)]
    for eps in ATTACK_EPS:
        dists, feats = [], []
        for b in batches:
            x = load_pixels(queries.src, b, model.input_size, cfg.crop_pct).to(device)
            adv = robustness.feature_pgd(f, x, eps=eps, steps=10, seed=cfg.seed)
            with torch.no_grad():
                fa, fc = f(adv).float(), f(x).float()
            dists.append(robustness.cosine_distance(fa, fc).cpu().numpy())
            feats.append(knn.l2_normalize(fa.cpu().numpy()))
            plan.step(len(b))
        name = f"{round(eps * 255)}/255"
        out[name] = {
            "eps": eps,
            "cos_distance": float(np.concatenate(dists).mean()),
            "top1": classifier.top1(np.concatenate(feats), queries.labels[rows]),
        }
        log.info("PGD eps %s: 1 - cos %.4f, top-1 %.2f", name, out[name]["cos_distance"], out[name]["top1"])
    return out
