"""run.cpp against model.py: logits at every position, greedy generations, the
real stories260K model, checkpoint versions, and thread-count determinism."""

import os
import subprocess
import sys

import pytest
import torch

from conftest import (M, ROOT, STORIES, TOK512, U, decode_text, existing, prompt_tokens, random_model,
                      read_dump, read_tokenizer, reference_logits, rounding_depth, run, save_model,
                      vocab_of_size, write_tokenizer)

# Tiny random models covering the architecture's variants; sizes deliberately
# not powers of two (head sizes 8, 10, 10, 16).
CONFIGS = {
    "mha-shared": dict(dim=48, hidden_dim=100, n_layers=2, n_heads=6, n_kv_heads=6, vocab_size=300, max_seq_len=64),
    "gqa-separate": dict(dim=60, hidden_dim=130, n_layers=3, n_heads=6, n_kv_heads=2, vocab_size=301,
                         max_seq_len=80, shared_classifier=False),
    "mqa": dict(dim=40, hidden_dim=72, n_layers=2, n_heads=4, n_kv_heads=1, vocab_size=263, max_seq_len=70),
    "theta-eps-v1": dict(dim=32, hidden_dim=50, n_layers=2, n_heads=2, n_kv_heads=1, vocab_size=270,
                         max_seq_len=40, rope_theta=500000.0, norm_eps=1e-6),
    # Llama 3.1's RoPE scaling, past its original context of 32: of head size 16's
    # eight frequencies one is kept, one blended and six divided by 8
    "llama3-rope-v1": dict(dim=64, hidden_dim=96, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=300,
                           max_seq_len=48, rope_scaling=(8.0, 1.0, 4.0, 32)),
}
PROMPT = "hello world"


def setup_model(tmp_path, name):
    cfg = dict(CONFIGS[name])
    m = random_model(sum(map(ord, name)), **cfg)
    version = 1 if name.endswith("-v1") else 0
    ckpt = save_model(m, tmp_path / "model.bin", version)
    tok = write_tokenizer(tmp_path / "tok.bin", vocab_of_size(cfg["vocab_size"]))
    return m, ckpt, tok


# The worst-case bound adds every rounding at its largest, all in one direction;
# real roundings are far smaller on average and of either sign. Higham and Mary's
# probabilistic analysis (SIAM J. Sci. Comput. 41, 2019): if the roundings are
# independent with mean zero, an error after `depth` of them exceeds
# LAMBDA sqrt(depth) u magnitude with probability at most 2 depth exp(-LAMBDA^2 / 2),
# below 1e-10 per logit for LAMBDA = 8 and depth < 10^4. So a second, tighter
# check: a bug worth a few ulps everywhere (a term dropped from a long sum, a
# wrong constant's last digits) passes the first and fails this one.
LAMBDA = 8.0


def probabilistic_bound(args, T, magnitude):
    return LAMBDA * rounding_depth(args, T) ** 0.5 * U * magnitude


@pytest.mark.parametrize("name", CONFIGS)
def test_logits_match_model_py(binary, tmp_path, name, report):
    """Every logit of a prompt and a generation against model.py in float64:
    within the worst-case rounding bound, and within the probabilistic one.
    Catches any wrong formula, index, RoPE angle or cache position, and errors
    of a few ulps on every value; cannot see a change below the float32 rounding
    (such as a different but equally exact summation order)."""
    m, ckpt, tok = setup_model(tmp_path, name)
    dump = tmp_path / "logits.bin"
    T = m.args.max_seq_len
    run(binary, ckpt, "-z", tok, "-t", "0", "-n", T, "-i", PROMPT, env={"RUN_DUMP_LOGITS": str(dump)})
    pos, tokens, logits, _ = read_dump(dump, m.args.vocab_size)
    assert pos == list(range(len(pos))) and len(pos) >= 10, "generation stopped too early to test"
    ref, magnitude = reference_logits(m, tokens)
    tol = rounding_depth(m.args, len(tokens)) * U * magnitude
    err = (logits - ref).abs()
    worst = (err / tol).max().item()
    assert worst <= 1.0, f"logit error {err.max().item():.3g} is {worst:.2f} x the bound"
    likely = (err / probabilistic_bound(m.args, len(tokens), magnitude)).max().item()
    report(f"fp32 logits, {name} ({binary.split('/')[-1]}): {worst:.4f} of the worst-case bound, "
           f"{likely:.3f} of the probabilistic one")
    assert likely <= 1.0, f"logit error {err.max().item():.3g} is {likely:.2f} x the probabilistic bound"


@pytest.mark.parametrize("name", CONFIGS)
def test_greedy_matches_model_py(binary, tmp_path, name):
    m, ckpt, tok = setup_model(tmp_path, name)
    steps = min(64, m.args.max_seq_len)
    dump = tmp_path / "logits.bin"
    run(binary, ckpt, "-z", tok, "-t", "0", "-n", steps, "-i", PROMPT, env={"RUN_DUMP_LOGITS": str(dump)})
    _, tokens, _, chosen = read_dump(dump, m.args.vocab_size)
    expected = m.double().generate_greedy(prompt_tokens(binary, ckpt, tok, PROMPT), steps)
    assert len(expected) >= 20, "greedy run hit BOS/EOS too soon to be a test"
    # each position's input, then the token chosen at the last one
    got = tokens + [chosen[-1]]
    assert got == expected or (got[-1] in (1, 2) and got[:-1] == expected)


def test_stories260k_greedy_text(binary):
    """The real model: 200 greedy steps from BOS, text equal to model.py's."""
    out = run(binary, STORIES, "-z", TOK512, "-t", "0", "-n", 200).stdout
    m = M.load_checkpoint(str(STORIES)).double()
    expected = decode_text(read_tokenizer(TOK512, 512), m.generate_greedy([1], 200))
    assert len(expected) > 400
    assert out == expected + b"\n"


def test_stories260k_with_prompt(binary):
    prompt = "Once upon a time, Lily"
    out = run(binary, STORIES, "-z", TOK512, "-t", "0", "-n", 60, "-i", prompt).stdout
    m = M.load_checkpoint(str(STORIES)).double()
    ids = prompt_tokens(binary, STORIES, TOK512, prompt)
    expected = decode_text(read_tokenizer(TOK512, 512), m.generate_greedy(ids, 60))
    assert out.startswith(prompt.encode()) and out == expected + b"\n"


def export_cli(*args):
    subprocess.run([sys.executable, str(ROOT / "export.py"), *map(str, args)], check=True, capture_output=True)


def test_versions_give_identical_output(binary, tmp_path):
    """Version 0 and version 1 of one model sample the same text, for the real
    model and for a random one with a separate classifier."""
    gqa = random_model(3, **CONFIGS["gqa-separate"])
    save_model(gqa, tmp_path / "gqa.bin", 0)
    tok = write_tokenizer(tmp_path / "tok.bin", vocab_of_size(301))
    for src, tokenizer in [(STORIES, TOK512), (tmp_path / "gqa.bin", tok)]:
        outputs = []
        for version in (0, 1):
            dst = tmp_path / f"v{version}.bin"
            export_cli(dst, "--version", version, "--bin", src)
            outputs.append(run(binary, dst, "-z", tokenizer, "-s", 42, "-n", 80).stdout)
        outputs.append(run(binary, src, "-z", tokenizer, "-s", 42, "-n", 80).stdout)
        assert outputs[0] == outputs[1] == outputs[2] and len(outputs[0]) > 40


def test_training_checkpoint_export(tmp_path):
    """A llama2.c-style training checkpoint (compiled: '_orig_mod.' keys)
    exports to a .bin that model.py reads back as the same weights."""
    m = random_model(9, **CONFIGS["gqa-separate"])
    cfg = CONFIGS["gqa-separate"]
    model_args = {k: cfg[k] for k in ("dim", "hidden_dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size")}
    model_args.update(max_seq_len=cfg["max_seq_len"], multiple_of=32, norm_eps=1e-5, dropout=0.0)
    sd = {"_orig_mod." + k: v for k, v in m.state_dict().items()}
    torch.save({"model_args": model_args, "model": sd, "iter_num": 5}, tmp_path / "ckpt.pt")
    for version in (0, 1):
        export_cli(tmp_path / "out.bin", "--version", version, "--checkpoint", tmp_path / "ckpt.pt")
        back = M.load_checkpoint(str(tmp_path / "out.bin"))
        for k, v in m.state_dict().items():
            assert torch.equal(back.state_dict()[k], v), k


def test_training_checkpoint_cannot_run_code(tmp_path):
    """A pickle that would call os.system is refused, not executed."""
    marker = tmp_path / "ran"

    class Evil:
        def __reduce__(self):
            import os
            return (os.system, (f"touch {marker}",))

    torch.save({"model_args": {}, "model": {}, "payload": Evil()}, tmp_path / "evil.pt")
    p = subprocess.run([sys.executable, str(ROOT / "export.py"), tmp_path / "out.bin", "--checkpoint",
                        tmp_path / "evil.pt"], capture_output=True)
    assert p.returncode == 1 and b"refusing" in p.stderr and not marker.exists()


@pytest.mark.parametrize("args, message", [
    (["out.bin", "--bin", "missing.bin"], "missing.bin: no such file"),
    (["out.bin", "--checkpoint", "missing.pt"], "missing.pt: no such file"),
    (["out.bin", "--checkpoint", "model.py"], "cannot load"),
    (["--tokenizer", "missing.model"], "missing.model"),
    (["--tokenizer", "export.py"], "not a sentencepiece model"),
    (["--bin", str(STORIES)], "give the output checkpoint path"),
])
def test_export_errors(tmp_path, args, message):
    p = subprocess.run([sys.executable, str(ROOT / "export.py"), *args], capture_output=True, cwd=ROOT)
    assert p.returncode != 0 and message in p.stderr.decode(), p.stderr.decode()
    assert not (ROOT / "out.bin").exists()


def test_export_refuses_version0_for_nondefault_theta(tmp_path):
    m = random_model(2, **CONFIGS["theta-eps-v1"])
    save_model(m, tmp_path / "v1.bin", 1)
    p = subprocess.run([sys.executable, str(ROOT / "export.py"), tmp_path / "v0.bin", "--version", "0", "--bin",
                        tmp_path / "v1.bin"], capture_output=True)
    assert p.returncode == 1 and b"use --version 1" in p.stderr and not (tmp_path / "v0.bin").exists()


# Builds for one instruction set, by Makefile variant: g++ and clang++, with and
# without OpenMP, -O3 and the sanitizers' -O1 (make test sets SAME_ISA).
SAME_ISA = [group.split(",") for group in os.environ.get("SAME_ISA", "").split()]


@pytest.mark.skipif(not SAME_ISA, reason="make test names the builds that share an instruction set (SAME_ISA)")
@pytest.mark.parametrize("group", SAME_ISA, ids=lambda g: "=".join(g) if isinstance(g, list) else str(g))
@pytest.mark.parametrize("engine_name", ["run", "runq"])
def test_builds_for_one_instruction_set_agree(group, engine_name, stories_q8, tmp_path):
    """Every logit of a prompt and a generation, bit for bit, whichever compiler
    built the engine, with or without OpenMP: no fused multiply-add the source
    does not ask for (-ffp-contract=off), none missing where it does (madd)."""
    model = stories_q8 if engine_name == "runq" else STORIES
    dumps = {}
    for variant in group:
        dump = tmp_path / f"{variant}.dump"
        run(existing(f"build/{engine_name}-{variant}"), model, "-z", TOK512, "-t", "0", "-n", 120,
            "-i", "Once upon a time, there was a", env={"RUN_DUMP_LOGITS": str(dump)})
        dumps[variant] = dump.read_bytes()
    assert len(dumps[group[0]]) > 100 * 512 * 4
    differ = [v for v in group if dumps[v] != dumps[group[0]]]
    assert not differ, f"{differ} differ from {group[0]}"
