"""The seed study's procedure, rebuilt on the PyPI ``pytorchfi`` package and ``bitstring``:
the independent reference the fast engine is checked against, fed the SAME fault list.

Per batch it deep-copies the model through PyTorchFI, runs a clean pass, flips each fault
in Python with ``bitstring`` (one host round trip per fault) and runs the corrupted copy.
Slow on purpose: it is what the seed did. Models that call a module twice are out of
scope here, as they were for the seed's PyTorchFI fork.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch
from bitstring import BitArray
from pytorchfi.core import fault_injection
from torch import nn

from trainables.inject.bitflip import dtype_width
from trainables.inject.engine import DEFAULT_IMAGES_PER_WEIGHT_FAULT, check_mode, math_mode
from trainables.inject.faults import BitSpec, sample_faults
from trainables.inject.sites import Site, find_module


def bitstring_flip(value: float, bit: int, dtype: torch.dtype) -> float:
    """Flip LSB-0 ``bit`` of ``value`` stored as ``dtype``, the seed's way (bitstring, MSB-first)."""
    width = dtype_width(dtype)
    bits = BitArray(bfloat=value) if dtype == torch.bfloat16 else BitArray(float=value, length=width)
    bits.invert(width - 1 - bit)
    return bits.bfloat if dtype == torch.bfloat16 else bits.float


@dataclass(frozen=True)
class ReferenceResult:
    golden: np.ndarray  # clean top-1 per image
    faulty: np.ndarray  # faulty top-1 per image


def _pytorchfi(model: nn.Module, batch_size: int, input_shape, layer_types, use_cuda: bool) -> fault_injection:
    """Build PyTorchFI's injector without letting it reconfigure the root logger."""
    root = logging.getLogger()
    saved = list(root.handlers)
    try:
        return fault_injection(model, batch_size, input_shape=list(input_shape), layer_types=layer_types, use_cuda=use_cuda)
    finally:
        root.handlers[:] = saved


def _unravel(position: int, shape: tuple[int, ...]) -> list:
    coords = list(np.unravel_index(position, shape))
    return [int(c) for c in coords] + [None] * (3 - len(coords))


def reference_run(
    model: nn.Module,
    images: torch.Tensor,
    site: Site,
    kind: str,
    bit: BitSpec,
    seed: int,
    batch_size: int = 256,
    images_per_weight_fault: int = DEFAULT_IMAGES_PER_WEIGHT_FAULT,
    mode: str = "fp32",
) -> ReferenceResult:
    """Golden and faulty top-1 per image, computed the seed's way for the engine's fault list."""
    dtype = check_mode(mode)
    model = model.eval().to(dtype=dtype)
    device = next(model.parameters()).device
    images = images.to(device=device, dtype=dtype)
    use_cuda = device.type == "cuda"
    n = images.shape[0]
    width = dtype_width(dtype)
    golden = np.empty(n, dtype=np.int64)
    faulty = np.empty(n, dtype=np.int64)
    with math_mode(mode), torch.no_grad():
        if kind == "neuron":
            faults = sample_faults(seed, "neuron", site.index, bit, width, site.output_numel, 0, n)
            wrapped = nn.Sequential(nn.Identity(), model)  # the seed's layer 0 = the input image
            pfi = _pytorchfi(wrapped, batch_size, images.shape[1:], ["all"], use_cuda)
            for lo in range(0, n, batch_size):
                batch = images[lo : lo + batch_size].clone()  # Identity's output aliases its input
                golden[lo : lo + len(batch)] = model(batch).argmax(dim=1).cpu().numpy()
                coords = [_unravel(int(p), site.output_shape) for p in faults.positions[lo : lo + len(batch)]]
                bits = [int(b) for b in faults.bits[lo : lo + len(batch)]]

                def inject(_module, _inputs, output, coords=coords, bits=bits):
                    if pfi.get_current_layer() == site.index:
                        for b, (c, h, w) in enumerate(coords):
                            index = tuple(i for i in (b, c, h, w) if i is not None)
                            output[index] = bitstring_flip(output[index].item(), bits[b], dtype)
                    pfi.updateLayer()

                corrupted = pfi.declare_neuron_fi(
                    function=inject,
                    layer_num=[site.index] * len(batch),
                    batch=list(range(len(batch))),
                    dim1=[c[0] for c in coords],
                    dim2=[c[1] for c in coords],
                    dim3=[c[2] for c in coords],
                )
                pfi.reset_current_layer()
                faulty[lo : lo + len(batch)] = corrupted(batch).argmax(dim=1).cpu().numpy()
        elif kind == "weight":
            module = find_module(model, site)
            layer_type = type(module)
            same_type = [m for m in model.modules() if isinstance(m, layer_type)]
            layer_num = next(i for i, m in enumerate(same_type) if m is module)
            groups = -(-n // images_per_weight_fault)
            faults = sample_faults(seed, "weight", site.index, bit, width, site.weight_numel, 0, groups)
            pfi = _pytorchfi(model, batch_size, images.shape[1:], [layer_type], use_cuda)
            for g in range(groups):
                coords = _unravel(int(faults.positions[g]), site.weight_shape) + [None]
                flip = int(faults.bits[g])
                corrupted = pfi.declare_weight_fi(
                    function=lambda weight, index: bitstring_flip(weight[index].item(), flip, dtype),
                    layer_num=[layer_num],
                    k=[coords[0]],
                    dim1=[coords[1]],
                    dim2=[coords[2]],
                    dim3=[coords[3]],
                )
                hi_group = min((g + 1) * images_per_weight_fault, n)
                for lo in range(g * images_per_weight_fault, hi_group, batch_size):
                    batch = images[lo : min(lo + batch_size, hi_group)]
                    golden[lo : lo + len(batch)] = model(batch).argmax(dim=1).cpu().numpy()
                    faulty[lo : lo + len(batch)] = corrupted(batch).argmax(dim=1).cpu().numpy()
        else:
            raise ValueError(f"unknown site kind {kind!r}: use neuron or weight")
    return ReferenceResult(golden, faulty)
