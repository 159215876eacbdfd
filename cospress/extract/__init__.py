"""Stage 1, ``cospress extract-teacher``: K recorded views of every image -> teacher -> a store.

The config imports light (the CLI builds its flags from it); the runner loads torch when first used.
"""

from typing import Any

from cospress.extract.config import ExtractConfig

__all__ = ["ExtractConfig", "run_extract"]


def __getattr__(name: str) -> Any:
    if name == "run_extract":
        from cospress.extract.run import run_extract

        return run_extract
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
