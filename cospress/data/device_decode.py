"""Bytes mode: workers only read encoded bytes; JPEGs are decoded batch-wise on the compute device.

On a GPU the CPU image pipeline is the wall (PIL decode + crop ~270 images/s per core, nvjpeg ~9,000).
A DataLoader worker reads a sample's bytes and parses only the JPEG header (size, EXIF orientation,
sanity); the main process decodes a batch in one ``torchvision.io.decode_jpeg(list, device=...)`` call
(nvjpeg on CUDA; libjpeg-turbo on the CPU, how the tests run the same code path) and replays the
views there (:func:`cospress.data.views.replay_views_batch`).

A sample takes the CPU path in its worker (decoded exactly as :meth:`Source.load`, shipped as a
uint8 tensor) when the source has no bytes (Fashion-MNIST), when the bytes are not a baseline /
progressive JPEG in RGB or grey (PNG, WebP, CMYK JPEG, ...), when the JPEG has no end marker
(truncated: PIL refuses those, so the CPU path gives the same error), or when its header cannot be
parsed. A JPEG the device decoder rejects is retried alone, then decoded by `decode_image`, so errors
carry the CPU path's reasons (``not an image``, ``truncated image: ...``, ``unreadable: ...``).
EXIF orientation, read from the header in the worker, is applied to the decoded tensor with the flips
and rotations of ``PIL.ImageOps.exif_transpose`` (torchvision applies it on the CPU only).
Pixels: libjpeg-turbo in torchvision equals PIL's decode exactly; nvjpeg (its own IDCT and chroma
upsampling) may differ by a few grey levels (``pipelines/bench/bench_gpu.py`` measures it).

Stage 2's batches travel as one :class:`EncodedBatch` (all JPEG bytes in one uint8 buffer, all
CPU-decoded pixels in another), stage 1's as per-image :class:`Encoded`; both pinned by the DataLoader's
pin-memory thread and copied with ``non_blocking`` (never concatenated: a ``torch.cat`` of pinned tensors
is pageable).
"""

from __future__ import annotations

import io
import logging
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from PIL import Image

from cospress.data.sources import DEFAULT_MAX_PIXELS, Source, decode_image
from cospress.errors import BadImageError, ConfigError

log = logging.getLogger(__name__)

DECODE_CHOICES = ("auto", "cpu", "gpu", "device")
_JPEG_SOI = b"\xff\xd8\xff"
_JPEG_EOI = b"\xff\xd9"
_ORIENTATION_TAG = 0x0112
KIND_JPEG, KIND_PIXELS, KIND_ERROR = 0, 1, 2


def resolve_decode(decode: str, device: torch.device | str) -> str:
    """``cpu`` (decode + replay in workers, the classic path) or ``device`` (bytes mode).

    auto = device on CUDA, cpu otherwise; gpu = device, and requires a CUDA device; device =
    decode on the run's compute device whatever it is (a CPU too: tests, or spare cores).
    """
    device = torch.device(device)
    if decode not in DECODE_CHOICES:
        raise ConfigError(f"decode {decode!r} is unknown; use one of {', '.join(DECODE_CHOICES)}")
    if decode == "auto":
        return "device" if device.type == "cuda" else "cpu"
    if decode == "gpu":
        if device.type != "cuda":
            raise ConfigError(
                f"decode=gpu needs a CUDA device but the run uses {device}; use --decode cpu or device"
            )
        return "device"
    return decode


# ---------------------------------------------------------------------------------------------- worker side


@dataclass
class Encoded:
    """One sample as a worker ships it: JPEG bytes for the device, CPU-decoded pixels, or an error.

    data: uint8 [n] encoded JPEG (kind JPEG); pixels: uint8 [3, H, W] (kind PIXELS); error: the
    BadImageError reason (kind ERROR). width / height are after EXIF orientation.
    """

    kind: int
    data: torch.Tensor | None = None
    pixels: torch.Tensor | None = None
    orientation: int = 1
    width: int = 0
    height: int = 0
    error: str = ""

    def pin_memory(self) -> Encoded:
        t = self.data if self.kind == KIND_JPEG else self.pixels
        if t is None:
            return self
        pinned = t.pin_memory()
        if self.kind == KIND_JPEG:
            return Encoded(self.kind, pinned, None, self.orientation, self.width, self.height)
        return Encoded(self.kind, None, pinned, 1, self.width, self.height)


def jpeg_header(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[int, int, int] | None:
    """(width, height, EXIF orientation) of a JPEG the device decoder can take, else None.

    width / height are as stored (before orientation). None for anything else: not a JPEG, no end
    marker, CMYK / YCCK, a header PIL cannot parse, or more pixels than allowed.
    """
    if not data.startswith(_JPEG_SOI) or not data.rstrip(b"\x00\r\n ").endswith(_JPEG_EOI):
        return None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data))
            if im.format != "JPEG" or im.mode not in ("RGB", "L"):
                return None
            w, h = im.size
            orientation = int(im.getexif().get(_ORIENTATION_TAG, 1) or 1)
    except Exception:  # the CPU path will decode it and give the reason
        return None
    limit = min(max_pixels, Image.MAX_IMAGE_PIXELS or max_pixels)
    if w < 1 or h < 1 or w * h > limit:
        return None
    return w, h, orientation if 1 <= orientation <= 8 else 1


def _pixels(image: Image.Image) -> torch.Tensor:
    arr = np.asarray(image.convert("RGB") if image.mode != "RGB" else image, dtype=np.uint8)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).contiguous()


def read_encoded(source: Source, i: int, max_pixels: int = DEFAULT_MAX_PIXELS) -> Encoded:
    """Sample i of a source for bytes mode (runs in a DataLoader worker); never raises BadImageError."""
    try:
        data = source.read_bytes(i)
        if data is None:  # array sources (Fashion-MNIST): CPU decode, as Source.load
            image = source.load(i, max_pixels=max_pixels).image
            return Encoded(KIND_PIXELS, pixels=_pixels(image), width=image.size[0], height=image.size[1])
        head = jpeg_header(data, max_pixels)
        if head is None:
            image = decode_image(data, max_pixels)
            return Encoded(KIND_PIXELS, pixels=_pixels(image), width=image.size[0], height=image.size[1])
    except BadImageError as e:
        return Encoded(KIND_ERROR, error=str(e) or "unreadable")
    w, h, orientation = head
    if orientation >= 5:
        w, h = h, w
    tensor = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    return Encoded(KIND_JPEG, data=tensor, orientation=orientation, width=w, height=h)


def worker_read(source: Source, i: int, decode: str, max_pixels: int = DEFAULT_MAX_PIXELS) -> Encoded | Any:
    """The one decode switch of every dataset: what a DataLoader worker reads for source item ``i``.

    decode "device": the :class:`Encoded` bytes (or pixels), decoded later on the compute device;
    never raises, a bad input comes back with ``.error`` set. decode "cpu": the decoded
    :class:`~cospress.data.sources.Sample`; a bad input raises BadImageError.
    """
    if decode == "device":
        return read_encoded(source, i, max_pixels)
    return source.load(i, max_pixels=max_pixels)


@dataclass
class EncodedBatch:
    """A batch of :class:`Encoded` samples packed into two flat buffers (cheap to share and to pin).

    jpeg: uint8 [sum bytes]; pixels: uint8 [sum 3*H*W]; per sample: kind, [start, stop) in its
    buffer, orientation, width, height (after orientation) and error ("" when none).
    """

    kinds: list[int]
    spans: list[tuple[int, int]]
    orientation: list[int]
    sizes: list[tuple[int, int]]
    errors: list[str]
    jpeg: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.uint8))
    pixels: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.uint8))

    def __len__(self) -> int:
        return len(self.kinds)

    def pin_memory(self) -> EncodedBatch:
        return EncodedBatch(
            self.kinds,
            self.spans,
            self.orientation,
            self.sizes,
            self.errors,
            self.jpeg.pin_memory(),
            self.pixels.pin_memory(),
        )


def pack(items: Sequence[Encoded]) -> EncodedBatch:
    """Pack samples into one :class:`EncodedBatch` (a DataLoader ``collate_fn``; runs in the worker)."""
    kinds, spans, orient, sizes, errors = [], [], [], [], []
    jpegs, pixels = [], []
    n_jpeg = n_pix = 0
    for it in items:
        kinds.append(it.kind)
        orient.append(it.orientation)
        sizes.append((it.width, it.height))
        errors.append(it.error)
        if it.kind == KIND_JPEG:
            spans.append((n_jpeg, n_jpeg + it.data.numel()))
            n_jpeg += it.data.numel()
            jpegs.append(it.data)
        elif it.kind == KIND_PIXELS:
            spans.append((n_pix, n_pix + it.pixels.numel()))
            n_pix += it.pixels.numel()
            pixels.append(it.pixels.reshape(-1))
        else:
            spans.append((0, 0))
    empty = torch.zeros(0, dtype=torch.uint8)
    return EncodedBatch(
        kinds,
        spans,
        orient,
        sizes,
        errors,
        torch.cat(jpegs) if jpegs else empty,
        torch.cat(pixels) if pixels else empty.clone(),
    )


# ---------------------------------------------------------------------------------------------- main process


def apply_orientation(image: torch.Tensor, orientation: int) -> torch.Tensor:
    """The EXIF orientation transform of ``PIL.ImageOps.exif_transpose`` on a [C, H, W] tensor."""
    if orientation == 2:
        return image.flip(-1)
    if orientation == 3:
        return image.flip(-1).flip(-2)
    if orientation == 4:
        return image.flip(-2)
    if orientation == 5:
        return image.transpose(-1, -2)
    if orientation == 6:
        return image.transpose(-1, -2).flip(-1)
    if orientation == 7:
        return image.transpose(-1, -2).flip(-1).flip(-2)
    if orientation == 8:
        return image.transpose(-1, -2).flip(-2)
    return image


_DECODE_STREAMS: dict[int, Any] = {}  # CUDA device index -> the stream decoded outputs are allocated on


def _decode_jpegs(datas: list[torch.Tensor], device: torch.device) -> list[torch.Tensor | None]:
    """Decode JPEG byte tensors in one call; on failure one by one (None where that fails too).

    Stream safety on CUDA: torchvision allocates the outputs for the caller's current stream, then
    nvjpeg writes them on a stream of its own that waits for nothing. A block freed on the current
    stream while queued kernels still use it (the targets' float16 copies, the last step's
    activations) is free to the allocator, so the decoder could overwrite it before they ran. The
    outputs are therefore allocated on a stream that runs nothing (``_DECODE_STREAMS``); the caller's
    stream waits for the decode and is recorded on each output (``record_stream``): a block returns
    to that pool only once the caller is done with it
    (``test_decode_leaves_blocks_freed_with_pending_work_alone_on_cuda`` shows the race).
    """
    if device.type != "cuda":
        return _decode_jpegs_on(datas, device)
    index = device.index if device.index is not None else torch.cuda.current_device()
    stream = _DECODE_STREAMS.get(index)
    if stream is None:
        stream = _DECODE_STREAMS[index] = torch.cuda.Stream(device=index)
    consumer = torch.cuda.current_stream(index)
    with torch.cuda.stream(stream):
        out = _decode_jpegs_on(datas, torch.device("cuda", index))
    consumer.wait_stream(stream)
    for img in out:
        if img is not None:
            img.record_stream(consumer)
    return out


def _decode_jpegs_on(datas: list[torch.Tensor], device: torch.device) -> list[torch.Tensor | None]:
    """:func:`_decode_jpegs` on the current stream."""
    from torchvision.io import ImageReadMode, decode_jpeg

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*decoding and encoding capabilities of TorchVision.*")
        try:
            return list(decode_jpeg(datas, mode=ImageReadMode.RGB, device=device))
        except RuntimeError:
            out: list[torch.Tensor | None] = []
            for d in datas:
                try:
                    out.append(decode_jpeg([d], mode=ImageReadMode.RGB, device=device)[0])
                except RuntimeError:
                    out.append(None)
            return out


def decode_batch(
    batch: EncodedBatch | Sequence[Encoded], device: torch.device | str
) -> tuple[list[torch.Tensor | None], list[str]]:
    """Decode a batch on ``device``: (images, errors), one per sample, in order.

    images[i] is uint8 [3, H_i, W_i] on ``device`` (EXIF orientation applied) or None when sample i
    cannot be decoded; errors[i] is then its reason (as :func:`decode_image`), else "".
    """
    if isinstance(batch, EncodedBatch):
        kinds, errors, orientation, sizes = batch.kinds, list(batch.errors), batch.orientation, batch.sizes
        buffers = [batch.jpeg if k == KIND_JPEG else batch.pixels for k in kinds]
        data = [buf[slice(*sp)] for buf, sp in zip(buffers, batch.spans, strict=True)]
    else:  # samples (stage 1): their own tensors, pinned by the DataLoader (a torch.cat would be pageable)
        kinds, errors = [it.kind for it in batch], [it.error for it in batch]
        orientation, sizes = [it.orientation for it in batch], [(it.width, it.height) for it in batch]
        data = [it.data if it.kind == KIND_JPEG else it.pixels for it in batch]
    device = torch.device(device)
    n = len(kinds)
    images: list[torch.Tensor | None] = [None] * n
    jpeg_rows = [i for i in range(n) if kinds[i] == KIND_JPEG]
    if jpeg_rows:
        datas = [data[i] for i in jpeg_rows]
        for i, d, img in zip(jpeg_rows, datas, _decode_jpegs(datas, device), strict=True):
            if img is None:  # the device decoder refused it: the CPU decoder decides (image or reason)
                try:
                    img = _pixels(decode_image(bytes(d.cpu().numpy()))).to(device)
                    log.info("sample %d: the device JPEG decoder failed, decoded on the CPU", i)
                except BadImageError as e:
                    errors[i] = str(e) or "unreadable"
                    continue
            else:
                img = apply_orientation(img, orientation[i])
            images[i] = img
    for i in range(n):
        if kinds[i] == KIND_PIXELS:
            w, h = sizes[i]
            images[i] = data[i].view(3, h, w).to(device, non_blocking=True)
    return images, errors


def decode_replay(
    batch: EncodedBatch | Sequence[Encoded],
    params: Sequence[np.ndarray | torch.Tensor],
    size: int,
    device: torch.device | str,
) -> tuple[torch.Tensor, list[str]]:
    """Decode a batch and replay views of every image on ``device``.

    params[i]: the recorded view parameters of sample i, [V_i, P]. Returns (views uint8
    [sum of V_i over decoded samples, 3, size, size], errors [n]): sample-major, failed samples
    (errors[i] != "") contribute no views.
    """
    from cospress.data.views import replay_views_batch

    images, errors = decode_batch(batch, device)
    if len(params) != len(images):
        raise ValueError(f"{len(params)} params arrays for {len(images)} samples")
    refs, rows = [], []
    for img, p in zip(images, params, strict=True):
        if img is None:
            continue
        p = torch.as_tensor(np.asarray(p, dtype=np.float32)).reshape(-1, p.shape[-1])
        refs.extend([img] * len(p))
        rows.append(p)
    if not refs:
        return torch.zeros(0, 3, size, size, dtype=torch.uint8, device=torch.device(device)), errors
    return replay_views_batch(refs, torch.cat(rows), size), errors


def decode_view_items(items: list[dict], size: int, device: torch.device | str) -> None:
    """Stage 1 helper: decode + replay a DataLoader batch of per-image dicts in place, on ``device``.

    Each item holds "encoded" (an :class:`Encoded`, or None when the worker already failed and set
    "reason") and "params" [V, P]. Afterwards "images" is uint8 [V, 3, size, size] on ``device``, or
    None with "reason" set for an image that cannot be decoded; "encoded" is removed.
    """
    todo = [it for it in items if it.get("encoded") is not None]
    if todo:
        views, errors = decode_replay(
            [it["encoded"] for it in todo], [it["params"] for it in todo], size, device
        )
        start = 0
        for it, err in zip(todo, errors, strict=True):
            if err:
                it["images"], it["reason"] = None, err
            else:
                n = len(it["params"])
                it["images"] = views[start : start + n]
                start += n
    for it in items:
        it.pop("encoded", None)


__all__ = [
    "DECODE_CHOICES",
    "decode_view_items",
    "Encoded",
    "EncodedBatch",
    "apply_orientation",
    "decode_batch",
    "decode_replay",
    "jpeg_header",
    "pack",
    "read_encoded",
    "resolve_decode",
]
