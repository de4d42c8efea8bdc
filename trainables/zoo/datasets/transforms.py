"""Image preprocessing named by ``--transform``, resolved into one ``ImageTransform``: resize and
center-crop on uint8 pixels (torchvision's functional ops, as ``WeightsEnum.transforms()`` runs
them on tensors), then ``(x / 255 - mean) / std`` in float32. The uint8 stage is what the
memory-mapped cache stores; ``normalize`` runs where the images are used (the device)."""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch

INTERPOLATIONS = ("nearest", "bilinear", "bicubic")
TRANSFORM_SYNTAX = ("torchvision:<WeightsEnum> (e.g. torchvision:ResNet50_Weights.IMAGENET1K_V2), timm, hf, or "
                    "resize=256,crop=224,mean=0.485,0.456,0.406,std=0.229,0.224,0.225[,interpolation=bilinear][,channels=3]")
_PIL_RESAMPLE = {0: "nearest", 2: "bilinear", 3: "bicubic"}  # the PIL codes Hugging Face processors store


@dataclass(frozen=True)
class ImageTransform:
    """Resize (one number: the shorter side; two: exact H x W), center crop (H, W), then per-channel
    normalization; ``channels`` decides how images are decoded (1 gray, 3 RGB)."""

    resize: tuple[int, ...] | None = None
    crop: tuple[int, int] | None = None
    mean: tuple[float, ...] = (0.0, 0.0, 0.0)
    std: tuple[float, ...] = (1.0, 1.0, 1.0)
    interpolation: str = "bilinear"
    channels: int = 3

    def describe(self) -> str:
        """A canonical text of every setting (part of the cache key)."""
        return (f"resize={self.resize},crop={self.crop},mean={[float(m) for m in self.mean]},"
                f"std={[float(s) for s in self.std]},interpolation={self.interpolation},channels={self.channels}")

    def geometric(self, image: torch.Tensor) -> torch.Tensor:
        """Resize and crop a uint8 (C, H, W) image; the result is uint8 (what the cache stores)."""
        import torchvision.transforms.functional as F
        from torchvision.transforms import InterpolationMode

        if self.resize is not None:
            image = F.resize(image, list(self.resize), interpolation=InterpolationMode(self.interpolation), antialias=True)
        if self.crop is not None:
            image = F.center_crop(image, list(self.crop))
        return image

    def constants(self, device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """255, mean and std as float32 tensors on ``device`` (not Python scalars: CUDA divides by a CPU
        scalar by multiplying with its reciprocal; by a tensor on the device it divides exactly)."""
        mean = torch.tensor(self.mean, dtype=torch.float32, device=device).view(-1, 1, 1)
        std = torch.tensor(self.std, dtype=torch.float32, device=device).view(-1, 1, 1)
        return torch.tensor(255.0, device=device), mean, std


def normalize(pixels: torch.Tensor, constants: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """uint8 (..., C, H, W) -> float32 ``(x / 255 - mean) / std`` on the pixels' device."""
    scale, mean, std = constants
    return (pixels.to(torch.float32) / scale - mean) / std


def parse_transform(text: str | None, model: str | None = None) -> ImageTransform:
    """``--transform`` -> ImageTransform; one ValueError line for anything it cannot use.
    ``timm`` and ``hf`` read the campaign's model (``timm:<name>``, ``hf:<dir>``)."""
    if text is None or not str(text).strip() or str(text).strip() == "none":
        return ImageTransform()
    text = str(text).strip()
    if text.startswith("torchvision:"):
        return _from_torchvision(text[len("torchvision:"):])
    if text == "timm":
        return timm_transform(_model_rest(model, "timm", text))
    if text == "hf":
        return hf_transform(_model_rest(model, "hf", text))
    if "=" in text:
        return _explicit(text)
    raise ValueError(f"unknown transform {text!r}: use {TRANSFORM_SYNTAX}")


def _model_rest(model: str | None, prefix: str, text: str) -> str:
    if not model or not model.startswith(prefix + ":"):
        raise ValueError(f"transform {text}: needs a {prefix}:<{'name' if prefix == 'timm' else 'directory'}> model, "
                         f"got {model or 'none'}")
    return model[len(prefix) + 1:]


def _from_torchvision(name: str) -> ImageTransform:
    """The resize/crop/mean/std of a torchvision WeightsEnum's ``transforms()`` (ImageClassification)."""
    import torchvision.models
    from torchvision.transforms._presets import ImageClassification

    try:
        weights = torchvision.models.get_weight(name)
    except Exception:  # noqa: BLE001 - torchvision raises several kinds for an unknown name
        raise ValueError(f"unknown transform torchvision:{name}: name a torchvision WeightsEnum member such as "
                         "ResNet50_Weights.IMAGENET1K_V2") from None
    preset = weights.transforms()
    if not isinstance(preset, ImageClassification):
        raise ValueError(f"transform torchvision:{name}: its transforms() is {type(preset).__name__}, not an image "
                         "classification preset")
    if preset.antialias is False:
        raise ValueError(f"transform torchvision:{name}: resizing without antialias is not supported")
    return ImageTransform(tuple(preset.resize_size), (preset.crop_size[0], preset.crop_size[0]), tuple(preset.mean),
                          tuple(preset.std), preset.interpolation.value, len(preset.mean))


def timm_transform(name: str) -> ImageTransform:
    """The timm model's own evaluation data config (``resolve_data_config`` of its pretrained cfg)."""
    import timm
    from timm.data import resolve_data_config

    base = name.split("@")[0]
    if not timm.is_model(base.split(".")[0]):
        raise ValueError(f"transform timm: unknown timm model {name!r}")
    cfg = timm.get_pretrained_cfg(base)
    config = resolve_data_config(pretrained_cfg=cfg.to_dict() if cfg is not None else {"input_size": (3, 224, 224)})
    channels, height, width = config["input_size"]
    pct, mode = config.get("crop_pct") or 0.875, config.get("crop_mode") or "center"
    if config["interpolation"] not in INTERPOLATIONS:
        raise ValueError(f"transform timm: {name} uses interpolation {config['interpolation']}: not supported")
    scale = (math.floor(height / pct), math.floor(width / pct))
    if mode == "center":
        resize = (scale[0],) if scale[0] == scale[1] else scale
    elif mode == "squash":
        resize = scale
    else:
        raise ValueError(f"transform timm: {name} uses crop mode {mode!r}: only center and squash are supported")
    return ImageTransform(resize, (height, width), tuple(config["mean"]), tuple(config["std"]), config["interpolation"], channels)


def hf_transform(directory: str) -> ImageTransform:
    """The image processor saved in a Hugging Face model directory, as resize/crop/mean/std."""
    from transformers import AutoImageProcessor

    if not Path(directory).expanduser().is_dir():
        raise ValueError(f"transform hf: {directory} is not a directory")
    try:
        proc = AutoImageProcessor.from_pretrained(str(Path(directory).expanduser()), local_files_only=True)
    except Exception as exc:  # noqa: BLE001 - no processor files, unreadable config
        raise ValueError(f"transform hf: no image processor in {directory} ({' '.join(str(exc).split())[:200]})") from None
    size, crop = _hf_dict(getattr(proc, "size", None)), _hf_dict(getattr(proc, "crop_size", None))
    resize = None
    if getattr(proc, "do_resize", True) and size:
        if size.get("height") and size.get("width"):
            resize = (int(size["height"]), int(size["width"]))
        elif size.get("shortest_edge"):
            edge, pct = int(size["shortest_edge"]), getattr(proc, "crop_pct", None)
            if pct and edge < 384:  # ConvNeXt's processor: resize to edge / crop_pct, then crop edge
                resize, crop = (int(edge / pct),), {"height": edge, "width": edge}
            else:
                resize = (edge,)
        else:
            raise ValueError(f"transform hf: cannot read the processor's size {size} in {directory}")
    crop_hw = (int(crop["height"]), int(crop["width"])) if crop and (getattr(proc, "do_center_crop", False)
                                                                      or getattr(proc, "crop_pct", None)) else None
    rescale = getattr(proc, "rescale_factor", 1 / 255) if getattr(proc, "do_rescale", True) else None
    if rescale is None or not math.isclose(rescale, 1 / 255):
        raise ValueError(f"transform hf: the processor in {directory} does not rescale by 1/255")
    mean, std = (proc.image_mean, proc.image_std) if getattr(proc, "do_normalize", True) else ((0.0,) * 3, (1.0,) * 3)
    mean = tuple(float(m) for m in (mean if isinstance(mean, (list, tuple)) else [mean] * 3))
    std = tuple(float(s) for s in (std if isinstance(std, (list, tuple)) else [std] * 3))
    interpolation = _PIL_RESAMPLE.get(int(getattr(proc, "resample", 2) or 2), "bilinear")
    return ImageTransform(resize, crop_hw, mean, std, interpolation, len(mean))


def _hf_dict(value) -> dict | None:
    if value is None:
        return None
    if isinstance(value, int):
        return {"height": value, "width": value}
    return {k: v for k, v in dict(value if isinstance(value, dict) else vars(value)).items() if v is not None}


def _explicit(text: str) -> ImageTransform:
    """``resize=256,crop=224,mean=a,b,c,std=d,e,f,interpolation=bilinear,channels=3`` (bare numbers
    after mean= or std= continue its list; sizes take 224 or 224x192)."""
    values: dict[str, list[str]] = {}
    key = None
    for part in (p.strip() for p in text.split(",")):
        if "=" in part:
            key, value = (s.strip() for s in part.split("=", 1))
            if key not in ("resize", "crop", "mean", "std", "interpolation", "channels"):
                raise ValueError(f"unknown transform setting {key!r} in {text!r}: use {TRANSFORM_SYNTAX}")
            if key in values:
                raise ValueError(f"transform {text!r}: {key} given twice")
            values[key] = [value]
        elif key in ("mean", "std") and part:
            values[key].append(part)
        else:
            raise ValueError(f"unknown transform {text!r}: cannot read {part!r}; use {TRANSFORM_SYNTAX}")
    try:
        resize = _size(values["resize"][0], allow_one=True) if "resize" in values else None
        crop = _size(values["crop"][0], allow_one=False) if "crop" in values else None
        mean = tuple(float(v) for v in values.get("mean", []))
        std = tuple(float(v) for v in values.get("std", []))
        channels = int(values["channels"][0]) if "channels" in values else (len(mean) or len(std) or 3)
    except ValueError:
        raise ValueError(f"transform {text!r}: sizes are whole numbers (224 or 224x192), mean and std numbers") from None
    interpolation = values.get("interpolation", ["bilinear"])[0]
    if interpolation not in INTERPOLATIONS:
        raise ValueError(f"transform {text!r}: interpolation {interpolation!r}: use one of {', '.join(INTERPOLATIONS)}")
    if channels not in (1, 3):
        raise ValueError(f"transform {text!r}: channels must be 1 (gray) or 3 (RGB), got {channels}")
    mean, std = mean or (0.0,) * channels, std or (1.0,) * channels
    if len(mean) == 1 and channels == 3:
        mean = mean * 3
    if len(std) == 1 and channels == 3:
        std = std * 3
    if len(mean) != channels or len(std) != channels:
        raise ValueError(f"transform {text!r}: mean and std need {channels} value(s) (one per channel)")
    if any(s <= 0 or not math.isfinite(s) for s in std) or not all(math.isfinite(m) for m in mean):
        raise ValueError(f"transform {text!r}: std must be positive and mean finite")
    return ImageTransform(resize, crop, mean, std, interpolation, channels)


def _size(text: str, allow_one: bool) -> tuple[int, ...]:
    m = re.fullmatch(r"(\d+)(?:x(\d+))?", text)
    if not m or int(m.group(1)) < 1 or (m.group(2) is not None and int(m.group(2)) < 1):
        raise ValueError(text)
    if m.group(2) is not None:
        return int(m.group(1)), int(m.group(2))
    return (int(m.group(1)),) if allow_one else (int(m.group(1)), int(m.group(1)))
