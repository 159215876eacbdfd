"""A rank waits for the others at most $COSPRESS_DIST_TIMEOUT seconds (default 1800), then fails, so
`torchrun --max-restarts N` restarts the group instead of waiting on a peer that will not come."""

from __future__ import annotations

import subprocess
import sys
import time

from tests.helpers import cli_env, free_port

WAIT = "from cospress.runtime import init_distributed; init_distributed('cpu')"


def _rank0_alone(timeout: str) -> tuple[subprocess.CompletedProcess, float]:
    env = {**cli_env(), "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(free_port()), "COSPRESS_DIST_TIMEOUT": timeout}  # fmt: skip
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", WAIT], env=env, capture_output=True, text=True, timeout=120)
    return proc, time.perf_counter() - t0


def test_a_rank_whose_peer_never_comes_fails_after_the_timeout():
    proc, seconds = _rank0_alone("3")
    assert proc.returncode != 0 and seconds < 60, (proc.returncode, seconds, proc.stderr[-2000:])


def test_a_bad_timeout_is_refused_naming_the_variable():
    proc, _ = _rank0_alone("soon")
    assert proc.returncode != 0 and "COSPRESS_DIST_TIMEOUT='soon' is not a number of seconds" in proc.stderr
