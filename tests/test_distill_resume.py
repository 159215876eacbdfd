"""A distill run killed with SIGKILL (between steps, or inside a checkpoint save) and resumed ends with
bitwise the same weights as an uninterrupted run."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import json  # noqa: E402
import signal  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from cospress import checkpoint as ckpt  # noqa: E402
from cospress.config import to_dict  # noqa: E402
from cospress.distill import run_distill  # noqa: E402
from tests.test_distill import make_store, tiny_cfg  # noqa: E402

SCRIPT = """
import json, sys, time
import torch
torch.set_num_threads(2)  # the same as the in-process reference
from cospress.config import from_dict
from cospress.distill import DistillConfig, run_distill
cfg = from_dict(DistillConfig, json.loads(sys.argv[1]))
delay = float(sys.argv[2])
run_distill(cfg, progress=lambda done, total: time.sleep(delay))
"""


def _state_step(out: Path) -> int:
    try:
        return int(torch.load(ckpt.paths(out, "last")[1], weights_only=True)["step"])
    except (FileNotFoundError, RuntimeError, EOFError, KeyError, ckpt.CheckpointError):
        return -1


KW = dict(epochs=2, save_every=1, val_fraction=0.2)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """(store url, the uninterrupted run's folder, its steps)."""
    tmp = tmp_path_factory.mktemp("resume")
    url, _ = make_store(tmp, n=20, shard_size=7)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # float sums depend on the thread count: match the subprocesses
    try:
        ref = run_distill(tiny_cfg(url, tmp / "ref", **KW))
    finally:
        torch.set_num_threads(threads)
    assert ref["steps"] >= 6
    return url, tmp / "ref", ref["steps"]


def _env(**extra: str) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]), **extra}


def _resume_and_compare(cfg: dict, ref: Path, steps: int) -> None:
    cfg = {**cfg, "resume": True}
    done = subprocess.run([sys.executable, "-c", SCRIPT, json.dumps(cfg), "0"], env=_env(), timeout=300)
    assert done.returncode == 0
    out = Path(cfg["out"])
    a, _ = ckpt.load_checkpoint(ref, "last")
    b, state = ckpt.load_checkpoint(out, "last")
    assert state["step"] == steps and a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)  # bitwise
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["phase"] == "train"] == list(
        range(1, steps + 1)
    )  # no duplicate steps
    assert len([r for r in rows if r["phase"] == "val"]) == 2


def kill_after_two_steps(cfg: dict) -> int:
    """Run ``cfg`` in a subprocess (slowed down between steps), SIGKILL it once ``last`` holds step 2 or
    more; returns the step of the checkpoint left behind."""
    out = Path(cfg["out"])
    proc = subprocess.Popen([sys.executable, "-c", SCRIPT, json.dumps(cfg), "0.4"], env=_env())
    try:
        deadline = time.time() + 120
        while _state_step(out) < 2 and time.time() < deadline and proc.poll() is None:
            time.sleep(0.05)
        assert proc.poll() is None, "the run finished before it could be killed"
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
    return _state_step(out)


def test_sigkill_then_resume_gives_the_same_weights(reference, tmp_path):
    url, ref, steps = reference
    cfg = to_dict(tiny_cfg(url, tmp_path / "killed", workers=1, **KW))
    assert 2 <= kill_after_two_steps(cfg) < steps
    _resume_and_compare(cfg, ref, steps)


# saves of this run, in order: steps 1, 2, 3 (--save-every 1), best + last at the end of epoch 0, ...
@pytest.mark.parametrize("hook", ["weights:2", "state:4", "pointer:5", "weights:7"])
def test_sigkill_inside_a_save_then_resume_gives_the_same_weights(reference, tmp_path, hook):
    url, ref, steps = reference
    out = tmp_path / "killed"
    cfg = to_dict(tiny_cfg(url, out, workers=0, **KW))
    env = _env(**{ckpt.KILL_HOOK_ENV: hook})
    proc = subprocess.run([sys.executable, "-c", SCRIPT, json.dumps(cfg), "0"], env=env, timeout=300)
    assert proc.returncode == -signal.SIGKILL  # killed inside the save, at the hook
    assert ckpt.exists(out, "last")  # a complete checkpoint is always there to resume from
    _resume_and_compare(cfg, ref, steps)


def _rank_pids(marker: str, rank: str) -> list[int]:
    """The processes of a torchrun group (marked by ``marker``) that are rank ``rank`` of its first attempt."""
    want = {
        f"COSPRESS_TEST_GROUP={marker}".encode(),
        f"RANK={rank}".encode(),
        b"TORCHELASTIC_RESTART_COUNT=0",
    }
    pids = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and want <= set((entry / "environ").read_bytes().split(b"\0")):
                pids.append(int(entry.name))
        except OSError:
            pass
    return pids


def test_torchrun_restarts_a_killed_rank_and_distill_resumes(reference, tmp_path):
    """Stage 2 under `torchrun --max-restarts 3` with --resume from the first launch: rank 1 killed once
    `last` holds step 2; torchrun restarts the group, which meets at once (one restart: each attempt
    has its own store prefix, `runtime._attempt_store`), resumes from `last` and trains every step once."""
    import tempfile
    import uuid

    from tests.helpers import _kill_marked, cli_env, free_port, torchrun_cli

    url, _, _ = reference
    out = tmp_path / "run"
    rdzv = (
        "--nnodes",
        "1",
        "--max-restarts",
        "3",
        "--rdzv-backend",
        "c10d",
        "--rdzv-endpoint",
        f"127.0.0.1:{free_port()}",
    )
    cmd = torchrun_cli(
        "distill", "--store", url, "--out", str(out), "--epochs", "30", "--save-every", "1", "--val-fraction", "0.2",
        "--batch-size", "12", "--views-per-image", "3", "--workers", "0", "--precision", "fp32",
        "--warmup-epochs", "0.5", "--temperatures", "0.02,0.1", "--student", "test_vit", "--student-size", "32",
        "--resume", "--no-progress", extra=rdzv,
    )  # fmt: skip
    marker = uuid.uuid4().hex
    env = {**cli_env(), "COSPRESS_TEST_GROUP": marker, "LOGLEVEL": "INFO", "COSPRESS_DIST_TIMEOUT": "60"}
    with tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(
            cmd, env=env, stdout=subprocess.DEVNULL, stderr=err, text=True, start_new_session=True
        )
        try:
            deadline = time.time() + 180
            while _state_step(out) < 2 and time.time() < deadline and proc.poll() is None:
                time.sleep(0.05)
            victims = _rank_pids(marker, "1")
            assert proc.poll() is None and victims, "the run ended before rank 1 could be killed"
            for pid in victims:
                os.kill(pid, signal.SIGKILL)
            proc.wait(timeout=300)
        finally:
            _kill_marked(marker)
            proc.wait()
        err.seek(0)
        stderr = err.read()
    assert proc.returncode == 0, stderr[-3000:]
    assert "restart_count=1" in stderr and "restart_count=2" not in stderr, stderr[-3000:]
    _, state = ckpt.load_checkpoint(out, "last")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["phase"] == "train"] == list(range(1, state["step"] + 1))
    assert len([r for r in rows if r["phase"] == "val"]) == 30
