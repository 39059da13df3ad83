"""Byte-level BPE tokenizers (Llama 3, GPT-2, SmolLM2 style) against an
independent implementation: transformers.js' tokenizer from npm (installed into
build/npm by make), loading the real tokenizer.json files its packages ship.
Our export of the same tokenizer.json, encoded by run.cpp (build/tokenize_many),
must give the same ids and decode to the same bytes for every string."""

import json
import random
import subprocess
import sys
import unicodedata

import pytest
import torch

from conftest import (GPT2, LLAMA3, ROOT, node, package, random_model, read_dump, run, varied_strings)
from exporter.tokenizers import read_tokenizer_bin


def export(tokenizer_json, out):
    subprocess.run([sys.executable, str(ROOT / "export.py"), "--tokenizer", str(tokenizer_json), "-o", str(out)],
                   check=True, capture_output=True)
    return out


@pytest.fixture(scope="module")
def llama3(tmp_path_factory):
    tj, cfg = package(LLAMA3)
    return export(tj, tmp_path_factory.mktemp("llama3") / "tok.bin"), tj, cfg, 128256


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory):
    tj, cfg = package(GPT2)
    return export(tj, tmp_path_factory.mktemp("gpt2") / "tok.bin"), tj, cfg, 50257


@pytest.fixture(scope="module")
def smollm_like(tmp_path_factory):
    """GPT-2's vocabulary behind SmolLM2's pre-tokenizer: each ASCII digit split
    off first, then GPT-2's regex (no package ships SmolLM2's tokenizer.json;
    transformers.js implements the Digits step on its own)."""
    tj_path, cfg = package(GPT2)
    tj = json.loads(tj_path.read_text(encoding="utf-8"))
    tj["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [
        {"type": "Digits", "individual_digits": True}, tj["pre_tokenizer"]]}
    d = tmp_path_factory.mktemp("smollm")
    (d / "tokenizer.json").write_text(json.dumps(tj), encoding="utf-8")
    return export(d / "tokenizer.json", d / "tok.bin"), d / "tokenizer.json", cfg, 50257


def assigned(cp):
    """A code point whose class the exporter's Unicode database knows: ours
    comes from Python's (14.0 on Debian 12), node's may be newer, and a
    character assigned in between (CJK Extension H, Kawi, ...) is a letter to
    it but "other" to us."""
    return not 0xD800 <= cp < 0xE000 and unicodedata.category(chr(cp)) != "Cn"


def byte_strings(n, seed):
    """At least n byte strings: stories, accents, CJK, emoji, code and
    whitespace (varied_strings), numbers of every length, whitespace runs of
    every kind, contractions in every case, special-token text, random
    characters from all planes, and ill-formed UTF-8."""
    rnd = random.Random(seed)
    out = [s.encode() for s in varied_strings(n // 2, seed)]
    digits = "".join(str(i % 10) for i in range(1, 30))
    out += [digits[:k].encode() for k in range(1, 30)] + [f"x{digits[:k]} {digits[:k]}y".encode() for k in range(1, 12)]
    out += [f"{rnd.randint(0, 10 ** rnd.randint(1, 15))}{rnd.choice(['', '.', ',', ' ', 'px', '%'])}"
            f"{rnd.randint(0, 999)}".encode() for _ in range(100)]
    spaces = [" ", "  ", "\t", "\n", "\r", "\r\n", "\u00a0", "\u3000", "\u2028", "\u0085", "\ufeff", "\u200b", "\x0b"]
    out += ["".join(rnd.choice(spaces) for _ in range(rnd.randint(1, 6))).join(
        rnd.choice(["", "a", "!", "1", "é", "中"]) for _ in range(3)).encode() for _ in range(300)]
    words = ["it", "I", "we", "THEY", "you", "she", "Don", "o", ""]
    tails = ["s", "S", "t", "T", "re", "RE", "Re", "rE", "ve", "VE", "m", "M", "ll", "LL", "lL", "d", "D", "x", "", "ſ"]
    out += [f"{rnd.choice(words)}'{rnd.choice(tails)}{rnd.choice(['', ' ', '.', 'abc', '!'])}".encode()
            for _ in range(200)]
    out += [t.encode() for t in ["<|begin_of_text|>", "<|eot_id|>hi", "a<|endoftext|>b", "<|start_header_id|>user"]]
    for _ in range(n // 4):  # random characters from every plane, mixed with ASCII
        cps = [rnd.choice([rnd.randint(0x20, 0x7E), rnd.randint(0x80, 0x7FF), rnd.randint(0x800, 0xFFFF),
                           rnd.randint(0x10000, 0x10FFFF)]) for _ in range(rnd.randint(1, 20))]
        out.append("".join(chr(c) for c in cps if assigned(c)).encode())
    for _ in range(n // 8):  # ill-formed UTF-8: random bytes, cut characters, surrogates, overlongs
        parts = [bytes(rnd.randint(0, 255) for _ in range(rnd.randint(1, 4))), "é中😀".encode()[:rnd.randint(1, 8)],
                 b"\xed\xa0\x80", b"\xc0\xaf", b"\xf4\x90\x80\x80", b"\xe2\x82", b"abc ", b"\n"]
        out.append(b"".join(rnd.choice(parts) for _ in range(rnd.randint(1, 6))))
    return [s.replace(b"\0", b"") for s in out]


def compare(tok, tj, cfg, vocab, strings):
    data = b"".join(s + b"\0" for s in strings)
    ref = subprocess.run([node(), str(ROOT / "tests" / "tokenizer_reference.js"), str(tj), str(cfg)], input=data,
                         capture_output=True, check=True).stdout.decode().splitlines()
    got = subprocess.run([str(ROOT / "build" / "tokenize_many"), str(tok), str(vocab), "--decode"], input=data,
                         capture_output=True, check=True).stdout.decode().splitlines()
    assert len(ref) == len(got) == 2 * len(strings)
    bad = [(s, r, g) for s, r, g in zip(strings, ref[0::2], got[0::2]) if r != g]
    assert not bad, f"{len(bad)} of {len(strings)} strings get other ids; first: {bad[0]!r}"
    bad = [(s, r, g) for s, r, g in zip(strings, ref[1::2], got[1::2]) if r != g]
    assert not bad, f"{len(bad)} of {len(strings)} strings decode otherwise; first: {bad[0]!r}"
    # the round trip is exact for well-formed text (and the reference agrees)
    for s, g in zip(strings, got[1::2]):
        if s.decode("utf-8", "replace").encode() == s:
            assert bytes.fromhex(g) == s
    return [list(map(int, line.split())) for line in got[0::2]]


def test_llama3_matches_reference(llama3):
    # and every 20th piece of the vocabulary as text: some of them (" việc",
    # "ektedir") are pieces the merges never make, which ignore_merges keeps whole
    pieces = read_tokenizer_bin(str(llama3[0]), 128256)[0][:128000:20]
    strings = byte_strings(3000, seed=0) + [p for p in pieces if b"\0" not in p]
    assert len(strings) >= 3000
    ids = compare(*llama3, strings)
    assert not any(i >= 128000 for row in ids for i in row), "text became a special token"


def test_gpt2_matches_reference(gpt2):
    ids = compare(*gpt2, byte_strings(1500, seed=1))
    assert 50256 not in {i for row in ids for i in row}, "text became <|endoftext|>"


def test_smollm_style_digits_match_reference(smollm_like):
    compare(*smollm_like, byte_strings(1000, seed=2))


# ---------------------------------------------------------------------------
# Chat: -c llama3 against the template in the package's tokenizer_config.json


def eager_model(end_id, vocab=128256):
    """A random model whose every greedy choice is end_id: the embeddings share
    a large first coordinate that survives the small layers, and only end_id's
    classifier row reads it. An answer then ends at once and the next turn follows."""
    m = random_model(7, dim=8, hidden_dim=16, n_layers=1, n_heads=2, n_kv_heads=1, vocab_size=vocab,
                     max_seq_len=256, shared_classifier=False)
    with torch.no_grad():
        m.tok_embeddings.weight[:, 0] = 50
        for layer in m.layers:
            layer.attention.wo.weight.mul_(0.01)
            layer.feed_forward.w2.weight.mul_(0.01)
        m.output.weight.mul_(0.01)
        m.output.weight[end_id] = 0
        m.output.weight[end_id, 0] = 10
    return m


def chat_reference(tj, cfg, conversations):
    p = subprocess.run([node(), str(ROOT / "tests" / "chat_reference.js"), str(tj), str(cfg)],
                       input=json.dumps(conversations).encode(), capture_output=True, check=True)
    return [list(map(int, line.split())) for line in p.stdout.decode().splitlines()]


@pytest.mark.parametrize("end", ["<|eot_id|>", "<|end_of_text|>"])
@pytest.mark.parametrize("system", ["be brief", ""])
def test_llama3_chat_renders_the_template(engine, llama3, tmp_path, system, end):
    tok, tj, cfg, vocab = llama3
    ids = {t["content"]: t["id"] for t in json.loads(tj.read_text(encoding="utf-8"))["added_tokens"]}
    ckpt = engine.save(eager_model(ids[end]), tmp_path / "m.bin", 8)
    # the template trims each message; special-token text in a message stays text
    # here (test_llama3_matches_reference), where the reference's rendered string would not
    users = ["  Hi there, it's me!\t ", "again: 123"]
    sys_msg = [{"role": "system", "content": system}] if system else []
    turn1, full = chat_reference(tj, cfg, [
        sys_msg + [{"role": "user", "content": users[0]}],
        sys_msg + [{"role": "user", "content": users[0]}, {"role": "assistant", "content": ""},
                   {"role": "user", "content": users[1]}]])
    eot = ids["<|eot_id|>"]
    assert full[:len(turn1)] == turn1 and full[len(turn1)] == eot
    dump = tmp_path / "dump.bin"
    run(engine.binary, ckpt, "-z", tok, "-m", "chat", "-c", "llama3", "-y", system, "-t", "0", "-n", 256,
        stdin="\n".join(users).encode() + b"\n", env={"RUN_DUMP_LOGITS": str(dump)})
    _, fed, _, chosen = read_dump(dump, vocab)
    # each answer is the end token at once; <|eot_id|> closes it in the context
    assert fed == full + [eot], f"{fed}\n{full}"
    assert chosen[len(turn1) - 1] == ids[end] and chosen[len(turn1)] == -1
