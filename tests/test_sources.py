"""Image sources: folder, WebDataset shards, Fashion-MNIST; decoding of every PIL mode and bad inputs."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import pickle
import struct
import tarfile
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cospress.data.fashion_mnist import FASHION_MNIST_CLASSES, FASHION_MNIST_ROOT
from cospress.data.sources import Source, decode_image, open_source
from cospress.errors import BadImageError, SourceError
from cospress.utils import keys_sha256


def _rgb(seed: int, w: int = 24, h: int = 16) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def _encode(im: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


def _class_tree(root: Path) -> None:
    (root / "dog" / "nested").mkdir(parents=True)
    (root / "cat").mkdir()
    (root / ".hidden").mkdir()
    _rgb(0).save(root / "cat" / "b.png")
    _rgb(1).save(root / "cat" / "a.JPG", "JPEG")
    _rgb(2).save(root / "dog" / "nested" / "c.webp", "WEBP")
    _rgb(3).save(root / "dog" / "d.bmp")
    _rgb(4).save(root / ".hidden" / "e.png")
    (root / "dog" / "notes.txt").write_text("not listed")
    (root / "cat" / ".f.png").write_bytes(b"hidden")


def test_folder_class_layout(tmp_path):
    _class_tree(tmp_path)
    src = open_source(f"folder:{tmp_path}")
    assert isinstance(src, Source)
    assert src.keys() == ["cat/a.JPG", "cat/b.png", "dog/d.bmp", "dog/nested/c.webp"]
    assert src.labels() == [0, 0, 1, 1]
    assert src.class_names() == ["cat", "dog"]
    s = src.load(3)
    assert (s.key, s.label, s.image.mode, s.image.size) == ("dog/nested/c.webp", 1, "RGB", (24, 16))
    assert src.read_bytes(1) == (tmp_path / "cat" / "b.png").read_bytes()
    d = json.loads(json.dumps(src.describe()))
    assert d["kind"] == "folder" and d["count"] == 4 and d["class_names"] == ["cat", "dog"]
    assert d["keys_sha256"] == keys_sha256(src.keys()) != keys_sha256(src.keys()[::-1])


def test_folder_flat_and_errors(tmp_path):
    flat = tmp_path / "flat"
    flat.mkdir()
    for i in range(3):
        _rgb(i).save(flat / f"{2 - i}.png")
    src = open_source("folder:flat", root=str(tmp_path))
    assert src.keys() == ["0.png", "1.png", "2.png"] and src.labels() == [-1, -1, -1]
    assert src.class_names() is None
    assert np.array_equal(np.asarray(src.load(0).image), np.asarray(_rgb(2)))

    (tmp_path / "empty").mkdir()
    with pytest.raises(SourceError, match="no images"):
        open_source(f"folder:{tmp_path / 'empty'}")
    with pytest.raises(SourceError, match="not a directory"):
        open_source(f"folder:{tmp_path / 'missing'}")
    with pytest.raises(SourceError, match="unknown source scheme"):
        open_source("s4:bucket")
    with pytest.raises(SourceError, match="use folder:PATH"):
        open_source(str(tmp_path))
    (flat / "cls").mkdir()
    _rgb(9).save(flat / "cls" / "x.png")
    with pytest.raises(SourceError, match="beside class folders"):
        open_source(f"folder:{flat}")


def _all_modes() -> dict[str, tuple[bytes, tuple[int, int, int]]]:
    """mode name -> (encoded bytes, expected RGB of pixel (0, 0))."""
    out = {}
    out["L"] = (_encode(Image.new("L", (4, 3), 77), "PNG"), (77, 77, 77))
    out["1"] = (_encode(Image.new("1", (4, 3), 1), "PNG"), (255, 255, 255))
    out["LA"] = (_encode(Image.new("LA", (4, 3), (10, 0)), "PNG"), (255, 255, 255))
    out["RGBA"] = (_encode(Image.new("RGBA", (4, 3), (0, 0, 200, 255)), "PNG"), (0, 0, 200))
    out["RGBA-clear"] = (_encode(Image.new("RGBA", (4, 3), (0, 0, 0, 0)), "PNG"), (255, 255, 255))
    pal = Image.new("P", (4, 3), 1)
    pal.putpalette([0, 0, 0, 200, 10, 20] + [0] * 762)
    out["P"] = (_encode(pal, "PNG"), (200, 10, 20))
    out["P-transparent"] = (_encode(pal, "PNG", transparency=1), (255, 255, 255))
    out["CMYK"] = (_encode(Image.new("CMYK", (4, 3), (0, 0, 0, 0)), "TIFF"), (255, 255, 255))
    i16 = Image.fromarray(np.full((3, 4), 32896, np.uint16))
    assert i16.mode.startswith("I;16")
    out["I;16"] = (_encode(i16, "PNG"), (128, 128, 128))
    out["I"] = (_encode(Image.fromarray(np.full((3, 4), 65535, np.int32)), "TIFF"), (255, 255, 255))
    out["F"] = (_encode(Image.fromarray(np.full((3, 4), 0.5, np.float32)), "TIFF"), (128, 128, 128))
    return out


@pytest.mark.parametrize("mode", list(_all_modes()))
def test_every_mode_becomes_rgb(mode):
    data, pixel = _all_modes()[mode]
    im = decode_image(data)
    assert im.mode == "RGB" and im.size == (4, 3)
    assert im.getpixel((0, 0)) == pixel


def test_exif_orientation_applied(tmp_path):
    arr = np.zeros((20, 40, 3), np.uint8)
    arr[:, :20] = (255, 0, 0)  # left half red, right half blue
    arr[:, 20:] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = 6  # display rotated 90 degrees clockwise: the left half ends on top
    (tmp_path / "c").mkdir()
    Image.fromarray(arr).save(tmp_path / "c" / "r.jpg", exif=exif.tobytes(), quality=95)
    im = open_source(f"folder:{tmp_path}").load(0).image
    assert im.size == (20, 40)
    top, bottom = np.asarray(im)[5, 10], np.asarray(im)[35, 10]
    assert top[0] > 200 and top[2] < 60 and bottom[2] > 200 and bottom[0] < 60


def _huge_header_png(width: int, height: int) -> bytes:
    """A PNG whose IHDR claims width x height (the pixel data is for a 1x1 image)."""
    data = bytearray(_encode(Image.new("L", (1, 1)), "PNG"))
    ihdr = struct.pack(">II", width, height) + bytes(data[24:29])
    data[16:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
    return bytes(data)


def test_bad_inputs_have_reasons(tmp_path):
    good = _encode(_rgb(0, 64, 64), "JPEG")
    files = {
        "empty.png": b"",
        "trunc.jpg": good[: len(good) // 2],
        "text.jpg": b"just some text, not pixels\n" * 10,
        "bomb.png": _huge_header_png(30_000, 30_000),
        "warnbomb.png": _huge_header_png(10_000, 10_000),
        "ok.jpg": good,
    }
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    src = open_source(f"folder:{tmp_path}")
    limit_before = Image.MAX_IMAGE_PIXELS
    reasons = {}
    for i, key in enumerate(src.keys()):
        try:
            src.load(i)
            reasons[key] = "ok"
        except BadImageError as e:
            reasons[key] = str(e)
    assert reasons["ok.jpg"] == "ok"
    assert reasons["empty.png"] == "empty file"
    assert reasons["trunc.jpg"].startswith("truncated image")
    assert reasons["text.jpg"] == "not an image"
    assert reasons["bomb.png"].startswith("too many pixels (900000000 > ")
    assert reasons["warnbomb.png"].startswith("too many pixels (100000000 > ")
    with pytest.raises(BadImageError, match=r"too many pixels \(64 x 64 > 1000\)"):
        src.load(src.keys().index("ok.jpg"), max_pixels=1000)
    assert Image.MAX_IMAGE_PIXELS == limit_before  # global PIL state untouched


def _write_shard(path: Path, members: list[tuple[str, bytes]], gz: bool = False) -> None:
    with tarfile.open(path, "w:gz" if gz else "w") as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))


def _shards(tmp_path: Path) -> list[bytes]:
    imgs = [_encode(_rgb(i), "PNG" if i % 2 else "JPEG") for i in range(5)]
    _write_shard(
        tmp_path / "shard-000.tar",
        [
            ("part/s0.jpg", imgs[0]),
            ("part/s0.cls", b"3\n"),
            ("part/s1.png", imgs[1]),
            ("part/s1.json", json.dumps({"label": 7}).encode()),
            ("s2.jpg", imgs[2]),
            ("s2.json", json.dumps({"cls": 1, "caption": "x"}).encode()),
        ],
    )
    _write_shard(
        tmp_path / "shard-001.tar",
        [("s3.png", imgs[3]), ("s3.txt", b"no label"), ("s4.jpg", imgs[4]), ("meta.cls", b"2")],
    )
    return imgs


def test_wds_index_labels_and_bytes(tmp_path):
    imgs = _shards(tmp_path)
    src = open_source(f"wds:{tmp_path}/shard-{{000..001}}.tar")
    assert src.keys() == ["part/s0", "part/s1", "s2", "s3", "s4", "meta"]
    assert src.labels() == [3, 7, 1, -1, -1, 2]
    for i in range(5):
        assert src.read_bytes(i) == imgs[i]
        assert src.load(i).image.size == (24, 16)
    with pytest.raises(BadImageError, match="^not an image"):
        src.load(5)
    assert src.describe()["kind"] == "wds" and src.class_names() is None
    clone = pickle.loads(pickle.dumps(src))  # with open handles
    assert clone.keys() == src.keys()
    assert np.array_equal(np.asarray(clone.load(3).image), np.asarray(src.load(3).image))


def test_wds_rejects_bad_shards(tmp_path):
    img = _encode(_rgb(0), "PNG")
    _write_shard(tmp_path / "a.tar", [("k.png", img)])
    _write_shard(tmp_path / "b.tar", [("k.png", img)])
    with pytest.raises(SourceError, match="duplicate key 'k'"):
        open_source(f"wds:{tmp_path}/{{a,b}}.tar")
    _write_shard(tmp_path / "dup.tar", [("k.png", img), ("k.png", img)])
    with pytest.raises(SourceError, match="duplicate member"):
        open_source(f"wds:{tmp_path}/dup.tar")
    for bad in ("../evil.png", "/abs/evil.png", "x/../../evil.png"):
        _write_shard(tmp_path / "evil.tar", [(bad, img)])
        with pytest.raises(SourceError, match="unsafe member path"):
            open_source(f"wds:{tmp_path}/evil.tar")
    _write_shard(tmp_path / "z.tar.gz", [("k.png", img)], gz=True)
    with pytest.raises(SourceError, match="uncompressed tar"):
        open_source(f"wds:{tmp_path}/z.tar.gz")
    with pytest.raises(SourceError, match="cannot open shard"):
        open_source(f"wds:{tmp_path}/missing-{{0..1}}.tar")


def test_limit_is_deterministic_and_order_independent(tmp_path):
    img = _encode(_rgb(0, 4, 4), "PNG")
    names = [f"k{i:03d}" for i in range(40)]
    _write_shard(tmp_path / "a.tar", [(f"{n}.png", img) for n in names[:25]])
    _write_shard(tmp_path / "b.tar", [(f"{n}.png", img) for n in names[25:][::-1]])
    ab = open_source(f"wds:{tmp_path}/{{a,b}}.tar", limit=10)
    ba = open_source(f"wds:{tmp_path}/{{b,a}}.tar", limit=10)
    smallest = sorted(names, key=lambda k: hashlib.sha256(k.encode()).hexdigest())[:10]
    assert len(ab) == 10 and set(ab.keys()) == set(ba.keys()) == set(smallest)
    full = open_source(f"wds:{tmp_path}/{{a,b}}.tar")
    pos = [full.keys().index(k) for k in ab.keys()]
    assert pos == sorted(pos)  # source order kept
    assert ab.read_bytes(3) == img and ab.describe()["limit"] == 10
    assert len(open_source(f"wds:{tmp_path}/a.tar", limit=1000)) == 25
    with pytest.raises(SourceError, match="positive"):
        open_source(f"wds:{tmp_path}/a.tar", limit=0)


def test_folder_source_pickles(tmp_path):
    _class_tree(tmp_path)
    src = open_source(f"folder:{tmp_path}", limit=3)
    clone = pickle.loads(pickle.dumps(src))
    assert clone.keys() == src.keys() and clone.labels() == src.labels() and len(clone) == 3
    assert clone.read_bytes(2) == src.read_bytes(2)
    assert clone.describe() == src.describe()


def _write_idx(path: Path, arr: np.ndarray) -> None:
    head = struct.pack(">I", 0x0800 | arr.ndim) + struct.pack(f">{arr.ndim}I", *arr.shape)  # uint8 idx
    with gzip.open(path, "wb") as f:
        f.write(head + arr.astype(np.uint8).tobytes())


def test_fashion_mnist_from_a_given_root(tmp_path):
    rng = np.random.default_rng(0)
    imgs = rng.integers(0, 256, (12, 28, 28), dtype=np.uint8)
    labels = np.arange(12) % 10
    _write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", imgs)
    _write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", labels)
    src = open_source(f"fashion-mnist:test@{tmp_path}")
    assert src.keys()[:2] == ["test-00000", "test-00001"] and src.labels() == labels.tolist()
    s = src.load(5)
    assert s.image.mode == "RGB" and s.image.size == (28, 28) and s.label == 5
    assert np.array_equal(np.asarray(s.image)[..., 1], imgs[5])
    assert src.read_bytes(5) is None and src.class_names() == list(FASHION_MNIST_CLASSES)
    lim = pickle.loads(pickle.dumps(open_source("fashion-mnist:test", root=str(tmp_path), limit=4)))
    assert len(lim) == 4
    i = lim.keys()[2]
    assert np.array_equal(np.asarray(lim.load(2).image)[..., 0], imgs[int(i.split("-")[1])])
    with pytest.raises(SourceError, match="apt-get install dataset-fashion-mnist"):
        open_source(f"fashion-mnist:train@{tmp_path}")
    with pytest.raises(SourceError, match="unknown split"):
        open_source(f"fashion-mnist:val@{tmp_path}")


@pytest.mark.skipif(
    not Path(FASHION_MNIST_ROOT, "train-labels-idx1-ubyte.gz").is_file(),
    reason="dataset-fashion-mnist absent",
)
def test_fashion_mnist_installed():
    train = open_source("fashion-mnist:train", limit=50)
    assert len(open_source("fashion-mnist:train")) == 60_000
    assert len(train) == 50 and all(k.startswith("train-") for k in train.keys())
    assert set(train.labels()) <= set(range(10))
    s = train.load(0)
    assert s.image.size == (28, 28) and s.image.mode == "RGB" and np.asarray(s.image).max() > 0
    test = open_source("fashion-mnist:test")
    assert len(test) == 10_000 and np.bincount(test.labels()).tolist() == [1000] * 10


class _Pixels(torch.utils.data.Dataset):
    def __init__(self, src: Source) -> None:
        self.src = src

    def __len__(self) -> int:
        return len(self.src)

    def __getitem__(self, i: int) -> torch.Tensor:
        return torch.from_numpy(np.asarray(self.src.load(i).image).copy())


def test_sources_work_in_dataloader_workers(tmp_path):
    imgs = _shards(tmp_path)
    src = open_source(f"wds:{tmp_path}/shard-{{000..001}}.tar")
    src.read_bytes(0)  # the parent holds open shard handles before the workers start
    rows = [i for i, k in enumerate(src.keys()) if k != "meta"]  # "meta" has no image
    data = torch.utils.data.Subset(_Pixels(src), rows)
    got = [b[0] for b in torch.utils.data.DataLoader(data, batch_size=1, num_workers=2)]
    want = [np.asarray(decode_image(im)) for im in imgs]
    assert len(got) == 5 and all(np.array_equal(g.numpy(), w) for g, w in zip(got, want, strict=True))
