"""make bench: how much faster are int8 and int4 (runq) than fp32 (run) on this
machine, and at what cost in accuracy. A benchmark, not a test.

Models: the real stories260K, and random-weight checkpoints with the shapes of
stories15M, stories110M and a two-layer slice of Llama 2 7B (speed depends on
shapes, not on values), each in fp32 (version 0), int8 (version 2, group size
64 or the largest divisor below it) and int4 (version 3, group size 32), made
once into build/bench/ and reused.
Each run reads a 128-token prompt (prompt tok/s: processed in blocks, many
tokens per pass over the weights) and then generates (decode tok/s). Every configuration gets a
warm-up run; then all configurations run in turn, --repeats rounds, so the drift
of a shared machine hits them alike; the table shows medians. GB/s is the
weight bytes one generated token streams (every matrix once, the embedding only
one row) times tokens per second, next to the memory read bandwidth that
bench/bandwidth.cpp measures in the same run. "Outside matmuls" is the share of
decode time the engine itself reports spending elsewhere: attention (shown apart:
it reads the KV cache, which grows with the position), norms, quantizing
activations, sampling, starting and joining threads. These runs use the f32 KV
cache (-k f32), so the formats compare the weights alone.

KV cache: for the 110M and 7B-slice shapes, decode speed and attention's share
at positions 64, 256, 1024 and the full context (4096 for the 7B slice), with
the f32 and the int8 cache: a prompt of n - 32 tokens, then 32 generated.

Accuracy: the real stories260K model and each random model read one prompt that
fills every position (teacher forcing) in both engines; the table shows how
often int8's most likely next token is fp32's, and the largest logit difference
relative to the spread (standard deviation) of the fp32 logits.

  python3 bench/bench.py [--repeats N] [--threads 1,2] [--only 260K,15M,110M,7B-2layer]
"""

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
from exporter import writers as E  # noqa: E402
import model as M  # noqa: E402

MODELS = Path(os.environ.get("MODELS_DIR", ROOT.parent / "shared" / "models"))
CACHE = ROOT / "build" / "bench"
SHAPES = {  # name: (model args, positions to run: the 128-token prompt, then decoding)
    "260K": (None, 384),  # the real model
    "15M": (dict(dim=288, n_layers=6, n_heads=6, n_kv_heads=6, hidden_dim=768, vocab_size=32000,
                 max_seq_len=256), 256),
    "110M": (dict(dim=768, n_layers=12, n_heads=12, n_kv_heads=12, hidden_dim=2048, vocab_size=32000,
                  max_seq_len=1024), 256),
    "7B-2layer": (dict(dim=4096, n_layers=2, n_heads=32, n_kv_heads=32, hidden_dim=11008, vocab_size=32000,
                       max_seq_len=4096, shared_classifier=False), 176),
}
PROMPT_TOKENS = 128
STORY = (MODELS / "tinystories" / "tinystories_sample_2MiB.txt").read_text(errors="ignore")


def quiet(*_):
    pass


def checkpoints(name):
    """(fp32 path, int8 path, int4 path, tokenizer), made on first use."""
    args, _ = SHAPES[name]
    fp32, q8, q4 = CACHE / f"{name}-fp32.bin", CACHE / f"{name}-q8.bin", CACHE / f"{name}-q4.bin"
    tok = ROOT / "tokenizer.bin"
    if args is None:  # stories260K: the real fp32 file, quantized here
        fp32, tok = MODELS / "stories260K" / "stories260K.bin", MODELS / "stories260K" / "tok512.bin"
    if not (fp32.exists() and q8.exists() and q4.exists()):
        CACHE.mkdir(parents=True, exist_ok=True)
        print(f"making {name}'s checkpoints (once)", file=sys.stderr, flush=True)
        torch.manual_seed(0)
        with torch.no_grad():
            m = M.load_checkpoint(str(fp32)) if args is None else M.Transformer(M.ModelArgs(**args))
        E.progress = quiet
        if args is not None:
            E.write_checkpoint(m, str(fp32), 0)
        E.write_checkpoint(m, str(q8), 2, 64)
        E.write_checkpoint(m, str(q4), 3, 32)
    return fp32, q8, q4, tok


def prompt_of(n_tokens, binary, model, tokenizer):
    """The longest start of the TinyStories sample that is at most n_tokens tokens (BOS included)."""
    from conftest import fit_prompt
    return fit_prompt(STORY.split()[: 4 * n_tokens], n_tokens, binary, model, tokenizer)


def weight_bytes(path):
    """Bytes of weights one generated token reads: all matrices and norms, one
    embedding row (the classifier reads the whole table when it is shared)."""
    args, version, gs, _ = M.read_header(open(path, "rb").read(256))
    kv = args.n_kv_heads * args.head_size
    matrices = args.n_layers * (2 * args.dim * args.dim + 2 * args.dim * kv + 3 * args.dim * args.hidden_dim)
    matrices += args.vocab_size * args.dim  # classifier
    per_value = 4 if version < 2 else (1 if version == 2 else 0.5) + 4 / gs  # ignoring short groups
    return matrices * per_value + 4 * (2 * args.n_layers + 1) * args.dim + per_value * args.dim


def run_once(binary, model, tokenizer, steps, threads, prompt, dump=None, cache="f32"):
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    if dump:
        env["RUN_DUMP_LOGITS"] = dump
    p = subprocess.run([binary, str(model), "-z", str(tokenizer), "-t", "0", "-n", str(steps), "-i", prompt,
                        "-k", cache], capture_output=True, env=env, check=True)
    m = re.search(rb"prompt: (\d+) tokens, ([\d.]+) tok/s; generation: (\d+) tokens, ([\d.]+) tok/s "
                  rb"\((\d+)% matmuls, (\d+)% attention\)", p.stderr)
    return float(m[2]), float(m[4]), int(m[1]), 100 - int(m[5]), int(m[6])


def bandwidth():
    exe = ROOT / "build" / "bandwidth"
    out = subprocess.run([str(exe)], capture_output=True, text=True, check=True).stdout
    return {int(t): float(g) for t, g in re.findall(r"threads (\d+) GB/s ([\d.]+)", out)}


def agreement(pairs, tokenizer, prompt, steps, vocab):
    """Teacher-forced top-1 agreement and max |logit difference| / std of fp32 logits."""
    from conftest import read_dump
    dumps = []
    with tempfile.TemporaryDirectory() as d:
        for i, (binary, model) in enumerate(pairs):
            path = f"{d}/{i}.logits"
            run_once(binary, model, tokenizer, steps, 1, prompt, dump=path)
            dumps.append(read_dump(path, vocab))
    (_, t32, z32, _), (_, tq, zq, _) = dumps
    ids = subprocess.run([pairs[0][0], str(pairs[0][1]), "-z", str(tokenizer), "-m", "tokenize", "-i", prompt],
                         capture_output=True, check=True).stdout.split()
    n = min(len(ids), len(t32))  # the positions that read the prompt
    assert t32[:n] == tq[:n]
    top1 = (z32[:n].argmax(-1) == zq[:n].argmax(-1)).double().mean().item()
    rel = ((zq[:n] - z32[:n]).abs().amax(-1) / z32[:n].std(-1)).max().item()
    return n, top1, rel


KV_POSITIONS = {"110M": (64, 256, 1024), "7B-2layer": (64, 256, 1024, 4096)}  # up to the full context
DECODE_AT = 32  # generated tokens that measure the decode speed just before each position


def kv_table(shapes, run_bin, runq_bin, t, repeats):
    """Decode speed and attention's share at position n with each KV cache: a
    prompt of n - 32 tokens (read in blocks), then 32 generated tokens."""
    configs = []
    for name in shapes:
        fp32, q8, _, tok = checkpoints(name)
        engines = [("runq (int8)", runq_bin, q8)] + ([("run (fp32)", run_bin, fp32)] if name == "110M" else [])
        for n in KV_POSITIONS[name]:
            prompt = prompt_of(n - DECODE_AT, run_bin, fp32, tok)
            for engine, b, model in engines:
                for cache in ("f32", "int8"):
                    configs.append((name, engine, n, cache, b, model, tok, prompt))
    print("warming up the KV cache runs", file=sys.stderr, flush=True)
    for name, _, n, cache, b, model, tok, prompt in configs:
        run_once(b, model, tok, n, t, prompt, cache=cache)
    results = [[] for _ in configs]
    for r in range(repeats):
        print(f"KV cache round {r + 1} of {repeats}", file=sys.stderr, flush=True)
        for i, (name, _, n, cache, b, model, tok, prompt) in enumerate(configs):
            results[i].append(run_once(b, model, tok, n, t, prompt, cache=cache))
    print(f"\n## The KV cache: decode at position n, f32 against int8 cache ({t} threads, {DECODE_AT} tokens "
          f"generated up to n after a prompt of n - {DECODE_AT}; median of {repeats} interleaved rounds)\n")
    print("| model | engine | n | KV cache | cache MB at n | decode tok/s | attention | matmuls | int8 / f32 |")
    print("|---|---|---:|---|---:|---:|---:|---:|---:|")
    f32_speed = {}
    for i, (name, engine, n, cache, b, model, tok, prompt) in enumerate(configs):
        args, *_ = M.read_header(open(model, "rb").read(256))
        row = args.n_layers * n * args.n_kv_heads * args.head_size
        mb = 2 * (row * 4 if cache == "f32" else row + 4 * args.n_layers * n * args.n_kv_heads) / 1e6
        dec = statistics.median(r[1] for r in results[i])
        att = statistics.median(r[4] for r in results[i])
        matmuls = statistics.median(100 - r[3] for r in results[i])
        f32_speed.setdefault((name, engine, n), dec)
        ratio = f"{dec / f32_speed[name, engine, n]:.2f}x" if cache == "int8" else ""
        print(f"| {name} | {engine} | {n} | {cache} | {mb:.1f} | {dec:.1f} | {att:.0f}% | {matmuls:.0f}% | {ratio} |")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", default=f"1,{os.cpu_count()}")
    ap.add_argument("--only", default=",".join(SHAPES))
    a = ap.parse_args()

    run_bin, runq_bin, tok = str(ROOT / "run"), str(ROOT / "runq"), ROOT / "tokenizer.bin"
    names = a.only.split(",")
    threads = sorted({int(t) for t in a.threads.split(",")})
    configs = []
    for name in names:
        fp32, q8, q4, tok = checkpoints(name)
        steps = SHAPES[name][1]
        prompt = prompt_of(PROMPT_TOKENS, run_bin, fp32, tok)
        for t in threads:
            configs += [(name, "run (fp32)", run_bin, fp32, tok, prompt, steps, t),
                        (name, "runq (int8)", runq_bin, q8, tok, prompt, steps, t),
                        (name, "runq (int4)", runq_bin, q4, tok, prompt, steps, t)]

    print("warming up", file=sys.stderr, flush=True)
    for _, _, b, model, tok, prompt, steps, t in configs:
        run_once(b, model, tok, steps, t, prompt)
    results = [[] for _ in configs]
    bws = []  # bandwidth is measured every round too: a shared machine drifts
    for r in range(a.repeats):
        print(f"round {r + 1} of {a.repeats}", file=sys.stderr, flush=True)
        bws.append(bandwidth())
        for i, (_, _, b, model, tok, prompt, steps, t) in enumerate(configs):
            results[i].append(run_once(b, model, tok, steps, t, prompt))
    bw = {t: statistics.median(m[t] for m in bws) for t in bws[0]}

    cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
    print(f"\n## Speed: {cpu}, {os.cpu_count()} cores; greedy; {PROMPT_TOKENS}-token prompt; "
          f"median of {a.repeats} interleaved rounds\n")
    print("memory read bandwidth (bench/bandwidth.cpp, median of one measurement per round): " +
          ", ".join(f"{t} thread{'s' * (t > 1)} {bw[t]:.1f} GB/s (range {min(m[t] for m in bws):.1f}-"
                    f"{max(m[t] for m in bws):.1f})" for t in sorted(bw)) + "\n")
    print("| model | engine | threads | prompt tok/s | decode tok/s | prompt / decode | weight MB/token | GB/s "
          "| % of bandwidth | decode time outside matmuls (attention) | decode vs fp32 | int4 vs int8 |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    decode = {}
    for i, (name, engine, b, model, tok, prompt, steps, t) in enumerate(configs):
        prompt_tps = statistics.median(r[0] for r in results[i])
        dec = statistics.median(r[1] for r in results[i])
        outside = statistics.median(r[3] for r in results[i])
        att = statistics.median(r[4] for r in results[i])
        decode[name, engine, t] = dec
        mb = weight_bytes(model) / 1e6
        gbs = mb * dec / 1e3
        speedup = f"{dec / decode[name, 'run (fp32)', t]:.2f}x" if engine.startswith("runq") else ""
        vs8 = f"{dec / decode[name, 'runq (int8)', t]:.2f}x" if engine == "runq (int4)" else ""
        ref_bw = bw.get(t, max(bw.values()))
        print(f"| {name} | {engine} | {t} | {prompt_tps:.1f} | {dec:.1f} | {prompt_tps / dec:.1f}x | {mb:.2f} | "
              f"{gbs:.1f} | {100 * gbs / ref_bw:.0f}% | {outside:.0f}% ({att:.0f}%) | {speedup} | {vs8} |")

    kv_shapes = [n for n in ("110M", "7B-2layer") if n in names]
    if kv_shapes:  # the KV cache as the context grows: f32 against int8
        kv_table(kv_shapes, run_bin, runq_bin, max(threads), a.repeats)

    print("\n## Accuracy against fp32: one prompt read by both engines (teacher forcing)\n")
    print("| model | format | positions | top-1 agreement | max logit difference / logit std |")
    print("|---|---|---:|---:|---:|")
    for name in names:
        fp32, q8, q4, tok = checkpoints(name)
        args, *_ = M.read_header(open(fp32, "rb").read(256))
        n_prompt = min(args.max_seq_len, 256)
        prompt = prompt_of(n_prompt, run_bin, fp32, tok)
        for label, qpath in (("int8", q8), ("int4", q4)):
            n, top1, rel = agreement([(run_bin, fp32), (runq_bin, qpath)], tok, prompt, n_prompt, args.vocab_size)
            kind = "real" if SHAPES[name][0] is None else "random weights"
            print(f"| {name} ({kind}) | {label} | {n} | {top1:.1%} | {rel:.3f} |")


if __name__ == "__main__":
    main()
