"""Injection sites of a classifier.

- neuron: every call of a leaf module, numbered in forward order, with the input as site 0.
  A leaf is a module none of whose submodules runs as a module in the forward pass: a
  module without children, or one like ``nn.MultiheadAttention`` whose ``out_proj`` is only
  read functionally (CNNs have no such modules: their numbering is unchanged). A module called twice in one forward pass (the shared ``relu`` of the zoo's ResNet blocks)
  gives two neuron sites, told apart by ``call``. A module whose output is a tuple or list
  (``nn.MultiheadAttention``) is a site on its first floating tensor (``output_index``).
  Integer inputs (token ids) have no input site: index 0 stays unused and the first site is
  index 1 (the embedding output), so "site k" is the k-th call in every model.
- container neuron sites (on request, ``modules=``): every call of a module whose children
  run (a transformer block, a ResNet block), numbered after all leaf sites in the order their
  outputs appear, so they never shift the leaf numbering.
- weight: a leaf module with a ``weight``. It shares the index of its module's first call,
  so "site 5" is the same layer in neuron and weight campaigns and the numbering matches
  the seed study's layer table for models without module reuse.
- int8 models (trainables.zoo.quantization): the same numbering on the converted GraphModule,
  whose quantized modules are the leaves (a fused Conv-BN-ReLU is one site under the conv's
  name); the input site is the quantized image and weight sites are the packed int8 weights.
- param: every floating tensor of the model (parameters, and buffers on request), by
  qualified name, numbered 0.. in ``state_dict`` order (a separate numbering: param site 3
  is unrelated to neuron site 3; trial keys carry the kind).
"""
from __future__ import annotations

import fnmatch
import math
import re
import warnings
from dataclasses import dataclass, field
from typing import Iterable, Sequence

import torch
from torch import nn

INPUT_NAME = "input"
INPUT_TYPE = "Identity"  # the seed prepended an nn.Identity: layer 0 is the image itself
SITE_KINDS = ("neuron", "weight", "param")
REGEX_PREFIX = "re:"  # a name pattern starting with re: is a regular expression (to the end of the text)
LIST_LIMIT = 30  # names listed in an error message before "... and N more"


@dataclass(frozen=True)
class Site:
    """One injection site; shapes are per image (no batch dimension)."""

    index: int
    name: str
    call: int
    module_type: str
    output_shape: tuple[int, ...]
    weight_shape: tuple[int, ...] | None
    output_index: int | None = None  # the element of a tuple/list output that is injected; None: a tensor output
    container: bool = False  # a module whose submodules run (a block): selected only with modules=

    @property
    def output_numel(self) -> int:
        return math.prod(self.output_shape)

    @property
    def weight_numel(self) -> int:
        if self.weight_shape is None:
            raise ValueError(f"site {self.index} ({self.name}) has no weight")
        return math.prod(self.weight_shape)

    @property
    def is_weight_site(self) -> bool:
        return self.weight_shape is not None and self.call == 0


def leaf_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Qualified name -> module for every module without children."""
    return {name: m for name, m in model.named_modules() if not list(m.children()) and name}


def _weight_shape(module: nn.Module) -> tuple[int, ...] | None:
    weight = getattr(module, "weight", None)
    if _is_quantized_module(module):  # an int8 model: weight sites are the packed int8 weights
        weight = weight() if callable(weight) and hasattr(module, "set_weight_bias") else None
        return tuple(weight.shape) if isinstance(weight, torch.Tensor) and weight.is_quantized else None
    if isinstance(weight, torch.Tensor) and weight.is_floating_point():
        return tuple(weight.shape)
    return None


def _is_quantized_module(module: nn.Module) -> bool:
    """A module of torch.ao.nn.quantized (a converted int8 model, trainables.zoo.quantization)."""
    return type(module).__module__.startswith(("torch.ao.nn.quantized", "torch.ao.nn.intrinsic.quantized"))


def _survey_input(shape: tuple[int, ...], device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """Zeros of ``shape`` in ``dtype``; a quantized dtype (an int8 model's input) gets scale 1, zero point 0."""
    if dtype in (torch.quint8, torch.qint8):
        with warnings.catch_warnings():  # torch warns that quantized tensor creation is deprecated
            warnings.filterwarnings("ignore", message=r".*quantized tensor creation functions.*")
            return torch.quantize_per_tensor(torch.zeros(shape, device=device), 1.0, 0, dtype)
    return torch.zeros(shape, device=device, dtype=dtype)


def enumerate_sites(
    model: nn.Module,
    input_shape: Sequence[int],
    dtype: torch.dtype | None = None,
    *,
    input_dtype: torch.dtype | None = None,
    containers: bool = False,
) -> list[Site]:
    """Run one dummy batch of ``input_shape`` (per example: (C, H, W), (T,), ...) through
    ``model`` and list its neuron/weight sites: leaf calls, plus every container call when
    ``containers``. ``input_dtype`` (default ``dtype``) is the input's dtype: an integer
    dtype (token ids) gives no input site. The model's output must be (batch, classes) logits.
    """
    found = survey(model, input_shape, dtype, input_dtype=input_dtype)
    return [s for s in found.sites if containers or not s.container]


@dataclass(frozen=True)
class SkippedCall:
    """A module call that is no neuron site, and why (its output cannot take a fault)."""

    name: str
    call: int
    module_type: str
    reason: str
    container: bool = False


@dataclass(frozen=True)
class ParamSite:
    """One floating tensor of the model (a parameter, or a buffer) as a fault target."""

    index: int
    name: str  # qualified name, as in the state_dict
    module_name: str  # the owning module ('' for the model itself)
    module_type: str
    shape: tuple[int, ...]
    buffer: bool = False

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def call(self) -> int:
        """Always 0: a tensor has no calls (code keyed by (index, name, call) works for every kind)."""
        return 0


@dataclass(frozen=True)
class Survey:
    """Everything one dummy forward pass and the model's tensors tell about its sites."""

    sites: tuple[Site, ...]  # leaf neuron sites in forward order (input first), then container sites
    skipped: tuple[SkippedCall, ...]
    modules: tuple[tuple[str, str, bool], ...]  # (name, type, is_leaf) of every submodule
    calls: dict[str, int] = field(repr=False)  # module name -> calls in one forward pass
    params: tuple[ParamSite, ...] = ()
    non_floating: tuple[tuple[str, str], ...] = ()  # (name, dtype) of tensors that cannot be flipped
    classes: int | None = None  # the width of the model's logits

    @property
    def never_ran(self) -> list[tuple[str, str]]:
        """(name, type) of the leaf modules never called as a module (used functionally, or unused)."""
        return [(n, t) for n, t, leaf in self.modules if leaf and not self.calls.get(n)]

    @property
    def parameter_count(self) -> int:
        return sum(p.numel for p in self.params if not p.buffer)


SURVEY_BATCH = 2
# int8 transformers (demo:vit) concatenate the class token with other quantization parameters:
# torch warns at every forward; a dummy batch of zeros says nothing about accuracy
QUANTIZED_CAT_NOTICE = r".*must share the same quantization parameters.*"


def survey(model: nn.Module, input_shape: Sequence[int], dtype: torch.dtype | None = None, *,
           input_dtype: torch.dtype | None = None) -> Survey:
    """Hook every submodule, run a dummy batch of zeros and list the sites, skipped calls,
    modules and floating tensors of ``model`` (see the module docstring for the numbering)."""
    if isinstance(model, torch.jit.ScriptModule):
        raise ValueError("TorchScript models take no forward hooks, so their sites cannot be injected: "
                         "save a state_dict checkpoint with its architecture instead (file: with 'arch')")
    device, param_dtype = _model_device_dtype(model)
    dtype = dtype or param_dtype
    input_dtype = input_dtype or dtype
    input_shape = tuple(int(d) for d in input_shape)
    floating_input = input_dtype.is_floating_point or input_dtype in (torch.quint8, torch.qint8)
    calls: dict[str, int] = {}
    events: list[tuple[str, int, nn.Module, int | None, tuple[int, ...] | None, str | None]] = []
    modules = [(name, m, not any(True for _ in m.children())) for name, m in model.named_modules()
               if name and not (_is_quantized_module(m) and type(m).__name__.endswith("PackedParams"))]  # int8 weight holders

    def make_hook(name: str):
        def hook(module, _inputs, output):
            call = calls.get(name, 0)
            calls[name] = call + 1
            events.append((name, call, module, *injectable_output(output, SURVEY_BATCH)))

        return hook

    handles = []
    try:
        for name, module, _ in modules:
            handles.append(module.register_forward_hook(make_hook(name)))
        with torch.inference_mode(), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=QUANTIZED_CAT_NOTICE)
            logits = model(_survey_input((SURVEY_BATCH, *input_shape), device, input_dtype))
    finally:
        for handle in handles:
            handle.remove()
    # a causal LM (token ids (B, T) in): (B, T, vocab) next-token logits
    lm = not floating_input and len(input_shape) == 1 and isinstance(logits, torch.Tensor) and logits.dim() == 3
    check_logits(logits, batch=SURVEY_BATCH, tokens=input_shape[0] if lm else None)
    # A module is a leaf site when none of its submodules ran as a module: nn.MultiheadAttention
    # (its out_proj is used functionally) is one, a block whose children ran is a container.
    has_running_child = {name.rsplit(".", 1)[0] if "." in name else "" for name in calls}
    for name in list(has_running_child):
        while "." in name:
            name = name.rsplit(".", 1)[0]
            has_running_child.add(name)
    leaves = [Site(0, INPUT_NAME, 0, INPUT_TYPE, input_shape, None)] if floating_input else []
    first_index = 0 if floating_input else 1  # integer inputs: index 0 (the input) stays unused
    blocks, skipped = [], []
    for name, call, module, output_index, shape, reason in events:
        leaf = name not in has_running_child
        if reason is not None:
            skipped.append(SkippedCall(name, call, type(module).__name__, reason, container=not leaf))
        elif leaf:
            leaves.append(Site(len(leaves) + first_index, name, call, type(module).__name__, shape,
                               _weight_shape(module), output_index))
        else:
            blocks.append((name, call, type(module).__name__, shape, output_index))
    first_block = len(leaves) + first_index
    sites = leaves + [Site(first_block + i, name, call, kind, shape, None, output_index, container=True)
                      for i, (name, call, kind, shape, output_index) in enumerate(blocks)]
    params, non_floating = param_sites(model)
    return Survey(tuple(sites), tuple(skipped), tuple((n, type(m).__name__, leaf) for n, m, leaf in modules), calls,
                  tuple(params), tuple(non_floating), classes=int(logits.shape[-1]))


def injectable_output(output: object, batch: int) -> tuple[int | None, tuple[int, ...] | None, str | None]:
    """Where a fault goes in a module's output: (element index or None for a tensor, per-example
    shape, None), or (None, None, why it cannot take one). A tuple or list takes the fault in
    its first floating tensor (nn.MultiheadAttention: the attention output)."""
    if isinstance(output, torch.Tensor):
        return _batched_tensor(output, batch, None, "its output")
    if isinstance(output, (tuple, list)):
        for i, item in enumerate(output):
            if isinstance(item, torch.Tensor) and item.is_floating_point():
                return _batched_tensor(item, batch, i, f"element {i} of its {type(output).__name__} output")
        held = ", ".join(_describe(item) for item in output) or "nothing"
        return None, None, f"its {type(output).__name__} output holds no floating tensor ({held})"
    return None, None, f"its output is {_describe(output)}, not a tensor, tuple or list"


def _batched_tensor(t: torch.Tensor, batch: int, index: int | None, where: str):
    if not (t.is_floating_point() or t.is_quantized):  # quantized: an int8 model's activations
        return None, None, f"{where} is {_describe(t)}, not floating"
    if t.dim() == 0 or t.shape[0] != batch:
        return None, None, f"{where} has shape {list(t.shape)}: its first dimension is not the batch ({batch})"
    return index, tuple(t.shape[1:]), None


def _describe(value: object) -> str:
    if isinstance(value, torch.Tensor):
        return f"a {str(value.dtype).removeprefix('torch.')} tensor"
    return "None" if value is None else type(value).__name__


def param_sites(model: nn.Module) -> tuple[list[ParamSite], list[tuple[str, str]]]:
    """Every floating tensor of ``model`` as a param site, numbered in state_dict order
    (per module: parameters, then buffers; non-persistent buffers included; a tensor shared
    by two modules once, under its first name), and (name, dtype) of the non-floating ones."""
    seen: set[int] = set()
    sites: list[ParamSite] = []
    non_floating: list[tuple[str, str]] = []
    for module_name, module in model.named_modules():
        owned = [(n, t, False) for n, t in module.named_parameters(recurse=False)]
        owned += [(n, t, True) for n, t in module.named_buffers(recurse=False)]
        for attr, tensor, is_buffer in owned:
            if tensor is None or id(tensor) in seen:
                continue
            seen.add(id(tensor))
            name = f"{module_name}.{attr}" if module_name else attr
            if tensor.is_floating_point():
                sites.append(ParamSite(len(sites), name, module_name, type(module).__name__, tuple(tensor.shape), is_buffer))
            else:
                non_floating.append((name, str(tensor.dtype).removeprefix("torch.")))
    return sites, non_floating


def find_tensor(model: nn.Module, site: ParamSite) -> torch.Tensor:
    """The live tensor behind a param site (a parameter or buffer), by qualified name."""
    try:
        owner = model.get_submodule(site.module_name) if site.module_name else model
    except AttributeError:
        owner = None
    attr = site.name.rsplit(".", 1)[-1]
    tensor = getattr(owner, attr, None) if owner is not None else None
    if not isinstance(tensor, torch.Tensor):
        raise ValueError(f"param site {site.index}: the model has no tensor named {site.name!r}")
    return tensor


def check_logits(logits: object, batch: int, tokens: int | None = None) -> None:
    """Raise ValueError unless ``logits`` is a (batch, classes) floating tensor, or with ``tokens``
    (a causal LM's sequence length) a (batch, tokens, vocab) one."""
    if tokens is not None:
        if not (isinstance(logits, torch.Tensor) and logits.dim() == 3 and tuple(logits.shape[:2]) == (batch, tokens)
                and logits.is_floating_point()):
            shape = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
            raise ValueError(f"a causal LM's output must be (batch, tokens, vocab) float logits; got {shape} "
                             f"for {batch} sequences of {tokens} tokens")
        return
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2 or logits.shape[0] != batch or not logits.is_floating_point():
        shape = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise ValueError(f"model output must be (batch, classes) float logits; got {shape} for a batch of {batch}")


def _model_device_dtype(model: nn.Module) -> tuple[torch.device, torch.dtype]:
    for tensor in list(model.parameters()) + list(model.buffers()):
        if tensor.is_floating_point():
            return tensor.device, tensor.dtype
    return torch.device("cpu"), torch.float32


def parse_index_list(text: str | Iterable[int] | None) -> list[int] | None:
    """'all'/None -> None; '1,3,5-7' or an iterable of ints -> sorted unique list."""
    if text is None:
        return None
    if not isinstance(text, str):
        return sorted({int(i) for i in text})
    text = text.strip()
    if text.lower() in ("", "all"):
        return None
    out: set[int] = set()
    for part in text.split(","):
        part = part.strip()
        try:
            if "-" in part[1:]:
                lo, hi = part.split("-", 1) if not part.startswith("-") else (part, "")
                out.update(range(int(lo), int(hi) + 1))
            else:
                out.add(int(part))
        except ValueError:
            raise ValueError(f"bad layer index {part!r} in {text!r}: use integers, ranges like 2-5, or 'all'") from None
    return sorted(out)


def parse_type_list(text: str | Iterable[str] | None) -> list[str] | None:
    """'all'/None -> None; 'Conv2d,Linear' -> ['Conv2d', 'Linear']."""
    if text is None:
        return None
    names = [t.strip() for t in (text.split(",") if isinstance(text, str) else text) if t.strip()]
    if not names or [n.lower() for n in names] == ["all"]:
        return None
    return names


def select_sites(
    sites: Sequence[Site],
    kind: str,
    types: str | Iterable[str] | None = None,
    indices: str | Iterable[int] | None = None,
    containers: bool = False,
) -> list[Site]:
    """The sites of ``kind`` ('neuron' or 'weight') matching type names and indices.
    Container sites count only with ``containers`` (a list from ``match_modules``).

    Unknown indices or type names raise ValueError listing the valid ones; so does a
    filter that matches nothing.
    """
    if kind not in SITE_KINDS:
        raise ValueError(f"unknown site kind {kind!r}: use one of {', '.join(SITE_KINDS)}")
    if kind == "param":
        raise ValueError("param sites are tensors, not module calls: select them with select_params")
    pool = [s for s in sites if (kind == "neuron" or s.is_weight_site) and (containers or not s.container)]
    type_names = parse_type_list(types)
    index_list = parse_index_list(indices)
    if type_names is not None:
        known = sorted({s.module_type for s in pool})
        unknown = [t for t in type_names if t not in known]
        if unknown:
            raise ValueError(f"unknown {kind} layer type(s) {', '.join(unknown)}; this model has: {', '.join(known)}")
        pool = [s for s in pool if s.module_type in type_names]
    if index_list is not None:
        valid = {s.index for s in pool}
        unknown_idx = [i for i in index_list if i not in valid]
        if unknown_idx:
            raise ValueError(
                f"{kind} site index(es) {', '.join(map(str, unknown_idx))} do not exist"
                f"{' for the selected types' if type_names else ''}; valid: {_ranges(sorted(valid))}"
            )
        pool = [s for s in pool if s.index in index_list]
    if not pool:
        raise ValueError(f"no {kind} sites match the filter")
    return pool


def _ranges(values: list[int]) -> str:
    """[0,1,2,5,7,8] -> '0-2,5,7-8'."""
    runs: list[list[int]] = []
    for v in values:
        if runs and runs[-1][1] == v - 1:
            runs[-1][1] = v
        else:
            runs.append([v, v])
    return ",".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)


def site_table(sites: Sequence[Site]) -> str:
    """The seed's layer summary: Layer #, type, call, weight shape, output shape, name."""
    header = f"{'Layer #':>7}  {'Layer type':>18}  {'call':>4}  {'Weight shape':>20}  {'Output shape':>20}  name"
    lines = [header, "-" * len(header)]
    for s in sites:
        weight = str(list(s.weight_shape)) if s.weight_shape is not None else "-"
        note = "".join([f"  [output element {s.output_index}]" if s.output_index is not None else "",
                        "  [container]" if s.container else ""])
        lines.append(
            f"{s.index:>7}  {s.module_type:>18}  {s.call:>4}  {weight:>20}  {str(list(s.output_shape)):>20}  {s.name}{note}"
        )
    return "\n".join(lines)


def param_table(params: Sequence[ParamSite]) -> str:
    """Param sites: Param #, owner type, shape, elements, qualified name ('[buffer]' marked)."""
    width = max([len("Owner type"), *(len(p.module_type) for p in params)])
    header = f"{'Param #':>7}  {'Owner type':>{width}}  {'Shape':>20}  {'Elements':>11}  name"
    lines = [header, "-" * len(header)]
    for p in params:
        lines.append(f"{p.index:>7}  {p.module_type:>{width}}  {str(list(p.shape)):>20}  {p.numel:>11,}  {p.name}"
                     + ("  [buffer]" if p.buffer else ""))
    return "\n".join(lines)


def find_module(model: nn.Module, site: Site) -> nn.Module:
    """The module behind a (non-input) site, by qualified name."""
    try:
        return model.get_submodule(site.name)
    except AttributeError:
        raise ValueError(f"site {site.index}: the model has no module named {site.name!r}") from None


# ---------------------------------------------------------------- names, params, modules, coverage


def parse_patterns(text: str | Iterable[str] | None) -> list[str] | None:
    """'all'/None -> None; 'a.*,*.bias' -> globs; an item starting with 're:' is a regular
    expression that runs to the end of the text (so it may hold commas: put it last)."""
    if text is None:
        return None
    if not isinstance(text, str):
        items = [str(t).strip() for t in text if str(t).strip()]
    else:
        items, rest = [], text
        while rest:
            item, _, after = rest.partition(",")
            if item.strip().startswith(REGEX_PREFIX):
                items.append(rest.strip())
                break
            items.append(item.strip())
            rest = after
        items = [i for i in items if i]
    if not items or [i.lower() for i in items] == ["all"]:
        return None
    return items


def name_matcher(pattern: str):
    """A predicate on qualified names: fnmatch glob (case-sensitive; '*' crosses dots), or
    a regular expression matching the whole name after 're:'."""
    if pattern.startswith(REGEX_PREFIX):
        try:
            regex = re.compile(pattern[len(REGEX_PREFIX):])
        except re.error as exc:
            raise ValueError(f"bad regular expression {pattern!r}: {exc}") from None
        return lambda name: regex.fullmatch(name) is not None
    return lambda name: fnmatch.fnmatchcase(name, pattern)


def _listing(items: Sequence[str], hint: str = "") -> str:
    shown = ", ".join(items[:LIST_LIMIT])
    more = len(items) - LIST_LIMIT
    return shown + (f", ... and {more} more{hint}" if more > 0 else "") if items else "none"


def select_params(
    params: Sequence[ParamSite],
    names: str | Iterable[str] | None = None,
    types: str | Iterable[str] | None = None,
    buffers: bool = False,
    non_floating: Sequence[tuple[str, str]] = (),
    strict_types: bool = True,
) -> list[ParamSite]:
    """Param sites whose names match any of the ``names`` patterns and whose owning module's
    type is one of ``types``; buffers only with ``buffers``. A pattern that matches nothing,
    only non-floating tensors, or only buffers without ``buffers`` raises ValueError listing
    what exists; so does an owner type unknown to this model (when ``strict_types``)."""
    pool = [p for p in params if buffers or not p.buffer]
    patterns = parse_patterns(names)
    what = "parameter or buffer" if buffers else "parameter"
    if patterns is not None:
        chosen: set[int] = set()
        for pattern in patterns:
            match = name_matcher(pattern)
            hits = [p.index for p in pool if match(p.name)]
            if not hits:
                integers = [f"{n} ({d})" for n, d in non_floating if match(n)]
                buffer_hits = [p.name for p in params if p.buffer and match(p.name)]
                if integers:
                    raise ValueError(f"{pattern!r} matches only tensors that are not floating and cannot be flipped: "
                                     f"{_listing(integers)}")
                if buffer_hits:
                    raise ValueError(f"{pattern!r} matches only buffers ({_listing(buffer_hits)}): add --buffers to flip them")
                raise ValueError(f"{pattern!r} matches no {what}; this model has: "
                                 f"{_listing([p.name for p in pool], ' (python -m campaign layers --sites param lists them)')}")
            chosen.update(hits)
        pool = [p for p in pool if p.index in chosen]
    type_names = parse_type_list(types)
    if type_names is not None:
        known = sorted({p.module_type for p in pool})
        unknown = [t for t in type_names if t not in known]
        kept = [p for p in pool if p.module_type in type_names]
        if (unknown and strict_types) or not kept:
            raise ValueError(f"no {what}{' matching the names' if patterns else ''} is owned by layer type(s) "
                             f"{', '.join(unknown or type_names)}; their owners are: {', '.join(known)}")
        pool = kept
    if not pool:
        raise ValueError(f"this model has no floating {what}")
    return pool


def match_modules(found: Survey, modules: str | Iterable[str] | None) -> list[Site]:
    """The neuron sites (leaf or container calls) of the modules that ``modules`` names: a
    type name (exact), a glob or a 're:' regular expression on qualified names; 'all' or None
    is every module. A pattern that matches no module, only modules that never run, or only
    calls that cannot take a fault raises ValueError listing what exists."""
    patterns = parse_patterns(modules) or ["*"]
    running = {s.name for s in found.sites if s.index != 0}
    chosen: set[str] = set()
    for pattern in patterns:
        match = name_matcher(pattern)
        hits = [(n, t) for n, t, _ in found.modules if match(n) or (not pattern.startswith(REGEX_PREFIX) and pattern == t)]
        if not hits:
            types = sorted({t for _, t, _ in found.modules})
            tops = [n for n, _, _ in found.modules if "." not in n]
            raise ValueError(f"{pattern!r} matches no module name or type; module types: {', '.join(types)}; "
                             f"top-level modules: {_listing(tops)}")
        live = [n for n, _ in hits if n in running]
        if not live:
            never = [f"{n} ({t})" for n, t in hits if not found.calls.get(n)]
            if never:
                raise ValueError(f"{pattern!r} matches only modules that never run as a module in a forward pass "
                                 f"(their parameters are param sites): {_listing(never)}")
            why = [f"{c.name} call {c.call}: {c.reason}" for c in found.skipped if (c.name, c.module_type) in hits]
            raise ValueError(f"{pattern!r} matches only module calls that cannot take a fault: {_listing(why)}")
        chosen.update(live)
    return [s for s in found.sites if s.name in chosen and s.index != 0]


def select_campaign_sites(
    found: Survey,
    kinds: Sequence[str],
    layers: str | Iterable[int] | None = None,
    layer_types: str | Iterable[str] | None = None,
    params: str | Iterable[str] | None = None,
    modules: str | Iterable[str] | None = None,
    buffers: bool = False,
) -> tuple[dict[str, list], list[str]]:
    """The sites of each kind a campaign's filters select, and one 'field: why' line per problem.

    ``layers`` (indices) and ``layer_types`` select neuron and weight sites; ``modules``
    replaces the neuron pool by the calls of the named modules (containers included);
    ``params``, ``layer_types`` (the owning module's type) and ``buffers`` select param
    sites. With neuron and weight (no ``modules``) the weight sites are the selected
    layers that have a weight, as before.
    """
    chosen: dict[str, list] = {}
    problems: list[str] = []
    leaf_kinds = [k for k in kinds if k in ("neuron", "weight")]
    if parse_patterns(params) is not None and "param" not in kinds:
        problems.append("params: names param sites, but --sites has no param: add param to --sites")
    if buffers and "param" not in kinds:
        problems.append("buffers: buffers are param sites, but --sites has no param: add param to --sites")
    if modules is not None and "neuron" not in kinds:
        problems.append("modules: module outputs are neuron sites, but --sites has no neuron: add neuron to --sites")
    try:
        indices = parse_index_list(layers)
    except ValueError as exc:
        return chosen, problems + [f"layers: {exc}"]
    if indices is not None and not leaf_kinds and "qparam" not in kinds:  # qparam: the selected layers' (campaign.spec)
        problems.append("layers: indices select neuron and weight sites; select param sites by name with --params")
    if "neuron" in kinds:
        try:
            pool = match_modules(found, modules) if modules is not None else list(found.sites)
        except ValueError as exc:
            problems.append(f"modules: {exc}")
        else:
            try:
                chosen["neuron"] = select_sites(pool, "neuron", layer_types, indices, containers=modules is not None)
            except ValueError as exc:
                problems.append(f"layers: {exc}")
    if "weight" in kinds:
        if "neuron" in kinds and modules is None:
            if "neuron" in chosen:
                chosen["weight"] = [s for s in chosen["neuron"] if s.is_weight_site]
                if not chosen["weight"]:
                    problems.append("layers: none of the selected layers has a weight: drop weight from --sites")
        else:
            try:
                chosen["weight"] = select_sites(found.sites, "weight", layer_types, indices)
            except ValueError as exc:
                problems.append(f"layers: {exc}")
    if "param" in kinds:
        try:
            chosen["param"] = select_params(found.params, params, layer_types, buffers, found.non_floating,
                                            strict_types=not leaf_kinds)
        except ValueError as exc:
            problems.append(f"params: {exc}")
    return chosen, problems


def coverage_lines(model: nn.Module, found: Survey, chosen: dict[str, list], show_containers: bool = False) -> list[str]:
    """What the selected weight/param sites cover of the model's parameters, the leaf modules
    that never ran as a module, and the calls that are no sites and why."""
    packed = [m for m in model.modules() if _is_quantized_module(m) and _weight_shape(m) is not None]
    total = found.parameter_count + sum(math.prod(_weight_shape(m)) for m in packed)  # int8: packed weights too
    pct = lambda n: f"{100 * n / total:.1f}%" if total else "-"  # noqa: E731
    lines = []
    if "weight" in chosen:
        modules = [find_module(model, s) for s in chosen["weight"]]
        weights = {id(m.weight) if isinstance(m.weight, torch.Tensor) else id(m): math.prod(_weight_shape(m)) for m in modules}
        covered = sum(weights.values())
        lines.append(f"weight sites cover {covered:,} of {total:,} parameters ({pct(covered)})")
    if "param" in chosen:
        covered = sum(p.numel for p in chosen["param"] if not p.buffer)
        buffers = sum(p.numel for p in chosen["param"] if p.buffer)
        lines.append(f"param sites cover {covered:,} of {total:,} parameters ({pct(covered)})"
                     + (f", and {buffers:,} buffer elements" if buffers else ""))
    else:
        lines.append(f"param sites (--sites param) would cover {total:,} of {total:,} parameters")
    never = [f"{n} ({t})" for n, t in found.never_ran]
    lines.append(f"leaf modules that never ran as a module ({len(never)}; not neuron or weight sites, their tensors "
                 f"are param sites): {_listing(never)}" if never else "leaf modules that never ran as a module: none")
    skipped = [c for c in found.skipped if show_containers or not c.container]
    if skipped:
        lines.append(f"calls that are no neuron sites ({len(skipped)}): "
                     + _listing([f"{c.name} call {c.call} ({c.module_type}): {c.reason}" for c in skipped]))
    else:
        lines.append("calls that are no neuron sites: none")
    return lines


def float_outputs(model: nn.Module, sites: Sequence[Site], input_shape: Sequence[int], input_dtype: torch.dtype) -> list[Site]:
    """The ``sites`` of an int8 model whose injected output element is not quantized (a float
    module, e.g. nn.MultiheadAttention, left unconverted): one dummy forward, hooked."""
    by_module = {}
    for s in sites:
        by_module.setdefault(s.name, {})[s.call] = s
    modules = dict(model.named_modules())
    calls: dict[str, int] = {}
    floating: list[Site] = []

    def make_hook(name: str):
        def hook(_module, _inputs, output):
            call = calls.get(name, 0)
            calls[name] = call + 1
            site = by_module[name].get(call)
            if site is not None:
                element = output if site.output_index is None else output[site.output_index]
                if isinstance(element, torch.Tensor) and not element.is_quantized:
                    floating.append(site)

        return hook

    handles = []
    try:
        for name in by_module:
            if name in modules and name:
                handles.append(modules[name].register_forward_hook(make_hook(name)))
        device, _ = _model_device_dtype(model)
        with torch.inference_mode(), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=QUANTIZED_CAT_NOTICE)
            model(_survey_input((SURVEY_BATCH, *input_shape), device, input_dtype))
    finally:
        for handle in handles:
            handle.remove()
    return sorted(set(floating), key=lambda s: s.index)
