"""Counter-based fault sampling: a fault is a pure function of (seed, kind, site, counter).

The counter is the image index for neuron faults and the group index
(``image // images_per_weight_fault``) for weight and param faults, so the fault list is the same for
any batch size, device, evaluation order or retry. Draws use the SplitMix64 sequence
(Steele et al. 2014) keyed by the trial's coordinates, computed with numpy on the host once
per trial. The element position and the bit come from separate streams, so fixed-bit
trials of one (seed, site) hit the same elements for every bit: per-bit comparisons are paired.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Union

import numpy as np

from trainables.inject.bitpools import BitPool, is_pool, parse_pool

BitSpec = Union[int, Literal["random"], BitPool]  # BitPool: 'random:<pool>' (trainables.inject.bitpools)

_GAMMA = np.uint64(0x9E3779B97F4A7C15)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_KIND_SALT = {"neuron": 0x6E6575726F6E, "weight": 0x776569676874, "param": 0x706172616D,
              "qparam": 0x71706172616D, "kv": 0x6B76}  # the names in ASCII; kv: KV-cache sites (generation)
_STREAM_SALT = {"position": 1, "bit": 2, "bits": 3, "value": 4,  # bits, value: fault_models' extra draws
                "site": 5,  # site: the site a proportional trial's fault picks (trainables.inject.proportional)
                "step": 6}  # step: a generation fault's random decode step (trainables.inject.generation)


def _mix64(z: np.ndarray) -> np.ndarray:
    """SplitMix64's output function (a bijection on uint64)."""
    z = np.asarray(z, dtype=np.uint64)
    with np.errstate(over="ignore"):
        z = (z ^ (z >> np.uint64(30))) * _M1
        z = (z ^ (z >> np.uint64(27))) * _M2
    return z ^ (z >> np.uint64(31))


def _stream_key(seed: int, kind: str, site_index: int, stream: str) -> np.uint64:
    key = np.uint64(int(seed) & 0xFFFFFFFFFFFFFFFF)
    with np.errstate(over="ignore"):
        for part in (_KIND_SALT[kind], _STREAM_SALT[stream], int(site_index)):
            key = _mix64(key + _GAMMA * np.uint64(part + 1))
    return np.uint64(key)


def random_words(seed: int, kind: str, site_index: int, stream: str, counters: np.ndarray) -> np.ndarray:
    """uint64 words, one per counter, of the SplitMix64 sequence of one (seed, kind, site, stream)."""
    key = _stream_key(seed, kind, site_index, stream)
    with np.errstate(over="ignore"):
        return _mix64(key + _GAMMA * (np.asarray(counters, dtype=np.uint64) + np.uint64(1)))


def uniform_below(words: np.ndarray, n: int) -> np.ndarray:
    """Map uint64 words to integers uniform in [0, n) (Lemire's multiply-shift on the top 32 bits)."""
    if not 0 < n < 2**32:
        raise ValueError(f"cannot draw uniformly below {n}: need 0 < n < 2**32")
    return (((words >> np.uint64(32)) * np.uint64(n)) >> np.uint64(32)).astype(np.int64)


def parse_bit_spec(value: object) -> BitSpec:
    """'random' / -1 / None -> 'random'; an int or digit string -> that int (range checked later);
    'random:<pool>' -> a BitPool (bitpools.parse_pool; resolved per element format later)."""
    if is_pool(value):
        return parse_pool(value)
    if value is None or (isinstance(value, str) and value.strip().lower() in ("random", "r", "-1")):
        return "random"
    if isinstance(value, bool):
        raise ValueError(f"bad bit spec {value!r}: use an integer bit index or 'random'")
    if isinstance(value, (int, np.integer)):
        return "random" if int(value) == -1 else int(value)
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        return parse_bit_spec(int(value.strip()))
    raise ValueError(f"bad bit spec {value!r}: use an integer bit index or 'random'")


@dataclass(frozen=True)
class FaultList:
    """Faults for consecutive counters starting at ``first``: element positions and LSB-0 bits."""

    first: int
    positions: np.ndarray  # int64, flat index into the per-image output (neuron) or the weight
    bits: np.ndarray  # int64; for a multi-bit fault its first (lowest) bit
    # The fault as masks of the element's width (signed values in int64): new = (raw & keep) ^ toggle.
    # keep None = all ones (a flip). Filled by trainables.inject.fault_models.sample; None from sample_faults.
    keep: np.ndarray | None = None
    toggle: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.positions)


def sample_faults(
    seed: int, kind: str, site_index: int, bit: BitSpec, width: int, numel: int, first: int, stop: int
) -> FaultList:
    """Faults for counters ``first..stop-1`` of one trial: uniform positions below ``numel``;
    bits fixed, uniform below ``width``, or uniform in a bit pool."""
    if kind not in _KIND_SALT:
        raise ValueError(f"unknown site kind {kind!r}")
    counters = np.arange(first, stop, dtype=np.uint64)
    positions = uniform_below(random_words(seed, kind, site_index, "position", counters), numel)
    if bit == "random":
        bits = uniform_below(random_words(seed, kind, site_index, "bit", counters), width)
    elif isinstance(bit, BitPool):  # index into the pool with the same stream: random:0-31 on fp32 == random
        pool = np.asarray(bit.bits_for(width), dtype=np.int64)
        bits = pool[uniform_below(random_words(seed, kind, site_index, "bit", counters), len(pool))]
    else:
        if not 0 <= int(bit) < width:
            raise ValueError(f"bit {bit} is outside a {width}-bit dtype: allowed 0..{width - 1} (LSB = 0)")
        bits = np.full(len(counters), int(bit), dtype=np.int64)
    return FaultList(first, positions, bits)


def derive_seeds(master_seed: int, count: int) -> list[int]:
    """``count`` trial seeds in 1..2**31-1 (the seed study's sweep range) drawn from one master seed."""
    words = random_words(master_seed, "neuron", -1, "position", np.arange(count, dtype=np.uint64))
    return [int(w % np.uint64(2**31 - 1)) + 1 for w in words]
