"""End-to-end knn-eval on tiny random models and synthetic image folders (real timm, FAISS)."""

from __future__ import annotations

import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from cospress.errors import ConfigError  # noqa: E402
from cospress.evaluate import EvalConfig, embed, images, models, robustness, run_knn_eval  # noqa: E402
from tests.helpers import make_image_folder, make_tiny_teacher_weights  # noqa: E402


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    train = make_image_folder(root / "train", classes=4, per_class=12, seed=0)
    test = make_image_folder(root / "test", classes=4, per_class=5, seed=1)
    ood = root / "ood" / "x"
    ood.mkdir(parents=True)
    rng = np.random.default_rng(2)
    for i in range(6):  # grey noise: unlike any class colour
        Image.fromarray(rng.integers(90, 110, size=(40, 40, 3), dtype=np.uint8)).save(ood / f"o{i}.png")
    weights = make_tiny_teacher_weights(root / "teacher.safetensors", "test_vit", img_size=32)
    return root, train, test, weights


def test_eval_transform_shape_and_crop():
    image = Image.fromarray(np.arange(60 * 40 * 3, dtype=np.uint8).reshape(40, 60, 3) % 255)
    out = images.eval_transform(image, 32, crop_pct=0.875)
    assert out.dtype == torch.uint8 and out.shape == (3, 32, 32)
    full = images.eval_transform(image, 32, crop_pct=1.0)
    assert full.shape == (3, 32, 32) and not torch.equal(out, full)


def test_parse_teacher_spec():
    assert models.parse_teacher_spec("teacher:vit_small@112") == ("vit_small", 112, None, False)
    assert models.parse_teacher_spec("random:test_vit@32") == ("test_vit", 32, None, True)
    assert models.parse_teacher_spec("teacher:test_vit=/w.safetensors") == (
        "test_vit",
        None,
        "/w.safetensors",
        False,
    )
    with pytest.raises(ConfigError):
        models.parse_teacher_spec("teacher:x@big")


def test_run_knn_eval_end_to_end(folders, tmp_path, caplog):
    root, train, test, weights = folders
    cfg = EvalConfig(
        model=f"teacher:test_vit@32={weights}",
        train=f"folder:{train}",
        test=f"folder:{test}",
        ood=[f"folder:{root / 'ood'}"],
        ood_classes=[3],
        k=[1, 5, 20],
        batch_size=16,
        workers=0,
        out=str(tmp_path / "out"),
        cache_dir=str(tmp_path / "cache"),
        ood_k=5,
        fidelity_teacher="random:test_vit@32",
        robustness=True,
        robustness_max=8,
        attack_max=4,
        memory_budget_mb=1,  # 1 MB of activations: batches of 1 or 2 images
        crop_pct=1.0,
    )
    seen = []
    report = run_knn_eval(cfg, progress=lambda done, total: seen.append((done, total)))
    on_disk = json.loads((tmp_path / "out" / "report.json").read_text())
    assert set(on_disk["knn"]) == {"1", "5", "20"}
    assert on_disk["main_k"] == 20  # the dino protocol's headline k, given in --k
    assert on_disk["top1"] == report["top1"] == on_disk["knn"]["20"]["top1"]
    for k, m in on_disk["knn"].items():
        assert 0 <= m["top1"] <= 100 and "top5" not in m, k  # 3 bank classes: top-5 is always 100%
    assert on_disk["classes"] == ["class_0", "class_1", "class_2", "class_3"]
    assert on_disk["batch_sizes"]["attack"] < 4  # sized to the 1 MB budget, not --batch-size
    assert on_disk["counts"]["bank"] == 36  # class 3 removed from the bank
    assert on_disk["model"]["params"] > 0 and on_disk["model"]["gflops_per_image"] > 0
    assert "M parameters" in (tmp_path / "out" / "report.md").read_text()
    assert on_disk["counts"]["test_in_distribution"] == 15
    assert set(on_disk["ood"]) == {"max_cos", "knn5"}
    assert set(on_disk["ood_sets"]) == {"heldout_classes", f"folder:{root / 'ood'}"}
    assert 0 <= on_disk["auroc"] <= 1 and 0 <= on_disk["fpr95"] <= 1
    fid = on_disk["fidelity"]
    assert -1 <= fid["spearman"] <= 1 and fid["num_images"] == 20 and fid["spearman"] < 0.999
    rob = on_disk["robustness"]
    assert set(rob["corruptions"]) == {"gaussian_noise", "gaussian_blur", "contrast", "jpeg", "pixelate"}
    assert rob["num_images"] == 8 and set(rob["corruptions"]["jpeg"]) == {"1", "2", "3", "4", "5"}
    attack = rob["attack"]
    assert list(attack) == ["1/255", "2/255", "4/255"]
    assert attack["1/255"]["cos_distance"] < attack["4/255"]["cos_distance"]
    assert seen[-1] == (25 * 8 + 3 * 4, 25 * 8 + 3 * 4)  # progress counts the robustness images
    for name in (
        "report.md",
        "config.yaml",
        "roc.png",
        "knn_vs_k.png",
        "similarity_hexbin.png",
        "robustness.png",
    ):
        assert (tmp_path / "out" / name).is_file(), name
    assert "kNN classification" in (tmp_path / "out" / "report.md").read_text()
    assert "top-5" not in (tmp_path / "out" / "report.md").read_text()

    # a rerun hits the embedding cache and gives the same numbers
    caplog.set_level("INFO", logger="cospress.evaluate.embed")
    again = run_knn_eval(EvalConfig(**{**cfg.__dict__, "robustness": False, "out": str(tmp_path / "out2")}))
    assert "embedding cache hit" in caplog.text
    assert again["knn"] == report["knn"] and again["ood"] == report["ood"]
    assert again["data"]["test"]["cache_hit"] is True


def test_student_folder_and_self_fidelity(folders, tmp_path):
    root, train, test, _ = folders
    from cospress.models.students import build_student

    student = build_student("test_vit", 32, embed_dim=32, depth=1, num_heads=2)
    export = tmp_path / "run" / "export"
    export.mkdir(parents=True)
    save_file(
        {k: v.contiguous() for k, v in student.model.state_dict().items()},
        str(export / "student.safetensors"),
    )
    meta = {
        "timm_name": "test_vit",
        "input_size": 32,
        "mean": [0.5, 0.5, 0.5],
        "std": [0.5, 0.5, 0.5],
        "timm_kwargs": {"embed_dim": 32, "depth": 1, "num_heads": 2},
        "teacher": "random:test_vit@32",
    }
    (export / "student.json").write_text(json.dumps(meta))
    loaded = models.load_model(str(tmp_path / "run"))
    assert loaded.kind == "student" and loaded.teacher_spec == "random:test_vit@32"
    assert loaded.model.fingerprint() == student.fingerprint()  # the weights round-trip
    report = run_knn_eval(
        EvalConfig(
            model=str(tmp_path / "run"),
            train=f"folder:{train}",
            test=f"folder:{test}",
            protocol="cospress",
            fidelity_teacher=str(tmp_path / "run"),  # itself: perfect fidelity
            workers=0,
            cache_dir="none",
            out=str(tmp_path / "out"),
        )
    )
    assert report["main_k"] == 10 and set(report["knn"]) == {"10"}
    assert "ood" not in report
    assert report["fidelity"]["spearman"] == pytest.approx(1.0)
    assert report["fidelity"]["knn10_overlap"] == pytest.approx(1.0)


def test_distill_run_folder(folders, tmp_path):
    _, _, _, weights = folders
    from cospress.models.students import build_student

    student = build_student("test_vit", 32, embed_dim=32, depth=1, num_heads=2)
    run = tmp_path / "run"
    run.mkdir()
    state = {f"student.{k}": v.contiguous() for k, v in student.model.state_dict().items()}
    state["compressor.proj.weight"] = torch.zeros(32, 64)
    save_file(state, str(run / "best.safetensors"))
    header = {
        "student": {
            "timm_name": "test_vit",
            "timm_kwargs": {"embed_dim": 32, "depth": 1, "num_heads": 2},
            "input_size": 32,
            "mean": [0.5] * 3,
            "std": [0.5] * 3,
        },
        "teacher": {"name": "test_vit", "input_size": 32, "source": f"file:{weights}"},
    }
    (run / "run.json").write_text(json.dumps(header))
    loaded = models.load_model(str(run))
    assert loaded.model.fingerprint() == student.fingerprint()
    assert loaded.teacher_spec == f"teacher:test_vit@32={weights}"
    assert models.load_model(loaded.teacher_spec).model.dim == 64


def test_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="exactly one bank"):
        run_knn_eval(EvalConfig(model="random:test_vit@32", test="folder:x"))
    with pytest.raises(ConfigError, match="neither teacher"):
        models.load_model(str(tmp_path / "missing"))


def test_bank_from_store(folders, tmp_path):
    from cospress.extract import ExtractConfig, run_extract

    root, train, test, weights = folders
    store = tmp_path / "store"
    run_extract(
        ExtractConfig(
            data=f"folder:{train}",
            teacher="test_vit",
            weights=str(weights),
            image_size=32,
            views=2,
            center_view=True,
            tokens=False,
            workers=0,
            batch_size=32,
            shard_size=20,
            out=str(store),
        )
    )
    bank, labels, manifest = embed.bank_from_store(str(store))
    assert bank.shape == (48, 64) and np.allclose(np.linalg.norm(bank, axis=1), 1, atol=1e-3)
    assert sorted(np.bincount(labels).tolist()) == [12, 12, 12, 12]
    cfg = EvalConfig(
        model=f"teacher:test_vit@32={weights}",
        bank_store=str(store),
        test=f"folder:{test}",
        k=[5],
        workers=0,
        cache_dir="none",
        out=str(tmp_path / "out"),
    )
    report = run_knn_eval(cfg)
    assert report["counts"]["bank"] == 48 and report["data"]["train"]["store"] == str(store)
    # the same images embedded from the folder give nearly the same accuracy
    direct = run_knn_eval(EvalConfig(**{**cfg.__dict__, "bank_store": None, "train": f"folder:{train}"}))
    assert abs(report["top1"] - direct["top1"]) <= 25.0
    with pytest.raises(ConfigError, match="dim"):
        run_knn_eval(EvalConfig(**{**cfg.__dict__, "model": "random:test_efficientnet@32"}))


def _eval(tmp_path, train, test, weights, **kw):
    cfg = dict(
        model=f"teacher:test_vit@32={weights}",
        train=f"folder:{train}",
        test=f"folder:{test}",
        k=[1],
        fidelity_teacher="none",
        workers=0,
        cache_dir="none",
        crop_pct=1.0,
        out=str(tmp_path / "out"),
    )
    return run_knn_eval(EvalConfig(**{**cfg, **kw}))


def test_robustness_off_by_default(folders, tmp_path):
    root, train, test, weights = folders
    assert EvalConfig().robustness is False and EvalConfig().attack is True
    report = _eval(tmp_path, train, test, weights)
    assert "robustness" not in report and "robustness" not in report["timings"]


def test_labels_matched_by_class_name(folders, tmp_path):
    """A test folder without one of the bank's classes: labels are matched by name, not position."""
    import shutil

    root, train, _, weights = folders
    test = tmp_path / "test"
    for name in ("class_0", "class_2", "class_3"):  # class_1 missing: positions 1, 2 would shift
        shutil.copytree(train / name, test / name)
    report = _eval(tmp_path, train, test, weights)
    assert report["top1"] == 100.0  # each query finds itself in the bank (k = 1)
    assert report["counts"]["test_in_distribution"] == 36

    # --ood-classes by name or by number of the bank's class list: the same split
    by_name = _eval(tmp_path, train, test, weights, ood_classes=["class_3"])
    by_number = _eval(tmp_path, train, test, weights, ood_classes=["3"])
    for r in (by_name, by_number):
        assert r["top1"] == 100.0 and r["counts"]["bank"] == 36
        assert r["counts"]["test_in_distribution"] == 24 and r["counts"]["ood:heldout_classes"] == 12
    assert by_name["knn"] == by_number["knn"] and by_name["ood"] == by_number["ood"]


def test_test_class_the_bank_lacks(folders, tmp_path):
    import shutil

    root, train, _, weights = folders
    test = tmp_path / "test"
    shutil.copytree(train / "class_0", test / "class_0")
    shutil.copytree(train / "class_2", test / "zebra")
    with pytest.raises(ConfigError, match="test classes zebra .* not in the bank"):
        _eval(tmp_path, train, test, weights)
    report = _eval(tmp_path, train, test, weights, ood_classes=["zebra"])  # named: near-OOD
    assert report["top1"] == 100.0 and report["counts"]["ood:heldout_classes"] == 12
    with pytest.raises(ConfigError, match="'giraffe' is no class"):
        _eval(tmp_path, train, test, weights, ood_classes=["giraffe"])
    with pytest.raises(ConfigError, match="classes 0-3"):
        _eval(tmp_path, train, test, weights, ood_classes=["7"])


def test_cache_key_holds_precision_and_device(folders, tmp_path):
    _, train, _, weights = folders
    from cospress.data.sources import open_source

    model = models.load_model(f"teacher:test_vit@32={weights}").model
    src = open_source(f"folder:{train}")
    kw = dict(workers=0, crop_pct=1.0, cache_dir=tmp_path / "cache")
    fp32 = embed.embed_source(model, src, precision="fp32", **kw)
    bf16 = embed.embed_source(model, src, precision="bf16", **kw)
    assert not bf16.cache_hit and not np.array_equal(fp32.features, bf16.features)
    assert embed.embed_source(model, src, precision="bf16", **kw).cache_hit
    rows = np.arange(len(src))
    keys = {
        embed._cache_key(model, src, rows, 1.0, {}, "cpu", c) for c in [("cpu", "fp32"), ("cuda", "fp32")]
    }
    assert len(keys) == 2


def test_embedding_cache_holds_the_mean_patch_token(folders, tmp_path, monkeypatch):
    _, train, _, weights = folders
    import torch

    from cospress.data.sources import open_source
    from cospress.evaluate.images import EvalImages
    from cospress.evaluate.knn import l2_normalize

    model = models.load_model(f"teacher:test_vit@32={weights}").model
    src = open_source(f"folder:{train}")
    kw = dict(workers=0, crop_pct=1.0, precision="fp32", cache_dir=tmp_path / "cache")
    first = embed.embed_source(model, src, **kw)
    assert first.mean_patch is not None and first.mean_patch.shape == first.features.shape
    images = torch.stack([EvalImages(src, [0, 1], model.input_size, 1.0)[i][1] for i in range(2)])
    with torch.inference_mode():
        out = model(images)
    np.testing.assert_allclose(first.mean_patch[:2], out.tokens.mean(1).numpy(), atol=1e-5)
    np.testing.assert_allclose(first.features[:2], l2_normalize(out.cls.numpy()), atol=1e-5)  # CLS as before
    again = embed.embed_source(model, src, **kw)
    assert again.cache_hit and np.array_equal(again.mean_patch, first.mean_patch)
    assert np.array_equal(again.features, first.features)
    key = embed._cache_key(model, src, np.arange(len(src)), 1.0, {}, "cpu", ("cpu", "float32"))
    assert (tmp_path / "cache" / f"{key}.patch.npy").is_file()
    monkeypatch.setattr(embed, "CACHE_VERSION", 1)  # a version-1 entry (CLS only) has another key
    assert embed._cache_key(model, src, np.arange(len(src)), 1.0, {}, "cpu", ("cpu", "float32")) != key
    bank = embed.embed_source(model, src, cache_dir=None, workers=0, crop_pct=1.0, precision="fp32")
    assert bank.mean_patch is not None and not bank.cache_hit


def test_batches_fit_the_memory_budget():
    from cospress.evaluate import robustness

    small = models.load_model("random:test_efficientnet@32").model
    large = models.load_model("random:test_efficientnet@64").model
    total32, _ = robustness.activation_bytes(small, 32)
    total64, _ = robustness.activation_bytes(large, 64)
    assert total64 == pytest.approx(4 * total32, rel=0.1)  # activations scale with the pixels
    e32, a32 = robustness.batch_sizes(small, 32, 64, cap=10_000)
    e64, a64 = robustness.batch_sizes(large, 64, 64, cap=10_000)
    assert a32 == pytest.approx(4 * a64, rel=0.2) and a64 <= e64
    assert a64 * total64 <= 64 * 2**20  # the attack batch's activations fit the budget
    assert robustness.batch_sizes(large, 64, 1, cap=8)[1] == 1
    assert robustness.batch_sizes(large, 64, 10_000, cap=8) == (8, 8)


def test_the_fidelity_teacher_is_embedded_in_batches_sized_for_itself(folders, tmp_path):
    """The student's batch fits the budget at its own size; the fidelity teacher, larger, gets its own."""
    root, train, test, _ = folders
    cfg = EvalConfig(
        model="random:test_vit@16",
        train=f"folder:{train}",
        test=f"folder:{test}",
        k=[1, 5],
        batch_size=64,
        memory_budget_mb=1,
        workers=0,
        out=str(tmp_path / "out"),
        cache_dir="none",
        fidelity_teacher="random:test_vit@96",
    )
    report = run_knn_eval(cfg)
    teacher = models.load_model("random:test_vit@96").model
    want, _ = robustness.batch_sizes(teacher, 96, 1, 64)
    assert report["fidelity"]["teacher_batch_size"] == want
    assert want < report["batch_sizes"]["embed"]
