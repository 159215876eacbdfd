"""knn-eval settings: one field per setting, with its default and help (flags and YAML keys are generated)."""

from __future__ import annotations

from dataclasses import dataclass

from cospress import config as shared
from cospress.config import setting
from cospress.errors import ConfigError

DEFAULT_CACHE_DIR = "~/.cache/cospress/embeddings"


@dataclass
class EvalConfig:
    """Settings of ``cospress knn-eval``. Every field is a YAML key and a ``--flag``."""

    model: str = setting(
        "",
        help="teacher:NAME[@SIZE][=WEIGHTS], random:NAME[@SIZE], a distill run folder or an exported student.",
    )
    train: str | None = setting(None, help="Bank source (data-source syntax).")
    test: str = setting("", help="Query source.")
    ood: list[str] = setting(
        help="Out-of-distribution set [near:|far:][NAME=]SRC (repeatable); groups get a mean row.",
        factory=list,
        repeatable=True,
    )
    ood_classes: list[str] = setting(
        help="Classes held out as near-OOD: names (Sandal,Shirt) or numbers in the bank's class list (5,6).",
        factory=list,
        shown="none",
    )
    k: list[int] | None = setting(None, help="k values, e.g. 10,20,200.", shown="the protocol's")
    temperature: float | None = setting(None, help="Vote temperature.", shown="the protocol's")
    protocol: str = setting("dino", help="dino (k 10/20/100/200, headline 20, T 0.07) or cospress (k 10).")
    bank_store: str | None = setting(
        None, help="Use a store's cached teacher CLS as the bank instead of --train."
    )
    batch_size: int = setting(256, help="Images per forward, at most (see --memory-budget-mb).")
    memory_budget_mb: int = setting(
        512,
        help="Activation memory of one batch (MB): embedding, corruption and attack batches are sized to it.",
    )
    out: str = setting("eval", help="Report folder.")
    workers: int = shared.workers_setting("decode + eval transform")
    limit_train: int | None = setting(None, help="Deterministic subset of the bank.")
    limit_test: int | None = setting(None, help="Deterministic subset of the queries (and each --ood).")
    cache_dir: str | None = setting(DEFAULT_CACHE_DIR, help="Embedding cache; '' or none: no cache.")
    index: str = setting("flat", help="flat (exact) or ivf.")
    nlist: int | None = setting(None, help="IVF cells for --index ivf.", shown="~4 sqrt(N)")
    nprobe: int = setting(16, help="IVF cells searched per query.")
    ood_k: int = setting(50, help="k of the k-th-neighbour OOD score.")
    linear: bool = setting(
        False, help="Also a linear probe on the cached bank features (a grid of learning rates; fast)."
    )
    fidelity_teacher: str | None = setting(
        None, help="Teacher for fidelity; none to skip.", shown="the teacher recorded with the student"
    )
    fidelity_max: int = setting(2000, help="Test images used for fidelity.")
    robustness: bool = setting(
        False, help="Also kNN under corruptions and (with --attack) a feature PGD attack; slow."
    )
    attack: bool = setting(
        True, help="With --robustness: the PGD attack too (--no-attack: corruptions only)."
    )
    robustness_max: int = setting(1000, help="Images for robustness.")
    attack_max: int = setting(256, help="Images attacked with PGD.")
    seed: int = setting(0, help="Seed of subsets and corruptions.")
    crop_pct: float = setting(0.875, help="Eval centre-crop fraction (1.0 for tiny images, e.g. 28 px).")
    device: str = shared.device_setting()
    precision: str = shared.precision_setting()
    decode: str = shared.decode_setting()

    def validate(self) -> None:
        """Refuse settings that cannot work, in one line (a ConfigError). ``run_knn_eval`` calls it once,
        first, before anything loads; building the config checks only each value's type and choices, so a
        config without --model (a YAML file the command line completes) loads."""
        from cospress.data.device_decode import DECODE_CHOICES
        from cospress.evaluate.knn import PROTOCOLS
        from cospress.evaluate.ood import parse_ood_specs

        if not self.model:
            raise ConfigError("no --model given; pass teacher:NAME or a distill run / export folder")
        if not self.test:
            raise ConfigError("no --test source given; pass e.g. --test fashion-mnist:test")
        if bool(self.train) == bool(self.bank_store):
            raise ConfigError("give exactly one bank: --train SOURCE or --bank-store STORE")
        if self.protocol not in PROTOCOLS:
            raise ConfigError(f"unknown --protocol {self.protocol!r}; use {' or '.join(PROTOCOLS)}")
        if self.index not in ("flat", "ivf"):
            raise ConfigError(f"unknown --index {self.index!r}; use flat or ivf")
        if not 0 < self.crop_pct <= 1:
            raise ConfigError(f"--crop-pct must be in (0, 1], got {self.crop_pct}")
        if self.k is not None and (not self.k or min(self.k) < 1):
            raise ConfigError("--k takes positive integers, e.g. --k 10,20")
        if self.memory_budget_mb < 1:
            raise ConfigError("--memory-budget-mb must be at least 1")
        if self.ood_k < 1:
            raise ConfigError("--ood-k must be at least 1")
        parse_ood_specs(self.ood)
        if self.decode not in DECODE_CHOICES:
            raise ConfigError(f"unknown --decode {self.decode!r}; use {', '.join(DECODE_CHOICES)}")
