"""Randomized bad input against the C entry points of ``sliderquant._C``: every call must raise a clean
``TypeError`` or ``ValueError`` (never crash, never run the kernel on bad memory).

A fixed-seed generator starts from a valid argument list of one of the four entry points and breaks
it in one of many ways: wrong dtypes, strides, shapes, bits, group sizes, thread counts, NaN/Inf,
zero-size tensors, read-only or aliased outputs, missing arguments, and hand-made DLPack capsules
that lie (element counts that overflow 64 bits, negative or absurd dimensions, NULL shape or data,
foreign devices, vector lanes, a future DLPack major version, wrong capsule names).  The capsules
are built with ctypes so that a deleter counts how often the binding releases what it took: every
capsule it takes (renamed ``used_*``) must be released exactly once.

tests/sanitize.sh runs this file as a script under AddressSanitizer and UndefinedBehaviorSanitizer,
where any out-of-bounds access or undefined behaviour on these paths is a failure; the script prints
the number of calls.
"""

from __future__ import annotations

import ctypes
import random
import sys

import numpy as np

SEED = 20260
N_CALLS = 400
EXPECTED = (TypeError, ValueError)


# ----------------------------------------------------------------------------- hand-made DLPack capsules

class _Device(ctypes.Structure):
    _fields_ = [("device_type", ctypes.c_int32), ("device_id", ctypes.c_int32)]


class _DType(ctypes.Structure):
    _fields_ = [("code", ctypes.c_uint8), ("bits", ctypes.c_uint8), ("lanes", ctypes.c_uint16)]


class _Tensor(ctypes.Structure):
    _fields_ = [("data", ctypes.c_void_p), ("device", _Device), ("ndim", ctypes.c_int32), ("dtype", _DType),
                ("shape", ctypes.POINTER(ctypes.c_int64)), ("strides", ctypes.POINTER(ctypes.c_int64)),
                ("byte_offset", ctypes.c_uint64)]


_DELETER = ctypes.CFUNCTYPE(None, ctypes.c_void_p)


class _Managed(ctypes.Structure):
    _fields_ = [("dl_tensor", _Tensor), ("manager_ctx", ctypes.c_void_p), ("deleter", _DELETER)]


class _Version(ctypes.Structure):
    _fields_ = [("major", ctypes.c_uint32), ("minor", ctypes.c_uint32)]


class _Versioned(ctypes.Structure):
    _fields_ = [("version", _Version), ("manager_ctx", ctypes.c_void_p), ("deleter", _DELETER),
                ("flags", ctypes.c_uint64), ("dl_tensor", _Tensor)]


assert ctypes.sizeof(_Tensor) == 48 and _Versioned.dl_tensor.offset == 32   # the layouts of csrc/sq_dlpack.h

_capsule_new = ctypes.pythonapi.PyCapsule_New
_capsule_new.restype = ctypes.py_object
_capsule_new.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_void_p]
_capsule_valid = ctypes.pythonapi.PyCapsule_IsValid
_capsule_valid.restype = ctypes.c_int
_capsule_valid.argtypes = [ctypes.py_object, ctypes.c_char_p]

RELEASED = [0]


@_DELETER
def _count_release(_self):
    RELEASED[0] += 1


_NAMES = {"legacy": b"dltensor", "versioned": b"dltensor_versioned", "bogus": b"not_a_dltensor"}


class FakeProducer:
    """An object whose ``__dlpack__`` returns a capsule built by hand (kept alive by this object)."""

    def __init__(self, shape, code=2, bits=32, lanes=1, device=1, data=True, shape_ptr=True, ndim=None,
                 kind="legacy", major=1):
        self.buffer = (ctypes.c_float * 64)()
        self.shape = (ctypes.c_int64 * max(1, len(shape)))(*shape)
        t = _Tensor(data=ctypes.addressof(self.buffer) if data else None, device=_Device(device, 0),
                    ndim=len(shape) if ndim is None else ndim, dtype=_DType(code, bits, lanes),
                    shape=self.shape if shape_ptr else None, strides=None, byte_offset=0)
        if kind == "versioned":
            self.managed = _Versioned(version=_Version(major, 0), deleter=_count_release, flags=0, dl_tensor=t)
        else:
            self.managed = _Managed(dl_tensor=t, deleter=_count_release)
        self.name = _NAMES[kind]
        self.capsule = None

    def __dlpack__(self, stream=None, max_version=None):
        self.capsule = _capsule_new(ctypes.addressof(self.managed), self.name, None)
        return self.capsule

    def taken(self) -> bool:
        return self.capsule is not None and bool(_capsule_valid(self.capsule, b"used_" + self.name))


class NotACapsule:
    def __dlpack__(self, stream=None, max_version=None):
        return 42


class RaisingProducer:
    def __dlpack__(self, stream=None, max_version=None):
        raise RuntimeError("this producer cannot export")


BOGUS = [
    lambda: FakeProducer([1 << 40, 1 << 40]),                 # element count overflows int64
    lambda: FakeProducer([1 << 31, 1 << 31]),                 # element count fits, bytes overflow
    lambda: FakeProducer([1 << 40, 0, 1 << 40]),              # empty, but the prefix product overflows
    lambda: FakeProducer([4, -8]),                            # negative dimension
    lambda: FakeProducer([4, 8], ndim=-1),                    # negative ndim
    lambda: FakeProducer([4, 8], ndim=1000),                  # absurd ndim
    lambda: FakeProducer([4, 8], shape_ptr=False),            # NULL shape
    lambda: FakeProducer([4, 8], data=False),                 # NULL data, non-empty
    lambda: FakeProducer([4, 8], device=2),                   # CUDA
    lambda: FakeProducer([4, 8], lanes=4),                    # vector dtype
    lambda: FakeProducer([4, 8], code=5, bits=64),            # complex64
    lambda: FakeProducer([4, 8], code=2, bits=0),             # float of 0 bits
    lambda: FakeProducer([4, 8], kind="versioned", major=2),  # a future major version: not taken
    lambda: FakeProducer([4, 8], kind="bogus"),               # wrong capsule name
    lambda: FakeProducer([1 << 40, 1 << 40], kind="versioned"),
    NotACapsule,
    RaisingProducer,
    lambda: [[1.0, 2.0]],                                     # no __dlpack__ at all
]


# ----------------------------------------------------------------------------- valid calls and breakers

ROWS, COLS, GROUP, RANK = 6, 32, 16, 2


def _f32(*shape, rng):
    return rng.standard_normal(shape).astype(np.float32)


def valid_call(kind: str, rng):
    """(function name, argument list, indices of data inputs, indices of outputs, index of bits)."""
    w = _f32(ROWS, COLS, rng=rng)
    alpha = (rng.random(COLS) + 0.5).astype(np.float32)
    a, b = _f32(RANK, COLS, rng=rng) * 0.1, _f32(ROWS, RANK, rng=rng) * 0.1
    u, l = _f32(ROWS, COLS // GROUP, rng=rng) + 2, _f32(ROWS, COLS // GROUP, rng=rng) + 2
    # the optional trailing arguments: the rounding offset V (and dV), the LWC-factor flag
    with_v = kind.startswith("wq") and rng.random() < 0.5
    v = (rng.random((ROWS, COLS)) - 0.5).astype(np.float32)
    linear = bool(rng.random() < 0.5)
    if kind == "wq_forward":
        args = [w, alpha, a, b, u, l, np.empty_like(w), 3, GROUP, COLS, False, 1.0, 2]
        return args + [v, linear] * with_v, [0, 1, 2, 3, 4, 5] + [13] * with_v, [6], 7
    if kind == "wq_backward":
        outs = [np.empty_like(alpha), np.empty_like(a), np.empty_like(b), np.empty_like(u), np.empty_like(l),
                np.empty_like(w)]
        args = [w, alpha, a, b, u, l, _f32(ROWS, COLS, rng=rng), *outs, 3, GROUP, COLS, False, 1.0, 2]
        return args + [v, np.empty_like(w), linear] * with_v, [0, 1, 2, 3, 4, 5] + [19] * with_v, \
            list(range(7, 13)) + [20] * with_v, 13
    x = _f32(ROWS, COLS, rng=rng)
    if kind == "aq_forward":
        return [x, alpha, np.empty_like(x), 4, COLS, False, 2], [0, 1], [2], 3
    return [x, alpha, _f32(ROWS, COLS, rng=rng), np.empty_like(x), np.empty_like(alpha), 4, COLS, False, 2], \
        [0, 1], [3, 4], 5


def _tensor_slots(args):
    return [k for k, v in enumerate(args) if isinstance(v, np.ndarray)]


def break_call(args, inputs, outputs, bits_at, rng, pyrng):
    """Breaks the argument list in place in one way; returns a name for the failure message."""
    how = pyrng.choice(["dtype", "strides", "shape", "zero_size", "bits", "scalar", "nonfinite", "readonly",
                        "alias", "nargs", "none", "bogus"])
    tensors = _tensor_slots(args)
    k = pyrng.choice(tensors)
    weight = bits_at >= 7                                         # wq_*: bits after six tensors (and out/grads)
    if how == "dtype":
        args[k] = args[k].astype(pyrng.choice([np.float64, np.float16, np.int32, np.uint8, np.bool_, np.complex64]))
    elif how == "strides":
        if args[k].ndim == 1:
            args[k] = np.repeat(args[k], 2)[::2]                  # right shape, stride 2
        else:
            args[k] = np.asfortranarray(args[k]) if pyrng.random() < 0.5 else \
                np.repeat(args[k], 2, axis=1)[:, ::2]
            if args[k].flags.c_contiguous:                        # a (n, 1) array stays C-contiguous
                args[k] = args[k][:, None]
    elif how == "shape":
        grow = [s + pyrng.randint(1, 3) for s in args[k].shape]
        args[k] = np.zeros(grow if pyrng.random() < 0.5 else grow + [2], np.float32)
    elif how == "zero_size":
        k = pyrng.choice(inputs[:1] + outputs)
        shape = list(args[k].shape)
        shape[pyrng.randrange(len(shape))] = 0
        args[k] = np.zeros(shape, np.float32)
    elif how == "bits":
        args[bits_at] = pyrng.choice([0, 1, 9, 16, -3, 1 << 70, -(1 << 70), 3.0, "4", None, True + 0.5])
    elif how == "scalar":                                         # a bad value for one scalar after bits
        slots = (["group", "n_quant", "symmetric", "scaling", "nthreads"] if weight
                 else ["n_quant", "symmetric", "nthreads"])
        slot = pyrng.randrange(len(slots))
        bad = {"group": [-1, 7, COLS + 1, 1 << 70, 2.5, "x"],           # 7 does not divide 32
               "n_quant": [-1, COLS + 1, 1 << 70, None, 2.5] + ([8] if weight else []),  # 8: not whole groups
               "symmetric": [np.ones(2)],                              # truth value is ambiguous
               "scaling": [float("nan"), float("inf"), "1.0", None],
               "nthreads": [0, -1, 5000, 1 << 70, 2.5]}[slots[slot]]
        args[bits_at + 1 + slot] = pyrng.choice(bad)
    elif how == "nonfinite":
        k = pyrng.choice(inputs)
        flat = args[k].reshape(-1)
        bad = pyrng.choice([np.nan, np.inf, -np.inf])
        if (not weight and k == 1) or (weight and k in (4, 5)):
            bad = np.nan     # x / inf = 0 and sigmoid(+-inf) = 1 or 0 are finite: only NaN is bad there
        flat[pyrng.randrange(flat.size)] = bad
        if weight and k in (2, 3):                                # LoRA factors: make B A non-finite
            args[k][...] = np.nan
    elif how == "readonly":
        k = pyrng.choice(outputs)
        args[k] = args[k].copy()
        args[k].flags.writeable = False
    elif how == "alias":
        k = pyrng.choice(outputs)
        src = pyrng.choice([t for t in tensors if t != k and args[t].shape == args[k].shape and
                            args[t].dtype == args[k].dtype] or [k])
        if src == k:                                              # no partner of the same shape: overlap itself
            other = pyrng.choice([t for t in tensors if t != k])
            args[other] = args[k]
        else:
            args[k] = args[src]
    elif how == "nargs":
        del args[pyrng.randrange(len(args))]
    elif how == "none":
        k = pyrng.choice(inputs[:1] + ([outputs[0]] if bits_at - outputs[0] == 1 else []))   # a forward out
        args[k] = None
    else:
        k = pyrng.choice(inputs[:1] + outputs[:1])
        args[k] = pyrng.choice(BOGUS)()
    return how


def run_bad_inputs(C, n_calls: int = N_CALLS, seed: int = SEED):
    """Makes ``n_calls`` broken calls; returns their count.  Raises AssertionError on the first call that
    does not raise TypeError/ValueError with a message, or that releases a capsule it took not exactly once."""
    rng = np.random.default_rng(seed)
    pyrng = random.Random(seed)
    kinds = ["wq_forward", "wq_backward", "aq_forward", "aq_backward"]
    for n in range(n_calls):
        kind = kinds[n % 4]
        args, inputs, outputs, bits_at = valid_call(kind, rng)
        how = break_call(args, inputs, outputs, bits_at, rng, pyrng)
        producers = [a for a in args if isinstance(a, FakeProducer)]
        released = RELEASED[0]
        try:
            getattr(C, kind)(*args)
        except EXPECTED as exc:
            assert str(exc), f"call {n} ({kind}, {how}): {type(exc).__name__} without a message"
        else:
            raise AssertionError(f"call {n} ({kind}, broken by {how}) did not raise")
        taken = sum(p.taken() for p in producers)
        assert RELEASED[0] - released == taken, f"call {n} ({kind}, {how}): {taken} capsules taken, " \
                                                f"{RELEASED[0] - released} released"
    return n_calls


def test_randomized_bad_input_raises_cleanly():
    from c_extension import require_c
    C = require_c()
    for isa in ("ref", "avx2") if C.avx2_supported() else ("ref",):
        previous = C.backend()
        C.set_backend(isa)
        try:
            assert run_bad_inputs(C) == N_CALLS
        finally:
            C.set_backend(previous)


def test_every_bogus_capsule_is_refused():
    """Each hand-made capsule in place of ``w``, one by one (the randomized test draws from them)."""
    from c_extension import require_c
    C = require_c()
    for make in BOGUS:
        w = make()
        released = RELEASED[0]
        try:
            C.wq_forward(w, None, None, None, None, None, np.empty((4, 8), np.float32), 3, 0, 8, False, 1.0, 1)
        except EXPECTED as exc:
            assert str(exc)
        else:
            raise AssertionError(f"{make} was accepted")
        if isinstance(w, FakeProducer):
            assert RELEASED[0] - released == int(w.taken())


def test_overflowing_element_count_is_a_value_error():
    from c_extension import require_c
    C = require_c()
    import pytest
    with pytest.raises(ValueError, match="overflows 64 bits"):
        C.aq_forward(FakeProducer([1 << 40, 1 << 40]), None, np.empty((4, 8), np.float32), 4, 8, False, 1)
    with pytest.raises(ValueError, match="overflows 64 bits"):
        C.aq_forward(FakeProducer([1 << 31, 1 << 31]), None, np.empty((4, 8), np.float32), 4, 8, False, 1)
    with pytest.raises(ValueError, match="bits"):
        C.aq_forward(np.ones((4, 8), np.float32), None, np.empty((4, 8), np.float32), 1 << 70, 8, False, 1)


if __name__ == "__main__":   # tests/sanitize.sh: without pytest, prints the number of calls
    from sliderquant import _C
    total = 0
    for isa in ("ref", "avx2") if _C.avx2_supported() else ("ref",):
        _C.set_backend(isa)
        total += run_bad_inputs(_C)
    print(f"bad-input calls: {total} (seed {SEED}, backends ref{' and avx2' if _C.avx2_supported() else ''}), "
          "each raised TypeError/ValueError")
    sys.exit(0)
