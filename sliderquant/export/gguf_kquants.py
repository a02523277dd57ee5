"""Q2_K blocks fitted to our asymmetric 2-bit grid (``export_gguf(..., low_bits="kquant")``).

A Q2_K super-block covers 256 weights of a row as 16 sub-blocks of 16 and dequantizes

    y_i = d * sc_j * c_i - dmin * m_j        c_i in 0..3, sc_j and m_j in 0..15, j = i // 16,

with one fp16 ``d`` and ``dmin`` per super-block.  Our weight is ``(q - z) * s = s * q - s * z`` with
``(s, z)`` per group (a multiple of 16, so each sub-block lies in one group).  The codes would stay
exact if ``d * sc_j = s`` and ``dmin * m_j = s * z`` held, but 4-bit ``sc_j``/``m_j`` under one
``d``/``dmin`` cannot hold 16 arbitrary scales: the file is *fitted*, not exact.  The fit:

1. ``d = max s_j / 15``, ``sc_j = round(s_j / d)`` (at least 1, so no sub-block collapses);
   ``dmin`` takes the sign of the larger mass of ``s * z`` (one sign per super-block: a sub-block of
   the other sign gets ``m_j = 0``), ``dmin = max |s z| / 15``, ``m_j = round(s z / dmin)``.
2. Codes re-rounded to the nearest level of the fitted grid: ``c = clip(round((w + dmin m) / (d sc)), 0, 3)``.
3. ``d`` and ``dmin`` re-fitted by least squares to ``w`` for those codes (two unknowns per
   super-block), codes re-rounded again; kept only where this lowers the squared error.

The byte layout (ggml's ``block_q2_K``): ``scales[16]`` (``sc_j | m_j << 4``), ``qs[64]`` (value
``i`` in bits ``2 * ((i % 128) // 32)`` of byte ``32 * (i // 128) + i % 32``), ``d``, ``dmin``.
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
