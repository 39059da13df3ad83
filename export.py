"""Write our .bin checkpoints and tokenizer.bin.

  python3 export.py OUT.bin [--version 0|1|2] [--group-size N] --checkpoint model.pt  # llama2.c training checkpoint
  python3 export.py OUT.bin [--version 0|1|2] [--group-size N] --bin IN.bin           # convert between our versions
  python3 export.py --tokenizer tokenizer.model [-o tokenizer.bin]  # sentencepiece -> tokenizer.bin

The layouts are documented byte by byte in README.md. Files are written to a
temporary name and renamed, so a failed export never leaves a half-written file.
"""

import argparse
import collections
import io
import os
import pickle
import struct
import sys
import zipfile

import torch

import model as M


def fail(msg):
    sys.exit(f"export.py: error: {msg}")


def progress(msg):
    print(msg, file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------
# Checkpoints


def header_bytes(args, version, group_size=0):
    """The header: 28 bytes for version 0, 256 for versions 1 and 2."""
    fields = (args.dim, args.hidden_dim, args.n_layers, args.n_heads, args.n_kv_heads)
    if version == 0:
        if args.rope_theta != M.DEFAULT_ROPE_THETA or args.norm_eps != M.DEFAULT_NORM_EPS:
            fail(f"version 0 cannot store rope_theta={args.rope_theta} / norm_eps={args.norm_eps}; "
                 "use --version 1 or 2")
        vocab = args.vocab_size if args.shared_classifier else -args.vocab_size
        return struct.pack("<7i", *fields, vocab, args.max_seq_len)
    head = struct.pack("<Ii7iB", M.MAGIC, version, *fields, args.vocab_size, args.max_seq_len,
                       int(args.shared_classifier))
    if version == 2:
        head += struct.pack("<i", group_size)  # offset 37, unaligned as in llama2.c
    head = head.ljust(64, b"\0") + struct.pack("<2f", args.rope_theta, args.norm_eps)
    return head.ljust(M.HEADER_BYTES, b"\0")


def file_order(model, version):
    """[(label, tensor)] in the order the weights are stored. Version 2 stores
    the norms first, then every matrix of every layer as its own quantized tensor."""
    args, sd = model.args, model.state_dict()
    L = args.n_layers
    stack = lambda name: torch.stack([sd[f"layers.{i}.{name}"] for i in range(L)])
    norms = [("rms_att", stack("attention_norm.weight")), ("rms_ffn", stack("ffn_norm.weight"))]
    emb = ("token_embedding", sd["tok_embeddings.weight"])
    if version == 2:
        mats = [(f"{name.split('.')[1]}[{i}]", sd[f"layers.{i}.{name}"])
                for name, _ in M.layer_tensors(args) for i in range(L)]
    else:
        mats = [(name.split(".")[1], stack(name)) for name, _ in M.layer_tensors(args)]
    if version == 0:
        cos, sin = M.rope_tables(args.head_size, args.max_seq_len, args.rope_theta)
        out = [emb, norms[0], *mats[:4], norms[1], *mats[4:], ("rms_final", sd["norm.weight"]),
               ("freq_cis_real", cos), ("freq_cis_imag", sin)]
    else:
        out = [*norms, ("rms_final", sd["norm.weight"]), emb, *mats]
    if not args.shared_classifier:
        out.append(("classifier", sd["output.weight"]))
    return out


def quantize_q8(w, group_size):
    """Symmetric int8 per group of group_size consecutive values ("Q8_0"):
    scale = max|v| / 127, q = round(v / scale); a zero group gets scale 0.
    Returns (int8 values, float32 scales, max |dequantized - w|)."""
    groups = w.detach().to(torch.float32).reshape(-1, group_size)
    scale = groups.abs().amax(dim=1) / 127.0
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.round(groups / safe[:, None]).clamp(-127, 127).to(torch.int8)
    err = (q.to(torch.float32) * scale[:, None] - groups).abs().max().item()
    return q.flatten(), scale, err


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
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def write_checkpoint(model, path, version, group_size=64):
    if version not in (0, 1, 2):
        fail(f"--version {version}: must be 0, 1 or 2")
    gs = choose_group_size(model.args, group_size) if version == 2 else 0
    worst = 0.0

    def chunks():
        nonlocal worst
        yield header_bytes(model.args, version, gs)
        for label, t in file_order(model, version):
            if version == 2 and not label.startswith("rms_"):
                q, scale, err = quantize_q8(t, gs)
                worst = max(worst, err)
                progress(f"  {label:16s} {tuple(t.shape)}  max quantization error {err:.3g}")
                yield q.numpy().tobytes() + scale.numpy().astype("<f4").tobytes()
            else:
                progress(f"  {label:16s} {tuple(t.shape)}")
                yield t.detach().to(torch.float32).contiguous().numpy().astype("<f4").tobytes()

    progress(f"writing {path} (version {version}{f', group size {gs}' if gs else ''})")
    write_atomically(path, chunks())
    if version == 2:
        progress(f"max quantization error over all tensors: {worst:.3g}")
    progress(f"wrote {path}: {os.path.getsize(path)} bytes")


def load_weights_only(path):
    """torch.save's zip format read by an unpickler that builds tensors, dicts
    and numbers and refuses every other class, so a checkpoint cannot run code.
    This is what torch.load(weights_only=True) does, but torch 1.13 (Debian 12)
    rejects the floats in llama2.c's model_args and ignores pickle_module."""
    dtypes = {"FloatStorage": torch.float32, "HalfStorage": torch.float16,
              "BFloat16Storage": torch.bfloat16, "DoubleStorage": torch.float64,
              "LongStorage": torch.int64, "IntStorage": torch.int32, "BoolStorage": torch.bool}

    def rebuild_tensor(storage, offset, size, stride, *_):
        return torch.as_strided(storage, size, stride, offset)

    with zipfile.ZipFile(path) as z:
        pkl = next(n for n in z.namelist() if n.endswith("data.pkl"))
        prefix = pkl[: -len("data.pkl")]

        class Unpickler(pickle.Unpickler):
            def find_class(self, module, name):
                if module == "torch" and name in dtypes:
                    return dtypes[name]
                if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
                    return rebuild_tensor
                if (module, name) == ("torch._utils", "_rebuild_parameter"):
                    return lambda data, *_: data
                if (module, name) == ("collections", "OrderedDict"):
                    return collections.OrderedDict
                raise pickle.UnpicklingError(f"refusing to load {module}.{name}")

            def persistent_load(self, pid):  # ("storage", dtype, key, location, numel)
                _, dtype, key, _, _ = pid
                return torch.frombuffer(bytearray(z.read(f"{prefix}data/{key}")), dtype=dtype)

        return Unpickler(io.BytesIO(z.read(pkl))).load()


def load_training_checkpoint(path):
    """llama2.c's train.py checkpoint: {"model_args": {...}, "model": state_dict}."""
    if not os.path.isfile(path):
        fail(f"{path}: no such file")
    try:
        try:
            ck = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError:
            ck = load_weights_only(path)
    except Exception as e:  # torch raises many types for a bad file
        fail(f"{path}: cannot load: {e}")
    if not isinstance(ck, dict) or "model_args" not in ck or "model" not in ck:
        fail(f"{path}: not a llama2.c training checkpoint (needs 'model_args' and 'model')")
    known = set(M.ModelArgs.__dataclass_fields__)
    kwargs = {k: v for k, v in ck["model_args"].items() if k in known}
    sd = {k.removeprefix("_orig_mod."): v for k, v in ck["model"].items()}  # torch.compile prefix
    sd = {k: v for k, v in sd.items() if k not in ("freqs_cos", "freqs_sin")}
    emb, out = sd.get("tok_embeddings.weight"), sd.get("output.weight")
    kwargs["shared_classifier"] = out is None or (emb is not None and torch.equal(emb, out))
    try:
        args = M.ModelArgs(**kwargs)
    except (TypeError, ValueError) as e:
        fail(f"{path}: bad model_args: {e}")
    check_args(args, path)
    model = M.Transformer(args)
    if kwargs["shared_classifier"]:
        sd["output.weight"] = emb
    expected = model.state_dict()
    for name, t in expected.items():  # the first problem, in one line
        if name not in sd:
            fail(f"{path}: tensor {name} is missing")
        if not isinstance(sd[name], torch.Tensor) or sd[name].shape != t.shape:
            shape = tuple(sd[name].shape) if isinstance(sd[name], torch.Tensor) else type(sd[name]).__name__
            fail(f"{path}: tensor {name} has shape {shape}, but model_args make it {tuple(t.shape)}")
    extra = sorted(set(sd) - set(expected))
    if extra:
        fail(f"{path}: unexpected tensor {extra[0]}" + (f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""))
    model.load_state_dict(sd)
    return model


def check_args(args, path):
    """The shape rules run.cpp enforces, checked before any tensor is built."""
    for name in ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "hidden_dim", "max_seq_len"):
        v = getattr(args, name)
        if not isinstance(v, int) or v <= 0:
            fail(f"{path}: model_args {name} = {v!r} (must be a positive integer)")
    if args.dim % args.n_heads:
        fail(f"{path}: model_args dim {args.dim} is not divisible by n_heads {args.n_heads}")
    if args.n_heads % args.n_kv_heads:
        fail(f"{path}: model_args n_heads {args.n_heads} is not divisible by n_kv_heads {args.n_kv_heads}")
    if args.head_size % 2:
        fail(f"{path}: model_args head size {args.head_size} is odd (RoPE rotates pairs)")


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
    """[(piece bytes, score float32 bytes, type)], bos_id, eos_id."""
    try:
        with open(path, "rb") as f:
            buf = f.read()
    except OSError as e:
        fail(f"{path}: {e.strerror}")
    pieces, ids = [], {41: 1, 42: 2}  # sentencepiece's default bos/eos ids
    try:
        for field, wire, value in protobuf_fields(buf):
            if field == 1 and wire == 2:
                piece, score, kind = b"", struct.pack("<f", 0.0), 1
                for f2, w2, v2 in protobuf_fields(value):
                    if f2 == 1 and w2 == 2:
                        piece = bytes(v2)
                    elif f2 == 2 and w2 == 5:
                        score = bytes(v2)
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


def export_tokenizer(model_path, out_path):
    pieces, bos, eos = read_sentencepiece(model_path)
    if (bos, eos) != (1, 2):
        fail(f"{model_path}: bos/eos ids are {bos}/{eos}; run.cpp expects 1/2")
    tokens = []
    for i, (piece, score, _) in enumerate(pieces):
        if i == bos:
            piece = b"\n<s>\n"
        elif i == eos:
            piece = b"\n</s>\n"
        tokens.append((piece.replace("\u2581".encode(), b" "), score))
    if any(not p for p, _ in tokens):
        fail(f"{model_path}: contains an empty piece")
    max_len = max(len(p) for p, _ in tokens)

    def chunks():
        yield struct.pack("<i", max_len)
        for piece, score in tokens:
            yield score + struct.pack("<i", len(piece)) + piece

    write_atomically(out_path, chunks())
    progress(f"wrote {out_path}: {len(tokens)} tokens, max_token_length {max_len}")


# ----------------------------------------------------------------------------


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", nargs="?", help="output checkpoint (.bin)")
    ap.add_argument("--version", type=int, default=0,
                    help="0 (llama2.c legacy fp32, default), 1 (fp32) or 2 (int8 groups, for runq)")
    ap.add_argument("--group-size", type=int, default=64,
                    help="version 2: values per scale; backs off to a divisor of dim and hidden_dim (default 64)")
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", help="llama2.c training checkpoint (.pt)")
    src.add_argument("--bin", help="one of our .bin checkpoints, any version")
    src.add_argument("--tokenizer", help="sentencepiece tokenizer.model")
    ap.add_argument("-o", dest="tokenizer_out", default="tokenizer.bin", help="tokenizer output (default tokenizer.bin)")
    a = ap.parse_args()
    out = a.tokenizer_out if a.tokenizer else a.out
    if out and not os.path.isdir(os.path.dirname(os.path.abspath(out))):  # before any work
        fail(f"{out}: directory {os.path.dirname(os.path.abspath(out))} does not exist")

    if a.tokenizer:
        export_tokenizer(a.tokenizer, a.tokenizer_out)
        return
    if not a.out:
        fail("give the output checkpoint path")
    if a.checkpoint:
        model = load_training_checkpoint(a.checkpoint)
    else:
        if not os.path.isfile(a.bin):
            fail(f"{a.bin}: no such file")
        try:
            model = M.load_checkpoint(a.bin)
        except (ValueError, RuntimeError, struct.error) as e:
            fail(f"{a.bin}: not a valid checkpoint ({e})")
    write_checkpoint(model, a.out, a.version, a.group_size)


if __name__ == "__main__":
    main()
