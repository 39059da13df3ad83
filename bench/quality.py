"""make quality: what each weight format costs in quality and buys in speed.
A benchmark, not a test.

For the real stories260K model (../shared/models), the project's own model and
any fp32 checkpoint given with --model / --tokenizer, four formats: fp32 (run),
int8 (version 2, group size 64 or the largest divisor below it), int4 (version
3, group size 32) and int4 with AWQ (export.py --awq, calibrated on the first
100,000 bytes of the TinyStories sample). Each is measured on held-out text,
the sample's last 100,000 bytes (story separators removed), which the
calibration never saw (for the project's own model they are also outside its
training data): perplexity with `-m perplexity` (windows of the model's whole
context) with the f32 and the int8 KV cache (`-k`), how often the int8 cache's
most likely next token is the f32 cache's (one prompt of the held-out text
filling the context, read by both), and decode speed as the median of
--repeats interleaved greedy runs. Exported files go to build/quality/.

  python3 bench/quality.py [--model M.bin --tokenizer T.bin] [--repeats 3]
"""

import argparse
import os
import re
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MODELS = Path(os.environ.get("MODELS_DIR", ROOT.parent / "shared" / "models"))
OUT = ROOT / "build" / "quality"
SAMPLE = MODELS / "tinystories" / "tinystories_sample_2MiB.txt"
FORMATS = [  # label, engine, export arguments (None: the fp32 file itself)
    ("fp32", "run", None),
    ("int8", "runq", ["--version", "2"]),
    ("int4", "runq", ["--version", "3"]),
    ("int4 + AWQ", "runq", ["--version", "3", "--awq", "CALIB"]),
]


def export(src, dst, args, tokenizer, calib):
    if dst.exists() and dst.stat().st_mtime > max(src.stat().st_mtime, (ROOT / "export.py").stat().st_mtime):
        return
    args = [str(calib) if a == "CALIB" else a for a in args]
    if "--awq" in args:
        args += ["--awq-tokenizer", str(tokenizer)]
    subprocess.run([sys.executable, str(ROOT / "export.py"), str(dst), "--bin", str(src), *args],
                   check=True, capture_output=True)


def perplexity(engine, model, tokenizer, text, cache="f32"):
    out = subprocess.run([str(ROOT / engine), str(model), "-z", str(tokenizer), "-m", "perplexity", "-f", str(text),
                          "-k", cache], capture_output=True, text=True, check=True).stdout
    m = re.match(r"perplexity (\S+) \+- (\S+) .* over (\d+) tokens", out)
    return float(m[1]), float(m[2]), int(m[3])


def decode_speed(engine, model, tokenizer):
    p = subprocess.run([str(ROOT / engine), str(model), "-z", str(tokenizer), "-t", "0", "-n", "256",
                        "-k", "f32", "-i", "Once upon a time"], capture_output=True, text=True, check=True)
    return float(re.search(r"generation: \d+ tokens, ([\d.]+) tok/s", p.stderr)[1])


def cache_agreement(engine, model, tokenizer, text):
    """Top-1 agreement of the int8 KV cache with the f32 one over a prompt that
    fills the model's context (teacher forcing: both read the same tokens)."""
    sys.path.insert(0, str(ROOT / "tests"))
    from conftest import fit_prompt, read_dump
    import model as M
    args, *_ = M.read_header(open(model, "rb").read(256))
    words = text.read_text(errors="ignore").split()[: 4 * args.max_seq_len]
    prompt = fit_prompt(words, args.max_seq_len, str(ROOT / engine), model, tokenizer)
    tops = []
    for cache in ("f32", "int8"):
        dump = OUT / f"agree-{cache}.logits"
        subprocess.run([str(ROOT / engine), str(model), "-z", str(tokenizer), "-t", "0", "-n", str(args.max_seq_len),
                        "-k", cache, "-i", prompt], capture_output=True, check=True,
                       env=dict(os.environ, RUN_DUMP_LOGITS=str(dump)))
        _, fed, logits, _ = read_dump(dump, args.vocab_size)
        tops.append((fed, logits.argmax(-1)))
    (fed32, top32), (fed8, top8) = tops
    n = next((i for i, (a, b) in enumerate(zip(fed32, fed8)) if a != b), min(len(fed32), len(fed8)))
    return (top32[:n] == top8[:n]).double().mean().item(), n


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", help="another fp32 checkpoint (version 0 or 1)")
    ap.add_argument("--tokenizer", help="its tokenizer.bin")
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args()
    models = [("stories260K", MODELS / "stories260K" / "stories260K.bin", MODELS / "stories260K" / "tok512.bin")]
    own = ROOT / "models" / "tinystories.bin"
    if own.exists():
        models.append(("own (models/)", own, ROOT / "models" / "tinystories-tok.bin"))
    if a.model and Path(a.model).resolve() != own.resolve():
        models.append((Path(a.model).stem, Path(a.model), Path(a.tokenizer or "tokenizer.bin")))

    OUT.mkdir(parents=True, exist_ok=True)
    text = SAMPLE.read_bytes()
    calib, heldout = OUT / "calibration.txt", OUT / "heldout.txt"
    calib.write_bytes(text[:100_000])
    heldout.write_bytes(text[-100_000:].replace(b"<|endoftext|>", b""))

    rows = []  # (model, label, engine, path, tokenizer)
    for name, src, tok in models:
        for label, engine, args in FORMATS:
            path = src
            if args:
                path = OUT / f"{src.stem}-{label.replace(' + ', '-').lower()}.bin"
                print(f"exporting {path.name}", file=sys.stderr, flush=True)
                export(src, path, args, tok, calib)
            rows.append((name, label, engine, path, tok))

    print("measuring perplexity", file=sys.stderr, flush=True)
    ppl = {r[:2]: perplexity(r[2], r[3], r[4], heldout) for r in rows}
    ppl8 = {r[:2]: perplexity(r[2], r[3], r[4], heldout, "int8") for r in rows}
    agree = {r[:2]: cache_agreement(r[2], r[3], r[4], heldout) for r in rows}
    for _, _, engine, path, tok in rows:  # warm-up
        decode_speed(engine, path, tok)
    speeds = {r[:2]: [] for r in rows}
    for i in range(a.repeats):
        print(f"decode round {i + 1} of {a.repeats}", file=sys.stderr, flush=True)
        for r in rows:
            speeds[r[:2]].append(decode_speed(r[2], r[3], r[4]))

    cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
    threads = os.environ.get("OMP_NUM_THREADS", str(os.cpu_count()))
    print(f"\n## Quality against speed: {cpu}, {threads} threads; held-out text: the last 100,000 bytes of the "
          f"TinyStories sample; decode: median of {a.repeats} interleaved greedy runs of 256 positions\n")
    print("| model | format | file MB | perplexity | tokens | decode tok/s | perplexity, int8 KV cache | "
          "change | top-1 agreement with the f32 cache |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for name, label, _, path, _ in rows:
        p, se, n = ppl[name, label]
        p8, se8, _ = ppl8[name, label]
        top1, positions = agree[name, label]
        print(f"| {name} | {label} | {path.stat().st_size / 1e6:.2f} | {p:.3f} +- {se:.3f} | {n} | "
              f"{statistics.median(speeds[name, label]):.0f} | {p8:.3f} +- {se8:.3f} | {100 * (p8 / p - 1):+.2f}% | "
              f"{top1:.1%} of {positions} |")
    print()
    for name, *_ in models:
        fp, q4, awq = (ppl[name, f][0] for f in ("fp32", "int4", "int4 + AWQ"))
        gap = q4 - fp
        closed = f"{100 * (q4 - awq) / gap:.0f}%" if gap > 0 else "n/a (no gap)"
        print(f"- {name}: int4 adds {gap:.3f} to fp32's perplexity; AWQ closes {closed} of that")


if __name__ == "__main__":
    main()
