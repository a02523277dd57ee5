"""The block-reconstruction loop of ALGORITHM.md sections 2-5, shared by SliderQuant and OmniQuant.

For every stage (quant ratio) and every window of the schedule: the teacher (the same layers with
quantization switched off) maps the fp inputs ``X_fp`` to targets ``Y``; the student (fake-quantized
layers) maps the quantized-model inputs ``X_q``; AdamW minimises their MSE over the learnable
quantization parameters.  The inputs advance when a window's first layer moves; every stage
restarts from the captured layer-0 inputs.  At the end the parameters are folded into the weights.

Determinism (what makes resume exact): no global RNG is used; mini-batch order comes from a
generator seeded by (seed, stage, window), LoRA factors from one seeded by (seed, layer, linear),
and the inputs of a window are recomputed from layer 0 with the same chunking on resume.

Precision: ``autocast: auto`` means bf16 autocast with fp32 master parameters (the authors'
setting) on CUDA and on CPUs that multiply bf16 natively (AMX-BF16 or AVX512-BF16, see
``ops.native_bf16``), and plain fp32 on other CPUs, where bf16 matmuls are emulated and were measured
about 10x slower.  On this project's Sapphire Rapids machine a SmolLM2 window trains about 2x faster
in bf16 (``python -m sliderquant.bench calibrate``).  Under autocast the fake-quantized weights are
produced in bf16 directly by the kernels.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import time

import torch
import torch.nn.functional as F
from torch import nn

from . import models
from .checkpoint import WorkDir, fingerprint
from .config import QuantConfig
from .layers import QuantLinear
from .schedule import explicit_windows, format_windows, single_layer_windows, sliding_windows

log = logging.getLogger(__name__)

CHUNK = 8                              # samples per no-grad forward
EXIT_HOOK = "SLIDERQUANT_TEST_EXIT_AFTER_STEP"   # tests: os._exit after this many windows


def quantize_model(model: nn.Module, cfg: QuantConfig, calibration: torch.Tensor | None = None,
                   work_dir: str | None = None) -> nn.Module:
    """Quantize ``model`` in place with ``cfg``; returns it with ``model.sliderquant_state``."""
    models.family_of(model)
    if getattr(model, "sliderquant_state", None) is not None:
        raise ValueError("this model is already quantized by sliderquant; start from the fp model")
    layers = models.decoder_layers(model)
    was_training = model.training
    model.eval()
    if cfg.method == "rtn":
        from .methods.rtn import quantize_rtn
        quantize_rtn(model, cfg)
    else:
        calibration = _check_calibration(calibration, model)
        dtype = next(layers.parameters()).dtype
        layers.float()
        try:
            x0, layer_kwargs = models.capture_layer0_inputs(model, calibration)
            x0 = x0.float()
            layer_kwargs = models.kwargs_to(layer_kwargs, dtype=torch.float32)
            if cfg.method == "gptq":
                _run_gptq(model, layers, cfg, x0, layer_kwargs)
            else:
                work = None
                if work_dir is not None:
                    # the resolved precision too: 'auto' may mean bf16 on one machine, fp32 on another
                    precision = resolve_autocast(cfg, x0.device)
                    work = WorkDir(work_dir, fingerprint(cfg.fingerprint(), calibration,
                                                         extra=model.config.to_json_string() + precision))
                _run_windows(model, layers, cfg, x0, layer_kwargs, work)
            attach_state(model, cfg)     # before the cast back: codes and fp32 scales stay exact
        finally:
            layers.to(dtype)
    if cfg.method == "rtn":
        attach_state(model, cfg)
    model.train(was_training)
    return model


def _check_calibration(calibration, model) -> torch.Tensor:
    if not isinstance(calibration, torch.Tensor) or calibration.dim() != 2 or \
            calibration.dtype not in (torch.long, torch.int32, torch.int64):
        raise ValueError("calibration must be a LongTensor of token ids of shape (nsamples, seqlen)")
    vocab = getattr(model.config, "vocab_size", None)
    if vocab is not None and (calibration.min() < 0 or calibration.max() >= vocab):
        raise ValueError(f"calibration token ids must lie in [0, {vocab}) (the model's vocabulary)")
    return calibration.long()


# ---- wrapping and unwrapping -----------------------------------------------------------------------
def wrap_layers(model: nn.Module, cfg: QuantConfig, lwc: bool, lora_rank: int,
                channel_scale: bool = False) -> list[dict[str, QuantLinear]]:
    """Swap every linear of every decoder layer for a ``QuantLinear``."""
    wrapped = []
    for i, layer in enumerate(models.decoder_layers(model)):
        qls = {}
        for j, (name, lin) in enumerate(models.layer_linears(model, layer).items()):
            if isinstance(lin, QuantLinear):
                raise RuntimeError("this model is already quantized by sliderquant")
            gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + i * 1009 + j)
            ql = QuantLinear(lin, cfg.wbits, cfg.group_size, cfg.symmetric, cfg.abits,
                             lora_rank=lora_rank, lwc=lwc, channel_scale=channel_scale,
                             lora_scaling=cfg.lora_alpha / max(lora_rank, 1), generator=gen)
            ql.to(lin.weight.device)
            models.set_submodule(layer, name, ql)
            qls[name] = ql
        wrapped.append(qls)
    return wrapped


def attach_state(model: nn.Module, cfg: QuantConfig) -> None:
    """Replace finalized ``QuantLinear``s by plain linears; keep codes/scales/zeros on the model."""
    tensors = {}
    for name, mod in list(model.named_modules()):
        if isinstance(mod, QuantLinear):
            if not mod.finalized:
                raise RuntimeError(f"{name} was not finalized")
            tensors[f"{name}.qweight"] = mod.qweight
            tensors[f"{name}.scales"] = mod.scales
            tensors[f"{name}.zeros"] = mod.zeros
            models.set_submodule(model, name, mod.to_linear())
    model.sliderquant_state = {"config": cfg.to_dict(), "tensors": tensors}


@contextlib.contextmanager
def teacher_mode(qlayers):
    """The same layers in full precision: the teacher of the reconstruction."""
    qls = [q for d in qlayers for q in d.values()]
    for q in qls:
        q.quantize = False
    try:
        yield
    finally:
        for q in qls:
            q.quantize = True


def resolve_autocast(cfg: QuantConfig, device: torch.device) -> str:
    """``'bf16'`` or ``'fp32'``: the precision the windows train in (``autocast: auto`` decides by device)."""
    if cfg.autocast != "auto":
        return cfg.autocast
    if device.type == "cuda":
        return "bf16"
    if device.type == "cpu":
        from . import ops
        return "bf16" if ops.native_bf16() else "fp32"
    return "fp32"


def _autocast(cfg: QuantConfig, device: torch.device):
    if resolve_autocast(cfg, device) == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


@torch.no_grad()
def forward_layers(layers, x: torch.Tensor, layer_kwargs: dict, amp) -> torch.Tensor:
    """Run ``x`` through ``layers`` in chunks of ``CHUNK`` samples (fixed, so results repeat)."""
    if not len(layers):
        return x
    outs = []
    for start in range(0, x.shape[0], CHUNK):
        h = x[start:start + CHUNK]
        with amp:
            for layer in layers:
                h = models.call_layer(layer, h, layer_kwargs)
        outs.append(h.float())
    return torch.cat(outs)


# ---- SliderQuant / OmniQuant ------------------------------------------------------------------------
def plan(cfg: QuantConfig, num_layers: int):
    """(windows, stage ratios, lora rank, epochs per stage) of the method."""
    if cfg.method == "omniquant":
        return single_layer_windows(num_layers), [1.0], 0, cfg.epochs
    if cfg.windows is not None:
        windows = explicit_windows(cfg.windows, num_layers)
    else:
        windows = sliding_windows(num_layers, cfg.shallow_layers, cfg.deep_layers, cfg.window_size,
                                  cfg.stride)
    return windows, cfg.quant_rates, cfg.lora_rank, cfg.stage_epochs()


def _run_windows(model, layers, cfg: QuantConfig, x0, layer_kwargs, work: WorkDir | None):
    windows, rates, lora_rank, epochs = plan(cfg, len(layers))
    qlayers = wrap_layers(model, cfg, lwc=True, lora_rank=lora_rank,
                          channel_scale=cfg.scale_lr > 0)
    amp = _autocast(cfg, x0.device)
    log.info("%s: %d windows x %d stages, %d epochs per window and stage, %s training: %s", cfg.method,
             len(windows), len(rates), epochs, resolve_autocast(cfg, x0.device), format_windows(windows))
    steps = [(s, rate, k, w) for s, rate in enumerate(rates) for k, w in enumerate(windows)]
    done, table = 0, []
    if work is not None:
        state = work.load()
        if state is not None:
            done, table = state["done"], list(state["table"])
            _load_learned(qlayers, state["learned"])
            log.info("resuming from %s after %d of %d windows", work.path, done, len(steps))
    exit_after = int(os.environ.get(EXIT_HOOK, "-1"))

    from tqdm.auto import tqdm
    bar = tqdm(total=len(steps), initial=done, desc=cfg.method, unit="window", disable=None)
    current_stage = None
    for step, (s, rate, k, window) in enumerate(steps):
        if step < done:
            continue
        if s != current_stage:                       # a stage restarts from the layer-0 inputs
            current_stage, pos, x_fp, x_q = s, 0, x0, x0
            for d in qlayers:
                for q in d.values():
                    q.quant_rate = rate
        a, b = window[0], window[-1]
        if a > pos:                                  # advance both inputs to the window start
            with teacher_mode(qlayers):
                x_fp = forward_layers(layers[pos:a], x_fp, layer_kwargs, amp)
            x_q = forward_layers(layers[pos:a], x_q, layer_kwargs, amp)
            pos = a
        block = layers[a:b + 1]
        with teacher_mode(qlayers):
            target = forward_layers(block, x_fp, layer_kwargs, amp)
        t0 = time.time()
        before = _mse(block, x_q, target, layer_kwargs, amp)
        snapshot = _learned(qlayers[a:b + 1])
        gen = torch.Generator().manual_seed(cfg.seed * 7919 + s * 104_729 + k)
        _train_window(block, qlayers[a:b + 1], x_q, target, layer_kwargs, cfg, epochs, amp, gen)
        after = _mse(block, x_q, target, layer_kwargs, amp)
        reverted = after > before
        if reverted:
            # a short, noisy optimisation can end above its start (seen on tiny random models);
            # never let a window make the reconstruction worse: keep the parameters it started with
            _load_learned(qlayers[a:b + 1], snapshot)
            log.info("window %d-%d stage %d: loss rose %.5g -> %.5g, parameters reverted",
                     a, b, s, before, after)
            after = before
        row = {"stage": s, "rate": rate, "window": list(window), "loss_before": before,
               "loss_after": after, "reverted": reverted, "seconds": time.time() - t0}
        table.append(row)
        bar.set_postfix(stage=s, window=f"{a}-{b}", loss=f"{after:.3g}")
        bar.update(1)
        if work is not None:
            work.save(step + 1, _learned(qlayers), table)
        if step + 1 == exit_after:
            os._exit(17)
    bar.close()
    _log_table(table)
    model.sliderquant_table = table
    for d in qlayers:
        for q in d.values():
            q.quant_rate = 1.0
            q.finalize()


def _train_window(block, qlayers, x_q, target, layer_kwargs, cfg: QuantConfig, epochs, amp, gen):
    lrs = cfg.optimizer_lrs()
    groups: dict[str, list] = {"lwc": [], "lora": [], "scale": []}
    for d in qlayers:
        for q in d.values():
            for key, params in q.param_groups().items():
                groups[key] += params
    param_groups = [{"params": ps, "lr": lrs[key], "weight_decay": 0.0}
                    for key, ps in groups.items() if ps and lrs[key] > 0]
    if not param_groups or epochs == 0:
        return
    bs = cfg.batch_size
    total = epochs * math.ceil(x_q.shape[0] / bs)
    opt = torch.optim.AdamW(param_groups, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: max(0.0, 1.0 - t / total))
    for loss in window_losses(block, x_q, target, layer_kwargs, bs, epochs, amp, gen):
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()


def window_losses(block, x, target, layer_kwargs, batch_size, epochs, amp, gen):
    """The reconstruction loss of each mini-batch, epoch after epoch, in the order ``gen`` draws
    (one ``randperm`` per epoch); the caller runs backward and steps."""
    n = x.shape[0]
    for _ in range(epochs):
        order = torch.randperm(n, generator=gen)
        for start in range(0, n, batch_size):
            idx = order[start:start + batch_size]
            h = x[idx]
            with amp:
                for layer in block:
                    h = models.call_layer(layer, h, layer_kwargs)
            yield F.mse_loss(h.float(), target[idx])


def _mse(block, x, target, layer_kwargs, amp) -> float:
    out = forward_layers(block, x, layer_kwargs, amp)
    return F.mse_loss(out, target).item()


def _learned(qlayers) -> dict:
    return {f"{i}.{name}": q.learned_state() for i, d in enumerate(qlayers) for name, q in d.items()}


def _load_learned(qlayers, learned: dict) -> None:
    for i, d in enumerate(qlayers):
        for name, q in d.items():
            q.load_learned_state(learned[f"{i}.{name}"])


def _log_table(table) -> None:
    log.info("%-6s %-5s %-10s %12s %12s %8s", "stage", "rate", "layers", "loss before",
             "loss after", "seconds")
    n_reverted = sum(r.get("reverted", False) for r in table)
    for r in table:
        w = r["window"]
        log.info("%-6d %-5.2f %-10s %12.5g %12.5g %8.2f", r["stage"], r["rate"],
                 f"{w[0]}-{w[-1]}", r["loss_before"], r["loss_after"], r["seconds"])
    if n_reverted:
        log.info("%d of %d windows ended above their starting loss and were reverted",
                 n_reverted, len(table))


# ---- GPTQ --------------------------------------------------------------------------------------------
def _run_gptq(model, layers, cfg: QuantConfig, x0, layer_kwargs):
    """GPTQ layer by layer: the Hessian of each linear's input comes from the inputs the
    already-quantized layers produce (all linears of a layer see the same pass)."""
    from .methods.gptq import GPTQ
    qlayers = wrap_layers(model, cfg, lwc=False, lora_rank=0)
    amp = contextlib.nullcontext()
    x = x0
    from tqdm.auto import tqdm
    for i in tqdm(range(len(layers)), desc="gptq", unit="layer", disable=None):
        solvers, hooks = {}, []
        for name, q in qlayers[i].items():
            solvers[name] = solver = GPTQ(q.weight)
            hooks.append(q.register_forward_hook(
                lambda m, inp, out, s=solver: s.add_batch(inp[0].reshape(-1, inp[0].shape[-1]))))
        with teacher_mode(qlayers[i:i + 1]):
            forward_layers(layers[i:i + 1], x, layer_kwargs, amp)
        for h in hooks:
            h.remove()
        for name, q in qlayers[i].items():
            w_hat, codes, scale, zero = solvers[name].quantize(
                cfg.wbits, q.group_size, cfg.symmetric, damp=cfg.gptq_damp,
                act_order=cfg.gptq_act_order, block_size=cfg.gptq_block_size)
            q.set_quantized(codes, scale, zero, w_hat=w_hat)
        del solvers
        x = forward_layers(layers[i:i + 1], x, layer_kwargs, amp)
