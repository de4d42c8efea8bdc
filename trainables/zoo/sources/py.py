"""``py:<module>:<callable>``: the user's own factory, imported from the working directory or
PYTHONPATH and called with the spec's ``model_args`` (plus ``num_classes`` when it takes it).
On a cluster the module reaches the workers the Ray way (``ray job submit --working-dir .``;
a local run puts the driver's working directory on the workers' PYTHONPATH)."""
from __future__ import annotations

import hashlib
import importlib
import importlib.util
import inspect
import os
import re
import sys
from pathlib import Path

from torch import nn

from trainables.zoo.models import LoadOptions
from trainables.zoo.sources import ModelSource, built_module

FORM = "py:<module>:<callable>"
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*")


def parse(rest: str) -> tuple[str, str]:
    """'mynets:build' -> ('mynets', 'build'); ValueError on anything else."""
    module, sep, attr = rest.partition(":")
    if not sep or not _NAME.fullmatch(module) or not _NAME.fullmatch(attr):
        raise ValueError(f"bad model name py:{rest!r}: use {FORM}, e.g. py:mynets:build (a function in mynets.py "
                         f"in the working directory or on PYTHONPATH)")
    return module, attr


def _with_cwd_on_path():
    """The working directory on sys.path, as ``python -m`` has it (a test or notebook may not)."""
    cwd = os.getcwd()
    if cwd not in sys.path and "" not in sys.path:
        sys.path.append(cwd)


def module_origin(module: str) -> tuple[Path, bool]:
    """(the module's file or package directory, is a package), found without importing it;
    ValueError when it is nowhere on the path."""
    _with_cwd_on_path()
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError) as exc:  # a parent package failed to import
        raise ValueError(f"py: cannot import module {module!r}: {type(exc).__name__}: {exc}") from None
    if spec is None or spec.origin is None or not os.path.isfile(spec.origin):
        raise ValueError(f"py: module {module!r} was not found in the working directory ({os.getcwd()}) or on "
                         f"PYTHONPATH (a file {module.replace('.', '/')}.py is expected)")
    origin = Path(spec.origin)
    return (origin.parent, True) if spec.submodule_search_locations else (origin, False)


def factory(rest: str):
    """The callable ``py:`` names, imported; one ValueError naming the module and its error."""
    module, attr = parse(rest)
    module_origin(module)
    try:
        imported = importlib.import_module(module)
    except Exception as exc:  # the user's module raised while importing: name it and the error
        detail = " ".join(str(exc).split())[:300]
        raise ValueError(f"py: module {module!r} failed to import: {type(exc).__name__}: {detail}") from None
    obj = getattr(imported, attr, None)
    if obj is None:
        public = sorted(n for n in dir(imported) if not n.startswith("_") and callable(getattr(imported, n)))
        raise ValueError(f"py: module {module!r} ({imported.__file__}) has no {attr!r}; its callables: "
                         f"{', '.join(public) or 'none'}")
    if not callable(obj):
        raise ValueError(f"py:{rest}: {attr} is a {type(obj).__name__}, not a callable returning an nn.Module")
    return obj


def _kwargs(fn, opts: LoadOptions) -> dict:
    """model_args, plus num_classes when the factory takes it and model_args do not set it."""
    kwargs = opts.kwargs
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return kwargs
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    if opts.num_classes is not None and "num_classes" not in kwargs and ("num_classes" in params or takes_any):
        kwargs["num_classes"] = opts.num_classes
    unknown = [k for k in kwargs if k not in params and not takes_any]
    if unknown:
        raise ValueError(f"py: {fn.__qualname__} takes no argument {', '.join(map(repr, unknown))} "
                         f"(its parameters: {', '.join(params) or 'none'})")
    return kwargs


def load(rest: str, opts: LoadOptions) -> nn.Module:
    fn = factory(rest)
    kwargs = _kwargs(fn, opts)
    arguments = ", ".join(f"{k}={v!r}" for k, v in kwargs.items())
    return built_module(lambda: fn(**kwargs), f"py:{rest}({arguments})", f"py:{rest}", f"py:{rest}", opts.weights_path)


def check(rest: str, opts: LoadOptions) -> None:
    module_origin(parse(rest)[0])


def sha256_files(root: Path) -> str:
    """SHA-256 over one file, or over the relative paths and contents of a package's .py files."""
    from trainables.digests import sha256_tree

    if root.is_dir():
        return sha256_tree(root)
    return hashlib.sha256(root.name.encode() + b"\0" + root.read_bytes()).hexdigest()


def code_digest(rest: str, opts: LoadOptions) -> tuple[str, str]:
    """The factory's source: its module file, or its top-level package's .py files."""
    module = parse(rest)[0]
    origin, _ = module_origin(module.split(".")[0])  # the whole top-level package: helpers included
    return "code_sha256", sha256_files(origin)


SOURCE = ModelSource("py", FORM, load, check=check, code_digest=code_digest, takes_model_args=True)
