"""Checkpoint files: atomic pair, unwrapped names, weights_only state, torn-pair and version refusal."""

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
    raw = torch.load(tmp_path / "last.state.pt", weights_only=True)
    assert raw["format_version"] == ckpt.FORMAT_VERSION and raw["position"] == 3
    w, s = ckpt.load_checkpoint(tmp_path, "last")
    assert all(torch.equal(w[k], weights[k]) for k in weights)
    opt2 = torch.optim.AdamW(model.parameters())
    opt2.load_state_dict(s["optimizer"])
    assert ckpt.split_weights(w)["student"].keys() == model.state_dict().keys()
    ddp_like = torch.nn.Module()
    ddp_like._orig_mod = model
    assert ckpt.unwrap_module(ddp_like) is model


def test_torn_pair_and_unknown_version_are_refused(tmp_path):
    w = {"student.a": torch.ones(2)}
    ckpt.save_checkpoint(tmp_path, "last", w, {"step": 1})
    old_state = (tmp_path / "last.state.pt").read_bytes()
    ckpt.save_checkpoint(tmp_path, "last", {"student.a": torch.zeros(2)}, {"step": 2})
    (tmp_path / "last.state.pt").write_bytes(old_state)  # killed between the two renames
    with pytest.raises(ckpt.CheckpointError, match="torn"):
        ckpt.load_checkpoint(tmp_path, "last")
    ckpt.save_checkpoint(tmp_path, "v", w, {"step": 1})
    state = torch.load(tmp_path / "v.state.pt", weights_only=True)
    state["format_version"] = 99
    torch.save(state, tmp_path / "v.state.pt")
    with pytest.raises(ckpt.CheckpointError, match="format version 99"):
        ckpt.load_checkpoint(tmp_path, "v")


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
