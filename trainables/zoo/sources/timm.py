"""``timm:<name>``: ``timm.create_model(name, pretrained=False, num_classes=..., **model_args)``,
random weights unless ``--weights`` names a local state_dict (.pth/.pt or .safetensors).
Nothing is downloaded: timm's pretrained weights come as a file the user passes."""
from __future__ import annotations

import difflib

from torch import nn

from trainables.zoo.models import LoadOptions, load_weights
from trainables.zoo.sources import ModelSource

FORM = "timm:<name>"


def check(rest: str, opts: LoadOptions | None = None) -> None:
    """ValueError naming close matches unless timm knows the architecture ``rest``."""
    import timm

    if timm.is_model(rest):
        return
    names = timm.list_models()
    close = difflib.get_close_matches(rest, names, n=4, cutoff=0.6)
    hint = f"did you mean {', '.join(close)}? " if close else "e.g. resnet18, convnext_atto, vit_tiny_patch16_224; "
    raise ValueError(f"unknown timm model {rest!r}: {hint}({len(names)} architectures, see timm.list_models())")


def create(rest: str, opts: LoadOptions) -> nn.Module:
    """The timm model with random weights (pretrained=False) and the options' classes and model_args."""
    import timm

    check(rest)
    kwargs = opts.kwargs
    if opts.num_classes is not None:
        kwargs.setdefault("num_classes", opts.num_classes)
    kwargs.pop("pretrained", None)
    try:
        return timm.create_model(rest, pretrained=False, **kwargs)
    except Exception as exc:  # e.g. a model_arg the architecture does not take
        raise ValueError(f"timm:{rest}: create_model({', '.join(f'{k}={v!r}' for k, v in kwargs.items())}) failed: "
                         f"{type(exc).__name__}: {' '.join(str(exc).split())[:300]}") from None


def load(rest: str, opts: LoadOptions) -> nn.Module:
    model = create(rest, opts)
    if opts.weights_path is not None:
        load_weights(model, opts.weights_path, f"timm:{rest} with {getattr(model, 'num_classes', '?')} classes")
    return model


def data_config(name: str, model_args: dict | None = None, model: nn.Module | None = None) -> dict:
    """timm's data config of ``timm:<name>`` (input_size, interpolation, mean, std, crop_pct,
    crop_mode), for the data side's ``--transform timm``; ``model`` skips building it again.
    An ``img_size`` model_arg sets input_size (timm's config keeps the pretrained size)."""
    import timm.data

    if model is None:
        model = create(name, LoadOptions(model_args=tuple(sorted((model_args or {}).items()))))
    config = dict(timm.data.resolve_model_data_config(model))
    size = (model_args or {}).get("img_size")
    if isinstance(size, int) and not isinstance(size, bool):
        config["input_size"] = (config["input_size"][0], size, size)
    return config


SOURCE = ModelSource("timm", FORM, load, check=check, takes_model_args=True)
