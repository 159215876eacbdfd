"""Stage 1, ``cospress extract-teacher``: K recorded views of every image -> teacher -> a store."""

from cospress import lazy_exports
from cospress.extract.config import ExtractConfig

__all__ = ["ExtractConfig", "run_extract"]
__getattr__ = lazy_exports(__name__, {"run_extract": "cospress.extract.run"})
