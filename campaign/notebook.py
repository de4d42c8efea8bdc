"""``campaign.run(model=..., data=...)``: a campaign from Python (a notebook) on an in-memory
model and data set, returning the trials DataFrame. The model and data travel to the Ray
workers through the object store; the campaign directory, resume and report are the CLI's."""
from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

from campaign.spec import SpecError, spec_from_mapping


def _as_module(model: nn.Module | Callable[[], nn.Module]) -> nn.Module:
    if isinstance(model, nn.Module):
        return model
    if callable(model):
        built = model()
        if isinstance(built, nn.Module):
            return built
        raise ValueError(f"model: the factory returned a {type(built).__name__}, not a torch.nn.Module")
    raise ValueError(f"model: give an nn.Module or a function returning one, not a {type(model).__name__}")


def _as_tensors(data: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs, labels) tensors from a pair of tensors or a map-style Dataset of (input, label) pairs."""
    if isinstance(data, (tuple, list)) and len(data) == 2 and all(isinstance(t, torch.Tensor) for t in data):
        return data[0], data[1]
    if isinstance(data, torch.utils.data.Dataset) and hasattr(data, "__len__"):
        pairs = [data[i] for i in range(len(data))]
        if not pairs or not all(isinstance(p, (tuple, list)) and len(p) == 2 for p in pairs):
            raise ValueError("data: the Dataset must hold (input, label) pairs")
        return torch.stack([torch.as_tensor(x) for x, _ in pairs]), torch.as_tensor([int(y) for _, y in pairs])
    raise ValueError("data: give (inputs, labels) tensors or a map-style torch Dataset of (input, label) pairs")


def run(model: nn.Module | Callable[[], nn.Module], data: Any, *, num_classes: int | None = None,
        **settings: Any):
    """Run a campaign of ``model`` on ``data`` and return its trials (analysis.load). ``settings``
    are the CampaignSpec fields (sites, bits, layers, seeds, record, out, name, address, ...);
    ``num_classes`` defaults to the largest label + 1. Running it again with the same model, data
    and settings resumes or reuses the campaign directory."""
    import analysis
    from campaign.runner import run_campaign
    from trainables.zoo import memory

    for reserved in ("model", "dataset", "weights", "hub_dir", "model_args", "data_root"):
        if reserved in settings:
            raise SpecError(f"{reserved}: campaign.run takes the model and data as objects; use the CLI for named ones")
    module = _as_module(model)
    images, labels = _as_tensors(data)
    classes = num_classes if num_classes is not None else (int(labels.max()) + 1 if labels.numel() else 0)
    spec = spec_from_mapping({**settings, "model": memory.add_model(module),
                              "dataset": memory.add_data(images, labels, classes)}, source="campaign.run")
    outcome = run_campaign(spec, objects=memory.objects([spec.model, spec.dataset]))
    if not outcome.complete:
        raise RuntimeError(f"{outcome.total - outcome.finished} of {outcome.total} trials failed ({'; '.join(outcome.errors[:3])}): "
                           f"run campaign.run(...) again to finish {outcome.directory}")
    return analysis.load(outcome.directory)
