"""Side by side with auto-round (issue 9): the same FP weights, the same token windows, one setting.

    SLIDERQUANT_ASSETS=/path/to/shared/assets python examples/compare_peers.py --setting w3g64 \
        --methods fp,rtn,gptq,autoround-light --windows 32
    python examples/compare_peers.py --table-only

Settings (all weight-only, activations in full precision): ``w3g64`` W3A16 asymmetric groups of 64,
``w2g64`` W2A16 asym g64, ``w4`` W4A16 asym per channel, ``w4g128`` W4A16 asym g128.

Methods: ``fp``; ``rtn`` and ``gptq`` (ours); ``autoround-light`` (auto-round's "light" recipe: 50
iterations, lr 5e-3, batch 8) and ``autoround`` (its default, 200 iterations; only with
``--with-autoround-default``), both run only when auto-round is installed (``pip install -e .[peers]``);
``sliderquant-paper`` (the paper-faithful preset ``configs/<preset>.yaml`` with ``--paper-epochs``
epochs, so that its wall time is about auto-round light's); ``sliderquant-fast`` (the CPU-budget
preset ``configs/fast/<preset>.yaml``, or ``--fast-config``).  The script installs nothing.

Protocol.  The FP model is loaded once and saved as safetensors in ``--work-dir``; every method loads
it from there.  The calibration windows (``data.get_calibration("c4", tok, nsamples, seqlen)``, seed
0) and the evaluation tokens are drawn once and saved beside it; every tool gets those same token
windows (auto-round as a list of ``1 x seqlen`` input_ids tensors, its ``dataset=`` argument).  Each
method runs in its own process, so its peak RSS (``ru_maxrss``) is its own: model load, quantization
and evaluation, with the peak after quantization recorded as well.  Wall time is the quantization
call alone (for auto-round: building ``AutoRound`` and ``quantize()``).  After quantization every
quantized linear is checked to lie on its grid: per group, the weight must equal ``(q - z) * s``
for an integer code ``q`` in range, bit for bit (auto-round 0.16's ``save_quantized(format="fake")``
writes the original weights back, so its in-memory weights and scales are checked instead).
Perplexity: the first ``--windows`` non-overlapping ``--eval-seqlen``-token windows of the WikiText-2
test text and of our C4 evaluation text (256 seeded windows of C4 documents 1000-1999).

Output: a row per method appended to ``<out-dir>/peers_<setting>.json`` as soon as it finishes (a
rerun skips the methods already there, ``--redo`` measures them again), and ``<out-dir>/peers.md``
regenerated from every ``peers_*.json`` there, with the commands, versions and machine state.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import importlib.metadata
import importlib.util
import json
import math
import os
import platform
import resource
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# sliderquant before torch: it sets GOMP_SPINCOUNT before OpenMP starts (sliderquant/openmp_env.py), and
# the method processes inherit it, so every tool runs with the same short spin.  With libgomp's default
# spin, a perplexity pass here took 10x longer while another job shared the 2 cores.
import sliderquant  # noqa: F401  (isort: skip)
import torch

HERE = Path(__file__).resolve().parent
CONFIGS = HERE.parent / "configs"
RESULTS = HERE / "results"

# setting -> (bits, group size or None, preset name)
SETTINGS = {
    "w3g64": (3, 64, "w3a16g64"),
    "w2g64": (2, 64, "w2a16g64"),
    "w4": (4, None, "w4a16"),
    "w4g128": (4, 128, "w4a16g128"),
}
METHODS = ("fp", "rtn", "gptq", "autoround-light", "autoround", "sliderquant-paper", "sliderquant-fast")
AUTOROUND_METHODS = ("autoround-light", "autoround")
AUTOROUND_VERSION = "0.16.1"            # the version issue 9 measured; another one runs with a warning
# auto-round's recipes (its CLI's RECIPES): iterations, learning rate (None: its own default), batch
AUTOROUND_RECIPES = {"autoround-light": (50, 5e-3, 8), "autoround": (200, None, 8)}
ZEROSHOT_TASKS = "piqa,arc_easy,hellaswag,winogrande"
GB = 1024 ** 3


# ---- the grid check ------------------------------------------------------------------------------------
def grid_violations(weight: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, bits: int,
                    group_size: int | None = None, symmetric: bool = False) -> int:
    """How many entries of ``weight`` are *not* ``(q - z) * s`` for an integer code ``q`` in range.

    ``weight`` is (out, in); ``scale`` and ``zero`` are (out, G), one value per row and group of
    ``group_size`` consecutive input columns (``None``: one group per row); the last group may be
    shorter (auto-round pads a row that its group size does not divide).  Codes run over
    ``[0, 2^bits - 1]`` (asymmetric) or ``[-2^(bits-1), 2^(bits-1) - 1]`` (symmetric, ``zero`` None or
    0).  The comparison is exact, in fp32, the precision both tools dequantize in: a weight one ulp
    off its grid point counts.
    """
    w = weight.detach().float()
    if w.dim() != 2:
        raise ValueError(f"weight must be (out, in), got shape {tuple(w.shape)}")
    out_f, in_f = w.shape
    g = in_f if group_size is None else int(group_size)
    n_groups = -(-in_f // g)
    s = scale.detach().float().reshape(out_f, -1)
    z = torch.zeros_like(s) if zero is None else zero.detach().float().reshape(out_f, -1)
    if s.shape[1] != n_groups or z.shape != s.shape:
        raise ValueError(f"scale {tuple(scale.shape)} / zero {None if zero is None else tuple(zero.shape)} do not "
                         f"give one value per row and group of {g} for a {out_f} x {in_f} weight "
                         f"({n_groups} groups per row)")
    cols = torch.arange(in_f) // g
    s, z = s[:, cols], z[:, cols]
    q = torch.round(w / s) + z
    qmin, qmax = (-2 ** (bits - 1), 2 ** (bits - 1) - 1) if symmetric else (0, 2 ** bits - 1)
    ok = (q == torch.round(q)) & (q >= qmin) & (q <= qmax) & ((q - z) * s == w)
    return int((~ok).sum())


def _grid_report(checked: dict, linears: int, bits: int) -> dict:
    """``checked``: name -> (off-grid count, group size used).  The row's ``grid`` entry."""
    widths = {}
    for name, (_, g, in_f) in checked.items():
        widths.setdefault(str(in_f), g if g is not None else "per-channel")
    return {"bits": bits, "linears": linears, "checked": len(checked),
            "off_grid": sum(v[0] for v in checked.values()),
            "off_grid_linears": sorted(n for n, v in checked.items() if v[0]),
            "group_size_by_input_width": widths}


def check_ours(model, bits: int) -> dict:
    """Grid check of a model quantized by sliderquant: its codes' scales and zero points."""
    from sliderquant.api import quantized_linears
    tensors = model.sliderquant_state["tensors"]
    symmetric = bool(model.sliderquant_state["config"].get("symmetric", False))
    linears = quantized_linears(model)
    checked = {}
    for name, lin in linears.items():
        s, z = tensors[f"{name}.scales"], tensors[f"{name}.zeros"]
        in_f = lin.weight.shape[1]
        g = in_f // s.shape[1]                        # our groups tile a row exactly
        checked[name] = (grid_violations(lin.weight, s, z, bits, g, symmetric), None if g == in_f else g, in_f)
    return _grid_report(checked, len(linears), bits)


def check_autoround(model, bits: int, group_size: int | None) -> dict:
    """Grid check of a model quantized in memory by auto-round: each quantized linear carries the
    ``scale`` and ``zp`` that auto-round's unwrapper set; a linear without them was left in FP."""
    from sliderquant.api import quantized_linears
    linears = quantized_linears(model)
    checked = {}
    for name, lin in linears.items():
        s, z = getattr(lin, "scale", None), getattr(lin, "zp", None)
        if not isinstance(s, torch.Tensor):
            continue
        in_f = lin.weight.shape[1]
        g = None if group_size is None or group_size >= in_f else group_size
        checked[name] = (grid_violations(lin.weight, s, z, bits, g), g, in_f)
    return _grid_report(checked, len(linears), bits)


# ---- configurations ---------------------------------------------------------------------------------------
def paper_preset(setting: str):
    """``(QuantConfig, description)`` of the paper-faithful preset of ``setting``.

    ``configs/<preset>.yaml`` when it exists; otherwise the preset of the same bit width per channel
    with the setting's group size (the presets differ only in ``wbits`` and ``group_size``).
    """
    from sliderquant.config import QuantConfig
    bits, group, preset = SETTINGS[setting]
    path = CONFIGS / f"{preset}.yaml"
    if path.is_file():
        return QuantConfig.from_yaml(path), f"configs/{path.name}"
    base = CONFIGS / f"w{bits}a16.yaml"
    if not base.is_file():
        return None, f"neither configs/{preset}.yaml nor configs/{base.name} exists"
    return (QuantConfig.from_yaml(base).replace(group_size=group),
            f"configs/{base.name} with group_size {group} (there is no configs/{preset}.yaml)")


def fast_preset_path(setting: str, fast_config: str | None) -> Path:
    return Path(fast_config) if fast_config else CONFIGS / "fast" / f"{SETTINGS[setting][2]}.yaml"


def _small_budget_options(cfg) -> str:
    """The non-paper options a preset turns on (docs/algorithm.md section 11), for the budget column."""
    from sliderquant.config import QuantConfig
    default = QuantConfig()
    names = ("epochs_per_stage", "round_lr", "lwc_param", "lwc_init", "lwc_opt", "round_opt", "window_loss_samples",
             "revert_worse_windows")
    return ", ".join(f"{n} {getattr(cfg, n)}" for n in names if getattr(cfg, n) != getattr(default, n))


def availability(method: str, args) -> str | None:
    """``None`` when ``method`` can run here, else the sentence that says why not."""
    if method in AUTOROUND_METHODS and importlib.util.find_spec("auto_round") is None:
        return (f"auto-round is not installed: pip install -e '.[peers]' (auto-round=={AUTOROUND_VERSION}) "
                f"to compare against it")
    if method == "sliderquant-paper" and paper_preset(args.setting)[0] is None:
        return paper_preset(args.setting)[1]
    if method == "sliderquant-fast":
        path = fast_preset_path(args.setting, args.fast_config)
        if not path.is_file():
            return f"no fast preset {path} (yet); give one with --fast-config"
    return None


# ---- machine, versions, commands ----------------------------------------------------------------------------
def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def versions(with_autoround: bool) -> dict:
    import transformers
    out = {"python": platform.python_version(), "torch": torch.__version__,
           "transformers": transformers.__version__, "sliderquant": _git_commit()}
    if with_autoround:
        out["auto-round"] = _version("auto-round")
    return out


def _git_commit() -> str:
    import sliderquant
    root = Path(sliderquant.__file__).resolve().parent.parent
    try:
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "--short=12", "HEAD"], capture_output=True,
                              text=True, timeout=30, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown (not a git checkout)"
    return head + (" (with uncommitted changes)" if dirty else "")


def machine() -> dict:
    cpu = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    try:
        mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GB
    except (ValueError, OSError, AttributeError):
        mem = math.nan
    return {"cpu": cpu, "cores": os.cpu_count(), "memory_gib": round(mem, 1), "platform": platform.platform()}


def load_average() -> list[float]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


def peak_rss_mib() -> float:
    # ru_maxrss is in KiB on Linux, in bytes on macOS
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(peak / (1024 * 1024 if sys.platform == "darwin" else 1024), 1)


def command_line(argv) -> str:
    assets = os.environ.get("SLIDERQUANT_ASSETS")
    prefix = f"SLIDERQUANT_ASSETS={shlex.quote(assets)} " if assets else ""
    return prefix + "python " + shlex.join(argv)


# ---- the shared FP model and token windows --------------------------------------------------------------------
def protocol(args) -> dict:
    """What must agree between the rows of one results file."""
    return {"model": args.model, "nsamples": args.nsamples, "seqlen": args.seqlen, "calib_seed": args.calib_seed,
            "windows": args.windows, "eval_seqlen": args.eval_seqlen,
            "zeroshot": f"{ZEROSHOT_TASKS}, limit {args.limit}" if args.zeroshot else None}


def _model_dir_name(model: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in model)


def prepare(args) -> dict:
    """Save the FP model once and draw the token windows once (kept in ``--work-dir`` for later runs).

    Returns ``{"fp_dir", "tokens", "sources"}``."""
    from safetensors.torch import load_file, save_file
    from sliderquant import data
    work = Path(args.work_dir)
    fp_dir = work / "fp"
    key = json.dumps([args.model, args.nsamples, args.seqlen, args.calib_seed, args.eval_seqlen])
    tokens_path = work / f"tokens-{hashlib.sha256(key.encode()).hexdigest()[:12]}.safetensors"
    sources_path = tokens_path.with_suffix(".json")
    if (fp_dir / "config.json").is_file() and tokens_path.is_file() and sources_path.is_file():
        print(f"shared FP model and tokens: {work} (from an earlier run)", flush=True)
        return {"fp_dir": str(fp_dir), "tokens": str(tokens_path), "sources": json.loads(sources_path.read_text())}
    work.mkdir(parents=True, exist_ok=True)
    print(f"loading {args.model} ...", flush=True)
    model, tok = data.load_model(args.model)
    if not (fp_dir / "config.json").is_file():
        _save_fp(model, tok, fp_dir)
        print(f"saved the FP model to {fp_dir}", flush=True)
    calib, calib_src = data.get_calibration("c4", tok, args.nsamples, args.seqlen, seed=args.calib_seed,
                                            return_source=True)
    tensors, sources = {"calibration": calib}, {"calibration": calib_src, "calib_seed": args.calib_seed, "eval": {}}
    for name in ("wikitext2", "c4"):
        tensors[f"eval_{name}"], sources["eval"][name] = data.get_eval_tokens(name, tok, args.eval_seqlen,
                                                                              return_source=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tokens_path))
    sources_path.write_text(json.dumps(sources, indent=1))
    assert all(torch.equal(v, load_file(str(tokens_path))[k]) for k, v in tensors.items())
    print(f"calibration: {calib_src}, seed {args.calib_seed}, {args.nsamples} x {args.seqlen} tokens", flush=True)
    return {"fp_dir": str(fp_dir), "tokens": str(tokens_path), "sources": sources}


def _save_fp(model, tokenizer, fp_dir: Path) -> None:
    """Write the FP model as an ordinary safetensors directory and check it reads back bit for bit.

    transformers marks a model it dequantized from GGUF as quantized and refuses ``save_pretrained``;
    its tensors are plain floats, so the marks are dropped from this object (not used afterwards)."""
    from transformers import AutoModelForCausalLM
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer = None
        model.is_quantized = False
        model.quantization_method = None
        model.config.__dict__.pop("quantization_config", None)
    tmp = fp_dir.with_name(fp_dir.name + ".tmp")
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    again = AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.float32).state_dict()
    for k, v in model.state_dict().items():
        if not torch.equal(again[k], v):
            raise RuntimeError(f"the saved FP model differs from the loaded one at {k}; not using {tmp}")
    os.replace(tmp, fp_dir)


# ---- one method, in its own process -----------------------------------------------------------------------------
def run_method(args) -> dict:
    """Quantize the shared FP model with ``args.child`` and measure it; the row (without load averages)."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from sliderquant import evaluate
    torch.set_num_threads(args.threads)
    method, (bits, group, _) = args.child, SETTINGS[args.setting]
    shared = json.loads(Path(args.shared).read_text())
    tokens = load_file(shared["tokens"])
    model = AutoModelForCausalLM.from_pretrained(shared["fp_dir"], dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(shared["fp_dir"])
    row = {"method": method}
    start = time.perf_counter()
    if method == "fp":
        row.update(tool="-", budget="-")
    elif method in AUTOROUND_METHODS:
        model = _run_autoround(model, tok, tokens["calibration"], method, bits, group, args, row)
    else:
        model = _run_ours(model, tokens["calibration"], method, bits, group, args, row)
    row["quantize_s"] = None if method == "fp" else round(time.perf_counter() - start, 1)
    row["peak_rss_quantize_mib"] = peak_rss_mib()
    if method in AUTOROUND_METHODS:
        row["grid"] = check_autoround(model, bits, group)
    elif method != "fp":
        row["grid"] = check_ours(model, bits)
    if "grid" in row:
        g = row["grid"]
        print(f"  grid check: {g['checked']}/{g['linears']} linears quantized, {g['off_grid']} weights off the "
              f"{bits}-bit grid", flush=True)
    for name in ("wikitext2", "c4"):
        t0 = time.perf_counter()
        row[f"ppl_{name}"] = evaluate.perplexity(model, tokens[f"eval_{name}"], args.eval_seqlen,
                                                 max_windows=args.windows, progress=False)
        print(f"  {name} perplexity {row[f'ppl_{name}']:.3f} ({time.perf_counter() - t0:.0f} s)", flush=True)
    if args.zeroshot:
        from sliderquant.zeroshot import evaluate_zeroshot
        zs = evaluate_zeroshot(model, tok, tasks=ZEROSHOT_TASKS, limit=args.limit)
        row["zeroshot_avg"] = zs["average"]["acc"]
        row["zeroshot"] = {k: v["acc"] for k, v in zs["tasks"].items()}
        row["zeroshot_stderr"] = {k: v["acc_stderr"] for k, v in zs["tasks"].items()}
        print(f"  zero-shot average acc {100 * row['zeroshot_avg']:.1f}% ({row['zeroshot']})", flush=True)
    row["peak_rss_mib"] = peak_rss_mib()
    row["threads"] = torch.get_num_threads()
    row["openmp_wait"] = {k: os.environ[k] for k in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT") if k in os.environ}
    row["versions"] = versions(method in AUTOROUND_METHODS)
    return row


def _run_ours(model, calib, method, bits, group, args, row):
    import sliderquant
    from sliderquant.config import QuantConfig
    from sliderquant.engine import resolve_autocast
    from sliderquant.methods import get_method
    if method in ("rtn", "gptq"):
        cfg = QuantConfig(method=method, wbits=bits, group_size=group, symmetric=False,
                          nsamples=args.nsamples, seqlen=args.seqlen)
        row.update(tool="sliderquant", config=f"method {method}",
                   budget="-" if method == "rtn" else f"damp {cfg.gptq_damp}, block {cfg.gptq_block_size}")
    else:
        if method == "sliderquant-paper":
            cfg, where = paper_preset(args.setting)
            cfg = cfg.replace(epochs=args.paper_epochs)
            where += f", epochs {args.paper_epochs}"
        else:
            path = fast_preset_path(args.setting, args.fast_config)
            cfg = QuantConfig.from_yaml(path)
            inside = path.resolve().is_relative_to(CONFIGS.parent)
            where = str(path.resolve().relative_to(CONFIGS.parent)) if inside else str(path)
        if (cfg.wbits, cfg.group_size, cfg.symmetric) != (bits, group, False):
            raise SystemExit(f"{where} quantizes W{cfg.wbits} group {cfg.group_size} "
                             f"{'sym' if cfg.symmetric else 'asym'}, not the setting {args.setting}")
        # the same windows for every tool: the preset's own nsamples/seqlen give way to the comparison's
        cfg = cfg.replace(nsamples=args.nsamples, seqlen=args.seqlen)
        extra = _small_budget_options(cfg) or "paper learning rates"
        epochs = f"{cfg.epochs} epoch{'' if cfg.epochs == 1 else 's'}"
        row.update(tool="sliderquant", config=where, precision=resolve_autocast(cfg, torch.device("cpu")),
                   budget=f"{epochs}, batch {cfg.batch_size}, {extra}")
    row["quant_config"] = cfg.to_dict()
    t0 = time.perf_counter()

    def on_window(done, total, _row):
        if done == total or done % max(1, total // 10) == 0:
            print(f"  window {done}/{total} ({time.perf_counter() - t0:.0f} s)", flush=True)

    get = get_method(cfg.method)
    return sliderquant.quantize(model, cfg, calib if get.needs_calibration else None,
                                on_window=on_window if get.trains_windows else None)


def _run_autoround(model, tok, calib, method, bits, group, args, row):
    from auto_round import AutoRound, SignRoundConfig
    iters, lr, batch = AUTOROUND_RECIPES[method]
    iters = args.iters if args.iters is not None else iters
    compile_ = {"auto": None, "on": True, "off": False}[args.autoround_compile]
    version = _version("auto-round")
    if version != AUTOROUND_VERSION:
        print(f"  note: auto-round {version} is installed; issue 9 measured {AUTOROUND_VERSION}", flush=True)
    # Our windows, one (1, seqlen) input_ids tensor each: auto-round iterates a non-string dataset as
    # given, runs the model on each tensor and caches the block inputs (calibration/llm.py, calib()).
    windows = [w.unsqueeze(0) for w in calib]
    signround = SignRoundConfig(iters=iters, lr=lr, bits=bits, group_size=-1 if group is None else group, sym=False)
    ar = AutoRound(model, tok, scheme="W4A16", alg_configs=signround, dataset=windows, nsamples=len(windows),
                   seqlen=calib.shape[1], batch_size=batch, device_map="cpu", enable_torch_compile=compile_)
    row.update(tool=f"auto-round {version}", config=f"{'light' if method == 'autoround-light' else 'default'} recipe",
               budget=f"{iters} iters, lr {'auto' if lr is None else lr}, batch {batch}",
               torch_compile=bool(ar.enable_torch_compile),
               calib_pad_tokens=int((calib == tok.pad_token_id).sum()) if tok.pad_token_id is not None else 0)
    quantized, _ = ar.quantize()
    return quantized


# ---- results files and the table ------------------------------------------------------------------------------
def results_path(out_dir, setting) -> Path:
    return Path(out_dir) / f"peers_{setting}.json"


def read_results(path: Path) -> dict | None:
    if not path.is_file():
        return None
    return json.loads(path.read_text())


def write_results(path: Path, results: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(results, indent=1) + "\n")
    os.replace(tmp, path)


def _fmt(v, spec=".2f") -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)


def _grid_cell(row) -> str:
    g = row.get("grid")
    if g is None:
        return "-"
    cell = "yes" if g["off_grid"] == 0 else f"**NO** ({g['off_grid']} weights)"
    return cell + ("" if g["checked"] == g["linears"] else f", {g['checked']}/{g['linears']} linears")


def markdown(out_dir) -> str:
    files = sorted(Path(out_dir).glob("peers_*.json"), key=lambda p: list(SETTINGS).index(p.stem[6:])
                   if p.stem[6:] in SETTINGS else len(SETTINGS))
    lines = ["# Side by side with auto-round (issue 9)", "",
             "Written by `examples/compare_peers.py` (`--table-only` regenerates it from the `peers_*.json` "
             "beside it). Each method ran in its own process from the same saved FP weights and the same "
             "calibration token windows; quantize = wall time of the quantization call; peak RSS = the "
             "process's, whole run (model load, quantization, evaluation); on grid = every quantized "
             "weight equals (q - z) * s for an integer code in range. Wall times are only comparable at "
             "similar load: the 1-minute load average before and after each method is given.", ""]
    for path in files:
        res = json.loads(path.read_text())
        rows = sorted(res["rows"], key=lambda r: METHODS.index(r["method"]) if r["method"] in METHODS else 99)
        p, src = res["protocol"], res.get("sources", {})
        bits, group, _ = SETTINGS.get(res["setting"], (None, None, None))
        lines.append(f"## {res['setting']}: W{bits}A16 asymmetric, "
                     f"{'per channel' if group is None else f'groups of {group}'}, {p['model']}")
        lines.append("")
        zs = any("zeroshot_avg" in r for r in rows)
        head = ["method", "tool", "budget", "quantize (s)", "peak RSS (GiB)", "WikiText-2 ppl", "C4 ppl"]
        head += ["zero-shot avg (%)"] if zs else []
        head += ["on grid", "load before -> after"]
        lines += ["| " + " | ".join(head) + " |", "|" + "---|" * 3 + "---:|" * (4 + zs) + "---|---|"]
        for r in rows:
            cells = [r["method"], r.get("tool", "-"), r.get("budget", "-"), _fmt(r.get("quantize_s"), ".0f"),
                     _fmt(r["peak_rss_mib"] / 1024 if r.get("peak_rss_mib") else None),
                     _fmt(r.get("ppl_wikitext2")), _fmt(r.get("ppl_c4"))]
            cells += [_fmt(100 * r["zeroshot_avg"], ".1f") if "zeroshot_avg" in r else "-"] if zs else []
            lb, la = r.get("load_before") or ["-"], r.get("load_after") or ["-"]
            cells += [_grid_cell(r), f"{lb[0]} -> {la[0]}"]
            lines.append("| " + " | ".join(str(c) for c in cells) + " |")
        lines.append("")
        ev = src.get("eval", {})
        lines.append(f"Calibration: {src.get('calibration', '?')}, seed {p['calib_seed']}, {p['nsamples']} x "
                     f"{p['seqlen']} tokens (the same windows for every tool). Perplexity: first {p['windows']} "
                     f"windows of {p['eval_seqlen']} tokens of WikiText-2 = {ev.get('wikitext2', '?')}; "
                     f"C4 = {ev.get('c4', '?')}." + (f" Zero-shot: {p['zeroshot']} documents per task."
                                                    if p.get("zeroshot") else ""))
        notes = sorted({f"{r['method']}: {r['config']}" + ("" if "torch_compile" not in r else
                        f", torch.compile {'on' if r['torch_compile'] else 'off'}") for r in rows if r.get("config")})
        widths = sorted({f"{r['method']}: {r['grid']['group_size_by_input_width']}" for r in rows
                         if r.get("grid") and group is not None})
        if notes:
            lines += ["", "Configurations: " + "; ".join(notes) + "."]
        if widths:
            lines += ["", "Group size used per input width: " + "; ".join(widths) + "."]
        lines += ["", "Commands:", "", "```bash"] + sorted({r["command"] for r in rows if r.get("command")}) + ["```"]
        vers: dict = {}
        for r in rows:
            for k, v in r.get("versions", {}).items():
                vers.setdefault(k, set()).add(str(v))
        lines += ["", "Versions: " + ", ".join(f"{k} {' / '.join(sorted(v))}" for k, v in sorted(vers.items())) + "."]
        machines = sorted({json.dumps(r.get("machine", {}), sort_keys=True) for r in rows})
        lines += ["", "Machine: " + "; ".join(
            f"{m.get('cpu')}, {m.get('cores')} cores, {m.get('memory_gib')} GiB" for m in map(json.loads, machines))
            + f"; torch threads {sorted({r.get('threads') for r in rows}, key=str)}; OpenMP wait "
            f"{' / '.join(sorted({_env_text(r.get('openmp_wait', {})) for r in rows}))}; run dates "
            f"{min(r.get('finished', '?') for r in rows)} to {max(r.get('finished', '?') for r in rows)}.", ""]
    return "\n".join(lines)


def _env_text(env: dict) -> str:
    return " ".join(f"{k}={v}" for k, v in sorted(env.items())) or "OpenMP defaults"


def write_table(out_dir) -> Path:
    path = Path(out_dir) / "peers.md"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(markdown(out_dir))
    return path


# ---- the driver -----------------------------------------------------------------------------------------------------
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--setting", choices=list(SETTINGS), help="the quantization setting of this run")
    p.add_argument("--methods", default=None,
                   help=f"comma-separated subset of {', '.join(METHODS)} (default: all that can run here; "
                        f"autoround only with --with-autoround-default)")
    p.add_argument("--with-autoround-default", action="store_true",
                   help="include auto-round's default recipe (200 iterations) in the default methods")
    p.add_argument("--model", default="smollm2-135m", help="smollm2-135m (default), stories260k, or a path")
    p.add_argument("--nsamples", type=int, default=32, help="calibration windows (default 32)")
    p.add_argument("--seqlen", type=int, default=256, help="tokens per calibration window (default 256)")
    p.add_argument("--calib-seed", type=int, default=0, help="seed that draws the calibration windows (default 0)")
    p.add_argument("--windows", type=int, default=32, help="perplexity windows per text (default 32)")
    p.add_argument("--eval-seqlen", type=int, default=512, help="tokens per perplexity window (default 512)")
    p.add_argument("--paper-epochs", type=int, default=2,
                   help="epochs of sliderquant-paper, cut so its wall time is about auto-round light's (default 2)")
    p.add_argument("--fast-config", default=None, help="the fast preset (default configs/fast/<preset>.yaml)")
    p.add_argument("--iters", type=int, default=None,
                   help="override the iterations of the auto-round recipes (smoke runs)")
    p.add_argument("--autoround-compile", choices=["auto", "on", "off"], default="auto",
                   help="auto-round's enable_torch_compile (auto: its own default, on for Linux)")
    p.add_argument("--zeroshot", action="store_true", help=f"also zero-shot accuracy on {ZEROSHOT_TASKS}")
    p.add_argument("--limit", type=int, default=500, help="documents per zero-shot task (default 500)")
    p.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1), help="torch threads (default 2)")
    p.add_argument("--work-dir", default=None,
                   help="where the shared FP model and tokens are kept (default <tmp>/sliderquant-peers/<model>)")
    p.add_argument("--out-dir", default=str(RESULTS), help="results directory (default examples/results)")
    p.add_argument("--redo", action="store_true", help="measure the given methods again even if they have rows")
    p.add_argument("--table-only", action="store_true", help="only regenerate peers.md from the peers_*.json")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--shared", help=argparse.SUPPRESS)
    p.add_argument("--row-out", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if not args.table_only and not args.setting:
        p.error("--setting is required (unless --table-only)")
    if args.work_dir is None:
        args.work_dir = os.path.join(tempfile.gettempdir(), "sliderquant-peers", _model_dir_name(args.model))
    return args


def chosen_methods(args) -> list[str]:
    if args.methods is None:
        wanted = [m for m in METHODS if m != "autoround" or args.with_autoround_default]
    else:
        wanted = [m.strip() for m in args.methods.split(",") if m.strip()]
        unknown = [m for m in wanted if m not in METHODS]
        if unknown:
            raise SystemExit(f"unknown method(s) {', '.join(unknown)}; choose from {', '.join(METHODS)}")
    runnable = []
    for m in wanted:
        why = availability(m, args)
        if why:
            print(f"skipping {m}: {why}", flush=True)
        else:
            runnable.append(m)
    return runnable


def _check_zeroshot_data() -> None:
    """Fail before any quantization when ``--zeroshot`` cannot run (lm-eval or the task data missing)."""
    from sliderquant import tasks
    try:
        if importlib.util.find_spec("lm_eval") is None:
            raise ImportError("--zeroshot needs lm-eval-harness: pip install -e '.[eval]'")
        for name in ZEROSHOT_TASKS.split(","):
            tasks.data_path(name)
    except (ImportError, FileNotFoundError) as exc:
        raise SystemExit(f"--zeroshot cannot run: {exc}") from None


def _child_env() -> dict:
    """The environment of a method's process: it imports the same sliderquant as this one."""
    import sliderquant
    root = str(Path(sliderquant.__file__).resolve().parent.parent)
    path = os.environ.get("PYTHONPATH", "")
    return dict(os.environ, PYTHONPATH=root + (os.pathsep + path if path else ""))


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    if args.child:
        row = run_method(args)
        Path(args.row_out).write_text(json.dumps(row, indent=1))
        return 0
    if args.table_only:
        print(f"wrote {write_table(args.out_dir)}")
        return 0
    import logging
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    methods = chosen_methods(args)
    if args.zeroshot:
        _check_zeroshot_data()
    path = results_path(args.out_dir, args.setting)
    results = read_results(path)
    proto = protocol(args)
    if results is not None and results["protocol"] != proto:
        diff = {k: (results["protocol"].get(k), v) for k, v in proto.items() if results["protocol"].get(k) != v}
        raise SystemExit(f"{path} holds rows measured under another protocol (file, this run: {diff}); "
                         f"choose another --out-dir or move that file away")
    done = {r["method"] for r in (results or {}).get("rows", [])}
    todo = [m for m in methods if args.redo or m not in done]
    for m in methods:
        if m not in todo:
            print(f"{m}: already in {path} (--redo measures it again)", flush=True)
    failed = []
    if todo:
        shared = prepare(args)
        if results is None:
            results = {"setting": args.setting, "protocol": proto, "sources": shared["sources"], "rows": []}
        shared_file = Path(args.work_dir) / f"shared-{os.getpid()}.json"
        shared_file.write_text(json.dumps(shared))
        script = str(Path(__file__).resolve())
        for i, method in enumerate(todo, 1):
            row_file = Path(args.work_dir) / f"row-{os.getpid()}-{method}.json"
            row_file.unlink(missing_ok=True)
            before = load_average()
            print(f"[{i}/{len(todo)}] {method} ({args.setting}, load {before}) ...", flush=True)
            t0 = time.perf_counter()
            rc = subprocess.run([sys.executable, script, *argv, "--child", method, "--shared", str(shared_file),
                                 "--row-out", str(row_file)], env=_child_env()).returncode
            after = load_average()
            if rc != 0 or not row_file.is_file():
                print(f"[{i}/{len(todo)}] {method} FAILED (exit status {rc}); see its output above; no row "
                      f"written", flush=True)
                failed.append(method)
                continue
            row = json.loads(row_file.read_text())
            row_file.unlink()
            row.update(load_before=before, load_after=after, machine=machine(),
                       command=command_line([os.path.relpath(script), *argv]),
                       finished=datetime.datetime.now().isoformat(timespec="seconds"),
                       process_s=round(time.perf_counter() - t0, 1))
            results["rows"] = [r for r in results["rows"] if r["method"] != method] + [row]
            write_results(path, results)
            print(f"[{i}/{len(todo)}] {method}: WikiText-2 {row['ppl_wikitext2']:.3f}, C4 {row['ppl_c4']:.3f}, "
                  f"quantize {_fmt(row.get('quantize_s'), '.0f')} s, peak RSS {row['peak_rss_mib'] / 1024:.2f} GiB, "
                  f"on grid: {_grid_cell(row)}, load {before} -> {after}; saved to {path}", flush=True)
        shared_file.unlink(missing_ok=True)
    if Path(args.out_dir).is_dir() and any(Path(args.out_dir).glob("peers_*.json")):
        print(f"wrote {write_table(args.out_dir)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
