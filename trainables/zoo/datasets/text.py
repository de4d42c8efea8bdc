"""``text:<file>`` (or ``text:demo-lm-heldout``, demo:lm's held-out verses): a UTF-8 text for a
causal LM, tokenized with the campaign model's tokenizer and cut into non-overlapping windows of
seq_len + 1 tokens; inputs are w[:-1] and labels w[1:] (int64, (N, seq_len)): the next token at
every position. seq_len (``--seq-len``) defaults to the model's context length."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from trainables.zoo.datasets import DataOptions, DataSource, register_dataset
from trainables.zoo.datasets.common import apply_limit, refuse_image_settings

HELDOUT_NAME = "demo-lm-heldout"


@dataclass(frozen=True)
class CausalTokenizer:
    """The campaign model's tokenizer and what bounds its sequences."""

    tokenizer: object  # a transformers tokenizer
    context_length: int | None  # the model's longest sequence (None: the config names none)
    vocab_size: int
    model: str


def check_seq_len(seq_len: object) -> int | None:
    if seq_len is None:
        return None
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 1:
        raise ValueError(f"seq_len must be a positive integer (tokens per sequence), got {seq_len!r}")
    return seq_len


def model_directory(model: str | None, what: str) -> Path:
    """The save_pretrained directory of a causal-LM campaign model (hf:<dir> or demo:lm);
    one ValueError line for any other model."""
    from trainables.zoo.sources import hf

    if model == "demo:lm":
        from trainables.zoo.models import DEMO_LM_DIR

        return DEMO_LM_DIR
    if isinstance(model, str) and model.startswith("hf:"):
        path = hf.directory(model[3:])
        if hf.task(path) != "causal-lm":
            raise ValueError(f"{what}: model {model} is not a causal LM: text data sets need one (hf:<dir> or demo:lm)")
        return path
    raise ValueError(f"{what}: needs a causal LM with a tokenizer as the model (hf:<dir> or demo:lm), got {model!r}")


def causal_tokenizer(model: str | None, what: str) -> CausalTokenizer:
    """The tokenizer, context length and vocabulary of the campaign model (DataOptions.model)."""
    from trainables.zoo.sources import hf

    path = model_directory(model, what)
    config = hf._config(path)
    context = next((getattr(config, name) for name in ("max_position_embeddings", "n_positions", "max_sequence_length")
                    if getattr(config, name, None)), None)
    try:
        tokenizer = hf.tokenizer(path)
    except ValueError as exc:
        raise ValueError(f"{what}: model {model}: {exc}") from None
    return CausalTokenizer(tokenizer, context, int(config.vocab_size), str(model))


def token_ids(tokenizer: CausalTokenizer, text: str) -> torch.Tensor:
    """The text's token ids (no special tokens added), int64."""
    return torch.tensor(tokenizer.tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"], dtype=torch.int64)


def windows(ids: torch.Tensor, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Non-overlapping windows of seq_len + 1 tokens: (inputs w[:-1], labels w[1:]), each (N, seq_len)."""
    count = len(ids) // (seq_len + 1)
    w = ids[: count * (seq_len + 1)].view(count, seq_len + 1)
    return w[:, :-1].contiguous(), w[:, 1:].contiguous()


def sequence_length(name: str, tokenizer: CausalTokenizer, seq_len: int | None) -> int:
    """seq_len, checked against the model's context (its context by default)."""
    seq_len = check_seq_len(seq_len)
    if seq_len is None:
        if tokenizer.context_length is None:
            raise ValueError(f"{name}: model {tokenizer.model} names no context length: pass seq_len (--seq-len)")
        return int(tokenizer.context_length)
    if tokenizer.context_length is not None and seq_len > tokenizer.context_length:
        raise ValueError(f"{name}: seq_len {seq_len} exceeds model {tokenizer.model}'s context of "
                         f"{tokenizer.context_length} tokens")
    return seq_len


def token_dataset(name: str, ids: torch.Tensor, tokenizer: CausalTokenizer, options: DataOptions):
    """A Dataset of next-token windows of ``ids`` (the text data sets' common end)."""
    from trainables.zoo.data import Dataset

    seq_len = sequence_length(name, tokenizer, options.seq_len)
    inputs, labels = windows(ids, seq_len)
    if len(inputs) == 0:
        raise ValueError(f"{name}: {len(ids)} tokens are too few for one sequence of seq_len {seq_len} "
                         f"(it takes {seq_len + 1})")
    n = apply_limit(name, len(inputs), options.limit)
    return Dataset(name, inputs[:n].clone(), labels[:n].clone(), tokenizer.vocab_size, synthetic=False)


def text_path(rest: str) -> Path:
    if rest == HELDOUT_NAME:
        from trainables.zoo.models import DEMO_LM_HELDOUT, verify_demo_lm_file

        return verify_demo_lm_file(*DEMO_LM_HELDOUT)
    path = Path(rest).expanduser()
    if not path.is_file():
        raise ValueError(f"text:{rest}: no such file")
    return path


def check(rest: str, options: DataOptions) -> None:
    if not rest:
        raise ValueError(f"text: name a text file or {HELDOUT_NAME} (demo:lm's held-out verses)")
    refuse_image_settings(f"text:{rest}", options)
    check_seq_len(options.seq_len)
    if rest != HELDOUT_NAME and not Path(rest).expanduser().is_file():
        raise ValueError(f"text:{rest}: no such file")


def load(rest: str, options: DataOptions):
    name = f"text:{rest}"
    check(rest, options)
    tokenizer = causal_tokenizer(options.model, name)
    path = text_path(rest)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"{name}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    return token_dataset(name, token_ids(tokenizer, text), tokenizer, options)


SOURCE = register_dataset(DataSource("text", check, load, f"text:<file>|text:{HELDOUT_NAME}"))
