"""Packed low-bit inference (issue 10 section 3): layout, C kernels, PackedLinear, packed SmolLM2.

Oracle: ``x @ dequantize(q, scale, zero).T`` in float64 from the original codes (not from the
packed words).  The kernels sum in fp32 with one FMA per code, so each output differs from the oracle
by at most about ``(K + 4) * u * sum_k |x_k| (|q_k| + |z|) |s|`` (u = 2^-24, the fp32 unit
roundoff; the group sum of x and the min term add at most the |z| part); tests use twice that.
Every ISA computes the same products in the same order, so ref, AVX2 and AVX-512, and 1 or 2
threads, must agree bit for bit.
"""
from __future__ import annotations

import copy
import os

import pytest
import torch

from sliderquant import packed
from sliderquant.quantizer import dequantize

C = packed._C
if C is None and os.environ.get("SLIDERQUANT_ALLOW_NO_EXTENSION") != "1":
    pytest.fail("sliderquant._C is missing (set SLIDERQUANT_ALLOW_NO_EXTENSION=1 to skip)", pytrace=False)
pytestmark = pytest.mark.skipif(C is None, reason="no C extension")


def _isas():
    out = ["ref"]
    for isa in ("avx2", "avx512"):
        try:
            C.pk_matmul(torch.zeros(1, 1, 2, 16, dtype=torch.int32), torch.zeros(1, 1, 2, 16), torch.zeros(1, 32),
                        torch.zeros(1, 1), 1, 32, 32, 2, 1, isa)
            out.append(isa)
        except ValueError:
            pass
    return out


ISAS = _isas() if C is not None else ["ref"]


def _case(bits, rows, cols, group, tokens, xdtype, seed=0, symmetric=False):
    g = torch.Generator().manual_seed(seed)
    groups = cols // group
    if symmetric:
        q = torch.randint(-2 ** (bits - 1), 2 ** (bits - 1), (rows, cols), generator=g)
        z = torch.zeros(rows, groups)
    else:
        q = torch.randint(0, 2 ** bits, (rows, cols), generator=g)
        z = torch.randint(0, 2 ** bits, (rows, groups), generator=g).float()
    s = torch.rand(rows, groups, generator=g) * 0.05 + 1e-3
    x = torch.randn(tokens, cols, generator=g).to(xdtype)
    return q, s, z, x


def _oracle_and_bound(q, s, z, x):
    rows, cols = q.shape
    group = cols // s.shape[1]
    w = ((q.double().reshape(rows, -1, group) - z.double().unsqueeze(-1)) * s.double().unsqueeze(-1)).reshape(rows, cols)
    assert torch.allclose(w.float(), dequantize(q, s, z), rtol=1e-6, atol=1e-7)  # the library's own formula
    mag = ((q.double().abs().reshape(rows, -1, group) + z.double().abs().unsqueeze(-1))
           * s.double().unsqueeze(-1)).reshape(rows, cols)
    xd = x.double()
    return xd @ w.T, 2 * (cols + 4) * 2.0 ** -24 * (xd.abs() @ mag.T)


SHAPES = [  # rows, cols, group: rows not a multiple of 16, one group, K not a multiple of 64; 100 rows:
    # 7 row blocks, so the AVX-512 plane kernels' decode path runs four blocks per call and then three
    (1, 32, 32), (3, 96, 96), (17, 160, 32), (33, 96, 32), (40, 256, 64), (16, 128, 128), (5, 64, 64),
    (100, 64, 32)]


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_pack_unpack_roundtrip(bits):
    q, *_ = _case(bits, 19, 96, 32, 1, torch.float32, seed=bits)
    words = packed.pack_codes(q, bits)
    assert words.shape == (2, 3, bits, 16) and words.dtype == torch.int32
    assert torch.equal(packed.unpack_codes(words, 19, bits), q)


def test_pack_words_by_hand():
    """The layout of csrc/sq_packed.h on hand-computed words."""
    q = torch.zeros(2, 32, dtype=torch.int64)
    q[0, :8] = torch.arange(8)                     # 4-bit: word 0 of row 0 = 0x76543210
    q[1, 8] = 15                                   # 4-bit: row 1, word 1, field 0
    w = packed.pack_codes(q, 4)
    assert w[0, 0, 0, 0].item() == 0x76543210 and w[0, 0, 1, 1].item() == 15 and int(w.count_nonzero()) == 2
    # 3 bits: bit planes, uint16 [3][32] per unit (row i in bit i), as int32 words of two halves
    q3 = torch.zeros(16, 32, dtype=torch.int64)
    q3[0, 0], q3[0, 17], q3[1, 31] = 5, 6, 7
    w3 = packed.pack_codes(q3, 3)
    assert w3.shape == (1, 1, 3, 16)
    assert w3[0, 0, 0, 0].item() == 1 and w3[0, 0, 0, 15].item() == 2 << 16             # bit 0: col 0 row 0, col 31 row 1
    assert w3[0, 0, 1, 8].item() == 1 << 16 and w3[0, 0, 1, 15].item() == 2 << 16       # bit 1: col 17 row 0, col 31 row 1
    assert w3[0, 0, 2, 0].item() == 1 and w3[0, 0, 2, 8].item() == 1 << 16 and w3[0, 0, 2, 15].item() == 2 << 16
    assert int(w3.count_nonzero()) == 7
    # 2 bits: 16 fields a word, a nibble is a column pair q[2i] + 4 q[2i+1] (the decode table's index)
    q2 = torch.zeros(16, 32, dtype=torch.int64)
    q2[0, 0], q2[0, 1] = 1, 2                            # row 0, pair 0: nibble 0 = 1 + 4 * 2
    q2[15, 31] = 3                                       # row 15, column 31: word 1, top field
    w2 = packed.pack_codes(q2, 2)
    assert w2.shape == (1, 1, 2, 16)
    assert w2[0, 0, 0, 0].item() == 9
    assert w2[0, 0, 1, 15].item() & 0xFFFFFFFF == 3 << 30 and int(w2.count_nonzero()) == 2


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("xdtype", [torch.float32, torch.bfloat16])
def test_kernels_against_float64_and_each_other(bits, xdtype):
    for si, (rows, cols, group) in enumerate(SHAPES):
        for tokens in (1, 3, 17):
            q, s, z, x = _case(bits, rows, cols, group, tokens, xdtype, seed=100 * bits + 10 * si + tokens)
            qw, sm = packed.pack_codes(q, bits), packed.pack_scales(s, z)
            oracle, bound = _oracle_and_bound(q, s, z, x)
            first = None
            for isa in ISAS:
                for threads in (1, 2):
                    y = packed.matmul(qw, sm, x, rows, group, bits, out_dtype=torch.float32, isa=isa,
                                      nthreads=threads)
                    err = (y.double() - oracle).abs()
                    assert bool((err <= bound).all()), (isa, threads, rows, cols, group, tokens,
                                                        float((err / bound).max()))
                    if first is None:
                        first = y
                    assert torch.equal(y, first), (isa, threads, rows, cols, group, tokens)
            assert first.abs().max() > 0


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_threads_on_a_matrix_big_enough_to_split(bits):
    """Small calls run on one thread (a wake-up costs more than they take); a 4003 x 1024 call runs on
    two and gives the same bits as one thread and every ISA (decode and prefill orders)."""
    rows, cols, group = 4003, 1024, 128
    for tokens in (1, 5):
        q, s, z, x = _case(bits, rows, cols, group, tokens, torch.float32, seed=bits + tokens)
        qw, sm = packed.pack_codes(q, bits), packed.pack_scales(s, z)
        oracle, bound = _oracle_and_bound(q, s, z, x)
        first = None
        for isa in ISAS:
            for threads in (1, 2):
                y = packed.matmul(qw, sm, x, rows, group, bits, isa=isa, nthreads=threads)
                assert bool(((y.double() - oracle).abs() <= bound).all()), (isa, threads, tokens)
                first = y if first is None else first
                assert torch.equal(y, first), (isa, threads, tokens)


def test_kernel_error_is_not_trivially_zero_and_bound_is_tight():
    """The bound is a real constraint: a wrong min (dropping -scale*zero) breaks it."""
    q, s, z, x = _case(4, 33, 256, 64, 5, torch.float32, seed=7)
    oracle, bound = _oracle_and_bound(q, s, z, x)
    y = packed.matmul(packed.pack_codes(q, 4), packed.pack_scales(s, torch.zeros_like(z)), x, 33, 64, 4)
    assert not bool(((y.double() - oracle).abs() <= bound).all())


@pytest.mark.parametrize("isa", ISAS)
def test_bf16_output_is_rounded_fp32_output(isa):
    q, s, z, x = _case(3, 17, 160, 32, 4, torch.bfloat16, seed=3)
    qw, sm = packed.pack_codes(q, 3), packed.pack_scales(s, z)
    y32 = packed.matmul(qw, sm, x, 17, 32, 3, out_dtype=torch.float32, isa=isa)
    y16 = packed.matmul(qw, sm, x, 17, 32, 3, isa=isa)
    assert y16.dtype == torch.bfloat16 and torch.equal(y16, y32.to(torch.bfloat16))


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 8])
def test_packed_linear_symmetric_and_container_bits(bits):
    """Symmetric codes (zero 0) are stored shifted; 5-bit codes go into 8-bit containers."""
    q, s, z, x = _case(bits, 21, 96, 32, 2, torch.float32, seed=bits, symmetric=True)
    lin = packed.PackedLinear.from_codes(q, s, z, bits, symmetric=True, bias=torch.arange(21.0))
    oracle, bound = _oracle_and_bound(q, s, z, x)
    y = lin(x.reshape(1, 2, 96)).reshape(2, 21).double() - torch.arange(21.0).double()
    assert bool(((y - oracle).abs() <= bound + 1e-5).all())
    assert lin.bits == (8 if bits == 5 else bits)
    # the torch reference of the same module (what a CUDA tensor would use) agrees
    ref = packed.reference_matmul(lin.qweight, lin.scale_min, x, 21, 32, lin.bits).double()
    assert bool(((ref - oracle).abs() <= bound).all())


def test_nan_in_x_propagates_to_its_token_only():
    q, s, z, x = _case(4, 20, 64, 32, 2, torch.float32, seed=1)
    qw, sm = packed.pack_codes(q, 4), packed.pack_scales(s, z)
    clean = packed.matmul(qw, sm, x, 20, 32, 4)
    x[0, 5] = float("nan")
    for isa in ISAS:
        y = packed.matmul(qw, sm, x, 20, 32, 4, isa=isa)
        assert bool(y[0].isnan().all()) and torch.equal(y[1], clean[1])


def test_ref_forced_by_environment():
    import subprocess
    import sys
    code = "import sliderquant.packed as p; print(p.packed_backend())"
    out = subprocess.run([sys.executable, "-c", code], env={**os.environ, "SLIDERQUANT_ISA": "ref"},
                         capture_output=True, text=True, check=True).stdout.strip()
    assert out == "ref"
    # a fresh process (other test files may have set this one's backend) picks the best ISA
    env = {k: v for k, v in os.environ.items() if k != "SLIDERQUANT_ISA"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         check=True).stdout.strip()
    assert out == ISAS[-1]


# ---- bad input -------------------------------------------------------------------------------------
def _good():
    q, s, z, x = _case(4, 20, 64, 32, 2, torch.float32)
    return packed.pack_codes(q, 4), packed.pack_scales(s, z), x, torch.empty(2, 20)


@pytest.mark.parametrize("mutate, exc, match", [
    (lambda a: a.update(q=a["q"].long()), TypeError, "'qweight' must be int32"),
    (lambda a: a.update(sm=a["sm"].double()), TypeError, "'scale_min' must be float32"),
    (lambda a: a.update(x=a["x"].half()), TypeError, "'x' must be float32 or bfloat16"),
    (lambda a: a.update(x=a["x"].int()), TypeError, "'x' must be float32 or bfloat16"),
    (lambda a: a.update(y=a["y"].double()), TypeError, "'y' must be float32 or bfloat16"),
    (lambda a: a.update(q=a["q"][:1]), ValueError, "'qweight' must have shape"),
    (lambda a: a.update(sm=a["sm"][:, :1].contiguous()), ValueError, "'scale_min' must have shape"),
    (lambda a: a.update(x=torch.zeros(2, 96)), ValueError, "last dimension in_features = 64"),
    (lambda a: a.update(y=torch.empty(2, 21)), ValueError, "out_features = 20"),
    (lambda a: a.update(y=torch.empty(3, 20)), ValueError, "shape of 'x'"),
    (lambda a: a.update(x=torch.zeros(64, 2).T), ValueError, "C-contiguous"),
    (lambda a: a.update(bits=5), ValueError, "2, 3, 4 or 8 bits"),
    (lambda a: a.update(bits=9), ValueError, "'bits' must lie in"),
    (lambda a: a.update(group=48), ValueError, "multiple of 32 that divides"),
    (lambda a: a.update(group=128), ValueError, "multiple of 32 that divides"),
    (lambda a: a.update(cols=80, x=torch.zeros(2, 80)), ValueError, "multiple of 32, got 80"),
    (lambda a: a.update(isa="neon"), ValueError, "'neon' are not available"),
    (lambda a: a.update(q=[1, 2]), TypeError, "DLPack"),
])
def test_bad_input_is_a_clear_exception(mutate, exc, match):
    q, sm, x, y = _good()
    a = dict(q=q, sm=sm, x=x, y=y, rows=20, cols=64, group=32, bits=4, isa=None)
    mutate(a)
    with pytest.raises(exc, match=match):
        C.pk_matmul(a["q"], a["sm"], a["x"], a["y"], a["rows"], a["cols"], a["group"], a["bits"], 1, a["isa"])


def test_python_matmul_names_a_wrong_width():
    q, sm, x, _ = _good()
    with pytest.raises(ValueError, match="last dimension in_features = 64"):
        packed.matmul(q, sm, torch.zeros(2, 96), 20, 32, 4)
    with pytest.raises(ValueError, match="on CPU tensors"):
        packed.matmul(q, sm, x.to("meta"), 20, 32, 4)


def test_output_may_not_alias_input():
    q, sm, _, _ = _good()
    buf = torch.zeros(2 * 64 + 2 * 20)
    x, y = buf[:128].view(2, 64), buf[100:140].view(2, 20)
    with pytest.raises(ValueError, match="overlaps"):
        C.pk_matmul(q, sm, x, y, 20, 64, 32, 4, 1, None)


def test_python_layer_refuses_unpackable_shapes():
    with pytest.raises(ValueError, match="multiple of 32"):
        packed.PackedLinear(48, 16, 4, 48)
    with pytest.raises(ValueError, match="2- to 8-bit"):
        packed.PackedLinear(64, 16, 1, 64)
    with pytest.raises(ValueError, match="codes must lie"):
        packed.pack_codes(torch.full((16, 32), 16), 4)
    with pytest.raises(ValueError, match="no sliderquant codes"):
        packed.pack_model(torch.nn.Linear(4, 4))


# ---- a packed SmolLM2 ------------------------------------------------------------------------------
# ---- weight handles (pk_weight / pk_linear): what PackedLinear calls -----------------------------------
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("tokens", [1, 3])
def test_pk_linear_equals_pk_matmul_bit_for_bit(bits, tokens):
    """The handle path runs the same kernels on the same memory: identical to pk_matmul, with x and y
    exported by torch's own exporter (torch tensors) or by __dlpack__ (numpy arrays)."""
    import numpy as np
    for rows, cols, group in SHAPES:
        q, s, z, x = _case(bits, rows, cols, group, tokens, torch.float32, seed=rows + bits)
        qw, sm = packed.pack_codes(q, bits), packed.pack_scales(s, z)
        h = C.pk_weight(qw, sm, rows, cols, group, bits)
        assert (h.rows, h.cols, h.group_size, h.bits) == (rows, cols, group, bits)
        assert h.qweight_ptr == qw.data_ptr() and h.scale_min_ptr == sm.data_ptr()
        for xdtype in (torch.float32, torch.bfloat16):
            xx = x.to(xdtype)
            want = packed.matmul(qw, sm, xx, rows, group, bits)
            y = torch.empty_like(want)
            C.pk_linear(h, xx, y, 2)
            assert torch.equal(y, want)
        y_np = np.empty((tokens, rows), np.float32)
        C.pk_linear(h, x.numpy(), y_np, 1)
        assert torch.equal(torch.from_numpy(y_np), packed.matmul(qw, sm, x, rows, group, bits))


def test_pk_linear_through_dlpack_when_no_exporter_is_set():
    q, s, z, x = _case(4, 20, 64, 32, 2, torch.float32)
    qw, sm = packed.pack_codes(q, 4), packed.pack_scales(s, z)
    h = C.pk_weight(qw, sm, 20, 64, 32, 4)
    fast = torch.empty(2, 20)
    C.pk_linear(h, x, fast, 1)
    C.pk_set_exporter(None, None)
    try:
        slow = torch.empty(2, 20)
        C.pk_linear(h, x, slow, 1)
        # __dlpack__ refuses a tensor that requires grad; the fast exporter is only used by forward's
        # own checked path, so this shows which one ran
        with pytest.raises(TypeError, match="require gradient"):
            C.pk_linear(h, x.clone().requires_grad_(), slow, 1)
    finally:
        C.pk_set_exporter(torch.Tensor, packed._FAST_EXPORT)
    assert torch.equal(fast, slow)
    with pytest.raises(TypeError, match="a type and a callable"):
        C.pk_set_exporter(torch.Tensor, 3)


def test_pk_weight_and_pk_linear_refuse_bad_input():
    q, sm, x, y = _good()
    with pytest.raises(TypeError, match="'qweight' must be int32"):
        C.pk_weight(q.long(), sm, 20, 64, 32, 4)
    with pytest.raises(ValueError, match="'scale_min' must have shape"):
        C.pk_weight(q, sm[:, :1].contiguous(), 20, 64, 32, 4)
    with pytest.raises(ValueError, match="2, 3, 4 or 8 bits"):
        C.pk_weight(q, sm, 20, 64, 32, 5)
    with pytest.raises(ValueError, match="multiple of 32 that divides"):
        C.pk_weight(q, sm, 20, 64, 48, 4)
    with pytest.raises(TypeError, match="DLPack"):
        C.pk_weight([1], sm, 20, 64, 32, 4)
    h = C.pk_weight(q, sm, 20, 64, 32, 4)
    with pytest.raises(TypeError, match="PackedWeight"):
        C.pk_linear(q, x, y, 1)
    with pytest.raises(ValueError, match="last dimension in_features = 64"):
        C.pk_linear(h, torch.zeros(2, 96), y, 1)
    with pytest.raises(ValueError, match="out_features = 20"):
        C.pk_linear(h, x, torch.empty(2, 21), 1)
    with pytest.raises(TypeError, match="float32 or bfloat16"):
        C.pk_linear(h, x.double(), y, 1)
    with pytest.raises(ValueError, match="C-contiguous"):
        C.pk_linear(h, torch.zeros(64, 2).T, y, 1)
    with pytest.raises(ValueError, match="'nthreads' must lie in"):
        C.pk_linear(h, x, y, 0)
    with pytest.raises(ValueError, match="overlaps the weight's 'scale_min'"):
        C.pk_linear(h, x, sm.view(-1)[:40].view(2, 20), 1)
    buf = torch.zeros(2 * 64 + 2 * 20)
    with pytest.raises(ValueError, match="overlaps"):
        C.pk_linear(h, buf[:128].view(2, 64), buf[100:140].view(2, 20), 1)
    with pytest.raises(TypeError, match="takes 4 positional"):
        C.pk_linear(h, x, y)
    with pytest.raises(TypeError):
        C.PackedWeight()                          # only pk_weight makes one


def test_packed_linear_follows_its_buffers():
    """The module's C handle is made once and again whenever the weight changes in any way a user can
    change it: in-place copy_, a replaced buffer, .data =, ._buffers[...] = (accelerate does that),
    .to(); deepcopy and pickle drop it.  Each output is checked against the fp64 oracle of the codes
    it should be using."""
    import pickle
    q, s, z, x = _case(4, 20, 64, 32, 2, torch.float32, seed=3)
    q2, s2, z2, _ = _case(4, 20, 64, 32, 2, torch.float32, seed=4)
    lin = packed.PackedLinear.from_codes(q, s, z, 4)
    other = packed.PackedLinear.from_codes(q2, s2, z2, 4)

    def check(m, codes):
        oracle, bound = _oracle_and_bound(*codes, x)
        with torch.no_grad():
            y = m(x).double()
        assert bool(((y - oracle).abs() <= bound).all())
        return y

    first, second = (q, s, z), (q2, s2, z2)
    check(lin, first)
    h = lin._handle[4]
    check(lin, first)
    assert lin._handle[4] is h                                    # reused while nothing changed
    lin.qweight.copy_(other.qweight)
    lin.scale_min.copy_(other.scale_min)
    check(lin, second)                                            # same storage: same handle, new codes
    assert lin._handle[4] is h
    lin.qweight = packed.pack_codes(q.to(torch.int64), 4)         # replaced buffer (scales still `second`)
    lin.scale_min = packed.pack_scales(s, z)
    check(lin, first)
    lin.qweight.data = other.qweight.clone()
    lin.scale_min.data = other.scale_min.clone()
    check(lin, second)
    lin._buffers["qweight"] = packed.pack_codes(q.to(torch.int64), 4)
    lin._buffers["scale_min"] = packed.pack_scales(s, z)
    check(lin, first)
    lin.to(torch.bfloat16)                                        # buffers stay int32 / fp32
    check(lin, first)
    for clone in (copy.deepcopy(lin), pickle.loads(pickle.dumps(lin))):
        assert clone._handle is None
        check(clone, first)


@pytest.mark.parametrize("xdtype", [torch.float32, torch.bfloat16])
def test_packed_linear_gradient_flows_to_x(xdtype):
    """Outside no_grad a packed model is differentiable in its input (the packed weight is frozen):
    grad_x = grad_y @ W, checked against autograd through the fp64 dequantized weight."""
    q, s, z, x = _case(4, 21, 96, 32, 3, torch.float64, seed=5)
    lin = packed.PackedLinear.from_codes(q, s, z, 4, bias=torch.arange(21.0))
    w = ((q.double().reshape(21, -1, 32) - z.double().unsqueeze(-1)) * s.double().unsqueeze(-1)).reshape(21, 96)
    xg = x.to(xdtype).requires_grad_()
    y = lin(xg)
    assert y.requires_grad and y.dtype == xdtype
    g = torch.randn(3, 21, generator=torch.Generator().manual_seed(6)).to(xdtype)
    y.backward(g)
    want = g.double() @ w
    tol = 1e-5 if xdtype == torch.float32 else 2e-2
    assert torch.allclose(xg.grad.double(), want, rtol=tol, atol=tol * float(want.abs().max()))
    with torch.no_grad():
        assert not lin(xg).requires_grad
    oracle, bound = _oracle_and_bound(q, s, z, x.to(xdtype))
    if xdtype == torch.float32:
        assert bool(((y.detach().double() - torch.arange(21.0).double() - oracle).abs() <= bound + 1e-5).all())


# ---- dense bf16 kernels (the unquantized head of a packed model) ----------------------------------------
def _dn_isas():
    out = []
    for isa in ("ref", "avx2", "avx512"):
        try:
            C.dn_linear(torch.zeros(1, 1, dtype=torch.bfloat16), torch.zeros(1, 1), torch.zeros(1, 1), 1, isa)
            out.append(isa)
        except ValueError:
            pass
    return out


DN_ISAS = _dn_isas() if C is not None else []


@pytest.mark.parametrize("tokens", [1, 3])
def test_dense_bf16_kernels_against_float64_and_each_other(tokens):
    """y = x W^T for bf16 W: every ISA bit for bit equal (one summation order, sq_dense.h), and within
    the fp32 bound ``(K + 4) u sum |x w|`` of the float64 product of the same bf16 values; odd widths
    (a last partial round of 16 columns), rows not a multiple of the 4-row step, 1 and 2 threads."""
    assert DN_ISAS[0] == "ref" and len(DN_ISAS) >= 2
    g = torch.Generator().manual_seed(tokens)
    for rows, cols in ((1, 1), (5, 7), (17, 16), (33, 50), (70, 576), (3, 33), (400, 200)):
        w = torch.randn(rows, cols, generator=g).bfloat16()
        for xdtype in (torch.float32, torch.bfloat16):
            x = torch.randn(tokens, cols, generator=g).to(xdtype)
            oracle = x.double() @ w.double().T
            bound = 2 * (cols + 4) * 2.0 ** -24 * (x.double().abs() @ w.double().abs().T)
            outs = []
            for isa in DN_ISAS:
                for nt in (1, 2):
                    y = torch.empty(tokens, rows)
                    C.dn_linear(w, x, y, nt, isa)
                    outs.append(y)
            for y in outs[1:]:
                assert torch.equal(y, outs[0])
            assert bool(((outs[0].double() - oracle).abs() <= bound).all())
            y16 = torch.empty(tokens, rows, dtype=torch.bfloat16)
            C.dn_linear(w, x, y16, 2, None)
            assert torch.equal(y16, outs[0].bfloat16())
    assert float((outs[0].double() - oracle).abs().max()) > 0      # the bound is not met trivially


def test_dense_bf16_kernel_refuses_bad_input():
    w, x, y = torch.zeros(4, 8, dtype=torch.bfloat16), torch.zeros(2, 8), torch.empty(2, 4)
    with pytest.raises(TypeError, match="'w' must be bfloat16"):
        C.dn_linear(w.float(), x, y, 1, None)
    with pytest.raises(ValueError, match="2-D"):
        C.dn_linear(w.reshape(32), x, y, 1, None)
    with pytest.raises(ValueError, match="last dimension in_features = 8"):
        C.dn_linear(w, torch.zeros(2, 9), y, 1, None)
    with pytest.raises(ValueError, match="out_features = 4"):
        C.dn_linear(w, x, torch.empty(2, 5), 1, None)
    with pytest.raises(ValueError, match="C-contiguous"):
        C.dn_linear(torch.zeros(8, 4, dtype=torch.bfloat16).T, x, y, 1, None)
    with pytest.raises(TypeError, match="float32 or bfloat16"):
        C.dn_linear(w, x.double(), y, 1, None)
    with pytest.raises(ValueError, match="'neon' are not available"):
        C.dn_linear(w, x, y, 1, "neon")
    with pytest.raises(ValueError, match="overlaps"):
        buf = torch.zeros(24)
        C.dn_linear(w, buf[:16].view(2, 8), buf[8:16].view(2, 4), 1, None)
    with pytest.raises(TypeError, match="require gradient"):   # w goes through __dlpack__
        C.dn_linear(w.clone().requires_grad_(), x, y, 1, None)


def test_dense_linear_module_paths():
    """DenseLinear: the C kernel for a bf16 CPU decode (same result as the kernel called directly and
    within bf16 rounding of F.linear), F.linear for fp32 weights, prefill and gradients; the class
    change keeps the parameter (tying) and the state dict."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(40, 24, bias=True).bfloat16()
    sd = {k: v.clone() for k, v in lin.state_dict().items()}
    weight = lin.weight
    lin.__class__ = packed.DenseLinear
    assert lin.weight is weight and all(torch.equal(v, lin.state_dict()[k]) for k, v in sd.items())
    x = torch.randn(1, 2, 40).bfloat16()
    with torch.no_grad():
        y = lin(x)
        want = torch.empty(1, 2, 24, dtype=torch.bfloat16)
        C.dn_linear(lin.weight.detach(), x, want, torch.get_num_threads(), "ref")
        assert torch.equal(y, want + lin.bias)
        assert torch.allclose(y.float(), torch.nn.functional.linear(x, lin.weight, lin.bias).float(), rtol=2e-2, atol=2e-2)
        big = torch.randn(1, packed.DENSE_MAX_TOKENS + 1, 40).bfloat16()
        assert torch.equal(lin(big), torch.nn.functional.linear(big, lin.weight, lin.bias))
    y = lin(x)                                      # grad enabled, weight requires grad: F.linear
    assert y.requires_grad and y.grad_fn is not None
    lin.float()
    with torch.no_grad():
        xf = x.float()
        assert torch.equal(lin(xf), torch.nn.functional.linear(xf, lin.weight, lin.bias))


@pytest.fixture(scope="module")
def smollm2_w4():
    import sliderquant
    from sliderquant import data
    try:
        data.smollm2_gguf_path()
    except FileNotFoundError as exc:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"required under CI: {exc}", pytrace=False)
        pytest.skip(str(exc))
    torch.set_num_threads(2)
    model, tok = data.load_model("smollm2-135m")
    sliderquant.quantize(model, {"method": "rtn", "wbits": 4, "group_size": 64}, None)
    return model.eval(), tok


def test_packed_smollm2_matches_fake_quant_and_generates(smollm2_w4, tmp_path):
    """Logits of the packed model equal the fake-quantized model's within 2e-4 of the logits' scale:
    both compute in fp32; the packed kernels only reorder the sums (s*sum(q x) + m*sum(x) per group
    instead of sum((q - z) s x)), about K * u relative per linear, grown through 30 layers."""
    fake, tok = smollm2_w4
    model = packed.pack_model(copy.deepcopy(fake))
    n_packed = sum(isinstance(m, packed.PackedLinear) for m in model.modules())
    assert n_packed == 30 * 7
    assert type(model.lm_head) is packed.DenseLinear and model.lm_head.weight is model.model.embed_tokens.weight
    ids = tok("Once upon a time there was a little robot who", return_tensors="pt").input_ids
    with torch.no_grad():
        want, got = fake(ids).logits, model(ids).logits
    scale = want.abs().max()
    assert float((got - want).abs().max()) <= 2e-4 * float(scale), float((got - want).abs().max() / scale)
    assert torch.equal(got.argmax(-1), want.argmax(-1))
    out = model.generate(ids, max_new_tokens=16, do_sample=False)
    assert out.shape[1] == ids.shape[1] + 16
    ref = fake.generate(ids, max_new_tokens=16, do_sample=False)
    assert torch.equal(out, ref)
    # memory of the linears: bits/16 of bf16 plus 8 bytes per row and group
    n_weights = sum(m.in_features * m.out_features for m in model.modules() if isinstance(m, packed.PackedLinear))
    n_groups = sum(m.out_features * m.in_features // 64 for m in model.modules() if isinstance(m, packed.PackedLinear))
    assert packed.packed_bytes(model) == n_weights * 4 // 8 + n_groups * 8


def test_load_packed_from_a_saved_directory(smollm2_w4, tmp_path):
    """``sliderquant.load(dir, packed=True)`` (and ``packed.load_packed``) give the packed model."""
    import sliderquant
    fake, tok = smollm2_w4
    sliderquant.save(fake, tmp_path / "out", tok)
    model = sliderquant.load(tmp_path / "out", packed=True)
    assert sum(isinstance(m, packed.PackedLinear) for m in model.modules()) == 30 * 7
    plain = sliderquant.load(tmp_path / "out")
    assert not any(isinstance(m, packed.PackedLinear) for m in plain.modules())
    ids = tok("The robot", return_tensors="pt").input_ids
    with torch.no_grad():
        want, got = fake(ids).logits, model(ids).logits
    assert float((got - want).abs().max()) <= 2e-4 * float(want.abs().max())


@pytest.mark.parametrize("bits", [2, 3])
def test_packed_smollm2_low_bits_match_fake_quant(bits):
    """The 2-bit (pair-table decode) and 3-bit (planes) kernels in a whole model, decode path too:
    SmolLM2 W2/W3 g64, packed vs fake-quantized."""
    import sliderquant
    from sliderquant import data
    try:
        data.smollm2_gguf_path()
    except FileNotFoundError as exc:
        pytest.skip(str(exc))
    torch.set_num_threads(2)
    fake, tok = data.load_model("smollm2-135m")
    sliderquant.quantize(fake, {"method": "rtn", "wbits": bits, "group_size": 64}, None)
    fake.eval()
    model = packed.pack_model(copy.deepcopy(fake))
    ids = tok("Once upon a time", return_tensors="pt").input_ids
    with torch.no_grad():
        want, got = fake(ids).logits, model(ids).logits
        assert float((got - want).abs().max()) <= 2e-4 * float(want.abs().max())
        step = torch.tensor([[tok.eos_token_id]])  # one token: the decode kernels
        kv_f, kv_p = fake(ids, use_cache=True).past_key_values, model(ids, use_cache=True).past_key_values
        want1, got1 = fake(step, past_key_values=kv_f).logits, model(step, past_key_values=kv_p).logits
    assert float((got1 - want1).abs().max()) <= 2e-4 * float(want1.abs().max())
