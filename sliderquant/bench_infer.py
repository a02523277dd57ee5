"""``python -m sliderquant.bench infer``: packed low-bit inference against torch on this CPU.

Per-kernel rows: y = x W^T for (out, in) = (4096, 4096), (11008, 4096), (4096, 11008), batch 1
(decode) and 64 (prefill): our packed W2/W3/W4 g128 kernels (fp32 x), ``F.linear`` fp32 and bf16,
and torch's own int4 CPU kernel (``aten._weight_int4pack_mm_for_cpu``, bf16 x) for 4-bit; plus the
copy bandwidth of the same run (a tensor copy of the working-set size, bytes copied per second) so
the GEMV rows can be read as a fraction of it.  At batch 1 each contender cycles over distinct copies
of its weights adding up to ``--working-set-mib`` (512 MiB; this CPU may have a 260 MB L3), so a
GEMV streams from memory as in a real model's decode; plus SmolLM2-135M decode tokens/s (batch 1,
greedy, 128 new tokens), packed W4 g128 against the bf16 model (and the packed model with torch's
``F.linear`` for its unquantized bf16 head instead of our dense kernel, to show what each part of
the runtime gives), and, when the ``cyllama`` package is
installed, llama.cpp decoding our GGUF export of the same RTN W4 g128 model (Q4_1) against an F16
GGUF of the unquantized model, same prompt and thread count.  All contenders are timed interleaved
(one call of each per round), medians over rounds, spread = the 25th to 75th percentile.  The
machine's load averages are recorded: on a shared machine, read the spread before the medians.
"""
from __future__ import annotations

import argparse
import copy
import importlib.metadata
import importlib.util
import json
import logging
import os
import statistics
import subprocess
import tempfile
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


class LlamaCppDecode:
    """Greedy decoding of a GGUF file by llama.cpp through cyllama, in llama.cpp's own loop (its
    ``simple`` example): the prompt in one ``llama_decode``, then one token per ``llama_decode``, a
    greedy sampler with the end-of-generation tokens masked (as transformers' ``min_new_tokens``
    masks EOS, so every run makes ``n`` tokens).  Each call decodes once in a fresh KV cache and
    appends llama.cpp's own counters to ``runs``: prompt processing and generation timed apart."""

    def __init__(self, path: str, prompt: List[int], n: int, threads: int):
        import cyllama.llama.llama_cpp as L
        L.disable_logging()
        self.L, self.prompt, self.n = L, [int(t) for t in prompt], n
        self.model = L.LlamaModel(path, L.LlamaModelParams())
        vocab = self.model.get_vocab()
        params = L.LlamaContextParams()
        params.n_ctx = len(self.prompt) + n
        params.n_batch = len(self.prompt)
        params.n_threads = params.n_threads_batch = threads
        params.no_perf = False
        self.ctx = L.LlamaContext(self.model, params)
        chain = L.LlamaSamplerChainParams()
        chain.no_perf = False
        self.sampler = L.LlamaSampler(chain)
        eog = [(t, float("-inf")) for t in range(vocab.n_vocab) if vocab.is_eog(t)]
        if eog:
            self.sampler.add_logit_bias(vocab.n_vocab, eog)
        self.sampler.add_greedy()
        self.runs: List[dict] = []

    def __call__(self) -> List[int]:
        L, ctx = self.L, self.ctx
        ctx.kv_cache_clear()
        ctx.reset_perf_data()
        self.sampler.reset()
        ctx.decode(L.llama_batch_get_one(self.prompt, 0))
        tokens = [self.sampler.sample(ctx, -1)]
        for pos in range(len(self.prompt), len(self.prompt) + self.n - 1):
            ctx.decode(L.llama_batch_get_one([tokens[-1]], pos))
            tokens.append(self.sampler.sample(ctx, -1))
        self.runs.append({**ctx.get_perf_data(), "tokens": tokens})
        return tokens

    def close(self) -> None:
        self.sampler.close()
        self.ctx.close()
        self.model.close()


def llama_cpp_reader() -> str:
    """The reader's name and versions, as the rows are labelled."""
    import cyllama.llama.llama_cpp as L
    return f"llama.cpp ggml {L.ggml_version()} ({L.ggml_commit()}) via cyllama {importlib.metadata.version('cyllama')}"


def export_float_gguf(model, tokenizer, path: str, kind: str = "f16") -> dict:
    """``model``'s own weights (not quantized) as an F16 (or F32) GGUF, for llama.cpp's baseline.

    The exporter writes quantized models only, but a linear no GGUF block type holds is written as
    ``fallback_type``, dequantized.  So each decoder linear is described by codes ``q = W``, scale 1
    and zero 0 in groups of one weight (no block holds those): its "dequantized" weight is ``W``
    itself, written with the exporter's own metadata, vocabulary and q/k row order.  The state is
    removed afterwards; the file's ``sliderquant.*`` keys describe this stand-in, not a quantization."""
    from . import models
    from .export.gguf import export_gguf
    if getattr(model, "sliderquant_state", None) is not None:
        raise ValueError("export_float_gguf: pass the unquantized model (this one carries a quantization state)")
    layers = models.decoder_layers(model)
    prefix = next(n for n, m in model.named_modules() if m is layers)
    tensors = {}
    for name, module in model.named_modules():
        if name.startswith(prefix + ".") and isinstance(module, torch.nn.Linear):
            w = module.weight.detach().float()
            for part, t in (("qweight", w), ("scales", torch.ones(()).expand(w.shape)),
                            ("zeros", torch.zeros(()).expand(w.shape))):
                tensors[f"{name}.{part}"] = t
    model.sliderquant_state = {"config": {"method": "unquantized (float GGUF baseline)", "wbits": 8,
                                          "group_size": 1, "symmetric": True}, "tensors": tensors}
    exporter_log = logging.getLogger("sliderquant.export.gguf")
    level = exporter_log.level
    exporter_log.setLevel(logging.ERROR)     # the fallback is the point here, its warnings are expected
    try:
        summary = export_gguf(model, path, tokenizer, embed_type=kind, fallback_type=kind)
    finally:
        exporter_log.setLevel(level)
        del model.sliderquant_state
    linear = {ty for n, ty in summary["tensor_types"].items() if n.startswith("blk.") and "norm" not in n}
    if linear != {kind.upper()}:
        raise RuntimeError(f"export_float_gguf: the exporter wrote the linears as {sorted(linear)}, not "
                           f"{kind.upper()}; its fallback for groups that split a GGUF block has changed")
    return summary


def _gguf_linears(path: str):
    """Bytes of the decoder linears in a GGUF file, and their types (the most common one first)."""
    import gguf
    counts: Dict[str, int] = {}
    nbytes = 0
    for t in gguf.GGUFReader(path).tensors:
        if t.name.startswith("blk.") and not t.name.endswith("norm.weight"):
            nbytes += int(t.n_bytes)
            counts[t.tensor_type.name] = counts.get(t.tensor_type.name, 0) + 1
    return nbytes, sorted(counts, key=lambda ty: -counts[ty])


def _llama_cpp_missing():
    """Why llama.cpp cannot be benchmarked here, or None."""
    if importlib.util.find_spec("cyllama") is None:
        return "cyllama is not installed (pip install cyllama==0.2.18 brings llama.cpp)"
    if importlib.util.find_spec("gguf") is None:
        return "the gguf package, which writes GGUF files, is not installed (pip install gguf)"
    return None


def _gguf_refusal(export, *args, **kwargs):
    """None once ``export(*args, **kwargs)`` has written its file, or the exporter's refusal."""
    from .export.gguf import GGUFExportError
    try:
        export(*args, **kwargs)
    except GGUFExportError as e:
        return f"the GGUF exporter refused the model: {e}"
    return None


def _decode_rows(args) -> List[dict]:
    import sliderquant
    from . import data
    model, tok = data.load_model(args.model)
    bf16 = copy.deepcopy(model).to(torch.bfloat16).eval()
    ids = tok("The history of the city begins", return_tensors="pt").input_ids
    n = args.decode_tokens
    with tempfile.TemporaryDirectory(prefix="sliderquant-bench-gguf-") as tmp:
        f16, w4 = os.path.join(tmp, "f16.gguf"), os.path.join(tmp, "w4.gguf")
        skipped = _llama_cpp_missing()
        skipped = skipped or _gguf_refusal(export_float_gguf, model, tok, f16)      # before quantizing
        sliderquant.quantize(model, {"method": "rtn", "wbits": 4, "group_size": args.group_size}, None)
        skipped = skipped or _gguf_refusal(sliderquant.export, model, w4, format="gguf", tokenizer=tok)
        pk = packed.pack_model(model).to(torch.bfloat16).eval()

        def gen(m):
            with torch.no_grad():
                out = m.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                                 pad_token_id=tok.eos_token_id)
            assert out.shape[1] == ids.shape[1] + n
            return out[0, ids.shape[1]:].tolist()
        # the same packed model with torch's F.linear for the bf16 head (what the dense kernel saves)
        calls = {"bf16 model": lambda: gen(bf16), "packed W4 model": lambda: gen(pk)}
        if type(pk.get_output_embeddings()) is packed.DenseLinear:
            pk_torch_head = copy.deepcopy(pk)
            pk_torch_head.get_output_embeddings().__class__ = torch.nn.Linear
            calls["packed W4, torch head"] = lambda: gen(pk_torch_head)
        lin_bytes = {"bf16 model": sum(p.numel() * 2 for nm, p in bf16.named_parameters()
                                       if nm.endswith(".weight") and "layers." in nm and p.dim() == 2),
                     "packed W4 model": packed.packed_bytes(pk), "packed W4, torch head": packed.packed_bytes(pk)}
        llama, gguf_types = {}, {}
        for path in ([] if skipped else [w4, f16]):
            lin_b, types = _gguf_linears(path)
            impl = f"llama.cpp {types[0]}" if path == f16 or types[0] != "F16" else "llama.cpp W4 export"
            llama[impl] = calls[impl] = LlamaCppDecode(path, ids[0].tolist(), n, args.threads)
            lin_bytes[impl], gguf_types[impl] = lin_b, "+".join(types)
        outputs: Dict[str, List[List[int]]] = {k: [] for k in calls}
        res = _interleaved({k: (lambda k=k, f=f: outputs[k].append(f())) for k, f in calls.items()},
                           args.decode_rounds)
        reader = llama_cpp_reader() if llama else None
        for dec in llama.values():
            dec.close()
    rows = []
    for name, r in res.items():
        row = {"kind": "decode", "model": args.model, "impl": name, "new_tokens": n, **r,
               "tokens_per_s": n / (r["median_ms"] * 1e-3),
               "tokens_per_s_p25_p75": [n / (r["p75_ms"] * 1e-3), n / (r["p25_ms"] * 1e-3)],
               "decoder_linear_bytes": lin_bytes[name], "prompt_tokens": ids.shape[1],
               "first_tokens": outputs[name][0][:8],
               "same_tokens_every_round": all(o == outputs[name][0] for o in outputs[name])}
        if name in llama:
            runs = llama[name].runs[1:]          # the first call is the warm-up
            per_token = [1e-3 * p["t_eval_ms"] / p["n_eval"] for p in runs if p["n_eval"]]   # seconds
            q = _quantiles(per_token) if per_token else None
            row.update({"reader": reader, "gguf_types": gguf_types[name], "threads": args.threads,
                        "prompt_ms": statistics.median(p["t_p_eval_ms"] for p in runs),
                        "generation_tokens": n - 1,
                        "generation_tokens_per_s": 1e3 / q["median_ms"] if q else None,
                        "generation_tokens_per_s_p25_p75": [1e3 / q["p75_ms"], 1e3 / q["p25_ms"]] if q else None})
        rows.append(row)
    by = {r["impl"]: r for r in rows}
    ours = by["packed W4 model"]
    ours["speedup_vs_bf16"] = ours["tokens_per_s"] / by["bf16 model"]["tokens_per_s"]
    ours["tokens_per_s_ratio_to"] = {k: ours["tokens_per_s"] / r["tokens_per_s"]
                                     for k, r in by.items() if r is not ours}
    for impl in llama:
        if impl != "llama.cpp F16":
            by[impl]["speedup_vs_f16"] = by[impl]["tokens_per_s"] / by["llama.cpp F16"]["tokens_per_s"]
    if skipped:
        rows.append({"kind": "decode_skipped", "model": args.model, "impl": "llama.cpp", "reason": skipped})
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
            extra = f"  speedup {r['speedup_vs_bf16']:.2f}x vs bf16" if "speedup_vs_bf16" in r else ""
            extra += f"  speedup {r['speedup_vs_f16']:.2f}x vs llama.cpp F16" if "speedup_vs_f16" in r else ""
            extra += "".join(f"; {v:.2f}x {k}" for k, v in r.get("tokens_per_s_ratio_to", {}).items()
                             if k.startswith("llama.cpp") and k != "llama.cpp F16")
            print(f"decode {r['model']} {r['impl']:<16} {r['tokens_per_s']:7.2f} tok/s ({lo:.2f}-{hi:.2f}; best "
                  f"{r['new_tokens'] / (r['min_ms'] * 1e-3):.2f}), "
                  f"decoder linears {r['decoder_linear_bytes'] / 2**20:.1f} MiB{extra}")
            if r.get("generation_tokens_per_s"):
                glo, ghi = r["generation_tokens_per_s_p25_p75"]
                print(f"{'':>7}{r['impl']}: generation alone {r['generation_tokens_per_s']:.2f} tok/s "
                      f"({glo:.2f}-{ghi:.2f}) over {r['generation_tokens']} tokens, prompt of "
                      f"{r['prompt_tokens']} tokens {r['prompt_ms']:.1f} ms (llama.cpp's counters); {r['reader']}")
        elif r["kind"] == "decode_skipped":
            print(f"decode {r['model']} {r['impl']} rows skipped: {r['reason']}")
    if any(r["kind"] == "decode" for r in rows):
        print("decode tok/s = new tokens / wall time of the whole greedy decode, prompt included, for every row")


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
