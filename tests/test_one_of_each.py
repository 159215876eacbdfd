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


def test_a_view_policy_is_built_by_from_settings_or_from_dict_only() -> None:
    assert [p.name for p, text in SOURCE.items() if "ViewPolicy(" in text] == []


def test_npy_bytes_round_trips_without_pickle(tmp_path) -> None:
    from cospress.utils import npy_bytes

    a = np.arange(12, dtype=np.float16).reshape(3, 4)[:, ::2]  # not contiguous
    (tmp_path / "a.npy").write_bytes(npy_bytes(a))
    assert np.array_equal(np.load(tmp_path / "a.npy", allow_pickle=False), a)
    with pytest.raises(ValueError):
        npy_bytes(np.array([{"a": 1}], dtype=object))


def test_the_view_settings_defaults_are_the_policy_defaults() -> None:
    """Stage 1's and online stage 2's default settings give the default policy (one set of defaults)."""
    from cospress.data.policy import ViewPolicy
    from cospress.distill import DistillConfig
    from cospress.extract import ExtractConfig

    default = ViewPolicy().fingerprint()
    assert ViewPolicy.from_settings(ExtractConfig()).fingerprint() == default
    assert ViewPolicy.from_settings(DistillConfig()).fingerprint() == default
    online = ViewPolicy.from_settings(DistillConfig(teacher="t", rand_augment="rand-m9", erase_prob=0.25))
    assert online.version == 2 and online.erase_prob == 0.25 and online.color_jitter == 0.0


def test_architecture_lists_every_distill_setting() -> None:
    """docs/architecture.md's DistillConfig block names every field of the dataclass."""
    import dataclasses
    import re

    from cospress.distill import DistillConfig

    text = (PKG.parent / "docs" / "architecture.md").read_text()
    block = text[text.index("class DistillConfig:") :]
    block = block[: block.index("```")]
    named = set(re.findall(r"\b([a-z][a-z0-9_]+)\b", block))
    missing = [f.name for f in dataclasses.fields(DistillConfig) if f.name not in named]
    assert not missing, f"docs/architecture.md's DistillConfig lacks {missing}"
