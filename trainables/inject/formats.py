"""Number formats beyond IEEE fp16/bf16/fp32: int8 quantized tensors and fp8 weight storage.

- int8 (``--quantize int8``, trainables.zoo.quantization): activations are ``quint8`` (codes
  0..255, value = (code - zero_point) x scale; bit 7 is the code's most significant bit,
  worth 128 x scale: an unsigned code has no sign bit), weights are ``qint8`` (two's
  complement, bit 7 = sign). A fault edits the integer representation and the tensor is
  rebuilt with the same scale and zero point; packed weights are unpacked, edited and
  repacked (:class:`PackedWeight`), and restored bit for bit.
- fp8 weight storage (``--weight-format fp8_e4m3fn|fp8_e5m2``): each weight site's weight is
  stored in that dtype (a buffer ``weight_fp8``) and upcast to the compute dtype by a
  forward pre-hook before every call (:func:`store_weights_fp8`); faults edit the 8 stored
  bits (e4m3fn: sign 7, exponent 6-3, mantissa 2-0; e5m2: sign 7, exponent 6-2, mantissa 1-0).

Every 8-bit element is edited through a signed ``int8`` view, so masks and ``raw_before``
are signed like the int32 view of fp32 (a quint8 code 200 reads -56 there).
"""
from __future__ import annotations

import math
import warnings

import torch
from torch import nn

from trainables.inject.bitflip import INT_VIEW, apply_fault

FP8_FORMATS: dict[str, torch.dtype] = {"fp8_e4m3fn": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2}
QUANTIZED = (torch.quint8, torch.qint8)
EIGHT_BIT = (*QUANTIZED, *FP8_FORMATS.values())
STORED_WEIGHT = "weight_fp8"  # the buffer that holds an fp8-stored weight
_DTYPE_NAMES = {torch.quint8: "int8 (quint8 activations)", torch.qint8: "int8 (qint8 weights)",
                torch.float8_e4m3fn: "fp8_e4m3fn", torch.float8_e5m2: "fp8_e5m2"}


def int_view(dtype: torch.dtype) -> torch.dtype:
    """The integer dtype a fault edits elements of ``dtype`` through (int8 for every 8-bit format)."""
    return torch.int8 if dtype in EIGHT_BIT else INT_VIEW[dtype]


def width(dtype: torch.dtype) -> int:
    """Bits per element of a float, fp8 or quantized dtype."""
    return torch.iinfo(int_view(dtype)).bits


_LAYOUTS = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.float8_e4m3fn: "fp8_e4m3fn",
            torch.float8_e5m2: "fp8_e5m2", torch.qint8: "int8", torch.quint8: "uint8"}


def layout_name(dtype: torch.dtype) -> str:
    """The element format name of ``dtype`` (bitpools.LAYOUTS, analysis.tables): fp32, fp8_e5m2, uint8 (quint8), ..."""
    if dtype not in _LAYOUTS:
        raise ValueError(f"no bit layout for {dtype_name(dtype)}")
    return _LAYOUTS[dtype]


def dtype_name(dtype: torch.dtype) -> str:
    return _DTYPE_NAMES.get(dtype, str(dtype).removeprefix("torch."))


def check_bit(bit: int, dtype: torch.dtype) -> int:
    """``bit`` if it is a valid LSB-0 bit index of ``dtype``, else one ValueError line."""
    limit = width(dtype)
    if isinstance(bit, bool) or not isinstance(bit, int) or not 0 <= bit < limit:
        raise ValueError(f"bit {bit!r} is outside {dtype_name(dtype)}: allowed 0..{limit - 1} (LSB = 0)")
    return bit


def check_weight_format(name: object) -> torch.dtype | None:
    """The fp8 dtype of a weight format name (None: the math mode's own dtype); ValueError otherwise."""
    if name is None or name == "native":
        return None
    if name not in FP8_FORMATS:
        raise ValueError(f"unknown weight format {name!r}: use one of {', '.join(FP8_FORMATS)}")
    return FP8_FORMATS[name]


# ---------------------------------------------------------------- int8 models

INPUT_QPARAMS = "bitflip_input_qparams"  # (scale, zero point, dtype) of an int8 model's lifted input quantization


def input_qparams(model: nn.Module) -> tuple[float, int, torch.dtype] | None:
    """The input quantization of a model from trainables.zoo.quantization.quantize_int8, else None."""
    return getattr(model, INPUT_QPARAMS, None)


def quantize_inputs(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Float ``images`` quantized as the int8 ``model``'s own (lifted) input quantization did."""
    scale, zero_point, dtype = input_qparams(model)
    with warnings.catch_warnings():  # torch warns that quantized tensor creation is deprecated
        warnings.filterwarnings("ignore", message=r".*quantized tensor creation functions.*")
        return torch.quantize_per_tensor(images.float(), scale, zero_point, dtype)


def check_int8(model: nn.Module, mode: str, device: torch.device, weight_format: str | None, images: torch.Tensor) -> None:
    """One ValueError line unless an int8 workbench can be built from these."""
    if input_qparams(model) is None:
        raise ValueError("mode int8 needs a quantized model (trainables.zoo.quantization.quantize_int8; --quantize int8)")
    if mode != "int8":
        raise ValueError(f"this model is int8-quantized: its mode is int8, not {mode}")
    if device.type != "cpu":
        raise ValueError(f"int8 quantized models run on the CPU (the x86/fbgemm backend), not {device}: use device cpu")
    if weight_format is not None:
        raise ValueError(f"weight format {weight_format} stores float weights in fp8; an int8 model's weights are "
                         f"int8 already: use --quantize int8 or --weight-format, not both")
    if not images.is_floating_point():
        raise ValueError(f"an int8 model takes float images to quantize, got {images.dtype} inputs")


# ---------------------------------------------------------------- quantized activations


def flip_quantized(t: torch.Tensor, offsets: torch.Tensor, keep: torch.Tensor | None, toggle: torch.Tensor
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """(a new per-tensor quantized tensor, the edited elements' raw int8-view bits before):
    ``t``'s integer representation with the elements at memory ``offsets`` set to
    ``apply_fault(raw, keep, toggle)``, rebuilt with ``t``'s scale and zero point and strides."""
    if t.qscheme() not in (torch.per_tensor_affine, torch.per_tensor_symmetric):
        raise ValueError(f"neuron faults need a per-tensor quantized output, got {t.qscheme()}")
    out = torch._make_per_tensor_quantized_tensor(codes_of(t), t.q_scale(), t.q_zero_point())  # a copy, t's strides
    codes = codes_of(out)
    memory = codes.as_strided((codes.numel(),), (1,)).view(torch.int8)
    raw = memory[offsets]
    memory[offsets] = apply_fault(raw, keep, toggle)
    return out, raw


def codes_of(t: torch.Tensor) -> torch.Tensor:
    """The integer codes of quantized ``t`` as a uint8/int8 tensor sharing its memory and strides:
    no copy (``int_repr()`` copies, and slowly for channels_last tensors)."""
    dtype = torch.uint8 if t.dtype == torch.quint8 else torch.int8
    return torch.empty(0, dtype=dtype, device=t.device).set_(t.untyped_storage(), t.storage_offset(), t.size(), t.stride())


def dequantize_codes(raw: torch.Tensor, dtype: torch.dtype, scale, zero_point) -> torch.Tensor:
    """float64 values of int8-view ``raw`` bits of a ``dtype`` (quint8/qint8) element with
    ``scale`` and ``zero_point`` (scalars, or tensors aligned with ``raw``)."""
    codes = (raw.view(torch.uint8) if dtype == torch.quint8 else raw).to(torch.float64)
    return (codes - torch.as_tensor(zero_point, dtype=torch.float64, device=raw.device)) * torch.as_tensor(
        scale, dtype=torch.float64, device=raw.device)


# ---------------------------------------------------------------- packed int8 weights


def is_packed(module: nn.Module) -> bool:
    """A quantized module whose weight lives packed (quantized Conv/Linear): ``weight()`` unpacks it."""
    return callable(getattr(module, "weight", None)) and hasattr(module, "set_weight_bias")


def packed_weight(module: nn.Module) -> torch.Tensor | None:
    """The unpacked quantized weight of a packed module, else None."""
    if not is_packed(module):
        return None
    w = module.weight()
    return w if isinstance(w, torch.Tensor) and w.is_quantized else None


class PackedWeight:
    """A packed int8 weight as an editable int8 memory: ``self[offset]`` reads an element's
    bits, ``self[offset] = bits`` writes them and repacks. Offsets index the contiguous
    (out, in, ...) layout. :meth:`restore` repacks the original unpacked weight."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module
        self.original = module.weight()
        self.bias = module.bias()
        self.codes = self.original.int_repr().contiguous()  # int8, (out, in, ...)
        self.flat = self.codes.view(-1)
        self.layout = self.codes  # for the engine's memory offsets: contiguous, so offset = position
        w = self.original
        if w.qscheme() in (torch.per_channel_affine, torch.per_channel_symmetric):
            self.axis = w.q_per_channel_axis()
            self.scales = w.q_per_channel_scales().to(torch.float64)
            self.zero_points = w.q_per_channel_zero_points()
        else:
            self.axis, self.scales, self.zero_points = None, float(w.q_scale()), int(w.q_zero_point())

    def __getitem__(self, offset: int) -> torch.Tensor:
        return self.flat[offset]

    def __setitem__(self, offset: int, value) -> None:
        self.flat[offset] = value
        self._repack()

    def _repack(self) -> None:
        w = self.original
        if self.axis is not None:
            new = torch._make_per_channel_quantized_tensor(self.codes, w.q_per_channel_scales(),
                                                           w.q_per_channel_zero_points(), self.axis)
        else:
            new = torch._make_per_tensor_quantized_tensor(self.codes, w.q_scale(), w.q_zero_point())
        self.module.set_weight_bias(new, self.bias)

    def restore(self) -> None:
        """Put the original packed weight back (the engine also writes back the saved bits)."""
        self.module.set_weight_bias(self.original, self.bias)

    def decode(self, raw: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """float64 values of int8 ``raw`` bits at flat ``positions`` of this weight."""
        if self.axis is None:
            return dequantize_codes(raw, torch.qint8, self.scales, self.zero_points)
        inner = math.prod(self.codes.shape[self.axis + 1:])
        channel = (positions // inner) % self.codes.shape[self.axis]
        return dequantize_codes(raw, torch.qint8, self.scales.to(raw.device)[channel],
                                self.zero_points.to(raw.device)[channel])


# ---------------------------------------------------------------- fp8 weight storage


def stored_weight(module: nn.Module) -> torch.Tensor | None:
    """The fp8 storage of a module converted by :func:`store_weights_fp8`, else None."""
    return getattr(module, STORED_WEIGHT, None)


def _upcast(module: nn.Module, _args) -> None:
    module.weight = module.weight_fp8.to(module.weight_compute_dtype)


def store_weights_fp8(model: nn.Module, names: list[str], fmt: str) -> None:
    """Store the weight of each module in ``names`` (weight sites) as ``fmt`` (fp8) in a buffer
    ``weight_fp8``, replacing the ``weight`` parameter by a plain tensor that a forward
    pre-hook recomputes (upcast to the weight's former dtype) before every call. Module names,
    and so site indices and names, do not change."""
    dtype = check_weight_format(fmt)
    if not names:
        raise ValueError(f"weight format {fmt}: the model has no weight sites (leaf modules with a floating weight) "
                         f"to store in fp8")
    for name in names:
        module = model.get_submodule(name)
        weight = module.weight
        if stored_weight(module) is not None or not isinstance(weight, nn.Parameter):
            raise ValueError(f"{name}: weight is not a parameter that can be stored as {fmt}")
        compute = weight.dtype
        del module.weight
        module.register_buffer(STORED_WEIGHT, weight.detach().to(dtype))
        module.weight_compute_dtype = compute
        module.weight = module.weight_fp8.to(compute)
        module.register_forward_pre_hook(_upcast)
