"""GPTQ (Frantar et al., 2023): one linear layer quantized column by column with Hessian feedback.

For a weight ``W`` (out x in) and calibration inputs ``X`` the layer-wise loss is
``||W X - W_hat X||^2`` with Hessian ``H = 2/n sum_x x x^T``.  Columns are quantized one at a time;
the error of column ``j`` is spread onto the not yet quantized columns through the inverse
Hessian: with ``U`` the upper Cholesky factor of ``H^-1``,
``err = (w_j - q(w_j)) / U_jj`` and ``W[:, k] -= err * U_jk`` for ``k > j``.

* Lazy batch updates: inside a block of columns the updates are applied to the block only; the
  columns after it get one rank-``block`` update ``W[:, rest] -= Err @ U[block, rest]``.  Blocks
  are rounded up to whole quantization groups so a group's parameters always see its updated
  columns.
* Dampening: ``damp * mean(diag H)`` is added to the diagonal (multiplied by 10 and retried, with
  a warning, if the Cholesky factorization still fails).
* Dead columns (``H_jj == 0``: the input is always zero) get ``H_jj = 1`` and weight 0.
* Grid: the min-max quantizer of ``sliderquant.reference`` without clipping (asymmetric
  ``s = clamp((max - min) / (2^b - 1), 1e-5, 1e4)``, ``z = round(-min / s)``; symmetric
  ``s = max(|max|, |min|) / (2^(b-1) - 1)``, ``z = 0``).  Per channel, the parameters come from
  the whole original row; grouped without activation order, from the group's current (updated)
  columns when the group starts, as in the reference GPTQ.
* Activation order quantizes columns by decreasing ``H_jj``.  With groups we use *static
  groups*: each group is a contiguous block of original columns whose parameters are computed
  from the original weights before any update.  This keeps the contiguous group layout that
  packed formats need (no per-column group index), at a small cost in accuracy against the
  reference's default of computing parameters on permuted columns.

``w_hat == (q - zero) * scale`` per group, in the original column order.
"""

from __future__ import annotations

import logging

import torch

from ..reference import SCALE_MAX, SCALE_MIN

log = logging.getLogger(__name__)


def minmax_qparams(w: torch.Tensor, bits: int, symmetric: bool):
    """``(scale, zero)`` of shape (rows, 1) of the min-max grid of each row of ``w`` (float32)."""
    hi = w.amax(dim=1, keepdim=True)
    lo = w.amin(dim=1, keepdim=True)
    if symmetric:
        s = (torch.maximum(hi.abs(), lo.abs()) / (2 ** (bits - 1) - 1)).clamp(SCALE_MIN, SCALE_MAX)
        return s, torch.zeros_like(s)
    s = ((hi - lo) / (2 ** bits - 1)).clamp(SCALE_MIN, SCALE_MAX)
    return s, torch.round(-lo / s)


def quantize_codes(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int,
                   symmetric: bool) -> torch.Tensor:
    """Integer codes (as float) of ``w`` on the grid ``(scale, zero)``, broadcast per row."""
    if symmetric:
        qmax = 2 ** (bits - 1) - 1
        return torch.clamp(torch.round(w / scale), -(qmax + 1), qmax)
    return torch.clamp(torch.round(w / scale) + zero, 0, 2 ** bits - 1)


class GPTQ:
    """Accumulates the Hessian of one linear layer's inputs and solves its quantization."""

    def __init__(self, weight: torch.Tensor):
        if weight.dim() != 2:
            raise ValueError(f"GPTQ expects a 2-D weight (out x in), got shape {tuple(weight.shape)}")
        self.weight = weight.detach()
        self.columns = weight.shape[1]
        self.H = torch.zeros(self.columns, self.columns, dtype=torch.float32, device=weight.device)
        self.nsamples = 0

    @torch.no_grad()
    def add_batch(self, inp: torch.Tensor) -> None:
        """Add inputs ``(..., in)``; keeps ``H = 2/n sum x x^T`` as a running average."""
        if inp.shape[-1] != self.columns:
            raise ValueError(f"input has {inp.shape[-1]} features, the weight has {self.columns} columns")
        x = inp.reshape(-1, self.columns).to(self.H.device, torch.float32)
        m = x.shape[0]
        self.H *= self.nsamples / (self.nsamples + m)
        self.nsamples += m
        x = x * (2.0 / self.nsamples) ** 0.5
        self.H += x.t() @ x

    def _inverse_cholesky(self, H: torch.Tensor, damp: float) -> torch.Tensor:
        """Upper Cholesky factor of ``(H + damp * mean(diag H) I)^-1``, computed in float64."""
        H = H.double()
        mean_diag = torch.diag(H).mean()
        eye = torch.eye(self.columns, dtype=H.dtype, device=H.device)
        for attempt in range(6):
            L, info = torch.linalg.cholesky_ex(H + damp * mean_diag * eye)
            if info == 0:
                Hinv = torch.cholesky_inverse(L)
                U, info = torch.linalg.cholesky_ex(Hinv, upper=True)
                if info == 0:
                    return U.float()
            log.warning("GPTQ: Hessian not positive definite with damp=%g; retrying with %g",
                        damp, damp * 10)
            damp = damp * 10 if damp > 0 else 1e-4
        raise RuntimeError("GPTQ: the Hessian stays singular even with strong dampening; "
                           "check the calibration inputs for NaN/inf")

    @torch.no_grad()
    def quantize(self, bits: int, group_size: int | None = None, symmetric: bool = False,
                 damp: float = 0.01, act_order: bool = False, block_size: int = 128):
        """Returns ``(w_hat, q, scale, zero)``: ``w_hat`` in the weight's dtype, ``q`` int16
        (out, in), ``scale``/``zero`` float32 (out, n_groups)."""
        self._check(bits, group_size, symmetric, damp, block_size)
        if self.nsamples == 0:
            raise ValueError("GPTQ.quantize: no calibration inputs; call add_batch first")
        out_f, in_f = self.weight.shape
        g = in_f if group_size is None else group_size
        n_groups = in_f // g
        W = self.weight.float().clone()
        H = self.H.clone()
        dead = torch.diag(H) == 0
        H[dead, dead] = 1.0
        W[:, dead] = 0.0

        # Parameters fixed up front: per channel, or static groups under activation order.
        scale = torch.empty(out_f, n_groups, device=W.device)
        zero = torch.empty_like(scale)
        static = group_size is None or act_order
        if static:
            for k in range(n_groups):
                scale[:, k:k + 1], zero[:, k:k + 1] = minmax_qparams(W[:, k * g:(k + 1) * g], bits, symmetric)

        perm = torch.argsort(torch.diag(H), descending=True) if act_order else None
        if perm is not None:
            W, H = W[:, perm], H[perm][:, perm]
        col_group = ((perm if perm is not None else torch.arange(in_f)) // g).tolist()
        U = self._inverse_cholesky(H, damp)

        block = block_size if group_size is None else -(-block_size // g) * g
        Q = torch.empty_like(W)
        for i1 in range(0, in_f, block):
            i2 = min(i1 + block, in_f)
            W1, U1 = W[:, i1:i2].clone(), U[i1:i2, i1:i2]
            err1 = torch.empty_like(W1)
            for j in range(i2 - i1):
                col = i1 + j
                k = col_group[col]
                if not static and col % g == 0:
                    scale[:, k:k + 1], zero[:, k:k + 1] = minmax_qparams(W1[:, j:j + g], bits, symmetric)
                s, z = scale[:, k], zero[:, k]
                q = quantize_codes(W1[:, j], s, z, bits, symmetric)
                Q[:, col] = q
                err = (W1[:, j] - (q - z) * s) / U1[j, j]
                W1[:, j:] -= err.unsqueeze(1) * U1[j, j:].unsqueeze(0)
                err1[:, j] = err
            W[:, i2:] -= err1 @ U[i1:i2, i2:]

        if perm is not None:
            Q = Q[:, torch.argsort(perm)]
        q_int = Q.to(torch.int16)
        groups = Q.reshape(out_f, n_groups, g)
        w_hat = ((groups - zero.unsqueeze(2)) * scale.unsqueeze(2)).reshape(out_f, in_f)
        return w_hat.to(self.weight.dtype), q_int, scale, zero

    def _check(self, bits, group_size, symmetric, damp, block_size):
        if not isinstance(bits, int) or isinstance(bits, bool) or not (2 if symmetric else 1) <= bits <= 16:
            raise ValueError(f"bits must be an integer in [{2 if symmetric else 1}, 16], got {bits!r}")
        if group_size is not None and (not isinstance(group_size, int) or group_size < 1
                                       or self.columns % group_size != 0):
            raise ValueError(f"group_size must be a positive divisor of the {self.columns} input "
                             f"columns (or None for per channel), got {group_size!r}")
        if not isinstance(block_size, int) or block_size < 1:
            raise ValueError(f"block_size must be a positive integer, got {block_size!r}")
        if not damp >= 0:
            raise ValueError(f"damp must be non-negative, got {damp!r}")
