"""Stage 2 set-up: R's default, checks before the progress bar, --data for URL stores, per-rank seeds."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

from cospress.cli import app  # noqa: E402
from cospress.config import load_config  # noqa: E402
from cospress.distill import DistillConfig, run_distill  # noqa: E402
from cospress.distill.run import build_model, open_train_data, prepare  # noqa: E402
from cospress.errors import ConfigError  # noqa: E402
from tests.test_distill import make_store, tiny_cfg  # noqa: E402


@pytest.fixture(scope="module")
def k2_store(tmp_path_factory):
    return make_store(tmp_path_factory.mktemp("k2"), n=16, k=2, shard_size=8)


def test_views_per_image_defaults_to_min_3_and_the_stored_views(k2_store, tmp_path, caplog):
    url, _ = k2_store
    assert load_config(DistillConfig, None, {}).views_per_image is None
    with caplog.at_level("INFO"):
        summary = run_distill(tiny_cfg(url, tmp_path / "run", views_per_image=None, epochs=1, batch_size=8))
    assert "min(3, the store's 2 stored views)" in caplog.text
    assert summary["steps"] > 0
    assert "views_per_image: 2" in (tmp_path / "run" / "config.yaml").read_text()
    assert prepare(tiny_cfg(url, tmp_path / "x", views_per_image=None, batch_size=8)).views_per_image == 2
    assert prepare(tiny_cfg(url, tmp_path / "x", views_per_image=1, batch_size=8)).views_per_image == 1


def test_a_bad_views_per_image_fails_before_the_progress_bar(k2_store, tmp_path):
    url, _ = k2_store
    args = ["distill", "--store", url, "--out", str(tmp_path / "run"), "--student", "test_vit"]
    res = CliRunner().invoke(app, [*args, "--student-size", "32", "--views-per-image", "3", "--progress"])
    assert res.exit_code == 2
    assert "views_per_image=3 must be between 1 and the store's 2 stored views" in res.output
    assert "distill (cospress)" not in res.output  # no progress bar was started
    assert not (tmp_path / "run").exists()  # nothing written either


def test_a_store_read_from_a_url_needs_data(k2_store, tmp_path):
    url, spec = k2_store
    cfg = tiny_cfg(f"file://{url}", tmp_path / "run", views_per_image=2, batch_size=8, epochs=1)
    with pytest.raises(ConfigError, match="pass --data"):
        run_distill(cfg)
    assert not (tmp_path / "run").exists()
    cfg.data = spec  # with --data the URL store trains
    assert run_distill(cfg)["steps"] > 0


def test_ranks_share_the_init_and_then_draw_differently(k2_store, tmp_path):
    url, _ = k2_store
    cfg = tiny_cfg(url, tmp_path / "run", views_per_image=2, batch_size=8)
    data = open_train_data(cfg, 1)
    cpu = torch.device("cpu")
    m0 = build_model(cfg, data, cpu, rank=0)
    d0 = torch.rand(8)
    m1 = build_model(cfg, data, cpu, rank=1)
    d1 = torch.rand(8)
    w0, w1 = m0.state_dict(), m1.state_dict()
    assert all(torch.equal(w0[k], w1[k]) for k in w0)  # the same init on every rank
    assert not torch.equal(d0, d1)  # then seed + rank: drop-path masks differ per rank
    build_model(cfg, data, cpu, rank=0)
    assert torch.equal(torch.rand(8), d0)  # and each rank's stream is reproducible


def test_the_baseline_head_is_layernorm_then_linear(k2_store):
    from cospress.distill.model import DistillModel
    from cospress.models.students import build_student

    head = DistillModel(build_student("test_vit", 32), "cosine", dt=16).head
    assert isinstance(head[0], torch.nn.LayerNorm) and isinstance(head[1], torch.nn.Linear)
    assert head[1].out_features == 16
