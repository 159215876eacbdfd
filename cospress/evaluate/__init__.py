"""``cospress knn-eval``: FAISS kNN, kNN OOD detection, teacher-student fidelity, robustness, a report.

The config imports light (the CLI builds its flags from it); the runner loads torch when first used.
"""

from typing import Any

from cospress.evaluate.config import EvalConfig

__all__ = ["EvalConfig", "run_knn_eval"]


def __getattr__(name: str) -> Any:
    if name == "run_knn_eval":
        from cospress.evaluate.run import run_knn_eval

        return run_knn_eval
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
