"""One-GPU benchmark: is the GPU busy? Bare models vs the cospress pipelines, with targets.

    python pipelines/bench/bench_gpu.py --out bench-gpu          # H100: ~5-7 minutes
    python pipelines/bench/bench_gpu.py --cpu-smoke --out /tmp/b  # tiny models on the CPU (< 2 min)

Measures, in one run, with random-init models (no hub access):
  bare teacher forward (ViT-B/14 at 224, bf16)          images/s   the reference of extraction
  extract-teacher end to end, --decode cpu / gpu        views/s    target >= 0.85 x bare teacher
  bare student step (ViT-Ti/16 at 224, bf16, AdamW)     images/s   the reference of distill (+ compiled)
  similarity KL fwd+bwd, plain vs fused (+ global term) ms         target <= 10% of the student step
  distill end to end, --decode cpu / gpu (/ gpu+compile) views/s    target >= 0.85 x bare student (gpu, fused)
  decode + crop alone: PIL in one process vs batched nvjpeg, and nvjpeg-vs-PIL pixel difference
Writes OUT/bench_gpu.json and OUT/bench_gpu.md after every section. A step that fails or whose flag does not exist
(e.g. extract without --decode) is reported as skipped with the reason; the others still run.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import multiprocessing as mp
import os
import platform
import shutil
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

log = logging.getLogger("bench_gpu")

FULL = dict(
    teacher="vit_base_patch14_dinov2", teacher_size=224, student="vit_tiny_patch16_224", student_size=224,
    images=2000, image_wh=(500, 375), views=3, views_per_image=3, batch=255, step_batch=256, loss_b=256, loss_n=257,
    loss_dt=768, loss_ds=192, global_n=1024, iters=20, workers=min(16, os.cpu_count() or 1),
    device="cuda", precision="bf16", decode_gpu="gpu", epochs=2, budget_s=420, compile=True,
)  # fmt: skip
SMOKE = dict(
    teacher="test_vit", teacher_size=32, student="test_vit", student_size=32,
    images=48, image_wh=(64, 48), views=3, views_per_image=3, batch=12, step_batch=12, loss_b=4, loss_n=17,
    loss_dt=64, loss_ds=32, global_n=64, iters=3, workers=2,
    device="cpu", precision="fp32", decode_gpu="device", epochs=1, budget_s=110, compile=False,
)  # fmt: skip
TARGETS = {"extract": 0.85, "distill": 0.85, "loss": 0.10}


# ---------------------------------------------------------------------------------------------- helpers
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time(fn, iters: int, device: torch.device, warmup: int = 3) -> float:
    """Median seconds of one call of fn (after warm-up)."""
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def _jpeg_worker(args: tuple[str, int, int, int]) -> None:
    from PIL import Image

    path, seed, w, h = args
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (h // 16, w // 16, 3), dtype=np.uint8)
    im = np.asarray(Image.fromarray(small).resize((w, h), Image.BICUBIC), dtype=np.float32)
    im = np.clip(im + rng.normal(0, 12, im.shape), 0, 255).astype(np.uint8)
    Image.fromarray(im).save(path, "JPEG", quality=90)


def make_jpegs(folder: Path, n: int, wh: tuple[int, int], workers: int) -> str:
    folder.mkdir(parents=True, exist_ok=True)
    jobs = [(str(folder / f"img{i:05d}.jpg"), i, *wh) for i in range(n)]
    with mp.get_context("fork").Pool(max(1, workers)) as pool:
        pool.map(_jpeg_worker, jobs, chunksize=16)
    return f"folder:{folder}"


def _amp(cfg: dict) -> torch.dtype | None:
    return torch.bfloat16 if cfg["precision"] == "bf16" else None


class PreflightError(RuntimeError):
    """A check that must pass before any measurement; its message is one line."""


def _driver() -> str:
    try:
        q = ["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader"]
        return subprocess.run(q, capture_output=True, text=True, timeout=30).stdout.strip().splitlines()[0]
    except (OSError, IndexError, subprocess.SubprocessError):
        return "nvidia-smi unavailable"


def preflight(device: torch.device, jpeg: Path) -> dict:
    """Fail fast (PreflightError, one line) unless CUDA, a Triton kernel and nvjpeg all work on `device`."""
    info = {"driver": _driver(), "torch": torch.__version__, "torch_cuda": torch.version.cuda}
    where = f"(torch {info['torch']}, built for CUDA {info['torch_cuda']}; driver: {info['driver']})"
    if device.type != "cuda" or not torch.cuda.is_available():
        raise PreflightError(f"no CUDA device visible to torch {where}")
    steps = {
        "CUDA": lambda: torch.ones(8, device=device).sum().item(),
        "Triton": lambda: _triton_check(device),
    }
    steps["nvjpeg"] = lambda: _nvjpeg_check(device, jpeg)
    for name, check in steps.items():
        try:
            check()
        except Exception as e:
            first = (str(e).strip().splitlines() or [""])[0][:300]
            raise PreflightError(
                f"{name} check failed on {device} {where}: {type(e).__name__}: {first}"
            ) from e
    info["device"] = torch.cuda.get_device_name(device)
    return info


def _triton_check(device: torch.device) -> None:
    from cospress import losses

    losses._fused_self_test(device)  # compiles the three fused kernels and compares with the plain loss


def _nvjpeg_check(device: torch.device, jpeg: Path) -> None:
    from torchvision.io import decode_jpeg, read_file

    img = decode_jpeg(read_file(str(jpeg)), device=device)
    if img.dim() != 3 or img.shape[0] != 3:
        raise RuntimeError(f"decoded to shape {tuple(img.shape)}")


def write_json(out: Path, res: dict) -> None:
    """bench_gpu.json, rewritten after every section so that a killed run keeps what it measured."""
    tmp = out / "bench_gpu.json.tmp"
    tmp.write_text(json.dumps(res, indent=2, default=str))
    os.replace(tmp, out / "bench_gpu.json")


def env_of(device: torch.device, t_start: float) -> dict:
    return {
        "device": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else platform.processor() or "cpu",
        "torch": torch.__version__,
        "python": sys.version.split()[0],
        "cpus": os.cpu_count(),
        "seconds_total": time.perf_counter() - t_start,
    }


# ---------------------------------------------------------------------------------------------- measurements
def bench_teacher(cfg: dict, device: torch.device, weights: Path) -> dict:
    from safetensors.torch import save_file

    from cospress.models.teachers import build_teacher
    from cospress.runtime import autocast

    teacher = build_teacher(cfg["teacher"], image_size=cfg["teacher_size"], pretrained=False).to(device)
    save_file({k: v.contiguous().cpu() for k, v in teacher.model.state_dict().items()}, str(weights))
    x = torch.randint(
        0, 256, (cfg["step_batch"], 3, cfg["teacher_size"], cfg["teacher_size"]), dtype=torch.uint8
    )
    x = x.to(device)

    def fwd():
        with torch.inference_mode(), autocast(device, _amp(cfg)):
            teacher(x)

    s = _time(fwd, cfg["iters"], device)
    return {"images_per_s": cfg["step_batch"] / s, "ms_per_batch": 1e3 * s, "batch": cfg["step_batch"]}


def bench_student(cfg: dict, device: torch.device, compiled: bool) -> dict:
    from cospress.models.students import build_student
    from cospress.runtime import autocast

    student = build_student(cfg["student"], cfg["student_size"]).to(device)
    if compiled:
        student.compile()
    opt = torch.optim.AdamW(student.parameters(), lr=1e-4, fused=device.type == "cuda")
    b, s = cfg["step_batch"], cfg["student_size"]
    x = torch.randint(0, 256, (b, 3, s, s), dtype=torch.uint8, device=device)
    with torch.no_grad():
        target = student(x).tokens.float().detach()

    def step():
        with autocast(device, _amp(cfg)):
            out = student(x)
        loss = (
            1 - torch.nn.functional.cosine_similarity(out.tokens.float().flatten(1), target.flatten(1)).mean()
        )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    t0 = time.perf_counter()
    step()
    first = time.perf_counter() - t0
    sec = _time(step, cfg["iters"], device)
    return {"images_per_s": b / sec, "ms_per_batch": 1e3 * sec, "batch": b, "first_step_s": first}


def bench_loss(cfg: dict, device: torch.device, impl: str) -> dict:
    from cospress.losses import DEFAULT_TEMPERATURES, similarity_kl

    temps = tuple(DEFAULT_TEMPERATURES)
    g = torch.Generator().manual_seed(0)
    out = {}
    for name, (b, n) in (("local", (cfg["loss_b"], cfg["loss_n"])), ("global", (1, cfg["global_n"]))):
        t = torch.randn(b, n, cfg["loss_dt"], generator=g).to(device)
        z = torch.randn(b, n, cfg["loss_ds"], generator=g).to(device).requires_grad_(True)

        def run(t=t, z=z):
            similarity_kl(t, z, temps, impl=impl).backward()
            z.grad = None

        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        out[f"{name}_ms"] = 1e3 * _time(run, cfg["iters"], device)
        if device.type == "cuda":
            out[f"{name}_peak_gb"] = torch.cuda.max_memory_allocated(device) / 1e9
    out["total_ms"] = out["local_ms"] + out["global_ms"]
    return out


def bench_decode(cfg: dict, device: torch.device, spec: str, decode_device: torch.device) -> dict:
    """Decode + random-resized-crop alone: PIL per image in this process vs batched on the device."""
    from cospress.data import device_decode as dd
    from cospress.data.sources import open_source
    from cospress.data.views import ViewPolicy, replay_view, sample_view_params

    src = open_source(spec)
    n = min(len(src), cfg["step_batch"])
    items = [dd.read_encoded(src, i) for i in range(n)]
    policy = ViewPolicy()
    params = [
        sample_view_params(policy, 0, src.keys()[i], 0, it.width, it.height)[None]
        for i, it in enumerate(items)
    ]
    size = cfg["student_size"]
    t0 = time.perf_counter()
    ref = [replay_view(src.load(i).image, params[i][0], size) for i in range(n)]
    cpu_s = time.perf_counter() - t0
    batch = dd.pack(items)
    if decode_device.type == "cuda":
        batch = batch.pin_memory()
    sec = _time(
        lambda: dd.decode_replay(batch, params, size, decode_device), max(3, cfg["iters"] // 2), decode_device
    )
    views, _ = dd.decode_replay(batch, params, size, decode_device)
    imgs, _ = dd.decode_batch(batch, decode_device)
    pil = [torch.from_numpy(np.asarray(src.load(i).image).copy()).permute(2, 0, 1) for i in range(min(n, 32))]
    pix = torch.cat([(a.cpu().int() - b.int()).abs().flatten() for a, b in zip(imgs, pil, strict=False)])
    view_diff = (views.cpu().int() - torch.stack(ref).int()).abs()
    return {
        "pil_decode_crop_per_process_images_per_s": n / cpu_s,
        "device_decode_crop_images_per_s": n / sec,
        "decode_device": str(decode_device),
        "decoded_vs_pil_max_grey_levels": int(pix.max()),
        "decoded_vs_pil_mean_grey_levels": float(pix.float().mean()),
        "replayed_views_vs_cpu_path_max_grey_levels": int(view_diff.max()),
    }


def bench_extract(cfg: dict, device: torch.device, spec: str, weights: Path, out: Path, decode: str) -> dict:
    from cospress.extract import ExtractConfig, run_extract

    fields = {f.name for f in dataclasses.fields(ExtractConfig)}
    kw: dict[str, Any] = {}
    if decode != "default":
        if "decode" not in fields:
            return {"skipped": "ExtractConfig has no `decode` field yet (extract --decode not wired)"}
        kw["decode"] = decode
    if out.exists():
        shutil.rmtree(out)
    ecfg = ExtractConfig(
        data=spec, teacher=cfg["teacher"], weights=str(weights), image_size=cfg["teacher_size"],
        views=cfg["views"], workers=cfg["workers"], batch_size=cfg["batch"], shard_size=512, out=str(out),
        precision=cfg["precision"], device=str(device), **kw,
    )  # fmt: skip
    t0 = time.perf_counter()
    summary = run_extract(ecfg)
    wall = time.perf_counter() - t0
    views = summary["images"] * cfg["views"]
    return {
        "views_per_s": views / summary["seconds"],
        "images": summary["images"],
        "seconds": summary["seconds"],
        "wall_s": wall,
        "seconds_reading": summary.get("seconds_reading"),
        "seconds_teacher": summary.get("seconds_teacher"),
        "seconds_writing": summary.get("seconds_writing"),
    }


def bench_distill(
    cfg: dict, device: torch.device, store: Path, out: Path, decode: str, compiled: bool
) -> dict:
    from cospress.distill import DistillConfig, run_distill

    if out.exists():
        shutil.rmtree(out)
    dcfg = DistillConfig(
        store=str(store), out=str(out), student=cfg["student"], student_size=cfg["student_size"],
        epochs=cfg["epochs"], batch_size=cfg["batch"], views_per_image=cfg["views_per_image"], workers=cfg["workers"],
        precision=cfg["precision"], device=str(device), decode=decode, compile=compiled, val_fraction=0.0,
        warmup_epochs=0.0,
    )  # fmt: skip
    t0 = time.perf_counter()
    summary = run_distill(dcfg)
    wall = time.perf_counter() - t0
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if r.get("phase") == "train"]
    # steady state: drop the first steps (warm-up, compilation) and each epoch's first (worker start)
    skip = min(5, max(len(steps) - 2, 0))
    firsts = {min(r["step"] for r in steps if r["epoch"] == e) for e in {r["epoch"] for r in steps}}
    steady = [r for r in steps[skip:] if r["step"] not in firsts] or steps[-1:]
    views = cfg["batch"] * len(steady)
    sec = sum(r["time_step_s"] for r in steady)
    data = sum(r["time_data_s"] for r in steady)
    return {
        "views_per_s": views / sec if sec else 0.0,
        "steps_measured": len(steady),
        "data_wait_fraction": data / sec if sec else 0.0,
        "first_step_s": steps[0]["time_step_s"] if steps else None,
        "overall_views_per_s": summary["images_per_second"],
        "wall_s": wall,
        "loss_total": steps[-1]["loss/total"] if steps else None,
    }


# ---------------------------------------------------------------------------------------------- driver
def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="bench-gpu")
    ap.add_argument(
        "--cpu-smoke", action="store_true", help="tiny models on the CPU: proves the script works"
    )
    ap.add_argument("--images", type=int, default=None)
    ap.add_argument("--keep", action="store_true", help="keep the synthetic images and stores")
    ap.add_argument("--preflight", action="store_true", help="run only the pre-flight checks (CUDA)")
    args = ap.parse_args(argv)
    logging.basicConfig(
        level=os.environ.get("COSPRESS_LOG", "WARNING"), format="%(asctime)s %(name)s: %(message)s"
    )
    log.setLevel(logging.INFO)
    cfg = dict(SMOKE if args.cpu_smoke else FULL)
    if args.images:
        cfg["images"] = args.images
    device = torch.device(cfg["device"])
    out = Path(args.out)
    work = out / "work"
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    res: dict[str, Any] = {"config": cfg}
    skipped: dict[str, str] = {}
    res["skipped"] = skipped
    if device.type == "cuda" or args.preflight:
        make_jpegs(work / "preflight", 1, (64, 48), 1)
        try:
            res["preflight"] = preflight(torch.device("cuda"), work / "preflight" / "img00000.jpg")
        except PreflightError as e:
            sys.exit(f"bench_gpu: pre-flight failed: {e}")
        log.info("pre-flight: %s", json.dumps(res["preflight"]))
        if args.preflight:
            return res

    def section(name: str, fn, *a, **kw) -> None:
        if time.perf_counter() - t_start > cfg["budget_s"]:
            skipped[name] = f"time budget of {cfg['budget_s']} s spent"
            log.warning("skip %s: %s", name, skipped[name])
            return
        t0 = time.perf_counter()
        try:
            r = fn(*a, **kw)
        except Exception as e:  # one failing measurement must not lose the others
            skipped[name] = f"{type(e).__name__}: {e}"
            log.error("%s failed:\n%s", name, traceback.format_exc())
            r = {}
        if "skipped" in r:
            skipped[name] = r["skipped"]
            log.warning("skip %s: %s", name, r["skipped"])
        elif r:
            r["section_s"] = time.perf_counter() - t0
            res[name] = r
            log.info("%s: %s", name, json.dumps(r))
        write_json(out, res)  # after every section: a run killed by its timeout keeps what it measured
        partial = {**res, "env": env_of(device, t_start)}
        (out / "bench_gpu.md").write_text(to_markdown({**partial, "summary": summarize(partial)}))

    spec = make_jpegs(work / "images", cfg["images"], cfg["image_wh"], cfg["workers"])
    log.info("%d synthetic JPEGs in %.1f s", cfg["images"], time.perf_counter() - t_start)
    weights = work / "teacher.safetensors"
    gpu_decode = cfg["decode_gpu"]
    dec_dev = device if gpu_decode == "device" or device.type == "cuda" else torch.device("cpu")
    section("teacher_forward", bench_teacher, cfg, device, weights)
    section("decode_crop", bench_decode, cfg, device, spec, dec_dev)
    section("extract_cpu", bench_extract, cfg, device, spec, weights, work / "store_cpu", "cpu")
    if "extract_cpu" in skipped:  # extract has no --decode: measure its default path
        section("extract_default", bench_extract, cfg, device, spec, weights, work / "store_cpu", "default")
    section("extract_gpu", bench_extract, cfg, device, spec, weights, work / "store_gpu", gpu_decode)
    section("student_step", bench_student, cfg, device, False)
    no_compile = "torch.compile's cold start takes ~1.5 min on a small CPU; measured on the GPU run"
    if cfg["compile"]:
        section("student_step_compiled", bench_student, cfg, device, True)
    else:
        skipped["student_step_compiled"] = no_compile
    section("loss_plain", bench_loss, cfg, device, "plain")
    if device.type == "cuda":
        section("loss_fused", bench_loss, cfg, device, "fused")
    else:
        skipped["loss_fused"] = "the fused Triton kernel runs on CUDA only"
    store = work / "store_cpu"
    from cospress.store import is_complete

    if is_complete(store):
        section("distill_cpu", bench_distill, cfg, device, store, work / "run_cpu", "cpu", False)
        section("distill_gpu", bench_distill, cfg, device, store, work / "run_gpu", gpu_decode, False)
        if cfg["compile"]:
            run = work / "run_comp"
            section("distill_gpu_compiled", bench_distill, cfg, device, store, run, gpu_decode, True)
        else:
            skipped["distill_gpu_compiled"] = no_compile
    else:
        skipped["distill"] = "no store was extracted"
    res["env"] = env_of(device, t_start)
    res["summary"] = summarize(res)
    write_json(out, res)
    md = to_markdown(res)
    (out / "bench_gpu.md").write_text(md)
    print(md)
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    return res


def _get(res: dict, name: str, key: str) -> float | None:
    return (res.get(name) or {}).get(key)


def summarize(res: dict) -> list[dict]:
    """Rows: measurement, value, unit, ratio to its bare model, target, met."""
    rows = []
    teacher = _get(res, "teacher_forward", "images_per_s")
    student = _get(res, "student_step", "images_per_s")
    step_ms = _get(res, "student_step", "ms_per_batch")

    def add(name, value, unit, ref=None, target=None, lower_is_better=False):
        if value is None:
            return
        ratio = value / ref if ref else None
        met = None
        if target is not None and ratio is not None:
            met = ratio <= target if lower_is_better else ratio >= target
        rows.append(
            {"measurement": name, "value": value, "unit": unit, "ratio": ratio, "target": target, "met": met}
        )

    gpu = res["config"]["decode_gpu"]  # "gpu" on CUDA; "device" (= the CPU) in --cpu-smoke
    add("bare teacher forward", teacher, "img/s", teacher)
    for n, label in (("extract_default", "default"), ("extract_cpu", "cpu"), ("extract_gpu", gpu)):
        add(
            f"extract end to end ({label} decode)",
            _get(res, n, "views_per_s"),
            "views/s",
            teacher,
            TARGETS["extract"],
        )
    add("bare student step", student, "img/s", student)
    add("bare student step, compiled", _get(res, "student_step_compiled", "images_per_s"), "img/s", student)
    for n in ("loss_plain", "loss_fused"):
        add(
            f"similarity KL local+global ({n.split('_')[1]})",
            _get(res, n, "total_ms"),
            "ms",
            step_ms,
            TARGETS["loss"],
            True,
        )
    for n, label in (
        ("distill_cpu", "cpu decode"),
        ("distill_gpu", f"{gpu} decode"),
        ("distill_gpu_compiled", f"{gpu} decode + compile"),
    ):
        add(
            f"distill end to end ({label})",
            _get(res, n, "views_per_s"),
            "views/s",
            student,
            TARGETS["distill"],
        )
    add(
        "decode + crop, PIL, one process",
        _get(res, "decode_crop", "pil_decode_crop_per_process_images_per_s"),
        "img/s",
    )
    add(
        "decode + crop, batched on the device",
        _get(res, "decode_crop", "device_decode_crop_images_per_s"),
        "img/s",
    )
    add(
        "device decode vs PIL, max grey levels",
        _get(res, "decode_crop", "decoded_vs_pil_max_grey_levels"),
        "levels",
    )
    return rows


def _fmt(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, bool):
        return "yes" if v else "**no**"
    if isinstance(v, float):
        return f"{v:,.3g}" if abs(v) < 100 else f"{v:,.0f}"
    return str(v)


def to_markdown(res: dict) -> str:
    env = res["env"]
    lines = [
        f"# cospress GPU benchmark — {env['device']}",
        "",
        f"torch {env['torch']}, {env['cpus']} CPUs, {env['seconds_total']:.0f} s in all; random-init models. "
        "Ratio = value / its bare model (teacher forward for extraction, student step for distill and "
        "the loss); target = the ratio the issue asks for (loss: at most).",
        "",
        "| measurement | value | unit | ratio to bare | target | met |",
        "|---|---:|---|---:|---:|---|",
    ]
    for r in res["summary"]:
        lines.append(
            f"| {r['measurement']} | {_fmt(r['value'])} | {r['unit']} | {_fmt(r['ratio'])} | "
            f"{_fmt(r['target'])} | {_fmt(r['met'])} |"
        )
    if res["skipped"]:
        lines += ["", "Skipped:", ""] + [f"- {k}: {v}" for k, v in res["skipped"].items()]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
