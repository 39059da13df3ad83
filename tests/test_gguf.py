"""GGUF, llama.cpp's format, both ways, against llama.cpp itself: the npm
package node-llama-cpp (its prebuilt CPU library, installed into build/npm by
make; tests/gguf_reference.js) loads the same GGUF file and evaluates it.

Both engines compute the float64 forward of the file's weights (model.py in
double, the reference) up to their own roundings:
  - float32 arithmetic, in any summation order: at most rounding_depth x u x
    the logit's magnitude sum_k |W[v,k] h[k]| (test_model.py), for each engine;
  - for Q8_0 / Q4_0 weights, the int8 rounding of every matmul's input in
    groups of 32: runq's q = round(x / d), d = max|group| / 127, off by at most
    d / 2 per value; llama.cpp's the same but with d stored in fp16, so at most
    d / 2 + 127 |fp16(d) - d| <= 1.124 x d / 2.
The int8 roundings' worst case (quantization_bound, test_runq.py) is far
looser than the logits (it adds every error with the same sign through every
layer); here they are treated as rounding error analysis treats many small
roundings (Higham and Mary, "A new approach to probabilistic rounding error
analysis", 2019): independent, mean zero, within their half step. Then a
logit's change is, to first order, a sum of independent bounded terms, and by
Hoeffding's inequality exceeds z x sqrt(3) x its standard deviation sigma with
probability at most 2 exp(-z^2 / 2): z = 8.3 makes that 1e-15 per logit. sigma
is measured by SAMPLES forwards of the reference with every matmul input
perturbed uniformly within its half step; with 64 samples the estimate of
sigma^2 falls below a third of the truth with probability below 1e-8, so it is
multiplied by 3 (sqrt(3) on sigma). Logits of ours and llama.cpp's must be
within the two engines' bounds at every position of the same token sequence,
and the next token the same wherever the reference's lead over every rival
exceeds each engine's bound on that difference."""

import json
import struct
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import (BINARIES, E, M, MODELS, QBINARIES, ROOT, U, existing, group_error, node, random_model,
                      read_dump, rounding_depth, run, varied_strings)
from exporter.gguf import GGUF as Reader, gguf_name, gguf_tokenizer

GGUF = MODELS / "gguf"
NODE_LLAMA = ROOT / "build" / "npm" / "node_modules" / "node-llama-cpp"
LLAMA_Q8_0 = 1 + 2 * 127 * 2.0 ** -11  # llama.cpp's Q8_0 activation error over runq's half step: 1 + 127 / 1024
PROMPTS = ["Once upon a time", "Lily and Tom went to the park to play with a", "The cat sat on the", "One day, a"]

# the GGUF files written by llama.cpp's own tools: name -> quantized (runq runs the import; else run)
FILES = {"stories260K-f32": False, "tinystories-f32": False, "tinystories-q8_0": True, "tinystories-q4_0": True}


def export(*args, check=True):
    p = subprocess.run([sys.executable, str(ROOT / "export.py"), *map(str, args)], capture_output=True, text=True)
    if check and p.returncode != 0:
        raise AssertionError(f"export.py {args} exited {p.returncode}: {p.stderr}")
    return p


@pytest.fixture
def pair():
    """One build of run and runq: the OpenMP build for this CPU under make test
    (the builds agree with each other by test_hardening's and test_runq's checks),
    ./run and ./runq by hand."""
    builds = list(zip(BINARIES, QBINARIES))
    return tuple(map(existing, next((b for b in builds if b[0].endswith("gcc-omp")), builds[0])))


_answers = {}


def llama_cpp(gguf, request):
    """node-llama-cpp's answer to a request (see tests/gguf_reference.js), cached."""
    key = (str(gguf), json.dumps(request, sort_keys=True))
    if key not in _answers:
        if not NODE_LLAMA.exists():
            pytest.fail(f"{NODE_LLAMA} is missing: the npm test references (make test installs them into build/npm)")
        with tempfile.TemporaryDirectory() as d:
            (Path(d) / "request.json").write_text(json.dumps(request))
            p = subprocess.run([node(), str(ROOT / "tests" / "gguf_reference.js"), str(gguf), f"{d}/request.json",
                                f"{d}/logits.f32"], capture_output=True, text=True, timeout=600)
            assert p.returncode == 0, p.stderr
            answer = json.loads(p.stdout)
            rows = torch.from_file(f"{d}/logits.f32", size=(Path(d) / "logits.f32").stat().st_size // 4,
                                   dtype=torch.float32).double()
        lengths = [len(s) for s in request.get("sequences", [])]
        answer["logits"] = list(rows.view(sum(lengths), -1).split(lengths)) if lengths else []
        _answers[key] = answer
    return _answers[key]


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    """Each shared GGUF file imported with export.py's defaults: {name: (checkpoint, tokenizer)}."""
    out = tmp_path_factory.mktemp("gguf")
    files = {}
    for name in FILES:
        export(out / f"{name}.bin", "--gguf", GGUF / f"{name}.gguf", "-o", out / f"{name}-tok.bin")
        files[name] = out / f"{name}.bin", out / f"{name}-tok.bin"
    return files


SAMPLES = 64
Z = 8.3 * 3 ** 0.5 * 3 ** 0.5  # Hoeffding's z, uniform's sqrt(3), the estimate's margin sqrt(3)


def input_spread(m, tokens, half_step):
    """The logits' changes (SAMPLES, T, vocab) when every matmul input x of the
    float64 reference is perturbed uniformly within half_step(module, x) of
    each value, one draw per input tensor (q, k and v share theirs, as in runq)."""
    gen = torch.Generator().manual_seed(len(tokens))
    drawn = {}

    def perturb(module, args):
        x = args[0]
        key = (x.data_ptr(), tuple(x.shape))
        if key not in drawn:  # x is kept, so its address is not reused within this forward
            drawn[key] = x, (2 * torch.rand(x.shape, generator=gen, dtype=x.dtype) - 1) * half_step(module, x)
        return (x + drawn[key][1],)

    with torch.no_grad():
        ref = m.output(m.hidden(torch.tensor([tokens]))[0])
        hooks = [mod.register_forward_pre_hook(perturb) for mod in m.modules() if isinstance(mod, torch.nn.Linear)]
        try:
            changes = []
            for _ in range(SAMPLES):
                drawn.clear()
                changes.append(m.output(m.hidden(torch.tensor([tokens]))[0]) - ref)
        finally:
            for h in hooks:
                h.remove()
    return torch.stack(changes)


def engine_bounds(m, tokens, ours, theirs, output_group=32):
    """(reference logits (T, vocab), our bound, llama.cpp's bound on each logit,
    and a function giving both engines' larger bound on ref[p, a] - ref[p, b]
    for every b, at position p). ours / theirs: how that engine rounds each
    matmul's input: None; "int8" (groups of 32, the classifier's of
    output_group; llama.cpp's 1.124 x runq's); "fp16" (llama.cpp with F16
    weights: half an fp16 ulp, |x| 2^-11, or 2^-25 below fp16's normal range)."""
    m = m.double()
    with torch.no_grad():
        h = m.hidden(torch.tensor([tokens]))[0]
        ref, magnitude = m.output(h), h.abs() @ m.output.weight.abs().T
    fp32 = rounding_depth(m.args, len(tokens)) * U * magnitude
    steps = {"int8": lambda mod, x: group_error(x, output_group if mod is m.output else 32),
             "fp16": lambda mod, x: x.abs() * 2.0 ** -11 + 2.0 ** -25}
    spreads = {kind: input_spread(m, tokens, steps[kind]) for kind in {ours, theirs} - {None}}
    engines = [(ours, 1.0), (theirs, LLAMA_Q8_0 if theirs == "int8" else 1.0)]
    bounds = [fp32 if kind is None else fp32 + factor * Z * spreads[kind].pow(2).mean(0).sqrt()
              for kind, factor in engines]

    def pair(p, a):
        worst = torch.zeros_like(fp32[p])
        for kind, factor in engines:
            if kind is not None:
                d = spreads[kind][:, p, a:a + 1] - spreads[kind][:, p]
                worst = torch.maximum(worst, factor * Z * d.pow(2).mean(0).sqrt())
        return worst + fp32[p, a] + fp32[p]

    return ref, bounds[0], bounds[1], pair


def compare_with_llama_cpp(binary, ckpt, tok, gguf, rounds, tmp_path, report, label, prompts=PROMPTS, positions=128,
                           output_group=32):
    """Our greedy generation from each prompt, to the end of the context; the
    same sequence evaluated by llama.cpp; llama.cpp's own greedy generation.
    rounds: how llama.cpp rounds matmul inputs for this file's weights (None for
    F32, "int8" for Q8_0 / Q4_0, "fp16" for F16); runq rounds its own to int8."""
    m = M.load_checkpoint(str(ckpt))
    T = min(m.args.max_seq_len, positions)  # positions generated from each prompt
    worst, decided, free_agree = 0.0, 0, []
    for i, prompt in enumerate(prompts):
        dump = tmp_path / f"{i}.logits"
        run(binary, ckpt, "-z", tok, "-t", "0", "-n", T, "-k", "f32", "-i", prompt, env={"RUN_DUMP_LOGITS": str(dump)})
        _, tokens, ours, chosen = read_dump(dump, m.args.vocab_size)
        n_prompt = len(run(binary, ckpt, "-z", tok, "-m", "tokenize", "-i", prompt).stdout.split())
        steps = len(tokens) - n_prompt + 1
        # twice the context: node-llama-cpp shifts a full context (drops its start) before the last token
        answer = llama_cpp(gguf, {"context": 2 * T, "texts": [prompt], "sequences": [tokens],
                                  "generate": [{"prompt": tokens[:n_prompt], "steps": steps}]})
        # the same ids for the prompt (ours with BOS first)
        text = answer["texts"][0]  # ours, after BOS if the vocabulary has one
        assert tokens[n_prompt - len(text):n_prompt] == text and n_prompt - len(text) in (0, 1), \
            f"{label}: llama.cpp tokenizes {prompt!r} differently"
        theirs = answer["logits"][0]
        ref, ours_bound, their_bound, pair_bound = engine_bounds(m, tokens, "int8" if "runq" in binary else None,
                                                                 rounds, output_group)
        # the engines within their bounds of the reference, hence of each other
        assert ((ours - ref).abs() / ours_bound).max().item() <= 1.0, f"{label}: ours off the reference"
        ratio = ((ours - theirs).abs() / (ours_bound + their_bound)).max().item()
        worst = max(worst, ratio)
        assert ratio <= 1.0, f"{label}, {prompt!r}: logits {ratio:.2f} x the bound away from llama.cpp's"
        # greedy tokens where no rounding within the bounds could change them
        best = ref.argmax(-1)
        sure = [bool((ref[p, best[p]] - ref[p] > pair_bound(p, best[p])).sum() == ref.shape[1] - 1)
                for p in range(len(tokens))]
        for pos in range(n_prompt - 1, len(tokens)):
            if sure[pos] and chosen[pos] != -1:
                assert chosen[pos] == theirs[pos].argmax().item(), f"{label}: next token at {pos} differs"
                decided += 1
        # llama.cpp generating on its own: the same tokens until a position the bounds leave open
        free = answer["generate"][0]
        ours_free = tokens[n_prompt:] + [chosen[-1]]
        k = next((j for j, (a, b) in enumerate(zip(free, ours_free)) if a != b), len(free))
        if k < len(free):
            assert not sure[n_prompt - 1 + k], f"{label}: llama.cpp's greedy text leaves ours at step {k}, a decided one"
        free_agree.append(k)
    report(f"GGUF {label}: logits within {worst:.3f} of the bound from llama.cpp's; next token equal at all "
           f"{decided} decided positions; free greedy runs agree for {free_agree} tokens")
    return decided


@pytest.mark.parametrize("name", FILES)
def test_imported_gguf_runs_like_llama_cpp(pair, imported, name, tmp_path, report):
    """The four GGUF files llama.cpp's tools wrote, imported by export.py --gguf
    and run by run (f32) or runq (q8_0, q4_0 exactly as version 2 / 3)."""
    ckpt, tok = imported[name]
    binary = pair[1] if FILES[name] else pair[0]
    decided = compare_with_llama_cpp(binary, ckpt, tok, GGUF / f"{name}.gguf", "int8" if FILES[name] else None,
                                     tmp_path, report, name)
    assert decided >= 100, "too few decided positions to test"


def test_imported_tokenizer_is_the_original(imported):
    """llama.cpp's converter took these vocabularies from our tokenizer.bin
    files; importing them gives those files back byte for byte."""
    assert imported["stories260K-f32"][1].read_bytes() == (MODELS / "stories260K" / "tok512.bin").read_bytes()
    for name in ("tinystories-f32", "tinystories-q8_0", "tinystories-q4_0"):
        assert imported[name][1].read_bytes() == (ROOT / "models" / "tinystories-tok.bin").read_bytes()


def test_imported_weights_are_gguf_values(imported):
    """Q8_0 and Q4_0 copied without loss: every weight our file holds equals the
    GGUF value (fp16 scale x integer) exactly, and f32 bit for bit."""
    for name in FILES:
        g = Reader(str(GGUF / f"{name}.gguf"))
        sd = M.load_checkpoint(str(imported[name][0])).state_dict()
        for ours, t in sd.items():
            theirs = "token_embd.weight" if ours == "output.weight" and "output.weight" not in g.tensors else gguf_name(ours)
            assert torch.equal(t, g.get(theirs)), f"{name}: {ours}"


# ----------------------------------------------------------------------------
# Our models written as GGUF (export.py --to-gguf), loaded by llama.cpp

OURS = {"tinystories": (ROOT / "models" / "tinystories.bin", ROOT / "models" / "tinystories-tok.bin"),
        "stories260K": (MODELS / "stories260K" / "stories260K.bin", MODELS / "stories260K" / "tok512.bin")}


@pytest.mark.parametrize("kind", ["f32", "f16", "q8_0", "q4_0"])
@pytest.mark.parametrize("model", OURS)
def test_exported_gguf_runs_like_ours(pair, model, kind, tmp_path, report):
    """Our fp32 checkpoint as a GGUF of each type: llama.cpp on it against run on
    the checkpoint (f32: the same weights), or against our engine on the GGUF
    imported back (the weights llama.cpp holds, exactly: f16 values as fp32 for
    run, q8_0 / q4_0 as versions 2 / 3 for runq). stories260K's hidden_dim 172
    is not whole blocks of 32: its w2 stays F32 (said in one line), and the mixed
    file imports as fp32 (said too)."""
    ckpt, tok = OURS[model]
    gguf = tmp_path / f"{model}-{kind}.gguf"
    p = export(gguf, "--to-gguf", "--type", kind, "--vocab", tok, "--bin", ckpt)
    mixed = model == "stories260K" and kind in ("q8_0", "q4_0")
    assert ("kept in F32" in p.stderr) == mixed, p.stderr
    if kind == "f32":
        binary, ours = pair[0], ckpt
    else:
        ours = tmp_path / "back.bin"
        p = export(ours, "--gguf", gguf, "-o", tmp_path / "back-tok.bin")
        assert (tmp_path / "back-tok.bin").read_bytes() == tok.read_bytes()
        assert ("written as fp32" in p.stderr) == mixed, p.stderr
        binary = pair[0] if mixed or kind == "f16" else pair[1]
    rounds = {"f32": None, "f16": "fp16"}.get(kind, "int8")
    decided = compare_with_llama_cpp(binary, ours, tok, gguf, rounds, tmp_path, report, f"{model} -> {kind}")
    assert decided >= 100, "too few decided positions to test"


@pytest.mark.parametrize("kind", ["q8_0", "q4_0"])
def test_quantized_like_llama_quantize(kind, tmp_path):
    """llama.cpp's own llama-quantize made tinystories-q8_0/q4_0.gguf from
    tinystories-f32.gguf: our --to-gguf from that same f32 file writes every
    tensor byte for byte as it did (the rounding rules are llama.cpp's). Its
    output.weight is a copy of token_embd, which we store once."""
    out = tmp_path / f"{kind}.gguf"
    export(out, "--to-gguf", "--type", kind, "--gguf", GGUF / "tinystories-f32.gguf")
    ours, theirs = Reader(str(out)), Reader(str(GGUF / f"tinystories-{kind}.gguf"))
    assert set(ours.tensors) == set(theirs.tensors) - {"output.weight"}
    for name in ours.tensors:
        assert bytes(ours.raw(name)[0]) == bytes(theirs.raw(name)[0]), name


@pytest.mark.parametrize("kind", ["q8_0", "q4_0"])
def test_round_trip_keeps_every_block(kind, tmp_path):
    """GGUF -> ours (version 2 / 3) -> GGUF: every tensor's bytes unchanged,
    including q4_0's Q8_0 classifier (kept in int8 by our version 3)."""
    src = GGUF / f"tinystories-{kind}.gguf"
    export(tmp_path / "ours.bin", "--gguf", src, "-o", tmp_path / "tok.bin")
    export(tmp_path / "back.gguf", "--to-gguf", "--vocab", tmp_path / "tok.bin", "--bin", tmp_path / "ours.bin")
    back, orig = Reader(str(tmp_path / "back.gguf")), Reader(str(src))
    for name in orig.tensors:  # a classifier equal to the embedding is stored once
        twin = name if name in back.tensors else "token_embd.weight"
        assert back.tensors[twin][0] == orig.tensors[name][0], name
        assert bytes(back.raw(twin)[0]) == bytes(orig.raw(name)[0]), name
    assert set(back.tensors) <= set(orig.tensors)
    # and GGUF -> GGUF directly: each tensor already of the type written is copied as it is
    export(tmp_path / "again.gguf", "--to-gguf", "--gguf", src)
    again = Reader(str(tmp_path / "again.gguf"))
    for name in again.tensors:
        assert bytes(again.raw(name)[0]) == bytes(orig.raw(name)[0]), name


# ----------------------------------------------------------------------------
# A Llama 3-shaped model: the byte-level vocabulary (tokenizer.ggml.model gpt2)
# and Llama 3.1's RoPE scaling (rope_freqs) both ways

LLAMA3_JSON = ROOT / "build" / "npm" / "node_modules" / "@lenml" / "tokenizer-llama3" / "models" / "tokenizer.json"


@pytest.fixture(scope="module")
def llama3_gguf(tmp_path_factory):
    """Random weights in Llama 3.2's arrangement (GQA, tied embeddings, rope_theta
    500000, RoPE scaling with an original context of 32 so that every kind of
    frequency is used) with the real Llama 3 tokenizer, as ours and as GGUF."""
    if not LLAMA3_JSON.exists():
        pytest.fail(f"{LLAMA3_JSON} is missing: the npm test references (make test installs them into build/npm)")
    d = tmp_path_factory.mktemp("llama3")
    export("--tokenizer", LLAMA3_JSON, "-o", d / "tok.bin")
    m = random_model(31, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=96, vocab_size=128256,
                     max_seq_len=128, rope_theta=500000.0, rope_scaling=(8.0, 1.0, 4.0, 32))
    with torch.no_grad():  # a sharper model, so that greedy tokens are decided
        m.output.weight.mul_(8)
    E.write_checkpoint(m, str(d / "model.bin"), 1)
    export(d / "model.gguf", "--to-gguf", "--vocab", d / "tok.bin", "--bin", d / "model.bin")
    return d / "model.bin", d / "tok.bin", d / "model.gguf"


def test_llama3_gguf_runs_like_ours(pair, llama3_gguf, tmp_path, report):
    ckpt, tok, gguf = llama3_gguf
    g = Reader(str(gguf))
    assert g.meta["tokenizer.ggml.model"] == "gpt2" and g.meta["tokenizer.ggml.pre"] == "llama-bpe"
    assert "rope_freqs.weight" in g.tensors
    # llama.cpp hands over each position's 128,256 logits slowly: two prompts, 64 positions
    assert compare_with_llama_cpp(pair[0], ckpt, tok, gguf, None, tmp_path, report, "llama3-shaped",
                                  PROMPTS[:2], 64) >= 50


def test_llama3_gguf_tokenizes_like_ours(llama3_gguf):
    """llama.cpp's own byte-level BPE on the vocabulary we wrote (merges, the
    split by name, special tokens) gives our ids for 1,000 varied strings."""
    ckpt, tok, gguf = llama3_gguf
    strings = varied_strings(1000, seed=3)
    answer = llama_cpp(gguf, {"context": 64, "texts": strings})
    data = b"".join(s.encode() + b"\0" for s in strings)
    got = subprocess.run([existing("build/tokenize_many"), str(tok), "128256"], input=data, capture_output=True,
                         check=True).stdout.decode().splitlines()
    ours = [list(map(int, line.split())) for line in got]
    bad = [(s, a, b) for s, a, b in zip(strings, answer["texts"], ours) if a != b]
    assert not bad, f"{len(bad)} of {len(strings)} strings tokenized otherwise; first: {bad[0]!r}"


def test_llama3_gguf_round_trip(llama3_gguf, tmp_path):
    """GGUF -> ours gives our tokenizer.bin back byte for byte; the RoPE
    scaling is refused by name (llama.cpp keeps only the frequency factors)."""
    ckpt, tok, gguf = llama3_gguf
    p = export(tmp_path / "back.bin", "--gguf", gguf, "-o", tmp_path / "back-tok.bin", check=False)
    assert p.returncode == 1 and "rope_freqs" in p.stderr and "--hf" in p.stderr, p.stderr
    vocabulary = gguf_tokenizer(Reader(str(gguf)))  # the vocabulary alone comes back exactly
    assert vocabulary[3] is not None
    E.write_tokenizer(str(gguf), str(tmp_path / "again.bin"), E.tokenizer_pieces(str(gguf), *vocabulary), vocabulary[3])
    assert (tmp_path / "again.bin").read_bytes() == tok.read_bytes()


# ----------------------------------------------------------------------------
# Q6_K: the classifier llama-quantize writes into Q4_0 files when dim is a multiple of 256


def write_raw_gguf(path, meta, tensors):
    """A GGUF v3 file from metadata and [(name, our shape, ggml type, raw bytes)]."""
    from exporter.gguf import string_bytes, value_bytes
    head = b"GGUF" + struct.pack("<IQQ", 3, len(tensors), len(meta))
    for key, v in meta.items():
        kind, raw = value_bytes(v)
        head += string_bytes(key) + struct.pack("<I", kind) + raw
    data, offset = b"", 0
    for name, shape, kind, raw in tensors:
        ne = tuple(reversed(shape))
        head += string_bytes(name) + struct.pack(f"<I{len(ne)}QIQ", len(ne), *ne, kind, len(data))
        data += raw + bytes(-len(raw) % 32)
    Path(path).write_bytes(head + bytes(-len(head) % 32) + data)


def test_q6_k_classifier(pair, tmp_path, report):
    """A Q4_0 file whose classifier is Q6_K (random super-blocks: every bit
    pattern is a valid one). Imported as fp32 every value is exact, and run
    matches llama.cpp on the file (whose classifier reads its input as Q8_K,
    blocks of 256); imported by default it becomes version 3 with the
    classifier requantized to int8, said in a line."""
    m = random_model(41, dim=256, n_layers=2, n_heads=4, n_kv_heads=4, hidden_dim=512, vocab_size=512,
                     max_seq_len=128, shared_classifier=False)
    E.write_checkpoint(m, str(tmp_path / "m.bin"), 0)
    tok = MODELS / "stories260K" / "tok512.bin"
    export(tmp_path / "q4.gguf", "--to-gguf", "--type", "q4_0", "--vocab", tok, "--bin", tmp_path / "m.bin")
    g = Reader(str(tmp_path / "q4.gguf"))
    rng = np.random.default_rng(5)
    q6 = rng.integers(0, 256, size=(512, 210), dtype=np.uint8)
    q6[:, 192:208] = rng.integers(1, 64, size=(512, 16), dtype=np.uint8)  # scales
    q6[:, 208:210] = np.frombuffer(np.full(512, 1e-4, dtype="<f2").tobytes(), np.uint8).reshape(512, 2)
    tensors = [(name, shape, kind, bytes(g.raw(name)[0])) for name, (kind, shape, _) in g.tensors.items()]
    tensors = [(n, s_, 14, q6.tobytes()) if n == "output.weight" else (n, s_, k, r) for n, s_, k, r in tensors]
    write_raw_gguf(tmp_path / "q6.gguf", g.meta, tensors)
    export(tmp_path / "exact.bin", "--version", 0, "--gguf", tmp_path / "q6.gguf", "-o", tmp_path / "tok.bin")
    decided = compare_with_llama_cpp(pair[0], tmp_path / "exact.bin", tok, tmp_path / "q6.gguf", "int8", tmp_path,
                                     report, "q4_0 + Q6_K classifier", output_group=256)
    assert decided >= 60, "too few decided positions to test"
    p = export(tmp_path / "q.bin", "--gguf", tmp_path / "q6.gguf", "-o", tmp_path / "tok.bin")
    assert "classifier" in p.stderr and "requantized from its Q6_K values" in p.stderr, p.stderr
    data = (tmp_path / "q.bin").read_bytes()
    assert struct.unpack_from("<2i", data, 0)[1] == 3 and struct.unpack_from("<i", data, 92)[0] == 2
    run(pair[1], tmp_path / "q.bin", "-z", tok, "-n", 16)


@pytest.mark.parametrize("kind", ["f16", "bf16"])
def test_f16_bf16_import_exactly(kind, tmp_path):
    """F16 and BF16 matrices (here the f32 file's values cut to those types)
    widen to float32 exactly: every weight of the import equals numpy's fp16
    value, or the bf16 bits shifted up 16."""
    g = Reader(str(GGUF / "tinystories-f32.gguf"))
    tensors, expected = [], {}
    for name, (k, shape, _) in g.tensors.items():
        w = g.get(name).numpy()
        if len(shape) == 2 and kind == "f16":
            raw, k, w = w.astype("<f2").tobytes(), 1, w.astype(np.float16).astype(np.float32)
        elif len(shape) == 2:
            top = (w.view(np.uint32) >> 16).astype("<u2")
            raw, k, w = top.tobytes(), 30, (top.astype(np.uint32) << 16).view(np.float32)
        else:
            raw = w.tobytes()
        tensors.append((name, shape, k, raw))
        expected[name] = torch.from_numpy(w)
    write_raw_gguf(tmp_path / "in.gguf", g.meta, tensors)
    export(tmp_path / "out.bin", "--gguf", tmp_path / "in.gguf", "-o", tmp_path / "tok.bin")
    for ours, t in M.load_checkpoint(str(tmp_path / "out.bin")).state_dict().items():
        theirs = "token_embd.weight" if ours == "output.weight" and "output.weight" not in g.tensors else gguf_name(ours)
        assert torch.equal(t, expected[theirs]), ours
