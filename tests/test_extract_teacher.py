"""Stage 1 teacher loop: batch k's features come back (pinned, double-buffered on CUDA) and leave
the teacher, to be written into their shard's rows, once batch k+1's teacher forward is queued."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from cospress.data.sources import open_source  # noqa: E402
from cospress.data.views import PARAM_NAMES  # noqa: E402
from cospress.extract.config import ExtractConfig  # noqa: E402
from cospress.extract.reader import ViewDataset, shard_batches  # noqa: E402
from cospress.extract.teacher import TeacherPass, load_teacher, run_teacher  # noqa: E402
from cospress.extract.writer import ShardBuffer  # noqa: E402
from cospress.store import StoreLayout  # noqa: E402
from tests.helpers import make_image_folder, make_tiny_teacher_weights  # noqa: E402

DEVICES = [
    "cpu",
    pytest.param(
        "cuda",
        marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (pinned copies)"),
    ),
]


@pytest.mark.parametrize("device", DEVICES)
def test_batch_k_is_written_after_batch_k_plus_1_is_queued_with_its_own_features(tmp_path: Path, device: str):
    dev = torch.device(device)
    images = make_image_folder(tmp_path / "images", classes=2, per_class=5)
    weights = make_tiny_teacher_weights(tmp_path / "w.safetensors", img_size=32)
    cfg = ExtractConfig(
        data=f"folder:{images}", teacher="test_vit", weights=str(weights), image_size=32, views=2,
        shard_size=4, batch_size=6, workers=0, precision="fp32", device=device, out=str(tmp_path / "s"),
    )  # fmt: skip
    source = open_source(cfg.data)
    teacher = load_teacher(cfg, dev)
    layout = StoreLayout(
        num_rows=len(source), shard_size=cfg.shard_size, stored_views=cfg.stored_views, dim=teacher.dim,
        num_tokens=teacher.num_tokens, num_params=len(PARAM_NAMES), tokens=True,
    )  # fmt: skip
    ds = ViewDataset(source, cfg.policy(), cfg.seed, cfg.views, False, 32, cfg.max_pixels)
    shards = list(range(-(-len(source) // cfg.shard_size)))
    rows = list(shard_batches(shards, layout.shard_rows, cfg.batch_size // cfg.stored_views))
    batches = [[ds[r] for r in b] for b in rows]
    assert len(batches) >= 4  # several batches, a slot of the double buffer is reused

    events: list[str] = []
    teacher.register_forward_pre_hook(lambda *_: events.append("forward"))
    buffers: dict[int, ShardBuffer] = {}  # the writer's part (ShardSink.add), without the threads
    res = TeacherPass()
    for items, cls, tok in run_teacher(batches, teacher, cfg.tokens, dev, None, res):
        shard = items[0]["row"] // cfg.shard_size
        events.append(f"fill{shard}")
        if shard not in buffers:
            buffers[shard] = ShardBuffer(layout, shard, source.keys(), [0] * len(source))
        assert buffers[shard].fill(items, cls, tok) == 0
        res.done += len(items)
    assert res.done == len(source) and res.teacher > 0
    shard_of = [f"fill{b[0] // cfg.shard_size}" for b in rows]
    want = ["forward", "forward", shard_of[0]]
    for k in range(2, len(rows)):
        want += ["forward", shard_of[k - 1]]
    assert events[: len(want)] == want and events[len(want) :] == [shard_of[-1]]

    # every row holds its own batch's features, bitwise (a slot reused too early would break this)
    with torch.inference_mode():
        for batch in batches:
            x = torch.cat([it["images"] for it in batch]).to(dev)
            f = teacher(x)
            cls = f.cls.to(torch.float16).reshape(len(batch), cfg.stored_views, -1).cpu().numpy()
            tok = f.tokens.to(torch.float16).reshape(len(batch), cfg.stored_views, teacher.num_tokens, -1)
            tok = tok.cpu().numpy()
            for g, it in enumerate(batch):
                buf = buffers[it["row"] // cfg.shard_size]
                i = it["row"] - buf.start
                assert np.array_equal(buf.cls[i], cls[g]) and np.array_equal(buf.tokens[i], tok[g])
                assert np.array_equal(buf.views[i], it["params"]) and buf.valid[i] == 1


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (pinned copies)")
def test_host_copies_are_pinned_asynchronous_and_double_buffered_on_cuda():
    from cospress.extract.teacher import HostCopies

    copies = HostCopies(torch.device("cuda"))
    xs = [torch.randn(64, 257, 384, device="cuda").half() for _ in range(3)]
    h0 = copies.start([xs[0], None])
    torch.cuda._sleep(1 << 28)  # the current stream is busy: copy 1 must wait for it
    h1 = copies.start([xs[1] * 2, None])
    assert not h1[2].query()  # start returned before its copy ran
    a0, none = copies.wait(h0)
    assert none is None and np.array_equal(a0, xs[0].cpu().numpy())
    h2 = copies.start([xs[2], None])  # slot 0 again, after batch 0 was read
    a1, _ = copies.wait(h1)
    a2, _ = copies.wait(h2)
    assert np.array_equal(a1, (xs[1] * 2).cpu().numpy()) and np.array_equal(a2, xs[2].cpu().numpy())
    assert all(t.is_pinned() for slot in copies.slots for t in slot.values())
    assert h0[0][0].data_ptr() == h2[0][0].data_ptr() != h1[0][0].data_ptr()
