"""Token codecs (fp16, int8, pca): round trips through every store operation, fidelity, refusals."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import json  # noqa: E402
import shutil  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from cospress.errors import ConfigError, StoreError  # noqa: E402
from cospress.store import SCHEMA_VERSION, StoreLayout, StoreReader, StoreWriter, make_identity  # noqa: E402
from cospress.store.codecs import (  # noqa: E402
    Projection,
    decode_tokens,
    encode_tokens,
    fit_projection,
    parse_codec,
    quantize,
)
from cospress.store.fidelity import codec_fidelity, token_cosine_error  # noqa: E402
from cospress.store.merge import merge_stores  # noqa: E402
from cospress.store.projection import codec_entry  # noqa: E402
from cospress.store.wds_io import export_wds, import_wds  # noqa: E402
from tests.helpers import (  # noqa: E402
    distill_train_losses,
    error_line,
    extract_tiny_store,
    make_image_folder,
    make_tiny_teacher_weights,
    run_cli,
)

P = 5


def structured_tokens(
    rng: np.random.Generator, shape: tuple[int, ...], rank: int = 12, noise: float = 0.3
) -> np.ndarray:
    """float16 tokens [..., T, D] that look like a teacher's: a per-view offset, a low-rank part, noise."""
    *lead, t, d = shape
    views = int(np.prod(lead))
    base = rng.normal(size=(views, 1, 4)) @ rng.normal(size=(4, d)) * 0.8  # offsets in a shared subspace
    low = rng.normal(size=(views, t, rank)) @ rng.normal(size=(rank, d)) * 0.6
    x = base + low + rng.normal(size=(views, t, d)) * noise
    return x.reshape(shape).astype(np.float16)


def write_store(path: Path, codec: str, data: dict, shard: int, projection: Projection | None = None) -> None:
    n, v, t, d = data["tokens"].shape
    comps = projection.components if projection is not None else 0
    layout = StoreLayout(n, shard, v, d, t, P, True, token_codec=codec, token_dim=comps)
    ident = make_identity(
        teacher={"name": "t", "fingerprint": "f" * 64}, view_policy={"flip": 0.5}, policy_fingerprint="p" * 64,
        k=v, center_view=False, seed=0, source={"spec": f"x:{data['prefix']}", "count": n, "keys_sha256": "k"},
        param_names=[f"p{i}" for i in range(P)], token_codec=codec_entry(codec, projection),
    )  # fmt: skip
    w = StoreWriter.open(path, ident, layout, overwrite=True, projection=projection)
    for s in range(w.num_shards):
        a, b = w.shard_rows(s)
        w.write_shard(
            s, cls=data["cls"][a:b], tokens=data["tokens"][a:b], views=data["views"][a:b],
            keys=data["keys"][a:b], labels=data["labels"][a:b], valid=data["valid"][a:b],
            skipped=[{"key": data["keys"][i], "reason": "bad"} for i in range(a, b) if not data["valid"][i]],
        )  # fmt: skip
    w.finalize()


def make_rows(seed: int, prefix: str = "a", n: int | None = None) -> dict:
    rng = np.random.default_rng(seed)
    n = n or int(rng.integers(5, 14))
    v, t, d = int(rng.integers(1, 4)), int(rng.integers(2, 9)), int(rng.choice([8, 16, 24]))
    valid = (rng.random(n) > 0.2).astype(np.uint8)
    valid[0] = 1
    tokens = structured_tokens(rng, (n, v, t, d), rank=4)
    tokens[valid == 0] = 0
    cls = rng.normal(size=(n, v, d)).astype(np.float16)
    cls[valid == 0] = 0
    return {
        "prefix": prefix, "tokens": tokens, "cls": cls, "views": rng.random((n, v, P)).astype(np.float32),
        "keys": [f"{prefix}/{i}.jpg" for i in range(n)], "labels": rng.integers(-1, 4, n), "valid": valid,
    }  # fmt: skip


# --------------------------------------------------------------------------- the codecs themselves
@pytest.mark.parametrize("seed", range(4))
def test_int8_is_within_half_a_step_of_every_value(seed):
    rng = np.random.default_rng(seed)
    shape = tuple(int(s) for s in rng.integers(1, 7, size=int(rng.integers(1, 4)))) + (
        int(rng.integers(1, 65)),
    )
    x = (rng.normal(size=shape) * rng.choice([1e-3, 1.0, 300.0])).astype(np.float32)
    x.reshape(-1, shape[-1])[0] = 0  # an all-zero token: scale 0, decodes to zero
    q, scale = quantize(x)
    assert q.dtype == np.int8 and scale.dtype == np.float16 and scale.shape == shape[:-1]
    assert np.abs(q.astype(int)).max() <= 127
    s = scale.astype(np.float32)[..., None]
    err = np.abs(decode_tokens("int8", q, scale).astype(np.float32) - x)
    # half a quantisation step, plus the float16 rounding of the decoded value
    assert np.all(err <= s / 2 * 1.01 + np.abs(x) * 2**-10 + 1e-7)
    assert not decode_tokens("int8", q, scale).reshape(-1, shape[-1])[0].any()


def test_codec_names_are_checked_in_one_line():
    from cospress.extract import ExtractConfig

    assert parse_codec("pca:96").components == 96 and parse_codec("INT8").name == "int8"
    for bad in ("int4", "pca:0", "pca:x", "int8:3"):
        with pytest.raises(ConfigError, match="token-codec") as e:
            ExtractConfig(token_codec=bad).validate()
        assert "\n" not in str(e.value)
    with pytest.raises(ConfigError, match="token-fidelity"):
        ExtractConfig(token_codec="pca", token_fidelity=1.5).validate()


def test_the_codec_is_decided_in_one_place():
    """ExtractConfig.codec: --token-codec, or fp16 with --no-tokens (a pca codec then fits nothing)."""
    from cospress.extract import ExtractConfig

    assert ExtractConfig(token_codec="pca:8").codec() == parse_codec("pca:8")
    assert ExtractConfig(token_codec="int8", tokens=False).codec().name == "fp16"
    assert ExtractConfig(token_codec="pca", tokens=False, out="s3://b/s").codec().name == "fp16"
    with pytest.raises(ConfigError, match="local store"):
        ExtractConfig(token_codec="pca:8", out="s3://b/s").validate()


def test_pca_takes_the_fewest_components_that_reach_the_target():
    rng = np.random.default_rng(0)
    x = structured_tokens(rng, (24, 16, 64), rank=10, noise=0.1).astype(np.float32)
    fit, check = x[:18], x[18:]
    for target in (0.97, 0.99):
        proj, got = fit_projection(fit, None, target, check)
        k = proj.components
        assert got >= target and k % 8 == 0 and k < 64
        assert np.allclose(proj.basis @ proj.basis.T, np.eye(k), atol=1e-4)  # orthonormal rows
        fewer, fewer_got = fit_projection(fit, k - 8, target, check)
        assert fewer_got < target, (k, fewer_got)
    assert fit_projection(fit, 16, 0.99)[0].components == 16


# --------------------------------------------------------------------------- round trips
@pytest.mark.parametrize("codec", ["fp16", "int8", "pca"])
@pytest.mark.parametrize("seed", [1, 2])
def test_every_codec_round_trips_rows_shards_and_views(tmp_path, codec, seed):
    data = make_rows(seed)
    n, v, t, d = data["tokens"].shape
    rng = np.random.default_rng(seed + 10)
    proj = (
        fit_projection(data["tokens"].astype(np.float32).reshape(-1, t, d), d // 2, 0.9)[0]
        if codec == "pca"
        else None
    )
    write_store(tmp_path / "s", codec, data, shard=int(rng.integers(1, n + 1)), projection=proj)
    r = StoreReader(tmp_path / "s")
    assert r.layout.token_codec == codec and r.manifest["token_codec"]["name"] == codec
    want = decode_tokens(codec, *encode_tokens(codec, data["tokens"], proj), proj)
    rows = rng.integers(0, n, size=7)
    views = rng.integers(0, v, size=(7, 2))
    got = r.read_rows(rows, views=views)
    assert got["tokens"].dtype == np.float16 and got["tokens"].shape == (7, 2, t, d)
    np.testing.assert_array_equal(got["tokens"], want[rows[:, None], views])
    np.testing.assert_array_equal(got["cls"], data["cls"][rows[:, None], views])  # CLS stays float16, exact
    for s in range(r.num_shards):
        a, b = r.manifest["shards"][s]["rows"]
        np.testing.assert_array_equal(r.read_shard(s)["tokens"], want[a:b])
    raw = r.read_rows(np.arange(n), raw=True)
    if codec == "fp16":
        assert raw["token_scale"] is None
        np.testing.assert_array_equal(raw["tokens"], data["tokens"])
    else:
        assert raw["tokens"].dtype == np.int8 and raw["tokens"].shape[-1] == (d // 2 if codec == "pca" else d)
        assert raw["token_scale"].shape == (n, v, t)
        assert r.manifest["fidelity"]["views"] >= 1 and r.manifest["fidelity"]["cos_abs_err_mean"] >= 0
    assert not got["tokens"][~data["valid"][rows].astype(bool)].any()  # skipped rows decode to zeros
    assert r.verify() == []


def test_int8_meets_its_targets_on_vit_s_shaped_tokens(tmp_path):
    """257 x 384 tokens: bytes on disk <= 0.52 of fp16, token-cosine mean abs error <= 2e-3."""
    rng = np.random.default_rng(0)
    n, v, t, d = 4, 2, 257, 384
    data = make_rows(0, n=n)
    data.update(
        tokens=structured_tokens(rng, (n, v, t, d), rank=24),
        cls=rng.normal(size=(n, v, d)).astype(np.float16),
        views=rng.random((n, v, P)).astype(np.float32),
    )
    data["valid"][:] = 1
    sizes = {}
    for codec in ("fp16", "int8"):
        write_store(tmp_path / codec, codec, data, shard=2)
        files = [
            f
            for name in ("tokens", "token_scale")
            for f in (tmp_path / codec / name / "c").rglob("*")
            if f.is_file()
        ]
        sizes[codec] = sum(f.stat().st_size for f in files)
    assert sizes["int8"] <= 0.52 * sizes["fp16"], sizes
    got = StoreReader(tmp_path / "int8").read_rows(np.arange(n))["tokens"]
    err = token_cosine_error(data["tokens"].reshape(-1, t, d).astype(np.float32), got.reshape(-1, t, d))
    assert (
        err["mean"] <= 2e-3
        and StoreReader(tmp_path / "int8").manifest["fidelity"]["cos_abs_err_mean"] <= 2e-3
    )
    f = codec_fidelity(data["tokens"][0].astype(np.float32), got[0], data["cls"][0])
    assert 0 <= f["local_kl"] < 0.05 and f["local_kl_rel_change"] < 0.05


@pytest.mark.parametrize("codec", ["int8", "pca"])
def test_merge_and_webdataset_copy_tokens_as_stored(tmp_path, codec):
    a, b = make_rows(3, "a", n=9), make_rows(3, "b", n=6)
    b["tokens"] = (b["tokens"].astype(np.float32)[:, :, ::-1] * 0.5).astype(np.float16)  # other values
    t, d = a["tokens"].shape[2:]
    both = np.concatenate([a["tokens"], b["tokens"]]).astype(np.float32).reshape(-1, t, d)
    proj = fit_projection(both, 8 if d > 8 else 4, 0.9)[0] if codec == "pca" else None
    write_store(tmp_path / "a", codec, a, shard=4, projection=proj)
    write_store(tmp_path / "b", codec, b, shard=5, projection=proj)
    merge_stores([str(tmp_path / "a"), str(tmp_path / "b")], tmp_path / "m", shard_size=3)
    m = StoreReader(tmp_path / "m")
    raw = m.read_rows(np.arange(15), raw=True)
    for name in ("tokens", "token_scale"):
        want = np.concatenate(
            [
                StoreReader(tmp_path / s).read_rows(np.arange(n), raw=True)[name]
                for s, n in (("a", 9), ("b", 6))
            ]
        )
        np.testing.assert_array_equal(raw[name], want, err_msg=name)
    assert (
        m.verify() == [] and m.manifest["token_codec"] == StoreReader(tmp_path / "a").manifest["token_codec"]
    )
    export_wds(str(tmp_path / "m"), tmp_path / "wds", samples_per_shard=4)
    import_wds(tmp_path / "wds", tmp_path / "back")
    back = StoreReader(tmp_path / "back")
    np.testing.assert_array_equal(
        back.read_rows(np.arange(15))["tokens"], m.read_rows(np.arange(15))["tokens"]
    )
    np.testing.assert_array_equal(back.read_rows(np.arange(15), raw=True)["token_scale"], raw["token_scale"])
    assert back.verify() == []
    write_store(
        tmp_path / "f", "fp16", make_rows(3, "f", n=4) | {"tokens": a["tokens"][:4], "cls": a["cls"][:4]}, 2
    )
    with pytest.raises(StoreError, match=f"token codec \\(first: {codec}"):
        merge_stores([str(tmp_path / "a"), str(tmp_path / "f")], tmp_path / "m2")


def test_a_changed_projection_is_refused_and_verify_names_it(tmp_path):
    data = make_rows(5)
    t, d = data["tokens"].shape[2:]
    proj = fit_projection(data["tokens"].astype(np.float32).reshape(-1, t, d), 4, 0.9)[0]
    write_store(tmp_path / "s", "pca", data, shard=3, projection=proj)
    chunk = tmp_path / "s" / "token_projection" / "basis" / "c" / "0" / "0"
    raw = bytearray(chunk.read_bytes())
    raw[0] ^= 0x40
    chunk.write_bytes(bytes(raw))
    r = StoreReader(tmp_path / "s")
    assert [b["file"] for b in r.verify()] == ["token_projection/basis/c/0/0"]
    with pytest.raises(StoreError, match="projection_sha256"):
        r.read_rows([0])


# --------------------------------------------------------------------------- stage 1 and 2 end to end
@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    return make_image_folder(tmp_path_factory.mktemp("img"), classes=2, per_class=8, seed=5)


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> Path:
    return make_tiny_teacher_weights(tmp_path_factory.mktemp("w") / "t.safetensors", img_size=32)


def _extract_args(images: Path, weights: Path, out: Path, *extra: str) -> list[str]:
    return [
        "extract-teacher", "--data", f"folder:{images}", "--teacher", "test_vit", "--weights", str(weights),
        "--image-size", "32", "--views", "4", "--shard-size", "5", "--batch-size", "16", "--workers", "0",
        "--precision", "fp32", "--device", "cpu", "--out", str(out), "--no-progress", *extra,
    ]  # fmt: skip


def test_pca_store_end_to_end_append_refusals_and_distill(images, weights, tmp_path):
    """extract --token-codec pca:8, grow it by --append (same projection), refuse another codec,
    print the fidelity against the fp16 store of the same run, distill from it."""
    first = tmp_path / "first"
    shutil.copytree(images, first)
    shutil.rmtree(first / "class_1")
    store = extract_tiny_store(first, weights, tmp_path / "pca", token_codec="pca:8")
    before = StoreReader(store).manifest["token_codec"]
    assert before["name"] == "pca" and before["components"] == 8 and before["fit"]["views"] >= 1
    proc = run_cli(*_extract_args(images, weights, store, "--append", "--token-codec", "int8"), check=False)
    assert proc.returncode == 2 and "token codec (store: pca:8" in error_line(proc)
    extract_tiny_store(images, weights, store, token_codec="pca", append=True)  # the store's projection
    r = StoreReader(store)
    assert r.manifest["token_codec"] == before and r.num_rows > 8 and r.verify() == []
    fp16 = extract_tiny_store(images, weights, tmp_path / "fp16")
    ref = StoreReader(fp16)
    rows = [r.keys().index(k) for k in ref.keys()]
    got, want = r.read_rows(rows)["tokens"], ref.read_rows(np.arange(ref.num_rows))["tokens"]
    # the appended rows too are the fp16 store's tokens through the stored projection (then int8)
    again = decode_tokens("pca", *encode_tokens("pca", want, r.projection), r.projection)
    assert (
        got.shape == want.shape
        and token_cosine_error(again.reshape(-1, 4, 64), got.reshape(-1, 4, 64))["max"] < 1e-2
    )
    summary = json.loads(run_cli("inspect", str(store), "--json", "--reference", str(fp16)).stdout)
    assert summary["token_codec"]["name"] == "pca" and summary["fidelity_vs_reference"]["views"] >= 4
    assert 0 < summary["fidelity_vs_reference"]["cos_abs_err_mean"] < 0.5
    losses = distill_train_losses(str(store), tmp_path / "run", images, None)
    assert all(np.isfinite(x["loss/total"]) for x in losses)


def test_int8_extraction_resumes_and_refuses_fp16(images, weights, tmp_path):
    store = extract_tiny_store(images, weights, tmp_path / "int8", token_codec="int8")
    m = StoreReader(store).manifest
    assert m["dtypes"]["tokens"] == "int8" and m["fidelity"]["cos_abs_err_mean"] < 2e-3
    proc = run_cli(*_extract_args(images, weights, store), check=False)  # fp16, the default
    assert proc.returncode == 2 and "token codec (store: int8, this run: fp16)" in error_line(proc)
    assert "dtypes" not in error_line(proc)  # the codec is named once
    run_cli(*_extract_args(images, weights, store, "--token-codec", "int8"))  # a rerun: nothing to do
    assert StoreReader(store).manifest["shards"] == m["shards"]


def test_zarr_lists_every_store_without_a_warning(tmp_path):
    """Schema 2.0: the records are Zarr group nodes, so zarr-python lists the store (deeply) without
    its 'not recognized as a component of a Zarr hierarchy' warning, for every codec."""
    import warnings

    import zarr

    data = make_rows(6)
    t, d = data["tokens"].shape[2:]
    proj = fit_projection(data["tokens"].astype(np.float32).reshape(-1, t, d), 4, 0.9)[0]
    for codec in ("fp16", "int8", "pca"):
        write_store(tmp_path / codec, codec, data, shard=4, projection=proj if codec == "pca" else None)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            g = zarr.open_group(str(tmp_path / codec), mode="r")
            names = {name for name, _ in g.members(max_depth=None)}
        assert {"cls", "tokens", "cospress/manifest", "cospress/identity"} <= names
        assert g["cospress/manifest"].attrs["schema_version"] == SCHEMA_VERSION
        assert ("token_scale" in names) == (codec != "fp16") and ("token_projection/basis" in names) == (
            codec == "pca"
        )


def test_int8_targets_reach_the_step_as_q_times_scale(tmp_path):
    """Stage 2 keeps an int8 store's tokens int8 through the loader (half the bytes, no decode in the
    worker); `teacher_features` multiplies by the scales: the same targets as the decoded float16."""
    import torch

    from cospress.distill.data import read_targets
    from cospress.distill.model import teacher_features

    data = make_rows(7)
    write_store(tmp_path / "s", "int8", data, shard=3)
    r = StoreReader(tmp_path / "s")
    n, v = data["tokens"].shape[:2]
    rows, views = np.arange(n), np.random.default_rng(0).integers(0, v, size=(n, 1))
    kept = read_targets(r, rows, views, True, keep_int8=True)
    assert kept["tokens"].dtype == torch.int8 and kept["token_scale"].shape == kept["tokens"].shape[:2]
    got = teacher_features(kept, torch.device("cpu")).tokens
    raw = r.read_rows(rows, views=views, raw=True)
    want = raw["tokens"].astype(np.float32) * raw["token_scale"].astype(np.float32)[..., None]
    np.testing.assert_array_equal(got.numpy(), want.reshape(got.shape))
    decoded = teacher_features(read_targets(r, rows, views, True), torch.device("cpu")).tokens
    assert decoded.dtype == torch.float32 and "token_scale" not in read_targets(r, rows, views, True)
    torch.testing.assert_close(decoded, got, rtol=2e-3, atol=1e-4)  # float16 rounding of q * scale


def test_two_ranks_share_one_projection(images, weights, tmp_path):
    """torchrun with 2 ranks: rank 0 fits the projection before any shard, rank 1 waits and uses the
    stored one; the store equals a one-process extraction's (same projection, same bytes)."""
    import subprocess

    from tests.helpers import cli_env, torchrun_cli

    one = tmp_path / "one"
    run_cli(*_extract_args(images, weights, one, "--token-codec", "pca:8"))
    two = tmp_path / "two"
    cmd = torchrun_cli(*_extract_args(images, weights, two, "--token-codec", "pca:8"))
    proc = subprocess.run(cmd, capture_output=True, text=True, env=cli_env(), timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = StoreReader(one), StoreReader(two)
    assert a.manifest["token_codec"] == b.manifest["token_codec"] and b.verify() == []
    n = a.num_rows
    for name in ("tokens", "token_scale"):
        np.testing.assert_array_equal(
            a.read_rows(np.arange(n), raw=True)[name], b.read_rows(np.arange(n), raw=True)[name]
        )
