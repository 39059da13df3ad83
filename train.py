"""Train the project's own small model: a BPE tokenizer and a Llama (model.py)
on the TinyStories sample, on the CPU, reproducibly.

  python3 train.py [--text PATH] [--out-dir models] [--steps N] ...

Writes OUT_DIR/tinystories.bin (fp32, version 0), OUT_DIR/tinystories-tok.bin
and OUT_DIR/tinystories-val.txt (the held-out stories the validation loss is
measured on). Every random choice is seeded and the thread count is fixed, so
a rerun on the same kind of machine writes the same bytes.

Data: the text's stories (separated by <|endoftext|> lines) up to the first
one that starts after 90% of the text train; the rest validate. As in
llama2.c, every story is encoded as BOS + its tokens, and training reads
random windows of the concatenated stream.

Validation loss is defined exactly as `run -m perplexity` measures it, story by
story: each validation story on its own, read as BOS + tokens in windows of
seq_len positions, every token predicted. So `run -m perplexity -f` on each
story, pooled, reproduces the number printed here (tests/test_own_model.py).
"""

import argparse
import collections
import copy
import ctypes
import math
import os
import re
import sys
import time

# Before torch loads: PyTorch's OpenMP threads spinning while OpenBLAS works,
# and glibc handing every large buffer back to the kernel after each use,
# otherwise cost about half the training time on two cores.
os.environ.setdefault("GOMP_SPINCOUNT", "0")
if sys.platform == "linux":
    libc = ctypes.CDLL("libc.so.6")
    libc.mallopt(-3, 1 << 30)  # M_MMAP_THRESHOLD: big buffers come from the heap...
    libc.mallopt(-1, 1 << 30)  # M_TRIM_THRESHOLD: ...which keeps them for the next step

import numpy as np
import torch
import torch.nn.functional as F

from exporter import writers
from exporter.tokenizers import SentencePieceEncoder
import model as M

BOS = 1
N_SPECIAL = 3 + 256  # <unk>, BOS, EOS, then the 256 byte pieces <0x00>..<0xFF>
SEPARATOR = "<|endoftext|>"


# ----------------------------------------------------------------------------
# Data


def read_stories(path):
    """(training stories, validation stories): split at the first story that
    starts after 90% of the text."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    cut = int(0.9 * len(text))
    train, val, offset = [], [], 0
    for part in text.split(SEPARATOR):
        story = part.strip()
        if story:
            (train if offset < cut else val).append(story)
        offset += len(part) + len(SEPARATOR)
    return train, val


def write_val(path, val_stories):
    writers.write_atomically(path, [(SEPARATOR.join(val_stories) + "\n").encode("utf-8")])


# ----------------------------------------------------------------------------
# Tokenizer: byte-fallback BPE, in the format and with the encoding rule of
# run.cpp: the text gets a leading space, every character becomes its piece
# (or its UTF-8 bytes' byte pieces), then the adjacent pair whose concatenation
# is the highest-scoring piece is merged, leftmost first, until none is left.
#
# Pieces never cross a chunk boundary (a chunk is one optional space and a run
# of non-space characters, or a single space or newline), so the text can be
# encoded chunk by chunk, with a cache, and give the ids run.cpp gives.

CHUNK = re.compile(r" ?[^ \n]+|[ \n]")


class Tokenizer:
    def __init__(self, pieces):
        """pieces: the strings after the special and byte pieces; chars first
        (score 0), then merges in the order learned (score -rank)."""
        self.pieces = pieces
        self.ids = {p: N_SPECIAL + i for i, p in enumerate(pieces)}
        n_chars = sum(len(p) == 1 for p in pieces)
        self.scores = [0.0] * (N_SPECIAL + n_chars) + [-float(r) for r in range(len(pieces) - n_chars)]
        self.all_pieces = [b"<unk>", b"\n<s>\n", b"\n</s>\n"] + [f"<0x{b:02X}>".encode() for b in range(256)]
        self.all_pieces += [p.encode("utf-8") for p in pieces]  # every id's piece, as tokenizer.bin holds it
        self.encoder = SentencePieceEncoder(self.all_pieces, self.scores)
        self.cache = {}

    @property
    def vocab_size(self):
        return N_SPECIAL + len(self.pieces)

    def encode_chunk(self, chunk):
        return self.encoder(chunk, dummy_prefix=False)

    def encode(self, text):
        """What run.cpp's encode(text, bos=false) returns."""
        ids = []
        for chunk in CHUNK.findall(" " + text):
            if chunk not in self.cache:
                self.cache[chunk] = self.encode_chunk(chunk)
            ids += self.cache[chunk]
        return ids

    def write(self, path):
        """tokenizer.bin: max piece length, then (score, length, bytes) per id."""
        writers.write_tokenizer_bin(path, self.all_pieces, self.scores)


def train_tokenizer(stories, vocab_size):
    """Every character of the text gets a piece; then BPE merges, most frequent
    adjacent pair first (ties: the smallest pair), within chunks only."""
    words = collections.Counter(c for s in stories for c in CHUNK.findall(" " + s))
    chars = sorted({c for w in words for c in w})
    if N_SPECIAL + len(chars) > vocab_size:
        sys.exit(f"train.py: --vocab-size {vocab_size} is below the {N_SPECIAL + len(chars)} pieces "
                 "the special tokens, bytes and characters need")
    seqs = [list(w) for w in words]
    counts = list(words.values())
    pairs = collections.Counter()  # adjacent pair -> occurrences in the text
    where = collections.defaultdict(set)  # adjacent pair -> indices of words holding it
    for i, s in enumerate(seqs):
        for pair in zip(s, s[1:]):
            pairs[pair] += counts[i]
            where[pair].add(i)
    merges = []
    while N_SPECIAL + len(chars) + len(merges) < vocab_size and pairs:
        best = min(pairs, key=lambda p: (-pairs[p], p))
        if pairs[best] < 2:
            break
        merged = best[0] + best[1]
        merges.append(merged)
        for i in where.pop(best):
            s = seqs[i]
            for pair in zip(s, s[1:]):  # forget this word's pairs, then recount them merged
                pairs[pair] -= counts[i]
                if pairs[pair] == 0:
                    del pairs[pair]
            j, out = 0, []
            while j < len(s):
                if j + 1 < len(s) and (s[j], s[j + 1]) == best:
                    out.append(merged)
                    j += 2
                else:
                    out.append(s[j])
                    j += 1
            seqs[i] = s = out
            for pair in zip(s, s[1:]):
                pairs[pair] += counts[i]
                where[pair].add(i)
    return Tokenizer(chars + merges)


# ----------------------------------------------------------------------------
# Validation: the loss `run -m perplexity` reports, pooled over stories.


def windows(ids, seq_len):
    """The windows `run -m perplexity -n seq_len` reads: BOS + up to seq_len - 1 tokens."""
    return [[BOS] + ids[i:i + seq_len - 1] for i in range(0, len(ids), seq_len - 1)]


@torch.no_grad()
def validation_loss(model, val_ids, seq_len, batch=16):
    """Mean NLL (nats per token) and token count over every validation story,
    computed in float64, so that the number does not depend on how float32
    sums are ordered (the tests recompute it to the last printed digit)."""
    model = copy.deepcopy(model).double()
    ws = [w for ids in val_ids for w in windows(ids, seq_len)]
    total, count = 0.0, 0
    for b in range(0, len(ws), batch):
        chunk = ws[b:b + batch]
        T = max(len(w) for w in chunk)
        x = torch.zeros(len(chunk), T, dtype=torch.long)
        y = torch.full((len(chunk), T), -1, dtype=torch.long)  # -1: padding, not predicted
        for r, w in enumerate(chunk):
            x[r, :len(w)] = torch.tensor(w)
            y[r, :len(w) - 1] = torch.tensor(w[1:])
        logits = model(x)
        total += F.cross_entropy(logits.view(-1, logits.shape[-1]), y.view(-1), ignore_index=-1,
                                 reduction="sum").item()
        count += int((y >= 0).sum())
    return total / count, count


# ----------------------------------------------------------------------------
# Training


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--text", default="../shared/models/tinystories/tinystories_sample_2MiB.txt")
    ap.add_argument("--out-dir", default="models")
    ap.add_argument("--vocab-size", type=int, default=1024)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--n-layers", type=int, default=6)
    ap.add_argument("--n-heads", type=int, default=4)
    ap.add_argument("--n-kv-heads", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--steps", type=int, default=500)
    ap.add_argument("--lr", type=float, default=2e-3, help="peak learning rate (cosine decay to a tenth)")
    ap.add_argument("--eval-every", type=int, default=100)
    ap.add_argument("--seed", type=int, default=1337)
    ap.add_argument("--threads", type=int, default=2, help="fixed so reruns are bit-identical (default 2)")
    ap.add_argument("--val-only", action="store_true",
                    help="only write OUT_DIR/tinystories-val.txt (the tests' held-out text) and stop")
    a = ap.parse_args()
    if not os.path.isfile(a.text):
        sys.exit(f"train.py: {a.text}: no such file")
    os.makedirs(a.out_dir, exist_ok=True)
    val_path = os.path.join(a.out_dir, "tinystories-val.txt")
    if a.val_only:
        write_val(val_path, read_stories(a.text)[1])
        return
    torch.manual_seed(a.seed)
    torch.set_num_threads(a.threads)
    rng = np.random.default_rng(a.seed)
    start = time.time()

    train_stories, val_stories = read_stories(a.text)
    tok = train_tokenizer(train_stories, a.vocab_size)
    stream = np.array([t for s in train_stories for t in [BOS] + tok.encode(s)], dtype=np.int64)
    val_ids = [tok.encode(s) for s in val_stories]
    print(f"tokenizer: {tok.vocab_size} pieces; {len(train_stories)} training stories, {len(stream)} tokens; "
          f"{len(val_stories)} validation stories, {sum(map(len, val_ids))} tokens ({time.time() - start:.0f} s)",
          flush=True)

    args = M.ModelArgs(dim=a.dim, n_layers=a.n_layers, n_heads=a.n_heads, n_kv_heads=a.n_kv_heads,
                       vocab_size=tok.vocab_size, max_seq_len=a.seq_len)
    model = M.Transformer(args)
    for name, p in model.named_parameters():  # GPT-2 style: N(0, 0.02), residual outputs scaled down
        torch.nn.init.normal_(p, std=0.02 / math.sqrt(2 * a.n_layers) if name.endswith(("wo.weight", "w2.weight"))
                              else 0.02) if p.dim() == 2 else torch.nn.init.ones_(p)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: dim {args.dim}, hidden {args.hidden_dim}, {args.n_layers} layers, {args.n_heads} heads "
          f"({args.n_kv_heads} kv), seq_len {args.max_seq_len}: {n_params / 1e6:.2f} M parameters", flush=True)

    decay = [p for p in model.parameters() if p.dim() == 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=a.lr, betas=(0.9, 0.95))
    warmup = max(1, a.steps // 20)
    T = a.seq_len
    for step in range(a.steps + 1):
        if step % a.eval_every == 0 or step == a.steps:
            model.eval()
            val, _ = validation_loss(model, val_ids, T)
            print(f"step {step:5d}  validation loss {val:.4f}  ({time.time() - start:.0f} s)", flush=True)
            model.train()
        if step == a.steps:
            break
        lr = a.lr * (step + 1) / warmup if step < warmup else \
            a.lr * (0.1 + 0.45 * (1 + math.cos(math.pi * (step - warmup) / (a.steps - warmup))))
        for g in opt.param_groups:
            g["lr"] = lr
        starts = rng.integers(0, len(stream) - T - 1, a.batch_size)
        batch = torch.from_numpy(np.stack([stream[s:s + T + 1] for s in starts]))
        logits = model(batch[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % 10 == 0:
            print(f"step {step:5d}  training loss {loss.item():.4f}  lr {lr:.2e}", flush=True)

    model.eval()
    val, count = validation_loss(model, val_ids, T)
    ckpt, tok_path = (os.path.join(a.out_dir, f) for f in ("tinystories.bin", "tinystories-tok.bin"))
    writers.write_checkpoint(model, ckpt, 0)
    tok.write(tok_path)
    write_val(val_path, val_stories)
    print(f"final validation loss {val:.4f} nats per token (perplexity {math.exp(val):.3f}) over {count} tokens; "
          f"{time.time() - start:.0f} s in all", flush=True)


if __name__ == "__main__":
    main()
