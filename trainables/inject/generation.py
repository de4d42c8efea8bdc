"""Generation trials: bit flips during greedy decoding of a Hugging Face causal LM.

Greedy decoding of ``new_tokens`` tokens per prompt. Step 0 is the prefill (the forward pass
over the prompt, which gives token 0); step k >= 1 feeds token k-1 and gives token k. The
golden continuation, its KV cache and the per-step site shapes are computed once per
workbench (:func:`prepare_generation`). Fault kinds:

- neuron: one element of a site's output during step s's forward (``steps``: a list, "random"
  or "prefill" = [0]);
- weight / param: one element of a weight or tensor, flipped before the prefill and written
  back bit for bit after the last step (it persists for the whole generation);
- kv: one element of layer l's cached keys or values (KV site 2l / 2l+1), flipped right after
  step s (0..new_tokens-2), so every later step reads it.

Draws are trainables.inject.fault_models.sample under (seed, kind, site index, counter): the
counter is ``prompt * new_tokens + step`` for neuron and kv faults (a "random" step is drawn
on the counter ``prompt`` from the stream "step", so a random-step fault equals the fixed-step
fault it drew) and ``prompt // prompts_per_weight_fault`` for weight and param faults.

Batches: prompts of equal length are cut into chunks of ``batch_size`` consecutive prompts.
Floating-point kernels are not batch invariant (a row's logits change with the batch size,
even on CPU), so every faulty run decodes a whole chunk, as the golden run did, with the
faults on the rows that have one (the other rows decode golden and are dropped): faulty and
golden tokens then differ only through the fault. Runs waste no rows when a chunk's faults
share a step (a step list, prefill) or when ``batch_size`` is 1 (the choice for random steps).

Fast path (``prefix=True``): a fault at step s starts from a copy of the golden state after
step s-1 (the KV cache cut to its first P+s-1 positions, and token s-1) instead of decoding
from the prompt; a kv fault after step s starts from the state after step s. Same tokens.
Two more savings, both exact: a fault in decoder layer l (a neuron site there, or layer l's
cache) leaves layers 0..l-1 golden for as long as the tokens fed are golden, so those steps
run from layer l on (the layers before it return the golden run's output, kept per chunk
within GOLDEN_HIDDEN_MB; their cache is the golden one; each cut checked once per workbench
against the golden run); and a neuron fault whose step leaves the state golden bit for bit
(its token and the keys and values it wrote) stops there: the later steps are the golden run's.

Usable without Ray::

    bench = prepare_generation(model, prompts, new_tokens=16, mode="fp32", batch_size=1)
    outcome = run_generation(bench, bench.kv[3], "kv", bit="random", seed=1, steps="random")
    outcome.counts.sdc_rate
"""
from __future__ import annotations

import contextlib
import inspect
import math
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
import torch
from torch import nn

from trainables.inject import engine, fault_models, formats, layers
from trainables.inject.bitflip import apply_fault
from trainables.inject.bitpools import BitPool
from trainables.inject.engine import MATH_MODES, check_mode, math_mode
from trainables.inject.faults import BitSpec, random_words, uniform_below
from trainables.inject.sites import ParamSite, Site, enumerate_sites, find_module, find_tensor, injectable_output, param_sites

KINDS = ("neuron", "weight", "param", "kv")
GOLDEN_HIDDEN_MB = 256.0  # the golden run's decoder-layer outputs kept for the fast path, all chunks together
KV_TENSORS = ("keys", "values")
RECORD_LEVELS = ("none", "changed", "all")
GEN_MODES = ("fp32", "tf32", "fp16", "bf16")  # int8 models are classifiers (trainables.zoo.quantization)


@dataclass(frozen=True)
class KVSite:
    """The cached keys or values of one decoder layer: KV site ``2 * layer + (0 keys, 1 values)``.
    Per prompt the tensor is (kv_heads, cached positions, head_dim)."""

    index: int
    layer: int
    tensor: str  # "keys" or "values"
    kv_heads: int
    head_dim: int

    @property
    def name(self) -> str:
        return f"kv.{self.layer}.{self.tensor}"

    @property
    def numel_per_position(self) -> int:
        """Elements per prompt and cached position (one decode step adds one position)."""
        return self.kv_heads * self.head_dim

    def numel(self, positions: int) -> int:
        return self.numel_per_position * positions


def kv_table(sites: Sequence[KVSite]) -> str:
    """The KV-cache sites as a table for ``layers``: index, layer, tensor, elements per prompt and step."""
    header = f"{'kv site':>7}  {'layer':>5}  {'tensor':>6}  {'shape per prompt':>22}  {'numel/step':>10}  name"
    lines = [header, "-" * len(header)]
    for s in sites:
        shape = f"[{s.kv_heads}, positions, {s.head_dim}]"
        lines.append(f"{s.index:>7}  {s.layer:>5}  {s.tensor:>6}  {shape:>22}  {s.numel_per_position:>10,}  {s.name}")
    return "\n".join(lines)


def _hf_model(model: nn.Module) -> nn.Module:
    """The transformers model behind ``model`` (a CausalLMLogits from hf:, or the model itself)."""
    hf = getattr(model, "hf_model", model)
    if not hasattr(hf, "config") or not callable(getattr(hf, "forward", None)):
        raise ValueError(f"generation trials need a Hugging Face causal LM (hf:<dir>), got {type(model).__name__}")
    return hf


def cache_problem(hf_model: nn.Module) -> str | None:
    """Why ``hf_model`` decodes without a KV cache (then it has no KV sites), or None."""
    if getattr(hf_model.config, "use_cache", True) is False:
        return "its config has use_cache False"
    if "cache" not in inspect.signature(hf_model.forward).parameters:
        return f"{type(hf_model).__name__}.forward takes no cache"
    return None


def _new_cache(hf_model: nn.Module, layers=None):
    from transformers import DynamicCache

    return DynamicCache(ddp_cache_data=layers) if layers is not None else DynamicCache()


def _check_cache(cache, where: str) -> None:
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer

    if not isinstance(cache, DynamicCache) or any(type(layer) is not DynamicLayer for layer in cache.layers):
        kinds = sorted({type(layer).__name__ for layer in getattr(cache, "layers", [])}) or [type(cache).__name__]
        raise ValueError(f"{where}: generation trials need a DynamicCache of full-attention DynamicLayers, got "
                         f"{', '.join(kinds)}")


def kv_sites(model: nn.Module) -> list[KVSite]:
    """The KV-cache sites of a causal LM (one dummy 1-token forward reads the cache's shapes);
    ValueError (one line) for a model without a KV cache."""
    hf = _hf_model(model)
    problem = cache_problem(hf)
    if problem is not None:
        raise ValueError(f"{type(hf).__name__} has no KV cache ({problem}): it has no KV-cache sites")
    device = next((p.device for p in hf.parameters()), torch.device("cpu"))
    cache = _new_cache(hf)
    with torch.inference_mode():
        hf(input_ids=torch.zeros((1, 1), dtype=torch.int64, device=device), cache=cache, use_cache=True)
    _check_cache(cache, type(hf).__name__)
    sites = []
    for layer_index, layer in enumerate(cache.layers):
        for t, name in enumerate(KV_TENSORS):
            tensor = getattr(layer, name)
            sites.append(KVSite(2 * layer_index + t, layer_index, name, int(tensor.shape[1]), int(tensor.shape[3])))
    return sites


class _LastLogits(nn.Module):
    """The causal LM's last-position logits, (batch, vocab): the shape enumerate_sites surveys.
    It registers the LM's children under their own names, so site names are the LM's."""

    def __init__(self, hf_model: nn.Module) -> None:
        super().__init__()
        object.__setattr__(self, "hf_model", hf_model)
        for name, child in hf_model.named_children():
            self.add_module(name, child)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.hf_model(input_ids=input_ids, use_cache=False).logits[:, -1]


def survey_sites(model: nn.Module, prompt_length: int, mode: str = "fp32"):
    """The sites.survey of a causal LM as prepare_generation numbers its neuron, weight and param
    sites (the last position's logits of a ``prompt_length``-token prompt), for a campaign's driver."""
    from trainables.inject.sites import survey

    hf = _hf_model(model)
    dtype = MATH_MODES[mode]
    with math_mode(mode):
        return survey(_LastLogits(hf.to(dtype)), (prompt_length,), dtype, input_dtype=torch.int64)


@dataclass
class _Chunk:
    """Consecutive prompts of one length, decoded as one batch; the golden run's results."""

    prompts: np.ndarray  # prompt indices
    ids: torch.Tensor  # (B, P) int64
    golden: torch.Tensor  # (B, new_tokens) int64
    keys: list[torch.Tensor] = field(default_factory=list)  # per layer (B, kv_heads, P + new_tokens - 1, head_dim)
    values: list[torch.Tensor] = field(default_factory=list)
    nonfinite: torch.Tensor | None = None  # (B, new_tokens) bool: the golden logits of step s were not all finite
    hidden: list[list] | None = field(default=None, repr=False)  # [layer j][step]: layer j's golden output (None: not kept)

    @property
    def length(self) -> int:
        return int(self.ids.shape[1])

    def state_cache(self, hf_model: nn.Module, positions: int):
        """A new DynamicCache holding a copy of the golden cache's first ``positions`` positions."""
        return _new_cache(hf_model, [(k[:, :, :positions], v[:, :, :positions]) for k, v in zip(self.keys, self.values)])

    def settled(self, cache, tokens: torch.Tensor, step: int, first_layer: int = 0) -> bool:
        """Whether the state after decode ``step`` equals the golden state bit for bit: the token of
        every row, and (with a cache) the keys and values step ``step`` wrote in layers ``first_layer``
        on (the earlier positions are the golden copies the run started from; layers before
        ``first_layer`` ran as stubs returning golden outputs). Then every later step decodes exactly
        as the golden run."""
        if not torch.equal(tokens[:, step], self.golden[:, step]):
            return False
        if cache is None:
            return True
        lo, hi = self.written(step)
        bits = lambda t: t.view(formats.int_view(t.dtype))  # noqa: E731  (NaN and -0.0 compare by their bits)
        return all(torch.equal(bits(layer.keys[:, :, lo:hi]), bits(k[:, :, lo:hi])) and
                   torch.equal(bits(layer.values[:, :, lo:hi]), bits(v[:, :, lo:hi]))
                   for layer, k, v in list(zip(cache.layers, self.keys, self.values))[first_layer:])

    def written(self, step: int) -> tuple[int, int]:
        """The cache positions decode ``step`` writes: the prompt's at the prefill, then one a step."""
        return (0, self.length) if step == 0 else (self.length + step - 1, self.length + step)

    def golden_layers(self, cache, count: int, positions: int) -> None:
        """Layers 0..count-1 of ``cache`` hold the golden keys and values of their first ``positions``
        positions (views: an update concatenates, so the golden tensors never change)."""
        for layer, k, v in zip(cache.layers[:count], self.keys, self.values):
            layer.keys, layer.values = k[:, :, :positions], v[:, :, :positions]


@dataclass
class GenerationBench:
    """A causal LM, its prompts and their cached golden generation, built once per worker."""

    hf_model: nn.Module
    prompts: tuple[tuple[int, ...], ...]
    new_tokens: int
    mode: str
    batch_size: int
    device: torch.device
    sites: list[Site]
    params: list[ParamSite]
    kv: list[KVSite]  # empty when the model decodes without a cache
    chunks: list[_Chunk]
    golden: np.ndarray  # (prompts, new_tokens) int64
    golden_nonfinite: np.ndarray  # (prompts,) bool: the golden run had non-finite logits at some step
    no_cache: str | None  # why the model decodes without a KV cache (each step reruns the whole sequence), or None
    shapes: dict[tuple[int, int], dict[int, tuple[int, ...] | None]] = field(repr=False)  # (P, step) -> site -> shape
    takes_logits_to_keep: bool = False
    hidden_bytes: int = 0  # the golden layer outputs kept (GOLDEN_HIDDEN_MB)
    cuts: dict[int, str] = field(default_factory=dict, repr=False)  # decoder layer l -> '' once its cut checked out, else why not

    @property
    def num_prompts(self) -> int:
        return len(self.prompts)

    @property
    def dtype(self) -> torch.dtype:
        return MATH_MODES[self.mode]

    @property
    def width(self) -> int:
        return formats.width(self.dtype)

    def site(self, kind: str, index: int) -> Site | ParamSite | KVSite | None:
        pool = self.params if kind == "param" else self.kv if kind == "kv" else self.sites
        return next((s for s in pool if s.index == index and (kind != "weight" or s.is_weight_site)), None)


def _context_length(hf_model: nn.Module) -> int | None:
    config = hf_model.config
    return next((getattr(config, n) for n in ("max_position_embeddings", "n_positions", "max_sequence_length")
                 if getattr(config, n, None)), None)


def check_prompts(prompts: Sequence[Sequence[int]], new_tokens: int, vocab: int, context: int | None) -> tuple:
    """The prompts as tuples of ints, checked; one ValueError line otherwise."""
    if isinstance(new_tokens, bool) or not isinstance(new_tokens, int) or new_tokens < 1:
        raise ValueError(f"new_tokens must be a positive integer, got {new_tokens!r}")
    if not prompts:
        raise ValueError("no prompts: generation trials need at least one prompt (a list of token ids)")
    out = []
    for i, p in enumerate(prompts):
        p = [int(t) for t in (p.tolist() if isinstance(p, (torch.Tensor, np.ndarray)) else p)]
        if not p:
            raise ValueError(f"prompt {i} is empty")
        if min(p) < 0 or max(p) >= vocab:
            raise ValueError(f"prompt {i} has token ids outside the vocabulary 0..{vocab - 1}")
        if context is not None and len(p) + new_tokens > context:
            raise ValueError(f"prompt {i} has {len(p)} tokens: with {new_tokens} new tokens that is {len(p) + new_tokens}, "
                             f"over the model's context length {context}")
        out.append(tuple(p))
    return tuple(out)


def prepare_generation(model: nn.Module, prompts: Sequence[Sequence[int]], new_tokens: int, mode: str = "fp32",
                       batch_size: int = 1, device: str | torch.device | None = None) -> GenerationBench:
    """Move the LM to ``device`` in ``mode``'s dtype, list its sites (neuron and weight as
    enumerate_sites numbers them, param, kv) and decode every prompt greedily once: the golden
    tokens, the golden KV cache and each step's site output shapes. ``model``: a CausalLMLogits
    (hf:<dir>) or a transformers causal LM. Prompts of equal length share chunks of ``batch_size``."""
    check_mode(mode)
    if mode not in GEN_MODES:
        raise ValueError(f"generation trials run in {', '.join(GEN_MODES)}, not {mode}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    hf = _hf_model(model)
    prompts = check_prompts(prompts, new_tokens, int(hf.config.vocab_size), _context_length(hf))
    device = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = MATH_MODES[mode]
    hf = hf.eval().to(device=device, dtype=dtype)
    no_cache = cache_problem(hf)
    with math_mode(mode):
        sites = enumerate_sites(_LastLogits(hf), (len(prompts[0]),), dtype, input_dtype=torch.int64, containers=True)
        kv = kv_sites(hf) if no_cache is None else []
    bench = GenerationBench(hf, prompts, new_tokens, mode, batch_size, device, sites, param_sites(hf)[0], kv, [],
                            np.zeros((len(prompts), new_tokens), dtype=np.int64), np.zeros(len(prompts), dtype=bool),
                            no_cache, {}, "logits_to_keep" in inspect.signature(hf.forward).parameters)
    by_length: dict[int, list[int]] = {}
    for i, p in enumerate(prompts):
        by_length.setdefault(len(p), []).append(i)
    for length in sorted(by_length):
        members = by_length[length]
        for lo in range(0, len(members), batch_size):
            rows = np.asarray(members[lo : lo + batch_size], dtype=np.int64)
            ids = torch.tensor([prompts[i] for i in rows], dtype=torch.int64, device=device)
            bench.chunks.append(_golden_chunk(bench, rows, ids))
    for chunk in bench.chunks:
        bench.golden[chunk.prompts] = chunk.golden.cpu().numpy()
    return bench


@contextlib.contextmanager
def _shape_recorder(bench: GenerationBench, key: tuple[int, int], batch: int):
    """Record each neuron site's per-prompt output shape in one forward (None: cannot take a fault then)."""
    if key in bench.shapes:
        yield
        return
    wanted = {(s.name, s.call): s.index for s in bench.sites}
    names = {s.name for s in bench.sites}
    found: dict[int, tuple[int, ...] | None] = {}
    calls: dict[str, int] = {}
    handles = []

    def make_hook(name: str):
        def hook(_module, _inputs, output):
            call = calls.get(name, 0)
            calls[name] = call + 1
            if (name, call) in wanted:
                _, shape, _ = injectable_output(output, batch)
                found[wanted[(name, call)]] = shape
        return hook

    try:
        for name in names:
            handles.append(bench.hf_model.get_submodule(name).register_forward_hook(make_hook(name)))
        yield
    finally:
        for handle in handles:
            handle.remove()
    bench.shapes[key] = {s.index: found.get(s.index) for s in bench.sites}


def _forward(bench: GenerationBench, inputs: torch.Tensor, cache) -> torch.Tensor:
    """Last-position logits (B, vocab) of one decoding step (the cache, if any, grows in place)."""
    extra = {"logits_to_keep": 1} if bench.takes_logits_to_keep else {}
    if cache is None:
        return bench.hf_model(input_ids=inputs, use_cache=False, **extra).logits[:, -1]
    return bench.hf_model(input_ids=inputs, cache=cache, use_cache=True, **extra).logits[:, -1]


@contextlib.contextmanager
def _layer_outputs(found, hidden: list[list] | None):
    """Append each decoder layer's output (as returned) to ``hidden[layer]``, once per forward."""
    if hidden is None:
        yield
        return
    handles = []
    try:
        for j, layer in enumerate(found[1]):
            handles.append(layer.register_forward_hook(lambda _m, _i, out, j=j: hidden[j].append(out)))
        yield
    finally:
        for handle in handles:
            handle.remove()


def _golden_chunk(bench: GenerationBench, rows: np.ndarray, ids: torch.Tensor) -> _Chunk:
    n, b = bench.new_tokens, len(rows)
    tokens = torch.empty((b, n), dtype=torch.int64, device=bench.device)
    nonfinite = torch.zeros((b, n), dtype=torch.bool, device=bench.device)
    cache = _new_cache(bench.hf_model) if bench.no_cache is None else None
    inputs = ids
    found = layers.decoder_layers(bench.hf_model) if cache is not None else None
    width = getattr(bench.hf_model.config, "hidden_size", None)
    hidden = None
    if found is not None and isinstance(width, int):
        per_position = width * torch.finfo(bench.dtype).bits // 8
        size = len(found[1]) * b * (ids.shape[1] + n - 1) * per_position
        if bench.hidden_bytes + size <= GOLDEN_HIDDEN_MB * 2**20:
            hidden = [[] for _ in found[1]]
            bench.hidden_bytes += size
    with math_mode(bench.mode), torch.inference_mode(), _layer_outputs(found, hidden):
        for step in range(n):
            with _shape_recorder(bench, (ids.shape[1], step), b):
                logits = _forward(bench, inputs, cache)
            tokens[:, step] = logits.argmax(dim=-1)
            nonfinite[:, step] = ~torch.isfinite(logits).all(dim=-1)
            inputs = tokens[:, step : step + 1] if cache is not None else torch.cat([ids, tokens[:, : step + 1]], dim=1)
    if hidden is not None and any(len(outputs) != n for outputs in hidden):
        hidden = None  # a decoder layer ran other than once a step: no layer stubs for this chunk
    chunk = _Chunk(rows, ids, tokens, nonfinite=nonfinite, hidden=hidden)
    nonfinite = nonfinite.any(dim=1)
    if cache is not None:
        _check_cache(cache, type(bench.hf_model).__name__)
        chunk.keys = [layer.keys for layer in cache.layers]
        chunk.values = [layer.values for layer in cache.layers]
    bench.golden_nonfinite[rows] = nonfinite.cpu().numpy()
    return chunk


# ------------------------------------------------------------------------------------------ results


@dataclass(frozen=True)
class GenerationCounts:
    """Per-trial sums, reducible with ``+``: faults, identical continuations, SDCs (finite, not
    identical), non-finite runs, effective faults, the sum and sum of squares of the normalized
    edit distance, and per fault step (``by_step[f, s]``, f in STEP_FIELDS; weight and param faults,
    which have no step, count nowhere there) and per first bit (``by_bit[f, b]``)."""

    faults: int
    identical: int
    sdc: int
    nonfinite: int
    effective: int
    edit_sum: float
    edit_sq_sum: float
    by_step: np.ndarray  # int64 (len(STEP_FIELDS), new_tokens)
    by_bit: np.ndarray  # int64 (len(STEP_FIELDS), width)

    STEP_FIELDS = ("faults", "sdc", "nonfinite")

    @property
    def sdc_rate(self) -> float:
        return self.sdc / self.faults if self.faults else float("nan")

    @property
    def identical_rate(self) -> float:
        return self.identical / self.faults if self.faults else float("nan")

    @property
    def mean_edit_distance(self) -> float:
        return self.edit_sum / self.faults if self.faults else float("nan")

    def sdc_rate_by_step(self) -> np.ndarray:
        """SDC rate per fault step (NaN where a step had no fault): the 'SDC rate vs decode step' plot."""
        with np.errstate(invalid="ignore", divide="ignore"):
            return self.by_step[1] / np.where(self.by_step[0] > 0, self.by_step[0], np.nan)

    def __add__(self, other: "GenerationCounts") -> "GenerationCounts":
        return GenerationCounts(self.faults + other.faults, self.identical + other.identical, self.sdc + other.sdc,
                                self.nonfinite + other.nonfinite, self.effective + other.effective,
                                self.edit_sum + other.edit_sum, self.edit_sq_sum + other.edit_sq_sum,
                                self.by_step + other.by_step, self.by_bit + other.by_bit)


@dataclass(frozen=True)
class GenerationRecords:
    """One row per fault; arrays of equal length (``faulty``: (faults, new_tokens) tokens)."""

    prompt: np.ndarray
    step: np.ndarray  # the fault's decode step; -1 for weight and param faults
    position: np.ndarray  # flat element index in the site's per-prompt output / tensor / cache tensor
    kv_position: np.ndarray  # kv faults: the cached sequence position of the element; else -1
    fault_group: np.ndarray  # weight/param: prompt // prompts_per_weight_fault; else -1
    bit: np.ndarray
    raw_before: np.ndarray
    value_before: np.ndarray
    value_after: np.ndarray
    effective: np.ndarray
    identical: np.ndarray
    first_divergence: np.ndarray  # first position whose token differs from golden; -1 if none
    edit_distance: np.ndarray  # Levenshtein(faulty, golden) / new_tokens
    nonfinite: np.ndarray
    faulty: np.ndarray

    def __len__(self) -> int:
        return len(self.prompt)

    def as_dict(self) -> dict[str, np.ndarray]:
        return dict(self.__dict__)


@dataclass(frozen=True)
class GenerationOutcome:
    counts: GenerationCounts
    records: GenerationRecords | None
    path: str = "golden-state"  # "golden-state": faults start from the cached golden state; "full": from the prompt
    logits: list[torch.Tensor] | None = field(default=None, repr=False)  # keep_logits: per fault, (steps run, vocab)


def edit_distances(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Levenshtein distance between the rows of two (n, L) integer arrays (insert, delete, substitute: 1)."""
    n, length = a.shape
    prev = np.tile(np.arange(length + 1, dtype=np.int64), (n, 1))
    for i in range(1, length + 1):
        cur = np.empty_like(prev)
        cur[:, 0] = i
        cost = (a[:, i - 1 : i] != b).astype(np.int64)  # (n, L)
        diag_up = np.minimum(prev[:, :-1] + cost, prev[:, 1:] + 1)
        for j in range(1, length + 1):
            cur[:, j] = np.minimum(diag_up[:, j - 1], cur[:, j - 1] + 1)
        prev = cur
    return prev[:, length]


# ------------------------------------------------------------------------------------------ faults


@dataclass
class _Faults:
    """A trial's faults, one row each (numpy), in the order they are counted."""

    prompt: np.ndarray
    step: np.ndarray  # -1 for weight/param
    group: np.ndarray  # weight/param fault group, else -1
    position: np.ndarray
    bit: np.ndarray
    keep: np.ndarray | None
    toggle: np.ndarray


def parse_steps(steps, new_tokens: int, kind: str):
    """``steps`` as "random" or a sorted list of decode steps, checked against ``new_tokens``:
    neuron steps 0..new_tokens-1, kv steps 0..new_tokens-2 (a later step must read the cache)."""
    if kind in ("weight", "param"):
        if steps is not None:
            raise ValueError(f"{kind} faults persist for the whole generation: they take no decode steps (got {steps!r})")
        return None
    last = new_tokens - 1 if kind == "neuron" else new_tokens - 2
    if last < 0:
        raise ValueError(f"kv faults need new_tokens >= 2 (a step after the fault must read the cache), got {new_tokens}")
    if steps is None or steps == "random":
        return "random"
    if steps == "prefill":
        return [0]
    if isinstance(steps, str):
        try:
            steps = [int(s) for s in steps.replace(" ", "").split(",") if s]
        except ValueError:
            raise ValueError(f"bad steps {steps!r}: use 'random', 'prefill' or a list of decode steps like 0,3,7") from None
    steps = sorted({int(s) for s in steps})
    if not steps:
        raise ValueError("no decode steps given: use 'random', 'prefill' or a list like 0,3,7")
    bad = [s for s in steps if not 0 <= s <= last]
    if bad:
        what = "kv faults flip the cache after step s, read by step s+1: " if kind == "kv" else ""
        raise ValueError(f"decode step {bad[0]} is beyond new_tokens {new_tokens}: {what}steps are 0..{last} (0 = prefill)")
    return steps


def _draw(seed: int, kind: str, index: int, bit: BitSpec, width: int, numel: int, counter: int,
          fault: fault_models.FaultModel):
    f = fault_models.sample(seed, kind, index, bit, width, numel, counter, counter + 1, fault)
    return int(f.positions[0]), int(f.bits[0]), None if f.keep is None else int(f.keep[0]), int(f.toggle[0])


def _step_numel(bench: GenerationBench, site: Site | KVSite, kind: str, prompt: int, step: int) -> int:
    length = len(bench.prompts[prompt])
    if kind == "kv":
        return site.numel(length + step)  # cached positions after step s
    shape = bench.shapes[(length, step)].get(site.index)
    if shape is None:
        raise ValueError(f"neuron site {site.index} ({site.name}, call {site.call}) gives no per-prompt floating "
                         f"output at decode step {step}")
    return math.prod(shape)


def _plan(bench: GenerationBench, site, kind: str, bit: BitSpec, seed: int, steps, start: int, stop: int,
          per_fault: int, fault: fault_models.FaultModel) -> _Faults:
    width, n = bench.width, bench.new_tokens
    rows = []
    if kind in ("weight", "param"):
        numel = site.weight_numel if kind == "weight" else site.numel
        first, last = start // per_fault, (stop - 1) // per_fault
        f = fault_models.sample(seed, kind, site.index, bit, width, numel, first, last + 1, fault)
        for p in range(start, stop):
            g = p // per_fault - first
            rows.append((p, -1, g + first, int(f.positions[g]), int(f.bits[g]), None if f.keep is None else int(f.keep[g]),
                         int(f.toggle[g])))
    else:
        prompts = np.arange(start, stop, dtype=np.uint64)
        if steps == "random":
            last = n if kind == "neuron" else n - 1
            drawn = uniform_below(random_words(seed, kind, site.index, "step", prompts), last)
            pairs = [(int(p), int(s)) for p, s in zip(prompts, drawn)]
        else:
            pairs = [(p, s) for p in range(start, stop) for s in steps]
        for p, s in pairs:
            numel = _step_numel(bench, site, kind, p, s)
            rows.append((p, s, -1, *_draw(seed, kind, site.index, bit, width, numel, p * n + s, fault)))
    cols = list(zip(*rows))
    keep = None if all(k is None for k in cols[5]) else np.asarray([-1 if k is None else k for k in cols[5]], dtype=np.int64)
    return _Faults(*(np.asarray(c, dtype=np.int64) for c in cols[:5]), keep, np.asarray(cols[6], dtype=np.int64))


# ------------------------------------------------------------------------------------------ runs


def _tensor_of(bench: GenerationBench, site, kind: str) -> torch.Tensor:
    tensor = find_module(bench.hf_model, site).weight if kind == "weight" else find_tensor(bench.hf_model, site)
    if tensor.dtype != bench.dtype:
        raise ValueError(f"{kind} site {site.index} ({site.name}) is {tensor.dtype}, not the {bench.mode} dtype {bench.dtype}")
    return tensor.detach()


@contextlib.contextmanager
def _tensor_fault(tensor: torch.Tensor, position: int, keep: int | None, toggle: int):
    """Fault one element of a weight in place for the block; its saved bits are written back after."""
    int_dtype = formats.int_view(tensor.dtype)
    flat = engine._memory(tensor).view(int_dtype)
    offset = engine._memory_offset(tensor, position)
    raw = flat[offset].clone()
    with torch.no_grad():
        flat[offset] = apply_fault(raw, None if keep is None else torch.tensor(keep, dtype=int_dtype),
                                   torch.tensor(toggle, dtype=int_dtype))
    try:
        yield raw
    finally:
        with torch.no_grad():
            flat[offset] = raw  # restored bit for bit


def _masks(bench, rows_of_batch: int, fault_rows: np.ndarray, faults: _Faults, idx: np.ndarray):
    """Per-batch-row keep/toggle (int view dtype) and positions: the fault's on ``fault_rows``,
    a no-op (toggle 0, position 0) on the others."""
    int_dtype = formats.int_view(bench.dtype)
    toggle = np.zeros(rows_of_batch, dtype=np.int64)
    positions = np.zeros(rows_of_batch, dtype=np.int64)
    toggle[fault_rows] = faults.toggle[idx]
    positions[fault_rows] = faults.position[idx]
    keep = None
    if faults.keep is not None:
        keep = np.full(rows_of_batch, -1, dtype=np.int64)
        keep[fault_rows] = faults.keep[idx]
    dev = lambda a: torch.from_numpy(a).to(bench.device).to(int_dtype)  # noqa: E731
    return torch.from_numpy(positions).to(bench.device), None if keep is None else dev(keep), dev(toggle)


def _flip_cache(cache, site: KVSite, positions: torch.Tensor, keep, toggle) -> torch.Tensor:
    """Fault element ``positions[r]`` of row r of the site's cached tensor in place; the raw bits before."""
    tensor = getattr(cache.layers[site.layer], site.tensor)
    if not tensor.is_contiguous():
        raise ValueError(f"KV site {site.index}: the cached {site.tensor} are not contiguous")
    as_int = tensor.view(tensor.shape[0], -1).view(formats.int_view(tensor.dtype))
    rows = torch.arange(tensor.shape[0], device=tensor.device)
    raw = as_int[rows, positions].clone()
    as_int[rows, positions] = apply_fault(raw, keep, toggle)
    return raw


def _decode(bench: GenerationBench, chunk: _Chunk, first: int, hook_step: int | None = None,
            hook: Callable[[], contextlib.AbstractContextManager] | None = None,
            edit_step: int | None = None, edit: Callable | None = None, keep_logits: bool = False,
            settle: bool = False, cut: int | None = None):
    """Decode ``chunk`` from the golden state before step ``first`` (0: from the prompt) to the
    last step; ``hook()`` wraps step ``hook_step``'s forward, ``edit(cache)`` runs right after
    step ``edit_step`` (``first == edit_step + 1``: applied to the starting state). Returns the
    tokens (B, new_tokens; golden before ``first``), per-row non-finite flags (the golden run's
    before ``first``), and the logits of the steps run (B, steps, vocab) when ``keep_logits``.
    ``settle``: stop after step ``hook_step`` when the state is golden again (the fault was masked
    bit for bit): the later steps are the golden run's (same tokens and flags as decoding them).
    ``cut`` (a checked decoder layer l, see _cut_for): while every token fed is golden, layers 0..l-1
    return the golden run's outputs and keep the golden cache instead of running."""
    n, length = bench.new_tokens, chunk.length
    decoder = layers.decoder_layers(bench.hf_model)[1] if cut else None
    golden_fed = bool(cut) and bench.no_cache is None and chunk.hidden is not None  # every token fed so far golden
    stale = False  # the stubbed layers' cache lags behind (they did not run the last step)
    tokens = chunk.golden.clone()
    nonfinite = chunk.nonfinite[:, :first].any(dim=1)  # the golden steps before ``first``, as decoding them gives
    cached = bench.no_cache is None
    if first == 0:
        cache, inputs = (_new_cache(bench.hf_model) if cached else None), chunk.ids
    else:
        cache = chunk.state_cache(bench.hf_model, length + first - 1) if cached else None
        inputs = tokens[:, first - 1 : first] if cached else torch.cat([chunk.ids, tokens[:, :first]], dim=1)
    if edit is not None and edit_step == first - 1:
        edit(cache)
    logits_all = []
    for step in range(first, n):
        stub = golden_fed and step > 0  # the prefill fills the cache of every layer
        if stub and step > first and not torch.equal(tokens[:, step - 1], chunk.golden[:, step - 1]):
            golden_fed = stub = False  # a token fed differs: every layer runs from now on
        if stub or stale:
            chunk.golden_layers(cache, cut, length + step - 1)  # the stubbed layers' cache: golden up to this step
            stale = stub
        with hook() if step == hook_step else contextlib.nullcontext(), \
                layers._stubbed(decoder, cut, chunk.hidden[cut - 1][step]) if stub else contextlib.nullcontext():
            logits = _forward(bench, inputs, cache)
        if keep_logits:
            logits_all.append(logits.clone())
        tokens[:, step] = logits.argmax(dim=-1)
        nonfinite |= ~torch.isfinite(logits).all(dim=-1)
        if edit is not None and step == edit_step:
            edit(cache)
        if settle and step == hook_step and not keep_logits and step + 1 < n and \
                chunk.settled(cache, tokens, step, cut if stale else 0):
            nonfinite |= chunk.nonfinite[:, step + 1 :].any(dim=1)
            break
        inputs = tokens[:, step : step + 1] if cached else torch.cat([chunk.ids, tokens[:, : step + 1]], dim=1)
    return tokens, nonfinite, (torch.stack(logits_all, dim=1) if keep_logits else None)


def _cut_for(bench: GenerationBench, site, kind: str) -> int | None:
    """The decoder layer l >= 1 before which a neuron fault at ``site`` or a kv fault in its layer's
    cache changes nothing, once checked on the workbench (None: decode every layer)."""
    found = layers.decoder_layers(bench.hf_model)
    if found is None or bench.no_cache is not None or not bench.chunks or bench.chunks[0].hidden is None:
        return None
    k = site.layer if kind == "kv" else layers.cut_for(bench.hf_model, bench.sites, site, "neuron", None)[0]
    if not k:
        return None
    if k not in bench.cuts:
        bench.cuts[k] = _check_cut(bench, k)
    return k if bench.cuts[k] == "" else None


def _check_cut(bench: GenerationBench, k: int) -> str:
    """'' when decoding the first chunk's steps 1 and 2 from the golden state with layers 0..k-1
    stubbed gives the golden tokens and the golden keys and values of layers k on, bit for bit."""
    chunk, n = bench.chunks[0], bench.new_tokens
    if n < 2:
        return ""  # no step after the prefill: the cut is never used
    stop = min(n, 3)
    with math_mode(bench.mode), torch.inference_mode():
        cache = chunk.state_cache(bench.hf_model, chunk.length)
        tokens = chunk.golden.clone()
        inputs = tokens[:, :1]
        decoder = layers.decoder_layers(bench.hf_model)[1]
        for step in range(1, stop):
            chunk.golden_layers(cache, k, chunk.length + step - 1)
            with layers._stubbed(decoder, k, chunk.hidden[k - 1][step]):
                tokens[:, step] = _forward(bench, inputs, cache).argmax(dim=-1)
            inputs = tokens[:, step : step + 1]
            if not chunk.settled(cache, tokens, step, k):
                return f"stubbing decoder layers 0..{k - 1} does not reproduce decode step {step} bit for bit"
    return ""


def check_range(bench: GenerationBench, start: int, stop: int | None) -> int:
    stop = bench.num_prompts if stop is None else stop
    if not 0 <= start < stop <= bench.num_prompts:
        raise ValueError(f"prompt range {start}..{stop} is outside 0..{bench.num_prompts}")
    return stop


def run_generation(bench: GenerationBench, site: Site | ParamSite | KVSite, kind: str, bit: BitSpec, seed: int,
                   steps=None, start: int = 0, stop: int | None = None, prompts_per_weight_fault: int = 1,
                   record: str = "none", fault: fault_models.FaultModel | str = "flip", prefix: bool = True,
                   keep_logits: bool = False) -> GenerationOutcome:
    """Inject the faults of one generation trial into prompts ``start..stop-1`` and count them.
    Neuron and kv faults: one per prompt and step of ``steps`` (a list, "random": one drawn step
    per prompt (the default), "prefill"); weight and param faults: one per
    ``prompts_per_weight_fault`` prompts, for the whole generation (``steps`` None). ``prefix``:
    start each fault from the cached golden state (same tokens as from the prompt, faster).
    ``keep_logits`` (tests) adds ``logits``: the faulty logits per fault, (faults, steps run, vocab) per run."""
    stop = check_range(bench, start, stop)
    if kind not in KINDS:
        raise ValueError(f"unknown site kind {kind!r} for generation trials: use {', '.join(KINDS)}")
    expected = {"param": ParamSite, "kv": KVSite}.get(kind, Site)
    if not isinstance(site, expected):
        raise ValueError(f"{kind} faults need a {expected.__name__} (bench.site(kind, index)); got "
                         f"{type(site).__name__} {site.index} ({site.name})")
    if kind == "kv" and bench.no_cache is not None:
        raise ValueError(f"{type(bench.hf_model).__name__} has no KV cache ({bench.no_cache}): no KV-cache faults")
    if kind == "weight" and not site.is_weight_site:
        raise ValueError(f"site {site.index} ({site.name}, {site.module_type}) is not a weight site")
    if isinstance(bit, BitPool):
        bit = bit.resolve(formats.layout_name(bench.dtype), bench.width)
    elif bit != "random":
        formats.check_bit(bit, bench.dtype)
    fault = fault_models.parse_fault(fault)
    fault_models.check_fault(fault, bench.width, bit)
    if record not in RECORD_LEVELS:
        raise ValueError(f"unknown record level {record!r}: use one of {', '.join(RECORD_LEVELS)}")
    if isinstance(prompts_per_weight_fault, bool) or not isinstance(prompts_per_weight_fault, int) or prompts_per_weight_fault < 1:
        raise ValueError(f"prompts_per_weight_fault must be a positive integer, got {prompts_per_weight_fault!r}")
    steps = parse_steps(steps, bench.new_tokens, kind)
    tensor = _tensor_of(bench, site, kind) if kind in ("weight", "param") else None
    faults = _plan(bench, site, kind, bit, seed, steps, start, stop, prompts_per_weight_fault, fault)
    return _execute(bench, site, kind, faults, record, prefix, tensor, keep_logits)


def _execute(bench, site, kind, faults: _Faults, record: str, prefix: bool, tensor, keep_logits: bool) -> GenerationOutcome:
    count = len(faults.prompt)
    int_dtype = formats.int_view(bench.dtype)
    faulty = np.zeros((count, bench.new_tokens), dtype=np.int64)
    nonfinite = np.zeros(count, dtype=bool)
    raw = np.zeros(count, dtype=np.int64)
    kv_position = np.full(count, -1, dtype=np.int64)
    logits = [None] * count if keep_logits else None
    chunk_of = {int(p): (c, r) for c, chunk in enumerate(bench.chunks) for r, p in enumerate(chunk.prompts)}
    cut = _cut_for(bench, site, kind) if prefix and kind in ("neuron", "kv") else None
    # the runs: (chunk, step or weight group) -> the fault rows (indices into faults) it serves
    runs: dict[tuple[int, int], list[int]] = {}
    for i, (p, s, g) in enumerate(zip(faults.prompt, faults.step, faults.group)):
        runs.setdefault((chunk_of[int(p)][0], int(g) if s < 0 else int(s)), []).append(i)
    with math_mode(bench.mode), torch.inference_mode():
        for (c, key), idx in sorted(runs.items()):
            chunk, idx = bench.chunks[c], np.asarray(idx)
            rows = np.asarray([chunk_of[int(faults.prompt[i])][1] for i in idx])
            if kind in ("weight", "param"):
                i0 = idx[0]
                keep = None if faults.keep is None else int(faults.keep[i0])
                with _tensor_fault(tensor, int(faults.position[i0]), keep, int(faults.toggle[i0])) as saved:
                    tokens, bad, lg = _decode(bench, chunk, 0, keep_logits=keep_logits)
                raw[idx] = int(saved.view(int_dtype).item())
            elif kind == "neuron":
                batch = engine._BatchFaults()
                batch.output_index = site.output_index
                batch.positions, batch.keep, batch.toggle = _masks(bench, len(chunk.prompts), rows, faults, idx)

                @contextlib.contextmanager
                def hooked():
                    batch.calls = batch.fired = 0
                    with engine.neuron_hook(bench.hf_model, site, batch):
                        yield
                    if batch.fired != 1:
                        raise RuntimeError(f"site {site.index} ({site.name}, call {site.call}) fired {batch.fired} "
                                           f"times in decode step {key}; expected once")

                tokens, bad, lg = _decode(bench, chunk, key if prefix else 0, hook_step=key, hook=hooked,
                                          keep_logits=keep_logits, settle=prefix, cut=cut if prefix else None)
                raw[idx] = batch.raw_before[torch.from_numpy(rows).to(bench.device)].to(torch.int64).cpu().numpy()
            else:
                positions, keep, toggle = _masks(bench, len(chunk.prompts), rows, faults, idx)
                saved = {}

                def edit(cache):
                    saved["raw"] = _flip_cache(cache, site, positions, keep, toggle)

                tokens, bad, lg = _decode(bench, chunk, key + 1 if prefix else 0, edit_step=key, edit=edit,
                                          keep_logits=keep_logits, cut=cut if prefix else None)
                raw[idx] = saved["raw"][torch.from_numpy(rows).to(bench.device)].to(torch.int64).cpu().numpy()
                # per prompt the cache is (kv_heads, P + step, head_dim) after step ``key``
                kv_position[idx] = (faults.position[idx] // site.head_dim) % (chunk.length + key)
            faulty[idx] = tokens.cpu().numpy()[rows]
            nonfinite[idx] = bad.cpu().numpy()[rows]
            if keep_logits:
                for i, r in zip(idx, rows):
                    logits[i] = lg[r].float().cpu()
    return _summarize(bench, kind, faults, faulty, nonfinite, raw, kv_position, record, prefix, logits)


def _summarize(bench, kind, faults: _Faults, faulty, nonfinite, raw, kv_position, record, prefix, logits) -> GenerationOutcome:
    n, width = bench.new_tokens, bench.width
    golden = bench.golden[faults.prompt]
    differs = faulty != golden
    identical = ~differs.any(axis=1)
    first = np.where(identical, -1, differs.argmax(axis=1))
    edit = np.zeros(len(faulty), dtype=np.float64)
    if (~identical).any():
        edit[~identical] = edit_distances(faulty[~identical], golden[~identical]) / n
    after = _apply_np(raw, faults.keep, faults.toggle)  # sign-extended like raw: the int view's values
    effective = after != raw
    sdc = ~identical & ~nonfinite
    by_step = np.zeros((3, n), dtype=np.int64)
    with_step = faults.step >= 0
    for f, flags in enumerate((np.ones_like(sdc), sdc, nonfinite)):
        np.add.at(by_step[f], faults.step[with_step], flags[with_step].astype(np.int64))
    by_bit = np.zeros((3, width), dtype=np.int64)
    for f, flags in enumerate((np.ones_like(sdc), sdc, nonfinite)):
        np.add.at(by_bit[f], faults.bit, flags.astype(np.int64))
    counts = GenerationCounts(len(faulty), int(identical.sum()), int(sdc.sum()), int(nonfinite.sum()), int(effective.sum()),
                              float(edit.sum()), float((edit**2).sum()), by_step, by_bit)
    records = None
    if record != "none":
        keep = np.ones(len(faulty), dtype=bool) if record == "all" else ~identical | nonfinite
        values = lambda bits: torch.from_numpy(bits).to(formats.int_view(bench.dtype)).view(bench.dtype).double().numpy()  # noqa: E731
        records = GenerationRecords(
            prompt=faults.prompt[keep], step=faults.step[keep], position=faults.position[keep],
            kv_position=kv_position[keep], fault_group=faults.group[keep], bit=faults.bit[keep], raw_before=raw[keep],
            value_before=values(raw[keep]), value_after=values(after[keep]), effective=effective[keep],
            identical=identical[keep], first_divergence=first[keep], edit_distance=edit[keep], nonfinite=nonfinite[keep],
            faulty=faulty[keep])
    path = "golden-state" if prefix and kind in ("neuron", "kv") else "full"
    return GenerationOutcome(counts, records, path, logits)


def _apply_np(raw: np.ndarray, keep: np.ndarray | None, toggle: np.ndarray) -> np.ndarray:
    return raw ^ toggle if keep is None else (raw & keep) ^ toggle
