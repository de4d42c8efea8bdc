"""Classifiers by name: ``chenyaofo:<cifar10|cifar100>_<arch>`` (the seed study's torch.hub
zoo), ``torchvision:<arch>``, ``file:<path>`` (TorchScript or a weights-only checkpoint),
``demo:vgg`` / ``demo:resnet`` / ``demo:vit`` (small Fashion-MNIST models shipped with
weights) and ``demo:text`` (a tiny token classifier with random weights, for tests); the
other prefixes (py:, timm:, hub:, hf:, plugins) come from the registry in
trainables.zoo.sources, through ``load_model`` and ``check_model_name`` here.

Every loader returns the model in eval mode, on the CPU, in float32. Nothing here
unpickles arbitrary objects: checkpoints are read with ``torch.load(weights_only=True)``.
"""
from __future__ import annotations

import contextlib
import importlib.util
import os
import socket
import sys
import threading
import urllib.error
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import torch
from torch import nn

from trainables.zoo import sources
from trainables.zoo.data import sha256_file
from trainables.zoo.demo_models import DEMO_ARCHS, DEMO_DATASETS, NUM_CLASSES

MODEL_FORMS = (
    "chenyaofo:<cifar10|cifar100>_<arch>",
    "torchvision:<arch>",
    "file:<path>",
    *(f"demo:{name}" for name in DEMO_ARCHS),
    "demo:lm",
)

ZOO_REPO = "chenyaofo/pytorch-cifar-models"
ZOO_DEFAULT_REF = "master"  # the zoo's default branch
ZOO_DATASETS = {"cifar10": 10, "cifar100": 100}
ZOO_ARCHS = (
    "resnet20", "resnet32", "resnet44", "resnet56",
    "vgg11_bn", "vgg13_bn", "vgg16_bn", "vgg19_bn",
    "mobilenetv2_x0_5", "mobilenetv2_x0_75", "mobilenetv2_x1_0", "mobilenetv2_x1_4",
    "shufflenetv2_x0_5", "shufflenetv2_x1_0", "shufflenetv2_x1_5", "shufflenetv2_x2_0",
    "repvgg_a0", "repvgg_a1", "repvgg_a2",
)  # fmt: skip
NO_WEIGHTS = "none"  # weights="none": random initialization
RANDOM_INIT_SEED = 0

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
# SHA-256 of the shipped demo weights (scripts/train_demo.py prints it; see weights/README.md).
DEMO_WEIGHTS: dict[str, tuple[str, str]] = {
    "vgg": ("demo_vgg.pt", "c99dfcdbb7af1dc99080bed92a39b900117f01b86a1d959644ed1f757c944004"),
    "resnet": ("demo_resnet.pt", "4254cd16c73ef22882b9a6da91674da6d02c58a8a64568bd4dc787f95a9bd276"),
    "vit": ("demo_vit.pt", "0543e51eadcc27c6b0dc9f55bdcc99053758a00e345db7253f3acd3d720b5f6f"),
}
# demo:text has no shipped weights: weights=None gives its random initialization.

DEMO_LM = "lm"
DEMO_LM_DIR = Path(__file__).resolve().parents[2] / "data" / "demo-lm"
# SHA-256 of demo:lm's files (scripts/train_demo.py --model lm prints them): the model and its
# tokenizer, checked when demo:lm loads; the held-out verses, checked when text:demo-lm-heldout
# loads; the training text's bigram counts (for the baseline in the tests).
DEMO_LM_FILES: dict[str, str] = {
    "config.json": "e7ad4af6489534256919be8254a425313ab7f35842476a86554d42400dcd5fd0",
    "generation_config.json": "3754e09d0cf6116606def313715836f6ea452063c8fa2e6370cc11e7c15d4aab",
    "model.safetensors": "bd06508043c3cec645ce8790a54189d627d5ba629be9ebc2490d0b095d771b5a",
    "tokenizer.json": "33912ef51270222e51d7dd7680f1d03365625476f37e3addd5c025d7fb7251d7",
    "tokenizer_config.json": "555be586f43b56c34d51712a976bdcfd1995260a7f211ecbbe1f07112565455d",
}
DEMO_LM_HELDOUT = ("heldout.txt", "52900db6a3122d6111ff8ba21ec70c1b8d584ff45389190a3ba3d0f785f26eb5")
# prompts:demo-lm-prompts: the first six words of the first 32 held-out verses, one a line (generation campaigns)
DEMO_LM_PROMPTS = ("prompts.txt", "b60f4142b78baba6c8c8156a2fd781129f9337a6d865b4390dfb99a03f637866")
DEMO_LM_BIGRAMS = ("train-bigrams.safetensors", "2c7cc719a8019340051b888a4a5d0687a69ddfc3e3e631073b9c29459bf54b60")


@dataclass(frozen=True)
class LoadOptions:
    """The keyword arguments of ``load_model``, passed to every source's factory."""

    num_classes: int | None = None
    hub_dir: str | None = None
    hub_ref: str | None = None
    weights: str | None = None
    arch: str | None = None
    model_args: tuple[tuple[str, Any], ...] = ()  # keyword arguments for the model's factory (--model-arg)

    @property
    def kwargs(self) -> dict[str, Any]:
        return dict(self.model_args)

    @property
    def random_init(self) -> bool:
        return self.weights is not None and self.weights.lower() == NO_WEIGHTS

    @property
    def weights_path(self) -> str | None:
        return None if self.weights is None or self.random_init else self.weights


def valid_forms() -> str:
    return ", ".join(sources.source_forms())


def split_model_name(name: object) -> tuple[str, str]:
    """``"prefix:rest"`` -> (prefix, rest); ValueError listing the valid forms otherwise."""
    if not isinstance(name, str) or ":" not in name:
        raise ValueError(f"bad model name {name!r}: use one of {valid_forms()}")
    prefix, rest = name.split(":", 1)
    if prefix not in sources.source_prefixes():
        raise ValueError(f"unknown model source {prefix!r} in {name!r}: use one of {valid_forms()}")
    if not rest.strip():
        raise ValueError(f"model name {name!r} is missing the part after {prefix!r}: use one of {valid_forms()}")
    return prefix, rest


# ---------------------------------------------------------------- state dicts and checkpoints


_BOILERPLATE = ("Weights only load failed", "Check the documentation", "Please file an issue")


def _error_reason(error: Exception) -> str:
    """The informative part of a torch.load error (it leads with advice to unpickle unsafely)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    lines = [line.split("WeightsUnpickler error:")[-1].strip() for line in lines if not line.startswith(_BOILERPLATE)]
    reason = " ".join(line for line in lines if line)
    return (reason[:300] + "...") if len(reason) > 300 else reason or type(error).__name__


def read_checkpoint(path: str | os.PathLike) -> object:
    """``torch.load`` a file with ``weights_only=True`` (a ``.safetensors`` file: its tensors);
    one ValueError naming the path for a missing, corrupt, truncated or code-carrying
    (malicious) file."""
    path = str(path)
    if not os.path.isfile(path):
        raise ValueError(f"weights file {path} does not exist")
    if path.endswith(".safetensors"):
        return read_safetensors(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(
            f"cannot load {path}: not a weights-only PyTorch checkpoint (tensors and plain containers; "
            f"arbitrary pickled objects are refused): {_error_reason(e)}"
        ) from None


def read_safetensors(path: str) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file, on the CPU; one ValueError for a damaged file."""
    from safetensors.torch import load_file

    try:
        return load_file(path, device="cpu")
    except Exception as e:
        raise ValueError(f"cannot load {path}: not a readable safetensors file: {type(e).__name__}: "
                         f"{' '.join(str(e).split())[:300]}") from None


def _as_state_dict(obj: object, path: str) -> dict[str, torch.Tensor]:
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not obj or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()):
        raise ValueError(f"{path} does not hold a state_dict (a dict of parameter name -> tensor)")
    return obj


def load_weights(model: nn.Module, path: str, what: str) -> nn.Module:
    """Load the state_dict in ``path`` into ``model`` (strict); ValueError on a mismatch."""
    state_dict = _as_state_dict(read_checkpoint(path), path)
    try:
        model.load_state_dict(state_dict, strict=True)
    except RuntimeError as e:
        detail = " ".join(str(e).split())
        raise ValueError(f"the state_dict in {path} does not fit {what}: {detail[:1000]}") from None
    return model


def _finish(model: nn.Module) -> nn.Module:
    return model.to(device="cpu", dtype=torch.float32).eval()


# ---------------------------------------------------------------- chenyaofo (torch.hub)


def github_reachable(timeout: float = 2.0) -> bool:
    """Whether github.com:443 accepts a TCP connection within ``timeout`` seconds (DNS
    included). Tests replace this function; nothing else here touches the network."""
    ok: list[bool] = []

    def probe() -> None:
        try:
            socket.create_connection(("github.com", 443), timeout=timeout).close()
            ok.append(True)
        except OSError:
            pass

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout + 0.5)
    return bool(ok)


def zoo_cache_dir(ref: str) -> Path:
    """Where torch.hub keeps its copy of the zoo at ``ref``."""
    return Path(torch.hub.get_dir()) / f"{ZOO_REPO.replace('/', '_')}_{ref.replace('/', '_')}"


def _zoo_checkpoint_cached(entry: str) -> bool:
    """Whether torch.hub's checkpoint cache holds the zoo's weights for ``entry``
    (its release files are named ``<entry>-<hash>.pt``)."""
    checkpoints = Path(torch.hub.get_dir()) / "checkpoints"
    return checkpoints.is_dir() and any(p.name.startswith(f"{entry}-") for p in checkpoints.iterdir())


def check_zoo_entry(entry: str) -> None:
    dataset, _, arch = entry.partition("_")
    if dataset not in ZOO_DATASETS or arch not in ZOO_ARCHS:
        raise ValueError(
            f"unknown chenyaofo model {entry!r}: use chenyaofo:<{'|'.join(ZOO_DATASETS)}>_<arch> with arch one of "
            f"{', '.join(ZOO_ARCHS)} (or pass hub_dir / --hub-dir to use the entries of a local hubconf.py)"
        )


def _offline_help() -> str:
    return (
        f"Pass hub_dir (CLI: --hub-dir) = a local copy of {ZOO_REPO} to load it with source='local', and "
        f"weights (--weights) = a state_dict file, or weights='none' (--weights none) for random initialization; "
        f"or run once with network access to fill torch.hub's cache ({torch.hub.get_dir()})"
    )


@contextlib.contextmanager
def _network_errors_explained(entry: str) -> Iterator[None]:
    try:
        yield
    except urllib.error.URLError as e:
        raise ValueError(f"cannot load chenyaofo:{entry}: network error ({e.reason}). {_offline_help()}") from None


def hub_entries(hub_dir: str) -> list[str]:
    """The entry points of ``<hub_dir>/hubconf.py``, found as torch.hub finds them (public
    callables; torch.hub.list has no local mode). Importing it runs the local hubconf."""
    sys.path.insert(0, hub_dir)  # hubconf imports its repository's packages, as in torch.hub
    try:
        spec = importlib.util.spec_from_file_location("hubconf", os.path.join(hub_dir, "hubconf.py"))
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(hub_dir)
    return sorted(name for name in dir(module) if not name.startswith("_") and callable(getattr(module, name)))


def _load_chenyaofo(entry: str, opts: LoadOptions) -> nn.Module:
    pretrained = opts.weights is None
    dataset = entry.partition("_")[0]
    if opts.num_classes is not None and dataset in ZOO_DATASETS and opts.num_classes != ZOO_DATASETS[dataset]:
        raise ValueError(f"chenyaofo:{entry} has {ZOO_DATASETS[dataset]} classes; got num_classes={opts.num_classes}")
    if opts.hub_dir is not None:
        hub_dir = os.path.expanduser(opts.hub_dir)
        if not os.path.isfile(os.path.join(hub_dir, "hubconf.py")):
            raise ValueError(f"hub_dir {hub_dir} has no hubconf.py: point it at a local copy of {ZOO_REPO}")
        entries = hub_entries(hub_dir)
        if entry not in entries:
            raise ValueError(f"{hub_dir}/hubconf.py has no entry {entry!r}; it has: {', '.join(sorted(entries))}")
        with _network_errors_explained(entry):  # the zoo's hubconf downloads its pretrained weights
            model = torch.hub.load(hub_dir, entry, source="local", pretrained=pretrained, verbose=False)
    else:
        check_zoo_entry(entry)
        # Always name the ref: without one torch.hub asks github.com for the default branch
        # (with no timeout) even when its cache already holds the repo.
        ref = opts.hub_ref or ZOO_DEFAULT_REF
        repo_cached = zoo_cache_dir(ref).is_dir()
        if not repo_cached or (pretrained and not _zoo_checkpoint_cached(entry)):
            if not github_reachable():
                missing = (
                    f"torch.hub's cache has no copy of the zoo at {zoo_cache_dir(ref)}"
                    if not repo_cached
                    else f"the pretrained weights of {entry} are not in {torch.hub.get_dir()}/checkpoints"
                )
                raise ValueError(f"cannot load chenyaofo:{entry}: github.com is unreachable and {missing}. {_offline_help()}")
        with _network_errors_explained(entry):
            model = torch.hub.load(f"{ZOO_REPO}:{ref}", entry, pretrained=pretrained, trust_repo=True, verbose=False)
    if opts.weights_path is not None:
        load_weights(model, opts.weights_path, f"chenyaofo:{entry}")
    return _finish(model)


# ---------------------------------------------------------------- torchvision


def torchvision_archs() -> list[str]:
    import torchvision.models

    return torchvision.models.list_models(module=torchvision.models)


def _check_torchvision_arch(arch: str) -> None:
    archs = torchvision_archs()
    if arch not in archs:
        examples = [a for a in ("resnet18", "resnet50", "vgg11_bn", "mobilenet_v2", "efficientnet_b0") if a in archs]
        raise ValueError(
            f"unknown torchvision architecture {arch!r}: e.g. {', '.join(examples)} "
            f"({len(archs)} classification models, see torchvision.models.list_models())"
        )


def _load_torchvision(arch: str, opts: LoadOptions) -> nn.Module:
    import torchvision.models

    _check_torchvision_arch(arch)
    model = torchvision.models.get_model(arch, weights=None, num_classes=opts.num_classes or 10)
    if opts.weights_path is not None:
        load_weights(model, opts.weights_path, f"torchvision:{arch} with {opts.num_classes or 10} classes")
    return _finish(model)


# ---------------------------------------------------------------- file: TorchScript or checkpoint


def is_torchscript(path: str) -> bool:
    """TorchScript archives are zip files with a ``code/`` folder; torch.save zips are not."""
    if not zipfile.is_zipfile(path):
        return False
    try:
        with zipfile.ZipFile(path) as archive:
            return any("/code/" in name or name.endswith("constants.pkl") for name in archive.namelist())
    except (zipfile.BadZipFile, OSError):
        return False


def _load_file(path: str, opts: LoadOptions) -> nn.Module:
    path = os.path.expanduser(path)
    if not os.path.isfile(path):
        raise ValueError(f"model file {path} does not exist")
    if opts.weights is not None:
        raise ValueError(f"file:{path} carries its own weights; do not pass weights={opts.weights!r} with it")
    if is_torchscript(path):
        try:
            with warnings.catch_warnings():  # TorchScript is deprecated upstream but still what users have
                warnings.simplefilter("ignore", FutureWarning)
                model = torch.jit.load(path, map_location="cpu")
        except Exception as e:
            raise ValueError(f"cannot load TorchScript model {path}: {_error_reason(e)}") from None
        return _finish(model)
    checkpoint = read_checkpoint(path)
    arch = opts.arch
    num_classes = opts.num_classes
    if isinstance(checkpoint, dict) and "state_dict" in checkpoint:
        stored = checkpoint.get("arch")
        if stored is not None and not isinstance(stored, str):
            raise ValueError(f"{path}: 'arch' must be a model name string like demo:vgg, got {type(stored).__name__}")
        if stored and arch and stored != arch:
            raise ValueError(f"{path} was saved for {stored!r} but arch={arch!r} was given")
        arch = arch or stored
        stored_classes = checkpoint.get("num_classes")
        if stored_classes is not None:
            if not isinstance(stored_classes, int) or (num_classes is not None and num_classes != stored_classes):
                raise ValueError(f"{path}: num_classes {stored_classes!r} does not match num_classes={num_classes}")
            num_classes = stored_classes
    if arch is None:
        raise ValueError(
            f"{path} holds a plain state_dict without an 'arch' entry: name its architecture with --model and pass "
            f"the file as --weights (e.g. --model demo:vgg --weights {path}; in Python load_model(..., arch=...)), or "
            f"save it as {{'arch': 'torchvision:resnet18', 'state_dict': ...}}"
        )
    prefix, _ = split_model_name(arch)
    if prefix == "file":
        raise ValueError(f"{path}: the architecture must be a demo:, torchvision: or chenyaofo: name, not {arch!r}")
    state_dict = _as_state_dict(checkpoint, path)
    model = load_model(arch, num_classes=num_classes, hub_dir=opts.hub_dir, hub_ref=opts.hub_ref, weights=NO_WEIGHTS)
    try:
        model.load_state_dict(state_dict, strict=True)
    except RuntimeError as e:
        raise ValueError(f"the state_dict in {path} does not fit {arch}: {' '.join(str(e).split())[:1000]}") from None
    return _finish(model)


# ---------------------------------------------------------------- demo models


def _check_demo_name(name: str) -> None:
    if name not in DEMO_ARCHS and name != DEMO_LM:
        raise ValueError(f"unknown demo model {name!r}: use one of {', '.join(f'demo:{n}' for n in (*DEMO_ARCHS, DEMO_LM))}")


def verify_demo_lm_file(name: str, expected: str) -> Path:
    """The path of one of demo:lm's shipped files, its SHA-256 checked; one ValueError line
    naming the file and how to restore it otherwise."""
    path = DEMO_LM_DIR / name
    if not path.is_file():
        raise ValueError(f"demo:lm's file {path} is missing: restore data/demo-lm/ from the repository "
                         f"(git checkout -- data/demo-lm)")
    actual = sha256_file(path)
    if actual != expected:
        raise ValueError(
            f"checksum mismatch for {path}: sha256 {actual}, expected {expected}. Restore it from the repository "
            f"(git checkout -- data/demo-lm), or after retraining with scripts/train_demo.py --model lm update "
            f"DEMO_LM_FILES in trainables/zoo/models.py")
    return path


def _load_demo_lm(opts: LoadOptions) -> nn.Module:
    """demo:lm through the hf: causal-LM loader, its shipped files checked first. ``weights``:
    None = the shipped weights, "none" = random initialization of the architecture, a path = that
    state_dict (strict, as hf:)."""
    from trainables.zoo.sources import hf

    for name, expected in DEMO_LM_FILES.items():
        if opts.weights is None or name != "model.safetensors":
            verify_demo_lm_file(name, expected)
    return hf.load(str(DEMO_LM_DIR), opts)


def demo_weights_path(name: str) -> Path:
    return WEIGHTS_DIR / DEMO_WEIGHTS[name][0]


def _load_demo(name: str, opts: LoadOptions) -> nn.Module:
    _check_demo_name(name)
    if name == DEMO_LM:
        return _load_demo_lm(opts)
    shipped = name in DEMO_WEIGHTS
    if shipped and opts.num_classes not in (None, NUM_CLASSES):
        raise ValueError(f"demo:{name} classifies Fashion-MNIST's 10 classes; got num_classes={opts.num_classes}")
    model = DEMO_ARCHS[name]() if opts.num_classes is None else DEMO_ARCHS[name](num_classes=opts.num_classes)
    if opts.random_init or (not shipped and opts.weights_path is None):  # no shipped weights: random, as torchvision
        return _finish(model)
    if opts.weights_path is not None:
        return _finish(load_weights(model, opts.weights_path, f"demo:{name}"))
    path = demo_weights_path(name)
    expected = DEMO_WEIGHTS[name][1]
    if not path.is_file():
        raise ValueError(f"the shipped weights of demo:{name} ({path}) are missing: restore them from the repository")
    actual = sha256_file(path)
    if actual != expected:
        raise ValueError(
            f"checksum mismatch for {path}: sha256 {actual}, expected {expected}. Restore the file from the "
            f"repository, or after retraining with scripts/train_demo.py update DEMO_WEIGHTS in trainables/zoo/models.py"
        )
    return _finish(load_weights(model, str(path), f"demo:{name}"))


# ---------------------------------------------------------------- registry and entry points

ModelFactory = Callable[[str, LoadOptions], nn.Module]

MODEL_SOURCES: dict[str, ModelFactory] = {
    "chenyaofo": _load_chenyaofo,
    "torchvision": _load_torchvision,
    "file": _load_file,
    "demo": _load_demo,
}


def _check_legacy(prefix: str, rest: str, hub_dir: str | None) -> None:
    if prefix == "chenyaofo" and hub_dir is None:
        check_zoo_entry(rest)
    elif prefix == "torchvision":
        _check_torchvision_arch(rest)
    elif prefix == "file" and not os.path.isfile(os.path.expanduser(rest)):
        raise ValueError(f"model file {rest} does not exist")
    elif prefix == "demo":
        _check_demo_name(rest)


# The four original sources, as registry rows: (prefix, form, check, code digest).
LEGACY_SOURCES = (
    ("chenyaofo", MODEL_FORMS[0], lambda rest, o: _check_legacy("chenyaofo", rest, o.hub_dir), None),
    ("torchvision", MODEL_FORMS[1], lambda rest, o: _check_legacy("torchvision", rest, o.hub_dir), None),
    ("file", MODEL_FORMS[2], lambda rest, o: _check_legacy("file", rest, o.hub_dir), None),
    ("demo", ", ".join(MODEL_FORMS[3:]), lambda rest, o: _check_legacy("demo", rest, o.hub_dir), None),
)


def model_args_tuple(model_args: Mapping[str, Any] | None) -> tuple[tuple[str, Any], ...]:
    """``model_args`` as sorted (key, value) pairs of plain scalars; ValueError otherwise."""
    if not model_args:
        return ()
    if not isinstance(model_args, Mapping):
        raise ValueError(f"model_args must be a mapping of keyword -> value, got {type(model_args).__name__}")
    for key, value in model_args.items():
        if not isinstance(key, str) or not key.isidentifier():
            raise ValueError(f"model_args: {key!r} is not a keyword argument name")
        if value is not None and not isinstance(value, (bool, int, float, str)):
            raise ValueError(f"model_args: {key}={value!r}: values are numbers, true/false or text")
    return tuple(sorted(model_args.items()))


def _options(name: str, num_classes, hub_dir, hub_ref, weights, arch, model_args) -> tuple[sources.ModelSource, str, LoadOptions]:
    prefix, rest = split_model_name(name)
    source = sources.get_source(prefix)
    opts = LoadOptions(num_classes, hub_dir, hub_ref, os.fspath(weights) if weights is not None else None, arch,
                       model_args_tuple(model_args))
    if opts.model_args and not source.takes_model_args:
        raise ValueError(f"{prefix}: models take no model_args (--model-arg); got "
                         f"{', '.join(f'{k}={v!r}' for k, v in opts.model_args)}")
    return source, rest, opts


def check_model_name(name: str, *, hub_dir: str | None = None, model_args: Mapping[str, Any] | None = None) -> None:
    """Validate a model name cheaply (syntax, registries, file existence); ValueError listing
    the valid forms. With ``hub_dir`` any chenyaofo entry passes (the hubconf decides)."""
    source, rest, opts = _options(name, None, hub_dir, None, None, None, model_args)
    if source.check is not None:
        source.check(rest, opts)


def load_model(
    name: str,
    *,
    num_classes: int | None = None,
    hub_dir: str | None = None,
    hub_ref: str | None = None,
    weights: str | None = None,
    arch: str | None = None,
    model_args: Mapping[str, Any] | None = None,
) -> nn.Module:
    """Build the model ``name`` names, in eval mode on the CPU in float32.

    ``weights``: None = the source's own weights (pretrained zoo / shipped demo / random for
    torchvision), "none" = random initialization, a path = that state_dict (.pt/.pth or
    .safetensors). ``arch`` names the architecture of a plain state_dict given as
    ``file:<path>``. ``model_args``: keyword arguments for py:, timm:, hub: and hf: models.
    """
    split_model_name(name)
    if num_classes is not None and (isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1):
        raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}")
    source, rest, opts = _options(name, num_classes, hub_dir, hub_ref, weights, arch, model_args)
    if opts.weights_path is not None and not os.path.isfile(opts.weights_path):
        raise ValueError(f"weights file {opts.weights_path} does not exist (use weights='none' for random initialization)")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(RANDOM_INIT_SEED)  # random weights are the same in every worker process
        model = source.load(rest, opts)
    if not isinstance(model, nn.Module):
        raise ValueError(f"{name} gave a {type(model).__name__}, not a torch.nn.Module")
    return model if source.prefix in MODEL_SOURCES else _finish(model)


def code_digest(name: str, *, hub_dir: str | None = None, hub_ref: str | None = None,
                model_args: Mapping[str, Any] | None = None) -> tuple[str, str] | None:
    """(digest field, SHA-256) of the code or configuration defining the model ``name``, for
    sources that have one (py: its factory's files, hub: the hubconf's repository, hf: its
    config files), else None."""
    source, rest, opts = _options(name, None, hub_dir, hub_ref, None, None, model_args)
    return source.code_digest(rest, opts) if source.code_digest is not None else None


def default_dataset_for(model_name: str) -> str | None:
    """The data set a model was trained for, when its name tells: demo:vgg/resnet/vit ->
    fashion-mnist, demo:text -> synthetic-tokens:32:1000:4, demo:lm -> text:demo-lm-heldout, chenyaofo:cifar10_* -> cifar10,
    chenyaofo:cifar100_* -> cifar100, otherwise None."""
    if not isinstance(model_name, str):
        return None
    if model_name.startswith("demo:"):
        return DEMO_DATASETS.get(model_name[len("demo:"):])
    for dataset in ZOO_DATASETS:
        if model_name.startswith(f"chenyaofo:{dataset}_"):
            return dataset
    prefix, _, rest = model_name.partition(":")
    source = sources.get_source(prefix) if prefix in sources.source_prefixes() else None
    if source is not None and source.default_dataset is not None and source.prefix not in MODEL_SOURCES:
        return source.default_dataset(rest)
    return None
