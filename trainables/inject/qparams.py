"""qparam sites: the quantization parameters of an int8 model (``--quantize int8``) as fault targets.

Sites, numbered 0.. apart from every other kind, in the converted GraphModule's node order
(its forward order), one per quantization-parameter tensor:

- per quantized module (first call): ``<module>.scale`` and ``<module>.zero_point`` of its
  output (quantized Conv/Linear/BatchNorm/...: a python float and int, or 1-element buffers),
  then, for a packed per-channel weight, ``<module>.weight_scale`` and
  ``<module>.weight_zero_point`` (one element per output channel);
- per quantized functional op FX left in the graph (a ResNet block's ``add_relu``): the
  output scale and zero point buffers it reads, under their own attribute names
  (``layer1_relu_scale_0``, ``layer1_relu_zero_point_0``), where the graph first reads them.

The lifted input quantization (trainables.zoo.quantization) is no site: the evaluated images
are quantized once, before any trial, and a faulty input scale would need the float images.
Symmetric weights' zero points (all zero by construction) are sites all the same: a flip
there is a real fault.

Every element is 32 bits wide, the words fbgemm's requantization uses: a scale is edited as
the bits of its float32 value (PyTorch keeps output scales as python floats and per-channel
weight scales as float64 tensors; every one is a float32 value, checked, since observers
compute them in float32), a zero point as the bits of its int32 value (PyTorch stores int /
int64). The edited value is written back in PyTorch's own type (a float32 value in the
float64, an int32 value in the int64), so the model runs exactly as if that word had flipped.
A weight parameter is edited by rebuilding the per-channel quantized weight from
``module.weight()`` with the edited scales/zero points and ``set_weight_bias``; restoring
puts the original python values, buffer contents and unpacked weight back (bit for bit).
qparam faults always run the full forward pass (no prefix reuse).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import fx, nn

from trainables.inject import formats

WIDTH = 32  # bits of every qparam element: float32 scales, int32 zero points
DTYPE = torch.float32  # the kind's element dtype for the engine: edited through an int32 view
FIELDS = ("scale", "zero_point", "weight_scale", "weight_zero_point")


@dataclass(frozen=True)
class QParamSite:
    """One quantization-parameter tensor of an int8 model (see the module docstring)."""

    index: int
    name: str  # '<module>.scale', ..., or the GraphModule attribute a functional op reads
    module_name: str  # the quantized module ('' for a functional op's buffer of the model itself)
    module_type: str  # its class name, or the quantized op ('add_relu')
    field: str  # scale, zero_point, weight_scale or weight_zero_point
    numel: int  # 1, or the output channels of a per-channel weight
    layer: int | None = None  # the neuron site index of the module's first call; None for functional ops

    @property
    def shape(self) -> tuple[int, ...]:
        return (self.numel,)

    @property
    def call(self) -> int:
        """Always 0: a tensor has no calls (code keyed by (index, name, call) works for every kind)."""
        return 0

    @property
    def is_scale(self) -> bool:
        return self.field.endswith("scale")


def check_bit(bit: int) -> int:
    """``bit`` if it is a bit of a qparam element, else one ValueError line."""
    if isinstance(bit, bool) or not isinstance(bit, int) or not 0 <= bit < WIDTH:
        raise ValueError(f"bit {bit!r} is outside a qparam element ({WIDTH} bits: float32 scales, int32 zero points): "
                         f"allowed 0..{WIDTH - 1} (LSB = 0)")
    return bit


def qparam_sites(model: nn.Module, sites: Sequence = ()) -> list[QParamSite]:
    """The qparam sites of an int8 ``model`` (trainables.zoo.quantization.quantize_int8) in
    the documented order; ``sites`` (its neuron sites) give each module's layer index. []
    for a model that is not int8-quantized."""
    if formats.input_qparams(model) is None or not isinstance(model, fx.GraphModule):
        return []
    layer = {s.name: s.index for s in sites if s.call == 0 and not getattr(s, "container", False)}
    found: list[tuple] = []
    seen: set[str] = set()
    for node in model.graph.nodes:
        if node.op == "call_module" and node.target not in seen:
            seen.add(node.target)
            module = model.get_submodule(node.target)
            kind = type(module).__name__
            for fld in ("scale", "zero_point"):
                if _scalar(getattr(module, fld, None), fld) is not None:
                    found.append((f"{node.target}.{fld}", node.target, kind, fld, 1, layer.get(node.target)))
            weight = formats.packed_weight(module)
            if weight is not None and weight.qscheme() in (torch.per_channel_affine, torch.per_channel_symmetric):
                channels = int(weight.q_per_channel_scales().numel())
                found += [(f"{node.target}.{fld}", node.target, kind, fld, channels, layer.get(node.target))
                          for fld in ("weight_scale", "weight_zero_point")]
        elif node.op == "get_attr" and node.target not in seen and "." not in node.target:
            op = next((u for u in node.users if u.op == "call_function" and "quantized" in str(u.target)), None)
            value = getattr(model, node.target, None)
            fld = "scale" if isinstance(value, torch.Tensor) and value.is_floating_point() else "zero_point"
            if op is not None and _scalar(value, fld) is not None:
                seen.add(node.target)
                found.append((node.target, "", _op_name(op.target), fld, 1, None))
    return [QParamSite(i, *row) for i, row in enumerate(found)]


def _op_name(target: object) -> str:
    """'add_relu' for torch.ops.quantized.add_relu (or its .default overload)."""
    parts = [p for p in str(target).split(".") if p not in ("default", "quantized", "torch", "ops")]
    return parts[-1] if parts else str(target)


def _scalar(value: object, fld: str) -> object:
    """``value`` if it is a scale (float, or 1-element floating tensor) or zero point (int, or
    1-element integer tensor) as ``fld`` says, else None."""
    if isinstance(value, torch.Tensor):
        ok = value.numel() == 1 and not value.is_quantized and value.is_floating_point() == (fld == "scale")
        return value if ok else None
    if fld == "scale":
        return value if isinstance(value, float) else None
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def select_qparams(qsites: Sequence[QParamSite], indices: list[int] | None, types: list[str] | None
                   ) -> tuple[list[QParamSite], list[str]]:
    """The qparam sites of the layers ``indices`` (neuron site indices; None: all, functional
    ops' included) of module types ``types`` (None: all), and one 'field: why' line per problem."""
    pool = [q for q in qsites if indices is None or q.layer in indices]
    pool = [q for q in pool if types is None or q.module_type in types]
    if not qsites:
        return [], ["sites: the model has no quantization parameters (qparam sites need --quantize int8)"]
    if not pool:
        return [], ["layers: none of the selected layers has quantization parameters (qparam sites): "
                    "drop qparam from --sites or select other layers"]
    return pool, []


def qparam_table(qsites: Sequence[QParamSite]) -> str:
    """QParam #, owner type, layer, elements, field, name."""
    width = max([len("Owner type"), *(len(q.module_type) for q in qsites)])
    header = f"{'QParam #':>8}  {'Owner type':>{width}}  {'Layer #':>7}  {'Elements':>8}  {'Stored as':>13}  name"
    lines = [header, "-" * len(header)]
    for q in qsites:
        stored = "float32 bits" if q.is_scale else "int32 bits"
        layer = "-" if q.layer is None else str(q.layer)
        lines.append(f"{q.index:>8}  {q.module_type:>{width}}  {layer:>7}  {q.numel:>8,}  {stored:>13}  {q.name}")
    return "\n".join(lines)


def summary_line(qsites: Sequence[QParamSite]) -> str:
    """How many qparam sites an int8 model has (for ``campaign layers``)."""
    scales = sum(q.numel for q in qsites if q.is_scale)
    zeros = sum(q.numel for q in qsites if not q.is_scale)
    return (f"qparam sites (--sites qparam): {len(qsites)} quantization-parameter tensors, {scales:,} scales "
            f"(float32) and {zeros:,} zero points (int32)")


class QParamMemory:
    """One qparam site's elements as editable 32-bit words, like formats.PackedWeight:
    ``self[offset]`` reads an element's int32 bits, ``self[offset] = bits`` writes them and
    puts the value into the model. :meth:`restore` puts the original objects back."""

    def __init__(self, model: nn.Module, site: QParamSite) -> None:
        self.site = site
        self.owner = model.get_submodule(site.module_name) if site.module_name else model
        if site.field.startswith("weight_"):
            self.original = self.owner.weight()
            self.bias = self.owner.bias()
            values = (self.original.q_per_channel_scales() if site.is_scale
                      else self.original.q_per_channel_zero_points())
        else:
            attr = self._attr()
            self.original = getattr(self.owner, attr)
            self.saved = self.original.clone() if isinstance(self.original, torch.Tensor) else None
            values = torch.as_tensor(self.original).reshape(1)
        if site.is_scale:
            words = values.to(torch.float32)
            if not torch.equal(words.to(values.dtype), values):
                raise ValueError(f"qparam site {site.index} ({site.name}) holds a scale that is not a float32 value")
            self.bits = words.contiguous().view(torch.int32).clone()
        else:
            if values.numel() and (int(values.min()) < -2**31 or int(values.max()) >= 2**31):
                raise ValueError(f"qparam site {site.index} ({site.name}) holds a zero point outside int32")
            self.bits = values.to(torch.int32).contiguous().clone()
        self.layout = self.bits  # contiguous, 1-D: the engine's memory offset is the position

    def _attr(self) -> str:
        return self.site.field if self.site.module_name else self.site.name

    def __getitem__(self, offset: int) -> torch.Tensor:
        return self.bits[offset]

    def __setitem__(self, offset: int, value) -> None:
        self.bits[offset] = value
        self._write()

    def values(self) -> torch.Tensor:
        """The current elements as PyTorch stores them (float64 scales, int64 zero points)."""
        return self.bits.view(torch.float32).double() if self.site.is_scale else self.bits.to(torch.int64)

    def _write(self) -> None:
        site, values = self.site, self.values()
        if site.field.startswith("weight_"):
            w = self.original
            scales = values if site.is_scale else w.q_per_channel_scales()
            zero_points = values if not site.is_scale else w.q_per_channel_zero_points()
            new = torch._make_per_channel_quantized_tensor(w.int_repr(), scales, zero_points, w.q_per_channel_axis())
            self.owner.set_weight_bias(new, self.bias)
        elif self.saved is not None:  # a buffer: written in place, in its own dtype
            self.original.copy_(values.reshape(self.original.shape).to(self.original.dtype))
        else:
            setattr(self.owner, self._attr(), float(values[0]) if site.is_scale else int(values[0]))

    def restore(self) -> None:
        """Put the original value back: python values and unpacked weights as they were, buffers bit for bit."""
        if self.site.field.startswith("weight_"):
            self.owner.set_weight_bias(self.original, self.bias)
        elif self.saved is not None:
            self.original.copy_(self.saved)
        else:
            setattr(self.owner, self._attr(), self.original)

    def decode(self, raw: torch.Tensor, _positions: torch.Tensor) -> torch.Tensor:
        """float64 values of int32 ``raw`` words of this site (scales as float32, zero points as int32)."""
        return raw.view(torch.float32).double() if self.site.is_scale else raw.to(torch.float64)
