"""Packed low-bit linears for CPU inference: ``y = x W^T`` straight from 2/3/4/8-bit codes.

A quantized linear holds codes ``q`` (out, in), fp32 ``scale`` and ``zero`` per group of contiguous
input columns, and ``W = (q - zero) * scale``.  Packed, the C kernels (``csrc/packed_*.c``) compute

    y[t, r] = sum_g  scale[r,g] * sum_{k in g} q[r,k] x[t,k]  +  min[r,g] * sum_{k in g} x[t,k]

with ``min = -scale * zero`` and the group sums of ``x`` computed once per call.  The layout (rows
in blocks of 16 so one zmm holds a block, columns in units of 32; 2-, 4- and 8-bit codes as fields of
32-bit words, 3-bit codes as bit planes, one 16-bit row mask per plane and column) is written
down once in ``csrc/sq_packed.h``; :func:`pack_codes` writes it and
:func:`unpack_codes` reads it back.  Symmetric codes are stored shifted by ``2^(bits-1)`` (zero
becomes ``2^(bits-1)``), 5- to 7-bit codes in 8-bit containers.

``pack_model(model)`` replaces the quantized linears of a model carrying ``sliderquant_state``
(after ``sliderquant.quantize`` or ``sliderquant.load``) by :class:`PackedLinear`;
``load_packed(dir)`` does both.  Memory of a packed linear: ``bits / 16`` of its bf16 weight plus
8 bytes per row and group (fp32 scale and min).

Accuracy: the kernels sum in fp32 (per group: one FMA per code in calls of several tokens; in a
one-token call (decode) four interleaved partial sums over the group's words, for 2 bits one
product pair ``q0 x0 + q1 x1`` per column pair, and for 3 bits per plane two partial sums of the
``x`` whose code has that bit set, combined as ``sum_b 2^b``; so one token's output may differ in
the last bits between a decode and a prefill call; then ``scale`` and ``min``), so they
differ from a float64 ``x @ dequantize(...).T`` by at most about ``K * eps32 * sum |x| (|q| + |zero|) |scale|``
per output; the reference and the AVX2 / AVX-512 kernels agree bit for bit.  NaN and Inf in ``x``
propagate as in a float matmul (they are not checked: a decode loop cannot afford a scan per call).
"""
from __future__ import annotations

import logging
import os
from typing import Optional

import torch
from torch import Tensor, nn

log = logging.getLogger(__name__)

ROWS = 16  # SQ_PK_ROWS: rows per block
UNIT = 32  # SQ_PK_UNIT: columns per unit
PACKED_BITS = (2, 3, 4, 8)

try:
    from . import _C
except ImportError:  # reported by sliderquant.ops; PackedLinear then runs its torch reference
    _C = None

# PackedLinear hands its x and y to C through torch's own DLPack exporter (~0.3 us) instead of
# Tensor.__dlpack__ (~2.6 us of Python-level checks: gradient, conjugate bit, stream), which would
# be a third of a small decode linear's time; forward makes the checks that matter itself (x is a
# plain CPU float tensor, detached from autograd).  Without that function C calls __dlpack__.
_FAST_EXPORT = getattr(torch._C, "_to_dlpack_versioned", None)
if _C is not None and _FAST_EXPORT is not None and hasattr(_C, "pk_set_exporter"):
    _C.pk_set_exporter(torch.Tensor, _FAST_EXPORT)
_KERNEL_DTYPES = (torch.float32, torch.bfloat16)


def container_bits(bits: int) -> int:
    """The packed width that holds ``bits``-bit codes: 2, 3, 4 or 8."""
    if not isinstance(bits, int) or isinstance(bits, bool) or not 2 <= bits <= 8:
        raise ValueError(f"packed weights hold 2- to 8-bit codes, got bits={bits!r}")
    return bits if bits in PACKED_BITS else 8


def _check_layout(rows: int, cols: int, group: int) -> None:
    if cols % UNIT:
        raise ValueError(f"packing needs in_features to be a multiple of {UNIT}, got {cols}")
    if group <= 0 or group % UNIT or cols % group:
        raise ValueError(f"packing needs a group size that is a multiple of {UNIT} and divides in_features "
                         f"{cols}, got {group} (per-channel: group = in_features)")


def pack_codes(q: Tensor, bits: int) -> Tensor:
    """Unsigned codes (out, in) in [0, 2^bits) -> int32 words (row_blocks, in/32, bits, 16)."""
    if bits not in PACKED_BITS:
        raise ValueError(f"pack_codes: bits must be one of {PACKED_BITS}, got {bits!r}")
    rows, cols = q.shape
    _check_layout(rows, cols, cols)
    q = q.to(torch.int64)
    if bool((q < 0).any()) or bool((q >= 2 ** bits).any()):
        raise ValueError(f"pack_codes: codes must lie in [0, {2 ** bits - 1}] for {bits} bits")
    nb, nu = -(-rows // ROWS), cols // UNIT
    if nb * ROWS != rows:
        q = torch.cat([q, q.new_zeros(nb * ROWS - rows, cols)])

    if bits == 3:  # bit planes: uint16 [nb][nu][3][32], row i of the block in bit i
        v = q.reshape(nb, ROWS, nu, UNIT)
        planes = torch.stack([(v >> b) & 1 for b in range(bits)], dim=3)  # (nb, 16, nu, bits, 32)
        m = (planes << torch.arange(ROWS).view(1, ROWS, 1, 1, 1)).sum(1)  # (nb, nu, bits, 32)
        m = torch.where(m >= 2 ** 15, m - 2 ** 16, m).to(torch.int16).contiguous()
        return m.view(torch.int32).reshape(nb, nu, bits, ROWS)

    def words(v: Tensor, field_bits: int) -> Tensor:  # (nb, 16, nu, words, fields) -> OR of shifted fields
        per_word = 32 // field_bits
        v = v.reshape(nb, ROWS, nu, UNIT // per_word, per_word)
        return (v << (field_bits * torch.arange(per_word))).sum(-1)

    w = words(q, bits).permute(0, 2, 3, 1).contiguous()
    return torch.where(w >= 2 ** 31, w - 2 ** 32, w).to(torch.int32)


def unpack_codes(qweight: Tensor, rows: int, bits: int) -> Tensor:
    """The inverse of :func:`pack_codes`: int64 codes (rows, in)."""
    nb, nu, nw, _ = qweight.shape
    if bits == 3:
        m = qweight.contiguous().view(torch.int16).to(torch.int64) & 0xFFFF  # (nb, nu, bits, 32)
        rowbits = (m.unsqueeze(1) >> torch.arange(ROWS).view(1, ROWS, 1, 1, 1)) & 1  # (nb, 16, nu, bits, 32)
        q = (rowbits << torch.arange(bits).view(1, 1, 1, bits, 1)).sum(3)
        return q.reshape(nb * ROWS, nu * UNIT)[:rows]
    w = qweight.to(torch.int64) & 0xFFFFFFFF
    w = w.permute(0, 3, 1, 2)  # (nb, 16, nu, words)
    per_word = 32 // bits
    f = (w.unsqueeze(-1) >> (bits * torch.arange(per_word))) & (2 ** bits - 1)
    return f.reshape(nb * ROWS, nu * UNIT)[:rows]


def pack_scales(scale: Tensor, zero: Tensor) -> Tensor:
    """fp32 (row_blocks, groups, 2, 16): per block and group the 16 rows' scales, then their mins
    (``-scale * zero``, rounded once in fp32); padding rows are 0."""
    rows, groups = scale.shape
    s = scale.to(torch.float32)
    sm = torch.stack([s, -(s * zero.to(torch.float32))], dim=-1)
    nb = -(-rows // ROWS)
    if nb * ROWS != rows:
        sm = torch.cat([sm, sm.new_zeros(nb * ROWS - rows, groups, 2)])
    return sm.reshape(nb, ROWS, groups, 2).permute(0, 2, 3, 1).contiguous()


def matmul(qweight: Tensor, scale_min: Tensor, x: Tensor, rows: int, group_size: int, bits: int,
           out_dtype: Optional[torch.dtype] = None, isa: Optional[str] = None,
           nthreads: Optional[int] = None) -> Tensor:
    """``x @ W.T`` for packed W (C kernels): x float32 or bfloat16 (..., in); the result has x's dtype
    unless ``out_dtype`` (float32 or bfloat16) says otherwise.  ``isa``: None (the active kernels),
    ``'ref'``, ``'avx2'`` or ``'avx512'``."""
    if _C is None:
        raise RuntimeError("sliderquant._C is not available; packed matmuls need the C extension")
    if not isinstance(x, Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.device.type != "cpu":
        raise ValueError(f"packed matmul runs on CPU tensors, x is on {x.device}")
    out_dtype = x.dtype if out_dtype is None else out_dtype
    y = torch.empty(*x.shape[:-1], rows, dtype=out_dtype)
    threads = torch.get_num_threads() if nthreads is None else nthreads
    cols = qweight.shape[1] * UNIT if qweight.dim() == 4 else (x.shape[-1] if x.dim() else 0)
    _C.pk_matmul(qweight, scale_min, x, y, rows, cols, group_size, bits, threads, isa)
    return y


def dequantize(qweight: Tensor, scale_min: Tensor, rows: int, group_size: int, bits: int) -> Tensor:
    """The packed weight as fp32 (rows, cols) on the CPU: ``q * scale + min`` per group."""
    q = unpack_codes(qweight.cpu(), rows, bits).to(torch.float32)
    sm = scale_min.cpu().permute(0, 3, 1, 2).reshape(-1, scale_min.shape[1], 2)[:rows]
    cols = q.shape[1]
    return (q.reshape(rows, -1, group_size) * sm[..., :1] + sm[..., 1:]).reshape(rows, cols)


def reference_matmul(qweight: Tensor, scale_min: Tensor, x: Tensor, rows: int, group_size: int,
                     bits: int) -> Tensor:
    """The same product in plain torch (dequantize, then matmul in fp32): for non-CPU tensors."""
    w = dequantize(qweight, scale_min, rows, group_size, bits)
    return (x.float() @ w.to(x.device).T).to(x.dtype)


class _PackedLinearGrad(torch.autograd.Function):
    """PackedLinear's product when x needs a gradient: the kernel forward, and
    ``grad_x = grad_y @ W`` with W dequantized (the packed weight itself is frozen: no gradient)."""

    @staticmethod
    def forward(ctx, x: Tensor, module: "PackedLinear") -> Tensor:
        ctx.module = module
        with torch.no_grad():
            return module._product(x)

    @staticmethod
    def backward(ctx, grad_y: Tensor):
        m = ctx.module
        w = dequantize(m.qweight, m.scale_min, m.out_features, m.group_size, m.bits).to(grad_y.device)
        return (grad_y.float() @ w).to(grad_y.dtype), None


class PackedLinear(nn.Module):
    """A linear layer whose weight is stored packed (``bits`` per code, fp32 scale and min per group)."""

    def __init__(self, in_features: int, out_features: int, bits: int, group_size: int, bias: bool = False):
        super().__init__()
        _check_layout(out_features, in_features, group_size)
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.group_size = container_bits(bits), group_size
        nb = -(-out_features // ROWS)
        self.register_buffer("qweight", torch.zeros(nb, in_features // UNIT, self.bits, ROWS, dtype=torch.int32))
        self.register_buffer("scale_min", torch.zeros(nb, in_features // group_size, 2, ROWS))
        self.register_buffer("bias", torch.zeros(out_features) if bias else None)
        self._handle = None  # (qweight, scale_min, their data_ptr()s, _C.PackedWeight): see _weight_handle

    @classmethod
    def from_codes(cls, q: Tensor, scale: Tensor, zero: Tensor, bits: int, symmetric: bool = False,
                   bias: Optional[Tensor] = None) -> "PackedLinear":
        """From sliderquant's codes (out, in), scales and zeros (out, groups): W = (q - zero) * scale."""
        rows, cols = q.shape
        if scale.shape != zero.shape or scale.dim() != 2 or scale.shape[0] != rows or cols % scale.shape[1]:
            raise ValueError(f"scales {tuple(scale.shape)} and zeros {tuple(zero.shape)} do not fit codes "
                             f"{tuple(q.shape)}: expected (out, groups) with groups dividing in_features")
        group = cols // scale.shape[1]
        m = cls(cols, rows, bits, group, bias is not None)
        offset = 2 ** (bits - 1) if symmetric else 0
        m.qweight.copy_(pack_codes(q.to(torch.int64) + offset, m.bits))
        m.scale_min.copy_(pack_scales(scale, zero.to(torch.float32) + offset))
        if bias is not None:
            m.bias.copy_(bias.detach().float())
        return m

    def _apply(self, fn, recurse=True):
        # model.to(torch.bfloat16) must not round the scales and mins: they stay fp32 (moves apply)
        keep = self.scale_min
        super()._apply(fn, recurse)
        if self.scale_min.dtype != torch.float32:
            self.scale_min = keep.to(self.scale_min.device)
        return self

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_handle"] = None         # a C handle: made again on the next call (deepcopy, pickle)
        return state

    def _weight_handle(self):
        """The codes and scales imported into C once (``_C.pk_weight``), or None when they are not on
        the CPU.  Made again whenever a buffer was replaced (``.to()``, assignment, ``_buffers[...] =``)
        or its storage changed (``.data =``, ``set_``); writes into the same storage (``copy_``,
        ``load_state_dict``) are seen as they are."""
        b = self._buffers
        q, sm = b["qweight"], b["scale_min"]
        h = self._handle
        if h is None or h[0] is not q or h[1] is not sm or h[2] != q.data_ptr() or h[3] != sm.data_ptr():
            handle = None
            if q.is_cpu and sm.is_cpu:
                handle = _C.pk_weight(q, sm, self.out_features, self.in_features, self.group_size, self.bits)
            h = self._handle = (q, sm, q.data_ptr(), sm.data_ptr(), handle)
        return h[4]

    def _product(self, x: Tensor) -> Tensor:
        """x @ W.T without the bias, for a detached x."""
        handle = self._weight_handle() if x.is_cpu and _C is not None else None
        if handle is None:
            return reference_matmul(self.qweight, self.scale_min, x, self.out_features, self.group_size, self.bits)
        xk = x if x.dtype in _KERNEL_DTYPES else x.float()   # float16 and others: through fp32
        if not xk.is_contiguous():
            xk = xk.contiguous()
        y = xk.new_empty(xk.shape[:-1] + (self.out_features,))
        _C.pk_linear(handle, xk, y, torch.get_num_threads())
        return y if xk is x else y.to(x.dtype)

    def forward(self, x: Tensor) -> Tensor:
        if x.requires_grad and torch.is_grad_enabled():
            y = _PackedLinearGrad.apply(x, self)
        else:
            y = self._product(x)
        bias = self._buffers["bias"]
        return y if bias is None else y + bias.to(y.dtype)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
                f"group_size={self.group_size}, bias={self.bias is not None}")


DENSE_MAX_TOKENS = 8  # DenseLinear's C path: up to this many tokens (decode); more go to F.linear


class DenseLinear(nn.Linear):
    """An ``nn.Linear`` (same parameters, same state dict) whose bfloat16 weight runs through
    sliderquant's dense C kernel (``csrc/dense_*.c``) for CPU calls of up to ``DENSE_MAX_TOKENS``
    tokens without autograd: on CPUs without native bf16 arithmetic torch's bf16 matmul reads the
    weight well below the memory bandwidth (SmolLM2's 49152 x 576 head: ~4.5 ms against ~2.5-3 ms).
    Anything else (fp32 weights, prefill, gradients, other devices) is plain ``F.linear``.
    :func:`pack_model` gives the model's unquantized output head this class (a class change in
    place: the weight stays the same tensor, tied to the embedding where it was)."""

    def forward(self, x: Tensor) -> Tensor:
        w = self.weight
        if (_C is None or w.dtype != torch.bfloat16 or not x.is_cpu or not w.is_cpu or x.dtype not in _KERNEL_DTYPES
                or x.dim() == 0 or x.numel() > DENSE_MAX_TOKENS * self.in_features
                or (torch.is_grad_enabled() and (x.requires_grad or w.requires_grad))):
            return super().forward(x)
        xk = x if x.is_contiguous() else x.contiguous()
        y = xk.new_empty(xk.shape[:-1] + (self.out_features,))
        _C.dn_linear(w.detach() if w.requires_grad else w, xk, y, torch.get_num_threads(), None)
        return y if self.bias is None else y + self.bias.to(y.dtype)


def _module_name(model: nn.Module, module: nn.Module) -> str:
    return next((n for n, m in model.named_modules() if m is module), "")


def pack_model(model: nn.Module) -> nn.Module:
    """Replace every quantized linear of ``model`` (listed in ``model.sliderquant_state``) by a
    :class:`PackedLinear` holding its codes.  Linears the layout cannot hold (in_features or group
    not a multiple of 32) stay as they are, with a warning.  Returns the model."""
    state = getattr(model, "sliderquant_state", None)
    if not state or "tensors" not in state:
        raise ValueError("pack_model: this model carries no sliderquant codes; quantize it with "
                         "sliderquant.quantize or load it with sliderquant.load first")
    cfg = state.get("config", {})
    bits, symmetric = int(cfg.get("wbits", 0)), bool(cfg.get("symmetric", False))
    container_bits(bits)
    tensors = state["tensors"]
    names = sorted(k[: -len(".qweight")] for k in tensors if k.endswith(".qweight"))
    skipped = []
    for name in names:
        lin = model.get_submodule(name)
        if isinstance(lin, PackedLinear):
            continue
        q, s, z = tensors[f"{name}.qweight"], tensors[f"{name}.scales"], tensors[f"{name}.zeros"]
        group = q.shape[1] // s.shape[1]
        if q.shape[1] % UNIT or group % UNIT:
            skipped.append(f"{name} (in={q.shape[1]}, group={group})")
            continue
        bias = getattr(lin, "bias", None)
        packed = PackedLinear.from_codes(q, s, z, bits, symmetric, bias)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, packed)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if type(head) is nn.Linear and f"{_module_name(model, head)}.qweight" not in tensors:
        head.__class__ = DenseLinear      # unquantized head: the dense C kernel for bf16 decode
    if skipped:
        log.warning("pack_model: %d linears kept unpacked (in_features and group must be multiples of %d): %s",
                    len(skipped), UNIT, ", ".join(skipped))
    state["packed"] = True
    return model


def load_packed(directory, **from_pretrained_kwargs) -> nn.Module:
    """``sliderquant.load(directory)`` with the quantized linears packed (``load(dir, packed=True)``)."""
    from .api import load
    return load(os.fspath(directory), packed=True, **from_pretrained_kwargs)


def packed_bytes(model: nn.Module) -> int:
    """Bytes held by the packed linears (codes, scales and mins)."""
    return sum(m.qweight.numel() * 4 + m.scale_min.numel() * 4 for m in model.modules() if isinstance(m, PackedLinear))


def packed_backend() -> str:
    """The packed kernels in use: ``'avx512'``, ``'avx2'`` or ``'ref'`` (``SLIDERQUANT_ISA=ref`` forces the reference)."""
    return _C.packed_backend() if _C is not None else "torch"
