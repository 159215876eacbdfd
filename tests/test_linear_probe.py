"""knn-eval's linear probe (against scikit-learn) and OOD suites (named, grouped sets)."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from PIL import Image  # noqa: E402

from cospress.errors import ConfigError  # noqa: E402
from cospress.evaluate import EvalConfig, linear, ood, run_knn_eval  # noqa: E402
from cospress.evaluate.knn import l2_normalize  # noqa: E402
from tests.helpers import make_image_folder, make_tiny_teacher_weights  # noqa: E402


def _blobs(rng, centres, n):
    y = rng.integers(0, len(centres), n)
    x = centres[y] + rng.normal(size=(n, centres.shape[1]))
    return l2_normalize(x.astype(np.float32)), y


def test_linear_probe_matches_logistic_regression():
    sklearn = pytest.importorskip("sklearn.linear_model")
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(5, 32)) * 0.6  # overlapping classes: top-1 ~95%, not 100
    (x_tr, y_tr), (x_te, y_te) = _blobs(rng, centres, 600), _blobs(rng, centres, 400)
    probe = linear.linear_probe(x_tr, y_tr, x_te, y_te, num_classes=5, seed=0)
    reference = sklearn.LogisticRegression(max_iter=5000).fit(x_tr, y_tr)
    sk_top1 = 100 * (reference.predict(x_te) == y_te).mean()
    assert 80 < sk_top1 < 99
    assert abs(probe["top1"] - sk_top1) <= 1.0, (probe, sk_top1)
    assert probe["lr"] in linear.LEARNING_RATES and probe["features"] == "cls"
    assert set(probe["grid"]) == {"cls"}  # no mean patch given: CLS only
    assert set(probe["grid"]["cls"]) == {f"{g:g}" for g in linear.LEARNING_RATES}
    assert (probe["train"], probe["val"], probe["test"]) == (480, 120, 400)
    assert probe["val_top1"] == max(probe["grid"]["cls"].values())
    again = linear.linear_probe(x_tr, y_tr, x_te, y_te, num_classes=5, seed=0)
    assert {k: v for k, v in again.items() if k != "seconds"} == {
        k: v for k, v in probe.items() if k != "seconds"
    }  # deterministic by seed


def test_linear_probe_picks_cls_plus_mean_patch_when_only_the_patch_separates():
    rng = np.random.default_rng(1)
    centres = rng.normal(size=(4, 16)) * 3.0
    (patch_tr, y_tr), (patch_te, y_te) = _blobs(rng, centres, 400), _blobs(rng, centres, 200)
    cls_tr = l2_normalize(rng.normal(size=(400, 16)).astype(np.float32))  # CLS: no class signal
    cls_te = l2_normalize(rng.normal(size=(200, 16)).astype(np.float32))
    probe = linear.linear_probe(
        cls_tr, y_tr, cls_te, y_te, num_classes=4, seed=0, train_patch=patch_tr, test_patch=patch_te
    )
    assert set(probe["grid"]) == {"cls", "cls+mean_patch"}
    assert probe["features"] == "cls+mean_patch" and probe["top1"] > 90
    assert max(probe["grid"]["cls"].values()) < 50  # chance is 25%
    assert probe["val_top1"] == max(probe["grid"]["cls+mean_patch"].values())


def test_parse_ood_specs():
    specs = ood.parse_ood_specs(
        [
            "folder:/a",
            "near:cifar=folder:/b",
            "far:svhn=wds:https://h/x.tar?X-Sig=s",
            "far:wds:/c.tar",
            "t=/d",
        ]
    )
    assert specs == [
        ood.OodSpec("folder:/a", None, "folder:/a"),
        ood.OodSpec("cifar", "near", "folder:/b"),
        ood.OodSpec("svhn", "far", "wds:https://h/x.tar?X-Sig=s"),
        ood.OodSpec("wds:/c.tar", "far", "wds:/c.tar"),
        ood.OodSpec("t", None, "/d"),
    ]
    assert ood.parse_ood_specs(["wds:https://u:tok@h/x.tar?a=b"])[0].name == "wds:https://h/x.tar"
    with pytest.raises(ConfigError, match="two OOD sets"):
        ood.parse_ood_specs(["a=folder:/x", "far:a=folder:/y"])
    with pytest.raises(ConfigError, match="two OOD sets"):
        ood.parse_ood_specs([f"{ood.HELDOUT_SET}=folder:/x"])


def test_score_sets_per_set_metrics_match_sklearn():
    metrics = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(3)
    width = 8
    # sorted neighbour similarities of ID queries and of three OOD sets, the OOD ones lower
    sims = {"id": rng.normal(0.6, 0.2, (200, width))}
    sims.update(
        {
            n: rng.normal(mu, 0.2, (n_, width))
            for n, mu, n_ in (("a", 0.5, 50), ("b", 0.3, 70), ("c", 0.1, 40))
        }
    )
    sims = {n: -np.sort(-np.round(s, 2), axis=1) for n, s in sims.items()}  # rounding makes ties
    sets = {n: np.full((len(s), 1), i, np.float32) for i, (n, s) in enumerate(sims.items()) if n != "id"}
    by_marker = {i: sims[n] for i, n in enumerate(sims)}

    def search(features):
        return by_marker[int(features[0, 0])]

    groups = {"a": "near", "b": "far", "c": "far"}
    result, plot = ood.score_sets(search, sims["id"], sets, ood_k=5, groups=groups)
    assert set(result["ood_sets"]) == {"a", "b", "c"} and set(result["ood"]) == {"max_cos", "knn5"}
    for name in ("a", "b", "c"):
        for score, col in (("max_cos", 0), ("knn5", 4)):
            s = np.r_[sims["id"][:, col], sims[name][:, col]]
            is_id = np.r_[np.ones(200), np.zeros(len(sims[name]))]
            got = result["ood_sets"][name][score]
            assert got["auroc"] == pytest.approx(metrics.roc_auc_score(is_id, s), abs=1e-12)
            assert got["aupr_in"] == pytest.approx(metrics.average_precision_score(is_id, s), abs=1e-12)
            assert got["aupr_out"] == pytest.approx(metrics.average_precision_score(1 - is_id, -s), abs=1e-12)
    far = result["ood_groups"]["far"]
    assert far["sets"] == ["b", "c"] and result["ood_groups"]["near"]["sets"] == ["a"]
    expected = np.mean([result["ood_sets"][n]["knn5"]["fpr95"] for n in ("b", "c")])
    assert far["mean"]["knn5"]["fpr95"] == pytest.approx(expected)
    assert len(plot["max_cos"][1]) == 50 + 70 + 40  # the ROC plot pools every set
    no_groups, _ = ood.score_sets(search, sims["id"], sets, ood_k=5, groups={})
    assert "ood_groups" not in no_groups


@pytest.fixture(scope="module")
def suite(tmp_path_factory):
    root = tmp_path_factory.mktemp("suite")
    train = make_image_folder(root / "train", classes=4, per_class=12, seed=0)
    test = make_image_folder(root / "test", classes=4, per_class=5, seed=1)
    rng = np.random.default_rng(2)
    for name, level in (("grey", 100), ("white", 240)):
        d = root / name
        d.mkdir()
        for i in range(6):
            pixels = rng.integers(level - 10, level + 10, size=(40, 40, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(d / f"o{i}.png")
    weights = make_tiny_teacher_weights(root / "teacher.safetensors", "test_vit", img_size=32)
    return root, train, test, weights


def test_knn_eval_with_linear_probe_and_three_ood_sets(suite, tmp_path):
    root, train, test, weights = suite
    cfg = EvalConfig(
        model=f"teacher:test_vit@32={weights}",
        train=f"folder:{train}",
        test=f"folder:{test}",
        ood=[f"far:grey=folder:{root / 'grey'}", f"far:folder:{root / 'white'}"],
        ood_classes=["class_3"],
        ood_k=5,
        k=[1, 5],
        linear=True,
        fidelity_teacher="none",
        workers=0,
        cache_dir="none",
        crop_pct=1.0,
        out=str(tmp_path / "out"),
    )
    report = run_knn_eval(cfg)
    on_disk = json.loads((tmp_path / "out" / "report.json").read_text())
    white = f"folder:{root / 'white'}"
    assert set(on_disk["ood_sets"]) == {"heldout_classes", "grey", white}
    assert on_disk["ood_groups"]["near"]["sets"] == ["heldout_classes"]
    assert on_disk["ood_groups"]["far"]["sets"] == ["grey", white]
    assert set(on_disk["ood_groups"]["far"]["mean"]) == {"max_cos", "knn5"}
    assert on_disk["counts"]["ood:grey"] == 6
    assert on_disk["data"]["ood0"]["name"] == "grey" and on_disk["data"]["ood0"]["group"] == "far"
    lin = on_disk["linear"]
    assert lin == report["linear"] and 0 <= lin["top1"] <= 100
    assert (
        set(lin["grid"]) == {"cls", "cls+mean_patch"} and lin["features"] in lin["grid"]
    )  # test_vit has tokens
    assert lin["val_top1"] == max(v for by_lr in lin["grid"].values() for v in by_lr.values())
    assert lin["test"] == 15 and lin["train"] + lin["val"] == 36  # ID classes only
    md = (tmp_path / "out" / "report.md").read_text()
    assert "## Linear probe" in md and "cls+mean_patch: " in md and "| grey (far) | max_cos |" in md
    assert "| heldout_classes (near) | knn5 |" in md and "| **far (mean of 2)** | knn5 |" in md
    assert "| all pooled | max_cos |" in md
    # no group given: no group rows, even for the held-out classes
    plain = run_knn_eval(
        EvalConfig(**{**cfg.__dict__, "ood": [], "linear": False, "out": str(tmp_path / "o2")})
    )
    assert "ood_groups" not in plain and "linear" not in plain and "ood_sets" not in plain
    assert "(mean of" not in (tmp_path / "o2" / "report.md").read_text()


def test_bad_ood_entries_fail_before_embedding(tmp_path):
    cfg = EvalConfig(
        model="random:test_vit@32", train="folder:/x", test="folder:/y", ood=["a=folder:/1", "a=folder:/2"]
    )
    with pytest.raises(ConfigError, match="two OOD sets are named 'a'"):
        run_knn_eval(cfg)


def test_ood_suite_recipe_dry_run_uses_real_flags(tmp_path):
    from tests.test_pipelines import ROOT, _check_command, _flags_by_command

    recipe = ROOT / "pipelines" / "ood_suite" / "run.py"
    out = tmp_path / "suite"
    res = subprocess.run(
        [sys.executable, str(recipe), "--dry-run", "--out", str(out), "--student", "runs/s/student-cospress"],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert res.returncode == 0, res.stderr
    cmds = dict(line.split(": ", 1) for line in res.stdout.splitlines() if " -m cospress " in line)
    assert set(cmds) == {"eval-teacher", "eval-student-cospress"}
    flags = _flags_by_command()
    for name, cmd in cmds.items():
        argv = shlex.split(cmd)
        _check_command(argv[argv.index("cospress") + 1 :], flags, name)
        assert "--linear" in argv and argv.count("--ood") == 2 and "far:digits=folder:" in cmd
    assert not out.exists(), "--dry-run must not write"
