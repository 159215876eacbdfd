"""Prepare batch k+1 in a thread (on CUDA, on a side stream) while the caller works on batch k.

The one prefetcher of both stages: stage 1 decodes + replays a batch's views there while the teacher
runs on the one before (`cospress.extract.teacher`), stage 2 its student inputs and targets while the
step before trains (`cospress.distill.prefetch`).

A thread takes the loader's batches in order and calls ``prepare`` on each. On CUDA it works on a side
stream: it records an event after each batch, the caller's stream waits for that event before it uses
the tensors, and ``record_stream`` keeps their blocks from going back to the side stream's pool before
the caller's stream is done with them. So nvjpeg's decode (which synchronises its own stream at start
and end), the replay kernels and the host-to-device copies of batch k+1 run beside the work on batch k
instead of between.

``prepare`` must be a pure function of the batch (no global RNG drawn): then the results are bitwise
those of preparing each batch in turn (``ahead`` 0, in the caller's thread). An error in a batch is
raised by the caller's loop when it reaches that batch, after the batches before it.
"""

from __future__ import annotations

import contextlib
import queue
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch

__all__ = ["prefetch"]


def prefetch(
    loader: Iterable[Any],
    prepare: Callable[[Any], Any],
    device: torch.device,
    ahead: int,
    tensors: Callable[[Any], Iterable[torch.Tensor | None]],
) -> Iterator[Any]:
    """``prepare(batch)`` of every batch of ``loader``, in order, prepared in a thread while the caller
    works on the current one: up to ``ahead`` wait ready in a queue while the thread prepares the next.
    ``tensors(ready)``: the device tensors of a prepared batch that the caller's stream takes over (CUDA).
    ``ahead`` 0: each batch is prepared in the caller's thread when asked for."""
    if ahead <= 0:
        for batch in loader:
            yield prepare(batch)
        return
    worker = _Worker(loader, prepare, torch.device(device), ahead)
    worker.thread.start()
    try:
        while True:
            item = worker.queue.get()
            if item is _END:
                return
            if isinstance(item, BaseException):
                raise item
            ready, event = item
            if event is not None:
                _hand_over(tensors(ready), event, worker.device)
            yield ready
    finally:
        worker.stop.set()
        worker.thread.join()


_END = object()


class _Worker:
    """The prefetching thread: puts (ready, CUDA event or None), then an error or ``_END``, on ``queue``."""

    def __init__(self, loader: Iterable, prepare: Callable, device: torch.device, ahead: int) -> None:
        self.loader, self.prepare, self.device = loader, prepare, device
        self.queue: queue.Queue = queue.Queue(maxsize=ahead)
        self.stop = threading.Event()
        self.stream = torch.cuda.Stream(device=device) if device.type == "cuda" else None
        self.thread = threading.Thread(target=self._run, daemon=True, name="cospress-prefetch")

    def _run(self) -> None:
        try:
            with self._on_stream():
                for batch in self.loader:
                    ready = self.prepare(batch)
                    event = self.stream.record_event() if self.stream is not None else None
                    if not self._put((ready, event)):
                        return
        except BaseException as e:  # raised by the loop when it reaches this batch
            self._put(e)
            return
        self._put(_END)

    def _on_stream(self) -> contextlib.AbstractContextManager:
        if self.stream is None:
            return contextlib.nullcontext()
        stack = contextlib.ExitStack()
        stack.enter_context(torch.cuda.device(self.device))
        stack.enter_context(torch.cuda.stream(self.stream))
        return stack

    def _put(self, item: Any) -> bool:
        """Queue ``item`` unless the loop has stopped listening; False when it has."""
        while not self.stop.is_set():
            try:
                self.queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False


def _hand_over(tensors: Iterable[torch.Tensor | None], event: Any, device: torch.device) -> None:
    """Make the current stream wait for the side stream's work and own the prepared tensors."""
    current = torch.cuda.current_stream(device)
    current.wait_event(event)
    for t in tensors:
        if t is not None and t.is_cuda:  # host tensors (pinned views bound for the device) need nothing
            t.record_stream(current)
