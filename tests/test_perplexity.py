"""-m perplexity: a model whose every prediction is one known distribution, so
the perplexity of any text can be computed by hand; and its bad inputs."""

import math
import re

import pytest
import torch

from conftest import (TOK512, expect_error, random_model, run, vocab_of_size, write_tokenizer)

U = 2.0 ** -24


def constant_model(engine, tmp_path, vocab):
    """All layer matrices zero and every embedding row the same vector e: the
    residual stream stays e at every position, so the logits are always
    W_cls rmsnorm(e). Returns the checkpoint, that (vocab,) float64 logit vector
    and the magnitudes sum_k |W_vk h_k| its float32 rounding is proportional to."""
    m = random_model(11, dim=16, hidden_dim=24, n_layers=2, n_heads=2, n_kv_heads=1, vocab_size=vocab,
                     max_seq_len=64, shared_classifier=False)
    with torch.no_grad():
        sd = m.state_dict()
        for name, t in sd.items():
            if ".attention.w" in name or ".feed_forward.w" in name:
                t.zero_()
        sd["tok_embeddings.weight"][:] = sd["tok_embeddings.weight"][5]
    ckpt = engine.save(m, tmp_path / "const.bin", 8)
    if engine.quantized:  # what runq computes with: the int8 round trip of the exported weights
        import model as M
        m = M.load_checkpoint(str(ckpt))
    m = m.double()
    with torch.no_grad():
        e = m.tok_embeddings.weight[5]
        h = e / torch.sqrt((e * e).mean() + m.args.norm_eps) * m.norm.weight
        if engine.quantized:  # runq also quantizes h before the classifier, in groups of 8
            g = h.reshape(-1, 8)
            scale = g.abs().amax(1, keepdim=True) / 127
            h = (torch.sign(g) * torch.floor((g / scale).abs() + 0.5) * scale).reshape(-1)  # C's round()
        return ckpt, m.output.weight @ h, m.output.weight.abs() @ h.abs()


@pytest.mark.parametrize("window", [0, 2, 7, 64])
def test_perplexity_by_hand(engine, tmp_path, window):
    vocab = 300
    pieces = vocab_of_size(vocab)
    tok = write_tokenizer(tmp_path / "tok.bin", pieces)
    ckpt, z, magnitude = constant_model(engine, tmp_path, vocab)
    text = "the cat sat on the mat and then it ran far away from here " * 6
    (tmp_path / "text.txt").write_text(text)
    targets = [int(t) for t in run(engine.binary, ckpt, "-z", tok, "-m", "tokenize", "-i", text).stdout.split()][1:]
    nll = torch.logsumexp(z, 0) - z[targets]  # every target, predicted from the same distribution
    mean = nll.mean().item()
    se = math.sqrt(max((nll * nll).mean().item() - mean * mean, 0.0) / len(targets))
    args = ["-n", window] if window else []
    out = run(engine.binary, ckpt, "-z", tok, "-m", "perplexity", "-f", tmp_path / "text.txt", *args).stdout.decode()
    got = re.fullmatch(r"perplexity (\S+) \+- (\S+) \(mean NLL (\S+) \+- (\S+) nats\) over (\d+) tokens\n", out)
    assert got, out
    assert int(got[5]) == len(targets)
    # float32 logits: rmsnorm and a dot product of length dim, ~(1.5 dim + 8) roundings,
    # each of at most u times the magnitude; an NLL moves by at most twice the worst logit
    tol = 2 * (1.5 * 16 + 8) * U * magnitude.max().item() + 0.5e-5  # + printing to 5 decimals
    assert abs(float(got[3]) - mean) <= tol, (got[3], mean)
    assert abs(float(got[4]) - se) <= tol + 0.5e-5
    assert abs(float(got[1]) - math.exp(mean)) <= math.exp(mean) * tol + 0.5e-4


def test_perplexity_bad_inputs(engine, tmp_path):
    expect_error(engine, engine.stories, "-z", TOK512, "-m", "perplexity",
                 mentions="-f")
    expect_error(engine, engine.stories, "-z", TOK512, "-m", "perplexity",
                 "-f", tmp_path / "missing.txt", mentions="missing.txt")
    (tmp_path / "t.txt").write_text("hello")
    expect_error(engine, engine.stories, "-z", TOK512, "-m", "perplexity",
                 "-f", tmp_path / "t.txt", "-n", 1, mentions="-n")


@pytest.mark.parametrize("window", [0, 5])
def test_perplexity_without_bos(engine, tmp_path, window):
    """A byte-level tokenizer without BOS: each window starts at its first token,
    which the previous window predicted, so every token but the text's first is
    predicted exactly once."""
    import json
    import subprocess
    import sys
    from conftest import ROOT, byte_level_json
    (tmp_path / "tokenizer.json").write_text(json.dumps(byte_level_json()))
    subprocess.run([sys.executable, str(ROOT / "export.py"), "--tokenizer", str(tmp_path / "tokenizer.json"),
                    "-o", str(tmp_path / "tok.bin")], check=True, capture_output=True)
    ckpt, z, magnitude = constant_model(engine, tmp_path, 264)
    text = "abc ab a cab " * 8
    (tmp_path / "text.txt").write_text(text)
    ids = [int(t) for t in run(engine.binary, ckpt, "-z", tmp_path / "tok.bin", "-m", "tokenize", "-i", text).stdout.split()]
    nll = (torch.logsumexp(z, 0) - z[ids[1:]]).mean().item()
    args = ["-n", window] if window else []
    out = run(engine.binary, ckpt, "-z", tmp_path / "tok.bin", "-m", "perplexity", "-f", tmp_path / "text.txt",
              *args).stdout.decode()
    got = re.fullmatch(r"perplexity (\S+) \+- (\S+) \(mean NLL (\S+) \+- (\S+) nats\) over (\d+) tokens\n", out)
    assert got and int(got[5]) == len(ids) - 1, out
    assert abs(float(got[3]) - nll) <= 2 * (1.5 * 16 + 8) * U * magnitude.max().item() + 0.5e-5
