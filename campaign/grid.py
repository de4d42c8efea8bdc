"""A campaign's trials as a lazy grid: its ordered axes (per kind its sites, the seeds, the
(fault, bit) units) and index -> TrialPlan, so that planning a million-trial campaign does not
build a million objects. The driver tracks trials by key (trainables.results.trial_key); a
grid's keys are parsed back to their index rather than stored."""
from __future__ import annotations

import bisect
import collections
import functools
import re
from collections.abc import Iterator, Sequence, Set
from dataclasses import dataclass

from campaign.spec import TrialPlan
from trainables.results import trial_key

# A trial key's parts: kind, site (0005 or all), bit spec text, seed, fault suffix ('' for flip).
_KEY = re.compile(r"(?P<kind>[^-]+)-s(?P<site>[^-]+)-b(?P<bit>.+)-seed(?P<seed>\d+)(?P<fault>-.+)?")


_SENTINEL_SEED = 7_391_846_205_113_527_019  # a seed whose digits no other part of a key holds


def _around_seed(kind: str, site: int, bit, fault: str) -> tuple[str, str | None]:
    """(head, tail): trial_key(kind, site, bit, seed, fault) == head + str(seed) + tail for every seed,
    checked on the sentinel and one more seed; (head, None) where the key is not made so."""
    text = str(_SENTINEL_SEED)
    key = trial_key(kind, site, bit, _SENTINEL_SEED, fault)
    head, sep, tail = key.partition(text)
    if sep and text not in tail and trial_key(kind, site, bit, 12, fault) == f"{head}12{tail}":
        return head, tail
    return key, None


def _parts(key: str) -> dict[str, str] | None:
    match = _KEY.fullmatch(key)
    return None if match is None else {k: v or "" for k, v in match.groupdict().items()}


@dataclass(frozen=True)
class GridBlock:
    """The trials of one site kind: each site x each seed x each (fault, bit), in that order."""

    kind: str
    sites: tuple[int, ...]
    units: tuple[tuple[str, int | str], ...]  # (fault, bit spec), in trial order


@dataclass(frozen=True, eq=False)
class TrialGrid(Sequence):
    """The trials of a campaign in site-major order (kind, site, seed, fault, bit), computed on
    demand; ``stop``: only the first ``stop`` of them."""

    blocks: tuple[GridBlock, ...]
    seeds: tuple[int, ...]
    stop: int | None = None

    @classmethod
    def site_major(cls, kinds, sites: dict, seeds, fault_bits: dict) -> TrialGrid:
        """The grid of ``for kind in kinds for site in sites[kind] for seed in seeds for fault,
        bits in fault_bits[kind] for bit in bits``."""
        return cls(tuple(GridBlock(kind, tuple(sites[kind]), tuple((f, b) for f, bits in fault_bits[kind] for b in bits))
                         for kind in kinds), tuple(seeds))

    @functools.cached_property
    def _starts(self) -> list[int]:
        """The index of each block's first trial, then the full grid's length."""
        starts = [0]
        for block in self.blocks:
            starts.append(starts[-1] + len(block.sites) * len(self.seeds) * len(block.units))
        return starts

    def __len__(self) -> int:
        full = self._starts[-1]
        return full if self.stop is None else min(full, self.stop)

    def __getitem__(self, index):
        if isinstance(index, slice):
            start, stop, step = index.indices(len(self))
            if start == 0 and step == 1:
                return TrialGrid(self.blocks, self.seeds, stop)
            return tuple(self[i] for i in range(start, stop, step))
        n = len(self)
        if index < 0:
            index += n
        if not 0 <= index < n:
            raise IndexError("trial index out of range")
        b = bisect.bisect_right(self._starts, index) - 1
        block, i = self.blocks[b], index - self._starts[b]
        site, rest = divmod(i, len(self.seeds) * len(block.units))
        seed, unit = divmod(rest, len(block.units))
        fault, bit = block.units[unit]
        return TrialPlan(block.kind, block.sites[site], bit, self.seeds[seed], fault)

    def __iter__(self) -> Iterator[TrialPlan]:
        return (t for _, t in self.items())

    def items(self, plans: bool = True) -> Iterator[tuple[str, TrialPlan | None]]:
        """(key, trial) of each trial in order (``plans`` False: (key, None), faster). A key is its
        trial's ``trial_key``, put together from the parts that trial_key gives a sentinel seed."""
        left = len(self)
        for block in self.blocks:
            for site in block.sites:
                parts = [_around_seed(block.kind, site, bit, fault) for fault, bit in block.units]
                for seed in self.seeds:
                    text = str(int(seed))
                    for (head, tail), (fault, bit) in zip(parts, block.units):
                        if left <= 0:
                            return
                        left -= 1
                        key = head + text + tail if tail is not None else trial_key(block.kind, site, bit, seed, fault)
                        yield key, TrialPlan(block.kind, site, bit, seed, fault) if plans else None

    def __eq__(self, other) -> bool:
        if isinstance(other, TrialGrid) and (self.blocks, self.seeds) == (other.blocks, other.seeds):
            return len(self) == len(other)
        return isinstance(other, Sequence) and len(self) == len(other) and all(a == b for a, b in zip(self, other))

    __hash__ = None

    def trials_per_site(self) -> int:
        """The most trials that share one (kind, site) (spec.trials_per_site)."""
        if self.stop is not None and self.stop < self._starts[-1]:
            return max(collections.Counter((t.kind, t.site) for t in self).values(), default=0)
        return max((max(collections.Counter(b.sites).values()) * len(self.seeds) * len(b.units)
                    for b in self.blocks if b.sites and b.units and self.seeds), default=0)

    def distinct(self) -> TrialGrid | None:
        """This grid with each trial key once: every axis keeps a value's first place and its
        last value among those of the same key (as a dict of key -> trial does); None for a cut
        grid (``stop``) with repeated keys."""
        def once(values, fragment):
            kept = {}
            for value in values:
                kept[fragment(value)] = value
            return tuple(kept.values())

        blocks = tuple(GridBlock(b.kind, once(b.sites, lambda s, k=b.kind: trial_key(k, s, "x", 0)),
                                 once(b.units, lambda u: trial_key("k", 0, u[1], 0, u[0]))) for b in self.blocks)
        seeds = once(self.seeds, lambda s: trial_key("k", 0, "x", s))
        if (blocks, seeds) == (self.blocks, self.seeds) and len({b.kind for b in blocks}) == len(blocks):
            return self
        if self.stop is not None or len({b.kind for b in blocks}) < len(blocks):
            return None
        return TrialGrid(blocks, seeds)

    @functools.cached_property
    def _lookup(self) -> tuple[dict, dict]:
        """Per kind: its block, {site text: index}, {(bit text, fault text): index}; {seed text: index}."""
        kinds = {}
        for b, block in enumerate(self.blocks):
            sites = {_parts(trial_key(block.kind, s, "x", 0))["site"]: i for i, s in enumerate(block.sites)}
            units = {}
            for i, (fault, bit) in enumerate(block.units):
                parts = _parts(trial_key("k", 0, bit, 0, fault))
                units[(parts["bit"], parts["fault"])] = i
            kinds[block.kind] = (b, sites, units)
        seeds = {_parts(trial_key("k", 0, "x", s))["seed"]: i for i, s in enumerate(self.seeds)}
        return kinds, seeds

    def index_of(self, key: str) -> int | None:
        """The index of the trial whose key is ``key`` (a distinct grid), or None."""
        parts = _parts(key)
        if parts is None:
            return None
        kinds, seeds = self._lookup
        b, sites, units = kinds.get(parts["kind"], (None, {}, {}))
        site, seed, unit = sites.get(parts["site"]), seeds.get(parts["seed"]), units.get((parts["bit"], parts["fault"]))
        if b is None or site is None or seed is None or unit is None:
            return None
        block = self.blocks[b]
        index = self._starts[b] + (site * len(self.seeds) + seed) * len(block.units) + unit
        if index >= len(self):
            return None
        t = self[index]
        return index if t.key == key else None

    def keys(self) -> GridKeys:
        return GridKeys(self)


class GridKeys(Set):
    """The trial keys of a distinct grid, as a set that holds none of them."""

    def __init__(self, grid: TrialGrid) -> None:
        self.grid = grid

    def __len__(self) -> int:
        return len(self.grid)

    def __iter__(self) -> Iterator[str]:
        return (key for key, _ in self.grid.items(plans=False))

    def __contains__(self, key) -> bool:
        return isinstance(key, str) and self.grid.index_of(key) is not None


def distinct_trials(trials: Sequence[TrialPlan]) -> tuple[Sequence[TrialPlan], Set]:
    """The trials once per key (the last of each, in the order keys first appear) and the set of
    their keys: what the driver runs and tracks. A grid stays a grid, its keys a GridKeys."""
    if isinstance(trials, TrialGrid) and (grid := trials.distinct()) is not None:
        return grid, grid.keys()
    wanted = {t.key: t for t in trials}
    return tuple(wanted.values()), wanted.keys()


def pending_trials(trials: Sequence[TrialPlan], finished: Set) -> Iterator[tuple[str, TrialPlan]]:
    """(key, trial) of each trial whose key is not in ``finished``, in order."""
    if isinstance(trials, TrialGrid):
        yield from ((key, t) for key, t in trials.items() if key not in finished)
        return
    for t in trials:
        key = t.key
        if key not in finished:
            yield key, t
