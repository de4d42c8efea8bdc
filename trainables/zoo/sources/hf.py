"""``hf:<directory>``: a Hugging Face ``transformers`` model saved with ``save_pretrained``,
loaded offline (``local_files_only``) as ``AutoModelForImageClassification``,
``AutoModelForSequenceClassification`` or ``AutoModelForCausalLM`` (from the config's
``architectures``), with ``model_args`` passed to ``from_pretrained`` (e.g. ``attn_implementation=eager``).

A classifier becomes ``HFLogits`` ((batch, classes) logits: the output's ``.logits``); a causal
LM becomes ``CausalLMLogits`` (token ids (batch, T) in, next-token logits (batch, T, vocab) out). It holds the model's own submodules under their own names, so sites,
param names and state_dict keys are exactly the transformers ones (``vit.encoder.layer.0...``).
transformers 5 has no torch.fx tracer: prefix reuse falls back to the full forward pass for
classifiers (said once per campaign; the results are identical); causal LMs reuse the prefix at
decoder-layer boundaries (trainables.inject.layers).
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch
from torch import nn

from trainables.zoo.models import LoadOptions, load_weights
from trainables.zoo.sources import ModelSource

FORM = "hf:<directory saved with save_pretrained>"
TASKS = ("ForImageClassification", "ForSequenceClassification", "ForCausalLM")
CONFIG_FILES = ("config.json", "generation_config.json")


class HFLogits(nn.Module):
    """A transformers model whose forward returns ``model(x).logits``; it registers the model's
    children and top-level parameters (the same objects, not the model itself) so every name
    stays as transformers has it and conversions (.to, .half) reach the model."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        object.__setattr__(self, "hf_model", model)  # not a submodule: no 'hf_model.' name prefix
        for name, child in model.named_children():
            self.add_module(name, child)
        for name, param in model.named_parameters(recurse=False):
            self.register_parameter(name, param)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.hf_model(inputs).logits

    def train(self, mode: bool = True):
        super().train(mode)
        self.hf_model.train(mode)
        return self


class CausalLMLogits(HFLogits):
    """A causal LM: token ids (batch, T) in, next-token logits (batch, T, vocab) out, with no KV
    cache (teacher forcing). ``hf_model`` is the transformers model (for generation) and
    ``context_length`` its longest sequence; the tokenizer is ``hf.tokenizer(directory)``."""

    def __init__(self, model: nn.Module, directory: Path) -> None:
        super().__init__(model)
        config = model.config
        object.__setattr__(self, "directory", directory)
        self.context_length = next((getattr(config, name) for name in ("max_position_embeddings", "n_positions",
                                                                       "max_sequence_length") if getattr(config, name, None)), None)
        self.vocab_size = config.vocab_size

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.hf_model(input_ids=input_ids, use_cache=False).logits


def directory(rest: str) -> Path:
    """The model directory, checked: it exists and holds a config.json."""
    path = Path(os.path.expanduser(rest))
    if not path.is_dir():
        raise ValueError(f"hf: model directory {path} does not exist (save one with model.save_pretrained(directory))")
    if not (path / "config.json").is_file():
        raise ValueError(f"hf: {path} has no config.json: not a directory written by save_pretrained")
    return path


def _auto_class(path: Path, config):
    """AutoModelForImageClassification, AutoModelForSequenceClassification or AutoModelForCausalLM,
    from the config's architectures (else its model type, classifiers first as before)."""
    from transformers import AutoModelForCausalLM, AutoModelForImageClassification, AutoModelForSequenceClassification
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES,
        MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES,
    )

    autos = (AutoModelForImageClassification, AutoModelForSequenceClassification, AutoModelForCausalLM)
    architectures = config.architectures or []
    mappings = (MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES, MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES,
                MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)
    for suffix, mapping, auto in zip(TASKS, mappings, autos):  # GPT2LMHeadModel is a causal LM by the mapping
        if any(a.endswith(suffix) or a in mapping.values() for a in architectures):
            return auto
    for mapping, auto in zip(mappings, autos):
        if config.model_type in mapping:
            return auto
    raise ValueError(f"hf: {path} holds a {', '.join(architectures) or config.model_type} model: only image and sequence "
                     f"classifiers and causal LMs (AutoModelForImageClassification, AutoModelForSequenceClassification, "
                     f"AutoModelForCausalLM) are supported")


def _config(path: Path):
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(path, local_files_only=True)
    except Exception as exc:
        raise ValueError(f"hf: cannot read {path / 'config.json'}: {type(exc).__name__}: "
                         f"{' '.join(str(exc).split())[:300]}") from None


def check(rest: str, opts: LoadOptions) -> None:
    directory(rest)


def load(rest: str, opts: LoadOptions) -> nn.Module:
    path = directory(rest)
    config = _config(path)
    auto = _auto_class(path, config)
    causal = auto.__name__.endswith(TASKS[2])
    if opts.num_classes is not None and not causal and config.num_labels != opts.num_classes:
        raise ValueError(f"hf: {path} classifies {config.num_labels} labels, the data set has {opts.num_classes} classes")
    random_init = opts.random_init or opts.weights_path is not None
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # one bar per load in every worker's log otherwise
    try:
        if random_init:  # the architecture only: random weights, or the --weights file's
            model = auto.from_config(config, **opts.kwargs)
        else:
            model = auto.from_pretrained(path, local_files_only=True, **opts.kwargs)
    except Exception as exc:
        raise ValueError(f"hf: cannot load {path}: {type(exc).__name__}: {' '.join(str(exc).split())[:300]}") from None
    if opts.weights_path is not None:
        load_weights(model, opts.weights_path, f"hf:{path}")
    model = model.float().eval()
    return CausalLMLogits(model, path) if causal else HFLogits(model)


def code_digest(rest: str, opts: LoadOptions) -> tuple[str, str]:
    """The configuration files that define the architecture (the weights have their own digest)."""
    path = directory(rest)
    digest = hashlib.sha256()
    for name in CONFIG_FILES:
        if (path / name).is_file():
            digest.update(name.encode() + b"\0" + (path / name).read_bytes() + b"\0")
    return "code_sha256", digest.hexdigest()


def preprocessor(rest: str | os.PathLike):
    """The processor of an hf: model directory (``hf:<dir>`` or the directory): its image
    processor or tokenizer, loaded offline, for the data side's ``--transform hf`` and text
    data sets; ValueError when the directory has none."""
    from transformers import AutoImageProcessor, AutoTokenizer

    text = str(rest)
    path = directory(text[3:] if text.startswith("hf:") else text)
    problems = []
    for auto in (AutoImageProcessor, AutoTokenizer):
        try:
            return auto.from_pretrained(path, local_files_only=True)
        except Exception as exc:  # try the other kind
            problems.append(f"{auto.__name__}: {type(exc).__name__}")
    raise ValueError(f"hf: {path} has no image processor or tokenizer saved with it ({'; '.join(problems)}): "
                     f"save one with processor.save_pretrained(directory)")


def task(rest: str | os.PathLike) -> str:
    """'image', 'text' (a sequence classifier) or 'causal-lm': what an hf: model directory holds
    (for choosing its data)."""
    text = str(rest)
    path = directory(text[3:] if text.startswith("hf:") else text)
    name = _auto_class(path, _config(path)).__name__
    return "image" if name.endswith(TASKS[0]) else "causal-lm" if name.endswith(TASKS[2]) else "text"


def tokenizer(rest: str | os.PathLike):
    """The tokenizer saved in an hf: model directory, loaded offline; ValueError when it has none."""
    from transformers import AutoTokenizer

    text = str(rest)
    path = directory(text[3:] if text.startswith("hf:") else text)
    try:
        return AutoTokenizer.from_pretrained(path, local_files_only=True)
    except Exception as exc:
        raise ValueError(f"hf: {path} has no tokenizer saved with it ({type(exc).__name__}): "
                         f"save one with tokenizer.save_pretrained(directory)") from None


SOURCE = ModelSource("hf", FORM, load, check=check, code_digest=code_digest, takes_model_args=True)
