"""pipelines/bench/gpu.sh and bench_gpu.py fail fast, with one clear line, where they cannot run."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


def test_gpu_sh_refuses_to_run_without_the_venv(tmp_path):
    bench = tmp_path / "pipelines" / "bench"
    bench.mkdir(parents=True)
    shutil.copy(REPO / "pipelines" / "bench" / "gpu.sh", bench / "gpu.sh")
    env = {k: v for k, v in os.environ.items() if k != "PYTHON"}
    proc = subprocess.run(
        ["bash", str(bench / "gpu.sh")], env=env, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and ".venv" in lines[0] and "PYTHON=" in lines[0], proc.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the failure on a machine without CUDA")
def test_bench_gpu_preflight_fails_fast_with_one_line(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO / "pipelines" / "bench" / "bench_gpu.py"),
            "--preflight",
            "--out",
            str(tmp_path),
        ],
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode != 0
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("bench_gpu: pre-flight failed: no CUDA device visible to torch"), proc.stderr
    assert "built for CUDA" in last and "driver" in last
    assert "Traceback" not in proc.stderr
