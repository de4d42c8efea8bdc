"""The injection engine: golden pass once, then one faulty forward per image batch.

Neuron faults: a forward hook on the site's module faults one element of its output per
image (all images of a batch in one vectorized gather/mask/scatter). Weight faults: one
weight element per group of ``images_per_weight_fault`` consecutive images is faulted in
place, the group's images run, and its saved bits are written back. No model copies.
A fault is a pair of integer masks, new = (raw & keep) ^ toggle (bitflip.apply_fault): the
flip (the default) and the other fault models of trainables.inject.fault_models.
With ``prefix=True`` (trainables.inject.suffix) the fault-free part before the site is computed
once per batch and cached, and each fault runs only the rest: same results, less work.
Mode "int8" (a quantized model) and fp8 weight storage edit 8-bit elements (trainables.inject.formats).

Usable without Ray::

    bench = prepare(model, images, labels, mode="fp32", batch_size=256)
    site = select_sites(bench.sites, "neuron", indices=[3])[0]
    outcome = run_faults(bench, site, "neuron", bit="random", seed=1)
    outcome.counts.misclassification_rate
"""
from __future__ import annotations

import contextlib
import hashlib
from dataclasses import dataclass, field
from typing import Iterator, Literal

import numpy as np
import torch
from torch import nn

from trainables.inject import layers
from trainables.inject import suffix
from trainables.inject import fault_models
from trainables.inject import formats
from trainables.inject import qparams
from trainables.inject import tokens as token_metrics
from trainables.inject.bitflip import INT_VIEW, apply_fault
from trainables.inject.bitpools import BitPool
from trainables.inject.fault_models import FaultModel
from trainables.inject.faults import BitSpec, FaultList
from trainables.inject.sites import (
    ParamSite,
    Site,
    check_logits,
    enumerate_sites,
    find_module,
    find_tensor,
    param_sites,
)
from trainables.stats import wilson_interval

MATH_MODES: dict[str, torch.dtype] = {
    "fp32": torch.float32,  # strict FP32: TF32 disabled for convolutions and matmuls
    "tf32": torch.float32,  # FP32 storage, TF32 arithmetic on GPUs that have it
    "fp16": torch.float16,
    "bf16": torch.bfloat16,
    "int8": torch.quint8,  # a quantized model (trainables.zoo.quantization): quint8 activations, qint8 weights
}
RECORD_LEVELS = ("none", "changed", "all")
# Outcome classes of a fault: non-finite (NaN/inf in the logits: detectable), SDC (finite
# logits, top-1 changed: silent) or masked (the rest). "failures" counts the golden-correct
# images whose top-1 changed or whose logits are non-finite.
COUNT_FIELDS = ("images", "golden_correct", "mismatches", "changed", "nonfinite", "sdc", "failures",
                "effective")  # effective: faults that changed the stored bits (a stuck-at may not)
DEFAULT_IMAGES_PER_WEIGHT_FAULT = 256  # the seed study's batch size
# What a fault is measured by: "classification" (top-1 of (B, classes) logits, the seed's metric) or
# "next-token" (a causal LM's (B, T, V) logits against next-token labels: trainables.inject.tokens)
TASKS = ("classification", token_metrics.TASK)
DEFAULT_GOLDEN_CACHE_MB = 1024.0  # an LM's golden logits (N, T, V) fp32 are kept when they fit; else per window


def check_mode(mode: str) -> torch.dtype:
    """The storage dtype of a math mode; ValueError naming the modes otherwise."""
    if mode not in MATH_MODES:
        raise ValueError(f"unknown math mode {mode!r}: use one of {', '.join(MATH_MODES)}")
    return MATH_MODES[mode]


@contextlib.contextmanager
def math_mode(mode: str) -> Iterator[None]:
    """Set PyTorch's TF32 switches for ``mode`` and restore them afterwards."""
    check_mode(mode)
    saved = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
    allow = mode == "tf32"
    torch.backends.cudnn.allow_tf32 = allow
    torch.backends.cuda.matmul.allow_tf32 = allow
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


@dataclass
class Workbench:
    """A model, its data on one device and its cached golden predictions: built once per
    worker and reused by every trial on it."""

    model: nn.Module
    images: torch.Tensor
    labels: torch.Tensor
    golden: torch.Tensor
    golden_correct: torch.Tensor
    sites: list[Site]
    mode: str
    batch_size: int
    device: torch.device
    prefix: bool = False  # reuse the fault-free prefix of the forward pass (trainables.inject.suffix)
    prefix_cache_mb: float | None = None  # golden-activation cache budget; None: a quarter of free memory
    prefix_state: suffix.PrefixState | None = field(default=None, repr=False, compare=False)
    params: list[ParamSite] = field(default_factory=list)  # param sites (their own numbering)
    weight_format: str | None = None  # fp8 weight storage (trainables.inject.formats); None: the mode's dtype
    qsites: list[qparams.QParamSite] = field(default_factory=list)  # an int8 model's qparam sites (own numbering)
    golden_digest: str = ""  # SHA-256 (16 hex digits) of the golden logits and predictions: equal where kernels agree
    task: str = "classification"  # one of TASKS: what each fault is measured by
    # next-token only: golden (N, T) top-1 per position, golden_nll (N, T) float64 cross-entropy per
    # position against the next token, golden_logits (N, T, V) float32 when within golden_cache_mb (else computed per run_faults window)
    golden_nll: torch.Tensor | None = field(default=None, repr=False)
    golden_logits: torch.Tensor | None = field(default=None, repr=False)
    # next-token only, kept with golden_logits when both fit golden_cache_mb: the head's golden input (N, T, hidden)
    # and which golden rows (N, T) have finite logits; the prefix path then measures only the rows a fault changed
    golden_head_input: torch.Tensor | None = field(default=None, repr=False)
    golden_finite_rows: torch.Tensor | None = field(default=None, repr=False)
    rows_check: str | None = field(default=None, repr=False)  # '' once the metric on a subset of rows was checked exact
    golden_layers: layers.GoldenLayers | None = field(default=None, repr=False)  # prefix reuse on an LM: golden layer outputs

    def site(self, kind: str, index: int) -> Site | ParamSite | qparams.QParamSite | None:
        """The site of ``kind`` with ``index`` (param and qparam sites are numbered apart), or None."""
        pool = self.params if kind == "param" else self.qsites if kind == "qparam" else self.sites
        return next((s for s in pool if s.index == index and (kind != "weight" or s.is_weight_site)), None)

    @property
    def dtype(self) -> torch.dtype:
        return MATH_MODES[self.mode]

    @property
    def width(self) -> int:
        return formats.width(self.dtype)

    def dtype_for(self, kind: str) -> torch.dtype:
        """The dtype of the elements a ``kind`` fault edits: int8 models have quint8 activations
        and qint8 weights; fp8 weight storage stores weights in fp8; else the mode's dtype."""
        if self.mode == "int8" and kind == "weight":
            return torch.qint8
        if kind == "qparam":  # float32 scales and int32 zero points, both edited through an int32 view
            return qparams.DTYPE
        if kind == "weight" and self.weight_format is not None:
            return formats.FP8_FORMATS[self.weight_format]
        return self.dtype

    def width_for(self, kind: str) -> int:
        return formats.width(self.dtype_for(kind))

    def bit_layout(self, kind: str, site=None) -> str:
        """The element format (a bitpools.LAYOUTS name) a ``kind`` fault at ``site`` edits:
        a qparam site's scales are float32 words, its zero points int32."""
        if kind == "qparam":
            return "fp32" if getattr(site, "is_scale", True) else "int32"
        return formats.layout_name(self.dtype_for(kind))

    def resolve_bit(self, kind: str, bit: BitSpec, site=None) -> BitSpec:
        """``bit`` with a bit pool resolved to the bits of the elements a ``kind`` fault at
        ``site`` edits (fields per format); without a site, a qparam pool must fit scales and
        zero points alike. Other bit specs as given."""
        if not isinstance(bit, BitPool):
            return bit
        if kind == "qparam" and site is None:
            bit.resolve("int32", qparams.WIDTH)
        return bit.resolve(self.bit_layout(kind, site), self.width_for(kind))

    def check_fault(self, kind: str, bit: BitSpec, fault: FaultModel | str) -> FaultModel:
        """The parsed fault model, once ``bit`` and ``fault`` fit the elements ``kind`` faults
        edit (8-bit int8/fp8, 32-bit qparams, else the mode's width); one ValueError line otherwise."""
        if isinstance(bit, BitPool):
            bit = bit if bit.bits is not None else self.resolve_bit(kind, bit)
        elif bit != "random":
            qparams.check_bit(bit) if kind == "qparam" else formats.check_bit(bit, self.dtype_for(kind))
        fault = fault_models.parse_fault(fault)
        fault_models.check_fault(fault, self.width_for(kind), bit)
        return fault

    @property
    def num_images(self) -> int:
        return int(self.images.shape[0])

    @property
    def clean_accuracy(self) -> float:
        return float(self.golden_correct.float().mean())


def _as_tensors(data) -> tuple[torch.Tensor, torch.Tensor]:
    if isinstance(data, (tuple, list)) and len(data) == 2 and all(isinstance(t, torch.Tensor) for t in data):
        return data[0], data[1]
    # memory-mapped images (trainables.zoo.datasets.images.MappedImages): read and normalized per slice
    if (isinstance(data, (tuple, list)) and len(data) == 2 and getattr(data[0], "is_mapped_images", False)
            and isinstance(data[1], torch.Tensor)):
        return data[0], data[1]
    if isinstance(data, torch.utils.data.DataLoader):
        xs, ys = zip(*[(x, y) for x, y in data])
        return torch.cat(xs), torch.cat(ys)
    raise TypeError("data must be (images, labels) tensors or a DataLoader yielding (images, labels)")


def prepare(
    model: nn.Module,
    data,
    mode: str = "fp32",
    batch_size: int = 256,
    device: str | torch.device | None = None,
    prefix: bool = False,
    prefix_cache_mb: float | None = None,
    weight_format: str | None = None,
    golden_cache_mb: float = DEFAULT_GOLDEN_CACHE_MB,
) -> Workbench:
    """Move ``model`` and ``data`` to ``device`` in ``mode``'s dtype, list the sites and run
    the golden pass. ``data`` is (images, labels) tensors or a DataLoader. ``prefix`` turns on
    prefix reuse (same results, faster), caching at most ``prefix_cache_mb`` MiB. Mode "int8"
    takes a model from trainables.zoo.quantization.quantize_int8 (CPU only); ``weight_format``
    (fp8_e4m3fn, fp8_e5m2) stores every weight site's weight in fp8 (trainables.inject.formats).
    A causal LM (token ids (N, T) in, logits (N, T, V) out, next-token labels (N, T)) is measured by
    next-token metrics (trainables.inject.tokens); its golden logits are kept within ``golden_cache_mb``."""
    dtype = check_mode(mode)
    formats.check_weight_format(weight_format)
    prefix_cache_mb = suffix.check_budget(prefix_cache_mb)
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    device = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    images, labels = _as_tensors(data)
    if images.dim() < 2 or images.dtype == torch.bool or images.is_complex():
        raise ValueError(f"inputs must be (N, ...) real or integer tensors with a per-example shape, got "
                         f"{images.dtype} of shape {tuple(images.shape)}")
    if images.shape[0] != labels.shape[0] or images.shape[0] == 0:
        raise ValueError(f"need as many labels as images (>0): {images.shape[0]} images, {labels.shape[0]} labels")
    if mode == "int8" or formats.input_qparams(model) is not None:
        formats.check_int8(model, mode, device, weight_format, images)
        model, images = model.eval(), formats.quantize_inputs(model, images)  # input site 0: the quantized image
    else:
        model = model.eval().to(device=device, dtype=dtype)
        # floating inputs take the mode's dtype and are input site 0; integer inputs (token ids) stay as they are
        images = images.to(device=device, dtype=dtype if images.is_floating_point() else None)
    labels = labels.to(device=device, dtype=torch.int64)
    lm = _is_causal_lm(model)
    if lm:
        token_metrics.check_lm_data(images, labels, getattr(model, "context_length", None))
        if mode == "int8" or weight_format is not None:
            raise ValueError("causal LMs run in fp32, tf32, fp16 or bf16 (no int8 or fp8 weight storage yet)")
    with math_mode(mode):
        sites = enumerate_sites(model, images.shape[1:], dtype, input_dtype=images.dtype, containers=True)
        if weight_format is not None:
            formats.store_weights_fp8(model, [s.name for s in sites if s.is_weight_site], weight_format)
        golden = torch.empty_like(labels)
        digest = hashlib.sha256()
        lm_golden = _LMGolden(images, golden_cache_mb) if lm else None
        head = _head_input(model, lm_golden.head_inputs) if lm else contextlib.nullcontext()
        # prefix reuse on a decoder LM: each layer's golden output (and its attention's), for the layer cuts
        golden_layers = layers.GoldenLayers(model, _golden_layers_budget(prefix_cache_mb, device)) if lm and prefix else None
        with torch.inference_mode(), head, golden_layers.recording() if golden_layers else contextlib.nullcontext():
            for lo in range(0, images.shape[0], batch_size):
                if golden_layers is not None:
                    golden_layers.batch = (lo, min(lo + batch_size, images.shape[0]))
                logits = model(images[lo : lo + batch_size])
                check_logits(logits, batch=min(batch_size, images.shape[0] - lo),
                             tokens=images.shape[1] if lm else None)
                golden[lo : lo + batch_size] = logits.argmax(dim=-1)
                if lm_golden is not None:
                    lm_golden.add(lo, logits, labels[lo : lo + batch_size])
                digest.update(logits.float().cpu().contiguous().numpy().tobytes())
        digest.update(golden.cpu().numpy().tobytes())
    extra = {} if lm_golden is None else dict(task=token_metrics.TASK, golden_nll=lm_golden.nll, golden_logits=lm_golden.logits,
                                              golden_head_input=lm_golden.hidden, golden_finite_rows=lm_golden.finite)
    if golden_layers is not None:
        extra["golden_layers"] = golden_layers
    return Workbench(model, images, labels, golden, golden == labels, sites, mode, batch_size, device,
                     prefix=bool(prefix), prefix_cache_mb=prefix_cache_mb, prefix_state=suffix.PrefixState(prefix_cache_mb),
                     params=param_sites(model)[0], weight_format=weight_format,
                     qsites=qparams.qparam_sites(model, sites) if mode == "int8" else [],
                     golden_digest=digest.hexdigest()[:16], **extra)


def _golden_layers_budget(prefix_cache_mb: float | None, device: torch.device) -> float:
    """Bytes for prepare's golden layer outputs: half the prefix budget (the runners' caches have the rest)."""
    return (prefix_cache_mb if prefix_cache_mb is not None else suffix.default_budget_mb(device)) * 2**20 / 2


def _is_causal_lm(model: nn.Module) -> bool:
    """A causal LM (trainables.zoo.sources.hf.CausalLMLogits or any module with ``context_length`` and
    ``vocab_size`` that maps token ids to (B, T, vocab) logits)."""
    return hasattr(model, "context_length") and hasattr(model, "vocab_size")


class _LMGolden:
    """An LM's golden per-sequence cross-entropy, and its golden logits while they fit the budget
    (with the head's golden input and the finite rows while those fit too)."""

    def __init__(self, inputs: torch.Tensor, budget_mb: float) -> None:
        if not isinstance(budget_mb, (int, float)) or budget_mb < 0:
            raise ValueError(f"golden_cache_mb must be a number >= 0, got {budget_mb!r}")
        self.budget, self.inputs = budget_mb * 2**20, inputs
        self.nll = torch.empty(inputs.shape, dtype=torch.float64, device=inputs.device)
        self.logits: torch.Tensor | None = None
        self.keep = True
        self.head_inputs: list[torch.Tensor] = []  # the batch in flight's head input (_head_input)
        self.hidden: torch.Tensor | None = None
        self.finite: torch.Tensor | None = None
        self.keep_hidden = True

    def add(self, lo: int, logits: torch.Tensor, labels: torch.Tensor) -> None:
        self.nll[lo : lo + logits.shape[0]] = token_metrics.token_nll(logits, labels)
        head_input = self.head_inputs.pop() if len(self.head_inputs) == 1 else None
        self.head_inputs.clear()
        if self.keep and self.logits is None:
            n, t = self.inputs.shape
            self.keep = n * t * logits.shape[-1] * 4 <= self.budget
            if self.keep:
                self.logits = torch.empty((n, t, logits.shape[-1]), dtype=torch.float32, device=logits.device)
            self.keep_hidden = self.keep and head_input is not None and head_input.shape[:2] == logits.shape[:2] and \
                n * t * (logits.shape[-1] * 4 + head_input.shape[-1] * head_input.element_size() + 1) <= self.budget
            if self.keep_hidden:
                self.hidden = torch.empty((n, t, head_input.shape[-1]), dtype=head_input.dtype, device=logits.device)
                self.finite = torch.empty((n, t), dtype=torch.bool, device=logits.device)
        if self.keep:
            self.logits[lo : lo + logits.shape[0]] = logits.float()
        if self.keep_hidden and head_input is not None and head_input.shape[:2] == logits.shape[:2]:
            self.hidden[lo : lo + logits.shape[0]] = head_input
            self.finite[lo : lo + logits.shape[0]] = torch.isfinite(logits.amax(dim=-1)) & torch.isfinite(logits.amin(dim=-1))
        elif self.keep_hidden:
            self.keep_hidden, self.hidden, self.finite = False, None, None


def head_module(model: nn.Module) -> tuple[str, nn.Module] | None:
    """(name, module) of a causal LM's output head (transformers' get_output_embeddings), or None."""
    hf = getattr(model, "hf_model", model)
    getter = getattr(hf, "get_output_embeddings", None)
    head = getter() if callable(getter) else None
    if not isinstance(head, nn.Module):
        return None
    return next(((name, m) for name, m in model.named_modules() if m is head), None)


@contextlib.contextmanager
def _head_input(model: nn.Module, into: list) -> Iterator[None]:
    """Append the head's input (B, T, hidden) of each forward to ``into`` (nothing without a head)."""
    found = head_module(model)
    if found is None:
        yield
        return
    handle = found[1].register_forward_pre_hook(lambda _m, args: into.append(args[0]) if args else None)
    try:
        yield
    finally:
        handle.remove()


@dataclass(frozen=True)
class Counts:
    """Per-bit outcome counts of a trial: ``by_bit[f, b]`` for field f of COUNT_FIELDS, bit b."""

    by_bit: np.ndarray  # int64, shape (len(COUNT_FIELDS), width)

    def total(self, name: str) -> int:
        return int(self.by_bit[COUNT_FIELDS.index(name)].sum())

    @property
    def images(self) -> int:
        return self.total("images")

    @property
    def golden_correct(self) -> int:
        return self.total("golden_correct")

    @property
    def mismatches(self) -> int:
        return self.total("mismatches")

    @property
    def misclassification_rate(self) -> float:
        """The seed's metric: golden-correct images whose top-1 changed / golden-correct images."""
        n = self.golden_correct
        return self.mismatches / n if n else float("nan")

    @property
    def sdc_rate(self) -> float:
        """Silent data corruptions (finite logits, top-1 changed) / images."""
        return self.total("sdc") / self.images if self.images else float("nan")

    @property
    def masked(self) -> int:
        return self.images - self.total("sdc") - self.total("nonfinite")

    @property
    def masked_rate(self) -> float:
        return self.masked / self.images if self.images else float("nan")

    @property
    def failure_rate(self) -> float:
        """Like misclassification_rate, counting non-finite logits as failures: golden-correct
        images whose top-1 changed or whose logits are non-finite / golden-correct images."""
        n = self.golden_correct
        return self.total("failures") / n if n else float("nan")

    @property
    def nonfinite_rate(self) -> float:
        return self.total("nonfinite") / self.images if self.images else float("nan")

    def wilson(self) -> tuple[float, float]:
        """Wilson 95% interval of misclassification_rate."""
        return wilson_interval(self.mismatches, self.golden_correct)

    def __add__(self, other: "Counts") -> "Counts":
        return Counts(self.by_bit + other.by_bit)

    @staticmethod
    def zeros(width: int) -> "Counts":
        return Counts(np.zeros((len(COUNT_FIELDS), width), dtype=np.int64))


@dataclass(frozen=True)
class FaultRecords:
    """One row per fault (per image); arrays of equal length."""

    image: np.ndarray
    label: np.ndarray
    golden: np.ndarray
    faulty: np.ndarray
    golden_correct: np.ndarray
    changed: np.ndarray
    nonfinite: np.ndarray
    position: np.ndarray
    fault_group: np.ndarray  # image // images_per_weight_fault for weight faults, -1 for neuron
    bit: np.ndarray
    raw_before: np.ndarray  # the element's bits before the flip, as a signed integer
    value_before: np.ndarray
    value_after: np.ndarray
    effective: np.ndarray | None = None  # the fault changed the stored bits
    fault_mask: np.ndarray | None = None  # the bits the fault targets (~keep | toggle), signed like raw_before

    def __len__(self) -> int:
        return len(self.image)

    def as_dict(self) -> dict[str, np.ndarray]:
        return dict(self.__dict__)


@dataclass(frozen=True)
class Outcome:
    counts: Counts
    records: FaultRecords | None
    path: str = "full"  # "prefix": the suffix ran on cached golden activations; "full": whole forward passes


class _BatchFaults:
    """The faults of the batch in flight, read by the neuron hook."""

    def __init__(self) -> None:
        self.positions: torch.Tensor | None = None
        # the fault of image i as integer masks: new = (raw & keep[i]) ^ toggle[i]; keep None = all ones
        self.keep: torch.Tensor | None = None
        self.toggle: torch.Tensor | None = None
        self.raw_before: torch.Tensor | None = None
        self.output_index: int | None = None  # the element of a tuple/list output that takes the faults
        self.qparams: tuple | None = None  # an int8 site's (scale, zero point, dtype), set by the flip
        self.calls = 0
        self.fired = 0


def _flip_elements(t: torch.Tensor | tuple | list, faults: _BatchFaults) -> torch.Tensor | tuple | list:
    """A copy of ``t`` with element ``positions[i]`` of image i faulted by ``keep[i]``/``toggle[i]``; for a
    tuple or list output (a site's ``output_index``), the same container with that element flipped.

    Positions index each image's elements in logical (C, H, W) order whatever the memory
    format; the copy keeps ``t``'s memory format (channels_last stays channels_last).
    Out of place: a module's output may alias its input (Identity, eval Dropout), and the
    data set tensor must never change.
    """
    if isinstance(t, (tuple, list)):
        i = faults.output_index
        if i is None:
            raise ValueError(f"a {type(t).__name__} output needs the site's output_index")
        flipped = list(t)
        flipped[i] = _flip_elements(t[i], faults)
        if isinstance(t, list):
            return flipped
        return type(t)(*flipped) if hasattr(t, "_fields") else tuple(flipped)  # named tuples keep their type
    out = t.clone() if not t.is_quantized else t  # preserve_format: t's strides when t is dense, else contiguous
    batch_offsets = torch.arange(t.shape[0], device=t.device) * out.stride(0)
    memory = _memory(out) if not t.is_quantized else None
    if out.is_contiguous():
        offsets = batch_offsets + faults.positions
    else:  # dense in another dimension order: map logical positions to memory offsets
        offsets, rest = batch_offsets, faults.positions
        for size, stride in zip(reversed(out.shape[1:]), reversed(out.stride()[1:])):
            offsets = offsets + (rest % size) * stride
            rest = rest // size
    if t.is_quantized:  # an int8 model's activation: edit a copy of its integer representation
        out, faults.raw_before = formats.flip_quantized(t, offsets, faults.keep, faults.toggle)
        faults.qparams = (t.q_scale(), t.q_zero_point(), t.dtype)
        return out
    as_int = memory.view(INT_VIEW[t.dtype])
    raw = as_int[offsets]
    as_int[offsets] = apply_fault(raw, faults.keep, faults.toggle)
    faults.raw_before = raw
    return out


def _memory(t: torch.Tensor) -> torch.Tensor:
    """A 1-D view of the memory of a dense tensor (contiguous in some dimension order)."""
    expected = 1
    for size, stride in sorted(zip(t.shape, t.stride()), key=lambda pair: pair[1]):
        if size != 1 and stride != expected:
            raise ValueError(f"cannot flip in place in a tensor with gaps or overlaps (shape {tuple(t.shape)}, strides {t.stride()})")
        expected *= size
    return t.as_strided((t.numel(),), (1,))


def _memory_offset(t: torch.Tensor, position: int) -> int:
    """Memory offset of the element at flat logical (row-major) ``position`` of ``t``."""
    offset = 0
    for size, stride in zip(reversed(t.shape), reversed(t.stride())):
        offset += (position % size) * stride
        position //= size
    return offset


@contextlib.contextmanager
def neuron_hook(model: nn.Module, site: Site, faults: _BatchFaults) -> Iterator[None]:
    """Hook the site's module so that its ``site.call``-th call per forward gets ``faults``.
    Site 0 (the input) needs no hook: the caller flips the images."""
    if site.index == 0:
        yield
        return
    module = find_module(model, site)

    def hook(_module, _inputs, output):
        call = faults.calls
        faults.calls += 1
        if call == site.call:
            faults.fired += 1
            return _flip_elements(output, faults)
        return None

    handle = module.register_forward_hook(hook, prepend=True)  # before any protection hook: fault, then clamp
    try:
        yield
    finally:
        handle.remove()


def _faulty_logits(model: nn.Module, images: torch.Tensor, site: Site, faults: _BatchFaults) -> torch.Tensor:
    """One faulty forward through the whole model (the full path; trainables.inject.suffix runs the prefix-reuse path)."""
    faults.calls = faults.fired = 0
    if site.index == 0:
        images = _flip_elements(images, faults)
        faults.fired = 1
    logits = model(images)
    if faults.fired != 1:
        raise RuntimeError(
            f"site {site.index} ({site.name}, call {site.call}) fired {faults.fired} times in a forward pass; expected once"
        )
    return logits


def check_range(bench: Workbench, start: int, stop: int | None) -> int:
    stop = bench.num_images if stop is None else stop
    if not 0 <= start < stop <= bench.num_images:
        raise ValueError(f"image range {start}..{stop} is outside 0..{bench.num_images}")
    return stop


def run_faults(
    bench: Workbench,
    site: Site | ParamSite,
    kind: Literal["neuron", "weight", "param", "qparam"],
    bit: BitSpec,
    seed: int,
    start: int = 0,
    stop: int | None = None,
    images_per_weight_fault: int = DEFAULT_IMAGES_PER_WEIGHT_FAULT,
    record: str = "none",
    prefix: bool | None = None,
    fault: FaultModel | str = "flip",
) -> Outcome:
    """Inject one fault per image (neuron) or per image group (weight, param) into images
    ``start..stop-1`` and count the outcomes. Same arguments, same faults, any batch size.
    ``prefix`` (default: the workbench's setting) reuses the fault-free prefix; same results.
    ``fault`` is the fault model (trainables.inject.fault_models): flip, flip:K, burst:K, ..."""
    stop = check_range(bench, start, stop)
    if bench.mode == "int8" and kind == "param":
        raise ValueError("param sites are float tensors; an int8 model's faults go to its neuron and (packed) weight sites")
    if kind == "qparam" and bench.mode != "int8":
        raise ValueError(f"qparam sites are the scales and zero points of an int8 model; this model's mode is {bench.mode}: "
                         f"use --quantize int8")
    bit = bench.resolve_bit(kind, bit, site)
    fault = bench.check_fault(kind, bit, fault)
    if record not in RECORD_LEVELS:
        raise ValueError(f"unknown record level {record!r}: use one of {', '.join(RECORD_LEVELS)}")
    if kind not in ("neuron", "weight", "param", "qparam"):
        raise ValueError(f"unknown site kind {kind!r}: use neuron, weight, param or qparam")
    if (kind == "qparam") != isinstance(site, qparams.QParamSite):
        raise ValueError(f"{kind} faults need {'a QParamSite' if kind == 'qparam' else 'another site'} "
                         f"(bench.site(kind, index)); got {type(site).__name__} {site.index} ({site.name})")
    if (kind == "param") != isinstance(site, ParamSite):
        raise ValueError(f"{kind} faults need a {'ParamSite' if kind == 'param' else 'Site'} (bench.site(kind, index)); "
                         f"got {type(site).__name__} {site.index} ({site.name})")
    if kind == "neuron":
        plan = _neuron_plan(bench, site, bit, seed, start, stop, fault)
    else:
        if kind == "weight" and not site.is_weight_site:
            raise ValueError(f"site {site.index} ({site.name}, {site.module_type}) is not a weight site")
        if not isinstance(images_per_weight_fault, int) or images_per_weight_fault < 1:
            raise ValueError(f"images_per_weight_fault must be a positive integer, got {images_per_weight_fault!r}")
        numel = site.weight_numel if kind == "weight" else site.numel
        plan = _tensor_plan(bench, kind, site.index, numel, bit, seed, start, stop, images_per_weight_fault, fault)
    return _execute(bench, site, plan, start, stop, record, bench.prefix if prefix is None else prefix)


@dataclass
class _Plan:
    """Per-image fault coordinates on the device plus the batching to run them with."""

    kind: str
    positions: torch.Tensor  # per image
    bits: torch.Tensor  # per image; a multi-bit fault's first (lowest) bit
    groups: torch.Tensor  # per image; -1 for neuron faults
    batches: list[tuple[int, int, int]]  # (lo, hi, tensor fault index or -1), image offsets from start
    weight_faults: FaultList | None = None  # the faults of a weight or param plan, one per group
    keep: torch.Tensor | None = None  # per image, the element's integer view dtype; None = all ones (flip)
    toggle: torch.Tensor | None = None  # per image: new = (raw & keep) ^ toggle (bitflip.apply_fault)


def _fault_masks(bench: Workbench, faults: FaultList, index=None, kind: str = "neuron") -> tuple[torch.Tensor | None, torch.Tensor]:
    """A FaultList's keep/toggle masks on the device in the element's integer view dtype (rows ``index``)."""
    def dev(a):
        t = torch.from_numpy(a).to(bench.device).to(formats.int_view(bench.dtype_for(kind)))
        return t if index is None else t[index]
    return (None if faults.keep is None else dev(faults.keep)), dev(faults.toggle)


def _neuron_plan(bench: Workbench, site: Site, bit: BitSpec, seed: int, start: int, stop: int,
                 fault: FaultModel = fault_models.FLIP) -> _Plan:
    faults = fault_models.sample(seed, "neuron", site.index, bit, bench.width_for("neuron"), site.output_numel, start,
                                 stop, fault)
    n = stop - start
    batches = [(lo, min(lo + bench.batch_size, n), -1) for lo in range(0, n, bench.batch_size)]
    to_dev = lambda a: torch.from_numpy(a).to(bench.device)  # noqa: E731
    keep, toggle = _fault_masks(bench, faults)
    return _Plan("neuron", to_dev(faults.positions), to_dev(faults.bits), torch.full((n,), -1, device=bench.device), batches,
                 keep=keep, toggle=toggle)


def _tensor_plan(bench: Workbench, kind: str, index: int, numel: int, bit: BitSpec, seed: int, start: int, stop: int,
                 per_fault: int, fault: FaultModel = fault_models.FLIP) -> _Plan:
    """One fault per group of ``per_fault`` images in a tensor of ``numel`` elements (weight or
    param), drawn on the group counter under (seed, kind, site index)."""
    first_group, last_group = start // per_fault, (stop - 1) // per_fault
    faults = fault_models.sample(seed, kind, index, bit, bench.width_for(kind), numel, first_group, last_group + 1, fault)
    batches = []
    for g in range(first_group, last_group + 1):
        lo, hi = max(g * per_fault, start), min((g + 1) * per_fault, stop)
        batches += [(b - start, min(b + bench.batch_size, hi) - start, g - first_group) for b in range(lo, hi, bench.batch_size)]
    group_of_image = torch.arange(start, stop, device=bench.device) // per_fault
    local = group_of_image - first_group
    positions = torch.from_numpy(faults.positions).to(bench.device)[local]
    bits = torch.from_numpy(faults.bits).to(bench.device)[local]
    keep, toggle = _fault_masks(bench, faults, local, kind)
    return _Plan(kind, positions, bits, group_of_image, batches, faults, keep, toggle)


def _fault_tensor(bench: Workbench, site: Site | ParamSite, kind: str) -> torch.Tensor | None:
    """The tensor a weight or param fault flips in place (detached), None for neuron faults."""
    if kind == "neuron":
        return None
    if kind == "weight":  # an fp8-stored weight is edited in its storage (trainables.inject.formats)
        module = find_module(bench.model, site)
        tensor = module.weight if formats.stored_weight(module) is None else formats.stored_weight(module)
    else:
        tensor = find_tensor(bench.model, site)
    if tensor.dtype != bench.dtype_for(kind):
        raise ValueError(f"{kind} site {site.index} ({site.name}) is {tensor.dtype}, not the {bench.mode} storage "
                         f"dtype {bench.dtype_for(kind)}")
    return tensor.detach()


def _prefix_runner(bench: Workbench, site: Site, plan: _Plan, start: int, weight: torch.Tensor | None):
    """The suffix runner of this (site, kind), or None for the full forward pass."""
    if bench.prefix_state is None:
        bench.prefix_state = suffix.PrefixState(bench.prefix_cache_mb)
    lo, hi, _ = plan.batches[0]
    if bench.task == token_metrics.TASK:  # decoder LMs: cut at decoder-layer boundaries
        return layers.runner_for(bench.prefix_state, bench.model, bench.images, bench.sites, site, plan.kind, weight,
                                 (start + lo, start + hi), bench.device, golden=bench.golden_layers)
    with torch.inference_mode():
        return suffix.runner_for(bench.prefix_state, bench.model, bench.images, site, plan.kind, weight,
                                 _flip_elements, (start + lo, start + hi), bench.device)


def _execute(bench: Workbench, site: Site, plan: _Plan, start: int, stop: int, record: str, prefix: bool = False) -> Outcome:
    n = stop - start
    dev = bench.device
    int_dtype = formats.int_view(bench.dtype_for(plan.kind))
    acc = torch.zeros((len(COUNT_FIELDS), bench.width_for(plan.kind)), dtype=torch.int64, device=dev)
    faulty_all = torch.empty(n, dtype=torch.int64, device=dev)
    nonfinite_all = torch.empty(n, dtype=torch.bool, device=dev)
    raw_all = torch.empty(n, dtype=int_dtype, device=dev)
    golden = bench.golden[start:stop]
    golden_correct = bench.golden_correct[start:stop]
    batch = _BatchFaults()
    batch.output_index = getattr(site, "output_index", None)
    # an int8 model's packed weight: unpacked, edited and repacked (trainables.inject.formats.PackedWeight)
    packed = formats.PackedWeight(find_module(bench.model, site)) if bench.mode == "int8" and plan.kind == "weight" else None
    if plan.kind == "qparam":  # a scale or zero point: 32-bit words put back into the model (trainables.inject.qparams)
        packed = qparams.QParamMemory(bench.model, site)
    weight = _fault_tensor(bench, site, plan.kind) if packed is None else packed.layout
    weight_int = (_memory(weight).view(int_dtype) if packed is None else packed) if weight is not None else None
    flipped: tuple[int, torch.Tensor] | None = None  # (memory offset, saved raw bits) of the faulted weight element
    with math_mode(bench.mode):
        metric = _next_token_metric(bench, site, plan, start, stop) if bench.task == token_metrics.TASK else None
        runner = _prefix_runner(bench, site, plan, start, weight) if prefix and packed is None else None

    def set_weight_fault(index: int) -> None:
        nonlocal flipped
        if flipped is not None:
            weight_int[flipped[0]] = flipped[1]  # write the saved bits back: restored bit for bit
            flipped = None
        if index >= 0:
            offset = _memory_offset(weight, int(plan.weight_faults.positions[index]))
            raw = weight_int[offset].clone()
            wf = plan.weight_faults
            weight_int[offset] = apply_fault(raw, None if wf.keep is None else int(wf.keep[index]), int(wf.toggle[index]))
            flipped = (offset, raw)

    hooked = plan.kind == "neuron" and (runner is None or getattr(runner, "needs_hook", False))
    # prefix reuse asked for: a neuron fault's rows that stay golden are not measured (on the full pass too)
    head_inputs = [] if metric is not None and prefix and hooked and _rows_reusable(bench, site, plan, start) else None
    with math_mode(bench.mode), neuron_hook(bench.model, site, batch) if hooked else contextlib.nullcontext(), \
            _head_input(bench.model, head_inputs) if head_inputs is not None else contextlib.nullcontext():
        try:
            current = None
            for lo, hi, weight_index in plan.batches:
                if weight is not None:
                    if weight_index != current:
                        with torch.no_grad():
                            set_weight_fault(weight_index)
                        raw_group = flipped[1]
                        current = weight_index
                    raw_all[lo:hi] = raw_group
                    with torch.inference_mode():
                        if runner is not None:
                            logits = runner.logits(start + lo, start + hi)
                        else:
                            logits = bench.model(bench.images[start + lo : start + hi])
                else:
                    batch.positions, batch.toggle = plan.positions[lo:hi], plan.toggle[lo:hi]
                    batch.keep = plan.keep[lo:hi] if plan.keep is not None else None
                    with torch.inference_mode():
                        if runner is not None and hooked:  # a layer-boundary cut: the hook flips inside the layer
                            if head_inputs is not None:
                                head_inputs.clear()
                            logits = runner.faulty_logits(start + lo, start + hi, site, batch)
                        elif runner is not None:
                            logits = runner.logits(start + lo, start + hi, batch)
                        else:
                            if head_inputs is not None:
                                head_inputs.clear()
                            logits = _faulty_logits(bench.model, bench.images[start + lo : start + hi], site, batch)
                    raw_all[lo:hi] = batch.raw_before
                if metric is not None:
                    if head_inputs is not None and len(head_inputs) != 1:
                        raise RuntimeError(f"the output head ran {len(head_inputs)} times in a forward pass; expected once")
                    metric.add(lo, hi, logits, head_inputs[0] if head_inputs else None)
                    continue
                faulty_all[lo:hi] = logits.argmax(dim=1)
                nonfinite_all[lo:hi] = ~torch.isfinite(logits).all(dim=1)
        finally:
            if weight is not None:
                with torch.no_grad():
                    set_weight_fault(-1)
            if packed is not None:
                packed.restore()
    path = "prefix" if runner is not None else "full"
    if metric is not None:
        return _next_token_outcome(bench, plan, metric, raw_all, record, path)
    changed = faulty_all != golden
    effective = apply_fault(raw_all, plan.keep, plan.toggle) != raw_all
    values = torch.stack(
        [torch.ones_like(changed), golden_correct, changed & golden_correct, changed, nonfinite_all,
         changed & ~nonfinite_all, golden_correct & (changed | nonfinite_all), effective]
    ).to(torch.int64)
    acc.index_add_(1, plan.bits.to(torch.int64), values)
    counts = Counts(acc.cpu().numpy())
    records = None
    if record != "none":
        keep = torch.ones_like(changed) if record == "all" else changed
        decode = packed.decode if packed is not None else None  # int8 values: (code - zero point) x scale
        if bench.mode == "int8" and plan.kind == "neuron":
            decode = lambda raw, _positions: formats.dequantize_codes(raw, batch.qparams[2], *batch.qparams[:2])  # noqa: E731
        records = _records(bench, plan, start, keep, faulty_all, changed, nonfinite_all, raw_all, effective, decode)
    return Outcome(counts, records, path)


def _rows_reusable(bench: Workbench, site, plan: _Plan, start: int) -> bool:
    """Whether a neuron fault's rows whose head input stays golden may take the golden row values: the
    head's golden input is kept, the site runs before the head, and every batch is one of prepare's
    (same rows, same shape, hence the same head and metric kernels as the golden pass)."""
    if bench.golden_head_input is None or bench.golden_finite_rows is None or plan.kind != "neuron":
        return False
    found = head_module(bench.model)
    if found is None or site.name == found[0] or site.name.startswith(found[0] + "."):
        return False
    n, size = bench.num_images, bench.batch_size
    if not all((start + lo) % size == 0 and (hi - lo == size or start + hi == n) for lo, hi, _ in plan.batches):
        return False
    if bench.rows_check is None:
        bench.rows_check = _check_rows(bench)
    return bench.rows_check == ""


def _check_rows(bench: Workbench) -> str:
    """'' when the metric's kernels give, on every third row of the first batch's golden logits taken
    apart, the golden top-1 and cross-entropy bit for bit (row reductions that do not depend on the
    rows around them, as the changed-rows metric assumes); else why not."""
    hi = min(bench.batch_size, bench.num_images)
    logits = bench.golden_logits[:hi]
    pick = (torch.arange(logits.shape[0] * logits.shape[1], device=logits.device) % 3 == 0).view(logits.shape[:2])
    where = pick.nonzero(as_tuple=True)
    with torch.inference_mode():
        rows = logits[where]
        nll = token_metrics.token_nll(rows, bench.labels[:hi][where])
        same = torch.equal(rows.argmax(dim=-1), bench.golden[:hi][where]) and \
            torch.equal(nll.view(torch.int64), bench.golden_nll[:hi][where].view(torch.int64))
    return "" if same else "the metric on a subset of rows does not reproduce the golden values bit for bit"


def _next_token_metric(bench: Workbench, site, plan: _Plan, start: int, stop: int) -> token_metrics.NextTokenMetric:
    """The next-token metric of a run: the golden logits of start..stop-1 (kept by prepare, or computed
    here with the plan's batches before anything is faulted) and each neuron fault's token position."""
    golden = bench.golden_logits[start:stop] if bench.golden_logits is not None else None
    if golden is None:
        parts = []
        with torch.inference_mode():
            for lo, hi, _ in plan.batches:
                parts.append(bench.model(bench.images[start + lo : start + hi]).float())
        golden = torch.cat(parts)
    tokens = (token_metrics.fault_tokens(plan.positions, site.output_shape, bench.images.shape[1])
              if plan.kind == "neuron" else None)
    return token_metrics.NextTokenMetric(bench, start, stop, tokens, golden)


def _next_token_outcome(bench: Workbench, plan: _Plan, metric: token_metrics.NextTokenMetric, raw: torch.Tensor,
                        record: str, path: str) -> Outcome:
    """Counts (and records) of a next-token run; a causal LM's neuron faults must not change earlier positions."""
    metric.check_causal()
    effective = apply_fault(raw, plan.keep, plan.toggle) != raw
    counts = metric.counts(plan.bits, effective, bench.width_for(plan.kind))
    records = None
    if record != "none":
        keep = torch.ones_like(effective) if record == "all" else metric.token_changes > 0
        idx = keep.nonzero()[:, 0]
        raw_kept = raw[idx]
        fault_keep = plan.keep[idx] if plan.keep is not None else None
        dtype = bench.dtype_for(plan.kind)
        after = apply_fault(raw_kept, fault_keep, plan.toggle[idx])
        targets = plan.toggle[idx] if fault_keep is None else ~fault_keep | plan.toggle[idx]
        records = metric.records(plan, keep, raw_kept, effective, raw_kept.view(dtype).double(), after.view(dtype).double(),
                                 targets)
    return Outcome(counts, records, path)


def _records(bench, plan, start, keep, faulty, changed, nonfinite, raw, effective, decode=None) -> FaultRecords:
    idx = keep.nonzero()[:, 0]
    raw_kept = raw[idx]
    fault_keep = plan.keep[idx] if plan.keep is not None else None
    fault_toggle = plan.toggle[idx]
    dtype = bench.dtype_for(plan.kind)
    decode = decode or (lambda bits, _positions: bits.view(dtype).double())  # float and fp8 elements
    before = decode(raw_kept, plan.positions[idx])
    after = decode(apply_fault(raw_kept, fault_keep, fault_toggle), plan.positions[idx])
    targets = fault_toggle if fault_keep is None else ~fault_keep | fault_toggle
    host = lambda t: t.cpu().numpy()  # noqa: E731
    return FaultRecords(
        image=host(idx + start),
        label=host(bench.labels[start:][idx]),
        golden=host(bench.golden[start:][idx]),
        faulty=host(faulty[idx]),
        golden_correct=host(bench.golden_correct[start:][idx]),
        changed=host(changed[idx]),
        nonfinite=host(nonfinite[idx]),
        position=host(plan.positions[idx]),
        fault_group=host(plan.groups[idx]),
        bit=host(plan.bits[idx]),
        raw_before=host(raw_kept.to(torch.int64)),
        value_before=host(before),
        value_after=host(after),
        effective=host(effective[idx]),
        fault_mask=host(targets.to(torch.int64)),
    )
