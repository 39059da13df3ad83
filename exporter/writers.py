"""Our writers: the .bin checkpoints (versions 0 to 3) and tokenizer.bin, the
layouts docs/file-formats.md describes byte by byte. Files are written to a
temporary name and renamed, so a failed export never leaves a half-written file."""

import os
import struct

import torch

import model as M
from exporter import fail, progress
from exporter.quantize import quantize_q4, quantize_q8
from exporter.tokenizers import read_sentencepiece, read_tokenizer_json


# ----------------------------------------------------------------------------
# Checkpoints


def header_bytes(args, version, group_size=0, int8_tensors=0):
    """The header: 28 bytes for version 0, 256 for versions 1, 2 and 3.
    int8_tensors (version 3): bit 0 the embedding, bit 1 the classifier in int8."""
    fields = (args.dim, args.hidden_dim, args.n_layers, args.n_heads, args.n_kv_heads)
    if version == 0:
        if args.rope_theta != M.DEFAULT_ROPE_THETA or args.norm_eps != M.DEFAULT_NORM_EPS:
            fail(f"version 0 cannot store rope_theta={args.rope_theta} / norm_eps={args.norm_eps}; "
                 "use --version 1 or 2")
        if args.rope_scaling is not None:
            fail("version 0 cannot store rope_scaling (Llama 3.1's); use --version 1, 2 or 3")
        vocab = args.vocab_size if args.shared_classifier else -args.vocab_size
        return struct.pack("<7i", *fields, vocab, args.max_seq_len)
    head = struct.pack("<Ii7iB", M.MAGIC, version, *fields, args.vocab_size, args.max_seq_len,
                       int(args.shared_classifier))
    if version >= 2:
        head += struct.pack("<i", group_size)  # offset 37, unaligned as in llama2.c
    head = head.ljust(64, b"\0") + struct.pack("<2f", args.rope_theta, args.norm_eps)
    if args.rope_scaling is not None:  # offset 72: kind 1 (llama3) and its four parameters
        factor, low, high, original = args.rope_scaling
        head += struct.pack("<i3fi", 1, factor, low, high, original)
    if int8_tensors:  # offset 92
        head = head.ljust(92, b"\0") + struct.pack("<i", int8_tensors)
    return head.ljust(M.HEADER_BYTES, b"\0")


def file_order(model, version, int8_tensors=0):
    """[(label, function returning the tensor, its state-dict name or None for
    the stacked norms and RoPE tables, kind)] in the order the weights are
    stored (model.file_layout): each tensor is made only when it is written (a
    lazy model then holds one matrix at a time). A stacked array of matrices is
    written layer after layer, which is the same bytes."""
    args, sd = model.args, model.state_dict()
    out = []
    for label, names, shape, kind in M.file_layout(args, version, int8_tensors):
        if names == [None]:  # version 0's RoPE tables
            cos, sin = M.rope_tables(args.head_size, args.max_seq_len, args.rope_theta, args.rope_scaling)
            out.append((label, lambda t=cos if label == "freq_cis_real" else sin: t, None, kind))
        elif len(shape) == 1 and len(names) > 1:  # a norm of every layer, in one array
            out.append((label, lambda names=names: torch.stack([sd[n] for n in names]), None, kind))
        else:
            for i, name in enumerate(names):
                out.append((f"{label}[{i}]" if len(names) > 1 else label, lambda name=name: sd[name], name, kind))
    return out


MAX_GROUP4 = 256  # runq unpacks a 4-bit group on the stack


def choose_group_size(args, wanted):
    """The largest group size <= wanted dividing dim and hidden_dim (matrix rows)."""
    if wanted < 1:
        fail(f"--group-size {wanted}: must be positive")
    gs = next(g for g in range(wanted, 0, -1) if args.dim % g == 0 and args.hidden_dim % g == 0)
    if gs != wanted:
        progress(f"group size {wanted} does not divide dim {args.dim} and hidden_dim {args.hidden_dim}; "
                 f"using {gs}")
    return gs


def write_atomically(path, chunks):
    """Write the byte strings `chunks` yields to path via a temporary file, so
    that a failure never leaves a half-written file under the final name."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            for chunk in chunks:
                f.write(chunk)
        os.replace(tmp, path)
    except BaseException as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        if isinstance(e, OSError):
            fail(f"cannot write {path}: {e.strerror}")
        raise


def group_size_for(args, version, wanted=None):
    """Versions 2 and 3: default 64 and 32. Version 2 backs off to a divisor of
    dim and hidden_dim; version 3 ends a row in a shorter group. 0 otherwise."""
    if version not in (0, 1, 2, 3):
        fail(f"--version {version}: must be 0, 1, 2 or 3")
    if version == 2:
        return choose_group_size(args, 64 if wanted is None else wanted)
    if version == 3:
        wanted = 32 if wanted is None else wanted
        if not 1 <= wanted <= MAX_GROUP4:
            fail(f"--group-size {wanted}: version 3 needs 1..{MAX_GROUP4}")
        return wanted
    return 0


def write_checkpoint(model, path, version, group_size=None):
    """The model as one of our versions. A model read from GGUF offers its
    Q8_0 / Q4_0 tensors exactly (`model.stored`): they are copied, not
    requantized, when their blocks are this file's groups; version 3 keeps a Q8_0
    (exactly) or Q6_K embedding or classifier in int8 (header offset 92)."""
    gs = group_size_for(model.args, version, group_size)
    stored = getattr(model, "stored", None)
    exact = lambda name, bits: stored and name and stored(name, bits, gs)
    int8 = 0
    if version == 3 and stored:  # a GGUF's Q8_0 / Q6_K embedding or classifier keeps 8 bits
        for bit, name in ((1, "tok_embeddings.weight"), (2, None if model.args.shared_classifier else "output.weight")):
            if name and model.kind(name) in ("Q8_0", "Q6_K") and model.args.dim % gs == 0:
                int8 |= bit
    worst = 0.0

    def chunks():
        nonlocal worst
        yield header_bytes(model.args, version, gs, int8)
        for label, make, name, kind in file_order(model, version, int8):
            if kind != "f32":
                bits = 8 if kind == "q8" else 4
                copy = exact(name, bits)
                if copy is not None:
                    q, scale = copy
                    progress(f"  {label:16s} copied exactly ({bits}-bit groups of {gs})")
                    yield q.tobytes() + scale.astype("<f4").tobytes()
                    continue
                t = make()
                if stored:
                    progress(f"  {label:16s} requantized from its {model.kind(name)} values (not exact)")
                q, scale, err = quantize_q8(t, gs) if bits == 8 else quantize_q4(t, gs)
                worst = max(worst, err)
                progress(f"  {label:16s} {tuple(t.shape)}  max quantization error {err:.3g}")
                yield q.numpy().tobytes() + scale.numpy().astype("<f4").tobytes()
            else:
                t = make()
                progress(f"  {label:16s} {tuple(t.shape)}")
                yield t.detach().to(torch.float32).contiguous().numpy().astype("<f4").tobytes()

    progress(f"writing {path} (version {version}{f', group size {gs}' if gs else ''})")
    write_atomically(path, chunks())
    if version >= 2 and worst:
        progress(f"max quantization error over all tensors: {worst:.3g}")
    progress(f"wrote {path}: {os.path.getsize(path)} bytes")


TOKENIZER_MAGIC = b"tokx"  # starts the extension block after the pieces


def write_tokenizer_bin(path, pieces, scores, ext=None):
    """tokenizer.bin: the longest piece's length (int32), then per id its score
    (float32), length (int32) and bytes, as llama2.c writes it. A byte-level
    BPE adds an extension block after the pieces (llama2.c's reader stops
    before it), all int32 unless noted (docs/file-formats.md, "tokenizer.bin"):
      "tokx", version 1, kind 1 (byte-level BPE), split (1 Llama 3 regex,
      2 GPT-2 regex, 3 GPT-2 after single digits), flags (bit 0: ignore_merges),
      bos (-1: none), n_eos, eos ids, n_special, special ids, n_merges,
      (left id, right id) per merge by rank, n_ranges, (first code point,
      last code point, class 1 letter / 2 number / 3 space) per range (uint32).
    Written atomically."""
    chunks = [struct.pack("<i", max(len(p) for p in pieces))]
    chunks += [struct.pack("<fi", s, len(p)) + p for p, s in zip(pieces, scores)]
    if ext is not None:
        def ints(v):
            return struct.pack(f"<i{len(v)}i", len(v), *v)
        bos = -1 if ext["bos"] is None else ext["bos"]
        chunks.append(TOKENIZER_MAGIC + struct.pack("<5i", 1, 1, ext["split"], int(ext["ignore_merges"]), bos))
        flat = [i for pair in ext["merges"] for i in pair]
        chunks += [ints(ext["eos"]), ints(ext["special"]), struct.pack(f"<i{len(flat)}i", len(ext["merges"]), *flat)]
        chunks.append(struct.pack("<i", len(ext["ranges"])) + b"".join(struct.pack("<3I", *r) for r in ext["ranges"]))
    write_atomically(path, chunks)


def tokenizer_pieces(source, pieces, bos, eos, ext):
    """Our tokenizer.bin's (piece, score) list from a vocabulary as the readers
    give it, checked before anything is written."""
    tokens = []
    if ext is None:  # SentencePiece style: run.cpp knows bos 1 and eos 2
        if (bos, eos) != (1, 2):
            fail(f"{source}: bos/eos ids are {bos}/{eos}; run.cpp expects 1/2")
        for i, (piece, score, _) in enumerate(pieces):
            if i == bos:
                piece = b"\n<s>\n"
            elif i == eos:
                piece = b"\n</s>\n"
            tokens.append((piece.replace("\u2581".encode(), b" "), score))
    else:
        tokens = [(piece, score) for piece, score, _ in pieces]
    if any(not p for p, _ in tokens):
        fail(f"{source}: contains an empty piece")
    return tokens


def write_tokenizer(source, out_path, tokens, ext):
    write_tokenizer_bin(out_path, [p for p, _ in tokens], [s for _, s in tokens], ext)
    kind = "" if ext is None else f" (byte-level BPE, {len(ext['merges'])} merges, bos {ext['bos']}, eos {ext['eos']})"
    progress(f"wrote {out_path}: {len(tokens)} tokens{kind}, max_token_length {max(len(p) for p, _ in tokens)}")


def export_tokenizer(model_path, out_path):
    if model_path.endswith(".json"):
        pieces, bos, eos, ext = read_tokenizer_json(model_path)
    else:
        (pieces, bos, eos), ext = read_sentencepiece(model_path), None
    write_tokenizer(model_path, out_path, tokenizer_pieces(model_path, pieces, bos, eos, ext), ext)
