"""Campaign specs: defaults < the seed study's environment knobs < a YAML file < CLI flags,
validated and resolved into the list of trials before Ray starts."""
from __future__ import annotations

import dataclasses
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

SITE_KINDS = ("neuron", "weight")
RECORD_LEVELS = ("none", "changed", "all")
MODES = ("fp32", "tf32", "fp16", "bf16")
# What decides a campaign's results: a directory holding a campaign that differs in any of
# these is a different campaign. Batch size, resources and names may change between runs.
IDENTITY_FIELDS = ("model", "dataset", "hub_ref", "weights", "sites", "layers", "layer_types", "bits", "seeds",
                   "images", "dtype", "images_per_weight_fault", "record", "target_margin", "report_every")


class SpecError(ValueError):
    """A campaign spec that cannot run; the message lists every problem found."""


@dataclass(frozen=True)
class CampaignSpec:
    """Everything a campaign needs, as the user states it (before resolution)."""

    model: str = "demo:vgg"
    dataset: str | None = None  # default: the model's own data set
    hub_dir: str | None = None
    hub_ref: str | None = None
    weights: str | None = None
    data_root: str | None = None
    download: bool = False
    sites: tuple[str, ...] = SITE_KINDS
    layers: str = "all"  # site indices: "all", "3", "1,4-7"
    layer_types: str = "all"  # module class names: "all", "Conv2d,Linear"
    bits: str = "random"  # "random", "all", "30", "0-31", "23,30", "msb:1" (the seed's MSB-first numbering)
    seeds: tuple[int, ...] | None = None  # explicit seeds; else num_seeds drawn from master_seed
    num_seeds: int = 1
    master_seed: int = 0  # -1: from the clock (the value used is recorded)
    images: int | None = None  # first N test images; None = all
    dtype: str = "fp32"  # math mode: fp32 (strict), tf32, fp16, bf16
    batch_size: int = 256
    images_per_weight_fault: int = 256
    record: str = "changed"
    cpus_per_trial: float = 1.0
    gpus_per_trial: float = 0.0
    out: str = "runs"
    name: str | None = None
    target_margin: float | None = None
    report_every: int = 2048
    max_failures: int = 2
    max_concurrent: int | None = None
    address: str | None = None  # Ray cluster address; None: connect to a running one or start locally
    img_size: int | None = None  # the seed's knobs, checked against the data set
    channels: int | None = None

    @property
    def directory(self) -> Path:
        return Path(self.out).expanduser().resolve() / (self.name or default_name(self))


def default_name(spec: CampaignSpec) -> str:
    """A readable campaign directory name from the model, data set and math mode."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", f"{spec.model}-{spec.dataset or 'default'}-{spec.dtype}").strip("_")


_FIELDS = {f.name: f for f in dataclasses.fields(CampaignSpec)}
_INT_FIELDS = {"num_seeds", "master_seed", "images", "batch_size", "images_per_weight_fault", "report_every",
               "max_failures", "max_concurrent", "img_size", "channels"}
_FLOAT_FIELDS = {"cpus_per_trial", "gpus_per_trial", "target_margin"}


def _as_list(value: Any) -> list[str]:
    if isinstance(value, str):
        return [v.strip() for v in value.split(",") if v.strip()]
    if isinstance(value, (list, tuple)):
        return [str(v).strip() for v in value]
    return [str(value)]


def _coerce(name: str, value: Any, problems: list[str]) -> Any:
    """Convert one raw value (YAML, flag or env string) to the field's type."""
    if value is None:
        return None
    try:
        if name in _INT_FIELDS:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            if name == "images" and str(value).lower() == "all":
                return None
            return int(value)
        if name in _FLOAT_FIELDS:
            return float(value)
        if name == "download":
            if isinstance(value, bool):
                return value
            return {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}[str(value).lower()]
        if name == "sites":
            return tuple(_as_list(value))
        if name == "seeds":
            return tuple(int(v) for v in _as_list(value))
        if name in ("layers", "layer_types", "bits"):
            return ",".join(_as_list(value))
        return str(value)
    except (ValueError, KeyError, TypeError):
        problems.append(f"{name}: cannot read {value!r} as {_FIELDS[name].type}")
        return None


def spec_from_mapping(values: Mapping[str, Any], base: CampaignSpec | None = None, source: str = "spec") -> CampaignSpec:
    """Overlay ``values`` (keys = CampaignSpec fields, '-' or '_') on ``base``; unknown keys are errors."""
    problems: list[str] = []
    updates = {}
    for raw_key, value in values.items():
        key = str(raw_key).replace("-", "_")
        if key not in _FIELDS:
            problems.append(f"{source}: unknown key {raw_key!r} (valid: {', '.join(sorted(_FIELDS))})")
            continue
        updates[key] = _coerce(key, value, problems)
    if problems:
        raise SpecError("\n".join(problems))
    return dataclasses.replace(base or CampaignSpec(), **updates)


def spec_from_yaml(path: str | Path, base: CampaignSpec | None = None) -> CampaignSpec:
    import yaml

    path = Path(path)
    if not path.is_file():
        raise SpecError(f"spec file {path} does not exist")
    try:
        values = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise SpecError(f"spec file {path} is not valid YAML: {exc}") from None
    if not isinstance(values, dict):
        raise SpecError(f"spec file {path} must hold a mapping of settings, got {type(values).__name__}")
    return spec_from_mapping(values, base, source=str(path))


# The seed study's knobs (environment variables of their neuron.py / weight.py).
SEED_ENV_KNOBS = ("model_name", "dataset", "seed", "batch_size", "img_size", "channels", "bit_flip_pos",
                  "layer_type", "layer_num", "layer_nums")


def spec_from_seed_env(env: Mapping[str, str], base: CampaignSpec | None = None) -> CampaignSpec:
    """Read the seed's environment knobs. ``bit_flip_pos`` counts MSB-first (0 = sign) as
    theirs did and is converted to LSB-0 ("msb:K"); ``model_name`` is a zoo name."""
    values: dict[str, Any] = {}
    if "dataset" in env:
        values["dataset"] = env["dataset"]
    if "model_name" in env:
        name = env["model_name"]
        values["model"] = name if ":" in name else f"chenyaofo:{env.get('dataset', 'cifar10')}_{name}"
    if "seed" in env:
        values["seeds" if env["seed"].strip() != "-1" else "master_seed"] = env["seed"]
    for knob in ("batch_size", "img_size", "channels"):
        if knob in env:
            values[knob] = env[knob]
    if "bit_flip_pos" in env:
        pos = env["bit_flip_pos"].strip()
        values["bits"] = "random" if pos == "-1" else f"msb:{pos}"
    if "layer_type" in env:
        values["layer_types"] = env["layer_type"]
    for knob in ("layer_num", "layer_nums"):
        if knob in env:
            values["layers"] = env[knob]
    return spec_from_mapping(values, base, source="environment") if values else (base or CampaignSpec())


def parse_bits(text: str, width: int) -> list[int | str]:
    """'random' | 'all' | '30' | '0-31' | '23,30' | 'msb:1' (MSB-first, 0 = sign) -> bit specs."""
    out: list[int | str] = []
    for part in _as_list(text):
        low = part.lower()
        try:
            if low in ("random", "-1"):
                items: list[int | str] = ["random"]
            elif low == "all":
                items = list(range(width))
            elif low.startswith("msb:"):
                k = int(low[4:])
                if not 0 <= k < width:
                    raise SpecError(f"bits: MSB-first position {k} is outside 0..{width - 1}")
                items = [width - 1 - k]
            elif re.fullmatch(r"\d+-\d+", low):
                a, b = map(int, low.split("-"))
                items = list(range(a, b + 1))
            else:
                items = [int(low)]
        except SpecError:
            raise
        except ValueError:
            raise SpecError(f"bits: cannot read {part!r}: use random, all, 30, 0-31, 23,30 or msb:1") from None
        for bit in items:
            if bit != "random" and not 0 <= bit < width:
                raise SpecError(f"bits: bit {bit} is outside a {width}-bit dtype: allowed 0..{width - 1} (LSB = 0)")
            if bit not in out:
                out.append(bit)
    if not out:
        raise SpecError("bits: no bits given")
    return out


@dataclass(frozen=True)
class TrialPlan:
    kind: str
    site: int
    bit: int | str
    seed: int


@dataclass(frozen=True)
class ResolvedCampaign:
    """A validated spec with everything derived: data set, seeds, sites and the trial list."""

    spec: CampaignSpec
    dataset: str
    seeds: tuple[int, ...]
    site_table: str
    sites_by_kind: dict[str, list[int]]
    site_names: dict[int, str] = field(repr=False)
    trials: tuple[TrialPlan, ...] = field(repr=False)
    num_images: int = 0

    @property
    def directory(self) -> Path:
        return self.spec.directory

    def identity(self) -> dict[str, Any]:
        values = dataclasses.asdict(self.spec)
        values.update(dataset=self.dataset, seeds=list(self.seeds), sites=list(self.spec.sites))
        return {k: values[k] for k in IDENTITY_FIELDS}


def check_plain_fields(spec: CampaignSpec) -> list[str]:
    """Problems visible without loading anything."""
    problems = []
    unknown_kinds = [k for k in spec.sites if k not in SITE_KINDS]
    if unknown_kinds or not spec.sites:
        problems.append(f"sites: {', '.join(unknown_kinds) or 'none given'}: use neuron, weight or neuron,weight")
    if spec.dtype not in MODES:
        problems.append(f"dtype: unknown math mode {spec.dtype!r}: use one of {', '.join(MODES)}")
    if spec.record not in RECORD_LEVELS:
        problems.append(f"record: {spec.record!r}: use one of {', '.join(RECORD_LEVELS)}")
    for name in ("batch_size", "images_per_weight_fault", "report_every", "num_seeds"):
        if getattr(spec, name) < 1:
            problems.append(f"{name}: must be a positive integer, got {getattr(spec, name)}")
    if spec.images is not None and spec.images < 1:
        problems.append(f"images: must be a positive integer or all, got {spec.images}")
    if spec.cpus_per_trial <= 0:
        problems.append(f"cpus_per_trial: must be > 0, got {spec.cpus_per_trial}")
    if spec.gpus_per_trial < 0 or (spec.gpus_per_trial > 1 and not float(spec.gpus_per_trial).is_integer()):
        problems.append(f"gpus_per_trial: use a fraction in (0, 1] or a whole number, got {spec.gpus_per_trial}")
    if spec.target_margin is not None and not 0 < spec.target_margin < 0.5:
        problems.append(f"target_margin: a Wilson half-width in (0, 0.5), got {spec.target_margin}")
    if spec.max_failures < 0:
        problems.append(f"max_failures: must be >= 0, got {spec.max_failures}")
    if spec.seeds is not None and (not spec.seeds or any(s < 0 for s in spec.seeds)):
        problems.append(f"seeds: need non-negative integers, got {list(spec.seeds)}")
    if spec.name is not None and (not spec.name or "/" in spec.name or spec.name in (".", "..")):
        problems.append(f"name: {spec.name!r} must be a plain directory name")
    return problems


def resolve(spec: CampaignSpec) -> ResolvedCampaign:
    """Validate ``spec`` completely (loading the model and data set once, on the CPU) and
    expand it into trials. Raises SpecError listing every problem found."""
    import torch

    from trainables.bitflip import dtype_width
    from trainables.data import check_dataset_name, load_dataset
    from trainables.engine import MATH_MODES
    from trainables.faults import derive_seeds
    from trainables.models import check_model_name, default_dataset_for, load_model
    from trainables.sites import enumerate_sites, select_sites, site_table

    problems = check_plain_fields(spec)
    dataset = spec.dataset or default_dataset_for(spec.model)
    if dataset is None:
        problems.append(f"dataset: {spec.model} has no default data set: pass --dataset")
    for check, value in ((lambda: check_model_name(spec.model, hub_dir=spec.hub_dir), spec.model),
                         (lambda: check_dataset_name(dataset), dataset)):
        try:
            if value is not None:
                check()
        except ValueError as exc:
            problems.append(str(exc))
    if problems:
        raise SpecError("\n".join(problems))
    if spec.gpus_per_trial > 0 and not torch.cuda.is_available() and spec.address is None and not _ray_declares_gpus():
        problems.append(f"gpus_per_trial: {spec.gpus_per_trial} GPUs per trial requested, but this machine has no CUDA GPU"
                        " (pass --address to use a cluster that has GPUs)")
    try:
        data = load_dataset(dataset, root=spec.data_root, download=spec.download, limit=spec.images)
        model = load_model(spec.model, num_classes=data.num_classes, hub_dir=spec.hub_dir, hub_ref=spec.hub_ref,
                           weights=spec.weights)
    except (ValueError, FileNotFoundError, RuntimeError) as exc:
        raise SpecError("\n".join(problems + [str(exc)])) from None
    shape = tuple(data.images.shape[1:])
    if spec.channels is not None and spec.channels != shape[0]:
        problems.append(f"channels: {spec.channels} given, but {dataset} images have {shape[0]}")
    if spec.img_size is not None and (spec.img_size, spec.img_size) != shape[1:]:
        problems.append(f"img_size: {spec.img_size} given, but {dataset} images are {shape[1]}x{shape[2]}")
    dtype = MATH_MODES[spec.dtype]
    width = dtype_width(dtype)
    try:
        bits = parse_bits(spec.bits, width)
    except SpecError as exc:
        problems.append(str(exc))
        bits = []
    try:
        sites = enumerate_sites(model.to(dtype), shape, dtype)
    except ValueError as exc:
        raise SpecError("\n".join(problems + [f"model {spec.model}: {exc}"])) from None
    sites_by_kind: dict[str, list[int]] = {}
    try:
        if len(spec.sites) == 1:
            kind = spec.sites[0]
            sites_by_kind[kind] = [s.index for s in select_sites(sites, kind, spec.layer_types, spec.layers)]
        else:  # neuron and weight: a layer must exist; the weight kind keeps the selected layers with weights
            chosen = select_sites(sites, "neuron", spec.layer_types, spec.layers)
            sites_by_kind = {"neuron": [s.index for s in chosen], "weight": [s.index for s in chosen if s.is_weight_site]}
            if not sites_by_kind["weight"]:
                problems.append("layers: none of the selected layers has a weight: drop weight from --sites")
    except ValueError as exc:
        problems.append(f"layers: {exc}")
    if problems:
        raise SpecError("\n".join(problems))
    if spec.seeds is not None:
        seeds = tuple(spec.seeds)
    else:
        master = spec.master_seed if spec.master_seed != -1 else time.time_ns() % (2**31 - 1)
        seeds = tuple(derive_seeds(master, spec.num_seeds))
        spec = dataclasses.replace(spec, master_seed=master)
    spec = dataclasses.replace(spec, dataset=dataset, seeds=seeds)
    trials = tuple(TrialPlan(kind, site, bit, seed)
                   for seed in seeds for kind in spec.sites for site in sites_by_kind[kind] for bit in bits)
    return ResolvedCampaign(spec, dataset, seeds, site_table(sites), sites_by_kind,
                            {s.index: f"{s.name}#{s.call}" for s in sites}, trials, int(data.images.shape[0]))


def _ray_declares_gpus() -> bool:
    """True when this process is already connected to a Ray cluster that declares GPUs."""
    try:
        import ray
    except ImportError:
        return False
    return ray.is_initialized() and ray.cluster_resources().get("GPU", 0) > 0
