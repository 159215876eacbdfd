"""The CPU speed settings: the student attention kernel, glibc malloc tuning, the OpenMP wait policy,
and the direct shard reads a local store uses."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from cospress.errors import CospressError
from cospress.models.students import build_student
from cospress.models.timm_features import set_attention


def _forward_backward(student, x):
    student.zero_grad(set_to_none=True)
    f = student(x)
    (f.cls.square().mean() + f.tokens.square().mean()).backward()
    return f, {n: p.grad.clone() for n, p in student.named_parameters() if p.grad is not None}


def test_math_and_fused_attention_compute_the_same_function():
    torch.manual_seed(0)
    student = build_student("test_vit", 32)
    x = torch.randint(0, 255, (4, 3, 32, 32), dtype=torch.uint8)
    assert set_attention(student, "auto", torch.device("cpu")) == "math"
    layers = [m for m in student.modules() if hasattr(m, "fused_attn")]
    assert layers and not any(m.fused_attn for m in layers)
    f_math, g_math = _forward_backward(student, x)
    assert set_attention(student, "fused", torch.device("cpu")) == "fused"
    assert all(m.fused_attn for m in layers)
    f_fused, g_fused = _forward_backward(student, x)
    torch.testing.assert_close(f_math.cls, f_fused.cls, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(f_math.tokens, f_fused.tokens, rtol=1e-4, atol=1e-5)
    assert g_math.keys() == g_fused.keys()
    for k in g_math:
        torch.testing.assert_close(g_math[k], g_fused[k], rtol=1e-3, atol=1e-6, msg=k)
    with pytest.raises(CospressError, match="attention 'flash' is unknown"):
        set_attention(student, "flash", torch.device("cpu"))


def test_attention_setting_is_a_no_op_for_cnns():
    cnn = build_student("resnet18", 32, num_classes=0)
    assert set_attention(cnn, "auto", torch.device("cpu")) == "n/a"


def test_distill_refuses_an_unknown_attention_kernel(tmp_path):
    from cospress.distill.config import DistillConfig
    from cospress.errors import ConfigError

    with pytest.raises(ConfigError, match="attention 'sdpa' is unknown"):
        DistillConfig(store=str(tmp_path), attention="sdpa").validate()


def _python(code: str, **env: str) -> str:
    full = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "COSPRESS_MALLOC_TUNING")}
    full.update(env)
    return subprocess.run(
        [sys.executable, "-c", code], env=full, check=True, capture_output=True, text=True
    ).stdout.strip()


def test_malloc_tuning_is_on_by_default_and_can_be_turned_off():
    code = "from cospress.runtime import tune_malloc; print(tune_malloc(), tune_malloc())"
    if sys.platform != "linux":
        pytest.skip("glibc (Linux) only")
    assert _python(code) == "True True"
    assert _python(code, COSPRESS_MALLOC_TUNING="0") == "False False"


def test_tuned_malloc_keeps_a_freed_heap_larger_than_the_old_2_gib_trim_threshold():
    # 2.5 GiB in 100 MiB blocks (heap, below the 1 GiB mmap threshold), touched, then freed: with
    # trimming off the pages stay resident for the next step; a 2 GiB threshold handed them back
    code = (
        "import numpy as np, os\n"
        "from cospress.runtime import tune_malloc\n"
        "tuned = tune_malloc()\n"
        "page = os.sysconf('SC_PAGE_SIZE')\n"
        "rss = lambda: int(open('/proc/self/statm').read().split()[1]) * page / 2**30\n"
        "blocks = [np.ones(100 * 2**20, np.uint8) for _ in range(25)]\n"
        "peak = rss()\n"
        "del blocks\n"
        "print(tuned, round(peak, 1), round(rss(), 1))"
    )
    if sys.platform != "linux":
        pytest.skip("glibc (Linux) only")
    tuned, peak, after = _python(code).split()
    assert tuned == "True" and float(peak) >= 2.5
    assert float(after) >= float(peak) - 0.2, f"freed heap handed back: {peak} -> {after} GiB resident"
    _, peak, after = _python(code, COSPRESS_MALLOC_TUNING="0").split()
    assert float(after) < 1.0  # untuned: glibc's default returns it (the test can tell the two apart)


def test_importing_cospress_sets_a_passive_openmp_wait_policy_unless_the_user_chose_one():
    code = "import os, cospress; print(os.environ['OMP_WAIT_POLICY'])"
    assert _python(code) == "PASSIVE"
    assert _python(code, OMP_WAIT_POLICY="ACTIVE") == "ACTIVE"


def test_local_store_reads_take_the_direct_path_and_match_zarr(tmp_path):
    from cospress.store.reader import StoreReader
    from tests.test_distill import make_store

    url, _ = make_store(tmp_path, n=23, k=4, shard_size=10)  # 3 shards, the last one short
    direct = StoreReader(url)
    rows = np.array([22, 0, 13, 13, 9])
    views = np.array([[3, 1], [0, 2], [1, 1], [2, 3], [0, 0]])
    got = direct.read_rows(rows, views=views)
    got_all = direct.read_rows(rows)
    assert direct._direct_reader("tokens") is not None and direct._direct_reader("cls") is not None
    via_zarr = StoreReader(url)
    via_zarr._direct = dict.fromkeys(("cls", "tokens", "views"))  # None: force zarr
    want = via_zarr.read_rows(rows, views=views)
    want_all = via_zarr.read_rows(rows)
    for name in ("cls", "tokens", "views"):
        np.testing.assert_array_equal(got[name], want[name])
        np.testing.assert_array_equal(got_all[name], want_all[name])
    for shard in range(3):
        a, b = direct.read_shard(shard), via_zarr.read_shard(shard)
        for name in ("cls", "tokens", "views"):
            np.testing.assert_array_equal(a[name], b[name])


def test_auto_precision_is_bf16_where_the_cpu_has_native_bf16(monkeypatch):
    from cospress import runtime

    assert runtime.cpu_has_fast_bf16(frozenset({"avx2", "avx512_bf16"}))
    assert runtime.cpu_has_fast_bf16(frozenset({"amx_bf16", "amx_tile"}))
    assert not runtime.cpu_has_fast_bf16(frozenset({"avx2", "avx512f", "fma"}))
    cpu = torch.device("cpu")
    monkeypatch.setattr(runtime, "cpu_flags", lambda: frozenset({"avx512f", "avx512_bf16"}))
    assert runtime.autocast_dtype("auto", cpu) is torch.bfloat16
    monkeypatch.setattr(runtime, "cpu_flags", lambda: frozenset({"avx2", "fma"}))
    assert runtime.autocast_dtype("auto", cpu) is None
    assert runtime.autocast_dtype("bf16", cpu) is torch.bfloat16
    assert runtime.autocast_dtype("fp32", torch.device("cuda")) is None
