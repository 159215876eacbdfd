"""Checkpoint files: generations committed by a pointer, unwrapped names, weights_only state, a kill
inside a save, the old layout, torn-pair and version refusal."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cospress import checkpoint as ckpt


def test_round_trip_unwrapped_names_and_weights_only(tmp_path):
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.LayerNorm(3))
    wrapped = {f"module._orig_mod.{k}": v for k, v in model.state_dict().items()}
    weights = ckpt.clean_state_dict(wrapped, "student.")
    assert set(weights) == {"student.0.weight", "student.0.bias", "student.1.weight", "student.1.bias"}
    opt = torch.optim.AdamW(model.parameters())
    model(torch.randn(2, 4)).sum().backward()
    opt.step()
    state = {"step": 7, "epoch": 1, "position": 3, "optimizer": opt.state_dict(), "rng": ckpt.rng_state(),
             "config": {"lr": 5e-4, "temperatures": [0.01, 0.1]}}  # fmt: skip
    ckpt.save_checkpoint(tmp_path, "last", weights, state)
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    raw = torch.load(ckpt.paths(tmp_path, "last")[1], weights_only=True)
    assert raw["format_version"] == ckpt.FORMAT_VERSION and raw["position"] == 3
    w, s = ckpt.load_checkpoint(tmp_path, "last")
    assert all(torch.equal(w[k], weights[k]) for k in weights)
    opt2 = torch.optim.AdamW(model.parameters())
    opt2.load_state_dict(s["optimizer"])
    assert ckpt.split_weights(w)["student"].keys() == model.state_dict().keys()


def test_old_layout_is_read_and_a_torn_old_pair_and_unknown_version_are_refused(tmp_path):
    w = {"student.a": torch.ones(2)}
    # a run folder written before generations: NAME.safetensors + NAME.state.pt, no pointer
    ckpt.save_weights(tmp_path / "last.safetensors", w, {"format_version": "1", "step": "1", "tag": "t1"})
    ckpt.save_state(tmp_path / "last.state.pt", {"step": 1, "format_version": 1, "tag": "t1"})
    assert ckpt.exists(tmp_path, "last") and ckpt.paths(tmp_path, "last")[0].name == "last.safetensors"
    weights, state = ckpt.load_checkpoint(tmp_path, "last")
    assert torch.equal(weights["student.a"], w["student.a"]) and state["step"] == 1
    ckpt.save_state(tmp_path / "last.state.pt", {"step": 0, "format_version": 1, "tag": "t0"})  # torn
    with pytest.raises(ckpt.CheckpointError, match="torn"):
        ckpt.load_checkpoint(tmp_path, "last")
    # the first save in the new layout replaces the old pair
    ckpt.save_checkpoint(tmp_path, "last", {"student.a": torch.zeros(2)}, {"step": 2})
    assert not (tmp_path / "last.safetensors").exists() and not (tmp_path / "last.state.pt").exists()
    assert ckpt.load_checkpoint(tmp_path, "last")[1]["step"] == 2
    ckpt.save_checkpoint(tmp_path, "v", w, {"step": 1})
    spath = ckpt.paths(tmp_path, "v")[1]
    state = torch.load(spath, weights_only=True)
    state["format_version"] = 99
    torch.save(state, spath)
    with pytest.raises(ckpt.CheckpointError, match="format version 99"):
        ckpt.load_checkpoint(tmp_path, "v")


def test_generations_one_committed_pair_per_name(tmp_path):
    for step in (1, 2, 3):
        ckpt.save_checkpoint(tmp_path, "last", {"student.a": torch.full((2,), float(step))}, {"step": step})
    ckpt.save_checkpoint(tmp_path, "best", {"student.a": torch.ones(2)}, {"step": 2})
    names = sorted(p.name for p in tmp_path.iterdir())
    assert len(names) == 6 and {"last.json", "best.json"} <= set(names)  # 2 pointers + 2 pairs
    assert ckpt.load_checkpoint(tmp_path, "last")[1]["step"] == 3
    assert ckpt.load_checkpoint(tmp_path, "best")[1]["step"] == 2


_SAVE_TWICE = """
import sys, torch
from cospress import checkpoint as ckpt
for step in (1, 2):
    ckpt.save_checkpoint(sys.argv[1], "last", {"student.a": torch.full((3,), float(step))}, {"step": step})
"""


@pytest.mark.parametrize("point,step", [("weights", 1), ("state", 1), ("pointer", 2)])
def test_a_kill_inside_a_save_keeps_the_last_complete_checkpoint(tmp_path, point, step):
    env = {**os.environ, ckpt.KILL_HOOK_ENV: f"{point}:2", "PYTHONPATH": str(Path(__file__).parents[1])}
    proc = subprocess.run([sys.executable, "-c", _SAVE_TWICE, str(tmp_path)], env=env, timeout=120)
    assert proc.returncode == -9  # killed by the hook, inside the second save
    weights, state = ckpt.load_checkpoint(tmp_path, "last")
    assert state["step"] == step and torch.equal(weights["student.a"], torch.full((3,), float(step)))
    ckpt.save_checkpoint(tmp_path, "last", {"student.a": torch.zeros(3)}, {"step": 3})
    assert len(list(tmp_path.iterdir())) == 3  # the next save drops the leftovers of the killed one


def test_atomic_write_keeps_the_old_file_and_no_temp_file_on_error(tmp_path):
    from cospress.utils import atomic_write

    ckpt.save_state(tmp_path / "s.pt", {"step": 1})

    def fail(tmp):
        tmp.write_bytes(b"half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(tmp_path / "s.pt", fail)
    assert torch.load(tmp_path / "s.pt", weights_only=True) == {"step": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["s.pt"]
