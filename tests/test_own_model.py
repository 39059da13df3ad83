"""The project's own model (train.py, models/README.md): it loads and generates
with run and runq, its greedy text is model.py's, and the validation loss in
its model card is what model.py and `run -m perplexity` measure on the file
`make` trained."""

import math
import re

import pytest
import torch

from conftest import (BINARIES, E, M, QBINARIES, ROOT, U, decode_text, existing, prompt_tokens, read_tokenizer,
                      rounding_depth, run)

MODEL = ROOT / "models" / "tinystories.bin"
TOK = ROOT / "models" / "tinystories-tok.bin"
VAL = ROOT / "models" / "tinystories-val.txt"
CARD = ROOT / "models" / "README.md"
PROMPT = "Once upon a time"


@pytest.fixture(scope="module")
def own():
    """(model.py model in float64, tokenizer pieces)."""
    for f in (MODEL, TOK, VAL):
        if not f.exists():
            pytest.fail(f"{f} is missing: the model is committed; `make models/tinystories-val.txt` "
                        "cuts the held-out text (make test does)")
    m = M.load_checkpoint(str(MODEL)).double()
    return m, read_tokenizer(TOK, m.args.vocab_size)


def card():
    """The model card's numbers: validation loss (4 decimals), perplexity, tokens."""
    got = re.search(r"validation loss \*\*(\d+\.\d{4})\*\* nats per token \(perplexity \*\*(\S+)\*\*\) "
                    r"over (\d+) tokens", CARD.read_text())
    assert got, f"{CARD} does not state the validation loss in the expected sentence"
    return float(got[1]), float(got[2]), int(got[3])


def val_stories():
    return [s.strip() for s in VAL.read_text(encoding="utf-8").split("<|endoftext|>") if s.strip()]


@pytest.fixture(scope="module")
def reference(own):
    """model.py's float64 NLL summed over the validation stories, read as
    `run -m perplexity` reads each one; the token count; and the sum over
    tokens of the bound on one NLL's float32 error: twice the bound on its
    logits (the log-sum-exp and the target logit each move by at most that)."""
    m, _ = own
    T = m.args.max_seq_len
    binary = existing(BINARIES[0])
    total, count, bounds = 0.0, 0, 0.0
    with torch.no_grad():
        for story in val_stories():
            ids = prompt_tokens(binary, MODEL, TOK, story)[1:]  # run's own encoding, BOS dropped
            for i in range(0, len(ids), T - 1):
                window = [1] + ids[i:i + T - 1]
                h = m.hidden(torch.tensor([window[:-1]]))[0]
                logits = m.output(h)
                total += (torch.logsumexp(logits, 1) - logits[torch.arange(len(window) - 1), window[1:]]).sum().item()
                count += len(window) - 1
                magnitude = (h.abs() @ m.output.weight.abs().T).amax(1)  # per position
                bounds += 2 * rounding_depth(m.args, len(window)) * U * magnitude.sum().item()
    return total, count, bounds


def test_card_matches_model_py(reference):
    """The card's loss is train.py's, computed in float64 and printed to 4
    decimals: recomputed here in float64 it must agree to that digit (float64
    rounding, 2^-53 where float32 has 2^-24, is far below it)."""
    total, count, bounds = reference
    loss, ppl, tokens = card()
    assert tokens == count
    assert abs(total / count - loss) <= 0.5e-4 + bounds / count * 2.0 ** -29, (total / count, loss)
    assert abs(ppl - math.exp(loss)) <= 0.5e-3 * math.exp(loss) + 0.5e-3  # printed to 3 decimals


def pooled_perplexity(binary, model, tmp_path):
    """(summed NLL, tokens): `-m perplexity` story by story, pooled."""
    total, count = 0.0, 0
    for i, story in enumerate(val_stories()):
        f = tmp_path / f"story{i}.txt"
        f.write_text(story, encoding="utf-8")
        out = run(binary, model, "-z", TOK, "-m", "perplexity", "-f", f).stdout.decode()
        got = re.fullmatch(r"perplexity \S+ \+- \S+ \(mean NLL (\S+) \+- \S+ nats\) over (\d+) tokens\n", out)
        assert got, out
        total += float(got[1]) * int(got[2])
        count += int(got[2])
    return total, count


def test_perplexity_mode_matches_card(reference, tmp_path, report):
    """run's float32 perplexity, pooled story by story, is model.py's float64
    one within the rounding bound (each story's mean is printed to 5 decimals).
    One build only: 164 runs per engine are too slow under the sanitizers and
    qemu, and test_perplexity.py already runs the mode in every build."""
    binary = existing(BINARIES[0])
    total, count, bounds = reference
    got, n = pooled_perplexity(binary, MODEL, tmp_path)
    assert n == count
    err = abs(got / n - total / count)
    report(f"own model, -m perplexity ({binary.split('/')[-1]}): mean NLL off float64 by {err:.2g}, "
           f"bound {bounds / count:.2g}")
    assert err <= bounds / count + 0.5e-5, (got / n, total / count)


def test_greedy_text_matches_model_py(binary, own):
    m, pieces = own
    out = run(binary, MODEL, "-z", TOK, "-t", "0", "-n", 200, "-i", PROMPT).stdout
    expected = decode_text(pieces, m.generate_greedy(prompt_tokens(binary, MODEL, TOK, PROMPT), 200))
    assert len(expected) > 300, "the model stopped too soon to be a test"
    assert out == expected + b"\n"


def test_card_sample_is_current(binary):
    """The card's sample output is what its command prints."""
    text = CARD.read_text()
    got = re.search(r"```\n\$ (\./run models/tinystories\.bin [^\n]*)\n(.*?)\n```", text, re.S)
    assert got, "the card has no sample command and output"
    args = re.findall(r'"[^"]*"|\S+', got[1])[1:]
    out = run(binary, *[a.strip('"') for a in args]).stdout.decode()
    assert out.rstrip("\n") == got[2]


@pytest.fixture(scope="module")
def own_q8(tmp_path_factory):
    path = tmp_path_factory.mktemp("own") / "tinystories-q8.bin"
    E.write_checkpoint(M.load_checkpoint(str(MODEL)), str(path), 2, 64)
    return path


def test_int8_generates_and_keeps_quality(qbinary, own, own_q8, reference, tmp_path, report):
    """runq reads the int8 export and writes a story; quantizing weights and
    activations to 8 bits costs under 1% in perplexity."""
    out = run(qbinary, own_q8, "-z", TOK, "-t", "0", "-n", 200, "-i", PROMPT).stdout.decode()
    assert out.startswith(PROMPT) and len(out) > 300
    if qbinary != existing(QBINARIES[0]):
        return  # the perplexity below in one build only, as above
    total, count, _ = reference
    got, n = pooled_perplexity(qbinary, own_q8, tmp_path)
    assert n == count
    report(f"own model, validation perplexity: fp32 {math.exp(total / count):.4f}, "
           f"int8 ({qbinary.split('/')[-1]}) {math.exp(got / n):.4f}")
    assert got / n - total / count < math.log(1.01)
