"""In-memory models and data of a notebook campaign (``campaign.run``), named by content digest
(``memory:<digest>``). The driver holds them in this process; Ray workers receive them through
the object store (``tune.with_parameters``) and install them here before their first trial."""
from __future__ import annotations

import copy
import hashlib

import torch
from torch import nn

from trainables.zoo.data import Dataset, load_dataset
from trainables.zoo.models import LoadOptions
from trainables.zoo.sources import ModelSource

PREFIX = "memory:"
_MODELS: dict[str, nn.Module] = {}
_DATA: dict[str, Dataset] = {}


def is_memory(name: object) -> bool:
    return isinstance(name, str) and name.startswith(PREFIX)


def _gone(name: str) -> ValueError:
    return ValueError(f"{name} is an in-memory object of the Python session that ran campaign.run(...): run it "
                      f"there again with the same model and data to resume the campaign")


def add_model(model: nn.Module) -> str:
    """Hold ``model`` under a name that digests its class, structure and tensors."""
    digest = hashlib.sha256(f"{type(model).__module__}.{type(model).__qualname__}\0{model!r}\0".encode())
    for key, tensor in model.state_dict().items():
        digest.update(key.encode() + b"\0" + tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    name = f"{PREFIX}model-{digest.hexdigest()[:16]}"
    _MODELS[name] = model
    return name


def add_data(images: torch.Tensor, labels: torch.Tensor, num_classes: int) -> str:
    """Hold (images, labels) under a name that digests them; ValueError on bad shapes or labels."""
    if not isinstance(images, torch.Tensor) or not isinstance(labels, torch.Tensor):
        raise ValueError("data: give (inputs, labels) tensors or a torch Dataset of (input, label) pairs")
    if labels.dim() != 1 or labels.shape[0] != images.shape[0] or labels.is_floating_point():
        raise ValueError(f"data: labels must be N integer class indices for the N inputs; got labels of shape "
                         f"{list(labels.shape)} ({labels.dtype}) for inputs of shape {list(images.shape)}")
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise ValueError(f"data: labels must lie in 0..{num_classes - 1} ({num_classes} classes); got "
                         f"{int(labels.min())}..{int(labels.max())}")
    images = images.detach().cpu().contiguous()
    labels = labels.detach().cpu().to(torch.int64).contiguous()
    digest = hashlib.sha256(f"{num_classes}\0{images.dtype}\0{list(images.shape)}\0".encode())
    digest.update(images.view(-1).view(torch.uint8).numpy().tobytes() + labels.numpy().tobytes())
    name = f"{PREFIX}data-{digest.hexdigest()[:16]}"
    _DATA[name] = Dataset(name, images, labels, num_classes, synthetic=False)
    return name


def objects(names) -> dict[str, object]:
    """The held objects of ``names`` (what the workers need), for the object store."""
    return {n: (_MODELS.get(n) if n in _MODELS else _DATA[n]) for n in names if n in _MODELS or n in _DATA}


def install(held: dict[str, object]) -> None:
    """In a worker: hold what the driver sent."""
    for name, obj in held.items():
        (_MODELS if isinstance(obj, nn.Module) else _DATA)[name] = obj


def dataset(name: str, limit: int | None = None) -> Dataset:
    if name not in _DATA:
        raise _gone(name)
    data = _DATA[name]
    if limit is None:
        return data
    if limit > len(data):
        raise ValueError(f"limit {limit} exceeds the {len(data)} examples of {name}")
    return Dataset(name, data.images[:limit].clone(), data.labels[:limit].clone(), data.num_classes, False)


def load_data(name: str, *, root: str | None = None, download: bool = False, limit: int | None = None,
              **options) -> Dataset:
    """``load_dataset`` (``options``: the registered sources' transform, columns, cache), and
    the in-memory data sets of campaign.run."""
    if is_memory(name):
        return dataset(name, limit)
    return load_dataset(name, root=root, download=download, limit=limit, **options)


def _load(rest: str, opts: LoadOptions) -> nn.Module:
    name = PREFIX + rest
    if name not in _MODELS:
        raise _gone(name)
    return copy.deepcopy(_MODELS[name])  # the engine converts its copy (dtype, device); the user's stays as given


def _check(rest: str, opts: LoadOptions) -> None:
    if PREFIX + rest not in _MODELS:
        raise _gone(PREFIX + rest)


SOURCE = ModelSource("memory", "memory:<held by campaign.run>", _load, check=_check, listed=False)
