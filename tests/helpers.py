"""Builders shared by the tests: tiny synthetic image folders, tiny teacher weight files, CLI runs."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]


def make_image_folder(
    root: Path, classes: int = 3, per_class: int = 6, seed: int = 0, size_range: tuple[int, int] = (36, 64)
) -> Path:
    """Class folders of random-sized PNG/JPEG images whose colour depends on the class."""
    rng = np.random.default_rng(seed)
    for c in range(classes):
        d = root / f"class_{c}"
        d.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            w, h = (int(v) for v in rng.integers(*size_range, size=2))
            base = np.zeros((h, w, 3), np.float32)
            base[..., c % 3] = 160
            noise = rng.normal(0, 40, size=(h, w, 3))
            arr = np.clip(base + noise, 0, 255).astype(np.uint8)
            ext = "png" if i % 2 == 0 else "jpg"
            Image.fromarray(arr).save(d / f"img_{i:03d}.{ext}")
    return root


def make_tiny_teacher_weights(path: Path, name: str = "test_vit", seed: int = 0, **kwargs) -> Path:
    """A random-init timm model saved as safetensors: a real teacher file that needs no hub."""
    import timm
    import torch
    from safetensors.torch import save_file

    torch.manual_seed(seed)
    model = timm.create_model(name, pretrained=False, num_classes=0, **kwargs)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


def free_port() -> int:
    """A TCP port nothing listens on now (for torchrun's store: a fixed port can collide with a
    straggler of an earlier run)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun_cli(*args: str, extra: tuple[str, ...] = ()) -> list[str]:
    """The command line of `torchrun --nproc-per-node 2 -m cospress ARGS` (gloo ranks on this machine,
    a free port); ``extra``: more torchrun flags (they replace ``--master-port``)."""
    where = list(extra) or ["--master-port", str(free_port())]
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        "2",
        *where,
        "-m",
        "cospress",
        *args,
    ]


def run_group(cmd: list[str], env: dict[str, str], timeout: float = 300) -> subprocess.CompletedProcess:
    """Run a torchrun command and every process it starts to completion or to ``timeout``.

    Its output goes to files, not pipes: a rank left behind by an agent that died would hold a pipe
    open and block the reader. Each process carries a marker in its environment; whatever still runs
    with it at the end (a rank in a session of its own) is killed. Past ``timeout`` the test fails
    with the tail of what the command printed."""
    import tempfile
    import uuid

    marker = uuid.uuid4().hex
    env = {**env, "COSPRESS_TEST_GROUP": marker, "PYTHONFAULTHANDLER": "1"}  # SIGABRT: stacks to stderr
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=err, text=True, start_new_session=True)
        timed_out = False
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
            _kill_marked(marker, signal.SIGABRT)  # every process prints where it waits, then ends
            time.sleep(3)
        finally:
            _kill_marked(marker)
            proc.wait()
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(), err.read()
    if timed_out:
        pytest.fail(f"torchrun ran past {timeout:.0f} s; its stderr ended with:\n{stderr[-6000:]}")
    return subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)


def _kill_marked(marker: str, sig: int = signal.SIGKILL) -> None:
    """Send ``sig`` to every process whose environment holds ``COSPRESS_TEST_GROUP=marker``."""
    want = f"COSPRESS_TEST_GROUP={marker}".encode()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if want in (entry / "environ").read_bytes().split(b"\0"):
                os.kill(int(entry.name), sig)
        except OSError:
            pass


def two_ranks_start_like_one(one: Any, one_out: Path, names: tuple[str, ...], out: Path) -> None:
    """Run distill with the settings ``names`` of the config ``one`` (already run into ``one_out``) as
    2 gloo ranks into ``out``; the first training row's loss terms must equal the one-rank run's."""
    import json

    from cospress.config import to_dict

    flags = [f"--{k.replace('_', '-')}={v}" for k, v in to_dict(one).items() if k in names]
    cmd = torchrun_cli("distill", *flags, "--out", str(out), "--temperatures", "0.02,0.1", "--no-progress")
    proc = run_group(cmd, cli_env())
    assert proc.returncode == 0, proc.stderr[-3000:]

    def first(run: Path) -> dict:
        rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        return next(r for r in rows if r["phase"] == "train")

    a, b = first(one_out), first(out)
    for k in ("loss/local", "loss/global", "loss/tokens", "loss/cls"):
        assert abs(a[k] - b[k]) < 1e-4 * max(1.0, abs(a[k])), k


def cli_env() -> dict[str, str]:
    env = dict(os.environ)
    env["HF_HUB_OFFLINE"] = "1"
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def run_cli(
    *args: str, check: bool = True, timeout: float = 300, cwd: Path | None = None
) -> subprocess.CompletedProcess:
    """Run ``python -m cospress ARGS`` in a subprocess (the real CLI, as a user would)."""
    cmd = [sys.executable, "-m", "cospress", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=cli_env(), cwd=cwd)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def extract_tiny_store(images: Path, weights: Path, out: Path, **settings) -> Path:
    """Stage 1 with the tiny test_vit teacher at 32 px: 4 views, shards of 5 rows, on the CPU;
    ``settings`` are further ExtractConfig fields (``append=True``)."""
    from cospress.extract import ExtractConfig, run_extract

    cfg = ExtractConfig(
        data=f"folder:{images}", teacher="test_vit", weights=str(weights), image_size=32, views=4,
        shard_size=5, batch_size=16, workers=0, precision="fp32", device="cpu", out=str(out), **settings,
    )  # fmt: skip
    run_extract(cfg)
    return out


def distill_train_losses(store: str, out: Path, images: Path, cache: str | None) -> list[dict]:
    """One epoch of stage 2 from ``store`` (a tiny test_vit student); the train lines of metrics.jsonl."""
    import json

    from cospress.distill import DistillConfig, run_distill

    cfg = DistillConfig(
        store=store, out=str(out), data=f"folder:{images}", cache_dir=cache, student="test_vit",
        student_size=32, epochs=1, batch_size=12, views_per_image=3, workers=0, precision="fp32",
        device="cpu", val_fraction=0.25, warmup_epochs=0.5, temperatures=[0.02, 0.1], seed=0,
    )  # fmt: skip
    run_distill(cfg)
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return [x for x in lines if x.get("phase") == "train"]


def assert_same_losses(a: list[dict], b: list[dict]) -> None:
    """Two runs' train lines give the same loss terms step by step."""
    import pytest

    assert len(a) == len(b) >= 2
    for x, y in zip(a, b, strict=True):
        for key in ("loss/local", "loss/global", "loss/tokens", "loss/cls", "loss/total"):
            assert x[key] == pytest.approx(y[key], rel=1e-6, abs=1e-9), (x["step"], key)


def error_line(proc: subprocess.CompletedProcess) -> str:
    """The one ``error:`` line of a CLI run that failed with exit code 2 (and no traceback)."""
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 2 and len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    return lines[0]
