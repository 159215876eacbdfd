"""The device kit (issue 26): the wheels the GPU image lacks install into an empty --target and, on
the PYTHONPATH of a Python that holds only what the image holds, cospress imports and runs."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
KIT = REPO / "pipelines" / "gpu"
MISSING = ("zarr", "numcodecs", "webdataset", "faiss", "pytest")


def test_run_sh_refuses_without_wheels(tmp_path):
    env = {**os.environ, "WHEELS": str(tmp_path / "none"), "PYTHON": sys.executable}
    proc = subprocess.run(["bash", str(KIT / "run.sh"), str(tmp_path / "out")], env=env, capture_output=True,
                          text=True, timeout=60)  # fmt: skip
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "fetch_wheels.sh" in lines[0], proc.stderr


@pytest.fixture(scope="module")
def wheels(tmp_path_factory) -> Path:
    """Wheels for this Python: COSPRESS_KIT_WHEELS, else fetched (skipped without network)."""
    if os.environ.get("COSPRESS_KIT_WHEELS"):
        return Path(os.environ["COSPRESS_KIT_WHEELS"])
    dest = tmp_path_factory.mktemp("whl")
    pyver = f"{sys.version_info.major}.{sys.version_info.minor}"
    env = {**os.environ, "PYVER": pyver, "PIP": f"{sys.executable} -m pip"}
    proc = subprocess.run(["bash", str(KIT / "fetch_wheels.sh"), str(dest)], env=env, capture_output=True,
                          text=True, timeout=300)  # fmt: skip
    if proc.returncode != 0:
        pytest.skip(f"no kit wheels (set COSPRESS_KIT_WHEELS, or a network): {proc.stderr.strip()[-200:]}")
    return dest


@pytest.mark.slow
def test_kit_installs_and_runs_in_a_python_without_its_packages(tmp_path, wheels):
    total = sum(p.stat().st_size for p in wheels.glob("*.whl"))
    assert 0 < total <= 64 * 2**20
    py = subprocess.run([sys.executable, str(KIT / "image_python.py"), str(tmp_path / "image")],
                        check=True, capture_output=True, text=True).stdout.strip()  # fmt: skip
    for name in MISSING:  # the image Python has none of them
        assert subprocess.run([py, "-c", f"import {name}"], capture_output=True).returncode != 0, name
    site = tmp_path / "site"  # empty: the kit's own install command
    subprocess.run([py, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--target", str(site),
                    *map(str, sorted(wheels.glob("*.whl")))], check=True, capture_output=True, timeout=300)  # fmt: skip
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{site}", "HF_HUB_OFFLINE": "1"}
    smoke = (
        "import cospress, cospress.cli, zarr, numcodecs, webdataset, faiss; "
        f"assert zarr.__file__.startswith({str(site)!r}), zarr.__file__; print('ok', cospress.__file__)"
    )
    proc = subprocess.run([py, "-c", smoke], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.startswith("ok " + str(REPO)), proc.stderr
    # pytest from the kit runs a store test (zarr + numcodecs + the shard writer) in the image Python
    proc = subprocess.run([py, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_shardio.py",
                           "tests/test_parallel_writer.py::test_threads_and_processes_write_the_store_a_single_thread_writes"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert " passed" in proc.stdout
