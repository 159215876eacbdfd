"""Stage 2 run folder: where a run stands, its checkpoints, its header and its metrics log.

A run folder holds ``config.yaml`` (the resolved config), ``run.json`` (:func:`run_header`),
``metrics.jsonl`` (one JSON row per step, compressor step and validation) and the checkpoints
``last.*`` and ``best.*`` (see :mod:`cospress.checkpoint`).
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np
import torch
from torch import nn

from cospress import checkpoint as ckpt
from cospress import runtime
from cospress.config import save_config, to_dict
from cospress.distill.config import DistillConfig, parse_kwargs
from cospress.distill.model import Schedule
from cospress.errors import ConfigError
from cospress.utils import atomic_write_bytes, atomic_write_json, redact_config, redact_url, sha256_json

log = logging.getLogger(__name__)

# settings that may change on resume without a warning (they do not change what is trained)
_FREE_ON_RESUME = ("resume", "workers", "out", "decode", "compile", "attention", "logger")


@dataclass
class RunState:
    """Where a run stands: steps done, the epoch and the next batch in it, the best epoch so far and
    every validation row."""

    step: int = 0
    epoch: int = 0
    position: int = 0
    best_metric: float | None = None
    best_epoch: int = -1
    history: list[dict[str, Any]] = field(default_factory=list)
    store: dict[str, Any] | None = None  # the store's identity (`store_entry`); None online

    def record(self, row: dict[str, Any]) -> bool:
        """Add an epoch's validation row (sets its ``best_epoch``); True when it is the best so far.

        Without a kNN accuracy in the row every epoch is the best (best = last).
        """
        acc = row.get("knn_accuracy")
        better = acc is None or self.best_metric is None or acc > self.best_metric
        if better:
            self.best_metric, self.best_epoch = acc, int(row["epoch"])
        row["best_epoch"] = self.best_epoch
        self.history.append(row)
        return better


# --------------------------------------------------------------------------- checkpoints
def _other(model: nn.Module) -> str:
    """The module trained beside the student: "compressor" (cospress) or "head" (baselines)."""
    return "compressor" if model.method == "cospress" else "head"


def model_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """``student.*`` (bare timm names) and ``compressor.*`` or ``head.*`` of a DistillModel."""
    w = ckpt.clean_state_dict(model.student.model.state_dict(), "student.")
    w.update(ckpt.clean_state_dict(getattr(model, _other(model)).state_dict(), f"{_other(model)}."))
    return w


def load_model_weights(model: nn.Module, weights: dict[str, torch.Tensor]) -> None:
    parts = ckpt.split_weights(weights)
    model.student.model.load_state_dict(parts.get("student", {}))
    getattr(model, _other(model)).load_state_dict(parts.get(_other(model), {}))


def checkpoint_state(
    at: RunState, opt: torch.optim.Optimizer, cfg: DistillConfig, schedule: Schedule
) -> dict[str, Any]:
    """The training state of a checkpoint: plain types and tensors only."""
    return {
        "step": at.step,
        "epoch": at.epoch,
        "position": at.position,
        "optimizer": opt.state_dict(),
        "scheduler": schedule.state(at.step),
        "rng": ckpt.rng_state(),
        "config": redact_config(to_dict(cfg)),
        "compressor_fitted": bool(cfg.compressor_first),
        "best": {"metric": at.best_metric, "epoch": at.best_epoch},
        "history": list(at.history),
        "store": at.store,
    }


def save_run(
    name: str,
    *,
    out: Path,
    model: nn.Module,
    opt: torch.optim.Optimizer,
    cfg: DistillConfig,
    at: RunState,
    schedule: Schedule,
    enabled: bool = True,
) -> None:
    """Write checkpoint ``name`` (``last`` or ``best``) of the run as it stands (rank 0 only: ``enabled``)."""
    if enabled:
        ckpt.save_checkpoint(out, name, model_weights(model), checkpoint_state(at, opt, cfg, schedule))


def store_entry(reader: Any) -> dict[str, Any]:
    """What names a store's contents (its URL aside, which may move): rows, key hash, identity hash.

    Written into run.json and every checkpoint; ``--resume`` compares it (:func:`check_same_store`).
    """
    from cospress.store.manifest import run_identity

    m = reader.manifest
    return {
        "url": reader.display,
        "rows": int(reader.num_rows),
        "keys_sha256": m.get("keys_sha256"),
        "identity_sha256": sha256_json(redact_config(run_identity(m))),
    }


def check_same_store(then: dict[str, Any] | None, now: dict[str, Any] | None, out: Path) -> None:
    """ConfigError when the store of a resumed run is not the one its checkpoint was trained on."""
    if not then or not now:  # an online run, or a checkpoint from before stores were recorded
        return
    diff = []
    if then.get("rows") != now.get("rows"):
        diff.append(f"rows {then.get('rows')} -> {now.get('rows')}")
    for name, what in (
        ("keys_sha256", "keys"),
        ("identity_sha256", "identity (teacher, views, seed, source)"),
    ):
        if then.get(name) != now.get(name):
            diff.append(f"its {what} changed")
    if diff:
        raise ConfigError(
            f"--resume: the store {now.get('url')} is not the one the checkpoint in {out} was trained on "
            f"({'; '.join(diff)}); resume with that store, or start a new run with another --out"
        )


def resume(
    cfg: DistillConfig, out: Path, model: nn.Module, store: dict[str, Any] | None = None
) -> tuple[RunState, dict[str, Any] | None]:
    """Load ``last`` into ``model`` when the run folder holds one: (where the run stands, its state).

    A folder with a run refuses to start without ``--resume``; ``(RunState(), None)`` for a new run.
    ``store``: the targets' store (:func:`store_entry`), refused when it is not the checkpoint's.
    """
    if not ckpt.exists(out, "last"):
        if cfg.resume:
            log.info("no checkpoint in %s: starting a new run", out)
        return RunState(store=store), None
    if not cfg.resume:
        raise ConfigError(
            f"{out} already holds a run (a last checkpoint); pass --resume to continue it or choose another --out"
        )
    weights, state = ckpt.load_checkpoint(out, "last")
    check_same_store(state.get("store"), store, out)
    load_model_weights(model, weights)
    at = RunState(
        step=int(state["step"]),
        epoch=int(state["epoch"]),
        position=int(state["position"]),
        best_metric=state["best"]["metric"],
        best_epoch=int(state["best"]["epoch"]),
        history=list(state.get("history", [])),
        store=store,
    )
    now = redact_config(to_dict(cfg))
    diff = sorted(k for k, v in state["config"].items() if k not in _FREE_ON_RESUME and now.get(k) != v)
    if diff:
        log.warning("resuming with settings that differ from the checkpoint's: %s", ", ".join(diff))
    log.info("resuming from %s at step %d (epoch %d, batch %d)", out / "last", at.step, at.epoch, at.position)
    return at, state


def restore_optimizer(opt: torch.optim.Optimizer, state: dict[str, Any], rank: int = 0) -> None:
    """The optimizer state and the RNG states of a checkpoint (after the optimizer is built).

    The checkpoint holds rank 0's RNG states; other ranks seed theirs from (seed, rank, step) so
    that their drop-path masks stay different from rank 0's after a resume.
    """
    opt.load_state_dict(state["optimizer"])
    ckpt.set_rng_state(state["rng"])
    if rank:
        seed = int(state.get("config", {}).get("seed", 0))
        runtime.seed_everything((seed + rank + 1_000_003 * int(state["step"])) % 2**63)


# --------------------------------------------------------------------------- header
def _git_sha() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True, text=True, timeout=5
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def run_header(cfg: DistillConfig) -> dict[str, Any]:
    """Config, git sha (when the package sits in a git checkout) and package versions."""
    import timm
    import zarr

    import cospress

    return {
        "config": redact_config(to_dict(cfg)),
        "git_sha": _git_sha(),
        "versions": {
            "cospress": cospress.__version__,
            "torch": torch.__version__,
            "timm": timm.__version__,
            "zarr": zarr.__version__,
            "numpy": np.__version__,
            "python": sys.version.split()[0],
        },
    }


def student_info(cfg: DistillConfig, student: nn.Module) -> dict[str, Any]:
    """What :mod:`cospress.export` needs to rebuild the bare timm student."""
    return {
        "timm_name": cfg.student,
        "timm_kwargs": parse_kwargs(cfg.student_kwargs),
        "input_size": int(student.input_size),
        "mean": list(student.mean),
        "std": list(student.std),
        "dim": int(student.dim),
        "grid": list(student.grid),
        "method": cfg.method,
    }


def _teacher_line(header: dict[str, Any]) -> str:
    teacher = header.get("teacher") or {}
    store = header.get("store") or {}
    source = f"store {redact_url(str(store['url']))}" if store.get("url") else "online"
    return f"{teacher.get('name', '?')} ({source})"


def start_line(cfg: DistillConfig, header: dict[str, Any], out: Path) -> str:
    """The one start-up line of a run (the full settings are in OUT/config.yaml, the header in run.json)."""
    s = header["student"]
    return (
        f"distill {cfg.method}: {s['timm_name']} @ {s['input_size']} px (dim {s['dim']}) <- "
        f"{_teacher_line(header)}; {cfg.epochs} epochs, batch {cfg.batch_size}, "
        f"R={cfg.views_per_image}, lr {cfg.lr:g}; settings in {out / 'config.yaml'}"
    )


def start_run_folder(
    cfg: DistillConfig, out: Path, targets: dict[str, Any], student: nn.Module, at: RunState | None
) -> None:
    """Write config.yaml and run.json (the header, with ``targets``: its "teacher" and "store"
    entries); on resume (``at``) trim metrics.jsonl to ``at``, else (a new run) empty it."""
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out / "config.yaml")
    header = run_header(cfg)
    header.update(targets)
    header["student"] = student_info(cfg, student)
    atomic_write_json(out / "run.json", header)
    log.info("%s", start_line(cfg, header, out))
    log.debug("run header: %s", json.dumps(header))
    if at is not None:
        trim_metrics(out / "metrics.jsonl", at.step, at.epoch)
    elif (out / "metrics.jsonl").is_file():  # a run killed before its first checkpoint starts over
        atomic_write_bytes(out / "metrics.jsonl", b"")


# --------------------------------------------------------------------------- metrics
def trim_metrics(path: Path, step: int, epoch: int) -> None:
    """On resume, drop the metric rows written after the checkpoint (they are computed again)."""
    if not path.is_file():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if row.get("phase") in ("val", "reuse") and row.get("epoch", 0) >= epoch:
            continue
        if row.get("phase") == "train" and row.get("step", 0) > step:
            continue
        keep.append(line)
    atomic_write_bytes(path, "".join(line + "\n" for line in keep).encode())


# Train rows are held with their loss terms on the device and read (one device sync) every LOG_EVERY steps.
LOG_EVERY = 20


class MetricsLog:
    """``metrics.jsonl``, appended one JSON row at a time on rank 0 (a no-op elsewhere: ``enabled``).

    Train rows come in through :meth:`add_train` with their loss terms still on the device; they are
    read together, one device sync per ``every`` steps, and written in order before any other row.
    """

    def __init__(self, path: Path, enabled: bool, every: int = LOG_EVERY, sinks: list | None = None) -> None:
        self._file = open(path, "a") if enabled else None  # noqa: SIM115
        self._sinks = list(sinks or []) if enabled else []  # cospress.loggers backends (--logger)
        self._every = max(1, every)
        self._pending: list[tuple[dict[str, Any], dict[str, torch.Tensor]]] = []
        self.last: dict[str, Any] = {}  # the last train row written (on every rank)

    def add_train(self, row: dict[str, Any], losses: dict[str, torch.Tensor]) -> None:
        """A train row (:func:`train_row` without losses) and its device loss terms; written later."""
        self._pending.append((row, losses))
        if len(self._pending) >= self._every:
            self.flush()

    def flush(self) -> dict[str, Any]:
        """Read the pending loss terms (one device sync), write their rows; returns the last train row."""
        if self._pending:
            names = sorted(self._pending[0][1])
            vals = torch.stack([torch.stack([t[k] for k in names]) for _, t in self._pending]).tolist()
            for (row, _), v in zip(self._pending, vals, strict=True):
                self.last = with_losses(row, dict(zip(names, v, strict=True)))
                self._write(self.last)
            self._pending.clear()
        return self.last

    def write(self, row: dict[str, Any]) -> None:
        self.flush()
        self._write(row)

    def _write(self, row: dict[str, Any]) -> None:
        if self._file is not None:
            self._file.write(json.dumps(row) + "\n")
            self._file.flush()
        for sink in self._sinks:
            sink.log(row)

    def __enter__(self) -> MetricsLog:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        try:
            self.flush()
        except Exception:  # after a failed step the pending terms may be unreadable (e.g. a CUDA error)
            if kind is None:
                raise
        finally:
            if self._file is not None:
                self._file.close()
            for sink in self._sinks:
                sink.close()


def train_row(at: RunState, lr: float, views: int, t_data: float, t_step: float) -> dict:
    """The metrics row of one step without its loss terms: learning rate, speed (views/s) and timings.

    ``t_step`` is host time: the GPU may still be running the step (its terms are read later).
    """
    return {
        "phase": "train",
        "step": at.step,
        "epoch": at.epoch,
        "lr": lr,
        "images_per_s": views / max(t_step, 1e-9),
        "time_data_s": t_data,
        "time_step_s": t_step,
    }


def with_losses(row: dict, losses: dict[str, float]) -> dict:
    """``row`` with ``loss/<name>`` keys after the learning rate, as metrics.jsonl has always had them."""
    head = {k: row[k] for k in ("phase", "step", "epoch", "lr")}
    return {**head, **{f"loss/{k}": v for k, v in losses.items()}, **row}
