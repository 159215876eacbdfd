"""Stage 2 prefetch: batch k+1 is read, decoded, replayed and sent to the device while batch k trains.

A thread takes the loader's batches in order and turns each into a :class:`Ready` (the student
inputs on the device, and the store's targets as fp32 ``Features`` there). On CUDA it works on a side
stream: it records an event after each batch, the training stream waits for that event before it
uses the tensors, and ``record_stream`` keeps their blocks from going back to the side stream's pool
before the training stream is done with them. So nvjpeg's decode (which synchronises its own stream
at start and end), the replay kernels and the host-to-device copies of batch k+1 run beside the
step of batch k instead of between steps.

Everything the thread does is a pure function of the batch (no global RNG is drawn, the loader
has its own generator), so training is bitwise what it is without the thread; ``AHEAD = 0`` runs the
same preparation in the loop's own thread (tests compare the two). An error in a batch (an image that
cannot be decoded) is raised by the loop when it reaches that batch, after the batches before it.
"""

from __future__ import annotations

import contextlib
import queue
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

from cospress.data.device_decode import decode_replay
from cospress.distill.model import teacher_features
from cospress.errors import BadImageError
from cospress.models.features import Features

__all__ = ["AHEAD", "Ready", "device_images", "prefetch", "prepare_batch"]

AHEAD = 1  # batches prepared ahead of the one training; 0: prepared in the loop's thread, in turn


@dataclass
class Ready:
    """One batch ready to train: the loader's ``batch``, ``images`` uint8 [n*R, 3, S, S] on the device,
    ``teacher`` the store's targets (fp32 Features on the device), or None online (the loop runs the
    teacher)."""

    batch: dict[str, Any]
    images: torch.Tensor
    teacher: Features | None


def device_images(batch: dict[str, Any], size: int, device: torch.device) -> torch.Tensor:
    """The student inputs of a batch: uint8 [n*R, 3, S, S] on ``device``, decoded there in bytes mode.

    Raises BadImageError naming the first image that cannot be decoded (as the CPU path does).
    """
    if batch.get("images") is not None:
        return batch["images"].to(device, non_blocking=True)
    enc = batch["encoded"]
    n = len(enc)
    params = batch["params"].reshape(n, -1, batch["params"].shape[-1])
    images, errors = decode_replay(enc, list(params), size, device)
    bad = [(i, e) for i, e in enumerate(errors) if e]
    if bad:
        i, reason = bad[0]
        raise BadImageError(
            f"{reason} (store row {int(batch['rows'][i])}); remove it and re-extract the store"
        )
    return images


def prepare_batch(batch: dict[str, Any], size: int, device: torch.device, targets: bool) -> Ready:
    """The student inputs of ``batch`` and, when ``targets`` (store mode), its targets, on ``device``.

    The images are decoded before the targets move: a decode never runs while the targets' float16
    copies are in flight (see ``device_decode._decode_jpegs`` for why that is safe anyway on CUDA).
    """
    images = device_images(batch, size, device)
    return Ready(batch, images, teacher_features(batch, device) if targets else None)


def prefetch(
    loader: Iterable[dict[str, Any]],
    prepare: Callable[[dict[str, Any]], Ready],
    device: torch.device,
    ahead: int | None = None,
) -> Iterator[Ready]:
    """``prepare(batch)`` of every batch of ``loader``, in order, prepared in a thread while the caller
    trains on the current one: up to ``ahead`` (default :data:`AHEAD`) wait ready in a queue while the
    thread prepares the next. ``ahead`` 0: each batch is prepared in the caller's thread when asked for."""
    ahead = AHEAD if ahead is None else int(ahead)
    if ahead <= 0:
        for batch in loader:
            yield prepare(batch)
        return
    worker = _Worker(loader, prepare, device, ahead)
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
                _hand_over(ready, event, device)
            yield ready
    finally:
        worker.stop.set()
        worker.thread.join()


_END = object()


class _Worker:
    """The prefetching thread: puts (Ready, CUDA event or None), then an error or ``_END``, on ``queue``."""

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


def _hand_over(ready: Ready, event: Any, device: torch.device) -> None:
    """Make the current (training) stream wait for the side stream's work on ``ready`` and own its tensors."""
    current = torch.cuda.current_stream(device)
    current.wait_event(event)
    tensors = [ready.images]
    if ready.teacher is not None:
        tensors += [ready.teacher.cls, ready.teacher.tokens]
    for t in tensors:
        t.record_stream(current)
