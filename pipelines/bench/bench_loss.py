"""Benchmark the similarity KL: forward + backward time and peak memory, plain vs lean (vs fused on CUDA).

    python pipelines/bench/bench_loss.py                      # CUDA: B=256 N=257 D=192; CPU: B=32 N=65 D=192
    python pipelines/bench/bench_loss.py --batch 1 --tokens 1024 --out global.json   # the global term

Peak memory is what one forward + backward adds on top of its inputs: torch's allocator peak on CUDA;
on the CPU the peak resident set of a fresh process per implementation (Linux /proc), so that one
implementation's freed memory does not hide the next one's.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import platform
import resource
import statistics
import sys
import time
from pathlib import Path

import torch

from cospress.fused_kl import triton_available
from cospress.losses import DEFAULT_TEMPERATURES, similarity_kl


def _inputs(cfg: dict, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    t = torch.randn(cfg["batch"], cfg["tokens"], cfg["dim"], generator=gen)
    z = torch.randn(cfg["batch"], cfg["tokens"], cfg["dim_s"], generator=gen)
    return t.to(device).requires_grad_(True), z.to(device).requires_grad_(True)


def _step(impl: str, t: torch.Tensor, z: torch.Tensor, temps: tuple[float, ...]) -> float:
    loss = similarity_kl(t, z, temps, impl=impl)
    loss.backward()
    t.grad = z.grad = None
    return float(loss.detach())


def _rss_kib(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def _cpu_peak_mb(
    impl: str, t: torch.Tensor, z: torch.Tensor, temps: tuple[float, ...]
) -> tuple[float, float]:
    """(loss, MB added to the peak resident set by one forward + backward). Run in a fresh process."""
    rss0 = _rss_kib("VmRSS")
    try:  # reset the peak (VmHWM) to the current resident set
        Path("/proc/self/clear_refs").write_text("5")
        hwm0 = rss0
    except OSError:
        hwm0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    loss = _step(impl, t, z, temps)
    hwm = _rss_kib("VmHWM") or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return loss, max(0, hwm - (hwm0 or 0)) / 1024


def _measure(impl: str, cfg: dict, device: str) -> dict:
    if cfg["threads"]:
        torch.set_num_threads(cfg["threads"])
    temps = tuple(cfg["temperatures"])
    # Pay one-time costs (thread pools, lazy init, kernel compilation) before measuring memory.
    _step(impl, *_inputs({**cfg, "batch": 1, "tokens": 8}, device), temps)
    t, z = _inputs(cfg, device)
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        loss = _step(impl, t, z, temps)
        torch.cuda.synchronize()
        peak_mb = (torch.cuda.max_memory_allocated() - base) / 2**20
    else:
        loss, peak_mb = _cpu_peak_mb(impl, t, z, temps)
    for _ in range(cfg["warmup"]):
        _step(impl, t, z, temps)
    times = []
    for _ in range(cfg["repeats"]):
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        _step(impl, t, z, temps)
        if cuda:
            torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1e3)
    return {"loss": loss, "ms_median": statistics.median(times), "ms_min": min(times), "peak_mb": peak_mb}


def _measure_in_child(impl: str, cfg: dict, device: str) -> dict:
    with mp.get_context("spawn").Pool(1) as pool:
        return pool.apply(_measure, (impl, cfg, device))


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch", type=int, help="sets B [256 on CUDA, 32 on CPU]")
    p.add_argument("--tokens", type=int, help="vectors per set N [257 on CUDA, 65 on CPU]")
    p.add_argument("--dim", type=int, default=192, help="teacher-side dim Dt")
    p.add_argument("--dim-s", type=int, help="compressed-side dim Ds [= --dim]")
    p.add_argument("--temperatures", type=float, nargs="+", default=list(DEFAULT_TEMPERATURES))
    p.add_argument("--impls", nargs="+", help="implementations [plain lean, + fused on CUDA with triton]")
    p.add_argument("--repeats", type=int, help="timed steps [20 on CUDA, 3 on CPU]")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch's default)")
    p.add_argument("--out", default="bench_loss.json", help="JSON results file")
    args = p.parse_args(argv)
    cuda = args.device.startswith("cuda")
    cfg = {
        "batch": args.batch or (256 if cuda else 32),
        "tokens": args.tokens or (257 if cuda else 65),
        "dim": args.dim,
        "dim_s": args.dim_s or args.dim,
        "temperatures": args.temperatures,
        "repeats": args.repeats or (20 if cuda else 3),
        "warmup": args.warmup,
        "threads": args.threads,
    }
    impls = args.impls or (["plain", "lean"] + (["fused"] if cuda and triton_available() else []))
    results = {}
    for impl in impls:
        results[impl] = (
            _measure(impl, cfg, args.device) if cuda else _measure_in_child(impl, cfg, args.device)
        )
    ref = results.get("plain") or next(iter(results.values()))
    for r in results.values():
        r["time_vs_plain"] = r["ms_median"] / ref["ms_median"]
        r["memory_vs_plain"] = r["peak_mb"] / ref["peak_mb"] if ref["peak_mb"] > 0 else None
        r["loss_rel_diff_vs_plain"] = abs(r["loss"] - ref["loss"]) / max(abs(ref["loss"]), 1e-12)
    device_name = torch.cuda.get_device_name(args.device) if cuda else platform.processor() or "cpu"
    report = {
        "device": args.device,
        "device_name": device_name,
        "torch": torch.__version__,
        "config": cfg,
        "results": results,
    }
    Path(args.out).write_text(json.dumps(report, indent=2))
    b, n, nt = cfg["batch"], cfg["tokens"], len(cfg["temperatures"])
    print(f"similarity KL fwd+bwd on {device_name}: B={b} N={n} Dt={cfg['dim']} Ds={cfg['dim_s']} T={nt}")
    print(f"{'impl':<8}{'ms (median)':>12}{'ms (min)':>10}{'peak MB':>10}{'time/plain':>12}{'mem/plain':>11}")
    for impl, r in results.items():
        mem = f"{r['memory_vs_plain']:.2f}" if r["memory_vs_plain"] is not None else "-"
        print(
            f"{impl:<8}{r['ms_median']:>12.2f}{r['ms_min']:>10.2f}{r['peak_mb']:>10.1f}"
            f"{r['time_vs_plain']:>12.2f}{mem:>11}"
        )
    print(f"wrote {args.out}")
    return report


if __name__ == "__main__":
    main(sys.argv[1:])
