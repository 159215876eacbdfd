"""Bytes mode: batched JPEG decode + replay on the compute device (run here on the CPU).

Measured tolerances on the CPU (libjpeg-turbo in torchvision == PIL's decode, 0 grey levels):
distill replay (batched vs per-image torchvision ops) <= 1 grey level; eval resize (torch bicubic
two-pass vs PIL bicubic) <= 2 grey levels.
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import io  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from cospress.data import device_decode as dd  # noqa: E402
from cospress.data.sources import open_source  # noqa: E402
from cospress.data.views import ViewPolicy, replay_view, sample_view_params  # noqa: E402
from cospress.errors import BadImageError, ConfigError  # noqa: E402

FMNIST = Path("/usr/share/datasets/fashion-mnist")
REPLAY_TOL = 1  # grey levels
EVAL_TOL = 2


def _smooth(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """A photo-like image: a blurred random field plus mild noise (uint8 [h, w, 3])."""
    small = rng.integers(0, 256, (max(h // 8, 2), max(w // 8, 2), 3), dtype=np.uint8)
    base = np.asarray(Image.fromarray(small).resize((w, h), Image.BICUBIC), dtype=np.float32)
    return np.clip(base + rng.normal(0, 8, base.shape), 0, 255).astype(np.uint8)


def _jpeg(
    arr: np.ndarray, orientation: int = 1, mode: str = "RGB", quality: int = 90, progressive: bool = False
) -> bytes:
    im = Image.fromarray(arr).convert(mode)
    buf = io.BytesIO()
    kw = {"progressive": True} if progressive else {}
    if orientation != 1:
        exif = Image.Exif()
        exif[0x0112] = orientation
        kw["exif"] = exif.tobytes()
    im.save(buf, "JPEG", quality=quality, **kw)
    return buf.getvalue()


@pytest.fixture(scope="module")
def mixed(tmp_path_factory) -> tuple[str, dict[str, str]]:
    """A flat folder: RGB / grey / progressive / EXIF-rotated / CMYK JPEGs, PNGs, and bad files; name -> kind."""
    root = tmp_path_factory.mktemp("mixed")
    rng = np.random.default_rng(0)
    kinds = {}
    for i in range(6):
        h, w = (int(v) for v in rng.integers(30, 70, 2))
        (root / f"rgb{i}.jpg").write_bytes(_jpeg(_smooth(rng, h, w)))
        kinds[f"rgb{i}.jpg"] = "jpeg"
        Image.fromarray(_smooth(rng, h, w)).save(root / f"png{i}.png")
        kinds[f"png{i}.png"] = "pixels"
    (root / "grey.jpg").write_bytes(_jpeg(_smooth(rng, 40, 50), mode="L"))
    kinds["grey.jpg"] = "jpeg"
    (root / "progressive.jpg").write_bytes(_jpeg(_smooth(rng, 44, 60), progressive=True))
    kinds["progressive.jpg"] = "jpeg"
    (root / "progressive_orient6.jpg").write_bytes(
        _jpeg(_smooth(rng, 30, 50), orientation=6, progressive=True)
    )
    kinds["progressive_orient6.jpg"] = "jpeg"
    for o in range(2, 9):
        (root / f"orient{o}.jpg").write_bytes(_jpeg(_smooth(rng, 36, 52), orientation=o))
        kinds[f"orient{o}.jpg"] = "jpeg"
    (root / "cmyk.jpg").write_bytes(_jpeg(_smooth(rng, 40, 40), mode="CMYK"))
    kinds["cmyk.jpg"] = "pixels"
    good = _jpeg(_smooth(rng, 48, 48))
    (root / "truncated.jpg").write_bytes(good[: len(good) // 2])
    kinds["truncated.jpg"] = "error"
    (root / "junk.jpg").write_bytes(b"this is not an image at all")
    kinds["junk.jpg"] = "error"
    (root / "empty.png").write_bytes(b"")
    kinds["empty.png"] = "error"
    # header and end marker intact, scan data destroyed: only the full decoder can tell
    sos = good.index(b"\xff\xda")
    broken = good[: sos + 20] + b"\xff\x01" * 40 + b"\xff\xd9"
    (root / "broken_scan.jpg").write_bytes(broken)
    kinds["broken_scan.jpg"] = "jpeg"
    return f"folder:{root}", kinds


def test_resolve_decode():
    assert dd.resolve_decode("auto", "cpu") == "cpu"
    assert dd.resolve_decode("cpu", "cpu") == "cpu"
    assert dd.resolve_decode("device", "cpu") == "device"
    with pytest.raises(ConfigError, match="needs a CUDA device"):
        dd.resolve_decode("gpu", "cpu")
    with pytest.raises(ConfigError, match="unknown"):
        dd.resolve_decode("nvjpeg", "cpu")


def test_decode_batch_matches_source_load(mixed):
    spec, kinds = mixed
    src = open_source(spec)
    items = [dd.read_encoded(src, i) for i in range(len(src))]
    kind_names = {dd.KIND_JPEG: "jpeg", dd.KIND_PIXELS: "pixels", dd.KIND_ERROR: "error"}
    assert {k: kind_names[it.kind] for k, it in zip(src.keys(), items, strict=True)} == kinds
    images, errors = dd.decode_batch(dd.pack(items), "cpu")
    assert len(images) == len(errors) == len(src)
    for i, key in enumerate(src.keys()):
        try:
            ref = torch.from_numpy(np.asarray(src.load(i).image).copy()).permute(2, 0, 1)
        except BadImageError as e:
            assert images[i] is None, key
            assert errors[i] == str(e), key  # the very reason the CPU path gives
            continue
        assert errors[i] == "", key
        assert images[i].shape == ref.shape, key  # EXIF orientation applied as PIL does
        assert int((images[i].int() - ref.int()).abs().max()) == 0, key
        w, h = items[i].width, items[i].height
        assert (w, h) == src.load(i).image.size, key
    reasons = {k: errors[i].split(":")[0] for i, k in enumerate(src.keys()) if errors[i]}
    assert reasons == {
        "truncated.jpg": "truncated image",
        "junk.jpg": "not an image",
        "empty.png": "empty file",
    }


def test_unpacked_items_and_dataloader_workers(mixed):
    """A DataLoader with worker processes ships packed batches; a list of Encoded works the same."""
    spec, _ = mixed
    src = open_source(spec)
    ds = [dd.read_encoded(src, i) for i in range(len(src))]
    direct, _ = dd.decode_batch(ds, "cpu")

    class DS(torch.utils.data.Dataset):
        def __len__(self):
            return len(src)

        def __getitem__(self, i):
            return dd.read_encoded(src, i)

    loader = torch.utils.data.DataLoader(DS(), batch_size=7, num_workers=2, collate_fn=dd.pack)
    got = []
    for batch in loader:
        assert isinstance(batch, dd.EncodedBatch)
        got.extend(dd.decode_batch(batch, "cpu")[0])
    for a, b in zip(direct, got, strict=True):
        assert (a is None) == (b is None)
        if a is not None:
            assert torch.equal(a, b)


def test_decode_replay_matches_replay_view(mixed):
    spec, _ = mixed
    src = open_source(spec)
    items = [dd.read_encoded(src, i) for i in range(len(src))]
    policy = ViewPolicy(color_jitter=0.8, grayscale=0.2, blur=0.5)
    params = [
        np.stack([sample_view_params(policy, 0, k, v, max(it.width, 1), max(it.height, 1)) for v in range(3)])
        for k, it in zip(src.keys(), items, strict=True)
    ]
    views, errors = dd.decode_replay(dd.pack(items), params, 24, "cpu")
    good = [i for i, e in enumerate(errors) if not e]
    assert views.shape == (3 * len(good), 3, 24, 24) and views.dtype == torch.uint8
    ref = torch.stack([replay_view(src.load(i).image, p, 24) for i in good for p in params[i]])
    assert int((views.int() - ref.int()).abs().max()) <= REPLAY_TOL


@pytest.mark.skipif(not FMNIST.is_dir(), reason="dataset-fashion-mnist is not installed")
def test_fashion_mnist_falls_back_to_pixels():
    src = open_source("fashion-mnist:test", limit=20)
    items = [dd.read_encoded(src, i) for i in range(len(src))]
    assert all(it.kind == dd.KIND_PIXELS and (it.width, it.height) == (28, 28) for it in items)
    p = [sample_view_params(ViewPolicy(), 1, k, 0, 28, 28)[None] for k in src.keys()]
    views, errors = dd.decode_replay(items, p, 32, "cpu")
    ref = torch.stack([replay_view(src.load(i).image, p[i][0], 32) for i in range(len(src))])
    assert not any(errors) and int((views.int() - ref.int()).abs().max()) <= REPLAY_TOL


def test_eval_embeddings_device_vs_cpu(mixed, tmp_path):
    """knn-eval embedding: the device path gives the CPU path's images within EVAL_TOL, same skips."""
    from cospress.evaluate.embed import embed_source
    from cospress.evaluate.images import eval_transform, eval_transform_tensor
    from cospress.evaluate.models import load_model

    spec, _ = mixed
    src = open_source(spec)
    rng = np.random.default_rng(3)
    for _ in range(10):
        h, w = (int(v) for v in rng.integers(20, 300, 2))
        im = Image.fromarray(_smooth(rng, h, w))
        t = torch.from_numpy(np.asarray(im).copy()).permute(2, 0, 1)
        for size, crop in ((32, 0.875), (64, 1.0), (224, 0.875)):
            d = eval_transform_tensor(t, size, crop).int() - eval_transform(im, size, crop).int()
            assert int(d.abs().max()) <= EVAL_TOL
    model = load_model("random:test_vit@32").model
    kw = dict(batch_size=8, workers=0, precision="fp32", cache_dir=str(tmp_path))
    cpu = embed_source(model, src, decode="cpu", **kw)
    dev = embed_source(model, src, decode="device", **kw)
    assert not dev.cache_hit  # separate cache entries
    assert cpu.errors == dev.errors and len(cpu.errors) == 3
    cos = (cpu.features * dev.features).sum(1)[cpu.valid]
    assert cos.min() > 0.999
    again = embed_source(model, src, decode="device", **kw)
    assert again.cache_hit and np.array_equal(again.features, dev.features)


@pytest.mark.skipif(not FMNIST.is_dir(), reason="dataset-fashion-mnist is not installed")
def test_eval_embeddings_fashion_mnist_device_equals_cpu():
    from cospress.evaluate.embed import embed_source
    from cospress.evaluate.models import load_model

    src = open_source("fashion-mnist:test", limit=24)
    model = load_model("random:test_vit@32").model
    kw = dict(batch_size=12, workers=0, precision="fp32", cache_dir=None, crop_pct=1.0)
    cpu = embed_source(model, src, decode="cpu", **kw)
    dev = embed_source(model, src, decode="device", **kw)
    assert (cpu.features * dev.features).sum(1).min() > 0.999


def _store(tmp_path: Path):
    """A tiny store over a folder of JPEGs and PNGs (the distill tests' builder)."""
    from tests.test_distill import make_store

    url, spec = make_store(tmp_path, n=24, k=4)
    root = Path(spec.split(":", 1)[1])
    for i, p in enumerate(sorted(root.rglob("*.png"))):
        if i % 2 == 0:  # half of them JPEG bytes under a .png name: the store keys stay the same
            p.write_bytes(_jpeg(np.asarray(Image.open(p).convert("RGB"))))
    return url, spec


def test_distill_batches_device_vs_cpu(tmp_path):
    from cospress.distill.data import BatchPlan, DistillBatches, _Lazy, key_index
    from cospress.distill.prefetch import device_images
    from cospress.store.reader import StoreReader

    url, spec = _store(tmp_path)
    reader = StoreReader(url)
    rows = np.arange(reader.num_rows)
    src = open_source(spec)
    index = key_index(reader.keys(), src.keys(), rows, spec)
    plan = BatchPlan(rows, seed=0, epoch=0, batch_size=12, views_per_image=3, stored_views=4)
    lazy = _Lazy(url, None, spec)
    n_jpeg = 0
    for step in range(2):
        cpu = DistillBatches(lazy, plan, index, 32, True, "cpu")[step]
        dev = DistillBatches(lazy, plan, index, 32, True, "device")[step]
        n_jpeg += sum(k == dd.KIND_JPEG for k in dev["encoded"].kinds)
        assert torch.equal(cpu["cls"], dev["cls"]) and torch.equal(cpu["tokens"], dev["tokens"])
        a = device_images(cpu, 32, torch.device("cpu"))
        b = device_images(dev, 32, torch.device("cpu"))
        assert a.shape == b.shape == (12, 3, 32, 32)
        assert int((a.int() - b.int()).abs().max()) <= REPLAY_TOL
    assert n_jpeg > 0  # the device decoder really ran


BASE = dict(
    student="test_vit", student_size=32, epochs=1, batch_size=12, workers=0, val_fraction=0.2,
    device="cpu", precision="fp32", seed=0,
)  # fmt: skip


def test_run_distill_device_decode(tmp_path):
    """End to end on the CPU: decode=device trains like decode=cpu; decode=gpu refuses a CPU run."""
    from cospress.distill import DistillConfig, run_distill

    url, _ = _store(tmp_path)
    a = run_distill(DistillConfig(store=url, out=str(tmp_path / "cpu"), decode="cpu", **BASE))
    b = run_distill(DistillConfig(store=url, out=str(tmp_path / "dev"), decode="device", **BASE))
    assert a["steps"] == b["steps"] > 0
    la, lb = a["last"]["loss/total"], b["last"]["loss/total"]
    assert abs(la - lb) < 1e-2 * max(abs(la), 1.0)
    assert b["best_knn_accuracy"] is not None
    with pytest.raises(ConfigError, match="CUDA"):
        run_distill(DistillConfig(store=url, out=str(tmp_path / "gpu"), decode="gpu", **BASE))


@pytest.mark.skipif(
    os.environ.get("COSPRESS_TEST_COMPILE") != "1",
    reason="torch.compile's cold start takes ~2 min on a 2-core CPU (15 s warm); "
    "set COSPRESS_TEST_COMPILE=1 to run it",
)
def test_run_distill_compile(tmp_path):
    """--compile trains like eager and keeps checkpoint names unwrapped (no _orig_mod)."""
    from cospress import checkpoint as ckpt
    from cospress.distill import DistillConfig, run_distill

    url, _ = _store(tmp_path)
    a = run_distill(DistillConfig(store=url, out=str(tmp_path / "eager"), **BASE))
    c = run_distill(DistillConfig(store=url, out=str(tmp_path / "compiled"), compile=True, **BASE))
    la = a["last"]["loss/total"]
    assert abs(c["last"]["loss/total"] - la) < 1e-3 * max(abs(la), 1.0)
    weights, _ = ckpt.load_checkpoint(tmp_path / "compiled", "last")
    assert not any("_orig_mod" in k for k in weights)
    assert set(weights) == set(ckpt.load_checkpoint(tmp_path / "eager", "last")[0])


def test_decode_view_items_for_stage_one(mixed):
    """The stage 1 helper fills "images" per item, or a reason for the ones that cannot be decoded."""
    spec, _ = mixed
    src = open_source(spec)
    items = []
    for i in range(len(src)):
        enc = dd.read_encoded(src, i)
        p = np.stack(
            [
                sample_view_params(ViewPolicy(), 0, src.keys()[i], v, max(enc.width, 1), max(enc.height, 1))
                for v in range(2)
            ]
        )
        items.append({"row": i, "images": None, "encoded": None if enc.error else enc, "params": p,
                      "reason": enc.error or None})  # fmt: skip
    dd.decode_view_items(items, 16, "cpu")
    assert all("encoded" not in it for it in items)
    for i, it in enumerate(items):
        try:
            image = src.load(i).image
        except BadImageError as e:
            assert it["images"] is None and it["reason"] == str(e)
            continue
        ref = torch.stack([replay_view(image, p, 16) for p in it["params"]])
        assert it["images"].shape == (2, 3, 16, 16)
        assert int((it["images"].int() - ref.int()).abs().max()) <= REPLAY_TOL


# ---------------------------------------------------------------------------------------------- CUDA
# nvjpeg has its own IDCT and chroma upsampling: its pixels are within a few grey levels of
# libjpeg-turbo's on these smooth images. First guesses, to be checked on the first GPU run (the
# assertion messages print the measured values).
NVJPEG_MEAN_TOL, NVJPEG_MAX_TOL = 2.0, 48
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (nvjpeg)")


@needs_cuda
def test_mixed_jpeg_batch_on_cuda_matches_the_cpu_path(mixed):
    """One batch of RGB, grey, progressive, EXIF-rotated (1..8), CMYK, PNG and corrupt files decoded by
    nvjpeg gives the CPU path's shapes and reasons, and its pixels within the nvjpeg tolerance."""
    spec, kinds = mixed
    src = open_source(spec)
    batch = dd.pack([dd.read_encoded(src, i) for i in range(len(src))])
    cpu, cpu_errors = dd.decode_batch(batch, "cpu")
    gpu, gpu_errors = dd.decode_batch(batch.pin_memory(), "cuda")
    assert gpu_errors == cpu_errors and sum(bool(e) for e in cpu_errors) == 3
    for key, a, b in zip(src.keys(), cpu, gpu, strict=True):
        assert (a is None) == (b is None), key
        if a is None:
            continue
        assert b.device.type == "cuda" and b.dtype == torch.uint8 and b.shape == a.shape, key
        if key == "broken_scan.jpg":  # scan data destroyed: decoders may fill it differently
            continue
        d = (b.cpu().int() - a.int()).abs().float()
        assert d.mean() <= NVJPEG_MEAN_TOL and d.max() <= NVJPEG_MAX_TOL, (
            key,
            float(d.mean()),
            float(d.max()),
        )


@needs_cuda
def test_decode_replay_on_cuda_matches_the_cpu_path(mixed):
    spec, _ = mixed
    src = open_source(spec)
    items = [dd.read_encoded(src, i) for i in range(len(src))]
    policy = ViewPolicy(color_jitter=0.8, grayscale=0.2, blur=0.5)
    params = [
        np.stack([sample_view_params(policy, 0, k, v, max(it.width, 1), max(it.height, 1)) for v in range(3)])
        for k, it in zip(src.keys(), items, strict=True)
    ]
    keep = [i for i, k in enumerate(src.keys()) if k != "broken_scan.jpg"]
    items, params = [items[i] for i in keep], [params[i] for i in keep]
    cpu, cpu_errors = dd.decode_replay(dd.pack(items), params, 24, "cpu")
    gpu, gpu_errors = dd.decode_replay(dd.pack(items), params, 24, "cuda")
    assert gpu_errors == cpu_errors and gpu.shape == cpu.shape and gpu.device.type == "cuda"
    d = (gpu.cpu().int() - cpu.int()).abs().float()
    assert d.mean() <= NVJPEG_MEAN_TOL and d.max() <= NVJPEG_MAX_TOL, (float(d.mean()), float(d.max()))


@needs_cuda
def test_decode_leaves_blocks_freed_with_pending_work_alone_on_cuda():
    """A block freed on the current stream while a queued kernel still reads it must not become a
    decode output: nvjpeg writes on its own stream, which waits for nothing (device_decode._decode_jpegs).

    The current stream sleeps ~0.5 s, then copies ``t``; ``t`` is freed meanwhile and a decode of the
    same size follows. Had the decode been handed t's block, the copy would read the decoded pixels.
    """
    arr = _smooth(np.random.default_rng(5), 48, 64)
    data = torch.frombuffer(bytearray(_jpeg(arr)), dtype=torch.uint8)
    item = dd.Encoded(dd.KIND_JPEG, data=data, width=64, height=48)
    dd.decode_batch([item], "cuda")  # warm up nvjpeg (its first call allocates its own buffers)
    torch.cuda.synchronize()
    t = torch.full((3, 48, 64), 7, dtype=torch.uint8, device="cuda")
    torch.cuda._sleep(1 << 30)  # the current stream is busy for a while
    copy = t.clone()  # queued after the sleep: reads t's block later
    del t  # free to the allocator now, still to be read by the queued clone
    images, errors = dd.decode_batch([item], "cuda")
    torch.cuda.synchronize()
    assert errors == [""]
    assert bool((copy == 7).all()), "the decode overwrote a block a queued kernel still reads"
    ref = torch.from_numpy(np.asarray(Image.open(io.BytesIO(bytes(data.numpy()))).convert("RGB")).copy())
    d = (images[0].cpu().int() - ref.permute(2, 0, 1).int()).abs().float()
    assert d.mean() <= NVJPEG_MEAN_TOL


@needs_cuda
def test_run_distill_gpu_decode_on_cuda(tmp_path):
    """End to end on a GPU: --decode gpu (nvjpeg, prefetched on a side stream) trains like --decode cpu."""
    from cospress.distill import DistillConfig, run_distill

    url, _ = _store(tmp_path)
    kw = {**BASE, "device": "cuda"}
    a = run_distill(DistillConfig(store=url, out=str(tmp_path / "cpu"), decode="cpu", **kw))
    b = run_distill(DistillConfig(store=url, out=str(tmp_path / "gpu"), decode="gpu", **kw))
    assert a["steps"] == b["steps"] > 0
    la, lb = a["last"]["loss/total"], b["last"]["loss/total"]
    assert np.isfinite(lb) and abs(la - lb) < 5e-2 * max(abs(la), 1.0)
    assert b["best_knn_accuracy"] is not None
