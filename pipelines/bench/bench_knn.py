"""Benchmark kNN search: FAISS IndexFlatIP vs torch matmul + topk, side by side in one run.

    python pipelines/bench/bench_knn.py --bank 100000 --queries 10000 --dim 384 --k 20 --out bench_knn.json

Both search the same random L2-normalised bank; the script checks they agree on the neighbours and
prints the time ratio. faiss is imported as cospress imports it (`runtime.import_faiss`: its bundled
OpenBLAS set to this CPU's kernels); run it with COSPRESS_FAISS_CORETYPE=0 to time faiss with
OpenBLAS's own detection instead. Use --device cuda to time torch on a GPU (FAISS uses a GPU when it sees one).
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import numpy as np
import torch

from cospress.evaluate.knn import build_index, faiss, l2_normalize, search
from cospress.runtime import cpu_flags, openblas_coretype
from cospress.utils import atomic_write_json


def torch_search(
    bank: torch.Tensor, queries: torch.Tensor, k: int, chunk: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact top-k by inner product with matmul + topk, chunked over the queries."""
    sims, idx = [], []
    for s in range(0, len(queries), chunk):
        v, i = (queries[s : s + chunk] @ bank.T).topk(k, dim=1)
        sims.append(v)
        idx.append(i)
    return torch.cat(sims), torch.cat(idx)


def timed(fn, repeats: int, sync=lambda: None) -> tuple[float, object]:
    """Best wall time of `repeats` runs (after one warm-up) and the last result."""
    out = fn()
    sync()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        sync()
        best = min(best, time.perf_counter() - start)
    return best, out


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bank", type=int, default=100_000)
    p.add_argument("--queries", type=int, default=10_000)
    p.add_argument("--dim", type=int, default=384)
    p.add_argument("--k", type=int, default=20)
    p.add_argument("--chunk", type=int, default=8192, help="queries per search call (both methods)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="cpu", help="device for the torch search")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="bench_knn.json")
    args = p.parse_args(argv)

    rng = np.random.default_rng(args.seed)
    bank = l2_normalize(rng.standard_normal((args.bank, args.dim), dtype=np.float32))
    queries = l2_normalize(rng.standard_normal((args.queries, args.dim), dtype=np.float32))

    start = time.perf_counter()
    index = build_index(bank, kind="flat")
    faiss_build = time.perf_counter() - start
    faiss_s, res = timed(lambda: search(index, queries, args.k, chunk=args.chunk), args.repeats)

    device = torch.device(args.device)
    tb, tq = torch.from_numpy(bank).to(device), torch.from_numpy(queries).to(device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    torch_s, (t_sims, t_idx) = timed(lambda: torch_search(tb, tq, args.k, args.chunk), args.repeats, sync)

    t_idx = t_idx.cpu().numpy()
    agree = float(np.mean([len(np.intersect1d(a, b)) / args.k for a, b in zip(res.idx, t_idx, strict=True)]))
    sim_err = float(np.abs(res.sims - t_sims.cpu().numpy()).max())
    result = {
        "bank": args.bank,
        "queries": args.queries,
        "dim": args.dim,
        "k": args.k,
        "faiss_seconds": faiss_s,
        "faiss_build_seconds": faiss_build,
        "faiss_gpus": faiss.get_num_gpus(),
        "torch_seconds": torch_s,
        "torch_device": str(device),
        "torch_over_faiss": torch_s / faiss_s,
        "faiss_queries_per_s": args.queries / faiss_s,
        "torch_queries_per_s": args.queries / torch_s,
        "neighbour_agreement": agree,
        "max_similarity_diff": sim_err,
        "threads": torch.get_num_threads(),
        "faiss_threads": faiss.omp_get_max_threads(),
        "machine": platform.processor() or platform.machine(),
        "versions": {"faiss": faiss.__version__, "torch": torch.__version__},
        "openblas_coretype": openblas_coretype(cpu_flags())
        if os.environ.get("COSPRESS_FAISS_CORETYPE") != "0"
        else None,
    }
    print(
        f"bank {args.bank} x {args.dim}, {args.queries} queries, k={args.k}: "
        f"faiss {faiss_s:.3f} s, torch ({device}) {torch_s:.3f} s, torch/faiss = {torch_s / faiss_s:.2f}x, "
        f"neighbour agreement {agree:.4f}"
    )
    atomic_write_json(args.out, result)
    return result


if __name__ == "__main__":
    main()
