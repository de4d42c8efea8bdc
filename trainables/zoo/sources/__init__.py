"""The model-source registry: a name prefix (``timm``, ``hf``, ...) -> a ``ModelSource``
that checks, loads and digests the models it names. Built-in sources live in this package
(one module each; demo:, chenyaofo:, torchvision: and file: stay in trainables.zoo.models);
other packages add prefixes through the entry-point group ``bitflip_campaigns.models``.

An entry point's object is a ``ModelSource`` or a plain loader ``(rest, LoadOptions) -> nn.Module``
(rest: the name after ``prefix:``), in the spirit of timm's ``register_model``.
"""
from __future__ import annotations

import importlib.metadata
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:
    from torch import nn

    from trainables.zoo.models import LoadOptions

ENTRY_POINT_GROUP = "bitflip_campaigns.models"


@dataclass(frozen=True)
class ModelSource:
    """One model prefix. ``load`` builds the model (eval mode, CPU, float32 is applied after);
    ``check`` validates a name cheaply before anything loads; ``code_digest`` returns
    (digest field, SHA-256) of the code or config that defines the model, part of the
    campaign identity; ``default_dataset`` names the data set a model was made for."""

    prefix: str
    form: str  # how a name looks, for messages: "timm:<name>"
    load: Callable[[str, "LoadOptions"], "nn.Module"]
    check: Callable[[str, "LoadOptions"], None] | None = None
    code_digest: Callable[[str, "LoadOptions"], tuple[str, str] | None] | None = None
    default_dataset: Callable[[str], str | None] | None = None
    takes_model_args: bool = False  # whether model_args (--model-arg) reach the model
    listed: bool = True  # named in the valid forms of error messages (memory: is not typed by users)


_REGISTERED: dict[str, ModelSource] = {}  # register_model_source, in this process
_CACHE: dict[str, ModelSource] = {}


def register_model_source(source: ModelSource) -> None:
    """Add a prefix in this process (tests, notebooks); entry points do it for installed packages."""
    if source.prefix in {s.prefix for s in _builtins()}:
        raise ValueError(f"model source prefix {source.prefix!r} is built in: choose another prefix")
    _REGISTERED[source.prefix] = source
    _CACHE.clear()


def unregister_model_source(prefix: str) -> None:
    _REGISTERED.pop(prefix, None)
    _CACHE.clear()


def reload_entry_points() -> None:
    """Forget the sources found so far (after installing a plugin in a running process)."""
    _CACHE.clear()


def _builtins() -> list[ModelSource]:
    from trainables.zoo import memory, models
    from trainables.zoo.sources import hf, hub, py, timm

    legacy = [ModelSource(prefix, form, models.MODEL_SOURCES[prefix], check=check, code_digest=digest,
                          takes_model_args=False)
              for prefix, form, check, digest in models.LEGACY_SOURCES]
    return legacy + [py.SOURCE, timm.SOURCE, hub.SOURCE, hf.SOURCE, memory.SOURCE]


def _from_entry_point(entry: importlib.metadata.EntryPoint) -> ModelSource:
    try:
        obj = entry.load()
    except Exception as exc:  # a broken plugin: say which one, in one line
        raise ValueError(f"model source {entry.name!r} (entry point {entry.value} in group {ENTRY_POINT_GROUP}) "
                         f"failed to load: {type(exc).__name__}: {exc}") from None
    if isinstance(obj, ModelSource):
        if obj.prefix != entry.name:
            raise ValueError(f"entry point {entry.name!r} of group {ENTRY_POINT_GROUP} holds the source for "
                             f"{obj.prefix!r}: name the entry point after its prefix")
        return obj
    if callable(obj):
        return ModelSource(entry.name, f"{entry.name}:<name>", obj)
    raise ValueError(f"entry point {entry.name!r} ({entry.value}) of group {ENTRY_POINT_GROUP} is neither a "
                     f"ModelSource nor a loader function")


def _table() -> dict[str, "ModelSource | importlib.metadata.EntryPoint"]:
    """prefix -> source, or the entry point that will load it when its prefix is first used
    (a broken plugin then fails alone, in one line, not every model name)."""
    if not _CACHE:
        found: dict = {s.prefix: s for s in _builtins()}
        builtin = set(found)
        for entry in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
            if entry.name in builtin:
                warnings.warn(f"model source plugin {entry.value} ignored: the prefix {entry.name!r} is built in",
                              stacklevel=3)
                continue
            found[entry.name] = entry
        found.update(_REGISTERED)
        _CACHE.update(found)
    return _CACHE


def source_prefixes() -> list[str]:
    """Every prefix a model name may start with: built-ins, plugins, registered sources."""
    return list(_table())


def source_forms() -> list[str]:
    """How names of each source look, for messages (plugins: ``<prefix>:<name>``)."""
    return [s.form if isinstance(s, ModelSource) else f"{p}:<name>" for p, s in _table().items()
            if not isinstance(s, ModelSource) or s.listed]


def get_source(prefix: str) -> ModelSource | None:
    """The source for ``prefix`` (loading a plugin's entry point the first time), or None."""
    table = _table()
    source = table.get(prefix)
    if isinstance(source, importlib.metadata.EntryPoint):
        source = table[prefix] = _from_entry_point(source)
    return source


def built_module(call: Callable[[], object], caller: str, returner: str, label: str,
                 weights_path: str | None) -> "nn.Module":
    """``call()``'s model with ``weights_path`` loaded; one ValueError line when the user's code
    raises (``caller`` raised ...) or returns no nn.Module (``returner`` returned a ...)."""
    from torch import nn

    from trainables.zoo.models import load_weights

    try:
        model = call()
    except Exception as exc:  # the user's code raised (a bad model_arg, a download refused...)
        raise ValueError(f"{caller} raised {type(exc).__name__}: {' '.join(str(exc).split())[:300]}") from None
    if not isinstance(model, nn.Module):
        raise ValueError(f"{returner} returned a {type(model).__name__}, not a torch.nn.Module")
    if weights_path is not None:
        load_weights(model, weights_path, label)
    return model
