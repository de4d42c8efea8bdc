"""Helpers the data-set sources share: limits, label checks, the Dataset they return."""
from __future__ import annotations

from pathlib import Path

import torch

from trainables.zoo.datasets import DataOptions
from trainables.zoo.datasets.images import ImageSource, in_memory, mapped
from trainables.zoo.datasets.transforms import ImageTransform


def apply_limit(name: str, count: int, limit: int | None) -> int:
    """How many examples to take: all, or the first ``limit`` (at most the ``count`` there are)."""
    if limit is not None and limit > count:
        raise ValueError(f"limit {limit} exceeds the {count} examples of {name}")
    return count if limit is None else limit


def check_labels(name: str, labels: torch.Tensor, num_classes: int) -> None:
    """Labels must be whole numbers in 0..num_classes-1: one line naming the first one outside."""
    if labels.dtype.is_floating_point or labels.dtype == torch.bool or labels.dim() != 1:
        raise ValueError(f"{name}: labels must be a 1-d tensor of whole numbers, got {labels.dtype} of shape "
                         f"{tuple(labels.shape)}")
    bad = ((labels < 0) | (labels >= num_classes)).nonzero()
    if len(bad):
        i = int(bad[0])
        raise ValueError(f"{name}: label {int(labels[i])} of example {i} is outside 0..{num_classes - 1} "
                         f"({num_classes} classes)")


def cache_directory(options: DataOptions) -> str:
    """The image cache's directory: ``options.cache``, where ``auto`` is <data root>/image-cache
    (the data root: --data-root, else $BITFLIP_DATA_ROOT or ~/.cache/bitflip/data)."""
    from trainables.zoo.data import default_data_root

    if options.cache == "auto":
        return str(Path(options.root or default_data_root()).expanduser() / "image-cache")
    return str(Path(options.cache).expanduser())


def image_dataset(name: str, source: ImageSource, transform: ImageTransform, labels: torch.Tensor, num_classes: int | None,
                  options: DataOptions):
    """A Dataset of decoded images: in memory, or memory-mapped from ``options.cache``. Without a
    class count (None) the model's logits decide: max label + 1 is recorded, not imposed."""
    from trainables.zoo.data import Dataset

    known = num_classes is not None
    if not known:
        num_classes = max(2, int(labels.max()) + 1) if labels.numel() else 2
    check_labels(name, labels, num_classes)
    if options.cache:
        images, sha256, _ = mapped(source, transform, labels, cache_directory(options))
        return Dataset(name, images, labels, num_classes, synthetic=False, sha256=sha256, classes_known=known)
    return Dataset(name, in_memory(source, transform), labels, num_classes, synthetic=False, classes_known=known)


def refuse_image_settings(name: str, options: DataOptions) -> None:
    """Sources of ready tensors take no --transform or --data-cache: say so rather than ignore them."""
    given = [flag for flag, value in (("transform", options.transform), ("data_cache", options.cache)) if value]
    if given:
        raise ValueError(f"{' and '.join(given)}: apply to image sources (folder:, hf-dataset: image columns), not {name}")
