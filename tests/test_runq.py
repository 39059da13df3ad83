"""runq (int8 and int4) against run (fp32) on the same weights, the version 2
and 3 exports, and runq's own file checks."""

import re
import struct

import pytest
import torch

from conftest import (E, M, MODELS, STORIES, TOK512, decode_text, fit_prompt, group_error, quantization_bound,
                      random_model, read_dump, read_tokenizer, run, save_model, vocab_of_size, write_tokenizer)

# Random models: grouped-query attention, a separate classifier, compiled-in
# and generic group sizes, and an odd vocab_size times dim 30 (2 mod 4 bytes of
# int8 embedding: every later tensor's scales sit at unaligned offsets and must
# be copied out, which the sanitizer build checks).
CONFIGS = {
    "gqa-separate-gs32": (dict(dim=64, hidden_dim=160, n_layers=3, n_heads=8, n_kv_heads=2, vocab_size=320,
                               max_seq_len=256, shared_classifier=False), 32),
    "mha-shared-gs64": (dict(dim=128, hidden_dim=192, n_layers=2, n_heads=4, n_kv_heads=4, vocab_size=300,
                             max_seq_len=256), 64),
    "mqa-gs16": (dict(dim=48, hidden_dim=112, n_layers=2, n_heads=4, n_kv_heads=1, vocab_size=290,
                      max_seq_len=256), 16),
    "dim30-gs10": (dict(dim=30, hidden_dim=70, n_layers=2, n_heads=3, n_kv_heads=1, vocab_size=281,
                        max_seq_len=256, shared_classifier=False), 10),
}


def setup_pair(tmp_path, name):
    cfg, gs = CONFIGS[name]
    m = random_model(sum(map(ord, name)), **cfg)
    fp32 = save_model(m, tmp_path / "fp32.bin", 0)
    E.write_checkpoint(m, str(tmp_path / "q8.bin"), 2, gs)
    tok = write_tokenizer(tmp_path / "tok.bin", vocab_of_size(cfg["vocab_size"]))
    return m, gs, fp32, tmp_path / "q8.bin", tok


def long_prompt(binary, ckpt, tok, T):
    """Random words, as many as fit in T positions: both engines then read the
    same tokens (teacher forcing) and their logits compare position by position."""
    g = torch.Generator().manual_seed(1)
    letters = "abcdefghijklmnopqrstuvwxyz"
    words = ["".join(letters[int(i)] for i in torch.randint(0, 26, (int(n),), generator=g))
             for n in torch.randint(1, 6, (4 * T,), generator=g)]
    return fit_prompt(words, T, binary, ckpt, tok)


@pytest.mark.parametrize("name", CONFIGS)
def test_logits_close_to_fp32(pair, tmp_path, name, report):
    m, gs, fp32, q8, tok = setup_pair(tmp_path, name)
    compare_logits(pair, m, gs, fp32, q8, tok, tmp_path, report, f"int8, {name}")


# int4: rows that end in short groups (dim 30 and hidden 70 with group size 8,
# hidden 200 with 48), an odd hidden_dim (w2's rows end in half a byte), and
# tensors whose scales sit at unaligned offsets.
CONFIGS4 = {
    "gqa-separate-gs32": CONFIGS["gqa-separate-gs32"],
    "short-groups-gs48": (dict(dim=96, hidden_dim=200, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=300,
                               max_seq_len=256), 48),
    "dim30-gs8": (CONFIGS["dim30-gs10"][0], 8),
    "odd-hidden-gs32": (dict(dim=32, hidden_dim=75, n_layers=2, n_heads=4, n_kv_heads=4, vocab_size=270,
                             max_seq_len=256), 32),
}


@pytest.mark.parametrize("name", CONFIGS4)
def test_int4_logits_close_to_its_weights_in_fp32(pair, tmp_path, name, report):
    """runq on a version 3 file against run on the same 4-bit weights dequantized
    (model.py reads them; export.py writes them as fp32): only the activations'
    int8 rounding separates the two, so a misread nibble or scale shows."""
    cfg, gs = CONFIGS4[name]
    m = random_model(sum(map(ord, name)), **cfg)
    with torch.no_grad():  # columns of different sizes: groups get different scales, so a wrong one shows
        for p in m.parameters():
            if p.dim() == 2:
                p.mul_(torch.exp(0.5 * torch.randn(p.shape[1])))
    q4 = tmp_path / "q4.bin"
    E.write_checkpoint(m, str(q4), 3, gs)
    m4 = M.load_checkpoint(str(q4))
    fp32 = save_model(m4, tmp_path / "fp32.bin", 1)  # version 1: the header keeps norm_eps as read
    tok = write_tokenizer(tmp_path / "tok.bin", vocab_of_size(cfg["vocab_size"]))
    compare_logits(pair, m4, gs, fp32, q4, tok, tmp_path, report, f"int4, {name}", exact_weights=True)


def compare_logits(pair, m, gs, fp32, qfile, tok, tmp_path, report, label, exact_weights=False):
    """Both engines read one long prompt; runq's logits within quantization_bound
    of run's at every position, and the same top token at 98% of them.
    Catches a misread scale, nibble, group boundary or row (errors of whole
    quantization steps); cannot catch an error far below a quantization step
    (measured errors use 2-4% of this first-order worst-case bound): that is what
    the unit tests' bit-for-bit comparison with matmul_reference is for."""
    binary, qbinary = pair
    T = m.args.max_seq_len
    prompt = long_prompt(binary, fp32, tok, T)
    dumps = []
    for b, ckpt in [(binary, fp32), (qbinary, qfile)]:
        dump = tmp_path / f"{ckpt.stem}.logits"
        # the f32 KV cache: the bound covers the weights' and activations' quantization only
        run(b, ckpt, "-z", tok, "-t", "0", "-n", T, "-k", "f32", "-i", prompt, env={"RUN_DUMP_LOGITS": str(dump)})
        dumps.append(read_dump(dump, m.args.vocab_size))
    (_, tok32, z32, _), (_, tokq, zq, _) = dumps
    n = len(run(binary, fp32, "-z", tok, "-m", "tokenize", "-i", prompt).stdout.split())  # prompt positions
    tok32, z32, zq = tok32[:n], z32[:n], zq[:n]
    assert tok32 == tokq[:n] and n >= T - 6, "both must read the same prompt at (nearly) every position"
    bound = quantization_bound(m, gs, tok32, exact_weights)
    worst = ((zq - z32).abs() / bound).max().item()
    assert worst <= 1.0, f"{label}: logits are {worst:.2f} x the bound away from fp32"
    agree = (zq.argmax(-1) == z32.argmax(-1)).double().mean().item()
    report(f"{label} ({qbinary.split('/')[-1]}): top-1 agreement with fp32 {agree:.1%} of {n} positions")
    assert agree >= 0.98, f"top-1 agreement {agree:.1%}"


def test_stories260k_int8_greedy(pair, stories_q8, report):
    """The real model in int8: coherent text (words of the TinyStories sample),
    and how many leading tokens agree with fp32, reported."""
    binary, qbinary = pair
    steps = 200
    dumps = []
    for b, ckpt in [(binary, STORIES), (qbinary, stories_q8)]:
        dump = f"{stories_q8}.{b.replace('/', '_')}.logits"
        run(b, ckpt, "-z", TOK512, "-t", "0", "-n", steps, env={"RUN_DUMP_LOGITS": dump})
        _, fed, _, chosen = read_dump(dump, 512)
        dumps.append(fed + [chosen[-1]])
    agree = next((i for i, (a, b) in enumerate(zip(*dumps)) if a != b), min(map(len, dumps)))
    report(f"stories260K int8 ({qbinary.split('/')[-1]}): first {agree - 1} generated tokens "
           f"agree with fp32 greedy (of {len(dumps[0]) - 1})")
    text = decode_text(read_tokenizer(TOK512, 512), dumps[1]).decode()
    known = set(re.findall(r"[a-z]+", (MODELS / "tinystories" / "tinystories_sample_2MiB.txt")
                           .read_text(encoding="utf-8", errors="ignore").lower()))
    words = re.findall(r"[a-z]+", text.lower())
    assert len(words) > 100 and sum(w in known for w in words) / len(words) > 0.95, text
    assert agree > 20, "int8 should track fp32 for a while on the real model"


def test_model_py_reads_version2(stories_q8):
    """model.py dequantizes version 2: its weights are within half a step of the originals."""
    q = M.load_checkpoint(str(stories_q8)).state_dict()
    for k, v in M.load_checkpoint(str(STORIES)).state_dict().items():
        if k.endswith("norm.weight"):
            assert torch.equal(q[k], v)
        else:
            assert ((q[k] - v).abs() <= group_error(v, 4) * (1 + 1e-6)).all(), k


def test_version3_round_trip(tmp_path):
    """Integer weights whose every group (of 8, rows of 30 and 70: short last
    groups) reaches |7| have scale 1, so the file must give them back exactly:
    export.py's packing and model.py's unpacking agree on every nibble."""
    m = random_model(5, **CONFIGS["dim30-gs10"][0])
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if p.dim() == 2:
                p.copy_(torch.randint(-7, 8, p.shape, generator=g).float())
                p[:, ::8] = 7.0 * torch.sign(torch.randn(p.shape[0], 1, generator=g))  # each group's first value
    path = tmp_path / "q4.bin"
    E.write_checkpoint(m, str(path), 3, 8)
    back = M.load_checkpoint(str(path)).state_dict()
    for k, v in m.state_dict().items():
        assert torch.equal(back[k], v), k
    a = m.args  # size: norms, then per matrix (rows, cols): rows * ((cols + 1) // 2 + 4 * ceil(cols / 8))
    q = lambda rows, cols: rows * ((cols + 1) // 2 + 4 * -(-cols // 8))
    kv = a.n_kv_heads * a.head_size
    size = 256 + 4 * (2 * a.n_layers + 1) * a.dim + 2 * q(a.vocab_size, a.dim) + a.n_layers * (
        2 * q(a.dim, a.dim) + 2 * q(kv, a.dim) + 2 * q(a.hidden_dim, a.dim) + q(a.dim, a.hidden_dim))
    assert path.stat().st_size == size


def test_model_py_unpacks_every_byte():
    """Two's complement nibbles, low first: byte 0x8F is 15 -> -1, then 8 -> -8."""
    data = bytes(range(256)) + struct.pack("<2f", 1.0, 0.5)
    w = M.Reader(data, 0).quantized4(256, 1, 512)[0]
    expect = [((b >> s) & 15) - 16 * (((b >> s) & 15) >= 8) for b in range(256) for s in (0, 4)]
    assert w[:256].tolist() == expect[:256] and (w[256:] * 2).tolist() == expect[256:]


def q8_header(gs, dim=64, hidden=172, version=2):
    h = struct.pack("<Ii7iBi", 0x616B3432, version, dim, hidden, 5, 8, 4, 512, 512, 1, gs)
    return h.ljust(256, b"\0")


def test_group_size_not_dividing_hidden_dim_is_refused(qbinary, tmp_path):
    """What llama2.c's exporter writes for stories260K: group size 64, hidden_dim 172."""
    path = tmp_path / "llama2c-q80.bin"
    path.write_bytes(q8_header(64) + b"\0" * 600000)
    p = run(qbinary, path, "-z", TOK512, check=False)
    err = p.stderr.decode()
    assert p.returncode == 1 and err.count("\n") == 1
    assert "group_size 64 does not divide" in err and "hidden_dim 172" in err and "re-export" in err


@pytest.mark.parametrize("gs", [0, -64, 3])
def test_bad_group_size(qbinary, tmp_path, gs):
    path = tmp_path / "bad.bin"
    path.write_bytes(q8_header(gs) + b"\0" * 1000)
    p = run(qbinary, path, "-z", TOK512, check=False)
    assert p.returncode == 1 and f"group_size {gs}".encode() in p.stderr and p.stderr.count(b"\n") == 1


@pytest.mark.parametrize("cut", [-1, 1])
def test_truncated_or_padded_version2(qbinary, stories_q8, tmp_path, cut):
    data = stories_q8.read_bytes()
    path = tmp_path / "cut.bin"
    path.write_bytes(data[:cut] if cut < 0 else data + b"\0" * cut)
    p = run(qbinary, path, "-z", TOK512, check=False)
    assert p.returncode == 1 and b"header describes" in p.stderr


def test_each_engine_refuses_the_other_format(pair, stories_q8):
    binary, qbinary = pair
    p = run(qbinary, STORIES, "-z", TOK512, check=False)
    assert p.returncode == 1 and b"export.py --version 2" in p.stderr
    p = run(binary, stories_q8, "-z", TOK512, check=False)
    assert p.returncode == 1 and b"runq" in p.stderr


def test_export_backs_off_group_size(tmp_path):
    import subprocess, sys
    from conftest import ROOT
    p = subprocess.run([sys.executable, str(ROOT / "export.py"), tmp_path / "q.bin", "--version", "2",
                        "--bin", STORIES], capture_output=True, check=True)
    err = p.stderr.decode()
    assert "group size 64 does not divide dim 64 and hidden_dim 172; using 4" in err
    # one line per quantized tensor (embedding, 7 matrices x 5 layers), then the overall maximum
    assert "max quantization error over all tensors" in err and err.count("max quantization error") == 1 + 35 + 1
