"""The store commands (inspect, verify, export, merge, export-wds, import-wds, publish, plan).

Each command's flags are generated from its config dataclass in ``cospress/command_config.py``
(``store_command``), as the stages' are from theirs; ``cli.py`` registers ``COMMANDS`` on the app.
"""

from __future__ import annotations

import inspect
import json
import time
from collections.abc import Callable
from typing import Any

import typer

from cospress.cli_ui import console, job, table, user_errors
from cospress.command_config import (
    ExportConfig,
    ExportWdsConfig,
    ImportWdsConfig,
    InspectConfig,
    MergeConfig,
    PlanConfig,
    PublishConfig,
    VerifyConfig,
)
from cospress.config import from_dict
from cospress.flags import command_parameters, progress_parameter

COMMANDS: list[tuple[str, Callable]] = []  # (name, typer command), in the order of `cospress --help`


def store_command(name: str, cls: type, *, progress: bool = False) -> Callable[[Callable], Callable]:
    """Register ``body(cfg)`` (or ``body(cfg, show_progress)``) as command ``name`` whose flags are
    the fields of ``cls`` (plus ``--progress/--no-progress`` when ``progress``)."""

    def register(body: Callable) -> Callable:
        def command(**flags: Any) -> None:
            show = flags.pop("progress", True)
            with user_errors():
                cfg = from_dict(cls, flags, source="flags")
            body(cfg, show) if progress else body(cfg)

        extra = [progress_parameter()] if progress else []
        command.__signature__ = inspect.Signature(command_parameters(cls) + extra)  # type: ignore[attr-defined]
        command.__doc__ = body.__doc__
        command.__name__ = body.__name__
        COMMANDS.append((name, command))
        return body

    return register


@store_command("inspect", InspectConfig)
def inspect_cmd(cfg: InspectConfig) -> None:
    """Print a store's summary: teacher, view policy, token codec and its fidelity, shapes, sizes, skipped inputs."""
    with user_errors():
        from cospress.store import StoreReader
        from cospress.store.fidelity import measure_against

        reader = StoreReader(cfg.store, cache_dir=cfg.cache_dir)
        summary = reader.summary()
        if cfg.reference:
            reference = StoreReader(cfg.reference, cache_dir=cfg.cache_dir)
            summary["fidelity_vs_reference"] = measure_against(reader, reference, cfg.rows)
    if cfg.as_json:
        print(json.dumps(summary, indent=2, default=str))
        return
    rows = [(k, json.dumps(v, default=str) if isinstance(v, (dict, list)) else v) for k, v in summary.items()]
    table(f"store {summary['url']}", rows)


@store_command("verify", VerifyConfig)
def verify_cmd(cfg: VerifyConfig) -> None:
    """Recompute every shard checksum; name corrupted shards and exit non-zero if any."""
    with user_errors():
        from cospress.store import StoreReader

        reader = StoreReader(cfg.store, cache_dir=cfg.cache_dir)
        t0 = time.perf_counter()
        bad = reader.verify()
    if bad:
        for b in bad:
            what = f"{b['file']} (shard {b['shard']})" if b.get("shard") is not None else b["file"]
            got = "the file is missing" if b.get("actual") is None else f"got {str(b['actual'])[:12]}..."
            console.print(
                f"[red]corrupted[/] {what}: expected sha256 {str(b.get('expected'))[:12]}..., {got}"
            )
        console.print(f"[bold red]verify failed:[/] {len(bad)} corrupted file(s) in {reader.display}")
        raise typer.Exit(1)
    console.print(
        f"[green]ok[/] {reader.display}: every shard checksum matches ({time.perf_counter() - t0:.1f}s)"
    )


@store_command("export", ExportConfig)
def export_cmd(cfg: ExportConfig) -> None:
    """Export the student as safetensors + JSON (timm name, input size, mean/std), and as ONNX with --format onnx."""
    with user_errors():
        from cospress.export import export_student

        info = export_student(cfg.run, cfg.out, which=cfg.which, format=cfg.format)
    rows = [(k, v) for k, v in info.items() if not isinstance(v, (dict, list))]
    if "onnx" in info:
        onnx = info["onnx"]
        rows.append(("onnx", f"{onnx['file']} (opset {onnx['opset']}, dynamic batch)"))
        rows.append(
            ("onnx max abs diff vs PyTorch", f"{onnx['max_abs_diff']:.3g} on {onnx['checked_images']} images")
        )
    table(f"exported to {cfg.out}", rows)


@store_command("merge", MergeConfig, progress=True)
def merge_cmd(cfg: MergeConfig, show_progress: bool) -> None:
    """Merge stores of one teacher and view policy over disjoint images, without recomputing."""
    from cospress.store.merge import merge_stores

    options = {"overwrite": cfg.overwrite, "shard_size": cfg.shard_size, "cache_dir": cfg.cache_dir}
    manifest = job("merge", show_progress, merge_stores, cfg.stores, cfg.out, **options)
    counts = manifest["counts"]
    rows = [("store", cfg.out), ("inputs", len(cfg.stores)), ("rows", counts["rows"])]
    table("merge", rows + [("valid", counts["valid"])])


@store_command("export-wds", ExportWdsConfig, progress=True)
def export_wds_cmd(cfg: ExportWdsConfig, show_progress: bool) -> None:
    """Export a store as WebDataset tar shards (.npy targets, .json view parameters)."""
    from cospress.store.wds_io import export_wds

    options = {"samples_per_shard": cfg.samples_per_shard, "cache_dir": cfg.cache_dir}
    info = job("export-wds", show_progress, export_wds, cfg.store, cfg.out, **options)
    rows = [("folder", cfg.out), ("samples", info["samples"]), ("tar shards", len(info["shards"]))]
    table("export-wds", rows)


@store_command("import-wds", ImportWdsConfig, progress=True)
def import_wds_cmd(cfg: ImportWdsConfig, show_progress: bool) -> None:
    """Rebuild a store from an export-wds folder (checksums and member paths checked)."""
    from cospress.store.wds_io import import_wds

    manifest = job("import-wds", show_progress, import_wds, cfg.src, cfg.out, overwrite=cfg.overwrite)
    table("import-wds", [("store", cfg.out), ("rows", manifest["counts"]["rows"])])


@store_command("publish", PublishConfig, progress=True)
def publish_cmd(cfg: PublishConfig, show_progress: bool) -> None:
    """Upload a finished store as a transaction: local checksums first, manifest last (resumable)."""
    from cospress.store.publish import publish_store

    info = job(
        "publish", show_progress, publish_store, cfg.store, cfg.url, unit="file", overwrite=cfg.overwrite
    )
    sent = f"{info['sent']} ({info['bytes_sent']:,} bytes) / {info['already_there']}"
    rows = [("store", info["url"]), ("files sent / already there", sent)]
    checked = f"{info['files']} files, every checksum matches"  # sha256 here; size + ETag or ranges there
    table("publish", rows + [("checked", checked)])


@store_command("plan", PlanConfig)
def plan_cmd(cfg: PlanConfig) -> None:
    """Plan K before extracting: reuse (epochs x R / K), store size and the K the reuse study recommends."""
    with user_errors():
        from cospress.distill.reuse import plan_store

        info = plan_store(cfg)
    table("plan", [(k, v) for k, v in info.items() if k != "warning"])
    if info["warning"]:
        console.print(f"[yellow]warning:[/] {info['warning']}")
