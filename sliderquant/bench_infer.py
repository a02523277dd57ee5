"""``python -m sliderquant.bench infer``: packed low-bit inference against torch on this CPU.

Per-kernel rows: y = x W^T for (out, in) = (4096, 4096), (11008, 4096), (4096, 11008), batch 1
(decode) and 64 (prefill): our packed W2/W3/W4 g128 kernels (fp32 x), ``F.linear`` fp32 and bf16,
and torch's own int4 CPU kernel (``aten._weight_int4pack_mm_for_cpu``, bf16 x) for 4-bit; plus the
copy bandwidth of the same run (a 256 MiB tensor copy) so the GEMV rows can be read as a fraction
of it; plus SmolLM2-135M decode tokens/s (batch 1, greedy, 128 new tokens), packed W4 g128 against
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
    parser.add_argument("--copy-mib", type=int, default=256)
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


def _kernel_rows(args, copy_fn, copy_bytes) -> List[dict]:
    rows: List[dict] = []
    group = args.group_size
    bits_list = [int(b) for b in args.bits.split(",") if b]
    for spec in args.shapes.split(","):
        n_out, n_in = (int(v) for v in spec.lower().split("x"))
        g = torch.Generator().manual_seed(0)
        w = torch.randn(n_out, n_in, generator=g) * 0.02
        w16 = w.to(torch.bfloat16)
        mods = {}
        for bits in bits_list:
            q = torch.randint(0, 2 ** bits, (n_out, n_in), generator=g)
            s = torch.rand(n_out, n_in // group, generator=g) * 0.01 + 1e-3
            z = torch.full_like(s, float(2 ** (bits - 1)))
            mods[bits] = packed.PackedLinear.from_codes(q, s, z, bits)
        int4 = None
        if 4 in bits_list and hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu"):
            q4 = torch.randint(0, 16, (n_out, n_in), dtype=torch.int32, generator=g)
            int4 = (torch.ops.aten._convert_weight_to_int4pack_for_cpu(q4, 1),
                    torch.rand(n_in // group, n_out, 2, generator=g).to(torch.bfloat16))
        for batch in (int(b) for b in args.batches.split(",") if b):
            x = torch.randn(batch, n_in, generator=g)
            x16 = x.to(torch.bfloat16)
            fns = {f"sliderquant W{b} g{group}": (lambda m=m: m(x)) for b, m in mods.items()}
            fns["F.linear fp32"] = lambda: F.linear(x, w)
            fns["F.linear bf16"] = lambda: F.linear(x16, w16)
            if int4 is not None:
                fns[f"torch int4 g{group} (bf16 x)"] = lambda: torch.ops.aten._weight_int4pack_mm_for_cpu(
                    x16, int4[0], group, int4[1])
            fns["copy"] = copy_fn
            res = _interleaved(fns, args.rounds)
            copy_gbs = copy_bytes / (res["copy"]["median_ms"] * 1e-3) / 1e9
            for name, r in res.items():
                if name == "copy":
                    continue
                if name.startswith("sliderquant"):
                    m = mods[int(name.split()[1][1:])]
                    nbytes = m.qweight.numel() * 4 + m.scale_min.numel() * 4
                elif name.startswith("torch int4"):
                    nbytes = int4[0].numel() + int4[1].numel() * 2
                else:
                    nbytes = n_out * n_in * (4 if "fp32" in name else 2)
                gbs = nbytes / (r["median_ms"] * 1e-3) / 1e9
                rows.append({"kind": "kernel", "out": n_out, "in": n_in, "batch": batch, "impl": name, **r,
                             "weight_bytes": nbytes, "weight_GBps": gbs, "copy_GBps": copy_gbs,
                             "pct_of_copy": 100 * gbs / copy_gbs})
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


def run(args) -> List[dict]:
    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    copy_fn, copy_bytes = _copy_fn(args.copy_mib)
    rows = _kernel_rows(args, copy_fn, copy_bytes)
    if args.decode_tokens:
        rows += _decode_rows(args)
    meta = {"kind": "meta", "threads": args.threads, "packed_backend": packed.packed_backend(),
            "torch": torch.__version__, "loadavg_before": load_before, "loadavg_after": os.getloadavg(),
            "cpus": os.cpu_count()}
    return [meta] + rows


def print_table(rows: List[dict]) -> None:
    meta = rows[0]
    print(f"threads={meta['threads']} packed kernels={meta['packed_backend']} torch={meta['torch']} "
          f"load avg before {meta['loadavg_before']} after {meta['loadavg_after']} on {meta['cpus']} CPUs")
    print(f"{'out x in':>12} {'batch':>5}  {'impl':<28} {'median ms':>10} {'p25-p75 ms':>17} {'min ms':>8} {'GB/s':>7} {'% copy':>7}")
    for r in rows[1:]:
        if r["kind"] == "kernel":
            print(f"{r['out']:>5} x {r['in']:<5} {r['batch']:>5}  {r['impl']:<28} {r['median_ms']:>10.3f} "
                  f"{r['p25_ms']:>8.3f}-{r['p75_ms']:<8.3f} {r['min_ms']:>8.3f} {r['weight_GBps']:>7.2f} {r['pct_of_copy']:>6.0f}%")
    copies = sorted({round(r["copy_GBps"], 2) for r in rows if r["kind"] == "kernel"})
    if copies:
        print(f"copy bandwidth (256 MiB tensor copy, bytes copied / s) over the row sets: {copies} GB/s")
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
