"""The command line: output contract, flags, chat, and every kind of bad input
(each must be one line on stderr and exit status 1, also under the sanitizers)."""

import struct

import pytest

from conftest import (STORIES, TOK512, expect_error, random_model, read_dump, run, stories, write_tokenizer)

STORIES_BYTES = STORIES.read_bytes()


# ---------------------------------------------------------------------------
# Output contract


def test_generate_output_contract(engine):
    p = stories(engine, "-t", "0", "-n", 40, "-i", "Once upon a time")
    assert p.stdout.startswith(b"Once upon a time") and p.stdout.endswith(b"\n")
    assert not p.stdout.endswith(b"\n\n")
    err = p.stderr.decode()
    assert err.count("\n") == 1 and "prompt: 5 tokens" in err and "generation: 36 tokens" in err
    assert err.count("tok/s") == 2


def test_steps_clamped_to_seq_len(engine):
    p = stories(engine, "-t", "0", "-n", 100000, "-i", "Hi")
    assert "note: -n 100000" in p.stderr.decode() and "using 512" in p.stderr.decode()
    assert p.stdout == stories(engine, "-t", "0", "-n", 0, "-i", "Hi").stdout


def test_tokenize_mode(engine):
    p = stories(engine, "-m", "tokenize", "-i", "Once upon a time")
    ids = p.stdout.decode()
    assert ids.endswith("\n") and ids.split()[0] == "1" and len(ids.split()) == 5 and p.stderr == b""


def test_help(engine):
    for flag in ("-h", "--help"):
        p = run(engine.binary, flag)
        assert p.returncode == 0 and b"Usage" in p.stdout and b"-t <float>" in p.stdout


def test_seed_reproducible_and_matters(engine):
    a = stories(engine, "-s", 5, "-n", 60).stdout
    assert a == stories(engine, "-s", 5, "-n", 60).stdout
    assert a != stories(engine, "-s", 6, "-n", 60).stdout


def test_prompt_that_fills_steps_exactly(engine):
    n = len(stories(engine, "-m", "tokenize", "-i", "Once upon a time").stdout.split())
    p = stories(engine, "-t", "0", "-n", n, "-i", "Once upon a time")
    assert p.stdout.startswith(b"Once upon a time") and b"generation: 1 tokens" in p.stderr


# ---------------------------------------------------------------------------
# Chat


def chat_model(engine, tmp_path):
    """A random model over a character vocabulary just big enough for the chat
    template, so that at high temperature EOS (1 in ~30) comes soon."""
    chars = sorted(set("[INST]<<SYS>>\n</SYS> [/INST]be brief hi again x"))
    pieces = ["<unk>", "\n<s>\n", "\n</s>\n"] + chars
    m = random_model(4, dim=16, hidden_dim=24, n_layers=1, n_heads=2, n_kv_heads=1,
                     vocab_size=len(pieces), max_seq_len=512, shared_classifier=False)
    return engine.save(m, tmp_path / "chat.bin", 8), write_tokenizer(tmp_path / "chat_tok.bin", pieces), len(pieces)


@pytest.mark.parametrize("seed", range(1, 6))
def test_chat_turns_follow_llama2_template(engine, tmp_path, seed):
    ckpt, tok, vocab = chat_model(engine, tmp_path)
    dump = tmp_path / "chat_dump.bin"
    p = run(engine.binary, ckpt, "-z", tok, "-m", "chat", "-y", "be brief", "-t", "1000", "-s", seed, "-n", 512,
            stdin=b"hi\nagain\n", env={"RUN_DUMP_LOGITS": str(dump)})
    _, fed, _, chosen = read_dump(dump, vocab)

    def ids(text):
        return [int(t) for t in run(engine.binary, ckpt, "-z", tok, "-m", "tokenize", "-i", text).stdout.split()]

    turn1 = ids("[INST] <<SYS>>\nbe brief\n<</SYS>>\n\nhi [/INST]")
    turn2 = ids("[INST] again [/INST]")
    assert fed[:len(turn1)] == turn1
    # The first answer runs until the model samples EOS or BOS. EOS goes into
    # the context (and nothing is sampled after it); BOS does not.
    end = next(i for i in range(len(turn1) - 1, len(fed)) if chosen[i] in (1, 2))
    rest = fed[end + 1:]
    if chosen[end] == 2:
        assert rest[0] == 2 and chosen[end + 1] == -1, "EOS must be fed back into the context"
        rest = rest[1:]
    assert rest[:len(turn2)] == turn2
    out = p.stdout.decode()
    assert out.count("Assistant: ") == 2 and out.count("User: ") == 3  # the third meets EOF


@pytest.mark.parametrize("system", ["be brief", ""])
def test_chat_turns_follow_zephyr_template(engine, tmp_path, system):
    """<|system|>\n{system}</s>\n<|user|>\n{user}</s>\n<|assistant|>\n with each </s>
    as the EOS id. Over a character vocabulary (no merges) the expected ids are
    spelled out here character by character: the first text gets the leading
    space, nothing after an EOS does."""
    chars = sorted(set("<|system|>\n</s> <|user|> <|assistant|>be brief hi again x"))
    pieces = ["<unk>", "\n<s>\n", "\n</s>\n"] + chars
    m = random_model(4, dim=16, hidden_dim=24, n_layers=1, n_heads=2, n_kv_heads=1,
                     vocab_size=len(pieces), max_seq_len=512, shared_classifier=False)
    ckpt, tok = engine.save(m, tmp_path / "chat.bin", 8), write_tokenizer(tmp_path / "tok.bin", pieces)
    spell = lambda text: [pieces.index(c) for c in text]
    BOS, EOS = 1, 2
    if system:
        turn1 = [BOS] + spell(" <|system|>\nbe brief") + [EOS] + spell("\n<|user|>\nhi") + [EOS]
    else:
        turn1 = [BOS] + spell(" <|user|>\nhi") + [EOS]
    turn1 += spell("\n<|assistant|>\n")
    turn2 = spell("\n<|user|>\nagain") + [EOS] + spell("\n<|assistant|>\n")
    checked_turn2 = False
    for seed in range(1, 21):  # until an answer ends with EOS (not BOS), to see the next turn
        dump = tmp_path / f"dump{seed}.bin"
        run(engine.binary, ckpt, "-z", tok, "-m", "chat", "-c", "zephyr", "-y", system, "-t", "1000", "-s", seed,
            "-n", 512, stdin=b"hi\nagain\n", env={"RUN_DUMP_LOGITS": str(dump)})
        _, fed, _, chosen = read_dump(dump, len(pieces))
        assert fed[:len(turn1)] == turn1
        end = next(i for i in range(len(turn1) - 1, len(fed)) if chosen[i] in (BOS, EOS))
        if chosen[end] == EOS:  # the answer's EOS is in the context, then the next turn
            assert fed[end + 1] == EOS and fed[end + 2:end + 2 + len(turn2)] == turn2
            checked_turn2 = True
            break
    assert checked_turn2, "no answer in 20 seeds ended with EOS"


def test_chat_ends_cleanly_at_end_of_input(engine):
    p = stories(engine, "-m", "chat", "-y", "", "-n", 64, stdin=b"")
    assert p.returncode == 0 and p.stdout.endswith(b"User: \n")


def test_chat_full_context_gets_a_message(engine):
    p = stories(engine, "-m", "chat", "-y", "", "-t", "0", "-n", 40, stdin=b"tell me a story\n" * 5)
    assert p.returncode == 0 and b"context is full" in p.stderr


def test_chat_long_line(engine):
    """No fixed-size line buffer: a 100 KB line is read whole, then refused as
    too long; stdout ends its line, as at every other end of a chat."""
    p = stories(engine, "-m", "chat", "-y", "", "-n", 64, stdin=b"a" * 100000 + b"\n")
    assert p.returncode == 0 and b"context is full" in p.stderr and p.stdout == b"User: \n"


# ---------------------------------------------------------------------------
# Bad flags

BAD_FLAGS = [
    (["-t", "abc"], "-t"), (["-t", "-1"], "-t"), (["-t", "nan"], "-t"), (["-t", "inf"], "-t"),
    (["-t", "1e999"], "-t"), (["-t", ""], "-t"), (["-t", "0.5x"], "-t"), (["-t", " 1"], "-t"),
    (["-p", "1.5"], "-p"), (["-p", "-0.1"], "-p"), (["-p", "NaN"], "-p"),
    (["-s", "-1"], "-s"), (["-s", "12x"], "-s"), (["-s", "99999999999999999999"], "-s"), (["-s", "+5"], "-s"),
    (["-n", "-5"], "-n"), (["-n", "1e3"], "-n"), (["-n", "99999999999"], "-n"), (["-n", "ten"], "-n"),
    (["-m", "poem"], "poem"), (["-x", "1"], "-x"), (["-temp", "1"], "-temp"), (["stray"], "stray"),
    (["-t"], "-t"), (["-n", "3", "-i", "Once upon a time"], "-n"), (["-c", "chatml"], "chatml"),
    (["-k", "int4"], "int4"), (["-k", "F32"], "F32"), (["-k"], "-k"),
]


@pytest.mark.parametrize("args, mentions", BAD_FLAGS, ids=lambda v: repr(v))
def test_bad_flag(engine, args, mentions):
    expect_error(engine, engine.stories, "-z", TOK512, *args, mentions=mentions)


def test_no_checkpoint(engine):
    p = run(engine.binary, check=False)
    assert p.returncode == 1 and b"checkpoint" in p.stderr


# ---------------------------------------------------------------------------
# Bad checkpoints: each is written to a file and must be refused by name.


def v1_header(dim=64, hidden=172, layers=5, heads=8, kv=4, vocab=512, seq=512, shared=1, version=1):
    h = struct.pack("<Ii7iB", 0x616B3432, version, dim, hidden, layers, heads, kv, vocab, seq, shared)
    return h.ljust(256, b"\0")


def legacy(*fields):
    return struct.pack("<7i", *fields) + STORIES_BYTES[28:]


BAD_CHECKPOINTS = {
    "empty": b"",
    "three-bytes": b"\1\2\3",
    "garbage": bytes(range(256)) * 40,
    "truncated": STORIES_BYTES[:-4],
    "truncated-header": STORIES_BYTES[:20],
    "padded": STORIES_BYTES + b"\0\0\0",
    "dim-zero": legacy(0, 172, 5, 8, 4, 512, 512),
    "dim-negative": legacy(-64, 172, 5, 8, 4, 512, 512),
    "heads-not-dividing-dim": legacy(64, 172, 5, 7, 7, 512, 512),
    "odd-head-size": legacy(64, 172, 5, 64, 64, 512, 512),
    "kv-not-dividing-heads": legacy(64, 172, 5, 8, 3, 512, 512),
    "kv-more-than-heads": legacy(64, 172, 5, 8, 16, 512, 512),
    "vocab-int-min": legacy(64, 172, 5, 8, 4, -2**31, 512),
    "huge-layers": legacy(64, 172, 2**30, 8, 4, 512, 512),
    "huge-everything": legacy(2**16, 2**18, 1024, 1024, 1024, 2**21, 2**20),
    "seq-len-zero": legacy(64, 172, 5, 8, 4, 512, 0),
    "v1-header-only": v1_header(),
    "v1-short-header": v1_header()[:100],
    "v1-shared-flag-2": v1_header(shared=2) + b"\0" * 1040128,
    "v1-negative-vocab": v1_header(vocab=-512),
    "version-3": v1_header(version=3),
    "version-2": v1_header(version=2),
    "v1-nan-theta": v1_header()[:64] + struct.pack("<f", float("nan")) + b"\0" * 188 + b"\0" * 1040128,
}


@pytest.mark.parametrize("name", BAD_CHECKPOINTS)
def test_bad_checkpoint(engine, tmp_path, name):
    path = tmp_path / f"{name}.bin"
    path.write_bytes(BAD_CHECKPOINTS[name])
    expect_error(engine, path, "-z", TOK512, "-n", 8, mentions=path)


def test_missing_checkpoint(engine, tmp_path):
    expect_error(engine, tmp_path / "nope.bin", "-z", TOK512, mentions="nope.bin")


def test_directory_as_checkpoint(engine, tmp_path):
    expect_error(engine, tmp_path, "-z", TOK512, mentions=tmp_path)


# ---------------------------------------------------------------------------
# Bad tokenizers


TOK_BYTES = TOK512.read_bytes()


def tok_entry_offset(index):
    off = 4
    for _ in range(index):
        off += 8 + struct.unpack_from("<i", TOK_BYTES, off + 4)[0]
    return off


def patch(data, offset, fmt, value):
    b = bytearray(data)
    struct.pack_into(fmt, b, offset, value)
    return bytes(b)


# name: (file contents, a word the message must contain)
BAD_TOKENIZERS = {
    "empty": (b"", "empty"),
    "truncated": (TOK_BYTES[:-3], "past the end"),
    "header-only": (TOK_BYTES[:4], "after 0 of"),
    "padded": (TOK_BYTES + b"x", "1 bytes after"),
    "garbage": (bytes(range(255, -1, -1)) * 30, "max_token_length"),
    "max-len-zero": (patch(TOK_BYTES, 0, "<i", 0), "max_token_length = 0"),
    "max-len-negative": (patch(TOK_BYTES, 0, "<i", -7), "max_token_length = -7"),
    "length-negative": (patch(TOK_BYTES, tok_entry_offset(300) + 4, "<i", -1), "token 300 has length -1"),
    "length-over-max": (patch(TOK_BYTES, tok_entry_offset(300) + 4, "<i", 8), "token 300 has length 8"),
    "length-past-end": (patch(TOK_BYTES, tok_entry_offset(511) + 4, "<i", 7), "token 511 runs past"),
    "nan-score": (patch(TOK_BYTES, tok_entry_offset(300), "<f", float("nan")), "token 300 has score"),
}


@pytest.mark.parametrize("name", BAD_TOKENIZERS)
def test_bad_tokenizer(engine, tmp_path, name):
    data, word = BAD_TOKENIZERS[name]
    path = tmp_path / f"{name}.tok"
    path.write_bytes(data)
    expect_error(engine, engine.stories, "-z", path, "-n", 8, mentions=path)
    expect_error(engine, engine.stories, "-z", path, "-n", 8, mentions=word)


def test_tokenizer_for_another_model(engine):
    """The Llama 2 tokenizer has 32000 entries; the model expects 512."""
    from conftest import LLAMA_BIN
    expect_error(engine, engine.stories, "-z", LLAMA_BIN, mentions=LLAMA_BIN)


def test_missing_tokenizer(engine, tmp_path):
    expect_error(engine, engine.stories, "-z", tmp_path / "none.bin", mentions="none.bin")


def test_unencodable_prompt_without_byte_fallback(engine, tmp_path):
    m = random_model(1, dim=8, hidden_dim=8, n_layers=1, n_heads=2, vocab_size=6, max_seq_len=16)
    ckpt = engine.save(m, tmp_path / "small.bin", 8)
    tok = write_tokenizer(tmp_path / "small.tok", ["<unk>", "\n<s>\n", "\n</s>\n", " ", "a", "b"])
    assert run(engine.binary, ckpt, "-z", tok, "-m", "tokenize", "-i", "ab").stdout.split()[0] == b"1"
    expect_error(engine, ckpt, "-z", tok, "-i", "abc", mentions="c")


# ---------------------------------------------------------------------------
# Prompt blocks: reading the prompt many tokens per pass must change nothing.


@pytest.mark.parametrize("cache", ["f32", "int8"])
def test_prompt_blocks_change_nothing(engine, tmp_path, cache):
    """Every position's logits, to the bit, and the text, for blocks of 1 (token
    by token), 7 (blocks that do not divide the prompt), at most 50 (three blocks
    of about equal size, rounded up to 16: 48 + 48 + the rest) and the default 192,
    with either KV cache (an int8 one is written once per position, whatever the block)."""
    prompt = "Once upon a time, there was a little dog named Max. He liked to run in the park and " * 2
    outs = []
    for block in ("1", "7", "50", None):
        dump = tmp_path / f"block{block}.logits"
        env = {"RUN_DUMP_LOGITS": str(dump), **({"RUN_BLOCK": block} if block else {})}
        out = stories(engine, "-s", 5, "-n", 160, "-k", cache, "-i", prompt, env=env).stdout
        outs.append((out, dump.read_bytes()))
    assert len(outs[0][1]) > 100 * 2060 and outs[0] == outs[1] == outs[2] == outs[3]


def test_chat_prompt_blocks_change_nothing(engine):
    outs = {stories(engine, "-m", "chat", "-y", "You tell stories.", "-s", 2, "-n", 300,
                    stdin=b"a story about a cat\nand a dog\n", env={"RUN_BLOCK": b} if b else {}).stdout
            for b in ("1", "5", None)}
    assert len(outs) == 1


@pytest.mark.parametrize("value", ["0", "193", "x", "-1"])
def test_bad_run_block(engine, value):
    p = run(engine.binary, engine.stories, "-z", TOK512, check=False, env={"RUN_BLOCK": value})
    assert p.returncode == 1 and b"RUN_BLOCK" in p.stderr
