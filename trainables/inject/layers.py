"""Prefix reuse for decoder LMs, cut at decoder-layer boundaries (transformers 5 has no torch.fx
tracer, so trainables.inject.suffix cannot split these models).

A fault in decoder layer k (or later) changes nothing before layer k's input. On clean runs the
hidden states at the input of layer k (the output of layer k-1) are cached per batch; a faulty
run calls the model's own forward with layers 0..k-1 replaced by stubs that return the cached
hidden states, so the embedding, positions (rotary cos/sin), causal mask and cache position are
recomputed by the model's own code exactly as in the full pass, and only layers k..L-1, the
final norm and the head run. Sites after the last layer (final norm, lm_head) cut at k = L.
Sites before the first layer (embeddings) and tensors read there (an lm_head tied to the
embedding) run the full pass.

Each cut is verified once on its first batch: the clean stubbed run must give the full forward
pass's logits bit for bit, else the full pass runs (with the reason). The next cut's cache is
filled from the previous cut's (the ladder: only layers j..k-1 run) when campaigns go up the layers.
The cache holds (batch, T, hidden) per batch within the prefix budget; batches beyond it are
recomputed when used. prepare's golden pass keeps every layer's output and attention output per
batch (GoldenLayers, within half the prefix budget), so that a cut on prepare's batches computes
neither.

Inside layer k, a site that runs after the layer's attention (Llama's post_attention_layernorm and
MLP, GPT-2's ln_2 and mlp) also reuses the attention's golden output: the attention module is
stubbed to return it (cached per batch), so only the residual add, the MLP half of layer k and the
layers after it run. Verified once per cut like the layer stubs; the plain cut runs otherwise.
"""
from __future__ import annotations

import contextlib
import weakref
from dataclasses import dataclass, field
from typing import Iterator

import torch
from torch import nn

from trainables.inject import suffix


class _Stop(Exception):
    """Ends a prefix run once the cut's hidden states are captured."""


def _first_output(module: nn.Module, run, name: str):
    """``module``'s output in ``run()``, which stops there: an error unless it ran exactly once."""
    captured = []

    def hook(_m, _inputs, output):
        captured.append(output)
        raise _Stop

    handle = module.register_forward_hook(hook)
    try:
        run()
    except _Stop:
        pass
    finally:
        handle.remove()
    if len(captured) != 1:
        raise RuntimeError(f"{name} ran {len(captured)} times in a forward pass; expected once")
    return captured[0]


_FOUND: "weakref.WeakKeyDictionary[nn.Module, tuple]" = weakref.WeakKeyDictionary()


def decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList] | None:
    """The (qualified name, ModuleList) of the model's decoder layers: the ModuleList of blocks of
    one class holding the most parameters (Llama's model.layers, GPT-2's transformer.h), or None.
    Found once per model (every site of a campaign asks)."""
    if model not in _FOUND:
        _FOUND[model] = (_find_decoder_layers(model),)
    return _FOUND[model][0]


def _find_decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList] | None:
    best, size = None, 0
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        if len({type(m) for m in module}) != 1 or not any(True for _ in module[0].children()):
            continue
        count = sum(p.numel() for p in module.parameters())
        if count > size:
            best, size = (name, module), count
    return best


def layer_of(name: str, prefix: str) -> int | None:
    """k when the module ``name`` is decoder layer k or inside it."""
    if not name.startswith(prefix + "."):
        return None
    head = name[len(prefix) + 1 :].split(".", 1)[0]
    return int(head) if head.isdigit() else None


def cut_for(model: nn.Module, sites, site, kind: str, tensor: torch.Tensor | None) -> tuple[int | None, str]:
    """The decoder layer k whose input a fault at ``site`` may reuse, or (None, why not)."""
    found = decoder_layers(model)
    if found is None:
        return None, "no decoder layers (a ModuleList of blocks) to cut at"
    prefix, layers = found
    leaves = [s for s in sites if not s.container]
    in_layers = [s.index for s in leaves if layer_of(s.name, prefix) is not None]
    if not in_layers:
        return None, f"no site runs inside {prefix}"
    last = max(in_layers)

    def module_cut(name: str) -> int | None:
        k = layer_of(name, prefix)
        if k is not None:
            return k
        if name == prefix:
            return None
        calls = [s.index for s in leaves if s.name == name or s.name.startswith(name + ".")]
        return len(layers) if calls and min(calls) > last else None

    if kind == "neuron":
        k = module_cut(site.name)
        if k is None:
            return None, f"{site.name} runs before the decoder layers"
        return k, ""
    owners = [name for name, m in model.named_modules()
              for t in list(m.parameters(recurse=False)) + list(m.buffers(recurse=False))
              if t.data_ptr() == tensor.data_ptr()]
    cuts = [module_cut(name) for name in owners]
    if not owners or any(k is None for k in cuts):
        return None, f"the tensor of {site.name} is read before the decoder layers"
    return min(cuts), ""


ATTENTION_NAMES = ("self_attn", "attn", "attention")  # the attention child of a decoder layer


def attention_child(layer: nn.Module) -> str | None:
    """The name of a decoder layer's attention child (Llama's self_attn, GPT-2's attn), or None."""
    return next((name for name, _ in layer.named_children() if name in ATTENTION_NAMES), None)


def after_attention(model: nn.Module, sites, site, kind: str, tensor: torch.Tensor | None, k: int) -> bool:
    """Whether a fault at ``site`` (cut at decoder layer ``k``) leaves layer k's attention output golden:
    the site (or every module reading the tensor) is a leaf module inside layer k, called once, after
    the attention's last call and outside it."""
    found = decoder_layers(model)
    if found is None or k >= len(found[1]):
        return False
    prefix, layers = found
    attn = attention_child(layers[k])
    if attn is None:
        return False
    layer_name, attn_name = f"{prefix}.{k}", f"{prefix}.{k}.{attn}"
    leaves = [s for s in sites if not s.container]
    inside = lambda s, name: s.name == name or s.name.startswith(name + ".")  # noqa: E731
    attention_sites = [s.index for s in leaves if inside(s, attn_name)]
    if not attention_sites:
        return False
    last = max(attention_sites)

    def later(name: str) -> bool:
        if not name.startswith(layer_name + ".") or name == attn_name or name.startswith(attn_name + "."):
            return False
        calls = [s for s in sites if inside(s, name)]
        return bool(calls) and all(not s.container and s.call == 0 and s.index > last for s in calls) and \
            sum(s.name == name for s in sites) <= 1

    if kind == "neuron":
        return not site.container and site.call == 0 and later(site.name)
    owners = [name for name, m in model.named_modules()
              for t in list(m.parameters(recurse=False)) + list(m.buffers(recurse=False))
              if t.data_ptr() == tensor.data_ptr()]
    return bool(owners) and all(later(name) for name in owners)


@contextlib.contextmanager
def _stubbed(layers: nn.ModuleList, k: int, hidden: torch.Tensor) -> Iterator[None]:
    """Layers 0..k-1 return ``hidden`` (the cached input of layer k) without running."""
    stub = lambda *args, **kwargs: hidden  # noqa: E731
    missing = object()
    saved = [layer.__dict__.get("forward", missing) for layer in layers[:k]]  # an instance forward (accelerate) stays
    try:
        for layer in layers[:k]:
            layer.forward = stub
        yield
    finally:
        for layer, forward in zip(layers[:k], saved):
            if forward is missing:
                layer.__dict__.pop("forward", None)
            else:
                layer.forward = forward


@contextlib.contextmanager
def _returning(module: nn.Module, output) -> Iterator[None]:
    """``module`` returns ``output`` (its cached golden output) without running; its hooks still run."""
    missing = object()
    saved = module.__dict__.get("forward", missing)
    try:
        module.forward = lambda *args, **kwargs: output
        yield
    finally:
        if saved is missing:
            module.__dict__.pop("forward", None)
        else:
            module.forward = saved


def nbytes(output) -> int:
    """Bytes held by a module's output: a tensor, or the tensors of a tuple."""
    return sum(t.numel() * t.element_size() for t in (output if isinstance(output, tuple) else (output,))
               if isinstance(t, torch.Tensor))


class GoldenLayers:
    """The golden output of each decoder layer and of each layer's attention (layer 0's excepted: no
    cut stubs it), per batch of prepare's golden pass, kept while they fit ``budget`` bytes. A
    runner takes its cut's input and its attention's output from here instead of computing them
    again: the same tensors, from the same batches in the same shape."""

    def __init__(self, model: nn.Module, budget: float) -> None:
        found = decoder_layers(model)
        self.layers = found[1] if found is not None else None
        self.budget, self.used = budget, 0
        self.outputs: dict[tuple[int, int, int], torch.Tensor] = {}  # (layer j, lo, hi): the input of layer j + 1
        self.attention: dict[tuple[int, int, int], object] = {}  # (layer j, lo, hi): its attention's output
        self.batch: tuple[int, int] | None = None

    def _keep(self, store: dict, key: tuple, value) -> None:
        size = nbytes(value)
        if self.used + size <= self.budget:
            store[key] = value
            self.used += size

    @contextlib.contextmanager
    def recording(self) -> Iterator[None]:
        """Keep what the forward passes run inside compute (set ``batch`` to each one's (lo, hi) first)."""
        if self.layers is None:
            yield
            return
        handles = []
        try:
            for j, layer in enumerate(self.layers):
                handles.append(layer.register_forward_hook(
                    lambda _m, _i, out, j=j: self._keep(self.outputs, (j, *self.batch),
                                                        out[0] if isinstance(out, tuple) else out)))
                attention = attention_child(layer)
                if j > 0 and attention is not None:
                    handles.append(getattr(layer, attention).register_forward_hook(
                        lambda _m, _i, out, j=j: self._keep(self.attention, (j, *self.batch), out)))
            yield
        finally:
            for handle in handles:
                handle.remove()


@dataclass
class LayerRunner:
    """The golden hidden states at the input of decoder layer ``k``, by batch, and the runs from there."""

    model: nn.Module
    layers: nn.ModuleList
    k: int
    images: torch.Tensor
    budget: int  # bytes
    cache: dict[tuple[int, int], torch.Tensor] = field(default_factory=dict)
    used: int = 0
    hits: int = 0
    misses: int = 0
    needs_hook: bool = False  # neuron faults: the engine's hook flips inside layer k or later
    below: "LayerRunner | None" = field(default=None, repr=False)  # the previous cut's cache (the ladder)
    after_attention: bool = False  # the fault in hand leaves layer k's attention golden: it is stubbed too
    attention_checked: str | None = None  # '' once the attention stub reproduced the full pass; else why not
    attention_cache: dict[tuple[int, int], tuple] = field(default_factory=dict, repr=False)
    golden: GoldenLayers | None = field(default=None, repr=False)  # prepare's golden layer outputs, where kept

    def live(self, lo: int, hi: int) -> torch.Tensor:
        """The golden input of layer k for sequences lo..hi-1 (absolute), cached within budget."""
        hidden = self.cache.get((lo, hi))
        if hidden is None and self.golden is not None:
            hidden = self.golden.outputs.get((self.k - 1, lo, hi))
        if hidden is not None:
            self.hits += 1
            return hidden
        self.misses += 1
        below = self.below.cache.pop((lo, hi), None) if self.below is not None else None
        if below is not None:
            self.below.used -= below.numel() * below.element_size()
        hidden = self._capture(lo, hi, below)
        held = self.below.used if self.below is not None else 0  # both caches within one budget
        if self.used + held + hidden.numel() * hidden.element_size() <= self.budget:
            self.cache[(lo, hi)] = hidden
            self.used += hidden.numel() * hidden.element_size()
        return hidden

    def _capture(self, lo: int, hi: int, below: torch.Tensor | None) -> torch.Tensor:
        """Run the model up to the output of layer k-1 (from layer j's cached input when the ladder has it)."""
        def run():
            with _stubbed(self.layers, self.below.k if below is not None else 0, below) if below is not None \
                    else contextlib.nullcontext():
                self.model(self.images[lo:hi])

        output = _first_output(self.layers[self.k - 1], run, f"decoder layer {self.k - 1}")
        return output[0] if isinstance(output, tuple) else output

    def _attention(self) -> nn.Module:
        return getattr(self.layers[self.k], attention_child(self.layers[self.k]))

    def live_attention(self, lo: int, hi: int, hidden: torch.Tensor):
        """The golden output of layer k's attention for sequences lo..hi-1, cached within budget."""
        output = self.attention_cache.get((lo, hi))
        if output is None and self.golden is not None:
            output = self.golden.attention.get((self.k, lo, hi))
        if output is not None:
            return output
        def run():
            with _stubbed(self.layers, self.k, hidden):
                self.model(self.images[lo:hi])

        output = _first_output(self._attention(), run, f"the attention of decoder layer {self.k}")
        size = nbytes(output)
        held = self.below.used if self.below is not None else 0
        if self.used + held + size <= self.budget:
            self.attention_cache[(lo, hi)] = output
            self.used += size
        return output

    @contextlib.contextmanager
    def _suffix(self, lo: int, hi: int) -> Iterator[None]:
        """Layers 0..k-1 stubbed with their cached output, and layer k's attention too when the fault
        in hand runs after it (``after_attention``, verified)."""
        hidden = self.live(lo, hi)
        attention = self.live_attention(lo, hi, hidden) if self.after_attention else None
        with _stubbed(self.layers, self.k, hidden), \
                _returning(self._attention(), attention) if attention is not None else contextlib.nullcontext():
            yield

    def logits(self, lo: int, hi: int, faults=None) -> torch.Tensor:
        """The model's logits for lo..hi-1 from the cached input of layer k (weight faults are in the model)."""
        with self._suffix(lo, hi):
            return self.model(self.images[lo:hi])

    def faulty_logits(self, lo: int, hi: int, site, faults) -> torch.Tensor:
        """The logits with the engine's neuron hook (already registered) flipping ``faults`` at ``site``."""
        with self._suffix(lo, hi):
            faults.calls = faults.fired = 0
            logits = self.model(self.images[lo:hi])
        if faults.fired != 1:
            raise RuntimeError(f"site {site.index} ({site.name}, call {site.call}) fired {faults.fired} times "
                               f"in a forward pass; expected once")
        return logits

    def drop_attention(self) -> None:
        for output in self.attention_cache.values():
            self.used -= nbytes(output)
        self.attention_cache.clear()

    def drop(self) -> None:
        self.cache.clear()
        self.attention_cache.clear()
        self.used = 0


def runner_for(state: suffix.PrefixState, model: nn.Module, images: torch.Tensor, sites, site, kind: str,
               tensor: torch.Tensor | None, probe: tuple[int, int], device: torch.device,
               golden: GoldenLayers | None = None) -> LayerRunner | None:
    """The layer-boundary runner of (site, kind), or None where the full pass runs (``state.reasons``
    says why). One cut's cache per worker; moving up, the next cut fills from it (or takes what
    ``golden`` kept of prepare's golden pass)."""
    key = (site.index, site.name, site.call, kind)
    if key in state.reasons:
        state.current = key
        return None
    k, reason = cut_for(model, sites, site, kind, tensor)
    if k is None or k == 0:
        state.reasons[key] = reason or "the cut is at the input: nothing to reuse"
        state.current = key
        return None
    previous = state.runner if isinstance(state.runner, LayerRunner) else None
    state.current = key
    stub_attention = after_attention(model, sites, site, kind, tensor, k)
    if previous is not None and previous.k == k and previous.images is images:
        previous.needs_hook = kind == "neuron"
        previous.after_attention = _attention_verified(previous, probe) if stub_attention else False
        return previous
    budget = int((state.budget_mb if state.budget_mb is not None else suffix.default_budget_mb(device)) * 2**20)
    budget = max(0, budget - (golden.used if golden is not None else 0))  # one budget for both
    layers = decoder_layers(model)[1]
    below = previous if previous is not None and previous.k < k and previous.images is images else None
    if previous is not None and below is None:
        previous.drop()
    runner = LayerRunner(model, layers, k, images, budget, needs_hook=kind == "neuron", below=below, golden=golden)
    if below is not None:
        below.below = None  # one step of the ladder at a time: older caches are freed
        below.drop_attention()
    problem = _verify(runner, probe)
    if problem:
        state.reasons[key] = problem
        state.runner = None
        runner.drop()
        if below is not None:
            below.drop()
        return None
    runner.after_attention = _attention_verified(runner, probe) if stub_attention else False
    state.runner = runner
    return runner


def _attention_verified(runner: LayerRunner, probe: tuple[int, int]) -> bool:
    """Whether the cut with layer k's attention stubbed reproduces the full pass bit for bit (checked
    once per runner on the probe's first two sequences)."""
    if runner.attention_checked is None:
        lo, hi = probe[0], min(probe[1], probe[0] + 2)
        saved, runner.after_attention = runner.after_attention, True
        try:
            with torch.inference_mode():
                clean = runner.logits(lo, hi)
                full = runner.model(runner.images[lo:hi])
        finally:
            runner.after_attention = saved
        runner.cache.pop((lo, hi), None)  # the probe's entries are not batches of the run
        runner.drop_attention()
        runner.used = sum(h.numel() * h.element_size() for h in runner.cache.values())
        same = clean.shape == full.shape and torch.equal(suffix._bits(clean), suffix._bits(full))
        runner.attention_checked = "" if same else \
            f"stubbing the attention of decoder layer {runner.k} does not reproduce the forward pass bit for bit"
    return runner.attention_checked == ""


def _verify(runner: LayerRunner, probe: tuple[int, int]) -> str:
    """'' when the stubbed run reproduces the full forward pass bit for bit on the probe batch."""
    lo, hi = probe[0], min(probe[1], probe[0] + 2)  # two sequences: same code, fewer flops
    with torch.inference_mode():
        clean = runner.logits(lo, hi)
        full = runner.model(runner.images[lo:hi])
    runner.drop()  # the probe's entry is not a batch of the run
    if clean.shape != full.shape or not torch.equal(suffix._bits(clean), suffix._bits(full)):
        return f"the cut at decoder layer {runner.k} does not reproduce the forward pass bit for bit"
    return ""


def fallback_reasons(model: nn.Module, sites, chosen) -> dict[tuple[str, str], list[str]]:
    """(kind, reason) -> the sites ('index name#call') among ``chosen`` (kind, site) pairs that run the
    full forward pass; the first decoder layer's sites (nothing before them to reuse) are not listed."""
    out: dict[tuple[str, str], list[str]] = {}
    for kind, site in chosen:
        tensor = suffix.site_tensor(model, site, kind)
        if kind != "neuron" and tensor is None:
            k, reason = None, f"no tensor found for {kind} site {site.name}"
        else:
            k, reason = cut_for(model, sites, site, kind, tensor)
        if k is None:
            out.setdefault((kind, reason), []).append(f"{site.index} {site.name}#{site.call}")
    return out
