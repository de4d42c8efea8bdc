"""``py:<module>:<callable>``: the user's own loader, imported from the working directory or
PYTHONPATH and called with no arguments, returning a torch ``Dataset`` (items ``(input,
label)``) or ``(inputs, labels)``; a ``num_classes`` attribute of the result is used when present."""
from __future__ import annotations

import importlib
import re
import sys

import torch

from trainables.zoo.datasets import DataOptions, DataSource, register_dataset
from trainables.zoo.datasets.common import refuse_image_settings
from trainables.zoo.datasets.tensors import from_tensors

SYNTAX = "py:<module>:<callable> (e.g. py:mydata:load)"


def split(rest: str) -> tuple[str, str]:
    m = re.fullmatch(r"([A-Za-z_][\w.]*):([A-Za-z_]\w*)", rest)
    if not m:
        raise ValueError(f"bad data set py:{rest}: use {SYNTAX}")
    return m.group(1), m.group(2)


def check(rest: str, options: DataOptions) -> None:
    split(rest)
    refuse_image_settings(f"py:{rest}", options)


def resolve_callable(module_name: str, attr: str):
    """The callable, with one line naming the module and its error when it does not import."""
    if "" not in sys.path:  # `python -m campaign` runs from the working directory: import from it
        sys.path.insert(0, "")
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # noqa: BLE001 - a missing module or one that raises on import
        raise ValueError(f"data set py:{module_name}:{attr}: module {module_name} failed to import "
                         f"({type(exc).__name__}: {' '.join(str(exc).split())[:200]})") from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise ValueError(f"data set py:{module_name}:{attr}: {module_name} has no callable {attr}")
    return fn


def load(rest: str, options: DataOptions):
    module_name, attr = split(rest)
    name = f"py:{rest}"
    result = resolve_callable(module_name, attr)()
    num_classes = getattr(result, "num_classes", None)
    if isinstance(result, (tuple, list)) and len(result) == 2:
        inputs, labels = result
    elif isinstance(result, torch.utils.data.Dataset):
        try:
            count = len(result)
        except TypeError:
            raise ValueError(f"data set {name}: returned a Dataset without a length (an IterableDataset?)") from None
        count = count if options.limit is None else min(count, options.limit)
        items = [result[i] for i in range(count)]
        if not items or not all(isinstance(it, (tuple, list)) and len(it) == 2 for it in items[:1]):
            raise ValueError(f"data set {name}: its items must be (input, label) pairs")
        try:
            inputs = torch.stack([torch.as_tensor(x) for x, _ in items])
            labels = torch.as_tensor([int(y) for _, y in items], dtype=torch.int64)
        except (RuntimeError, TypeError, ValueError) as exc:
            raise ValueError(f"data set {name}: its items do not stack into one batch (inputs of one shape, whole-number "
                             f"labels): {' '.join(str(exc).split())[:200]}") from None
    else:
        raise ValueError(f"data set {name}: returned {type(result).__name__}: return a torch Dataset of (input, label) "
                         "or (inputs, labels) tensors")
    return from_tensors(name, inputs, labels, num_classes, options.limit)


SOURCE = register_dataset(DataSource("py", check, load, SYNTAX))
