"""The knn-eval runner: embed -> kNN accuracy, OOD, fidelity, robustness -> report.

`run_knn_eval(cfg)` is what `cospress knn-eval` calls; it writes report.json, report.md, the plots
and config.yaml into `cfg.out` and returns the report dict.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cospress.config import save_config, to_dict
from cospress.data.device_decode import resolve_decode
from cospress.data.sources import open_source
from cospress.errors import ConfigError
from cospress.evaluate import fidelity as fid
from cospress.evaluate import knn, ood, robustness
from cospress.evaluate.config import EvalConfig, validate
from cospress.evaluate.embed import (
    Embeddings,
    bank_from_store,
    embed_source,
    load_model,
    load_pixels,
    pixel_features_fn,
)
from cospress.evaluate.report import PlotData, write_report
from cospress.runtime import pick_device, seed_everything, tune_malloc

log = logging.getLogger(__name__)

ATTACK_EPS = (1 / 255, 2 / 255, 4 / 255)


def _subset(rows: np.ndarray, cap: int, seed: int) -> np.ndarray:
    """At most `cap` of rows, drawn deterministically by seed, in increasing order."""
    if len(rows) <= cap:
        return rows
    return np.sort(np.random.default_rng(seed).choice(rows, size=cap, replace=False))


class _Timer(dict):
    def __call__(self, name: str, start: float) -> None:
        self[name] = self.get(name, 0.0) + time.perf_counter() - start


def run_knn_eval(cfg: EvalConfig) -> dict:
    """Evaluate a model by kNN; write the report into cfg.out and return it as a dict."""
    tune_malloc()
    validate(cfg)
    timer = _Timer()
    t_all = time.perf_counter()
    seed_everything(cfg.seed)
    device = pick_device(cfg.device)
    protocol = knn.PROTOCOLS[cfg.protocol]
    ks = list(cfg.k or protocol["ks"])
    main_k = protocol["main_k"] if protocol["main_k"] in ks else ks[0]
    temperature = float(cfg.temperature if cfg.temperature is not None else protocol["temperature"])
    cache_dir = None if (cfg.cache_dir or "").lower() in ("", "none") else cfg.cache_dir
    emb_kw: dict[str, Any] = dict(
        batch_size=cfg.batch_size,
        workers=cfg.workers,
        device=device,
        precision=cfg.precision,
        crop_pct=cfg.crop_pct,
        cache_dir=cache_dir,
        seed=cfg.seed,
        decode=resolve_decode(cfg.decode, device),
    )

    t = time.perf_counter()
    loaded = load_model(cfg.model, device)
    model = loaded.model
    timer("load_model", t)
    data: dict[str, Any] = {}
    counts: dict[str, int] = {}

    # ---- bank
    t = time.perf_counter()
    held = np.asarray(sorted(set(cfg.ood_classes)), dtype=np.int64)
    bank, bank_labels = _embed_bank(cfg, model, emb_kw, held, data)
    timer("embed_train", t)

    # ---- queries
    t = time.perf_counter()
    test_src = open_source(cfg.test, limit=cfg.limit_test)
    test = embed_source(model, test_src, **emb_kw)
    data["test"] = _data_entry(test_src, test)
    timer("embed_test", t)
    test_labels = np.asarray(test_src.labels(), dtype=np.int64)
    heldout = test.valid & np.isin(test_labels, held)
    id_mask = test.valid & (test_labels >= 0) & ~heldout
    if not id_mask.any():
        raise ConfigError(f"{cfg.test} has no labelled in-distribution images to evaluate")
    num_classes = int(max(bank_labels.max(), test_labels.max())) + 1

    # ---- kNN
    t = time.perf_counter()
    index = knn.build_index(bank, kind=cfg.index, nlist=cfg.nlist, nprobe=cfg.nprobe, seed=cfg.seed)
    max_k = max(*ks, cfg.ood_k)
    id_res = knn.search(index, test.features[id_mask], max_k)
    knn_metrics = knn.knn_classify(id_res, bank_labels, test_labels[id_mask], ks, temperature, num_classes)
    timer("knn", t)
    counts.update(bank=len(bank), test_in_distribution=int(id_mask.sum()))

    # ---- OOD
    t = time.perf_counter()
    ood_sets: dict[str, np.ndarray] = {}
    if heldout.any():
        ood_sets["heldout_classes"] = test.features[heldout]
    for i, spec in enumerate(cfg.ood):
        src = open_source(spec, limit=cfg.limit_test)
        emb = embed_source(model, src, **emb_kw)
        data[f"ood{i}"] = _data_entry(src, emb)
        ood_sets[spec] = emb.features[emb.valid]
    ood_report, plots = _ood(index, id_res, ood_sets, max_k, cfg.ood_k)
    counts.update({f"ood:{name}": len(f) for name, f in ood_sets.items()})
    timer("ood", t)

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

    # ---- fidelity
    teacher_spec = cfg.fidelity_teacher or loaded.teacher_spec
    if teacher_spec and teacher_spec.lower() != "none":
        t = time.perf_counter()
        report["fidelity"], plots.similarity_pairs = _fidelity(
            cfg, teacher_spec, model, test_src, test, emb_kw, loaded.meta
        )
        timer("fidelity", t)

    # ---- robustness
    rob = _robustness(
        cfg, model, test_src, test, np.flatnonzero(id_mask), index, bank_labels, test_labels,
        main_k, temperature, num_classes, emb_kw, timer,
    )  # fmt: skip
    if rob:
        report["robustness"] = rob

    report.update(
        config=to_dict(cfg),
        model={
            "spec": cfg.model,
            "kind": loaded.kind,
            **model.describe(),
            "teacher_spec": loaded.teacher_spec,
        },
        data=data,
        counts=counts,
        device=str(device),
    )
    timer("total", t_all)
    report["timings"] = dict(timer)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out / "config.yaml")
    write_report(out, report, plots)
    log.info(
        "kNN top-1 (k=%d) %.2f%%%s",
        main_k,
        report["top1"],
        f", AUROC {report['auroc']:.4f}" if "auroc" in report else "",
    )
    return report


def _embed_bank(
    cfg: EvalConfig, model: Any, emb_kw: dict, held: np.ndarray, data: dict
) -> tuple[np.ndarray, np.ndarray]:
    """The kNN bank (features, labels): from a store's cached teacher features or by embedding
    ``cfg.train``; unlabelled rows and the held-out OOD classes ``held`` are left out."""
    if cfg.bank_store:
        bank, bank_labels, manifest = bank_from_store(cfg.bank_store)
        _check_store_bank(manifest, model, bank)
        data["train"] = {
            "store": cfg.bank_store,
            "source": manifest.get("source"),
            "teacher": manifest.get("teacher"),
        }
    else:
        train_src = open_source(cfg.train, limit=cfg.limit_train)
        emb = embed_source(model, train_src, **emb_kw)
        bank = emb.features[emb.valid]
        bank_labels = np.asarray(train_src.labels(), dtype=np.int64)[emb.valid]
        data["train"] = _data_entry(train_src, emb)
    keep = (bank_labels >= 0) & ~np.isin(bank_labels, held)
    if (bank_labels < 0).any():
        log.warning("bank: %d unlabelled rows left out", int((bank_labels < 0).sum()))
    bank, bank_labels = bank[keep], bank_labels[keep]
    if len(bank) == 0:
        raise ConfigError(
            "the bank has no labelled rows of in-distribution classes; check --train / --ood-classes"
        )
    return bank, bank_labels


def _robustness(
    cfg: EvalConfig,
    model: Any,
    test_src: Any,
    test: Embeddings,
    id_rows: np.ndarray,
    index: Any,
    bank_labels: np.ndarray,
    test_labels: np.ndarray,
    main_k: int,
    temperature: float,
    num_classes: int,
    emb_kw: dict,
    timer: _Timer,
) -> dict[str, Any]:
    """kNN accuracy under corruptions and under the feature attack, on subsets of the test images."""
    rob: dict[str, Any] = {}
    if cfg.robustness:
        t = time.perf_counter()
        rows = _subset(id_rows, cfg.robustness_max, cfg.seed)
        rob.update(
            _corruptions(
                model,
                test_src,
                test,
                rows,
                index,
                bank_labels,
                test_labels,
                main_k,
                temperature,
                num_classes,
                emb_kw,
            )
        )
        timer("robustness", t)
    if cfg.attack:
        t = time.perf_counter()
        rows = _subset(id_rows, min(cfg.attack_max, cfg.robustness_max), cfg.seed + 1)
        rob["attack"] = _attack(
            model, test_src, rows, index, bank_labels, test_labels, main_k, temperature, num_classes, cfg
        )
        rob["attack_images"] = int(len(rows))
        timer("attack", t)
    return rob


def _data_entry(src: Any, emb: Embeddings) -> dict:
    desc = src.describe()
    return {
        **{k: desc.get(k) for k in ("spec", "kind", "count", "keys_sha256")},
        "skipped": len(emb.errors),
        "cache_hit": emb.cache_hit,
        "embed_seconds": round(emb.seconds, 3),
    }


def _check_store_bank(manifest: dict, model: Any, bank: np.ndarray) -> None:
    if bank.shape[1] != model.dim:
        raise ConfigError(
            f"the store's teacher features have dim {bank.shape[1]} but the model gives {model.dim}; "
            "a store bank only fits the teacher that made it (pass --model teacher:NAME of that store)"
        )
    fp = (manifest.get("teacher") or {}).get("fingerprint")
    if fp and fp != model.fingerprint():
        log.warning(
            "the store was made by another model (fingerprint %s...); kNN compares across spaces", fp[:12]
        )


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


def _fidelity(
    cfg: EvalConfig, teacher_spec: str, model, test_src, test: Embeddings, emb_kw: dict, loaded_meta: dict
):
    rows = _subset(np.flatnonzero(test.valid), cfg.fidelity_max, cfg.seed + 2)
    teacher = model if teacher_spec == cfg.model else load_model(teacher_spec, emb_kw["device"]).model
    t_emb = embed_source(teacher, test_src, rows, **emb_kw)
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


def _corruptions(
    model, src, test: Embeddings, rows, index, bank_labels, labels, k, temperature, num_classes, emb_kw
) -> dict:
    clean = Embeddings(test.features[rows], test.valid[rows], rows)

    def top1(emb: Embeddings) -> float:
        res = knn.search(index, emb.features[emb.valid], k)
        pred = knn.predict(res, bank_labels, k, temperature, num_classes)
        return float(100 * (pred == labels[rows][emb.valid]).mean())

    results: dict[str, dict[str, float]] = {}
    for name in robustness.CORRUPTIONS:
        results[name] = {}
        for sev in robustness.SEVERITIES:
            emb = embed_source(model, src, rows, corruption=name, severity=sev, **emb_kw)
            results[name][str(sev)] = top1(emb)
        log.info("robustness %s: %s", name, results[name])
    values = [v for by_sev in results.values() for v in by_sev.values()]
    return {
        "num_images": int(len(rows)),
        "clean_top1": top1(clean),
        "corruptions": results,
        "mean_corruption_top1": float(np.mean(values)),
    }


def _attack(
    model, src, rows, index, bank_labels, labels, k, temperature, num_classes, cfg: EvalConfig
) -> dict:
    f = pixel_features_fn(model)
    device = next(model.parameters()).device
    out: dict[str, dict[str, float]] = {}
    batches = [rows[i : i + cfg.batch_size] for i in range(0, len(rows), cfg.batch_size)]
    for eps in ATTACK_EPS:
        dists, feats = [], []
        for b in batches:
            x = load_pixels(src, b, model.input_size, cfg.crop_pct).to(device)
            adv = robustness.feature_pgd(f, x, eps=eps, steps=10, seed=cfg.seed)
            with torch.no_grad():
                fa, fc = f(adv).float(), f(x).float()
            dists.append(robustness.cosine_distance(fa, fc).cpu().numpy())
            feats.append(knn.l2_normalize(fa.cpu().numpy()))
        res = knn.search(index, np.concatenate(feats), k)
        pred = knn.predict(res, bank_labels, k, temperature, num_classes)
        name = f"{round(eps * 255)}/255"
        out[name] = {
            "eps": eps,
            "cos_distance": float(np.concatenate(dists).mean()),
            "top1": float(100 * (pred == labels[rows]).mean()),
        }
        log.info("PGD eps %s: 1 - cos %.4f, top-1 %.2f", name, out[name]["cos_distance"], out[name]["top1"])
    return out
