"""Benchmark the token codecs of a ViT-S/14-shaped store (257 x 384 per view): footprint, fidelity,
extraction overhead, stage-2 target reads and cached distillation beside the bare student step.

Per codec (fp16, int8, pca:K), in one run:
(a) bytes per view on disk (tokens + token_scale + cls shard files) and the ratio to fp16;
(b) fidelity against the float32 tokens (`cospress.store.fidelity.codec_fidelity`: token-cosine
    mean / max abs error, local KL at tau = 0.01 and its relative change); fp16 itself is listed;
(c) extraction overhead: views/s of `StoreWriter.write_shard` (encode + compress + write + commit,
    what stage 1's writer thread does) per core, and the share of one core it needs beside the
    ViT-S/14 teacher of DESIGN.md's H100 (12,389 images/s);
(d) stage-2 target reads from the local disk: a DataLoader with 1 and 2 workers reading batches of
    ``--batch-images`` rows x R views as stage 2's workers do (`distill.data.read_targets`: float16,
    an int8 store's tokens kept int8), views/s and GB/s (of float16 targets, and of bytes on disk);
(e) cached distillation (`cospress distill` in a process of its own, 1 worker, student ViT-Ti/16 @ 64
    px) over the bare training step (`bench_distill.Bare`), phases interleaved over rounds.

The stores hold seeded synthetic tokens with a teacher's structure (a per-view offset and a low-rank
part in shared subspaces, plus noise; `--rank`), not a real DINOv2's: a random-init ViT-S/14 runs at
~3 images/s on 2 CPU cores, too slow to extract here, and its tokens are no more realistic. Keys and
view params are Fashion-MNIST's (the views are replayed for the student in (e)).

    python pipelines/bench/bench_store.py --images 512 --out bench-store.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import cospress  # noqa: E402, F401  first: it sets the OpenMP wait policy before torch loads

# isort: split

import numpy as np  # noqa: E402
import torch  # noqa: E402
from bench_distill import Bare, spread, timed_rates  # noqa: E402

from cospress.data.sources import open_source  # noqa: E402
from cospress.distill import DistillConfig  # noqa: E402
from cospress.extract import ExtractConfig  # noqa: E402
from cospress.runtime import tune_malloc  # noqa: E402
from cospress.store import StoreLayout, StoreReader, StoreWriter, make_identity  # noqa: E402
from cospress.store.codecs import decode_tokens, encode_tokens, fit_projection  # noqa: E402
from cospress.store.fidelity import codec_fidelity  # noqa: E402
from cospress.store.projection import codec_entry  # noqa: E402

T, DT, GRID = 256, 384, (16, 16)  # ViT-S/14 at 224 px: 16 x 16 patch tokens + CLS, 384 dims
H100_TEACHER = 12_389  # images/s, ViT-S/14 forward (DESIGN.md)


class Tokens:
    """Seeded synthetic teacher outputs: row r's views draw from one generator keyed by r."""

    def __init__(self, rank: int, seed: int = 0) -> None:
        g = np.random.default_rng(seed)
        self.rank = rank
        self.offsets = g.normal(size=(8, DT)).astype(np.float32)  # per-view offsets: a shared subspace
        self.basis = (g.normal(size=(rank, DT)) / np.sqrt(rank)).astype(np.float32)
        self.seed = seed

    def rows(self, start: int, stop: int, views: int, dtype=np.float16) -> tuple[np.ndarray, np.ndarray]:
        """(cls [n, V, Dt], tokens [n, V, T, Dt]) of rows start..stop (float16: as a store gets them)."""
        out_t = np.empty((stop - start, views, T, DT), dtype)
        out_c = np.empty((stop - start, views, DT), dtype)
        for i, r in enumerate(range(start, stop)):
            g = np.random.default_rng([self.seed, r])
            base = g.normal(size=(views, 1, 8)).astype(np.float32) @ self.offsets
            low = g.normal(size=(views, T, self.rank)).astype(np.float32) @ self.basis * 1.5
            noise = g.normal(size=(views, T, DT)).astype(np.float32) * 0.35
            out_t[i] = base + low + noise
            out_c[i] = base[:, 0] * 1.2 + g.normal(size=(views, DT)).astype(np.float32) * 0.5
        return out_c, out_t


def identity(source, policy, k: int, codec: dict) -> dict:
    teacher = {"name": "vit_small_patch14_dinov2", "fingerprint": "synthetic-" + "0" * 54, "input_size": 224,
               "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225], "layer": "final_norm",
               "grid": list(GRID), "dim": DT}  # fmt: skip
    return make_identity(
        teacher=teacher, view_policy=policy.to_dict(), policy_fingerprint=policy.fingerprint(), k=k,
        center_view=False, seed=0, source=source.describe(), param_names=policy.param_names,
        precision="bfloat16", decode="cpu", token_codec=codec,
    )  # fmt: skip


def write_store(path: Path, codec: str, a, tokens: Tokens, projection=None) -> dict:
    """A complete store of ``a.images`` Fashion-MNIST keys; returns write seconds and views."""
    from cospress.data.views import sample_view_params

    source = open_source("fashion-mnist:train", limit=a.images)
    policy = ExtractConfig().policy()
    keys, labels = source.keys(), source.labels()
    name = codec.split(":")[0]
    layout = StoreLayout(len(keys), a.shard_size, a.views, DT, T, policy.num_params, True, token_codec=name,
                         token_dim=projection.components if projection is not None else 0)  # fmt: skip
    w = StoreWriter.open(path, identity(source, policy, a.views, codec_entry(name, projection)), layout,
                         overwrite=True, projection=projection)  # fmt: skip
    seconds = 0.0
    for s in range(w.num_shards):
        start, stop = w.shard_rows(s)
        cls, tok = tokens.rows(start, stop, a.views)
        views = np.stack([[sample_view_params(policy, 0, keys[r], v, 28, 28) for v in range(a.views)]
                          for r in range(start, stop)]).astype(np.float32)  # fmt: skip
        t0 = time.perf_counter()
        w.write_shard(s, cls=cls, tokens=tok, views=views, keys=keys[start:stop], labels=labels[start:stop],
                      valid=np.ones(stop - start, np.uint8))  # fmt: skip
        seconds += time.perf_counter() - t0
    w.finalize()
    return {"write_seconds": seconds, "views": len(keys) * a.views}


def disk_bytes(path: Path) -> int:
    names = ("cls", "tokens", "token_scale")
    return sum(
        f.stat().st_size
        for n in names
        if (path / n).exists()
        for f in (path / n / "c").rglob("*")
        if f.is_file()
    )


def fidelity(codec: str, tokens: Tokens, projection) -> dict:
    """The codec's error on 16 views against their float32 tokens (fp16 included)."""
    cls, tok = tokens.rows(10_000, 10_008, 2, np.float32)  # rows no store holds (nor the pca fit)
    exact = tok.reshape(-1, T, DT)
    name = codec.split(":")[0]
    dec = decode_tokens(name, *encode_tokens(name, exact.astype(np.float16), projection), projection)
    return codec_fidelity(exact, dec, cls.reshape(-1, DT))


class Batches(torch.utils.data.Dataset):
    """Item i: the targets of ``images`` random rows x R random views, as a stage-2 worker reads them
    (`distill.data.read_targets`: decoded to float16, but an int8 store's tokens kept int8)."""

    def __init__(self, store: str, count: int, images: int, r: int) -> None:
        self.store, self.count, self.images, self.r, self.reader = store, count, images, r, None

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, i: int) -> int:
        if self.reader is None:
            self.reader = StoreReader(self.store)
        g = np.random.default_rng(i)
        rows = g.choice(self.reader.num_rows, self.images, replace=False)
        views = np.stack([g.choice(self.reader.stored_views, self.r, replace=False) for _ in rows])
        from cospress.distill.data import read_targets

        return read_targets(self.reader, rows, views, True, keep_int8=True)["tokens"].numel()


def read_rate(store: str, workers: int, a) -> float:
    ds = Batches(store, a.read_batches, a.batch_images, a.views_per_image)
    loader = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=workers, prefetch_factor=2,
                                         persistent_workers=False)  # fmt: skip
    it = iter(loader)
    next(it)  # worker start-up and the first open are not timed
    t0 = time.perf_counter()
    n = sum(1 for _ in it)
    return n * a.batch_images * a.views_per_image / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=512)
    ap.add_argument("--views", type=int, default=4, help="K of the stores")
    ap.add_argument("--views-per-image", type=int, default=3, help="R")
    ap.add_argument("--shard-size", type=int, default=128)
    ap.add_argument("--components", type=int, default=0, help="pca components (0: reach --fidelity)")
    ap.add_argument("--fidelity", type=float, default=0.99, help="pca target without --components")
    ap.add_argument("--rank", type=int, default=48, help="rank of the synthetic tokens' structured part")
    ap.add_argument("--batch-images", type=int, default=64, help="images per read batch (x R views)")
    ap.add_argument("--read-batches", type=int, default=24)
    ap.add_argument("--batch-size", type=int, default=192, help="views per distill step")
    ap.add_argument("--steps", type=int, default=5, help="timed distill steps per phase and round")
    ap.add_argument("--repeats", type=int, default=2, help="timed rounds of the distill phases")
    ap.add_argument("--precision", default="auto")
    ap.add_argument("--no-distill", action="store_true", help="skip (e): footprint, fidelity and reads only")
    ap.add_argument("--distill-codecs", default="", help="codecs timed in (e), e.g. fp16,int8 [default: all]")
    ap.add_argument("--work", default=None)
    ap.add_argument("--out", default="bench-store.json")
    a = ap.parse_args()
    tune_malloc()
    work = Path(a.work or tempfile.mkdtemp(prefix="bench-store-"))
    tokens = Tokens(a.rank)
    _, sample = tokens.rows(20_000, 20_048, 2)
    proj, fit = fit_projection(sample.astype(np.float32).reshape(-1, T, DT)[:72], a.components or None,
                               a.fidelity, sample.astype(np.float32).reshape(-1, T, DT)[72:])  # fmt: skip
    codecs = {"fp16": None, "int8": None, f"pca:{proj.components}": proj}
    result: dict = {"tokens_per_view": T + 1, "dim": DT, "images": a.images, "k": a.views,
                    "threads": torch.get_num_threads(), "pca_fit_fidelity": fit, "codecs": {}}  # fmt: skip
    for codec, p in codecs.items():
        path = work / codec.replace(":", "-")
        w = write_store(path, codec, a, tokens, p)
        per_view = disk_bytes(path) / w["views"]
        per_core = w["views"] / w["write_seconds"]
        r = {"bytes_per_view": per_view, "writer_views_per_s_per_core": per_core,
             "cores_beside_h100_vit_s14": H100_TEACHER / per_core, "fidelity": fidelity(codec, tokens, p)}  # fmt: skip
        for workers in (1, 2):
            vps = read_rate(str(path), workers, a)
            r[f"read_{workers}w_views_per_s"] = vps
            r[f"read_{workers}w_target_GBps"] = vps * (T * DT * 2 + DT * 2) / 1e9
            r[f"read_{workers}w_disk_GBps"] = vps * per_view / 1e9
        result["codecs"][codec] = r
        print(
            codec,
            json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()}),
            flush=True,
        )
    fp16 = result["codecs"]["fp16"]["bytes_per_view"]
    for r in result["codecs"].values():
        r["bytes_ratio_to_fp16"] = r["bytes_per_view"] / fp16
    timed = [c for c in codecs if not a.distill_codecs or c.split(":")[0] in a.distill_codecs.split(",")]
    result["distill"] = None if a.no_distill else distill_rounds(a, work, timed)
    Path(a.out).write_text(json.dumps(result, indent=2) + "\n")
    for codec, r in result["codecs"].items():
        d = (result["distill"] or {}).get("cached_over_bare", {}).get(codec, {"median": float("nan")})
        print(f"{codec:8s} {r['bytes_per_view'] / 1e3:7.1f} KB/view ({r['bytes_ratio_to_fp16']:.3f} of fp16), "
              f"cos err {r['fidelity']['cos_abs_err_mean']:.2e}, reads 1w {r['read_1w_views_per_s']:.0f} / "
              f"2w {r['read_2w_views_per_s']:.0f} views/s, distill/bare {d['median']:.2f}")  # fmt: skip
    print(f"wrote {a.out}")


def cli_rates(cfg: DistillConfig, steps: int) -> list[float]:
    """Views/s of the timed steps of one `cospress distill` run, in a process of its own (as a user
    runs it; a fresh process per run also keeps this one's memory flat)."""
    import subprocess
    import sys

    from cospress.config import save_config

    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out / "bench-config.yaml")
    cmd = [
        sys.executable,
        "-m",
        "cospress",
        "-q",
        "distill",
        "--config",
        str(out / "bench-config.yaml"),
        "--no-progress",
    ]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return timed_rates(out, steps)


def distill_rounds(a, work: Path, codecs: list[str]) -> dict:
    """Cached distill views/s per codec and the bare step, interleaved; ratios within each round."""
    common = dict(student="vit_tiny_patch16_224", student_size=64, batch_size=a.batch_size,
                  views_per_image=a.views_per_image, epochs=1, workers=1, precision=a.precision, val_fraction=0.0,
                  data="fashion-mnist:train")  # fmt: skip
    first = str(work / codecs[0].replace(":", "-"))
    bare = Bare(DistillConfig(store=first, **common), DT, GRID)
    phases = {"bare": lambda tag: bare.rates(a.steps)}
    for c in codecs:
        store = str(work / c.replace(":", "-"))
        phases[c] = lambda tag, s=store, c=c: cli_rates(
            DistillConfig(store=s, out=str(work / f"run-{c.replace(':', '-')}-{tag}"), **common), a.steps
        )
    names, rounds = list(phases), []
    for r in range(a.repeats + 1):  # round 0 warms up and is not kept
        order = names[r % len(names) :] + names[: r % len(names)]
        rates = {n: statistics.median(phases[n](f"r{r}")) for n in order}
        print(f"round {r}: " + ", ".join(f"{k} {v:.0f}" for k, v in rates.items()), flush=True)
        if r:
            rounds.append(rates)
    return {
        "rounds": rounds,
        "views_per_s": {n: spread([x[n] for x in rounds]) for n in names},
        "cached_over_bare": {c: spread([x[c] / x["bare"] for x in rounds]) for c in codecs},
    }


if __name__ == "__main__":
    main()
