"""Hardening: whatever bytes, flags or text the engines are given, they do the
right thing or print one line on stderr naming the problem and exit with
status 1; never a crash, a hang, a huge allocation or a silently wrong answer.
Every bad input is generated here from tiny models. Under `make test` each
case runs against every build, the AddressSanitizer + UBSan one included
(which turns any out-of-bounds read into a failure)."""

import json
import os
import re
import struct
import subprocess
import time

import types

import pytest
import torch

from exporter import writers as E
from conftest import (BINARIES, LLAMA3_SPECIALS, LLAMA_MODEL, M, QBINARIES, ROOT, STORIES, TOK512, assert_threads,
                      binary_id, byte_level_json, existing, expect_error, random_model, run, stories,
                      write_tokenizer)

STORIES_BYTES = STORIES.read_bytes()
ARGS = dict(dim=16, n_layers=2, n_heads=2, n_kv_heads=1, hidden_dim=32, vocab_size=8, max_seq_len=32)
PIECES = ["<unk>", "<s>", "</s>", " ", "a", "b", " a", "ab"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny random model in versions 0 to 3 (unshared classifier) and its
    tokenizer. Group size 8, and 6 for version 3 (so its rows end in short groups)."""
    d = tmp_path_factory.mktemp("tiny")
    m = random_model(3, **ARGS, shared_classifier=False)
    files = {v: d / f"v{v}.bin" for v in (0, 1, 2, 3)}
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(E, "progress", lambda *_: None)
        for v, path in files.items():
            E.write_checkpoint(m, str(path), v, 6 if v == 3 else 8)
    return m, files, write_tokenizer(d / "tok.bin", PIECES)


def checkpoint_of(engine, tiny, version=None):
    _, files, _ = tiny
    return files[2 if engine.quantized else (1 if version is None else version)]


def region_ends(m, version):
    """Byte offsets where the file's regions end: the header, then every tensor
    (versions 2 and 3: the values and the scales of each matrix separately), by
    model.file_layout (group size 8, and 6 in version 3, as `tiny` writes them)."""
    ends = [len(E.header_bytes(m.args, version, 8))]
    for _, names, shape, kind in M.file_layout(m.args, version):
        values, scales = M.stored_bytes(shape, kind, 6 if version == 3 else 8)
        for _ in names:
            ends += [ends[-1] + values] + ([ends[-1] + values + scales] if scales else [])
    return ends


@pytest.mark.parametrize("version", [0, 1])
def test_cut_at_every_region(engine, tiny, tmp_path, version):
    m, _, tok = tiny
    if engine.quantized:
        version = 2
    data = checkpoint_of(engine, tiny, version).read_bytes()
    ends = region_ends(m, version)
    assert ends[-1] == len(data)  # the layout above is the file's
    cuts = sorted({c for e in ends for c in (e - 1, e, e + 1) if 0 < c < len(data)} | {len(data) + 1})
    for cut in cuts:
        path = tmp_path / f"cut{cut}.bin"
        path.write_bytes(data[:cut] if cut <= len(data) else data + b"\0")
        expect_error(engine, path, "-z", tok, "-n", 4, mentions=path)


def test_cut_at_every_region_int4(qbinary, tiny, tmp_path):
    m, files, tok = tiny
    data = files[3].read_bytes()
    ends = region_ends(m, 3)
    assert ends[-1] == len(data)
    for cut in sorted({c for e in ends for c in (e - 1, e, e + 1) if 0 < c < len(data)} | {len(data) + 1}):
        path = tmp_path / f"cut{cut}.bin"
        path.write_bytes(data[:cut] if cut <= len(data) else data + b"\0")
        p = run(qbinary, path, "-z", tok, "-n", 4, check=False)
        assert p.returncode == 1 and p.stderr.count(b"\n") == 1 and str(path).encode() in p.stderr and not p.stdout


def test_int4_runs_and_run_refuses_it(binary, qbinary, tiny):
    _, files, tok = tiny
    assert run(qbinary, files[3], "-z", tok, "-n", 8, "-s", 1).returncode == 0
    p = run(binary, files[3], "-z", tok, check=False)
    assert p.returncode == 1 and b"version 3 (int4)" in p.stderr and b"runq" in p.stderr


# Header fields: (offset in a version 1/2 header, name) and the values each must refuse.
FIELDS = [(8, "dim"), (12, "hidden_dim"), (16, "n_layers"), (20, "n_heads"), (24, "n_kv_heads"),
          (28, "vocab_size"), (32, "seq_len")]


@pytest.mark.parametrize("value", [0, -1, 2**31 - 1, -2**31])
@pytest.mark.parametrize("offset, name", FIELDS, ids=[f[1] for f in FIELDS])
def test_header_field_out_of_range(engine, tiny, tmp_path, offset, name, value):
    b = bytearray(checkpoint_of(engine, tiny).read_bytes())
    struct.pack_into("<i", b, offset, value)
    path = tmp_path / "bad.bin"
    path.write_bytes(bytes(b))
    expect_error(engine, path, "-z", tiny[2], "-n", 4, mentions=path)


@pytest.mark.parametrize("fields", [dict(kind=2), dict(kind=-1), dict(factor=0.5), dict(factor=float("nan")),
                                    dict(low=4.0, high=1.0), dict(low=0.0), dict(high=float("inf")), dict(original=0)],
                         ids=["kind2", "kind-1", "factor0.5", "factor-nan", "low>high", "low0", "high-inf", "context0"])
def test_bad_rope_scaling(engine, tiny, tmp_path, fields):
    """The header's RoPE scaling (offsets 72-91: kind, factor, low and high
    frequency factors, original context) refused unless it is one we compute."""
    v = {**dict(kind=1, factor=8.0, low=1.0, high=4.0, original=32), **fields}
    b = bytearray(checkpoint_of(engine, tiny).read_bytes())
    struct.pack_into("<i3fi", b, 72, v["kind"], v["factor"], v["low"], v["high"], v["original"])
    path = tmp_path / "bad.bin"
    path.write_bytes(bytes(b))
    expect_error(engine, path, "-z", tiny[2], "-n", 4, mentions="rope scaling")


@pytest.mark.parametrize("value", [1, 2, 4, -1])
def test_bad_int8_tensor_flags(engine, tiny, tmp_path, value):
    """Header offset 92 (version 3 only: the embedding / classifier in int8):
    any bit in a version 1 or 2 file, or an unknown bit, is refused."""
    b = bytearray(checkpoint_of(engine, tiny).read_bytes())
    struct.pack_into("<i", b, 92, value)
    path = tmp_path / "bad.bin"
    path.write_bytes(bytes(b))
    expect_error(engine, path, "-z", tiny[2], "-n", 4, mentions="int8 tensor flags")


@pytest.mark.parametrize("value, words", [(1, b"group_size 6"), (4, b"int8 tensor flags"), (-1, b"int8 tensor flags")])
def test_bad_int8_tensor_flags_int4(qbinary, tiny, tmp_path, value, words):
    """Version 3: int8 tensors need whole groups (dim 16, group size 6 here);
    the same file marked with a good flag describes other sizes (refused too)."""
    b = bytearray(tiny[1][3].read_bytes())
    struct.pack_into("<i", b, 92, value)
    path = tmp_path / "bad.bin"
    path.write_bytes(bytes(b))
    p = run(qbinary, path, "-z", tiny[2], "-n", 4, check=False)
    assert p.returncode == 1 and p.stderr.count(b"\n") == 1 and words in p.stderr, p.stderr


@pytest.mark.parametrize("version, group_size", [(2, g) for g in (0, -8, 3, 7, 2**31 - 1)] +
                         [(3, g) for g in (0, -8, 5, 257, 2**31 - 1)])
def test_bad_group_size(qbinary, tiny, tmp_path, version, group_size):
    """Version 2 needs a divisor of dim and hidden_dim; version 3 any size in
    1..256, but a different one describes a different file size."""
    b = bytearray(tiny[1][version].read_bytes())
    struct.pack_into("<i", b, 37, group_size)
    path = tmp_path / "bad.bin"
    path.write_bytes(bytes(b))
    p = run(qbinary, path, "-z", tiny[2], "-n", 4, check=False)
    words = b"its header describes" if (version, group_size) == (3, 5) else f"group_size {group_size} ".encode()
    assert p.returncode == 1 and p.stderr.count(b"\n") == 1 and str(path).encode() in p.stderr and words in p.stderr, \
        p.stderr


def test_future_version(engine, tiny, tmp_path):
    b = bytearray(checkpoint_of(engine, tiny).read_bytes())
    struct.pack_into("<i", b, 4, 7)
    path = tmp_path / "v7.bin"
    path.write_bytes(bytes(b))
    expect_error(engine, path, "-z", tiny[2], mentions="version 7")


FOREIGN = {  # named, with the export.py flag that converts it
    "gguf": (b"GGUF\3\0\0\0" + bytes(1000), "GGUF file (llama.cpp): convert it with export.py --gguf"),
    "safetensors": (struct.pack("<Q", 60) + b'{"w":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}'.ljust(60)
                    + bytes(4), "safetensors file: convert its Hugging Face directory with export.py --hf"),
    "pytorch-zip": (b"PK\3\4" + bytes(1000), "zip archive (a PyTorch .pt/.pth file?): convert it with export.py --checkpoint"),
    "pickle": (b"\x80\x02}q\0." + bytes(100), "pickle: convert it with export.py --checkpoint"),
}


@pytest.mark.parametrize("name", FOREIGN)
def test_other_formats_named(engine, tmp_path, name):
    data, word = FOREIGN[name]
    path = tmp_path / f"model.{name}"
    path.write_bytes(data)
    expect_error(engine, path, "-z", TOK512, mentions=word)


@pytest.mark.parametrize("dim", [640, 896, 1152, 1408])
def test_dims_that_look_like_a_pickle(binary, tmp_path, dim):
    """A version 0 file starts with dim: for these dims its first bytes are
    80 02 (or 03, 04, 05), a pickle's. A valid header is a model, whatever its
    first bytes look like."""
    m = random_model(6, dim=dim, n_layers=1, n_heads=dim // 64, n_kv_heads=dim // 64, hidden_dim=32,
                     vocab_size=8, max_seq_len=8)
    path = tmp_path / f"dim{dim}.bin"
    E.write_checkpoint(m, str(path), 0)
    assert path.read_bytes()[0] == 0x80 and 2 <= path.read_bytes()[1] <= 5
    tok = write_tokenizer(tmp_path / "tok.bin", PIECES)
    p = run(binary, path, "-z", tok, "-n", 4, "-i", "a", "-t", 0, check=False)
    assert p.returncode == 0, p.stderr.decode()


def test_non_regular_files(engine, tmp_path):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    for path in (fifo, "/dev/zero", tmp_path):
        expect_error(engine, path, "-z", TOK512, mentions=path)  # and no hang on the FIFO
        expect_error(engine, engine.stories, "-z", path, mentions=path)


def raw_v1(dim, hidden, layers, heads, kv, vocab, seq):
    """A version 1 file of zero weights (shared classifier): the exact size its header describes."""
    floats = vocab * dim + 2 * layers * dim + layers * dim * (2 * dim + 2 * dim // heads * kv) \
        + 3 * layers * dim * hidden + dim
    head = struct.pack("<Ii7iB", 0x616B3432, 1, dim, hidden, layers, heads, kv, vocab, seq, 1).ljust(256, b"\0")
    return head + bytes(4 * floats)


def test_kv_cache_larger_than_memory(binary, tmp_path):
    """A small file whose KV cache would need more than the machine's memory:
    refused before allocating."""
    path = tmp_path / "long.bin"
    tok = write_tokenizer(tmp_path / "tok.bin", PIECES)
    ram = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    # layers x positions x kv_dim x 4 bytes x (keys, values): more than this machine has
    layers = min(1024, max(16, 2 * ram // (2**20 * 16 * 4 * 2)))
    assert 2 * layers * 2**20 * 16 * 4 > ram, "this machine has more memory than the header's caps allow"
    path.write_bytes(raw_v1(16, 16, layers, 2, 2, 8, 2**20))
    expect_error(types.SimpleNamespace(binary=binary), path, "-z", tok, "-n", 0, mentions="KV cache")
    # asking for fewer positions with -n makes it fit, and it runs
    assert run(binary, path, "-z", tok, "-n", 8, "-i", "a").returncode == 0
    # -k int8 takes (kv_dim + 4 n_kv_heads) / (4 kv_dim) = 3/8 of the bytes here (kv_dim 16, 2
    # heads): positions whose f32 cache needs 1.5x the limit the engine names fit in int8
    path.write_bytes(raw_v1(16, 16, 1024, 2, 2, 8, 2**20))  # the most layers: then n < seq_len
    err = run(binary, path, "-z", tok, "-n", 0, check=False).stderr.decode()
    limit = float(re.search(r"more than the ([0-9.]+) GB", err).group(1)) * 1e9
    n = int(1.5 * limit / (2 * 1024 * 16 * 4))
    assert n < 2**20 // 2
    expect_error(types.SimpleNamespace(binary=binary), path, "-z", tok, "-n", n, "-i", "a", mentions="KV cache")
    assert run(binary, path, "-z", tok, "-n", n, "-k", "int8", "-i", "a").returncode == 0
    expect_error(types.SimpleNamespace(binary=binary), path, "-z", tok, "-n", 2 * n, "-k", "int8", "-i", "a",
                 mentions="KV cache")


def test_attention_scratch_is_per_thread(binary, tmp_path):
    """Attention's scores need one row of positions per thread, not one per
    (token, head) of a block: 1024 heads and 2^20 positions would have been
    192 x 1024 x 2^20 floats (824 GB), refused as more than the machine has.
    Read in perplexity mode, which fills only the text's few positions."""
    path = tmp_path / "heads.bin"
    path.write_bytes(raw_v1(2048, 16, 1, 1024, 1, 8, 2**20))
    tok = write_tokenizer(tmp_path / "tok.bin", PIECES)
    text = tmp_path / "text.txt"
    text.write_text("ab a b ab")
    assert 192 * 1024 * 2**20 * 4 > os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    p = run(binary, path, "-z", tok, "-m", "perplexity", "-f", text, "-n", 0, check=False)
    assert p.returncode == 0 and p.stdout.startswith(b"perplexity "), p.stderr.decode()


def test_one_position_context(engine, tmp_path):
    """seq_len 1: BOS alone fills the context; generation ends cleanly, and a
    prompt of two tokens is refused (found by fuzzing: a second position used to
    write past the KV cache when a caller asked for one)."""
    m = random_model(5, dim=8, n_layers=1, n_heads=2, n_kv_heads=1, hidden_dim=16, vocab_size=8, max_seq_len=1)
    ckpt = engine.save(m, tmp_path / "one.bin", 8)
    tok = write_tokenizer(tmp_path / "tok.bin", PIECES)
    assert run(engine.binary, ckpt, "-z", tok, "-n", 0).returncode == 0
    expect_error(engine, ckpt, "-z", tok, "-n", 0, "-i", "a", mentions="-n")


@pytest.mark.parametrize("where", ["token_embedding", "wq", "w2"])
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
@pytest.mark.parametrize("cache", ["f32", "int8"])
def test_non_finite_weights(engine, tiny, tmp_path, where, value, cache):
    m, _, tok = tiny
    bad = random_model(3, **ARGS, shared_classifier=False)
    with torch.no_grad():
        sd = bad.state_dict()
        key = {"token_embedding": "tok_embeddings.weight", "wq": "layers.0.attention.wq.weight",
               "w2": "layers.1.feed_forward.w2.weight"}[where]
        sd[key].view(-1)[ARGS["dim"] + 5] = value  # in BOS's embedding row, for the first
    path = engine.save(bad, tmp_path / "bad.bin", 8)
    p = run(engine.binary, path, "-z", tok, "-n", 8, "-k", cache, "-i", "a b", check=False)
    err = p.stderr.decode()
    assert p.returncode == 1 and err.count("\n") == 1 and "position" in err and "not finite" in err, err
    assert p.stdout == b""


def test_tokenizer_entry_counts(engine, tiny, tmp_path):
    """A tokenizer with fewer or more entries than the model's vocab_size."""
    for pieces in (PIECES[:-1], PIECES + ["ba"]):
        tok = write_tokenizer(tmp_path / "tok.bin", pieces)
        expect_error(engine, checkpoint_of(engine, tiny), "-z", tok, "-i", "a", mentions=tok)


def test_vocabulary_without_space_or_bytes(engine, tiny, tmp_path):
    """No " " piece for SentencePiece's leading space, or no byte pieces for a
    character the vocabulary lacks: the prompt is refused, naming what is missing."""
    tok = write_tokenizer(tmp_path / "nospace.bin", [p if p != " " else "c" for p in PIECES])
    expect_error(engine, checkpoint_of(engine, tiny), "-z", tok, "-i", "ab", mentions='" "')
    expect_error(engine, checkpoint_of(engine, tiny), "-z", tiny[2], "-i", "a z", mentions='"z"')


# ---------------------------------------------------------------------------
# Flags and prompts


@pytest.mark.parametrize("t", ["1e-45", "1e-30", "1e-10"])
def test_tiny_temperature_is_greedy(engine, t):
    greedy = stories(engine, "-t", "0", "-n", 60, "-i", "Once upon a time").stdout
    assert stories(engine, "-t", t, "-s", 5, "-n", 60, "-i", "Once upon a time").stdout == greedy
    assert stories(engine, "-t", t, "-p", "0.9", "-s", 5, "-n", 60, "-i", "Once upon a time").stdout == greedy


def test_long_prompt_is_a_quick_error(engine):
    prompt = ("Once upon a time, there was a little girl. " * 2300)[:100_000]
    start = time.monotonic()
    expect_error(engine, engine.stories, "-z", TOK512, "-i", prompt, mentions="-n")
    assert time.monotonic() - start < 30  # sanitizer builds included


@pytest.mark.parametrize("prompt", [b"\xff\xfe", b"\x80abc", b"caf\xc3", b"\xf0\x9f\x98", b"a\xed\xa0\x80b"],
                         ids=["ff-fe", "lone-continuation", "cut-2-byte", "cut-4-byte", "surrogate"])
def test_invalid_utf8_prompt(engine, prompt):
    args = [engine.binary, str(engine.stories), "-z", str(TOK512), "-t", "0", "-n", "20", "-i"]
    p = subprocess.run([a.encode() for a in args] + [prompt], capture_output=True, timeout=60)
    assert p.returncode == 0, p.stderr
    assert "\ufffd" in p.stdout.decode("utf-8")  # valid UTF-8: bad bytes became U+FFFD


def test_empty_prompt(engine):
    p = stories(engine, "-t", "0", "-n", 20, "-i", "")
    assert len(p.stdout) > 1 and p.stdout.endswith(b"\n")


def chat_script():
    return b"be brief\nhello there\nand again\x00 with a NUL\n"


def test_chat_end_of_input_anywhere(engine):
    """Input ending at every byte of a conversation: a clean end, status 0."""
    script = chat_script()
    for cut in range(len(script) + 1):
        p = stories(engine, "-m", "chat", "-t", "0", "-n", 64, stdin=script[:cut], check=False)
        assert p.returncode == 0, (cut, p.stderr)
        assert b"ERROR" not in p.stderr  # no sanitizer report


def test_stdout_closed_early(engine):
    """`| head -c 1`: the engine ends quietly (by SIGPIPE or a clean exit), no message.
    Tokenizing a long prompt prints more than a pipe holds, so the close is felt."""
    prompt = "Once upon a time, there was a little girl. " * 600
    p = subprocess.Popen([engine.binary, engine.stories, "-z", TOK512, "-m", "tokenize", "-i", prompt],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    p.stdout.read(1)
    p.stdout.close()
    err = p.stderr.read()
    p.wait(timeout=60)
    assert p.returncode in (0, -13), (p.returncode, err)
    assert b"error" not in err.lower() and b"Sanitizer" not in err


# ---------------------------------------------------------------------------
# Determinism and memory


@pytest.mark.parametrize("sampling", [["-t", "0"], ["-t", "1.0", "-s", "7"], ["-t", "0.8", "-p", "0.9", "-s", "3"]],
                         ids=["greedy", "sampled", "top-p"])
@pytest.mark.parametrize("cache", ["f32", "int8"])
def test_same_bytes_for_1_to_4_threads(threaded_engine, sampling, cache):
    outs = set()
    for t in (1, 2, 3, 4):
        p = stories(threaded_engine, *sampling, "-k", cache, "-n", 200, "-i", "Once upon a time",
                    env={"OMP_NUM_THREADS": str(t)})
        assert_threads(p, t)
        outs.add(p.stdout)
    assert len(outs) == 1


def peak_rss(cmd):
    """The peak resident memory of a command, in bytes, as GNU time reports it
    (the child of a small process: one forked from Python would count Python's)."""
    p = subprocess.run(["/usr/bin/time", "-f", "peak %M", *map(str, cmd)], stdout=subprocess.DEVNULL,
                       stderr=subprocess.PIPE, check=True)
    return int(re.search(rb"peak (\d+)\n$", p.stderr).group(1)) * 1024


LARGE = dict(dim=512, n_layers=8, n_heads=8, n_kv_heads=8, hidden_dim=1536, vocab_size=512, max_seq_len=512)


@pytest.fixture(scope="module")
def large(tmp_path_factory):
    """A model whose matrices (109 MB in fp32, 28 MB in int8) dwarf what else an
    engine holds, in versions 0 and 2."""
    d = tmp_path_factory.mktemp("large")
    m = random_model(4, **LARGE)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(E, "progress", lambda *_: None)
        E.write_checkpoint(m, str(d / "v0.bin"), 0)
        E.write_checkpoint(m, str(d / "v2.bin"), 2, 64)
    return d


@pytest.mark.parametrize("engine", [(b, False) for b in BINARIES if "debug" not in b] +
                         [(b, True) for b in QBINARIES if "debug" not in b], ids=lambda p: binary_id(p[0]), indirect=True)
def test_peak_memory_holds_the_weights_once(engine, large):
    """Peak resident memory of a generation over all 512 positions: the weights
    once (run's panels, or runq's mapping of the file, each about the file's
    size), the KV cache and the activations: never the file and a copy of it.
    The rest (runtime, libraries, the tokenizer) is measured: the same
    generation with stories260K (1 MB). Not for the sanitizer build, whose
    shadow memory is its own."""
    path = large / ("v2.bin" if engine.quantized else "v0.bin")
    a = types.SimpleNamespace(**LARGE)
    row = a.dim + 4 * a.n_kv_heads if engine.quantized else 4 * a.dim  # a position's keys: int8 (+ scales) or f32
    kv = 2 * a.n_layers * a.max_seq_len * row
    # the run state, generously: a block of 192 positions' activations and logits, a row of scores per thread
    activations = (192 * (8 * a.dim + 3 * a.hidden_dim + a.vocab_size) + 4 * a.max_seq_len) * 4
    rest = peak_rss([engine.binary, engine.stories, "-z", TOK512, "-n", 512])
    peak = peak_rss([engine.binary, path, "-z", TOK512, "-n", 512])
    bound = os.path.getsize(path) + kv + activations + rest
    assert peak < bound, f"peak {peak / 2**20:.0f} MiB > {bound / 2**20:.0f} MiB"
    # -m tokenize reads the header and the tokenizer: less than generating with stories260K
    tokenize = peak_rss([engine.binary, path, "-z", TOK512, "-m", "tokenize", "-i", "Once upon a time"])
    assert tokenize < rest, f"-m tokenize: peak {tokenize / 2**20:.0f} MiB > {rest / 2**20:.0f} MiB"


# ---------------------------------------------------------------------------
# export.py: bad inputs are a clear error, and never leave a half-written file


def export(*args):
    return subprocess.run([os.sys.executable, str(ROOT / "export.py"), *map(str, args)], capture_output=True,
                          timeout=300)


def training_checkpoint(path, drop=None, reshape=None, **arg_changes):
    m = random_model(5, **ARGS)
    sd = dict(m.state_dict())
    if drop:
        del sd[drop]
    if reshape:
        sd[reshape] = sd[reshape][:-1]
    model_args = dict(ARGS, **arg_changes)
    torch.save({"model_args": model_args, "model": sd}, path)
    return path


EXPORT_CASES = {
    "missing-key": (dict(drop="layers.1.feed_forward.w3.weight"), "w3"),
    "wrong-shape": (dict(reshape="layers.0.attention.wk.weight"), "wk"),
    "heads-not-dividing-dim": (dict(n_heads=3), "n_heads"),
    "kv-heads-not-dividing-heads": (dict(n_kv_heads=3, n_heads=4), "n_kv_heads"),
    "hidden-dim-zero": (dict(hidden_dim=0), "hidden_dim"),
}


@pytest.mark.parametrize("case", EXPORT_CASES)
def test_export_refuses_bad_checkpoint(tmp_path, case):
    kw, word = EXPORT_CASES[case]
    src = training_checkpoint(tmp_path / "ckpt.pt", **kw)
    out = tmp_path / "out.bin"
    p = export(out, "--checkpoint", src)
    err = p.stderr.decode()
    assert p.returncode == 1 and err.count("\n") == 1 and word in err and "Traceback" not in err, err
    assert os.listdir(tmp_path) == ["ckpt.pt"]  # nothing written, no temporary left


def test_export_truncated_input(tmp_path):
    src = training_checkpoint(tmp_path / "ckpt.pt")
    data = src.read_bytes()
    for cut in (0, 100, len(data) // 2, len(data) - 1):
        src.write_bytes(data[:cut])
        p = export(tmp_path / "out.bin", "--checkpoint", src)
        err = p.stderr.decode()
        assert p.returncode == 1 and err.count("\n") == 1 and "ckpt.pt" in err, (cut, err)
        assert os.listdir(tmp_path) == ["ckpt.pt"]
    for cut in (10, 300, 5000):  # a version 0 .bin cut short
        p = export(tmp_path / "out.bin", "--bin", tmp_path / "short.bin")
        (tmp_path / "short.bin").write_bytes(STORIES_BYTES[:cut])
        p = export(tmp_path / "out.bin", "--bin", tmp_path / "short.bin")
        err = p.stderr.decode()
        assert p.returncode == 1 and err.count("\n") == 1 and "short.bin" in err, (cut, err)
        assert not (tmp_path / "out.bin").exists()


def tokenizer_bin(pieces, max_len=None, lengths=None):
    """tokenizer.bin bytes; lengths overrides the stored piece lengths."""
    out = struct.pack("<i", max_len or max(map(len, pieces)))
    for i, p in enumerate(pieces):
        out += struct.pack("<fi", -float(i), lengths[i] if lengths else len(p)) + p
    return out


BAD_TOKENIZERS = {
    "negative-length": (tokenizer_bin([b"a", b"b"], lengths=[1, -9]), "length -9"),
    "zero-length": (tokenizer_bin([b"a", b""]), "length 0"),
    "cut-in-entry": (tokenizer_bin([b"a", b"bc"])[:-5], "cut off"),
    "cut-in-piece": (tokenizer_bin([b"a", b"bc"])[:-1], "past the end"),
    "too-few-pieces": (tokenizer_bin([b"a", b"b"]), "holds 2 pieces"),
    "too-many-pieces": (tokenizer_bin([b"a", b"b", b"c", b"d"]), "holds 4 pieces"),
    "empty": (b"", "truncated"),
}


@pytest.mark.parametrize("case", BAD_TOKENIZERS)
def test_export_reads_bad_tokenizer_bin(tmp_path, case):
    """export.py's tokenizer.bin reader (--awq-tokenizer) refuses what run.cpp's
    refuses, with one line: no endless loop on a negative length, no raw
    struct.error on a cut file, and the piece count checked (3 here)."""
    data, words = BAD_TOKENIZERS[case]
    (tmp_path / "tok.bin").write_bytes(data)
    code = f"from exporter.tokenizers import read_tokenizer_bin; read_tokenizer_bin({str(tmp_path / 'tok.bin')!r}, 3)"
    p = subprocess.run([os.sys.executable, "-c", code], cwd=ROOT, capture_output=True, timeout=60)
    err = p.stderr.decode()
    assert p.returncode == 1 and err.count("\n") == 1 and words in err and "tok.bin" in err, err


@pytest.mark.parametrize("version", [2, 3])
def test_export_refuses_group_size_0(tmp_path, version):
    src = training_checkpoint(tmp_path / "ckpt.pt")
    p = export(tmp_path / "out.bin", "--version", version, "--group-size", 0, "--checkpoint", src)
    err = p.stderr.decode()
    assert p.returncode == 1 and err.count("\n") == 1 and "--group-size 0" in err, err
    assert os.listdir(tmp_path) == ["ckpt.pt"]


def test_export_output_paths(tiny_gguf, tmp_path):
    """Outputs that are folders, in missing folders, or one file named twice:
    refused before any work, with one line, and nothing written."""
    src = tmp_path / "in.gguf"
    src.write_bytes(tiny_gguf)
    (tmp_path / "folder").mkdir()
    cases = [([tmp_path / "folder", "--gguf", src, "-o", tmp_path / "tok.bin"], "is a directory"),
             ([tmp_path / "out.bin", "--gguf", src, "-o", tmp_path / "folder"], "is a directory"),
             ([tmp_path / "out.bin", "--gguf", src, "-o", tmp_path / "no" / "tok.bin"], "does not exist"),
             ([tmp_path / "out.bin", "--gguf", src, "-o", tmp_path / "out.bin"], "both the checkpoint and the tokenizer"),
             (["--tokenizer", LLAMA_MODEL, "-o", tmp_path / "folder"], "is a directory"),
             ([tmp_path / "folder", "--bin", STORIES], "is a directory")]
    for args, words in cases:
        p = export(*args)
        err = p.stderr.decode()
        assert p.returncode == 1 and err.count("\n") == 1 and words in err, (args, err)
        assert sorted(os.listdir(tmp_path)) == ["folder", "in.gguf"] and not os.listdir(tmp_path / "folder"), args


def sentencepiece_model(pieces):
    """A sentencepiece .model protobuf: ModelProto field 1, a SentencePiece
    {1: piece, 2: score (float32), 3: type} per (piece, score, type)."""
    def field(number, wire, payload):
        key = bytes([number << 3 | wire])
        return key + (bytes([len(payload)]) + payload if wire == 2 else payload)
    return b"".join(field(1, 2, field(1, 2, p.encode()) + field(2, 5, struct.pack("<f", s)) + field(3, 0, bytes([t])))
                    for p, s, t in pieces)


@pytest.mark.parametrize("score", [float("nan"), float("inf")])
def test_export_refuses_sentencepiece_scores(tmp_path, score):
    good = [("<unk>", 0.0, 2), ("<s>", 0.0, 3), ("</s>", 0.0, 3), ("\u2581a", -1.0, 1), ("b", -2.0, 1)]
    (tmp_path / "ok.model").write_bytes(sentencepiece_model(good))
    assert export("--tokenizer", tmp_path / "ok.model", "-o", tmp_path / "ok.bin").returncode == 0
    (tmp_path / "bad.model").write_bytes(sentencepiece_model(good[:4] + [("b", score, 1)]))
    p = export("--tokenizer", tmp_path / "bad.model", "-o", tmp_path / "bad.bin")
    err = p.stderr.decode()
    assert p.returncode == 1 and err.count("\n") == 1 and f"piece 4 b'b' has score {score}" in err, err
    assert not (tmp_path / "bad.bin").exists()


def test_export_output_in_missing_directory(tmp_path):
    src = training_checkpoint(tmp_path / "ckpt.pt")
    for args in (["--checkpoint", src], ["--tokenizer", LLAMA_MODEL, "-o"]):
        out = tmp_path / "no" / "such" / "dir" / "out.bin"
        p = export(*(args + [out] if args[0] == "--tokenizer" else [out] + args))
        err = p.stderr.decode()
        assert p.returncode == 1 and err.count("\n") == 1 and "no/such/dir" in err and "Traceback" not in err, err
        assert not (tmp_path / "no").exists()


# ---------------------------------------------------------------------------
# valgrind (on the plain -O3 build: valgrind does not know AVX-512): no invalid
# read and no use of an uninitialised value in a generation and a chat.

PLAIN = [b for b in BINARIES + QBINARIES if b.endswith("-gcc")]


@pytest.mark.parametrize("binary", PLAIN)
def test_valgrind_generate_and_chat(binary, stories_q8):
    model = stories_q8 if "runq" in binary else STORIES
    vg = ["valgrind", "-q", "--error-exitcode=9", "--track-origins=yes"]
    for args, stdin in ((["-n", 60, "-i", "Once upon a time"], None),
                        (["-m", "chat", "-n", 120, "-s", 3], b"be brief\nhello\nand again\n")):
        p = subprocess.run(vg + [existing(binary), str(model), "-z", str(TOK512)] + [str(a) for a in args],
                           input=stdin, capture_output=True, timeout=600)
        assert p.returncode == 0 and b"==" not in p.stderr, p.stderr.decode(errors="replace")


# ---------------------------------------------------------------------------
# Byte-level BPE tokenizers: bad tokenizer.json files for export.py, corrupt
# extension blocks and template mismatches for the engines


def write_json(path, d):
    path.write_text(json.dumps(d), encoding="utf-8")
    return path


def mutated(change):
    d = byte_level_json()
    change(d)
    return d


BAD_TOKENIZER_JSON = {
    "normalizer": (lambda d: d.update(normalizer={"type": "NFC"}), "normalizer"),
    "metaspace": (lambda d: d.update(pre_tokenizer={"type": "Metaspace"}), "pre_tokenizer"),
    "other-regex": (lambda d: d["pre_tokenizer"]["pretokenizers"][0]["pattern"].update(Regex=r"\w+"), r"\\w+"),
    "prefix-space": (lambda d: d["pre_tokenizer"]["pretokenizers"][1].update(add_prefix_space=True), "add_prefix_space"),
    "dropout": (lambda d: d["model"].update(dropout=0.1), "dropout"),
    "unknown-merge": (lambda d: d["model"]["merges"].append("x yz"), "merge 3"),
    "bad-merge": (lambda d: d["model"]["merges"].append("abc"), "merge 3"),
    "missing-byte": (lambda d: d["model"]["vocab"].pop("Ā"), "missing"),
    "no-byte-piece": (lambda d: d["model"]["vocab"].update({"ĀĀ": d["model"]["vocab"].pop("Ā")}), "0x00"),
    "not-byte-alphabet": (lambda d: d["model"]["vocab"].update({"\u2581a": d["model"]["vocab"].pop("Ġa")}),
                          "byte-level alphabet"),
    "added-id-clash": (lambda d: d["added_tokens"].append({"id": 3, "content": "<x>"}), "is both"),
    "merges-not-list": (lambda d: d["model"].update(merges="a b"), "not a tokenizer.json"),
    "wordpiece": (lambda d: d["model"].update(type="WordPiece"), "WordPiece"),
    "model-list": (lambda d: d.update(model=[d["model"]]), '"model" object'),
    "model-string": (lambda d: d.update(model="BPE"), '"model" object'),
    "added-object": (lambda d: d.update(added_tokens={t["content"]: t["id"] for t in d["added_tokens"]}),
                     "added_tokens"),
    "added-without-id": (lambda d: d["added_tokens"].append({"content": "<x>"}), "added_tokens"),
    "processors-number": (lambda d: d.update(post_processor={"type": "Sequence", "processors": 5}), "post_processor"),
    "processors-numbers": (lambda d: d.update(post_processor={"type": "Sequence", "processors": [1, 2]}),
                           "post_processor"),
    "special-token-string": (lambda d: d.update(post_processor={
        "type": "TemplateProcessing", "single": [{"SpecialToken": "<|begin_of_text|>"}]}), "SpecialToken"),
    "decoder-unknown": (lambda d: d.update(decoder={"type": "Metaspace"}), "decoder"),
}
# the same checks on a byte-fallback (SentencePiece-style) tokenizer.json
BAD_BYTE_FALLBACK_JSON = {
    "unknown-merge": (lambda d: d["model"]["merges"].append("x yz"), "merge 1"),
    "added-object": (lambda d: d.update(added_tokens={"<unk>": 0}), "added_tokens"),
    "added-without-id": (lambda d: d["added_tokens"].append({"content": "<x>"}), "added_tokens"),
    "model-list": (lambda d: d.update(model=[d["model"]]), '"model" object'),
}
NESTED = "[" * 100000 + "]" * 100000  # deeper than Python's JSON reader can recurse
BAD_TOKENIZER_CONFIGS = {  # the files beside tokenizer.json: special tokens that do not match it
    "eos-not-added": ("tokenizer_config.json", {"eos_token": "<|im_end|>"}, "<|im_end|>"),
    "bos-not-added": ("tokenizer_config.json", {"add_bos_token": True, "bos_token": {"content": "<s>"}}, "<s>"),
    "eos-ids-not-ints": ("generation_config.json", {"eos_token_id": ["x"]}, "not integers"),
    "not-json": ("config.json", "{", "not JSON"),
    "eos-a-list": ("tokenizer_config.json", {"eos_token": ["<|end_of_text|>"]}, "not a string"),
    "eos-content-a-list": ("tokenizer_config.json", {"eos_token": {"content": ["<|end_of_text|>"]}}, "not a string"),
    "eos-id-past-vocabulary": ("config.json", {"eos_token_id": 99999}, "token id 99999"),
    "eos-id-negative": ("generation_config.json", {"eos_token_id": -1}, "token id -1"),
    "config-nested": ("config.json", NESTED, "nested too deeply"),
}


def byte_fallback_json():
    """A small SentencePiece-style tokenizer.json: <unk>, <s>, </s>, the 256
    byte pieces, "a", "b" and "ab" (one merge)."""
    vocab = {p: i for i, p in enumerate(["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
                                        + ["a", "b", "ab"])}
    return {"model": {"type": "BPE", "byte_fallback": True, "vocab": vocab, "merges": ["a b"]},
            "added_tokens": [{"id": i, "content": t, "special": True} for i, t in enumerate(["<unk>", "<s>", "</s>"])]}


@pytest.mark.parametrize("case", list(BAD_TOKENIZER_JSON) + [f"fallback-{c}" for c in BAD_BYTE_FALLBACK_JSON] +
                         list(BAD_TOKENIZER_CONFIGS) + ["nested"])
def test_export_refuses_bad_tokenizer_json(tmp_path, case):
    if case in BAD_TOKENIZER_JSON:
        change, words = BAD_TOKENIZER_JSON[case]
        write_json(tmp_path / "tokenizer.json", mutated(change))
    elif case.startswith("fallback-"):
        change, words = BAD_BYTE_FALLBACK_JSON[case.removeprefix("fallback-")]
        d = byte_fallback_json()
        change(d)
        write_json(tmp_path / "tokenizer.json", d)
    elif case == "nested":
        (tmp_path / "tokenizer.json").write_text(NESTED)
        words = "nested too deeply"
    else:
        name, content, words = BAD_TOKENIZER_CONFIGS[case]
        write_json(tmp_path / "tokenizer.json", byte_level_json())
        if isinstance(content, str):
            (tmp_path / name).write_text(content)
        else:
            write_json(tmp_path / name, content)
    before = sorted(os.listdir(tmp_path))
    p = export("--tokenizer", tmp_path / "tokenizer.json", "-o", tmp_path / "tok.bin")
    err = p.stderr.decode()
    assert p.returncode == 1 and err.count("\n") == 1 and words in err and "Traceback" not in err, err
    assert sorted(os.listdir(tmp_path)) == before  # nothing written, no temporary left


@pytest.fixture(scope="module")
def byte_level(tmp_path_factory):
    """A tiny model over byte_level_json's vocabulary (264 ids), its tokenizer,
    and the tokenizer's bytes with the offset of the extension block."""
    d = tmp_path_factory.mktemp("bbpe")
    write_json(d / "tokenizer.json", byte_level_json())
    write_json(d / "tokenizer_config.json", {"eos_token": "<|end_of_text|>"})
    assert export("--tokenizer", d / "tokenizer.json", "-o", d / "tok.bin").returncode == 0
    data = (d / "tok.bin").read_bytes()
    m = random_model(3, **dict(ARGS, vocab_size=264))
    return m, d / "tok.bin", data, data.index(b"tokx")


def patched(data, off, fmt, *values):
    b = bytearray(data)
    struct.pack_into(fmt, b, off, *values)
    return bytes(b)


def test_byte_level_tokenizer_runs(engine, byte_level, tmp_path):
    m, tok, _, _ = byte_level
    ckpt = engine.save(m, tmp_path / "m.bin", 8)
    # words "abc", " ab", " a": merged by rank within each, " a" whole (ignore_merges)
    assert run(engine.binary, ckpt, "-z", tok, "-m", "tokenize", "-i", "abc ab a").stdout == b"257 32 256 258\n"
    p = run(engine.binary, ckpt, "-z", tok, "-n", 8, "-i", "abc", "-t", "0")
    assert p.stdout.startswith(b"abc")


def corrupt_extensions(data, x):
    """(name, bytes, words in the error) for a tokenizer.bin whose extension
    block starts at x: cut at every field of the header and inside each table,
    and each field made invalid."""
    n_merges_at = x + 24 + 4 + 4 * 1 + 4 + 4 * 5  # header, eos (1 id), specials (5 ids)
    ranges_at = n_merges_at + 4 + 8 * 3
    cases = [(f"cut-{c}", data[:c], "") for c in
             [x + 2, x + 4, x + 10, x + 24, x + 30, n_merges_at + 2, n_merges_at + 10, ranges_at + 2, ranges_at + 9,
              len(data) - 1]]
    cases += [
        ("version", patched(data, x + 4, "<i", 2), "version 2"),
        ("kind", patched(data, x + 8, "<i", 0), "kind 0"),
        ("split", patched(data, x + 12, "<i", 9), "split kind 9"),
        ("flags", patched(data, x + 16, "<i", 6), "flags"),
        ("bos", patched(data, x + 20, "<i", 264), "bos id 264"),
        ("eos-count", patched(data, x + 24, "<i", 2 ** 30), "eos count"),
        ("eos-negative", patched(data, x + 24, "<i", -1), "eos count"),
        ("eos-id", patched(data, x + 28, "<i", -5), "eos id -5"),
        ("special-id", patched(data, x + 36, "<i", 2 ** 31 - 1), "special token id"),
        ("merge-count", patched(data, n_merges_at, "<i", 2 ** 29), "merge count"),
        ("merge-id", patched(data, n_merges_at + 4, "<i", 264), "merge id 264"),
        ("merge-makes-nothing", patched(data, n_merges_at + 4, "<2i", 98, 98), "merge 0"),
        ("merge-of-special", patched(data, n_merges_at + 4, "<i", 262), "merge 0"),
        ("range-count", patched(data, ranges_at, "<i", 2 ** 28), "Unicode range count"),
        ("range-order", patched(data, ranges_at + 4, "<2I", 0x41, 0x5A), "Unicode range 1"),
        ("range-beyond", patched(data, ranges_at + 4 + 12 * 3 + 4, "<I", 0x110000), "Unicode range 3"),
        ("range-class", patched(data, ranges_at + 4 + 8, "<I", 7), "Unicode range 0"),
        # ranges 0 and 1 are tab..CR and the space: the split needs both in \s
        ("space-not-white", patched(data, ranges_at + 4 + 12, "<2I", 0x21, 0x21), "U+0020 as white space"),
        ("tab-not-white", patched(data, ranges_at + 4, "<I", 0xA), "U+0009 as white space"),
        ("trailing", data + b"\0", "after the byte-level block"),
        ("other-magic", data[:x] + b"tokX" + data[x + 4:], "bytes after"),
    ]
    return cases


def test_corrupt_byte_level_block(engine, byte_level, tmp_path):
    m, _, data, x = byte_level
    ckpt = engine.save(m, tmp_path / "m.bin", 8)
    tok = tmp_path / "bad.bin"
    for name, bad, words in corrupt_extensions(data, x):
        tok.write_bytes(bad)
        p = run(engine.binary, ckpt, "-z", tok, "-i", "a 1 x ", check=False)
        err = p.stderr.decode(errors="replace")
        assert p.returncode == 1 and err.count("\n") == 1 and str(tok) in err and words in err, (name, err)


def test_chat_template_must_match_tokenizer(engine, byte_level, tiny, tmp_path):
    m, tok, data, x = byte_level
    ckpt = engine.save(m, tmp_path / "m.bin", 8)
    expect_error(engine, ckpt, "-z", tok, "-m", "chat", "-c", "llama2", "-i", "hi", mentions="byte-level")
    expect_error(engine, checkpoint_of(engine, tiny), "-z", tiny[2], "-m", "chat", "-c", "llama3", "-i", "hi",
                 mentions="SentencePiece")
    # the same tokenizer without <|eot_id|> among its special tokens
    d = tmp_path / "noeot"
    d.mkdir()
    write_json(d / "tokenizer.json", byte_level_json(specials=LLAMA3_SPECIALS[:-1] + ["<|eom_id|>"]))
    assert export("--tokenizer", d / "tokenizer.json", "-o", d / "tok.bin").returncode == 0
    expect_error(engine, ckpt, "-z", d / "tok.bin", "-m", "chat", "-i", "hi", mentions="<|eot_id|>")


# ----------------------------------------------------------------------------
# export.py --gguf: llama.cpp's format read from hostile bytes. Every case is a
# valid GGUF (written by --to-gguf from a tiny model) with one thing broken: one
# line naming it, exit status 1, and neither the checkpoint nor the tokenizer
# written. GGUF's own CVEs were counts and lengths trusted before the bytes were
# there, size products that overflow, and offsets outside the file.

@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    d = tmp_path_factory.mktemp("gguf")
    m = random_model(7, **dict(ARGS, dim=32, hidden_dim=64), shared_classifier=False)
    save = d / "m.bin"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(E, "progress", lambda *_: None)
        E.write_checkpoint(m, str(save), 0)
    tok = write_tokenizer(d / "tok.bin", PIECES)
    out = d / "m.gguf"
    p = export(out, "--to-gguf", "--type", "q8_0", "--vocab", tok, "--bin", save)
    assert p.returncode == 0, p.stderr
    return out.read_bytes()


def gguf_key(data, key):
    """Offset of a metadata key's value type (right after the key string)."""
    raw = key.encode()
    return data.index(struct.pack("<Q", len(raw)) + raw) + 8 + len(raw)


def gguf_tensor(data, name):
    """Offset of a tensor info's n_dims (right after its name)."""
    raw = name.encode()
    return data.index(struct.pack("<Q", len(raw)) + raw) + 8 + len(raw)


def put(data, offset, fmt, *values):
    b = bytearray(data)
    struct.pack_into(fmt if fmt[0] in "<>" else "<" + fmt, b, offset, *values)
    return bytes(b)


def set_u32_key(key, value):
    return lambda d: put(d, gguf_key(d, key), "II", 4, value)


def tensor_field(name, field, fmt, value):
    """field: 'n_dims', 'ne0', 'type' or 'offset' of a 2-D tensor info."""
    at = {"n_dims": 0, "ne0": 4, "ne1": 12, "type": 20, "offset": 24}[field]
    return lambda d: put(d, gguf_tensor(d, name) + at, fmt, value)


def with_meta(**changes):
    """The GGUF rewritten with metadata values changed or added: key -> (value
    type, value bytes), so a value can change its type and size."""
    import tempfile
    from exporter.gguf import GGUF, string_bytes, value_bytes

    def mutate(data):
        with tempfile.NamedTemporaryFile(suffix=".gguf") as f:
            f.write(data)
            f.flush()
            g = GGUF(f.name)
            meta = {k: value_bytes(v) for k, v in g.meta.items()}
            meta.update(changes)
            out = b"GGUF" + struct.pack("<IQQ", 3, len(g.tensors), len(meta))
            out += b"".join(string_bytes(k) + struct.pack("<I", kind) + raw for k, (kind, raw) in meta.items())
            for name, (kind, shape, start) in g.tensors.items():
                out += string_bytes(name) + struct.pack(f"<I{len(shape)}QIQ", len(shape), *reversed(shape), kind,
                                                        start - g.data_start)
            return out.ljust(-(-len(out) // 32) * 32, b"\0") + bytes(g.buf[g.data_start:])
    return mutate


def scores_with(value):
    """tokenizer.ggml.scores as float64, the fourth one `value`."""
    scores = [-float(i) for i in range(len(PIECES))]
    scores[3] = value
    return struct.pack(f"<IQ{len(scores)}d", 12, len(scores), *scores)


BAD_GGUF = {
    "empty": (lambda d: b"", "magic"),
    "not-gguf": (lambda d: b"GGML" + d[4:], "not a GGUF"),
    "version-1": (lambda d: put(d, 4, "I", 1), "version 1"),
    "version-4": (lambda d: put(d, 4, "I", 4), "version 4"),
    "big-endian": (lambda d: put(d, 4, ">I", 3), "big-endian"),
    "huge-kv-count": (lambda d: put(d, 16, "Q", 2**62), "needs"),
    "huge-tensor-count": (lambda d: put(d, 8, "Q", 2**61), "cannot fit"),
    "key-length-past-end": (lambda d: put(d, 24, "Q", 2**63), "needs"),
    "unknown-value-type": (lambda d: put(d, gguf_key(d, "llama.block_count"), "I", 99), "value type 99"),
    "array-of-arrays": (lambda d: put(d, gguf_key(d, "tokenizer.ggml.scores") + 4, "I", 9), "array of arrays"),
    "array-count-huge": (lambda d: put(d, gguf_key(d, "tokenizer.ggml.scores") + 8, "Q", 2**60), "cannot fit"),
    "string-array-count-huge": (lambda d: put(d, gguf_key(d, "tokenizer.ggml.tokens") + 8, "Q", 2**60),
                                "cannot fit"),
    "string-length-huge": (lambda d: put(d, gguf_key(d, "general.architecture") + 4, "Q", 2**63), "needs"),
    "string-not-utf8": (lambda d: d.replace(b"llama", b"ll\xffma", 1), "UTF-8"),
    "duplicate-key": (lambda d: d.replace(b"general.file_type", b"llama.block_count", 1), "twice"),
    "alignment-not-power-of-2": (lambda d: d.replace(b"general.file_type", b"general.alignment", 1), "power of two"),
    "architecture": (lambda d: d.replace(b"\x05\x00\x00\x00\x00\x00\x00\x00llama", b"\x05\x00\x00\x00\x00\x00\x00\x00gpt_2", 1),
                     "architecture"),
    "missing-key": (lambda d: d.replace(b"llama.block_count", b"llama.block_cOunt", 1), "llama.block_count"),
    "block-count-zero": (set_u32_key("llama.block_count", 0), "block_count"),
    "feed-forward-length-mismatch": (set_u32_key("llama.feed_forward_length", 96), "shape"),
    "heads-not-dividing": (set_u32_key("llama.attention.head_count", 3), "n_heads"),
    "kv-heads-zero": (set_u32_key("llama.attention.head_count_kv", 0), "head_count_kv"),
    "partial-rotary": (set_u32_key("llama.rope.dimension_count", 8), "partial rotary"),
    "rms-eps-negative": (lambda d: put(d, gguf_key(d, "llama.attention.layer_norm_rms_epsilon"), "If", 6, -1.0), "epsilon"),
    "n-dims-zero": (tensor_field("blk.0.attn_q.weight", "n_dims", "I", 0), "dimensions"),
    "n-dims-five": (tensor_field("blk.0.attn_q.weight", "n_dims", "I", 5), "dimensions"),
    "dim-zero": (tensor_field("blk.0.attn_q.weight", "ne1", "Q", 0), "dimensions"),
    "dim-product-overflows": (lambda d: tensor_field("blk.0.attn_q.weight", "ne1", "Q", 2**62)(
        tensor_field("blk.0.attn_q.weight", "ne0", "Q", 2**62)(d)), "dimensions"),
    "type-q5_k": (tensor_field("blk.0.attn_q.weight", "type", "I", 13), "Q5_K"),
    "q6_k-partial-block": (tensor_field("blk.0.attn_q.weight", "type", "I", 14), "blocks of 256"),
    "type-unknown": (tensor_field("blk.0.attn_q.weight", "type", "I", 12345), "12345"),
    "q8_0-partial-block": (tensor_field("blk.0.attn_q.weight", "ne0", "Q", 16), "blocks"),
    "offset-misaligned": (tensor_field("blk.1.ffn_up.weight", "offset", "Q", 8), "misaligned"),
    "offset-past-end": (tensor_field("blk.1.ffn_up.weight", "offset", "Q", 2**40), "past"),
    "overlap": (tensor_field("blk.1.ffn_up.weight", "offset", "Q", 0), "overlap"),
    "duplicate-tensor": (lambda d: d.replace(b"blk.1.ffn_up.weight", b"blk.0.ffn_up.weight", 1), "twice"),
    "extra-tensor": (lambda d: d.replace(b"blk.1.ffn_up.weight", b"blk.1.ffn_xx.weight", 1), "not part of a Llama"),
    "tokenizer-model": (lambda d: put(d, gguf_key(d, "tokenizer.ggml.model") + 12, "5s", b"bert_"), "bert_"),
    "bos-id": (set_u32_key("tokenizer.ggml.bos_token_id", 5), "bos/eos"),
    "cut-in-data": (lambda d: d[:-100], "past the data"),
    "cut-in-infos": (lambda d: d[:gguf_tensor(d, "blk.1.ffn_up.weight")], "needs"),
    # values beyond what the header's float32 and the engines' caps hold
    "freq-base-beyond-float32": (with_meta(**{"llama.rope.freq_base": (12, struct.pack("<d", 1e300))}), "freq_base"),
    "rms-eps-below-float32": (with_meta(**{"llama.attention.layer_norm_rms_epsilon": (12, struct.pack("<d", 1e-300))}),
                              "epsilon"),
    "context-length-2^24": (set_u32_key("llama.context_length", 2**24), "max_seq_len = 16777216"),
    "context-length-2^31-1": (set_u32_key("llama.context_length", 2**31 - 1), "max_seq_len = 2147483647"),
    "block-count-2^31-1": (set_u32_key("llama.block_count", 2**31 - 1), "n_layers = 2147483647"),
    "score-beyond-float32": (with_meta(**{"tokenizer.ggml.scores": (9, scores_with(1e300))}), "scores"),
    "pre-an-array": (with_meta(**{"tokenizer.ggml.model": (8, struct.pack("<Q", 4) + b"gpt2"),
                                  "tokenizer.ggml.pre": (9, struct.pack("<IQQ", 8, 1, 5) + b"gpt-2")}),
                     "tokenizer.ggml.pre"),
}

@pytest.mark.parametrize("case", BAD_GGUF)
def test_export_refuses_bad_gguf(tiny_gguf, tmp_path, case):
    mutate, words = BAD_GGUF[case]
    (tmp_path / "in.gguf").write_bytes(mutate(tiny_gguf))
    p = export(tmp_path / "out.bin", "--gguf", tmp_path / "in.gguf", "-o", tmp_path / "tok.bin")
    err = p.stderr.decode()
    assert p.returncode == 1 and err.count("\n") == 1 and err.startswith("export.py: error: ") \
        and words in err and "Traceback" not in err, err
    assert sorted(os.listdir(tmp_path)) == ["in.gguf"]  # nothing written, no temporary left


def test_with_meta_unchanged_is_the_same_model(tiny_gguf, tmp_path):
    """The rewriting behind the cases above, with nothing changed, gives a file
    that exports to the same checkpoint as the original."""
    for name, data in (("a", tiny_gguf), ("b", with_meta()(tiny_gguf))):
        (tmp_path / f"{name}.gguf").write_bytes(data)
        assert export(tmp_path / f"{name}.bin", "--gguf", tmp_path / f"{name}.gguf", "-o", tmp_path / f"{name}.tok"
                      ).returncode == 0
    assert (tmp_path / "a.bin").read_bytes() == (tmp_path / "b.bin").read_bytes()


def test_to_gguf_refuses_bad_byte_level_ids(byte_level, tmp_path):
    """--to-gguf --vocab: every id of the byte-level block is checked before it is written."""
    m, _, data, x = byte_level
    ckpt = tmp_path / "m.bin"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(E, "progress", lambda *_: None)
        E.write_checkpoint(m, str(ckpt), 0)
    n_merges_at = x + 24 + 4 + 4 * 1 + 4 + 4 * 5  # as in corrupt_extensions
    for field, at, value in (("merge", n_merges_at + 4, 99999), ("merge", n_merges_at + 8, -1), ("bos", x + 20, 264),
                             ("eos", x + 28, 600), ("special token", x + 36, 700)):
        (tmp_path / "tok.bin").write_bytes(patched(data, at, "<i", value))
        p = export(tmp_path / "out.gguf", "--to-gguf", "--vocab", tmp_path / "tok.bin", "--bin", ckpt)
        err = p.stderr.decode()
        assert p.returncode == 1 and err.count("\n") == 1 and f"{field} id {value} " in err, err
        assert not (tmp_path / "out.gguf").exists()


def test_to_gguf_names_the_default_vocabulary(tmp_path):
    """Without --vocab, --to-gguf reads ./tokenizer.bin: a mismatch says which
    file, how many pieces against the model's vocabulary, and what --vocab does."""
    write_tokenizer(tmp_path / "tokenizer.bin", PIECES)
    p = subprocess.run([os.sys.executable, str(ROOT / "export.py"), "out.gguf", "--to-gguf", "--bin", STORIES],
                       cwd=tmp_path, capture_output=True, timeout=300)
    err = p.stderr.decode()
    assert p.returncode == 1 and err.count("\n") == 1 and "tokenizer.bin (no --vocab" in err \
        and "8 pieces, but the model's vocabulary has 512" in err and "--vocab names" in err, err
    assert sorted(os.listdir(tmp_path)) == ["tokenizer.bin"]


def export_main(monkeypatch, *args):
    """export.py run as a script in this process (quiet): None when it finished,
    else the message it stopped with; anything but its one-line stop fails the test."""
    import runpy
    import exporter
    import exporter.gguf
    for module in (exporter, E, exporter.gguf):
        monkeypatch.setattr(module, "progress", lambda *_: None)
    monkeypatch.setattr("sys.argv", ["export.py", *map(str, args)])
    try:
        runpy.run_path(str(ROOT / "export.py"), run_name="__main__")
    except SystemExit as e:
        assert isinstance(e.code, str) and e.code.startswith("export.py: error: ") and "\n" not in e.code, e.code
        return e.code
    return None


def test_export_gguf_cut_anywhere(tiny_gguf, tmp_path, monkeypatch):
    """The file cut at 40 places in its header, metadata and tensor infos, and
    in its data: always the one-line stop, never a traceback or a file."""
    end = gguf_tensor(tiny_gguf, "blk.1.ffn_up.weight") + 40
    for cut in sorted({*range(0, end, max(1, end // 32)), end, len(tiny_gguf) - 1, len(tiny_gguf) // 2}):
        (tmp_path / "in.gguf").write_bytes(tiny_gguf[:cut])
        assert export_main(monkeypatch, tmp_path / "out.bin", "--gguf", tmp_path / "in.gguf", "-o", tmp_path / "tok.bin")
        assert os.listdir(tmp_path) == ["in.gguf"], cut


def test_gguf_reader_random_mutations(tiny_gguf, tmp_path, monkeypatch):
    """A randomized mutation test of the Python reader (the fuzzing a C++ parser
    would get): 600 copies of the file with random bytes overwritten in its
    header, metadata and tensor infos, 8-byte counts set to random powers of
    two, or cut anywhere. export.py's whole --gguf path runs on each and must
    either write both files or stop with its one-line error, leaving nothing."""
    import random
    rng = random.Random(1)
    head = gguf_tensor(tiny_gguf, "output.weight") + 64
    out, tok = tmp_path / "out.bin", tmp_path / "tok.bin"
    refused = 0
    for i in range(600):
        d = bytearray(tiny_gguf)
        if i % 3 == 0:
            for _ in range(rng.randint(1, 4)):
                d[rng.randrange(head)] = rng.randrange(256)
        elif i % 3 == 1:
            at = rng.randrange(head - 8)
            d[at:at + 8] = struct.pack("<Q", 1 << rng.randrange(64))
        else:
            d = d[:rng.randrange(len(d))]
        (tmp_path / "in.gguf").write_bytes(bytes(d))
        if export_main(monkeypatch, out, "--gguf", tmp_path / "in.gguf", "-o", tok):
            refused += 1
            assert os.listdir(tmp_path) == ["in.gguf"], i
        else:
            out.unlink(), tok.unlink()
    assert refused > 300, refused
