"""Class labels across the bank and the test set: matched by class name, never by position.

Each source numbers its classes by itself (a folder by its sorted class-folder names), so label 3
of ``--train`` and label 3 of ``--test`` need not be the same class. The bank's numbering is the
reference: test labels are mapped into it by class name. ``--ood-classes`` takes class names or
class numbers (numbers are positions in the bank's class list). A test class the bank lacks is
refused, unless it is named in ``--ood-classes`` (then its images are near-OOD queries). When a
source has no class names (a WebDataset, an old store), labels are compared by position.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from cospress.errors import ConfigError
from cospress.utils import redact_text

log = logging.getLogger(__name__)

NOT_IN_BANK = -1  # a test label mapped to no bank class (unlabelled, or a held-out class the bank lacks)


@dataclass
class ClassMap:
    """How the labels of the bank and of the test set relate.

    names: the bank's class names (index = bank label), None when unknown; num_classes: C of the vote;
    held: bank labels held out as near-OOD; test_to_bank: [C_test] test label -> bank label or -1;
    test_held: [C_test] bool, test classes held out.
    """

    names: list[str] | None
    num_classes: int
    held: np.ndarray
    test_to_bank: np.ndarray
    test_held: np.ndarray

    def map_test(self, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(labels in the bank's numbering, -1 for none; held-out mask) of test labels [N] (-1 unlabelled)."""
        labels = np.asarray(labels, dtype=np.int64)
        ok = (labels >= 0) & (labels < len(self.test_to_bank))
        if not ok.any():  # an unlabelled test set (no test class at all): nothing maps
            return np.full(labels.shape, NOT_IN_BANK, np.int64), np.zeros(labels.shape, bool)
        safe = np.where(ok, labels, 0)
        mapped = np.where(ok, self.test_to_bank[safe], NOT_IN_BANK)
        return mapped, ok & self.test_held[safe]


def _is_number(entry: str) -> bool:
    return entry.lstrip("-").isdigit()


def _held_names(entries: Sequence[str], bank: list[str], test: list[str]) -> set[str]:
    """The class names of --ood-classes entries (numbers index the bank's classes)."""
    held: set[str] = set()
    for entry in entries:
        if _is_number(entry):
            n = int(entry)
            if not 0 <= n < len(bank):
                raise ConfigError(
                    f"--ood-classes {n}: the bank has classes 0-{len(bank) - 1} ({', '.join(bank)})"
                )
            held.add(bank[n])
        elif entry in bank or entry in test:
            held.add(entry)
        else:
            raise ConfigError(
                f"--ood-classes {entry!r} is no class of the bank ({', '.join(bank)}) or of the test set"
            )
    return held


def _by_name(bank: list[str], test: list[str], entries: list[str], specs: tuple[str, str]) -> ClassMap:
    held = _held_names(entries, bank, test)
    missing = [n for n in test if n not in bank and n not in held]
    if missing:
        raise ConfigError(
            f"the test classes {', '.join(missing)} of {specs[1]} are not in the bank {specs[0]} "
            f"({', '.join(bank)}); name them in --ood-classes to score them as near-OOD, or give "
            "sources with the same classes"
        )
    absent = [n for n in bank if n not in test and n not in held]
    if absent:
        log.info("the test set has no class %s of the bank: its images are never queries", ", ".join(absent))
    index = {n: i for i, n in enumerate(bank)}
    return ClassMap(
        names=list(bank),
        num_classes=len(bank),
        held=np.asarray(sorted(index[n] for n in held if n in index), dtype=np.int64),
        test_to_bank=np.asarray([index.get(n, NOT_IN_BANK) for n in test], dtype=np.int64),
        test_held=np.asarray([n in held for n in test], dtype=bool),
    )


def _by_position(
    bank_labels: np.ndarray, test_labels: np.ndarray, names: list[str] | None, entries: list[str]
) -> ClassMap:
    held_set: set[int] = set()
    for entry in entries:
        if _is_number(entry):
            held_set.add(int(entry))
        elif names is not None and entry in names:
            held_set.add(names.index(entry))
        else:
            raise ConfigError(
                f"--ood-classes {entry!r} is a class name, but the sources have no class names; "
                "give class numbers, e.g. --ood-classes 5,6"
            )
    c_test = int(max(test_labels.max(initial=-1), *held_set, -1)) + 1
    c_bank = int(bank_labels.max(initial=-1)) + 1
    return ClassMap(
        names=names,
        num_classes=max(c_bank, c_test, 1),
        held=np.asarray(sorted(held_set), dtype=np.int64),
        test_to_bank=np.arange(c_test, dtype=np.int64),
        test_held=np.isin(np.arange(c_test), list(held_set)),
    )


def match_classes(
    bank_names: list[str] | None,
    bank_labels: np.ndarray,
    test_names: list[str] | None,
    test_labels: np.ndarray,
    ood_classes: Sequence[int | str],
    specs: tuple[str, str] = ("--train", "--test"),
) -> ClassMap:
    """The class map of a bank and a test set (names when both have them, else positions).

    bank_labels / test_labels: [N] ints (-1 unlabelled); ood_classes: names or bank class numbers.
    """
    entries = [str(e).strip() for e in ood_classes if str(e).strip()]
    specs = (redact_text(specs[0]), redact_text(specs[1]))  # a source URL's credentials never shown
    if bank_names is not None and test_names is not None:
        return _by_name(list(bank_names), list(test_names), entries, specs)
    if bank_names is not None or test_names is not None:
        log.warning("only one of %s and %s names its classes: labels are compared by position", *specs)
    return _by_position(
        np.asarray(bank_labels, dtype=np.int64),
        np.asarray(test_labels, dtype=np.int64),
        bank_names if bank_names is not None else test_names,
        entries,
    )
