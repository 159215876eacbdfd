"""The ``cospress`` command line: parse flags -> config -> call a runner; progress bars and tables.

A stage command's flags are generated from its config dataclass (``stage_command``): each field is
one flag, with the field's help and default. A flag the user does not give is left to the YAML file
(``--config``) and then to the defaults.
"""

from __future__ import annotations

import inspect
import logging
import os
import sys
from collections.abc import Callable
from typing import Any

import typer
from rich.logging import RichHandler

from cospress import redact
from cospress.cli_store import COMMANDS as STORE_COMMANDS
from cospress.cli_ui import console, progress_bar, table, user_errors
from cospress.config import load_config
from cospress.distill.config import DistillConfig
from cospress.evaluate.config import EvalConfig
from cospress.extract.config import ExtractConfig
from cospress.flags import PlainFlagsCommand, PlainFlagsGroup, config_parameters, progress_parameter

app = typer.Typer(
    name="cospress",
    help="Distill vision foundation models into small students with CosPress, from a cached teacher store.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    cls=PlainFlagsGroup,
)
log = logging.getLogger("cospress.cli")


_NOISY = ("numcodecs", "zarr", "fsspec", "urllib3", "PIL", "matplotlib", "timm", "aiohttp", "faiss",
          "faiss.loader", "botocore", "aiobotocore", "s3fs")  # fmt: skip


@app.callback()
def _main(
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Debug logging."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Warnings and errors only."),
) -> None:
    level = logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO
    logging.basicConfig(
        level=level,
        format="%(message)s",
        datefmt="[%X]",
        handlers=[RichHandler(console=console, show_path=False, rich_tracebacks=False)],
        force=True,
    )
    redact.install(*logging.getLogger().handlers)  # log lines, warnings, tracebacks: no secret
    for noisy in _NOISY:
        logging.getLogger(noisy).setLevel(max(level, logging.WARNING))


# --------------------------------------------------------------------------- stage commands
def stage_command(name: str, cls: type, *, progress: bool = True) -> Callable[[Callable], Callable]:
    """Register ``body(cfg, show_progress)`` as a command whose flags are the fields of ``cls``,
    plus ``--config FILE.yaml`` (defaults < file < flags) and ``--progress/--no-progress``.

    Reading the flags checks each value's type and choices; the stage's runner checks the rest
    (``cfg.validate()``, once, first), as for the Python API.
    """

    def register(body: Callable[[Any, bool], None]) -> Callable:
        def command(**flags: Any) -> None:
            config_file = flags.pop("config")
            show = flags.pop("progress", True)
            given = {k: (None if isinstance(v, (list, tuple)) and not v else v) for k, v in flags.items()}
            with user_errors():
                body(load_config(cls, config_file, given), show)

        extra = [
            inspect.Parameter(
                "config",
                inspect.Parameter.KEYWORD_ONLY,
                default=typer.Option(None, "--config", help="YAML file of settings (flags win)."),
                annotation=str,
            )
        ]
        if progress:
            extra.append(progress_parameter())
        command.__signature__ = inspect.Signature(config_parameters(cls) + extra)  # type: ignore[attr-defined]
        command.__doc__ = body.__doc__
        command.__name__ = body.__name__
        app.command(name, cls=PlainFlagsCommand)(command)
        return body

    return register


# --------------------------------------------------------------------------- extract-teacher
@stage_command("extract-teacher", ExtractConfig)
def extract_teacher(cfg: ExtractConfig, show_progress: bool) -> None:
    """Stage 1: run the teacher once over K recorded views of every image into a Zarr store."""
    from cospress.extract import run_extract

    with progress_bar("extract", show_progress) as update:
        summary = run_extract(cfg, progress=update)
    if summary["rank"] != 0:
        return
    seconds = "{:.1f}s / {:.1f}s / {:.1f}s".format(
        summary["seconds_reading"], summary["seconds_teacher"], summary["seconds_writing"]
    )
    rows = [
        ("store", summary["store"]),
        ("images (this rank)", summary["images"]),
        ("skipped inputs (total)", summary.get("skipped_total", summary["skipped"])),
        (
            "shards written / already there",
            f"{summary['shards_written']} / {summary['shards_already_committed']}",
        ),
        ("images/s", f"{summary['images_per_second']:.1f}"),
        ("time reading / teacher / writing", seconds),
    ]
    table("extract-teacher", rows)


# --------------------------------------------------------------------------- distill
@stage_command("distill", DistillConfig)
def distill_cmd(cfg: DistillConfig, show_progress: bool) -> None:
    """Stage 2: train the CosPress compressor and the student from a store (no teacher needed)."""
    from cospress.distill import run_distill

    with progress_bar(f"distill ({cfg.method})", show_progress) as update:
        summary = run_distill(cfg, progress=update)
    if int(os.environ.get("RANK", 0)) == 0:
        rows = [
            (k, f"{v:.4g}" if isinstance(v, float) else v)
            for k, v in summary.items()
            if not isinstance(v, (dict, list))
        ]
        table("distill", rows)


# --------------------------------------------------------------------------- knn-eval
@stage_command("knn-eval", EvalConfig)
def knn_eval_cmd(cfg: EvalConfig, show_progress: bool) -> None:
    """FAISS kNN accuracy, kNN OOD detection, teacher-student fidelity and (--robustness) robustness; a report."""
    from cospress.evaluate import run_knn_eval

    with progress_bar("knn-eval robustness", show_progress and cfg.robustness) as update:
        report = run_knn_eval(cfg, progress=update)
    rows = [("top1", report.get("top1")), ("auroc", report.get("auroc")), ("fpr95", report.get("fpr95"))]
    fid = report.get("fidelity") or {}
    rows += [(f"fidelity {k}", v) for k, v in fid.items() if isinstance(v, (int, float))]
    rows.append(("report", os.path.join(cfg.out, "report.md")))
    table("knn-eval", [(k, f"{v:.4f}" if isinstance(v, float) else v) for k, v in rows])


# --------------------------------------------------------------------------- store commands
for _name, _command in STORE_COMMANDS:  # cli_store.py: inspect, verify, export, merge, wds, publish
    app.command(_name, cls=PlainFlagsCommand)(_command)


def main(argv: list[str] | None = None) -> None:
    """Console entry point (``cospress``)."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    app(args=argv, prog_name="cospress")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
