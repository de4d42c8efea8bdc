"""Campaign settings for number formats beyond the float math modes: ``quantize: int8`` (a
post-training-quantized int8 model, recorded as mode ``int8``) and ``weight_format:
fp8_e4m3fn|fp8_e5m2`` (weights stored in fp8, upcast for compute). Torch is imported lazily:
plain checks run before anything loads."""
from __future__ import annotations

from typing import Any

QUANTIZE_MODES = ("int8",)
WEIGHT_FORMATS = ("fp8_e4m3fn", "fp8_e5m2")
FORMAT_WIDTH = 8  # bits of an int8 or fp8 element


def effective_mode(spec: Any) -> str:
    """The mode recorded in every row: ``int8`` for a quantized model, else the math mode."""
    return "int8" if spec.quantize else spec.dtype


def name_suffix(spec: Any) -> str:
    """The campaign directory name's mode part: ``int8``, ``fp32``, ``fp32-fp8_e4m3fn``."""
    return effective_mode(spec) + (f"-{spec.weight_format}" if spec.weight_format else "")


def format_problems(spec: Any) -> list[str]:
    """One line per problem of the quantize / weight_format settings, before anything loads."""
    problems = []
    if "qparam" in spec.sites and not spec.quantize:
        problems.append("sites: qparam sites are the scales and zero points of an int8 model: add --quantize int8")
    if spec.quantize is not None and spec.quantize not in QUANTIZE_MODES:
        problems.append(f"quantize: unknown {spec.quantize!r}: use int8 (or leave it out for a float model)")
    if spec.weight_format is not None and spec.weight_format not in WEIGHT_FORMATS:
        problems.append(f"weight_format: unknown {spec.weight_format!r}: use one of {', '.join(WEIGHT_FORMATS)}")
    if spec.quantize and spec.weight_format:
        problems.append(f"weight_format: {spec.weight_format} stores float weights in fp8; an int8 model's weights are "
                        "int8 already: use --quantize or --weight-format, not both")
    for name, value in (("quantize", spec.quantize), ("weight_format", spec.weight_format)):
        if not value:
            continue
        if name == "quantize" and spec.dtype != "fp32":
            problems.append(f"quantize: an int8 model computes in int8; --dtype {spec.dtype} does not apply (leave it at fp32)")
        if name == "quantize" and spec.gpus_per_trial > 0:
            problems.append("gpus_per_trial: int8 quantized models run on the CPU (the x86/fbgemm backend): use 0")
        if "param" in spec.sites:
            problems.append(f"sites: param sites are not supported with --{name.replace('_', '-')} {value} "
                            "(its faults go to neuron and weight sites)")
        if str(getattr(spec, "protect", "none")).lower() != "none":
            problems.append(f"protect: not supported with --{name.replace('_', '-')} {value} yet")
    return problems


def check_quantizable(spec: Any, dataset: str, data) -> None:
    """One ValueError line unless ``data`` are images an int8 model can quantize."""
    if spec.quantize and not data.images.is_floating_point():
        raise ValueError(f"--quantize int8 needs floating image inputs; {dataset} holds {str(data.images.dtype).removeprefix('torch.')} "
                         f"inputs (token ids)")


def quantized_model(spec: Any, dataset: str, model):
    """``model`` as the spec wants it before sites are listed: int8-quantized (calibrated on
    images disjoint from ``dataset``'s evaluated ones) or unchanged. ValueError on failure."""
    if not spec.quantize:
        return model
    from trainables.zoo import quantization

    calibration = quantization.calibration_data(dataset, spec.data_root, spec.download)
    return quantization.quantize_int8(model, calibration, spec.model)


def probe_images(spec: Any, model, images, dtype):
    """A couple of images as the model takes them (quantized for an int8 model), for split checks."""
    if spec.quantize:
        from trainables.inject.formats import quantize_inputs

        return quantize_inputs(model, images[:2])
    return images[:2].to(dtype) if images.is_floating_point() else images[:2]


def weight_note(spec: Any, selected: dict) -> tuple[str, ...]:
    """Why int8 weight sites run the full forward pass (said once per campaign)."""
    if "weight" not in selected or not spec.quantize:
        return ()
    return (f"prefix reuse: {spec.model}: {len(selected['weight'])} int8 weight site(s) run the full forward pass: "
            "the weight is packed, and each fault unpacks, edits and repacks it",)


def bit_layouts(spec: Any) -> dict[str, tuple[str, ...]]:
    """Per site kind, the element formats (trainables.inject.bitpools.LAYOUTS) its faults edit:
    quint8 activation codes ('uint8') and qint8 weights ('int8') in an int8 model, fp8 weights
    under weight_format, float32 scales and int32 zero points for qparam sites, else the mode's."""
    mode = effective_mode(spec)
    out = {}
    for kind in spec.sites:
        if kind == "qparam":
            out[kind] = ("fp32", "int32")
        elif kind == "weight" and spec.weight_format:
            out[kind] = (spec.weight_format,)
        elif mode == "int8":
            out[kind] = ("int8",) if kind == "weight" else ("uint8",)
        else:
            out[kind] = (mode,)
    return out


def pool_problems(spec: Any, fault_bits: dict[str, list[tuple[str, list]]]) -> list[str]:
    """One line per bit pool that does not fit a kind's element format (a field it lacks), or
    holds fewer bits than a flip:K draws; ``fault_bits``: per kind, (fault model, bit specs)."""
    from trainables.inject.bitpools import WIDTHS, is_pool, parse_pool
    from trainables.inject.fault_models import check_fault, parse_fault

    layouts, kinds_of = bit_layouts(spec), {}  # problem -> the kinds it hits, in order
    for kind, pairs in fault_bits.items():
        for fault, bits in pairs:
            for bit in (b for b in bits if is_pool(b)):
                for layout in layouts.get(kind, ()):
                    try:
                        pool = parse_pool(bit).resolve(layout, WIDTHS[layout])
                    except ValueError as exc:
                        line = f"bits: {exc}"
                    else:
                        try:
                            check_fault(parse_fault(fault), WIDTHS[layout], pool)
                            continue
                        except ValueError as exc:
                            line = f"fault: {exc}"
                    kinds = kinds_of.setdefault(line, [])
                    kinds += [kind] if kind not in kinds else []
    return [f"{line} ({' and '.join(kinds)} sites)" for line, kinds in kinds_of.items()]
