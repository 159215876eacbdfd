"""Bytes `cospress publish` downloads from its destination (#26 target: <= 1% of the store).

A store of about --mb MB (fp16 CLS and tokens of random values, written with the real StoreWriter)
is published to a moto S3 server on 127.0.0.1 whose WSGI app is wrapped to count every response
body byte, per kind of request: object GETs (reading back stored files) vs listings, and the bytes
uploaded. Runs, side by side in one process and one server:

  fresh     publish to an empty prefix
  resume    publish killed (SIGKILL) after half of its files, then the same command again
  again     publish of a store already there (nothing to send)
  old       (--old-rev REV) the same fresh publish with the cospress of git revision REV

    python pipelines/bench/bench_publish.py --mb 1024 --old-rev 2199cdc --work /tmp/bench-publish

Writes --work/bench_publish.json and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from cospress.store import StoreLayout, StoreWriter, make_identity  # noqa: E402

V, T, D, P = 2, 256, 384, 5  # ViT-S/14-shaped: 2 views x 256 tokens x 384 dims, fp16


class Counter:
    """WSGI middleware: response bytes of object GETs and of listings, request bytes of PUTs."""

    def __init__(self, app):
        self.app = app
        self.lock = threading.Lock()
        self.reset()

    def reset(self) -> None:
        self.counts = {"object_get_bytes": 0, "object_gets": 0, "list_bytes": 0, "lists": 0, "put_bytes": 0}

    def __call__(self, environ, start_response):
        method, path = environ["REQUEST_METHOD"], environ.get("PATH_INFO", "")
        query = environ.get("QUERY_STRING", "")
        listing = method == "GET" and (path.strip("/").count("/") == 0 or "list-type" in query)
        if method == "PUT":
            with self.lock:
                self.counts["put_bytes"] += int(environ.get("CONTENT_LENGTH") or 0)
        body = self.app(environ, start_response)
        size = 0
        for chunk in body:
            size += len(chunk)
            yield chunk
        if hasattr(body, "close"):
            body.close()
        if method == "GET":
            with self.lock:
                kind = "list" if listing else "object_get"
                self.counts[f"{kind}_bytes"] += size
                self.counts["lists" if listing else "object_gets"] += 1


def start_server() -> tuple[str, Counter, object]:
    from moto.moto_server.werkzeug_app import (
        DomainDispatcherApplication,
        MotoRequestHandler,
        create_backend_app,
    )
    from werkzeug.serving import make_server

    counter = Counter(DomainDispatcherApplication(create_backend_app))
    server = make_server("127.0.0.1", 0, counter, True, request_handler=MotoRequestHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    return f"http://127.0.0.1:{server.server_address[1]}", counter, server


def make_store(path: Path, mb: int, shard_size: int) -> int:
    """A complete store of about ``mb`` MB; returns its bytes on disk (reused when already there)."""
    if not (path / "cospress" / "manifest" / "zarr.json").exists():
        row = V * (T + 1) * D * 2
        n = max(shard_size, mb * 2**20 // row)
        ident = make_identity(
            teacher={"name": "bench", "fingerprint": "a" * 64, "dim": D}, view_policy={}, policy_fingerprint="b" * 64,
            k=V, center_view=False, seed=0, source={"spec": "bench", "kind": "bench", "count": n}, param_names=list("abcde"),
        )  # fmt: skip
        w = StoreWriter.open(path, ident, StoreLayout(n, shard_size, V, D, T, P, True), overwrite=True)
        rng = np.random.default_rng(0)
        for s in range(w.num_shards):
            a, b = w.shard_rows(s)
            w.write_shard(
                s, cls=rng.standard_normal((b - a, V, D), np.float32).astype(np.float16),
                tokens=rng.standard_normal((b - a, V, T, D), np.float32).astype(np.float16),
                views=rng.random((b - a, V, P), np.float32), keys=[f"k{i}" for i in range(a, b)],
                labels=np.zeros(b - a, np.int64), valid=np.ones(b - a, np.uint8), skipped=[],
            )  # fmt: skip
        w.finalize()
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def cli_publish(store: Path, url: str, env: dict, pythonpath: Path = REPO) -> tuple[int, float]:
    t = time.perf_counter()
    cmd = [sys.executable, "-m", "cospress", "publish", str(store), url, "--no-progress"]
    run_env = {**env, "PYTHONPATH": str(pythonpath)}  # run from there: `python -m` puts the cwd first
    proc = subprocess.run(cmd, env=run_env, cwd=pythonpath, capture_output=True, text=True)
    return proc.returncode, time.perf_counter() - t


def run(args: argparse.Namespace) -> dict:
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    store = work / f"store-{args.mb}mb"
    size = make_store(store, args.mb, args.shard_size)
    files = sum(1 for p in store.rglob("*") if p.is_file())
    endpoint, counter, server = start_server()
    env = {**os.environ, "AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench",
           "AWS_DEFAULT_REGION": "us-east-1", "HF_HUB_OFFLINE": "1"}  # fmt: skip
    os.environ.update(env)
    import s3fs

    s3fs.S3FileSystem(skip_instance_cache=True).makedirs("bench", exist_ok=True)
    out = {"store_bytes": size, "files": files, "mb": args.mb, "shard_size": args.shard_size, "runs": {}}

    def measure(name: str, *calls) -> None:
        counter.reset()
        rcs, secs = [], 0.0
        for call in calls:
            rc, s = call()
            rcs.append(rc)
            secs += s
        c = dict(counter.counts)
        c.update(rcs=rcs, seconds=round(secs, 1), downloaded_pct=round(100 * c["object_get_bytes"] / size, 4))
        out["runs"][name] = c
        print(name, c, flush=True)

    measure("fresh", lambda: cli_publish(store, "s3://bench/fresh", env))
    kill = {**env, "COSPRESS_TEST_PUBLISH_KILL_AFTER": str(files // 2)}
    measure(
        "resume",
        lambda: cli_publish(store, "s3://bench/resume", kill),
        lambda: cli_publish(store, "s3://bench/resume", env),
    )
    measure("again", lambda: cli_publish(store, "s3://bench/fresh", env))
    if args.old_rev:
        old = Path(tempfile.mkdtemp(prefix="cospress-old-"))
        archive = subprocess.run(
            ["git", "-C", str(REPO), "archive", args.old_rev, "cospress"], capture_output=True, check=True
        )
        subprocess.run(["tar", "-x", "-C", str(old)], input=archive.stdout, check=True)
        measure(f"old {args.old_rev}", lambda: cli_publish(store, "s3://bench/old", env, old))
        measure(f"old {args.old_rev} resume", lambda: cli_publish(store, "s3://bench/old-r", kill, old),
                lambda: cli_publish(store, "s3://bench/old-r", env, old))  # fmt: skip
    server.shutdown()
    return out


def table(out: dict) -> str:
    lines = [f"store {out['store_bytes'] / 2**20:,.0f} MiB, {out['files']} files (shards of {out['shard_size']} rows)", "",
             "| run | exit codes | seconds | object GETs | bytes downloaded | % of store | listings | bytes uploaded |",
             "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for name, c in out["runs"].items():
        lines.append(
            f"| {name} | {c['rcs']} | {c['seconds']} | {c['object_gets']} | {c['object_get_bytes']:,} | "
            f"{c['downloaded_pct']} | {c['lists']} | {c['put_bytes']:,} |"
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mb", type=int, default=1024, help="store size in MB")
    ap.add_argument("--shard-size", type=int, default=128, help="rows per shard")
    ap.add_argument("--old-rev", default="", help="also measure the publish of this git revision")
    ap.add_argument("--work", default=str(Path(tempfile.gettempdir()) / "bench-publish"))
    args = ap.parse_args()
    out = run(args)
    (Path(args.work) / "bench_publish.json").write_text(json.dumps(out, indent=2))
    print(table(out))


if __name__ == "__main__":
    main()
