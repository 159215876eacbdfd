"""One rank and two gloo ranks give the same CosPress loss and gradients on the same global batch."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402

from cospress import checkpoint as ckpt  # noqa: E402
from cospress import runtime
from cospress.distill.model import DistillModel, compute_losses  # noqa: E402
from cospress.models.features import Features  # noqa: E402

W = dict.fromkeys(("local", "global", "tokens", "cls"), 1.0)
TEMPS = [0.02, 0.1]


def _batch():
    g = torch.Generator().manual_seed(5)
    images = torch.randint(0, 255, (12, 3, 32, 32), dtype=torch.uint8, generator=g)
    return images, Features(cls=torch.randn(12, 16, generator=g), tokens=torch.randn(12, 4, 16, generator=g))


def _model():
    from cospress.models.students import build_student

    torch.manual_seed(0)
    return DistillModel(build_student("test_vit", 32), "cospress", dt=16)


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _worker(rank, world, init, out):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        model = _model()
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        images, t = _batch()
        n = 12 // world
        sl = slice(rank * n, (rank + 1) * n)
        terms = compute_losses(
            ddp, images[sl], Features(t.cls[sl], t.tokens[sl]), method="cospress", temperatures=TEMPS, weights=W,
            use_tokens=True,
        )  # fmt: skip
        terms["total"].backward()
        loss = {k: float(runtime.all_reduce_mean(v)) for k, v in terms.items()}
        if rank == 0:
            torch.save({"loss": loss, "grads": _grads(model)}, out)
        # leave together: a rank destroying the gloo group while its peer still works can abort (SIGABRT)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_two_ranks_match_one_rank(tmp_path):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _check_two_ranks(tmp_path)
    finally:
        torch.set_num_threads(threads)


def _check_two_ranks(tmp_path):
    model = _model()
    images, t = _batch()
    terms = compute_losses(
        model, images, t, method="cospress", temperatures=TEMPS, weights=W, use_tokens=True
    )
    terms["total"].backward()
    ref = _grads(model)
    terms = {k: float(v.detach()) for k, v in terms.items()}

    out = tmp_path / "rank0.pt"
    mp.spawn(_worker, args=(2, f"file://{tmp_path / 'pg'}", str(out)), nprocs=2, join=True)
    got = torch.load(out, weights_only=True)
    for k, v in terms.items():
        assert abs(got["loss"][k] - v) < 1e-5 * max(1.0, abs(v)), k
    assert got["grads"].keys() == ref.keys()
    assert any(k.startswith("compressor.") for k in ref) and any(k.startswith("student.") for k in ref)
    for k in ref:
        assert torch.allclose(got["grads"][k], ref[k], rtol=1e-4, atol=1e-6), k


def test_torchrun_two_ranks_through_the_cli(tmp_path):
    """`torchrun --nproc-per-node 2 -m cospress distill ...` trains on CPU (gloo) and writes one run."""
    import json
    import subprocess

    from tests.helpers import cli_env, torchrun_cli
    from tests.test_distill import TINY_STUDENT, make_store

    url, _ = make_store(tmp_path, n=24, shard_size=8)
    out = tmp_path / "run"
    cmd = torchrun_cli(
        "distill",
        "--store",
        url,
        "--out",
        str(out),
        "--epochs",
        "1",
        "--batch-size",
        "12",
        "--views-per-image",
        "3",
        "--workers",
        "0",
        "--precision",
        "fp32",
        "--val-fraction",
        "0.25",
        "--student",
        TINY_STUDENT["student"],
        "--student-size",
        str(TINY_STUDENT["student_size"]),
        "--no-progress",
    )
    proc = subprocess.run(cmd, capture_output=True, text=True, env=cli_env(), timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if r.get("phase") == "train"]
    steps = [r["step"] for r in train]
    assert steps and steps == list(range(steps[0], steps[0] + len(steps)))  # rank 0 alone writes metrics
    assert ckpt.exists(out, "last")
