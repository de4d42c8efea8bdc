"""Mitigation by range restriction, run as paired A/B trials on identical faults.

The seed study's mitigation scripts, as protection specs (``parse_protect``):

- ``none``: no protection (the default; results as before);
- ``clamp:<types>:<lo>:<hi>``: clamp every output of the listed module types to [lo, hi]
  with ``torch.fmin`` then ``torch.fmax`` as the seed's ``module_restriction`` hook did, so a
  NaN becomes a bound (a quiet NaN hi, a signaling NaN lo: ``fmin`` quiets it first);
- ``relu6``: every ReLU output clamped to [0, 6] as ``nn.ReLU6`` does (NaN stays NaN);
- ``ranger[:<types or module patterns>]``: Ranger (Chen et al., DSN 2021), per-site bounds
  profiled on clean calibration images (the min and max of each protected call's output),
  clamped like ``clamp``; container modules (a block) work too.

Protection is a set of forward hooks (registered in ``try``, removed in ``finally``), never a
module swap, so every site index and name stays and protected and unprotected trials draw
identical faults. The engine's fault hook is registered with ``prepend=True``: at a module
that is both the fault site and protected, the fault comes first and the clamp sees it, as
when a fault corrupts a layer's computation and a restriction hook clamps its output.

``run_paired`` runs each fault through the unprotected model (the engine as it is, prefix
reuse allowed) and the protected model (full forward passes), and counts the paired
outcomes against the *unprotected* golden prediction, as the seed reported them.
"""
from __future__ import annotations

import contextlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch
from torch import nn

from trainables.inject import engine
from trainables.inject.sites import REGEX_PREFIX, Site, name_matcher, parse_patterns

PROTECT_KINDS = ("none", "clamp", "relu6", "ranger")
# What ``ranger`` protects when no types or patterns are given: activations and pooling.
RANGER_DEFAULT_TYPES = ("ReLU", "ReLU6", "LeakyReLU", "ELU", "GELU", "SiLU", "Hardswish", "MaxPool1d", "MaxPool2d",
                        "MaxPool3d", "AvgPool2d", "AdaptiveAvgPool2d")
# Per-bit counts of a paired trial (besides the engine's COUNT_FIELDS of the unprotected half).
PAIR_FIELDS = (
    "protected_mismatches",  # golden-correct images whose protected faulty top-1 differs from the unprotected golden
    "protected_nonfinite",
    "pair_both",  # golden-correct images changed in both halves
    "pair_unprotected_only",  # changed only without protection (McNemar's b)
    "pair_protected_only",  # changed only with protection (McNemar's c)
    "faulty_correct",  # images whose unprotected faulty top-1 is the label (the seed's "corrupted" accuracy)
    "protected_faulty_correct",  # likewise with protection ("corrupted-robust")
    "protected_clean_correct",  # images the protected model classifies correctly without a fault ("robust")
    "detected",  # faults that drove a protected site's value outside its bounds (NaN included)
    "detected_mismatches",  # unprotected mismatches among them: the SDCs a range check flags
    "clean_alarms",  # images whose clean pass already leaves a bound (false alarms)
)


class ProtectError(ValueError):
    """A protection spec or bounds file that cannot be used (one line)."""


@dataclass(frozen=True)
class ProtectSpec:
    """A parsed ``--protect`` value."""

    kind: str  # clamp, relu6 or ranger
    targets: tuple[str, ...] = ()  # type names (clamp, relu6) or type names and module patterns (ranger)
    lo: float | None = None  # clamp's fixed bounds
    hi: float | None = None

    @property
    def text(self) -> str:
        if self.kind == "clamp":
            return f"clamp:{','.join(self.targets)}:{self.lo!r}:{self.hi!r}"
        if self.kind == "ranger" and self.targets:
            return f"ranger:{','.join(self.targets)}"
        return self.kind


def parse_protect(text: object) -> ProtectSpec | None:
    """``none``/None -> None; ``clamp:ReLU,MaxPool2d:0:6``, ``relu6``, ``ranger``,
    ``ranger:InvertedResidual`` or ``ranger:features.*`` -> a ProtectSpec; ProtectError otherwise."""
    if text is None:
        return None
    raw = str(text).strip()
    kind, _, rest = raw.partition(":")
    kind = kind.strip().lower()
    if kind == "none" and not rest:
        return None
    usage = "use none, clamp:<types>:<lo>:<hi> (e.g. clamp:ReLU,MaxPool2d:0:6), relu6, or ranger[:<types or module patterns>]"
    if kind not in PROTECT_KINDS:
        raise ProtectError(f"protect: unknown protection {raw!r}: {usage}")
    if kind == "relu6":
        if rest:
            raise ProtectError(f"protect: relu6 takes no arguments, got {raw!r}: {usage}")
        return ProtectSpec("relu6", ("ReLU",), 0.0, 6.0)
    if kind == "ranger":
        targets = tuple(parse_patterns(rest) or ()) if rest.strip() else ()
        if rest.strip() and not targets:
            raise ProtectError(f"protect: {raw!r} names no module types or patterns: {usage}")
        for t in targets:
            if t.startswith(REGEX_PREFIX):
                name_matcher(t)  # a bad regular expression fails here
        return ProtectSpec("ranger", targets)
    parts = rest.rsplit(":", 2) if rest else []
    if len(parts) != 3:
        raise ProtectError(f"protect: {raw!r} needs types and two bounds: clamp:<types>:<lo>:<hi>")
    types = tuple(t.strip() for t in parts[0].split(",") if t.strip())
    if not types:
        raise ProtectError(f"protect: {raw!r} names no module types: clamp:<types>:<lo>:<hi>")
    try:
        lo, hi = float(parts[1]), float(parts[2])
    except ValueError:
        raise ProtectError(f"protect: cannot read the bounds {parts[1]!r} and {parts[2]!r} of {raw!r} as numbers") from None
    if math.isnan(lo) or math.isnan(hi):
        raise ProtectError(f"protect: bounds of {raw!r} must be numbers, not NaN")
    if lo > hi:
        raise ProtectError(f"protect: lower bound {lo:g} is above the upper bound {hi:g} in {raw!r}")
    return ProtectSpec("clamp", types, lo, hi)


def protected_sites(spec: ProtectSpec, sites: Sequence[Site]) -> list[Site]:
    """The module calls (neuron sites, leaf or container) that ``spec`` protects; ProtectError
    naming what exists when a type or pattern matches nothing."""
    pool = [s for s in sites if s.index != 0]
    types = sorted({s.module_type for s in pool})
    if spec.kind == "ranger" and not spec.targets:
        chosen = [s for s in pool if s.module_type in RANGER_DEFAULT_TYPES and not s.container]
        if not chosen:
            raise ProtectError(f"protect: ranger found none of its default types ({', '.join(RANGER_DEFAULT_TYPES)}) in "
                               f"this model: name types or modules, e.g. ranger:{types[0] if types else 'ReLU'}; "
                               f"module types: {', '.join(types)}")
        return chosen
    chosen_ids: set[int] = set()
    for target in spec.targets:
        by_type = [s for s in pool if s.module_type == target]
        if spec.kind == "ranger" and not by_type:
            match = name_matcher(target)
            by_type = [s for s in pool if match(s.name)]
        if not by_type:
            what = "module type" if spec.kind != "ranger" else "module type or name"
            raise ProtectError(f"protect: {spec.kind} target {target!r} matches no {what} that runs in this model; "
                               f"module types: {', '.join(types)}")
        chosen_ids.update(s.index for s in by_type)
    return [s for s in pool if s.index in chosen_ids]


@dataclass(frozen=True)
class Guard:
    """What a protected model clamps: per protected call (module name, call) its bounds."""

    spec: ProtectSpec
    sites: tuple[Site, ...]
    bounds: dict[tuple[str, int], tuple[float, float]] = field(compare=False)

    @property
    def nan_to_bound(self) -> bool:
        """fmin then fmax (NaN -> a bound), the seed's restriction; relu6 keeps NaN like nn.ReLU6."""
        return self.spec.kind != "relu6"


def fixed_guard(spec: ProtectSpec, sites: Sequence[Site]) -> Guard:
    """A guard with ``spec``'s fixed bounds (clamp, relu6) on every protected call."""
    chosen = protected_sites(spec, sites)
    return Guard(spec, tuple(chosen), {(s.name, s.call): (spec.lo, spec.hi) for s in chosen})


def restrict(x: torch.Tensor, lo: float, hi: float, nan_to_bound: bool = True, inplace: bool = False) -> torch.Tensor:
    """``x`` clamped to [lo, hi]. ``nan_to_bound``: the seed's two calls, ``fmin(x, hi)`` then
    ``fmax(x, lo)``, so a quiet NaN becomes hi and a signaling NaN lo (``fmin`` quiets it, then
    ``fmax`` drops it); else ``clamp`` (NaN stays, like nn.ReLU6). ``inplace`` overwrites ``x``."""
    if nan_to_bound and (x.device.type != "cpu" or x.numel() == 0 or bool(torch.isnan(x.max()))):
        out = x if inplace else None
        y = torch.fmin(x, torch.tensor(hi, dtype=x.dtype, device=x.device), out=out)
        return torch.fmax(y, torch.tensor(lo, dtype=x.dtype, device=x.device), out=y)
    # On CPUs fmin/fmax run ~20x slower than clamp, which equals them bit for bit (signed zeros
    # and infinities included) on a tensor without NaN: the max above finds any NaN.
    return x.clamp_(lo, hi) if inplace else torch.clamp(x, lo, hi)


def _owns_output(module: nn.Module, inputs: tuple, x: torch.Tensor) -> bool:
    """Whether clamping ``x`` in place is invisible to the rest of the forward pass: ``x`` is
    fresh memory, or the module already overwrote its input (an ``inplace=True`` activation,
    whose input nobody reads afterwards). Identity, Dropout and views alias their input: no."""
    if isinstance(x, nn.Parameter):
        return False
    if getattr(module, "inplace", False):
        return True
    ptr = x.untyped_storage().data_ptr()
    return not any(isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() == ptr for t in inputs)


def outside(x: torch.Tensor, lo: float, hi: float) -> torch.Tensor:
    """Per image (dim 0): whether any value of ``x`` lies outside [lo, hi] or is NaN."""
    if x.dim() == 1:
        return ~(x <= hi) | ~(x >= lo)
    dims = tuple(range(1, x.dim()))  # any memory format (channels_last): no copy, unlike a reshape
    return ~(x.amax(dim=dims) <= hi) | ~(x.amin(dim=dims) >= lo)  # NaN compares false: flagged


class GuardState:
    """Per-forward bookkeeping of an installed guard: call numbers, and per image whether a
    protected call saw a value outside its bounds (``alarms``: one bool tensor per forward)."""

    def __init__(self, detect: bool = True, skip: frozenset = frozenset(), by_site: bool = False) -> None:
        self.detect = detect
        self.skip = skip  # (name, call) of protected calls whose alarms are known already (clean upstream)
        self.by_site: dict[tuple[str, int], list[torch.Tensor]] | None = {} if by_site else None
        self.calls: dict[str, int] = {}
        self.alarm: torch.Tensor | None = None
        self.alarms: list[torch.Tensor] = []
        self.fired: set[str] = set()

    def take_alarms(self, n: int, device) -> torch.Tensor:
        """The alarms of the forwards since the last take, one per image (``n`` expected)."""
        flags = torch.cat(self.alarms) if self.alarms else torch.zeros(0, dtype=torch.bool, device=device)
        self.alarms = []
        if flags.shape[0] != n:
            raise RuntimeError(f"protection saw {flags.shape[0]} images in its forward passes, expected {n}")
        return flags


def _element(output, site: Site):
    return output if isinstance(output, torch.Tensor) else output[site.output_index]


def _replace(output, site: Site, value: torch.Tensor):
    if isinstance(output, torch.Tensor):
        return value
    items = list(output)
    items[site.output_index] = value
    if isinstance(output, list):
        return items
    return type(output)(*items) if hasattr(output, "_fields") else tuple(items)


@contextlib.contextmanager
def installed(model: nn.Module, guard: Guard, state: GuardState) -> Iterator[GuardState]:
    """Hook ``guard`` into ``model`` for the block: each protected call's output is clamped
    to its bounds and, with ``state.detect``, flagged per image when a value left them.
    RuntimeError if a protected module never ran."""
    by_module: dict[str, dict[int, Site]] = {}
    for s in guard.sites:
        by_module.setdefault(s.name, {})[s.call] = s

    def make_hook(name: str):
        calls = by_module[name]

        def hook(module, inputs, output):
            call = state.calls.get(name, 0)
            state.calls[name] = call + 1
            site = calls.get(call)
            if site is None:  # a call that is no protected site
                return None
            state.fired.add(name)
            x = _element(output, site)
            lo, hi = guard.bounds[(name, call)]
            if state.detect and (name, call) not in state.skip:
                left = outside(x, lo, hi)
                state.alarm = left if state.alarm is None else state.alarm | left
                if state.by_site is not None:
                    state.by_site.setdefault((name, call), []).append(left)
            inplace = _owns_output(module, inputs, x)
            return _replace(output, site, restrict(x, lo, hi, guard.nan_to_bound, inplace))

        return hook

    def before(_model, _inputs):
        state.calls = {}
        state.alarm = None

    def after(_model, inputs, _output):
        if state.detect:
            alarm = state.alarm
            if alarm is None:
                first = inputs[0] if inputs else None
                batch = first.shape[0] if isinstance(first, torch.Tensor) else 0
                alarm = torch.zeros(batch, dtype=torch.bool, device=first.device if batch else None)
            state.alarms.append(alarm)

    handles = []
    try:
        handles.append(model.register_forward_pre_hook(before))
        for name in by_module:
            handles.append(model.get_submodule(name).register_forward_hook(make_hook(name)))
        handles.append(model.register_forward_hook(after))
        yield state
    finally:
        for handle in handles:
            handle.remove()
    never = sorted(set(by_module) - state.fired)
    if never:
        raise RuntimeError(f"protected module(s) never ran: {', '.join(never)}")


# ---------------------------------------------------------------- Ranger: profiled bounds


def profile_bounds(model: nn.Module, sites: Sequence[Site], images: torch.Tensor, batch_size: int = 256,
                   mode: str = "fp32") -> dict[tuple[str, int], tuple[float, float]]:
    """Min and max of each site's output over clean ``images`` (the calibration data), per
    (module name, call), in ``mode``'s dtype on the model's device."""
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    dtype = engine.check_mode(mode)
    wanted: dict[str, dict[int, Site]] = {}
    for s in sites:
        wanted.setdefault(s.name, {})[s.call] = s
    found: dict[tuple[str, int], list[float]] = {}
    calls: dict[str, int] = {}

    def make_hook(name: str):
        def hook(_module, _inputs, output):
            call = calls.get(name, 0)
            calls[name] = call + 1
            site = wanted[name].get(call)
            if site is None:
                return
            x = _element(output, site)
            lo, hi = float(x.min()), float(x.max())
            old = found.get((name, call))
            found[(name, call)] = [lo, hi] if old is None else [min(old[0], lo), max(old[1], hi)]

        return hook

    handles = []
    try:
        for name in wanted:
            handles.append(model.get_submodule(name).register_forward_hook(make_hook(name)))
        with engine.math_mode(mode), torch.inference_mode():
            for start in range(0, images.shape[0], batch_size):
                calls.clear()
                model(images[start:start + batch_size].to(device=device, dtype=dtype))
    finally:
        for handle in handles:
            handle.remove()
    missing = [f"{s.name} call {s.call}" for s in sites if (s.name, s.call) not in found]
    if missing:
        raise RuntimeError(f"profiling never saw: {', '.join(missing)}")
    if any(not (math.isfinite(lo) and math.isfinite(hi)) for lo, hi in found.values()):
        raise ProtectError("protect: the calibration pass produced non-finite activations: cannot profile bounds")
    return {k: (v[0], v[1]) for k, v in found.items()}


def guard_record(guard: Guard, model: str, mode: str, calibration: dict | None = None) -> dict:
    """The JSON form of a guard (spec.json's ``protection``, a ``--bounds`` file)."""
    return {
        "protect": guard.spec.text, "model": model, "mode": mode, "calibration": calibration,
        "sites": [{"name": s.name, "call": s.call, "type": s.module_type,
                   "lo": guard.bounds[(s.name, s.call)][0], "hi": guard.bounds[(s.name, s.call)][1]}
                  for s in guard.sites],
    }


def guard_from_record(record: dict, sites: Sequence[Site]) -> Guard:
    """The guard a ``guard_record`` describes, on this model's ``sites``."""
    spec = parse_protect(record["protect"])
    by_key = {(s.name, s.call): s for s in sites if s.index != 0}
    chosen, bounds = [], {}
    for entry in record["sites"]:
        key = (entry["name"], int(entry["call"]))
        if key not in by_key:
            raise ProtectError(f"protect: bounds name {key[0]} call {key[1]}, which is no site of this model")
        chosen.append(by_key[key])
        bounds[key] = (float(entry["lo"]), float(entry["hi"]))
    order = sorted(chosen, key=lambda s: s.index)
    return Guard(spec, tuple(order), bounds)


def _read_text(path: str | Path) -> str:
    """A local file's or an object-store URI's text (a campaign's spec.json may live in a store)."""
    try:
        from trainables import storage
    except ImportError:  # a checkout without object-storage support
        return Path(path).read_text()
    return storage.read_bytes(storage.location(str(path))).decode()


def load_bounds(path: str | Path, spec: ProtectSpec, model: str, sites: Sequence[Site], input_shape: Sequence[int],
                weights_sha256: str | None = None) -> dict:
    """Read and check a ``--bounds`` file (a bounds file or a campaign's spec.json) for
    ``spec`` on ``model``; returns its record. One ProtectError line per problem kind."""
    try:
        data = json.loads(_read_text(path))
    except Exception as exc:  # a missing file, an unreachable store, not JSON: one line
        raise ProtectError(f"bounds: cannot read {path}: {' '.join(str(exc).split())[:200]}") from None
    record = data.get("protection", data) if isinstance(data, dict) else None
    if not isinstance(record, dict) or not isinstance(record.get("sites"), list) or "protect" not in record:
        raise ProtectError(f"bounds: {path} holds no profiled bounds (expected a bounds file or a ranger campaign's spec.json)")
    if record.get("model") != model:
        raise ProtectError(f"bounds: {path} was profiled on model {record.get('model')}, not {model}")
    theirs = (record.get("calibration") or {}).get("weights_sha256")
    if weights_sha256 and theirs and theirs != weights_sha256:
        raise ProtectError(f"bounds: {path} was profiled with other weights of {model} "
                           f"(sha256 {str(theirs)[:12]} there, {weights_sha256[:12]} here)")
    shape = (record.get("calibration") or {}).get("shape")
    if shape is not None and tuple(shape) != tuple(input_shape):
        raise ProtectError(f"bounds: {path} was profiled on {'x'.join(map(str, shape))} calibration images; "
                           f"the evaluated images are {'x'.join(map(str, input_shape))}")
    have = {(str(e.get("name")), int(e.get("call", 0))) for e in record["sites"] if isinstance(e, dict)}
    need = protected_sites(spec, sites)
    missing = [f"{s.name} call {s.call} ({s.module_type})" for s in need if (s.name, s.call) not in have]
    if missing:
        raise ProtectError(f"bounds: {path} lacks bounds for {len(missing)} protected site(s): {', '.join(missing[:8])}"
                           f"{', ...' if len(missing) > 8 else ''}")
    for e in record["sites"]:
        lo, hi = (_bound(path, e, key) for key in ("lo", "hi"))
        if not (lo <= hi):
            raise ProtectError(f"bounds: {path}: {e['name']} call {e['call']} has lo {lo!r} above hi {hi!r}")
    wanted = {(s.name, s.call) for s in need}
    return {**record, "protect": spec.text, "sites": [e for e in record["sites"] if (e["name"], int(e["call"])) in wanted]}


def _bound(path: str | Path, entry: dict, key: str) -> float:
    """``entry[key]`` as a float; one line naming the file, the site and the key otherwise."""
    try:
        return float(entry[key])
    except (KeyError, TypeError, ValueError):
        raise ProtectError(f"bounds: {path}: {entry.get('name')} call {entry.get('call', 0)} has "
                           f"{key} {entry.get(key, 'missing')!r}, not a number") from None


def calibration_record(dataset: str, images: torch.Tensor, weights_sha256: str | None = None) -> dict:
    return {"dataset": dataset, "images": int(images.shape[0]), "shape": list(images.shape[1:]),
            "weights_sha256": weights_sha256}


def check_calibration(calibration: str, images: torch.Tensor, evaluated_shape: Sequence[int],
                      evaluated_tokens: bool = False) -> None:
    """One line if the calibration inputs do not have the evaluated inputs' shape and kind
    (images, or sequences of token ids)."""
    tokens = not images.is_floating_point()
    if tuple(images.shape[1:]) != tuple(evaluated_shape) or tokens != evaluated_tokens:
        size = lambda shape: "x".join(map(str, shape))  # noqa: E731
        have = f"sequences of {size(images.shape[1:])} tokens" if tokens else f"{size(images.shape[1:])} images"
        want = (f"sequences have {size(evaluated_shape)} tokens" if evaluated_tokens
                else f"images are {size(evaluated_shape)}")
        raise ProtectError(f"calibration: {calibration} has {have}; the evaluated {want}")


# The calibration split of each evaluation data set: disjoint from it (training images).
DEFAULT_CALIBRATION = {"fashion-mnist": "fashion-mnist-calib", "cifar10": "cifar10-train", "cifar100": "cifar100-train"}


def default_calibration(dataset: str) -> str | None:
    return DEFAULT_CALIBRATION.get(dataset)


# ---------------------------------------------------------------- paired trials


@dataclass
class ProtectedBench:
    """A workbench with its guard and the protected model's clean pass (computed once)."""

    bench: engine.Workbench
    guard: Guard
    golden: torch.Tensor  # protected clean top-1 per image
    clean_alarm: torch.Tensor  # per image: the clean pass left a bound
    site_alarms: dict[tuple[str, int], torch.Tensor] = field(default_factory=dict)  # the same per protected call

    def upstream(self, site, kind: str) -> list[Site]:
        """Protected leaf calls that run before a fault at ``site`` can reach them (so they see
        clean values): leaf sites of lower index, for neuron and weight faults."""
        if kind == "param" or getattr(site, "container", False):
            return []
        return [s for s in self.guard.sites if not s.container and s.index < site.index]


def protect_bench(bench: engine.Workbench, guard: Guard) -> ProtectedBench:
    """Run the protected model's clean pass over every image of ``bench`` once."""
    state = GuardState(detect=True, by_site=True)
    golden = torch.empty_like(bench.labels)
    with engine.math_mode(bench.mode), torch.inference_mode(), installed(bench.model, guard, state):
        for lo in range(0, bench.num_images, bench.batch_size):
            golden[lo:lo + bench.batch_size] = bench.model(bench.images[lo:lo + bench.batch_size]).argmax(dim=1)
    alarms = state.take_alarms(bench.num_images, bench.device)
    return ProtectedBench(bench, guard, golden, alarms, {k: torch.cat(v) for k, v in state.by_site.items()})


@dataclass(frozen=True)
class PairCounts:
    """Per-bit paired counts: ``by_bit[f, b]`` for field f of PAIR_FIELDS."""

    by_bit: np.ndarray

    def total(self, name: str) -> int:
        return int(self.by_bit[PAIR_FIELDS.index(name)].sum())

    def __add__(self, other: "PairCounts") -> "PairCounts":
        return PairCounts(self.by_bit + other.by_bit)

    @staticmethod
    def zeros(width: int) -> "PairCounts":
        return PairCounts(np.zeros((len(PAIR_FIELDS), width), dtype=np.int64))


class PairedRecords:
    """Per-fault columns of a paired trial: the engine's record fields (of the unprotected
    half) plus the protected half's outcome (``protected_*``) and ``detected``."""

    def __init__(self, columns: dict[str, np.ndarray]) -> None:
        self.__dict__.update(columns)

    def as_dict(self) -> dict[str, np.ndarray]:
        return dict(self.__dict__)

    def __len__(self) -> int:
        return len(self.image)


@dataclass(frozen=True)
class PairedOutcome:
    counts: engine.Counts  # the unprotected half (the engine's counts)
    protected_counts: engine.Counts  # the protected half, against the unprotected golden prediction
    pairs: PairCounts
    records: PairedRecords | None
    path: str  # "full", or "mixed" where the unprotected half reused the prefix


def run_paired(pbench: ProtectedBench, site, kind: str, bit, seed: int, start: int = 0, stop: int | None = None,
               images_per_weight_fault: int = engine.DEFAULT_IMAGES_PER_WEIGHT_FAULT, record: str = "none",
               prefix: bool | None = None, **engine_options) -> PairedOutcome:
    """Each fault of images ``start..stop-1`` once without and once with protection (same
    element, same bit), counted against the unprotected golden prediction. ``engine_options``
    go to both halves' ``engine.run_faults`` (e.g. the fault model)."""
    bench = pbench.bench
    stop = engine.check_range(bench, start, stop)
    if record not in engine.RECORD_LEVELS:
        raise ValueError(f"unknown record level {record!r}: use one of {', '.join(engine.RECORD_LEVELS)}")
    plain = engine.run_faults(bench, site, kind, bit, seed, start, stop, images_per_weight_fault, "all", prefix,
                              **engine_options)
    clean = pbench.upstream(site, kind)  # their alarms are the clean pass's: no need to check them again
    state = GuardState(detect=True, skip=frozenset((s.name, s.call) for s in clean))
    with installed(bench.model, pbench.guard, state):
        guarded = engine.run_faults(bench, site, kind, bit, seed, start, stop, images_per_weight_fault, "all", False,
                                    **engine_options)
    detected = state.take_alarms(stop - start, bench.device)
    for s in clean:
        detected = detected | pbench.site_alarms[(s.name, s.call)][start:stop]
    detected = detected.cpu().numpy()
    u, p = plain.records, guarded.records
    if not (np.array_equal(u.image, p.image) and np.array_equal(u.position, p.position) and np.array_equal(u.bit, p.bit)):
        raise RuntimeError("the protected half drew other faults than the unprotected half")
    label = u.label
    gc = u.golden_correct.astype(bool)
    uc, pc = u.changed & gc, p.changed & gc
    sl = slice(start, stop)
    p_golden = pbench.golden[sl].cpu().numpy()
    values = {
        "protected_mismatches": pc, "protected_nonfinite": p.nonfinite,
        "pair_both": uc & pc, "pair_unprotected_only": uc & ~pc, "pair_protected_only": ~uc & pc,
        "faulty_correct": u.faulty == label, "protected_faulty_correct": p.faulty == label,
        "protected_clean_correct": p_golden == label, "detected": detected, "detected_mismatches": detected & uc,
        "clean_alarms": pbench.clean_alarm[sl].cpu().numpy(),
    }
    width = bench.width
    by_bit = np.stack([np.bincount(u.bit.astype(np.int64), weights=values[f].astype(np.int64), minlength=width)
                       for f in PAIR_FIELDS]).astype(np.int64)
    records = None
    if record != "none":
        keep = np.ones(len(u), dtype=bool) if record == "all" else (u.changed | p.changed)
        columns = {name: None if value is None else value[keep] for name, value in u.as_dict().items()}
        columns.update(protected_faulty=p.faulty[keep], protected_changed=p.changed[keep],
                       protected_nonfinite=p.nonfinite[keep], protected_raw_before=p.raw_before[keep],
                       detected=detected[keep])
        records = PairedRecords(columns)
    path = "full" if plain.path == "full" else "mixed"
    return PairedOutcome(plain.counts, guarded.counts, PairCounts(by_bit), records, path)


# ---------------------------------------------------------------- result columns

# Trial-row columns of a paired trial (null in unprotected campaigns), in schema order.
ROW_COLUMNS = ("protect", *PAIR_FIELDS, "protected_misclassification_rate", "protected_ci_low", "protected_ci_high",
               "mcnemar_p")
BIT_COLUMNS = ("protected_mismatches", "pair_both", "pair_unprotected_only", "pair_protected_only")
FAULT_COLUMNS = ("protected_faulty", "protected_changed", "protected_nonfinite", "protected_raw_before", "detected")


def row_columns(protect: str | None, pairs: PairCounts | None, golden_correct: int) -> dict:
    """The paired columns of a trial row (all None for an unprotected trial)."""
    from trainables.stats import mcnemar_exact, wilson_interval

    if pairs is None:
        return dict.fromkeys(ROW_COLUMNS)
    out = {"protect": protect, **{f: pairs.total(f) for f in PAIR_FIELDS}}
    k = out["protected_mismatches"]
    out["protected_misclassification_rate"] = k / golden_correct if golden_correct else float("nan")
    out["protected_ci_low"], out["protected_ci_high"] = wilson_interval(k, golden_correct)
    out["mcnemar_p"] = mcnemar_exact(out["pair_unprotected_only"], out["pair_protected_only"])
    return out


def bit_columns(pairs: PairCounts | None, bit: int) -> dict:
    if pairs is None:
        return dict.fromkeys(BIT_COLUMNS)
    return {f: int(pairs.by_bit[PAIR_FIELDS.index(f), bit]) for f in BIT_COLUMNS}


def fault_columns(columns: dict) -> dict:
    """``columns`` with the paired fault columns added as nulls where a trial has none."""
    n = len(columns["image"])
    return {**{c: [None] * n for c in FAULT_COLUMNS}, **columns}


def bounds_text(record: dict) -> str:
    """A short table of a guard record's bounds (one line per site)."""
    lines = [f"{e['name']}#{e['call']} ({e['type']}): [{e['lo']:.6g}, {e['hi']:.6g}]" for e in record["sites"]]
    return "\n".join(lines)



_PROTECTED: dict[str, ProtectedBench] = {}


def bench_for(bench: engine.Workbench, record: dict | None) -> ProtectedBench | None:
    """The protected workbench for a guard record (cached per worker, like the workbench);
    None when ``record`` is None (an unprotected campaign)."""
    if not record:
        return None
    key = json.dumps(record, sort_keys=True)
    cached = _PROTECTED.get(key)
    if cached is None or cached.bench is not bench:
        _PROTECTED.clear()
        cached = _PROTECTED[key] = protect_bench(bench, guard_from_record(record, bench.sites))
    return cached


def paired_runner(pbench: ProtectedBench):
    """A function with ``engine.run_faults``'s arguments that runs paired trials on ``pbench``."""
    def run(bench, site, kind, bit, seed, start=0, stop=None,
            images_per_weight_fault=engine.DEFAULT_IMAGES_PER_WEIGHT_FAULT, record="none", prefix=None, **options):
        if bench is not pbench.bench:
            raise ValueError("paired_runner: a workbench other than the protected one")
        return run_paired(pbench, site, kind, bit, seed, start, stop, images_per_weight_fault, record, prefix, **options)

    return run
