"""Stage 1 settings: one field per setting, with its default and help (flags and YAML keys are generated)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

from cospress import config as shared
from cospress.config import setting
from cospress.data.sources import DEFAULT_MAX_PIXELS
from cospress.errors import ConfigError
from cospress.store.row_order import ROW_ORDERS

if TYPE_CHECKING:
    from cospress.data.policy import ViewPolicy
    from cospress.store.codecs import CodecSpec


WRITER_KINDS = ("auto", "process", "thread")


def default_writers() -> int:
    """Shard writers: a quarter of the cores (the rest decode views), at least 1."""
    return max(1, (os.cpu_count() or 2) // 4)


@dataclass
class ExtractConfig:
    """Stage 1 settings. Every field is a YAML key and a ``--flag`` of ``cospress extract-teacher``."""

    data: str = setting(
        "fashion-mnist:train", help="Image source: folder:PATH, wds:PATTERN, fashion-mnist:train|test."
    )
    teacher: str = setting(
        "efficientnet_lite0", help="timm model name (hub weights), or efficientnet_lite0 (offline)."
    )
    weights: str | None = setting(None, help="Local weights file (safetensors or a torch state dict).")
    views: int = setting(8, help="K: augmented views per image.")
    image_size: int | None = setting(None, help="Teacher input resolution.", shown="the teacher's")
    limit: int | None = setting(None, help="Use a deterministic subset of N images.")
    tokens: bool = setting(True, help="Store patch tokens.")
    token_codec: str = setting(
        "fp16",
        help="How tokens are stored: fp16, int8 (per-token scale; ~0.5x the bytes), pca:K (K principal "
        "components fitted on a sample, then int8) or pca (the fewest components reaching --token-fidelity).",
    )
    token_fidelity: float = setting(
        0.99, help="pca without K: the fidelity to reach (1 - mean |token-cosine error| on held-out views)."
    )
    center_view: bool = setting(False, help="Also store the full-image view (as view index K).")
    seed: int = setting(0, help="Seed of the view parameters.")
    workers: int = shared.workers_setting("decode + replay of the views")
    writers: int = setting(
        help="Shard writers: each compresses, hashes and writes whole shards (~0.85 GB/s of fp16 features "
        "per writer with the default codecs, docs/performance.md).",
        factory=lambda: default_writers(),
        shown="cores / 4, at least 1",
    )
    writer_kind: str = setting(
        "auto",
        choices=WRITER_KINDS,
        help="process: each writer a process of its own, its shard buffers in shared memory (no GIL "
        "shared with the teacher's loop; Linux); thread: threads of this process; auto: processes for 2 "
        "or more writers where possible, else a thread.",
    )
    batch_size: int = setting(256, help="Views per teacher forward.")
    shard_size: int = setting(1024, help="Images per shard.")
    row_order: str = setting(
        "auto",
        choices=ROW_ORDERS,
        help="Order of the store's rows: shuffled (a seeded mix, so a streamed epoch sees mixed batches), "
        "source (the source's own order), auto: source for wds: sources, shuffled otherwise.",
    )
    scale_min: float = shared.view_setting("scale_min")
    scale_max: float = shared.view_setting("scale_max")
    flip: float = shared.view_setting("flip")
    color_jitter: float = setting(0.0, help="Probability of colour jitter.")
    grayscale: float = setting(0.0, help="Probability of grayscale.")
    blur: float = setting(0.0, help="Probability of gaussian blur.")
    rand_augment: str = shared.view_setting("rand_augment")
    erase_prob: float = shared.view_setting("erase_prob")
    erase_mode: str = shared.view_setting("erase_mode")
    max_pixels: int = setting(DEFAULT_MAX_PIXELS, help="Skip images with more pixels (decompression bombs).")
    precision: str = shared.precision_setting()
    device: str = shared.device_setting()
    decode: str = shared.decode_setting()
    out: str = setting(
        "store",
        help="Store directory, or an fsspec URL (s3://bucket/store) written directly, with no local copy.",
    )
    overwrite: bool = setting(
        False, help="Replace an existing store made with other settings.", flag="--overwrite"
    )
    append: bool = setting(
        False, help="Add the images of --data that the complete store lacks (new shards).", flag="--append"
    )
    add_views: int = setting(
        0,
        help="Add N views of every row to the complete store --to, as a view extension (views K..K+N-1, "
        "exactly those of a K+N store of the same seed; the store itself is not rewritten).",
    )
    to: str | None = setting(None, help="The store --add-views extends (local).")

    def validate(self) -> None:
        """Refuse settings that cannot work, in one line (a ConfigError). ``run_extract`` calls it once,
        first, before anything loads; building the config checks only each value's type and choices."""
        if self.views < 1:
            raise ConfigError(f"--views must be at least 1, got {self.views}")
        if self.shard_size < 1:
            raise ConfigError(f"--shard-size must be at least 1, got {self.shard_size}")
        if self.batch_size < 1:
            raise ConfigError(f"--batch-size must be at least 1, got {self.batch_size}")
        if self.writers < 1:
            raise ConfigError(f"--writers must be at least 1, got {self.writers}")
        if self.writer_kind == "process":
            from cospress.extract.writer_proc import processes_supported

            if not processes_supported():
                raise ConfigError(
                    "--writer-kind process needs Linux (memfd_create); use --writer-kind thread"
                )
        if self.workers < 0:
            raise ConfigError(f"--workers must be 0 or more, got {self.workers}")
        from cospress.store.codecs import parse_codec

        parse_codec(self.token_codec)  # a bad codec fails here, in one line
        if not 0 < self.token_fidelity <= 1:
            raise ConfigError(f"--token-fidelity must be in (0, 1], got {self.token_fidelity}")
        if self.add_views < 0 or (self.add_views and not self.to) or (self.to and not self.add_views):
            raise ConfigError("--add-views N (N >= 1) and --to STORE go together")
        if self.add_views and self.append:
            raise ConfigError("--add-views adds views to every row, --append adds rows: choose one")
        if "://" in self.out and not self.out.startswith("file://"):
            if self.append:
                raise ConfigError("--append works on a local store; append locally, then publish it")
            if self.codec().name == "pca":
                raise ConfigError(
                    "--token-codec pca writes to a local store; extract locally, then publish it"
                )
        if self.append and self.overwrite:
            raise ConfigError("--append adds to an existing store, --overwrite replaces it: choose one")
        if not 0 < self.scale_min <= self.scale_max <= 1:
            raise ConfigError(f"need 0 < scale-min <= scale-max <= 1, got {self.scale_min}, {self.scale_max}")
        self.policy()  # a bad RandAugment string or probability fails here, in one line

    def writer_kind_used(self) -> str:
        """``writer_kind`` with auto resolved: processes for 2 or more writers where supported."""
        if self.writer_kind != "auto":
            return self.writer_kind
        from cospress.extract.writer_proc import processes_supported

        return "process" if self.writers >= 2 and processes_supported() else "thread"

    @property
    def stored_views(self) -> int:
        """Stored views per image: the K random views, plus the centre view when asked for."""
        return self.views + int(self.center_view)

    def codec(self) -> CodecSpec:
        """The token codec this run writes: ``--token-codec``, or fp16 with ``--no-tokens`` (the one
        place that decides it; `codec_fit.choose_codec` fits or reuses a pca projection for it)."""
        from cospress.store.codecs import parse_codec

        return parse_codec(self.token_codec if self.tokens else "fp16")

    def policy(self) -> ViewPolicy:
        from cospress.data.policy import ViewPolicy

        return ViewPolicy.from_settings(self)
