"""``prompts:<file>``: one prompt a line (empty lines skipped) for generation trials, tokenized
with the campaign model's tokenizer (DataOptions.model, a causal LM): a ``Prompts`` of the texts
and their token ids (variable lengths, no special tokens added)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from trainables.zoo.datasets import DataOptions, DataSource, register_dataset
from trainables.zoo.datasets.common import apply_limit, refuse_image_settings
from trainables.zoo.datasets.text import causal_tokenizer, token_ids


@dataclass(frozen=True)
class Prompts:
    """The prompts of a generation campaign: ``texts[i]`` tokenizes to ``token_ids[i]`` (1-d int64)."""

    name: str
    texts: tuple[str, ...]
    token_ids: tuple[torch.Tensor, ...]
    context_length: int | None  # the model's longest sequence (prompt + new tokens must fit)
    vocab_size: int

    def __len__(self) -> int:
        return len(self.texts)


DEMO_NAME = "demo-lm-prompts"  # demo:lm's shipped prompts (data/demo-lm/prompts.txt), checksum-checked


def _path(rest: str) -> Path:
    """The prompts file: the shipped demo prompts (SHA-256 checked) or the path given."""
    if rest == DEMO_NAME:
        from trainables.zoo.models import DEMO_LM_PROMPTS, verify_demo_lm_file

        return verify_demo_lm_file(*DEMO_LM_PROMPTS)
    return Path(rest).expanduser()


def check(rest: str, options: DataOptions) -> None:
    if not rest:
        raise ValueError(f"prompts: name a text file with one prompt a line, or {DEMO_NAME} (demo:lm's)")
    refuse_image_settings(f"prompts:{rest}", options)
    if options.seq_len is not None:
        raise ValueError(f"prompts:{rest}: seq_len applies to text: data sets; prompts keep their own lengths")
    if rest != DEMO_NAME and not Path(rest).expanduser().is_file():
        raise ValueError(f"prompts:{rest}: no such file")


def load(rest: str, options: DataOptions) -> Prompts:
    name = f"prompts:{rest}"
    check(rest, options)
    tokenizer = causal_tokenizer(options.model, name)
    try:
        lines = _path(rest).read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as exc:
        raise ValueError(f"{name}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    texts = [line for line in lines if line.strip()]
    if not texts:
        raise ValueError(f"{name}: the file holds no prompt (one a line)")
    texts = texts[: apply_limit(name, len(texts), options.limit)]
    ids = tuple(token_ids(tokenizer, text) for text in texts)
    context = tokenizer.context_length
    for i, t in enumerate(ids):
        if context is not None and len(t) > context:
            raise ValueError(f"{name}: prompt {i + 1} has {len(t)} tokens, over model {tokenizer.model}'s context of {context}")
    return Prompts(name, tuple(texts), ids, context, tokenizer.vocab_size)


SOURCE = register_dataset(DataSource("prompts", check, load, f"prompts:<file, one prompt a line>|prompts:{DEMO_NAME}"))
