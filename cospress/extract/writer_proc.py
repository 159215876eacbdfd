"""Shard writers in processes of their own (``--writer-kind process``).

Writer threads share the GIL and one address space with each other and with the teacher's loop: on
two free cores two threads wrote 1.6-1.7x what one writes (int8 stores 1.4x: their quantization is
many short numpy calls), spending 7-15% more CPU per byte; two writer processes wrote 1.8-1.9x and
spent what one does (docs/performance.md).

No feature byte is copied or pickled on the way: a shard buffer's arrays live in one anonymous
shared-memory file (``memfd_create``), whose descriptor is passed once to each writer process
(``SCM_RIGHTS`` over a socket pair) and mapped there; per shard, only its number, keys, labels and
skips travel. The writer process opens the store as another rank does (`StoreWriter.open` with
``create=False``) and writes and commits whole shards with the same code as a thread, so the
store is byte for byte the one a thread writes.

A writer process dies with the process that started it (``PR_SET_PDEATHSIG``, and it checks its
parent before each shard): after a kill -9 of the run, no orphan goes on writing a shard that the
rerun writes too. A writer process that dies is an error naming it and the shard it was writing.
"""

from __future__ import annotations

import ctypes
import itertools
import logging
import mmap
import os
import pickle
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from cospress.errors import StoreError

_ALIGN = 64
_ids = itertools.count()


def processes_supported() -> bool:
    """Whether writer processes can share buffers here (Linux: ``memfd_create`` and ``SCM_RIGHTS``)."""
    return hasattr(os, "memfd_create") and hasattr(socket, "send_fds") and sys.platform.startswith("linux")


class SharedArrays:
    """Named numpy arrays in one shared-memory file that other processes can map (zero-filled)."""

    def __init__(self, specs: dict[str, tuple[tuple[int, ...], str]], fd: int | None = None) -> None:
        self.id = next(_ids)
        self.specs, offsets, size = specs, {}, 0
        for name, (shape, dtype) in specs.items():
            offsets[name] = size
            size += -(-int(np.prod(shape)) * np.dtype(dtype).itemsize // _ALIGN) * _ALIGN
        self.size = max(size, _ALIGN)
        if fd is None:  # the owner: a new file (its pages are zeros until written)
            fd = os.memfd_create("cospress-shard", os.MFD_CLOEXEC)
            os.ftruncate(fd, self.size)
            self._map = mmap.mmap(fd, self.size)
        else:  # a writer process: the owner's file, mapped with its pages (one call, not a fault each)
            flags = mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0)
            self._map = mmap.mmap(fd, self.size, flags=flags, prot=mmap.PROT_READ | mmap.PROT_WRITE)
        self.fd = fd
        self.arrays = {
            name: np.ndarray(shape, np.dtype(dtype), buffer=self._map, offset=offsets[name])
            for name, (shape, dtype) in specs.items()
        }

    def close(self) -> None:
        """Close the descriptor (the mapping goes when the arrays are no longer referenced)."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


# ---- the wire: length-prefixed pickles, descriptors beside them ------------------------------------
def _send(sock: socket.socket, msg: Any) -> None:
    blob = pickle.dumps(msg, protocol=pickle.HIGHEST_PROTOCOL)
    sock.sendall(struct.pack("<Q", len(blob)) + blob)


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray(n)
    view, got = memoryview(buf), 0
    while got < n:
        k = sock.recv_into(view[got:])
        if k == 0:
            raise EOFError
        got += k
    return bytes(buf)


def _recv(sock: socket.socket) -> Any:
    (n,) = struct.unpack("<Q", _recv_exact(sock, 8))
    return pickle.loads(_recv_exact(sock, n))


def _portable(e: BaseException) -> BaseException:
    """``e`` if it survives pickling (the parent raises it as it is), else a StoreError saying it."""
    try:
        pickle.loads(pickle.dumps(e))
        return e
    except Exception:
        return StoreError(f"{type(e).__name__}: {e}")


class WriterProcess:
    """The parent's end of one writer process: ``write`` blocks (GIL released) until the shard is
    committed there, and raises what the writer process raised."""

    def __init__(self, writer: Any, index: int) -> None:
        ours, theirs = socket.socketpair()
        root = str(Path(__file__).resolve().parents[2])  # the folder holding the cospress package
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
        for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
            env[var] = "1"  # one writer is one core's work (the codec fidelity's torch ops included)
        self.index, self.sock, self.mapped = index, ours, set()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "cospress.extract.writer_proc", str(theirs.fileno()), str(os.getpid())],
            pass_fds=[theirs.fileno()],
            env=env,
            stdin=subprocess.DEVNULL,
        )
        theirs.close()
        self._send_lock = threading.Lock()
        self.shard: int | None = None
        self.ready = threading.Event()  # set once the store is open there (or failed to open)
        self._put(("open", *writer.reopen_args(), writer.protected_shards))

    def opened(self) -> None:
        """Wait until the writer process has opened the store; raise what stopped it."""
        try:
            self._reply()
        finally:
            self.ready.set()

    def _put(self, msg: Any, fd: int | None = None) -> None:
        with self._send_lock:
            _send(self.sock, msg)
            if fd is not None:
                socket.send_fds(self.sock, [b"F"], [fd])

    def _died(self) -> StoreError:
        try:
            code = self.proc.wait(30)
        except subprocess.TimeoutExpired:  # the socket failed, not the process: stop it
            self.proc.kill()
            code = self.proc.wait()
        how = f"signal {signal.Signals(-code).name}" if code < 0 else f"exit code {code}"
        what = f" while writing shard {self.shard}" if self.shard is not None else ""
        return StoreError(
            f"shard writer process {self.index} (pid {self.proc.pid}) died ({how}){what}; "
            "rerun the same command: committed shards are kept"
        )

    def _reply(self) -> float:
        try:
            reply = _recv(self.sock)
        except (EOFError, OSError):
            raise self._died() from None
        if isinstance(reply, BaseException):
            raise reply
        return reply

    def _call(self, msg: Any) -> float:
        try:
            self._put(msg)
        except OSError:
            raise self._died() from None
        return self._reply()

    def write(self, shard: int, buf: Any) -> float:
        """Write and commit ``shard`` from the shared buffer ``buf`` (a `ShardBuffer`); returns the
        CPU seconds the writer process spent on it."""
        if buf.shared.id not in self.mapped:
            self._put(("buffer", buf.shared.id, buf.shared.specs), buf.shared.fd)
            self.mapped.add(buf.shared.id)
        self.shard = shard
        cpu = self._call(("write", shard, buf.shared.id, buf.keys, buf.labels, buf.skipped))
        self.shard = None
        return cpu

    def forget(self, shared: SharedArrays) -> None:
        """A buffer dropped by the parent: unmapped here too (no reply)."""
        if shared.id in self.mapped:
            self.mapped.discard(shared.id)
            try:
                self._put(("drop", shared.id))
            except OSError:
                pass

    def close(self, timeout: float = 60.0) -> None:
        """Let the writer process finish and exit."""
        try:
            self._put(None)
        except OSError:
            pass
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.sock.close()


# ---- the writer process -------------------------------------------------------------------------
def _die_with_parent(ppid: int) -> None:
    """SIGKILL this process when its parent dies (Linux), and exit now if it already has."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
    if os.getppid() != ppid:
        os._exit(1)


def _serve(sock: socket.socket, ppid: int) -> None:
    from cospress.store import StoreWriter

    writer, buffers = None, {}
    while (msg := _recv(sock)) is not None:
        kind = msg[0]
        if kind == "buffer":
            _, fds, _, _ = socket.recv_fds(sock, 1, 1)
            buffers[msg[1]] = SharedArrays(msg[2], fd=fds[0])
            buffers[msg[1]].close()  # mapped: the descriptor is no longer needed
            continue
        if kind == "drop":
            buffers.pop(msg[1], None)
            continue
        cpu = time.process_time()
        try:
            if kind == "open":
                path, identity, layout, protected = msg[1:]
                writer = StoreWriter.open(path, identity, layout, create=False)
                writer.protected_shards = protected
            elif kind == "write":
                if os.getppid() != ppid:  # the run was killed: never commit a shard after it
                    os._exit(1)
                shard, ident, keys, labels, skipped = msg[1:]
                arrays = buffers[ident].arrays
                writer.write_shard(
                    shard, cls=arrays["cls"], tokens=arrays.get("tokens"), views=arrays["views"],
                    keys=keys, labels=labels, valid=arrays["valid"], skipped=skipped,
                )  # fmt: skip
            reply = time.process_time() - cpu
        except BaseException as e:  # the parent raises it
            reply = _portable(e)
        _send(sock, reply)


def main(argv: list[str]) -> None:
    fd, ppid = int(argv[1]), int(argv[2])
    _die_with_parent(ppid)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C stops the run; the run stops its writers
    from cospress.runtime import tune_malloc

    tune_malloc()  # as the run does: a shard's big temporaries are not page-faulted in every time
    from cospress.redact import install

    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=logging.WARNING, handlers=[handler])
    install(handler)  # what a writer process shows is redacted as the CLI's own output
    sock = socket.socket(fileno=fd)
    try:
        _serve(sock, ppid)
    except EOFError:  # the parent closed its end without a goodbye
        pass
    # Every shard written was committed (fsynced, or PUT whole) before its reply: skip the interpreter's
    # teardown (~0.4 s here: zarr's event loop, torch), which keeps the run waiting for nothing.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main(sys.argv)
