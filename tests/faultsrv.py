"""A fault-injecting HTTP server for the tests: files of a folder served with byte ranges (or the
requests forwarded to an upstream server, e.g. moto's S3), with 5xx answers, connection resets,
truncated bodies and slow answers on a schedule.

    srv = FaultServer(root)                      # or FaultServer(upstream="http://127.0.0.1:PORT")
    srv.add("500", match="shard-001", times=2)   # the next two GETs of a path holding "shard-001"
    srv.add("reset", ranged=True)                # the next GET with a Range not starting at byte 0
    srv.add("500", times=None)                   # every GET from now on (an outage); srv.clear()
"""

from __future__ import annotations

import base64
import contextlib
import http.client
import http.server
import socket
import struct
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit


@dataclass
class Rule:
    fault: str  # "500" (any status), "reset", "truncate", "slow:SECONDS"
    match: str = ""
    times: int | None = 1  # None: every matching request
    method: str = "GET"
    ranged: bool = False  # only requests whose Range starts after byte 0


class _Handler(http.server.BaseHTTPRequestHandler):
    srv: FaultServer
    protocol_version = "HTTP/1.1"

    def log_message(self, *args: object) -> None:
        pass

    def finish(self) -> None:
        with contextlib.suppress(OSError):
            super().finish()

    def do_GET(self) -> None:
        self._handle(True)

    def do_HEAD(self) -> None:
        self._handle(False)

    def _handle(self, body: bool) -> None:
        fault = self.srv.take(self.command, self.path, self.headers.get("Range"))
        self.srv.log.append((self.command, self.path, self.headers.get("Range"), fault))
        if fault and fault.startswith("slow:"):
            time.sleep(float(fault[5:]))
            fault = None
        if fault == "reset":
            self._reset()
            return
        if fault and fault.isdigit():
            self._answer(int(fault), {}, b"injected fault\n", body)
            return
        status, headers, data = self._response()
        if fault == "truncate" and body and len(data) > 1:
            self.send_response(status)
            for k, v in headers.items():
                self.send_header(k, v)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data[: len(data) // 2])
            self.wfile.flush()
            self._reset()
            return
        self._answer(status, headers, data, body)

    def _reset(self) -> None:
        self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.connection.close()
        self.close_connection = True

    def _answer(self, status: int, headers: dict[str, str], data: bytes, body: bool) -> None:
        self.send_response(status)
        for k, v in headers.items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if body:
            self.wfile.write(data)

    def _response(self) -> tuple[int, dict[str, str], bytes]:
        if self.srv.upstream:
            return self._forward()
        if self.srv.auth and not self._authorised():
            return 403, {}, b"forbidden\n"
        path = self.srv.root / self.path.split("?", 1)[0].lstrip("/")
        if not path.is_file():
            return 404, {}, b"not found\n"
        data = path.read_bytes()
        headers = {"Accept-Ranges": "bytes"}
        if self.srv.etag:  # a version, as S3 and most HTTP servers report it
            st = path.stat()
            headers["ETag"] = f'"{st.st_size:x}-{st.st_mtime_ns:x}"'
        rng = self.headers.get("Range")
        if rng and rng.startswith("bytes="):
            a, _, b = rng[6:].partition("-")
            if a:
                start, stop = int(a), min(int(b) + 1 if b else len(data), len(data))
            else:  # a suffix range: the last b bytes
                start, stop = max(len(data) - int(b), 0), len(data)
            headers["Content-Range"] = f"bytes {start}-{stop - 1}/{len(data)}"
            return 206, headers, data[start:stop]
        return 200, headers, data

    def _authorised(self) -> bool:
        user, password, signature = self.srv.auth
        want = "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()
        signed = signature is None or f"X-Amz-Signature={signature}" in self.path
        return self.headers.get("Authorization") == want and signed

    def _forward(self) -> tuple[int, dict[str, str], bytes]:
        up = urlsplit(self.srv.upstream)
        conn = http.client.HTTPConnection(up.hostname, up.port, timeout=30)
        headers = {k: v for k, v in self.headers.items() if k.lower() not in ("connection", "keep-alive")}
        conn.request(self.command, self.path, headers=headers)
        resp = conn.getresponse()
        data = resp.read()
        skip = ("content-length", "transfer-encoding", "connection", "keep-alive", "date", "server")
        out = {k: v for k, v in resp.getheaders() if k.lower() not in skip}
        conn.close()
        return resp.status, out, data


class FaultServer:
    """See the module docstring. ``url``: the base URL; ``log``: (method, path, range, fault) per request."""

    def __init__(
        self,
        root: Path | None = None,
        upstream: str | None = None,
        auth: tuple[str, str, str | None] | None = None,  # user, password, signature (or None)
        etag: bool = False,  # answer with an ETag (a file's size and modification time)
    ) -> None:
        self.root, self.upstream, self.auth, self.etag = root, upstream, auth, etag
        self.rules: list[Rule] = []
        self.log: list[tuple[str, str, str | None, str | None]] = []
        self._lock = threading.Lock()
        handler = type("Handler", (_Handler,), {"srv": self})
        self._httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self._httpd.daemon_threads = True
        self._httpd.handle_error = lambda request, address: None  # resets are the point
        self.port = self._httpd.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        threading.Thread(target=self._httpd.serve_forever, daemon=True).start()

    def add(
        self, fault: str, match: str = "", times: int | None = 1, method: str = "GET", ranged: bool = False
    ):
        with self._lock:
            self.rules.append(Rule(fault, match, times, method, ranged))
        return self

    def clear(self) -> None:
        with self._lock:
            self.rules.clear()

    def pending(self) -> int:
        """Faults of the schedule not injected yet (counted rules only)."""
        with self._lock:
            return sum(r.times or 0 for r in self.rules)

    def injected(self) -> int:
        return sum(1 for entry in self.log if entry[3])

    def take(self, method: str, path: str, rng: str | None) -> str | None:
        ranged = bool(rng) and not rng.startswith("bytes=0-")
        with self._lock:
            for rule in self.rules:
                if rule.method != method or rule.match not in path or (rule.ranged and not ranged):
                    continue
                if rule.times is None:
                    return rule.fault
                if rule.times > 0:
                    rule.times -= 1
                    return rule.fault
        return None

    def close(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
