"""Meta's Llama 2 directories (Llama 3.1+ with use_scaled_rope are refused): params.json and consolidated.NN.pth, one shard
per model-parallel rank. Meta's names are model.py's, and its q/k rows are
already in interleaved-pair order."""

import glob
import os

import torch

import model as M
from exporter import LazyModel, check_args, fail, load_json, our_shapes, progress
from exporter.checkpoint import load_torch_file


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
        p = load_json(params_path)
        if not isinstance(p, dict):
            fail(f"{params_path}: not a JSON object")
        if p.get("use_scaled_rope"):  # Meta's scaling constants live in its code, not in params.json
            fail(f"{params_path}: use_scaled_rope (Llama 3.1 and later) is not supported with --meta; "
                 "export the Hugging Face release with --hf, whose config.json states its rope_scaling")
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
