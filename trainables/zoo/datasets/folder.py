"""``folder:<dir>``: the ImageFolder layout (one subfolder per class, labels by sorted folder
name), decoded with torchvision.io and preprocessed by ``--transform``. Images are ordered
by file name across classes (ImageNet's validation files keep their official order, and
``--images N`` takes a mix of classes)."""
from __future__ import annotations

import warnings
from pathlib import Path

import torch

from trainables.zoo.datasets import DataOptions, DataSource, register_dataset
from trainables.zoo.datasets.common import apply_limit, image_dataset
from trainables.zoo.datasets.images import ImageSource, sha256_files
from trainables.zoo.datasets.transforms import parse_transform

# torchvision 0.29 deprecates its decoders for TorchCodec (not installed); they work, and warned once per image
warnings.filterwarnings("ignore", message="The image decoding and encoding capabilities of TorchVision are deprecated",
                        category=DeprecationWarning)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".gif", ".webp")


def scan(directory: str) -> tuple[list[Path], list[int], list[str]]:
    """(image files, their class indices, class names) of an ImageFolder directory."""
    root = Path(directory).expanduser()
    if not root.is_dir():
        raise ValueError(f"folder:{directory}: not a directory")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise ValueError(f"folder:{directory}: no class subfolders (the layout is <dir>/<class>/<image>)")
    found = [(f.name, c, f) for c, name in enumerate(classes) for f in (root / name).rglob("*")
             if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES and not f.name.startswith(".")]
    if not found:
        raise ValueError(f"folder:{directory}: no images ({', '.join(IMAGE_SUFFIXES)}) in its {len(classes)} class "
                         "subfolder(s)")
    found.sort(key=lambda t: (t[0], t[1]))
    return [f for _, _, f in found], [c for _, c, _ in found], classes


def decode(path: Path, channels: int) -> torch.Tensor:
    """One image file as uint8 (C, H, W), gray or RGB as the transform asks."""
    return decode_bytes(torch.frombuffer(bytearray(Path(path).read_bytes()), dtype=torch.uint8), channels)


def decode_bytes(data: torch.Tensor, channels: int) -> torch.Tensor:
    """Encoded image bytes (uint8) as uint8 (C, H, W), without torchvision's notice, per image,
    that its decoders are deprecated in favour of TorchCodec."""
    from torchvision.io import ImageReadMode, decode_image

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning, message=r".*image decoding and encoding.*")
        return decode_image(data, mode=ImageReadMode.GRAY if channels == 1 else ImageReadMode.RGB)


def check(rest: str, options: DataOptions) -> None:
    if not rest:
        raise ValueError("folder: needs a directory: folder:<dir>")
    parse_transform(options.transform, options.model)


def load(rest: str, options: DataOptions):
    transform = parse_transform(options.transform, options.model)
    files, labels, classes = scan(rest)
    n = apply_limit(f"folder:{rest}", len(files), options.limit)
    files, labels = files[:n], labels[:n]
    root = Path(rest).expanduser()
    source = ImageSource(n, lambda i: decode(files[i], transform.channels), lambda i: str(files[i]),
                         lambda: sha256_files(files, root))
    return image_dataset(f"folder:{rest}", source, transform, torch.tensor(labels, dtype=torch.int64), len(classes), options)


SOURCE = register_dataset(DataSource("folder", check, load, "folder:<dir> (one subfolder per class; --transform)"))
