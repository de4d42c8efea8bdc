"""Injection sites of a classifier: every call of a leaf module (neuron) and every leaf
module with a weight (weight), numbered in forward order with the input image as site 0.

A module called twice in one forward pass (the shared ``relu`` of the zoo's ResNet blocks)
gives two neuron sites, told apart by ``call``. A weight site shares the index of its
module's first call, so "site 5" is the same layer in neuron and weight campaigns and the
numbering matches the seed study's layer table for models without module reuse.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Sequence

import torch
from torch import nn

INPUT_NAME = "input"
INPUT_TYPE = "Identity"  # the seed prepended an nn.Identity: layer 0 is the image itself
SITE_KINDS = ("neuron", "weight")


@dataclass(frozen=True)
class Site:
    """One injection site; shapes are per image (no batch dimension)."""

    index: int
    name: str
    call: int
    module_type: str
    output_shape: tuple[int, ...]
    weight_shape: tuple[int, ...] | None

    @property
    def output_numel(self) -> int:
        return math.prod(self.output_shape)

    @property
    def weight_numel(self) -> int:
        if self.weight_shape is None:
            raise ValueError(f"site {self.index} ({self.name}) has no weight")
        return math.prod(self.weight_shape)

    @property
    def is_weight_site(self) -> bool:
        return self.weight_shape is not None and self.call == 0


def leaf_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Qualified name -> module for every module without children."""
    return {name: m for name, m in model.named_modules() if not list(m.children()) and name}


def _weight_shape(module: nn.Module) -> tuple[int, ...] | None:
    weight = getattr(module, "weight", None)
    if isinstance(weight, torch.Tensor) and weight.is_floating_point():
        return tuple(weight.shape)
    return None


def enumerate_sites(model: nn.Module, input_shape: Sequence[int], dtype: torch.dtype | None = None) -> list[Site]:
    """Run one dummy image of ``input_shape`` (C, H, W) through ``model`` and list its sites.

    Calls whose output is not a single floating-point tensor are not injectable and are
    skipped. The model's output must be (batch, classes) logits.
    """
    if isinstance(model, torch.jit.ScriptModule):
        raise ValueError("TorchScript models take no forward hooks, so their sites cannot be injected: "
                         "save a state_dict checkpoint with its architecture instead (file: with 'arch')")
    device, param_dtype = _model_device_dtype(model)
    dtype = dtype or param_dtype
    input_shape = tuple(int(d) for d in input_shape)
    sites = [Site(0, INPUT_NAME, 0, INPUT_TYPE, input_shape, None)]
    calls: dict[str, int] = {}
    handles = []

    def make_hook(name: str, module: nn.Module):
        def hook(_module, _inputs, output):
            call = calls.get(name, 0)
            calls[name] = call + 1
            if isinstance(output, torch.Tensor) and output.is_floating_point() and output.dim() >= 1:
                sites.append(
                    Site(len(sites), name, call, type(module).__name__, tuple(output.shape[1:]), _weight_shape(module))
                )

        return hook

    try:
        for name, module in leaf_modules(model).items():
            handles.append(module.register_forward_hook(make_hook(name, module)))
        with torch.inference_mode():
            logits = model(torch.zeros((2, *input_shape), device=device, dtype=dtype))
    finally:
        for handle in handles:
            handle.remove()
    check_logits(logits, batch=2)
    return sites


def check_logits(logits: object, batch: int) -> None:
    """Raise ValueError unless ``logits`` is a (batch, classes) floating tensor."""
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2 or logits.shape[0] != batch or not logits.is_floating_point():
        shape = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise ValueError(f"model output must be (batch, classes) float logits; got {shape} for a batch of {batch}")


def _model_device_dtype(model: nn.Module) -> tuple[torch.device, torch.dtype]:
    for tensor in list(model.parameters()) + list(model.buffers()):
        if tensor.is_floating_point():
            return tensor.device, tensor.dtype
    return torch.device("cpu"), torch.float32


def parse_index_list(text: str | Iterable[int] | None) -> list[int] | None:
    """'all'/None -> None; '1,3,5-7' or an iterable of ints -> sorted unique list."""
    if text is None:
        return None
    if not isinstance(text, str):
        return sorted({int(i) for i in text})
    text = text.strip()
    if text.lower() in ("", "all"):
        return None
    out: set[int] = set()
    for part in text.split(","):
        part = part.strip()
        try:
            if "-" in part[1:]:
                lo, hi = part.split("-", 1) if not part.startswith("-") else (part, "")
                out.update(range(int(lo), int(hi) + 1))
            else:
                out.add(int(part))
        except ValueError:
            raise ValueError(f"bad layer index {part!r} in {text!r}: use integers, ranges like 2-5, or 'all'") from None
    return sorted(out)


def parse_type_list(text: str | Iterable[str] | None) -> list[str] | None:
    """'all'/None -> None; 'Conv2d,Linear' -> ['Conv2d', 'Linear']."""
    if text is None:
        return None
    names = [t.strip() for t in (text.split(",") if isinstance(text, str) else text) if t.strip()]
    if not names or [n.lower() for n in names] == ["all"]:
        return None
    return names


def select_sites(
    sites: Sequence[Site],
    kind: str,
    types: str | Iterable[str] | None = None,
    indices: str | Iterable[int] | None = None,
) -> list[Site]:
    """The sites of ``kind`` ('neuron' or 'weight') matching type names and indices.

    Unknown indices or type names raise ValueError listing the valid ones; so does a
    filter that matches nothing.
    """
    if kind not in SITE_KINDS:
        raise ValueError(f"unknown site kind {kind!r}: use one of {', '.join(SITE_KINDS)}")
    pool = [s for s in sites if kind == "neuron" or s.is_weight_site]
    type_names = parse_type_list(types)
    index_list = parse_index_list(indices)
    if type_names is not None:
        known = sorted({s.module_type for s in pool})
        unknown = [t for t in type_names if t not in known]
        if unknown:
            raise ValueError(f"unknown {kind} layer type(s) {', '.join(unknown)}; this model has: {', '.join(known)}")
        pool = [s for s in pool if s.module_type in type_names]
    if index_list is not None:
        valid = {s.index for s in pool}
        unknown_idx = [i for i in index_list if i not in valid]
        if unknown_idx:
            raise ValueError(
                f"{kind} site index(es) {', '.join(map(str, unknown_idx))} do not exist"
                f"{' for the selected types' if type_names else ''}; valid: {_ranges(sorted(valid))}"
            )
        pool = [s for s in pool if s.index in index_list]
    if not pool:
        raise ValueError(f"no {kind} sites match the filter")
    return pool


def _ranges(values: list[int]) -> str:
    """[0,1,2,5,7,8] -> '0-2,5,7-8'."""
    runs: list[list[int]] = []
    for v in values:
        if runs and runs[-1][1] == v - 1:
            runs[-1][1] = v
        else:
            runs.append([v, v])
    return ",".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)


def site_table(sites: Sequence[Site]) -> str:
    """The seed's layer summary: Layer #, type, call, weight shape, output shape, name."""
    header = f"{'Layer #':>7}  {'Layer type':>18}  {'call':>4}  {'Weight shape':>20}  {'Output shape':>20}  name"
    lines = [header, "-" * len(header)]
    for s in sites:
        weight = str(list(s.weight_shape)) if s.weight_shape is not None else "-"
        lines.append(
            f"{s.index:>7}  {s.module_type:>18}  {s.call:>4}  {weight:>20}  {str(list(s.output_shape)):>20}  {s.name}"
        )
    return "\n".join(lines)


def find_module(model: nn.Module, site: Site) -> nn.Module:
    """The module behind a (non-input) site, by qualified name."""
    try:
        return model.get_submodule(site.name)
    except AttributeError:
        raise ValueError(f"site {site.index}: the model has no module named {site.name!r}") from None
