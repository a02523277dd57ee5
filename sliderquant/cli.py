"""Command line: ``sliderquant quantize | eval | analyze | export | schedule``."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time

log = logging.getLogger("sliderquant")

# command-line overrides of QuantConfig fields: flag -> (field, type)
_OVERRIDES = {
    "--method": ("method", str), "--wbits": ("wbits", int), "--abits": ("abits", int),
    "--epochs": ("epochs", int), "--batch-size": ("batch_size", int), "--lwc-lr": ("lwc_lr", float),
    "--lora-lr": ("lora_lr", float), "--scale-lr": ("scale_lr", float),
    "--lora-rank": ("lora_rank", int), "--seed": ("seed", int), "--nsamples": ("nsamples", int),
    "--seqlen": ("seqlen", int),
    "--calib": ("calib", str), "--autocast": ("autocast", str),
}


def _group_size(text: str):
    if text.lower() in ("none", "channel", "per-channel", "null"):
        return "channel"
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--group-size takes an integer or 'channel', got {text!r}")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sliderquant", description="SliderQuant post-training quantization")
    sub = p.add_subparsers(dest="command", required=True)

    q = sub.add_parser("quantize", help="quantize a Hugging Face causal LM")
    q.add_argument("--model", required=True, help="local directory, hub id, .gguf file or smollm2-135m")
    q.add_argument("--gguf-file", default=None, help="GGUF file name inside --model")
    q.add_argument("--config", default=None, help="YAML config (e.g. configs/w2a16.yaml)")
    for flag, (_, typ) in _OVERRIDES.items():
        q.add_argument(flag, type=typ, default=None)
    q.add_argument("--group-size", type=_group_size, default=None, help="integer or 'channel'")
    q.add_argument("--symmetric", action=argparse.BooleanOptionalAction, default=None)
    q.add_argument("--out", required=True, help="output directory (Hugging Face format + codes)")
    q.add_argument("--format", default=None, choices=list(_export_formats()),
                   help="then also export to this format (see 'sliderquant export')")
    q.add_argument("--export-out", default=None,
                   help="where --format writes (default: OUT-FORMAT, or OUT.gguf for gguf)")
    q.add_argument("--work-dir", default=None, help="resumable work directory")
    q.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    q.add_argument("--calib-seed", type=int, default=0,
                   help="seed that draws the calibration windows (default 0, as data.get_calibration; "
                        "--seed is the training seed)")

    e = sub.add_parser("eval", help="perplexity and zero-shot accuracy of a (quantized) model")
    e.add_argument("--model", required=True)
    e.add_argument("--gguf-file", default=None)
    e.add_argument("--ppl", default=None,
                   help="comma-separated: wikitext2, c4, ptb or text files (each resolved from the offline "
                        "assets, else the Hugging Face hub, else an offline fallback text that is named in "
                        "the output)")
    e.add_argument("--seqlen", type=int, default=2048)
    e.add_argument("--max-windows", type=int, default=None)
    e.add_argument("--tasks", default=None,
                   help="comma-separated offline zero-shot tasks (piqa, arc_easy, arc_challenge, hellaswag, "
                        "winogrande, boolq, openbookqa, lambada), run with lm-eval in-process")
    e.add_argument("--limit", type=int, default=None, help="documents per zero-shot task")
    e.add_argument("--batch-size", type=int, default=8)
    e.add_argument("--num-fewshot", type=int, default=0)
    e.add_argument("--json", action="store_true", help="print one JSON object")
    e.add_argument("--threads", type=int, default=None)

    a = sub.add_parser("analyze", help="layer sensitivity: quantize one decoder layer at a time (RTN)")
    a.add_argument("--model", required=True, help="local directory, hub id, .gguf file or smollm2-135m")
    a.add_argument("--gguf-file", default=None, help="GGUF file name inside --model")
    a.add_argument("--wbits", type=int, required=True, help="weight bits (2 to 8)")
    a.add_argument("--group-size", type=_group_size, default="channel", help="integer or 'channel' (default)")
    a.add_argument("--symmetric", action="store_true", help="symmetric grid (default asymmetric)")
    a.add_argument("--nsamples", type=int, default=4)
    a.add_argument("--seqlen", type=int, default=256)
    a.add_argument("--calib", default="c4", help="c4, wikitext2, a text file, or 'sample' (from the model)")
    a.add_argument("--calib-seed", "--seed", dest="calib_seed", type=int, default=0,
                   help="seed that draws the calibration windows (default 0)")
    a.add_argument("--batch-size", type=int, default=4, help="sequences per forward")
    a.add_argument("--out", required=True, help="directory for sensitivity.csv and sensitivity.png")
    a.add_argument("--threads", type=int, default=None, help="torch CPU threads")

    x = sub.add_parser("export", help="write a quantized model in an inference engine's format")
    x.add_argument("--model", required=True, help="directory written by 'sliderquant quantize --out' (or save)")
    x.add_argument("--format", required=True, choices=list(_export_formats()))
    x.add_argument("--out", required=True, help="output directory (a .gguf file for gguf)")

    s = sub.add_parser("schedule", help="print the window schedule")
    s.add_argument("--layers", type=int, required=True)
    s.add_argument("--config", default=None)
    s.add_argument("--method", default=None)
    s.add_argument("--shallow", type=int, default=None)
    s.add_argument("--deep", type=int, default=None)
    s.add_argument("--size", type=int, default=None)
    s.add_argument("--stride", type=int, default=None)
    return p


def _config(args):
    from .config import QuantConfig
    cfg = QuantConfig.from_yaml(args.config) if args.config else QuantConfig()
    data = cfg.to_dict()
    for flag, (field, _) in _OVERRIDES.items():
        value = getattr(args, flag[2:].replace("-", "_"), None)
        if value is not None:
            data[field] = value
    if args.group_size is not None:
        data["group_size"] = None if args.group_size == "channel" else args.group_size
    if args.symmetric is not None:
        data["symmetric"] = args.symmetric
    return QuantConfig.from_dict(data)


def _tokens(model, tokenizer, source: str, nsamples: int, seqlen: int, seed: int):
    """``(tokens, name)``: calibration windows of c4 / wikitext2 / ptb / a file, or sampled from the
    model itself ("sample"), drawn with ``seed``; ``name`` is the text actually used."""
    from . import data
    t0 = time.time()
    if source == "sample":
        tokens = data.sample_from_model(model, nsamples, seqlen, seed=seed)
        used = f"sampled from the model (seed {seed})"
    else:
        tokens, used = data.get_calibration(source, tokenizer, nsamples, seqlen, seed, return_source=True)
    log.info("calibration: %s, %d x %d tokens, seed %d (%.1fs)", used, *tokens.shape, seed, time.time() - t0)
    return tokens, used


def cmd_quantize(args) -> int:
    from . import api, data
    from .methods import get_method
    cfg = _config(args)
    method = get_method(cfg.method)
    log.info("config: %s", json.dumps(cfg.to_dict()))
    model, tokenizer = data.load_model(args.model, gguf_file=args.gguf_file)
    calib = None
    if method.needs_calibration:
        calib, _ = _tokens(model, tokenizer, cfg.calib, cfg.nsamples, cfg.seqlen, args.calib_seed)
    t0 = time.time()
    api.quantize(model, cfg, calib, work_dir=args.work_dir)
    log.info("%s done in %.1fs", cfg.method, time.time() - t0)
    try:
        api.save(model, args.out, tokenizer=tokenizer)
    except Exception as e:  # noqa: BLE001 - whatever broke the save, the calibrated result must survive
        rescue = _rescue(model, args)
        again = (f"; or rerun the same command: --work-dir {args.work_dir} resumes after its last window"
                 if args.work_dir and method.trains_windows else "")
        raise RuntimeError(
            f"saving to {args.out} failed ({type(e).__name__}: {e}). The quantized result was kept in "
            f"{rescue}: load the full-precision model again, call sliderquant.api.apply_codes(model, "
            f"{rescue!r}) and then sliderquant.save(model, DIR){again}") from e
    log.info("saved to %s", args.out)
    if args.format:
        from .export import export
        out = args.export_out or _default_export_path(args.out, args.format)
        try:
            export(model, out, format=args.format, tokenizer=tokenizer)
        except ValueError as e:
            raise ValueError(f"{e} (the quantized model is saved in {args.out}; export it with "
                             f"'sliderquant export --model {args.out} --format FORMAT --out OUT')") from None
        log.info("exported %s to %s", args.format, out)
    return 0


def _export_formats():
    from .export import FORMATS
    return FORMATS


def _default_export_path(out: str, fmt: str) -> str:
    base = os.path.normpath(out)
    return base + ".gguf" if _export_formats()[fmt][2] == "file" else f"{base}-{fmt}"


def cmd_export(args) -> int:
    from . import api, data
    from .export import export
    model = api.load(args.model)
    try:
        tokenizer = data.load_tokenizer(args.model)
    except Exception as e:  # noqa: BLE001 - an export without tokenizer files is still a valid model
        log.warning("no tokenizer in %s (%s); the export will have no tokenizer files", args.model, e)
        tokenizer = None
    path = export(model, args.out, format=args.format, tokenizer=tokenizer)
    log.info("exported %s to %s", args.format, path)
    return 0


def _rescue(model, args) -> str:
    """Write the codes and config of a quantized model somewhere that works; return where.

    Tried in order: the work directory, beside ``--out``, the system's temporary directory."""
    import tempfile

    from . import api
    places = [os.path.join(args.work_dir, "rescue")] if args.work_dir else []
    places.append(os.path.normpath(args.out) + ".rescue")
    for place in places:
        try:
            api.write_codes(model, place)
            return place
        except Exception as e:  # noqa: BLE001 - try the next place
            log.warning("could not write the rescue codes to %s (%s)", place, e)
    place = tempfile.mkdtemp(prefix="sliderquant-rescue-")
    api.write_codes(model, place)
    return place


def cmd_eval(args) -> int:
    from . import api, data
    from .evaluate import perplexity
    if not args.ppl and not args.tasks:
        raise ValueError("eval needs --ppl DATASETS and/or --tasks TASKS")
    if os.path.exists(os.path.join(args.model, api.QUANT_META)):
        model = api.load(args.model)
        tokenizer = data.load_tokenizer(args.model)
    else:
        model, tokenizer = data.load_model(args.model, gguf_file=args.gguf_file)
    result = {"model": args.model, "seqlen": args.seqlen, "max_windows": args.max_windows, "perplexity": {}}
    state = getattr(model, "sliderquant_state", None)
    if state is not None:
        c = state["config"]
        result["quant"] = {k: c[k] for k in ("method", "wbits", "abits", "group_size")}
    for name in (args.ppl.split(",") if args.ppl else []):
        tokens, used = data.get_eval_tokens(name, tokenizer, args.seqlen, return_source=True)
        t0 = time.time()
        ppl = perplexity(model, tokens, args.seqlen, max_windows=args.max_windows, progress=not args.json)
        # keyed by the name asked for; "source" names the text measured (a fallback is another text)
        result["perplexity"][name] = {"perplexity": ppl, "seconds": time.time() - t0, "source": used}
    if args.tasks:
        import contextlib

        from .zeroshot import evaluate_zeroshot
        # lm-eval prints progress to stdout; keep stdout for our own output (--json must stay parseable)
        with contextlib.redirect_stdout(sys.stderr):
            result["zeroshot"] = evaluate_zeroshot(model, tokenizer, tasks=args.tasks, limit=args.limit,
                                                   batch_size=args.batch_size, num_fewshot=args.num_fewshot)
    if args.json:
        print(json.dumps(result))
        return 0
    if result["perplexity"]:
        windows = "all windows" if args.max_windows is None else f"at most {args.max_windows} windows"
        print(f"\nperplexity (seqlen {args.seqlen}, {windows})")
        print("| dataset | text measured | perplexity |\n|---|---|---:|")
        for name, r in result["perplexity"].items():
            print(f"| {name} | {r['source']} | {r['perplexity']:.4f} |")
    if args.tasks:
        from .zeroshot import markdown_table
        print()
        print(markdown_table(result["zeroshot"], title=f"zero-shot accuracy ({args.model})"))
    return 0


def cmd_analyze(args) -> int:
    from . import analyze, data
    analyze._check_bits(args.wbits)          # fail before loading the model
    model, tokenizer = data.load_model(args.model, gguf_file=args.gguf_file)
    tokens, used = _tokens(model, tokenizer, args.calib, args.nsamples, args.seqlen, args.calib_seed)
    group_size = None if args.group_size == "channel" else args.group_size
    t0 = time.time()
    result = analyze.layer_sensitivity(model, tokens, args.wbits, group_size=group_size,
                                       symmetric=args.symmetric, batch_size=args.batch_size)
    log.info("analysis done in %.1fs", time.time() - t0)
    name = os.path.basename(os.path.normpath(args.model))
    title = (f"{name}: layer sensitivity, {result.setting}, one layer at a time\n"
             f"({used}, {args.nsamples} x {args.seqlen} tokens)")
    paths = analyze.write_outputs(result, args.out, title)
    print(analyze.format_table(result))
    print(f"\nwrote {paths['csv']} and {paths['png']}")
    return 0


def cmd_schedule(args) -> int:
    from .config import QuantConfig
    from .engine import plan
    from .schedule import format_windows
    cfg = QuantConfig.from_yaml(args.config) if args.config else QuantConfig()
    changes = {"method": args.method, "shallow_layers": args.shallow, "deep_layers": args.deep,
               "window_size": args.size, "stride": args.stride}
    cfg = cfg.replace(**changes)
    windows, rates, _, epochs = plan(cfg, args.layers)
    print(f"{len(windows)} windows x {len(rates)} stages {rates}, {epochs} epochs per stage")
    print(format_windows(windows))
    return 0


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    if getattr(args, "threads", None):
        import torch
        torch.set_num_threads(args.threads)
    try:
        return {"quantize": cmd_quantize, "eval": cmd_eval, "schedule": cmd_schedule,
                "analyze": cmd_analyze, "export": cmd_export}[args.command](args)
    except (ValueError, FileNotFoundError, RuntimeError, ImportError) as e:
        log.error("%s", e)
        return 2


if __name__ == "__main__":
    sys.exit(main())
