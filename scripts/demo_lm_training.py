"""Training of demo:lm (scripts/train_demo.py --model lm): a byte-level BPE tokenizer and a small
Llama (RMSNorm, rotary positions, SwiGLU, grouped-query attention, tied embeddings) on the King
James Bible of Debian's bible-kjv (scripts/install_corpora.sh), every 20th verse held out.
Deterministic for a given thread count: seeded draws, a fixed data order, deterministic kernels.

Writes to --out: the model (save_pretrained, safetensors), its tokenizer (PreTrainedTokenizerFast),
heldout.txt (the held-out verses, one a line) and train-bigrams.safetensors (the bigram counts of
the training tokens, so that tests can fit the bigram baseline without the corpus); prints the
held-out perplexity of the model and of the best-smoothed bigram, and every file's SHA-256.
"""
from __future__ import annotations

import argparse
import math
import re
import shutil
import subprocess
import time
from pathlib import Path

import torch
import torch.nn.functional as F

BIBLE_COMMAND = ("bible", "-f", "Gen1:1-Rev22:21")
VERSE = re.compile(r"^\S+?\d+:\d+ (.+)$")  # "Ge1:1 In the beginning ..." -> the verse text
EOS = "<|endoftext|>"


def read_verses(corpus: str | None) -> list[str]:
    """The verses without their references: from ``corpus`` (the saved output of the bible
    command) or by running ``bible -f Gen1:1-Rev22:21``."""
    if corpus is not None:
        text = Path(corpus).read_text(encoding="utf-8")
    else:
        if shutil.which(BIBLE_COMMAND[0]) is None:
            raise SystemExit("train_demo.py --model lm: no 'bible' command: run scripts/install_corpora.sh (or pass --corpus)")
        text = subprocess.run(BIBLE_COMMAND, check=True, capture_output=True, text=True).stdout
    verses = []
    for number, line in enumerate(text.splitlines(), 1):
        match = VERSE.match(line.strip())
        if match is None:
            raise SystemExit(f"train_demo.py --model lm: line {number} of the corpus is not a verse: {line[:80]!r}")
        verses.append(" ".join(match.group(1).split()))
    return verses


def split_verses(verses: list[str], every: int) -> tuple[list[str], list[str]]:
    """(training, held-out): every ``every``-th verse (the last of each group) is held out, so
    the held-out text spans every book in proportion."""
    held = [v for i, v in enumerate(verses) if i % every == every - 1]
    train = [v for i, v in enumerate(verses) if i % every != every - 1]
    return train, held


def lines_text(verses: list[str]) -> str:
    return "".join(f"{v}\n" for v in verses)


def train_tokenizer(verses: list[str], vocab_size: int, context: int):
    """A byte-level BPE (GPT-2's pre-tokenization and byte alphabet) trained on ``verses``,
    wrapped as a transformers PreTrainedTokenizerFast."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, special_tokens=[EOS],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator([f"{v}\n" for v in verses], trainer=trainer, length=len(verses))
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token=EOS, bos_token=EOS, unk_token=EOS,
                                   model_max_length=context)


def encode(tokenizer, text: str) -> torch.Tensor:
    return torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.int64)


def windows(ids: torch.Tensor, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Non-overlapping windows of seq_len + 1 tokens: (inputs w[:-1], labels w[1:]), (N, seq_len)."""
    n = (len(ids)) // (seq_len + 1)
    w = ids[: n * (seq_len + 1)].view(n, seq_len + 1)
    return w[:, :-1].contiguous(), w[:, 1:].contiguous()


@torch.inference_mode()
def lm_perplexity(model, inputs: torch.Tensor, labels: torch.Tensor, batch_size: int = 32) -> float:
    model.eval()
    total = 0.0
    for i in range(0, len(inputs), batch_size):
        logits = model(input_ids=inputs[i : i + batch_size], use_cache=False).logits
        total += float(F.cross_entropy(logits.flatten(0, 1).double(), labels[i : i + batch_size].flatten(), reduction="sum"))
    return math.exp(total / labels.numel())


def bigram_counts(ids: torch.Tensor, vocab: int) -> torch.Tensor:
    """(vocab, vocab) int64 counts of consecutive pairs (previous, next) in ``ids``."""
    return torch.bincount(ids[:-1] * vocab + ids[1:], minlength=vocab * vocab).view(vocab, vocab)


def bigram_log_probs(counts: torch.Tensor, smoothing: str, value: float) -> torch.Tensor:
    """log P(next | previous) of a bigram model with the named smoothing, (vocab, vocab) float64:
    add-k (``value`` = k), Jelinek-Mercer interpolation with the add-one unigram (``value`` =
    the bigram weight), interpolated Kneser-Ney (``value`` = the discount; continuation
    probabilities add-one smoothed). A previous token never seen falls back to the lower order."""
    c = counts.double()
    vocab = c.shape[0]
    row = c.sum(1, keepdim=True)
    seen = row > 0
    safe = row.clamp(min=1)
    if smoothing == "add-k":
        return ((c + value) / (row + value * vocab)).log()
    if smoothing == "jelinek-mercer":
        unigram = (c.sum(0) + 1) / (c.sum() + vocab)
        return torch.where(seen, value * c / safe + (1 - value) * unigram, unigram.expand_as(c)).log()
    if smoothing == "kneser-ney":
        continuation = ((c > 0).sum(0).double() + 1) / ((c > 0).sum() + vocab)
        types = (c > 0).sum(1, keepdim=True).double()
        p = (c - value).clamp(min=0) / safe + value * types / safe * continuation
        return torch.where(seen, p, continuation.expand_as(c)).log()
    raise ValueError(smoothing)


SMOOTHING_GRIDS = {
    "add-k": [10.0 ** e for e in (-3, -2.5, -2, -1.5, -1, -0.5, 0)],
    "jelinek-mercer": [0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95, 0.98],
    "kneser-ney": [0.5, 0.6, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95],
}


def best_bigram(counts: torch.Tensor, inputs: torch.Tensor, labels: torch.Tensor) -> tuple[float, str, float, dict]:
    """The lowest held-out perplexity over the smoothings and their grids (tuned on the held-out
    targets themselves: the most favourable choice for the bigram), with its smoothing and value."""
    table = {}
    for smoothing, grid in SMOOTHING_GRIDS.items():
        for value in grid:
            logp = bigram_log_probs(counts, smoothing, value)
            table[(smoothing, value)] = math.exp(-float(logp[inputs.flatten(), labels.flatten()].mean()))
    (smoothing, value), ppl = min(table.items(), key=lambda kv: kv[1])
    return ppl, smoothing, value, table


def build_model(vocab: int, context: int, width: int, layers: int, heads: int, kv_heads: int, intermediate: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=vocab, hidden_size=width, intermediate_size=intermediate, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=context,
                         rms_norm_eps=1e-5, tie_word_embeddings=True, bos_token_id=0, eos_token_id=0, pad_token_id=None,
                         attention_bias=False, mlp_bias=False, initializer_range=0.02)
    return LlamaForCausalLM(config)


def sha256_file(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="train_demo.py --model lm", description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=["lm"], default="lm")
    parser.add_argument("--out", required=True, help="directory to write the model, tokenizer and held-out split to (data/demo-lm)")
    parser.add_argument("--corpus", help="a file with the output of `bible -f Gen1:1-Rev22:21`; default: run it")
    parser.add_argument("--heldout-every", type=int, default=20, help="hold out every N-th verse (default 20)")
    parser.add_argument("--vocab", type=int, default=512)
    parser.add_argument("--context", type=int, default=128, help="training window and max_position_embeddings")
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--intermediate", type=int, default=384)
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--batch-size", type=int, default=32, help="windows per step")
    parser.add_argument("--lr", type=float, default=3e-3, help="peak AdamW learning rate (linear warm-up, cosine decay to 10%%)")
    parser.add_argument("--warmup", type=int, default=30)
    parser.add_argument("--weight-decay", type=float, default=0.1)
    parser.add_argument("--eval-every", type=int, default=0, help="print the held-out perplexity every N steps (0: never)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1: the shipped model was trained on one "
                        "thread of a busy 2-core machine, where two threads were several times slower). Results depend on it")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    torch.manual_seed(args.seed)
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(args.threads)
    generator = torch.Generator().manual_seed(args.seed)

    verses = read_verses(args.corpus)
    train, held = split_verses(verses, args.heldout_every)
    tokenizer = train_tokenizer(train, args.vocab, args.context)
    train_ids = encode(tokenizer, lines_text(train))
    held_ids = encode(tokenizer, lines_text(held))
    held_x, held_y = windows(held_ids, args.context)
    vocab = len(tokenizer)
    print(f"corpus: {len(verses)} verses; training {len(train)} verses, {len(train_ids)} tokens; held out every "
          f"{args.heldout_every}th: {len(held)} verses, {len(held_ids)} tokens, {len(held_x)} windows of {args.context}; "
          f"vocabulary {vocab} (tokenizer {time.perf_counter() - started:.0f} s)", flush=True)

    model = build_model(vocab, args.context, args.width, args.layers, args.heads, args.kv_heads, args.intermediate)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"LlamaForCausalLM: {n_params} parameters, {args.layers} layers of width {args.width}, {args.heads} heads "
          f"({args.kv_heads} key/value heads), SwiGLU {args.intermediate}, context {args.context}, tied embeddings; "
          f"{args.steps} steps of {args.batch_size} x {args.context} tokens, lr {args.lr}, weight decay "
          f"{args.weight_decay}, seed {args.seed}, {args.threads} threads", flush=True)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
                                  lr=args.lr, betas=(0.9, 0.95))

    def lr_at(step: int) -> float:
        if step < args.warmup:
            return args.lr * (step + 1) / args.warmup
        progress = (step - args.warmup) / max(1, args.steps - args.warmup)
        return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))

    span = args.context + 1
    offsets = torch.arange(span)
    train_start = time.perf_counter()
    running = 0.0
    for step in range(args.steps):
        model.train()
        starts = torch.randint(0, len(train_ids) - span + 1, (args.batch_size,), generator=generator)
        batch = train_ids[starts[:, None] + offsets]
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step)
        logits = model(input_ids=batch[:, :-1], use_cache=False).logits
        loss = F.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        running += float(loss.detach())
        if (step + 1) % 50 == 0:
            print(f"step {step + 1}/{args.steps}: train loss {running / 50:.4f} "
                  f"({time.perf_counter() - train_start:.0f} s)", flush=True)
            running = 0.0
        if args.eval_every and (step + 1) % args.eval_every == 0 and step + 1 < args.steps:
            print(f"  held-out perplexity {lm_perplexity(model, held_x, held_y):.2f}", flush=True)
    train_seconds = time.perf_counter() - train_start

    model.eval()
    ppl = lm_perplexity(model, held_x, held_y)
    counts = bigram_counts(train_ids, vocab)
    bigram_ppl, smoothing, value, table = best_bigram(counts, held_x, held_y)
    for (name, v), p in sorted(table.items()):
        print(f"  bigram {name} {v:g}: held-out perplexity {p:.2f}")
    tokens_seen = args.steps * args.batch_size * args.context
    print(f"trained {tokens_seen} tokens in {train_seconds:.0f} s ({time.perf_counter() - started:.0f} s in all)")
    print(f"held-out perplexity: demo:lm {ppl:.2f}, bigram {bigram_ppl:.2f} ({smoothing} {value:g}, fitted on the "
          f"training tokens); ratio {ppl / bigram_ppl:.3f}")

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    (out / "heldout.txt").write_text(lines_text(held), encoding="utf-8")
    from safetensors.torch import save_file

    nonzero = counts.flatten().nonzero().flatten()
    save_file({"pair_index": nonzero.to(torch.int32), "count": counts.flatten()[nonzero].to(torch.int32),
               "vocab_size": torch.tensor([vocab], dtype=torch.int32)}, str(out / "train-bigrams.safetensors"))
    for path in sorted(out.iterdir()):
        print(f"wrote {path} ({path.stat().st_size} bytes) sha256 {sha256_file(path)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
