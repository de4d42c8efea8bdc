"""int8 models: post-training static quantization with torch.ao.quantization FX graph mode.

``quantize_int8(model, calibration)`` traces the float model with torch.fx, inserts
observers (``get_default_qconfig_mapping("x86")``: per-channel symmetric qint8 weights for
Conv/Linear, quint8 activations with the x86 backend's reduced range 0..127), runs the
calibration images through it and converts it into a real quantized model (fbgemm/x86
kernels on the CPU, packed int8 weights). Deterministic: same model and images, same
model, bit for bit.

The converted model's input quantization is lifted out of the graph, so the model takes
a ``quint8`` tensor (trainables.inject.formats.quantize_inputs): input site 0 is then the quantized image, and
every neuron site of the model is an 8-bit integer tensor.

Sites of the converted model (trainables.inject.sites numbers them like any model, in
forward order): each quantized module call is a site, named after the float module it
replaces. Fused patterns are one site named after their first module (Conv-BN-ReLU ->
``ConvReLU2d`` under the conv's name; Linear-ReLU -> ``LinearReLU``), so the indices of a
quantized model differ from its float model's where modules were fused; ``campaign layers
--quantize int8`` prints them. Functional ops that FX turns into quantized functions (a
ResNet block's ``add`` + ``relu`` -> ``quantized.add_relu``) are no module calls and no sites.

torch 2.x marks torch.ao.quantization as deprecated; its deprecation and observer warnings
are silenced here (they say nothing about this use).

Calibration images are never the evaluated ones: ``fashion-mnist`` calibrates on the shipped
``fashion-mnist-calib`` split (training images), CIFAR on its training split (``cifar10-train``),
a synthetic set on the images that follow its own N; the first CALIBRATION_IMAGES of them.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import warnings
from typing import Iterator

import torch
from torch import fx, nn

from trainables.inject import formats

QUANTIZE_MODES = ("int8",)
BACKENDS = ("x86", "fbgemm")  # CPU backends with per-channel int8 weights, in order of preference
# Forces a quantized engine (x86, fbgemm or onednn) in this process and the workers it starts: how
# one CPU reproduces another class's int8 kernels (x86 runs convolutions on oneDNN where the CPU
# has AVX512-VNNI, on fbgemm elsewhere; fbgemm everywhere; onednn its own kernels and qconfig).
ENGINE_VARIABLE = "BITFLIP_QUANTIZED_ENGINE"
FORCEABLE = ("x86", "fbgemm", "onednn")
# The first 256 calibration images, in one batch: x86's HistogramObserver costs mostly per call,
# and on the demo models 256 images give the accuracy of 2,000 (within 0.1 point).
CALIBRATION_IMAGES = 256
CALIBRATION_BATCH = 256
_QUIET = (r".*torch\.ao\.quantization is deprecated.*", r".*quantized tensor creation functions.*",
          r".*reduce_range will be deprecated.*", r".*quant_min and quant_max.*", r".*must run observer before.*")


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Silence torch.ao.quantization's deprecation and observer warnings (and only those), and
    skip torch.fx's stack-trace capture while tracing (torch.fx.config.do_not_emit_stack_traces):
    symbolizing a traceback per graph node took most of the quantization time."""
    import torch.fx.config as fx_config

    saved = fx_config.do_not_emit_stack_traces
    fx_config.do_not_emit_stack_traces = True
    try:
        with warnings.catch_warnings():
            for message in _QUIET:
                warnings.filterwarnings("ignore", message=message)
            yield
    finally:
        fx_config.do_not_emit_stack_traces = saved


def check_quantize(value: object) -> str | None:
    """None (no quantization) or 'int8'; one ValueError line otherwise."""
    if value is None or value in ("none", "", False):
        return None
    if value not in QUANTIZE_MODES:
        raise ValueError(f"quantize: unknown {value!r}: use int8 (or leave it out for a float model)")
    return str(value)


def backend() -> str:
    """The quantized CPU backend to use (``BITFLIP_QUANTIZED_ENGINE`` when set); one ValueError
    line when this torch has none, or not the forced one."""
    engines = _supported_engines()
    forced = os.environ.get(ENGINE_VARIABLE)
    if forced:
        if forced not in FORCEABLE or forced not in engines:
            raise ValueError(f"{ENGINE_VARIABLE}={forced}: use one of "
                             f"{', '.join(e for e in FORCEABLE if e in engines)} (the quantized engines of this torch "
                             f"build that have per-channel int8 weights)")
        return forced
    for name in BACKENDS:
        if name in engines:
            return name
    raise ValueError(f"--quantize int8 needs the x86 or fbgemm quantized backend, and this torch build has only "
                     f"{', '.join(e for e in engines if e != 'none') or 'none'}")


def _supported_engines() -> list[str]:
    return list(torch.backends.quantized.supported_engines)


def is_quantized(model: nn.Module) -> bool:
    """True for a model converted by :func:`quantize_int8`."""
    return formats.input_qparams(model) is not None


def calibration_data(dataset: str, root: str | None = None, download: bool = False,
                     limit: int = CALIBRATION_IMAGES) -> torch.Tensor:
    """Images disjoint from ``dataset``'s evaluated ones to calibrate activation ranges on."""
    from trainables.zoo import data as datasets

    if dataset.startswith(datasets.SYNTHETIC_PREFIX):
        spec = datasets.parse_synthetic(dataset)
        extended = dataclasses.replace(spec, num_images=spec.num_images + limit)
        return datasets.make_synthetic(extended)[0][spec.num_images:]  # image i never depends on N
    calib = {"fashion-mnist": "fashion-mnist-calib", "cifar10": "cifar10-train", "cifar100": "cifar100-train"}
    if dataset in calib and calib[dataset] in datasets.DATASETS:
        return datasets.load_dataset(calib[dataset], root=root, download=download, limit=limit).images
    raise ValueError(f"--quantize int8 has no calibration split for {dataset!r} (images disjoint from the evaluated "
                     f"ones): use fashion-mnist, cifar10, cifar100 or a synthetic data set")


def quantize_int8(model: nn.Module, calibration: torch.Tensor, name: str = "the model") -> fx.GraphModule:
    """The int8 quantized (converted) form of float ``model``, calibrated on ``calibration``
    images, with its input quantization lifted out (see the module docstring). One
    ValueError line when the backend is missing or torch.fx cannot trace the model."""
    from torch.ao.quantization import get_default_qconfig_mapping
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

    engine = backend()
    if not calibration.is_floating_point() or calibration.dim() < 2:
        raise ValueError(f"--quantize int8 needs floating image inputs; {name} takes {calibration.dtype} inputs")
    torch.backends.quantized.engine = engine  # process-wide: the converted model's kernels run on it
    model = model.eval().cpu().float()
    calibration = calibration.float()
    with quiet():
        try:
            prepared = prepare_fx(model, get_default_qconfig_mapping(engine), example_inputs=(calibration[:2],))
        except Exception as exc:  # noqa: BLE001 - any tracing failure: one line
            detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ValueError(f"--quantize int8: torch.fx cannot trace {name} ({type(exc).__name__}: {detail[:200]}); "
                             f"int8 quantization needs an FX-traceable model") from None
        with torch.no_grad():
            for lo in range(0, calibration.shape[0], CALIBRATION_BATCH):
                prepared(calibration[lo : lo + CALIBRATION_BATCH])
        converted = convert_fx(prepared)
    _lift_input_quantization(converted, name)
    return converted.eval()


def _lift_input_quantization(gm: fx.GraphModule, name: str) -> None:
    """Remove the graph's ``quantize_per_tensor`` of its input, so that it takes a quantized
    tensor, and keep its (scale, zero point, dtype) in ``gm.bitflip_input_qparams``."""
    inputs = [n for n in gm.graph.nodes if n.op == "placeholder"]
    users = list(inputs[0].users) if len(inputs) == 1 else []
    if len(users) != 1 or users[0].op != "call_function" or users[0].target is not torch.quantize_per_tensor:
        raise ValueError(f"--quantize int8: {name} does not quantize its input first (one input, read once by "
                         f"quantize_per_tensor), so its input site cannot be an int8 tensor")
    node = users[0]
    _, scale_node, zp_node, dtype = node.args
    scale = float(getattr(gm, scale_node.target)) if isinstance(scale_node, fx.Node) else float(scale_node)
    zero_point = int(getattr(gm, zp_node.target)) if isinstance(zp_node, fx.Node) else int(zp_node)
    node.replace_all_uses_with(inputs[0])
    gm.graph.erase_node(node)
    for attr in (scale_node, zp_node):
        if isinstance(attr, fx.Node) and not attr.users:
            gm.graph.erase_node(attr)
    gm.graph.lint()
    gm.recompile()
    setattr(gm, formats.INPUT_QPARAMS, (scale, zero_point, dtype))


