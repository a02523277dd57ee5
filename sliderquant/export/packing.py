"""Bit-stream packing of integer codes into int32 words, the one layout every export format uses.

A row of n unsigned b-bit values (0 <= v < 2^b, 2 <= b <= 8) becomes one little-end-first bit
stream: value i occupies stream bits i*b ... i*b+b-1, word k holds stream bits 32k ... 32k+31 with
the lowest stream bit in the word's least significant bit.  A value may straddle two words; the
tail of the last word is zero.  So a row takes ceil(n*b/32) words.

compressed-tensors (>= 0.18) packs codes along the input dimension and zero points along the
output dimension this way; GPTQ's qweight/qzeros (its 3-bit 10|1|10|1|10 words included) are the
same stream running down the columns, i.e. ``pack_rows(x.T).T``; AWQ's 4-bit words are the stream
of eight interleaved output columns.  Words are stored as int32: the bit pattern is what matters,
so a word whose top bit is set reads as a negative number.
"""

from __future__ import annotations

import torch

WORD_BITS = 32


def _check_bits(bits: int) -> None:
    if not isinstance(bits, int) or not 2 <= bits <= 8:
        raise ValueError(f"bits must be an integer from 2 to 8, got {bits!r}")


def packed_width(n: int, bits: int) -> int:
    """Number of int32 words one row of ``n`` ``bits``-bit values takes."""
    return -(-n * bits // WORD_BITS)


def pack_rows(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack each row of ``values`` (rows, n), integers in [0, 2^bits), into (rows, ceil(n*bits/32)) int32."""
    _check_bits(bits)
    if values.dim() != 2:
        raise ValueError(f"pack_rows expects a 2-D tensor (rows, n), got shape {tuple(values.shape)}")
    if values.dtype.is_floating_point or values.dtype == torch.bool or values.is_complex():
        raise ValueError(f"pack_rows expects integer codes, got {values.dtype}")
    if values.numel():
        lo, hi = (int(x) for x in torch.aminmax(values))
        if lo < 0 or hi >= 1 << bits:
            raise ValueError(f"pack_rows: values must lie in [0, {(1 << bits) - 1}] for {bits} bits, "
                             f"got [{lo}, {hi}]")
    v = values.to(torch.int64)
    rows, n = v.shape
    width = packed_width(n, bits)
    # 32 values of b bits fill exactly b words, so the stream is cut into such chunks and built
    # one value position at a time (32 vectorized steps whatever the size); fields never overlap,
    # so or-ing them in is the whole packing
    chunks = -(-n // WORD_BITS)
    v = torch.nn.functional.pad(v, (0, chunks * WORD_BITS - n)).reshape(rows, chunks, WORD_BITS)
    acc = torch.zeros(rows, chunks, bits + 1, dtype=torch.int64)
    for j in range(WORD_BITS):
        word, shift = divmod(j * bits, WORD_BITS)
        acc[:, :, word] |= (v[:, :, j] << shift) & 0xFFFFFFFF
        if shift + bits > WORD_BITS:
            acc[:, :, word + 1] |= v[:, :, j] >> (WORD_BITS - shift)
    acc = acc[:, :, :bits].reshape(rows, chunks * bits)[:, :width]
    return torch.where(acc >= 1 << 31, acc - (1 << 32), acc).to(torch.int32)


def unpack_rows(words: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of ``pack_rows``: the first ``n`` ``bits``-bit values of each row of ``words``, int64."""
    _check_bits(bits)
    if words.dim() != 2 or words.dtype != torch.int32:
        raise ValueError(f"unpack_rows expects 2-D int32 words, got {words.dtype} {tuple(words.shape)}")
    if words.shape[1] < packed_width(n, bits):
        raise ValueError(f"unpack_rows: {words.shape[1]} words per row hold fewer than {n} "
                         f"{bits}-bit values (need {packed_width(n, bits)})")
    rows = words.shape[0]
    chunks = -(-n // WORD_BITS)
    w = words[:, :packed_width(n, bits)].to(torch.int64) & 0xFFFFFFFF
    w = torch.nn.functional.pad(w, (0, chunks * bits + 1 - w.shape[1]))
    # word k of chunk c is at c*bits + k; one spare word at the end for the last chunk's k + 1
    base = torch.arange(chunks, dtype=torch.int64) * bits
    out = torch.empty(rows, chunks, WORD_BITS, dtype=torch.int64)
    for j in range(WORD_BITS):
        word, shift = divmod(j * bits, WORD_BITS)
        # two consecutive words as one 64-bit window; shift + bits < 40, so the sign bit never matters
        pair = w[:, base + word] | (w[:, base + word + 1] << WORD_BITS)
        out[:, :, j] = (pair >> shift) & ((1 << bits) - 1)
    return out.reshape(rows, chunks * WORD_BITS)[:, :n]


def pack_columns(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack down each column of ``values`` (n, cols): (ceil(n*bits/32), cols) int32 (GPTQ's qweight)."""
    return pack_rows(values.t(), bits).t().contiguous()


def unpack_columns(words: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of ``pack_columns``: (n, cols) int64."""
    return unpack_rows(words.t().contiguous(), bits, n).t().contiguous()
