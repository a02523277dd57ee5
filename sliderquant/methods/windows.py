"""Block reconstruction over windows of decoder layers: SliderQuant and OmniQuant (docs/algorithm.md).

For every stage (quant ratio) and every window of the schedule: the teacher (the same layers with
quantization switched off) maps the fp inputs ``X_fp`` to targets ``Y``; the student (fake-quantized
layers) maps the quantized-model inputs ``X_q``; AdamW (or, per parameter group, signed steps)
minimises their MSE over the learnable quantization parameters.  The inputs advance when a window's first layer moves; every stage
restarts from the captured layer-0 inputs.  At the end the parameters are folded into the weights.
The two methods differ only in their plan (``sliderquant_plan``, ``omniquant_plan``), which the
registry in ``sliderquant.methods`` names; ``run_windows`` is their common entry point.

Determinism (what makes resume exact): no global RNG is used; mini-batch order comes from a
generator seeded by (seed, stage, window), LoRA factors from one seeded by (seed, layer, linear),
and the inputs of a window are recomputed from layer 0 with the same chunking on resume.

``revert_worse_windows`` (off by default; not in the method or the authors' code): a window whose
training ends above its starting loss gets back the parameters it started with.  Every table row
records ``reverted`` and the loss training reached (``loss_trained``); ``loss_after`` is the loss of
the parameters kept.

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
import time
from typing import NamedTuple

import torch
import torch.nn.functional as F

from .. import models
from ..checkpoint import WorkDir, fingerprint
from ..progress import Progress
from ..schedule import Window, explicit_windows, format_windows, single_layer_windows, sliding_windows
from .common import attach_state, fp32_layer_inputs, forward_layers, input_mean_squares, teacher_mode, wrap_layers

log = logging.getLogger(__name__)


# ---- plans ----------------------------------------------------------------------------------------
class WindowPlan(NamedTuple):
    windows: list[Window]
    rates: list[float]          # one stage per quant ratio
    lora_rank: int
    epochs: list[int]           # per window, for each stage


def sliderquant_plan(cfg, num_layers: int) -> WindowPlan:
    """The sliding windows (or the config's explicit ones), its stages, LoRA and epochs per stage."""
    if cfg.windows is not None:
        windows = explicit_windows(cfg.windows, num_layers)
    else:
        windows = sliding_windows(num_layers, cfg.shallow_layers, cfg.deep_layers, cfg.window_size,
                                  cfg.stride)
    return WindowPlan(windows, cfg.quant_rates, cfg.lora_rank, cfg.epochs_of_stages())


def omniquant_plan(cfg, num_layers: int) -> WindowPlan:
    """One window per layer, one stage quantizing everything, LWC only, all the epochs."""
    return WindowPlan(single_layer_windows(num_layers), [1.0], 0, [cfg.epochs])


class Step(NamedTuple):
    stage: int
    rate: float
    index: int                  # of the window in the plan (seeds the mini-batch order)
    window: Window


# ---- precision ------------------------------------------------------------------------------------
def resolve_autocast(cfg, device: torch.device) -> str:
    """``'bf16'`` or ``'fp32'``: the precision the windows train in (``autocast: auto`` decides by device)."""
    if cfg.autocast != "auto":
        return cfg.autocast
    if device.type == "cuda":
        return "bf16"
    if device.type == "cpu":
        from .. import ops
        return "bf16" if ops.native_bf16() else "fp32"
    return "fp32"


def autocast_context(cfg, device: torch.device):
    """The autocast context the windows train and run in (a no-op for fp32)."""
    if resolve_autocast(cfg, device) == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


# ---- the entry point ------------------------------------------------------------------------------
def run_windows(model, cfg, calibration, work_dir=None, on_window=None):
    """Quantize ``model`` in place with the windows method ``cfg.method``.

    ``work_dir``: save the learned state after each window and continue after the last saved one.
    ``on_window(done, total, row)`` is called after each window, once its state is saved.
    """
    from . import get_method
    layers = models.decoder_layers(model)
    plan = get_method(cfg.method).window_plan(cfg, len(layers))
    with fp32_layer_inputs(model, calibration) as (x0, layer_kwargs):
        precision = resolve_autocast(cfg, x0.device)
        work = None
        if work_dir is not None:
            # the resolved precision too: 'auto' may mean bf16 on one machine, fp32 on another
            work = WorkDir(work_dir, fingerprint(cfg.fingerprint(), calibration,
                                                 extra=model.config.to_json_string() + precision))
        run = WindowRun(model, cfg, plan, x0, layer_kwargs, work)
        log.info("%s: %d windows x %d stages, epochs per window in each stage %s, %s training: %s", cfg.method,
                 len(plan.windows), len(plan.rates), plan.epochs, precision, format_windows(plan.windows))
        run.resume()
        progress = Progress(len(run.steps), cfg.method, unit="window", initial=run.done)
        for step in run.steps[run.done:]:
            run.advance_inputs(step)
            row = run.reconstruct(step)
            run.checkpoint()
            progress.update(stage=step.stage, window=f"{step.window[0]}-{step.window[-1]}",
                            loss=row["loss_after"])
            if on_window is not None:
                on_window(run.done, len(run.steps), row)
        progress.close()
        run.finish()
        attach_state(model, cfg)        # before the cast back: codes and fp32 scales stay exact
    return model


class WindowRun:
    """The state of one run over the plan's (stage, window) steps, advanced one step at a time."""

    def __init__(self, model, cfg, plan: WindowPlan, x0, layer_kwargs, work: WorkDir | None):
        self.model, self.cfg, self.plan, self.work = model, cfg, plan, work
        self.layers = models.decoder_layers(model)
        self.amp = autocast_context(cfg, x0.device)
        input_sq = input_mean_squares(model, x0, layer_kwargs, self.amp) if cfg.lwc_init == "search_act" else None
        self.qlayers = wrap_layers(model, cfg, lwc=True, lora_rank=plan.lora_rank, channel_scale=cfg.scale_lr > 0,
                                   round_offset=cfg.round_lr > 0, input_sq=input_sq)
        self.x0, self.layer_kwargs = x0, layer_kwargs
        self.steps = [Step(s, rate, k, w) for s, rate in enumerate(plan.rates)
                      for k, w in enumerate(plan.windows)]
        self.done, self.table = 0, []
        # the quantized model's input of layer ``pos`` in the current stage, and the teacher's (fp)
        # hidden states by layer position (the input of that layer), from ``pos`` on: each fp layer
        # runs once per stage, where a window's target and the advance would run it 3 times
        self.stage, self.pos, self.x_q = None, 0, x0
        self.fp_states = {0: x0}

    def resume(self) -> None:
        """Load the learned state of the completed steps from the work directory, if any."""
        if self.work is None:
            return
        state = self.work.load(total=len(self.steps), like=_learned(self.qlayers))
        if state is None:
            return
        self.done, self.table = state["done"], list(state["table"])
        _load_learned(self.qlayers, state["learned"])
        log.info("resuming from %s after %d of %d windows", self.work.path, self.done, len(self.steps))

    def advance_inputs(self, step: Step) -> None:
        """Bring both inputs to the window's first layer; a new stage restarts from layer 0 (so
        does the first step after a resume: inputs are recomputed, never stored)."""
        if step.stage != self.stage:
            self.stage, self.pos, self.x_q = step.stage, 0, self.x0
            self.fp_states = {0: self.x0}
            for d in self.qlayers:
                for q in d.values():
                    q.quant_rate = step.rate
        a = step.window[0]
        if a > self.pos:
            self.teacher_state(a)          # the fp states reach the window start before older ones go
            self.x_q = forward_layers(self.layers[self.pos:a], self.x_q, self.layer_kwargs, self.amp)
            self.pos = a
        for k in [k for k in self.fp_states if k < a]:
            del self.fp_states[k]

    def teacher_state(self, pos: int) -> torch.Tensor:
        """The fp model's hidden states at the input of layer ``pos`` (``pos`` = the number of layers:
        the last layer's output), from the nearest cached position before it, one layer at a time
        (the same chunked calls as running the layers together, so the same numbers)."""
        k = max(p for p in self.fp_states if p <= pos)
        h = self.fp_states[k]
        while k < pos:
            with teacher_mode(self.qlayers[k:k + 1]):
                h = forward_layers(self.layers[k:k + 1], h, self.layer_kwargs, self.amp)
            k += 1
            self.fp_states[k] = h
        return h

    def reconstruct(self, step: Step) -> dict:
        """Train the window's parameters on the MSE to the teacher's output; returns its table row."""
        a, b = step.window[0], step.window[-1]
        block, qblock = self.layers[a:b + 1], self.qlayers[a:b + 1]
        target = self.teacher_state(b + 1)
        t0 = time.time()
        # the window's loss before and after training: on all samples, or on the first
        # window_loss_samples (a small-budget option: the two passes cost as much as an epoch)
        ev = self.cfg.window_loss_samples or self.x_q.shape[0]
        before = window_mse(block, self.x_q[:ev], target[:ev], self.layer_kwargs, self.amp)
        snapshot = _learned(qblock) if self.cfg.revert_worse_windows else None
        gen = torch.Generator().manual_seed(self.cfg.seed * 7919 + step.stage * 104_729 + step.index)
        train_window(block, qblock, self.x_q, target, self.layer_kwargs, self.cfg, self.plan.epochs[step.stage],
                     self.amp, gen)
        trained = after = window_mse(block, self.x_q[:ev], target[:ev], self.layer_kwargs, self.amp)
        reverted = snapshot is not None and trained > before
        if reverted:
            _load_learned(qblock, snapshot)
            after = before
            log.info("window %d-%d stage %d: loss rose %.5g -> %.5g, parameters reverted "
                     "(revert_worse_windows)", a, b, step.stage, before, trained)
        row = {"stage": step.stage, "rate": step.rate, "window": list(step.window), "loss_before": before,
               "loss_trained": trained, "loss_after": after, "reverted": reverted,
               "loss_samples": min(ev, self.x_q.shape[0]), "seconds": time.time() - t0}
        self.table.append(row)
        self.done += 1
        return row

    def checkpoint(self) -> None:
        if self.work is not None:
            self.work.save(self.done, _learned(self.qlayers), self.table, total=len(self.steps))

    def finish(self) -> None:
        """Log the table, keep it on the model, fold every learned parameter into the weights."""
        _log_table(self.table)
        self.model.sliderquant_table = self.table
        for d in self.qlayers:
            for q in d.values():
                q.quant_rate = 1.0
                q.finalize()


# ---- one window's optimisation --------------------------------------------------------------------
class SignSGD(torch.optim.Optimizer):
    """Signed gradient steps, ``p -= lr * sign(grad)`` (SignRound's optimizer, docs/algorithm.md section 11):
    every parameter moves by exactly the learning rate whatever its gradient's size, so the reach
    of a run is ``lr * sum of the schedule``.  ``sign(0) = 0``: a parameter without gradient stays.
    No state, no momentum, no weight decay."""

    def __init__(self, params, lr: float):
        super().__init__(params, {"lr": lr})

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    p.add_(torch.sign(p.grad), alpha=-group["lr"])


def train_window(block, qlayers, x_q, target, layer_kwargs, cfg, epochs, amp, gen) -> None:
    """The window's learnable parameters, each group with its optimizer (AdamW, or ``SignSGD``), learning
    rate decaying linearly to 0; after every step the parameters are projected into their domain."""
    lrs, kinds = cfg.optimizer_lrs(), cfg.optimizer_kinds()
    groups: dict[str, list] = {"lwc": [], "lora": [], "scale": [], "round": []}
    qls = [q for d in qlayers for q in d.values()]
    for q in qls:
        for key, params in q.param_groups().items():
            groups[key] += params
    by_kind: dict[str, list] = {"adamw": [], "sign": []}
    for key, ps in groups.items():
        if ps and lrs[key] > 0:
            by_kind[kinds[key]].append({"params": ps, "lr": lrs[key], "weight_decay": 0.0})
    if not (by_kind["adamw"] or by_kind["sign"]) or epochs == 0:
        return
    bs = cfg.batch_size
    total = epochs * math.ceil(x_q.shape[0] / bs)
    opts = []
    if by_kind["adamw"]:
        opts.append(torch.optim.AdamW(by_kind["adamw"], weight_decay=0.0))
    if by_kind["sign"]:
        opts.append(SignSGD([{k: v for k, v in g.items() if k != "weight_decay"} for g in by_kind["sign"]],
                            lr=by_kind["sign"][0]["lr"]))
    scheds = [torch.optim.lr_scheduler.LambdaLR(opt, lambda t: max(0.0, 1.0 - t / total)) for opt in opts]
    for loss in window_losses(block, x_q, target, layer_kwargs, bs, epochs, amp, gen):
        for opt in opts:
            opt.zero_grad(set_to_none=True)
        loss.backward()
        for opt in opts:
            opt.step()
        for q in qls:
            q.project_()
        for sched in scheds:
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


def window_mse(block, x, target, layer_kwargs, amp) -> float:
    """The reconstruction loss of the whole window on all samples (no gradient)."""
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
    for r in table:
        w = r["window"]
        log.info("%-6d %-5.2f %-10s %12.5g %12.5g %8.2f%s", r["stage"], r["rate"],
                 f"{w[0]}-{w[-1]}", r["loss_before"], r["loss_after"], r["seconds"],
                 "  reverted" if r.get("reverted") else "")
    rose = sum(r.get("loss_trained", r["loss_after"]) > r["loss_before"] for r in table)
    reverted = sum(r.get("reverted", False) for r in table)
    if reverted:
        log.info("%d of %d windows ended training above their starting loss; %d reverted "
                 "(revert_worse_windows)", rose, len(table), reverted)
    elif rose:
        log.info("%d of %d windows ended training above their starting loss; kept as trained "
                 "(revert_worse_windows is off)", rose, len(table))
