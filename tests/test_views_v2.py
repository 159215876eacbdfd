"""View policy version 2: RandAugment and random erasing recorded in the view params, replayed exactly."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from cospress.data.views import (
    NUM_PARAMS,
    NUM_PARAMS_V2,
    PARAM_NAMES_V2,
    ViewPolicy,
    center_view_params,
    replay_view,
    replay_views_batch,
    sample_view_params,
)
from cospress.errors import ConfigError
from tests.helpers import error_line, make_image_folder, make_tiny_teacher_weights, run_cli

RA = "rand-m9-mstd0.5-inc1"
V2 = ViewPolicy(rand_augment=RA, erase_prob=0.5, color_jitter=0.5)
IDX = {n: i for i, n in enumerate(PARAM_NAMES_V2)}
E = slice(IDX["erase_top"], IDX["erase_noise"] + 1)
# fingerprints of version 1 policies as the code before version 2 wrote them (commit 647ef72)
OLD_FINGERPRINTS = {
    ViewPolicy(): "d83d8b4d56ebb66f3ceddfe90c501d8e1a289d5586a3efbf4344c144462d9cc7",
    ViewPolicy(
        color_jitter=0.8, grayscale=0.2, blur=0.5
    ): "9c721530a0550f03f3005ea75ef73dbf99f619818b3652b783a4308ea45e1d2e",
}


def _images(n: int, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    sizes = torch.randint(30, 90, (n, 2), generator=g)
    return [torch.randint(0, 256, (3, int(h), int(w)), generator=g, dtype=torch.uint8) for h, w in sizes]


def test_version_1_policies_are_unchanged():
    for pol, digest in OLD_FINGERPRINTS.items():
        assert pol.version == 1 and pol.num_params == NUM_PARAMS == 11
        assert pol.fingerprint() == digest
        assert "rand_augment" not in pol.to_dict() and pol.to_dict()["version"] == 1
        assert ViewPolicy.from_dict(pol.to_dict()) == pol
    assert sample_view_params(ViewPolicy(), 0, "k", 0, 50, 40).shape == (NUM_PARAMS,)


def test_version_2_policy_dict_fingerprint_and_errors():
    assert V2.version == 2 and V2.num_params == NUM_PARAMS_V2 == 27
    assert V2.rand_augment == "rand-m9-n2-mstd0.5-inc1"  # canonical: equal settings, equal fingerprints
    assert ViewPolicy(rand_augment="rand-inc1-m9-mstd0.5", erase_prob=0.5, color_jitter=0.5) == V2
    d = V2.to_dict()
    assert d["version"] == 2 and d["erase_prob"] == 0.5 and ViewPolicy.from_dict(d) == V2
    prints = {
        V2.fingerprint(),
        ViewPolicy(rand_augment=RA).fingerprint(),
        ViewPolicy(erase_prob=0.25).fingerprint(),
        ViewPolicy(erase_prob=0.25, erase_mode="rand").fingerprint(),
        ViewPolicy(erase_prob=0.25, erase_area=(0.1, 0.2)).fingerprint(),
        ViewPolicy(rand_augment="rand-m7-mstd0.5-inc1").fingerprint(),
        ViewPolicy(version=2).fingerprint(),
        ViewPolicy().fingerprint(),
    }
    assert len(prints) == 8
    with pytest.raises(ConfigError, match="version 3 is unknown"):
        ViewPolicy.from_dict({**d, "version": 3})
    with pytest.raises(ConfigError, match="version 1 has no RandAugment"):
        ViewPolicy.from_dict({**d, "version": 1})
    for bad in (
        {"erase_prob": 1.5},
        {"erase_area": (0.5, 1.0)},
        {"erase_mode": "noise"},
        {"rand_augment": "m9"},
    ):
        with pytest.raises(ConfigError):
            ViewPolicy(**bad)


def test_params_are_deterministic_per_seed_key_view():
    calls = [(s, k, v) for s in (0, 1) for k in ("a", "img/0001.jpg") for v in range(4)]
    first = {c: sample_view_params(V2, *c, 640, 480) for c in calls}
    again = {c: sample_view_params(V2, *c, 640, 480) for c in reversed(calls)}
    for c in calls:
        assert first[c].dtype == np.float32 and first[c].shape == (NUM_PARAMS_V2,)
        assert np.array_equal(first[c], again[c])
        # version 2 draws the crop / flip / colour of the version 1 policy with the same settings
        v1 = sample_view_params(ViewPolicy(color_jitter=0.5), *c, 640, 480)
        assert np.array_equal(first[c][:NUM_PARAMS], v1)
    assert len({first[c][NUM_PARAMS:].tobytes() for c in calls}) > len(calls) * 0.7


def test_recorded_values_follow_the_policy():
    ps = np.stack([sample_view_params(V2, 3, f"k{i}", i % 4, 300, 200) for i in range(800)])
    erased = ps[:, IDX["erase_height"]] > 0
    assert 0.4 < erased.mean() < 0.6  # erase_prob 0.5 (nearly every draw fits in 10 tries)
    area = ps[erased, IDX["erase_height"]] * ps[erased, IDX["erase_width"]]
    assert area.min() >= 0.02 - 1e-6 and area.max() <= 1 / 3 + 1e-6
    aspect = ps[erased, IDX["erase_height"]] / ps[erased, IDX["erase_width"]]
    assert aspect.min() >= 0.3 - 1e-4 and aspect.max() <= 1 / 0.3 + 1e-3
    assert (ps[erased, IDX["erase_top"]] + ps[erased, IDX["erase_height"]] <= 1 + 1e-6).all()
    seeds = ps[erased, IDX["erase_noise"]]
    assert (seeds >= 1).all() and np.array_equal(seeds, seeds.round()) and len(set(seeds)) > 0.95 * len(seeds)
    ops = ps[:, IDX["ra0_op"] :: 2]
    assert not ops[:, 2:].any()  # n = 2: slots 2 and 3 are padding
    assert 0.4 < (ops[:, :2] > 0).mean() < 0.6  # each op applied with p = 0.5
    assert set(np.unique(ops[:, :2])) == set(range(16))  # none + the 15 ops
    # const / rand fills: a recorded colour, no noise
    const = ViewPolicy(erase_prob=1.0, erase_mode="const")
    p = sample_view_params(const, 0, "c", 0, 64, 64)
    assert (
        np.allclose(p[IDX["erase_r"] : IDX["erase_b"] + 1], (0.485, 0.456, 0.406))
        and p[IDX["erase_noise"]] == 0
    )
    rand = np.stack(
        [
            sample_view_params(ViewPolicy(erase_prob=1.0, erase_mode="rand"), 0, f"r{i}", 0, 64, 64)
            for i in range(50)
        ]
    )
    assert rand[:, IDX["erase_r"]].std() > 0.1 and not rand[:, IDX["erase_noise"]].any()


def test_erasing_replays_the_same_box_at_two_sizes_and_noise_exactly():
    img = torch.full((3, 80, 120), 200, dtype=torch.uint8)
    p = center_view_params(120, 80, 2)
    p[E] = (0.25, 0.5, 0.5, 0.25, 0.1, 0.2, 0.3, 0)  # a solid box: rows 1/4..3/4, columns 1/2..3/4
    for size in (16, 64):
        out = replay_view(img, p, size)
        box = out[:, size // 4 : 3 * size // 4, size // 2 : 3 * size // 4]
        assert torch.equal(box[:, 0, 0], torch.tensor([26, 51, 76], dtype=torch.uint8))
        assert (box == box[:, :1, :1]).all() and (out == 200).sum() == 3 * size * size - box.numel()
    p[E.stop - 1] = 12345  # per-pixel noise around the colour
    a, b = replay_view(img, p, 64), replay_view(img, p, 64)
    assert torch.equal(a, b)  # the noise is a function of the recorded seed
    noise = a[:, 16:48, 32:48].float() / 255 - torch.tensor([0.1, 0.2, 0.3]).view(3, 1, 1)
    assert 0.15 < float(noise[1:].std()) < 0.3 and abs(float(noise[2].mean())) < 0.05
    p[E.stop - 1] = 12346
    assert not torch.equal(replay_view(img, p, 64), a)


def test_cpu_and_batched_replay_agree_with_randaugment_and_erasing():
    """Stated tolerance: >= 99.5% of the pixels within 1 grey level, erased boxes identical."""
    imgs = _images(24)
    ps = np.stack(
        [sample_view_params(V2, 1, f"k{i}", i % 3, im.shape[2], im.shape[1]) for i, im in enumerate(imgs)]
    )
    assert (ps[:, IDX["ra0_op"]] > 0).any() and (ps[:, IDX["erase_height"]] > 0).any()
    for size in (24, 40):
        single = torch.stack([replay_view(im, p, size) for im, p in zip(imgs, ps, strict=True)]).int()
        for batched in (False, True):
            batch = replay_views_batch(imgs, torch.from_numpy(ps), size, batched=batched).int()
            diff = (batch - single).abs()
            assert (diff <= 1).float().mean() >= 0.995, (size, batched, diff.max())
    # the same image repeated (as decode_replay passes the views of one image) is one matmul group
    same = [imgs[0]] * 12
    sp = np.stack(
        [sample_view_params(V2, 2, "same", v, imgs[0].shape[2], imgs[0].shape[1]) for v in range(12)]
    )
    single = torch.stack([replay_view(im, p, 20) for im, p in zip(same, sp, strict=True)]).int()
    assert (
        (replay_views_batch(same, sp, 20, batched=True).int() - single).abs() <= 1
    ).float().mean() >= 0.995


def test_version_1_rows_replay_as_before():
    """A version 1 row and the same row padded with version 2's no-op values replay bit for bit the same."""
    imgs = _images(8, seed=3)
    pol = ViewPolicy(color_jitter=0.8, grayscale=0.2, blur=0.5)
    for i, im in enumerate(imgs):
        p1 = sample_view_params(pol, 0, f"k{i}", 0, im.shape[2], im.shape[1])
        p2 = np.concatenate([p1, np.zeros(NUM_PARAMS_V2 - NUM_PARAMS, np.float32)])
        assert torch.equal(replay_view(im, p1, 32), replay_view(im, p2, 32))
    with pytest.raises(ValueError, match="policy version 1"):
        replay_view(imgs[0], np.zeros(13, np.float32), 8)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("v2")
    return make_image_folder(tmp / "images", classes=2, per_class=6), make_tiny_teacher_weights(
        tmp / "t.safetensors"
    )


COMMON = ["--workers", "0", "--device", "cpu", "--precision", "fp32", "--no-progress"]


def test_a_version_2_store_distills_end_to_end(tiny, tmp_path):
    images, weights = tiny
    store = tmp_path / "store"
    run_cli(
        "extract-teacher", "--data", f"folder:{images}", "--teacher", "test_vit", "--weights", str(weights),
        "--image-size", "32", "--views", "3", "--center-view", "--shard-size", "5", "--rand-augment", RA,
        "--erase-prob", "0.25", "--out", str(store), *COMMON,
    )  # fmt: skip
    from cospress.store.reader import StoreReader

    reader = StoreReader(str(store))
    man = reader.manifest
    pol = ViewPolicy.from_dict(man["view_policy"])
    assert pol.version == 2 and pol.erase_prob == 0.25 and pol.rand_augment == "rand-m9-n2-mstd0.5-inc1"
    assert man["param_names"] == list(PARAM_NAMES_V2) and reader.num_params == NUM_PARAMS_V2
    got = reader.read_rows(
        np.arange(len(reader.keys())), views=np.tile(np.arange(4), (len(reader.keys()), 1))
    )
    views = got["views"]
    assert views.shape[-1] == NUM_PARAMS_V2 and (views[:, :3, IDX["ra0_op"]] > 0).any()
    assert np.array_equal(views[:, 3], np.stack([center_view_params(1, 1, 2)] * len(views)))
    assert not views[:, 3, NUM_PARAMS:].any()  # the centre view: no RandAugment, no erasing
    out = tmp_path / "run"
    run_cli(
        "distill", "--store", str(store), "--student", "test_vit", "--student-size", "32", "--epochs", "1",
        "--batch-size", "12", "--val-fraction", "0.2", "--out", str(out), *COMMON[:-1],
    )  # fmt: skip
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r for r in rows if r["phase"] == "train"] and all(
        np.isfinite(r["loss/total"]) for r in rows if r["phase"] == "train"
    )
    bad = run_cli(
        "distill", "--store", str(store), "--rand-augment", RA, "--out", str(tmp_path / "x"), check=False
    )
    assert "apply to online mode" in error_line(bad)
    # a store of a policy version this code does not know is refused in one line, before any replay
    newer = tmp_path / "newer"
    shutil.copytree(store, newer)
    mpath = newer / "cospress" / "manifest" / "zarr.json"  # the manifest record (a Zarr group node)
    m = json.loads(mpath.read_text())
    m["attributes"]["view_policy"]["version"] = 3
    mpath.write_text(json.dumps(m))
    bad = run_cli("distill", "--store", str(newer), "--out", str(tmp_path / "y"), *COMMON[:-1], check=False)
    assert "view policy version 3 is unknown" in error_line(bad)


def test_online_distill_with_randaugment_and_erasing(tiny, tmp_path):
    images, weights = tiny
    out = tmp_path / "run"
    run_cli(
        "distill", "--teacher", "test_vit", "--weights", str(weights), "--image-size", "32", "--data",
        f"folder:{images}", "--student", "test_vit", "--student-size", "32", "--epochs", "1", "--batch-size",
        "12", "--val-fraction", "0.2", "--rand-augment", RA, "--erase-prob", "0.25", "--out", str(out), *COMMON[:-1],
    )  # fmt: skip
    header = json.loads((out / "run.json").read_text())
    online = header["teacher"]["online"]["policy"]
    assert (
        online["version"] == 2
        and online["rand_augment"] == "rand-m9-n2-mstd0.5-inc1"
        and online["erase_prob"] == 0.25
    )
    bad = run_cli(
        "extract-teacher", "--data", f"folder:{images}", "--rand-augment", "rand-m9-q1", "--out", str(tmp_path / "s"),
        check=False,
    )  # fmt: skip
    line = error_line(bad)
    assert "section 'q1' is unknown" in line and "rand-m9-n2-mstd0.5-inc1" in line


def test_bytes_mode_decode_replay_with_randaugment_and_erasing(tiny):
    """The device path (decode + batched replay, here on CPU tensors) replays version 2 views as the
    per-image CPU path does: >= 99.5% of the pixels within 1 grey level."""
    from cospress.data import device_decode as dd
    from cospress.data.sources import open_source

    images, _ = tiny
    src = open_source(f"folder:{images}")
    items = [dd.read_encoded(src, i) for i in range(len(src))]
    keys = src.keys()
    params = [
        np.stack([sample_view_params(V2, 4, keys[i], v, it.width, it.height) for v in range(3)])
        for i, it in enumerate(items)
    ]
    want = torch.stack([replay_view(src.load(i).image, p, 28) for i, ps in enumerate(params) for p in ps])
    decoded, _ = dd.decode_batch(dd.pack(items), "cpu")
    refs = [img for img, p in zip(decoded, params, strict=True) for _ in range(len(p))]
    for batched in (False, True):  # decode_replay's default on the CPU; the matmul crop + resize of a GPU
        if batched:
            got = replay_views_batch(refs, np.concatenate(params), 28, batched=True)
        else:
            got = dd.decode_replay(dd.pack(items), params, 28, "cpu")[0]
        diff = (got.int() - want.int()).abs()
        assert (diff <= 1).float().mean() >= 0.995, (batched, int(diff.max()))
