"""export.py --hf and --meta: fake Hugging Face and Meta directories with random
weights, exported and run. The reference is a forward pass written here in the
Hugging Face convention (rotate-half RoPE on the q/k weights as Hugging Face
stores them), independent of model.py: if export.py's un-permutation were
wrong, run's logits could not match it."""

import json
import math
import os
import struct
import subprocess
import sys

import pytest
import torch

from conftest import (LLAMA3, M, ROOT, U, package, quantization_bound, random_model, read_dump, rounding_depth,
                      run, varied_strings, vocab_of_size, write_tokenizer)

DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


def hf_permute(w, n_heads):
    """What Hugging Face's conversion script does to Meta's q/k rows: per head,
    interleaved pairs (x0, x1), (x2, x3)... become [x0, x2, ..., x1, x3, ...]."""
    rows, cols = w.shape
    return w.reshape(n_heads, rows // n_heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


def hf_state_dict(m):
    """model.py weights under Hugging Face's names and q/k layout."""
    a, sd = m.args, m.state_dict()
    out = {"model.embed_tokens.weight": sd["tok_embeddings.weight"], "model.norm.weight": sd["norm.weight"]}
    if not a.shared_classifier:
        out["lm_head.weight"] = sd["output.weight"]
    names = {"attention_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
             "attention.wq": "self_attn.q_proj", "attention.wk": "self_attn.k_proj", "attention.wv": "self_attn.v_proj",
             "attention.wo": "self_attn.o_proj", "feed_forward.w1": "mlp.gate_proj",
             "feed_forward.w2": "mlp.down_proj", "feed_forward.w3": "mlp.up_proj"}
    for i in range(a.n_layers):
        for ours, theirs in names.items():
            t = sd[f"layers.{i}.{ours}.weight"]
            if ours == "attention.wq":
                t = hf_permute(t, a.n_heads)
            elif ours == "attention.wk":
                t = hf_permute(t, a.n_kv_heads)
            out[f"model.layers.{i}.{theirs}.weight"] = t
    return out


def write_safetensors(path, tensors, dtype):
    """The format by hand: header length, JSON header, data (names sorted)."""
    header, blobs, offset = {"__metadata__": {"format": "pt"}}, [], 0
    for name in sorted(tensors):
        t = tensors[name].to(DTYPES[dtype]).contiguous()
        raw = t.view(torch.int16).numpy().tobytes() if dtype == "BF16" else t.numpy().tobytes()
        header[name] = {"dtype": dtype, "shape": list(t.shape), "data_offsets": [offset, offset + len(raw)]}
        blobs.append(raw)
        offset += len(raw)
    head = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(head)) + head + b"".join(blobs))


def make_hf_dir(folder, m, dtype, shards=1, **config_extra):
    folder.mkdir(parents=True, exist_ok=True)
    a = m.args
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": a.dim,
              "intermediate_size": a.hidden_dim, "num_hidden_layers": a.n_layers, "num_attention_heads": a.n_heads,
              "num_key_value_heads": a.n_kv_heads, "vocab_size": a.vocab_size,
              "max_position_embeddings": a.max_seq_len, "rms_norm_eps": a.norm_eps, "rope_theta": a.rope_theta,
              "tie_word_embeddings": a.shared_classifier, "hidden_act": "silu", "rope_scaling": None,
              "torch_dtype": "float32", **config_extra}
    if a.rope_scaling:
        factor, low, high, original = a.rope_scaling
        config["rope_scaling"] = {"rope_type": "llama3", "factor": factor, "low_freq_factor": low,
                                  "high_freq_factor": high, "original_max_position_embeddings": original}
    (folder / "config.json").write_text(json.dumps(config))
    sd = hf_state_dict(m)
    if shards == 1:
        write_safetensors(folder / "model.safetensors", sd, dtype)
    else:
        names = sorted(sd)
        weight_map = {}
        for s in range(shards):
            file = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
            part = {n: sd[n] for n in names[s::shards]}
            write_safetensors(folder / file, part, dtype)
            weight_map.update({n: file for n in part})
        (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    # what the files hold, exactly (after rounding to dtype), for the reference
    return {k: v.to(DTYPES[dtype]).double() for k, v in sd.items()}


def hf_inv_freq(a, hs):
    """RoPE's inverse frequencies as Hugging Face computes them (in float64 here),
    with its rope_type "llama3" rule: wavelengths beyond the original context /
    low_freq_factor divided by factor, those between original / high_freq_factor
    and that smoothed between the two."""
    inv = 1.0 / a.rope_theta ** (torch.arange(0, hs, 2, dtype=torch.float64) / hs)
    if a.rope_scaling is None:
        return inv
    factor, low, high, old = a.rope_scaling
    wavelen = 2 * math.pi / inv
    llama = torch.where(wavelen > old / low, inv / factor, inv)
    smooth = (old / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * llama / factor + smooth * llama
    medium = ~(wavelen < old / high) & ~(wavelen > old / low)
    return torch.where(medium, smoothed, llama)


def hf_forward(w, a, tokens):
    """Logits (T, vocab) and the final normalized states (T, dim) in float64,
    computed the Hugging Face way: rotate-half RoPE on the weights as stored."""
    T, hs = len(tokens), a.dim // a.n_heads
    inv = hf_inv_freq(a, hs)
    ang = torch.arange(T, dtype=torch.float64)[:, None] * inv[None]
    cos, sin = torch.cat([ang.cos()] * 2, -1)[:, None], torch.cat([ang.sin()] * 2, -1)[:, None]
    rotate_half = lambda t: torch.cat([-t[..., hs // 2:], t[..., :hs // 2]], -1)
    rms = lambda v, g: v / torch.sqrt((v * v).mean(-1, keepdim=True) + a.norm_eps) * g
    x = w["model.embed_tokens.weight"][tokens]
    mask = torch.full((T, T), float("-inf"), dtype=torch.float64).triu(1)
    for i in range(a.n_layers):
        p = lambda n: w[f"model.layers.{i}.{n}.weight"]
        h = rms(x, p("input_layernorm"))
        q = (h @ p("self_attn.q_proj").T).view(T, a.n_heads, hs)
        k = (h @ p("self_attn.k_proj").T).view(T, a.n_kv_heads, hs)
        v = (h @ p("self_attn.v_proj").T).view(T, a.n_kv_heads, hs)
        q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
        k = k.repeat_interleave(a.n_heads // a.n_kv_heads, dim=1)
        v = v.repeat_interleave(a.n_heads // a.n_kv_heads, dim=1)
        att = torch.softmax(torch.einsum("thd,shd->hts", q, k) / math.sqrt(hs) + mask, dim=-1)
        x = x + torch.einsum("hts,shd->thd", att, v).reshape(T, a.dim) @ p("self_attn.o_proj").T
        h = rms(x, p("post_attention_layernorm"))
        g = h @ p("mlp.gate_proj").T
        x = x + (g * torch.sigmoid(g) * (h @ p("mlp.up_proj").T)) @ p("mlp.down_proj").T
    h = rms(x, w["model.norm.weight"])
    out = w["model.embed_tokens.weight"] if a.shared_classifier else w["lm_head.weight"]
    return h @ out.T, h.abs() @ out.abs().T


def export(*args, check=True):
    p = subprocess.run([sys.executable, str(ROOT / "export.py"), *map(str, args)], capture_output=True, timeout=600)
    if check and p.returncode != 0:
        raise AssertionError(p.stderr.decode())
    return p


CASES = {  # dtype, shards, model args
    "f32-gqa-untied": ("F32", 1, dict(dim=64, hidden_dim=96, n_layers=2, n_heads=8, n_kv_heads=2, vocab_size=300,
                                      max_seq_len=48, shared_classifier=False)),
    "f16-sharded-tied-theta1e6": ("F16", 3, dict(dim=48, hidden_dim=80, n_layers=2, n_heads=4, n_kv_heads=4,
                                                 vocab_size=290, max_seq_len=48, rope_theta=1e6, norm_eps=1e-6)),
    "bf16-mqa": ("BF16", 2, dict(dim=32, hidden_dim=64, n_layers=3, n_heads=4, n_kv_heads=1, vocab_size=270,
                                 max_seq_len=48, shared_classifier=False)),
    # Llama 3.x: rope_scaling llama3 (original context 32, so positions 32-47 lie
    # past it; of eight frequencies one is kept, one blended, six divided), GQA, tied
    "f32-llama3-rope-gqa-tied": ("F32", 1, dict(dim=64, hidden_dim=96, n_layers=2, n_heads=4, n_kv_heads=2,
                                                vocab_size=300, max_seq_len=48, rope_theta=10000.0,
                                                rope_scaling=(8.0, 1.0, 4.0, 32))),
}


@pytest.mark.parametrize("case", CASES)
def test_hf_export_matches_hf_forward(pair, tmp_path, case):
    dtype, shards, kw = CASES[case]
    m = random_model(sum(map(ord, case)), **kw)
    a = m.args
    weights = make_hf_dir(tmp_path / "hf", m, dtype, shards)
    tok = write_tokenizer(tmp_path / "tok.bin", vocab_of_size(a.vocab_size))
    export(tmp_path / "fp32.bin", "--version", 1, "--hf", tmp_path / "hf")
    export(tmp_path / "q8.bin", "--version", 2, "--group-size", 16, "--hf", tmp_path / "hf")
    run_bin, runq_bin = pair
    T = a.max_seq_len
    for binary, ckpt in ((run_bin, "fp32.bin"), (runq_bin, "q8.bin")):
        dump = tmp_path / f"{ckpt}.logits"
        run(binary, tmp_path / ckpt, "-z", tok, "-t", "0", "-n", T, "-k", "f32", "-i", "ab cd",
            env={"RUN_DUMP_LOGITS": str(dump)})
        pos, tokens, logits, chosen = read_dump(dump, a.vocab_size)
        assert len(pos) >= 10, "generation stopped too early to test"
        ref, magnitude = hf_forward(weights, a, tokens)
        bound = rounding_depth(a, len(tokens)) * U * magnitude
        if binary == runq_bin:  # plus int8's own error, derived from the exported fp32 weights
            bound = bound + quantization_bound(M.load_checkpoint(str(tmp_path / "fp32.bin")), 16, tokens)
        worst = ((logits - ref).abs() / bound).max().item()
        assert worst <= 1.0, f"{ckpt}: logits off by {worst:.2f} x the bound"
        if binary == run_bin:  # greedy: every token run generated is the reference's argmax there
            n_prompt = len(run(binary, tmp_path / ckpt, "-z", tok, "-m", "tokenize", "-i", "ab cd").stdout.split())
            greedy = ref.argmax(-1).tolist()
            generated = [(i, c) for i, c in enumerate(chosen) if i >= n_prompt - 1 and c != -1]
            assert len(generated) >= 5 and all(greedy[i] == c for i, c in generated), "greedy text differs"


def test_rope_scaling_needs_a_versioned_header(tmp_path):
    """Version 0's 28-byte header has no room for Llama 3.1's RoPE scaling: refused, naming it."""
    m = random_model(4, **CASES["f32-llama3-rope-gqa-tied"][2])
    make_hf_dir(tmp_path / "hf", m, "F32")
    p = export(tmp_path / "v0.bin", "--version", 0, "--hf", tmp_path / "hf", check=False)
    err = p.stderr.decode()
    last = err.splitlines()[-1]  # after the progress lines
    assert p.returncode == 1 and last.startswith("export.py: error:") and "rope_scaling" in last, err
    assert not (tmp_path / "v0.bin").exists()


def test_meta_shards_concatenate(tmp_path, monkeypatch):
    """Two model-parallel shards export to the same file as one."""
    m = random_model(9, dim=32, hidden_dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=270, max_seq_len=32,
                     shared_classifier=False)
    sd = m.state_dict()
    params = {"dim": 32, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "vocab_size": -1, "norm_eps": 1e-5,
              "multiple_of": 32}
    from exporter import writers as E
    from exporter.meta import shard_axis
    for n_shards in (1, 2):
        d = tmp_path / f"meta{n_shards}"
        d.mkdir()
        (d / "params.json").write_text(json.dumps(params))
        for s in range(n_shards):
            part = {}
            for name, t in sd.items():
                axis = shard_axis(name)
                part[name] = t.clone() if axis is None else t.chunk(n_shards, dim=axis)[s].clone()
            torch.save(part, d / f"consolidated.{s:02d}.pth")
        export(tmp_path / f"out{n_shards}.bin", "--meta", d, "--seq-len", 32)
    monkeypatch.setattr(E, "progress", lambda *_: None)
    E.write_checkpoint(m, str(tmp_path / "direct.bin"), 0)
    assert (tmp_path / "out1.bin").read_bytes() == (tmp_path / "out2.bin").read_bytes() \
        == (tmp_path / "direct.bin").read_bytes()
    p = export(tmp_path / "x.bin", "--meta", tmp_path / "meta2", check=False)
    assert p.returncode == 1 and b"--seq-len" in p.stderr
    (tmp_path / "meta1" / "params.json").write_text(json.dumps(dict(params, use_scaled_rope=True)))
    p = export(tmp_path / "x.bin", "--meta", tmp_path / "meta1", "--seq-len", 32, check=False)
    assert p.returncode == 1 and p.stderr.count(b"\n") == 1 and b"use_scaled_rope" in p.stderr
    assert not (tmp_path / "x.bin").exists()


def corrupt(tmp_path, mutate):
    """A valid one-file Hugging Face directory whose safetensors header `mutate` edits."""
    m = random_model(2, dim=16, hidden_dim=32, n_layers=1, n_heads=2, n_kv_heads=2, vocab_size=20, max_seq_len=8)
    make_hf_dir(tmp_path / "hf", m, "F32")
    f = tmp_path / "hf" / "model.safetensors"
    raw = f.read_bytes()
    n = struct.unpack_from("<Q", raw)[0]
    header = json.loads(raw[8:8 + n])
    data = raw[8 + n:]
    out = mutate(header, data)
    if isinstance(out, bytes):
        f.write_bytes(out)
    else:
        head = json.dumps(header).encode()
        f.write_bytes(struct.pack("<Q", len(head)) + head + data)
    return tmp_path / "hf"


def _set(header, key, value):
    header["model.norm.weight"][key] = value


CORRUPT = {
    "length-past-end": (lambda h, d: struct.pack("<Q", 10**9) + b"{}", "past the end"),
    "not-json": (lambda h, d: struct.pack("<Q", 4) + b"{{{{" + d, "not JSON"),
    "offsets-outside": (lambda h, d: _set(h, "data_offsets", [len(d) - 4, len(d) + 60]), "outside the data"),
    "overlap": (lambda h, d: _set(h, "data_offsets", [0, 64]), "overlap"),  # 16 floats over the embedding
    "shape-size-mismatch": (lambda h, d: _set(h, "shape", [17]), "offsets span"),
    "unknown-dtype": (lambda h, d: _set(h, "dtype", "F64"), "F64"),
}


@pytest.mark.parametrize("name", CORRUPT)
def test_corrupt_safetensors(tmp_path, name):
    mutate, word = CORRUPT[name]
    folder = corrupt(tmp_path, mutate)
    p = export(tmp_path / "out.bin", "--hf", folder, check=False)
    err = p.stderr.decode()
    assert p.returncode == 1 and word in err and err.count("\n") == 1, err
    assert not (tmp_path / "out.bin").exists()


@pytest.mark.parametrize("extra, word", [({"rope_scaling": {"type": "linear", "factor": 2.0}}, "'linear'"),
                                         ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "'yarn'"),
                                         ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 4.0,
                                                            "high_freq_factor": 1.0,
                                                            "original_max_position_embeddings": 32}}, "low < high"),
                                         ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "low_freq_factor"),
                                         ({"attention_bias": True}, "attention_bias"),
                                         ({"architectures": ["MistralForCausalLM"]}, "Mistral"),
                                         ({"hidden_act": "gelu"}, "hidden_act")])
def test_hf_refuses_what_we_do_not_run(tmp_path, extra, word):
    m = random_model(2, dim=16, hidden_dim=32, n_layers=1, n_heads=2, n_kv_heads=2, vocab_size=20, max_seq_len=8)
    make_hf_dir(tmp_path / "hf", m, "F32", **extra)
    p = export(tmp_path / "out.bin", "--hf", tmp_path / "hf", check=False)
    err = p.stderr.decode()
    assert p.returncode == 1 and word in err and err.count("\n") == 1, err


def test_hf_refuses_bias_tensors(tmp_path):
    m = random_model(2, dim=16, hidden_dim=32, n_layers=1, n_heads=2, n_kv_heads=2, vocab_size=20, max_seq_len=8)
    sd = hf_state_dict(m)
    sd["model.layers.0.self_attn.q_proj.bias"] = torch.zeros(16)
    make_hf_dir(tmp_path / "hf", m, "F32")
    write_safetensors(tmp_path / "hf" / "model.safetensors", sd, "F32")
    p = export(tmp_path / "out.bin", "--hf", tmp_path / "hf", check=False)
    assert p.returncode == 1 and b"q_proj.bias" in p.stderr, p.stderr


def tokenizer_json_from_model(path, out):
    """tokenizer.json as Hugging Face's converter writes it for a sentencepiece
    BPE: the pieces as the vocabulary, and a merge (left, right) for every way a
    piece splits into two pieces, ordered by the merged piece's score."""
    from exporter.tokenizers import read_sentencepiece
    pieces, _, _ = read_sentencepiece(str(path))
    vocab = {p.decode(): i for i, (p, _, _) in enumerate(pieces)}
    score = [s for _, s, _ in pieces]
    merges = []
    for piece, i in vocab.items():
        if i < 259:
            continue
        for k in range(1, len(piece)):
            if piece[:k] in vocab and piece[k:] in vocab:
                merges.append((-score[i], vocab[piece[:k]], vocab[piece[k:]], piece[:k], piece[k:]))
    merges.sort()
    tj = {"version": "1.0", "added_tokens": [{"id": i, "content": t, "special": True}
                                             for i, t in enumerate(["<unk>", "<s>", "</s>"])],
          "model": {"type": "BPE", "byte_fallback": True, "unk_token": "<unk>", "vocab": vocab,
                    "merges": [f"{a} {b}" for *_, a, b in merges]}}
    out.write_text(json.dumps(tj, ensure_ascii=False))
    return out


def test_tokenizer_json_encodes_like_tokenizer_model(tmp_path):
    """The same ids as llama2.c's tokenizer.bin on a thousand varied strings."""
    from conftest import LLAMA_BIN, LLAMA_MODEL
    tj = tokenizer_json_from_model(LLAMA_MODEL, tmp_path / "tokenizer.json")
    export("--tokenizer", tj, "-o", tmp_path / "tok.bin")
    strings = b"".join(s.encode() + b"\0" for s in varied_strings(1000, seed=5))
    ids = [subprocess.run([str(ROOT / "build" / "tokenize_many"), str(tok), "32000"], input=strings,
                          capture_output=True, check=True).stdout for tok in (tmp_path / "tok.bin", LLAMA_BIN)]
    assert ids[0].count(b"\n") == 1000 and ids[0] == ids[1]


def test_tokenizer_json_neither_byte_fallback_nor_byte_level_refused(tmp_path):
    tj = {"model": {"type": "BPE", "byte_fallback": False, "vocab": {"a": 0}, "merges": []}}
    (tmp_path / "tokenizer.json").write_text(json.dumps(tj))
    p = export("--tokenizer", tmp_path / "tokenizer.json", "-o", tmp_path / "tok.bin", check=False)
    assert p.returncode == 1 and b"pre_tokenizer" in p.stderr and not (tmp_path / "tok.bin").exists()


def test_pytorch_model_bin_same_as_safetensors(tmp_path):
    """pytorch_model.bin (a pickled state dict) exports to the same bytes as safetensors."""
    m = random_model(6, dim=32, hidden_dim=48, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=40, max_seq_len=16)
    make_hf_dir(tmp_path / "st", m, "F32")
    make_hf_dir(tmp_path / "pt", m, "F32")
    os.remove(tmp_path / "pt" / "model.safetensors")
    torch.save(hf_state_dict(m), tmp_path / "pt" / "pytorch_model.bin")
    for d in ("st", "pt"):
        export(tmp_path / f"{d}.bin", "--version", 1, "--hf", tmp_path / d)
    assert (tmp_path / "st.bin").read_bytes() == (tmp_path / "pt.bin").read_bytes()


# ---------------------------------------------------------------------------
# Llama 3.2's shape end to end: a fake Hugging Face directory with its real
# tokenizer (from the npm package test_byte_level.py uses), rope_scaling llama3,
# grouped-query attention, tied embeddings and 128,256 ids; exported in fp32,
# int8 and int4 and run against hf_forward on the weights each file holds.

LLAMA32 = dict(dim=64, hidden_dim=96, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=128256, max_seq_len=48,
               rope_theta=500000.0, rope_scaling=(32.0, 1.0, 4.0, 40))  # past position 40: scaled; 8 frequencies:
#                                                                        one kept, one blended, six divided
LLAMA32_GROUP = 32


@pytest.fixture(scope="module")
def llama32(tmp_path_factory):
    d = tmp_path_factory.mktemp("llama32")
    m = random_model(32, **LLAMA32)
    make_hf_dir(d / "hf", m, "BF16", bos_token_id=128000, eos_token_id=[128001, 128008, 128009])
    tj_path, cfg_path = package(LLAMA3)
    tj = json.loads(tj_path.read_text(encoding="utf-8"))
    # as in Meta's release: the post-processor puts <|begin_of_text|> first
    tj["post_processor"] = {"type": "Sequence", "processors": [tj["post_processor"], {
        "type": "TemplateProcessing", "single": [{"SpecialToken": {"id": "<|begin_of_text|>", "type_id": 0}},
                                                 {"Sequence": {"id": "A", "type_id": 0}}]}]}
    (d / "hf" / "tokenizer.json").write_text(json.dumps(tj), encoding="utf-8")
    (d / "hf" / "tokenizer_config.json").write_bytes(cfg_path.read_bytes())
    export("--tokenizer", d / "hf" / "tokenizer.json", "-o", d / "tok.bin")
    files = {}
    for version in (1, 2, 3):
        files[version] = d / f"v{version}.bin"
        export(files[version], "--version", version, "--group-size", LLAMA32_GROUP, "--hf", d / "hf")
    return d / "tok.bin", files


@pytest.mark.parametrize("version", [1, 2, 3], ids=["fp32", "int8", "int4"])
def test_llama32_shaped_hf_directory(pair, llama32, tmp_path, version):
    tok, files = llama32
    binary = pair[0] if version == 1 else pair[1]
    prompt = "The capital of France is"
    ids = [int(t) for t in run(binary, files[version], "-z", tok, "-m", "tokenize", "-i", prompt).stdout.split()]
    assert ids[0] == 128000 and len(ids) == 6  # BOS from the post-processor, then the text's 5 tokens
    dump = tmp_path / "logits"
    a = M.load_checkpoint(str(files[version])).args
    run(binary, files[version], "-z", tok, "-t", "0", "-n", a.max_seq_len, "-k", "f32", "-i", prompt,
        env={"RUN_DUMP_LOGITS": str(dump)})
    pos, tokens, logits, chosen = read_dump(dump, a.vocab_size)
    assert len(pos) >= 10, "generation stopped too early to test"
    # the reference runs on the weights this file holds (bf16 for fp32, else dequantized)
    m = M.load_checkpoint(str(files[version]))
    ref, magnitude = hf_forward({k: v.double() for k, v in hf_state_dict(m).items()}, a, tokens)
    bound = rounding_depth(a, len(tokens)) * U * magnitude
    if version > 1:  # plus the int8 rounding of the activations
        bound = bound + quantization_bound(m, LLAMA32_GROUP, tokens, exact_weights=True)
    worst = ((logits - ref).abs() / bound).max().item()
    assert worst <= 1.0, f"logits off by {worst:.2f} x the bound"
    # greedy: each generated token is the reference's argmax wherever the bound decides it
    best = ref.argmax(-1)
    rivals = (ref + bound).scatter(1, best[:, None], float("-inf")).max(-1).values
    decided = ((ref - bound).gather(1, best[:, None])[:, 0] > rivals).tolist()
    generated = [(i, c) for i, c in enumerate(chosen) if i >= len(ids) - 1 and c != -1 and decided[i]]
    assert len(generated) >= 5 and all(best[i].item() == c for i, c in generated), \
        f"greedy differs ({len(generated)} positions decided)"
