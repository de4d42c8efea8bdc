"""Evaluation data sets as one input tensor (N, ...) on the CPU.

``load_dataset(name)`` knows ``fashion-mnist`` (the real test split, shipped in the repo
and checksummed: runs with no network), ``fashion-mnist-calib`` (the first 2,000 images
of the training split, shipped the same way: calibration data for mitigations, never
evaluated on), ``cifar10`` / ``cifar100`` (torchvision's test splits under a data root,
downloaded only when asked), ``synthetic:<C>x<H>x<W>:<classes>[:<N>]`` (deterministic
random float images, for benchmarks) and ``synthetic-tokens:<T>:<vocab>:<classes>[:<N>]``
(deterministic random int64 token ids, for text models). Prefixed names of the data-set
registry (``folder:``, ``tensors:``, ``hf-dataset:``, ``py:`` and those of other packages:
trainables.zoo.datasets) load through their source.
"""
from __future__ import annotations

import gzip
import hashlib
import importlib
import os
import pickle
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

DATA_ROOT_ENV = "BITFLIP_DATA_ROOT"
DEFAULT_DATA_ROOT = "~/.cache/bitflip/data"
SHIPPED_DIR = Path(__file__).resolve().parents[2] / "data" / "fashion-mnist"

# Fashion-MNIST: SHA-256 of the shipped gzip files (Debian's dataset-fashion-mnist, the
# upstream files) and the pixel mean/std of the 60,000 training images, pixels in [0, 1]
# (computed by scripts/train_demo.py: 0.28604, 0.35302).
FASHION_MNIST_SHA256 = {
    "t10k-images-idx3-ubyte.gz": "cc1d090a38ace84dfa1aa66e3ada7c336ef481a96936906477e6dd344da56eaa",
    "t10k-labels-idx1-ubyte.gz": "8d3605d196f4be44669e46906da9733c8131fef761fdbfec72c424d5222f1a05",
}
# The calibration split: the first CALIB_IMAGES images and labels of the training split,
# rewritten as IDX files by scripts/make_fashion_calib.py (gzip without name or time: the
# bytes are reproducible).
FASHION_MNIST_CALIB_SHA256 = {
    "calib-images-idx3-ubyte.gz": "f22187ccdaf60ba8ba633c688ffdb32f5d0268e239d82877be5684d1661de7f9",
    "calib-labels-idx1-ubyte.gz": "eebe183fe476d171b9496a702183a5bac1aa920264ba962d5208ac2c6487ee0f",
}
FASHION_MNIST_CALIB_IMAGES = 2000
FASHION_MNIST_MEAN = 0.2860
FASHION_MNIST_STD = 0.3530
IDX_SPLITS = ("train", "t10k", "calib")

SYNTHETIC_PREFIX = "synthetic:"
SYNTHETIC_SYNTAX = "synthetic:<C>x<H>x<W>:<classes>[:<N>] (e.g. synthetic:3x32x32:10 or synthetic:3x32x32:10:512)"
SYNTHETIC_DEFAULT_IMAGES = 10_000
SYNTHETIC_SEED = 20240229  # fixed: the same name always gives the same tensors
SYNTHETIC_TOKENS_PREFIX = "synthetic-tokens:"
SYNTHETIC_TOKENS_SYNTAX = (
    "synthetic-tokens:<T>:<vocab>:<classes>[:<N>] (e.g. synthetic-tokens:32:1000:4 or synthetic-tokens:16:100:4:256)"
)
SYNTHETIC_TOKENS_SEED = 20240301


class DatasetNotFoundError(FileNotFoundError, ValueError):
    """A data set's files are missing; catchable as FileNotFoundError or ValueError."""


@dataclass(frozen=True)
class Dataset:
    """A whole evaluation split: the inputs ``images`` (N, ...) and int64 labels (N,).
    Images are normalized float32 (N, C, H, W); token data are int64 ids (N, T)."""

    name: str
    images: torch.Tensor
    labels: torch.Tensor
    num_classes: int
    synthetic: bool
    sha256: str | None = None  # the data digest when known without reading the images (a prepared cache)
    classes_known: bool = True  # False: num_classes is max label + 1 (the source names no class count): the model decides

    @property
    def model_classes(self) -> int | None:
        """The class count to build the model with: None when the data cannot tell (the model's own)."""
        return self.num_classes if self.classes_known else None

    @property
    def input_shape(self) -> tuple[int, ...]:
        """The shape of one example: (C, H, W) for images, (T,) for token ids."""
        return tuple(int(d) for d in self.images.shape[1:])

    def __len__(self) -> int:
        return int(self.images.shape[0])


def default_data_root() -> str:
    """Where CIFAR files live unless a root is given: $BITFLIP_DATA_ROOT or ~/.cache/bitflip/data."""
    return os.path.expanduser(os.environ.get(DATA_ROOT_ENV) or DEFAULT_DATA_ROOT)


def sha256_file(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


# ---------------------------------------------------------------- Fashion-MNIST (IDX files)


def _read_idx(path: Path, ndim: int) -> np.ndarray:
    """Parse a gzipped IDX file of unsigned bytes (magic 0x0000 0x08 ndim) into an array."""
    with gzip.open(path, "rb") as f:
        raw = f.read()
    if len(raw) < 4 + 4 * ndim or raw[:4] != bytes([0, 0, 8, ndim]):
        raise ValueError(f"{path} is not an IDX file of {ndim}-d unsigned bytes")
    dims = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(dims)):
        raise ValueError(f"{path}: header says {dims} but holds {data.size} bytes")
    return data.reshape(dims)


def read_idx_split(directory: str | os.PathLike, split: str = "t10k") -> tuple[torch.Tensor, torch.Tensor]:
    """Read ``<split>-images-idx3-ubyte.gz`` and ``<split>-labels-idx1-ubyte.gz`` from
    ``directory``: (N, 1, 28, 28) uint8 images and (N,) int64 labels."""
    if split not in IDX_SPLITS:
        raise ValueError(f"unknown split {split!r}: use one of {', '.join(IDX_SPLITS)}")
    directory = Path(directory)
    image_path = directory / f"{split}-images-idx3-ubyte.gz"
    label_path = directory / f"{split}-labels-idx1-ubyte.gz"
    missing = [str(p) for p in (image_path, label_path) if not p.is_file()]
    if missing:
        raise DatasetNotFoundError(f"Fashion-MNIST files not found: {', '.join(missing)}")
    images = _read_idx(image_path, 3)
    labels = _read_idx(label_path, 1)
    if images.shape[0] != labels.shape[0]:
        raise ValueError(f"{directory}: {images.shape[0]} images but {labels.shape[0]} labels")
    return torch.from_numpy(images.copy()).unsqueeze(1), torch.from_numpy(labels.astype(np.int64))


def normalize_fashion_mnist(images: torch.Tensor) -> torch.Tensor:
    """uint8 images -> float32 with the training split's mean and std."""
    return (images.float() / 255.0 - FASHION_MNIST_MEAN) / FASHION_MNIST_STD


def _load_shipped_split(split: str, checksums: dict[str, str]) -> tuple[torch.Tensor, torch.Tensor, int]:
    """A Fashion-MNIST split shipped in ``data/fashion-mnist/``, checksummed and normalized."""
    for filename, expected in checksums.items():
        path = SHIPPED_DIR / filename
        if not path.is_file():
            raise DatasetNotFoundError(f"the shipped Fashion-MNIST file {path} is missing: restore it from the repository")
        actual = sha256_file(path)
        if actual != expected:
            raise ValueError(f"checksum mismatch for {path}: sha256 {actual}, expected {expected}; restore the file from the repository")
    images, labels = read_idx_split(SHIPPED_DIR, split)
    return normalize_fashion_mnist(images), labels, 10


def _load_fashion_mnist(root: str | None, download: bool) -> tuple[torch.Tensor, torch.Tensor, int]:
    """The shipped test split, checksummed (``root`` and ``download`` do not apply)."""
    return _load_shipped_split("t10k", FASHION_MNIST_SHA256)


def _load_fashion_mnist_calib(root: str | None, download: bool) -> tuple[torch.Tensor, torch.Tensor, int]:
    """The shipped calibration split (the training split's first 2,000 images), checksummed."""
    return _load_shipped_split("calib", FASHION_MNIST_CALIB_SHA256)


# ---------------------------------------------------------------- CIFAR (torchvision's files)


@dataclass(frozen=True)
class CifarSpec:
    """Where torchvision keeps a CIFAR test split and the zoo's normalization for it."""

    title: str
    torchvision_class: str
    folder: str
    test_file: str
    label_key: str
    num_classes: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


CIFAR_SPECS = {
    "cifar10": CifarSpec(
        "CIFAR-10", "CIFAR10", "cifar-10-batches-py", "test_batch", "labels", 10,
        (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010),
    ),
    "cifar100": CifarSpec(
        "CIFAR-100", "CIFAR100", "cifar-100-python", "test", "fine_labels", 100,
        (0.5070, 0.4865, 0.4409), (0.2673, 0.2564, 0.2761),
    ),
}

# The globals a CIFAR batch pickle (a dict of lists, bytes and numpy arrays) may name.
_PICKLE_ALLOWED = {
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy._core.numeric", "_frombuffer"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("_codecs", "encode"),  # bytes in protocol-2 pickles written by Python 3
}


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles plain containers and numpy arrays only: a data file must not run code."""

    def find_class(self, module: str, name: str):
        module = re.sub(r"^numpy\.core\b", "numpy._core", module)  # pickles from numpy < 2
        if (module, name) not in _PICKLE_ALLOWED:
            raise pickle.UnpicklingError(f"refusing to unpickle global {module}.{name}")
        return getattr(importlib.import_module(module), name)


def _read_cifar_batch(path: Path, spec: CifarSpec) -> tuple[np.ndarray, np.ndarray]:
    try:
        with open(path, "rb") as f:
            entry = _ArrayUnpickler(f, encoding="latin1").load()
        data = np.asarray(entry["data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
        labels = np.asarray(entry[spec.label_key], dtype=np.int64)
    except Exception as e:  # any malformed file gets one clear message
        raise ValueError(f"{path} is not a {spec.title} batch file (a pickled dict with 'data' and {spec.label_key!r}): {e}") from None
    if data.shape[0] != labels.shape[0]:
        raise ValueError(f"{path}: {data.shape[0]} images but {labels.shape[0]} labels")
    return data, labels


def _torchvision_download(spec: CifarSpec, root: str) -> None:
    """Fetch and verify the archive the way torchvision does (network needed)."""
    import torchvision.datasets

    getattr(torchvision.datasets, spec.torchvision_class)(root, train=False, download=True)


FETCH_HINT = "Pass download=True (CLI: --download)"  # how a missing split is fetched (never at test time)


def load_cifar(spec: CifarSpec, root: str | None, download: bool) -> tuple[torch.Tensor, torch.Tensor, int]:
    """The test split from ``<root>/<folder>/<test_file>`` (torchvision's layout), normalized
    per channel; ``download=True`` fetches it with torchvision first."""
    root = os.path.expanduser(root) if root else default_data_root()
    path = Path(root) / spec.folder / spec.test_file
    if download and not path.is_file():
        _torchvision_download(spec, root)
    if not path.is_file():
        raise DatasetNotFoundError(
            f"{spec.title} test split not found: expected {path}. {FETCH_HINT} to fetch it "
            f"into {root}, or point --data-root at a directory containing {spec.folder}/{spec.test_file}"
        )
    data, labels = _read_cifar_batch(path, spec)
    mean = torch.tensor(spec.mean, dtype=torch.float32).view(1, 3, 1, 1)
    std = torch.tensor(spec.std, dtype=torch.float32).view(1, 3, 1, 1)
    images = (torch.from_numpy(data).float() / 255.0 - mean) / std
    if labels.min(initial=0) < 0 or labels.max(initial=0) >= spec.num_classes:
        raise ValueError(f"{path}: labels outside 0..{spec.num_classes - 1}")
    return images.contiguous(), torch.from_numpy(labels), spec.num_classes


# The training split's files (calibration data, e.g. Ranger's bounds; never evaluated).
CIFAR_TRAIN_FILES = {"cifar10": tuple(f"data_batch_{i}" for i in range(1, 6)), "cifar100": ("train",)}


def load_cifar_train(name: str, root: str | None, download: bool) -> tuple[torch.Tensor, torch.Tensor, int]:
    """The training split of ``name`` (cifar10, cifar100) from torchvision's layout, normalized
    like the test split; ``download=True`` fetches the archive with torchvision first."""
    spec = CIFAR_SPECS[name]
    root = os.path.expanduser(root) if root else default_data_root()
    paths = [Path(root) / spec.folder / f for f in CIFAR_TRAIN_FILES[name]]
    if download and not all(p.is_file() for p in paths):
        _torchvision_download(spec, root)
    missing = [p for p in paths if not p.is_file()]
    if missing:
        raise DatasetNotFoundError(
            f"{spec.title} training split not found: expected {missing[0]}. {FETCH_HINT} to "
            f"fetch it into {root}, or point --data-root at a directory containing {spec.folder}/"
        )
    batches = [_read_cifar_batch(p, spec) for p in paths]
    data = np.concatenate([d for d, _ in batches])
    labels = np.concatenate([lab for _, lab in batches])
    mean = torch.tensor(spec.mean, dtype=torch.float32).view(1, 3, 1, 1)
    std = torch.tensor(spec.std, dtype=torch.float32).view(1, 3, 1, 1)
    images = (torch.from_numpy(data).float() / 255.0 - mean) / std
    return images.contiguous(), torch.from_numpy(labels), spec.num_classes


# ---------------------------------------------------------------- synthetic


@dataclass(frozen=True)
class SyntheticSpec:
    channels: int
    height: int
    width: int
    num_classes: int
    num_images: int


def parse_synthetic(name: str) -> SyntheticSpec:
    """``synthetic:<C>x<H>x<W>:<classes>[:<N>]`` -> its numbers; ValueError on anything else."""
    m = re.fullmatch(r"synthetic:(\d+)x(\d+)x(\d+):(\d+)(?::(\d+))?", name.strip())
    if not m:
        raise ValueError(f"bad synthetic data set {name!r}: use {SYNTHETIC_SYNTAX}")
    c, h, w, k = (int(g) for g in m.groups()[:4])
    n = int(m.group(5)) if m.group(5) is not None else SYNTHETIC_DEFAULT_IMAGES
    if min(c, h, w, n) < 1 or k < 2:
        raise ValueError(f"bad synthetic data set {name!r}: sizes and image count must be >= 1 and classes >= 2")
    return SyntheticSpec(c, h, w, k, n)


def make_synthetic(spec: SyntheticSpec, limit: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Standard-normal images and uniform labels from a fixed seed; image i does not depend
    on N or ``limit`` (each image has its own generator stream)."""
    return _seeded_examples(spec.num_images, limit, spec.num_classes, SYNTHETIC_SEED,
                            (spec.channels, spec.height, spec.width), torch.float32,
                            lambda generator, out: torch.randn(out.shape, generator=generator, out=out))


def _seeded_examples(total: int, limit: int | None, num_classes: int, seed: int, shape: tuple[int, ...],
                     dtype: torch.dtype, draw: Callable) -> tuple[torch.Tensor, torch.Tensor]:
    """Labels from ``seed`` and example i from its own stream (``seed + 1 + i``), so no example
    depends on ``total`` or ``limit``; ``draw(generator, out)`` fills one example."""
    n = total if limit is None else min(limit, total)
    labels = torch.randint(0, num_classes, (total,), generator=torch.Generator().manual_seed(seed))[:n]
    examples = torch.empty((n, *shape), dtype=dtype)
    generator = torch.Generator()
    for i in range(n):
        generator.manual_seed(seed + 1 + i)
        draw(generator, examples[i])
    return examples, labels


@dataclass(frozen=True)
class SyntheticTokensSpec:
    length: int
    vocab: int
    num_classes: int
    num_examples: int


def parse_synthetic_tokens(name: str) -> SyntheticTokensSpec:
    """``synthetic-tokens:<T>:<vocab>:<classes>[:<N>]`` -> its numbers; ValueError on anything else."""
    m = re.fullmatch(r"synthetic-tokens:(\d+):(\d+):(\d+)(?::(\d+))?", name.strip())
    if not m:
        raise ValueError(f"bad synthetic token data set {name!r}: use {SYNTHETIC_TOKENS_SYNTAX}")
    t, vocab, k = (int(g) for g in m.groups()[:3])
    n = int(m.group(4)) if m.group(4) is not None else SYNTHETIC_DEFAULT_IMAGES
    if min(t, n) < 1 or vocab < 2 or k < 2:
        raise ValueError(f"bad synthetic token data set {name!r}: length and count must be >= 1, vocab and classes >= 2")
    return SyntheticTokensSpec(t, vocab, k, n)


def make_synthetic_tokens(spec: SyntheticTokensSpec, limit: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Uniform int64 token ids in [0, vocab) and uniform labels from a fixed seed; example i
    does not depend on N or ``limit`` (each example has its own generator stream)."""
    return _seeded_examples(spec.num_examples, limit, spec.num_classes, SYNTHETIC_TOKENS_SEED, (spec.length,), torch.int64,
                            lambda generator, out: torch.randint(0, spec.vocab, out.shape, generator=generator, out=out))


# ---------------------------------------------------------------- registry and entry point

DatasetFactory = Callable[[str | None, bool], tuple[torch.Tensor, torch.Tensor, int]]

DATASETS: dict[str, DatasetFactory] = {
    "fashion-mnist": _load_fashion_mnist,
    "fashion-mnist-calib": _load_fashion_mnist_calib,
    "cifar10": lambda root, download: load_cifar(CIFAR_SPECS["cifar10"], root, download),
    "cifar100": lambda root, download: load_cifar(CIFAR_SPECS["cifar100"], root, download),
    "cifar10-train": lambda root, download: load_cifar_train("cifar10", root, download),
    "cifar100-train": lambda root, download: load_cifar_train("cifar100", root, download),
}


def valid_dataset_names() -> str:
    from trainables.zoo.datasets import syntaxes

    return ", ".join([*DATASETS, SYNTHETIC_SYNTAX, SYNTHETIC_TOKENS_SYNTAX, *syntaxes()])


def check_dataset_name(name: object, options=None) -> None:
    """Raise ValueError (listing the valid names) unless ``name`` names a data set; loads nothing.
    ``options`` (trainables.zoo.datasets.DataOptions) lets a registered source check its settings."""
    from trainables.zoo.datasets import DataOptions, source_for

    if not isinstance(name, str):
        raise ValueError(f"data set name must be a string, got {type(name).__name__}; use one of: {valid_dataset_names()}")
    if name.startswith(SYNTHETIC_PREFIX):
        parse_synthetic(name)
    elif name.startswith(SYNTHETIC_TOKENS_PREFIX):
        parse_synthetic_tokens(name)
    elif (found := source_for(name)) is not None:
        found[0].check(found[1], options or DataOptions())
    elif name not in DATASETS:
        raise ValueError(f"unknown data set {name!r}: use one of: {valid_dataset_names()}")


def _check_limit(limit: object) -> int | None:
    if limit is None:
        return None
    if isinstance(limit, bool) or not isinstance(limit, (int, np.integer)) or limit < 1:
        raise ValueError(f"limit must be a positive integer (or None for all images), got {limit!r}")
    return int(limit)


def load_dataset(name: str, *, root: str | None = None, download: bool = False, limit: int | None = None,
                 transform: str | None = None, input_column: str | None = None, label_column: str | None = None,
                 model: str | None = None, cache: str | None = None, seq_len: int | None = None) -> Dataset:
    """Load a data set's evaluation split by name; ``limit`` keeps its first ``limit`` images.
    ``root`` and ``download`` apply to CIFAR; Fashion-MNIST is always the shipped copy. The
    other settings are the registered sources' (trainables.zoo.datasets.DataOptions)."""
    from trainables.zoo.datasets import DataOptions, source_for

    options = DataOptions(root, download, None, transform, input_column, label_column, model, cache, seq_len)
    check_dataset_name(name, options)
    limit = _check_limit(limit)
    if (found := source_for(name)) is not None:
        source, rest = found
        return source.load(rest, DataOptions(root, download, limit, transform, input_column, label_column, model, cache,
                                             seq_len))
    if any(v is not None for v in (transform, input_column, label_column, cache, seq_len)):
        given = [k for k, v in (("transform", transform), ("input_column", input_column), ("label_column", label_column),
                                ("data_cache", cache), ("seq_len", seq_len)) if v is not None]
        raise ValueError(f"{', '.join(given)}: apply to folder:, tensors:, hf-dataset: and py: data sets, not {name}")
    if name.startswith(SYNTHETIC_PREFIX):
        spec = parse_synthetic(name)
        if limit is not None and limit > spec.num_images:
            raise ValueError(f"limit {limit} exceeds the {spec.num_images} images of {name}")
        images, labels = make_synthetic(spec, limit)
        return Dataset(name, images, labels, spec.num_classes, synthetic=True)
    if name.startswith(SYNTHETIC_TOKENS_PREFIX):
        spec = parse_synthetic_tokens(name)
        if limit is not None and limit > spec.num_examples:
            raise ValueError(f"limit {limit} exceeds the {spec.num_examples} examples of {name}")
        tokens, labels = make_synthetic_tokens(spec, limit)
        return Dataset(name, tokens, labels, spec.num_classes, synthetic=True)
    images, labels, num_classes = DATASETS[name](root, download)
    if limit is not None:
        if limit > images.shape[0]:
            raise ValueError(f"limit {limit} exceeds the {images.shape[0]} images of {name}")
        images, labels = images[:limit].clone(), labels[:limit].clone()
    return Dataset(name, images, labels, num_classes, synthetic=False)
