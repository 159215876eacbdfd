"""Shared test settings: offline hub, few threads, small deterministic fixtures."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("COSPRESS_CACHE_DIR", __import__("tempfile").mkdtemp(prefix="cospress-test-cache-"))
os.environ.setdefault("COSPRESS_IO_BACKOFF", "0.05")  # retried remote reads (cospress.netio): short waits

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
