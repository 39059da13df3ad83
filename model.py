"""The Llama 2 model in PyTorch, written to be read: the reference run.cpp is
tested against, and a loader for our .bin checkpoints (versions 0 to 3).

Parameter names match llama2.c's training code, so its checkpoints load with
load_state_dict. Shapes: B batch, T time, D dim, H heads, K kv heads, S head size.
"""

import math
import struct
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

MAGIC = 0x616B3432  # "ak42"
HEADER_BYTES = 256  # versions 1, 2 and 3
DEFAULT_ROPE_THETA = 10000.0
DEFAULT_NORM_EPS = 1e-5


@dataclass
class ModelArgs:
    dim: int = 288
    n_layers: int = 6
    n_heads: int = 6
    n_kv_heads: Optional[int] = None  # None: same as n_heads
    vocab_size: int = 32000
    hidden_dim: Optional[int] = None  # None: derived from dim as in llama2.c
    multiple_of: int = 32  # only used to derive hidden_dim
    norm_eps: float = DEFAULT_NORM_EPS
    max_seq_len: int = 256
    rope_theta: float = DEFAULT_ROPE_THETA
    # Llama 3.1's RoPE scaling (Hugging Face's rope_type "llama3"), or None:
    # (factor, low_freq_factor, high_freq_factor, original_max_position_embeddings)
    rope_scaling: Optional[tuple] = None
    shared_classifier: bool = True
    dropout: float = 0.0  # accepted for llama2.c's model_args; inference ignores it

    def __post_init__(self):
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        if self.hidden_dim is None:
            hidden = int(2 * (4 * self.dim) / 3)
            self.hidden_dim = self.multiple_of * ((hidden + self.multiple_of - 1) // self.multiple_of)

    @property
    def head_size(self):
        return self.dim // self.n_heads


class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps))


def scaled_frequencies(freqs, scaling):
    """Llama 3.1's RoPE scaling of the frequencies: those whose wavelength exceeds
    original / low_freq_factor divided by factor, those below original /
    high_freq_factor kept, those between blended linearly in original / wavelength."""
    if scaling is None:
        return freqs
    factor, low, high, original = scaling
    wavelength = 2 * math.pi / freqs
    smooth = ((original / wavelength - low) / (high - low)).clamp(0, 1)  # 0: divided, 1: kept
    return (1 - smooth) * freqs / factor + smooth * freqs


def rope_tables(head_size, seq_len, theta, scaling=None):
    """cos, sin of shape (seq_len, head_size / 2): angle p * freq_i, freq_i =
    theta^(-2i / head_size) (scaled if scaling), computed in float64 like run.cpp."""
    freqs = scaled_frequencies(theta ** (-torch.arange(0, head_size, 2, dtype=torch.float64) / head_size), scaling)
    angles = torch.outer(torch.arange(seq_len, dtype=torch.float64), freqs)
    return torch.cos(angles), torch.sin(angles)


def apply_rope(x, cos, sin):
    """Rotate the pairs (x[..., 2i], x[..., 2i+1]) of each head. x: (B, T, H, S)."""
    a, b = x[..., 0::2], x[..., 1::2]  # (B, T, H, S/2)
    cos, sin = cos[None, :, None, :].to(x.dtype), sin[None, :, None, :].to(x.dtype)
    return torch.stack((a * cos - b * sin, a * sin + b * cos), dim=-1).flatten(-2)


class Attention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_size = args.n_heads, args.n_kv_heads, args.head_size
        kv_dim = args.n_kv_heads * args.head_size
        self.wq = nn.Linear(args.dim, args.dim, bias=False)
        self.wk = nn.Linear(args.dim, kv_dim, bias=False)
        self.wv = nn.Linear(args.dim, kv_dim, bias=False)
        self.wo = nn.Linear(args.dim, args.dim, bias=False)

    def forward(self, x, cos, sin):
        B, T, _ = x.shape
        q = self.wq(x).view(B, T, self.n_heads, self.head_size)
        k = self.wk(x).view(B, T, self.n_kv_heads, self.head_size)
        v = self.wv(x).view(B, T, self.n_kv_heads, self.head_size)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        # grouped-query attention: each kv head serves n_heads / n_kv_heads query heads
        rep = self.n_heads // self.n_kv_heads
        k, v = k.repeat_interleave(rep, dim=2), v.repeat_interleave(rep, dim=2)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, H, T, S)
        scores = q @ k.transpose(2, 3) / math.sqrt(self.head_size)  # (B, H, T, T)
        causal = torch.ones(T, T, dtype=torch.bool).triu(1)
        scores = scores.masked_fill(causal, float("-inf"))
        out = F.softmax(scores, dim=-1) @ v  # (B, H, T, S)
        return self.wo(out.transpose(1, 2).reshape(B, T, -1))


class FeedForward(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.w1 = nn.Linear(args.dim, args.hidden_dim, bias=False)
        self.w2 = nn.Linear(args.hidden_dim, args.dim, bias=False)
        self.w3 = nn.Linear(args.dim, args.hidden_dim, bias=False)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))  # SwiGLU


class TransformerBlock(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.attention_norm = RMSNorm(args.dim, args.norm_eps)
        self.attention = Attention(args)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)
        self.feed_forward = FeedForward(args)

    def forward(self, x, cos, sin):
        x = x + self.attention(self.attention_norm(x), cos, sin)
        return x + self.feed_forward(self.ffn_norm(x))


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(TransformerBlock(args) for _ in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.output = nn.Linear(args.dim, args.vocab_size, bias=False)
        if args.shared_classifier:
            self.output.weight = self.tok_embeddings.weight

    def hidden(self, tokens):
        """tokens (B, T) -> the final normalized state (B, T, dim) the classifier reads."""
        T = tokens.shape[1]
        cos, sin = rope_tables(self.args.head_size, T, self.args.rope_theta, self.args.rope_scaling)
        x = self.tok_embeddings(tokens)
        for layer in self.layers:
            x = layer(x, cos, sin)
        return self.norm(x)

    def forward(self, tokens):
        """tokens (B, T) -> logits (B, T, vocab) at every position."""
        return self.output(self.hidden(tokens))

    @torch.no_grad()
    def generate_greedy(self, tokens, steps):
        """What `run -t 0 -n steps` computes: run `steps` positions, each giving
        the next token (forced while inside the prompt `tokens`), stopping
        before a BOS or EOS. Returns the whole sequence, prompt included."""
        tokens = list(tokens)
        while len(tokens) <= steps:
            logits = self(torch.tensor([tokens]))[0, -1]
            nxt = int(torch.argmax(logits))  # first maximum: lowest id on ties
            if nxt in (1, 2):
                break
            tokens.append(nxt)
        return tokens


# ----------------------------------------------------------------------------
# Reading our checkpoints. The layouts are documented byte by byte in docs/file-formats.md.

# (name in the state dict per layer, shape as a function of args), in file order
def layer_tensors(args):
    kv_dim = args.n_kv_heads * args.head_size
    return [
        ("attention.wq.weight", (args.dim, args.dim)),
        ("attention.wk.weight", (kv_dim, args.dim)),
        ("attention.wv.weight", (kv_dim, args.dim)),
        ("attention.wo.weight", (args.dim, args.dim)),
        ("feed_forward.w1.weight", (args.hidden_dim, args.dim)),
        ("feed_forward.w2.weight", (args.dim, args.hidden_dim)),
        ("feed_forward.w3.weight", (args.hidden_dim, args.dim)),
    ]


# The .bin layout, described once: every array stored after the header, in file
# order, as (label, the state-dict names whose tensors it holds, one tensor's
# shape, kind). A stacked array (the norms; versions 0 and 1's matrices) holds
# every layer's tensor, one after another; versions 2 and 3 store each layer's
# matrix as its own tensor, values then scales. kind: "f32"; "q8", int8 values
# then a float32 scale per group; "q4", two 4-bit values per byte (each row on a
# byte) then the scales. name None: version 0's RoPE tables, which nothing reads.
# export's writer, the reader below, the GGUF writer and the tests all use it.
def file_layout(args, version, int8_tensors=0):
    """int8_tensors (version 3, header offset 92): bit 0 keeps the embedding and
    bit 1 the classifier in int8."""
    layers = lambda name: [f"layers.{i}.{name}" for i in range(args.n_layers)]
    weights = "f32" if version < 2 else "q8" if version == 2 else "q4"
    norms = [("rms_att", layers("attention_norm.weight"), (args.dim,), "f32"),
             ("rms_ffn", layers("ffn_norm.weight"), (args.dim,), "f32")]
    emb = ("token_embedding", ["tok_embeddings.weight"], (args.vocab_size, args.dim),
           "q8" if int8_tensors & 1 else weights)
    mats = [(name.split(".")[1], layers(name), shape, weights) for name, shape in layer_tensors(args)]
    final = ("rms_final", ["norm.weight"], (args.dim,), "f32")
    if version == 0:  # llama2.c's order: each norm before the matrices it feeds
        rope = [(label, [None], (args.max_seq_len, args.head_size // 2), "f32")
                for label in ("freq_cis_real", "freq_cis_imag")]
        out = [emb, norms[0], *mats[:4], norms[1], *mats[4:], final, *rope]
    else:
        out = [*norms, final, emb, *mats]
    if not args.shared_classifier:
        out.append(("classifier", ["output.weight"], (args.vocab_size, args.dim),
                    "q8" if int8_tensors & 2 else weights))
    return out


def stored_bytes(shape, kind, group_size):
    """(value bytes, scale bytes) of one tensor of this shape and kind."""
    rows, cols = (1, shape[0]) if len(shape) == 1 else shape
    if kind == "f32":
        return 4 * rows * cols, 0
    return rows * cols if kind == "q8" else rows * ((cols + 1) // 2), 4 * rows * -(-cols // group_size)


class Reader:
    def __init__(self, data, offset):
        self.data, self.offset = data, offset

    def floats(self, *shape):
        n = int(np.prod(shape))
        a = np.frombuffer(self.data, dtype="<f4", count=n, offset=self.offset)
        self.offset += 4 * n
        return torch.from_numpy(a.copy()).view(*shape)

    def quantized(self, group_size, *shape):
        """int8 values then one float32 scale per group: Q8_0 dequantized."""
        n = int(np.prod(shape))
        q = np.frombuffer(self.data, dtype=np.int8, count=n, offset=self.offset)
        s = np.frombuffer(self.data, dtype="<f4", count=n // group_size, offset=self.offset + n)
        self.offset += n + 4 * (n // group_size)
        w = q.astype(np.float32).reshape(-1, group_size) * s[:, None]
        return torch.from_numpy(w).view(*shape)

    def quantized4(self, group_size, rows, cols):
        """Version 3: rows of (cols + 1) // 2 bytes, two 4-bit values each (low
        nibble first, two's complement), then one float32 scale per group of a
        row (the last shorter when group_size does not divide cols); dequantized."""
        row_bytes, groups = (cols + 1) // 2, -(-cols // group_size)
        b = np.frombuffer(self.data, dtype=np.uint8, count=rows * row_bytes, offset=self.offset)
        s = np.frombuffer(self.data, dtype="<f4", count=rows * groups, offset=self.offset + rows * row_bytes)
        self.offset += rows * row_bytes + 4 * rows * groups
        b = b.reshape(rows, row_bytes).astype(np.int16)
        q = np.stack([b & 15, b >> 4], axis=2).reshape(rows, -1)[:, :cols]
        q = np.where(q >= 8, q - 16, q).astype(np.float32)
        w = q * np.repeat(s.reshape(rows, groups), group_size, axis=1)[:, :cols]
        return torch.from_numpy(w)


def read_header(data):
    """(args, version, group_size, header_bytes) from the first bytes of a .bin."""
    if len(data) >= 4 and struct.unpack_from("<I", data, 0)[0] == MAGIC:
        version = struct.unpack_from("<i", data, 4)[0]
        if version not in (1, 2, 3):
            raise ValueError(f"unsupported checkpoint version {version}")
        dim, hidden, L, H, K, vocab, seq = struct.unpack_from("<7i", data, 8)
        shared = data[36] == 1
        group_size = struct.unpack_from("<i", data, 37)[0] if version >= 2 else 0
        theta, eps = struct.unpack_from("<2f", data, 64)
        kind, factor, low, high, original = struct.unpack_from("<i3fi", data, 72)
        if kind not in (0, 1):
            raise ValueError(f"rope scaling kind {kind}")
        scaling = (factor, low, high, original) if kind == 1 else None
        header = HEADER_BYTES
    else:
        version, group_size, header = 0, 0, 28
        dim, hidden, L, H, K, vocab, seq = struct.unpack_from("<7i", data, 0)
        shared, vocab = vocab > 0, abs(vocab)
        theta = eps = 0.0
        scaling = None
    args = ModelArgs(dim=dim, n_layers=L, n_heads=H, n_kv_heads=K, vocab_size=vocab,
                     hidden_dim=hidden, max_seq_len=seq, shared_classifier=shared,
                     rope_theta=theta or DEFAULT_ROPE_THETA, norm_eps=eps or DEFAULT_NORM_EPS,
                     rope_scaling=scaling)
    return args, version, group_size, header


def load_checkpoint(path):
    """Any of our .bin versions -> Transformer (float32; int8 weights dequantized)."""
    with open(path, "rb") as f:
        data = f.read()
    args, version, group_size, header = read_header(data)
    model = Transformer(args)
    r = Reader(data, header)
    # version 3 may keep the embedding (bit 0) and classifier (bit 1) in int8
    int8 = struct.unpack_from("<i", data, 92)[0] if version == 3 else 0
    if int8 & ~3 or (int8 and args.dim % group_size):
        raise ValueError(f"int8 tensor flags {int8} with group size {group_size}")
    read = {"f32": lambda shape: r.floats(*shape), "q8": lambda shape: r.quantized(group_size, *shape),
            "q4": lambda shape: r.quantized4(group_size, *shape)}
    sd = {}
    for _, names, shape, kind in file_layout(args, version, int8):
        for name in names:
            t = read[kind](shape)
            if name:
                sd[name] = t
    if args.shared_classifier:
        sd["output.weight"] = sd["tok_embeddings.weight"]
    if r.offset != len(data):
        raise ValueError(f"{path}: {len(data) - r.offset} bytes left over after the weights")
    model.load_state_dict(sd)
    return model
