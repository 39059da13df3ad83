"""Hugging Face Llama directories: config.json and safetensors (or
pytorch_model*.bin)."""

import glob
import json
import math
import os
import struct

import numpy as np
import torch

import model as M
from exporter import LazyModel, check_args, fail, load_json, our_shapes, progress
from exporter.checkpoint import load_torch_file

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


def rope_scaling(cfg, path):
    """config.json's rope_scaling as model.py's (factor, low_freq_factor,
    high_freq_factor, original_max_position_embeddings): None, or Llama 3.1's
    rope_type "llama3" (older configs call the key "type"); any other type is refused."""
    if cfg is None:
        return None
    kind = cfg.get("rope_type", cfg.get("type")) if isinstance(cfg, dict) else cfg
    if kind != "llama3":
        fail(f"{path}: rope_scaling type {kind!r} is not supported (only 'llama3', Llama 3.1's)")
    try:
        factor, low, high = (float(cfg[k]) for k in ("factor", "low_freq_factor", "high_freq_factor"))
        original = cfg["original_max_position_embeddings"]
    except (KeyError, TypeError, ValueError) as e:
        fail(f"{path}: rope_scaling: missing or bad {e}")
    if not (math.isfinite(factor) and factor >= 1 and 0 < low < high and math.isfinite(high)
            and isinstance(original, int) and original > 0):
        fail(f"{path}: rope_scaling factor {factor}, low_freq_factor {low}, high_freq_factor {high}, "
             f"original_max_position_embeddings {original!r}: needs factor >= 1, 0 < low < high and a positive context")
    return (factor, low, high, original)


def hf_args(folder):
    path = os.path.join(folder, "config.json")
    if not os.path.isfile(path):
        fail(f"{folder}: no config.json (not a Hugging Face model directory)")
    cfg = load_json(path)
    if not isinstance(cfg, dict):
        fail(f"{path}: not a JSON object")
    arch = cfg.get("architectures", ["LlamaForCausalLM"])
    if cfg.get("model_type", "llama") != "llama" or arch != ["LlamaForCausalLM"]:
        fail(f"{path}: model_type {cfg.get('model_type')!r}, architectures {arch}: only Llama "
             "(LlamaForCausalLM) is supported")
    for field, supported in (("attention_bias", False), ("mlp_bias", False), ("hidden_act", "silu")):
        if cfg.get(field, supported) != supported:
            fail(f"{path}: {field} = {cfg[field]!r} is not supported (only {supported!r})")
    scaling = rope_scaling(cfg.get("rope_scaling"), path)
    try:
        heads = cfg["num_attention_heads"]
        args = M.ModelArgs(dim=cfg["hidden_size"], hidden_dim=cfg["intermediate_size"],
                           n_layers=cfg["num_hidden_layers"], n_heads=heads,
                           n_kv_heads=cfg.get("num_key_value_heads") or heads, vocab_size=cfg["vocab_size"],
                           max_seq_len=cfg["max_position_embeddings"], norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
                           rope_theta=float(cfg.get("rope_theta", 10000.0)), rope_scaling=scaling,
                           shared_classifier=bool(cfg.get("tie_word_embeddings", False)))
    except KeyError as e:
        fail(f"{path}: no {e.args[0]}")
    except (TypeError, ValueError) as e:  # float("x")
        fail(f"{path}: rms_norm_eps or rope_theta is not a number ({e})")
    check_args(args, path)
    return args


def hf_tensors(folder):
    """{Hugging Face name: a function returning it as float32}, from whichever
    weight files the directory has."""
    files = sorted(glob.glob(os.path.join(folder, "*.safetensors")))
    if files:
        index = os.path.join(folder, "model.safetensors.index.json")
        if os.path.isfile(index):
            weight_map = load_json(index).get("weight_map") if isinstance(load_json(index), dict) else None
            if not isinstance(weight_map, dict) or not all(isinstance(f, str) for f in weight_map.values()):
                fail(f"{index}: no weight_map of tensor names to file names")
            files = sorted({os.path.join(folder, f) for f in weight_map.values()})
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
             f"vocab {args.vocab_size}, rope_theta {args.rope_theta}, norm_eps {args.norm_eps}"
             + (f", rope_scaling llama3 {args.rope_scaling}" if args.rope_scaling else ""))
    return LazyModel(args, set(ours), get)
