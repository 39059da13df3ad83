"""make bench: prompt (prefill) and generation speed of ./run.

Models: the real stories260K, and random-weight models with the shapes of
stories15M and stories110M (speed depends on shapes, not on weight values).
Each configuration gets a warm-up run, then the configurations are run in
turn, REPEATS rounds, so drift of a shared machine hits all of them alike;
the table reports the median. GB/s is the weight bytes one token streams
(every matrix once; the embedding only one row) times tokens per second.

  python3 bench.py [--repeats N] [--threads 1,2] [--binary ./run]
"""

import argparse
import os
import platform
import re
import statistics
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))
import export as E  # noqa: E402
import model as M  # noqa: E402

MODELS = Path(os.environ.get("MODELS_DIR", ROOT.parent / "shared" / "models"))
CACHE = ROOT / "build" / "bench"
SHAPES = {
    "stories15M": dict(dim=288, n_layers=6, n_heads=6, n_kv_heads=6, hidden_dim=768, vocab_size=32000, max_seq_len=256),
    "stories110M": dict(dim=768, n_layers=12, n_heads=12, n_kv_heads=12, hidden_dim=2048, vocab_size=32000,
                        max_seq_len=1024),
}
PROMPT = ("Once upon a time, there was a little girl named Lily. She loved to play outside in the park "
          "with her friends. One day, she saw a big red ball under a tree and wanted to play with it, but "
          "it was too high for her to reach, so she asked her mom for help.")


def random_checkpoint(name):
    path = CACHE / f"{name}-random.bin"
    if not path.exists():
        CACHE.mkdir(parents=True, exist_ok=True)
        torch.manual_seed(0)
        print(f"making {path} (random weights)", file=sys.stderr)
        E.progress = lambda msg: None  # quiet
        E.write_checkpoint(M.Transformer(M.ModelArgs(**SHAPES[name])), str(path), 0)
    return path


def bytes_per_token(args):
    kv = args.n_kv_heads * args.head_size
    per_layer = 2 * args.dim * args.dim + 2 * args.dim * kv + 3 * args.dim * args.hidden_dim + 2 * args.dim
    return 4 * (args.n_layers * per_layer + args.dim + args.vocab_size * args.dim + args.dim)


def run_once(binary, model, tokenizer, steps, threads):
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    p = subprocess.run([binary, str(model), "-z", str(tokenizer), "-t", "0", "-n", str(steps), "-i", PROMPT],
                       capture_output=True, env=env, check=True)
    m = re.search(rb"prompt: (\d+) tokens, ([\d.]+) tok/s; generation: (\d+) tokens, ([\d.]+) tok/s", p.stderr)
    return int(m[1]), float(m[2]), int(m[3]), float(m[4])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--binary", default=str(ROOT / "run"))
    a = ap.parse_args()

    configs = [("stories260K", MODELS / "stories260K" / "stories260K.bin", MODELS / "stories260K" / "tok512.bin", 256)]
    for name in SHAPES:
        configs.append((f"{name} (random)", random_checkpoint(name), ROOT / "tokenizer.bin", 256))
    threads = [int(t) for t in a.threads.split(",")]
    runs = [(c, t) for c in configs for t in threads]

    for (name, model, tok, steps), t in runs:  # warm-up: page cache, CPU frequency
        run_once(a.binary, model, tok, steps, t)
    results = {i: [] for i in range(len(runs))}
    for _ in range(a.repeats):
        for i, ((name, model, tok, steps), t) in enumerate(runs):
            results[i].append(run_once(a.binary, model, tok, steps, t))

    cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), platform.machine())
    print(f"\n{a.binary} on {cpu}, {os.cpu_count()} cores; median of {a.repeats} interleaved runs, greedy, "
          f"the same prompt text, 256 positions\n")
    print("| model | threads | prompt tokens | prompt tok/s | generation tok/s | ms/token | GB/s |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for i, ((name, model, tok, steps), t) in enumerate(runs):
        prompt = statistics.median(r[1] for r in results[i])
        gen = statistics.median(r[3] for r in results[i])
        args, *_ = M.read_header(open(model, "rb").read(256))
        gbs = bytes_per_token(args) * gen / 1e9
        n_prompt = results[i][0][0]
        print(f"| {name} | {t} | {n_prompt} | {prompt:.0f} | {gen:.0f} | {1000 / gen:.2f} | {gbs:.1f} |")


if __name__ == "__main__":
    main()
