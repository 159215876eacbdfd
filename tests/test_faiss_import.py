"""faiss is imported with its bundled OpenBLAS set to this CPU's kernels, and the results stay the same."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from cospress.runtime import cpu_flags, openblas_coretype
from tests.helpers import cli_env

SEARCH = """
import json, os, sys
import numpy as np
from cospress.evaluate.knn import build_index, search
import ctypes, glob
import faiss
libs = glob.glob(os.path.join(os.path.dirname(faiss.__file__), "..", "faiss_cpu.libs", "libopenblas*"))
core = None
if libs:  # the OpenBLAS that faiss-cpu bundles: which kernels did it load?
    lib = ctypes.CDLL(libs[0])
    lib.openblas_get_corename.restype = ctypes.c_char_p
    core = lib.openblas_get_corename().decode()
print(json.dumps({"env_after": os.environ.get("OPENBLAS_CORETYPE"), "core": core}))
rng = np.random.default_rng(0)
bank = rng.standard_normal((3000, 64), dtype=np.float32)
queries = rng.standard_normal((200, 64), dtype=np.float32)
res = search(build_index(bank, kind="flat"), queries, 10)
np.save(sys.argv[1], np.concatenate([res.idx.astype(np.float64), res.sims.astype(np.float64)], axis=1))
"""


def _search(tmp_path, name: str, **env: str) -> tuple[dict, object]:
    import numpy as np

    run_env = {
        k: v for k, v in cli_env().items() if k not in ("OPENBLAS_CORETYPE", "COSPRESS_FAISS_CORETYPE")
    }
    run_env.update(env)
    out = tmp_path / f"{name}.npy"
    proc = subprocess.run(
        [sys.executable, "-c", SEARCH, str(out)], env=run_env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1]), np.load(out)


def test_coretype_follows_the_cpu_flags() -> None:
    assert (
        openblas_coretype(frozenset({"avx512f", "avx512bw", "avx512vl", "avx512dq", "avx2", "fma"}))
        == "SkylakeX"
    )
    assert openblas_coretype(frozenset({"avx2", "fma", "sse4_2"})) == "Haswell"
    assert openblas_coretype(frozenset({"sse4_2"})) is None


@pytest.mark.skipif(openblas_coretype(cpu_flags()) is None, reason="this CPU has no AVX2: nothing is set")
def test_search_results_equal_with_and_without_the_chosen_kernels(tmp_path) -> None:
    import numpy as np

    tuned_env, tuned = _search(tmp_path, "tuned")
    _, default = _search(tmp_path, "default", COSPRESS_FAISS_CORETYPE="0")
    assert tuned_env["env_after"] is None, "the variable must not outlive the faiss import"
    if tuned_env["core"] is not None:
        assert tuned_env["core"].lower() == openblas_coretype(cpu_flags()).lower()
    assert np.array_equal(tuned[:, :10], default[:, :10]), "neighbours differ"
    np.testing.assert_allclose(tuned[:, 10:], default[:, 10:], rtol=0, atol=1e-5)


def test_a_user_setting_wins(tmp_path) -> None:
    env_after, _ = _search(
        tmp_path, "user", OPENBLAS_CORETYPE="Haswell" if "avx2" in cpu_flags() else "Prescott"
    )
    assert env_after["env_after"] in ("Haswell", "Prescott")
