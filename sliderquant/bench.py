"""Benchmarks: ``python -m sliderquant.bench kernels|calibrate [--json] ...``.

``kernels`` times the fused C kernels against the eager pure-torch reference (the same math,
:mod:`sliderquant.reference`) on LLM-sized weights, with a memory-copy bandwidth measured in the
same run as the roofline.  Outputs and gradients of the C kernels are preallocated; the eager
reference allocates as eager PyTorch does.  Times are medians; threads are pinned to 2 by default
(``--threads``) so numbers are comparable across machines of this project.

``calibrate`` runs a few SliderQuant windows of a real model three ways in one run: the engine
with the C kernels, the same engine on the pure-torch path, and a plain full-precision
forward+backward of the same windows and mini-batches (no quantization: the floor), each in the
precision the engine trains in (``--precision auto``: bf16 autocast where the CPU multiplies bf16
natively, else fp32; ``fp32,bf16`` measures both).  ``--profile`` splits the time by op category.
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


def _time_pairs(pairs, shape: str, config: str, reps: int):
    """Rows of the table: each (kernel, C function, eager function, bytes moved) timed both ways."""
    rows = []
    for kernel, c_fn, e_fn, nbytes in pairs:
        c_ms = _median_ms(c_fn, reps)
        e_ms = _median_ms(e_fn, max(3, reps // 2))
        rows.append(dict(kernel=kernel, shape=shape, config=config, eager_ms=e_ms, c_ms=c_ms,
                         speedup=e_ms / c_ms, gbps=nbytes / c_ms / 1e6))
    return rows


def _weight_case(rows, cols, group, rank, dtype, reps, nthreads, out_dtype=None):
    C = ops._C
    g = torch.Generator().manual_seed(0)
    w = torch.randn(rows, cols, generator=g).to(dtype)
    n_groups = 1 if group is None else cols // group
    u = torch.full((rows, n_groups), 4.0)
    l = torch.full((rows, n_groups), 4.0)
    a = torch.randn(rank, cols, generator=g) * 0.01
    b = torch.randn(rows, rank, generator=g) * 0.01
    out_dtype = out_dtype or dtype
    grad = torch.randn(rows, cols, generator=g).to(out_dtype)
    bits = 4
    n_quant = cols
    out = torch.empty_like(w, dtype=out_dtype)
    grads = [torch.empty_like(a), torch.empty_like(b), torch.empty_like(u), torch.empty_like(l)]
    gs = group or 0

    def c_fwd():
        C.wq_forward(w, None, a, b, u, l, out, bits, gs, n_quant, False, 1.0, nthreads)

    def c_fwd_bwd():
        c_fwd()
        C.wq_backward(w, None, a, b, u, l, grad, None, *grads, None, bits, gs, n_quant, False, 1.0, nthreads)

    def eager_fwd():
        with torch.no_grad():
            reference.fake_quant_weight(w, bits, group, False, u, l, None, a, b, 1.0).to(out_dtype)

    pa, pb, pu, pl = (t.clone().requires_grad_(True) for t in (a, b, u, l))

    def eager_fwd_bwd():
        for p in (pa, pb, pu, pl):
            p.grad = None
        reference.fake_quant_weight(w, bits, group, False, pu, pl, None, pa, pb, 1.0).to(out_dtype).backward(grad)

    esize, osize = w.element_size(), out.element_size()
    name = str(dtype).replace("torch.", "")
    if out_dtype != dtype:
        name += "->" + str(out_dtype).replace("torch.", "")
    label = f"w{bits} {'g' + str(group) if group else 'per-channel'} lora{rank} {name}"
    # bytes a fused kernel must move: fwd reads W, writes W_hat; bwd reads W and dL/dW_hat again
    return _time_pairs([("weight_fwd", c_fwd, eager_fwd, rows * cols * (esize + osize)),
                        ("weight_fwd_bwd", c_fwd_bwd, eager_fwd_bwd, 2 * rows * cols * (esize + osize))],
                       f"{rows}x{cols}", label, reps)


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
    return _time_pairs([("act_fwd", c_fwd, eager_fwd, 2 * tokens * d * esize),
                        ("act_fwd_bwd", c_fwd_bwd, eager_fwd_bwd, 5 * tokens * d * esize)],
                       f"{tokens}x{d}", f"a{bits} per-token {str(dtype).replace('torch.', '')}", reps)


def bench_kernels(reps: int = 10, dtype: torch.dtype = torch.float32, threads: int = 2, quick: bool = False,
                  out_dtype: torch.dtype | None = None):
    if ops._C is None:
        raise SystemExit(f"the C extension is not built: {ops._C_ERROR}")
    torch.set_num_threads(threads)
    shapes = [(1024, 1024)] if quick else [(4096, 4096), (11008, 4096)]
    results = []
    for rows, cols in shapes:
        copy = _copy_gbps(rows * cols * 4, reps)
        for group in (128, None):
            for r in _weight_case(rows, cols, group, 4, dtype, reps, threads, out_dtype):
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


def _floor_epoch(block, x, target, layer_kwargs, batch_size, epochs, amp, gen):
    """Full-precision forward + backward (weight gradients included) of the window's mini-batches."""
    from .methods.windows import window_losses
    params = [p for p in block.parameters()]
    flags = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(True)
    try:
        for loss in window_losses(block, x, target, layer_kwargs, batch_size, epochs, amp, gen):
            for p in params:
                p.grad = None
            loss.backward()
    finally:
        for p, f in zip(params, flags):
            p.requires_grad_(f)
            p.grad = None


# torch.profiler op names -> where the time goes (self time; everything else is "other")
_CATEGORIES = (
    ("matmul", ("aten::mm", "aten::addmm", "aten::bmm", "aten::matmul", "aten::linear", "aten::_mkldnn",
                "mkldnn", "onednn")),
    ("attention", ("scaled_dot_product", "flash_attention", "aten::_softmax")),
    ("quantization", ("sliderquant::", "GeneratedBackwardFor_sliderquant")),
    ("casts/copies", ("aten::copy_", "aten::_to_copy", "aten::to")),
    ("optimizer", ("Optimizer.", "aten::_foreach", "adamw")),
)


def _profile_split(fn) -> dict:
    """Seconds of self CPU time by category while ``fn`` runs (torch.profiler)."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    split = {name: 0.0 for name, _ in _CATEGORIES}
    split["other"] = 0.0
    for ev in prof.key_averages():
        name = ev.key
        cat = next((c for c, keys in _CATEGORIES if any(k in name for k in keys)), "other")
        split[cat] += ev.self_cpu_time_total / 1e6
    return split


def bench_calibrate(model_name: str = "smollm2-135m", nsamples: int = 6, seqlen: int = 512,
                    batch_size: int = 3, windows=((0, 1), (14, 15)), config: str = "configs/w2a16g64.yaml",
                    threads: int = 2, epochs: int = 1, precisions=("auto",), reps: int = 3,
                    profile: bool = False):
    """Seconds per window-epoch: C kernels vs pure-torch path vs the full-precision floor.

    For each precision (``auto`` = what ``quantize`` would use here, ``fp32``, ``bf16`` autocast) and
    window: one untimed warm-up of each way (allocator, oneDNN primitives), then ``reps`` rounds that
    time floor, C and torch in turn from the same starting parameters; the median round counts.
    """
    import contextlib
    import os

    from . import data, models
    from .config import QuantConfig
    from .methods import common
    from .methods import windows as window_method   # "windows" is this function's argument

    torch.set_num_threads(threads)
    model, tokenizer = data.load_model(model_name)
    calib = data.get_calibration("c4", tokenizer, nsamples, seqlen, seed=0)
    cfg = QuantConfig.from_yaml(config)
    cfg.batch_size = batch_size
    layers = models.decoder_layers(model)
    device = next(model.parameters()).device
    with torch.no_grad():
        x0, layer_kwargs = models.capture_layer0_inputs(model, calib)
    x0 = x0.float()
    fp32 = contextlib.nullcontext()
    inputs = {}
    for a, b in windows:   # fp inputs and targets of each window (fp32), before any wrapping
        x_in = common.forward_layers(layers[:a], x0, layer_kwargs, fp32)
        inputs[(a, b)] = (x_in, common.forward_layers(layers[a:b + 1], x_in, layer_kwargs, fp32))
    qlayers = common.wrap_layers(model, cfg, lwc=True, lora_rank=cfg.lora_rank)
    rows = []
    for precision in precisions:
        cfg.autocast = precision
        resolved = window_method.resolve_autocast(cfg, device)
        amp = window_method.autocast_context(cfg, device)
        for a, b in windows:
            x_in, target = inputs[(a, b)]
            block, qblock = layers[a:b + 1], qlayers[a:b + 1]
            start_state = [{n: q.learned_state() for n, q in d.items()} for d in qblock]

            def reset():
                for d, st in zip(qblock, start_state):
                    for n, q in d.items():
                        q.load_learned_state(st[n])

            def run(way):
                gen = torch.Generator().manual_seed(0)
                if way == "floor":
                    with common.teacher_mode(qblock):
                        _floor_epoch(block, x_in, target, layer_kwargs, batch_size, epochs, amp, gen)
                    return
                reset()
                previous = os.environ.get("SLIDERQUANT_ISA")
                if way == "torch":
                    os.environ["SLIDERQUANT_ISA"] = "torch"
                try:
                    window_method.train_window(block, qblock, x_in, target, layer_kwargs, cfg, epochs, amp, gen)
                finally:
                    if previous is None:
                        os.environ.pop("SLIDERQUANT_ISA", None)
                    else:
                        os.environ["SLIDERQUANT_ISA"] = previous

            ways = ("floor", "c", "torch")
            for way in ways:
                run(way)                                   # warm-up
            times = {w: [] for w in ways}
            for _ in range(reps):
                for way in ways:
                    t0 = time.perf_counter()
                    run(way)
                    times[way].append((time.perf_counter() - t0) / epochs)
            med = {w: statistics.median(t) for w, t in times.items()}
            row = dict(window=f"{a}-{b}", model=model_name, samples=nsamples, seqlen=seqlen,
                       batch_size=batch_size, config=os.path.basename(config), precision=resolved,
                       floor_s=med["floor"], c_s=med["c"], torch_s=med["torch"],
                       speedup=med["torch"] / med["c"], overhead=med["c"] / med["floor"] - 1.0,
                       times=times, reps=reps, backend=ops.backend(), threads=threads)
            if profile:
                row["profile"] = {w: _profile_split(lambda w=w: run(w)) for w in ways}
            reset()
            rows.append(row)
    return rows


def _print_calibrate(rows):
    head = (f"{'precision':<9} {'window':<7} {'floor s':>8} {'C s':>8} {'torch s':>8} {'C vs torch':>10} "
            f"{'overhead':>9}")
    print(head)
    print("-" * len(head))
    for r in rows:
        print(f"{r['precision']:<9} {r['window']:<7} {r['floor_s']:8.3f} {r['c_s']:8.3f} {r['torch_s']:8.3f} "
              f"{r['speedup']:9.2f}x {100 * r['overhead']:8.1f}%")
    r = rows[0]
    print(f"\nseconds per window-epoch (median of {r['reps']} rounds after a warm-up); {r['model']}, "
          f"{r['samples']} samples x {r['seqlen']} tokens, batch {r['batch_size']}, {r['config']}, "
          f"backend={r['backend']}, threads={r['threads']}. floor = full-precision forward+backward of the same "
          "mini-batches in the same precision; overhead = C / floor - 1.")
    if any("profile" in r for r in rows):
        cats = [c for c, _ in _CATEGORIES] + ["other"]
        print(f"\nwhere the time goes (torch.profiler self CPU seconds of one window-epoch):")
        print(f"{'precision':<9} {'window':<7} {'way':<6} " + " ".join(f"{c:>13}" for c in cats))
        for r in rows:
            for way, split in r.get("profile", {}).items():
                print(f"{r['precision']:<9} {r['window']:<7} {way:<6} " + " ".join(f"{split[c]:13.3f}" for c in cats))


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


def _report(rows, as_json: bool, print_rows) -> None:
    """Print ``rows`` as JSON (``--json``) or as the subcommand's table."""
    if as_json:
        json.dump(rows, sys.stdout, indent=1)
        print()
    else:
        print_rows(rows)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m sliderquant.bench", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    k = sub.add_parser("kernels", help="C kernels vs eager torch on LLM-sized weights")
    k.add_argument("--json", action="store_true", help="print a JSON list of rows instead of a table")
    k.add_argument("--reps", type=int, default=10)
    k.add_argument("--threads", type=int, default=2)
    k.add_argument("--dtype", choices=["fp32", "bf16", "fp32-bf16"], default="fp32",
                   help="fp32-bf16: fp32 master weights fake-quantized to bf16 (training under bf16 autocast)")
    k.add_argument("--quick", action="store_true", help="small shapes (smoke test)")
    c = sub.add_parser("calibrate", help="SliderQuant windows of a real model: C vs torch vs fp floor")
    c.add_argument("--model", default="smollm2-135m")
    c.add_argument("--config", default="configs/w2a16g64.yaml")
    c.add_argument("--nsamples", type=int, default=6)
    c.add_argument("--seqlen", type=int, default=512)
    c.add_argument("--batch-size", type=int, default=3)
    c.add_argument("--windows", default="0-1,14-15", help="comma-separated first-last layer ranges")
    c.add_argument("--epochs", type=int, default=1)
    c.add_argument("--threads", type=int, default=2)
    c.add_argument("--precision", default="auto",
                   help="comma-separated: auto (what quantize uses on this machine), fp32, bf16")
    c.add_argument("--reps", type=int, default=3)
    c.add_argument("--profile", action="store_true", help="also split one epoch of each way by op category")
    c.add_argument("--json", action="store_true")
    t = sub.add_parser("threads", help="kernel and matmul loops, quiet vs loaded machine, per OpenMP wait policy")
    t.add_argument("--calls", type=int, default=200)
    t.add_argument("--threads", type=int, default=2)
    t.add_argument("--load", type=int, default=4, help="busy-loop processes in the loaded state")
    t.add_argument("--load-seconds", type=float, default=120.0, help="upper bound on each busy loop's life")
    t.add_argument("--reps", type=int, default=3)
    t.add_argument("--json", action="store_true")
    from . import bench_infer
    bench_infer.add_args(sub.add_parser("infer", help="packed low-bit matmuls and SmolLM2 decode vs torch"))
    args = parser.parse_args(argv)
    if args.command == "infer":
        _report(bench_infer.run(args), args.json, bench_infer.print_table)
        return
    if args.command == "threads":
        from . import bench_threads
        rows = bench_threads.bench_threads(args.calls, args.threads, args.load, args.reps, args.load_seconds)
        _report(rows, args.json, bench_threads.print_threads)
        return
    if args.command == "calibrate":
        windows = tuple(tuple(int(v) for v in w.split("-")) for w in args.windows.split(","))
        precisions = tuple(p.strip() for p in args.precision.split(",") if p.strip())
        for p in precisions:
            if p not in ("auto", "fp32", "bf16"):
                parser.error(f"--precision: unknown precision {p!r} (auto, fp32, bf16)")
        rows = bench_calibrate(args.model, args.nsamples, args.seqlen, args.batch_size, windows, args.config,
                               args.threads, args.epochs, precisions, args.reps, args.profile)
        _report(rows, args.json, _print_calibrate)
    elif args.command == "kernels":
        dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
        out_dtype = torch.bfloat16 if args.dtype == "fp32-bf16" else None
        rows = bench_kernels(args.reps, dtype, args.threads, args.quick, out_dtype)
        _report(rows, args.json, _print_table)


if __name__ == "__main__":
    main()
