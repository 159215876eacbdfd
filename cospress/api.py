"""The Python API of the three stages: ``cospress.extract_teacher``, ``cospress.distill_student``,
``cospress.knn_eval`` (``cospress.distill`` is the stage's package, so stage 2 is ``distill_student``).

Each takes the stage's settings as keyword arguments, generated from its config dataclass (the same
fields, defaults and help as the command line's flags and the YAML keys: one declaration), plus an
optional ``config`` YAML file (keywords win over the file, the file over the defaults) and an optional
``progress(done, total)`` callable. Each returns a small frozen result. A setting that cannot work
raises the same one-line :class:`cospress.errors.CospressError` the CLI prints. Nothing here runs
at import; the stages (and torch) load on the first call.

    import cospress
    store = cospress.extract_teacher(data="folder:images", teacher="vit_small_patch14_dinov2.lvd142m", out="store")
    run = cospress.distill_student(store=store.store, out="runs/s", epochs=5)
    report = cospress.knn_eval(model=run.run, train="folder:images", test="folder:test").report
"""

from __future__ import annotations

import dataclasses
import inspect
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cospress.config import load_config
from cospress.distill.config import DistillConfig
from cospress.evaluate.config import EvalConfig
from cospress.extract.config import ExtractConfig

Progress = Callable[[int, int], None] | None


@dataclasses.dataclass(frozen=True)
class ExtractResult:
    """What :func:`extract_teacher` wrote: the store's path and the run's summary (images, shards, timings)."""

    store: str
    summary: dict[str, Any]


@dataclasses.dataclass(frozen=True)
class DistillResult:
    """A finished distill run: its folder, the best validation row (epoch, kNN accuracy ...), the summary."""

    run: str
    best: dict[str, Any]
    summary: dict[str, Any]


@dataclasses.dataclass(frozen=True)
class EvalResult:
    """A knn-eval report (the dict written to ``out/report.json``) and its folder."""

    out: str
    report: dict[str, Any]


def _run_extract(cfg: ExtractConfig, progress: Progress) -> ExtractResult:
    from cospress.extract import run_extract

    summary = run_extract(cfg, progress=progress)
    return ExtractResult(store=str(summary["store"]), summary=summary)


def _run_distill(cfg: DistillConfig, progress: Progress) -> DistillResult:
    from cospress.distill import run_distill

    summary = run_distill(cfg, progress=progress)
    best = next((r for r in summary["history"] if r.get("epoch") == summary["best_epoch"]), {})
    return DistillResult(run=str(summary["out"]), best=dict(best), summary=summary)


def _run_knn_eval(cfg: EvalConfig, progress: Progress) -> EvalResult:
    from cospress.evaluate import run_knn_eval

    return EvalResult(out=str(cfg.out), report=run_knn_eval(cfg, progress=progress))


class _Default:
    """A default made by a factory, shown in the signature without calling it (it may load torch)."""

    def __init__(self, shown: str | None) -> None:
        self.shown = shown or "the config's default"

    def __repr__(self) -> str:
        return f"<{self.shown}>"


def _stage_function(name: str, cls: type, run: Callable[[Any, Progress], Any], doc: str) -> Callable:
    """``name(config=None, *, <one keyword per field of cls>, progress=None)`` -> ``run(cfg, progress)``."""

    def stage(config: str | Path | None = None, *, progress: Progress = None, **settings: Any) -> Any:
        return run(load_config(cls, config, settings, given=f"{name}()"), progress)

    hints = typing.get_type_hints(cls)
    kw = inspect.Parameter.KEYWORD_ONLY
    params = [inspect.Parameter("config", inspect.Parameter.POSITIONAL_OR_KEYWORD, default=None)]
    for f in dataclasses.fields(cls):
        default = f.default if f.default is not dataclasses.MISSING else _Default(f.metadata["shown"])
        params.append(inspect.Parameter(f.name, kw, default=default, annotation=hints[f.name]))
    params.append(inspect.Parameter("progress", kw, default=None))
    stage.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
    settings = "\n".join(f"    {f.name}: {f.metadata['help']}" for f in dataclasses.fields(cls))
    stage.__doc__ = f"{doc}\n\nSettings (keyword arguments, as the `{cls.__name__}` fields):\n{settings}"
    stage.__name__ = stage.__qualname__ = name
    stage.__module__ = __name__
    return stage


extract_teacher = _stage_function(
    "extract_teacher",
    ExtractConfig,
    _run_extract,
    "Stage 1 (`cospress extract-teacher`): the teacher over K recorded views of every image into a store.",
)
distill_student = _stage_function(
    "distill_student",
    DistillConfig,
    _run_distill,
    "Stage 2 (`cospress distill`): train the compressor and the student from a store (or online).",
)
knn_eval = _stage_function(
    "knn_eval",
    EvalConfig,
    _run_knn_eval,
    "`cospress knn-eval`: FAISS kNN, kNN OOD detection, fidelity and (robustness=True) robustness; a report.",
)
