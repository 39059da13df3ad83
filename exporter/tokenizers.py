"""Tokenizer files: sentencepiece's .model, Hugging Face's tokenizer.json, and
our tokenizer.bin read back."""

import json
import math
import struct

from exporter import fail

# ----------------------------------------------------------------------------
# Tokenizer: the sentencepiece .model protobuf, read without the sentencepiece
# package. ModelProto field 1 is the repeated SentencePiece {1: piece, 2: score,
# 3: type}; field 2 is the TrainerSpec, whose fields 40/41/42 are unk/bos/eos ids.


def protobuf_fields(buf):
    """Yield (field number, wire type, value) of one protobuf message. Values are
    ints for varints, raw bytes for fixed32/fixed64/length-delimited fields."""
    pos = 0

    def varint():
        nonlocal pos
        result = shift = 0
        while True:
            if pos >= len(buf):
                raise ValueError("truncated varint")
            b = buf[pos]
            pos += 1
            result |= (b & 0x7F) << shift
            shift += 7
            if b < 0x80:
                return result
            if shift > 63:
                raise ValueError("varint too long")

    while pos < len(buf):
        key = varint()
        field, wire = key >> 3, key & 7
        if wire == 0:
            value = varint()
        elif wire in (1, 5):
            n = 8 if wire == 1 else 4
            value, pos = buf[pos:pos + n], pos + n
        elif wire == 2:
            n = varint()
            value, pos = buf[pos:pos + n], pos + n
        else:
            raise ValueError(f"unsupported wire type {wire}")
        if pos > len(buf):
            raise ValueError("truncated field")
        yield field, wire, value


def read_sentencepiece(path):
    """[(piece bytes, score, type)], bos_id, eos_id."""
    try:
        with open(path, "rb") as f:
            buf = f.read()
    except OSError as e:
        fail(f"{path}: {e.strerror}")
    pieces, ids = [], {41: 1, 42: 2}  # sentencepiece's default bos/eos ids
    try:
        for field, wire, value in protobuf_fields(buf):
            if field == 1 and wire == 2:
                piece, score, kind = b"", 0.0, 1
                for f2, w2, v2 in protobuf_fields(value):
                    if f2 == 1 and w2 == 2:
                        piece = bytes(v2)
                    elif f2 == 2 and w2 == 5:
                        score = struct.unpack("<f", v2)[0]
                    elif f2 == 3 and w2 == 0:
                        kind = v2
                pieces.append((piece, score, kind))
            elif field == 2 and wire == 2:
                for f2, w2, v2 in protobuf_fields(value):
                    if f2 in ids and w2 == 0:
                        ids[f2] = v2 - (1 << 64) if v2 >= 1 << 63 else v2
    except ValueError as e:
        fail(f"{path}: not a sentencepiece model ({e})")
    if not pieces:
        fail(f"{path}: not a sentencepiece model (no pieces)")
    return pieces, ids[41], ids[42]


def read_tokenizer_json(path):
    """A Hugging Face tokenizer.json BPE with byte fallback (Llama 2, TinyLlama,
    Mistral style) as read_sentencepiece's [(piece, score, type)], bos, eos. The
    score of a piece is minus the rank of the first merge that makes it, so that
    run.cpp's encoder, which applies the best-scoring merge first, applies them
    in the tokenizer's merge order; pieces no merge makes score 0 (never used)."""
    try:
        with open(path, encoding="utf-8") as f:
            tj = json.load(f)
        model = tj["model"]
        kind, vocab, merges = model.get("type"), model["vocab"], model["merges"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        fail(f"{path}: not a tokenizer.json ({e})")
    if kind != "BPE":
        fail(f"{path}: model type {kind!r}; only BPE is supported")
    if not model.get("byte_fallback"):
        fail(f"{path}: a BPE without byte fallback (GPT-2 style byte-level BPE) is not supported: "
             "run.cpp needs <0x00>..<0xFF> pieces")
    for token in tj.get("added_tokens", []):
        vocab.setdefault(token["content"], token["id"])
    n = max(vocab.values()) + 1
    by_id = [None] * n
    for piece, i in vocab.items():
        by_id[i] = piece
    if None in by_id:
        fail(f"{path}: vocabulary ids are not 0..{n - 1} (id {by_id.index(None)} is missing)")
    if by_id[:3] != ["<unk>", "<s>", "</s>"] or by_id[3:259] != [f"<0x{b:02X}>" for b in range(256)]:
        fail(f"{path}: run.cpp needs <unk>, <s>, </s> at ids 0-2 and the byte pieces <0x00>..<0xFF> at 3-258")
    rank = {}
    for r, merge in enumerate(merges):
        left, right = merge.split(" ") if isinstance(merge, str) else merge
        rank.setdefault(left + right, r)
    pieces = [(p.encode(), -float(rank[p]) if p in rank else 0.0, 1) for p in by_id]
    return pieces, 1, 2


def read_tokenizer_bin(path, vocab_size=None):
    """tokenizer.bin -> (pieces as bytes, scores), checked as run.cpp checks it:
    a bad file fails with one line. With vocab_size, it must hold exactly that
    many pieces."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        fail(f"cannot read {path}: {e.strerror}")
    if len(data) < 4:
        fail(f"{path}: truncated tokenizer header ({len(data)} bytes)")
    (max_len,) = struct.unpack_from("<i", data, 0)
    if max_len <= 0:
        fail(f"{path}: bad max_token_length {max_len}")
    off, pieces, scores = 4, [], []
    while off < len(data) and (vocab_size is None or len(pieces) < vocab_size):
        if len(data) - off < 8:
            fail(f"{path}: piece {len(pieces)} is cut off after {len(data) - off} bytes")
        score, n = struct.unpack_from("<fi", data, off)
        if not 0 < n <= max_len:
            fail(f"{path}: piece {len(pieces)} has length {n} (max_token_length {max_len})")
        if not math.isfinite(score):
            fail(f"{path}: piece {len(pieces)} has score {score}")
        if len(data) - off - 8 < n:
            fail(f"{path}: piece {len(pieces)} runs past the end of the file")
        pieces.append(data[off + 8:off + 8 + n])
        scores.append(score)
        off += 8 + n
    if vocab_size is not None and (len(pieces) != vocab_size or off != len(data)):
        fail(f"{path}: holds {len(pieces)} pieces{' and more bytes' if off != len(data) else ''}, "
             f"but the model's vocabulary has {vocab_size}")
    return pieces, scores
