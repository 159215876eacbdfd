"""One of each (docs/architecture.md): helpers that exist once in the package, checked on its source."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

PKG = Path(__file__).resolve().parents[1] / "cospress"
SOURCE = {p: p.read_text() for p in PKG.rglob("*.py")}


@pytest.mark.parametrize(
    "needle, home",
    [
        ("np.save(", "utils.py"),  # the one array-to-.npy encoder: utils.npy_bytes
        ("def vote(", "vote.py"),  # the one weighted kNN vote
        ("def autocast_dtype(", "runtime.py"),  # the one precision -> dtype
        ('PRECISIONS = ("', "precision.py"),  # the one list of --precision values
    ],
)
def test_declared_once(needle: str, home: str) -> None:
    where = [p.relative_to(PKG).as_posix() for p, text in SOURCE.items() if needle in text]
    assert where == [home], where


def test_npy_bytes_round_trips_without_pickle(tmp_path) -> None:
    from cospress.utils import npy_bytes

    a = np.arange(12, dtype=np.float16).reshape(3, 4)[:, ::2]  # not contiguous
    (tmp_path / "a.npy").write_bytes(npy_bytes(a))
    assert np.array_equal(np.load(tmp_path / "a.npy", allow_pickle=False), a)
    with pytest.raises(ValueError):
        npy_bytes(np.array([{"a": 1}], dtype=object))
