"""Data-set sources by prefix (``folder:``, ``tensors:``, ``hf-dataset:``, ``py:``, ``text:``, ``prompts:``): a registry
open to other packages through the entry-point group ``bitflip_campaigns.datasets``.

A source is a ``DataSource(prefix, check, load)``: ``check(rest, options)`` validates the text
after the prefix without loading (one ValueError line), ``load(rest, options)`` returns a
``trainables.zoo.data.Dataset``. Register one with ``register_dataset`` or, from another
package, an entry point whose object is a DataSource (or a function returning one)::

    [project.entry-points."bitflip_campaigns.datasets"]
    mydata = "mypkg.sources:SOURCE"
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import Callable

ENTRY_POINT_GROUP = "bitflip_campaigns.datasets"
BUILTIN_MODULES = ("folder", "tensors", "hf_dataset", "pyloader", "text", "prompts")


@dataclass(frozen=True)
class DataOptions:
    """What a source may need besides its name (the spec's data fields and the model name)."""

    root: str | None = None
    download: bool = False
    limit: int | None = None
    transform: str | None = None  # folder/hf images: torchvision:<Weights>, timm, hf, resize=..,crop=..; text: max_length=..
    input_column: str | None = None  # hf-dataset / tensors: the inputs' column (key)
    label_column: str | None = None  # hf-dataset / tensors: the labels' column (key)
    model: str | None = None  # the campaign's model (timm:/hf: transforms and tokenizers read it)
    cache: str | None = None  # a directory for the memory-mapped cache of preprocessed images; None: in memory
    seq_len: int | None = None  # text: / hf-dataset: text for a causal LM: tokens per sequence; None: the model's context


@dataclass(frozen=True)
class DataSource:
    prefix: str  # without the colon
    check: Callable[[str, DataOptions], None]
    load: Callable[[str, DataOptions], object]
    syntax: str = ""


_SOURCES: dict[str, DataSource] = {}
_LOADED = False


def register_dataset(source: DataSource) -> DataSource:
    """Add ``source`` under its prefix (a later registration of the same prefix replaces it)."""
    if not source.prefix or ":" in source.prefix:
        raise ValueError(f"a data-set prefix must be a non-empty name without ':', got {source.prefix!r}")
    _SOURCES[source.prefix] = source
    return source


def _load_all() -> None:
    """Import the built-in sources and the entry points of installed packages, once."""
    global _LOADED
    if _LOADED:
        return
    _LOADED = True
    for name in BUILTIN_MODULES:
        importlib.import_module(f"trainables.zoo.datasets.{name}")
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        try:
            obj = ep.load()
            source = obj if isinstance(obj, DataSource) else obj()
            if not isinstance(source, DataSource):
                raise TypeError(f"gave {type(source).__name__}, not a DataSource")
        except Exception as exc:  # a broken plug-in is named, not fatal to the others
            raise ValueError(f"data-set entry point {ep.name} = {ep.value} ({ENTRY_POINT_GROUP}) failed: {exc}") from None
        register_dataset(source)


def sources() -> dict[str, DataSource]:
    """The registered sources by prefix."""
    _load_all()
    return dict(_SOURCES)


def source_for(name: str) -> tuple[DataSource, str] | None:
    """(source, text after the prefix) when ``name`` starts with a registered prefix, else None."""
    if not isinstance(name, str) or ":" not in name:
        return None
    prefix, rest = name.split(":", 1)
    source = sources().get(prefix)
    return (source, rest) if source is not None else None


def syntaxes() -> list[str]:
    return [s.syntax or f"{p}:..." for p, s in sources().items()]
