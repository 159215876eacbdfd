"""The ``cospress`` command line: parse flags -> config -> call a runner; progress bars and tables.

Every command's flags map one to one to its config dataclass; a flag the user does not give is left
to the YAML file (``--config``) and then to the defaults.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
import time
from collections.abc import Iterator
from typing import Any

import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.progress import BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TextColumn, TimeElapsedColumn
from rich.progress import TimeRemainingColumn
from rich.table import Table
from rich.text import Text

from cospress.errors import CospressError

app = typer.Typer(
    name="cospress",
    help="Distill vision foundation models into small students with CosPress, from a cached teacher store.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console(stderr=True)
log = logging.getLogger("cospress.cli")


@app.callback()
def _main(
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Debug logging."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Warnings and errors only."),
) -> None:
    level = logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO
    logging.basicConfig(level=level, format="%(message)s", datefmt="[%X]",
                        handlers=[RichHandler(console=console, show_path=False, rich_tracebacks=False)], force=True)
    for noisy in ("numcodecs", "zarr", "fsspec", "urllib3", "PIL", "matplotlib", "timm", "aiohttp"):
        logging.getLogger(noisy).setLevel(max(level, logging.WARNING))


class RateColumn(ProgressColumn):
    """Items per second since the task started."""

    def render(self, task: Any) -> Text:
        speed = task.finished_speed or task.speed
        return Text(f"{speed:,.0f} img/s" if speed else "- img/s", style="cyan")


@contextlib.contextmanager
def progress_bar(description: str, enabled: bool = True) -> Iterator[Any]:
    """Yields ``update(done, total)``: a rich bar with images/s (rank 0 only, TTY or not)."""
    rank = int(os.environ.get("RANK", 0))
    if not enabled or rank != 0:
        yield lambda done, total: None
        return
    columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), RateColumn(),
               TimeElapsedColumn(), TimeRemainingColumn()]
    with Progress(*columns, console=console, transient=False, refresh_per_second=4) as bar:
        task = bar.add_task(description, total=None)

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


def _overrides(**kwargs: Any) -> dict[str, Any]:
    return {k: v for k, v in kwargs.items() if v is not None}


def _table(title: str, rows: list[tuple[str, Any]]) -> None:
    table = Table(title=title, show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column()
    for k, v in rows:
        table.add_row(k, str(v))
    Console().print(table)


# --------------------------------------------------------------------------- extract-teacher
@app.command("extract-teacher")
def extract_teacher(
    data: str = typer.Option(None, "--data", help="Image source: folder:PATH, wds:PATTERN, fashion-mnist:train|test."),
    teacher: str = typer.Option(None, "--teacher", help="timm model name (hub weights), or efficientnet_lite0 (offline)."),
    weights: str = typer.Option(None, "--weights", help="Local weights file (safetensors or a torch state dict)."),
    views: int = typer.Option(None, "--views", help="K augmented views per image [default: 8]."),
    image_size: int = typer.Option(None, "--image-size", help="Teacher input resolution [default: the teacher's]."),
    limit: int = typer.Option(None, "--limit", help="Use a deterministic subset of N images."),
    tokens: bool = typer.Option(None, "--tokens/--no-tokens", help="Store patch tokens [default: yes]."),
    center_view: bool = typer.Option(None, "--center-view/--no-center-view", help="Also store the full-image view."),
    seed: int = typer.Option(None, "--seed", help="Seed of the view parameters [default: 0]."),
    workers: int = typer.Option(None, "--workers", help="Decoding processes [default: 2]."),
    batch_size: int = typer.Option(None, "--batch-size", help="Views per teacher forward [default: 256]."),
    shard_size: int = typer.Option(None, "--shard-size", help="Images per shard [default: 1024]."),
    scale_min: float = typer.Option(None, "--scale-min", help="RandomResizedCrop minimum area [default: 0.08]."),
    scale_max: float = typer.Option(None, "--scale-max", help="RandomResizedCrop maximum area [default: 1.0]."),
    color_jitter: float = typer.Option(None, "--color-jitter", help="Probability of colour jitter [default: 0]."),
    grayscale: float = typer.Option(None, "--grayscale", help="Probability of grayscale [default: 0]."),
    blur: float = typer.Option(None, "--blur", help="Probability of gaussian blur [default: 0]."),
    max_pixels: int = typer.Option(None, "--max-pixels", help="Skip images with more pixels (decompression bombs)."),
    precision: str = typer.Option(None, "--precision", help="auto (bf16 on CUDA / AMX CPUs), bf16 or fp32."),
    device: str = typer.Option(None, "--device", help="auto, cpu, cuda, cuda:1 ..."),
    out: str = typer.Option(None, "--out", help="Store directory [default: ./store]."),
    overwrite: bool = typer.Option(None, "--overwrite", help="Replace an existing store made with other settings."),
    config: str = typer.Option(None, "--config", help="YAML file of settings (flags win)."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show a progress bar."),
) -> None:
    """Stage 1: run the teacher once over K recorded views of every image into a Zarr store."""
    with user_errors():
        from cospress.config import load_config
        from cospress.extract import ExtractConfig, run_extract

        cfg = load_config(ExtractConfig, config, _overrides(
            data=data, teacher=teacher, weights=weights, views=views, image_size=image_size, limit=limit,
            tokens=tokens, center_view=center_view, seed=seed, workers=workers, batch_size=batch_size,
            shard_size=shard_size, scale_min=scale_min, scale_max=scale_max, color_jitter=color_jitter,
            grayscale=grayscale, blur=blur, max_pixels=max_pixels, precision=precision, device=device, out=out,
            overwrite=overwrite))
        with progress_bar("extract", progress) as update:
            summary = run_extract(cfg, progress=update)
    if summary["rank"] == 0:
        rows = [("store", summary["store"]), ("images (this rank)", summary["images"]),
                ("skipped inputs (total)", summary.get("skipped_total", summary["skipped"])),
                ("shards written / already there", f"{summary['shards_written']} / {summary['shards_already_committed']}"),
                ("images/s", f"{summary['images_per_second']:.1f}"),
                ("time reading / teacher / writing", "{:.1f}s / {:.1f}s / {:.1f}s".format(
                    summary["seconds_reading"], summary["seconds_teacher"], summary["seconds_writing"]))]
        _table("extract-teacher", rows)


# --------------------------------------------------------------------------- inspect / verify
@app.command("inspect")
def inspect_cmd(
    store: str = typer.Argument(..., help="Store path or fsspec URL."),
    cache_dir: str = typer.Option(None, "--cache-dir", help="Local cache for remote chunks."),
    as_json: bool = typer.Option(False, "--json", help="Print the summary as JSON."),
) -> None:
    """Print a store's summary: teacher, view policy, shapes, sizes, skipped inputs."""
    with user_errors():
        from cospress.store import StoreReader

        summary = StoreReader(store, cache_dir=cache_dir).summary()
    if as_json:
        print(json.dumps(summary, indent=2, default=str))
        return
    rows = []
    for k, v in summary.items():
        rows.append((k, json.dumps(v, default=str) if isinstance(v, (dict, list)) else v))
    _table(f"store {store}", rows)


@app.command("verify")
def verify_cmd(
    store: str = typer.Argument(..., help="Store path or fsspec URL."),
    cache_dir: str = typer.Option(None, "--cache-dir", help="Local cache for remote chunks."),
) -> None:
    """Recompute every shard checksum; name corrupted shards and exit non-zero if any."""
    with user_errors():
        from cospress.store import StoreReader

        reader = StoreReader(store, cache_dir=cache_dir)
        t0 = time.perf_counter()
        bad = reader.verify()
    if bad:
        for b in bad:
            console.print(f"[red]corrupted[/] shard {b.get('shard')} array {b.get('array')}: "
                          f"expected sha256 {str(b.get('expected'))[:12]}..., got {str(b.get('actual'))[:12]}...")
        console.print(f"[bold red]verify failed:[/] {len(bad)} corrupted shard file(s) in {store}")
        raise typer.Exit(1)
    console.print(f"[green]ok[/] {store}: every shard checksum matches ({time.perf_counter() - t0:.1f}s)")


def main(argv: list[str] | None = None) -> None:
    """Console entry point (``cospress``)."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    app(args=argv, prog_name="cospress")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
