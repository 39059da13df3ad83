"""GGUF, llama.cpp's format, read (export.py --gguf) and written (--to-gguf).

Layout (versions 2 and 3; all little-endian): "GGUF", uint32 version, uint64
tensor count, uint64 metadata count; the metadata as (string key, uint32 type,
value); per tensor (string name, uint32 n_dims, uint64 ne[n_dims] with ne[0]
the contiguous dimension, uint32 ggml type, uint64 offset); zero padding to
general.alignment (default 32); then the tensor data, each tensor at its
offset from there (a multiple of the alignment). A string is a uint64 length
and that many UTF-8 bytes; an array a uint32 element type, a uint64 count and
the elements.

Llama's q/k rows: llama.cpp's converter permutes Hugging Face's rotate-half
rows back to Meta's interleaved pairs, which llama.cpp's RoPE (LLAMA_ROPE_TYPE_NORM)
rotates, as run.cpp does: GGUF and our files hold the same rows, so neither
direction permutes (tests/test_gguf.py shows that permuting breaks agreement
with llama.cpp)."""

import math
import mmap
import os
import struct

import numpy as np
import torch

import model as M
from exporter import LazyModel, as_float32, check_args, fail, our_shapes, progress

MAGIC = b"GGUF"
DEFAULT_ALIGNMENT = 32

# metadata value types: struct format (None: string 8, array 9)
VALUE_FORMATS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
STRING, ARRAY = 8, 9

# ggml tensor types we read: name, values per block, bytes per block
F32, F16, Q4_0, Q8_0, Q6_K, BF16 = 0, 1, 2, 8, 14, 30
TYPES = {F32: ("F32", 1, 4), F16: ("F16", 1, 2), Q4_0: ("Q4_0", 32, 18), Q8_0: ("Q8_0", 32, 34),
         Q6_K: ("Q6_K", 256, 210), BF16: ("BF16", 1, 2)}
OTHER_TYPES = {3: "Q4_1", 6: "Q5_0", 7: "Q5_1", 9: "Q8_1", 10: "Q2_K", 11: "Q3_K", 12: "Q4_K", 13: "Q5_K",
               15: "Q8_K", 16: "IQ2_XXS", 17: "IQ2_XS", 18: "IQ3_XXS", 19: "IQ1_S", 20: "IQ4_NL",
               21: "IQ3_S", 22: "IQ2_S", 23: "IQ4_XS", 24: "I8", 25: "I16", 26: "I32", 27: "I64", 28: "F64",
               29: "IQ1_M", 34: "TQ1_0", 35: "TQ2_0", 39: "MXFP4"}

# tokenizer.ggml.token_type
TOKEN_NORMAL, TOKEN_UNKNOWN, TOKEN_CONTROL, TOKEN_USER_DEFINED, TOKEN_BYTE = 1, 2, 3, 4, 6

# ours (model.py's state-dict names) -> llama.cpp's, per layer
GGUF_NAMES = {
    "attention_norm.weight": "attn_norm.weight", "ffn_norm.weight": "ffn_norm.weight",
    "attention.wq.weight": "attn_q.weight", "attention.wk.weight": "attn_k.weight",
    "attention.wv.weight": "attn_v.weight", "attention.wo.weight": "attn_output.weight",
    "feed_forward.w1.weight": "ffn_gate.weight", "feed_forward.w2.weight": "ffn_down.weight",
    "feed_forward.w3.weight": "ffn_up.weight",
}


def gguf_name(name):
    if name == "rope_freqs.weight":
        return name
    if name.startswith("layers."):
        _, i, rest = name.split(".", 2)
        return f"blk.{i}.{GGUF_NAMES[rest]}"
    return {"tok_embeddings.weight": "token_embd.weight", "norm.weight": "output_norm.weight",
            "output.weight": "output.weight"}[name]


# ----------------------------------------------------------------------------
# Reading: every count, length and offset is checked against the bytes that
# are left before it is used, so a cut or hostile file fails with one line.

class Cursor:
    def __init__(self, buf, path):
        self.buf, self.pos, self.path = buf, 0, path

    def take(self, n, what):
        if n > len(self.buf) - self.pos:
            fail(f"{self.path}: {what} at byte {self.pos} needs {n} bytes, only {len(self.buf) - self.pos} are left")
        self.pos += n
        return self.buf[self.pos - n:self.pos]

    def unpack(self, fmt, what):
        return struct.unpack("<" + fmt, self.take(struct.calcsize("<" + fmt), what))

    def string(self, what):
        (n,) = self.unpack("Q", what)
        raw = self.take(n, what)
        try:
            return bytes(raw).decode("utf-8")
        except UnicodeDecodeError:
            fail(f"{self.path}: {what} is not UTF-8")

    def value(self, kind, what):
        if kind == STRING:
            return self.string(what)
        if kind == ARRAY:
            inner, n = self.unpack("IQ", what)
            if inner == ARRAY:
                fail(f"{self.path}: {what} is an array of arrays")
            if inner == STRING:  # each at least its 8-byte length
                if n > (len(self.buf) - self.pos) // 8:
                    fail(f"{self.path}: {what}: {n} strings cannot fit in the {len(self.buf) - self.pos} bytes left")
                return [self.string(what) for _ in range(n)]
            if inner not in VALUE_FORMATS:
                fail(f"{self.path}: {what} has element type {inner}")
            size = struct.calcsize(VALUE_FORMATS[inner])
            if n > (len(self.buf) - self.pos) // size:
                fail(f"{self.path}: {what}: {n} values cannot fit in the {len(self.buf) - self.pos} bytes left")
            dtype = np.dtype("<" + VALUE_FORMATS[inner].replace("?", "b1"))
            return np.frombuffer(self.take(n * size, what), dtype=dtype).tolist()
        if kind not in VALUE_FORMATS:
            fail(f"{self.path}: {what} has value type {kind}")
        return self.unpack(VALUE_FORMATS[kind], what)[0]


class GGUF:
    """A GGUF file: its metadata {key: value} and tensors {name: (ggml type,
    shape as (rows, ..., ne[0]), byte offset in the file)}, validated; the
    data is read from the memory map only when asked for."""

    def __init__(self, path):
        self.path = path
        try:
            with open(path, "rb") as f:
                self.buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if os.path.getsize(path) else b""
        except OSError as e:
            fail(f"cannot read {path}: {e.strerror}")
        c = Cursor(memoryview(self.buf), path)
        if bytes(c.take(4, "the magic")) != MAGIC:
            fail(f"{path}: not a GGUF file (no GGUF magic)")
        (version,) = c.unpack("I", "the version")
        if version not in (2, 3):
            swapped = struct.unpack("<I", struct.pack(">I", version))[0]
            fail(f"{path}: big-endian GGUF is not supported" if swapped in (2, 3) else
                 f"{path}: GGUF version {version} is not supported (2 and 3 are)")
        self.version = version
        n_tensors, n_kv = c.unpack("QQ", "the counts")
        self.meta = {}
        for i in range(n_kv):
            key = c.string(f"metadata key {i}")
            if key in self.meta:
                fail(f"{path}: metadata key {key} appears twice")
            (kind,) = c.unpack("I", f"the type of {key}")
            self.meta[key] = c.value(kind, key)
        if n_tensors > (len(self.buf) - c.pos) // 24:  # each info at least 8 + 4 + 4 + 8 bytes
            fail(f"{path}: {n_tensors} tensor infos cannot fit in the {len(self.buf) - c.pos} bytes left")
        align = self.meta.get("general.alignment", DEFAULT_ALIGNMENT)
        if not isinstance(align, int) or isinstance(align, bool) or align <= 0 or align & (align - 1):
            fail(f"{path}: general.alignment {align!r} is not a power of two")
        infos = []
        for i in range(n_tensors):
            name = c.string(f"tensor {i}'s name")
            (n_dims,) = c.unpack("I", f"tensor {name}'s dimension count")
            if not 1 <= n_dims <= 4:
                fail(f"{path}: tensor {name} has {n_dims} dimensions (1 to 4 allowed)")
            ne = c.unpack(f"{n_dims}Q", f"tensor {name}'s dimensions")
            kind, offset = c.unpack("IQ", f"tensor {name}'s type and offset")
            infos.append((name, ne, kind, offset))
        self.data_start = -(-c.pos // align) * align
        data_size = len(self.buf) - self.data_start
        if data_size < 0:
            fail(f"{path}: the tensor data would start at byte {self.data_start}, past the end of the file")
        self.tensors, spans = {}, []
        for name, ne, kind, offset in infos:
            if name in self.tensors:
                fail(f"{path}: tensor {name} appears twice")
            if kind not in TYPES:
                fail(f"{path}: tensor {name} has type {OTHER_TYPES.get(kind, kind)}; "
                     "only F32, F16, BF16, Q8_0, Q4_0 (and Q6_K, dequantized) are supported")
            if any(d == 0 for d in ne) or math.prod(ne) > data_size:
                fail(f"{path}: tensor {name} has dimensions {list(ne)}, more values than the file has bytes")
            type_name, block, block_bytes = TYPES[kind]
            if ne[0] % block:
                fail(f"{path}: tensor {name}: {type_name} rows of {ne[0]} values are not whole blocks of {block}")
            nbytes = math.prod(ne) // block * block_bytes
            if offset % align or offset > data_size or nbytes > data_size - offset:
                fail(f"{path}: tensor {name}: offset {offset} + {nbytes} bytes is misaligned or past the data's "
                     f"{data_size} bytes")
            spans.append((offset, offset + nbytes, name))
            self.tensors[name] = (kind, tuple(reversed(ne)), self.data_start + offset)
        spans.sort()
        for (_, end0, name0), (begin1, _, name1) in zip(spans, spans[1:]):
            if begin1 < end0:
                fail(f"{path}: tensors {name0} and {name1} overlap")

    def raw(self, name):
        """The tensor's bytes and (type, shape)."""
        kind, shape, start = self.tensors[name]
        _, block, block_bytes = TYPES[kind]
        return np.frombuffer(self.buf, np.uint8, math.prod(shape) // block * block_bytes, start), kind, shape

    def blocks(self, name):
        """Q8_0 / Q4_0: (fp16 scales widened to float32 (rows, blocks),
        values as int8 (rows, cols)); Q4_0's nibbles are q - 8, element j of a
        block in the low nibble of byte j, element j + 16 in its high nibble."""
        raw, kind, shape = self.raw(name)
        rows, cols = math.prod(shape[:-1]), shape[-1]
        block = raw.reshape(rows, cols // 32, TYPES[kind][2])
        d = block[..., :2].copy().view("<f2")[..., 0].astype(np.float32)
        if kind == Q8_0:
            q = block[..., 2:].view(np.int8)
        else:
            nib = block[..., 2:]
            q = np.concatenate([nib & 15, nib >> 4], axis=-1).astype(np.int8) - 8
        return d, q.reshape(rows, cols)

    def get(self, name):
        """The tensor as float32 torch, in our shape (rows, cols). Every
        type widens exactly: an fp16 scale times a small integer fits float32."""
        raw, kind, shape = self.raw(name)
        if kind == F32:
            arr = raw.view("<f4")
        elif kind == F16:
            arr = raw.view("<f2").astype(np.float32)
        elif kind == BF16:
            arr = (raw.view("<u2").astype(np.uint32) << 16).view(np.float32)
        elif kind == Q6_K:
            arr = dequantize_q6_k(raw.reshape(-1, 210))
        else:
            d, q = self.blocks(name)
            arr = (q.reshape(d.shape[0], -1, 32).astype(np.float32) * d[..., None])
        return torch.from_numpy(np.array(arr, dtype=np.float32).reshape(shape))


def dequantize_q6_k(b):
    """Q6_K super-blocks (n, 210 bytes) -> float32 (n, 256), as llama.cpp
    dequantizes them: 128 bytes of low 4 bits, 64 of high 2 bits, 16 int8
    scales (one per 16 values), an fp16 d; value = d x scale x (q - 32), q 6
    bits. Each half of 128 values: its 64 low-bit bytes ql, 32 high-bit bytes
    qh and 8 scales; value l + 32 j (l < 32, j < 4) takes the low (j < 2) or
    high nibble of ql[l + 32 (j % 2)], bits 2j..2j+1 of qh[l], scale 2 j + l // 16."""
    ql, qh = b[:, :128].reshape(-1, 2, 2, 32), b[:, 128:192].reshape(-1, 2, 1, 32)
    scales = b[:, 192:208].view(np.int8).reshape(-1, 2, 4, 2).astype(np.float32)  # (n, half, j, l // 16)
    d = b[:, 208:210].copy().view("<f2").astype(np.float32)  # (n, 1)
    low = np.concatenate([ql & 15, ql >> 4], axis=2)  # (n, half, j, 32): j = 0, 1 low nibbles, 2, 3 high
    high = (qh >> (2 * np.arange(4, dtype=np.uint8))[None, None, :, None]) & 3
    q = (low | (high << 4)).astype(np.float32) - 32
    scale = np.repeat(scales, 16, axis=3)  # (n, half, j, 32)
    return (d[:, :, None, None] * scale * q).reshape(-1, 256)


# ----------------------------------------------------------------------------
# GGUF -> our model


def meta_int(g, key, default=None):
    v = g.meta.get(key, default)
    if v is None:
        fail(f"{g.path}: no {key}")
    if not isinstance(v, int) or isinstance(v, bool) or not 0 < v < 2**31:
        fail(f"{g.path}: {key} = {v!r} (must be a positive integer)")
    return v


def meta_float(g, key, default):
    v = g.meta.get(key, default)
    f32 = None if isinstance(v, bool) or not isinstance(v, (int, float)) else as_float32(v)
    if f32 is None or not math.isfinite(f32) or f32 <= 0:  # (1e-300 would be stored as 0: the default)
        fail(f"{g.path}: {key} = {v!r} (must be a positive number within float32's range)")
    # a float32 in the file: the default's float32 means the default
    return default if default is not None and np.float32(v) == np.float32(default) else float(v)


def gguf_args(g):
    arch = g.meta.get("general.architecture")
    if arch != "llama":
        fail(f"{g.path}: general.architecture {arch!r}: only 'llama' is supported")
    heads = meta_int(g, "llama.attention.head_count")
    args = M.ModelArgs(dim=meta_int(g, "llama.embedding_length"), hidden_dim=meta_int(g, "llama.feed_forward_length"),
                       n_layers=meta_int(g, "llama.block_count"), n_heads=heads,
                       n_kv_heads=meta_int(g, "llama.attention.head_count_kv", heads),
                       vocab_size=g.tensors["token_embd.weight"][1][0] if "token_embd.weight" in g.tensors else 1,
                       max_seq_len=meta_int(g, "llama.context_length"),
                       norm_eps=meta_float(g, "llama.attention.layer_norm_rms_epsilon", M.DEFAULT_NORM_EPS),
                       rope_theta=meta_float(g, "llama.rope.freq_base", M.DEFAULT_ROPE_THETA),
                       shared_classifier="output.weight" not in g.tensors)
    check_args(args, g.path)
    rot = g.meta.get("llama.rope.dimension_count", args.head_size)
    if rot != args.head_size:
        fail(f"{g.path}: llama.rope.dimension_count {rot!r} is not the head size {args.head_size} "
             "(partial rotary embeddings are not supported)")
    scaling = g.meta.get("llama.rope.scaling.type", "none")
    if scaling != "none" or "rope_freqs.weight" in g.tensors:
        fail(f"{g.path}: RoPE scaling ({scaling if scaling != 'none' else 'rope_freqs.weight'}) is not supported; "
             "a Llama 3.1 model converts from its Hugging Face directory with --hf")
    return args


def load_gguf(path):
    """(lazy model, GGUF): the model's tensors are produced one at a time, as
    float32; write_checkpoint asks `stored` for a tensor's exact quantized form."""
    g = GGUF(path)
    args = gguf_args(g)
    ours = our_shapes(args)
    wanted = {gguf_name(n): n for n in ours}
    extra = [k for k in g.tensors if k not in wanted]
    if extra:
        fail(f"{path}: tensor {extra[0]} is not part of a Llama model we run"
             + (f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""))
    for name, ours_name in wanted.items():
        if name not in g.tensors:
            fail(f"{path}: tensor {name} is missing")
        if g.tensors[name][1] != ours[ours_name]:
            fail(f"{path}: tensor {name} has shape {g.tensors[name][1]}, the metadata makes it {ours[ours_name]}")
    # a classifier stored as a copy of the embedding (llama2.c's converter does that) is shared
    if not args.shared_classifier:
        (a, ka, _), (b, kb, _) = g.raw("token_embd.weight"), g.raw("output.weight")
        if ka == kb and np.array_equal(a, b):
            args.shared_classifier = True
            del ours["output.weight"]
    vocabulary = gguf_tokenizer(g)  # (pieces, bos, eos, extension), checked before anything is said or written
    if len(vocabulary[0]) != args.vocab_size:
        fail(f"{path}: tokenizer.ggml.tokens has {len(vocabulary[0])} tokens, token_embd.weight {args.vocab_size} rows")
    kinds = sorted({TYPES[g.tensors[gguf_name(n)][0]][0] for n in ours})
    progress(f"{path}: GGUF v{g.version}, {args.n_layers} layers, dim {args.dim}, {args.n_heads} heads "
             f"({args.n_kv_heads} kv), vocab {args.vocab_size}, {'/'.join(kinds)}")
    model = LazyModel(args, set(ours), lambda name: g.get(gguf_name(name)))
    model.stored = lambda name, bits, group_size: stored(g, gguf_name(name), bits, group_size)
    model.kind = lambda name: TYPES[g.tensors[gguf_name(name)][0]][0]
    model.gguf, model.vocabulary = g, vocabulary
    return model


def stored(g, name, bits, group_size):
    """A Q8_0 / Q4_0 tensor as our version 2 / 3 tensor exactly (values, scales),
    or None when its blocks are not that format's groups (then it is requantized).
    Q8_0 -> int8 groups of 32. Q4_0 -> 4 bits: q - 8 is in -8..7, which the
    two's complement nibble holds; our nibbles run in value order, low first."""
    kind = g.tensors[name][0]
    if group_size != 32 or (kind, bits) not in ((Q8_0, 8), (Q4_0, 4)):
        return None
    d, q = g.blocks(name)
    if bits == 8:
        return q.reshape(-1).copy(), d.reshape(-1)
    nib = (q & 15).astype(np.uint8)
    return nib[:, 0::2] | (nib[:, 1::2] << 4), d


def default_version(model, say=True):
    """What --gguf writes without --version: the file's matrices kept exactly,
    as version 3 / 2 when they are all Q4_0 or Q8_0 (Q4_0 with a Q8_0 embedding
    or classifier too), else as fp32 (every GGUF value is a float32), said in a line."""
    g = model.gguf
    kinds = {g.tensors[name][0] for name in g.tensors if len(g.tensors[name][1]) == 2}
    layers = {g.tensors[name][0] for name in g.tensors if name.startswith("blk.") and len(g.tensors[name][1]) == 2}
    if layers == {Q8_0}:
        return 2
    if layers == {Q4_0}:
        return 3
    if say and kinds & {Q8_0, Q4_0, Q6_K}:
        progress(f"{g.path}: matrices of types {'/'.join(sorted(TYPES[k][0] for k in kinds))}: written as fp32, "
                 "every value exact (--version 2 or 3 would requantize)")
    return 0


GGUF_SPLITS = {"llama-bpe": 1, "llama3": 1, "llama-v3": 1, "gpt-2": 2, "smollm": 3}  # tokenizer.ggml.pre -> ours


def gguf_tokenizer(g):
    """tokenizer.ggml.* -> (pieces [(bytes, score, type)], bos, eos, extension)
    as the tokenizer readers give them: "llama" (SentencePiece; U+2581 still in
    the pieces, no extension) or "gpt2" (byte-level BPE: pieces in GPT-2's byte
    alphabet, control and user-defined tokens special, merges as "left right",
    the split named by tokenizer.ggml.pre)."""
    from exporter.tokenizers import byte_level_vocabulary, split_merges
    kind = g.meta.get("tokenizer.ggml.model")
    if kind not in ("llama", "gpt2"):
        fail(f"{g.path}: tokenizer.ggml.model {kind!r}: only 'llama' (SentencePiece) and 'gpt2' (byte-level BPE) are supported")
    tokens = g.meta.get("tokenizer.ggml.tokens")
    n = len(tokens) if isinstance(tokens, list) else 0
    scores = g.meta.get("tokenizer.ggml.scores", [0.0] * n)
    types = g.meta.get("tokenizer.ggml.token_type", [TOKEN_NORMAL] * n)
    if not n or not all(isinstance(t, str) for t in tokens):
        fail(f"{g.path}: tokenizer.ggml.tokens is not a list of strings")
    if not (isinstance(scores, list) and len(scores) == n and
            all(isinstance(s, float) and as_float32(s) is not None and math.isfinite(s) for s in scores)):
        fail(f"{g.path}: tokenizer.ggml.scores is not {n} finite numbers within float32's range")
    if not (isinstance(types, list) and len(types) == n and all(isinstance(t, int) for t in types)):
        fail(f"{g.path}: tokenizer.ggml.token_type is not {n} integers")
    ids = {}
    for key in ("bos", "eos", "eot", "eom"):
        v = g.meta.get(f"tokenizer.ggml.{key}_token_id")
        if v is not None and not (isinstance(v, int) and 0 <= v < n):
            fail(f"{g.path}: tokenizer.ggml.{key}_token_id = {v!r} is not a token id")
        ids[key] = v
    if kind == "llama":
        bos, eos = ids["bos"] if ids["bos"] is not None else 1, ids["eos"] if ids["eos"] is not None else 2
        if (bos, eos) != (1, 2):
            fail(f"{g.path}: bos/eos ids are {bos}/{eos}; run.cpp expects 1/2")
        return [(t.encode(), s, k) for t, s, k in zip(tokens, scores, types)], bos, eos, None
    pre = g.meta.get("tokenizer.ggml.pre", "gpt-2")
    if not isinstance(pre, str) or pre not in GGUF_SPLITS:
        fail(f"{g.path}: tokenizer.ggml.pre {pre!r} is not supported ({', '.join(GGUF_SPLITS)})")
    merges = g.meta.get("tokenizer.ggml.merges")
    if not isinstance(merges, list) or not all(isinstance(m, str) for m in merges):
        fail(f"{g.path}: tokenizer.ggml.merges is not a list of strings")
    bos = ids["bos"] if g.meta.get("tokenizer.ggml.add_bos_token", False) is True else None
    eos = [i for i in dict.fromkeys((ids["eos"], ids["eot"], ids["eom"])) if i is not None]
    special = [i for i, k in enumerate(types) if k in (TOKEN_CONTROL, TOKEN_USER_DEFINED)]
    split = GGUF_SPLITS[pre]
    return byte_level_vocabulary(g.path, tokens, special, split_merges(g.path, merges), split, split == 1, bos, eos)


# ----------------------------------------------------------------------------
# Our model -> GGUF v3 (export.py --to-gguf), for llama.cpp: its tensor names,
# the same q/k rows, Q8_0 / Q4_0 by llama.cpp's own rounding rules or copied
# from our version 2 / 3 groups when they are exactly those blocks.

GGUF_TYPES = {"f32": F32, "f16": F16, "q8_0": Q8_0, "q4_0": Q4_0}
FILE_TYPES = {F32: 0, F16: 1, Q4_0: 2, Q8_0: 7}  # general.file_type: llama.cpp's LLAMA_FTYPE_*


def round_away(v):
    """C's roundf on float32 values: halves away from zero (exact in float64)."""
    v = v.astype(np.float64)
    return np.sign(v) * np.floor(np.abs(v) + 0.5)


def quantize_q8_0(w):
    """llama.cpp's Q8_0 of rows (rows, cols), cols a multiple of 32: per block
    d = max|x| / 127 and q = roundf(x / d) computed as x * (1 / d), all in
    float32, then d stored in fp16. Returns the blocks' bytes."""
    x = w.reshape(-1, 32).astype(np.float32)
    d = np.abs(x).max(1) / np.float32(127)
    inv = np.divide(np.float32(1), d, out=np.zeros_like(d), where=d != 0)
    q = round_away(x * inv[:, None]).astype(np.int8)
    return pack_blocks(d, q.view(np.uint8))


def quantize_q4_0(w):
    """llama.cpp's Q4_0: per block of 32 the value of largest magnitude m (the
    first if tied), d = m / -8, q = min(15, trunc(x / d + 8.5)) with x / d as
    x * (1 / d), in float32; element j in the low nibble of byte j, j + 16 in
    its high nibble; d stored in fp16."""
    x = w.reshape(-1, 32).astype(np.float32)
    m = x[np.arange(len(x)), np.abs(x).argmax(1)]
    d = m / np.float32(-8)
    inv = np.divide(np.float32(1), d, out=np.zeros_like(d), where=d != 0)
    q = np.minimum(15, np.trunc(x * inv[:, None] + np.float32(8.5))).astype(np.uint8)
    return pack_blocks(d, q[:, :16] | (q[:, 16:] << 4))


def pack_blocks(d, payload):
    """Blocks of an fp16 scale then their payload bytes."""
    scales = d.astype("<f2").view(np.uint8).reshape(-1, 2)
    return np.concatenate([scales, payload], axis=1).tobytes()


def exact_blocks(stored, kind):
    """Our int8 / int4 groups of 32 (values, float32 scales) as Q8_0 / Q4_0 blocks,
    or None when a scale is not an fp16 value (it would have to be rounded)."""
    q, s = stored
    if not np.array_equal(s.astype(np.float16).astype(np.float32), s):
        return None
    if kind == Q8_0:
        return pack_blocks(s, q.reshape(-1, 32).view(np.uint8))
    nib = np.stack([q & 15, q >> 4], axis=-1).reshape(len(s), 32).astype(np.int16)  # value order
    v = (np.where(nib >= 8, nib - 16, nib) + 8).astype(np.uint8)  # q + 8, 0..15
    return pack_blocks(s, v[:, :16] | (v[:, 16:] << 4))


def string_bytes(s):
    raw = s.encode() if isinstance(s, str) else s
    return struct.pack("<Q", len(raw)) + raw


def value_bytes(v):
    """(type, bytes) of a metadata value as llama.cpp writes its keys: str,
    bool, int (uint32), float (float32), or a list of one of those (ints as
    int32, as token_type is)."""
    if isinstance(v, (str, bytes)):
        return STRING, string_bytes(v)
    if isinstance(v, bool):
        return 7, struct.pack("<?", v)
    if isinstance(v, int):
        return 4, struct.pack("<I", v)
    if isinstance(v, float):
        return 6, struct.pack("<f", v)
    kind = {4: 5}.get(value_bytes(v[0])[0], value_bytes(v[0])[0]) if v else STRING
    if kind == STRING:
        body = b"".join(string_bytes(e) for e in v)
    else:
        body = np.asarray(v, dtype={5: "<i4", 6: "<f4", 7: "?"}[kind]).tobytes()
    return ARRAY, struct.pack("<IQ", kind, len(v)) + body


def vocabulary_meta(pieces, scores, ext):
    """tokenizer.ggml.* from our tokenizer.bin: a SentencePiece vocabulary
    ("llama": spaces back to U+2581, BOS/EOS pieces back to <s> / </s>, byte
    pieces typed), or a byte-level BPE ("gpt2": pieces in GPT-2's printable
    byte alphabet, merges as 'left right' strings, the pre-tokenizer by name)."""
    from exporter.tokenizers import bytes_to_unicode
    if ext is None:
        tokens, types = [], []
        for i, p in enumerate(pieces):
            if i == 1 and p == b"\n<s>\n" or i == 2 and p == b"\n</s>\n":
                tokens.append("<s>" if i == 1 else "</s>"), types.append(TOKEN_CONTROL)
            elif i == 0:
                tokens.append(p.decode("utf-8", "replace")), types.append(TOKEN_UNKNOWN)
            elif len(p) == 6 and p.startswith(b"<0x") and p.endswith(b">"):
                tokens.append(p.decode()), types.append(TOKEN_BYTE)
            else:
                try:
                    tokens.append(p.decode("utf-8").replace(" ", "\u2581")), types.append(TOKEN_NORMAL)
                except UnicodeDecodeError:
                    fail(f"piece {i} {p!r} is not UTF-8: a SentencePiece GGUF vocabulary cannot hold it")
        return {"tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": tokens,
                "tokenizer.ggml.scores": [float(s) for s in scores], "tokenizer.ggml.token_type": types,
                "tokenizer.ggml.bos_token_id": 1, "tokenizer.ggml.eos_token_id": 2,
                "tokenizer.ggml.unknown_token_id": 0, "tokenizer.ggml.add_bos_token": True,
                "tokenizer.ggml.add_eos_token": False}
    alphabet = bytes_to_unicode()
    special = set(ext["special"])
    tokens = [p.decode("utf-8", "replace") if i in special else "".join(alphabet[b] for b in p)
              for i, p in enumerate(pieces)]
    meta = {"tokenizer.ggml.model": "gpt2",
            "tokenizer.ggml.pre": {1: "llama-bpe", 2: "gpt-2", 3: "smollm"}[ext["split"]],
            "tokenizer.ggml.tokens": tokens,
            "tokenizer.ggml.token_type": [TOKEN_CONTROL if i in special else TOKEN_NORMAL for i in range(len(pieces))],
            "tokenizer.ggml.merges": [f"{tokens[a]} {tokens[b]}" for a, b in ext["merges"]],
            "tokenizer.ggml.add_bos_token": ext["bos"] is not None}
    for key, i in zip(("eos", "eot", "eom"), ext["eos"]):  # llama.cpp ends generation at each
        meta[f"tokenizer.ggml.{key}_token_id"] = i
    if ext["bos"] is not None:
        meta["tokenizer.ggml.bos_token_id"] = ext["bos"]
    return meta


def write_gguf(path, model, kind, vocab, groups=None):
    """model (args + state dict) as a GGUF v3 file of type kind (F32, F16, Q8_0
    or Q4_0 for every matrix; norms F32; for Q4_0 the classifier in Q8_0, as
    llama.cpp's quantizer keeps it when Q6_K does not fit). vocab: the
    tokenizer.ggml.* metadata. What a quantized source holds is kept: a GGUF
    source's tensors already of the type written are copied as they are, and
    groups (our_groups: a version 2 / 3 file's groups of 32) are copied when
    their scales are fp16 values."""
    from exporter.writers import write_atomically
    a, sd = model.args, model.state_dict()
    source = getattr(model, "gguf", None)

    def held(name):  # the bits a quantized source holds this tensor in, as blocks / groups of 32, or None
        if source is not None:
            return {Q8_0: 8, Q4_0: 4}.get(source.tensors[gguf_name(name)][0])
        return groups[name][0] if groups and name in groups else None

    names = ["tok_embeddings.weight", "norm.weight"] + ([] if a.shared_classifier else ["output.weight"])
    for i in range(a.n_layers):
        names += [f"layers.{i}.{n}" for n in GGUF_NAMES]
    shapes = our_shapes(a)
    extra = {}
    if a.rope_scaling is not None:  # llama.cpp divides each RoPE frequency by its factor in rope_freqs
        base = a.rope_theta ** (-torch.arange(0, a.head_size, 2, dtype=torch.float64) / a.head_size)
        extra["rope_freqs.weight"] = (base / M.scaled_frequencies(base, a.rope_scaling)).float()
        names.append("rope_freqs.weight")
        shapes["rope_freqs.weight"] = (a.head_size // 2,)
    meta = {"general.architecture": "llama", "general.name": os.path.splitext(os.path.basename(path))[0],
            "general.file_type": FILE_TYPES[kind], "llama.context_length": a.max_seq_len,
            "llama.embedding_length": a.dim, "llama.block_count": a.n_layers,
            "llama.feed_forward_length": a.hidden_dim, "llama.rope.dimension_count": a.head_size,
            "llama.attention.head_count": a.n_heads, "llama.attention.head_count_kv": a.n_kv_heads,
            "llama.attention.layer_norm_rms_epsilon": float(a.norm_eps), "llama.rope.freq_base": float(a.rope_theta),
            "llama.vocab_size": a.vocab_size}
    if kind in (Q8_0, Q4_0):
        meta["general.quantization_version"] = 2
    meta.update(vocab)

    def tensor_type(name):
        if len(shapes[name]) == 1:
            return F32
        t = kind
        if kind == Q4_0 and (name == "output.weight" or held(name) == 8):
            t = Q4_0 if held(name) == 4 else Q8_0  # what the source holds, else Q8_0
        if t in (Q8_0, Q4_0) and shapes[name][1] % 32:
            progress(f"  {gguf_name(name)}: rows of {shapes[name][1]} values are not whole blocks of 32: kept in F32")
            return F32
        return t

    types = {n: tensor_type(n) for n in names}
    sizes = {n: math.prod(shapes[n]) // TYPES[types[n]][1] * TYPES[types[n]][2] for n in names}
    infos, offset = b"", 0
    for n in names:
        ne = tuple(reversed(shapes[n]))
        infos += string_bytes(gguf_name(n)) + struct.pack(f"<I{len(ne)}QIQ", len(ne), *ne, types[n], offset)
        offset += -(-sizes[n] // DEFAULT_ALIGNMENT) * DEFAULT_ALIGNMENT
    head = MAGIC + struct.pack("<IQQ", 3, len(names), len(meta))
    for key, v in meta.items():
        vt, vb = value_bytes(v)
        head += string_bytes(key) + struct.pack("<I", vt) + vb
    head += infos
    copied, rounded = [], []

    def data(name):
        t = types[name]
        if source is not None and name not in extra and source.tensors[gguf_name(name)][0] == t:
            copied.append(name)
            return bytes(source.raw(gguf_name(name))[0])
        if t in (Q8_0, Q4_0) and held(name) == (8 if t == Q8_0 else 4) and source is None:
            blocks = exact_blocks(groups[name][1], t)
            if blocks is not None:
                copied.append(name)
                return blocks
            rounded.append(name)
        w = (extra[name] if name in extra else sd[name]).detach().to(torch.float32).numpy()
        if t == F32:
            return w.astype("<f4").tobytes()
        if t == F16:
            return w.astype("<f2").tobytes()
        return quantize_q8_0(w) if t == Q8_0 else quantize_q4_0(w)

    def chunks():
        yield head + bytes(-len(head) % DEFAULT_ALIGNMENT)
        for n in names:
            raw = data(n)
            assert len(raw) == sizes[n]
            progress(f"  {gguf_name(n):24s} {TYPES[types[n]][0]:5s} {shapes[n]}")
            yield raw + bytes(-len(raw) % DEFAULT_ALIGNMENT)

    progress(f"writing {path} (GGUF v3, {TYPES[kind][0]})")
    write_atomically(path, chunks())
    if copied:
        progress(f"{len(copied)} tensors copied exactly from the source")
    if rounded:
        progress(f"{len(rounded)} tensors requantized by llama.cpp's rules: their float32 scales are not fp16 values "
                 f"(first: {gguf_name(rounded[0])})")
    progress(f"wrote {path}: {os.path.getsize(path)} bytes")


def our_groups(path):
    """For one of our version 2 / 3 files with group size 32: {name: (bits,
    (values, float32 scales))} of its quantized tensors, views into the mapped
    file. None for other files."""
    with open(path, "rb") as f:
        data = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)  # read only where a tensor is copied
    args, version, gs, header = M.read_header(data)
    if version not in (2, 3) or gs != 32:
        return None
    int8 = struct.unpack_from("<i", data, 92)[0] if version == 3 else 0
    at, held = header, {}
    for _, names, shape, kind in M.file_layout(args, version, int8):  # offsets in file order
        values, scales = M.stored_bytes(shape, kind, gs)
        for name in names:
            if kind != "f32":
                q = np.frombuffer(data, np.int8 if kind == "q8" else np.uint8, values, at)
                held[name] = 8 if kind == "q8" else 4, (q, np.frombuffer(data, "<f4", scales // 4, at + values))
            at += values + scales
    return held
