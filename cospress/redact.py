"""The one redaction path: what cospress writes, logs, warns or raises never holds URL credentials
(``user:password@``) or signed-URL query strings (``X-Amz-Signature``, ``sig``, ``token``, ...).

`redact_text` is applied to every message that can hold a source spec or a URL: the errors of
cospress (the CLI prints them through it), its log lines and warnings (:func:`install` puts
:class:`RedactingFilter` on the CLI's log handler and routes warnings and uncaught tracebacks, those
of aiohttp / fsspec / botocore included, through it), and every config or summary written to a file
(`redact_config`).
"""

from __future__ import annotations

import logging
import re
import sys
import traceback
from typing import Any
from urllib.parse import urlsplit, urlunsplit

# the userinfo of a URL runs to its LAST "@" before the path: a password may hold "@"
_URL_CREDENTIALS = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*://)[^/\s'\"<>]*@")
_URL_QUERY = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*://[^\s?#'\"<>]*)[?#][^\s'\"<>]*")
# a signed query parameter or a credential header met outside a URL (a path, a request dump)
_SECRET_PARAM = re.compile(
    r"(?i)\b(x-amz-signature|x-amz-credential|x-amz-security-token|x-goog-signature|x-goog-credential"
    r"|awsaccesskeyid|signature|sig|token|access_token|api_key|apikey|password|passwd|secret|sv|se|sp|skoid|sktid)"
    r"(=|%3D)[^&\s'\"<>]+"
)
_AUTH_HEADER = re.compile(r"(?i)\b(authorization|x-amz-security-token)(['\"]?\s*[:=]\s*['\"]?)[^'\"\n,}]+")


def redact_url(url: str) -> str:
    """``url`` without credentials (``user:password@``) and without query string or fragment."""
    s = str(url)
    if "://" not in s:
        return redact_text(s)
    parts = urlsplit(s)
    netloc = parts.netloc.rsplit("@", 1)[-1]
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


def redact_text(text: str) -> str:
    """``text`` with credentials and query strings removed from every URL in it (a spec such as
    ``wds:https://user:token@host/a.tar?X-Amz-Signature=...``, an error message, a log line), and
    any signed query parameter or Authorization header outside a URL masked."""
    s = _URL_QUERY.sub(r"\1", _URL_CREDENTIALS.sub(r"\1", str(text)))
    return _AUTH_HEADER.sub(r"\1\2***", _SECRET_PARAM.sub(r"\1\2***", s))


def redact_config(obj: Any) -> Any:
    """A copy of a JSON-like value (a config dict, a manifest, a summary) with `redact_text` applied to
    every string in it, keys included: what goes into a file or a log line."""
    if isinstance(obj, str):
        return redact_text(obj)
    if isinstance(obj, dict):
        return {redact_config(k) if isinstance(k, str) else k: redact_config(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [redact_config(v) for v in obj]
    return obj


class RedactingFilter(logging.Filter):
    """A handler filter: the record's message (arguments merged) and its traceback, redacted."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a bad format string: keep what there is
            message = f"{record.msg} {record.args}"
        record.msg, record.args = redact_text(message), None
        if record.exc_info:
            record.exc_text = redact_text("".join(traceback.format_exception(*record.exc_info)).rstrip())
            record.exc_info = None
        return True


def _excepthook(kind: type[BaseException], exc: BaseException, tb: Any) -> None:
    sys.stderr.write(redact_text("".join(traceback.format_exception(kind, exc, tb))))


def _thread_excepthook(args: Any) -> None:
    if args.exc_type is SystemExit:
        return
    sys.stderr.write(
        redact_text("".join(traceback.format_exception(args.exc_type, args.exc_value, args.exc_traceback)))
    )


def install(*handlers: logging.Handler) -> None:
    """Redact everything the process shows: the log ``handlers``, warnings (through logging) and
    uncaught tracebacks (of the main thread and of other threads). Called by the CLI."""
    import threading

    for h in handlers:
        if not any(isinstance(f, RedactingFilter) for f in h.filters):
            h.addFilter(RedactingFilter())
    logging.captureWarnings(True)
    sys.excepthook = _excepthook
    threading.excepthook = _thread_excepthook
