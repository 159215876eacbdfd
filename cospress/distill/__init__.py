"""Stage 2, ``cospress distill``: train the compressor and the student from a store's targets.

The config imports light (the CLI builds its flags from it); the runner loads torch when first used.
"""

from typing import Any

from cospress.distill.config import DistillConfig

__all__ = ["DistillConfig", "run_distill"]


def __getattr__(name: str) -> Any:
    if name == "run_distill":
        from cospress.distill.run import run_distill

        return run_distill
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
