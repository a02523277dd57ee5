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
* Grid: ``reference.minmax_grid``, the min-max grid of every method, without clipping (asymmetric
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

``run_gptq`` (at the end of this file) is the driver that feeds the solver a real model, layer by
layer; the registry in ``sliderquant.methods`` points to it.
"""

from __future__ import annotations

import contextlib
import logging

import torch

from .. import models
from ..limits import check_bits, check_group_size
from ..progress import Progress
from ..reference import code_range, minmax_grid
from .common import attach_state, fp32_layer_inputs, forward_layers, teacher_mode, wrap_layers

log = logging.getLogger(__name__)


def minmax_qparams(w: torch.Tensor, bits: int, symmetric: bool):
    """``(scale, zero)`` of shape (rows, 1) of the min-max grid of each row of ``w`` (float32)."""
    s, z, _, _ = minmax_grid(w.amax(dim=1, keepdim=True), w.amin(dim=1, keepdim=True), bits, symmetric)
    return s, z


def quantize_codes(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int,
                   symmetric: bool) -> torch.Tensor:
    """Integer codes (as float) of ``w`` on the grid ``(scale, zero)``, broadcast per row."""
    qmin, qmax = code_range(bits, symmetric)
    return torch.clamp(torch.round(w / scale) + zero, qmin, qmax)


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
        check_bits(bits)
        check_group_size(group_size, self.columns)
        if not isinstance(block_size, int) or block_size < 1:
            raise ValueError(f"block_size must be a positive integer, got {block_size!r}")
        if not damp >= 0:
            raise ValueError(f"damp must be non-negative, got {damp!r}")


# ---- the driver -----------------------------------------------------------------------------------
def run_gptq(model, cfg, calibration, work_dir=None, on_window=None):
    """GPTQ layer by layer: the Hessian of each linear's input comes from the inputs the
    already-quantized layers produce (all linears of a layer see the same pass, so q/k/v and
    gate/up, which read the same tensor, get the same Hessian).  ``work_dir`` and ``on_window``
    are accepted for the registry's common signature; GPTQ has no windows to checkpoint."""
    layers = models.decoder_layers(model)
    with fp32_layer_inputs(model, calibration) as (x, layer_kwargs):
        qlayers = wrap_layers(model, cfg, lwc=False, lora_rank=0)
        fp32 = contextlib.nullcontext()
        progress = Progress(len(layers), cfg.method, unit="layer")
        for i in range(len(layers)):
            solvers, hooks = {}, []
            for name, q in qlayers[i].items():
                solvers[name] = solver = GPTQ(q.weight)
                hooks.append(q.register_forward_hook(
                    lambda m, inp, out, s=solver: s.add_batch(inp[0].reshape(-1, inp[0].shape[-1]))))
            with teacher_mode(qlayers[i:i + 1]):
                forward_layers(layers[i:i + 1], x, layer_kwargs, fp32)
            for h in hooks:
                h.remove()
            for name, q in qlayers[i].items():
                w_hat, codes, scale, zero = solvers[name].quantize(
                    cfg.wbits, q.group_size, cfg.symmetric, damp=cfg.gptq_damp,
                    act_order=cfg.gptq_act_order, block_size=cfg.gptq_block_size)
                q.set_quantized(codes, scale, zero, w_hat=w_hat)
            del solvers
            x = forward_layers(layers[i:i + 1], x, layer_kwargs, fp32)
            progress.update(layer=i)
        progress.close()
        attach_state(model, cfg)        # before the cast back: codes and fp32 scales stay exact
    return model
