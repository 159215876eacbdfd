"""Labels of stores made from others (`append`, `merge`), mapped by class name (schema 2.1).

Each source numbers its classes by itself (a folder by its sorted class-folder names), so label 1 of
one store and label 1 of another may be two classes. When every part that holds labels names its
classes, the result's names are the first part's, then each new name of the next parts in order: a
class keeps one number, a new class gets the next one. When no part names its classes, labels keep
their numbers (as before 2.1). A part with labels but no names beside a part with names is refused:
its numbers cannot be matched to names.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from cospress.errors import StoreError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Part:
    """One input: its name in messages, its class names (None if unknown), whether it has labels."""

    name: str
    names: list[str] | None
    labelled: bool


def union(parts: list[Part]) -> tuple[list[str] | None, list[np.ndarray | None]]:
    """(the class names of the result or None, per part a table old label -> new label or None
    when its labels are kept as they are). StoreError when labels cannot be matched by name."""
    named = [p for p in parts if p.names is not None]
    if not named:
        if sum(p.labelled for p in parts) > 1:
            log.warning(
                "no input names its classes: labels keep their numbers (%s)", ", ".join(p.name for p in parts)
            )
        return None, [None] * len(parts)
    for p in parts:
        if p.names is None and p.labelled:
            raise StoreError(
                f"cannot match the labels of {p.name} to those of {named[0].name}: it has labels but no class "
                "names; rebuild it from a source with class names (an image folder of class folders)"
            )
    names: list[str] = []
    for p in named:
        names += [n for n in p.names if n not in names]
    index = {n: i for i, n in enumerate(names)}
    return names, [
        None if p.names is None else np.array([index[n] for n in p.names], np.int64) for p in parts
    ]


def relabel(labels: np.ndarray, table: np.ndarray | None, where: str) -> np.ndarray:
    """``labels`` [N] (-1: none) mapped through ``table``; StoreError for a label without a name."""
    labels = np.asarray(labels, np.int64)
    if table is None:
        return labels
    bad = labels >= len(table)
    if bad.any():
        raise StoreError(
            f"label {int(labels[bad][0])} of {where} has no class name ({len(table)} names): "
            "the store's labels and class names disagree; re-extract it"
        )
    out = labels.copy()
    ok = labels >= 0
    out[ok] = table[labels[ok]]
    return out
