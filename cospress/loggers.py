"""Runs you can watch: every metrics row of a distill run also goes to TensorBoard, W&B or MLflow.

``metrics.jsonl`` is always written (the default is files only). ``--logger tensorboard`` (and
``wandb`` / ``mlflow`` when the package is installed, never required) receives each row as it is
written: one scalar per number, tagged ``PHASE/NAME`` (``train/loss/total``, ``train/lr``,
``train/images_per_s`` = views/s, ``train/time_data_s`` = data wait, ``val/knn_accuracy``,
``reuse/shown_mean``, ``compressor/loss/total``...) at the row's step. Torch-free at import: the
backend loads when a run opens it.
"""

from __future__ import annotations

import importlib.util
import numbers
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from cospress.config import to_dict
from cospress.errors import ConfigError
from cospress.utils import redact_config

LOGGERS = ("tensorboard", "wandb", "mlflow")
_PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow"}


def check_loggers(names: Sequence[str]) -> None:
    """Refuse an unknown logger, or one whose package is not installed, in one line (before the run)."""
    for name in names:
        if name not in LOGGERS:
            raise ConfigError(f"--logger {name!r} is unknown; use {', '.join(LOGGERS)} (comma-separated)")
        if importlib.util.find_spec(_PACKAGES[name]) is None:
            extra = " (or pip install 'cospress[watch]')" if name == "tensorboard" else ""
            raise ConfigError(f"--logger {name} needs the {name} package: pip install {name}{extra}")


def scalars(row: dict[str, Any]) -> tuple[int, dict[str, float]]:
    """(step, {PHASE/NAME: value}) of one metrics row: its numbers, bools and bookkeeping left out."""
    phase = str(row.get("phase", "run"))
    step = row.get("step", row.get("compressor_step", row.get("epoch", 0)))
    values = {
        f"{phase}/{k}": float(v)
        for k, v in row.items()
        if isinstance(v, numbers.Real) and not isinstance(v, bool) and k not in ("step", "phase")
    }
    return int(step or 0), values


class TensorBoard:
    def __init__(self, out: Path, config: dict[str, Any]) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(out / "tensorboard"), flush_secs=10)
        self.writer.add_text("config", "```\n" + "\n".join(f"{k}: {v}" for k, v in config.items()) + "\n```")

    def log(self, row: dict[str, Any]) -> None:
        step, values = scalars(row)
        for tag, value in values.items():
            self.writer.add_scalar(tag, value, step)
        if row.get("phase") != "train":
            self.writer.flush()  # validation, reuse: visible at once

    def close(self) -> None:
        self.writer.close()


class WandB:
    def __init__(self, out: Path, config: dict[str, Any]) -> None:
        import wandb

        self.run = wandb.init(project="cospress", name=out.name, dir=str(out), config=config, resume="allow")

    def log(self, row: dict[str, Any]) -> None:
        step, values = scalars(row)
        self.run.log(values, step=step)

    def close(self) -> None:
        self.run.finish()


class MLflow:
    def __init__(self, out: Path, config: dict[str, Any]) -> None:
        import mlflow

        self.mlflow = mlflow
        mlflow.start_run(run_name=out.name)
        mlflow.log_params({k: str(v)[:500] for k, v in config.items()})

    def log(self, row: dict[str, Any]) -> None:
        step, values = scalars(row)
        self.mlflow.log_metrics(values, step=step)

    def close(self) -> None:
        self.mlflow.end_run()


def open_loggers(cfg: Any, enabled: bool = True) -> list[Any]:
    """The backends of a run's ``cfg.logger`` (none unless ``enabled``: rank 0), each with ``log(row)``
    and ``close()``, writing under ``cfg.out``; the settings are recorded with the run, URLs redacted
    as in config.yaml."""
    if not enabled or not cfg.logger:
        return []
    check_loggers(cfg.logger)
    config = redact_config(to_dict(cfg))
    kinds = {"tensorboard": TensorBoard, "wandb": WandB, "mlflow": MLflow}
    return [kinds[name](Path(cfg.out), config) for name in dict.fromkeys(cfg.logger)]
