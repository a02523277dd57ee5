"""Benchmarks: ``python -m sliderquant.bench kernels [--json] [--reps N] [--dtype bf16]``.

``kernels`` times the fused C kernels against the eager pure-torch reference (the same math,
:mod:`sliderquant.reference`) on LLM-sized weights, with a memory-copy bandwidth measured in the
same run as the roofline.  Outputs and gradients of the C kernels are preallocated; the eager
reference allocates as eager PyTorch does.  Times are medians; threads are pinned to 2 by default
(``--threads``) so numbers are comparable across machines of this project.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch

from . import ops, reference


def _median_ms(fn, reps: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def _copy_gbps(nbytes: int, reps: int) -> float:
    src = torch.empty(nbytes // 4, dtype=torch.float32).uniform_()
    dst = torch.empty_like(src)
    ms = _median_ms(lambda: dst.copy_(src), reps)
    return 2 * nbytes / ms / 1e6


def _weight_case(rows, cols, group, rank, dtype, reps, nthreads):
    C = ops._C
    g = torch.Generator().manual_seed(0)
    w = torch.randn(rows, cols, generator=g).to(dtype)
    n_groups = 1 if group is None else cols // group
    u = torch.full((rows, n_groups), 4.0)
    l = torch.full((rows, n_groups), 4.0)
    a = torch.randn(rank, cols, generator=g) * 0.01
    b = torch.randn(rows, rank, generator=g) * 0.01
    grad = torch.randn(rows, cols, generator=g).to(dtype)
    bits = 4
    n_quant = cols
    out = torch.empty_like(w)
    grads = [torch.empty_like(a), torch.empty_like(b), torch.empty_like(u), torch.empty_like(l)]
    gs = group or 0

    def c_fwd():
        C.wq_forward(w, None, a, b, u, l, out, bits, gs, n_quant, False, 1.0, nthreads)

    def c_fwd_bwd():
        c_fwd()
        C.wq_backward(w, None, a, b, u, l, grad, None, *grads, None, bits, gs, n_quant, False, 1.0, nthreads)

    def eager_fwd():
        with torch.no_grad():
            reference.fake_quant_weight(w, bits, group, False, u, l, None, a, b, 1.0)

    pa, pb, pu, pl = (t.clone().requires_grad_(True) for t in (a, b, u, l))

    def eager_fwd_bwd():
        for p in (pa, pb, pu, pl):
            p.grad = None
        reference.fake_quant_weight(w, bits, group, False, pu, pl, None, pa, pb, 1.0).backward(grad)

    esize = w.element_size()
    shape = f"{rows}x{cols}"
    label = f"w{bits} {'g' + str(group) if group else 'per-channel'} lora{rank} {str(dtype).replace('torch.', '')}"
    rows_out = []
    for kernel, c_fn, e_fn, nbytes in (
        ("weight_fwd", c_fwd, eager_fwd, 2 * rows * cols * esize),
        ("weight_fwd_bwd", c_fwd_bwd, eager_fwd_bwd, 4 * rows * cols * esize),
    ):
        c_ms = _median_ms(c_fn, reps)
        e_ms = _median_ms(e_fn, max(3, reps // 2))
        rows_out.append(dict(kernel=kernel, shape=shape, config=label, eager_ms=e_ms, c_ms=c_ms,
                             speedup=e_ms / c_ms, gbps=nbytes / c_ms / 1e6))
    return rows_out


def _act_case(tokens, d, dtype, reps, nthreads):
    C = ops._C
    g = torch.Generator().manual_seed(1)
    x = torch.randn(tokens, d, generator=g).to(dtype)
    grad = torch.randn(tokens, d, generator=g).to(dtype)
    out = torch.empty_like(x)
    gx = torch.empty_like(x)
    bits = 4

    def c_fwd():
        C.aq_forward(x, None, out, bits, d, False, nthreads)

    def c_fwd_bwd():
        c_fwd()
        C.aq_backward(x, None, grad, gx, None, bits, d, False, nthreads)

    def eager_fwd():
        with torch.no_grad():
            reference.fake_quant_act(x, bits)

    px = x.clone().requires_grad_(True)

    def eager_fwd_bwd():
        px.grad = None
        reference.fake_quant_act(px, bits).backward(grad)

    esize = x.element_size()
    rows_out = []
    for kernel, c_fn, e_fn, nbytes in (
        ("act_fwd", c_fwd, eager_fwd, 2 * tokens * d * esize),
        ("act_fwd_bwd", c_fwd_bwd, eager_fwd_bwd, 5 * tokens * d * esize),
    ):
        c_ms = _median_ms(c_fn, reps)
        e_ms = _median_ms(e_fn, max(3, reps // 2))
        rows_out.append(dict(kernel=kernel, shape=f"{tokens}x{d}", config=f"a{bits} per-token "
                             f"{str(dtype).replace('torch.', '')}", eager_ms=e_ms, c_ms=c_ms,
                             speedup=e_ms / c_ms, gbps=nbytes / c_ms / 1e6))
    return rows_out


def bench_kernels(reps: int = 10, dtype: torch.dtype = torch.float32, threads: int = 2, quick: bool = False):
    if ops._C is None:
        raise SystemExit(f"the C extension is not built: {ops._C_ERROR}")
    torch.set_num_threads(threads)
    shapes = [(1024, 1024)] if quick else [(4096, 4096), (11008, 4096)]
    results = []
    for rows, cols in shapes:
        copy = _copy_gbps(rows * cols * 4, reps)
        for group in (128, None):
            for r in _weight_case(rows, cols, group, 4, dtype, reps, threads):
                r["copy_gbps"] = copy
                results.append(r)
    tokens, d = (256, 1024) if quick else (2048, 4096)
    copy = _copy_gbps(tokens * d * 4, reps)
    for r in _act_case(tokens, d, dtype, reps, threads):
        r["copy_gbps"] = copy
        results.append(r)
    for r in results:
        r.update(backend=ops.backend(), threads=threads)
    return results


def _print_table(rows):
    head = f"{'kernel':<15} {'shape':<11} {'config':<28} {'eager ms':>9} {'C ms':>8} {'speedup':>8} " \
           f"{'GB/s':>6} {'copy GB/s':>9} {'% copy':>6}"
    print(head)
    print("-" * len(head))
    for r in rows:
        print(f"{r['kernel']:<15} {r['shape']:<11} {r['config']:<28} {r['eager_ms']:9.2f} {r['c_ms']:8.2f} "
              f"{r['speedup']:7.1f}x {r['gbps']:6.1f} {r['copy_gbps']:9.1f} {100 * r['gbps'] / r['copy_gbps']:5.0f}%")
    print(f"\nbackend={rows[0]['backend']} threads={rows[0]['threads']}; GB/s counts the bytes a fused kernel "
          "must move (fwd: read W + write W_hat; fwd+bwd: that plus read W and dL/dW_hat); copy GB/s is "
          "torch's copy_ of a buffer of the same size, measured in this run.")


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m sliderquant.bench", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    k = sub.add_parser("kernels", help="C kernels vs eager torch on LLM-sized weights")
    k.add_argument("--json", action="store_true", help="print a JSON list of rows instead of a table")
    k.add_argument("--reps", type=int, default=10)
    k.add_argument("--threads", type=int, default=2)
    k.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    k.add_argument("--quick", action="store_true", help="small shapes (smoke test)")
    args = parser.parse_args(argv)
    if args.command == "kernels":
        dtype = torch.float32 if args.dtype == "fp32" else torch.bfloat16
        rows = bench_kernels(args.reps, dtype, args.threads, args.quick)
        if args.json:
            json.dump(rows, sys.stdout, indent=1)
            print()
        else:
            _print_table(rows)


if __name__ == "__main__":
    main()
