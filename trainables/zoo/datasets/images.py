"""Decoded images -> a Dataset, in memory (normalized float32) or through a content-addressed,
memory-mapped cache of uint8 pixels (``MappedImages``: normalized per slice, where used).

The cache lives under ``<cache>/<key>/`` where the key is a SHA-256 of the sources' contents,
the transform and the image count: a changed source or transform makes a new cache; workers
of one node map the same file (the page cache holds one copy). Preparation runs once per
node: a lock file serializes it and the directory appears by an atomic rename."""
from __future__ import annotations

import fcntl
import hashlib
import json
import mmap
import os
import shutil
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from trainables.zoo.datasets.transforms import ImageTransform, normalize

CACHE_VERSION = "bitflip-image-cache-1"
PIXELS_FILE, LABELS_FILE, META_FILE = "pixels.u8", "labels.npy", "meta.json"
CHUNK = 64  # images decoded per round of the thread pool
DROP_MARGIN = 1 << 20  # bytes around a slice also dropped from the mapping (covers the kernel's fault-around)


@dataclass(frozen=True)
class ImageSource:
    """N images to decode: ``read(i)`` gives image i as uint8 (C, H, W) or raises; ``where(i)``
    names it in messages; ``digest()`` hashes the sources' contents (the cache key)."""

    count: int
    read: Callable[[int], torch.Tensor]
    where: Callable[[int], str]
    digest: Callable[[], str]


class MappedImages:
    """uint8 (N, C, H, W) pixels memory-mapped from a cache file; a slice comes out normalized
    in float32 on ``device`` (then ``dtype``), bit-identical to the in-memory path. Quacks like
    the few tensor methods the engine uses on its inputs (shape, slicing, ``to``)."""

    is_mapped_images = True

    def __init__(self, path: str | Path, shape: Sequence[int], transform: ImageTransform,
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32):
        self.path = Path(path)
        self.shape = torch.Size(shape)
        self.transform = transform
        self.device = torch.device(device)
        self.dtype = dtype
        with open(self.path, "rb") as f:
            self._map = mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ)
        self._pixels = np.frombuffer(self._map, dtype=np.uint8).reshape(tuple(self.shape))
        self._row = int(np.prod(self.shape[1:]))
        self._constants = transform.constants(self.device)
        self._lut: np.ndarray | None = None  # (C, 256) normalized values, made on first use on the CPU

    def __len__(self) -> int:
        return int(self.shape[0])

    def dim(self) -> int:
        return len(self.shape)

    def is_floating_point(self) -> bool:
        return self.dtype.is_floating_point

    def is_complex(self) -> bool:
        return False

    def pixels(self, start: int, stop: int) -> torch.Tensor:
        """The stored uint8 pixels of images start..stop-1 (a copy, on the CPU). The pages read
        leave this process's mapping again (MADV_DONTNEED; the page cache keeps them for every
        worker), so its resident memory does not grow with the images it has gone through."""
        out = torch.from_numpy(np.array(self._pixels[start:stop]))
        self._drop(start, stop)
        return out

    def __getitem__(self, index) -> torch.Tensor:
        if isinstance(index, (int, np.integer)):
            i = int(index) + (len(self) if index < 0 else 0)
            if not 0 <= i < len(self):
                raise IndexError(f"image {index} is outside 0..{len(self) - 1}")
            return self[i:i + 1][0]
        if not isinstance(index, slice) or index.step not in (None, 1):
            raise TypeError("MappedImages takes an integer or a contiguous slice")
        start, stop, _ = index.indices(len(self))
        stop = max(start, stop)
        if self.device.type == "cpu":
            out = self._lookup(start, stop)
        else:
            out = normalize(self.pixels(start, stop).to(self.device), self._constants)
        return out if self.dtype == torch.float32 else out.to(self.dtype)

    def _lookup(self, start: int, stop: int) -> torch.Tensor:
        """Images start..stop-1 normalized on the CPU by table look-up straight from the mapping:
        the table holds ``normalize`` of each of the 256 values per channel, so every output
        equals ``normalize`` of its pixel (one pass instead of four); the pages read are dropped."""
        if self._lut is None:
            values = torch.arange(256, dtype=torch.uint8).view(1, 256, 1).expand(self.shape[1], 256, 1)
            self._lut = normalize(values, self.transform.constants())[:, :, 0].contiguous().numpy()
        out = np.empty((stop - start, *self.shape[1:]), dtype=np.float32)
        for n in range(stop - start):
            for c in range(self.shape[1]):
                np.take(self._lut[c], self._pixels[start + n, c], out=out[n, c], mode="clip")
        self._drop(start, stop)
        return torch.from_numpy(out)

    def _drop(self, start: int, stop: int) -> None:
        """Unmap the pages of images start..stop-1 from this process (the page cache keeps them),
        with a margin: a page fault maps its neighbours too (the kernel's fault-around, 64 KiB)."""
        lo = max(0, start * self._row - DROP_MARGIN) // mmap.PAGESIZE * mmap.PAGESIZE
        hi = min(len(self._map), -(-(stop * self._row + DROP_MARGIN) // mmap.PAGESIZE) * mmap.PAGESIZE)
        if hi > lo:
            self._map.madvise(mmap.MADV_DONTNEED, lo, hi - lo)

    def to(self, device=None, dtype=None, **_) -> "MappedImages":
        """A view that yields slices on ``device`` in ``dtype`` (nothing is read now)."""
        return MappedImages(self.path, self.shape, self.transform, device if device is not None else self.device,
                            dtype if dtype is not None else self.dtype)

    def float(self) -> torch.Tensor:
        """All images as one float32 tensor (reads everything: for small data only)."""
        return self.to(dtype=torch.float32)[:]

    def __repr__(self) -> str:
        return f"MappedImages({self.path}, shape={tuple(self.shape)}, device={self.device}, dtype={self.dtype})"


def _decoded(source: ImageSource, transform: ImageTransform, workers: int):
    """Yield (i, uint8 pixels after the transform) in order; decoding runs on a thread pool."""
    def one(i: int) -> torch.Tensor:
        try:
            image = source.read(i)
        except ValueError:
            raise
        except Exception as exc:  # noqa: BLE001 - a corrupt or unreadable file: named in one line
            raise ValueError(f"{source.where(i)}: cannot read the image ({' '.join(str(exc).split())[:200]})") from None
        return transform.geometric(image)

    with ThreadPoolExecutor(max_workers=workers) as pool:
        for lo in range(0, source.count, CHUNK):
            for i, pixels in zip(range(lo, min(lo + CHUNK, source.count)), pool.map(one, range(lo, min(lo + CHUNK, source.count)))):
                yield i, pixels


def _check_shape(source: ImageSource, i: int, pixels: torch.Tensor, shape: torch.Size | None) -> None:
    if shape is not None and pixels.shape != shape:
        raise ValueError(f"{source.where(i)} is {'x'.join(map(str, pixels.shape))} after the transform but "
                         f"{source.where(0)} is {'x'.join(map(str, shape))}: give --transform a resize and crop "
                         "(e.g. resize=256,crop=224) so every image has one size")


def _workers() -> int:
    return max(1, min(8, os.cpu_count() or 1))


def in_memory(source: ImageSource, transform: ImageTransform) -> torch.Tensor:
    """All images decoded, transformed and normalized: float32 (N, C, H, W)."""
    constants = transform.constants()
    images = None
    for i, pixels in _decoded(source, transform, _workers()):
        if images is None:
            images = torch.empty((source.count, *pixels.shape), dtype=torch.float32)
        _check_shape(source, i, pixels, images.shape[1:])
        images[i] = normalize(pixels, constants)
    return images


def cache_key(source: ImageSource, transform: ImageTransform) -> str:
    """SHA-256 of the cache format, the sources' contents, the transform and the image count."""
    text = f"{CACHE_VERSION}\n{source.digest()}\n{transform.describe()}\n{source.count}\n"
    return hashlib.sha256(text.encode()).hexdigest()


def mapped(source: ImageSource, transform: ImageTransform, labels: torch.Tensor, cache: str | os.PathLike) -> tuple[MappedImages, str, bool]:
    """(images, data SHA-256, prepared now?) from the cache under ``cache``, preparing it first
    when this node has none; a failed preparation leaves nothing behind."""
    root = Path(cache).expanduser()
    key = cache_key(source, transform)
    final = root / key[:40]
    prepared = False
    if not (final / META_FILE).is_file():
        created_root = not root.exists()
        root.mkdir(parents=True, exist_ok=True)
        lock_path = root / f".{key[:40]}.lock"
        try:
            with open(lock_path, "w") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX)  # one preparation per node; the others wait for it
                if not (final / META_FILE).is_file():
                    _prepare(source, transform, labels, final)
                    prepared = True
        except BaseException:
            if created_root:
                shutil.rmtree(root, ignore_errors=True)
            raise
        finally:
            lock_path.unlink(missing_ok=True)
    meta = json.loads((final / META_FILE).read_text())
    images = MappedImages(final / PIXELS_FILE, meta["shape"], transform)
    return images, meta["data_sha256"], prepared


def _prepare(source: ImageSource, transform: ImageTransform, labels: torch.Tensor, final: Path) -> None:
    """Decode into ``<final>.tmp-<pid>`` (uint8 pixels, labels, meta with the data digest the
    in-memory path would have), then rename it into place."""
    tmp = final.with_name(f"{final.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        constants = transform.constants()
        digest = hashlib.sha256()
        pixels_file, shape = None, None
        for i, pixels in _decoded(source, transform, _workers()):
            if pixels_file is None:
                shape = pixels.shape
                pixels_file = np.memmap(tmp / PIXELS_FILE, dtype=np.uint8, mode="w+", shape=(source.count, *shape))
            _check_shape(source, i, pixels, shape)
            pixels_file[i] = pixels.numpy()
            digest.update(normalize(pixels, constants).contiguous().numpy().tobytes())
        pixels_file.flush()
        del pixels_file
        digest.update(labels.to(torch.int64).contiguous().numpy().tobytes())
        np.save(tmp / LABELS_FILE, labels.to(torch.int64).numpy())
        (tmp / META_FILE).write_text(json.dumps({"shape": [source.count, *shape], "transform": transform.describe(),
                                                  "data_sha256": digest.hexdigest(), "format": CACHE_VERSION}))
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def sha256_files(paths: Sequence[Path], base: Path) -> str:
    """SHA-256 over the relative paths and contents of ``paths``."""
    digest = hashlib.sha256()
    for path in paths:
        digest.update(str(path.relative_to(base)).encode() + b"\0")
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        digest.update(b"\0")
    return digest.hexdigest()
