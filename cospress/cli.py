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
    logging.basicConfig(
        level=level,
        format="%(message)s",
        datefmt="[%X]",
        handlers=[RichHandler(console=console, show_path=False, rich_tracebacks=False)],
        force=True,
    )
    for noisy in (
        "numcodecs",
        "zarr",
        "fsspec",
        "urllib3",
        "PIL",
        "matplotlib",
        "timm",
        "aiohttp",
        "faiss",
        "faiss.loader",
    ):
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
    columns = [
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        RateColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    ]
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
    data: str = typer.Option(
        None, "--data", help="Image source: folder:PATH, wds:PATTERN, fashion-mnist:train|test."
    ),
    teacher: str = typer.Option(
        None, "--teacher", help="timm model name (hub weights), or efficientnet_lite0 (offline)."
    ),
    weights: str = typer.Option(
        None, "--weights", help="Local weights file (safetensors or a torch state dict)."
    ),
    views: int = typer.Option(None, "--views", help="K augmented views per image [default: 8]."),
    image_size: int = typer.Option(
        None, "--image-size", help="Teacher input resolution [default: the teacher's]."
    ),
    limit: int = typer.Option(None, "--limit", help="Use a deterministic subset of N images."),
    tokens: bool = typer.Option(None, "--tokens/--no-tokens", help="Store patch tokens [default: yes]."),
    center_view: bool = typer.Option(
        None, "--center-view/--no-center-view", help="Also store the full-image view."
    ),
    seed: int = typer.Option(None, "--seed", help="Seed of the view parameters [default: 0]."),
    workers: int = typer.Option(
        None, "--workers", help="Decoding processes [default: cores - 1, at most 8]."
    ),
    batch_size: int = typer.Option(None, "--batch-size", help="Views per teacher forward [default: 256]."),
    shard_size: int = typer.Option(None, "--shard-size", help="Images per shard [default: 1024]."),
    scale_min: float = typer.Option(
        None, "--scale-min", help="RandomResizedCrop minimum area [default: 0.08]."
    ),
    scale_max: float = typer.Option(
        None, "--scale-max", help="RandomResizedCrop maximum area [default: 1.0]."
    ),
    flip: float = typer.Option(None, "--flip", help="Probability of a horizontal flip [default: 0.5]."),
    color_jitter: float = typer.Option(
        None, "--color-jitter", help="Probability of colour jitter [default: 0]."
    ),
    grayscale: float = typer.Option(None, "--grayscale", help="Probability of grayscale [default: 0]."),
    blur: float = typer.Option(None, "--blur", help="Probability of gaussian blur [default: 0]."),
    max_pixels: int = typer.Option(
        None, "--max-pixels", help="Skip images with more pixels (decompression bombs)."
    ),
    precision: str = typer.Option(None, "--precision", help="auto (bf16 on CUDA / AMX CPUs), bf16 or fp32."),
    device: str = typer.Option(None, "--device", help="auto, cpu, cuda, cuda:1 ..."),
    decode: str = typer.Option(
        None, "--decode", help="cpu (worker processes), gpu (nvjpeg + replay on the GPU), device or auto."
    ),
    out: str = typer.Option(None, "--out", help="Store directory [default: ./store]."),
    overwrite: bool = typer.Option(
        None, "--overwrite", help="Replace an existing store made with other settings."
    ),
    append: bool = typer.Option(
        None, "--append", help="Add the images of --data that the complete store lacks (new shards)."
    ),
    config: str = typer.Option(None, "--config", help="YAML file of settings (flags win)."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show a progress bar."),
) -> None:
    """Stage 1: run the teacher once over K recorded views of every image into a Zarr store."""
    with user_errors():
        from cospress.config import load_config
        from cospress.extract import ExtractConfig, run_extract

        cfg = load_config(
            ExtractConfig,
            config,
            _overrides(
                data=data,
                teacher=teacher,
                weights=weights,
                views=views,
                image_size=image_size,
                limit=limit,
                tokens=tokens,
                center_view=center_view,
                seed=seed,
                workers=workers,
                batch_size=batch_size,
                shard_size=shard_size,
                scale_min=scale_min,
                scale_max=scale_max,
                flip=flip,
                color_jitter=color_jitter,
                grayscale=grayscale,
                blur=blur,
                max_pixels=max_pixels,
                precision=precision,
                device=device,
                decode=decode,
                out=out,
                overwrite=overwrite,
                append=append,
            ),
        )
        with progress_bar("extract", progress) as update:
            summary = run_extract(cfg, progress=update)
    if summary["rank"] == 0:
        rows = [
            ("store", summary["store"]),
            ("images (this rank)", summary["images"]),
            ("skipped inputs (total)", summary.get("skipped_total", summary["skipped"])),
            (
                "shards written / already there",
                f"{summary['shards_written']} / {summary['shards_already_committed']}",
            ),
            ("images/s", f"{summary['images_per_second']:.1f}"),
            (
                "time reading / teacher / writing",
                "{:.1f}s / {:.1f}s / {:.1f}s".format(
                    summary["seconds_reading"], summary["seconds_teacher"], summary["seconds_writing"]
                ),
            ),
        ]
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
    _table(f"store {summary['url']}", rows)


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
            console.print(
                f"[red]corrupted[/] shard {b.get('shard')} array {b.get('array')}: "
                f"expected sha256 {str(b.get('expected'))[:12]}..., got {str(b.get('actual'))[:12]}..."
            )
        console.print(f"[bold red]verify failed:[/] {len(bad)} corrupted shard file(s) in {reader.display}")
        raise typer.Exit(1)
    console.print(
        f"[green]ok[/] {reader.display}: every shard checksum matches ({time.perf_counter() - t0:.1f}s)"
    )


# --------------------------------------------------------------------------- distill
@app.command("distill")
def distill_cmd(
    store: str = typer.Option(None, "--store", help="Store path or fsspec URL (from extract-teacher)."),
    student: str = typer.Option(
        None, "--student", help="timm model name of the student [default: vit_tiny_patch16_224]."
    ),
    student_size: int = typer.Option(None, "--student-size", help="Student input resolution [default: 64]."),
    student_kwargs: str = typer.Option(
        None, "--student-kwargs", help="Extra timm kwargs as JSON, e.g. '{\"depth\": 6}'."
    ),
    pretrained: bool = typer.Option(
        None, "--pretrained/--random-init", help="Start the student from hub weights."
    ),
    method: str = typer.Option(None, "--method", help="cospress (the paper), cosine, mse or smooth-l1."),
    compressor: str = typer.Option(None, "--compressor", help="Compressor h: linear (paper) or mlp."),
    compressor_first: bool = typer.Option(
        None, "--compressor-first", help="Fit h from the store alone, freeze it, then train the student."
    ),
    compressor_epochs: int = typer.Option(
        None, "--compressor-epochs", help="Epochs of the compressor-only fit."
    ),
    views_per_image: int = typer.Option(
        None, "--views-per-image", help="R views of each image in a batch [default: 3]."
    ),
    epochs: int = typer.Option(None, "--epochs", help="Training epochs [default: 5]."),
    batch_size: int = typer.Option(None, "--batch-size", help="Views per global batch [default: 192]."),
    lr: float = typer.Option(None, "--lr", help="AdamW learning rate [default: 5e-4]."),
    min_lr: float = typer.Option(
        None, "--min-lr", help="Final learning rate of the cosine schedule [default: 1e-5]."
    ),
    weight_decay: float = typer.Option(None, "--weight-decay", help="AdamW weight decay [default: 0.05]."),
    warmup_epochs: float = typer.Option(None, "--warmup-epochs", help="Linear warm-up epochs [default: 1]."),
    temperatures: str = typer.Option(
        None, "--temperatures", help="Similarity temperatures, e.g. 0.01,0.02,...,0.1."
    ),
    use_tokens: bool = typer.Option(
        None, "--tokens/--no-tokens", help="Use the token terms (when the store has tokens)."
    ),
    data: str = typer.Option(None, "--data", help="Image source [default: the one recorded in the store]."),
    cache_dir: str = typer.Option(None, "--cache-dir", help="Local cache for a remote store."),
    expect_teacher: str = typer.Option(
        None, "--expect-teacher", help="Refuse a store made by another teacher (fingerprint or name)."
    ),
    val_fraction: float = typer.Option(
        None, "--val-fraction", help="Store rows held out for kNN validation [default: 0.05]."
    ),
    save_every: int = typer.Option(None, "--save-every", help="Also save `last` every N steps."),
    betas: str = typer.Option(None, "--betas", help="AdamW betas, e.g. 0.9,0.999."),
    grad_clip: float = typer.Option(None, "--grad-clip", help="Max gradient norm; 0 = off [default: 0]."),
    w_local: float = typer.Option(
        None, "--w-local", help="Weight of the local (per-image) similarity term [1]."
    ),
    w_global: float = typer.Option(
        None, "--w-global", help="Weight of the global (batch CLS) similarity term [1]."
    ),
    w_tokens: float = typer.Option(None, "--w-tokens", help="Weight of the token cosine term [1]."),
    w_cls: float = typer.Option(None, "--w-cls", help="Weight of the CLS cosine term [1]."),
    val_bank: int = typer.Option(
        None, "--val-bank", help="Training images embedded as the validation kNN bank."
    ),
    val_k: int = typer.Option(None, "--val-k", help="k of the validation kNN [default: 20]."),
    val_temperature: float = typer.Option(
        None, "--val-temperature", help="Validation kNN temperature [0.07]."
    ),
    seed: int = typer.Option(None, "--seed", help="Seed of init, view choice and shuffling [default: 0]."),
    workers: int = typer.Option(
        None, "--workers", help="DataLoader processes [default: cores - 1, at most 8]."
    ),
    precision: str = typer.Option(None, "--precision", help="auto (bf16 on CUDA / AMX CPUs), bf16 or fp32."),
    device: str = typer.Option(None, "--device", help="auto, cpu, cuda ..."),
    decode: str = typer.Option(
        None, "--decode", help="Image decode: auto (gpu on CUDA), cpu (workers), gpu, or device."
    ),
    compile: bool = typer.Option(None, "--compile/--no-compile", help="torch.compile the student."),
    attention: str = typer.Option(
        None,
        "--attention",
        help="Student attention kernel: auto (fused on CUDA, math on CPU, where it trains ~2x faster), fused or math.",
    ),
    out: str = typer.Option(None, "--out", help="Run folder [default: runs/distill]."),
    resume: bool = typer.Option(None, "--resume", help="Continue from OUT/last."),
    config: str = typer.Option(None, "--config", help="YAML file of settings (flags win)."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show a progress bar."),
) -> None:
    """Stage 2: train the CosPress compressor and the student from a store (no teacher needed)."""
    with user_errors():
        from cospress.config import load_config
        from cospress.distill import DistillConfig, run_distill

        cfg = load_config(
            DistillConfig,
            config,
            _overrides(
                store=store,
                student=student,
                student_size=student_size,
                student_kwargs=student_kwargs,
                pretrained=pretrained,
                method=method,
                compressor=compressor,
                compressor_first=compressor_first,
                compressor_epochs=compressor_epochs,
                views_per_image=views_per_image,
                epochs=epochs,
                batch_size=batch_size,
                lr=lr,
                min_lr=min_lr,
                weight_decay=weight_decay,
                warmup_epochs=warmup_epochs,
                temperatures=temperatures,
                use_tokens=use_tokens,
                data=data,
                cache_dir=cache_dir,
                expect_teacher=expect_teacher,
                val_fraction=val_fraction,
                save_every=save_every,
                betas=betas,
                grad_clip=grad_clip,
                w_local=w_local,
                w_global=w_global,
                w_tokens=w_tokens,
                w_cls=w_cls,
                val_bank=val_bank,
                val_k=val_k,
                val_temperature=val_temperature,
                seed=seed,
                workers=workers,
                precision=precision,
                device=device,
                decode=decode,
                compile=compile,
                attention=attention,
                out=out,
                resume=resume,
            ),
        )
        with progress_bar(f"distill ({cfg.method})", progress) as update:
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
@app.command("knn-eval")
def knn_eval_cmd(
    model: str = typer.Option(
        None, "--model", help="teacher:NAME[@SIZE], a distill run folder or an exported student."
    ),
    train: str = typer.Option(None, "--train", help="Bank source (data-source syntax)."),
    test: str = typer.Option(None, "--test", help="Query source."),
    ood: list[str] = typer.Option(None, "--ood", help="Out-of-distribution source (repeatable)."),
    ood_classes: str = typer.Option(
        None, "--ood-classes", help="Classes of --test held out as near-OOD, e.g. 5,6,7,8,9."
    ),
    k: str = typer.Option(None, "--k", help="k values, e.g. 10,20,200 [default: the protocol's]."),
    temperature: float = typer.Option(
        None, "--temperature", help="Vote temperature [default: the protocol's]."
    ),
    protocol: str = typer.Option(
        None, "--protocol", help="dino (k 10/20/100/200, T 0.07) or cospress (k 10)."
    ),
    bank_store: str = typer.Option(
        None, "--bank-store", help="Use a store's cached teacher CLS as the bank."
    ),
    batch_size: int = typer.Option(None, "--batch-size", help="Images per forward [default: 256]."),
    workers: int = typer.Option(
        None, "--workers", help="DataLoader processes [default: cores - 1, at most 8]."
    ),
    limit_train: int = typer.Option(None, "--limit-train", help="Deterministic subset of the bank."),
    limit_test: int = typer.Option(
        None, "--limit-test", help="Deterministic subset of the queries (and each --ood)."
    ),
    cache_dir: str = typer.Option(
        None, "--cache-dir", help="Embedding cache [default: ~/.cache/cospress/embeddings]."
    ),
    index: str = typer.Option(None, "--index", help="flat (exact) or ivf."),
    nlist: int = typer.Option(None, "--nlist", help="IVF cells for --index ivf [default: ~4 sqrt(N)]."),
    nprobe: int = typer.Option(None, "--nprobe", help="IVF cells searched per query [default: 16]."),
    fidelity_max: int = typer.Option(
        None, "--fidelity-max", help="Test images used for fidelity [default: 2000]."
    ),
    attack_max: int = typer.Option(None, "--attack-max", help="Images attacked with PGD [default: 256]."),
    ood_k: int = typer.Option(None, "--ood-k", help="k of the k-th-neighbour OOD score [default: 50]."),
    fidelity_teacher: str = typer.Option(
        None, "--fidelity-teacher", help="Teacher for fidelity [default: the student's]; none to skip."
    ),
    robustness: bool = typer.Option(None, "--robustness/--no-robustness", help="kNN under corruptions."),
    attack: bool = typer.Option(None, "--attack/--no-attack", help="kNN under a feature-space PGD attack."),
    robustness_max: int = typer.Option(
        None, "--robustness-max", help="Images for robustness [default: 1000]."
    ),
    crop_pct: float = typer.Option(
        None, "--crop-pct", help="Eval centre-crop fraction (1.0 for tiny images)."
    ),
    seed: int = typer.Option(None, "--seed", help="Seed of subsets and corruptions."),
    precision: str = typer.Option(None, "--precision", help="auto, bf16 or fp32."),
    device: str = typer.Option(None, "--device", help="auto, cpu, cuda ..."),
    decode: str = typer.Option(
        None, "--decode", help="Image decode: auto (gpu on CUDA), cpu (workers), gpu, or device."
    ),
    out: str = typer.Option(None, "--out", help="Report folder [default: eval]."),
    config: str = typer.Option(None, "--config", help="YAML file of settings (flags win)."),
) -> None:
    """FAISS kNN accuracy, kNN OOD detection, teacher-student fidelity and robustness; a report."""
    with user_errors():
        from cospress.config import load_config
        from cospress.evaluate.runner import EvalConfig, run_knn_eval

        cfg = load_config(
            EvalConfig,
            config,
            _overrides(
                model=model,
                train=train,
                test=test,
                ood=ood or None,
                ood_classes=ood_classes,
                k=k,
                temperature=temperature,
                protocol=protocol,
                bank_store=bank_store,
                batch_size=batch_size,
                workers=workers,
                limit_train=limit_train,
                limit_test=limit_test,
                cache_dir=cache_dir,
                index=index,
                ood_k=ood_k,
                nlist=nlist,
                nprobe=nprobe,
                fidelity_max=fidelity_max,
                attack_max=attack_max,
                fidelity_teacher=fidelity_teacher,
                robustness=robustness,
                attack=attack,
                robustness_max=robustness_max,
                crop_pct=crop_pct,
                seed=seed,
                precision=precision,
                device=device,
                decode=decode,
                out=out,
            ),
        )
        report = run_knn_eval(cfg)
    rows = [("top1", report.get("top1")), ("auroc", report.get("auroc")), ("fpr95", report.get("fpr95"))]
    fid = report.get("fidelity") or {}
    rows += [(f"fidelity {k}", v) for k, v in fid.items() if isinstance(v, (int, float))]
    rows.append(("report", os.path.join(cfg.out, "report.md")))
    _table("knn-eval", [(k, f"{v:.4f}" if isinstance(v, float) else v) for k, v in rows])


# --------------------------------------------------------------------------- merge / WebDataset
@app.command("merge")
def merge_cmd(
    stores: list[str] = typer.Argument(..., help="Two or more store paths or fsspec URLs, in row order."),
    out: str = typer.Option(..., "--out", help="Folder of the merged store."),
    shard_size: int = typer.Option(None, "--shard-size", help="Rows per shard [default: the first input's]."),
    cache_dir: str = typer.Option(None, "--cache-dir", help="Local cache for remote chunks."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing store at --out."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show a progress bar."),
) -> None:
    """Merge stores of one teacher and view policy over disjoint images, without recomputing."""
    with user_errors():
        from cospress.store.merge import merge_stores

        with progress_bar("merge", progress) as update:
            manifest = merge_stores(
                stores, out, overwrite=overwrite, shard_size=shard_size, cache_dir=cache_dir, progress=update
            )
    counts = manifest["counts"]
    _table(
        "merge",
        [("store", out), ("inputs", len(stores)), ("rows", counts["rows"]), ("valid", counts["valid"])],
    )


@app.command("export-wds")
def export_wds_cmd(
    store: str = typer.Argument(..., help="Store path or fsspec URL."),
    out: str = typer.Option(..., "--out", help="Empty folder for the tar shards + cospress-wds.json."),
    samples_per_shard: int = typer.Option(1000, "--samples-per-shard", help="Samples per tar shard."),
    cache_dir: str = typer.Option(None, "--cache-dir", help="Local cache for remote chunks."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show a progress bar."),
) -> None:
    """Export a store as WebDataset tar shards (.npy targets, .json view parameters)."""
    with user_errors():
        from cospress.store.wds_io import export_wds

        with progress_bar("export-wds", progress) as update:
            info = export_wds(
                store, out, samples_per_shard=samples_per_shard, cache_dir=cache_dir, progress=update
            )
    _table("export-wds", [("folder", out), ("samples", info["samples"]), ("tar shards", len(info["shards"]))])


@app.command("import-wds")
def import_wds_cmd(
    src: str = typer.Argument(..., help="A folder written by export-wds."),
    out: str = typer.Option(..., "--out", help="Folder of the new store."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing store at --out."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show a progress bar."),
) -> None:
    """Rebuild a store from an export-wds folder (checksums and member paths checked)."""
    with user_errors():
        from cospress.store.wds_io import import_wds

        with progress_bar("import-wds", progress) as update:
            manifest = import_wds(src, out, overwrite=overwrite, progress=update)
    _table("import-wds", [("store", out), ("rows", manifest["counts"]["rows"])])


def main(argv: list[str] | None = None) -> None:
    """Console entry point (``cospress``)."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    app(args=argv, prog_name="cospress")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
