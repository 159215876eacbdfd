"""Stage 2, ``cospress distill``: train the compressor and the student from a store's targets."""

from cospress import lazy_exports
from cospress.distill.config import DistillConfig

__all__ = ["DistillConfig", "run_distill"]
__getattr__ = lazy_exports(__name__, {"run_distill": "cospress.distill.run"})
