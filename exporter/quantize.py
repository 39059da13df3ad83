"""Symmetric group quantization: what versions 2 and 3 store, and what AWQ
measures its rounding with."""

import torch


def in_groups(w, group_size):
    """(rows, cols) -> (rows, groups, group_size): each row cut into its groups,
    the last one padded with zeros when group_size does not divide cols."""
    rows, cols = w.shape
    groups = -(-cols // group_size)
    return torch.nn.functional.pad(w, (0, groups * group_size - cols)).view(rows, groups, group_size)


def quantize_groups(w, group_size, qmax):
    """Symmetric quantization of each row of w (rows, cols) in groups of
    group_size consecutive values, the last group of a row shorter when
    group_size does not divide cols: scale = max|v| / qmax, q = round(v / scale)
    in [-qmax, qmax]; a zero group gets scale 0. Returns (q as int16 (rows, cols),
    float32 scales (rows, groups), the dequantized values)."""
    w = w.detach().to(torch.float32)
    rows, cols = w.shape
    padded = in_groups(w, group_size)
    scale = padded.abs().amax(dim=2) / qmax
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.round(padded / safe[..., None]).clamp(-qmax, qmax)
    back = (q * scale[..., None]).view(rows, -1)[:, :cols]
    return q.view(rows, -1)[:, :cols].to(torch.int16), scale, back


def quantize_q8(w, group_size):
    """Version 2 ("Q8_0"): int8 in groups of group_size (which divides the rows),
    qmax 127. Returns (int8 values, float32 scales, max |dequantized - w|)."""
    q, scale, back = quantize_groups(w.reshape(-1, group_size), group_size, 127)
    return q.to(torch.int8).flatten(), scale.flatten(), (back - w.reshape(-1, group_size)).abs().max().item()


def quantize_q4(w, group_size):
    """Version 3: int4 in groups of a row (qmax 7), packed two per byte, low
    nibble first, each row starting on a byte. Returns (packed uint8
    (rows, (cols + 1) // 2), float32 scales (rows, groups), max error)."""
    q, scale, back = quantize_groups(w, group_size, 7)
    nibbles = torch.nn.functional.pad(q, (0, q.shape[1] % 2)) & 0xF  # two's complement, 4 bits
    packed = (nibbles[:, 0::2] | (nibbles[:, 1::2] << 4)).to(torch.uint8)
    return packed, scale, (back - w.detach().float()).abs().max().item()
