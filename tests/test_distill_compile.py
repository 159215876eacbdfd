"""A torch.compile'd student is compiled once for training; validation batches do not recompile it.

The compilations are counted with a backend of our own that runs the captured graph as it is (no
inductor), so the test takes seconds on a CPU.
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
import torch._dynamo  # noqa: E402

from cospress.distill.model import DistillModel, compile_student, train_step  # noqa: E402
from cospress.distill.val import embed_images  # noqa: E402
from cospress.models.features import Features  # noqa: E402
from tests.helpers import make_image_folder  # noqa: E402

pytestmark = pytest.mark.skipif(
    not torch._dynamo.is_dynamo_supported(), reason="torch.compile (dynamo) is not supported on this Python"
)


class _Cfg:
    method, temperatures, grad_clip, compressor_first = "cospress", [0.05], 1.0, False
    w_local = w_global = w_tokens = w_cls = 1.0


def test_validation_batches_do_not_recompile_the_compiled_student(tmp_path):
    from cospress.distill.data import _Lazy
    from cospress.models.students import build_student

    torch._dynamo.reset()
    compiled: list[tuple] = []  # the first input's shape of every compiled graph

    def counting(gm, example_inputs):
        compiled.append(next(tuple(x.shape) for x in example_inputs if isinstance(x, torch.Tensor)))
        return gm.forward

    torch.manual_seed(0)
    model = DistillModel(build_student("test_vit", 32, False), "cospress", 16)
    compile_student(model, backend=counting)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    images = torch.randint(0, 256, (6, 3, 32, 32), dtype=torch.uint8)
    teacher = Features(cls=torch.randn(6, 16), tokens=torch.randn(6, 4, 16))

    def step():
        terms = train_step(model, opt, images, teacher, 1e-3, _Cfg, True, ((2, 2), tuple(model.student.grid)))
        assert torch.isfinite(terms["total"])

    step()
    after_training = len(compiled)
    assert after_training >= 1  # the training forward went through the compiler
    step()
    assert len(compiled) == after_training  # same shapes: no recompile

    # validation: eval mode, no_grad, batches of 4 and 3 full images (other shapes)
    root = make_image_folder(tmp_path / "images", classes=1, per_class=7)
    lazy = _Lazy(None, None, f"folder:{root}")
    emb = embed_images(
        model.student,
        lazy,
        np.arange(7),
        32,
        device=torch.device("cpu"),
        amp_dtype=None,
        workers=0,
        batch_size=4,
    )
    assert emb.shape == (7, model.student.dim) and torch.isfinite(emb).all()
    assert len(compiled) == after_training, f"validation recompiled the student: {compiled[after_training:]}"
    step()  # back to training: still the first compilation
    assert len(compiled) == after_training
    # checkpoints stay unwrapped: the compiled module is not a submodule
    assert not any("_orig_mod" in k for k in model.state_dict())
