"""The ``cospress`` command line: parse flags -> config -> call a runner; progress bars and tables.

A stage command's flags are generated from its config dataclass (``stage_command``): each field is
one flag, with the field's help and default. A flag the user does not give is left to the YAML file
(``--config``) and then to the defaults.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import logging
import os
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table
from rich.text import Text

from cospress.config import load_config
from cospress.distill.config import DistillConfig
from cospress.errors import CospressError
from cospress.evaluate.config import EvalConfig
from cospress.extract.config import ExtractConfig
from cospress.flags import config_parameters

app = typer.Typer(
    name="cospress",
    help="Distill vision foundation models into small students with CosPress, from a cached teacher store.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console(stderr=True)
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
    for noisy in _NOISY:
        logging.getLogger(noisy).setLevel(max(level, logging.WARNING))


class RateColumn(ProgressColumn):
    """Items per second since the task started (images unless the task names its ``unit``)."""

    def render(self, task: Any) -> Text:
        speed, unit = task.finished_speed or task.speed, task.fields.get("unit", "img")
        return Text(f"{speed:,.0f} {unit}/s" if speed else f"- {unit}/s", style="cyan")


@contextlib.contextmanager
def progress_bar(description: str, enabled: bool = True, unit: str = "img") -> Iterator[Any]:
    """Yields ``update(done, total)``: a rich bar with ``unit``/s (rank 0 only, TTY or not)."""
    rank = int(os.environ.get("RANK", 0))
    if not enabled or rank != 0:
        yield lambda done, total: None
        return
    columns = [
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        RateColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    ]
    with Progress(*columns, console=console, transient=False, refresh_per_second=4) as bar:
        task = bar.add_task(description, total=None, unit=unit)

        def update(done: int, total: int, **fields: Any) -> None:
            bar.update(task, completed=done, total=total)

        yield update


def _fail(e: BaseException) -> None:
    console.print(f"[bold red]error:[/] {e}", highlight=False, soft_wrap=True)
    raise typer.Exit(2)


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
    """Turn CospressError (and a missing file) into a one-line message and exit code 2."""
    try:
        yield
    except CospressError as e:
        _fail(e)
    except KeyboardInterrupt:
        console.print("interrupted; rerun the same command to resume")
        raise typer.Exit(130) from None


def _table(title: str, rows: list[tuple[str, Any]]) -> None:
    table = Table(title=title, show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column()
    for k, v in rows:
        table.add_row(k, str(v))
    Console().print(table)


# Options shared by the store commands (typer copies them per command).
STORE = typer.Argument(..., help="Store path or fsspec URL.")
CACHE_DIR = typer.Option(None, "--cache-dir", help="Local cache for remote chunks.")
OVERWRITE = typer.Option(False, "--overwrite", help="Replace an existing store at --out.")
PROGRESS = typer.Option(True, "--progress/--no-progress", help="Show a progress bar.")


# --------------------------------------------------------------------------- stage commands
def stage_command(name: str, cls: type, *, progress: bool = True) -> Callable[[Callable], Callable]:
    """Register ``body(cfg, show_progress)`` as a command whose flags are the fields of ``cls``,
    plus ``--config FILE.yaml`` (defaults < file < flags) and ``--progress/--no-progress``."""

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
            extra.append(
                inspect.Parameter(
                    "progress",
                    inspect.Parameter.KEYWORD_ONLY,
                    default=typer.Option(True, "--progress/--no-progress", help="Show a progress bar."),
                    annotation=bool,
                )
            )
        command.__signature__ = inspect.Signature(config_parameters(cls) + extra)  # type: ignore[attr-defined]
        command.__doc__ = body.__doc__
        command.__name__ = body.__name__
        app.command(name)(command)
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
    _table("extract-teacher", rows)


# --------------------------------------------------------------------------- inspect / verify
@app.command("inspect")
def inspect_cmd(
    store: str = STORE,
    cache_dir: str = CACHE_DIR,
    as_json: bool = typer.Option(False, "--json", help="Print the summary as JSON."),
    reference: str = typer.Option(
        None,
        "--reference",
        help="Measure the token codec's fidelity against this store of the same run (e.g. its fp16 store).",
    ),  # fmt: skip
    rows: int = typer.Option(64, "--rows", help="Rows sampled for --reference (one view each)."),
) -> None:
    """Print a store's summary: teacher, view policy, token codec and its fidelity, shapes, sizes, skipped inputs."""
    with user_errors():
        from cospress.store import StoreReader
        from cospress.store.fidelity import measure_against

        reader = StoreReader(store, cache_dir=cache_dir)
        summary = reader.summary()
        if reference:
            summary["fidelity_vs_reference"] = measure_against(
                reader, StoreReader(reference, cache_dir=cache_dir), rows
            )
    if as_json:
        print(json.dumps(summary, indent=2, default=str))
        return
    rows_out = []
    for k, v in summary.items():
        rows_out.append((k, json.dumps(v, default=str) if isinstance(v, (dict, list)) else v))
    _table(f"store {summary['url']}", rows_out)


@app.command("verify")
def verify_cmd(
    store: str = STORE,
    cache_dir: str = CACHE_DIR,
) -> None:
    """Recompute every shard checksum; name corrupted shards and exit non-zero if any."""
    with user_errors():
        from cospress.store import StoreReader

        reader = StoreReader(store, cache_dir=cache_dir)
        t0 = time.perf_counter()
        bad = reader.verify()
    if bad:
        for b in bad:
            what = f"shard {b['shard']} array {b['array']}" if b.get("shard") is not None else b["file"]
            console.print(
                f"[red]corrupted[/] {what}: "
                f"expected sha256 {str(b.get('expected'))[:12]}..., got {str(b.get('actual'))[:12]}..."
            )
        console.print(f"[bold red]verify failed:[/] {len(bad)} corrupted file(s) in {reader.display}")
        raise typer.Exit(1)
    console.print(
        f"[green]ok[/] {reader.display}: every shard checksum matches ({time.perf_counter() - t0:.1f}s)"
    )


# --------------------------------------------------------------------------- distill
@stage_command("distill", DistillConfig)
def distill_cmd(cfg: DistillConfig, show_progress: bool) -> None:
    """Stage 2: train the CosPress compressor and the student from a store (no teacher needed)."""
    from cospress.distill import run_distill
    from cospress.distill.run import prepare

    cfg = prepare(cfg)  # settings checked against the store before the progress bar starts
    with progress_bar(f"distill ({cfg.method})", show_progress) as update:
        summary = run_distill(cfg, progress=update)
    if int(os.environ.get("RANK", 0)) == 0:
        rows = [
            (k, f"{v:.4g}" if isinstance(v, float) else v)
            for k, v in summary.items()
            if not isinstance(v, (dict, list))
        ]
        _table("distill", rows)


@app.command("export")
def export_cmd(
    run: str = typer.Argument(..., help="A distill run folder."),
    out: str = typer.Option(..., "--out", help="Folder for student.safetensors + student.json."),
    which: str = typer.Option("best", "--which", help="best or last checkpoint."),
) -> None:
    """Export the student as safetensors + JSON (timm name, input size, mean/std)."""
    with user_errors():
        from cospress.export import export_student

        info = export_student(run, out, which=which)
    _table(f"exported to {out}", [(k, v) for k, v in info.items() if not isinstance(v, (dict, list))])


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
    _table("knn-eval", [(k, f"{v:.4f}" if isinstance(v, float) else v) for k, v in rows])


# --------------------------------------------------------------------------- merge / WebDataset
def _store_job(
    name: str, show_progress: bool, job: Callable[..., Any], *args: Any, unit: str = "img", **kwargs: Any
) -> Any:
    """Run a store job with a progress bar (``unit``/s), user errors as one line."""
    with user_errors(), progress_bar(name, show_progress, unit) as update:
        return job(*args, progress=update, **kwargs)


@app.command("merge")
def merge_cmd(
    stores: list[str] = typer.Argument(..., help="Two or more store paths or fsspec URLs, in row order."),
    out: str = typer.Option(..., "--out", help="Folder of the merged store."),
    shard_size: int = typer.Option(
        None, "--shard-size", help="Rows per shard.", show_default="the first input's"
    ),
    cache_dir: str = CACHE_DIR,
    overwrite: bool = OVERWRITE,
    progress: bool = PROGRESS,
) -> None:
    """Merge stores of one teacher and view policy over disjoint images, without recomputing."""
    from cospress.store.merge import merge_stores

    options = {"overwrite": overwrite, "shard_size": shard_size, "cache_dir": cache_dir}
    manifest = _store_job("merge", progress, merge_stores, stores, out, **options)
    counts = manifest["counts"]
    rows = [("store", out), ("inputs", len(stores)), ("rows", counts["rows"]), ("valid", counts["valid"])]
    _table("merge", rows)


@app.command("export-wds")
def export_wds_cmd(
    store: str = STORE,
    out: str = typer.Option(..., "--out", help="Empty folder for the tar shards + cospress-wds.json."),
    samples_per_shard: int = typer.Option(1000, "--samples-per-shard", help="Samples per tar shard."),
    cache_dir: str = CACHE_DIR,
    progress: bool = PROGRESS,
) -> None:
    """Export a store as WebDataset tar shards (.npy targets, .json view parameters)."""
    from cospress.store.wds_io import export_wds

    options = {"samples_per_shard": samples_per_shard, "cache_dir": cache_dir}
    info = _store_job("export-wds", progress, export_wds, store, out, **options)
    _table("export-wds", [("folder", out), ("samples", info["samples"]), ("tar shards", len(info["shards"]))])


@app.command("import-wds")
def import_wds_cmd(
    src: str = typer.Argument(..., help="A folder written by export-wds."),
    out: str = typer.Option(..., "--out", help="Folder of the new store."),
    overwrite: bool = OVERWRITE,
    progress: bool = PROGRESS,
) -> None:
    """Rebuild a store from an export-wds folder (checksums and member paths checked)."""
    from cospress.store.wds_io import import_wds

    manifest = _store_job("import-wds", progress, import_wds, src, out, overwrite=overwrite)
    _table("import-wds", [("store", out), ("rows", manifest["counts"]["rows"])])


@app.command("publish")
def publish_cmd(
    store: str = typer.Argument(..., help="A finished local store."),
    url: str = typer.Argument(..., help="Destination: an fsspec URL (s3://, gs://, ...) or a folder."),
    overwrite: bool = typer.Option(
        False, "--overwrite", help="Replace another store (or other files) at URL."
    ),
    progress: bool = PROGRESS,
) -> None:
    """Upload a finished store, manifest last (resumable: files already there are kept), then verify it."""
    from cospress.store.publish import publish_store

    info = _store_job("publish", progress, publish_store, store, url, unit="file", overwrite=overwrite)
    sent = f"{info['sent']} ({info['bytes_sent']:,} bytes) / {info['already_there']}"
    rows = [("store", info["url"]), ("files sent / already there", sent)]
    _table("publish", rows + [("verified", f"{info['shards_verified']} shards, every checksum matches")])


def main(argv: list[str] | None = None) -> None:
    """Console entry point (``cospress``)."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    app(args=argv, prog_name="cospress")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
