"""Stage 2 settings: one field per setting, with its default and help (flags and YAML keys are generated)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from cospress import config as shared
from cospress.config import mapping_from_text, setting
from cospress.errors import ConfigError
from cospress.loggers import check_loggers

METHODS = ("cospress", "cosine", "mse", "smooth-l1")
COMPRESSORS = ("linear", "mlp")
READERS = ("auto", "stream", "random")


def _default_temperatures() -> list[float]:
    from cospress.losses import DEFAULT_TEMPERATURES

    return list(DEFAULT_TEMPERATURES)


@dataclass
class DistillConfig:
    """Stage 2 settings. Every field is a YAML key and a ``--flag`` of ``cospress distill``."""

    store: str = setting(
        "store", help="Store path or fsspec URL (from extract-teacher); not read with --teacher."
    )
    out: str = setting("runs/distill", help="Run folder: config.yaml, metrics.jsonl, checkpoints.")
    logger: list[str] = setting(
        help="Also log every metrics row to tensorboard (OUT/tensorboard), wandb or mlflow (comma-separated; "
        "the package must be installed); metrics.jsonl is always written.",
        factory=list,
    )
    data: str | None = setting(None, help="Image source.", shown="the one recorded in the store")
    cache_dir: str | None = setting(None, help="Local cache for a remote store's shard files.")
    reader: str = setting(
        "auto",
        help="Store reader: stream (whole shard files, once per epoch per rank), random (one read per "
        "row and view) or auto (stream from a URL without --cache-dir or a local store over 16 GiB; "
        "the log says which).",
    )
    stream_buffer: int = setting(4, help="Stream reader: shards shuffled together (the sample buffer).")
    stream_prefetch: int = setting(2, help="Stream reader: shards fetched ahead per loader worker.")
    expect_teacher: str | None = setting(
        None, help="Refuse a store made by another teacher (fingerprint or name)."
    )
    teacher: str | None = setting(
        None,
        help="Online mode: run this teacher (as extract-teacher's --teacher) on fresh views every step "
        "instead of reading a store; with --refresh, only checked to be the store's teacher (name or fingerprint).",
    )
    refresh: float = setting(
        0.0,
        help="Hybrid mode (with --store): a fraction F (0 < F <= 1) of each batch's views drawn fresh (keyed by seed, "
        "epoch, step) from the store's view policy and run through the store's teacher (built from its record; "
        "--weights if it came from a file), the rest read from the store; random-access reader only; 0 = off.",
    )
    weights: str | None = setting(None, help="Online mode, or --refresh: local weights file of the teacher.")
    image_size: int | None = setting(
        None, help="Online mode: teacher input resolution.", shown="the teacher's"
    )
    limit: int | None = setting(None, help="Online mode: use a deterministic subset of N images of --data.")
    scale_min: float = shared.view_setting("scale_min", "Online mode: ")
    scale_max: float = shared.view_setting("scale_max", "Online mode: ")
    flip: float = shared.view_setting("flip", "Online mode: ")
    rand_augment: str = shared.view_setting("rand_augment", "Online mode: ")
    erase_prob: float = shared.view_setting("erase_prob", "Online mode: ")
    erase_mode: str = shared.view_setting("erase_mode", "Online mode: ")
    method: str = setting("cospress", help="cospress (the paper), cosine, mse or smooth-l1.")
    compressor: str = setting("linear", help="Compressor h: linear (paper: LayerNorm + Linear) or mlp.")
    compressor_first: bool = setting(
        False,
        help="Fit h from the store alone, freeze it, then train the student.",
        flag="--compressor-first",
    )
    compressor_epochs: int = setting(5, help="Epochs of the compressor-only fit.")
    student: str = setting("vit_tiny_patch16_224", help="timm model name of the student.")
    student_size: int = setting(64, help="Student input resolution (px).")
    student_kwargs: dict[str, Any] = setting(
        help="Extra timm kwargs as JSON or k=v,k=v, e.g. '{\"depth\": 6}'.", factory=dict, shown="{}"
    )
    pretrained: bool = setting(
        False, help="Start the student from hub weights.", flag="--pretrained/--random-init"
    )
    epochs: int = setting(5, help="Training epochs.")
    batch_size: int = setting(192, help="Views per global batch (all ranks together).")
    views_per_image: int | None = setting(
        None,
        help="R: views of each image in a batch, drawn from the store's stored views (online: fresh ones).",
        shown="min(3, the store's stored views); 3 online",
    )
    lr: float = setting(5e-4, help="AdamW learning rate.")
    min_lr: float = setting(1e-5, help="Final learning rate of the cosine schedule.")
    weight_decay: float = setting(0.05, help="AdamW weight decay (not on norms, biases, pos / cls tokens).")
    betas: tuple[float, float] = setting((0.9, 0.999), help="AdamW betas, e.g. 0.9,0.999.", shown="0.9,0.999")
    warmup_epochs: float = setting(1.0, help="Linear warm-up epochs, then cosine to --min-lr.")
    grad_clip: float = setting(0.0, help="Max gradient norm; 0 = off.")
    temperatures: list[float] = setting(
        help="Similarity temperatures, e.g. 0.01,0.02,...,0.1.",
        factory=_default_temperatures,
        shown="0.01,0.02,...,0.1",
    )
    w_local: float = setting(1.0, help="Weight of the local (per-image) similarity term.")
    w_global: float = setting(1.0, help="Weight of the global (batch CLS) similarity term.")
    w_tokens: float = setting(1.0, help="Weight of the token cosine term.")
    w_cls: float = setting(1.0, help="Weight of the CLS cosine term.")
    use_tokens: bool = setting(
        True, help="Use the token terms (when the store has tokens).", flag="--tokens/--no-tokens"
    )
    precision: str = shared.precision_setting()
    device: str = shared.device_setting()
    workers: int = shared.workers_setting("decode + replay, or only reading bytes with --decode device")
    decode: str = shared.decode_setting()
    compile: bool = setting(False, help="torch.compile the student.")
    attention: str = setting(
        "auto",
        help="Student attention kernel: auto (fused on CUDA, math on CPU, where it trains ~2x faster), fused or math.",
    )
    seed: int = setting(0, help="Seed of init, view choice and shuffling.")
    val_fraction: float = setting(0.05, help="Store rows held out (by sha256 of the key) for kNN validation.")
    val_bank: int = setting(10000, help="Training images embedded as the validation kNN bank.")
    val_k: int = setting(20, help="k of the validation kNN.")
    val_temperature: float = setting(0.07, help="Validation kNN temperature.")
    save_every: int = setting(0, help="Also save `last` every N steps (0 = at epoch ends only).")
    resume: bool = setting(False, help="Continue from OUT/last.", flag="--resume")

    def validate(self) -> None:
        """Refuse settings that cannot work, in one line (a ConfigError). ``distill.run.prepare`` calls it
        once, first (then checks the batch against the store); building the config checks only each value's
        type and choices."""
        from cospress.data.device_decode import DECODE_CHOICES
        from cospress.models.timm_features import ATTENTION_CHOICES

        _one_of("method", self.method, METHODS)
        _one_of("compressor", self.compressor, COMPRESSORS)
        _one_of("attention", self.attention, ATTENTION_CHOICES)
        _one_of("decode", self.decode, DECODE_CHOICES)
        _one_of("reader", self.reader, READERS)
        check_loggers(self.logger)
        if self.stream_buffer < 1 or self.stream_prefetch < 1:
            raise ConfigError("stream_buffer and stream_prefetch must be >= 1")
        online = self.teacher is not None and not self.refresh  # with --refresh, --teacher names the store's
        if not 0.0 <= self.refresh <= 1.0:
            raise ConfigError(
                f"refresh={self.refresh} must be a fraction of each batch's views, 0 < F <= 1 (0 = off)"
            )
        if self.refresh and (self.limit is not None or self.image_size):
            raise ConfigError(
                "--refresh runs the store's teacher at its size on the store's rows: drop limit, image_size"
            )
        if not online and not self.refresh and (self.limit is not None or self.weights or self.image_size):
            raise ConfigError("limit, weights and image_size apply to online mode (--teacher) only")
        if not online and (self.rand_augment or self.erase_prob or self.erase_mode != "pixel"):
            raise ConfigError(
                "rand_augment, erase_prob and erase_mode apply to online mode (--teacher): a store replays the views it recorded"
            )
        if online:
            from cospress.data.policy import ViewPolicy

            ViewPolicy.from_settings(self)  # a bad RandAugment string or probability fails here, in one line
        if online and self.compressor_first:
            raise ConfigError(
                "compressor_first fits h from a store's features: online mode (--teacher) has none"
            )
        if self.compressor_first and self.method != "cospress":
            raise ConfigError("compressor_first applies to method cospress only")
        if self.epochs < 1 or self.batch_size < 1:
            raise ConfigError("epochs and batch_size must be >= 1")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ConfigError(f"val_fraction={self.val_fraction} must be in [0, 1)")
        if not self.temperatures or min(self.temperatures) <= 0:
            raise ConfigError("temperatures must be a non-empty list of positive numbers")


def parse_kwargs(value: Any) -> dict[str, Any]:
    """``student_kwargs`` from a dict, a JSON object, or ``k=v,k=v`` (values parsed as YAML scalars)."""
    if isinstance(value, dict):
        return dict(value)
    return mapping_from_text("student_kwargs", "" if value is None else str(value))


def _one_of(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"{name} {value!r} is unknown; use one of {', '.join(choices)}")
