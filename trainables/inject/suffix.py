"""Prefix reuse: a fault at a site changes nothing before it, so the fault-free prefix of the
forward pass is computed once per batch and cached, and each trial runs only the suffix.

The model is traced with ``torch.fx`` (leaf modules stay calls, so a site maps to the
``site.call``-th ``call_module`` node of its module). The cut carries every value live
across it (residual connections, sizes), not only the site's output:

- neuron site: the cut is just after the site's node; the fault goes into the cached site
  output (the engine's own flip function, so positions and memory format are the same);
- weight (or parameter) site: the cut is just before the first node that uses the tensor.

The split is verified once per site before it is used: the prefix must call the site's
module exactly ``site.call + 1`` times and its last output must be the cached value, and the
clean suffix must give the full forward pass's logits bit for bit. Anything that cannot be
traced, mapped or verified runs the full forward pass (``path`` "full") with a reason.
Cached tensors the suffix could modify in place (an inplace ReLU on a residual input, say)
are cloned before each suffix run; nothing else is copied.

The ladder: a worker that runs sites in increasing forward order (campaigns are site-major)
fills the next site's cache from the previous site's cached batches through a *bridge* (the
graph's nodes between the two cuts) instead of from the images, so all its prefixes cost
about one forward pass. Each old batch is freed as it is used; the bridge is checked once per
pair of sites against the direct prefix, bit for bit, and anything else (a step backwards,
another graph, a mismatch) computes the prefix from the images as before.
"""
from __future__ import annotations

import operator
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx, nn

from trainables.inject.sites import find_tensor

# Modules whose output is a new tensor (unless built with inplace=True).
_FRESH_MODULES = (
    nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d, nn.Linear,
    nn.Bilinear, nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.LayerNorm, nn.GroupNorm, nn.InstanceNorm2d,
    nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d, nn.AdaptiveAvgPool1d,
    nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d, nn.Embedding, nn.Softmax, nn.LogSoftmax, nn.GELU, nn.Sigmoid,
    nn.Tanh, nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.Hardswish, nn.Hardsigmoid, nn.SiLU, nn.ELU, nn.Hardtanh,
    nn.MultiheadAttention, nn.Upsample,
)  # fmt: skip
_FRESH_FUNCTIONS = {
    operator.add, operator.sub, operator.mul, operator.truediv, operator.matmul, operator.neg, torch.add, torch.sub,
    torch.mul, torch.cat, torch.stack, torch.matmul, torch.bmm, torch.relu, torch.sigmoid, torch.tanh,
    torch.softmax, torch.mean, torch.sum, nn.functional.relu, nn.functional.gelu, nn.functional.softmax,
    nn.functional.linear, nn.functional.conv2d, nn.functional.layer_norm, nn.functional.adaptive_avg_pool2d,
    nn.functional.avg_pool2d, nn.functional.max_pool2d, nn.functional.relu6, nn.functional.hardswish,
    nn.functional.silu, nn.functional.scaled_dot_product_attention,
}  # fmt: skip
_FRESH_METHODS = {"add", "sub", "mul", "div", "matmul", "softmax", "mean", "sum", "relu", "sigmoid", "tanh", "clone",
                  "float", "half", "bfloat16", "pow", "sqrt", "exp", "neg"}
_INPLACE_OPERATORS = {operator.iadd, operator.isub, operator.imul, operator.itruediv, operator.ifloordiv,
                      operator.imod, operator.ipow, operator.iand, operator.ior, operator.ixor, operator.ilshift,
                      operator.irshift, operator.imatmul, operator.setitem}


class _LeafTracer(fx.Tracer):
    """Every module without children is a leaf (a site is a call of one), plus ``extra``."""

    def __init__(self, extra: Sequence[str] = ()) -> None:
        super().__init__()
        self.extra = set(extra)

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return (module_qualified_name in self.extra or next(iter(m.children()), None) is None
                or super().is_leaf_module(m, module_qualified_name))


def trace(model: nn.Module, extra_leaves: Sequence[str] = ()) -> fx.GraphModule:
    """The model as an fx graph whose ``call_module`` nodes are its leaf module calls."""
    tracer = _LeafTracer(extra_leaves)
    graph = tracer.trace(model)
    return fx.GraphModule(tracer.root, graph, type(model).__name__)


def _mutates(node: fx.Node, gm: fx.GraphModule) -> list[fx.Node]:
    """The nodes whose tensors ``node`` may modify in place."""
    args = [a for a in node.args if isinstance(a, fx.Node)]
    if node.op == "call_module":
        module = gm.get_submodule(node.target)
        if getattr(module, "inplace", False) is True:
            return args[:1]
        return [] if type(module).__module__.startswith("torch.nn") else args  # a custom leaf: anything
    if node.op == "call_function":
        name = getattr(node.target, "__name__", "")
        if node.target in _INPLACE_OPERATORS or (name.endswith("_") and not name.startswith("_")) \
                or node.kwargs.get("inplace") is True or "out" in node.kwargs:
            return args[:1]
    if node.op == "call_method":
        name = str(node.target)
        if (name.endswith("_") and not name.endswith("__")) or name in ("__setitem__", "__iadd__", "__imul__"):
            return args[:1]
    return []


def _alias_sources(node: fx.Node, gm: fx.GraphModule) -> list[fx.Node]:
    """The input nodes ``node``'s output may share memory with (empty: a new tensor)."""
    args = [a for a in node.args if isinstance(a, fx.Node)]
    if node.op == "call_module":
        module = gm.get_submodule(node.target)
        if isinstance(module, _FRESH_MODULES) and getattr(module, "inplace", False) is not True:
            return []
        return args
    if node.op == "call_function" and node.target in _FRESH_FUNCTIONS and node.kwargs.get("inplace") is not True:
        return []
    if node.op == "call_method" and node.target in _FRESH_METHODS:
        return []
    return args if node.op in ("call_function", "call_method") else []


@dataclass
class Split:
    """A model cut in two: ``prefix(images) -> live values``, ``suffix(*live) -> logits``."""

    prefix: fx.GraphModule
    suffix: fx.GraphModule
    live: list[str]  # node names of the values carried across the cut
    fault_slot: int | None  # position in ``live`` of the site's output (neuron cut)
    clone_slots: tuple[int, ...]  # live values the suffix may modify in place: cloned per run
    param_slots: tuple[int, ...]  # live values that are parameters or inputs (no cache memory)
    graph: fx.GraphModule | None = field(default=None, repr=False)  # the traced model it was cut from
    cut: int = -1  # the position in ``graph``'s node list where the suffix starts


def split_at(gm: fx.GraphModule, cut: int, fault_node: fx.Node | None) -> Split:
    """Cut ``gm``'s node list before position ``cut``; ``fault_node`` (in the prefix) must be
    carried even where nothing after the cut reads it."""
    nodes = list(gm.graph.nodes)
    before, after = nodes[:cut], nodes[cut:]
    in_prefix = set(before)
    live = [n for n in before if n is fault_node or any(u not in in_prefix for u in n.users)]
    prefix_graph, env = fx.Graph(), {}
    for node in before:
        env[node] = prefix_graph.node_copy(node, lambda n: env[n])
    prefix_graph.output(tuple(env[n] for n in live))
    suffix_graph, env = fx.Graph(), {}
    for node in live:
        env[node] = suffix_graph.placeholder(node.name)
    for node in after:
        env[node] = suffix_graph.node_copy(node, lambda n: env[n])
    slot = {n: i for i, n in enumerate(live)}
    params = tuple(i for i, n in enumerate(live) if n.op in ("placeholder", "get_attr"))
    return Split(
        prefix=fx.GraphModule(gm, prefix_graph, "Prefix"),
        suffix=fx.GraphModule(gm, suffix_graph, "Suffix"),
        live=[n.name for n in live],
        fault_slot=slot[fault_node] if fault_node is not None else None,
        clone_slots=tuple(sorted(_written(after, live, gm, fault_node) - set(params))),  # the faulted value is a fresh copy each run
        param_slots=params,
        graph=gm,
        cut=cut,
    )


def _written(nodes: Sequence[fx.Node], live: Sequence[fx.Node], gm: fx.GraphModule, exempt: fx.Node | None) -> set[int]:
    """Positions in ``live`` of the values that an in-place op among ``nodes`` may reach
    through aliases (``exempt`` is never counted)."""
    slot = {n: i for i, n in enumerate(live)}
    written: set[int] = set()
    for node in nodes:
        stack, seen = list(_mutates(node, gm)), set()
        while stack:
            n = stack.pop()
            if n in seen:
                continue
            seen.add(n)
            if n in slot:
                if n is not exempt:
                    written.add(slot[n])
                    stack.extend(_alias_sources(n, gm))  # its aliases before the cut share its memory
                continue
            stack.extend(_alias_sources(n, gm))
    return written


@dataclass
class Bridge:
    """The nodes of one traced graph between two cuts: the live values at the first cut ->
    the live values at the second (values live across both pass through)."""

    module: fx.GraphModule
    clone_slots: tuple[int, ...]  # inputs it may modify in place: cloned, the old cache stays golden

    def __call__(self, values: Sequence[Any]) -> tuple:
        values = list(values)
        for i in self.clone_slots:
            values[i] = _clone(values[i])
        return tuple(self.module(*values))


def bridge_between(lower: Split, upper: Split) -> Bridge:
    """The bridge from ``lower``'s cut up to ``upper``'s (both cut from the same graph, lower
    first; at the same cut, as a weight and its bias, it only passes values through).
    Parameters read between the cuts stay get_attr nodes, as in split_at."""
    gm = lower.graph
    if gm is None or upper.graph is not gm or not lower.cut <= upper.cut:
        raise ValueError("the cuts are not in increasing order on one graph")
    nodes = list(gm.graph.nodes)
    by_name = {n.name: n for n in nodes}
    inputs = [by_name[name] for name in lower.live]
    graph, env = fx.Graph(), {}
    for node in inputs:
        env[node] = graph.placeholder(node.name)
    between = nodes[lower.cut : upper.cut]
    for node in between:
        env[node] = graph.node_copy(node, lambda n: env[n])
    graph.output(tuple(env[by_name[name]] for name in upper.live))
    params = {i for i, n in enumerate(inputs) if n.op in ("placeholder", "get_attr")}
    return Bridge(fx.GraphModule(gm, graph, "Bridge"), tuple(sorted(_written(between, inputs, gm, None) - params)))


def site_node(gm: fx.GraphModule, name: str, call: int) -> fx.Node | None:
    """The ``call``-th ``call_module`` node of module ``name``, or None."""
    calls = [n for n in gm.graph.nodes if n.op == "call_module" and n.target == name]
    return calls[call] if call < len(calls) else None


def first_use(gm: fx.GraphModule, tensor: torch.Tensor) -> int | None:
    """Position of the first node that reads ``tensor`` (a module owning it, or get_attr)."""
    for i, node in enumerate(gm.graph.nodes):
        if node.op == "call_module":
            module = gm.get_submodule(node.target)
            if any(_same_memory(p, tensor) for p in module.parameters()) or any(_same_memory(b, tensor) for b in module.buffers()):
                return i
        elif node.op == "get_attr":
            owner, _, attr = str(node.target).rpartition(".")
            value = getattr(gm.get_submodule(owner) if owner else gm, attr, None)
            if isinstance(value, torch.Tensor) and _same_memory(value, tensor):
                return i
    return None


def _same_memory(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether two tensors are views of the same memory (a parameter and its detached view)."""
    return a.data_ptr() == b.data_ptr() and a.shape == b.shape and a.device == b.device


def _nbytes(values: Sequence[Any]) -> int:
    """Bytes of the distinct storages behind the tensors in ``values`` (tuples included)."""
    seen: dict[int, int] = {}
    for v in values:
        for t in (v if isinstance(v, (tuple, list)) else (v,)):
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()
                seen[storage.data_ptr()] = storage.nbytes()
    return sum(seen.values())


def _clone(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.clone()
    if isinstance(value, tuple):
        return tuple(_clone(v) for v in value)
    return value


def default_budget_mb(device: torch.device) -> float:
    """A quarter of the free memory of ``device`` (host RAM for the CPU)."""
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return free / 4 / 2**20
    try:
        with open("/proc/meminfo") as f:
            info = dict(line.split(":", 1) for line in f)
        return int(info["MemAvailable"].split()[0]) / 4 / 1024
    except (OSError, KeyError, ValueError):
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 4 / 2**20


def check_budget(value: object) -> float | None:
    """None (automatic) or a positive size in MiB; ValueError otherwise."""
    if value is None:
        return None
    try:
        mb = float(value)
    except (TypeError, ValueError):
        mb = float("nan")
    if isinstance(value, bool) or not mb > 0 or mb == float("inf"):
        raise ValueError(f"prefix_cache_mb must be a positive size in MiB, got {value!r}")
    return mb


@dataclass
class PrefixStats:
    """How a worker's cached prefixes were filled (for tests and debugging)."""

    from_images: int = 0  # batches whose prefix ran on the images
    bridged: int = 0  # batches filled from the previous site's cache through a bridge


@dataclass
class Runner:
    """The verified split of one (site, kind) and its golden-activation cache, by batch."""

    split: Split
    images: torch.Tensor
    budget: int  # bytes
    flip: Callable[[Any, Any], Any] | None  # the engine's flip, for neuron cuts
    cache: dict[tuple[int, int], tuple] = field(default_factory=dict)
    used: int = 0
    hits: int = 0
    misses: int = 0
    stats: PrefixStats = field(default_factory=PrefixStats, repr=False)

    def live(self, lo: int, hi: int) -> tuple:
        """The golden values at the cut for images lo..hi-1 (absolute), cached within budget."""
        key = (lo, hi)
        values = self.cache.get(key)
        if values is not None:
            self.hits += 1
            return values
        self.misses += 1
        self.stats.from_images += 1
        values = tuple(self.split.prefix(self.images[lo:hi]))
        self.store(key, values)
        return values

    def size(self, values: tuple) -> int:
        return _nbytes([v for i, v in enumerate(values) if i not in self.split.param_slots])

    def store(self, key: tuple[int, int], values: tuple) -> bool:
        """Cache ``values`` under ``key`` if the budget allows."""
        size = self.size(values)
        if self.used + size > self.budget:
            return False
        self.cache[key] = values
        self.used += size
        return True

    def pop(self, key: tuple[int, int] | None = None) -> tuple:
        """Remove and return the batch ``key`` (None: the last cached) from the cache."""
        values = self.cache.pop(key) if key is not None else self.cache.popitem()[1]
        self.used -= self.size(values)
        return values

    def drop(self) -> None:
        self.cache.clear()
        self.used = 0

    def logits(self, lo: int, hi: int, faults: Any = None) -> torch.Tensor:
        """The suffix on the cached values of lo..hi-1, with ``faults`` flipped into the site
        output for a neuron cut (weight faults are already in the model)."""
        values = list(self.live(lo, hi))
        for i in self.split.clone_slots:
            values[i] = _clone(values[i])
        slot = self.split.fault_slot
        if slot is not None:  # the flip copies; a clean run copies too (the suffix may write to it)
            values[slot] = self.flip(values[slot], faults) if faults is not None else _clone(values[slot])
        return self.split.suffix(*values)


@dataclass
class PrefixState:
    """Per-workbench state: the traced graph (once per model) and the runner of the site in hand."""

    budget_mb: float | None
    traced: fx.GraphModule | None = None
    trace_error: str | None = None
    current: tuple | None = None
    runner: Runner | None = None
    reasons: dict[tuple, str] = field(default_factory=dict)  # why a (site, kind) runs the full pass
    ladder: bool = True  # fill a later site's cache from the previous site's (see the module docstring)
    bridges: dict[tuple, Bridge] = field(default_factory=dict, repr=False)  # checked, by (lower key, upper key)
    ladder_reasons: dict[tuple, str] = field(default_factory=dict)  # why a pair of keys computes from the images
    stats: PrefixStats = field(default_factory=PrefixStats)


def runner_for(state: PrefixState, model: nn.Module, images: torch.Tensor, site, kind: str, tensor: torch.Tensor | None,
               flip: Callable, probe: tuple[int, int], device: torch.device) -> Runner | None:
    """The runner for ``site`` (kind "neuron", or a weight/param kind with its ``tensor``), or
    None where the full forward pass runs (``state.reasons`` says why). One site's cache per
    worker: the previous site's is dropped, or emptied into this one's (the ladder)."""
    key = (site.index, site.name, site.call, kind)
    if state.current == key:
        return state.runner
    previous = (state.current, state.runner) if state.runner is not None else None
    state.current, state.runner = key, None
    if key in state.reasons:
        return None
    runner, reason = _build(state, model, images, site, kind, tensor, flip, probe, device, previous)
    if previous is not None:
        previous[1].drop()  # what the ladder did not move is freed now
    if runner is None:
        state.reasons[key] = reason
    state.runner = runner
    return runner


def _build(state: PrefixState, model, images, site, kind, tensor, flip, probe, device,
           previous: tuple[tuple, Runner] | None = None) -> tuple[Runner | None, str]:
    if kind == "neuron" and site.index == 0:
        return None, "the input site has no prefix"
    try:
        gm = _graph_for(state, model, site, kind)
    except Exception as exc:  # noqa: BLE001 - any tracing failure means: run the full pass
        return None, f"torch.fx cannot trace {type(model).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__}"
    if kind == "neuron":
        node = site_node(gm, site.name, site.call)
        if node is None:
            return None, f"call {site.call} of {site.name} is not a module call in the traced graph"
        cut, fault = list(gm.graph.nodes).index(node) + 1, node
    else:
        cut, fault = first_use(gm, tensor), None
        if cut is None:
            return None, f"no node of the traced graph reads the weight of {site.name}"
    if not any(n.op not in ("placeholder", "get_attr") for n in list(gm.graph.nodes)[:cut]):
        return None, "the cut is at the input: nothing to reuse"
    lower = previous[1] if previous is not None else None
    if lower is not None and not (state.ladder and lower.split.graph is gm and lower.images is images
                                  and lower.split.cut <= cut and lower.cache):
        lower.drop()  # not a step up this graph (or level): freed before this site's prefix runs
        lower = None
    split = split_at(gm, cut, fault)
    if lower is not None:  # the free memory now counts the old cache: keep its budget
        budget = lower.budget
    else:
        budget = int((state.budget_mb if state.budget_mb is not None else default_budget_mb(device)) * 2**20)
    runner = Runner(split, images, budget, flip, stats=state.stats)
    problem = _verify(runner, model, site, kind, probe)
    if problem:
        return None, problem
    if lower is not None:
        _climb(state, (previous[0], (site.index, site.name, site.call, kind)), lower, runner, probe)
    return runner, ""


def _graph_for(state: PrefixState, model: nn.Module, site, kind: str) -> fx.GraphModule:
    """The model's shared traced graph, or for a neuron site on a module with children that
    it does not call as a node (a container), a graph traced with that module as a leaf."""
    if kind != "neuron" or _is_leaf(model, site.name):
        return _traced(state, model)
    try:
        shared = _traced(state, model)
    except Exception:  # noqa: BLE001 - the module as a leaf may hide what cannot be traced
        shared = None
    if shared is not None and site_node(shared, site.name, site.call) is not None:
        return shared  # a torch.nn module with children (MultiheadAttention) is already one node
    return trace(model, (site.name,))


def _climb(state: PrefixState, pair: tuple, lower: Runner, upper: Runner, probe: tuple[int, int]) -> None:
    """Fill ``upper``'s cache from ``lower``'s through the bridge between their cuts, freeing
    each old batch as it is used and keeping both caches together within ``upper``'s budget
    (old batches that do not fit are computed from the images later). The bridge is checked
    once per pair on one batch against the direct prefix; on any mismatch or error, nothing
    is moved."""
    if pair in state.ladder_reasons:
        return
    try:
        bridge = state.bridges.get(pair)
        if bridge is None:
            bridge = bridge_between(lower.split, upper.split)
            key = probe if probe in lower.cache else next(iter(lower.cache))
            direct = upper.cache.get(key) or upper.live(*key)  # the probe batch: cached by the verification
            problem = _differs(bridge(lower.pop(key)), direct)
            if problem:
                state.ladder_reasons[pair] = f"the bridge does not reproduce the prefix: {problem}"
                return
            state.bridges[pair] = bridge
        for key in list(lower.cache):
            while lower.cache and lower.used + upper.used > upper.budget:
                lower.pop()  # the last old batches make room: computed from the images when needed
            if key not in lower.cache:
                continue
            values = lower.pop(key)
            if key not in upper.cache and upper.store(key, bridge(values)):
                state.stats.bridged += 1
            del values
    except Exception as exc:  # noqa: BLE001 - the ladder is only a shortcut: the images remain
        state.ladder_reasons[pair] = f"{type(exc).__name__}: {exc}"
    finally:
        lower.drop()


def _differs(got: Sequence[Any], want: Sequence[Any]) -> str:
    """'' when two tuples of live values are equal bit for bit, else the first difference."""
    if len(got) != len(want):
        return f"{len(got)} values, not {len(want)}"
    for i, (a, b) in enumerate(zip(got, want)):
        if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)) and type(a) is type(b):
            problem = _differs(a, b)
        elif isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
            problem = "" if _same_tensor(a, b) else "tensors differ"
        else:
            problem = "" if type(a) is type(b) and a == b else "values differ"
        if problem:
            return f"value {i}: {problem}"
    return ""


def _same_tensor(a: torch.Tensor, b: torch.Tensor) -> bool:
    if (a.shape, a.dtype, a.device, a.layout, a.is_quantized) != (b.shape, b.dtype, b.device, b.layout, b.is_quantized):
        return False
    if a.layout != torch.strided or a.stride() != b.stride():
        return False
    if a.is_quantized:
        return a.qscheme() == b.qscheme() and torch.equal(a.dequantize(), b.dequantize()) \
            and torch.equal(a.int_repr(), b.int_repr())
    if a.dtype.is_floating_point or a.dtype.is_complex:
        return torch.equal(_bits(a), _bits(b))
    return torch.equal(a, b)


def _is_leaf(model: nn.Module, name: str) -> bool:
    try:
        return next(iter(model.get_submodule(name).children()), None) is None
    except AttributeError:
        return False


def _traced(state: PrefixState, model: nn.Module) -> fx.GraphModule:
    if state.traced is None:
        if state.trace_error is not None:
            raise RuntimeError(state.trace_error)
        try:
            state.traced = trace(model)
        except Exception as exc:
            state.trace_error = str(exc) or type(exc).__name__
            raise
    return state.traced


def _verify(runner: Runner, model: nn.Module, site, kind: str, probe: tuple[int, int]) -> str:
    """'' when the split reproduces the model on the first batch (see the module docstring)."""
    lo, hi = probe
    outputs: list = []
    handle = None
    if kind == "neuron":
        handle = model.get_submodule(site.name).register_forward_hook(lambda _m, _i, out: outputs.append(out))
    try:
        values = runner.live(lo, hi)
    finally:
        if handle is not None:
            handle.remove()
    if kind == "neuron" and (len(outputs) != site.call + 1 or outputs[-1] is not values[runner.split.fault_slot]):
        return f"the traced prefix does not end with call {site.call} of {site.name}"
    clean = runner.logits(lo, hi)
    full = model(runner.images[lo:hi])
    if clean.shape != full.shape or clean.dtype != full.dtype or not torch.equal(_bits(clean), _bits(full)):
        return "the traced split does not reproduce the forward pass bit for bit"
    return ""


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view({1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


SILENT_REASONS = ("the input site has no prefix", "the cut is at the input: nothing to reuse")


def site_tensor(model: nn.Module, site, kind: str) -> torch.Tensor | None:
    """The tensor a weight or parameter fault flips (None for neuron sites or when unknown)."""
    if kind == "neuron":
        return None
    try:
        return model.get_submodule(site.name).weight if kind == "weight" else find_tensor(model, site)
    except (AttributeError, ValueError):
        return None


def fallback_reasons(model: nn.Module, chosen: Sequence[tuple[str, Any]], images: torch.Tensor) -> dict[tuple[str, str], list[str]]:
    """(kind, reason) -> the sites ('index name#call') among ``chosen`` (kind, site) pairs
    that will run the full forward pass, checked on ``images`` (a couple are enough).
    Sites with nothing to reuse (the input) are not listed: they lose nothing."""
    state = PrefixState(budget_mb=None)
    out: dict[tuple[str, str], list[str]] = {}
    device = images.device
    with torch.inference_mode():
        for kind, site in chosen:
            runner = None
            tensor = site_tensor(model, site, kind)
            if kind != "neuron" and tensor is None:
                reason = f"no tensor found for {kind} site {site.name}"
            else:
                runner = runner_for(state, model, images, site, kind, tensor, _no_flip,
                                    (0, images.shape[0]), device)
                reason = state.reasons.get(state.current, "")
            if runner is None and reason not in SILENT_REASONS:
                out.setdefault((kind, reason), []).append(f"{site.index} {site.name}#{site.call}")
            state.runner = None
    return out


def _no_flip(value: Any, faults: Any) -> Any:  # a split check never flips
    return value
