"""Reads over a network that fails: bounded retries with backoff for transient errors, then one line.

Every remote read of cospress goes through here: a ``wds:`` source's shard index and its range reads
(`cospress.data.wds_source`), a store's manifest and its shard files (`cospress.store.reader`, the
zarr store wrapped in :class:`RetryingStore`). A transient failure (a 5xx or 429 answer, a reset or
refused connection, a truncated body, a timeout) is retried; after the last attempt a
:class:`~cospress.errors.NetworkError` says what could not be read, redacted, in one line. A
permanent answer (404, 403, a bad request) is raised at once.

Settings, from the environment (read at each call, so DataLoader workers and torchrun ranks see the
same), with their defaults:

- ``COSPRESS_IO_ATTEMPTS`` = 5: tries of one read (1: no retry);
- ``COSPRESS_IO_BACKOFF`` = 0.5: seconds before the 2nd try, doubled each time (random 0.5-1x);
- ``COSPRESS_IO_BACKOFF_MAX`` = 8: the longest wait;
- ``COSPRESS_IO_TIMEOUT`` = 60: seconds an HTTP(S) or S3 request may wait to connect or between
  two reads of its body before it counts as failed (and is retried).
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import zarr

from cospress.errors import CospressError, NetworkError
from cospress.redact import redact_text

log = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass(frozen=True)
class RetrySettings:
    attempts: int = 5
    backoff: float = 0.5
    backoff_max: float = 8.0
    timeout: float = 60.0

    def wait(self, attempt: int) -> float:
        """Seconds to wait after failed try ``attempt`` (0-based): exponential, jittered."""
        return min(self.backoff * 2**attempt, self.backoff_max) * (0.5 + 0.5 * random.random())


def _env(name: str, default: float, kind: type = float) -> Any:
    raw = os.environ.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        value = kind(raw)
    except ValueError:
        raise CospressError(f"{name}={raw[:40]!r} is not a number; unset it or give e.g. {default}") from None
    if value < 0 or (kind is int and value < 1):
        raise CospressError(f"{name}={raw[:40]!r} is out of range; unset it or give e.g. {default}")
    return value


def settings() -> RetrySettings:
    """The retry settings of the environment (see the module docstring)."""
    d = RetrySettings()
    return RetrySettings(
        attempts=_env("COSPRESS_IO_ATTEMPTS", d.attempts, int),
        backoff=_env("COSPRESS_IO_BACKOFF", d.backoff),
        backoff_max=_env("COSPRESS_IO_BACKOFF_MAX", d.backoff_max),
        timeout=_env("COSPRESS_IO_TIMEOUT", d.timeout),
    )


class ShortRead(OSError):
    """A read returned fewer bytes than asked for (a body cut short): transient."""


_PERMANENT = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)
_NETWORK_MODULES = ("aiohttp", "botocore", "urllib3", "http.client", "fsspec", "s3fs", "aiobotocore")


def _status(e: BaseException) -> int | None:
    """The HTTP status of an error answer (aiohttp, botocore), else None."""
    status = getattr(e, "status", None)
    if isinstance(status, int):
        return status
    response = getattr(e, "response", None)
    if isinstance(response, dict):
        code = (response.get("ResponseMetadata") or {}).get("HTTPStatusCode")
        return code if isinstance(code, int) else None
    return None


def transient(e: BaseException) -> bool:
    """Whether a failed read is worth another try (the network, not the data or the request)."""
    if isinstance(e, CospressError):
        return False
    if isinstance(e, _PERMANENT):  # fsspec's http reports a server that failed twice as not found
        cause = e.__cause__
        return cause is not None and not isinstance(cause, _PERMANENT) and transient(cause)
    status = _status(e)
    if status is not None:
        return status >= 500 or status in (408, 429)
    if isinstance(e, (OSError, TimeoutError, asyncio.TimeoutError, EOFError)):
        return True  # resets, refused connections, timeouts, bodies cut short (only remote reads come here)
    return type(e).__module__.split(".")[0] in _NETWORK_MODULES


def describe(e: BaseException) -> str:
    """One redacted line naming an error (its type and the first line of its message)."""
    text = str(e).strip().splitlines()
    return redact_text(f"{type(e).__name__}: {text[0][:300]}" if text else type(e).__name__)


def _give_up(what: str, e: BaseException, attempts: int) -> NetworkError:
    tries = f"{attempts} attempts" if attempts > 1 else "1 attempt"
    return NetworkError(
        f"cannot read {redact_text(what)}: {describe(e)} (after {tries}); check the network or the server "
        "and rerun (COSPRESS_IO_ATTEMPTS / COSPRESS_IO_BACKOFF set the retries)"
    )


def retry(read: Callable[[], T], what: str, on_error: Callable[[], None] | None = None) -> T:
    """``read()``, tried again after a transient error (``on_error()`` first: drop a broken handle)."""
    s = settings()
    for attempt in range(s.attempts):
        try:
            return read()
        except Exception as e:
            if not transient(e):
                raise
            if on_error is not None:
                on_error()
            if attempt + 1 >= s.attempts:
                raise _give_up(what, e, s.attempts) from None
            log.info("retrying %s after %s", redact_text(what), describe(e))
            time.sleep(s.wait(attempt))
    raise AssertionError("unreachable")


async def aretry(read: Callable[[], Awaitable[T]], what: str) -> T:
    """The coroutine form of :func:`retry`."""
    s = settings()
    for attempt in range(s.attempts):
        try:
            return await read()
        except Exception as e:
            if not transient(e):
                raise
            if attempt + 1 >= s.attempts:
                raise _give_up(what, e, s.attempts) from None
            log.info("retrying %s after %s", redact_text(what), describe(e))
            await asyncio.sleep(s.wait(attempt))
    raise AssertionError("unreachable")


def with_timeouts(url: str, options: dict | None = None) -> dict:
    """fsspec storage options of ``url`` with the request timeouts of :func:`settings` added (the
    caller's own options win): aiohttp's for http(s), botocore's for s3."""
    out = dict(options or {})
    timeout = settings().timeout
    if re.match(r"^https?://", url):
        import aiohttp

        client = dict(out.get("client_kwargs") or {})
        client.setdefault(
            "timeout", aiohttp.ClientTimeout(total=None, sock_connect=timeout, sock_read=timeout)
        )
        out["client_kwargs"] = client
    elif url.startswith(("s3://", "s3a://")):
        config = dict(out.get("config_kwargs") or {})
        config.setdefault("connect_timeout", timeout)
        config.setdefault("read_timeout", timeout)
        out["config_kwargs"] = config
    return out


def io_skip(reason: str) -> bool:
    """Whether a skip reason recorded by an older cospress was a read failure, not a bad image (an
    extraction rerun redoes those shards)."""
    return bool(_IO_REASON.search(reason))


_IO_REASON = re.compile(
    r"cannot connect|connection (refused|reset|aborted|closed)|server disconnected|timed? ?out|timeout"
    r"|payload is not completed|broken pipe|name or service not known|temporary failure in name"
    r"|network is unreachable|no route to host|errno (5|104|110|111|113)\b|input/output error"
    r"|\b5\d\d, message=|internal server error|service unavailable|bad gateway|slow ?down"
    r"|clientresponseerror|clientpayloaderror|clientconnectorerror|serverdisconnectederror",
    re.IGNORECASE,
)


class RetryingStore(zarr.storage.WrapperStore):
    """A zarr store whose reads (``get``, ``get_partial_values``, ``exists``) are retried by
    :func:`aretry`: what `cospress.store.reader` reads a remote store through."""

    def __init__(self, store: zarr.abc.store.Store, display: str = "the store") -> None:
        super().__init__(store)
        self._display = display

    def _with_store(self, store: zarr.abc.store.Store) -> RetryingStore:
        return type(self)(store, self._display)

    async def get(self, key: str, prototype: Any, byte_range: Any = None) -> Any:
        return await aretry(lambda: self._store.get(key, prototype, byte_range), f"{key} of {self._display}")

    async def get_partial_values(self, prototype: Any, key_ranges: Any) -> list[Any]:
        return list(await asyncio.gather(*[self.get(key, prototype, rng) for key, rng in key_ranges]))

    async def exists(self, key: str) -> bool:
        return await aretry(lambda: self._store.exists(key), f"{key} of {self._display}")
