"""The hostile-store corpus (tests/hostile_stores.py) through every command that reads a store.

Each (store, command) must end in one line naming the file and the problem, or succeed where the
store's flaw does not touch what the command reads; none may raise the process's peak resident size by more than
a bound (Linux ``clear_refs`` resets the peak before each command; elsewhere tracemalloc traces it), open a file outside the store (an audit hook sees every
open) or hang (an alarm). Commands run in-process through the CLI's ``main(argv)`` (or, for the
parts of distill, knn-eval and append that read the store, their library functions), so the
whole corpus stays fast.
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import signal  # noqa: E402
import sys  # noqa: E402
import tracemalloc  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from cospress.errors import CospressError  # noqa: E402
from tests.hostile_stores import HOSTILE, OUTSIDE, base_store, build, make_images  # noqa: E402

MEMORY_BOUND = (
    192 << 20
)  # bytes a command may allocate on these ~250 KB stores (the sound ones need < 40 MiB)
TIMEOUT_S = 30
FORBIDDEN = {os.path.realpath(OUTSIDE), "/dev/zero"}
_opened: list[str] | None = None


def _audit(event: str, args: tuple) -> None:
    if _opened is not None and event == "open" and isinstance(args[0], (str, bytes, os.PathLike)):
        _opened.append(os.fsdecode(args[0]))


sys.addaudithook(_audit)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """(bases, sound store, image spec): one int8 and one pca base store, shared by every case."""
    tmp = tmp_path_factory.mktemp("hostile")
    spec = make_images(tmp / "images")
    bases = {codec: base_store(tmp / f"base-{codec}", spec, codec) for codec in ("int8", "pca")}
    for codec in ("int8", "pca"):  # a sound store over other images, to merge with
        _OTHER[codec] = base_store(
            tmp / f"other-{codec}", make_images(tmp / f"images-{codec}", prefix="other"), codec
        )
    return bases, spec


def _cli(argv: list[str]) -> None:
    from cospress.cli import main

    try:
        main(argv)
    except SystemExit as e:
        if e.code not in (0, None):
            raise _Failed(int(e.code)) from None


class _Failed(Exception):
    def __init__(self, code: int) -> None:
        self.code = code


def _distill(store: str, spec: str, tmp: Path) -> None:
    """Stage 2's set-up and its first batch of targets."""
    from cospress.distill import DistillConfig
    from cospress.distill.run import open_train_data, prepare

    cfg = prepare(DistillConfig(store=store, data=spec, out=str(tmp / "run"), batch_size=6, device="cpu",
                                workers=0, student="test_vit", student_size=32))  # fmt: skip
    data = open_train_data(cfg, 1)
    rows = data.split.train[: cfg.batch_size // cfg.views_per_image]
    views = np.zeros((len(rows), cfg.views_per_image), np.int64)
    data.reader.read_rows(rows, views=views)


def _append(store: str, spec: str, tmp: Path) -> None:
    """What `extract-teacher --append` reads of the store before it writes anything."""
    from cospress.data.sources import open_source
    from cospress.store import StoreLayout
    from cospress.store.append import plan_append
    from cospress.store.manifest import run_identity
    from cospress.store.reader import StoreReader

    m = StoreReader(store).manifest
    src = open_source(spec)
    ident = {**run_identity(m), "source": src.describe()}
    plan_append(store, ident, src.keys(), src.labels(), src.describe(), StoreLayout.from_manifest(m))


def _knn_bank(store: str, spec: str, tmp: Path) -> None:
    from cospress.evaluate.embed import bank_from_store

    bank_from_store(store)


def _export_import(store: str, spec: str, tmp: Path) -> None:
    _cli(["export-wds", store, "--out", str(tmp / "wds"), "--no-progress"])
    _cli(["import-wds", str(tmp / "wds"), "--out", str(tmp / "imported"), "--no-progress"])


COMMANDS = {
    "inspect": lambda s, spec, tmp: _cli(["inspect", s, "--json"]),
    "verify": lambda s, spec, tmp: _cli(["verify", s]),
    "distill": _distill,
    "knn-eval --bank-store": _knn_bank,
    "export-wds + import-wds": _export_import,
    "merge": lambda s, spec, tmp: _cli(
        ["merge", s, _other(s), "--out", str(tmp / "merged"), "--no-progress"]
    ),
    "append": _append,
    "publish": lambda s, spec, tmp: _cli(["publish", s, str(tmp / "published"), "--no-progress"]),
}
# flaws outside the CLS and key / label columns: token scales, the pca projection, an unfinished append
CLS_SOUND = {
    "scale-nan",
    "scale-inf",
    "scale-negative",
    "interrupted-append",
    "pca-projection-shape",
    "pca-projection-missing",
}
# commands that may succeed on a flawed store: what they read is sound
MAY_SUCCEED = {
    "inspect": "*",  # the summary reads the manifest only
    "append": CLS_SOUND
    | {
        "index-huge-nbytes",
        "index-past-end",
        "index-crc-bad",
        "blosc-claims-2gib",
    },  # keys and labels only
    "distill": {"scale-nan", "scale-inf", "scale-negative", "interrupted-append"},  # first batch misses row 5
    "merge": {"interrupted-append"},
    "export-wds + import-wds": {"interrupted-append"},
    "knn-eval --bank-store": CLS_SOUND,  # CLS only
    # publish copies bytes whose checksums agree with the manifest: a crafted store is copied as it
    # is (every reader of the copy refuses it as here); it must refuse a corrupted one
    "publish": {h.name for h in HOSTILE if h.crafted},
    "verify": set(),
}


def _other(store: str) -> str:
    """The sound store over other images, of the same codec as ``store``'s base."""
    codec = "pca" if (Path(store) / "token_projection").exists() else "int8"
    return str(_OTHER[codec])


_OTHER: dict[str, Path] = {}


def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def _peak_start() -> int | None:
    """Reset the peak resident size (Linux ``clear_refs``: no cost to the command) and return the
    current one; None where that is not possible (then tracemalloc traces the allocations)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return _rss_kib("VmRSS")
    except OSError:
        tracemalloc.start()
        return None


def _peak_since(base: int | None) -> int:
    """Bytes the command added to the peak resident size (or traced, without clear_refs)."""
    if base is None:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        return peak
    return max(0, _rss_kib("VmHWM") - base) * 1024


def _alarm(signum, frame):
    raise TimeoutError(f"a command ran past {TIMEOUT_S} s")


def _run(command, store: str, spec: str, tmp: Path, capsys) -> tuple[str | None, int, list[str]]:
    """(the one error line or None, peak traced bytes, files opened)."""
    global _opened
    capsys.readouterr()
    _opened = []
    base = _peak_start()
    old = signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(TIMEOUT_S)
    error = None
    try:
        COMMANDS[command](store, spec, tmp)
    except _Failed as e:
        out = capsys.readouterr()
        lines = [x for x in (out.err + out.out).splitlines() if x.strip()]
        assert "Traceback" not in out.err, out.err
        errors = [x for x in lines if x.startswith("error:")]
        if command == "verify" and not errors:  # checksum mismatches: one line per file, then the total
            errors = [x for x in lines if "verify failed" in x] and lines
            error = " ".join(errors)
        else:
            assert e.code == 2 and len(errors) == 1, lines
            error = errors[0]
    except CospressError as e:
        error = str(e)
        assert "\n" not in error
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
        peak = _peak_since(base)
        opened, _opened = _opened, None
    return error, peak, opened


@pytest.mark.parametrize("hostile", HOSTILE, ids=[h.name for h in HOSTILE])
def test_hostile_store_through_every_command(corpus, hostile, tmp_path, capsys):
    bases, spec = corpus
    store = str(build(hostile, bases, tmp_path / "store"))
    size = sum(f.stat().st_size for f in Path(store).rglob("*") if f.is_file() and not f.is_symlink())
    for command in COMMANDS:
        work = tmp_path / command.split()[0]
        work.mkdir()
        error, peak, opened = _run(command, store, spec, work, capsys)
        where = f"{hostile.name} / {command}: {error}"
        assert peak <= MEMORY_BOUND + 64 * size, f"{where}: {peak:,} bytes traced"
        outside = {os.path.realpath(p) for p in opened} & FORBIDDEN
        assert not outside, f"{where}: opened {outside}"
        if hostile.expect is None:
            assert error is None, where
            continue
        allowed = MAY_SUCCEED[command]
        if error is None:
            assert allowed == "*" or hostile.name in allowed, f"{where}: succeeded on a hostile store"
            continue
        words = hostile.expect
        if command == "publish":  # publish checks checksums before it sends (its own message)
            words = ("does not match its manifest",) if hostile.name == "interrupted-append" else words
        for word in words:
            assert word.lower() in error.lower(), f"{where}: does not say {word!r}"


def test_corpus_size():
    """The size reported in the closing note: stores x commands."""
    assert len(HOSTILE) * len(COMMANDS) == 38 * 8
