"""``tensors:<file>``: inputs and labels a user preprocessed themselves, from a ``.pt`` (read
with ``weights_only=True``: a dict or an (inputs, labels) pair), ``.npz`` or ``.safetensors``
file. Keys: ``--input-column`` / ``--label-column``, else the first of inputs, images, x,
input_ids and of labels, targets, y; an optional ``num_classes`` entry, else max label + 1.
Floating inputs become float32, integer inputs (token ids) int64."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from trainables.zoo.datasets import DataOptions, DataSource, register_dataset
from trainables.zoo.datasets.common import apply_limit, check_labels, refuse_image_settings

SUFFIXES = (".pt", ".pth", ".npz", ".safetensors")
INPUT_KEYS = ("inputs", "images", "x", "input_ids")
LABEL_KEYS = ("labels", "targets", "y")


def check(rest: str, options: DataOptions) -> None:
    if not rest or not rest.lower().endswith(SUFFIXES):
        raise ValueError(f"tensors:{rest}: name a {', '.join(SUFFIXES)} file")
    refuse_image_settings(f"tensors:{rest}", options)


def read(path: Path) -> dict[str, torch.Tensor]:
    """The file's named tensors (a .pt pair becomes inputs and labels)."""
    if not path.is_file():
        raise ValueError(f"tensors:{path}: no such file")
    suffix = path.suffix.lower()
    try:
        if suffix == ".npz":
            with np.load(path, allow_pickle=False) as npz:
                return {k: torch.from_numpy(np.array(npz[k])) for k in npz.files}
        if suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - unreadable, or a pickle that is not plain tensors
        raise ValueError(f"tensors:{path}: cannot read the file ({' '.join(str(exc).split())[:200]})") from None
    if isinstance(obj, (tuple, list)) and len(obj) == 2:
        obj = {"inputs": obj[0], "labels": obj[1]}
    if not isinstance(obj, dict) or not all(isinstance(v, (torch.Tensor, int)) for v in obj.values()):
        raise ValueError(f"tensors:{path}: holds {type(obj).__name__}: save a dict of tensors or an (inputs, labels) pair")
    return {k: torch.as_tensor(v) for k, v in obj.items()}


def _pick(values: dict, given: str | None, defaults: tuple[str, ...], what: str, path: Path) -> torch.Tensor:
    names = [given] if given else [k for k in defaults if k in values]
    if not names or names[0] not in values:
        raise ValueError(f"tensors:{path}: no {what} {'column ' + repr(given) if given else 'key (' + ', '.join(defaults) + ')'}; "
                         f"the file holds {', '.join(sorted(values)) or 'nothing'}")
    return values[names[0]]


def from_tensors(name: str, inputs: torch.Tensor, labels: torch.Tensor, num_classes: int | None, limit: int | None):
    """A Dataset of given inputs and labels, checked (as many labels as inputs, labels in range); integer
    inputs (N, T) may have next-token labels (N, T) (a causal LM's teacher-forced data)."""
    from trainables.zoo.data import Dataset

    inputs, labels = torch.as_tensor(inputs), torch.as_tensor(labels)
    if inputs.dim() < 2 or inputs.dtype == torch.bool or inputs.is_complex():
        raise ValueError(f"{name}: inputs must be an (N, ...) real or integer tensor, got {inputs.dtype} of shape "
                         f"{tuple(inputs.shape)}")
    # a causal LM's data: token ids (N, T) and their next tokens (N, T) (trainables.inject.tokens)
    next_tokens = labels.dim() == 2 and tuple(labels.shape) == tuple(inputs.shape) and not inputs.is_floating_point()
    if not next_tokens and (labels.dim() != 1 or labels.shape[0] != inputs.shape[0]):
        raise ValueError(f"{name}: {inputs.shape[0]} inputs but labels of shape {tuple(labels.shape)}")
    if labels.dtype.is_floating_point and bool((labels == labels.round()).all()):
        labels = labels.to(torch.int64)
    known = num_classes is not None
    if not known:  # the model's logits decide (campaign.spec checks the labels against them)
        num_classes = max(2, int(labels.max()) + 1) if labels.numel() and not labels.dtype.is_floating_point else 2
    check_labels(name, labels.reshape(-1) if next_tokens else labels, num_classes)
    n = apply_limit(name, int(inputs.shape[0]), limit)
    inputs = inputs[:n].to(torch.float32 if inputs.is_floating_point() else torch.int64).contiguous().clone()
    return Dataset(name, inputs, labels[:n].to(torch.int64).clone(), int(num_classes), synthetic=False,
                   classes_known=known)


def load(rest: str, options: DataOptions):
    path = Path(rest).expanduser()
    values = read(path)
    inputs = _pick(values, options.input_column, INPUT_KEYS, "inputs", path)
    labels = _pick(values, options.label_column, LABEL_KEYS, "labels", path)
    num_classes = int(values["num_classes"]) if "num_classes" in values else None
    return from_tensors(f"tensors:{rest}", inputs, labels, num_classes, options.limit)


SOURCE = register_dataset(DataSource("tensors", check, load, "tensors:<file.pt|.npz|.safetensors>"))
