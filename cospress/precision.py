"""``--precision``: its allowed values, declared once, and the one name of each compute dtype.

Torch-free, so the command line builds every stage's flag from it (``config.precision_setting``
refuses another value while the flags are read, before anything loads); ``runtime.autocast_dtype``
turns a value into the autocast dtype and ``runtime.dtype_name`` names the dtype a run used.
"""

from __future__ import annotations

PRECISIONS = ("auto", "bf16", "fp32")  # auto = bf16 on CUDA and on CPUs with AMX or AVX-512 BF16
DTYPE_NAMES = {"bf16": "bfloat16", "fp32": "float32"}  # the name recorded (store identity, caches)
