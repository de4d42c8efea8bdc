"""Exact single-bit flips of floating-point tensors through an integer view and XOR.

Bits are numbered IEEE-754 style, least significant bit = 0 (FP32: 31 sign, 30..23
exponent, 22..0 mantissa). The seed study's ``bit_flip_pos`` counts MSB-first; convert it
with :func:`bit_from_msb_first`.
"""
from __future__ import annotations

import torch

INT_VIEW: dict[torch.dtype, torch.dtype] = {
    torch.float16: torch.int16,
    torch.bfloat16: torch.int16,
    torch.float32: torch.int32,
    torch.float64: torch.int64,
}

# (exponent bits, mantissa bits) per supported float dtype.
FIELD_LAYOUT: dict[torch.dtype, tuple[int, int]] = {
    torch.float16: (5, 10),
    torch.bfloat16: (8, 7),
    torch.float32: (8, 23),
    torch.float64: (11, 52),
}


def check_dtype(dtype: torch.dtype) -> None:
    """Raise ValueError unless ``dtype`` is a float dtype the flip supports."""
    if dtype not in INT_VIEW:
        allowed = ", ".join(str(d).replace("torch.", "") for d in INT_VIEW)
        kind = "integer/quantized dtypes are not supported yet" if not dtype.is_floating_point else "unsupported float dtype"
        raise ValueError(f"cannot flip bits of {str(dtype).replace('torch.', '')}: {kind}; supported: {allowed}")


def dtype_width(dtype: torch.dtype) -> int:
    """Number of bits of one element of a supported float dtype."""
    check_dtype(dtype)
    return torch.iinfo(INT_VIEW[dtype]).bits


def check_bit(bit: int, dtype: torch.dtype) -> int:
    """Return ``bit`` if it is a valid LSB-0 bit index for ``dtype``, else raise ValueError."""
    width = dtype_width(dtype)
    if isinstance(bit, bool) or not isinstance(bit, int) or not 0 <= bit < width:
        raise ValueError(
            f"bit {bit!r} is outside {str(dtype).replace('torch.', '')}: allowed 0..{width - 1} (LSB = 0)"
        )
    return bit


def bit_from_msb_first(position: int, dtype: torch.dtype = torch.float32) -> int:
    """Convert the seed study's MSB-first ``bit_flip_pos`` (0 = sign) to an LSB-0 bit index."""
    width = dtype_width(dtype)
    if isinstance(position, bool) or not isinstance(position, int) or not 0 <= position < width:
        raise ValueError(f"MSB-first bit position {position!r} is outside 0..{width - 1}")
    return width - 1 - position


def bit_field(bit: int, dtype: torch.dtype = torch.float32) -> str:
    """'sign', 'exponent' or 'mantissa' for an LSB-0 bit index of ``dtype``."""
    check_bit(bit, dtype)
    exponent_bits, mantissa_bits = FIELD_LAYOUT[dtype]
    if bit < mantissa_bits:
        return "mantissa"
    return "exponent" if bit < mantissa_bits + exponent_bits else "sign"


def bit_masks(bits: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Integer XOR masks ``1 << bits`` in the integer view dtype of float ``dtype``."""
    int_dtype = INT_VIEW[dtype]
    bits = bits.to(int_dtype)
    return torch.ones_like(bits) << bits


def xor_masks(t: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Return a new tensor: ``t`` with its integer view XORed by ``masks`` (no validation)."""
    return (t.view(INT_VIEW[t.dtype]) ^ masks).view(t.dtype)


def flip_bit(t: torch.Tensor, bit: int | torch.Tensor) -> torch.Tensor:
    """Return a new tensor with bit ``bit`` (LSB = 0) flipped in every element of ``t``.

    ``bit`` is an int or an integer tensor broadcastable to ``t``. Works on the tensor's
    own device through an integer view and XOR: exact, and reversible by flipping again.
    """
    check_dtype(t.dtype)
    width = dtype_width(t.dtype)
    if isinstance(bit, torch.Tensor):
        if bit.dtype.is_floating_point or bit.dtype.is_complex or bit.dtype == torch.bool:
            raise ValueError(f"bit tensor must have an integer dtype, got {bit.dtype}")
        if bit.numel() and (int(bit.min()) < 0 or int(bit.max()) >= width):
            raise ValueError(
                f"bit tensor has values outside {str(t.dtype).replace('torch.', '')}: allowed 0..{width - 1} (LSB = 0)"
            )
        bits = bit.to(t.device)
    else:
        bits = torch.tensor(check_bit(bit, t.dtype), device=t.device)
    return xor_masks(t, bit_masks(bits, t.dtype))


def apply_fault(raw: torch.Tensor, keep: torch.Tensor | None, toggle: torch.Tensor) -> torch.Tensor:
    """The faulty bits of integer ``raw``: ``(raw & keep) ^ toggle``, every operand of one width.

    Every fault model is such a pair of masks (trainables.inject.fault_models): flip keeps all
    bits and toggles m; stuck0 keeps ~m; stuck1 keeps ~m and toggles m; random keeps nothing
    and toggles random bits; zero keeps and toggles nothing. ``keep=None`` means all ones (a
    pure XOR: the flip, with no extra kernel).
    """
    return raw ^ toggle if keep is None else (raw & keep) ^ toggle
