"""Write our .bin checkpoints and tokenizer.bin (the formats it reads: exporter/).

  python3 export.py OUT.bin [--version 0|1|2|3] [--group-size N] --checkpoint model.pt  # llama2.c training checkpoint
  python3 export.py OUT.bin [--version 0|1|2|3] [--group-size N] --bin IN.bin           # convert between our versions
  python3 export.py OUT.bin --version 3 --awq CALIB.txt --awq-tokenizer tok.bin --bin IN.bin  # with AWQ
  python3 export.py OUT.bin [--version 0|1|2|3] [--group-size N] --hf DIR             # Hugging Face Llama
  python3 export.py OUT.bin [--version 0|1|2|3] [--group-size N] --meta DIR --seq-len 4096  # Meta Llama 2
  python3 export.py OUT.bin [--version 0|1|2|3] --gguf IN.gguf [-o tokenizer.bin]  # llama.cpp's GGUF
  python3 export.py --tokenizer tokenizer.model|tokenizer.json [-o tokenizer.bin]  # -> tokenizer.bin
  python3 export.py OUT.gguf --to-gguf [--type f32|f16|q8_0|q4_0] [--vocab tokenizer.bin] --bin IN.bin  # (or any source)

The command line only: the readers and writers are in exporter/ (the layouts:
docs/file-formats.md).
"""

import argparse
import os
import struct

import model as M
from exporter import fail, progress
from exporter.awq import apply_awq, calibration_windows, clip_awq
from exporter.checkpoint import load_training_checkpoint
from exporter.gguf import GGUF_TYPES, default_version, load_gguf, our_groups, vocabulary_meta, write_gguf
from exporter.hf import load_hf
from exporter.meta import load_meta
from exporter.tokenizers import read_tokenizer_bin, read_tokenizer_extension
from exporter.writers import export_tokenizer, group_size_for, tokenizer_pieces, write_checkpoint, write_tokenizer


# ----------------------------------------------------------------------------
# The command line


def to_gguf(a, model):
    """export.py OUT.gguf --to-gguf: the model and its vocabulary for llama.cpp."""
    if a.version is not None or a.group_size is not None or a.awq:
        fail("--to-gguf writes GGUF: --version, --group-size and --awq do not apply (use --type)")
    groups, version = None, 0  # a version 2 / 3 file's groups of 32 are copied when they are GGUF's blocks
    if a.bin:
        groups, version = our_groups(a.bin), M.read_header(open(a.bin, "rb").read(256))[1]
    elif a.gguf:
        version = default_version(model, say=False)
    if a.type is None:
        a.type = {2: "q8_0", 3: "q4_0"}.get(version, "f32")
    if a.gguf:  # its own vocabulary, as it is
        meta = {k: v for k, v in model.gguf.meta.items() if k.startswith("tokenizer.ggml.")}
    else:
        path = a.vocab or "tokenizer.bin"
        used = path if a.vocab else f"{path} (no --vocab given, so ./tokenizer.bin)"
        if not os.path.isfile(path):
            fail(f"{used}: no such file: --to-gguf needs the model's tokenizer.bin (--vocab)")
        count = len(read_tokenizer_bin(path)[0])
        if count != model.args.vocab_size:
            fail(f"{used}: {count} pieces, but the model's vocabulary has {model.args.vocab_size}: "
                 "--vocab names the model's own tokenizer.bin")
        pieces, scores = read_tokenizer_bin(path, model.args.vocab_size)
        meta = vocabulary_meta(pieces, scores, read_tokenizer_extension(path, len(pieces)))
    write_gguf(a.out, model, GGUF_TYPES[a.type], meta, groups)

# ----------------------------------------------------------------------------


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", nargs="?", help="output checkpoint (.bin)")
    ap.add_argument("--version", type=int,
                    help="0 (llama2.c legacy fp32, default), 1 (fp32), 2 (int8 groups) or 3 (int4 groups); "
                         "2 and 3 run with runq. --gguf: default 3 for a Q4_0 file, 2 for Q8_0, else 0")
    ap.add_argument("--group-size", type=int,
                    help="versions 2 and 3: values per scale. Version 2: default 64, backs off to a divisor "
                         "of dim and hidden_dim; version 3: default 32, at most 256, a row's last group may be shorter")
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", help="llama2.c training checkpoint (.pt)")
    src.add_argument("--bin", help="one of our .bin checkpoints, any version")
    src.add_argument("--hf", metavar="DIR", help="Hugging Face Llama directory (config.json + safetensors)")
    src.add_argument("--meta", metavar="DIR", help="Meta Llama directory (params.json + consolidated.*.pth)")
    src.add_argument("--gguf", metavar="IN.gguf", help="llama.cpp's GGUF (v2/v3, Llama; F32, F16, BF16, Q8_0, "
                     "Q4_0); its tokenizer goes to -o")
    src.add_argument("--tokenizer", help="sentencepiece tokenizer.model, or a Hugging Face tokenizer.json")
    ap.add_argument("--seq-len", type=int, help="--meta: the context length (Llama 2: 4096)")
    ap.add_argument("--to-gguf", action="store_true", help="write OUT as a GGUF v3 file for llama.cpp")
    ap.add_argument("--type", choices=sorted(GGUF_TYPES),
                    help="--to-gguf: the matrices' type (default: q8_0 from a version 2 file, q4_0 from version 3, "
                         "else f32); norms stay f32, a q4_0 file's classifier is q8_0")
    ap.add_argument("--vocab", metavar="tokenizer.bin",
                    help="--to-gguf: the model's tokenizer.bin (default tokenizer.bin; a --gguf source brings its own)")
    ap.add_argument("--awq", metavar="CALIB.txt",
                    help="versions 2 and 3: activation-aware scaling, calibrated on this text")
    ap.add_argument("--awq-tokenizer", default="tokenizer.bin", help="--awq: the model's tokenizer.bin")
    ap.add_argument("--awq-tokens", type=int, default=4096, help="--awq: calibration tokens (default 4096)")
    ap.add_argument("-o", dest="tokenizer_out", default="tokenizer.bin",
                    help="tokenizer output of --tokenizer and --gguf (default tokenizer.bin)")
    a = ap.parse_args()
    check_outputs(a)
    source = a.tokenizer or a.gguf or a.hf or a.meta or a.checkpoint or a.bin
    try:
        convert(a)
    except RecursionError:
        fail(f"{source}: nested too deeply to read")
    except (KeyError, TypeError, AttributeError, IndexError, ValueError, OverflowError, MemoryError,
            struct.error) as e:  # what no check above foresaw: still one line, and nothing written
        fail(f"{source}: cannot convert it ({type(e).__name__}: {e})")


def check_outputs(a):
    """The files this run writes, checked before any work: each a file in a
    folder that exists, and the checkpoint and tokenizer not one file."""
    outs = [a.tokenizer_out] if a.tokenizer else [a.out] + ([a.tokenizer_out] if a.gguf and not a.to_gguf else [])
    for out in filter(None, outs):
        folder = os.path.dirname(os.path.abspath(out))
        if not os.path.isdir(folder):
            fail(f"{out}: directory {folder} does not exist")
        if os.path.isdir(out):
            fail(f"{out} is a directory: name the file to write")
    if len(outs) == 2 and os.path.realpath(outs[0]) == os.path.realpath(outs[1]):
        fail(f"{a.out} is both the checkpoint and the tokenizer (-o): name two files")


def convert(a):
    if a.tokenizer:
        export_tokenizer(a.tokenizer, a.tokenizer_out)
        return
    if not a.out:
        fail("give the output checkpoint path")
    if a.checkpoint:
        model = load_training_checkpoint(a.checkpoint)
    elif a.hf:
        model = load_hf(a.hf)
    elif a.meta:
        model = load_meta(a.meta, a.seq_len)
    elif a.gguf:
        model = load_gguf(a.gguf)
        if a.version is None and not a.to_gguf:
            a.version = default_version(model)
            if a.version == 0 and (model.args.rope_theta != M.DEFAULT_ROPE_THETA
                                   or model.args.norm_eps != M.DEFAULT_NORM_EPS):
                a.version = 1
        if a.group_size is None and a.version in (2, 3) and not a.to_gguf:
            a.group_size = 32  # GGUF's blocks: copied exactly
        gguf_tokens = tokenizer_pieces(a.gguf, *model.vocabulary)  # checked before anything is written
    else:
        if not os.path.isfile(a.bin):
            fail(f"{a.bin}: no such file")
        try:
            model = M.load_checkpoint(a.bin)
        except (ValueError, RuntimeError, struct.error) as e:
            fail(f"{a.bin}: not a valid checkpoint ({e})")
    if a.awq:
        if a.version not in (2, 3):
            fail("--awq scales weights for quantization: use it with --version 2 or 3")
        if not isinstance(model, M.Transformer):  # a lazy model: AWQ needs every weight in memory
            lazy, model = model, M.Transformer(model.args)
            model.load_state_dict(dict(lazy.state_dict().items()))
        gs = group_size_for(model.args, a.version, a.group_size)
        windows = calibration_windows(a.awq, a.awq_tokenizer, model.args.max_seq_len, model.args.vocab_size,
                                      a.awq_tokens)
        progress(f"AWQ: calibrating on {sum(len(w) - 1 for w in windows)} tokens of {a.awq}")
        apply_awq(model, windows, gs, 7 if a.version == 3 else 127)
        clip_awq(model, windows, gs, 7 if a.version == 3 else 127)
    if a.to_gguf:
        return to_gguf(a, model)
    if a.version is None:
        a.version = 0
    write_checkpoint(model, a.out, a.version, a.group_size)
    if a.gguf:
        try:
            write_tokenizer(a.gguf, a.tokenizer_out, gguf_tokens, model.vocabulary[3])
        except BaseException:  # (SystemExit included) a refused run leaves neither file
            os.remove(a.out)
            raise


if __name__ == "__main__":
    main()
