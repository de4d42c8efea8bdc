"""Site sampling in proportion to size (``--site-sampling proportional``): each fault first picks
its site among a pool with probability size / total size, then its element and bit exactly as a
trial of that site would (trainables.inject.faults), so every element of the pool is equally
likely and one trial estimates the pool's whole-model rate directly (the SC'25 LLM study's
choice). Fault i of a proportional trial equals fault i of the per-site trial of the site it
picked: the per-site trials are its oracle.

Neuron faults: one forward per batch with a hook on every site the batch's images picked, each
flipping its own images. Weight and param faults: one site per group of images, run as that
site's group (the fault persists for the group, as today).
"""
from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass

import numpy as np
import torch

from trainables.inject import engine, fault_models
from trainables.inject.bitflip import apply_fault
from trainables.inject.faults import BitSpec, random_words
from trainables.inject.sites import find_module

SITE = -1  # the site index of a proportional trial (its key reads 'sall')
KINDS = ("neuron", "weight", "param")


@dataclass(frozen=True)
class SitePool:
    """The sites a proportional trial draws from, with their sizes (elements a fault can hit)."""

    kind: str
    sites: tuple
    sizes: tuple[int, ...]
    index: int = SITE
    call: None = None
    output_index: None = None

    @property
    def name(self) -> str:
        return f"proportional ({len(self.sites)} {self.kind} sites)"

    @property
    def module_type(self) -> str:
        return "proportional"

    @property
    def total(self) -> int:
        return sum(self.sizes)


def site_size(site, kind: str) -> int:
    """Elements a fault of ``kind`` can hit at ``site`` (per image for neuron sites)."""
    return int(site.output_numel if kind == "neuron" else site.weight_numel if kind == "weight" else site.numel)


def pool(bench: engine.Workbench, kind: str, indices) -> SitePool:
    """The pool of ``kind`` sites ``indices`` of the workbench; ValueError naming a missing one."""
    if kind not in KINDS:
        raise ValueError(f"site sampling 'proportional' draws neuron, weight or param sites, not {kind}")
    sites = []
    for index in indices:
        site = bench.site(kind, int(index))
        if site is None:
            raise ValueError(f"{kind} site {index} does not exist in this model")
        sites.append(site)
    if not sites:
        raise ValueError(f"site sampling 'proportional' needs at least one {kind} site")
    return SitePool(kind, tuple(sites), tuple(site_size(s, kind) for s in sites))


def draw_sites(seed: int, the_pool: SitePool, counters: np.ndarray) -> np.ndarray:
    """The pool position (0..len-1) each counter's fault picks, with probability size / total:
    a uniform element of the pool (Lemire's multiply-shift on 64-bit words, exact integers)."""
    words = random_words(seed, the_pool.kind, SITE, "site", counters)
    total = the_pool.total
    elements = np.array([(int(w) * total) >> 64 for w in words.tolist()], dtype=np.int64)
    return np.searchsorted(np.cumsum(the_pool.sizes), elements, side="right")


def run_faults(bench: engine.Workbench, the_pool: SitePool, kind: str, bit: BitSpec, seed: int, start: int = 0,
               stop: int | None = None, images_per_weight_fault: int = engine.DEFAULT_IMAGES_PER_WEIGHT_FAULT,
               record: str = "none", prefix: bool | None = None,
               fault: fault_models.FaultModel | str = "flip") -> engine.Outcome:
    """engine.run_faults for a site pool: images ``start..stop-1``, each fault at a site drawn in
    proportion to size. Records carry each fault's ``site_index``."""
    stop = engine.check_range(bench, start, stop)
    if kind != the_pool.kind:
        raise ValueError(f"a {the_pool.kind} site pool takes {the_pool.kind} faults, not {kind}")
    if bench.mode == "int8" or bench.task != "classification":
        raise ValueError("site sampling 'proportional' is available for float classifiers only (not int8 models or LMs)")
    if kind == "neuron":
        return _neurons(bench, the_pool, bench.resolve_bit(kind, bit), seed, start, stop, record,
                        bench.check_fault(kind, bench.resolve_bit(kind, bit), fault))
    per = images_per_weight_fault
    groups = np.arange(start // per, (stop - 1) // per + 1, dtype=np.uint64)
    picks = draw_sites(seed, the_pool, groups)
    counts, parts = engine.Counts.zeros(bench.width_for(kind)), []
    for group, pick in zip(groups.tolist(), picks.tolist()):
        site = the_pool.sites[pick]
        outcome = engine.run_faults(bench, site, kind, bit, seed, max(group * per, start), min((group + 1) * per, stop),
                                    per, record, prefix=False, fault=fault)
        counts = counts + outcome.counts
        if outcome.records is not None:
            parts.append(_with_sites(outcome.records, np.full(len(outcome.records), site.index)))
    return engine.Outcome(counts, _concat(parts) if record != "none" else None, "full")


@dataclass(frozen=True)
class SiteRecords(engine.FaultRecords):
    """FaultRecords with the site each fault picked."""

    site_index: np.ndarray | None = None


def _with_sites(records: engine.FaultRecords, sites: np.ndarray) -> SiteRecords:
    return SiteRecords(**records.as_dict(), site_index=np.asarray(sites, dtype=np.int64))


def _concat(parts: list[SiteRecords]) -> SiteRecords:
    if not parts:
        return _with_sites(engine.FaultRecords(*(np.empty(0, dtype=np.int64) for _ in range(13))), np.empty(0))
    return SiteRecords(**{f.name: np.concatenate([getattr(p, f.name) for p in parts])
                          for f in dataclasses.fields(SiteRecords)})


def _neurons(bench, the_pool: SitePool, bit, seed: int, start: int, stop: int, record: str, fault) -> engine.Outcome:
    n = stop - start
    picks = draw_sites(seed, the_pool, np.arange(start, stop, dtype=np.uint64))
    width = bench.width_for("neuron")
    positions, bits = np.zeros(n, dtype=np.int64), np.zeros(n, dtype=np.int64)
    keep = toggle = None
    for p in np.unique(picks).tolist():  # each image's fault: the one its site's own trial draws for it
        site = the_pool.sites[p]
        rows = picks == p
        drawn = fault_models.sample(seed, "neuron", site.index, bit, width, site.output_numel, start, stop, fault)
        positions[rows], bits[rows] = drawn.positions[rows], drawn.bits[rows]
        if drawn.keep is not None:
            keep = np.zeros(n, dtype=np.int64) if keep is None else keep
            keep[rows] = drawn.keep[rows]
        toggle = np.zeros(n, dtype=np.int64) if toggle is None else toggle
        toggle[rows] = drawn.toggle[rows]
    dev = bench.device
    int_dtype = engine.formats.int_view(bench.dtype_for("neuron"))
    as_dev = lambda a: torch.from_numpy(a).to(dev)  # noqa: E731
    plan = engine._Plan("neuron", as_dev(positions), as_dev(bits), torch.full((n,), -1, device=dev), [],
                        keep=None if keep is None else as_dev(keep).to(int_dtype), toggle=as_dev(toggle).to(int_dtype))
    site_of = torch.from_numpy(picks).to(dev)
    faulty = torch.empty(n, dtype=torch.int64, device=dev)
    nonfinite = torch.empty(n, dtype=torch.bool, device=dev)
    raw = torch.empty(n, dtype=int_dtype, device=dev)
    with engine.math_mode(bench.mode), torch.inference_mode():
        for lo in range(0, n, bench.batch_size):
            hi = min(lo + bench.batch_size, n)
            images = bench.images[start + lo : start + hi]
            with contextlib.ExitStack() as hooks:
                fired = {}
                for p in torch.unique(site_of[lo:hi]).tolist():
                    rows = (site_of[lo:hi] == p).nonzero()[:, 0]
                    site = the_pool.sites[p]
                    batch = _subset(plan, lo + rows, site)
                    fired[p] = (rows, batch)
                    if site.index == 0:
                        images = _flip_rows(images, rows, batch)
                        batch.fired = 1
                    else:
                        hooks.enter_context(_hook(bench.model, site, rows, batch))
                logits = bench.model(images)
                for p, (rows, batch) in fired.items():
                    if batch.fired != 1:
                        site = the_pool.sites[p]
                        raise RuntimeError(f"site {site.index} ({site.name}, call {site.call}) fired {batch.fired} times "
                                           f"in a forward pass; expected once")
                    raw[lo + rows] = batch.raw_before
            faulty[lo:hi] = logits.argmax(dim=1)
            nonfinite[lo:hi] = ~torch.isfinite(logits).all(dim=1)
    golden = bench.golden[start:stop]
    golden_correct = bench.golden_correct[start:stop]
    changed = faulty != golden
    effective = apply_fault(raw, plan.keep, plan.toggle) != raw
    values = torch.stack([torch.ones_like(changed), golden_correct, changed & golden_correct, changed, nonfinite,
                          changed & ~nonfinite, golden_correct & (changed | nonfinite), effective]).to(torch.int64)
    acc = torch.zeros((len(engine.COUNT_FIELDS), width), dtype=torch.int64, device=dev)
    acc.index_add_(1, plan.bits, values)
    records = None
    if record != "none":
        kept = torch.ones_like(changed) if record == "all" else changed
        base = engine._records(bench, plan, start, kept, faulty, changed, nonfinite, raw, effective)
        sites = np.array([s.index for s in the_pool.sites], dtype=np.int64)[picks[kept.cpu().numpy()]]
        records = _with_sites(base, sites)
    return engine.Outcome(engine.Counts(acc.cpu().numpy()), records, "full")


def _subset(plan, rows: torch.Tensor, site) -> engine._BatchFaults:
    """The faults of ``rows`` of the plan, for one site's hook."""
    batch = engine._BatchFaults()
    batch.positions, batch.toggle = plan.positions[rows], plan.toggle[rows]
    batch.keep = plan.keep[rows] if plan.keep is not None else None
    batch.output_index = getattr(site, "output_index", None)
    return batch


def _flip_rows(t, rows: torch.Tensor, batch: engine._BatchFaults):
    """A copy of ``t`` (a tensor, or a tuple/list whose ``output_index`` element takes the faults)
    with one element of each of ``rows`` faulted."""
    if isinstance(t, (tuple, list)):
        i = batch.output_index
        flipped = list(t)
        flipped[i] = _flip_rows(t[i], rows, batch)
        if isinstance(t, list):
            return flipped
        return type(t)(*flipped) if hasattr(t, "_fields") else tuple(flipped)
    out = t.clone()
    out[rows] = engine._flip_elements(t[rows], batch)
    return out


@contextlib.contextmanager
def _hook(model, site, rows: torch.Tensor, batch: engine._BatchFaults):
    """A forward hook on the site's module faulting ``rows`` at its ``site.call``-th call."""
    module = find_module(model, site)
    calls = [0]

    def hook(_module, _inputs, output):
        call = calls[0]
        calls[0] += 1
        if call == site.call:
            batch.fired += 1
            return _flip_rows(output, rows, batch)
        return None

    handle = module.register_forward_hook(hook, prepend=True)
    try:
        yield
    finally:
        handle.remove()
