"""Next-token (teacher-forced) metrics of a causal LM's faults: what the engine measures per fault
when the model maps token ids (B, T) to logits (B, T, V) and the labels are the next tokens (B, T).

One fault per sequence (neuron) or per group of sequences (weight, param), against the golden
(fault-free) run of the same sequence:

- ``token_changes``: positions whose top-1 next token differs from the golden top-1 (of T);
- ``changed``: any position changed; ``sdc``: changed with finite logits (a silent corruption);
- ``nonfinite``: a NaN or inf anywhere in the sequence's logits;
- ``log_ppl_ratio``: mean cross-entropy against the real next tokens, faulty minus golden
  (the log of the faulty/golden perplexity ratio of the sequence);
- ``kl``: KL(golden || faulty) of the next-token distributions at the fault's token position
  (neuron faults); the mean over the T positions for weight and param faults (their fault
  touches every position), and for a neuron site whose output is not (T, ...).

Counts are integers per flipped bit, the continuous metrics sums and sums of squares over the
sequences with finite logits (``finite``), so trials add up and analysis gives Wilson intervals
for rates and t-intervals over sequences for means.
Causality: a neuron fault at token t cannot change the top-1 of a position before t unless the
logits are non-finite (a NaN or inf at t leaks into earlier positions through the attention's
masked product, 0 x inf); the engine raises if a finite sequence breaks it.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from trainables.stats import wilson_interval

TASK = "next-token"
TRIAL_KIND = "teacher-forced"
COUNT_FIELDS = ("sequences", "tokens", "token_changes", "token_changes_sq", "changed", "nonfinite", "sdc", "finite",
                "effective")
SUM_FIELDS = ("log_ppl_ratio", "log_ppl_ratio_sq", "kl", "kl_sq")


@dataclass(frozen=True)
class TokenCounts:
    """Per-bit next-token outcome counts (``by_bit[f, b]``, f of COUNT_FIELDS) and sums over the
    finite sequences (``sums[s, b]``, s of SUM_FIELDS) of a trial; they add up across trials."""

    by_bit: np.ndarray  # int64 (len(COUNT_FIELDS), width)
    sums: np.ndarray  # float64 (len(SUM_FIELDS), width)

    def total(self, name: str) -> int:
        return int(self.by_bit[COUNT_FIELDS.index(name)].sum())

    def sum(self, name: str) -> float:
        return float(self.sums[SUM_FIELDS.index(name)].sum())

    @property
    def sequences(self) -> int:
        return self.total("sequences")

    @property
    def images(self) -> int:  # the engine's unit of work, under its classification name
        return self.sequences

    def _rate(self, k: str, n: str) -> float:
        d = self.total(n)
        return self.total(k) / d if d else float("nan")

    @property
    def token_change_rate(self) -> float:
        """Positions whose top-1 changed / positions (T per sequence)."""
        return self._rate("token_changes", "tokens")

    @property
    def sdc_rate(self) -> float:
        """Sequences with a changed top-1 and finite logits / sequences."""
        return self._rate("sdc", "sequences")

    @property
    def changed_rate(self) -> float:
        return self._rate("changed", "sequences")

    @property
    def nonfinite_rate(self) -> float:
        return self._rate("nonfinite", "sequences")

    @property
    def mean_log_ppl_ratio(self) -> float:
        n = self.total("finite")
        return self.sum("log_ppl_ratio") / n if n else float("nan")

    @property
    def mean_kl(self) -> float:
        n = self.total("finite")
        return self.sum("kl") / n if n else float("nan")

    def wilson(self) -> tuple[float, float]:
        """Wilson 95% interval of the sequence SDC rate."""
        return wilson_interval(self.total("sdc"), self.sequences)

    def __add__(self, other: "TokenCounts") -> "TokenCounts":
        return TokenCounts(self.by_bit + other.by_bit, self.sums + other.sums)

    @staticmethod
    def zeros(width: int) -> "TokenCounts":
        return TokenCounts(np.zeros((len(COUNT_FIELDS), width), dtype=np.int64),
                           np.zeros((len(SUM_FIELDS), width), dtype=np.float64))


@dataclass(frozen=True)
class TokenFaultRecords:
    """One row per fault (per sequence); arrays of equal length."""

    sequence: np.ndarray
    token: np.ndarray  # the fault's token position (neuron faults on a (T, ...) output); -1 otherwise
    token_changes: np.ndarray
    first_change: np.ndarray  # the first position whose top-1 changed; -1: none
    changed: np.ndarray
    nonfinite: np.ndarray
    log_ppl_ratio: np.ndarray
    kl: np.ndarray
    position: np.ndarray
    fault_group: np.ndarray
    bit: np.ndarray
    raw_before: np.ndarray
    value_before: np.ndarray
    value_after: np.ndarray
    effective: np.ndarray
    fault_mask: np.ndarray

    def __len__(self) -> int:
        return len(self.sequence)

    def as_dict(self) -> dict[str, np.ndarray]:
        return dict(self.__dict__)


def check_lm_data(inputs: torch.Tensor, labels: torch.Tensor, context_length: int | None) -> None:
    """Token ids (N, T) int64 and next-token labels (N, T) int64 that fit the model's context; one
    ValueError line otherwise."""
    if inputs.dim() != 2 or inputs.dtype != torch.int64:
        raise ValueError(f"a causal LM takes token ids (sequences, T) int64; got {inputs.dtype} of shape {tuple(inputs.shape)}")
    if tuple(labels.shape) != tuple(inputs.shape) or labels.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"a causal LM's labels are the next tokens, (sequences, T) integers like its inputs "
                         f"{tuple(inputs.shape)}; got {labels.dtype} of shape {tuple(labels.shape)}")
    if context_length is not None and inputs.shape[1] > context_length:
        raise ValueError(f"sequence length {inputs.shape[1]} is over the model's context of {context_length} tokens")


def token_nll(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of logits (..., V) against their next tokens (...), float64: logsumexp in
    float32 (finite for finite logits), the difference in float64."""
    lf = logits.float()
    lse = torch.logsumexp(lf, dim=-1).double()
    picked = lf.gather(-1, labels.unsqueeze(-1)).squeeze(-1).double()
    return lse - picked


def kl_divergence(golden: torch.Tensor, faulty: torch.Tensor) -> torch.Tensor:
    """KL(golden || faulty) over the last dimension in float64 (rows of logits)."""
    lg = torch.log_softmax(golden.double(), dim=-1)
    lf = torch.log_softmax(faulty.double(), dim=-1)
    return (lg.exp() * (lg - lf)).sum(dim=-1)


def fault_tokens(positions: torch.Tensor, output_shape: tuple[int, ...], tokens: int) -> torch.Tensor | None:
    """The token position of each neuron fault (flat position p in a (T, ...) output: p // (numel / T)),
    or None when the site's per-sequence output is not (T, ...)."""
    if not output_shape or output_shape[0] != tokens:
        return None
    return positions // (int(np.prod(output_shape)) // tokens)


class NextTokenMetric:
    """Accumulates the next-token outcomes of one run_faults call, batch by batch."""

    def __init__(self, bench, start: int, stop: int, tokens_of_fault: torch.Tensor | None,
                 golden_logits: torch.Tensor) -> None:
        n, dev = stop - start, bench.device
        self.bench, self.start = bench, start
        self.golden_logits = golden_logits  # (n, T, V) float32: the golden logits of sequences start..stop-1
        self.tokens_of_fault = tokens_of_fault  # (n,) or None (weight/param faults, non-(T, ...) outputs)
        self.token_changes = torch.empty(n, dtype=torch.int64, device=dev)
        self.first_change = torch.empty(n, dtype=torch.int64, device=dev)
        self.nonfinite = torch.empty(n, dtype=torch.bool, device=dev)
        self.log_ppl_ratio = torch.empty(n, dtype=torch.float64, device=dev)
        self.kl = torch.empty(n, dtype=torch.float64, device=dev)
        self.acausal = torch.zeros(n, dtype=torch.bool, device=dev)

    def add(self, lo: int, hi: int, logits: torch.Tensor, head_input: torch.Tensor | None = None) -> None:
        """The outcomes of sequences lo..hi-1 (offsets from start) from their faulty logits. A position
        whose logits equal the golden ones bit for bit gets exactly the golden top-1 and cross-entropy
        (the same operations on the same values), so its changes are exact zeros. ``head_input``
        (neuron faults on the prefix path, batches as in the golden pass: engine._rows_reusable): the
        faulty input of the output head; rows where it equals the golden one bit for bit have the
        golden logits (the same head on the same rows in the same shape), so only the others are measured."""
        if head_input is not None and self.tokens_of_fault is not None:
            return self._add_changed_rows(lo, hi, logits, head_input)
        a, b = self.start + lo, self.start + hi
        golden = self.golden_logits[lo:hi]
        golden_top = self.bench.golden[a:b]
        changed = logits.argmax(dim=-1) != golden_top
        t = golden_top.shape[1]
        order = torch.arange(t, device=logits.device)
        self.token_changes[lo:hi] = changed.sum(dim=1)
        self.first_change[lo:hi] = torch.where(changed.any(dim=1), torch.where(changed, order, t).min(dim=1).values, -1)
        # a row is finite iff its max and min are (both propagate NaN): cheaper than isfinite over (B, T, V)
        nonfinite = ~(torch.isfinite(logits.amax(dim=-1)) & torch.isfinite(logits.amin(dim=-1))).all(dim=1)
        self.nonfinite[lo:hi] = nonfinite
        delta = token_nll(logits, self.bench.labels[a:b]) - self.bench.golden_nll[a:b]
        self.log_ppl_ratio[lo:hi] = delta.mean(dim=1)
        if self.tokens_of_fault is not None:  # one row per sequence: the fault's token
            tok = self.tokens_of_fault[lo:hi]
            seq = torch.arange(hi - lo, device=logits.device)
            self.kl[lo:hi] = kl_divergence(golden[seq, tok], logits[seq, tok])
            self.acausal[lo:hi] = (changed & (order < tok.unsqueeze(1))).any(dim=1) & ~nonfinite
        else:  # every position, in float64 only where the logits differ (KL 0 elsewhere)
            differs = (logits != golden).any(dim=-1)  # NaN != NaN: a non-finite row always differs
            where = differs.nonzero(as_tuple=True)
            kl = torch.zeros(differs.shape, dtype=torch.float64, device=logits.device)
            kl[where] = kl_divergence(golden[where], logits[where])
            self.kl[lo:hi] = kl.mean(dim=1)

    def _add_changed_rows(self, lo: int, hi: int, logits: torch.Tensor, head_input: torch.Tensor) -> None:
        """``add`` measuring only the rows whose head input differs from the golden one (by their bits):
        the same values as measuring every row, the golden rows taking their golden top-1, finiteness
        and cross-entropy (a golden row's cross-entropy difference is golden minus golden, as in ``add``)."""
        a, b = self.start + lo, self.start + hi
        bench = self.bench
        golden_input = bench.golden_head_input[a:b]
        width = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[head_input.element_size()]
        differs = (head_input.contiguous().view(width) != golden_input.view(width)).any(dim=-1)  # (n, T)
        where = differs.nonzero(as_tuple=True)
        rows = logits[where]  # (R, V)
        golden_top = bench.golden[a:b]
        changed = torch.zeros_like(differs)
        changed[where] = rows.argmax(dim=-1) != golden_top[where]
        t = golden_top.shape[1]
        order = torch.arange(t, device=logits.device)
        self.token_changes[lo:hi] = changed.sum(dim=1)
        self.first_change[lo:hi] = torch.where(changed.any(dim=1), torch.where(changed, order, t).min(dim=1).values, -1)
        finite_rows = bench.golden_finite_rows[a:b].clone()
        finite_rows[where] = torch.isfinite(rows.amax(dim=-1)) & torch.isfinite(rows.amin(dim=-1))
        nonfinite = ~finite_rows.all(dim=1)
        self.nonfinite[lo:hi] = nonfinite
        golden_nll = bench.golden_nll[a:b]
        delta = golden_nll - golden_nll
        delta[where] = token_nll(rows, bench.labels[a:b][where]) - golden_nll[where]
        self.log_ppl_ratio[lo:hi] = delta.mean(dim=1)
        tok = self.tokens_of_fault[lo:hi]
        seq = torch.arange(hi - lo, device=logits.device)
        self.kl[lo:hi] = kl_divergence(self.golden_logits[lo:hi][seq, tok], logits[seq, tok])
        self.acausal[lo:hi] = (changed & (order < tok.unsqueeze(1))).any(dim=1) & ~nonfinite

    def check_causal(self) -> None:
        """RuntimeError if a fault with finite logits changed a position before its token."""
        if bool(self.acausal.any()):
            i = int(self.acausal.nonzero()[0, 0])
            raise RuntimeError(f"causality broken: the fault of sequence {self.start + i} at token "
                               f"{int(self.tokens_of_fault[i])} changed position {int(self.first_change[i])}")

    def counts(self, bits: torch.Tensor, effective: torch.Tensor, width: int) -> TokenCounts:
        tokens = self.bench.golden.shape[1]
        changed = self.token_changes > 0
        finite = ~self.nonfinite & torch.isfinite(self.log_ppl_ratio) & torch.isfinite(self.kl)
        values = torch.stack([torch.ones_like(changed, dtype=torch.int64), torch.full_like(self.token_changes, tokens),
                              self.token_changes, self.token_changes ** 2, changed.long(), self.nonfinite.long(),
                              (changed & ~self.nonfinite).long(), finite.long(), effective.long()])
        acc = torch.zeros((len(COUNT_FIELDS), width), dtype=torch.int64, device=bits.device)
        acc.index_add_(1, bits.to(torch.int64), values)
        zero = torch.zeros_like(self.kl)
        lp, kl = torch.where(finite, self.log_ppl_ratio, zero), torch.where(finite, self.kl, zero)
        sums = torch.zeros((len(SUM_FIELDS), width), dtype=torch.float64, device=bits.device)
        sums.index_add_(1, bits.to(torch.int64), torch.stack([lp, lp * lp, kl, kl * kl]))
        return TokenCounts(acc.cpu().numpy(), sums.cpu().numpy())

    def records(self, plan, keep: torch.Tensor, raw: torch.Tensor, effective: torch.Tensor, before: torch.Tensor,
                after: torch.Tensor, targets: torch.Tensor) -> TokenFaultRecords:
        idx = keep.nonzero()[:, 0]
        host = lambda t: t.cpu().numpy()  # noqa: E731
        token = self.tokens_of_fault[idx] if self.tokens_of_fault is not None else torch.full_like(idx, -1)
        return TokenFaultRecords(
            sequence=host(idx + self.start), token=host(token), token_changes=host(self.token_changes[idx]),
            first_change=host(self.first_change[idx]), changed=host(self.token_changes[idx] > 0),
            nonfinite=host(self.nonfinite[idx]), log_ppl_ratio=host(self.log_ppl_ratio[idx]), kl=host(self.kl[idx]),
            position=host(plan.positions[idx]), fault_group=host(plan.groups[idx]), bit=host(plan.bits[idx]),
            raw_before=host(raw.to(torch.int64)), value_before=host(before), value_after=host(after),
            effective=host(effective[idx]), fault_mask=host(targets.to(torch.int64)))
