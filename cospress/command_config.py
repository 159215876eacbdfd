"""The settings of the commands that are not stages (inspect, verify, export, merge, export-wds,
import-wds, publish): one dataclass per command, each setting declared once with
:func:`cospress.config.setting` (default + help), like the stages' configs.

The command line generates these commands' flags from the fields (``cospress/cli_store.py``), and the
library functions take their defaults from the same fields (e.g. ``export_wds(samples_per_shard=
ExportWdsConfig.samples_per_shard)``), so each default is written once. Fields marked
``argument=True`` are positional arguments; a field without a default is required.
"""

from __future__ import annotations

from dataclasses import dataclass

from cospress.config import setting


def store_setting(help: str = "Store path or fsspec URL.") -> object:
    return setting(help=help, argument=True)


def cache_dir_setting() -> object:
    return setting(None, help="Local cache for remote chunks.")


def overwrite_setting(help: str = "Replace an existing store at --out.") -> object:
    return setting(False, help=help, flag="--overwrite")


@dataclass
class InspectConfig:
    store: str = store_setting()
    cache_dir: str | None = cache_dir_setting()
    as_json: bool = setting(False, help="Print the summary as JSON.", flag="--json")
    reference: str | None = setting(
        None,
        help="Measure the token codec's fidelity against this store of the same run (e.g. its fp16 store).",
    )
    rows: int = setting(64, help="Rows sampled for --reference (one view each).")


@dataclass
class VerifyConfig:
    store: str = store_setting()
    cache_dir: str | None = cache_dir_setting()


@dataclass
class ExportConfig:
    run: str = setting(help="A distill run folder.", argument=True)
    out: str = setting(help="Folder for student.safetensors + student.json.")
    which: str = setting("best", help="best or last checkpoint.", choices=("best", "last"))
    format: str = setting(
        "safetensors",
        help="safetensors (+ student.json, loads in timm) or onnx (also student.onnx: opset 18, dynamic "
        "batch, checked against the PyTorch student with onnxruntime; needs the onnx extra).",
        choices=("safetensors", "onnx"),
    )


@dataclass
class MergeConfig:
    stores: list[str] = setting(help="Two or more store paths or fsspec URLs, in row order.", argument=True)
    out: str = setting(help="Folder of the merged store.")
    shard_size: int | None = setting(None, help="Rows per shard.", shown="the first input's")
    cache_dir: str | None = cache_dir_setting()
    overwrite: bool = overwrite_setting()


@dataclass
class ExportWdsConfig:
    store: str = store_setting()
    out: str = setting(help="Empty folder for the tar shards + cospress-wds.json.")
    samples_per_shard: int = setting(1000, help="Samples per tar shard.")
    cache_dir: str | None = cache_dir_setting()


@dataclass
class ImportWdsConfig:
    src: str = setting(help="A folder written by export-wds.", argument=True)
    out: str = setting(help="Folder of the new store.")
    overwrite: bool = overwrite_setting()


@dataclass
class PublishConfig:
    store: str = store_setting("A finished local store.")
    url: str = setting(help="Destination: an fsspec URL (s3://, gs://, ...) or a folder.", argument=True)
    overwrite: bool = overwrite_setting(
        "Replace another cospress store at URL (never a folder of other files)."
    )


@dataclass
class PlanConfig:
    images: int | None = setting(None, help="N: images (default: the --store's rows).")
    views: int | None = setting(
        None, help="K: views per image (default: the --store's, extensions included)."
    )
    views_per_image: int = setting(3, help="R: views of each image per batch.")
    epochs: float = setting(100.0, help="Training epochs.")
    refresh: float = setting(
        0.0,
        help="distill --refresh F: the fraction of each batch's views drawn fresh (stored views shown 1 - F as often).",
    )
    store: str | None = setting(None, help="Read N, K and the size per view from this store.")
    dim: int = setting(384, help="Teacher dim, for the size without --store (ViT-S: 384).")
    num_tokens: int = setting(
        256, help="Teacher patch tokens kept per view (0: CLS only), for the size without --store."
    )
