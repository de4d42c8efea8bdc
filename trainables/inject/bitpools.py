"""Bit pools: a bit spec ``random:<pool>`` draws each fault's bit(s) uniformly from a set of bits.

A pool is one bit spec (one trial per site and seed), not one trial per bit. Its parts are
joined by ``+`` (commas separate the bit specs of different trials): bits ``23``, ranges
``23-30`` and the fields ``sign``, ``exponent``, ``mantissa`` (IEEE formats) and ``magnitude``
(integer formats) of the faulted element's format, as in ``random:23-30``,
``random:23+25+30``, ``random:exponent`` or ``random:exponent+31``. Fields resolve per site:
``random:exponent`` is bits 30-23 of an fp32 element and 6-3 of an fp8_e4m3fn weight.

With a pool, ``flip``/``stuck0``/``stuck1`` draw their bit, and ``burst:K`` its start bit,
uniformly from the pool (the ``bit`` stream, as for ``random``: ``random:0-31`` on fp32 draws
exactly the bits ``random`` draws); ``flip:K`` draws a uniform K-subset of the pool (the
``bits`` stream); ``random`` and ``zero`` take no pool. This module imports neither torch nor numpy.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

PREFIX = "random:"
FIELD_NAMES = ("sign", "exponent", "mantissa", "magnitude")
# element format -> field -> (highest, lowest) bit, LSB = 0 (analysis.tables derives its formats from these)
LAYOUTS: dict[str, dict[str, tuple[int, int]]] = {
    "fp32": {"sign": (31, 31), "exponent": (30, 23), "mantissa": (22, 0)},
    "fp16": {"sign": (15, 15), "exponent": (14, 10), "mantissa": (9, 0)},
    "bf16": {"sign": (15, 15), "exponent": (14, 7), "mantissa": (6, 0)},
    "fp8_e4m3fn": {"sign": (7, 7), "exponent": (6, 3), "mantissa": (2, 0)},
    "fp8_e5m2": {"sign": (7, 7), "exponent": (6, 2), "mantissa": (1, 0)},
    "int8": {"sign": (7, 7), "magnitude": (6, 0)},  # qint8 weights of an int8 model (two's complement)
    "uint8": {"magnitude": (7, 0)},  # quint8 activation codes: no sign bit
    "int32": {"sign": (31, 31), "magnitude": (30, 0)},  # qparam zero points
}
LAYOUTS["tf32"] = LAYOUTS["fp32"]  # fp32 storage
WIDTHS = {name: max(high for high, _ in fields.values()) + 1 for name, fields in LAYOUTS.items()}
_LAYOUT_NAMES = {"uint8": "uint8 (quint8 activation codes)", "int8": "int8 (qint8 weights)", "int32": "int32 (zero points)",
                 "fp32": "fp32", "tf32": "fp32 (tf32 mode)"}


def is_pool(value: object) -> bool:
    """True for a BitPool or a text that starts with 'random:'."""
    return isinstance(value, BitPool) or (isinstance(value, str) and value.strip().lower().startswith(PREFIX))


@dataclass(frozen=True)
class BitPool:
    """A pool as written (fields, merged numeric ranges) and, once resolved for an element
    format, its bits ascending. ``str()`` is the canonical text recorded as ``bit_spec``."""

    fields: tuple[str, ...] = ()  # in FIELD_NAMES order
    ranges: tuple[tuple[int, int], ...] = ()  # (low, high), ascending, merged
    bits: tuple[int, ...] | None = None  # resolved: ascending, distinct

    def __str__(self) -> str:
        numbers = [f"{a}" if a == b else f"{a}-{b}" for a, b in self.ranges]
        return PREFIX + "+".join([*self.fields, *numbers])

    @property
    def numbers(self) -> tuple[int, ...]:
        """The numeric bits listed (fields not included)."""
        return tuple(b for a, c in self.ranges for b in range(a, c + 1))

    def resolve(self, layout: str | None, width: int) -> BitPool:
        """This pool with ``bits`` for a ``width``-bit element of format ``layout`` (a LAYOUTS
        name; None: numeric pools only). One ValueError line for a bit outside the width or a
        field the format lacks."""
        bits = set()
        for b in self.numbers:
            if not 0 <= b < width:
                raise ValueError(f"bit pool {self}: bit {b} is outside a {width}-bit element: allowed 0..{width - 1} (LSB = 0)")
            bits.add(b)
        if self.fields and layout not in LAYOUTS:
            raise ValueError(f"bit pool {self} names fields, which need an element format (one of {', '.join(LAYOUTS)}), "
                             f"not {layout!r}")
        for name in self.fields:
            fields = LAYOUTS[layout]
            if name not in fields:
                have = ", ".join(f"{f} {h}" if h == lo else f"{f} {h}-{lo}" for f, (h, lo) in fields.items())
                raise ValueError(f"bit pool {self}: {_LAYOUT_NAMES.get(layout, layout)} has no {name} field "
                                 f"(its fields: {have})")
            high, low = fields[name]
            if high >= width:
                raise ValueError(f"bit pool {self}: the {layout} {name} field (bits {high}-{low}) does not fit a {width}-bit element")
            bits.update(range(low, high + 1))
        return BitPool(self.fields, self.ranges, tuple(sorted(bits)))

    def bits_for(self, width: int) -> tuple[int, ...]:
        """The resolved bits (numeric pools resolve here), each checked against ``width``."""
        if self.bits is None:
            if self.fields:
                raise ValueError(f"bit pool {self} names fields: resolve it for the element's format first "
                                 f"(BitPool.resolve, or the engine's Workbench.resolve_bit)")
            return self.resolve(None, width).bits
        if self.bits and self.bits[-1] >= width:
            raise ValueError(f"bit pool {self}: bit {self.bits[-1]} is outside a {width}-bit element: allowed 0..{width - 1}")
        return self.bits


def parse_pool(value: object) -> BitPool:
    """'random:23-30', 'random:23+25+30', 'random:exponent', 'random:exponent+31' -> BitPool
    (unresolved); one ValueError line for anything else."""
    if isinstance(value, BitPool):
        return value
    text = str(value).strip().lower().replace(" ", "")
    if not text.startswith(PREFIX):
        raise ValueError(f"bad bit pool {value!r}: a pool starts with random:, as in random:23-30 or random:exponent")
    body = text[len(PREFIX):]
    if not body:
        raise ValueError(f"bit pool {value!r} is empty: list its bits after random:, as in random:23-30, "
                         f"random:23+25+30 or random:exponent")
    if "," in body:
        raise ValueError(f"bit pool {value!r}: join a pool's bits with +, as in random:{body.replace(',', '+')} "
                         f"(commas separate the bit specs of different trials)")
    fields, spans = set(), []
    for part in body.split("+"):
        m = re.fullmatch(r"(\d+)(?:-(\d+))?", part)
        if part in FIELD_NAMES:
            fields.add(part)
        elif m is not None:
            low, high = int(m.group(1)), int(m.group(2) if m.group(2) is not None else m.group(1))
            if high < low:
                raise ValueError(f"bit pool {value!r}: range {part} is reversed: write {high}-{low}")
            spans.append((low, high))
        else:
            raise ValueError(f"bit pool {value!r}: cannot read {part!r}: join bits (23), ranges (23-30) and fields "
                             f"({', '.join(FIELD_NAMES)}) with +")
    ranges: list[tuple[int, int]] = []
    for low, high in sorted(spans):
        if ranges and low <= ranges[-1][1] + 1:
            ranges[-1] = (ranges[-1][0], max(ranges[-1][1], high))
        else:
            ranges.append((low, high))
    pool = BitPool(tuple(f for f in FIELD_NAMES if f in fields), tuple(ranges))
    if not fields and len(pool.numbers) == 1:
        b = pool.numbers[0]
        raise ValueError(f"bit pool {value!r} holds one bit: write {b} for a fixed bit, or join a pool's bits with + "
                         f"(random:{b}+...); a comma starts another bit spec")
    return pool


def key_text(bit_spec: object) -> str:
    """A bit spec as the trial key holds it: 'random:23-30' -> 'random23-30', '+' -> '_'
    (file- and object-store-safe); plain specs ('random', '30') unchanged. Pools are made
    canonical first, so equal pools share a key."""
    text = str(parse_pool(bit_spec)) if is_pool(bit_spec) else str(bit_spec)
    return text.replace(":", "").replace("+", "_")
