"""Full comparison for one model: every method at every setting, perplexity and zero-shot accuracy.

    python examples/report.py --model smollm2-135m --out examples/results/smollm2_report \
        --nsamples 32 --seqlen 256 --epochs 2 --max-windows 16 --limit 200

For FP and for RTN, GPTQ, OmniQuant-mode and SliderQuant at W4A16 (per-channel and g128), W3A16
g128 and W2A16 g64, it measures WikiText-2 and C4 perplexity (GPTQ protocol) and the average
zero-shot accuracy over the offline lm-eval tasks, then writes ``results.json``, ``report.md``
(a Markdown table) and ``report.png`` (a chart) into ``--out``.  Every finished (setting, method)
is saved at once, so an interrupted run continues where it stopped when started again with the
same arguments.  All methods share the same calibration tokens and the same budget.  Each data set
is read from the offline assets, else the Hugging Face hub, else an offline fallback text; the
texts actually used are recorded in ``results.json`` (``"sources"``) and named under the table.
Runs from any directory.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import time
from pathlib import Path

import torch

import sliderquant
from sliderquant import data, evaluate
from sliderquant.config import QuantConfig
from sliderquant.engine import resolve_autocast

CONFIGS = Path(__file__).resolve().parent.parent / "configs"   # the presets, whatever the cwd
SETTINGS = {
    "W4A16": CONFIGS / "w4a16.yaml",
    "W4A16 g128": CONFIGS / "w4a16g128.yaml",
    "W3A16 g128": CONFIGS / "w3a16g128.yaml",
    "W2A16 g64": CONFIGS / "w2a16g64.yaml",
}
METHODS = ("rtn", "gptq", "omniquant", "sliderquant")
TRAINED = ("omniquant", "sliderquant")   # the methods that train windows (in the autocast precision)
TASKS = "piqa,arc_easy,arc_challenge,hellaswag,winogrande,boolq,openbookqa,lambada"


def _measure(model, tokenizer, eval_tokens, args) -> dict:
    out = {}
    for name, tokens in eval_tokens.items():
        out[f"ppl_{name}"] = evaluate.perplexity(model, tokens, args.eval_seqlen, max_windows=args.max_windows,
                                                 progress=False)
    if args.tasks:
        from sliderquant.zeroshot import evaluate_zeroshot
        zs = evaluate_zeroshot(model, tokenizer, tasks=args.tasks, limit=args.limit)
        out["zeroshot_avg"] = zs["average"]["acc"]
        out["zeroshot"] = {k: v["acc"] for k, v in zs["tasks"].items()}
        out["zeroshot_stderr"] = {k: v["acc_stderr"] for k, v in zs["tasks"].items()}
    return out


def _rows(results: dict) -> dict:
    """The measured rows ("setting/method" keys), without the "sources" record."""
    return {k: v for k, v in results.items() if "/" in k}


def _text_names(sources: dict) -> dict:
    """The names of the texts used (a source minus where it was read: the same text from anywhere)."""
    return {"calibration": sources["calibration"].split(" (")[0], "calib_seed": sources.get("calib_seed", 0),
            "eval": {n: s.split(" (")[0] for n, s in sources.get("eval", {}).items()}}


def _markdown(results: dict, args) -> str:
    sources, results = results.get("sources"), _rows(results)
    cols = [c for c in ("ppl_wikitext2", "ppl_c4", "zeroshot_avg") if any(c in r for r in results.values())]
    names = {"ppl_wikitext2": "WikiText-2 ppl", "ppl_c4": "C4 ppl", "zeroshot_avg": "zero-shot avg acc (%)"}
    lines = [f"| setting | method | {' | '.join(names[c] for c in cols)} | quantize s |",
             "|---|---|" + "---:|" * (len(cols) + 1)]
    for key, r in results.items():
        if key == "sources":
            continue
        setting, method = key.split("/")
        vals = [f"{100 * r[c]:.1f}" if c == "zeroshot_avg" else f"{r[c]:.2f}" for c in cols]
        lines.append(f"| {setting} | {method} | {' | '.join(vals)} | {r.get('seconds', 0):.0f} |")
    windows = "all windows" if args.max_windows is None else f"first {args.max_windows} windows"
    limit = "all documents" if args.limit is None else f"first {args.limit} documents per task"
    lines.append("")
    # rows written before precisions were recorded were all trained in fp32 (the CPU default then)
    precisions = sorted({r.get("precision", "fp32") for k, r in results.items() if k.split("/")[1] in TRAINED})
    # results written before sources were recorded used the offline assets (C4 docs 0-999, WikiText-2 test)
    sources = sources or {"calibration": "c4 (offline assets, documents 0-999)"}
    calib = f"{sources['calibration']}, seed {sources.get('calib_seed', 0)}"
    measured = "; ".join(f"{n} = {src}" for n, src in sources.get("eval", {}).items())
    lines.append(f"{args.model}; calibration: {calib}, {args.nsamples} x {args.seqlen} tokens, "
                 f"{args.epochs} epochs, batch {args.batch_size}, {'/'.join(precisions) or '-'} training; "
                 f"perplexity seqlen {args.eval_seqlen}, {windows}{'; texts: ' + measured if measured else ''}; "
                 f"zero-shot tasks {args.tasks or '-'} ({limit}).")
    return "\n".join(lines)


def _chart(results: dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    results = _rows(results)
    settings = list(dict.fromkeys(k.split("/")[0] for k in results if not k.startswith("FP")))
    fp = results.get("FP/fp", {})
    metrics = [m for m in ("ppl_wikitext2", "ppl_c4", "zeroshot_avg") if m in fp]
    fig, axes = plt.subplots(1, len(metrics), figsize=(5 * len(metrics), 4), squeeze=False)
    width = 0.8 / len(METHODS)
    for ax, metric in zip(axes[0], metrics):
        for j, method in enumerate(METHODS):
            vals = [results.get(f"{s}/{method}", {}).get(metric, float("nan")) for s in settings]
            ax.bar([i + j * width for i in range(len(settings))], vals, width, label=method)
        ax.axhline(fp[metric], color="black", linestyle="--", label="fp")
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(settings))], settings)
        if metric.startswith("ppl"):
            ax.set_yscale("log")
        ax.set_title({"ppl_wikitext2": "WikiText-2 perplexity", "ppl_c4": "C4 perplexity",
                      "zeroshot_avg": "average zero-shot accuracy"}[metric])
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--out", required=True)
    p.add_argument("--settings", default=",".join(SETTINGS), help="comma-separated subset of " + ", ".join(SETTINGS))
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--nsamples", type=int, default=32)
    p.add_argument("--seqlen", type=int, default=256)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--eval-seqlen", type=int, default=512)
    p.add_argument("--max-windows", type=int, default=16)
    p.add_argument("--ppl", default="wikitext2,c4")
    p.add_argument("--tasks", default=TASKS, help="'' to skip zero-shot")
    p.add_argument("--limit", type=int, default=200)
    p.add_argument("--calib-seed", type=int, default=data.CALIB_SEED,
                   help=f"seed that draws the calibration windows (default {data.CALIB_SEED})")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--autocast", default="auto", choices=["auto", "fp32", "bf16"],
                   help="training precision; auto = bf16 where the CPU multiplies bf16 natively (kept per row)")
    p.add_argument("--render-only", action="store_true", help="only write report.md/png from results.json")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    torch.set_num_threads(args.threads)
    os.makedirs(args.out, exist_ok=True)
    results_path = os.path.join(args.out, "results.json")
    results = json.load(open(results_path)) if os.path.exists(results_path) else {}
    if args.render_only:
        return _render(results, args)

    model, tokenizer = data.load_model(args.model)
    calib, calib_source = data.get_calibration("c4", tokenizer, args.nsamples, args.seqlen, seed=args.calib_seed,
                                               return_source=True)
    eval_tokens, eval_sources = {}, {}
    for name in filter(None, args.ppl.split(",")):
        eval_tokens[name], eval_sources[name] = data.get_eval_tokens(name, tokenizer, args.eval_seqlen,
                                                                     return_source=True)
    sources = {"calibration": calib_source, "calib_seed": args.calib_seed, "eval": eval_sources}
    if _text_names(results.get("sources", sources)) != _text_names(sources):
        raise SystemExit(f"{results_path} was measured on other data ({results.get('sources')}) than this run "
                         f"would use ({sources}); choose another --out")
    results["sources"] = sources
    print(f"calibration: {calib_source}, seed {args.calib_seed}")
    for name, src in eval_sources.items():
        print(f"eval {name}: {src}")

    def record(key, row):
        results[key] = row
        with open(results_path + ".tmp", "w") as f:
            json.dump(results, f, indent=1)
        os.replace(results_path + ".tmp", results_path)
        print(f"{key}: " + ", ".join(f"{k}={v:.4g}" for k, v in row.items() if isinstance(v, float)), flush=True)

    if "FP/fp" not in results:
        record("FP/fp", _measure(model, tokenizer, eval_tokens, args))
    for setting in args.settings.split(","):
        base = QuantConfig.from_yaml(SETTINGS[setting])
        for method in args.methods.split(","):
            key = f"{setting}/{method}"
            if key in results:
                continue
            cfg = copy.deepcopy(base)
            cfg.method = method
            cfg.nsamples, cfg.seqlen, cfg.epochs, cfg.batch_size = args.nsamples, args.seqlen, args.epochs, args.batch_size
            cfg.autocast = args.autocast
            t0 = time.time()
            qmodel = sliderquant.quantize(copy.deepcopy(model), cfg, None if method == "rtn" else calib)
            seconds = time.time() - t0
            row = _measure(qmodel, tokenizer, eval_tokens, args)
            row["seconds"] = seconds
            if method in TRAINED:
                row["precision"] = resolve_autocast(cfg, next(model.parameters()).device)
            record(key, row)
            del qmodel
    _render(results, args)


def _render(results: dict, args) -> None:
    if "FP/fp" not in results:
        raise SystemExit(f"no results yet in {args.out}/results.json")
    with open(os.path.join(args.out, "report.md"), "w") as f:
        f.write(_markdown(results, args) + "\n")
    _chart(results, os.path.join(args.out, "report.png"))
    print(_markdown(results, args))


if __name__ == "__main__":
    main()
