"""demo:lm (data/demo-lm) and the LM data sources: text:, prompts:, hf-dataset: text columns."""
from __future__ import annotations

import math
import shutil

import pytest
import torch
import torch.nn.functional as F

from trainables.zoo import models
from trainables.zoo.data import load_dataset, sha256_file
from trainables.zoo.datasets import DataOptions, source_for
from trainables.zoo.models import DEMO_LM_BIGRAMS, DEMO_LM_DIR, DEMO_LM_FILES, DEMO_LM_HELDOUT, default_dataset_for, load_model
from trainables.zoo.sources import hf


@pytest.fixture(scope="module")
def lm():
    return load_model("demo:lm")


@pytest.fixture(scope="module")
def tokenizer():
    return hf.tokenizer(DEMO_LM_DIR)


def hand_windows(ids: list[int], seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Windows of seq_len + 1 consecutive tokens, cut by hand."""
    inputs, labels = [], []
    start = 0
    while start + seq_len + 1 <= len(ids):
        window = ids[start : start + seq_len + 1]
        inputs.append(window[:-1])
        labels.append(window[1:])
        start += seq_len + 1
    return torch.tensor(inputs, dtype=torch.int64), torch.tensor(labels, dtype=torch.int64)


def one_line_error(call, *fragments: str) -> str:
    with pytest.raises(ValueError) as info:
        call()
    message = str(info.value)
    assert "\n" not in message and all(f in message for f in fragments), message
    return message


def test_shipped_files_match_their_recorded_checksums():
    for name, expected in [*DEMO_LM_FILES.items(), DEMO_LM_HELDOUT, DEMO_LM_BIGRAMS]:
        assert sha256_file(DEMO_LM_DIR / name) == expected, name
    assert (DEMO_LM_DIR / "model.safetensors").stat().st_size < 5_000_000
    assert (DEMO_LM_DIR / DEMO_LM_HELDOUT[0]).stat().st_size <= 300_000


def test_a_damaged_or_missing_file_is_one_line_naming_it(tmp_path, monkeypatch):
    copy = tmp_path / "demo-lm"
    shutil.copytree(DEMO_LM_DIR, copy)
    monkeypatch.setattr(models, "DEMO_LM_DIR", copy)
    data = bytearray((copy / "model.safetensors").read_bytes())
    data[-1] ^= 1
    (copy / "model.safetensors").write_bytes(bytes(data))
    one_line_error(lambda: load_model("demo:lm"), "checksum mismatch", "model.safetensors", "git checkout", "train_demo.py")
    (copy / "heldout.txt").unlink()
    one_line_error(lambda: load_dataset("text:demo-lm-heldout", model="demo:lm"), "heldout.txt", "missing")


def test_demo_lm_is_a_llama_causal_lm_with_the_heldout_split_as_its_data(lm):
    assert isinstance(lm, hf.CausalLMLogits)
    config = lm.hf_model.config
    assert type(lm.hf_model).__name__ == "LlamaForCausalLM"
    assert config.num_key_value_heads < config.num_attention_heads  # grouped-query attention
    assert lm.context_length == config.max_position_embeddings
    assert default_dataset_for("demo:lm") == "text:demo-lm-heldout"
    random_a, random_b = load_model("demo:lm", weights="none"), load_model("demo:lm", weights="none")
    for (name, a), b, shipped in zip(random_a.state_dict().items(), random_b.state_dict().values(), lm.state_dict().values()):
        assert torch.equal(a, b), name  # random initialization is seeded
    assert not torch.equal(random_a.state_dict()["model.layers.0.mlp.up_proj.weight"],
                           lm.state_dict()["model.layers.0.mlp.up_proj.weight"])


def bigram_perplexity(counts: torch.Tensor, previous: torch.Tensor, following: torch.Tensor) -> tuple[float, str]:
    """The best held-out perplexity of a bigram fitted on ``counts`` over add-k, Jelinek-Mercer and
    interpolated Kneser-Ney smoothing, each tuned on the held-out pairs (the bigram's best case)."""
    c = counts.double()
    vocab = c.shape[0]
    row = c.sum(1, keepdim=True)
    safe = row.clamp(min=1)
    unigram = (c.sum(0) + 1) / (c.sum() + vocab)
    continuation = ((c > 0).sum(0).double() + 1) / ((c > 0).sum() + vocab)
    types = (c > 0).sum(1, keepdim=True).double()
    candidates = {}
    for k in (1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0):
        candidates[f"add-{k}"] = (c + k) / (row + k * vocab)
    for lam in (0.5, 0.7, 0.8, 0.9, 0.95, 0.98):
        candidates[f"jelinek-mercer {lam}"] = torch.where(row > 0, lam * c / safe + (1 - lam) * unigram, unigram)
    for d in (0.3, 0.4, 0.5, 0.6, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95):
        kn = (c - d).clamp(min=0) / safe + d * types / safe * continuation
        candidates[f"kneser-ney {d}"] = torch.where(row > 0, kn, continuation)
    perplexities = {name: math.exp(-float(p[previous, following].log().mean())) for name, p in candidates.items()}
    best = min(perplexities, key=perplexities.get)
    return perplexities[best], best


def test_heldout_perplexity_equals_a_reference_loop_and_is_under_half_the_bigrams(lm, tokenizer):
    data = load_dataset("text:demo-lm-heldout", model="demo:lm")
    seq_len = lm.context_length
    ids = tokenizer.encode((DEMO_LM_DIR / "heldout.txt").read_text(encoding="utf-8"), add_special_tokens=False)
    inputs, labels = hand_windows(ids, seq_len)
    assert torch.equal(data.images, inputs) and torch.equal(data.labels, labels)
    with torch.inference_mode():
        logits = torch.cat([lm(data.images[i : i + 64]) for i in range(0, len(data), 64)])
        perplexity = math.exp(float(F.cross_entropy(logits.flatten(0, 1).double(), data.labels.flatten())))
        every = 8  # the reference loop checks every 8th window (the suite's time budget); the claim below uses all
        total, count = 0.0, 0
        for start in range(0, len(ids) - seq_len, every * (seq_len + 1)):  # window by window, from the token list
            window = torch.tensor(ids[start : start + seq_len + 1])
            log_probs = torch.log_softmax(lm.hf_model(input_ids=window[None, :-1]).logits[0].double(), dim=-1)
            total -= float(log_probs[torch.arange(seq_len), window[1:]].sum())
            count += seq_len
        subset = math.exp(float(F.cross_entropy(logits[::every].flatten(0, 1).double(), data.labels[::every].flatten())))
    assert count == data.labels[::every].numel()
    assert subset == pytest.approx(math.exp(total / count), rel=1e-6)
    from safetensors.torch import load_file

    stored = load_file(str(DEMO_LM_DIR / DEMO_LM_BIGRAMS[0]))
    vocab = int(stored["vocab_size"][0])
    assert vocab == lm.vocab_size
    counts = torch.zeros(vocab * vocab, dtype=torch.int64)
    counts[stored["pair_index"].long()] = stored["count"].long()
    bigram, smoothing = bigram_perplexity(counts.view(vocab, vocab), data.images.flatten(), data.labels.flatten())
    assert perplexity < 0.5 * bigram, (perplexity, bigram, smoothing)


def test_text_windows_equal_a_hand_tokenization(tmp_path, tokenizer):
    text = "In the beginning God created the heaven and the earth.\nAnd the earth was without form, and void.\n"
    (tmp_path / "t.txt").write_text(text, encoding="utf-8")
    ids = tokenizer.encode(text, add_special_tokens=False)
    data = load_dataset(f"text:{tmp_path / 't.txt'}", model="demo:lm", seq_len=5)
    inputs, labels = hand_windows(ids, 5)
    assert len(ids) // 6 == len(inputs) >= 2
    assert torch.equal(data.images, inputs) and torch.equal(data.labels, labels)
    assert data.images.dtype == data.labels.dtype == torch.int64 and data.num_classes == tokenizer.vocab_size
    limited = load_dataset(f"text:{tmp_path / 't.txt'}", model="demo:lm", seq_len=5, limit=2)
    assert torch.equal(limited.images, inputs[:2]) and torch.equal(limited.labels, labels[:2])


def test_bad_text_inputs_are_one_line_each(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    (tmp_path / "t.txt").write_text("In the beginning\n", encoding="utf-8")
    name = f"text:{tmp_path / 't.txt'}"
    one_line_error(lambda: load_dataset(name, model="demo:lm", seq_len=129), "seq_len 129 exceeds", "128")
    one_line_error(lambda: load_dataset(name, model="demo:lm", seq_len=100), "too few for one sequence")
    one_line_error(lambda: load_dataset(name, model="demo:lm", seq_len=0), "positive integer")
    one_line_error(lambda: load_dataset(name, model="demo:vgg", seq_len=2), "needs a causal LM")
    one_line_error(lambda: load_dataset(f"text:{tmp_path / 'none.txt'}", model="demo:lm"), "no such file")
    bare = tmp_path / "bare"
    LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                 num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32)).save_pretrained(bare)
    one_line_error(lambda: load_dataset(name, model=f"hf:{bare}", seq_len=2), "no tokenizer")
    one_line_error(lambda: load_dataset(f"prompts:{tmp_path / 't.txt'}", model="demo:lm", seq_len=4), "seq_len")


def test_prompts_are_tokenized_one_a_line(tmp_path, tokenizer):
    lines = ["In the beginning", "", "And God said, Let there be light", "Jesus wept."]
    (tmp_path / "p.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    source, rest = source_for(f"prompts:{tmp_path / 'p.txt'}")
    prompts = source.load(rest, DataOptions(model="demo:lm"))
    assert prompts.texts == (lines[0], lines[2], lines[3])
    assert [t.tolist() for t in prompts.token_ids] == [tokenizer.encode(t, add_special_tokens=False) for t in prompts.texts]
    assert all(t.dtype == torch.int64 for t in prompts.token_ids) and prompts.context_length == 128
    assert len(source.load(rest, DataOptions(model="demo:lm", limit=2))) == 2


def test_an_hf_dataset_text_column_becomes_windows_for_a_causal_lm(tmp_path, tokenizer):
    import datasets

    rows = ["In the beginning God created the heaven and the earth.", "And the earth was without form, and void;",
            "and darkness was upon the face of the deep."]
    datasets.Dataset.from_dict({"text": rows}).save_to_disk(str(tmp_path / "ds"))
    data = load_dataset(f"hf-dataset:{tmp_path / 'ds'}", model="demo:lm", seq_len=7)
    inputs, labels = hand_windows(tokenizer.encode("".join(f"{r}\n" for r in rows), add_special_tokens=False), 7)
    assert len(inputs) >= 3 and torch.equal(data.images, inputs) and torch.equal(data.labels, labels)
    one_line_error(lambda: load_dataset(f"hf-dataset:{tmp_path / 'ds'}", model="demo:lm", label_column="text"),
                   "label_column")


def test_seq_len_from_flags_and_yaml_is_a_number_and_reaches_the_workers():
    from campaign.spec import spec_from_mapping
    from trainables.trial import CampaignSettings

    assert spec_from_mapping({"seq_len": "64"}).seq_len == 64
    assert CampaignSettings.from_dict({"name": "c", "directory": "d", "model": "m", "dataset": "x",
                                       "seq_len": 64}).seq_len == 64
