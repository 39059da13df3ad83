"""export.py's parts: one module per format it reads (checkpoint, hf, meta,
tokenizers) or job it does (quantize, awq), and here what they share: the
one-line failure, progress messages, the shape rules and the lazy model every
importer returns."""

import collections.abc
import json
import math
import struct
import sys

import model as M


def fail(msg):
    sys.exit(f"export.py: error: {msg}")


def progress(msg):
    print(msg, file=sys.stderr, flush=True)


def load_json(path, what="JSON"):
    """The JSON document at path, or one line naming why it cannot be read."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except OSError as e:
        fail(f"cannot read {path}: {e.strerror}")
    except RecursionError:
        fail(f"{path}: not {what} (nested too deeply)")
    except ValueError as e:  # UnicodeDecodeError is one
        fail(f"{path}: not {what} ({e})")


def as_float32(v):
    """v rounded to float32, as a header stores it; None if it does not fit (beyond float32's range)."""
    try:
        return struct.unpack("<f", struct.pack("<f", v))[0]
    except (OverflowError, struct.error, TypeError):
        return None


# The engines' caps on the header's fields (run.cpp's config_problem): a file
# export.py writes is a file they accept.
CAPS = {"dim": 1 << 16, "hidden_dim": 1 << 18, "n_layers": 1 << 10, "n_heads": 1 << 10, "n_kv_heads": 1 << 10,
        "vocab_size": 1 << 21, "max_seq_len": 1 << 20}


def check_args(args, path):
    """The shape rules run.cpp enforces, checked before any tensor is built."""
    for name in ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "hidden_dim", "max_seq_len"):
        v = getattr(args, name)
        if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
            fail(f"{path}: model_args {name} = {v!r} (must be a positive integer)")
        if v > CAPS[name]:
            fail(f"{path}: model_args {name} = {v} is more than the engines take ({CAPS[name]})")
    for name in ("rope_theta", "norm_eps"):  # stored as float32, where 0 means the default
        v = getattr(args, name)
        f32 = as_float32(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None
        if f32 is None or not math.isfinite(f32) or f32 <= 0:
            fail(f"{path}: model_args {name} = {v!r} (must be a positive number within float32's range)")
    if args.dim % args.n_heads:
        fail(f"{path}: model_args dim {args.dim} is not divisible by n_heads {args.n_heads}")
    if args.n_heads % args.n_kv_heads:
        fail(f"{path}: model_args n_heads {args.n_heads} is not divisible by n_kv_heads {args.n_kv_heads}")
    if args.head_size % 2:
        fail(f"{path}: model_args head size {args.head_size} is odd (RoPE rotates pairs)")


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
