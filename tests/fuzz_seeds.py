"""Seed corpora for `make fuzz` (tests/fuzz.cpp): small valid inputs of each
kind, written under build/fuzz/seeds/<target>/ at fuzz time (nothing is committed)."""

import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from exporter import writers as E  # noqa: E402
from conftest import TOK512, byte_level_json, random_model, vocab_of_size, write_tokenizer  # noqa: E402

out = Path(sys.argv[1])
E.progress = lambda *_: None
dirs = {t: out / t for t in ("checkpoint", "checkpoint-q8", "tokenizer", "encode", "encode-bpe", "cli")}
for d in dirs.values():
    d.mkdir(parents=True, exist_ok=True)

shapes = [dict(dim=8, n_layers=1, n_heads=2, n_kv_heads=1, hidden_dim=16, vocab_size=5, max_seq_len=8),
          dict(dim=16, n_layers=2, n_heads=4, n_kv_heads=4, hidden_dim=24, vocab_size=7, max_seq_len=4,
               shared_classifier=False),
          # a one-position context: fuzzing found the harness running two positions in it
          dict(dim=8, n_layers=1, n_heads=2, n_kv_heads=1, hidden_dim=16, vocab_size=5, max_seq_len=1)]
for i, args in enumerate(shapes):
    m = random_model(i, **args)
    for v in (0, 1):
        E.write_checkpoint(m, str(dirs["checkpoint"] / f"m{i}-v{v}.bin"), v)
    E.write_checkpoint(m, str(dirs["checkpoint-q8"] / f"m{i}-v2.bin"), 2, 8)
    E.write_checkpoint(m, str(dirs["checkpoint-q8"] / f"m{i}-v3.bin"), 3, 6)  # int4, short last groups

(dirs["tokenizer"] / "tok512.bin").write_bytes(TOK512.read_bytes())
write_tokenizer(dirs["tokenizer"] / "bytes512.bin", vocab_of_size(512))
# a byte-level BPE of 512 ids (256 bytes, 251 merges, 5 special tokens): a seed for the
# tokenizer target, and the tokenizer the encode-bpe target encodes with
letters = "abcdefghijklmnopqrstuvwxyz"
merges = [f"{a} {b}" for a in "Ġ" + letters for b in letters][:251]
with tempfile.TemporaryDirectory() as d:
    (Path(d) / "tokenizer.json").write_text(json.dumps(byte_level_json(merges)), encoding="utf-8")
    E.export_tokenizer(str(Path(d) / "tokenizer.json"), str(dirs["tokenizer"] / "bpe512.bin"))

for i, text in enumerate(["Once upon a time, there was a little girl named Lily.", "", " ", "\n\n\t x",
                          "caf\u00e9 \u4e2d\u6587 \U0001F600", "<unk><s></s><0x41>"]):
    for target in ("encode", "encode-bpe"):
        (dirs[target] / f"t{i}.txt").write_bytes(text.encode())
for target in ("encode", "encode-bpe"):
    (dirs[target] / "bad-utf8.txt").write_bytes(b"\xff\xfe\x80abc\xf0\x9f\x98")
(dirs["encode-bpe"] / "regex.txt").write_bytes("it's  I'LL 12345 \r\n\r\n  x!! \u00a0\u3000y<|eot_id|>".encode())

for i, argv in enumerate([["m.bin"], ["m.bin", "-t", "0.8", "-p", "0.9", "-s", "42", "-n", "100", "-i", "Once"],
                          ["m.bin", "-z", "tok.bin", "-m", "chat", "-y", "be brief"], ["m.bin", "-m", "tokenize"],
                          ["m.bin", "-n", "0", "-t", "1e-45"]]):
    (dirs["cli"] / f"a{i}").write_bytes(b"\0".join(a.encode() for a in argv))
