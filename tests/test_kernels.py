"""C kernels (scalar reference and AVX2) against the pure-torch reference, values and gradients.

Tolerance.  The C kernels evaluate the same IEEE operations as the reference (true division,
round-half-to-even, the same clamp order), so without LoRA the forward values agree to float32
rounding of the final multiply.  Two things can still differ: (1) the LoRA product ``B @ A`` is
summed in another order (and with FMA) than torch's GEMM, so ``W_t`` may differ by an ulp, and
(2) gradient reductions (over a group, over rows) are summed in another order.  An ulp in ``W_t``
only matters when ``W_t / s`` lies within an ulp of a rounding tie: then the code differs by one
step and the output by one scale ``s``.  So every comparison allows a tiny fraction of elements
(``max_frac``, 1 %) to be off, and requires all others to match to ``rtol``/``atol`` scaled by the
largest magnitude of the reference (1e-5 for values, 1e-4 for gradients, 1e-2 for bfloat16 data
whose own ulp is 2^-8).
"""

import itertools
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from sliderquant import ops, reference

C = ops._C
pytestmark = pytest.mark.skipif(C is None, reason="C extension not built")
ISAS = ["ref"] + (["avx2"] if C is not None and C.avx2_supported() else [])


@pytest.fixture(params=ISAS)
def isa(request):
    previous = C.backend()
    C.set_backend(request.param)
    yield request.param
    C.set_backend(previous)


def assert_mostly_close(actual, expected, rtol, max_frac=0.01, what=""):
    actual, expected = actual.double(), expected.double()
    scale = expected.abs().max().item() or 1.0
    bad = (actual - expected).abs() > rtol * scale + rtol * expected.abs()
    frac = bad.float().mean().item()
    assert frac <= max_frac, f"{what}: {frac:.2%} of elements differ (max err {(actual - expected).abs().max():.3g}, " \
                             f"scale {scale:.3g})"


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


def run_weight(fn, w, params, grad, **kw):
    w = w.clone().requires_grad_(True)
    params = {k: v.clone().requires_grad_(True) for k, v in params.items()}
    out = fn(w, **params, **kw)
    out.backward(grad)
    return out.detach(), w.grad, {k: v.grad for k, v in params.items()}


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
    seed = hash((bits, symmetric, group, rate, extras, str(dtype))) % 10_000
    w, params, grad = make_weight_case(13, cols, group, extras, dtype, seed)
    kw = dict(bits=bits, group_size=group, symmetric=symmetric, quant_rate=rate)
    out_c, gw_c, gp_c = run_weight(ops.fake_quant_weight, w, params, grad, **kw)
    out_r, gw_r, gp_r = run_weight(reference.fake_quant_weight, w, params, grad, **kw)
    assert out_c.dtype == dtype and out_c.shape == w.shape
    tol_data = 1e-2 if dtype == torch.bfloat16 else 1e-5
    tol_grad = 1e-2 if dtype == torch.bfloat16 else 1e-4
    assert_mostly_close(out_c, out_r, tol_data, what="W_hat")
    assert_mostly_close(gw_c, gw_r, tol_grad, what="dW")
    for name in params:
        assert_mostly_close(gp_c[name], gp_r[name], tol_grad, what=f"d{name}")


@pytest.mark.parametrize("bits,symmetric,rate,with_alpha,dtype", list(itertools.product(
    [2, 3, 4, 8], [False, True], [1.0, 0.5], [False, True], [torch.float32, torch.bfloat16])))
def test_act_fake_quant_matches_reference(isa, bits, symmetric, rate, with_alpha, dtype):
    g = torch.Generator().manual_seed(bits * 10 + symmetric)
    x = (torch.randn(3, 7, 101, generator=g) * 2).to(dtype)  # 101: tail not a multiple of 8
    alpha = (torch.rand(101, generator=g) + 0.5) if with_alpha else None
    grad = torch.randn(3, 7, 101, generator=g).to(dtype)
    results = []
    for fn in (ops.fake_quant_act, reference.fake_quant_act):
        xx = x.clone().requires_grad_(True)
        aa = alpha.clone().requires_grad_(True) if alpha is not None else None
        out = fn(xx, bits, symmetric=symmetric, channel_scale=aa, quant_rate=rate)
        out.backward(grad)
        results.append((out.detach(), xx.grad, aa.grad if aa is not None else None))
    (o_c, gx_c, ga_c), (o_r, gx_r, ga_r) = results
    tol = 1e-2 if dtype == torch.bfloat16 else 1e-5
    assert_mostly_close(o_c, o_r, tol, what="X_hat")
    assert_mostly_close(gx_c, gx_r, 10 * tol, what="dX")
    if with_alpha:
        assert_mostly_close(ga_c, ga_r, 1e-4, what="dalpha")


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


def test_scalar_and_avx2_agree_exactly_without_lora():
    if "avx2" not in ISAS:
        pytest.skip("CPU without AVX2")
    w = torch.randn(64, 4096)
    u = torch.randn(64, 32)
    outs = []
    for name in ("ref", "avx2"):
        C.set_backend(name)
        outs.append(ops.fake_quant_weight(w, 4, group_size=128, lwc_upper=u, lwc_lower=u))
    C.set_backend("auto")
    assert torch.equal(outs[0], outs[1])


def test_thread_count_does_not_change_forward():
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
    w = torch.ones(4, 128)
    with pytest.raises(ValueError, match="shape"):
        C.wq_forward(w, None, None, None, torch.zeros(4, 3), None, torch.empty(4, 128), 4, 64, 128, False, 1.0, 1)
    with pytest.raises(ValueError, match="n_quant"):
        C.wq_forward(w, None, None, None, None, None, torch.empty(4, 128), 4, 64, 100, False, 1.0, 1)
    with pytest.raises(ValueError, match="shape"):
        C.wq_forward(w, None, None, None, None, None, torch.empty(4, 127), 4, 0, 128, False, 1.0, 1)
    with pytest.raises(TypeError, match="positional arguments"):
        C.wq_forward(w)


def test_device_errors():
    meta = torch.empty(4, 8, device="meta")
    with pytest.raises(ValueError, match="is on meta"):
        ops.fake_quant_weight(torch.ones(4, 8), 4, channel_scale=torch.ones(8, device="meta"))
    with pytest.raises(TypeError, match="DLPack"):
        C.aq_forward(meta, None, meta, 4, 8, False, 1)


def test_outputs_must_be_writable_fresh_and_contiguous():
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


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_nonfinite_weights_raise(isa, bad):
    w = torch.randn(16, 64)
    w[3, 17] = bad
    with pytest.raises(ValueError, match="NaN or Inf"):
        ops.fake_quant_weight(w, 4, group_size=32)
    x = torch.randn(5, 64)
    x[2, 63] = bad
    with pytest.raises(ValueError, match="NaN or Inf"):
        ops.fake_quant_act(x, 4)
    # the pure-torch path (CUDA, no extension) behaves the same way
    os.environ["SLIDERQUANT_ISA"] = "torch"
    try:
        with pytest.raises(ValueError, match="NaN or Inf"):
            ops.fake_quant_weight(w, 4, group_size=32)
    finally:
        del os.environ["SLIDERQUANT_ISA"]


def test_nonfinite_clipping_logits_raise(isa):
    u = torch.zeros(4, 1)
    u[1, 0] = float("nan")
    with pytest.raises(ValueError, match="clipping logits"):
        ops.fake_quant_weight(torch.randn(4, 16), 4, lwc_upper=u)


# ----------------------------------------------------------------------------- DLPack plumbing

class LegacyProducer:
    """An object speaking only pre-1.0 DLPack: __dlpack__ without max_version."""

    def __init__(self, t):
        self.t = t

    def __dlpack__(self, stream=None):
        return self.t.__dlpack__()


def test_legacy_and_numpy_producers():
    w = torch.randn(6, 16)
    want = torch.empty_like(w)
    C.wq_forward(w, None, None, None, None, None, want, 3, 0, 16, False, 1.0, 1)
    out = torch.empty_like(w)
    C.wq_forward(LegacyProducer(w), None, None, None, None, None, LegacyProducer(out), 3, 0, 16, False, 1.0, 1)
    assert torch.equal(out, want)
    out_np = np.empty((6, 16), np.float32)
    C.wq_forward(w.numpy(), None, None, None, None, None, out_np, 3, 0, 16, False, 1.0, 1)
    assert torch.equal(torch.from_numpy(out_np), want)


def test_no_reference_or_memory_leaks():
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


def test_isa_environment_variable():
    code = "import sliderquant.ops as o; print(o.backend())"
    env = dict(os.environ, SLIDERQUANT_ISA="ref")
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert res.stdout.strip() == "ref"
    env["SLIDERQUANT_ISA"] = "neon"
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert res.returncode != 0 and "unknown ISA" in res.stderr


def test_composes_with_torch_compile():
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
    w, params, grad = make_weight_case(11, cols, group, extras, w_dtype, seed=7)
    grad = grad.to(out_dtype)
    kw = dict(bits=3, group_size=group, quant_rate=rate)
    out_c, gw_c, gp_c = run_weight(lambda w, **k: ops.fake_quant_weight(w, **k, out_dtype=out_dtype),
                                   w, params, grad, **kw)
    out_r, gw_r, gp_r = run_weight(lambda w, **k: reference.fake_quant_weight(w, **k).to(out_dtype),
                                   w, params, grad, **kw)
    assert out_c.dtype == out_dtype and gw_c.dtype == w_dtype
    tol = 1e-2 if torch.bfloat16 in (w_dtype, out_dtype) else 1e-5
    assert_mostly_close(out_c, out_r, tol, what="W_hat")
    assert_mostly_close(gw_c, gw_r, tol, what="dW")
    for name in params:
        assert_mostly_close(gp_c[name], gp_r[name], tol, what=f"d{name}")


@pytest.mark.parametrize("rate", [1.0, 0.5])   # 0.5: the unquantized half is rounded to bf16 as well
def test_out_dtype_bf16_is_the_rounded_fp32_result(isa, rate):
    w, params, _ = make_weight_case(16, 256, 64, ("lora",), torch.float32, seed=3)
    w[3, 200:208] = torch.tensor([1 + 2 ** -8, 1 + 3 * 2 ** -8, -(1 + 2 ** -8), 3e38, 1e-38, -0.0, 2 ** -9, 1e-3])
    full = ops.fake_quant_weight(w, 2, 64, **params, quant_rate=rate)
    direct = ops.fake_quant_weight(w, 2, 64, **params, quant_rate=rate, out_dtype=torch.bfloat16)
    assert torch.equal(direct, full.to(torch.bfloat16))   # round half to even, as Tensor.to


def test_out_dtype_errors():
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
def test_native_bf16_matches_the_kernel_cpu_flags():
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
