"""Stage 2 prefetch: batch k+1 is prepared in a thread while batch k trains, in order, with the same results."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import threading  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from cospress import checkpoint as ckpt  # noqa: E402
from cospress.distill import prefetch as pf  # noqa: E402
from cospress.errors import BadImageError  # noqa: E402


def _batches(n: int) -> list[dict]:
    return [
        {"step": i, "images": torch.full((2, 3, 4, 4), i, dtype=torch.uint8), "cls": None} for i in range(n)
    ]


def _threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name == "cospress-prefetch"]


def test_prefetch_prepares_the_next_batch_while_the_current_one_trains():
    called: dict[int, str] = {}
    second = threading.Event()

    def prepare(batch):
        called[batch["step"]] = threading.current_thread().name
        if batch["step"] == 1:
            second.set()
        return pf.Ready(batch, pf.device_images(batch, 4, torch.device("cpu")), None)

    it = pf.prefetch(_batches(4), prepare, torch.device("cpu"))
    first = next(it)
    # the loop holds batch 0 ("training" it) and has asked for nothing more: batch 1 is prepared anyway
    assert second.wait(10), "batch 1 was not prepared while batch 0 was held"
    got = [first, *it]
    assert [r.batch["step"] for r in got] == [0, 1, 2, 3]
    assert all(int(r.images.max()) == r.batch["step"] for r in got)
    assert set(called.values()) == {"cospress-prefetch"}  # not the loop's thread
    assert not _threads()


def test_prefetch_ahead_zero_prepares_in_the_loop_thread_in_turn():
    seen = []

    def prepare(batch):
        seen.append((batch["step"], threading.current_thread() is threading.main_thread()))
        return pf.Ready(batch, batch["images"], None)

    for r in pf.prefetch(_batches(3), prepare, torch.device("cpu"), ahead=0):
        assert seen[-1][0] == r.batch["step"]  # nothing prepared ahead
    assert seen == [(0, True), (1, True), (2, True)]


def test_a_bad_batch_is_raised_after_the_batches_before_it():
    def prepare(batch):
        if batch["step"] == 2:
            raise BadImageError("truncated image: x (store row 5); remove it and re-extract the store")
        return pf.Ready(batch, batch["images"], None)

    steps = []
    with pytest.raises(BadImageError, match="store row 5"):
        for r in pf.prefetch(_batches(5), prepare, torch.device("cpu")):
            steps.append(r.batch["step"])
    assert steps == [0, 1]
    assert not _threads()


def test_leaving_the_loop_early_stops_the_thread():
    prepared = []

    def prepare(batch):
        prepared.append(batch["step"])
        return pf.Ready(batch, batch["images"], None)

    it = pf.prefetch(_batches(50), prepare, torch.device("cpu"))
    for r in it:
        if r.batch["step"] == 1:
            break
    it.close()
    assert not _threads()
    time.sleep(0.3)
    assert len(prepared) <= 4  # bounded: the thread stopped instead of reading the whole epoch


def test_device_decode_training_is_bitwise_the_same_with_and_without_the_thread(tmp_path, monkeypatch):
    """decode=device on the CPU: the prefetching thread (decode + replay + targets of batch k+1 beside
    step k) gives bitwise the weights of preparing each batch in turn in the loop."""
    from cospress.distill import DistillConfig, run_distill
    from tests.test_device_decode import _store

    url, _ = _store(tmp_path)
    base = dict(
        store=url, student="test_vit", student_size=32, epochs=2, batch_size=12, workers=0, val_fraction=0.2,
        device="cpu", precision="fp32", seed=0, decode="device", temperatures=[0.02, 0.1],
    )  # fmt: skip
    threaded = run_distill(DistillConfig(out=str(tmp_path / "thread"), **base))
    monkeypatch.setattr(pf, "AHEAD", 0)
    inline = run_distill(DistillConfig(out=str(tmp_path / "inline"), **base))
    assert threaded["steps"] == inline["steps"] >= 2
    a, _ = ckpt.load_checkpoint(tmp_path / "thread", "last")
    b, _ = ckpt.load_checkpoint(tmp_path / "inline", "last")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (the side stream and events)")
def test_prefetch_on_cuda_equals_preparing_in_turn(tmp_path):
    """On CUDA the thread decodes + replays on a side stream; the training stream gets the same tensors."""
    from cospress.data import device_decode as dd
    from cospress.data.sources import open_source
    from cospress.distill.data import BatchPlan, DistillBatches, _Lazy, key_index
    from cospress.store.reader import StoreReader
    from tests.test_device_decode import _store

    url, spec = _store(tmp_path)
    reader = StoreReader(url)
    rows = np.arange(reader.num_rows)
    index = key_index(reader.keys(), open_source(spec).keys(), rows, spec)
    plan = BatchPlan(rows, seed=0, epoch=0, batch_size=12, views_per_image=3, stored_views=4)
    items = DistillBatches(_Lazy(url, None, spec), plan, index, 32, True, "device")
    batches = [items[i] for i in range(len(plan))]
    assert any(k == dd.KIND_JPEG for b in batches for k in b["encoded"].kinds)
    cuda = torch.device("cuda")

    def prepare(batch):
        return pf.prepare_batch(batch, 32, cuda, True)

    threaded = list(pf.prefetch(batches, prepare, cuda))
    inline = list(pf.prefetch(batches, prepare, cuda, ahead=0))
    for a, b in zip(threaded, inline, strict=True):
        x = a.images.float().mean() + a.teacher.cls.sum()  # used on the training stream
        assert torch.isfinite(x)
        # cuBLAS on two streams need not be bitwise reproducible (the resize is a matmul): 1 grey level
        assert int((a.images.int() - b.images.int()).abs().max()) <= 1
        assert torch.equal(a.teacher.cls, b.teacher.cls) and torch.equal(a.teacher.tokens, b.teacher.tokens)
