"""``hf-dataset:<dir>[:<split>]``: a ``datasets.load_from_disk`` directory. The input column
(``--input-column``; default image, img, text or sentence) holds images (decoded with
torchvision.io, preprocessed by ``--transform``), text (tokenized by the tokenizer of the
``hf:<dir>`` model, or ``--transform tokenizer=<dir>[,max_length=N]``: padded to the longest
example or to N) or numbers; the label column (``--label-column``; default label, labels)
holds class indices (a ClassLabel gives the class count). For a causal-LM model (demo:lm, hf:<dir>
holding one) a text column needs no labels: its rows, one a line, become next-token windows of
``--seq-len`` tokens as with ``text:``."""
from __future__ import annotations

import re
import warnings
from pathlib import Path

import numpy as np
import torch

from trainables.zoo.datasets import DataOptions, DataSource, register_dataset
from trainables.zoo.datasets.common import apply_limit, image_dataset
from trainables.zoo.datasets.images import ImageSource, sha256_files
from trainables.zoo.datasets.transforms import parse_transform

# torchvision 0.29 deprecates its decoders for TorchCodec (not installed); they work, and warned once per image
warnings.filterwarnings("ignore", message="The image decoding and encoding capabilities of TorchVision are deprecated",
                        category=DeprecationWarning)

SYNTAX = "hf-dataset:<dir>[:<split>] (a datasets.save_to_disk directory; --input-column, --label-column)"
INPUT_DEFAULTS = ("image", "img", "text", "sentence")
LABEL_DEFAULTS = ("label", "labels")


def split_name(rest: str) -> tuple[str, str | None]:
    """(directory, split or None): a trailing ':<split>' unless the whole text is a path."""
    if Path(rest).expanduser().exists() or ":" not in rest:
        return rest, None
    directory, split = rest.rsplit(":", 1)
    return directory, split or None


def check(rest: str, options: DataOptions) -> None:
    if not rest:
        raise ValueError(f"hf-dataset: needs a directory: {SYNTAX}")


def open_split(rest: str):
    """The datasets.Dataset of ``rest`` (its split of a DatasetDict)."""
    import datasets

    directory, split = split_name(rest)
    path = Path(directory).expanduser()
    if not path.is_dir():
        raise ValueError(f"hf-dataset:{rest}: {directory} is not a directory")
    try:
        loaded = datasets.load_from_disk(str(path))
    except Exception as exc:  # noqa: BLE001 - not a save_to_disk directory
        raise ValueError(f"hf-dataset:{rest}: not a datasets.save_to_disk directory ({' '.join(str(exc).split())[:200]})") from None
    if isinstance(loaded, datasets.DatasetDict):
        names = list(loaded)
        if split is None:
            split = next((s for s in ("test", "validation") if s in names), names[0] if len(names) == 1 else None)
        if split not in names:
            raise ValueError(f"hf-dataset:{rest}: " + (f"no split {split!r}" if split else "several splits") +
                             f"; name one of {', '.join(names)} as hf-dataset:{directory}:<split>")
        return loaded[split], path
    if split is not None:
        raise ValueError(f"hf-dataset:{rest}: {directory} holds one split (no {split!r})")
    return loaded, path


def _column(ds, given: str | None, defaults: tuple[str, ...], what: str, rest: str) -> str:
    if given is not None:
        if given not in ds.column_names:
            raise ValueError(f"hf-dataset:{rest}: {what} column {given!r} does not exist; columns: {', '.join(ds.column_names)}")
        return given
    for name in defaults:
        if name in ds.column_names:
            return name
    flag = "--input-column" if what == "input" else "--label-column"
    raise ValueError(f"hf-dataset:{rest}: no {what} column ({', '.join(defaults)}): name one with {flag}; columns: "
                     f"{', '.join(ds.column_names)}")


def load(rest: str, options: DataOptions):
    import datasets

    ds, path = open_split(rest)
    input_col = _column(ds, options.input_column, INPUT_DEFAULTS, "input", rest)
    name = f"hf-dataset:{rest}"
    if _is_text(ds.features[input_col]) and _causal_model(options.model):
        return _causal_windows(name, ds, input_col, options)
    if options.seq_len is not None:
        raise ValueError(f"seq_len: applies to text for a causal LM (text:, hf-dataset: text columns), not {name} "
                         f"with model {options.model}")
    label_col = _column(ds, options.label_column, LABEL_DEFAULTS, "label", rest)
    n = apply_limit(name, len(ds), options.limit)
    ds = ds.select(range(n)) if n < len(ds) else ds
    labels = torch.as_tensor(np.asarray(ds.with_format("numpy")[label_col]))
    label_feature = ds.features[label_col]
    num_classes = label_feature.num_classes if isinstance(label_feature, datasets.ClassLabel) else None
    feature = ds.features[input_col]
    if isinstance(feature, datasets.Image):
        return _images(name, ds, input_col, path, labels, num_classes, options)
    if options.cache:
        raise ValueError(f"data_cache: applies to image columns; {name} column {input_col!r} holds {feature}")
    if isinstance(feature, datasets.Value) and feature.dtype in ("string", "large_string"):
        inputs = tokenize(name, list(ds[input_col]), options)
    else:
        if options.transform:
            raise ValueError(f"transform: applies to image and text columns; {name} column {input_col!r} holds {feature}")
        inputs = torch.as_tensor(np.asarray(ds.with_format("numpy")[input_col]))
    from trainables.zoo.datasets.tensors import from_tensors

    return from_tensors(name, inputs, labels, num_classes, None)


def _is_text(feature) -> bool:
    import datasets

    return isinstance(feature, datasets.Value) and feature.dtype in ("string", "large_string")


def _causal_model(model: str | None) -> bool:
    """Whether the campaign model is a causal LM (demo:lm, or hf:<dir> holding one)."""
    from trainables.zoo.sources import hf

    if model == "demo:lm":
        return True
    if not (isinstance(model, str) and model.startswith("hf:")):
        return False
    try:
        return hf.task(model) == "causal-lm"
    except ValueError:  # a directory holding only a tokenizer (--transform tokenizer=...) is no causal LM
        return False


def _causal_windows(name: str, ds, column: str, options: DataOptions):
    """A text column for a causal LM: its rows, one a line, tokenized by the model's tokenizer and
    cut into next-token windows as text: does (labels are the next tokens; no label column is read)."""
    from trainables.zoo.datasets.text import causal_tokenizer, token_dataset, token_ids

    if options.transform:
        raise ValueError(f"transform: {name} column {column!r} is text for the causal LM {options.model}, which "
                         f"tokenizes it with its own tokenizer (no --transform)")
    if options.label_column is not None:
        raise ValueError(f"label_column: {name} column {column!r} is text for the causal LM {options.model}: its labels "
                         f"are the next tokens, not a column")
    tokenizer = causal_tokenizer(options.model, name)
    text = "".join(f"{row}\n" for row in ds[column])
    return token_dataset(name, token_ids(tokenizer, text), tokenizer, options)


def _images(name: str, ds, column: str, path: Path, labels: torch.Tensor, num_classes: int | None,
            options: DataOptions):
    import datasets

    from trainables.zoo.datasets.folder import decode_bytes

    transform = parse_transform(options.transform, options.model)
    raw = ds.cast_column(column, datasets.Image(decode=False))

    def read(i: int) -> torch.Tensor:
        item = raw[i][column]
        data = item.get("bytes") or Path(item["path"]).read_bytes()
        return decode_bytes(torch.frombuffer(bytearray(data), dtype=torch.uint8), transform.channels)

    files = sorted(p for p in path.rglob("*") if p.is_file())
    source = ImageSource(len(ds), read, lambda i: f"{name} row {i} ({column})",
                         lambda: sha256_files(files, path) + f"/{ds.split}/{column}/{len(ds)}")
    return image_dataset(name, source, transform, labels, num_classes, options)


def text_settings(transform: str | None, model: str | None) -> tuple[str, int | None]:
    """(tokenizer directory, max_length or None) for a text column."""
    values = {}
    for part in (p.strip() for p in (transform or "").split(",") if p.strip()):
        key, _, value = part.partition("=")
        if key not in ("tokenizer", "max_length") or not value:
            raise ValueError(f"transform {transform!r} for a text column: use tokenizer=<dir>[,max_length=N] "
                             "(the tokenizer defaults to the hf:<dir> model's)")
        values[key] = value
    directory = values.get("tokenizer") or (model[3:] if model and model.startswith("hf:") else None)
    if directory is None:
        raise ValueError("a text column needs a tokenizer: use an hf:<dir> model or --transform tokenizer=<dir>")
    if "max_length" in values and not re.fullmatch(r"[1-9]\d*", values["max_length"]):
        raise ValueError(f"transform {transform!r}: max_length must be a positive whole number")
    return directory, int(values["max_length"]) if "max_length" in values else None


def tokenize(name: str, texts: list[str], options: DataOptions) -> torch.Tensor:
    """int64 (N, T) token ids from the model's tokenizer, padded to the longest text or max_length."""
    from transformers import AutoTokenizer

    directory, max_length = text_settings(options.transform, options.model)
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(Path(directory).expanduser()), local_files_only=True)
    except Exception as exc:  # noqa: BLE001 - no tokenizer files in that directory
        raise ValueError(f"{name}: no tokenizer in {directory} ({' '.join(str(exc).split())[:200]})") from None
    if tokenizer.pad_token is None:
        raise ValueError(f"{name}: the tokenizer in {directory} has no pad token: texts of different lengths cannot be batched")
    encoded = tokenizer(texts, padding="max_length" if max_length else "longest", truncation=max_length is not None,
                        max_length=max_length, return_tensors="pt")
    return encoded["input_ids"].to(torch.int64)


SOURCE = register_dataset(DataSource("hf-dataset", check, load, SYNTAX))
