"""Activation-aware scaling (AWQ, Lin et al. 2023) for export.py --awq."""

import collections
import os

import torch

from exporter import fail, progress
from exporter.quantize import in_groups, quantize_groups
from exporter.tokenizers import SentencePieceEncoder, read_tokenizer_bin

# Activation-aware scaling (AWQ, Lin et al. 2023): before quantizing, scale each
# matrix's input channels up where the calibration activations are large, and
# fold the inverse into the operation that produces those activations, so the
# fp32 model computes the same function while its salient weights lose less to
# rounding. For a layer group sharing an input X (N, n) and one scale s (n,):
#   y = X W^T = (X / s) (W s)^T   and the quantized model computes (X / s) Q(W s)^T.
# s = mean|X|^alpha (normalized), or that over mean|W|^(1 - alpha) as AutoAWQ
# does, alpha from a grid in [0, 1] minimising the group's output error on the
# calibration activations; alpha = 0 is plain rounding, so the chosen scale is
# never worse than it there.



def layer_inputs(model, windows):
    """Per layer, the inputs of wq (= wk, wv), wo, w1 (= w3) and w2 over the
    calibration windows, as (tokens, width) float32 matrices; and the classifier's."""
    captured = [{k: [] for k in ("qkv", "o", "ffn", "w2")} for _ in model.layers]  # per layer
    hooks = []
    for i, layer in enumerate(model.layers):
        for key, module in (("qkv", layer.attention.wq), ("o", layer.attention.wo),
                            ("ffn", layer.feed_forward.w1), ("w2", layer.feed_forward.w2)):
            hooks.append(module.register_forward_hook(
                lambda _m, inp, _out, i=i, key=key: captured[i][key].append(inp[0].reshape(-1, inp[0].shape[-1]))))
    final = []  # the classifier's input
    hooks.append(model.output.register_forward_hook(lambda _m, inp, _out: final.append(inp[0].reshape(-1, inp[0].shape[-1]))))
    with torch.no_grad():
        for w in windows:
            model(torch.tensor([w]))
    for h in hooks:
        h.remove()
    return [{k: torch.cat(v) for k, v in c.items()} for c in captured], torch.cat(final)


ScaleSearch = collections.namedtuple("ScaleSearch", "choice s plain_error error")


def search_scale(X, weights, group_size, qmax, tie=None):
    """The AWQ search for one layer group: a ScaleSearch of the candidate chosen
    (e.g. "0.35" or "0.35/w"), its scales s, and the relative output error
    with plain rounding and with s.
    Candidates: s = mean|x|^alpha, and s = mean|x|^alpha / mean|w|^(1 - alpha)
    (|w| relative to its group's largest, so channels whose weights already
    fill the grid are scaled up less), alpha in 0..1 by 0.05. tie = (kv_heads,
    rep, head_size): wo's input, where rep query heads read one value head, so
    those channels must share a scale (it is folded into that value head's rows
    of wv)."""
    W = torch.cat([w.detach().float() for w in weights])
    rows, n = W.shape
    Wg = in_groups(W.abs(), group_size)
    w_mean = (Wg / Wg.amax(2, keepdim=True).clamp(min=1e-30)).view(rows, -1)[:, :n].mean(0)
    x_mean = X.abs().mean(0)
    if tie:
        kv, rep, hs = tie
        tied = lambda v: v.view(kv, rep, hs).mean(1, keepdim=True).expand(kv, rep, hs).reshape(-1)
        x_mean, w_mean = tied(x_mean), tied(w_mean)
    Y = [X @ w.T for w in weights]
    norm = sum((y * y).sum() for y in Y)
    best, plain = None, None
    for with_w in (False, True):
        for alpha in [i / 20 for i in range(21)]:
            s = x_mean.clamp(min=1e-5) ** alpha
            if with_w:
                s = s / w_mean.clamp(min=1e-5) ** (1 - alpha)
            s = s / torch.sqrt(s.max() * s.min())
            err = sum(((X / s) @ quantize_groups(w * s, group_size, qmax)[2].T - y).pow(2).sum()
                      for w, y in zip(weights, Y))
            plain = err if plain is None else plain
            if best is None or err < best[1]:
                best = (f"{alpha:.2f}" + "/w" * with_w, err, s)
    return ScaleSearch(best[0], best[2], (plain / norm).item(), (best[1] / norm).item())


def apply_awq(model, windows, group_size, qmax):
    """Searches every layer's four scales on the calibration windows, then folds
    them in: 1/s into the RMSNorm weights (for wq/wk/wv and w1/w3), into wv's
    rows (for wo) and into w3's rows (for w2); s into the matrices' columns.
    The fp32 model's function is unchanged; only its rounding moves."""
    a = model.args
    kv, rep, hs = a.n_kv_heads, a.n_heads // a.n_kv_heads, a.head_size
    inputs, _ = layer_inputs(model, windows)
    total = {"plain": 0.0, "awq": 0.0}
    with torch.no_grad():
        for i, (layer, X) in enumerate(zip(model.layers, inputs)):
            att, ffn = layer.attention, layer.feed_forward
            found = {
                "wq/wk/wv": search_scale(X["qkv"], [att.wq.weight, att.wk.weight, att.wv.weight], group_size, qmax),
                "wo": search_scale(X["o"], [att.wo.weight], group_size, qmax, tie=(kv, rep, hs)),
                "w1/w3": search_scale(X["ffn"], [ffn.w1.weight, ffn.w3.weight], group_size, qmax),
                "w2": search_scale(X["w2"], [ffn.w2.weight], group_size, qmax),
            }
            s = {k: v.s for k, v in found.items()}
            layer.attention_norm.weight /= s["wq/wk/wv"]
            for W in (att.wq.weight, att.wk.weight, att.wv.weight):
                W *= s["wq/wk/wv"]
            att.wv.weight /= s["wo"].view(kv, rep, hs)[:, 0, :].reshape(-1, 1)
            att.wo.weight *= s["wo"]
            layer.ffn_norm.weight /= s["w1/w3"]
            ffn.w1.weight *= s["w1/w3"]
            ffn.w3.weight *= s["w1/w3"]
            ffn.w3.weight /= s["w2"].reshape(-1, 1)
            ffn.w2.weight *= s["w2"]
            progress(f"  layer {i}: " + "; ".join(f"{k} alpha {v.choice}, error {v.plain_error:.3g} -> {v.error:.3g}"
                                                  for k, v in found.items()))
            total["plain"] += sum(v.plain_error for v in found.values())
            total["awq"] += sum(v.error for v in found.values())
    n = 4 * len(model.layers)
    progress(f"AWQ: mean relative output error over the {n} layer groups {total['plain'] / n:.3g} with plain "
             f"rounding, {total['awq'] / n:.3g} with the chosen scales")


def search_clip(X, W, group_size, qmax):
    """AWQ's second half: for every group of every row, the clipping ratio r
    (scale = r max|v| / qmax, outliers clamped) minimising that group's share
    of the output error on the calibration input X (N, n). Returns W clamped to
    r max|v| per group, which export then quantizes with that scale."""
    rows, n = W.shape
    Wg, Xg = in_groups(W, group_size), in_groups(X, group_size)
    top = Wg.abs().amax(2, keepdim=True)
    best_err, best = None, Wg
    for r in [1.0 - i / 40 for i in range(21)]:  # 1.0 down to 0.5 by 0.025
        clipped = torch.maximum(torch.minimum(Wg, r * top), -r * top)
        scale = (r * top / qmax).clamp(min=1e-30)
        delta = torch.round(clipped / scale) * scale - Wg  # (rows, groups, gs)
        err = torch.einsum("ngk,rgk->rgn", Xg, delta).pow(2).sum(2)  # (rows, groups)
        if best_err is None:
            best_err = err
            continue
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best = torch.where(better[..., None], clipped, best)
    return best.reshape(rows, -1)[:, :n]


def clip_awq(model, windows, group_size, qmax):
    """search_clip for every matrix of every layer and the classifier, on the
    scaled model's inputs. A classifier that shares the embedding table is
    stored apart first: clipped for its inputs, the table would lose rows'
    outliers the embedding lookup needs. (Held-out perplexity, make quality's
    text: stories260K 5.370 -> 5.351, the own model 15.776 -> 15.741; it costs
    vocab x dim / 2 bytes more at int4. The fp32 function is unchanged.)"""
    if model.args.shared_classifier:
        progress("AWQ: storing the classifier apart from the embedding table it shares")
        model.output.weight = torch.nn.Parameter(model.tok_embeddings.weight.detach().clone())
        model.args.shared_classifier = False
    inputs, final = layer_inputs(model, windows)
    with torch.no_grad():
        model.output.weight.copy_(search_clip(final, model.output.weight, group_size, qmax))
        for layer, X in zip(model.layers, inputs):
            att, ffn = layer.attention, layer.feed_forward
            for key, W in (("qkv", att.wq.weight), ("qkv", att.wk.weight), ("qkv", att.wv.weight),
                           ("o", att.wo.weight), ("ffn", ffn.w1.weight), ("ffn", ffn.w3.weight),
                           ("w2", ffn.w2.weight)):
                W.copy_(search_clip(X[key], W, group_size, qmax))


def calibration_windows(text_path, tokenizer_path, seq_len, vocab_size, n_tokens):
    """The calibration text's tokens in windows as run reads them (BOS, then up
    to 255 tokens, or seq_len - 1 if shorter), n_tokens in all at most."""
    for p in (text_path, tokenizer_path):
        if not os.path.isfile(p):
            fail(f"{p}: no such file")
    with open(tokenizer_path, "rb") as f:
        if b"tokx" in f.read():  # the byte-level BPE block (export.py's write_tokenizer_bin)
            fail(f"{tokenizer_path}: --awq calibrates with a SentencePiece-style tokenizer; "
                 "this one is a byte-level BPE")
    with open(text_path, encoding="utf-8", errors="replace") as f:
        text = f.read(16 * n_tokens)  # far more characters than tokens needed
    ids = SentencePieceEncoder(*read_tokenizer_bin(tokenizer_path, vocab_size))(text)[:n_tokens]
    if not ids:
        fail(f"{text_path}: no calibration text")
    T = min(seq_len, 256)
    return [[1] + ids[i:i + T - 1] for i in range(0, len(ids), T - 1)]
