"""export.py --awq: the folded scales leave the fp32 model's function alone,
the calibration encoder is run's, and on the real stories260K model AWQ
lowers int4's held-out perplexity."""

import copy
import re
import subprocess
import sys

import pytest
import torch

from conftest import (E, M, MODELS, ROOT, STORIES, TOK512, U, random_model, reference_logits, rounding_depth,
                      run, save_model, varied_strings)
from exporter import awq
from exporter.tokenizers import SentencePieceEncoder, read_tokenizer_bin

CONFIGS = {  # grouped-query (wo's scales tied across the query heads of a value head), and plain
    "gqa": dict(dim=48, hidden_dim=100, n_layers=2, n_heads=6, n_kv_heads=2, vocab_size=300, max_seq_len=64),
    "mha-separate": dict(dim=32, hidden_dim=72, n_layers=2, n_heads=4, n_kv_heads=4, vocab_size=270,
                         max_seq_len=64, shared_classifier=False),
}


@pytest.mark.parametrize("name", CONFIGS)
def test_scaling_keeps_fp32_logits(name, monkeypatch):
    """Folding perturbs each weight by at most three float32 roundings (times s,
    divided by another s, or an RMSNorm weight divided by s), far fewer than the
    n roundings per dot product behind rounding_depth's bound: the scaled
    model's float64 logits stay within that bound of the original's."""
    m = random_model(7, **CONFIGS[name])
    with torch.no_grad():  # channels of very different sizes, so the scales are far from 1
        for layer in m.layers:
            layer.attention_norm.weight.mul_(torch.exp(2 * torch.randn(m.args.dim)))
            layer.ffn_norm.weight.mul_(torch.exp(2 * torch.randn(m.args.dim)))
    g = torch.Generator().manual_seed(3)
    windows = [[1] + torch.randint(3, m.args.vocab_size, (40,), generator=g).tolist() for _ in range(4)]
    scaled = copy.deepcopy(m)
    monkeypatch.setattr(awq, "progress", lambda *_: None)
    awq.apply_awq(scaled, windows, 8, 7)
    moved = max((a - b).abs().max().item() for a, b in zip(m.state_dict().values(), scaled.state_dict().values()))
    assert moved > 0.1, "the scales should have changed the weights"
    tokens = windows[0]
    ref, magnitude = reference_logits(m, tokens)
    got, _ = reference_logits(scaled, tokens)
    bound = rounding_depth(m.args, len(tokens)) * U * magnitude
    assert ((got - ref).abs() <= bound).all(), ((got - ref).abs() / bound).max().item()


def test_clipping_leaves_the_embedding_table(monkeypatch):
    """A shared table is untied before clipping: the lookups keep the exact
    float32 rows, the classifier is clipped (every value within its row group's
    old range, some moved), and the header then says so (shared flag 0)."""
    m = random_model(5, **CONFIGS["gqa"])
    table = m.tok_embeddings.weight.detach().clone()
    g = torch.Generator().manual_seed(4)
    windows = [[1] + torch.randint(3, m.args.vocab_size, (40,), generator=g).tolist() for _ in range(4)]
    monkeypatch.setattr(awq, "progress", lambda *_: None)
    awq.clip_awq(m, windows, 8, 7)
    assert not m.args.shared_classifier
    assert torch.equal(m.tok_embeddings.weight, table)
    cls = m.output.weight.detach()
    assert not torch.equal(cls, table), "some classifier group should have been clipped"
    assert (cls.abs() <= table.abs().view(-1, 6, 8).amax(2, keepdim=True).expand(-1, 6, 8).reshape(cls.shape)).all()
    assert E.header_bytes(m.args, 3, 8)[36] == 0  # magic, version, seven ints, then the flag


def test_encoder_is_runs(binary, llama_tok):
    """exporter.awq.encode (calibration text -> ids) against run -m tokenize, on two vocabularies."""
    for tok, model in ((TOK512, STORIES), llama_tok):
        pieces, scores = read_tokenizer_bin(tok)
        for text in varied_strings(150, seed=5):
            ids = [int(t) for t in run(binary, model, "-z", tok, "-m", "tokenize", "-i", text).stdout.split()]
            assert SentencePieceEncoder(pieces, scores)(text) == ids[1:], text


def export(*args):
    return subprocess.run([sys.executable, str(ROOT / "export.py"), *map(str, args)], capture_output=True)


def perplexity(qbinary, path, text):
    out = run(qbinary, path, "-z", TOK512, "-m", "perplexity", "-f", text).stdout.decode()
    return float(re.match(r"perplexity (\S+)", out)[1])


@pytest.fixture(scope="module")
def int4_files(tmp_path_factory):
    """stories260K in int4, plain and with AWQ calibrated on one part of the
    TinyStories sample, and another part held out: exported once for every engine."""
    d = tmp_path_factory.mktemp("awq")
    sample = (MODELS / "tinystories" / "tinystories_sample_2MiB.txt").read_bytes()
    (d / "calib.txt").write_bytes(sample[:60000])
    (d / "heldout.txt").write_bytes(sample[-40000:])
    plain, awq = d / "q4.bin", d / "q4-awq.bin"
    return (export(plain, "--version", 3, "--bin", STORIES),
            export(awq, "--version", 3, "--bin", STORIES, "--awq", d / "calib.txt", "--awq-tokenizer", TOK512),
            plain, awq, d / "heldout.txt")


def test_awq_lowers_int4_perplexity(qbinary, int4_files, report):
    """stories260K, calibrated on one part of the TinyStories sample and measured
    on another: int4 with AWQ has a lower perplexity than plain int4."""
    p_plain, p_awq, plain, awq, heldout = int4_files
    assert p_plain.returncode == 0, p_plain.stderr.decode()
    assert p_awq.returncode == 0, p_awq.stderr.decode()
    assert len(re.findall(rb"layer \d+: wq/wk/wv alpha", p_awq.stderr)) == 5  # alpha and errors printed per layer
    a, b = perplexity(qbinary, plain, heldout), perplexity(qbinary, awq, heldout)
    report(f"stories260K int4 held-out perplexity ({qbinary.split('/')[-1]}): plain {a:.3f}, AWQ {b:.3f}")
    assert b < a


@pytest.mark.parametrize("args, message", [
    (["--version", "0", "--awq", "CALIB"], "--version 2 or 3"),
    (["--version", "3", "--awq", "missing.txt"], "missing.txt"),
    (["--version", "3", "--awq", "CALIB", "--awq-tokenizer", "missing.bin"], "missing.bin"),
    (["--version", "3", "--awq", "CALIB", "--awq-tokenizer", "BPE"], "byte-level BPE"),
])
def test_awq_errors(tmp_path, args, message):
    (tmp_path / "calib.txt").write_text("Once upon a time")
    if "BPE" in args:  # a byte-level tokenizer of stories260K's 512 ids: its encoder is not AWQ's
        import json
        from conftest import byte_level_json
        merges = [f"{a} {b}" for a in "abcdefghijklmnopqrstuvwxyz" for b in "abcdefghijklmnopqrstuvwxyz"][:251]
        (tmp_path / "tokenizer.json").write_text(json.dumps(byte_level_json(merges)))
        assert export("--tokenizer", tmp_path / "tokenizer.json", "-o", tmp_path / "bpe.bin").returncode == 0
    args = [str(tmp_path / "calib.txt") if a == "CALIB" else str(tmp_path / "bpe.bin") if a == "BPE" else a
            for a in args]
    p = export(tmp_path / "out.bin", "--bin", STORIES, *args)
    err = p.stderr.decode()
    assert p.returncode == 1 and err.count("\n") == 1 and message in err, err
    assert not (tmp_path / "out.bin").exists()
