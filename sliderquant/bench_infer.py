"""``python -m sliderquant.bench infer``: packed low-bit inference against torch on this CPU.

Per-kernel rows: y = x W^T for (out, in) = (4096, 4096), (11008, 4096), (4096, 11008), batch 1
(decode) and 64 (prefill): our packed W2/W3/W4 g128 kernels (fp32 x), ``F.linear`` fp32 and bf16,
and torch's own int4 CPU kernel (``aten._weight_int4pack_mm_for_cpu``, bf16 x) for 4-bit; plus the
copy bandwidth of the same run (a tensor copy of the working-set size, bytes copied per second) so
the GEMV rows can be read as a fraction of it.  At batch 1 each contender cycles over distinct copies
of its weights adding up to ``--working-set-mib`` (512 MiB; this CPU may have a 260 MB L3), so a
GEMV streams from memory as in a real model's decode; plus SmolLM2-135M decode tokens/s (batch 1, greedy, 128 new tokens), packed W4 g128 against
the bf16 model.  All contenders are timed interleaved (one call of each per round), medians over
rounds, spread = the 25th to 75th percentile.  The machine's load averages are recorded: on a shared
machine, read the spread before the medians.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import subprocess
import time
from typing import Callable, Dict, List

import torch
import torch.nn.functional as F

from . import packed

SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008)]  # (out, in)


def add_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--threads", type=int, default=2, help="torch and kernel threads (default 2)")
    parser.add_argument("--rounds", type=int, default=9, help="interleaved rounds per kernel row set")
    parser.add_argument("--batches", default="1,64", help="token counts, comma-separated")
    parser.add_argument("--bits", default="2,3,4", help="packed widths, comma-separated")
    parser.add_argument("--group-size", type=int, default=128)
    parser.add_argument("--shapes", default=",".join(f"{n}x{k}" for n, k in SHAPES),
                        help="OUTxIN list, comma-separated")
    parser.add_argument("--working-set-mib", type=int, default=512,
                        help="batch 1: each contender cycles over distinct copies of its weights adding up to "
                             "this many MiB (or what memory allows), so the GEMV reads DRAM, not the cache")
    parser.add_argument("--decode-tokens", type=int, default=128, help="new tokens of the SmolLM2 run; 0 skips it")
    parser.add_argument("--decode-rounds", type=int, default=3)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--json", action="store_true", help="print the rows as JSON")
    return parser


def _quantiles(ts: List[float]) -> Dict[str, float]:
    ts = sorted(ts)
    q = statistics.quantiles(ts, n=4) if len(ts) >= 2 else [ts[0]] * 3
    return {"median_ms": 1e3 * statistics.median(ts), "p25_ms": 1e3 * q[0], "p75_ms": 1e3 * q[2],
            "min_ms": 1e3 * ts[0]}


def _interleaved(fns: Dict[str, Callable[[], object]], rounds: int) -> Dict[str, Dict[str, float]]:
    for f in fns.values():  # warm-up: page faults, oneDNN primitive caches, OpenMP pools
        f()
    times: Dict[str, List[float]] = {k: [] for k in fns}
    for _ in range(rounds):
        for k, f in fns.items():
            t0 = time.perf_counter()
            f()
            times[k].append(time.perf_counter() - t0)
    return {k: _quantiles(v) for k, v in times.items()}


def _copy_fn(mib: int):
    src = torch.ones(mib << 18)  # fp32: mib MiB
    dst = torch.empty_like(src)
    return (lambda: dst.copy_(src)), src.numel() * 4


def _mem_available() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 8 << 30


def _copies(tensors, nbytes: int, want: int, cap: int) -> list:
    """Enough distinct copies of one contender's weights (``tensors``, ``nbytes`` in all) to make
    ``want`` bytes, at most ``cap`` bytes: a GEMV cycling over them reads memory, not the L3 cache."""
    n = max(1, min(-(-want // nbytes), cap // nbytes))
    return [tensors] + [tuple(t.clone() for t in tensors) for _ in range(n - 1)]


def _kernel_rows(args, copy_fn, copy_bytes) -> List[dict]:
    rows: List[dict] = []
    group = args.group_size
    bits_list = [int(b) for b in args.bits.split(",") if b]
    want = args.working_set_mib << 20
    for spec in args.shapes.split(","):
        n_out, n_in = (int(v) for v in spec.lower().split("x"))
        g = torch.Generator().manual_seed(0)
        w = torch.randn(n_out, n_in, generator=g) * 0.02
        contenders = {}  # name -> (list of weight tuples, bytes of one, call(x32, x16, weights))
        n_cont = len(bits_list) + 3
        # each contender gets at most its share of what memory allows (copy buffers and 2 GiB kept free)
        cap = max(0, (_mem_available() - 2 * copy_bytes - (2 << 30)) // n_cont)
        for bits in bits_list:
            q = torch.randint(0, 2 ** bits, (n_out, n_in), generator=g)
            s = torch.rand(n_out, n_in // group, generator=g) * 0.01 + 1e-3
            z = torch.full_like(s, float(2 ** (bits - 1)))
            m = packed.PackedLinear.from_codes(q, s, z, bits)
            nbytes = m.qweight.numel() * 4 + m.scale_min.numel() * 4
            contenders[f"sliderquant W{bits} g{group}"] = (
                _copies((m.qweight, m.scale_min), nbytes, want, cap), nbytes,
                lambda x, x16, t, b=bits: packed.matmul(t[0], t[1], x, n_out, group, b))
        contenders["F.linear fp32"] = (_copies((w,), w.numel() * 4, want, cap), w.numel() * 4,
                                       lambda x, x16, t: F.linear(x, t[0]))
        w16 = w.to(torch.bfloat16)
        contenders["F.linear bf16"] = (_copies((w16,), w.numel() * 2, want, cap), w.numel() * 2,
                                       lambda x, x16, t: F.linear(x16, t[0]))
        del w, w16
        if 4 in bits_list and hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu"):
            q4 = torch.randint(0, 16, (n_out, n_in), dtype=torch.int32, generator=g)
            i4 = (torch.ops.aten._convert_weight_to_int4pack_for_cpu(q4, 1),
                  torch.rand(n_in // group, n_out, 2, generator=g).to(torch.bfloat16))
            nbytes = i4[0].numel() * i4[0].element_size() + i4[1].numel() * 2
            contenders[f"torch int4 g{group} (bf16 x)"] = (
                _copies(i4, nbytes, want, cap), nbytes,
                lambda x, x16, t: torch.ops.aten._weight_int4pack_mm_for_cpu(x16, t[0], group, t[1]))
        for batch in (int(b) for b in args.batches.split(",") if b):
            x = torch.randn(batch, n_in, generator=g)
            x16 = x.to(torch.bfloat16)
            fns, used = {}, {}
            for name, (sets, nbytes, call) in contenders.items():
                # batch 1 cycles over every copy (memory-bound, like decode); larger batches are
                # compute-bound, two copies keep the timing short
                sel = sets if batch == 1 else sets[:2]
                used[name] = len(sel)
                fns[name] = (lambda sel=sel, call=call: [call(x, x16, t) for t in sel])
            fns["copy"] = copy_fn
            load = os.getloadavg()
            res = _interleaved(fns, args.rounds)
            copy_gbs = copy_bytes / (res["copy"]["median_ms"] * 1e-3) / 1e9
            for name, r in res.items():
                if name == "copy":
                    continue
                n = used[name]
                r = {k: v / n for k, v in r.items()}  # per call
                nbytes = contenders[name][1]
                gbs = nbytes / (r["median_ms"] * 1e-3) / 1e9
                rows.append({"kind": "kernel", "out": n_out, "in": n_in, "batch": batch, "impl": name, **r,
                             "weight_bytes": nbytes, "distinct_copies": n, "working_set_MiB": n * nbytes / 2**20,
                             "weight_GBps": gbs, "copy_GBps": copy_gbs, "pct_of_copy": 100 * gbs / copy_gbs,
                             "loadavg": load})
        del contenders
    return rows


def _decode_rows(args) -> List[dict]:
    import sliderquant
    from . import data
    model, tok = data.load_model(args.model)
    bf16 = copy.deepcopy(model).to(torch.bfloat16).eval()
    sliderquant.quantize(model, {"method": "rtn", "wbits": 4, "group_size": args.group_size}, None)
    pk = packed.pack_model(model).to(torch.bfloat16).eval()
    ids = tok("The history of the city begins", return_tensors="pt").input_ids
    n = args.decode_tokens

    def gen(m):
        with torch.no_grad():
            out = m.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                             pad_token_id=tok.eos_token_id)
        assert out.shape[1] == ids.shape[1] + n
    res = _interleaved({"bf16 model": lambda: gen(bf16), "packed W4 model": lambda: gen(pk)}, args.decode_rounds)
    lin_bytes = {"bf16 model": sum(p.numel() * 2 for nm, p in bf16.named_parameters()
                                   if nm.endswith(".weight") and "layers." in nm and p.dim() == 2),
                 "packed W4 model": packed.packed_bytes(pk)}
    rows = []
    for name, r in res.items():
        rows.append({"kind": "decode", "model": args.model, "impl": name, "new_tokens": n, **r,
                     "tokens_per_s": n / (r["median_ms"] * 1e-3),
                     "tokens_per_s_p25_p75": [n / (r["p75_ms"] * 1e-3), n / (r["p25_ms"] * 1e-3)],
                     "decoder_linear_bytes": lin_bytes[name]})
    rows[1]["speedup_vs_bf16"] = rows[1]["tokens_per_s"] / rows[0]["tokens_per_s"]
    return rows


def _uptime() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def run(args) -> List[dict]:
    torch.set_num_threads(args.threads)
    load_before, uptime_before = os.getloadavg(), _uptime()
    copy_fn, copy_bytes = _copy_fn(args.working_set_mib)
    rows = _kernel_rows(args, copy_fn, copy_bytes)
    if args.decode_tokens:
        rows += _decode_rows(args)
    meta = {"kind": "meta", "threads": args.threads, "packed_backend": packed.packed_backend(),
            "torch": torch.__version__, "loadavg_before": load_before, "loadavg_after": os.getloadavg(),
            "uptime_before": uptime_before, "uptime_after": _uptime(), "cpus": os.cpu_count(),
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
            "copy": f"torch copy_ of {args.working_set_mib} MiB fp32; GB/s = bytes copied per second "
                    "(memory traffic is twice that: read + write)"}
    return [meta] + rows


def print_table(rows: List[dict]) -> None:
    meta = rows[0]
    print(f"threads={meta['threads']} packed kernels={meta['packed_backend']} torch={meta['torch']} "
          f"load avg before {meta['loadavg_before']} after {meta['loadavg_after']} on {meta['cpus']} CPUs")
    print(f"{'out x in':>12} {'batch':>5}  {'impl':<28} {'median ms':>10} {'p25-p75 ms':>17} {'min ms':>8} "
          f"{'GB/s':>7} {'% copy':>7} {'set MiB':>8} {'load':>5}")
    for r in rows[1:]:
        if r["kind"] == "kernel":
            print(f"{r['out']:>5} x {r['in']:<5} {r['batch']:>5}  {r['impl']:<28} {r['median_ms']:>10.3f} "
                  f"{r['p25_ms']:>8.3f}-{r['p75_ms']:<8.3f} {r['min_ms']:>8.3f} {r['weight_GBps']:>7.2f} {r['pct_of_copy']:>6.0f}% "
                  f"{r['working_set_MiB']:>8.0f} {r['loadavg'][0]:>5.1f}")
    copies = sorted({round(r["copy_GBps"], 2) for r in rows if r["kind"] == "kernel"})
    if copies:
        print(f"copy bandwidth ({meta['copy']}) over the row sets: {copies} GB/s")
    for r in rows[1:]:
        if r["kind"] == "decode":
            lo, hi = r["tokens_per_s_p25_p75"]
            extra = f"  speedup {r['speedup_vs_bf16']:.2f}x" if "speedup_vs_bf16" in r else ""
            print(f"decode {r['model']} {r['impl']:<16} {r['tokens_per_s']:7.2f} tok/s ({lo:.2f}-{hi:.2f}; best "
                  f"{r['new_tokens'] / (r['min_ms'] * 1e-3):.2f}), "
                  f"decoder linears {r['decoder_linear_bytes'] / 2**20:.1f} MiB{extra}")


def main(argv=None) -> int:
    args = add_args(argparse.ArgumentParser(description=__doc__.splitlines()[0])).parse_args(argv)
    rows = run(args)
    if args.json:
        print(json.dumps(rows, indent=1))
    else:
        print_table(rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
