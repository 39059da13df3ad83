"""The tokenizer against sentencepiece and the Llama 2 reference ids, and the
tokenizer export against llama2.c's tokenizer.bin."""

import random
import subprocess
import sys

import pytest

from conftest import (LLAMA_BIN, LLAMA_MODEL, MODELS, ROOT, random_model, run, save_model, varied_strings)


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
