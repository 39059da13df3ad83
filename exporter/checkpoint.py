"""llama2.c's training checkpoints (train.py's ckpt.pt), and pickled torch
files in general, read without running the code a pickle can hold."""

import collections
import io
import os
import pickle
import zipfile

import torch

import model as M
from exporter import check_args, fail


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
