"""Campaign specs: defaults < the seed study's environment knobs < a YAML file < CLI flags,
validated and resolved into the list of trials before Ray starts."""
from __future__ import annotations

import collections
import dataclasses
import math
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

from campaign.numformats import effective_mode, format_problems, name_suffix
from trainables import storage

SITE_KINDS = ("neuron", "weight")  # the default kinds
ALL_SITE_KINDS = ("neuron", "weight", "param", "qparam", "kv")  # qparam: an int8 model's scales and zero points;
# kv: a causal LM's cached keys and values (generation campaigns, prompts: data; campaign.generation)
RECORD_LEVELS = ("none", "changed", "all")
MODES = ("fp32", "tf32", "fp16", "bf16")
# What decides a campaign's results: a directory holding a campaign that differs in any of
# these is a different campaign. Batch size, resources and names may change between runs.
IDENTITY_FIELDS = ("model", "dataset", "hub_ref", "weights", "sites", "layers", "layer_types", "bits", "seeds",
                   "images", "dtype", "images_per_weight_fault", "record", "target_margin", "report_every",
                   "params", "modules", "buffers", "fault", "quantize", "weight_format", "stop_interval", "margin",
                   "confidence", "allocate", "budget", "pilot", "model_args", "site_sampling", "new_tokens", "steps")
ALLOCATIONS = ("uniform", "proportional", "neyman", "equal-width")
SITE_SAMPLINGS = ("per-site", "proportional")  # proportional: one trial per (kind, bit, seed), its faults' sites drawn by size
STOP_INTERVALS = ("cs", "wilson")  # how a campaign that stops at a margin judges it (trainables.sfi)


MAX_SEED = 2**63 - 1  # seeds are stored as int64
MAX_SEEDS = 100_000  # seeds per campaign (each multiplies the trials)


# The content digests that are part of a campaign's identity, and how messages name them
# (the same table as trainables.digests.DIGEST_FIELDS; this module imports no torch).
DIGEST_FIELDS = {"weights_sha256": "the weights", "data_sha256": "the data (images and labels used)",
                 "hub_code_sha256": "the hub code", "code_sha256": "the model's code or configuration"}


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
    layer_types: str = "all"  # module class names: "all", "Conv2d,Linear" (param sites: the owning module's type)
    params: str = "all"  # param sites by qualified name: globs "*.bias,conv1.weight" or "re:<regex>" (last item)
    modules: str | None = None  # neuron sites on these modules' outputs (type names, globs, re:), containers included
    buffers: bool = False  # param sites include floating buffers (BatchNorm running mean/var)
    bits: str = "random"  # "random", "all", "30", "0-31", "23,30", "msb:1" (the seed's MSB-first numbering)
    fault: str = "flip"  # fault model(s), a campaign dimension: flip, flip:K, burst:K, stuck0, stuck1, random, zero
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
    target_margin: float | None = None  # stop each trial once its interval's half-width is below this
    report_every: int = 2048
    margin: float | None = None  # stop each stratum (site x bit x fault, over seeds) once its half-width is below this
    confidence: float = 0.95  # of the intervals that --target-margin and --margin stop on
    stop_interval: str = "cs"  # cs: the anytime-valid confidence sequence; wilson: repeated Wilson checks (before)
    allocate: str | None = None  # uniform | neyman | equal-width: spend --budget over strata after a pilot (campaign.adaptive)
    budget: int | None = None  # injections (golden-correct images) that --allocate spends
    pilot: float = 0.2  # the share of --budget spent evenly first, to estimate the strata's rates
    max_failures: int = 2
    max_concurrent: int | None = None
    address: str | None = None  # Ray cluster address; None: connect to a running one or start locally
    img_size: int | None = None  # the seed's knobs, checked against the data set
    channels: int | None = None
    prefix: bool = True  # prefix reuse: trials run only the suffix after the site on cached golden activations
    prefix_cache_mb: float | None = None  # that cache's budget per worker, MiB; None: a quarter of free memory
    protect: str = "none"  # mitigation, run as paired trials: none, clamp:<types>:<lo>:<hi>, relu6, ranger[:<targets>]
    bounds: str | None = None  # ranger: reuse the bounds of this file (a bounds file or a ranger campaign's spec.json)
    calibration: str | None = None  # ranger: the data set profiled (default: the evaluation set's training split)
    quantize: str | None = None  # int8: post-training static int8 quantization (campaign.numformats); mode int8
    weight_format: str | None = None  # fp8_e4m3fn | fp8_e5m2: weights stored in fp8, upcast for compute
    transform: str | None = None  # folder:/hf-dataset: images: torchvision:<Weights>, timm, hf, resize=..,crop=..,mean=..,std=..
    input_column: str | None = None  # hf-dataset:/tensors: the inputs' column (key)
    label_column: str | None = None  # hf-dataset:/tensors: the labels' column (key)
    data_cache: str | None = None  # image sources: a directory (or auto) for the memory-mapped uint8 cache; None: in memory
    model_args: dict | None = None  # keyword arguments for py:/timm:/hub:/hf: models (--model-arg key=value)
    site_sampling: str = "per-site"  # proportional: each fault picks its site by size (trainables.inject.proportional)
    seq_len: int | None = None  # text:/hf-dataset: text for a causal LM: tokens per sequence; None: the model's context
    new_tokens: int | None = None  # prompts: data (a generation campaign): tokens decoded per prompt; None: 16 there
    steps: str | None = None  # generation: neuron/kv fault steps: "0,3,7" (a trial each), random, prefill; None: random

    @property
    def directory(self) -> Path | str:
        """<out>/<name>: a Path, or a URI string when ``out`` is one (s3://bucket/prefix)."""
        return storage.join(storage.location(self.out), self.name or default_name(self))


def default_name(spec: CampaignSpec) -> str:
    """A readable campaign directory name from the model, data set and math mode."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", f"{spec.model}-{spec.dataset or 'default'}-{name_suffix(spec)}").strip("_")


_FIELDS = {f.name: f for f in dataclasses.fields(CampaignSpec)}
_INT_FIELDS = {"seq_len", "new_tokens", "budget", "num_seeds", "master_seed", "images", "batch_size", "images_per_weight_fault", "report_every",
               "max_failures", "max_concurrent", "img_size", "channels"}
_FLOAT_FIELDS = {"cpus_per_trial", "gpus_per_trial", "target_margin", "prefix_cache_mb", "margin", "confidence", "pilot"}


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
        if name in ("download", "prefix", "buffers"):
            if isinstance(value, bool):
                return value
            return {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}[str(value).lower()]
        if name == "sites":
            return tuple(_as_list(value))
        if name == "seeds":
            return tuple(int(v) for v in _as_list(value))
        if name in ("layers", "layer_types", "bits", "steps"):
            return ",".join(_as_list(value))
        if name == "fault":
            return ",".join(v.lower() for v in _as_list(value))
        if name == "model_args":
            return model_args(value)
        if name in ("params", "modules") and isinstance(value, (list, tuple)):
            return ",".join(str(v).strip() for v in value)  # a re: item runs to the end: put it last
        return str(value)
    except (ValueError, KeyError, TypeError, OverflowError):
        problems.append(f"{name}: cannot read {value!r} as {_expected(name)}")
        return None


def model_arg_value(text: str) -> bool | int | float | str:
    """A --model-arg value as the factory gets it: true/false -> bool, whole number -> int,
    number -> float, anything else the text itself."""
    low = text.strip().lower()
    if low in ("true", "false"):
        return low == "true"
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def model_args(value: Any) -> dict[str, Any] | None:
    """model_args from YAML (a mapping of scalars) or flags (['key=value', ...]); ValueError otherwise."""
    if isinstance(value, Mapping):
        items = {str(k): v for k, v in value.items()}
    else:
        items = {}
        for item in [value] if isinstance(value, str) else value:
            key, sep, text = str(item).partition("=")
            if not sep or not key.strip():
                raise ValueError(f"{item!r} is not key=value")
            items[key.strip()] = model_arg_value(text)
    for key, v in items.items():
        if not key.isidentifier() or not (v is None or isinstance(v, (bool, int, float, str))):
            raise ValueError(f"{key}={v!r}")
    return items or None


def _expected(name: str) -> str:
    """What a field takes, in words (for error messages)."""
    if name == "model_args":
        return "keyword=value pairs (a mapping in YAML, --model-arg key=value on the command line) of numbers, true/false or text"
    if name == "images":
        return "a whole number or all"
    if name in _INT_FIELDS:
        return "a whole number"
    if name in _FLOAT_FIELDS:
        return "a number"
    if name in ("download", "prefix", "buffers"):
        return "true or false"
    if name == "seeds":
        return "whole numbers separated by commas"
    return "text"


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
    if path.is_dir():
        raise SpecError(f"spec file {path} is a directory: pass a YAML file "
                        f"(to finish a campaign: `python -m campaign resume {path}`)")
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
    problems = _seed_env_problems(env)
    if problems:
        raise SpecError("\n".join(problems))
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


def _seed_env_problems(env: Mapping[str, str]) -> list[str]:
    """Each unreadable seed-study knob, named as the environment variable the user set."""
    problems = []
    for knob in ("seed", "batch_size", "img_size", "channels", "bit_flip_pos"):
        if knob in env and not re.fullmatch(r"-?\d+", env[knob].strip()):
            problems.append(f"environment variable {knob}={env[knob]!r}: not a whole number")
    pos = env.get("bit_flip_pos", "").strip()
    if re.fullmatch(r"-?\d+", pos) and not -1 <= int(pos) < 32:
        problems.append(f"environment variable bit_flip_pos={env['bit_flip_pos']!r}: use -1 (a random bit) or an "
                        "MSB-first bit position 0..31 (0 = sign)")
    for knob in ("layer_num", "layer_nums"):
        if knob in env and (problem := index_list_problem(env[knob])):
            problems.append(f"environment variable {knob}={env[knob]!r}: {problem}")
    return problems


def index_list_problem(text: str) -> str | None:
    """Why a layer list ('all', '3', '1,4-7') cannot be read, or None."""
    if str(text).strip().lower() in ("", "all"):
        return None
    for part in _as_list(text):
        m = re.fullmatch(r"(\d+)(?:-(\d+))?", part)
        if m is None:
            return f"cannot read {part!r}: use all, an index like 3, a list like 1,4 or a range like 4-7"
        if m.group(2) is not None and int(m.group(2)) < int(m.group(1)):
            return f"range {part} is reversed: write {m.group(2)}-{m.group(1)}"
    return None


def parse_bits(text: str, width: int) -> list[int | str]:
    """'random' | 'all' | '30' | '0-31' | '23,30' | 'msb:1' (MSB-first, 0 = sign) -> bit specs;
    a bit pool 'random:23-30', 'random:23+25+30', 'random:exponent' (trainables.inject.bitpools)
    is one spec, in canonical text, its numeric bits checked against ``width`` here and its
    fields per site format by numformats.pool_problems."""
    from trainables.inject.bitpools import is_pool, parse_pool

    out: list[int | str] = []
    for part in _as_list(text):
        low = part.lower()
        try:
            if is_pool(low):
                pool = parse_pool(low)
                outside = [b for b in pool.numbers if b >= width]
                if outside:
                    raise SpecError(f"bits: bit pool {pool}: bit {outside[0]} is outside a {width}-bit dtype: "
                                    f"allowed 0..{width - 1} (LSB = 0)")
                items: list[int | str] = [str(pool)]
            elif low in ("random", "-1"):
                items = ["random"]
            elif low == "all":
                items = list(range(width))
            elif low.startswith("msb:"):
                k = int(low[4:])
                if not 0 <= k < width:
                    raise SpecError(f"bits: MSB-first position {k} is outside 0..{width - 1}")
                items = [width - 1 - k]
            elif re.fullmatch(r"\d+-\d+", low):
                a, b = map(int, low.split("-"))
                if b < a:
                    raise SpecError(f"bits: range {part} is reversed: write {b}-{a}")
                items = list(range(a, b + 1))
            else:
                items = [int(low)]
        except SpecError:
            raise
        except ValueError as exc:
            if is_pool(low):
                raise SpecError(f"bits: {exc}") from None
            raise SpecError(f"bits: cannot read {part!r}: use random, all, 30, 0-31, 23,30, msb:1 or a bit pool "
                            f"such as random:23-30 or random:exponent") from None
        for bit in items:
            if isinstance(bit, int) and not 0 <= bit < width:
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
    fault: str = "flip"  # the fault model (trainables.inject.fault_models); part of the key unless flip
    prior_k: int = 0  # --margin: the stratum's mismatches and golden-correct images of earlier rounds
    prior_n: int = 0
    limit: int = 0  # --allocate: the trial runs only the first this many images (0: all)
    step: int | str | None = None  # generation, neuron and kv sites: the decode step (a listed one), random, prefill

    @property
    def key(self) -> str:
        from trainables.results import trial_key

        return trial_key(self.kind, self.site, self.bit, self.seed, self.fault, self.step)


@dataclass(frozen=True)
class ResolvedCampaign:
    """A validated spec with everything derived: data set, seeds, sites and the trial list."""

    spec: CampaignSpec
    dataset: str
    seeds: tuple[int, ...]
    site_table: str
    sites_by_kind: dict[str, list[int]]
    site_names: dict[int, str] = field(repr=False)
    trials: Sequence[TrialPlan] = field(repr=False)  # a lazy campaign.grid.TrialGrid, or a tuple
    num_images: int = 0
    inputs: dict[str, str] = field(default_factory=dict)  # content digests (DIGEST_FIELDS)
    notes: tuple[str, ...] = ()  # said once per campaign before it runs (sites that cannot reuse the prefix)
    protection: dict | None = None  # the guard record of a protected campaign: sites and bounds (spec.json)
    site_sizes: dict[tuple[str, int], tuple[str, int]] = field(default_factory=dict, repr=False)  # (kind, index) ->
    # (module type, elements a fault can hit per image: output elements, weight elements or tensor elements)

    @property
    def directory(self) -> Path | str:
        return self.spec.directory

    @property
    def reuses_prefix(self) -> bool:
        """Prefix reuse pays only when a site has several trials (seeds x bits) to share its
        cached prefix; with one trial per site (the demo) the full pass is cheaper."""
        return self.spec.prefix and trials_per_site(self.trials) > 1

    def identity(self) -> dict[str, Any]:
        values = dataclasses.asdict(self.spec)
        values.update(dataset=self.dataset, seeds=list(self.seeds), sites=list(self.spec.sites))
        # fields added later are None at their defaults, so campaigns written before them still match
        values.update(params=None if str(self.spec.params).lower() == "all" else self.spec.params,
                      buffers=True if self.spec.buffers else None,
                      fault=None if self.spec.fault == "flip" else self.spec.fault)
        stops = self.spec.target_margin is not None or self.spec.margin is not None
        # campaigns that never stop early, or stop on repeated Wilson checks (the only rule before), match older ones
        values.update(stop_interval=self.spec.stop_interval if stops and self.spec.stop_interval != "wilson" else None,
                      confidence=self.spec.confidence if stops and self.spec.confidence != 0.95 else None,
                      pilot=self.spec.pilot if self.spec.allocate else None,
                      site_sampling=None if self.spec.site_sampling == "per-site" else self.spec.site_sampling)
        return {**{k: values[k] for k in IDENTITY_FIELDS}, **protection_identity(self.protection), **self.inputs}


def check_plain_fields(spec: CampaignSpec) -> list[str]:
    """Problems visible without loading anything."""
    problems = []
    unknown_kinds = [k for k in spec.sites if k not in ALL_SITE_KINDS]
    if unknown_kinds or not spec.sites:
        problems.append(f"sites: {', '.join(unknown_kinds) or 'none given'}: use neuron, weight, param, qparam or a "
                        "list like neuron,weight (the default)")
    elif len(set(spec.sites)) != len(spec.sites):
        problems.append(f"sites: {','.join(spec.sites)} names a kind twice")
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
    if spec.prefix_cache_mb is not None and not 0 < spec.prefix_cache_mb < math.inf:
        problems.append(f"prefix_cache_mb: must be a positive size in MiB, got {spec.prefix_cache_mb}")
    if spec.gpus_per_trial < 0 or (spec.gpus_per_trial > 1 and not float(spec.gpus_per_trial).is_integer()):
        problems.append(f"gpus_per_trial: use a fraction in (0, 1] or a whole number, got {spec.gpus_per_trial}")
    if spec.target_margin is not None and not 0 < spec.target_margin < 0.5:
        problems.append(f"target_margin: a Wilson half-width in (0, 0.5), got {spec.target_margin}")
    if spec.margin is not None and not 0 < spec.margin < 0.5:
        problems.append(f"margin: a half-width in (0, 0.5), got {spec.margin}")
    if spec.margin is not None and spec.target_margin is not None:
        problems.append("margin: stops each stratum over its trials; target_margin stops each trial: give one of them")
    if not 0 < spec.confidence < 1:
        problems.append(f"confidence: a level in (0, 1), got {spec.confidence}")
    if spec.stop_interval not in STOP_INTERVALS:
        problems.append(f"stop_interval: {spec.stop_interval!r}: use cs (anytime-valid) or wilson")
    if spec.allocate is not None and spec.allocate not in ALLOCATIONS:
        problems.append(f"allocate: {spec.allocate!r}: use one of {', '.join(ALLOCATIONS)}")
    if spec.allocate is not None and spec.budget is None:
        problems.append("allocate: needs --budget, the injections to spend")
    if spec.budget is not None and spec.allocate is None:
        problems.append("budget: spent by --allocate uniform|neyman|equal-width: give one")
    if spec.budget is not None and spec.budget < 1:
        problems.append(f"budget: must be a positive number of injections, got {spec.budget}")
    if not 0 < spec.pilot < 1:
        problems.append(f"pilot: a share of the budget in (0, 1), got {spec.pilot}")
    if spec.allocate is not None and (spec.margin is not None or spec.target_margin is not None):
        problems.append("allocate: spends a fixed budget; not with --margin or --target-margin")
    if spec.margin is not None and spec.stop_interval != "cs":
        problems.append("stop_interval: --margin stops on the anytime-valid interval only (cs)")
    if spec.site_sampling not in SITE_SAMPLINGS:
        problems.append(f"site_sampling: {spec.site_sampling!r}: use per-site or proportional")
    elif spec.site_sampling == "proportional":
        if not set(spec.sites) <= {"neuron", "weight", "param"}:
            problems.append("site_sampling: proportional draws neuron, weight and param sites (not qparam)")
        if spec.quantize or str(spec.protect).lower() != "none":
            problems.append("site_sampling: proportional is not available with --quantize or --protect")
    if spec.max_failures < 0:
        problems.append(f"max_failures: must be >= 0, got {spec.max_failures}")
    if spec.seeds is not None and (not spec.seeds or any(not 0 <= s <= MAX_SEED for s in spec.seeds)):
        given = ",".join(map(str, spec.seeds)) or "none"
        problems.append(f"seeds: need whole numbers in 0..{MAX_SEED} (2^63 - 1), got {given}")
    if spec.seeds is None and not (spec.master_seed == -1 or 0 <= spec.master_seed <= MAX_SEED):
        problems.append(f"master_seed: use -1 (from the clock) or a whole number in 0..{MAX_SEED}, "
                        f"got {spec.master_seed}")
    if spec.num_seeds > MAX_SEEDS:
        problems.append(f"num_seeds: at most {MAX_SEEDS:,}, got {spec.num_seeds:,}")
    if spec.max_concurrent is not None and spec.max_concurrent < 1:
        problems.append(f"max_concurrent: must be a positive integer, got {spec.max_concurrent}")
    for name in ("cpus_per_trial", "gpus_per_trial"):
        value = getattr(spec, name)
        if value is not None and not math.isfinite(value):
            problems.append(f"{name}: must be a finite number, got {value}")
    if (problem := index_list_problem(spec.layers)) is not None:
        problems.append(f"layers: {problem}")
    if (problem := fault_problem(spec.fault)) is not None:
        problems.append(f"fault: {problem}")
    if spec.name is not None and (not spec.name.strip() or "/" in spec.name or "\0" in spec.name
                                  or spec.name in (".", "..")):
        problems.append(f"name: {spec.name!r} must be a plain directory name")
    elif spec.name is not None and len(spec.name.encode()) > 255:
        problems.append(f"name: {len(spec.name.encode())} bytes long: a directory name has at most 255")
    if not spec.out.strip() or "\0" in spec.out:
        problems.append(f"out: {spec.out!r} is not a directory path")
    elif (problem := storage.uri_problem(spec.out)) is not None:
        problems.append(f"out: {problem}")
    problems += protect_problems(spec)
    problems += format_problems(spec)
    from campaign.generation import plain_problems

    problems += plain_problems(spec)
    return problems


def resolve(spec: CampaignSpec) -> ResolvedCampaign:
    """Validate ``spec`` completely (loading the model and data set once, on the CPU) and
    expand it into trials. Raises SpecError listing every problem found."""
    import torch

    from campaign import numformats
    from trainables.inject import formats
    from trainables.inject.engine import MATH_MODES
    from trainables.inject import qparams
    from trainables.inject.sites import (coverage_lines, float_outputs, param_table, select_campaign_sites, site_table,
                                         survey)
    from trainables.inject.sites import parse_index_list, parse_type_list
    from trainables.zoo.data import check_dataset_name
    from trainables.zoo import memory
    from trainables.zoo.models import check_model_name, default_dataset_for, load_model

    problems = check_plain_fields(spec)
    dataset = spec.dataset or default_dataset_for(spec.model)
    try:
        check_model_name(spec.model, hub_dir=spec.hub_dir, model_args=spec.model_args)
    except ValueError as exc:  # an unknown model is reported as such, not as lacking a data set
        problems.append(str(exc))
    else:
        if dataset is None:
            problems.append(f"dataset: {spec.model} has no default data set: pass --dataset")
    try:
        if dataset is not None and not memory.is_memory(dataset):  # memory: campaign.run's in-memory data
            from trainables.zoo.datasets import DataOptions

            check_dataset_name(dataset, DataOptions(**data_options(spec)))
    except ValueError as exc:
        problems.append(str(exc))
    if problems:
        raise SpecError("\n".join(problems))
    if spec.gpus_per_trial > 0 and not torch.cuda.is_available() and spec.address is None and not _ray_declares_gpus():
        problems.append(f"gpus_per_trial: {spec.gpus_per_trial} GPUs per trial requested, but this machine has no CUDA GPU"
                        " (pass --address to use a cluster that has GPUs)")
    try:
        data = memory.load_data(dataset, root=spec.data_root, download=spec.download, limit=spec.images,
                                **data_options(spec))
        model = load_model(spec.model, num_classes=getattr(data, "model_classes", None), hub_dir=spec.hub_dir,
                           hub_ref=spec.hub_ref, weights=spec.weights, model_args=spec.model_args)
        digests = None
        if spec.quantize:  # the digests are of the float model, taken before quantizing it
            numformats.check_quantizable(spec, dataset, data)
            digests = input_digests(spec, data, model)
            model = numformats.quantized_model(spec, dataset, model)
    except (ValueError, FileNotFoundError, RuntimeError) as exc:
        raise SpecError("\n".join(problems + [str(exc)])) from None
    from campaign import generation

    if generation.is_generation(spec, dataset):  # prompts: data: greedy decoding, its own sites and trials
        return generation.resolve_generation(spec, dataset, data, model, problems)
    if is_causal_lm(model) and (lm := lm_problems(spec, model, data)):
        raise SpecError("\n".join(problems + lm))
    shape = tuple(data.images.shape[1:])
    is_image = len(shape) == 3 and data.images.is_floating_point()
    if spec.channels is not None and (not is_image or spec.channels != shape[0]):
        problems.append(f"channels: {spec.channels} given, but {dataset} " + (f"images have {shape[0]}" if is_image else
                        f"holds no images (per-example shape {list(shape)})"))
    if spec.img_size is not None and (not is_image or (spec.img_size, spec.img_size) != shape[1:]):
        problems.append(f"img_size: {spec.img_size} given, but {dataset} " + (f"images are {shape[1]}x{shape[2]}" if is_image
                        else f"holds no images (per-example shape {list(shape)})"))
    dtype = MATH_MODES[effective_mode(spec)]
    width = formats.width(dtype) if set(spec.sites) != {"qparam"} else qparams.WIDTH
    fault_bits = spec_fault_bits(spec, width, problems)
    fault_bits_for = {kind: fault_bits for kind in spec.sites}  # fp8-stored weights have 8 bits
    if spec.weight_format and "weight" in spec.sites and width != numformats.FORMAT_WIDTH:
        try:
            weight_bits = parse_bits(spec.bits, numformats.FORMAT_WIDTH)
        except SpecError as exc:
            problems.append(f"{exc} for the {spec.weight_format} weights (run wider bits in a neuron-only campaign)")
            weight_bits = []
        fault_bits_for["weight"], more = fault_dimension(spec.fault, weight_bits, numformats.FORMAT_WIDTH)
        problems += [p for p in more if p not in problems]
    if "qparam" in spec.sites and width != qparams.WIDTH:  # scales and zero points are 32-bit words
        try:
            qparam_bits = parse_bits(spec.bits, qparams.WIDTH)
        except SpecError:  # said once already, by the bits of the other kinds
            qparam_bits = []
        fault_bits_for["qparam"], more = fault_dimension(spec.fault, qparam_bits, qparams.WIDTH)
        problems += [p for p in more if p not in problems]
    problems += [p for p in numformats.pool_problems(spec, fault_bits_for) if p not in problems]  # bit pools' fields, K
    try:
        found = survey(model if spec.quantize else model.to(dtype), shape, dtype,
                       input_dtype=dtype if data.images.is_floating_point() else data.images.dtype)
    except ValueError as exc:
        raise SpecError("\n".join(problems + [f"model {spec.model}: {exc}"])) from None
    except Exception as exc:  # the model's own forward refused the input: a shape mismatch
        raise SpecError("\n".join(problems + [shape_mismatch(spec.model, dataset, shape, exc)])) from None
    if data.classes_known and not is_causal_lm(model) and (
            problem := classes_problem(spec.model, dataset, found.classes, data.num_classes)):
        raise SpecError("\n".join(problems + [problem]))
    if found.classes is not None and len(data.labels) and int(data.labels.max()) >= found.classes:
        i = int((data.labels >= found.classes).nonzero()[0])
        raise SpecError(f"labels: label {int(data.labels[i])} of example {i} of {dataset} is outside the model's "
                        f"{found.classes} classes (0..{found.classes - 1})")
    # neuron and weight together: the weight kind keeps the selected layers that have weights
    selected, selection_problems = select_campaign_sites(found, spec.sites, spec.layers, spec.layer_types, spec.params,
                                                         spec.modules, spec.buffers)
    problems += selection_problems
    if "qparam" in spec.sites:  # an int8 model's scales and zero points, of the selected layers
        layers = parse_index_list(spec.layers)
        missing = sorted(set(layers or ()) - {s.index for s in found.sites})
        if missing:
            problems.append(f"layers: layer(s) {', '.join(map(str, missing))} do not exist in {spec.model}; its layers "
                            f"are {found.sites[0].index}..{found.sites[-1].index} (see `python -m campaign layers`)")
        else:
            selected["qparam"], more = qparams.select_qparams(qparams.qparam_sites(model, found.sites), layers,
                                                              parse_type_list(spec.layer_types))
            problems += more
    left_out = ()
    if spec.quantize and selected.get("neuron"):  # a float module left inside the int8 model has no int8 output
        floating = float_outputs(model, selected["neuron"], shape, dtype if data.images.is_floating_point()
                                 else data.images.dtype)
        listed = f"{', '.join(f'{s.index} ({s.name}, {s.module_type})' for s in floating[:5])}{', ...' * (len(floating) > 5)}"
        if floating and str(spec.layers) != "all":
            problems.append(f"layers: {len(floating)} selected site(s) compute in float inside the int8 model (no int8 "
                            f"kernel for them, so their outputs are not 8-bit codes): {listed}; leave them out of "
                            f"--layers, or study them without --quantize")
        elif floating:
            selected["neuron"] = [s for s in selected["neuron"] if s not in floating]
            if "weight" in selected and "neuron" in spec.sites:
                selected["weight"] = [s for s in selected["weight"] if s not in floating]
            left_out = (f"sites: {len(floating)} site(s) compute in float inside the int8 model and are left out: {listed}",)
    if spec.weight_format and not any(s.is_weight_site for s in found.sites):
        problems.append(f"weight_format: {spec.model} has no weight sites (leaf modules with a floating weight) to store "
                        f"in {spec.weight_format}")
    sites_by_kind = {kind: [s.index for s in chosen] for kind, chosen in selected.items()}
    if problems:
        raise SpecError("\n".join(problems))
    protection = resolve_protection(spec, dataset, model, data, found)
    spec, seeds = resolve_seeds(spec)
    spec = dataclasses.replace(spec, dataset=dataset, seeds=seeds, fault=",".join(f for f, _ in fault_bits))  # canonical names
    # site-major: a worker's consecutive trials share a site, and with it the prefix cache
    from campaign.grid import TrialGrid  # kept lazy: index -> TrialPlan (a million trials, no million objects)

    trials = TrialGrid.site_major(spec.sites, {kind: _trial_sites(spec, sites_by_kind[kind]) for kind in spec.sites},
                                  seeds, fault_bits_for)
    sites = [s for s in found.sites if spec.modules is not None or not s.container]
    coverage = coverage_lines(model, found, selected, show_containers=spec.modules is not None)
    table = "\n\n".join([site_table(sites), *([param_table(found.params)] if "param" in spec.sites else []),
                          *([qparams.qparam_table(selected["qparam"])] if "qparam" in spec.sites else []),
                          "\n".join(coverage)])
    probe = numformats.probe_images(spec, model, data.images, dtype)
    said = tuple(f"sites: {line}" for line in coverage  # what neuron/weight sites leave out, when anything
                 if line.startswith(("leaf modules that never", "calls that are no")) and not line.endswith(": none"))
    return ResolvedCampaign(spec, dataset, seeds, table, sites_by_kind,
                            {s.index: f"{s.name}#{s.call}" for s in sites}, trials, int(data.images.shape[0]),
                            digests or input_digests(spec, data, model), notes=left_out + said + _prefix_notes(spec, model, probe, _float_kinds(spec, selected), trials, found.sites)
                            + (numformats.weight_note(spec, selected) if spec.prefix and trials_per_site(trials) > 1 else ()),
                            protection=protection, site_sizes=site_sizes(selected, spec.site_sampling == "proportional"))


def _trial_sites(spec: CampaignSpec, indices: list[int]) -> list[int]:
    """The site dimension of the trials: each selected site, or the pool of them all (proportional)."""
    from trainables.inject import proportional

    return [proportional.SITE] if spec.site_sampling == "proportional" and indices else indices


def site_sizes(selected: dict[str, list], pooled: bool = False) -> dict[tuple[str, int], tuple[str, int]]:
    """(kind, index) -> (module type, elements a fault of that kind can hit): the statistical
    planner's fault populations (campaign.plan); ``pooled``: also (kind, -1), the site pool of a
    proportional campaign, whose population is their sum."""
    from trainables.inject import proportional

    out = {}
    for kind, chosen in selected.items():
        for s in chosen:
            out[(kind, s.index)] = (s.module_type, proportional.site_size(s, kind))
        if pooled and chosen:
            out[(kind, proportional.SITE)] = ("proportional", sum(proportional.site_size(s, kind) for s in chosen))
    return out


def fault_problem(text: str) -> str | None:
    """Why a fault-model list ('flip', 'flip,burst:2,stuck0') cannot be read, or None (K is checked later)."""
    from trainables.inject.fault_models import parse_faults

    try:
        parse_faults(text)
    except ValueError as exc:
        return str(exc)
    return None


def resolve_seeds(spec: CampaignSpec) -> tuple[CampaignSpec, tuple[int, ...]]:
    """The campaign's seeds: the given ones, else num_seeds derived from master_seed (-1: drawn
    from the clock, and recorded in the returned spec)."""
    from trainables.inject.faults import derive_seeds

    if spec.seeds is not None:
        return spec, tuple(spec.seeds)
    master = spec.master_seed if spec.master_seed != -1 else time.time_ns() % (2**31 - 1)
    return dataclasses.replace(spec, master_seed=master), tuple(derive_seeds(master, spec.num_seeds))


def spec_fault_bits(spec: CampaignSpec, width: int, problems: list[str]) -> list[tuple[str, list[int | str]]]:
    """fault_dimension of ``spec``'s --fault and --bits at ``width`` bits; its problems appended to ``problems``."""
    try:
        bits = parse_bits(spec.bits, width)
    except SpecError as exc:
        problems.append(str(exc))
        bits = []
    fault_bits, more = fault_dimension(spec.fault, bits, width)
    problems += more
    return fault_bits


def fault_dimension(text: str, bits: list[int | str], width: int) -> tuple[list[tuple[str, list[int | str]]], list[str]]:
    """The campaign's fault models with the bit specs each runs, and the problems found. A
    whole-element model (random, zero) takes no bit: it runs once per site and seed, with bit
    spec 'random', and fixed --bits with only such models are refused."""
    from trainables.inject.fault_models import check_fault, parse_faults

    try:
        models = parse_faults(text)
    except ValueError:
        return [], []  # reported by check_plain_fields
    problems, out = [], []
    for model in models:
        try:
            check_fault(model, width)
        except ValueError as exc:
            problems.append(f"fault: {exc}")
        out.append((str(model), ["random"] if model.whole_element else bits))
    if bits and all(m.whole_element for m in models) and bits != ["random"]:
        verbs = ("replaces", "takes") if len(models) == 1 else ("replace", "take")
        problems.append(f"fault: {','.join(map(str, models))} {verbs[0]} every bit of an element and {verbs[1]} no bit "
                        f"position: use bits random, not {','.join(map(str, bits))}")
    return out, problems


def is_causal_lm(model) -> bool:
    """A causal LM (hf: CausalLMLogits): token ids in, next-token logits out; its trials are teacher-forced."""
    return hasattr(model, "context_length") and hasattr(model, "vocab_size")


def lm_problems(spec: CampaignSpec, model, data) -> list[str]:
    """One line per setting a causal LM's teacher-forced campaign cannot take: data that are not token
    ids with next-token labels within the model's context, the input site 0 (token ids are integers:
    the embedding output is the first site), and classification-only options."""
    from trainables.inject import tokens
    from trainables.inject.sites import parse_index_list

    problems = []
    try:
        tokens.check_lm_data(data.images, data.labels, model.context_length)
    except ValueError as exc:
        problems.append(f"{spec.model}: {exc}")
    if len(data.labels) and int(data.labels.max()) >= model.vocab_size:
        problems.append(f"labels: token {int(data.labels.max())} is outside the model's vocabulary of {model.vocab_size}")
    if 0 in (parse_index_list(spec.layers) or ()):
        problems.append("layers: site 0 is the input, and a causal LM's input is integer token ids, which cannot take a "
                        "float bit flip; the embedding output (site 1) is the first neuron site")
    for name, given in (("protect", spec.protect not in (None, "none")), ("quantize", bool(spec.quantize)),
                        ("weight_format", bool(spec.weight_format)), ("sites", "qparam" in spec.sites)):
        if given:
            problems.append(f"{name}: not for a causal LM's teacher-forced campaign (it runs fp32, tf32, fp16 or bf16, "
                            f"unprotected, on neuron, weight and param sites)")
    return problems


def classes_problem(model: str, dataset: str, classes: int | None, num_classes: int) -> str | None:
    """Why a model whose logits are (N, ``classes``) cannot classify a data set of
    ``num_classes`` classes, or None."""
    if classes is None or classes == num_classes:
        return None
    return (f"model {model} gives logits for {classes} classes, {dataset} has {num_classes}: the model's output must "
            f"be (N, {num_classes}) (set its classes, e.g. --model-arg num_classes={num_classes})")


def shape_mismatch(model: str, dataset: str, shape: tuple[int, ...], error: Exception) -> str:
    """One line: the model cannot take the data set's images (its forward pass raised ``error``)."""
    detail = " ".join(str(error).split())[:300] or type(error).__name__
    return (f"model {model} does not accept {dataset}'s {'x'.join(map(str, shape))} images ({detail}); "
            f"pick a data set of the input shape the model expects")


def data_options(spec: CampaignSpec) -> dict[str, Any]:
    """The keyword arguments of load_dataset that the registered sources read (beyond root and limit)."""
    return {"transform": spec.transform, "input_column": spec.input_column, "label_column": spec.label_column,
            "seq_len": spec.seq_len,
            "model": spec.model, "cache": spec.data_cache}


def input_digests(spec: CampaignSpec, data, model) -> dict[str, str]:
    """Content digests of what the campaign loaded (trainables.digests), computed once on
    the driver before Ray starts."""
    from trainables.digests import input_digests as digests

    return digests(spec.model, spec.weights, spec.hub_dir, spec.hub_ref, data, model, spec.model_args)


def trials_per_site(trials: Sequence[TrialPlan]) -> int:
    """The most trials that share one (kind, site)."""
    if hasattr(trials, "trials_per_site"):  # a lazy TrialGrid (campaign.grid): from its axes
        return trials.trials_per_site()
    counts = collections.Counter((t.kind, t.site) for t in trials)
    return max(counts.values(), default=0)


def _float_kinds(spec: CampaignSpec, selected: dict[str, list]) -> dict[str, list]:
    """The selected sites whose prefix reuse can be checked (int8 packed weights never reuse it)."""
    return {k: v for k, v in selected.items() if k != "qparam" and (k != "weight" or not spec.quantize)}


def _prefix_notes(spec: CampaignSpec, model, images, selected: dict[str, list], trials: Sequence[TrialPlan],
                  sites=()) -> tuple[str, ...]:
    """One line per reason naming the selected sites (per kind) whose trials cannot reuse the prefix
    (a causal LM's: the sites before its decoder layers, trainables.inject.layers)."""
    if not spec.prefix or trials_per_site(trials) < 2:
        return ()
    from trainables.inject.suffix import fallback_reasons

    chosen = [(kind, site) for kind, sites in selected.items() for site in sites]
    if is_causal_lm(model):
        from trainables.inject import layers

        return tuple(f"prefix reuse: {spec.model}: {len(names)} {kind} site(s) run the full forward pass "
                     f"({', '.join(names[:8])}{', ...' if len(names) > 8 else ''}): {reason}"
                     for (kind, reason), names in layers.fallback_reasons(model, sites, chosen).items())
    return tuple(f"prefix reuse: {spec.model}: {len(names)} {kind} site(s) run the full forward pass "
                 f"({', '.join(names[:8])}{', ...' if len(names) > 8 else ''}): {reason}"
                 for (kind, reason), names in fallback_reasons(model, chosen, images).items())


def _ray_declares_gpus() -> bool:
    """True when this process is already connected to a Ray cluster that declares GPUs."""
    try:
        import ray
    except ImportError:
        return False
    return ray.is_initialized() and ray.cluster_resources().get("GPU", 0) > 0


def protect_problems(spec: CampaignSpec) -> list[str]:
    """Problems of the protection settings visible without loading anything (one line each)."""
    from trainables.inject.protection import ProtectError, parse_protect

    try:
        parsed = parse_protect(spec.protect)
    except ProtectError as exc:
        return [str(exc)]
    problems = []
    for name in ("bounds", "calibration"):
        if getattr(spec, name) is not None and (parsed is None or parsed.kind != "ranger"):
            problems.append(f"{name}: applies to --protect ranger only (protect is {spec.protect})")
    if spec.bounds is not None and spec.calibration is not None:
        problems.append("calibration: not used with --bounds (the bounds file was profiled already)")
    return problems


def protection_identity(protection: dict | None) -> dict:
    """Identity entries of a protected campaign (none for an unprotected one, so campaigns
    written before protection existed still match): the spec and a digest of its bounds."""
    if not protection:
        return {}
    import hashlib
    import json

    bounds = json.dumps(protection["sites"], sort_keys=True).encode()
    return {"protect": protection["protect"], "bounds_sha256": hashlib.sha256(bounds).hexdigest()}


def resolve_protection(spec: CampaignSpec, dataset: str, model, data, found) -> dict | None:
    """The guard record of ``spec.protect`` (None for none): fixed bounds, a ``--bounds``
    file checked against this model, or Ranger bounds profiled on the calibration data."""
    from trainables.inject import protection as P
    from trainables.zoo.data import load_dataset

    parsed = P.parse_protect(spec.protect)
    if parsed is None:
        return None
    shape = tuple(data.images.shape[1:])
    try:
        if parsed.kind != "ranger":
            return P.guard_record(P.fixed_guard(parsed, found.sites), spec.model, spec.dtype)
        inputs = input_digests(spec, data, model)
        if spec.bounds is not None:
            return P.load_bounds(spec.bounds, parsed, spec.model, found.sites, shape, inputs.get("weights_sha256"))
        calibration = spec.calibration or P.default_calibration(dataset)
        if calibration is None:
            raise P.ProtectError(f"calibration: {dataset} has no default calibration split: pass --calibration DATA "
                                 "(images disjoint from the evaluated ones) or --bounds FILE")
        if calibration == dataset:
            raise P.ProtectError(f"calibration: {calibration} is the evaluated data set: calibrate on disjoint images "
                                 f"(e.g. {P.default_calibration(dataset) or 'a training split'})")
        try:
            calib = load_dataset(calibration, root=spec.data_root, download=spec.download)
        except (ValueError, FileNotFoundError) as exc:
            raise P.ProtectError(f"calibration: {exc}") from None
        P.check_calibration(calibration, calib.images, shape, not data.images.is_floating_point())
        sites = P.protected_sites(parsed, found.sites)
        bounds = P.profile_bounds(model, sites, calib.images, spec.batch_size, spec.dtype)
        guard = P.Guard(parsed, tuple(sites), bounds)
        return P.guard_record(guard, spec.model, spec.dtype,
                              P.calibration_record(calibration, calib.images, inputs.get("weights_sha256")))
    except P.ProtectError as exc:
        raise SpecError(str(exc)) from None
