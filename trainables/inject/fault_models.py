"""Fault models beyond one flipped bit: each fault is a pair of integer masks of the
element's width, applied as ``new = (raw & keep) ^ toggle`` (bitflip.apply_fault).

| model | bits it targets (mask m) | keep | toggle |
|---|---|---|---|
| ``flip`` (default) | the drawn or given bit | all ones (None) | m |
| ``flip:K`` | K distinct bits (a uniform K-subset of the width or of a bit pool); a given bit is the lowest | all ones | m |
| ``burst:K`` | K adjacent bits from the drawn or given bit up, clipped to the width | all ones | m |
| ``stuck0`` / ``stuck1`` | the drawn or given bit, forced to 0 / 1 | ~m | 0 / m |
| ``random`` | every bit, replaced by random bits | 0 | random word |
| ``zero`` | every bit, cleared | 0 | 0 |

Draws stay counter-based: positions and the first bit come from the same streams as a
``flip`` (faults.sample_faults), so every model of one (seed, site) hits the same elements,
and stuck-at faults the same bits, as the flip. flip:K's further bits and random's words
come from streams of their own ("bits", "value"), so a ``flip`` never moves. A bit pool
(``random:<pool>``, trainables.inject.bitpools) draws the bit from the pool on the same streams.
A fault's "first bit" (its per-bit table index and ``bit`` column) is the lowest bit it
targets: bit 0 for the whole-element models ``random`` and ``zero``.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

from trainables.inject.bitpools import BitPool
from trainables.inject.faults import BitSpec, FaultList, random_words, sample_faults, uniform_below

MODEL_NAMES = ("flip", "burst", "stuck0", "stuck1", "random", "zero")
_WITH_K = ("flip", "burst")
WHOLE_ELEMENT = ("random", "zero")
_MAX_K = 64  # flip:K draws K words per fault on counters counter * 64 + j


@dataclass(frozen=True)
class FaultModel:
    """One fault model: its name and, for flip/burst, the number of bits K."""

    name: str = "flip"
    k: int = 1

    def __str__(self) -> str:
        return f"{self.name}:{self.k}" if self.name in _WITH_K and self.k != 1 else self.name

    @property
    def is_flip(self) -> bool:
        """Today's single-bit flip (the default; its trial keys and results never change)."""
        return self.name == "flip" and self.k == 1

    @property
    def whole_element(self) -> bool:
        """random and zero replace every bit: they take no bit position (bits must be 'random')."""
        return self.name in WHOLE_ELEMENT

    @property
    def key_suffix(self) -> str:
        """What the trial key gets appended: '' for flip (today's keys), else '-burst2', '-stuck0', ..."""
        return "" if self.is_flip else "-" + str(self).replace(":", "")


FLIP = FaultModel()


def parse_fault(value: object) -> FaultModel:
    """'flip', 'flip:K', 'burst:K', 'stuck0', 'stuck1', 'random' or 'zero' -> FaultModel
    (flip:1 and burst:1 are the flip). K's upper bound is checked against a width by check_fault."""
    if isinstance(value, FaultModel):
        return value
    if value is None:
        return FLIP
    if not isinstance(value, str):
        raise ValueError(f"bad fault model {value!r}: use one of flip, flip:K, burst:K, stuck0, stuck1, random, zero")
    name, sep, k_text = value.strip().lower().partition(":")
    if name not in MODEL_NAMES:
        raise ValueError(f"unknown fault model {value!r}: use one of flip, flip:K, burst:K, stuck0, stuck1, random, zero")
    if not sep:
        return FaultModel(name)
    if name not in _WITH_K:
        raise ValueError(f"fault model {name} takes no bit count (got {value!r}); only flip:K and burst:K do")
    if not k_text.strip().isdigit() or int(k_text) < 1:
        raise ValueError(f"bad bit count in fault model {value!r}: K must be a positive integer, as in {name}:2")
    k = int(k_text)
    return FLIP if k == 1 else FaultModel(name, k)


def parse_faults(value: object) -> tuple[FaultModel, ...]:
    """A fault model or a list of them ('flip,burst:2' or a YAML list), in order, duplicates refused."""
    items = value.split(",") if isinstance(value, str) else list(value) if isinstance(value, (list, tuple)) else [value]
    models = tuple(parse_fault(v) for v in items)
    if not models:
        raise ValueError("no fault model given: use e.g. flip, or flip,burst:2")
    seen = [str(m) for m in models]
    duplicate = next((m for m in seen if seen.count(m) > 1), None)
    if duplicate:
        raise ValueError(f"fault model {duplicate} is listed twice in {','.join(seen)}")
    return models


def check_fault(fault: FaultModel, width: int, bit: BitSpec = "random") -> None:
    """ValueError unless ``fault`` fits a ``width``-bit element with bit spec ``bit``."""
    if fault.k > min(width, _MAX_K):
        raise ValueError(f"fault model {fault} needs {fault.k} bits but an element has {width}: K must be 1..{min(width, _MAX_K)}")
    if fault.whole_element and bit != "random":
        raise ValueError(f"fault model {fault} replaces every bit and takes no bit position: use bits 'random', not {str(bit)!r}")
    if isinstance(bit, BitPool) and fault.name == "flip" and fault.k > 1:
        pool = bit.bits_for(width)
        if fault.k > len(pool):
            raise ValueError(f"fault model {fault} needs {fault.k} distinct bits but bit pool {bit} holds {len(pool)} "
                             f"in a {width}-bit element: K must be 1..{len(pool)}")


def to_signed(masks: np.ndarray, width: int) -> np.ndarray:
    """Unsigned ``width``-bit masks (uint64) as the signed int64 values of that width's integer
    view (bit width-1 set -> negative), ready for ``torch.tensor(...).to(int view dtype)``."""
    masks = np.asarray(masks, dtype=np.uint64)
    if width == 64:
        return masks.view(np.int64)
    low = masks & np.uint64((1 << width) - 1)
    sign = (low >> np.uint64(width - 1)).astype(np.int64)
    return low.astype(np.int64) - (sign << np.int64(width))


def _distinct_bits(seed: int, kind: str, site_index: int, counters: np.ndarray, k: int, width: int,
                   lowest: int | None, among: tuple[int, ...] | None = None) -> np.ndarray:
    """Per counter, a uint64 mask of k distinct bits drawn uniformly (a partial Fisher-Yates: a
    uniform k-subset) of the width, or of the bits ``among`` (a bit pool); with ``lowest``
    given, that bit plus k-1 distinct bits above it (fewer where too few exist)."""
    n = len(counters)
    base = 0 if lowest is None else lowest + 1
    row = np.arange(base, width, dtype=np.int64) if among is None else np.asarray(among, dtype=np.int64)
    pool = len(row)
    take = k if lowest is None else min(k - 1, pool)
    candidates = np.tile(row, (n, 1))
    rows = np.arange(n)
    with np.errstate(over="ignore"):
        for j in range(take):
            words = random_words(seed, kind, site_index, "bits", counters * np.uint64(_MAX_K) + np.uint64(j))
            pick = j + uniform_below(words, pool - j)
            chosen = candidates[rows, pick]
            candidates[rows, pick] = candidates[:, j]
            candidates[:, j] = chosen
    masks = np.zeros(n, dtype=np.uint64)
    for j in range(take):
        masks |= np.uint64(1) << candidates[:, j].astype(np.uint64)
    if lowest is not None:
        masks |= np.uint64(1) << np.uint64(lowest)
    return masks


def masks_for(fault: FaultModel, seed: int, kind: str, site_index: int, bit: BitSpec, width: int,
              counters: np.ndarray, drawn_bits: np.ndarray) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
    """(first bits, keep or None, toggle) for ``counters``, given the flip's bit draws
    ``drawn_bits`` of the same counters. Masks are signed int64 values of ``width`` bits."""
    counters = np.asarray(counters, dtype=np.uint64)
    all_ones = np.uint64((1 << width) - 1) if width < 64 else np.uint64(2**64 - 1)
    one = np.uint64(1)
    if fault.whole_element:
        first = np.zeros(len(counters), dtype=np.int64)
        keep = np.zeros(len(counters), dtype=np.int64)
        if fault.name == "zero":
            return first, keep, np.zeros(len(counters), dtype=np.int64)
        return first, keep, to_signed(random_words(seed, kind, site_index, "value", counters) & all_ones, width)
    if fault.name == "flip" and fault.k > 1:
        if isinstance(bit, BitPool):  # a uniform K-subset of the pool
            targets = _distinct_bits(seed, kind, site_index, counters, fault.k, width, None, bit.bits_for(width))
        else:
            targets = _distinct_bits(seed, kind, site_index, counters, fault.k, width, None if bit == "random" else int(bit))
    elif fault.name == "burst":
        start = drawn_bits.astype(np.uint64)
        run = (one << np.uint64(fault.k)) - one if fault.k < 64 else all_ones
        targets = (run << start) & all_ones
    else:
        targets = one << drawn_bits.astype(np.uint64)
    first = _lowest_bit(targets)
    m = to_signed(targets, width)
    if fault.name == "stuck0":
        return first, ~m, np.zeros_like(m)
    if fault.name == "stuck1":
        return first, ~m, m
    return first, None, m


def _lowest_bit(masks: np.ndarray) -> np.ndarray:
    """Index of the lowest set bit of each (non-zero) uint64 mask."""
    masks = np.asarray(masks, dtype=np.uint64)
    with np.errstate(over="ignore"):
        isolated = masks & (~masks + np.uint64(1))
    return np.log2(isolated.astype(np.float64)).astype(np.int64)  # exact: a power of two


def sample(seed: int, kind: str, site_index: int, bit: BitSpec, width: int, numel: int, first: int, stop: int,
           fault: FaultModel = FLIP) -> FaultList:
    """faults.sample_faults plus the fault model's masks: for ``flip`` the same positions and
    bits, with toggle = 1 << bit; other models keep the positions (and the drawn bit as their
    first bit where they have one)."""
    check_fault(fault, width, bit)
    faults = sample_faults(seed, kind, site_index, bit, width, numel, first, stop)
    counters = np.arange(first, stop, dtype=np.uint64)
    bits, keep, toggle = masks_for(fault, seed, kind, site_index, bit, width, counters, faults.bits)
    return dataclasses.replace(faults, bits=bits, keep=keep, toggle=toggle)


def target_masks(keep: np.ndarray | None, toggle: np.ndarray) -> np.ndarray:
    """The bits a fault may change, as signed int64 of the masks' width: ~keep | toggle."""
    return toggle if keep is None else ~keep | toggle
