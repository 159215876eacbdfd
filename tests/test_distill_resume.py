"""A distill run killed with SIGKILL and resumed ends with bitwise the same weights as an uninterrupted run."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import json  # noqa: E402
import signal  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

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
        return int(torch.load(out / "last.state.pt", weights_only=True)["step"])
    except (FileNotFoundError, RuntimeError, EOFError, KeyError):
        return -1


def test_sigkill_then_resume_gives_the_same_weights(tmp_path):
    url, _ = make_store(tmp_path, n=20, shard_size=7)
    kw = dict(epochs=2, save_every=1, val_fraction=0.2)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # float sums depend on the thread count: match the subprocesses
    try:
        ref = run_distill(tiny_cfg(url, tmp_path / "ref", **kw))
    finally:
        torch.set_num_threads(threads)
    steps = ref["steps"]
    assert steps >= 6

    out = tmp_path / "killed"
    cfg = to_dict(tiny_cfg(url, out, workers=1, **kw))
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.Popen([sys.executable, "-c", SCRIPT, json.dumps(cfg), "0.4"], env=env)
    try:
        deadline = time.time() + 120
        while _state_step(out) < 2 and time.time() < deadline and proc.poll() is None:
            time.sleep(0.05)
        assert proc.poll() is None, "the run finished before it could be killed"
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
    killed_at = _state_step(out)
    assert 2 <= killed_at < steps

    cfg["resume"] = True
    done = subprocess.run([sys.executable, "-c", SCRIPT, json.dumps(cfg), "0"], env=env, timeout=300)
    assert done.returncode == 0
    a, _ = ckpt.load_checkpoint(tmp_path / "ref", "last")
    b, state = ckpt.load_checkpoint(out, "last")
    assert state["step"] == steps and a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)  # bitwise
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["phase"] == "train"] == list(
        range(1, steps + 1)
    )  # no duplicate steps
    assert len([r for r in rows if r["phase"] == "val"]) == 2
