"""C kernels (scalar reference and AVX2) against the pure-torch reference, values and gradients.

Tolerances, and why.  The C kernels evaluate the same IEEE operations as the reference (true
division, round-half-to-even, the same clamp order), but three things are computed differently:
the LoRA product ``B @ A`` (another summation order, with FMA), ``sigmoid`` (``expf`` against
torch's vectorized exp, which may differ by an ulp), and the gradient reductions (over a group,
over rows).  So ``W_t``, the range and the scale ``s`` may differ by a few float32 ulps, and:

* an element whose ``W_t / s`` lies within a hair of a rounding tie (``k + 0.5``) may round to the
  neighbouring code on one side: its output then differs by exactly one grid step ``s``, and every
  gradient summed over its group changes.  The same holds for a zero point ``round(-lo / s)``.
  ``DELTA(bits) = 2^bits * 2^-16`` in units of ``W_t / s`` (a relative disagreement of 2^-16,
  hundreds of ulps) is the "hair".  The value tests make their data tie-free: elements of the
  oracle within ``DELTA`` of a tie are nudged away, so both sides must round every element the
  same way and every element must match.  ``test_raw_random_weights_differ_only_at_ties`` keeps
  raw random data and checks that each differing element is an oracle near-tie and differs by one
  step.
* all other values agree to ``VALUE_ULPS`` float32 ulps of the row's largest magnitude (the scale
  and ``W_t`` may be a few ulps apart); a bfloat16 result may in addition round to the neighbouring
  bfloat16 value (one bf16 ulp, 2^-8 relative) when the float32 values straddle a bf16 tie.
* gradients are sums of at most a few hundred float32 terms; in another order they differ by
  about ``n * eps`` of the largest term.  Every element must agree to ``GRAD_RTOL = 1e-4`` of the
  largest magnitude of that gradient (about 8x that bound at n = 203); bfloat16 gradients also to
  one bf16 ulp.

Seeds are fixed numbers (never ``hash()``, which changes from run to run).
"""

import itertools
import os
import subprocess
import sys
import zlib

import numpy as np
import pytest
import torch

from c_extension import ALLOW_VAR, require_c
from sliderquant import ops, reference

C = ops._C
ISAS = ["ref", "avx2"]
VALUE_ULPS = 8
GRAD_RTOL = 1e-4
EPS32 = 2.0 ** -23
BF16_ULP = 2.0 ** -8


@pytest.fixture
def c_ext():
    return require_c()


def c_backend(name: str, no_avx2: str = "this CPU has no AVX2/FMA"):
    """Fixture body: run the test on the C table ``name``, skipping (``no_avx2``) where AVX2 is
    missing; the previous backend is restored afterwards."""
    require_c()
    if name == "avx2" and not C.avx2_supported():
        pytest.skip(no_avx2)
    previous = C.backend()
    C.set_backend(name)
    yield name
    C.set_backend(previous)


@pytest.fixture(params=ISAS)
def isa(request):
    yield from c_backend(request.param, "this CPU has no AVX2/FMA; the scalar reference is tested")


def seed_of(*key) -> int:
    """A seed that is the same in every run (crc32 of the parameters' text)."""
    return zlib.crc32(repr(key).encode()) % 10_000


def delta(bits: int) -> float:
    return 2.0 ** bits * 2.0 ** -16


def tie_distance(t):
    """Distance of ``t`` from the nearest rounding tie ``k + 0.5``."""
    return ((t - torch.floor(t)) - 0.5).abs()


def assert_values_match(actual, expected, row_scale, what="", bf16=False):
    """Every element within VALUE_ULPS float32 ulps of ``row_scale`` (plus one bf16 ulp when bf16 rounding
    is involved: a bf16 result, or ``bf16=True`` for an oracle rounded to bf16 on the way)."""
    a, e = actual.double(), expected.double()
    tol = VALUE_ULPS * EPS32 * row_scale.double()
    if bf16 or actual.dtype == torch.bfloat16:
        tol = tol + BF16_ULP * e.abs()
    err = (a - e).abs()
    bad = err > tol
    assert not bad.any(), f"{what}: {int(bad.sum())} of {bad.numel()} elements differ (worst {err.max():.3g})"


def assert_grads_match(actual, expected, what="", bf16=False):
    a, e = actual.double(), expected.double()
    tol = GRAD_RTOL * (e.abs().max().item() or 1.0)
    if bf16 or actual.dtype == torch.bfloat16:
        tol = tol + BF16_ULP * e.abs()
    err = (a - e).abs()
    bad = err > tol
    assert not bad.any(), f"{what}: {int(bad.sum())} of {bad.numel()} elements differ (worst {err.max():.3g})"


def weight_oracle_grid(w, params, bits, group, symmetric, lwc_param="sigmoid"):
    """The oracle's ``W_t`` grouped (rows, n_groups, g), scale, zero point and ``-lo / s``."""
    with torch.no_grad():
        _, grouped, hi, lo = reference._clipped_groups(
            w, group, params.get("lwc_upper"), params.get("lwc_lower"), params.get("channel_scale"),
            params.get("lora_a"), params.get("lora_b"), 1.0, lwc_param)
        s, z, _, _ = reference.minmax_grid(hi, lo, bits, symmetric)
    return grouped, s, z, -lo / s


def make_tie_free(w, params, bits, group, symmetric, lwc_param="sigmoid"):
    """Nudge the elements of ``w`` whose ``W_t / s`` is within DELTA of a tie (none of them an extreme of
    its group, so ``s`` stays); ``None`` when an extreme or a zero point is at a tie (take another seed)."""
    d = delta(bits)
    alpha = params.get("channel_scale")
    for _ in range(40):
        grouped, s, z, zraw = weight_oracle_grid(w, params, bits, group, symmetric, lwc_param)
        if not symmetric and (tie_distance(zraw) < d).any():
            return None
        t = grouped / s
        near = tie_distance(t) < d
        if not near.any():
            return w
        extreme = (grouped == grouped.amax(-1, keepdim=True)) | (grouped == grouped.amin(-1, keepdim=True))
        if (near & extreme).any():
            return None
        away = torch.where(t - torch.floor(t) < 0.5, -1.0, 1.0)      # further from k + 0.5
        step = (4 * d * s * away).expand_as(grouped).reshape(w.shape)
        if alpha is not None:
            step = step / alpha
        near = near.reshape(w.shape)
        moved = (w.float() + step).to(w.dtype)
        stuck = near & (moved == w)        # bf16 absorbed the step: go to the next bf16 value
        moved = torch.where(stuck, torch.nextafter(w, step.to(w.dtype) * float("inf")), moved)
        w = torch.where(near, moved, w)
    return None


def make_weight_case(rows, cols, group, extras, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    w = (torch.randn(rows, cols, generator=g) * 0.05).to(dtype)
    n_groups = 1 if group is None else cols // group
    params = {
        "lwc_upper": torch.randn(rows, n_groups, generator=g) + 2.0,
        "lwc_lower": torch.randn(rows, n_groups, generator=g) + 2.0,
    }
    if "alpha" in extras:
        params["channel_scale"] = torch.rand(cols, generator=g) + 0.5
    if "lora" in extras:
        params["lora_a"] = torch.randn(4, cols, generator=g) * 0.05
        params["lora_b"] = torch.randn(rows, 4, generator=g) * 0.05
    grad = torch.randn(rows, cols, generator=g).to(dtype)
    return w, params, grad


def make_tie_free_weight_case(rows, cols, group, extras, dtype, seed, bits, symmetric, lwc_param="sigmoid"):
    """A tie-free case; with ``lwc_param="linear"`` the clipping parameters are factors (the sigmoid of
    the logits the sigmoid case would draw)."""
    for attempt in range(20):
        w, params, grad = make_weight_case(rows, cols, group, extras, dtype, seed + 10_007 * attempt)
        if lwc_param == "linear":
            params["lwc_upper"], params["lwc_lower"] = (torch.sigmoid(params[k]) for k in ("lwc_upper", "lwc_lower"))
        w = make_tie_free(w, params, bits, group, symmetric, lwc_param)
        if w is not None:
            return w, params, grad
    raise AssertionError("no tie-free case in 20 seeds")


def run_weight(fn, w, params, grad, **kw):
    w = w.clone().requires_grad_(True)
    params = {k: v.clone().requires_grad_(True) for k, v in params.items()}
    out = fn(w, **params, **kw)
    out.backward(grad)
    return out.detach(), w.grad, {k: v.grad for k, v in params.items()}


def row_scale(w, params, out):
    """Largest magnitude per row among the transformed weight and the result (broadcast to the row)."""
    with torch.no_grad():
        wt = reference.transformed_weight(w, params.get("channel_scale"), params.get("lora_a"), params.get("lora_b"))
        m = torch.maximum(wt.abs().amax(-1, keepdim=True), out.float().abs().amax(-1, keepdim=True))
    return m.expand_as(wt)


# Every (bits, symmetry, group, dtype) combination; (quant_rate, alpha/LoRA) cycle through their 8
# combinations along the list so each is covered ten times without a full product.
_EXTRAS = list(itertools.product([1.0, 0.5], [(), ("alpha",), ("lora",), ("alpha", "lora")]))
WEIGHT_CASES = [
    (bits, sym, group, *_EXTRAS[k % len(_EXTRAS)], dtype)
    for k, (bits, sym, group, dtype) in enumerate(itertools.product(
        [2, 3, 4, 8],                      # bits
        [False, True],                     # symmetric
        [None, 32, 64, 128, 20],           # group size (20: groups not a multiple of 8)
        [torch.float32, torch.bfloat16],
    ))
]


@pytest.mark.parametrize("bits,symmetric,group,rate,extras,dtype", WEIGHT_CASES)
def test_weight_fake_quant_matches_reference(isa, bits, symmetric, group, rate, extras, dtype):
    cols = 203 if group is None else 5 * group  # 203: per-channel rows not a multiple of 8
    seed = seed_of(bits, symmetric, group, rate, extras, str(dtype))
    w, params, grad = make_tie_free_weight_case(13, cols, group, extras, dtype, seed, bits, symmetric)
    kw = dict(bits=bits, group_size=group, symmetric=symmetric, quant_rate=rate)
    out_c, gw_c, gp_c = run_weight(ops.fake_quant_weight, w, params, grad, **kw)
    out_r, gw_r, gp_r = run_weight(reference.fake_quant_weight, w, params, grad, **kw)
    assert out_c.dtype == dtype and out_c.shape == w.shape
    assert_values_match(out_c, out_r, row_scale(w, params, out_r), what="W_hat")
    assert_grads_match(gw_c, gw_r, what="dW")
    for name in params:
        assert_grads_match(gp_c[name], gp_r[name], what=f"d{name}")


@pytest.mark.parametrize("bits,symmetric", [(2, False), (3, True), (4, False), (8, False), (8, True)])
def test_raw_random_weights_differ_only_at_ties(isa, bits, symmetric):
    """Raw random data with LoRA: an element may differ from the oracle only when the oracle puts it
    within DELTA of a rounding tie, and then by exactly one grid step."""
    w, params, _ = make_weight_case(64, 512, 64, ("alpha", "lora"), torch.float32, seed_of("raw", bits, symmetric))
    with torch.no_grad():
        out_c = ops.fake_quant_weight(w, bits, 64, symmetric, **params)
        out_r = reference.fake_quant_weight(w, bits, 64, symmetric, **params)
    grouped, s, z, zraw = weight_oracle_grid(w, params, bits, 64, symmetric)
    near = (tie_distance(grouped / s) < delta(bits)) | (tie_distance(zraw) < delta(bits)) & (not symmetric)
    near = near.reshape(w.shape)
    step = s.expand_as(grouped).reshape(w.shape)
    err = (out_c - out_r).abs().double()
    tol = VALUE_ULPS * EPS32 * row_scale(w, params, out_r).double()
    differ = err > tol
    assert not (differ & ~near).any(), "an element away from any rounding tie differs from the oracle"
    one_step = (err - step.double()).abs() <= tol + VALUE_ULPS * EPS32 * step.double()
    assert (one_step | ~differ).all(), "an element at a tie differs by more than one grid step"


def _tie_free_act(x, bits, symmetric, alpha):
    """Nudge the elements of ``x`` whose ``X_t / s`` is within DELTA of a tie; ``None`` when an extreme
    or a zero point is at a tie (take another seed)."""
    d = delta(bits)
    for _ in range(40):
        with torch.no_grad():
            xt = x.float() if alpha is None else x.float() / alpha
            hi, lo = xt.amax(-1, keepdim=True), xt.amin(-1, keepdim=True)
            s, _, _, _ = reference.minmax_grid(hi, lo, bits, symmetric)
        if not symmetric and (tie_distance(-lo / s) < d).any():
            return None
        t = xt / s
        near = tie_distance(t) < d
        if not near.any():
            return x
        if (near & ((xt == hi) | (xt == lo))).any():
            return None
        away = torch.where(t - torch.floor(t) < 0.5, -1.0, 1.0)
        step = 4 * d * s * away * (1.0 if alpha is None else alpha)
        moved = (x.float() + step).to(x.dtype)
        moved = torch.where(moved == x, torch.nextafter(x, step.to(x.dtype) * float("inf")), moved)
        x = torch.where(near, moved, x)
    return None


def make_tie_free_act(shape, bits, symmetric, alpha, dtype, seed):
    for attempt in range(20):
        g = torch.Generator().manual_seed(seed + 10_007 * attempt)
        x = (torch.randn(*shape, generator=g) * 2).to(dtype)
        grad = torch.randn(*shape, generator=g).to(dtype)
        x = _tie_free_act(x, bits, symmetric, alpha)
        if x is not None:
            return x, grad
    raise AssertionError("no tie-free activations in 20 seeds")


@pytest.mark.parametrize("bits,symmetric,rate,with_alpha,dtype", list(itertools.product(
    [2, 3, 4, 8], [False, True], [1.0, 0.5], [False, True], [torch.float32, torch.bfloat16])))
def test_act_fake_quant_matches_reference(isa, bits, symmetric, rate, with_alpha, dtype):
    g = torch.Generator().manual_seed(bits * 10 + symmetric)
    alpha = (torch.rand(101, generator=g) + 0.5) if with_alpha else None
    x, grad = make_tie_free_act((3, 7, 101), bits, symmetric, alpha, dtype,   # 101: tail not a multiple of 8
                                seed_of("act", bits, symmetric, rate, with_alpha, str(dtype)))
    results = []
    for fn in (ops.fake_quant_act, reference.fake_quant_act):
        xx = x.clone().requires_grad_(True)
        aa = alpha.clone().requires_grad_(True) if alpha is not None else None
        out = fn(xx, bits, symmetric=symmetric, channel_scale=aa, quant_rate=rate)
        out.backward(grad)
        results.append((out.detach(), xx.grad, aa.grad if aa is not None else None))
    (o_c, gx_c, ga_c), (o_r, gx_r, ga_r) = results
    xt = x.float() if alpha is None else x.float() / alpha
    scale = torch.maximum(xt.abs().amax(-1, keepdim=True), o_r.float().abs().amax(-1, keepdim=True)).expand_as(xt)
    assert_values_match(o_c, o_r, scale, what="X_hat")
    assert_grads_match(gx_c, gx_r, what="dX")
    if with_alpha:
        assert_grads_match(ga_c, ga_r, what="dalpha")


def test_hand_computed_values(isa):
    # 2-bit asymmetric, no clipping: hi = 1, lo = -1, s = 2/3, z = round(1.5) = 2 (half to even);
    # W / s = [-1.5, 0, 0.75, 1.5] rounds (half to even) to [-2, 0, 1, 2]; + z = [0, 2, 3, 4];
    # clamp to [0, 3] = [0, 2, 3, 3]; (q - z) * s = [-4/3, 0, 2/3, 2/3].
    w = torch.tensor([[-1.0, 0.0, 0.5, 1.0]])
    out = ops.fake_quant_weight(w, 2)
    torch.testing.assert_close(out, torch.tensor([[-4 / 3, 0.0, 2 / 3, 2 / 3]]))
    # symmetric 3-bit: s = 1 / 3, W / s = [-3, 0, 1.5, 3] -> [-3, 0, 2, 3], all inside [-4, 3].
    out = ops.fake_quant_weight(w, 3, symmetric=True)
    torch.testing.assert_close(out, torch.tensor([[-1.0, 0.0, 2 / 3, 1.0]]))
    # clipping logits u = l = 0: sigmoid = 0.5, so hi = 0.5, lo = -0.5, s = 1/3, z = round(1.5) = 2.
    # W / s = [-3, 0, 1.5, 3] -> [-3, 0, 2, 3] + 2 = [-1, 2, 4, 5] -> clamp [0, 2, 3, 3] -> [-2, 0, 1, 1] / 3
    zeros = torch.zeros(1, 1)
    out = ops.fake_quant_weight(w, 2, lwc_upper=zeros, lwc_lower=zeros)
    torch.testing.assert_close(out, torch.tensor([[-2 / 3, 0.0, 1 / 3, 1 / 3]]))


def test_quant_rate_leaves_suffix_unquantized(isa):
    w = torch.randn(8, 256)
    out = ops.fake_quant_weight(w, 2, group_size=64, quant_rate=0.3)  # ceil(0.3 * 4) = 2 groups
    assert torch.equal(out[:, 128:], w[:, 128:])
    assert not torch.equal(out[:, :128], w[:, :128])
    out = ops.fake_quant_weight(w, 2, quant_rate=0.5)  # per-channel: ceil(0.5 * 256) = 128 columns
    assert torch.equal(out[:, 128:], w[:, 128:])
    x = torch.randn(4, 10)
    out = ops.fake_quant_act(x, 2, quant_rate=0.25)  # ceil(2.5) = 3 channels
    assert torch.equal(out[:, 3:], x[:, 3:])


def test_tied_extremes_share_gradient(isa):
    # amax/amin share their gradient evenly between tied elements; the kernels must do the same.
    w = torch.tensor([[1.0, 1.0, -1.0, 0.3, -1.0, 0.2, 0.1, -0.4]])
    u = torch.zeros(1, 1)
    l = torch.zeros(1, 1)
    grad = torch.arange(8, dtype=torch.float32).reshape(1, 8)
    got = run_weight(ops.fake_quant_weight, w, {"lwc_upper": u, "lwc_lower": l}, grad, bits=3)
    want = run_weight(reference.fake_quant_weight, w, {"lwc_upper": u, "lwc_lower": l}, grad, bits=3)
    torch.testing.assert_close(got[1], want[1])
    torch.testing.assert_close(got[2]["lwc_upper"], want[2]["lwc_upper"])


def test_scalar_and_avx2_agree_exactly_without_lora(c_ext):
    if not C.avx2_supported():
        pytest.skip("CPU without AVX2")
    w = torch.randn(64, 4096)
    u = torch.randn(64, 32)
    outs = []
    for name in ("ref", "avx2"):
        C.set_backend(name)
        outs.append(ops.fake_quant_weight(w, 4, group_size=128, lwc_upper=u, lwc_lower=u))
    C.set_backend("auto")
    assert torch.equal(outs[0], outs[1])


def test_thread_count_does_not_change_forward(c_ext):
    w = torch.randn(257, 512)
    a, b = torch.randn(4, 512) * 0.1, torch.randn(257, 4) * 0.1
    outs = []
    for nt in (1, 2, 3):
        out = torch.empty_like(w)
        C.wq_forward(w, None, a, b, None, None, out, 4, 64, 512, False, 1.0, nt)
        outs.append(out)
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])


# ----------------------------------------------------------------------------- bad input

@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.int32])
def test_wrong_dtype_is_rejected(dtype):
    with pytest.raises(TypeError, match="float32 or bfloat16"):
        ops.fake_quant_weight(torch.ones(4, 8).to(dtype), 4)
    require_c()
    with pytest.raises(TypeError, match="float32 or bfloat16"):
        C.wq_forward(torch.ones(4, 8).to(dtype), None, None, None, None, None, torch.ones(4, 8).to(dtype), 4, 0, 8,
                     False, 1.0, 1)


@pytest.mark.parametrize("bits", [0, 1, 9, 16, 3.0, True, "4"])
def test_bits_out_of_range(bits):
    with pytest.raises(ValueError, match="bits"):
        ops.fake_quant_weight(torch.ones(4, 8), bits)
    with pytest.raises(ValueError, match="bits"):
        ops.fake_quant_act(torch.ones(4, 8), bits)


def test_shape_errors():
    with pytest.raises(ValueError, match="2-D"):
        ops.fake_quant_weight(torch.ones(2, 4, 8), 4)
    with pytest.raises(ValueError, match="does not divide"):
        ops.fake_quant_weight(torch.ones(4, 100), 4, group_size=64)
    with pytest.raises(ValueError, match="group_size"):
        ops.fake_quant_weight(torch.ones(4, 128), 4, group_size=0)
    with pytest.raises(ValueError, match="lwc_upper"):
        ops.fake_quant_weight(torch.ones(4, 128), 4, group_size=64, lwc_upper=torch.zeros(4, 3))
    with pytest.raises(ValueError, match="channel_scale"):
        ops.fake_quant_weight(torch.ones(4, 128), 4, channel_scale=torch.ones(127))
    with pytest.raises(ValueError, match="together"):
        ops.fake_quant_weight(torch.ones(4, 128), 4, lora_a=torch.ones(2, 128))
    with pytest.raises(ValueError, match="lora_a"):
        ops.fake_quant_weight(torch.ones(4, 128), 4, lora_a=torch.ones(2, 127), lora_b=torch.ones(4, 2))
    with pytest.raises(ValueError, match="quant_rate"):
        ops.fake_quant_weight(torch.ones(4, 128), 4, quant_rate=1.5)
    with pytest.raises(ValueError, match="non-empty"):
        ops.fake_quant_act(torch.ones(0, 8), 4)
    # the binding itself checks everything too (direct callers of _C)
    require_c()
    w = torch.ones(4, 128)
    with pytest.raises(ValueError, match="shape"):
        C.wq_forward(w, None, None, None, torch.zeros(4, 3), None, torch.empty(4, 128), 4, 64, 128, False, 1.0, 1)
    with pytest.raises(ValueError, match="n_quant"):
        C.wq_forward(w, None, None, None, None, None, torch.empty(4, 128), 4, 64, 100, False, 1.0, 1)
    with pytest.raises(ValueError, match="shape"):
        C.wq_forward(w, None, None, None, None, None, torch.empty(4, 127), 4, 0, 128, False, 1.0, 1)
    with pytest.raises(TypeError, match="positional arguments"):
        C.wq_forward(w)


def test_device_errors(c_ext):
    meta = torch.empty(4, 8, device="meta")
    with pytest.raises(ValueError, match="is on meta"):
        ops.fake_quant_weight(torch.ones(4, 8), 4, channel_scale=torch.ones(8, device="meta"))
    with pytest.raises(TypeError, match="DLPack"):
        C.aq_forward(meta, None, meta, 4, 8, False, 1)


def test_outputs_must_be_writable_fresh_and_contiguous(c_ext):
    w = torch.randn(4, 8)
    with pytest.raises(TypeError, match="require gradient"):
        C.wq_forward(w, None, None, None, None, None, torch.empty(4, 8, requires_grad=True), 4, 0, 8, False, 1.0, 1)
    readonly = np.zeros((4, 8), np.float32)
    readonly.flags.writeable = False
    with pytest.raises(ValueError, match="read-only"):
        C.wq_forward(w, None, None, None, None, None, readonly, 4, 0, 8, False, 1.0, 1)
    with pytest.raises(ValueError, match="overlaps"):
        C.wq_forward(w, None, None, None, None, None, w, 4, 0, 8, False, 1.0, 1)
    with pytest.raises(ValueError, match="overlaps"):
        buf = torch.randn(5, 8)  # partial overlap: rows 1-3 are shared
        C.aq_forward(buf[:4], None, buf[1:], 4, 8, False, 1)
    with pytest.raises(ValueError, match="contiguous"):
        C.wq_forward(w.t(), None, None, None, None, None, torch.empty(8, 4), 4, 0, 4, False, 1.0, 1)
    with pytest.raises(TypeError, match="DLPack"):
        C.wq_forward([[1.0]], None, None, None, None, None, torch.empty(1, 1), 4, 0, 1, False, 1.0, 1)
    # the Python wrapper makes non-contiguous inputs contiguous instead
    torch.testing.assert_close(ops.fake_quant_weight(w.t(), 4), ops.fake_quant_weight(w.t().contiguous(), 4))


@pytest.fixture(params=["torch", "ref", "avx2"])
def path(request, monkeypatch):
    """Every path of sliderquant.ops: the pure-torch one (SLIDERQUANT_ISA=torch) and both C tables."""
    if request.param == "torch":
        monkeypatch.setenv("SLIDERQUANT_ISA", "torch")
        yield "torch"
        return
    yield from c_backend(request.param)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_nonfinite_weights_raise(path, bad):
    w = torch.randn(16, 64)
    w[3, 17] = bad
    with pytest.raises(ValueError, match="NaN or Inf"):
        ops.fake_quant_weight(w, 4, group_size=32)
    x = torch.randn(5, 64)
    x[2, 63] = bad
    with pytest.raises(ValueError, match="NaN or Inf"):
        ops.fake_quant_act(x, 4)


@pytest.mark.parametrize("symmetric", [False, True])
def test_nonfinite_after_channel_scale_and_lora_raise(path, symmetric):
    """The raw weight is finite; what is quantized (W * alpha + B A, X / alpha) is not."""
    w = torch.randn(4, 16)
    with pytest.raises(ValueError, match="NaN or Inf"):       # 1e30 * 1e10 overflows float32
        ops.fake_quant_weight(w * 1e30, 4, symmetric=symmetric, channel_scale=torch.full((16,), 1e10))
    with pytest.raises(ValueError, match="NaN or Inf"):       # B A = 1e60 overflows
        ops.fake_quant_weight(w, 4, symmetric=symmetric, lora_a=torch.full((1, 16), 1e30),
                              lora_b=torch.full((4, 1), 1e30))
    with pytest.raises(ValueError, match="NaN or Inf"):       # 0 * inf in B A
        ops.fake_quant_weight(w, 4, symmetric=symmetric, lora_a=torch.full((1, 16), float("inf")),
                              lora_b=torch.zeros(4, 1))
    alpha = torch.ones(16)
    alpha[5] = 0.0                                            # x / 0
    with pytest.raises(ValueError, match="NaN or Inf"):
        ops.fake_quant_act(torch.randn(3, 16), 4, symmetric=symmetric, channel_scale=alpha)
    alpha[5] = float("nan")
    with pytest.raises(ValueError, match="NaN or Inf"):
        ops.fake_quant_act(torch.randn(3, 16), 4, symmetric=symmetric, channel_scale=alpha)


@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("which", ["lwc_upper", "lwc_lower"])
def test_nan_clipping_logits_raise(path, symmetric, which):
    # symmetric: max(|hi|, |lo|) with fmaxf in C would drop the NaN of one side
    u = torch.full((4, 1), 2.0)
    u[1, 0] = float("nan")
    with pytest.raises(ValueError, match="clipping logits"):
        ops.fake_quant_weight(torch.randn(4, 16), 4, symmetric=symmetric, **{which: u})


def test_infinite_clipping_logits_are_finite_factors(path):
    """sigmoid(+-inf) is exactly 1 or 0: a finite clipping factor, accepted on every path alike."""
    w = torch.randn(4, 16)
    u = torch.full((4, 1), float("inf"))
    l = torch.full((4, 1), -float("inf"))
    got = ops.fake_quant_weight(w, 4, lwc_upper=u, lwc_lower=l)
    want = reference.fake_quant_weight(w, 4, lwc_upper=u, lwc_lower=l)
    torch.testing.assert_close(got, want)


def test_gradients_do_not_depend_on_thread_count(isa):
    """Bitwise the same gradients with 1, 2 and 3 threads (fixed-slot reductions), weights and activations."""
    g = torch.Generator().manual_seed(11)
    rows, cols, group = 257, 384, 64
    w = torch.randn(rows, cols, generator=g)
    alpha = torch.rand(cols, generator=g) + 0.5
    a, b = torch.randn(4, cols, generator=g) * 0.1, torch.randn(rows, 4, generator=g) * 0.1
    u, l = torch.randn(rows, cols // group, generator=g) + 2, torch.randn(rows, cols // group, generator=g) + 2
    grad = torch.randn(rows, cols, generator=g)
    v = torch.rand(rows, cols, generator=g) - 0.5
    results = []
    for nt in (1, 2, 3):
        outs = [torch.empty_like(alpha), torch.empty_like(a), torch.empty_like(b), torch.empty_like(u),
                torch.empty_like(l), torch.empty_like(w)]
        C.wq_backward(w, alpha, a, b, u, l, grad, *outs, 3, group, cols, False, 1.0, nt)
        gv = torch.empty_like(w)                           # and with the rounding offset, LWC factors linear
        outs_v = [torch.empty_like(t) for t in outs]
        C.wq_backward(w, alpha, a, b, u, l, grad, *outs_v, 3, group, cols, False, 1.0, nt, v, gv, True)
        outs += outs_v + [gv]
        gx, galpha = torch.empty_like(w), torch.empty_like(alpha)
        C.aq_backward(w, alpha, grad, gx, galpha, 4, cols, False, nt)
        results.append(outs + [gx, galpha])
    for other in results[1:]:
        for x, y in zip(results[0], other):
            assert torch.equal(x, y)


def test_isa_torch_environment_variable_at_import():
    """SLIDERQUANT_ISA=torch before Python starts: the import works and the torch path is used."""
    code = ("import torch, sliderquant.ops as o; print(o.backend()); "
            "print(float(o.fake_quant_weight(torch.tensor([[-1.0, 0.0, 0.5, 1.0]]), 2)[0, 0]))")
    env = dict(os.environ, SLIDERQUANT_ISA="torch")
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    backend, value = res.stdout.split()
    assert backend == "torch" and float(value) == pytest.approx(-4 / 3)   # hand-computed in test_hand_computed_values


# ----------------------------------------------------------------------------- DLPack plumbing

class LegacyProducer:
    """An object speaking only pre-1.0 DLPack: __dlpack__ without max_version."""

    def __init__(self, t):
        self.t = t

    def __dlpack__(self, stream=None):
        return self.t.__dlpack__()


def test_legacy_and_numpy_producers(c_ext):
    w = torch.randn(6, 16)
    want = torch.empty_like(w)
    C.wq_forward(w, None, None, None, None, None, want, 3, 0, 16, False, 1.0, 1)
    out = torch.empty_like(w)
    C.wq_forward(LegacyProducer(w), None, None, None, None, None, LegacyProducer(out), 3, 0, 16, False, 1.0, 1)
    assert torch.equal(out, want)
    out_np = np.empty((6, 16), np.float32)
    C.wq_forward(w.numpy(), None, None, None, None, None, out_np, 3, 0, 16, False, 1.0, 1)
    assert torch.equal(torch.from_numpy(out_np), want)


def test_no_reference_or_memory_leaks(c_ext):
    w = torch.randn(64, 256)
    u = torch.zeros(64, 2, requires_grad=True)
    a = torch.randn(4, 256, requires_grad=True)
    b = torch.zeros(64, 4, requires_grad=True)
    out = torch.empty_like(w)
    refs = [sys.getrefcount(t) for t in (w, out)]

    def rss_kb():
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") // 1024

    def loop(n):
        for _ in range(n):
            C.wq_forward(w, None, None, None, None, None, out, 4, 128, 256, False, 1.0, 1)
            ops.fake_quant_weight(w, 4, group_size=128, lwc_upper=u, lwc_lower=u, lora_a=a, lora_b=b).sum().backward()
            try:
                C.wq_forward(w, None, None, None, None, None, w, 4, 128, 256, False, 1.0, 1)
            except ValueError:
                pass

    loop(200)
    before = rss_kb()
    loop(2000)
    grown = rss_kb() - before
    assert [sys.getrefcount(t) for t in (w, out)] == refs
    assert grown < 8 * 1024, f"RSS grew by {grown} kB over 2000 iterations"


def test_isa_environment_variable(c_ext):
    code = "import sliderquant.ops as o; print(o.backend())"
    env = dict(os.environ, SLIDERQUANT_ISA="ref")
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert res.stdout.strip() == "ref"
    env["SLIDERQUANT_ISA"] = "neon"
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert res.returncode != 0 and "unknown ISA" in res.stderr


def test_composes_with_torch_compile(c_ext):
    w = torch.randn(32, 128)
    u0 = torch.full((32, 2), 3.0)

    def f(w, u):
        return ops.fake_quant_weight(w, 3, group_size=64, lwc_upper=u, lwc_lower=u).square().sum()

    u1 = u0.clone().requires_grad_(True)
    u2 = u0.clone().requires_grad_(True)
    eager = f(w, u1)
    eager.backward()
    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)(w, u2)
    compiled.backward()
    torch.testing.assert_close(compiled, eager)
    torch.testing.assert_close(u2.grad, u1.grad)


@pytest.mark.parametrize("group", [None, 128])
def test_many_tied_extremes(isa, group):
    # integer-valued weights: every group has dozens of tied maxima and minima
    g = torch.Generator().manual_seed(3)
    w = torch.randint(-2, 3, (8, 1024), generator=g).float()
    n_groups = 1 if group is None else 1024 // group
    params = {"lwc_upper": torch.full((8, n_groups), 1.0), "lwc_lower": torch.full((8, n_groups), 1.0)}
    grad = torch.randn(8, 1024, generator=g)
    got = run_weight(ops.fake_quant_weight, w, params, grad, bits=3, group_size=group)
    want = run_weight(reference.fake_quant_weight, w, params, grad, bits=3, group_size=group)
    torch.testing.assert_close(got[0], want[0])
    torch.testing.assert_close(got[1], want[1], rtol=1e-4, atol=1e-5)
    for name in params:
        torch.testing.assert_close(got[2][name], want[2][name], rtol=1e-4, atol=1e-5)


# ---- out_dtype: an fp32 master weight fake-quantized straight to bf16 (bf16 autocast) ----------------

@pytest.mark.parametrize("w_dtype,out_dtype", [(torch.float32, torch.bfloat16), (torch.bfloat16, torch.float32)])
@pytest.mark.parametrize("group,rate,extras", [(None, 1.0, ("lora",)), (64, 0.5, ("alpha", "lora")), (32, 1.0, ())])
def test_out_dtype_equals_reference_then_cast(isa, w_dtype, out_dtype, group, rate, extras):
    """Oracle: the reference in the weight's dtype, then ``.to(out_dtype)``; the gradient flows back
    through that cast, so the kernel reading a grad of ``out_dtype`` must give the same parameter grads."""
    cols = 203 if group is None else 4 * group
    w, params, grad = make_tie_free_weight_case(11, cols, group, extras, w_dtype, 7, 3, False)
    grad = grad.to(out_dtype)
    kw = dict(bits=3, group_size=group, quant_rate=rate)
    out_c, gw_c, gp_c = run_weight(lambda w, **k: ops.fake_quant_weight(w, **k, out_dtype=out_dtype),
                                   w, params, grad, **kw)
    out_r, gw_r, gp_r = run_weight(lambda w, **k: reference.fake_quant_weight(w, **k).to(out_dtype),
                                   w, params, grad, **kw)
    assert out_c.dtype == out_dtype and gw_c.dtype == w_dtype
    # the bf16 -> fp32 oracle was rounded to bf16 in between; the kernel's fp32 result was not
    assert_values_match(out_c, out_r, row_scale(w, params, out_r), what="W_hat", bf16=True)
    assert_grads_match(gw_c, gw_r, what="dW", bf16=True)
    for name in params:
        assert_grads_match(gp_c[name], gp_r[name], what=f"d{name}", bf16=True)


@pytest.mark.parametrize("rate", [1.0, 0.5])   # 0.5: the unquantized half is rounded to bf16 as well
def test_out_dtype_bf16_is_the_rounded_fp32_result(isa, rate):
    w, params, _ = make_weight_case(16, 256, 64, ("lora",), torch.float32, seed=3)
    w[3, 200:208] = torch.tensor([1 + 2 ** -8, 1 + 3 * 2 ** -8, -(1 + 2 ** -8), 3e38, 1e-38, -0.0, 2 ** -9, 1e-3])
    full = ops.fake_quant_weight(w, 2, 64, **params, quant_rate=rate)
    direct = ops.fake_quant_weight(w, 2, 64, **params, quant_rate=rate, out_dtype=torch.bfloat16)
    assert torch.equal(direct, full.to(torch.bfloat16))   # round half to even, as Tensor.to


def test_out_dtype_errors(c_ext):
    w = torch.randn(4, 8)
    with pytest.raises(TypeError, match="out_dtype"):
        ops.fake_quant_weight(w, 4, out_dtype=torch.float16)
    with pytest.raises(TypeError, match="out_dtype"):
        ops.fake_quant_weight(w, 4, out_dtype="bf16")
    # the C entry point accepts an out of either data dtype, but no other
    C.wq_forward(w, None, None, None, None, None, torch.empty(4, 8, dtype=torch.bfloat16), 4, 0, 8, False, 1.0, 1)
    with pytest.raises(TypeError, match="float32 or bfloat16"):
        C.wq_forward(w, None, None, None, None, None, torch.empty(4, 8, dtype=torch.float16), 4, 0, 8, False, 1.0, 1)
    with pytest.raises(ValueError, match="shape"):
        C.wq_forward(w, None, None, None, None, None, torch.empty(4, 9, dtype=torch.bfloat16), 4, 0, 8, False, 1.0, 1)


@pytest.mark.skipif(not os.path.exists("/proc/cpuinfo"), reason="needs Linux /proc/cpuinfo")
def test_native_bf16_matches_the_kernel_cpu_flags(c_ext):
    """Independent oracle: the flags the Linux kernel reports (it also hides what the OS does not enable)."""
    flags = set()
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    expected = "avx512f" in flags and ("amx_bf16" in flags or "avx512_bf16" in flags)
    assert C.native_bf16() == expected
    assert ops.native_bf16() == expected


# ---- the learnable rounding offset V: codes round(W_t / s + V) (docs/algorithm.md section 11) ------------

def make_round_offset(w, params, bits, group, symmetric, seed, lwc_param="sigmoid"):
    """V uniform in [-0.5, 0.5] (many codes move, some onto the clamp), then nudged so that no
    ``W_t / s + V`` of the oracle lies within DELTA of a rounding tie: V is free, so it is V that moves
    (extremes included: V does not change the range)."""
    g = torch.Generator().manual_seed(seed)
    v = torch.rand(w.shape, generator=g) - 0.5
    d = delta(bits)
    grouped, s, _, _ = weight_oracle_grid(w, params, bits, group, symmetric, lwc_param)
    for _ in range(10):
        t = grouped / s + v.reshape(grouped.shape)
        near = tie_distance(t) < d
        if not near.any():
            return v
        away = torch.where(t - torch.floor(t) < 0.5, -1.0, 1.0)
        v = torch.where(near, v.reshape(grouped.shape) + 4 * d * away, v.reshape(grouped.shape)).reshape(w.shape)
    raise AssertionError("could not move V away from the rounding ties")


V_CASES = [  # (bits, symmetric, group, rate, extras, w dtype, out dtype)
    (3, False, 64, 1.0, (), torch.float32, torch.float32),
    (3, False, 64, 0.5, ("lora",), torch.float32, torch.float32),       # n_quant < cols: V of the suffix ignored
    (2, False, None, 1.0, ("alpha", "lora"), torch.float32, torch.float32),
    (2, False, None, 0.5, (), torch.bfloat16, torch.bfloat16),          # per channel, prefix of columns
    (4, True, 32, 1.0, ("lora",), torch.float32, torch.float32),
    (3, True, 20, 0.5, ("alpha",), torch.bfloat16, torch.bfloat16),     # groups not a multiple of 8
    (3, False, 64, 1.0, ("lora",), torch.float32, torch.bfloat16),      # fp32 master, bf16 result (autocast)
    (8, False, 128, 1.0, (), torch.float32, torch.float32),
]


@pytest.mark.parametrize("bits,symmetric,group,rate,extras,w_dtype,out_dtype", V_CASES)
def test_round_offset_matches_reference(isa, bits, symmetric, group, rate, extras, w_dtype, out_dtype):
    """C forward and backward with V against autograd on the reference (oracle: the reference in the
    weight's dtype, then ``.to(out_dtype)``); dL/dV = dL/dW_hat * s inside the code range, else 0."""
    cols = 203 if group is None else 5 * group
    seed = seed_of("round_offset", bits, symmetric, group, rate, extras, str(w_dtype), str(out_dtype))
    w, params, grad = make_tie_free_weight_case(13, cols, group, extras, w_dtype, seed, bits, symmetric)
    params["round_offset"] = make_round_offset(w, params, bits, group, symmetric, seed)
    grad = grad.to(out_dtype)
    kw = dict(bits=bits, group_size=group, symmetric=symmetric, quant_rate=rate)
    out_c, gw_c, gp_c = run_weight(lambda w, **k: ops.fake_quant_weight(w, **k, out_dtype=out_dtype),
                                   w, params, grad, **kw)
    out_r, gw_r, gp_r = run_weight(lambda w, **k: reference.fake_quant_weight(w, **k).to(out_dtype),
                                   w, params, grad, **kw)
    mixed = w_dtype != out_dtype
    assert out_c.dtype == out_dtype
    assert_values_match(out_c, out_r, row_scale(w, params, out_r), what="W_hat", bf16=mixed)
    assert_grads_match(gw_c, gw_r, what="dW", bf16=mixed)
    for name in params:
        assert_grads_match(gp_c[name], gp_r[name], what=f"d{name}", bf16=mixed)
    n_quant = reference.quantized_prefix(cols, rate, group)
    assert torch.equal(gp_c["round_offset"][:, n_quant:], torch.zeros(13, cols - n_quant))
    # V really moved codes (else this would only test V = 0)
    with torch.no_grad():
        plain = ops.fake_quant_weight(w, **{**kw, **{k: v for k, v in params.items() if k != "round_offset"}})
    assert not torch.equal(plain.to(out_dtype), out_c)


@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_zero_round_offset_is_plain_rounding_bit_for_bit(isa, symmetric, dtype):
    """V = 0 gives today's result and gradients exactly (value and bits), with LoRA, grouped and a prefix."""
    w, params, grad = make_weight_case(37, 320, 64, ("alpha", "lora"), dtype, seed_of("v0", symmetric, str(dtype)))
    kw = dict(bits=3, group_size=64, symmetric=symmetric, quant_rate=0.6)
    out_0, gw_0, gp_0 = run_weight(ops.fake_quant_weight, w, params, grad, **kw)
    out_v, gw_v, gp_v = run_weight(ops.fake_quant_weight, w, {**params, "round_offset": torch.zeros(37, 320)},
                                   grad, **kw)

    def bits_of(t):
        return t.contiguous().view(torch.int16 if t.dtype == torch.bfloat16 else torch.int32)

    assert torch.equal(bits_of(out_0), bits_of(out_v))
    assert torch.equal(bits_of(gw_0), bits_of(gw_v))
    for name in params:
        assert torch.equal(bits_of(gp_0[name]), bits_of(gp_v[name])), name


def test_round_offset_scalar_and_avx2_agree_exactly(c_ext):
    """Without LoRA the two tables compute the same IEEE operations per element: W_hat and dV are equal."""
    if not C.avx2_supported():
        pytest.skip("CPU without AVX2")
    g = torch.Generator().manual_seed(5)
    w = torch.randn(64, 1000, generator=g)              # 1000: per-channel rows with a tail of 8
    u = torch.randn(64, 1, generator=g) + 2
    v = torch.rand(64, 1000, generator=g) - 0.5
    grad = torch.randn(64, 1000, generator=g)
    results = []
    for name in ("ref", "avx2"):
        C.set_backend(name)
        results.append(run_weight(ops.fake_quant_weight, w, {"lwc_upper": u, "lwc_lower": u, "round_offset": v},
                                  grad, bits=3, quant_rate=0.7))
    C.set_backend("auto")
    (o_r, _, gp_r), (o_a, gw_a, gp_a) = results
    assert torch.equal(o_r, o_a)
    assert torch.equal(gp_r["round_offset"], gp_a["round_offset"])
    assert_grads_match(gp_a["lwc_upper"], gp_r["lwc_upper"], what="du")


def test_round_offset_hand_computed(isa):
    # 2-bit asymmetric, no clipping: hi = 1, lo = -1, s = 2/3, z = 2; W / s = [-1.5, 0, 0.75, 1.5].
    # V = [0.4, -0.4, -0.3, 0.2]: W / s + V = [-1.1, -0.4, 0.45, 1.7] -> round [-1, 0, 0, 2] + 2 = [1, 2, 2, 4]
    # -> clamp [1, 2, 2, 3] -> (q - z) s = [-2/3, 0, 0, 2/3].  dV = go * s inside, 0 for the clamped last.
    w = torch.tensor([[-1.0, 0.0, 0.5, 1.0]])
    v = torch.tensor([[0.4, -0.4, -0.3, 0.2]], requires_grad=True)
    out = ops.fake_quant_weight(w, 2, round_offset=v)
    torch.testing.assert_close(out, torch.tensor([[-2 / 3, 0.0, 0.0, 2 / 3]]))
    out.backward(torch.tensor([[1.0, 2.0, 3.0, 4.0]]))
    torch.testing.assert_close(v.grad, torch.tensor([[2 / 3, 4 / 3, 2.0, 0.0]]))


def test_round_offset_bad_input(path):
    """Wrong shape, dtype or a non-finite V in the quantized columns: a clear exception on every path;
    NaN in the unquantized suffix is ignored like the rest of V there."""
    w = torch.randn(4, 128)
    with pytest.raises(ValueError, match="round_offset must have the shape"):
        ops.fake_quant_weight(w, 4, 64, round_offset=torch.zeros(128, 4))
    with pytest.raises(ValueError, match="round_offset must have the shape"):
        ops.fake_quant_weight(w, 4, 64, round_offset=torch.zeros(4 * 128))
    with pytest.raises(TypeError, match="round_offset must be a floating-point"):
        ops.fake_quant_weight(w, 4, 64, round_offset=torch.zeros(4, 128, dtype=torch.int32))
    for bad in (float("nan"), float("inf")):
        v = torch.zeros(4, 128)
        v[2, 5] = bad
        with pytest.raises(ValueError, match="rounding offset"):
            ops.fake_quant_weight(w, 4, 64, round_offset=v)
        v = torch.zeros(4, 128)
        v[2, 100] = bad                                   # beyond the quantized prefix (rate 0.5: 64 columns)
        torch.testing.assert_close(ops.fake_quant_weight(w, 4, 64, round_offset=v, quant_rate=0.5),
                                   ops.fake_quant_weight(w, 4, 64, quant_rate=0.5))


def test_round_offset_binding_checks(c_ext):
    w = torch.randn(4, 128)
    out = torch.empty_like(w)
    args = (w, None, None, None, None, None, out, 4, 64, 128, False, 1.0, 1)
    with pytest.raises(ValueError, match="'round_v' must have shape"):
        C.wq_forward(*args, torch.zeros(4, 127), False)
    with pytest.raises(TypeError, match="'round_v' must be float32"):
        C.wq_forward(*args, torch.zeros(4, 128, dtype=torch.bfloat16), False)
    with pytest.raises(TypeError, match="13 or 15 positional arguments"):
        C.wq_forward(*args, None)
    with pytest.raises(ValueError, match="overlaps"):
        C.wq_forward(*args, out, False)
    nan = torch.zeros(4, 128)
    nan[0, 0] = float("nan")
    with pytest.raises(ValueError, match="rounding offset"):
        C.wq_forward(*args, nan, False)
    grad = torch.randn(4, 128)
    bwd = (w, None, None, None, None, None, grad, None, None, None, None, None, torch.empty_like(w), 4, 64, 128,
           False, 1.0, 1)
    with pytest.raises(ValueError, match="'grad_round_v' was requested but its input is absent"):
        C.wq_backward(*bwd, None, torch.empty_like(w), False)
    with pytest.raises(ValueError, match="rounding offset"):
        C.wq_backward(*bwd, nan, torch.empty_like(w), False)
    with pytest.raises(TypeError, match="19 or 22 positional arguments"):
        C.wq_backward(*bwd, None, None)
    for flag in (1, None, "linear"):
        with pytest.raises(TypeError, match="'lwc_linear' must be a bool"):
            C.wq_forward(*args, None, flag)
    C.wq_forward(*args, None, True)                        # the rounding offset may be None


# ---- LWC factors as parameters (lwc_param "linear", docs/algorithm.md section 11) --------------------------

LINEAR_CASES = [  # (bits, symmetric, group, rate, extras, w dtype, out dtype, with V)
    (3, False, 64, 1.0, (), torch.float32, torch.float32, False),
    (2, False, None, 0.5, ("lora",), torch.float32, torch.float32, False),
    (4, True, 32, 1.0, ("alpha",), torch.bfloat16, torch.bfloat16, False),
    (3, True, 20, 0.5, (), torch.float32, torch.float32, True),
    (3, False, 64, 0.5, ("lora",), torch.float32, torch.bfloat16, True),
    (8, False, None, 1.0, ("alpha", "lora"), torch.float32, torch.float32, True),
]


@pytest.mark.parametrize("bits,symmetric,group,rate,extras,w_dtype,out_dtype,with_v", LINEAR_CASES)
def test_linear_lwc_matches_reference(isa, bits, symmetric, group, rate, extras, w_dtype, out_dtype, with_v):
    """hi = u * max, lo = l * min: values and gradients (dL/du = dL/dhi * max, no sigmoid factor) against
    autograd on the reference, alone and with the rounding offset."""
    cols = 203 if group is None else 5 * group
    seed = seed_of("linear", bits, symmetric, group, rate, extras, str(w_dtype), str(out_dtype), with_v)
    w, params, grad = make_tie_free_weight_case(13, cols, group, extras, w_dtype, seed, bits, symmetric, "linear")
    if with_v:
        params["round_offset"] = make_round_offset(w, params, bits, group, symmetric, seed, "linear")
    grad = grad.to(out_dtype)
    kw = dict(bits=bits, group_size=group, symmetric=symmetric, quant_rate=rate, lwc_param="linear")
    out_c, gw_c, gp_c = run_weight(lambda w, **k: ops.fake_quant_weight(w, **k, out_dtype=out_dtype),
                                   w, params, grad, **kw)
    out_r, gw_r, gp_r = run_weight(lambda w, **k: reference.fake_quant_weight(w, **k).to(out_dtype),
                                   w, params, grad, **kw)
    mixed = w_dtype != out_dtype
    assert_values_match(out_c, out_r, row_scale(w, params, out_r), what="W_hat", bf16=mixed)
    assert_grads_match(gw_c, gw_r, what="dW", bf16=mixed)
    for name in params:
        assert_grads_match(gp_c[name], gp_r[name], what=f"d{name}", bf16=mixed)


def test_linear_lwc_equals_sigmoid_of_the_logits(isa):
    """A factor f in linear mode is the logit logit(f) in sigmoid mode: same grid, and the gradient
    differs by exactly the sigmoid's derivative f (1 - f)."""
    g = torch.Generator().manual_seed(21)
    w = torch.randn(16, 256, generator=g)
    logits = torch.randn(16, 4, generator=g) + 2
    grad = torch.randn(16, 256, generator=g)
    factors = torch.sigmoid(logits)
    lin = run_weight(ops.fake_quant_weight, w, {"lwc_upper": factors, "lwc_lower": factors}, grad, bits=3,
                     group_size=64, lwc_param="linear")
    sig = run_weight(ops.fake_quant_weight, w, {"lwc_upper": logits, "lwc_lower": logits}, grad, bits=3,
                     group_size=64)
    torch.testing.assert_close(lin[0], sig[0])
    torch.testing.assert_close(lin[2]["lwc_upper"] * factors * (1 - factors), sig[2]["lwc_upper"])


def test_linear_lwc_hand_computed(isa):
    # factors 0.5: hi = 0.5, lo = -0.5, s = 1/3, z = 2 (as sigmoid(0) in test_hand_computed_values)
    w = torch.tensor([[-1.0, 0.0, 0.5, 1.0]])
    half = torch.full((1, 1), 0.5)
    out = ops.fake_quant_weight(w, 2, lwc_upper=half, lwc_lower=half, lwc_param="linear")
    torch.testing.assert_close(out, torch.tensor([[-2 / 3, 0.0, 1 / 3, 1 / 3]]))


def test_linear_lwc_bad_input(path):
    w = torch.randn(4, 16)
    with pytest.raises(ValueError, match="lwc_param must be 'sigmoid' or 'linear'"):
        ops.fake_quant_weight(w, 4, lwc_param="tanh")
    for bad in (float("nan"), float("inf")):                  # an infinite factor is an infinite range
        u = torch.full((4, 1), 0.9)
        u[2, 0] = bad
        with pytest.raises(ValueError, match="clipping logits"):
            ops.fake_quant_weight(w, 4, lwc_upper=u, lwc_param="linear")
