"""No credentials or signed-URL query strings in what cospress writes or logs (issue 16, point 2).

A WebDataset source is served over HTTP on 127.0.0.1 by a server that answers only requests with the
right basic-auth credentials and the signature in the query, so a run that reads must use the real
URL; every file of the store, the config copies, the CLI output and `inspect` / `verify` must hold
neither the password nor the signature.
"""

from __future__ import annotations

import base64
import http.server
import io
import json
import tarfile
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cospress.utils import redact_config, redact_text
from tests.helpers import make_tiny_teacher_weights, run_cli

USER, PASSWORD, SIGNATURE = "alice", "pw-s3cr3t-token", "sig-s3cr3t-0123456789"
SECRETS = (PASSWORD, SIGNATURE)


def _make_tar(path: Path, n: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    with tarfile.open(path, "w") as tar:
        for i in range(n):
            img = Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8))
            buf = io.BytesIO()
            img.save(buf, format="PNG")
            for name, data in (
                (f"s{seed}_{i:03d}.png", buf.getvalue()),
                (f"s{seed}_{i:03d}.cls", b"%d" % (i % 3)),
            ):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


class _AuthRangeHandler(http.server.BaseHTTPRequestHandler):
    """Serves files of ``root`` with byte ranges, only to requests that carry the credentials and
    the signature (as a signed S3 URL behind basic auth would)."""

    root: Path

    def log_message(self, *args: object) -> None:
        pass

    def _authorised(self) -> bool:
        want = "Basic " + base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
        return self.headers.get("Authorization") == want and f"X-Amz-Signature={SIGNATURE}" in self.path

    def _serve(self, body: bool) -> None:
        path = self.root / self.path.split("?", 1)[0].lstrip("/")
        if not self._authorised():
            self.send_error(403)
            return
        if not path.is_file():
            self.send_error(404)
            return
        data = path.read_bytes()
        rng = self.headers.get("Range")
        status = 200
        if rng and rng.startswith("bytes="):
            a, _, b = rng[6:].partition("-")
            start, stop = int(a), min(int(b) + 1 if b else len(data), len(data))
            data, status = data[start:stop], 206
            content_range = f"bytes {start}-{stop - 1}/{path.stat().st_size}"
        self.send_response(status)
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Accept-Ranges", "bytes")
        if status == 206:
            self.send_header("Content-Range", content_range)
        self.end_headers()
        if body:
            self.wfile.write(data)

    def do_GET(self) -> None:
        self._serve(True)

    def do_HEAD(self) -> None:
        self._serve(False)


@pytest.fixture(scope="module")
def secret_source(tmp_path_factory):
    """(wds spec with credentials and a signed query, the served folder)."""
    root = tmp_path_factory.mktemp("www")
    _make_tar(root / "shard-000.tar", 5, 0)
    _make_tar(root / "shard-001.tar", 4, 1)
    handler = type("Handler", (_AuthRangeHandler,), {"root": root})
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    port = srv.server_address[1]
    spec = (
        f"wds:http://{USER}:{PASSWORD}@127.0.0.1:{port}/shard-{{000..001}}.tar"
        f"?X-Amz-Credential=AKIA%2F20250101&X-Amz-Signature={SIGNATURE}"
    )
    try:
        yield spec, root
    finally:
        srv.shutdown()
        srv.server_close()


def _assert_clean(text: str, where: str) -> None:
    for s in SECRETS:
        assert s not in text, f"{where} holds the secret {s!r}"


def test_redaction_helpers():
    assert (
        redact_text("wds:https://u:pw@h.example/a-{0..3}.tar?X-Amz-Signature=z#f")
        == "wds:https://h.example/a-{0..3}.tar"
    )
    assert (
        redact_text("error: cannot open s3://k:p@b/x.tar?sig=1 (403)")
        == "error: cannot open s3://b/x.tar (403)"
    )
    assert redact_config({"data": "wds:http://u:p@h/a?s=1", "n": [1, "x"], "k": None}) == {
        "data": "wds:http://h/a",
        "n": [1, "x"],
        "k": None,
    }
    assert redact_text("folder:/local/a@b/c") == "folder:/local/a@b/c"


def test_extract_from_a_signed_url_writes_and_logs_no_secret(secret_source, tmp_path):
    spec, _ = secret_source
    weights = make_tiny_teacher_weights(tmp_path / "test_vit.safetensors", img_size=32)
    out = tmp_path / "store"
    args = ["--teacher", "test_vit", "--weights", str(weights), "--image-size", "32", "--views", "2"]
    args += ["--shard-size", "4", "--workers", "0", "--precision", "fp32", "--no-progress"]
    proc = run_cli("extract-teacher", "--data", spec, *args, "--out", str(out))
    logs = proc.stdout + proc.stderr
    inspect = run_cli("inspect", str(out), "--json")
    verify = run_cli("verify", str(out))
    # the reader used the real URL (the server refuses any other) and read every image
    summary = json.loads(inspect.stdout)
    assert summary["counts"]["rows"] == 9 and summary["skipped"] == 0
    assert summary["source"]["spec"].startswith("wds:http://127.0.0.1:")
    for name, text in (("extract log", logs), ("inspect", inspect.stdout + inspect.stderr)):
        _assert_clean(text, name)
    _assert_clean(verify.stdout + verify.stderr, "verify")
    files = [f for f in out.rglob("*") if f.is_file()]
    assert any(
        f.relative_to(out).as_posix() == "cospress/config/zarr.json" for f in files
    )  # the config record
    for f in files:
        _assert_clean(f.read_bytes().decode("latin-1"), str(f.relative_to(out)))
    # an error that names a shard URL does not print the secrets either
    bad = spec.replace("shard-{000..001}", "missing-{000..001}")
    fail = run_cli("extract-teacher", "--data", bad, *args, "--out", str(tmp_path / "s2"), check=False)
    assert fail.returncode == 2 and "cannot open shard http://127.0.0.1:" in fail.stdout + fail.stderr
    _assert_clean(fail.stdout + fail.stderr, "the error of a missing shard")


def test_export_records_no_local_path(tmp_path):
    """student.json names the run folder, not its absolute local path (exported students are shared)."""
    import torch

    from cospress import checkpoint as ckpt
    from cospress.export import export_student

    run = tmp_path / "private-home" / "my-run"
    run.mkdir(parents=True)
    (run / "run.json").write_text(
        json.dumps({"student": {"timm_name": "test_vit"}, "teacher": {"name": "t"}})
    )
    ckpt.save_weights(ckpt.paths(run, "last")[0], {"student.w": torch.zeros(2)}, {"step": "3"})
    info = export_student(run, tmp_path / "exp", which="last")
    text = (tmp_path / "exp" / "student.json").read_text()
    assert json.loads(text)["run"] == "my-run" == info["run"]
    assert str(tmp_path) not in text and "private-home" not in text


def test_distill_and_knn_eval_from_a_signed_url_write_and_log_no_secret(secret_source, tmp_path):
    """Stage 2 and knn-eval read the same source by its secret URL; their run folder, report,
    embedding cache and logs hold neither secret (config.yaml, run.json, checkpoint state, report.json)."""
    spec, _ = secret_source
    weights = make_tiny_teacher_weights(tmp_path / "test_vit.safetensors", img_size=32)
    store, run, report, cache = (tmp_path / n for n in ("store", "run", "eval", "cache"))
    common = ["--workers", "0", "--precision", "fp32", "--device", "cpu"]
    run_cli(
        "extract-teacher", "--data", spec, "--teacher", "test_vit", "--weights", str(weights),
        "--image-size", "32", "--views", "2", "--shard-size", "4", "--no-progress", *common, "--out", str(store),
    )  # fmt: skip
    distill = run_cli(
        "-v", "distill", "--store", str(store), "--data", spec, "--student", "test_vit", "--student-size", "32",
        "--epochs", "1", "--batch-size", "6", "--views-per-image", "2", "--val-fraction", "0.3",
        "--temperatures", "0.05,0.1", "--no-progress", *common, "--out", str(run),
    )  # fmt: skip
    evaluate = run_cli(
        "-v", "knn-eval", "--model", str(run), "--train", spec, "--test", spec, "--k", "2",
        "--crop-pct", "1.0", "--fidelity-teacher", "none", "--cache-dir", str(cache), *common, "--out", str(report),
    )  # fmt: skip
    assert json.loads((report / "report.json").read_text())["counts"]
    for proc, name in ((distill, "distill log"), (evaluate, "knn-eval log")):
        _assert_clean(proc.stdout + proc.stderr, name)
    for folder in (run, report, cache):
        files = [f for f in folder.rglob("*") if f.is_file()]
        assert files, folder
        for f in files:
            _assert_clean(f.read_bytes().decode("latin-1"), str(f.relative_to(tmp_path)))


# --------------------------------------------------------------------------- one redaction path (issue 24)
AT_PASSWORD = "p@ssw0rd-SECRET"  # "@" in a password: cut at the last "@", or "ssw0rd-SECRET" leaks
AT_SECRETS = ("ssw0rd-SECRET", SIGNATURE)


def test_redaction_of_passwords_with_at_and_of_library_errors():
    import aiohttp
    import yarl

    url = f"http://alice:{AT_PASSWORD}@127.0.0.1:8/a.tar?X-Amz-Signature={SIGNATURE}&sig=z"
    assert redact_text(f"wds:{url} failed") == "wds:http://127.0.0.1:8/a.tar failed"
    info = aiohttp.RequestInfo(yarl.URL(url), "GET", {}, yarl.URL(url))  # str() quotes the "@" as %40
    err = aiohttp.ClientResponseError(info, (), status=500, message="Internal Server Error")
    for text in (str(err), repr(err), str(yarl.URL(url)), f"/b/k?X-Amz-Signature={SIGNATURE}"):
        for s in AT_SECRETS:
            assert s not in redact_text(text), (text, redact_text(text))
    assert redact_text("Authorization: Basic YWxpY2U6cA==") == "Authorization: ***"
    assert redact_text("--token-codec pca, folder:/data/a@b") == "--token-codec pca, folder:/data/a@b"


def _grep_clean(texts: dict[str, str], root: Path) -> None:
    """No secret in ``texts`` (outputs by name) nor in any file under ``root``."""
    for name, text in texts.items():
        for s in AT_SECRETS:
            assert s not in text and s.replace("@", "%40") not in text, f"{name} holds {s!r}:\n{text}"
    files = [f for f in root.rglob("*") if f.is_file()]
    assert len(files) > 20
    for f in files:
        data = f.read_bytes().decode("latin-1")
        for s in AT_SECRETS:
            assert s not in data, f"{f.relative_to(root)} holds {s!r}"


def test_every_command_from_a_credentialed_url_shows_and_writes_no_secret(tmp_path, monkeypatch):
    """extract-teacher, distill, knn-eval from a `wds:` URL with user:password@ (an "@" in the password)
    and a signed query; inspect, verify, export-wds from a store URL with credentials; import-wds,
    publish; a server 500 mid-read in extract-teacher and in verify: every output and every file
    written holds neither the password nor the signature."""
    from tests.faultsrv import FaultServer

    monkeypatch.setenv("COSPRESS_IO_ATTEMPTS", "2")
    monkeypatch.setenv("COSPRESS_IO_BACKOFF", "0.01")
    www, served = tmp_path / "www", tmp_path / "served"
    www.mkdir()
    _make_tar(www / "shard-000.tar", 5, 0)
    _make_tar(www / "shard-001.tar", 4, 1)
    tars = FaultServer(www, auth=(USER, AT_PASSWORD, SIGNATURE))
    stores = FaultServer(served, auth=(USER, AT_PASSWORD, None))
    work = tmp_path / "work"
    spec = (
        f"wds:http://{USER}:{AT_PASSWORD}@127.0.0.1:{tars.port}/shard-{{000..001}}.tar"
        f"?X-Amz-Credential=AKIA%2F20250101&X-Amz-Signature={SIGNATURE}"
    )
    store_url = f"http://{USER}:{AT_PASSWORD}@127.0.0.1:{stores.port}/store"
    weights = make_tiny_teacher_weights(tmp_path / "test_vit.safetensors", img_size=32)
    common = ["--workers", "0", "--precision", "fp32", "--device", "cpu"]
    extract = ["--teacher", "test_vit", "--weights", str(weights), "--image-size", "32", "--views", "2"]
    extract += ["--shard-size", "4", "--no-progress", *common]
    out: dict[str, str] = {}

    def cli(name: str, *args: str, rc: int = 0) -> None:
        proc = run_cli("-v", *args, check=False)
        out[name] = proc.stdout + proc.stderr
        assert proc.returncode == rc, out[name]

    try:
        cli("extract-teacher", "extract-teacher", "--data", spec, *extract, "--out", str(served / "store"))
        cli("distill", "distill", "--store", str(served / "store"), "--data", spec, "--student", "test_vit",
            "--student-size", "32", "--epochs", "1", "--batch-size", "6", "--views-per-image", "2",
            "--val-fraction", "0.3", "--temperatures", "0.05,0.1", "--no-progress", *common,
            "--out", str(work / "run"))  # fmt: skip
        cli("knn-eval", "knn-eval", "--model", str(work / "run"), "--train", spec, "--test", spec, "--k", "2",
            "--crop-pct", "1.0", "--fidelity-teacher", "none", "--cache-dir", str(work / "cache"), *common,
            "--out", str(work / "eval"))  # fmt: skip
        cli("inspect", "inspect", store_url, "--json")
        text = out["inspect"]
        assert json.JSONDecoder().raw_decode(text, text.index("{"))[0]["counts"]["rows"] == 9
        cli("export-wds", "export-wds", store_url, "--out", str(work / "wds"), "--no-progress")
        cli("import-wds", "import-wds", str(work / "wds"), "--out", str(work / "imported"), "--no-progress")
        cli(
            "publish",
            "publish",
            str(work / "imported"),
            f"{store_url}-copy?X-Amz-Signature={SIGNATURE}",
            rc=2,
        )
        tars.add("500", match="shard-001", times=None, ranged=True)  # a server 500 mid-read
        cli("extract-500", "extract-teacher", "--data", spec, *extract, "--out", str(work / "s500"), rc=2)
        assert "500" in out["extract-500"] and "after 2 attempts" in out["extract-500"]
        stores.add("500", match="/views/", times=None)
        cli("verify-500", "verify", store_url, rc=2)
        assert "500" in out["verify-500"], out["verify-500"]
    finally:
        tars.close()
        stores.close()
    _grep_clean(out, tmp_path)
