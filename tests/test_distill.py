"""Stage 2 (distill): data plan, methods, checkpoints, validation, refusals, export — on tiny stores."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import json  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from cospress import checkpoint as ckpt  # noqa: E402
from cospress.data.sources import open_source  # noqa: E402
from cospress.data.views import PARAM_NAMES, ViewPolicy, sample_view_params  # noqa: E402
from cospress.distill import DistillConfig, run_distill  # noqa: E402
from cospress.distill.data import BatchPlan, check_batch, choose_views, is_val_key, split_rows  # noqa: E402
from cospress.errors import ConfigError, CospressError, StoreError  # noqa: E402
from cospress.store import StoreLayout  # noqa: E402
from cospress.store import manifest as mf  # noqa: E402
from cospress.store.records import NEW  # noqa: E402
from cospress.store.writer import StoreWriter  # noqa: E402

TINY_STUDENT = {"student": "test_vit", "student_size": 32}


def make_images(root: Path, n: int = 24, classes: int = 2, size: int = 40, seed: int = 0) -> str:
    """A folder source of n seeded PNGs in class sub-folders; each class has its own colour bias."""
    rng = np.random.default_rng(seed)
    for i in range(n):
        c = i % classes
        d = root / f"class{c}"
        d.mkdir(parents=True, exist_ok=True)
        base = np.zeros((size, size, 3), np.float32)
        base[..., c % 3] = 180
        img = np.clip(base + rng.normal(0, 40, (size, size, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(img).save(d / f"img{i:03d}.png")
    return f"folder:{root}"


def make_store(
    tmp: Path,
    *,
    n: int = 24,
    k: int = 4,
    dt: int = 16,
    grid: tuple[int, int] = (2, 2),
    tokens: bool = True,
    shard_size: int = 10,
    labelled: bool = True,
    fingerprint: str = "teacher-fp",
    invalid: tuple[int, ...] = (),
    seed: int = 0,
) -> tuple[str, str]:
    """A complete store written with the real StoreWriter from seeded random features; returns (url, spec)."""
    images = tmp / "images"
    spec = make_images(images, n) if labelled else _flat_images(images, n)
    source = open_source(spec)
    policy = ViewPolicy()
    teacher = {"name": "fake", "fingerprint": fingerprint, "grid": list(grid), "dim": dt, "input_size": 32}
    ident = mf.make_identity(
        teacher=teacher,
        view_policy=policy.to_dict(),
        policy_fingerprint=policy.fingerprint(),
        k=k,
        center_view=False,
        seed=seed,
        source=source.describe(),
        param_names=list(PARAM_NAMES),
    )
    t = grid[0] * grid[1]
    url = str(tmp / "store")
    w = StoreWriter.open(url, ident, StoreLayout(n, shard_size, k, dt, t, len(PARAM_NAMES), tokens))
    rng = np.random.default_rng(seed + 1)
    keys, labels = source.keys(), source.labels()
    for s in range(w.num_shards):
        a, b = w.shard_rows(s)
        m = b - a
        # class-dependent features so kNN on the teacher space is meaningful
        centers = rng.normal(size=(2, dt)).astype(np.float32)
        cls = centers[np.maximum(np.asarray(labels[a:b]), 0) % 2][:, None] + 0.3 * rng.normal(size=(m, k, dt))
        views = np.stack(
            [
                np.stack([sample_view_params(policy, seed, keys[i], v, 40, 40) for v in range(k)])
                for i in range(a, b)
            ]
        )
        valid = np.array([0 if i in invalid else 1 for i in range(a, b)], np.uint8)
        w.write_shard(
            s,
            cls=cls.astype(np.float16),
            tokens=rng.normal(size=(m, k, t, dt)).astype(np.float16) if tokens else None,
            views=views,
            keys=keys[a:b],
            labels=np.asarray(labels[a:b]),
            valid=valid,
        )
    w.finalize()
    return url, spec


def _flat_images(root: Path, n: int) -> str:
    rng = np.random.default_rng(3)
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(root / f"u{i:03d}.png")
    return f"folder:{root}"


def tiny_cfg(store: str, out: Path, **kw) -> DistillConfig:
    base = dict(
        store=store, out=str(out), epochs=2, batch_size=12, views_per_image=3, workers=0,
        precision="fp32", val_fraction=0.25, warmup_epochs=0.5, temperatures=[0.02, 0.1],
        **TINY_STUDENT,
    )  # fmt: skip
    base.update(kw)
    return DistillConfig(**base)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return make_store(tmp_path_factory.mktemp("store"))


# --------------------------------------------------------------------------- data plan
def test_split_is_stable_by_key_and_excludes_invalid():
    keys = [f"k{i}" for i in range(400)]
    valid = np.ones(400, bool)
    valid[[3, 7]] = False
    s = split_rows(keys, valid, 0.1)
    assert 3 not in s.train and 7 not in s.train and 3 not in s.val
    assert set(s.train) | set(s.val) == set(range(400)) - {3, 7}
    assert 20 <= len(s.val) <= 65  # ~10 %
    # stable: the same key is in val whatever the order or the other keys
    assert all(is_val_key(keys[r], 0.1) for r in s.val)
    s2 = split_rows(keys[::-1], valid[::-1], 0.1)
    assert sorted(keys[::-1][r] for r in s2.val) == sorted(keys[r] for r in s.val)


def test_batch_plan_views_and_rank_slices():
    rows = np.arange(50, dtype=np.int64)
    full = BatchPlan(rows, seed=1, epoch=2, batch_size=12, views_per_image=3, stored_views=5)
    assert len(full) == 50 // 4
    r0 = BatchPlan(rows, seed=1, epoch=2, batch_size=12, views_per_image=3, stored_views=5, rank=0, world=2)
    r1 = BatchPlan(rows, seed=1, epoch=2, batch_size=12, views_per_image=3, stored_views=5, rank=1, world=2)
    rows_f, views_f = full.rows_views(3)
    a, va = r0.rows_views(3)
    b, vb = r1.rows_views(3)
    assert np.array_equal(np.concatenate([a, b]), rows_f)
    assert np.array_equal(np.concatenate([va, vb]), views_f)
    assert views_f.shape == (4, 3) and all(len(set(v)) == 3 for v in views_f)  # without replacement
    assert views_f.max() < 5
    # deterministic by (seed, epoch, row); another epoch reshuffles
    assert np.array_equal(choose_views(1, 2, 7, 5, 3), choose_views(1, 2, 7, 5, 3))
    other = BatchPlan(rows, seed=1, epoch=3, batch_size=12, views_per_image=3, stored_views=5)
    assert not np.array_equal(other.order, full.order)
    assert sorted(other.order) == sorted(full.order)
    for bad in ((12, 6, 5, 1), (12, 5, 5, 1), (12, 3, 5, 3)):  # R > stored, R not dividing, ranks uneven
        with pytest.raises(ConfigError):
            check_batch(*bad)  # once per run, in run.prepare: every BatchPlan of the run has this shape


# --------------------------------------------------------------------------- runs
@pytest.fixture(scope="module")
def cospress_run(store, tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "run"
    summary = run_distill(tiny_cfg(store[0], out))
    return out, summary


def test_cospress_run_writes_config_metrics_and_checkpoints(cospress_run):
    out, summary = cospress_run
    assert summary["steps"] == 2 * (18 // 4) and summary["world"] == 1
    assert (out / "config.yaml").is_file() and (out / "run.json").is_file()
    header = json.loads((out / "run.json").read_text())
    assert header["teacher"]["fingerprint"] == "teacher-fp" and header["student"]["timm_name"] == "test_vit"
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if r["phase"] == "train"]
    val = [r for r in rows if r["phase"] == "val"]
    assert [r["step"] for r in train] == list(range(1, summary["steps"] + 1))
    for key in ("loss/local", "loss/global", "loss/tokens", "loss/cls", "loss/total", "lr", "images_per_s"):
        assert all(np.isfinite(r[key]) for r in train), key
    assert train[0]["loss/local"] > 0 and train[0]["loss/global"] > 0
    assert len(val) == 2 and all(0.0 <= r["knn_accuracy"] <= 1.0 for r in val)
    # warm-up then cosine decay towards min_lr
    lrs = [r["lr"] for r in train]
    assert max(lrs) == pytest.approx(5e-4) and lrs[-1] < lrs[2]
    weights, state = ckpt.load_checkpoint(out, "last")
    assert {k.split(".")[0] for k in weights} == {"student", "compressor"}
    assert not any("module." in k or "_orig_mod" in k for k in weights)
    assert "student.cls_token" in weights  # bare timm names under student.
    raw = torch.load(ckpt.paths(out, "last")[1], weights_only=True)
    assert raw["step"] == summary["steps"] and raw["epoch"] == 2 and raw["position"] == 0
    assert raw["format_version"] == ckpt.FORMAT_VERSION and raw["config"]["method"] == "cospress"
    assert "state" in raw["optimizer"] and "torch" in raw["rng"]
    assert ckpt.exists(out, "best")


def test_compressor_learns_only_from_kl_and_student_only_from_cosine():
    from cospress.distill.model import DistillModel, compute_losses
    from cospress.models.features import Features
    from cospress.models.students import build_student

    model = DistillModel(build_student("test_vit", 32), "cospress", dt=16)
    images = torch.randint(0, 255, (6, 3, 32, 32), dtype=torch.uint8)
    teacher = Features(cls=torch.randn(6, 16), tokens=torch.randn(6, 4, 16))
    w = dict.fromkeys(("local", "global", "tokens", "cls"), 1.0)
    terms = compute_losses(
        model, images, teacher, method="cospress", temperatures=[0.05, 0.1], weights=w, use_tokens=True
    )
    h = list(model.compressor.parameters())
    s = list(model.student.parameters())
    g_cos_h = torch.autograd.grad(terms["tokens"] + terms["cls"], h, retain_graph=True, allow_unused=True)
    g_kl_s = torch.autograd.grad(terms["local"] + terms["global"], s, retain_graph=True, allow_unused=True)
    assert all(g is None or not g.any() for g in g_cos_h)
    assert all(g is None or not g.any() for g in g_kl_s)
    g_kl_h = torch.autograd.grad(terms["local"] + terms["global"], h, retain_graph=True)
    assert any(g.abs().sum() > 0 for g in g_kl_h)
    assert torch.allclose(terms["total"], terms["local"] + terms["global"] + terms["tokens"] + terms["cls"])


def test_joint_and_compressor_first_share_the_native_grid_local_term():
    from cospress.distill.model import DistillModel, compute_losses
    from cospress.losses import similarity_kl
    from cospress.models.features import Features
    from cospress.models.students import build_student

    torch.manual_seed(0)
    model = DistillModel(build_student("test_vit", 32), "cospress", dt=16)
    grid_s = tuple(model.student.grid)
    images = torch.randint(0, 255, (6, 3, 32, 32), dtype=torch.uint8)
    teacher = Features(cls=torch.randn(6, 16), tokens=torch.randn(6, 25, 16))  # a 5x5 teacher grid
    w = dict.fromkeys(("local", "global", "tokens", "cls"), 1.0)
    terms = compute_losses(
        model, images, teacher, method="cospress", temperatures=[0.05, 0.1], weights=w, use_tokens=True,
        grids=((5, 5), grid_s),
    )  # fmt: skip
    t_all = teacher.all_tokens()
    # fit_compressor's local term: the KL between the native tokens and h of them
    native = similarity_kl(t_all, model.compressor(t_all), [0.05, 0.1])
    torch.testing.assert_close(terms["local"], native, rtol=1e-5, atol=1e-7)
    assert grid_s != (5, 5) and np.isfinite(float(terms["tokens"]))


@pytest.mark.parametrize("method", ["cosine", "mse", "smooth-l1"])
def test_baselines_train_a_head_into_the_teacher_space(store, tmp_path, method):
    summary = run_distill(tiny_cfg(store[0], tmp_path / "run", method=method, epochs=1))
    weights, _ = ckpt.load_checkpoint(tmp_path / "run", "last")
    assert weights["head.1.weight"].shape == (16, 64)  # LayerNorm(Ds=64) -> Linear Ds -> Dt=16 (Proteus)
    assert weights["head.0.weight"].shape == (64,)
    assert "compressor.net.0.weight" not in weights
    assert set(k for k in summary["last"] if k.startswith("loss/")) == {
        "loss/cls",
        "loss/tokens",
        "loss/total",
    }


def test_compressor_first_fits_h_then_freezes_it(store, tmp_path):
    out = tmp_path / "run"
    summary = run_distill(
        tiny_cfg(store[0], out, compressor_first=True, compressor_epochs=1, val_fraction=0.0)
    )
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    fit = [r for r in rows if r["phase"] == "compressor"]
    assert len(fit) == 24 // 4 and all(np.isfinite(r["loss/total"]) for r in fit)
    assert "loss/local" not in summary["last"]  # h frozen: only the cosine terms train the student
    # no labels held out -> best = last at every epoch end; h is the same in both, and equals the fit
    best, _ = ckpt.load_checkpoint(out, "best")
    last, _ = ckpt.load_checkpoint(out, "last")
    assert all(torch.equal(best[k], last[k]) for k in last)
    assert summary["best_knn_accuracy"] is None and summary["best_epoch"] == 1


def test_store_without_tokens_turns_local_and_token_terms_off(tmp_path, caplog):
    url, _ = make_store(tmp_path, tokens=False, n=16, shard_size=16)
    with caplog.at_level("WARNING"):
        summary = run_distill(tiny_cfg(url, tmp_path / "run", epochs=1, val_fraction=0.0))
    assert "no tokens" in caplog.text
    assert summary["use_tokens"] is False
    assert summary["last"]["loss/local"] == 0.0 and summary["last"]["loss/tokens"] == 0.0
    assert summary["last"]["loss/global"] > 0


def test_teacher_tokens_on_another_grid_are_resampled(tmp_path):
    url, _ = make_store(tmp_path, grid=(3, 3), n=16, shard_size=8, labelled=False)
    summary = run_distill(tiny_cfg(url, tmp_path / "run", epochs=1, val_fraction=0.0))
    assert np.isfinite(summary["last"]["loss/total"]) and summary["last"]["loss/local"] > 0


# --------------------------------------------------------------------------- refusals
def test_refuses_bad_stores_and_mismatches(store, tmp_path):
    import shutil

    url, spec = store
    with pytest.raises(StoreError, match="fingerprint"):
        run_distill(tiny_cfg(url, tmp_path / "a", expect_teacher="another-teacher"))
    broken = tmp_path / "nomanifest"
    shutil.copytree(url, broken)
    (broken / NEW.manifest).unlink()
    with pytest.raises(StoreError, match="manifest"):
        run_distill(tiny_cfg(str(broken), tmp_path / "b"))
    future = tmp_path / "future"
    shutil.copytree(url, future)
    record = json.loads((future / NEW.manifest).read_text())  # a Zarr group node: the manifest in attributes
    record["attributes"]["schema_version"] = "9.0"
    (future / NEW.manifest).write_text(json.dumps(record))
    with pytest.raises(StoreError, match="schema version"):
        run_distill(tiny_cfg(str(future), tmp_path / "c"))
    other = make_images(tmp_path / "other", 4)
    (tmp_path / "other" / "class0" / "img000.png").rename(tmp_path / "other" / "class0" / "x.png")
    with pytest.raises(StoreError, match="not in source"):
        run_distill(tiny_cfg(url, tmp_path / "d", data=other))
    with pytest.raises(ConfigError, match="views_per_image"):
        run_distill(tiny_cfg(url, tmp_path / "e", views_per_image=5))
    with pytest.raises(ConfigError, match="method"):
        run_distill(tiny_cfg(url, tmp_path / "f", method="nope"))


def test_existing_run_needs_resume(cospress_run, store):
    out, _ = cospress_run
    with pytest.raises(CospressError, match="--resume"):
        run_distill(tiny_cfg(store[0], out))
    # resume of a finished run trains no more steps and keeps the weights
    before, _ = ckpt.load_checkpoint(out, "last")
    summary = run_distill(tiny_cfg(store[0], out, resume=True))
    after, _ = ckpt.load_checkpoint(out, "last")
    assert summary["steps"] == 8 and all(torch.equal(before[k], after[k]) for k in before)


# --------------------------------------------------------------------------- export
def test_export_loads_in_bare_timm(cospress_run, tmp_path):
    import safetensors.torch
    import timm

    from cospress.export import export_student, load_exported

    run, _ = cospress_run
    desc = export_student(run, tmp_path / "exp", which="last")
    info = json.loads((tmp_path / "exp" / "student.json").read_text())
    for key in ("timm_name", "timm_kwargs", "input_size", "mean", "std", "dim", "grid", "method", "teacher"):
        assert key in info
    assert info["teacher"]["fingerprint"] == "teacher-fp" and desc["method"] == "cospress"
    m = timm.create_model(
        info["timm_name"], num_classes=0, img_size=info["input_size"], **info["timm_kwargs"]
    )
    m.load_state_dict(safetensors.torch.load_file(tmp_path / "exp" / "student.safetensors"))  # strict
    fm = load_exported(tmp_path / "exp")
    last, _ = ckpt.load_checkpoint(run, "last")
    assert torch.equal(fm.model.cls_token, last["student.cls_token"])
    x = torch.randint(0, 255, (2, 3, 32, 32), dtype=torch.uint8)
    m.eval()
    ref = m.forward_features(fm.preprocess(x))[:, 0]
    assert torch.allclose(fm(x).cls, ref, atol=1e-5)


def test_val_split_is_independent_of_limit():
    """--limit keeps the keys with the smallest sha256; the validation split must not pick them all."""
    import hashlib

    keys = [f"train-{i:05d}" for i in range(4000)]
    limited = sorted(keys, key=lambda k: hashlib.sha256(k.encode()).hexdigest())[:400]
    s = split_rows(limited, np.ones(len(limited), bool), 0.05)
    assert 5 <= len(s.val) <= 40
    assert len(s.train) + len(s.val) == 400


class _DeviceReads(torch.overrides.TorchFunctionMode):
    """Records the calls that copy a tensor's values to the host (on CUDA each one waits for the GPU).

    AdamW's step counters are ignored: they live on the CPU on every device (no wait).
    """

    def __init__(self, opt):
        super().__init__()
        self.reads: list[str] = []
        self.opt = opt

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", "") in ("tolist", "item", "cpu", "numpy", "__float__"):
            if not any(args[0] is st.get("step") for st in self.opt.state.values()):
                self.reads.append(func.__name__)
        return func(*args, **(kwargs or {}))


def test_train_step_leaves_the_loss_terms_on_the_device_and_the_log_reads_them_in_batches(tmp_path):
    from types import SimpleNamespace

    from cospress.distill.model import DistillModel, train_step
    from cospress.distill.state import MetricsLog, RunState, train_row
    from cospress.models.features import Features
    from cospress.models.students import build_student

    torch.manual_seed(0)
    model = DistillModel(build_student("test_vit", 32), "cospress", dt=16)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    cfg = SimpleNamespace(
        method="cospress", temperatures=[0.05, 0.1], w_local=1.0, w_global=1.0, w_tokens=1.0, w_cls=1.0,
        compressor_first=False, grad_clip=1.0,
    )  # fmt: skip
    images = torch.randint(0, 255, (4, 3, 32, 32), dtype=torch.uint8)
    teacher = Features(cls=torch.randn(4, 16), tokens=torch.randn(4, 4, 16))
    at = RunState()
    with MetricsLog(tmp_path / "metrics.jsonl", True, every=3) as metrics, _DeviceReads(opt) as seen:
        for step in range(1, 6):
            terms = train_step(model, opt, images, teacher, 1e-3, cfg, True, None)
            assert all(isinstance(v, torch.Tensor) and v.dim() == 0 for v in terms.values())
            at.step = step
            metrics.add_train(train_row(at, 1e-3, 4, 0.0, 0.1), terms)
        assert seen.reads == ["tolist"]  # 5 steps, one read (at step 3); steps 4-5 still pending
        assert metrics.flush()["step"] == 5
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5]
    assert list(rows[0])[:5] == ["phase", "step", "epoch", "lr", "loss/cls"]
    assert all(np.isfinite(r["loss/total"]) for r in rows)
