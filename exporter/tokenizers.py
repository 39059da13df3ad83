"""Tokenizer files: sentencepiece's .model, Hugging Face's tokenizer.json, and
our tokenizer.bin read back."""

import heapq
import json
import math
import os
import struct

from exporter import fail, load_json

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
    for i, (piece, score, _) in enumerate(pieces):
        if not math.isfinite(score):
            fail(f"{path}: piece {i} {piece!r} has score {score}")
    return pieces, ids[41], ids[42]


class SentencePieceEncoder:
    """run.cpp's encode(text, bos=false) for a SentencePiece vocabulary (pieces
    as bytes, the byte pieces at ids 3..258): a leading space (the dummy
    prefix), each UTF-8 character its piece (else its bytes' byte pieces), then
    merges of the adjacent pair whose concatenation scores highest, leftmost
    first, through a heap of candidates. As in run.cpp only normal pieces (ids
    from 259) take part in lookups, the first id of a repeated piece winning.
    The one Python encoder: train.py and AWQ's calibration use it."""

    def __init__(self, pieces, scores):
        self.pieces, self.scores, self.ids = pieces, scores, {}
        for i in range(259, len(pieces)):
            self.ids.setdefault(pieces[i], i)

    def __call__(self, text, dummy_prefix=True):
        pieces, scores, ids = self.pieces, self.scores, self.ids
        sym = []
        for ch in (" " if dummy_prefix and text else "") + text:
            b = ch.encode("utf-8")
            sym += [ids[b]] if b in ids else [c + 3 for c in b]
        nxt, prv, alive = list(range(1, len(sym))) + [-1], list(range(-1, len(sym) - 1)), [True] * len(sym)
        heap = []

        def consider(i):
            j = nxt[i] if i >= 0 else -1
            if i >= 0 and j >= 0 and pieces[sym[i]] + pieces[sym[j]] in ids:
                merged = ids[pieces[sym[i]] + pieces[sym[j]]]
                heapq.heappush(heap, (-scores[merged], i, j, sym[i], sym[j], merged))

        for i in range(len(sym) - 1):
            consider(i)
        while heap:
            _, i, j, a, b, merged = heapq.heappop(heap)
            if not (alive[i] and alive[j] and nxt[i] == j and sym[i] == a and sym[j] == b):
                continue  # stale: a neighbour was merged since
            sym[i], alive[j] = merged, False
            nxt[i] = nxt[j]
            if nxt[i] >= 0:
                prv[nxt[i]] = i
            consider(prv[i])
            consider(i)
        return [sym[i] for i in range(len(sym)) if alive[i]]


def read_tokenizer_json(path):
    """A Hugging Face tokenizer.json BPE as (pieces, bos, eos, extension).
    With byte fallback (Llama 2, TinyLlama, Mistral style) it is read as
    read_sentencepiece's [(piece, score, type)] and extension is None: the score
    of a piece is minus the rank of the first merge that makes it, so run.cpp's
    encoder, which applies the best-scoring merge first, applies them in the
    tokenizer's merge order; pieces no merge makes score 0 (never used).
    A byte-level BPE (Llama 3, GPT-2, SmolLM2) goes to read_byte_level."""
    tj = load_json(path, "a tokenizer.json")
    model = tj.get("model") if isinstance(tj, dict) else None
    if not isinstance(model, dict):
        fail(f"{path}: not a tokenizer.json (no \"model\" object)")
    kind, vocab, merges = model.get("type"), model.get("vocab"), model.get("merges")
    if not isinstance(vocab, dict) or not isinstance(merges, list):
        fail(f"{path}: not a tokenizer.json (model.vocab must be an object and model.merges a list)")
    if kind != "BPE":
        fail(f"{path}: model type {kind!r}; only BPE is supported")
    if not model.get("byte_fallback"):
        return read_byte_level(path, tj)
    vocab = dict(vocab)
    for token in added_tokens(path, tj):
        vocab.setdefault(token["content"], token["id"])
    by_id = ids_to_pieces(path, vocab)
    if by_id[:3] != ["<unk>", "<s>", "</s>"] or by_id[3:259] != [f"<0x{b:02X}>" for b in range(256)]:
        fail(f"{path}: run.cpp needs <unk>, <s>, </s> at ids 0-2 and the byte pieces <0x00>..<0xFF> at 3-258")
    rank = {}
    for r, (left, right) in enumerate(split_merges(path, merges)):
        if not (left in vocab and right in vocab and left + right in vocab):
            fail(f"{path}: merge {r} ({left!r} {right!r}) joins pieces that are not in the vocabulary")
        rank.setdefault(left + right, r)
    pieces = [(p.encode(), -float(rank[p]) if p in rank else 0.0, 1) for p in by_id]
    return pieces, 1, 2, None


def added_tokens(path, tj):
    """tokenizer.json's added_tokens, checked: a list of {id, content}."""
    added = tj.get("added_tokens", [])
    if not isinstance(added, list) or not all(
            isinstance(t, dict) and isinstance(t.get("content"), str) and t["content"]
            and isinstance(t.get("id"), int) and not isinstance(t["id"], bool) and 0 <= t["id"] < 1 << 24
            for t in added):
        fail(f"{path}: added_tokens must be a list of {{id, content}} (ids 0..{(1 << 24) - 1})")
    return added


def ids_to_pieces(path, vocab):
    if not vocab or not all(isinstance(i, int) and not isinstance(i, bool) and 0 <= i < 1 << 24
                            for i in vocab.values()):
        fail(f"{path}: vocabulary ids must be integers 0..{(1 << 24) - 1}")
    by_id = [None] * (max(vocab.values()) + 1)
    for piece, i in vocab.items():
        if by_id[i] is not None:
            fail(f"{path}: id {i} is both {by_id[i]!r} and {piece!r}")
        by_id[i] = piece
    if None in by_id:
        fail(f"{path}: vocabulary ids are not 0..{len(by_id) - 1} (id {by_id.index(None)} is missing)")
    return by_id


def split_merges(path, merges):
    """merges as [(left, right)]: "a b" strings (older files) or [a, b] pairs."""
    out = []
    for r, m in enumerate(merges):
        pair = m.split(" ") if isinstance(m, str) else m
        if not isinstance(pair, list) or len(pair) != 2 or not all(isinstance(x, str) and x for x in pair):
            fail(f"{path}: merge {r} is {m!r}, not a pair of pieces")
        out.append(tuple(pair))
    return out


# ----------------------------------------------------------------------------
# Byte-level BPE (GPT-2's scheme, used by Llama 3 and SmolLM2). The vocabulary
# spells each byte as a printable character (bytes_to_unicode below); we store
# the raw bytes instead, so run.cpp never needs the mapping. Text is split into
# words by a fixed regex (the "split" kind), each word's UTF-8 bytes start as
# one-byte pieces, and merges apply by rank (the pair listed first wins, not the
# best piece: two splits can make one piece at different ranks).

SPLIT_KINDS = {  # the pre-tokenizer regexes run.cpp implements, by number
    1: r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
       r"\s*[\r\n]+|\s+(?!\S)|\s+",                                        # Llama 3
    2: r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+",  # GPT-2
}
SPLIT_GPT2_DIGITS = 3  # GPT-2's regex after splitting off each ASCII digit (SmolLM2)
CLASS_LETTER, CLASS_NUMBER, CLASS_SPACE = 1, 2, 3


def bytes_to_unicode():
    """GPT-2's byte -> character table: printable Latin-1 bytes stand for
    themselves, the other 68 for U+0100 onwards in byte order."""
    keep = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    extra = [b for b in range(256) if b not in keep]
    table = {b: chr(b) for b in keep}
    table.update({b: chr(0x100 + n) for n, b in enumerate(extra)})
    return table


def pre_tokenizer_kind(path, pre):
    """Which of run.cpp's splits `pre` is (SPLIT_KINDS), or fail naming it."""
    def byte_level(p, use_regex):
        if p.get("type") != "ByteLevel":
            return False
        if p.get("add_prefix_space"):
            fail(f"{path}: ByteLevel add_prefix_space is not supported")
        return p.get("use_regex", True) == use_regex
    steps = pre.get("pretokenizers") if isinstance(pre, dict) and pre.get("type") == "Sequence" else [pre]
    if not isinstance(steps, list) or not all(isinstance(p, dict) for p in steps):
        fail(f"{path}: pre_tokenizer {pre!r} is not supported")
    if len(steps) == 1 and byte_level(steps[0], True):
        return 2
    if len(steps) == 2 and steps[0].get("type") == "Digits" and steps[0].get("individual_digits") \
            and byte_level(steps[1], True):
        return SPLIT_GPT2_DIGITS
    if len(steps) == 2 and steps[0].get("type") == "Split" and byte_level(steps[1], False):
        split = steps[0]
        regex = split.get("pattern", {}).get("Regex") if isinstance(split.get("pattern"), dict) else None
        if regex == SPLIT_KINDS[1] and split.get("behavior") == "Isolated" and not split.get("invert"):
            return 1
        fail(f"{path}: pre_tokenizer splits by {regex!r}; run.cpp implements Llama 3's and GPT-2's regexes")
    fail(f"{path}: pre_tokenizer {json.dumps(pre)[:200]} is not supported "
         "(Llama 3's Split + ByteLevel, GPT-2's ByteLevel, or Digits + ByteLevel)")


def unicode_ranges():
    """[(first, last, class)]: the code points the splits call letters (\\p{L}),
    numbers (\\p{N}) and white space (\\s, as JavaScript and the reference
    tokenizer define it: Zs, tab to carriage return, U+2028, U+2029, U+FEFF),
    from this Python's Unicode database."""
    import unicodedata
    space = {9, 10, 11, 12, 13, 0x2028, 0x2029, 0xFEFF}
    ranges = []
    for cp in range(0x110000):
        cat = unicodedata.category(chr(cp))
        c = (CLASS_SPACE if cp in space or cat == "Zs" else CLASS_LETTER if cat[0] == "L"
             else CLASS_NUMBER if cat[0] == "N" else 0)
        if c and ranges and ranges[-1][2] == c and ranges[-1][1] == cp - 1:
            ranges[-1][1] = cp
        elif c:
            ranges.append([cp, cp, c])
    return [tuple(r) for r in ranges]


def read_config_ids(path, tj, n_vocab):
    """bos and eos ids: the token the post-processor puts first (else
    tokenizer_config.json's bos_token when add_bos_token is set), and every
    end-of-sequence id named in tokenizer_config.json, config.json or
    generation_config.json beside the tokenizer (each one of the n_vocab ids)."""
    folder = os.path.dirname(os.path.abspath(path))

    def load(name):
        p = os.path.join(folder, name)
        if not os.path.exists(p):
            return {}
        d = load_json(p)
        if not isinstance(d, dict):
            fail(f"{p}: not a JSON object")
        return d
    added = {t["content"]: t["id"] for t in added_tokens(path, tj)}

    def token_id(where, tok):
        if isinstance(tok, dict):
            tok = tok.get("content")
        if tok is None:
            return None
        if not isinstance(tok, str):
            fail(f"{where}: token {tok!r} is not a string")
        if tok not in added:
            fail(f"{where}: {tok!r} is not one of the tokenizer's added tokens")
        return added[tok]

    def ids(where, v):
        v = v if isinstance(v, list) else [v]
        if not all(isinstance(i, int) and not isinstance(i, bool) for i in v):
            fail(f"{where}: token ids {v!r} are not integers")
        for i in v:
            if not 0 <= i < n_vocab:
                fail(f"{where}: token id {i} is not in the vocabulary of {n_vocab}")
        return v
    tcfg, cfg, gen = load("tokenizer_config.json"), load("config.json"), load("generation_config.json")
    bos = None
    post = tj.get("post_processor") or {}
    processors = post.get("processors", [post]) if isinstance(post, dict) else None
    if not isinstance(processors, list) or not all(isinstance(p, dict) for p in processors):
        fail(f"{path}: post_processor {json.dumps(post)[:100]} is not an object or a list of them")
    for p in processors:
        single = p.get("single") if p.get("type") == "TemplateProcessing" else None
        first = single[0] if isinstance(single, list) and single else None
        if isinstance(first, dict) and "SpecialToken" in first:
            special = first["SpecialToken"]
            if not isinstance(special, dict):
                fail(f"{path}: post_processor's SpecialToken {special!r} is not an object")
            bos = token_id(f"{path}: post_processor", special.get("id"))
    if bos is None and tcfg.get("add_bos_token"):
        bos = token_id(os.path.join(folder, "tokenizer_config.json"), tcfg.get("bos_token"))
    eos = []
    if "eos_token" in tcfg:
        eos.append(token_id(os.path.join(folder, "tokenizer_config.json"), tcfg["eos_token"]))
    for name, d in (("config.json", cfg), ("generation_config.json", gen)):
        if d.get("eos_token_id") is not None:
            eos += ids(os.path.join(folder, name), d["eos_token_id"])
    return bos, sorted({i for i in eos if i is not None})


def read_byte_level(path, tj):
    """A byte-level BPE tokenizer.json as pieces [(bytes, score, type)], bos,
    eos ids and the extension run.cpp needs (write_tokenizer_bin's layout)."""
    model = tj["model"]
    for key in ("dropout", "continuing_subword_prefix", "end_of_word_suffix"):
        if model.get(key):
            fail(f"{path}: BPE {key} = {model[key]!r} is not supported")
    if tj.get("normalizer") is not None:
        fail(f"{path}: normalizer {json.dumps(tj['normalizer'])[:100]} is not supported (byte-level BPE without one)")
    decoder = tj.get("decoder")
    if decoder is not None and not (isinstance(decoder, dict) and decoder.get("type") == "ByteLevel"):
        fail(f"{path}: decoder {json.dumps(decoder)[:100]} is not supported (a byte-level BPE decodes with ByteLevel)")
    split = pre_tokenizer_kind(path, tj.get("pre_tokenizer"))
    vocab = dict(model["vocab"])
    added = added_tokens(path, tj)
    for t in added:
        if vocab.setdefault(t["content"], t["id"]) != t["id"]:
            fail(f"{path}: added token {t['content']!r} has id {t['id']}, the vocabulary {vocab[t['content']]}")
    by_id = ids_to_pieces(path, vocab)
    bos, eos = read_config_ids(path, tj, len(by_id))
    return byte_level_vocabulary(path, by_id, sorted({t["id"] for t in added}), split_merges(path, model["merges"]),
                                 split, bool(model.get("ignore_merges")), bos, eos)


def byte_level_vocabulary(path, by_id, special, merges, split, ignore_merges, bos, eos):
    """Pieces [(bytes, score, type)], bos, eos and the extension run.cpp needs
    (write_tokenizer_bin's layout) from a byte-level BPE's pieces by id (in
    GPT-2's byte alphabet, special ones as their text), special ids, merges as
    [(left, right)] pieces by rank, and the split kind."""
    decoder = {c: b for b, c in bytes_to_unicode().items()}
    pieces = []
    for i, piece in enumerate(by_id):
        if i in special:
            pieces.append(piece.encode())
        elif all(c in decoder for c in piece):
            pieces.append(bytes(decoder[c] for c in piece))
        else:
            fail(f"{path}: piece {i} {piece!r} is not in the byte-level alphabet")
    missing = sorted(set(range(256)) - {p[0] for i, p in enumerate(pieces) if len(p) == 1 and i not in special})
    if missing:
        fail(f"{path}: the byte 0x{missing[0]:02X} has no piece of its own (a byte-level BPE needs all 256)")
    ids = {p: i for i, p in enumerate(pieces) if i not in special}
    pairs, rank = [], {}
    for r, (left, right) in enumerate(merges):
        try:
            lb, rb = (bytes(decoder[c] for c in s) for s in (left, right))
            pair = (ids[lb], ids[rb], ids[lb + rb])
        except KeyError:
            fail(f"{path}: merge {r} ({left!r} {right!r}) joins pieces that are not in the vocabulary")
        pairs.append(pair[:2])
        rank.setdefault(pair[2], r)
    # llama2.c's runner reads the pieces and ignores the extension; these scores
    # make its merge-the-best-piece encoder approximate ours
    out = [(p, -float(rank[i]) if i in rank else 0.0, 1) for i, p in enumerate(pieces)]
    ext = dict(split=split, ignore_merges=ignore_merges, bos=bos, eos=eos,
               special=special, merges=pairs, ranges=unicode_ranges())
    return out, bos, eos, ext


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
    while off < len(data) and (vocab_size is None or len(pieces) < vocab_size) \
            and data[off:off + 4] != b"tokx":  # a byte-level BPE's extension block follows the pieces
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
    if vocab_size is not None and (len(pieces) != vocab_size or (off != len(data) and data[off:off + 4] != b"tokx")):
        fail(f"{path}: holds {len(read_tokenizer_bin(path)[0])} pieces, but the model's vocabulary has {vocab_size}")
    return pieces, scores


def read_tokenizer_extension(path, n_pieces):
    """The byte-level BPE block after tokenizer.bin's pieces (write_tokenizer_bin's
    layout) as the dict read_byte_level makes, or None when the file has none."""
    with open(path, "rb") as f:
        data = f.read()
    off = 4
    for _ in range(n_pieces):  # the pieces' end, found by walking them (a piece may contain "tokx")
        off += 8 + struct.unpack_from("<i", data, off + 4)[0]
    if off == len(data):
        return None
    if data[off:off + 4] != b"tokx":
        fail(f"{path}: {len(data) - off} bytes after the pieces are not an extension block")
    words = data[off + 4:]
    if len(words) % 4:
        fail(f"{path}: the extension block is cut")
    v = list(struct.unpack(f"<{len(words) // 4}i", words))
    pos = 0

    def take(n):
        nonlocal pos
        if n < 0 or pos + n > len(v):
            fail(f"{path}: the extension block is cut or has a bad count")
        pos += n
        return v[pos - n:pos]

    version, kind, split, flags, bos = take(5)
    if (version, kind) != (1, 1) or split not in (1, 2, 3):
        fail(f"{path}: extension version {version}, kind {kind}, split {split} not known")

    def check(what, ids, lowest=0):  # each an id of the n_pieces, as the engines check them
        bad = [i for i in ids if not lowest <= i < n_pieces]
        if bad:
            fail(f"{path}: the extension block's {what} id {bad[0]} is not in the vocabulary of {n_pieces}")
        return ids
    check("bos", [bos], -1)
    eos = check("eos", take(take(1)[0]))
    special = check("special token", take(take(1)[0]))
    flat = check("merge", take(2 * take(1)[0]))
    n_ranges = take(1)[0]
    take(3 * n_ranges)
    if pos != len(v):
        fail(f"{path}: {4 * (len(v) - pos)} bytes after the extension block")
    return dict(split=split, ignore_merges=bool(flags & 1), bos=None if bos < 0 else bos, eos=eos, special=special,
                merges=list(zip(flat[0::2], flat[1::2])))
