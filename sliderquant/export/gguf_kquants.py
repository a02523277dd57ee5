"""K-quant blocks fitted to our 2- and 3-bit grids (``export_gguf(..., low_bits="kquant")``).

A K-quant super-block covers 256 weights of a row as 16 sub-blocks of 16.  Our weight is
``(q - z) * s`` with ``(s, z)`` per group (a multiple of 16, so each sub-block lies in one group).
Neither K-quant below can hold 16 arbitrary scales under one fp16 ``d``: the file is *fitted*, not
exact, and the fit seeks the least squared error against our dequantized weight.

Q2_K dequantizes

    y_i = d * sc_j * c_i - dmin * m_j        c_i in 0..3, sc_j and m_j in 0..15, j = i // 16,

with one fp16 ``d`` and ``dmin`` per super-block.  The codes would stay exact if ``d * sc_j = s``
and ``dmin * m_j = s * z`` held.  The fit:

1. ``d = max s_j / 15``, ``sc_j = round(s_j / d)`` (at least 1, so no sub-block collapses);
   ``dmin`` takes the sign of the larger mass of ``s * z`` (one sign per super-block: a sub-block of
   the other sign gets ``m_j = 0``), ``dmin = max |s z| / 15``, ``m_j = round(s z / dmin)``.
2. Codes re-rounded to the nearest level of the fitted grid: ``c = clip(round((w + dmin m) / (d sc)), 0, 3)``.
3. ``d`` and ``dmin`` re-fitted by least squares to ``w`` for those codes (two unknowns per
   super-block), codes re-rounded again; kept only where this lowers the squared error.

Q3_K dequantizes

    y_i = d * l_j * (c_i - 4)                c_i in 0..7, l_j = S_j - 32 in -32..31, j = i // 16,

with one fp16 ``d`` per super-block and no minimum: each sub-block's levels are symmetric about 0
but for one extra level, at ``-4 |step|`` for a positive step ``d * l_j`` and at ``+4 |step|`` for
a negative one.  Our grid ``s * (q - z)`` is therefore held exactly (up to the 6-bit ``l_j``) where
``z = 4`` (step ``s``, ``c = q``), where ``z = 3`` (step ``-s``, ``c = 7 - q``) and for symmetric
codes (``z = 0``, ``q`` in -4..3, step ``s``, ``c = q + 4``); any other zero point is a grid Q3_K
cannot hold.  The fit:

1. A real, signed step per sub-block: from the starts ``s``, ``-s`` and the range-stretching
   ``max w / 3``, ``min w / -4``, ``-max w / 4``, ``min w / 3``, each polished twice (codes to the
   nearest level, then the least-squares step for those codes: neither can raise the error), the
   one with the least squared error.
2. One ``d`` per super-block: the step ``M`` largest in magnitude gets ``l = -k``, ``d = fp16(-M / k)``,
   the others ``l_j = clip(round(step_j / d), -32, 31)``, codes re-rounded to that grid; of
   ``k = 32`` (ggml's own choice) down to 24, the ``k`` with the least squared error.
3. ``d`` re-fitted by least squares for those scales and codes, then each ``l_j`` for that ``d``,
   codes re-rounded each time; each kept only where it lowers the squared error.

What is lost: (a) groups whose zero point is not 3 or 4 (or 0 for symmetric codes), whose levels the
symmetric grid can only approximate, and (b) the rounding of each sub-block step to a multiple of
``d`` (at most ``|d| / 2``, where ``|d|`` is 1/32 to 1/24 of the largest step, so at most ``2 |d|``
per weight; a step clipped to ``l = 31`` can miss by ``|d|``).  On SmolLM2-135M RTN W3 g64
(``down_proj``, the only 256-multiple rows) 94 % of the groups have z = 3 or 4 and lose only (b):
relative RMS error 0.006 and no measurable perplexity; the 6 % with z = 2 or 5 bring the error to
0.019 and WikiText-2 perplexity from 116.6 to 123.8 (docs/design/export-formats.md section 4.2).
The choices are computed in float32 (a third faster than float64; what is chosen is exact anyway:
integers and an fp16 ``d``).

Provable, per super-block (``d`` in fp16's normal range):
``sqrt(SSE) <= sqrt(sum_i s_i^2 e_i^2) + 64 * 1.02 * max|w| / 32``, with ``e_i`` the distance of
``q_i - z`` to -4..3 or to -3..4 (whichever sub-block sum is smaller): the start ``+-s`` of step 1
errs by at most that, every later step only lowers it except the rounding of the steps, at most
``1.02 |d|`` (``l`` clipped at 31) times ``|c - 4| <= 4`` on each of 256 weights, and
``|d| <= max|w| / 32`` (a least-squares step never exceeds the largest weight it fits).

Byte layouts (ggml's ``block_q2_K`` and ``block_q3_K``): a 2-bit field of value ``i`` sits at bits
``2 * ((i % 128) // 32)`` of byte ``32 * (i // 128) + i % 32`` (Q2_K's ``qs[64]``, and Q3_K's low
two bits).  Q2_K: ``scales[16]`` (``sc_j | m_j << 4``), ``qs[64]``, ``d``, ``dmin``: 84 bytes.
Q3_K: ``hmask[32]`` (the high bit of ``c_i``: bit ``i // 32`` of byte ``i % 32``), ``qs[64]``,
``scales[12]`` (``S_j``'s low nibble in byte ``j % 8`` at bit ``4 * (j // 8)``, its top two bits in
byte ``8 + j % 4`` at bit ``2 * (j // 4)``), ``d``: 110 bytes.
"""

from __future__ import annotations

import numpy as np

QK_K = 256
SUB = 16


def _f16(x: np.ndarray) -> np.ndarray:
    return x.astype(np.float16).astype(np.float64)


def _codes(w, d, dmin, sc, m):
    step = (d[..., None] * sc)[..., None]                  # (..., 16, 1)
    offset = (dmin[..., None] * m)[..., None]
    with np.errstate(divide="ignore", invalid="ignore"):
        c = np.rint((w + offset) / step)
    return np.clip(np.nan_to_num(c), 0, 3)


def _sq_error(w, d, dmin, sc, m, c):
    y = d[..., None, None] * sc[..., None] * c - dmin[..., None, None] * m[..., None]
    return ((y - w) ** 2).sum(axis=(-1, -2))


def fit_q2_k(q: np.ndarray, s: np.ndarray, z: np.ndarray):
    """``(d, dmin, sc, m, codes)`` for codes ``q`` (out, in) in 0..3 and per-group ``s``, ``z``
    (out, n_groups); in a multiple of 256, groups multiples of 16.  ``d``, ``dmin`` are fp16 values."""
    out_f, in_f = q.shape
    group = in_f // s.shape[1]
    if in_f % QK_K or group % SUB:
        raise ValueError(f"Q2_K needs rows a multiple of {QK_K} and groups a multiple of {SUB}")
    per_sub = group // SUB
    a = np.repeat(s, per_sub, axis=1).reshape(out_f, -1, SUB)          # (out, n_super, 16) target step
    b = np.repeat(s * z, per_sub, axis=1).reshape(out_f, -1, SUB)      # target dmin * m
    w = ((q - np.repeat(z, group, axis=1)) * np.repeat(s, group, axis=1)).reshape(out_f, -1, SUB, SUB)

    d = _f16(a.max(-1) / 15)
    sc = np.clip(np.rint(a / np.where(d > 0, d, 1)[..., None]), 1, 15)
    sign = np.where(np.clip(b, 0, None).sum(-1) >= -np.clip(b, None, 0).sum(-1), 1.0, -1.0)
    dmin = _f16(sign * (sign[..., None] * b).max(-1).clip(0) / 15)
    safe = np.where(dmin != 0, dmin, 1)[..., None]
    m = np.where(dmin[..., None] != 0, np.clip(np.rint(b / safe), 0, 15), 0)
    c = _codes(w, d, dmin, sc, m)
    err = _sq_error(w, d, dmin, sc, m, c)

    # least-squares refit of (d, dmin) for the chosen codes: y = d * X1 - dmin * X2
    x1 = (sc[..., None] * c).reshape(out_f, -1, QK_K)
    x2 = np.broadcast_to(m[..., None], c.shape).reshape(out_f, -1, QK_K)
    t = w.reshape(out_f, -1, QK_K)
    s11, s22, s12 = (x1 * x1).sum(-1), (x2 * x2).sum(-1), (x1 * x2).sum(-1)
    r1, r2 = (x1 * t).sum(-1), (x2 * t).sum(-1)
    det = s11 * s22 - s12 * s12
    ok = np.abs(det) > 1e-12 * np.maximum(s11 * s22, 1e-30)
    with np.errstate(divide="ignore", invalid="ignore"):
        d2 = np.where(ok, (r1 * s22 - r2 * s12) / det, d)
        dmin2 = np.where(ok, -(s11 * r2 - s12 * r1) / det, dmin)
    d2, dmin2 = _f16(np.nan_to_num(d2)), _f16(np.nan_to_num(dmin2))
    c2 = _codes(w, d2, dmin2, sc, m)
    err2 = _sq_error(w, d2, dmin2, sc, m, c2)
    better = (err2 < err) & np.isfinite(err2) & (d2 > 0)
    d, dmin = np.where(better, d2, d), np.where(better, dmin2, dmin)
    c = np.where(better[..., None, None], c2, c)
    return d, dmin, sc.astype(np.uint8), m.astype(np.uint8), c.astype(np.uint8)


def pack_q2_k(q: np.ndarray, s: np.ndarray, z: np.ndarray) -> np.ndarray:
    """Q2_K bytes (out, in / 256 * 84) fitted to our grid (see the module doc)."""
    d, dmin, sc, m, c = fit_q2_k(q, s, z)
    out_f, n_super = d.shape
    c = c.reshape(out_f, n_super, 2, 4, 32)                        # value i = 128 h + 32 k + l
    qs = np.zeros((out_f, n_super, 2, 32), np.uint8)
    for k in range(4):
        qs |= c[:, :, :, k, :] << (2 * k)
    parts = [sc | (m << 4), qs.reshape(out_f, n_super, 64),
             d.astype(np.float16).view(np.uint8).reshape(out_f, n_super, 2),
             dmin.astype(np.float16).view(np.uint8).reshape(out_f, n_super, 2)]
    return np.concatenate(parts, axis=-1).reshape(out_f, n_super * 84)


# ---- Q3_K ----------------------------------------------------------------------------------------------
Q3_K_DIVISORS = np.arange(32.0, 23.5, -1.0)   # k of step 2: the largest step gets l = -k


def _q3_codes(w, step):
    """Codes 0..7 of the level ``step * (c - 4)`` nearest to ``w`` (``c = 4`` where the step is 0)."""
    live = step != 0
    with np.errstate(divide="ignore", invalid="ignore"):
        c = np.clip(np.rint(w / np.where(live, step, 1)[..., None] + 4), 0, 7)
    return np.where(live[..., None], c, 4.0)


def _q3_ls_step(w, c):
    """Least-squares step of each sub-block for fixed codes (0 where every code is 4)."""
    x = c - 4
    den = (x * x).sum(-1)
    return np.where(den > 0, (w * x).sum(-1) / np.where(den > 0, den, 1), 0.0)


def _q3_sse(w, step, c):
    return ((step[..., None] * (c - 4) - w) ** 2).sum(-1)


def _q3_levels(step, d):
    """Sub-block scales ``l`` in -32..31 nearest to ``step / d`` (0 where ``d`` is 0)."""
    live = (d != 0)[..., None]
    with np.errstate(divide="ignore", invalid="ignore"):
        lv = np.clip(np.rint(step / np.where(live, d[..., None], 1)), -32, 31)
    return np.where(live, lv, 0.0)


def _q3_sub_block_steps(w, s):
    """Step 1 of the fit: a real signed step per sub-block of ``w`` (..., 16, 16); ``s`` (..., 16)."""
    best_err, best = np.full(s.shape, np.inf, np.float32), np.zeros_like(s)
    hi, lo = w.max(-1), w.min(-1)
    for start in (s, -s, hi / 3, -lo / 4, -hi / 4, lo / 3):
        step = start
        for _ in range(2):
            c = _q3_codes(w, step)
            step = _q3_ls_step(w, c)
        err = _q3_sse(w, step, c)
        better = err < best_err
        best_err, best = np.where(better, err, best_err), np.where(better, step, best)
    return best


def fit_q3_k(q: np.ndarray, s: np.ndarray, z: np.ndarray):
    """``(d, l, c)`` for codes ``q`` (out, in) and per-group ``s``, ``z`` (out, n_groups), any grid
    ``(q - z) * s`` (symmetric: z = 0); in a multiple of 256, groups multiples of 16.  ``d``: fp16
    values (out, in / 256); ``l`` int8 in -32..31 (out, in / 256, 16); ``c`` uint8 in 0..7
    (out, in / 256, 16, 16).  The fitted weight is ``q3_k_weight(d, l, c)``."""
    out_f, in_f = q.shape
    group = in_f // s.shape[1]
    if in_f % QK_K or group % SUB:
        raise ValueError(f"Q3_K needs rows a multiple of {QK_K} and groups a multiple of {SUB}")
    # float32 (see the module doc)
    w = ((q - np.repeat(z, group, axis=1)) * np.repeat(s, group, axis=1)).reshape(out_f, -1, SUB, SUB)
    w = w.astype(np.float32)
    step = _q3_sub_block_steps(w, np.repeat(s, group // SUB, axis=1).reshape(out_f, -1, SUB).astype(np.float32))

    big = np.take_along_axis(step, np.abs(step).argmax(-1)[..., None], -1)[..., 0]
    err, d, lv, c = np.full(big.shape, np.inf, np.float32), np.zeros_like(big), np.zeros_like(step), np.zeros_like(w)
    for k in Q3_K_DIVISORS:
        dk = (-big / np.float32(k)).astype(np.float16).astype(np.float32)
        lk = _q3_levels(step, dk)
        ck = _q3_codes(w, dk[..., None] * lk)
        ek = _q3_sse(w, dk[..., None] * lk, ck).sum(-1)
        better = ek < err
        d, lv, c, err = (np.where(better, dk, d), np.where(better[..., None], lk, lv),
                         np.where(better[..., None, None], ck, c), np.where(better, ek, err))

    # step 3: d by least squares (one unknown per super-block) ...
    x = (lv[..., None] * (c - 4)).reshape(out_f, -1, QK_K)
    den = (x * x).sum(-1)
    d2 = np.where(den > 0, (x * w.reshape(x.shape)).sum(-1) / np.where(den > 0, den, 1), d)
    d2 = d2.astype(np.float16).astype(np.float32)
    c2 = _q3_codes(w, d2[..., None] * lv)
    better = _q3_sse(w, d2[..., None] * lv, c2).sum(-1) < err
    d, c = np.where(better, d2, d), np.where(better[..., None, None], c2, c)
    # ... then each l for that d (given d the sub-blocks are independent)
    lv2 = _q3_levels(_q3_ls_step(w, c), d)
    c2 = _q3_codes(w, d[..., None] * lv2)
    better = _q3_sse(w, d[..., None] * lv2, c2) < _q3_sse(w, d[..., None] * lv, c)
    lv, c = np.where(better, lv2, lv), np.where(better[..., None], c2, c)
    return d.astype(np.float64), lv.astype(np.int8), c.astype(np.uint8)


def q3_k_weight(d: np.ndarray, lv: np.ndarray, c: np.ndarray) -> np.ndarray:
    """The weight (out, in) of a Q3_K fit, ``d * l * (c - 4)``: exact in float64, and equal to what
    ggml dequantizes in float32 (11-bit ``d`` times 6-bit ``l`` times 3-bit ``c - 4`` fits 24 bits)."""
    y = d[..., None, None] * lv[..., None].astype(np.float64) * (c.astype(np.float64) - 4)
    return y.reshape(d.shape[0], -1)


def pack_q3_k(q: np.ndarray, s: np.ndarray, z: np.ndarray) -> np.ndarray:
    """Q3_K bytes (out, in / 256 * 110) fitted to our grid (see the module doc)."""
    d, lv, c = fit_q3_k(q, s, z)
    out_f, n_super = d.shape
    c = c.reshape(out_f, n_super, QK_K)
    high = (c >> 2).reshape(out_f, n_super, 8, 32)                  # value i = 32 b + t: bit b of hmask[t]
    hmask = np.zeros((out_f, n_super, 32), np.uint8)
    for b in range(8):
        hmask |= high[:, :, b, :] << b
    low = (c & 3).reshape(out_f, n_super, 2, 4, 32)                 # value i = 128 h + 32 k + t
    qs = np.zeros((out_f, n_super, 2, 32), np.uint8)
    for k in range(4):
        qs |= low[:, :, :, k, :] << (2 * k)
    sc = (lv.astype(np.int16) + 32).astype(np.uint8)                # S_j in 0..63
    scales = np.zeros((out_f, n_super, 12), np.uint8)
    scales[..., :8] = (sc[..., :8] & 15) | ((sc[..., 8:] & 15) << 4)
    for k in range(4):
        scales[..., 8:] |= (sc[..., 4 * k:4 * k + 4] >> 4) << (2 * k)
    parts = [hmask, qs.reshape(out_f, n_super, 64), scales,
             d.astype(np.float16).view(np.uint8).reshape(out_f, n_super, 2)]
    return np.concatenate(parts, axis=-1).reshape(out_f, n_super * 110)
