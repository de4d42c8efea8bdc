"""Where a trial ran, precisely enough to tell apart machines whose kernels compute differently:
the CPU model and ATen capability (and for int8 the quantized engine and the kernel library its
convolutions take), or the GPU model and compute capability."""
from __future__ import annotations

import functools
import platform

import torch


@functools.lru_cache(maxsize=1)
def _cpuinfo() -> tuple[str, frozenset[str]]:
    """(model name, flags) of the first CPU in /proc/cpuinfo; the platform's name elsewhere."""
    name, flags = "", frozenset()
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                field, _, value = line.partition(":")
                if field.strip() == "model name" and not name:
                    name = value.strip()
                elif field.strip() == "flags" and not flags:
                    flags = frozenset(value.split())
                if name and flags:
                    break
    except OSError:
        pass
    return name or platform.processor() or platform.machine(), flags


def quantized_kernels(engine: str | None = None) -> str:
    """The quantized engine and where its convolutions run: PyTorch's x86 engine takes oneDNN on
    CPUs with AVX512-VNNI and fbgemm elsewhere (at::native::should_use_onednn_quant)."""
    engine = engine or torch.backends.quantized.engine
    if engine == "x86":
        return f"x86 (convolutions on {'onednn' if 'avx512_vnni' in _cpuinfo()[1] else 'fbgemm'})"
    return engine


def describe(device: torch.device, mode: str) -> str:
    """'cpu AMD EPYC 9B14 (AVX512); int8 x86 (convolutions on onednn)' or 'cuda NVIDIA H200 (sm_90)'."""
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        return f"cuda {torch.cuda.get_device_name(device)} (sm_{major}{minor})"
    text = f"cpu {_cpuinfo()[0]} ({torch.backends.cpu.get_cpu_capability()})"
    return f"{text}; int8 {quantized_kernels()}" if mode == "int8" else text
