"""The tokenizer against sentencepiece and the Llama 2 reference ids, and the
tokenizer export against llama2.c's tokenizer.bin."""

import random
import subprocess
import sys

import pytest

from conftest import (LLAMA_BIN, LLAMA_MODEL, MODELS, ROOT, random_model, run, save_model)


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


def test_export_matches_llama2c_tokenizer_bin(llama_tok):
    tok, _ = llama_tok
    assert tok.read_bytes() == LLAMA_BIN.read_bytes()


# Reference ids published with llama2.c (sentencepiece's encoding with BOS).
@pytest.mark.parametrize("text, ids", [
    ("I believe the meaning of life is", "1 306 4658 278 6593 310 2834 338"),
    ("Simply put, the theory of relativity states that ",
     "1 3439 17632 1925 29892 278 6368 310 14215 537 5922 393 29871"),
    ("", "1"),
])
def test_llama2_reference_ids(binary, llama_tok, text, ids):
    tok, model = llama_tok
    assert run(binary, model, "-z", tok, "-m", "tokenize", "-i", text).stdout.decode() == ids + "\n"


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


def test_matches_sentencepiece(llama_tok):
    try:
        import sentencepiece as spm
    except ImportError:
        pytest.fail("sentencepiece is not installed: the reference for this test (make test installs it)")
    sp = spm.SentencePieceProcessor(model_file=str(LLAMA_MODEL))
    tok, _ = llama_tok
    strings = varied_strings(3000)
    p = subprocess.run([str(ROOT / "build" / "tokenize_many"), str(tok), "32000"],
                       input=b"".join(s.encode() + b"\0" for s in strings), capture_output=True, check=True)
    got = p.stdout.decode().splitlines()
    assert len(got) == len(strings)
    bad = [(s, g, [1] + sp.encode(s)) for s, g in zip(strings, got) if list(map(int, g.split())) != [1] + sp.encode(s)]
    assert not bad, f"{len(bad)} of {len(strings)} differ; first: {bad[0]!r}"
