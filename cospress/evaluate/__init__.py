"""``cospress knn-eval``: FAISS kNN, kNN OOD detection, teacher-student fidelity, robustness, a report."""

from cospress import lazy_exports
from cospress.evaluate.config import EvalConfig

__all__ = ["EvalConfig", "run_knn_eval"]
__getattr__ = lazy_exports(__name__, {"run_knn_eval": "cospress.evaluate.run"})
