"""Write our .bin checkpoints and tokenizer.bin.

  python3 export.py OUT.bin [--version 0|1|2|3] [--group-size N] --checkpoint model.pt  # llama2.c training checkpoint
  python3 export.py OUT.bin [--version 0|1|2|3] [--group-size N] --bin IN.bin           # convert between our versions
  python3 export.py OUT.bin --version 3 --awq CALIB.txt --awq-tokenizer tok.bin --bin IN.bin  # with AWQ
  python3 export.py OUT.bin [--version 0|1|2|3] [--group-size N] --hf DIR             # Hugging Face Llama
  python3 export.py OUT.bin [--version 0|1|2|3] [--group-size N] --meta DIR --seq-len 4096  # Meta Llama 2
  python3 export.py --tokenizer tokenizer.model|tokenizer.json [-o tokenizer.bin]  # -> tokenizer.bin

The layouts are documented byte by byte in README.md. Files are written to a
temporary name and renamed, so a failed export never leaves a half-written file.
"""

import argparse
import collections
import collections.abc
import glob
import heapq
import io
import json
import math
import os
import pickle
import struct
import sys
import zipfile

import numpy as np

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
    if version >= 2:
        head += struct.pack("<i", group_size)  # offset 37, unaligned as in llama2.c
    head = head.ljust(64, b"\0") + struct.pack("<2f", args.rope_theta, args.norm_eps)
    return head.ljust(M.HEADER_BYTES, b"\0")


def file_order(model, version):
    """[(label, function returning the tensor)] in the order the weights are
    stored: each tensor is made only when it is written (a lazy model then
    holds one matrix at a time). Versions 0/1 store each kind of matrix for all
    layers in a row, so writing them layer after layer gives that layout;
    version 2 stores the norms first, then every matrix as its own quantized tensor."""
    args, sd = model.args, model.state_dict()
    L = args.n_layers
    stack = lambda name: lambda: torch.stack([sd[f"layers.{i}.{name}"] for i in range(L)])
    tensor = lambda name: lambda: sd[name]
    norms = [("rms_att", stack("attention_norm.weight")), ("rms_ffn", stack("ffn_norm.weight"))]
    emb = ("token_embedding", tensor("tok_embeddings.weight"))
    mats = [[(f"{name.split('.')[1]}[{i}]", tensor(f"layers.{i}.{name}")) for i in range(L)]
            for name, _ in M.layer_tensors(args)]
    final = ("rms_final", tensor("norm.weight"))
    if version == 0:
        cos, sin = M.rope_tables(args.head_size, args.max_seq_len, args.rope_theta)
        out = [emb, norms[0], *sum(mats[:4], []), norms[1], *sum(mats[4:], []), final,
               ("freq_cis_real", lambda: cos), ("freq_cis_imag", lambda: sin)]
    else:
        out = [*norms, final, emb, *sum(mats, [])]
    if not args.shared_classifier:
        out.append(("classifier", tensor("output.weight")))
    return out


MAX_GROUP4 = 256  # runq unpacks a 4-bit group on the stack


def in_groups(w, group_size):
    """(rows, cols) -> (rows, groups, group_size): each row cut into its groups,
    the last one padded with zeros when group_size does not divide cols."""
    rows, cols = w.shape
    groups = -(-cols // group_size)
    return torch.nn.functional.pad(w, (0, groups * group_size - cols)).view(rows, groups, group_size)


def quantize_groups(w, group_size, qmax):
    """Symmetric quantization of each row of w (rows, cols) in groups of
    group_size consecutive values, the last group of a row shorter when
    group_size does not divide cols: scale = max|v| / qmax, q = round(v / scale)
    in [-qmax, qmax]; a zero group gets scale 0. Returns (q as int16 (rows, cols),
    float32 scales (rows, groups), the dequantized values)."""
    w = w.detach().to(torch.float32)
    rows, cols = w.shape
    padded = in_groups(w, group_size)
    scale = padded.abs().amax(dim=2) / qmax
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.round(padded / safe[..., None]).clamp(-qmax, qmax)
    back = (q * scale[..., None]).view(rows, -1)[:, :cols]
    return q.view(rows, -1)[:, :cols].to(torch.int16), scale, back


def quantize_q8(w, group_size):
    """Version 2 ("Q8_0"): int8 in groups of group_size (which divides the rows),
    qmax 127. Returns (int8 values, float32 scales, max |dequantized - w|)."""
    q, scale, back = quantize_groups(w.reshape(-1, group_size), group_size, 127)
    return q.to(torch.int8).flatten(), scale.flatten(), (back - w.reshape(-1, group_size)).abs().max().item()


def quantize_q4(w, group_size):
    """Version 3: int4 in groups of a row (qmax 7), packed two per byte, low
    nibble first, each row starting on a byte. Returns (packed uint8
    (rows, (cols + 1) // 2), float32 scales (rows, groups), max error)."""
    q, scale, back = quantize_groups(w, group_size, 7)
    nibbles = torch.nn.functional.pad(q, (0, q.shape[1] % 2)) & 0xF  # two's complement, 4 bits
    packed = (nibbles[:, 0::2] | (nibbles[:, 1::2] << 4)).to(torch.uint8)
    return packed, scale, (back - w.detach().float()).abs().max().item()


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
    gs = group_size_for(model.args, version, group_size)
    worst = 0.0

    def chunks():
        nonlocal worst
        yield header_bytes(model.args, version, gs)
        for label, make in file_order(model, version):
            t = make()
            if version >= 2 and not label.startswith("rms_"):
                q, scale, err = quantize_q8(t, gs) if version == 2 else quantize_q4(t, gs)
                worst = max(worst, err)
                progress(f"  {label:16s} {tuple(t.shape)}  max quantization error {err:.3g}")
                yield q.numpy().tobytes() + scale.numpy().astype("<f4").tobytes()
            else:
                progress(f"  {label:16s} {tuple(t.shape)}")
                yield t.detach().to(torch.float32).contiguous().numpy().astype("<f4").tobytes()

    progress(f"writing {path} (version {version}{f', group size {gs}' if gs else ''})")
    write_atomically(path, chunks())
    if version >= 2:
        progress(f"max quantization error over all tensors: {worst:.3g}")
    progress(f"wrote {path}: {os.path.getsize(path)} bytes")

# ----------------------------------------------------------------------------
# Activation-aware scaling (AWQ, Lin et al. 2023): before quantizing, scale each
# matrix's input channels up where the calibration activations are large, and
# fold the inverse into the operation that produces those activations, so the
# fp32 model computes the same function while its salient weights lose less to
# rounding. For a layer group sharing an input X (N, n) and one scale s (n,):
#   y = X W^T = (X / s) (W s)^T   and the quantized model computes (X / s) Q(W s)^T.
# s = mean|X|^alpha (normalized), or that over mean|W|^(1 - alpha) as AutoAWQ
# does, alpha from a grid in [0, 1] minimising the group's output error on the
# calibration activations; alpha = 0 is plain rounding, so the chosen scale is
# never worse than it there.


def encode(pieces, scores, text):
    """run.cpp's encode(text, bos=false): a leading space, each UTF-8 character
    its piece (or its bytes' byte pieces), then merges of the adjacent pair whose
    concatenation scores highest, leftmost first, through a heap of candidates."""
    ids = {p: i for i, p in enumerate(pieces)}
    sym = []
    for ch in " " + text:
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


def layer_inputs(model, windows):
    """Per layer, the inputs of wq (= wk, wv), wo, w1 (= w3) and w2 over the
    calibration windows, as (tokens, width) float32 matrices; and the classifier's."""
    captured = [{k: [] for k in ("qkv", "o", "ffn", "w2")} for _ in model.layers]  # per layer
    hooks = []
    for i, layer in enumerate(model.layers):
        for key, module in (("qkv", layer.attention.wq), ("o", layer.attention.wo),
                            ("ffn", layer.feed_forward.w1), ("w2", layer.feed_forward.w2)):
            hooks.append(module.register_forward_hook(
                lambda _m, inp, _out, i=i, key=key: captured[i][key].append(inp[0].reshape(-1, inp[0].shape[-1]))))
    final = []  # the classifier's input
    hooks.append(model.output.register_forward_hook(lambda _m, inp, _out: final.append(inp[0].reshape(-1, inp[0].shape[-1]))))
    with torch.no_grad():
        for w in windows:
            model(torch.tensor([w]))
    for h in hooks:
        h.remove()
    return [{k: torch.cat(v) for k, v in c.items()} for c in captured], torch.cat(final)


ScaleSearch = collections.namedtuple("ScaleSearch", "choice s plain_error error")


def search_scale(X, weights, group_size, qmax, tie=None):
    """The AWQ search for one layer group: a ScaleSearch of the candidate chosen
    (e.g. "0.35" or "0.35/w"), its scales s, and the relative output error
    with plain rounding and with s.
    Candidates: s = mean|x|^alpha, and s = mean|x|^alpha / mean|w|^(1 - alpha)
    (|w| relative to its group's largest, so channels whose weights already
    fill the grid are scaled up less), alpha in 0..1 by 0.05. tie = (kv_heads,
    rep, head_size): wo's input, where rep query heads read one value head, so
    those channels must share a scale (it is folded into that value head's rows
    of wv)."""
    W = torch.cat([w.detach().float() for w in weights])
    rows, n = W.shape
    Wg = in_groups(W.abs(), group_size)
    w_mean = (Wg / Wg.amax(2, keepdim=True).clamp(min=1e-30)).view(rows, -1)[:, :n].mean(0)
    x_mean = X.abs().mean(0)
    if tie:
        kv, rep, hs = tie
        tied = lambda v: v.view(kv, rep, hs).mean(1, keepdim=True).expand(kv, rep, hs).reshape(-1)
        x_mean, w_mean = tied(x_mean), tied(w_mean)
    Y = [X @ w.T for w in weights]
    norm = sum((y * y).sum() for y in Y)
    best, plain = None, None
    for with_w in (False, True):
        for alpha in [i / 20 for i in range(21)]:
            s = x_mean.clamp(min=1e-5) ** alpha
            if with_w:
                s = s / w_mean.clamp(min=1e-5) ** (1 - alpha)
            s = s / torch.sqrt(s.max() * s.min())
            err = sum(((X / s) @ quantize_groups(w * s, group_size, qmax)[2].T - y).pow(2).sum()
                      for w, y in zip(weights, Y))
            plain = err if plain is None else plain
            if best is None or err < best[1]:
                best = (f"{alpha:.2f}" + "/w" * with_w, err, s)
    return ScaleSearch(best[0], best[2], (plain / norm).item(), (best[1] / norm).item())


def apply_awq(model, windows, group_size, qmax):
    """Searches every layer's four scales on the calibration windows, then folds
    them in: 1/s into the RMSNorm weights (for wq/wk/wv and w1/w3), into wv's
    rows (for wo) and into w3's rows (for w2); s into the matrices' columns.
    The fp32 model's function is unchanged; only its rounding moves."""
    a = model.args
    kv, rep, hs = a.n_kv_heads, a.n_heads // a.n_kv_heads, a.head_size
    inputs, _ = layer_inputs(model, windows)
    total = {"plain": 0.0, "awq": 0.0}
    with torch.no_grad():
        for i, (layer, X) in enumerate(zip(model.layers, inputs)):
            att, ffn = layer.attention, layer.feed_forward
            found = {
                "wq/wk/wv": search_scale(X["qkv"], [att.wq.weight, att.wk.weight, att.wv.weight], group_size, qmax),
                "wo": search_scale(X["o"], [att.wo.weight], group_size, qmax, tie=(kv, rep, hs)),
                "w1/w3": search_scale(X["ffn"], [ffn.w1.weight, ffn.w3.weight], group_size, qmax),
                "w2": search_scale(X["w2"], [ffn.w2.weight], group_size, qmax),
            }
            s = {k: v.s for k, v in found.items()}
            layer.attention_norm.weight /= s["wq/wk/wv"]
            for W in (att.wq.weight, att.wk.weight, att.wv.weight):
                W *= s["wq/wk/wv"]
            att.wv.weight /= s["wo"].view(kv, rep, hs)[:, 0, :].reshape(-1, 1)
            att.wo.weight *= s["wo"]
            layer.ffn_norm.weight /= s["w1/w3"]
            ffn.w1.weight *= s["w1/w3"]
            ffn.w3.weight *= s["w1/w3"]
            ffn.w3.weight /= s["w2"].reshape(-1, 1)
            ffn.w2.weight *= s["w2"]
            progress(f"  layer {i}: " + "; ".join(f"{k} alpha {v.choice}, error {v.plain_error:.3g} -> {v.error:.3g}"
                                                  for k, v in found.items()))
            total["plain"] += sum(v.plain_error for v in found.values())
            total["awq"] += sum(v.error for v in found.values())
    n = 4 * len(model.layers)
    progress(f"AWQ: mean relative output error over the {n} layer groups {total['plain'] / n:.3g} with plain "
             f"rounding, {total['awq'] / n:.3g} with the chosen scales")


def search_clip(X, W, group_size, qmax):
    """AWQ's second half: for every group of every row, the clipping ratio r
    (scale = r max|v| / qmax, outliers clamped) minimising that group's share
    of the output error on the calibration input X (N, n). Returns W clamped to
    r max|v| per group, which export then quantizes with that scale."""
    rows, n = W.shape
    Wg, Xg = in_groups(W, group_size), in_groups(X, group_size)
    top = Wg.abs().amax(2, keepdim=True)
    best_err, best = None, Wg
    for r in [1.0 - i / 40 for i in range(21)]:  # 1.0 down to 0.5 by 0.025
        clipped = torch.maximum(torch.minimum(Wg, r * top), -r * top)
        scale = (r * top / qmax).clamp(min=1e-30)
        delta = torch.round(clipped / scale) * scale - Wg  # (rows, groups, gs)
        err = torch.einsum("ngk,rgk->rgn", Xg, delta).pow(2).sum(2)  # (rows, groups)
        if best_err is None:
            best_err = err
            continue
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best = torch.where(better[..., None], clipped, best)
    return best.reshape(rows, -1)[:, :n]


def clip_awq(model, windows, group_size, qmax):
    """search_clip for every matrix of every layer and the classifier, on the
    scaled model's inputs. A classifier that shares the embedding table is
    stored apart first: clipped for its inputs, the table would lose rows'
    outliers the embedding lookup needs. (Held-out perplexity, make quality's
    text: stories260K 5.370 -> 5.351, the own model 15.776 -> 15.741; it costs
    vocab x dim / 2 bytes more at int4. The fp32 function is unchanged.)"""
    if model.args.shared_classifier:
        progress("AWQ: storing the classifier apart from the embedding table it shares")
        model.output.weight = torch.nn.Parameter(model.tok_embeddings.weight.detach().clone())
        model.args.shared_classifier = False
    inputs, final = layer_inputs(model, windows)
    with torch.no_grad():
        model.output.weight.copy_(search_clip(final, model.output.weight, group_size, qmax))
        for layer, X in zip(model.layers, inputs):
            att, ffn = layer.attention, layer.feed_forward
            for key, W in (("qkv", att.wq.weight), ("qkv", att.wk.weight), ("qkv", att.wv.weight),
                           ("o", att.wo.weight), ("ffn", ffn.w1.weight), ("ffn", ffn.w3.weight),
                           ("w2", ffn.w2.weight)):
                W.copy_(search_clip(X[key], W, group_size, qmax))


def calibration_windows(text_path, tokenizer_path, seq_len, vocab_size, n_tokens):
    """The calibration text's tokens in windows as run reads them (BOS, then up
    to 255 tokens, or seq_len - 1 if shorter), n_tokens in all at most."""
    for p in (text_path, tokenizer_path):
        if not os.path.isfile(p):
            fail(f"{p}: no such file")
    with open(text_path, encoding="utf-8", errors="replace") as f:
        text = f.read(16 * n_tokens)  # far more characters than tokens needed
    ids = encode(*read_tokenizer_bin(tokenizer_path, vocab_size), text)[:n_tokens]
    if not ids:
        fail(f"{text_path}: no calibration text")
    T = min(seq_len, 256)
    return [[1] + ids[i:i + T - 1] for i in range(0, len(ids), T - 1)]

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


def load_torch_file(path):
    """A pickled checkpoint or state dict (.pt, .pth, pytorch_model.bin), never running code:
    torch's weights_only loader, or our own where that refuses the file."""
    try:
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError:
            return load_weights_only(path)
    except Exception as e:  # torch raises many types for a bad file
        fail(f"{path}: cannot load: {e}")


def load_training_checkpoint(path):
    """llama2.c's train.py checkpoint: {"model_args": {...}, "model": state_dict}."""
    if not os.path.isfile(path):
        fail(f"{path}: no such file")
    ck = load_torch_file(path)
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
# safetensors: an 8-byte little-endian header length N, N bytes of JSON
# {name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}
# with offsets relative to the end of the header, then the raw little-endian data.

SAFETENSORS_DTYPES = {"F32": ("<f4", 4), "F16": ("<f2", 2), "BF16": ("<u2", 2)}


class SafeTensors:
    """One .safetensors file, its header validated as strictly as run.cpp
    validates ours; each tensor is read from disk only when asked for."""

    def __init__(self, path):
        self.path = path
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                fail(f"{path}: {size} bytes, too short for a safetensors header")
            n = struct.unpack("<Q", head)[0]
            if n > size - 8:
                fail(f"{path}: header length {n} runs past the end of the file ({size} bytes)")
            try:
                header = json.loads(f.read(n))
            except (UnicodeDecodeError, ValueError) as e:
                fail(f"{path}: the header is not JSON ({e})")
        if not isinstance(header, dict):
            fail(f"{path}: the header is not a JSON object")
        self.start, data_size = 8 + n, size - 8 - n
        self.entries, spans = {}, []
        for name, info in header.items():
            if name == "__metadata__":
                continue
            try:
                dtype, shape, (begin, end) = info["dtype"], info["shape"], info["data_offsets"]
            except (TypeError, KeyError, ValueError):
                fail(f"{path}: tensor {name}: malformed entry {info!r}")
            if dtype not in SAFETENSORS_DTYPES:
                fail(f"{path}: tensor {name} has dtype {dtype}; only F32, F16 and BF16 are supported")
            if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
                fail(f"{path}: tensor {name} has shape {shape!r}")
            if not (isinstance(begin, int) and isinstance(end, int) and 0 <= begin <= end <= data_size):
                fail(f"{path}: tensor {name}: data offsets [{begin}, {end}] are outside the data ({data_size} bytes)")
            nbytes = math.prod(shape) * SAFETENSORS_DTYPES[dtype][1]
            if end - begin != nbytes:
                fail(f"{path}: tensor {name}: shape {shape} in {dtype} is {nbytes} bytes but its offsets "
                     f"span {end - begin}")
            spans.append((begin, end, name))
            self.entries[name] = (dtype, shape, begin)
        spans.sort()
        for (_, end0, name0), (begin1, _, name1) in zip(spans, spans[1:]):
            if begin1 < end0:
                fail(f"{path}: tensors {name0} and {name1} overlap")

    def shape(self, name):
        return tuple(self.entries[name][1])

    def get(self, name):
        """The tensor as float32 (F16 and BF16 widen exactly)."""
        dtype, shape, begin = self.entries[name]
        raw = np.fromfile(self.path, dtype=SAFETENSORS_DTYPES[dtype][0], count=math.prod(shape),
                          offset=self.start + begin)
        arr = (raw.astype(np.uint32) << 16).view(np.float32) if dtype == "BF16" else raw.astype(np.float32)
        return torch.from_numpy(arr.reshape(shape))


class LazyModel:
    """What write_checkpoint needs of a model, args and a state dict, with the
    tensors produced one at a time as the file is written (a 7B export then
    holds one matrix in memory, not the model)."""

    def __init__(self, args, names, get):
        self.args, self._names, self._get = args, names, get

    def state_dict(self):
        return LazyStateDict(self._names, self._get)


class LazyStateDict(collections.abc.Mapping):
    def __init__(self, names, get):
        self._names, self._get = names, get

    def __getitem__(self, name):
        if name not in self._names:
            raise KeyError(name)
        return self._get(name)

    def __iter__(self):
        return iter(self._names)

    def __len__(self):
        return len(self._names)


def our_shapes(args):
    """{model.py tensor name: shape} for every tensor a model with these args has."""
    shapes = {"tok_embeddings.weight": (args.vocab_size, args.dim), "norm.weight": (args.dim,)}
    if not args.shared_classifier:
        shapes["output.weight"] = (args.vocab_size, args.dim)
    for i in range(args.n_layers):
        shapes[f"layers.{i}.attention_norm.weight"] = shapes[f"layers.{i}.ffn_norm.weight"] = (args.dim,)
        shapes.update({f"layers.{i}.{name}": shape for name, shape in M.layer_tensors(args)})
    return shapes


# ----------------------------------------------------------------------------
# Hugging Face Llama directories: config.json and safetensors (or pytorch_model*.bin)

HF_NAMES = {  # ours -> Hugging Face's, per layer
    "attention_norm.weight": "input_layernorm.weight", "ffn_norm.weight": "post_attention_layernorm.weight",
    "attention.wq.weight": "self_attn.q_proj.weight", "attention.wk.weight": "self_attn.k_proj.weight",
    "attention.wv.weight": "self_attn.v_proj.weight", "attention.wo.weight": "self_attn.o_proj.weight",
    "feed_forward.w1.weight": "mlp.gate_proj.weight", "feed_forward.w2.weight": "mlp.down_proj.weight",
    "feed_forward.w3.weight": "mlp.up_proj.weight",
}


def hf_name(name):
    if name.startswith("layers."):
        _, i, rest = name.split(".", 2)
        return f"model.layers.{i}.{HF_NAMES[rest]}"
    return {"tok_embeddings.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight",
            "output.weight": "lm_head.weight"}[name]


def unpermute(w, n_heads):
    """Hugging Face's q/k rows, ordered per head as [all first halves, all second
    halves] for its rotate-half RoPE, back to Meta's interleaved pairs (x0, x1),
    (x2, x3), ... that run.cpp rotates."""
    rows, cols = w.shape
    return w.reshape(n_heads, 2, rows // n_heads // 2, cols).transpose(1, 2).reshape(rows, cols)


def hf_args(folder):
    path = os.path.join(folder, "config.json")
    if not os.path.isfile(path):
        fail(f"{folder}: no config.json (not a Hugging Face model directory)")
    try:
        cfg = json.load(open(path))
    except ValueError as e:
        fail(f"{path}: not JSON ({e})")
    arch = cfg.get("architectures", ["LlamaForCausalLM"])
    if cfg.get("model_type", "llama") != "llama" or arch != ["LlamaForCausalLM"]:
        fail(f"{path}: model_type {cfg.get('model_type')!r}, architectures {arch}: only Llama "
             "(LlamaForCausalLM) is supported")
    for field, supported in (("rope_scaling", None), ("attention_bias", False), ("mlp_bias", False),
                             ("hidden_act", "silu")):
        if cfg.get(field, supported) != supported:
            fail(f"{path}: {field} = {cfg[field]!r} is not supported (only {supported!r})")
    try:
        heads = cfg["num_attention_heads"]
        args = M.ModelArgs(dim=cfg["hidden_size"], hidden_dim=cfg["intermediate_size"],
                           n_layers=cfg["num_hidden_layers"], n_heads=heads,
                           n_kv_heads=cfg.get("num_key_value_heads") or heads, vocab_size=cfg["vocab_size"],
                           max_seq_len=cfg["max_position_embeddings"], norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
                           rope_theta=float(cfg.get("rope_theta", 10000.0)),
                           shared_classifier=bool(cfg.get("tie_word_embeddings", False)))
    except KeyError as e:
        fail(f"{path}: no {e.args[0]}")
    check_args(args, path)
    return args


def hf_tensors(folder):
    """{Hugging Face name: a function returning it as float32}, from whichever
    weight files the directory has."""
    files = sorted(glob.glob(os.path.join(folder, "*.safetensors")))
    if files:
        index = os.path.join(folder, "model.safetensors.index.json")
        if os.path.isfile(index):
            files = sorted({os.path.join(folder, f) for f in json.load(open(index))["weight_map"].values()})
        found = {}
        for f in files:
            if not os.path.isfile(f):
                fail(f"{index}: names {f}, which is missing")
            st = SafeTensors(f)
            for name in st.entries:
                found[name] = (st, name)
        return {name: (lambda st=st, n=n: st.get(n)) for name, (st, n) in found.items()}, \
            {name: st.shape(n) for name, (st, n) in found.items()}
    files = sorted(glob.glob(os.path.join(folder, "pytorch_model*.bin")))
    if not files:
        fail(f"{folder}: no *.safetensors or pytorch_model*.bin weights")
    sd = {}
    for f in files:
        sd.update(load_torch_file(f))
    return {k: (lambda t=t: t.float()) for k, t in sd.items()}, {k: tuple(t.shape) for k, t in sd.items()}


def load_hf(folder):
    args = hf_args(folder)
    getters, shapes = hf_tensors(folder)
    ours = our_shapes(args)
    wanted = {hf_name(n): n for n in ours}
    ignored = [k for k in shapes if k not in wanted and not k.endswith("rotary_emb.inv_freq")]
    if args.shared_classifier and "lm_head.weight" in ignored:
        ignored.remove("lm_head.weight")
    if ignored:
        fail(f"{folder}: tensor {ignored[0]} is not part of a Llama model we run"
             + (f" (and {len(ignored) - 1} more)" if len(ignored) > 1 else ""))
    for hf, name in wanted.items():
        if hf not in shapes:
            fail(f"{folder}: tensor {hf} is missing")
        if shapes[hf] != ours[name]:
            fail(f"{folder}: tensor {hf} has shape {shapes[hf]}, config.json makes it {ours[name]}")

    def get(name):
        t = getters[hf_name(name)]()
        if name.endswith("attention.wq.weight"):
            t = unpermute(t, args.n_heads)
        elif name.endswith("attention.wk.weight"):
            t = unpermute(t, args.n_kv_heads)
        return t

    progress(f"{folder}: {args.n_layers} layers, dim {args.dim}, {args.n_heads} heads ({args.n_kv_heads} kv), "
             f"vocab {args.vocab_size}, rope_theta {args.rope_theta}, norm_eps {args.norm_eps}")
    return LazyModel(args, set(ours), get)
# ----------------------------------------------------------------------------
# Meta's Llama 2 directories: params.json and consolidated.NN.pth, one shard per
# model-parallel rank. Meta's names are model.py's, and its q/k rows are
# already in interleaved-pair order.


def shard_axis(name):
    """The axis Meta split a tensor along across shards: rows for the column-parallel
    matrices, columns for the row-parallel ones and the embedding; norms are copies."""
    if name.endswith("norm.weight"):
        return None
    if name == "tok_embeddings.weight" or name.endswith(("attention.wo.weight", "feed_forward.w2.weight")):
        return 1
    return 0


def load_meta(folder, seq_len):
    params_path = os.path.join(folder, "params.json")
    if not os.path.isfile(params_path):
        fail(f"{folder}: no params.json (not a Meta Llama directory)")
    shards = sorted(glob.glob(os.path.join(folder, "consolidated.*.pth")))
    if not shards:
        fail(f"{folder}: no consolidated.*.pth shards")
    if not seq_len:
        fail("--meta needs --seq-len: params.json does not say the context length (Llama 2: 4096)")
    try:
        p = json.load(open(params_path))
        parts = []
        for f in shards:
            progress(f"reading {f}")
            parts.append(load_torch_file(f))
        n_heads = p["n_heads"]
        hidden = sum(part["layers.0.feed_forward.w1.weight"].shape[0] for part in parts)
        args = M.ModelArgs(dim=p["dim"], hidden_dim=hidden, n_layers=p["n_layers"], n_heads=n_heads,
                           n_kv_heads=p.get("n_kv_heads") or n_heads,
                           vocab_size=parts[0]["tok_embeddings.weight"].shape[0], max_seq_len=seq_len,
                           norm_eps=float(p.get("norm_eps", 1e-5)), rope_theta=float(p.get("rope_theta", 10000.0)),
                           shared_classifier=False)
    except (KeyError, ValueError) as e:
        fail(f"{folder}: missing or bad entry: {e}")
    check_args(args, params_path)
    ours = our_shapes(args)
    for name, shape in ours.items():
        if any(name not in part for part in parts):
            fail(f"{folder}: tensor {name} is missing from a shard")
        shapes = [tuple(part[name].shape) for part in parts]
        axis = shard_axis(name)
        got = shapes[0] if axis is None or len(parts) == 1 else \
            tuple(sum(s[axis] for s in shapes) if a == axis else shapes[0][a] for a in range(len(shapes[0])))
        if got != shape:
            fail(f"{folder}: tensor {name} has shape {got} across {len(parts)} shard(s), params.json makes it {shape}")

    def get(name):
        axis = shard_axis(name)
        if axis is None or len(parts) == 1:
            return parts[0][name].float()
        return torch.cat([part[name] for part in parts], dim=axis).float()

    return LazyModel(args, set(ours), get)


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


def write_tokenizer_bin(path, pieces, scores):
    """tokenizer.bin: the longest piece's length (int32), then per id its score
    (float32), length (int32) and bytes; written atomically."""
    chunks = [struct.pack("<i", max(len(p) for p in pieces))]
    chunks += [struct.pack("<fi", s, len(p)) + p for p, s in zip(pieces, scores)]
    write_atomically(path, chunks)


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


def export_tokenizer(model_path, out_path):
    if model_path.endswith(".json"):
        pieces, bos, eos = read_tokenizer_json(model_path)
    else:
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
    write_tokenizer_bin(out_path, [p for p, _ in tokens], [s for _, s in tokens])
    progress(f"wrote {out_path}: {len(tokens)} tokens, max_token_length {max(len(p) for p, _ in tokens)}")


# ----------------------------------------------------------------------------


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", nargs="?", help="output checkpoint (.bin)")
    ap.add_argument("--version", type=int, default=0,
                    help="0 (llama2.c legacy fp32, default), 1 (fp32), 2 (int8 groups) or 3 (int4 groups); "
                         "2 and 3 run with runq")
    ap.add_argument("--group-size", type=int,
                    help="versions 2 and 3: values per scale. Version 2: default 64, backs off to a divisor "
                         "of dim and hidden_dim; version 3: default 32, at most 256, a row's last group may be shorter")
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", help="llama2.c training checkpoint (.pt)")
    src.add_argument("--bin", help="one of our .bin checkpoints, any version")
    src.add_argument("--hf", metavar="DIR", help="Hugging Face Llama directory (config.json + safetensors)")
    src.add_argument("--meta", metavar="DIR", help="Meta Llama directory (params.json + consolidated.*.pth)")
    src.add_argument("--tokenizer", help="sentencepiece tokenizer.model, or a Hugging Face tokenizer.json")
    ap.add_argument("--seq-len", type=int, help="--meta: the context length (Llama 2: 4096)")
    ap.add_argument("--awq", metavar="CALIB.txt",
                    help="versions 2 and 3: activation-aware scaling, calibrated on this text")
    ap.add_argument("--awq-tokenizer", default="tokenizer.bin", help="--awq: the model's tokenizer.bin")
    ap.add_argument("--awq-tokens", type=int, default=4096, help="--awq: calibration tokens (default 4096)")
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
    elif a.hf:
        model = load_hf(a.hf)
    elif a.meta:
        model = load_meta(a.meta, a.seq_len)
    else:
        if not os.path.isfile(a.bin):
            fail(f"{a.bin}: no such file")
        try:
            model = M.load_checkpoint(a.bin)
        except (ValueError, RuntimeError, struct.error) as e:
            fail(f"{a.bin}: not a valid checkpoint ({e})")
    if a.awq:
        if a.version not in (2, 3):
            fail("--awq scales weights for quantization: use it with --version 2 or 3")
        if not isinstance(model, M.Transformer):  # a lazy model: AWQ needs every weight in memory
            lazy, model = model, M.Transformer(model.args)
            model.load_state_dict(dict(lazy.state_dict().items()))
        gs = group_size_for(model.args, a.version, a.group_size)
        windows = calibration_windows(a.awq, a.awq_tokenizer, model.args.max_seq_len, model.args.vocab_size,
                                      a.awq_tokens)
        progress(f"AWQ: calibrating on {sum(len(w) - 1 for w in windows)} tokens of {a.awq}")
        apply_awq(model, windows, gs, 7 if a.version == 3 else 127)
        clip_awq(model, windows, gs, 7 if a.version == 3 else 127)
    write_checkpoint(model, a.out, a.version, a.group_size)


if __name__ == "__main__":
    main()
