"""Layer sensitivity: quantize one decoder layer at a time (RTN) and measure the error it causes.

docs/algorithm.md: the paper finds shallow and deep layers, above all the first and the last,
more sensitive than the intermediate ones.  ``sliderquant analyze`` lets a user check that for
their own model.  For every decoder layer ``i``, with every other layer in full precision:

* ``rel_output_error``: ``||f_q(x) - f(x)|| / ||f(x)||`` (Frobenius norm over the whole batch) of
  layer ``i`` on its own full-precision inputs ``x``, where ``f_q`` is the layer with RTN-quantized
  linears.  ``f`` is the whole decoder layer, residual connections included.  A few huge
  activations (e.g. the "attention sink" first token of SmolLM2 from layer 12 on) can dominate
  ``||f(x)||`` and make this number small for every later layer, so
* ``rel_output_error_tok``: the same ratio per token, ``||f_q(x)_t - f(x)_t|| / ||f(x)_t||``,
  averaged over the tokens of the batch (every token weighs the same).
* ``kl``: the KL divergence ``KL(p_fp || p_q)`` of the next-token distributions, averaged over all
  tokens of the batch (nats).
* ``ppl``: the perplexity of the batch (next-token prediction, exp of the mean NLL) with only
  layer ``i`` quantized; ``ppl_increase = ppl - fp_ppl``.

Quantization is round-to-nearest with the min-max range (``ops.fake_quant_weight`` without LWC),
per channel or per group (``quantizer.layer_group_size`` for widths the group size does not
divide).  The weights of the layer are put back bit for bit after each measurement.

Since layers ``0 .. i-1`` stay in full precision, the input of layer ``i`` is the same in the
quantized model as in the fp one, so the end-to-end pass only runs layers ``i .. L-1``, the final
norm and the LM head, starting from the captured fp input of layer ``i`` (half the work of a full
forward on average).  The fp reference logits come from the same code path.
"""

from __future__ import annotations

import csv
import logging
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from . import models, ops
from .limits import check_bits, check_group_size
from .quantizer import layer_group_size

log = logging.getLogger(__name__)

CSV_FIELDS = ("layer", "rel_output_error", "kl", "ppl", "ppl_increase", "rel_output_error_tok")


@dataclass
class LayerSensitivity:
    layer: int
    rel_output_error: float
    kl: float
    ppl: float
    ppl_increase: float
    rel_output_error_tok: float


@dataclass
class SensitivityResult:
    rows: list[LayerSensitivity]
    fp_ppl: float
    wbits: int
    group_size: int | None
    symmetric: bool
    ntokens: int

    @property
    def setting(self) -> str:
        g = "per-channel" if self.group_size is None else f"g{self.group_size}"
        return f"W{self.wbits} RTN {g}{' symmetric' if self.symmetric else ''}"


def _check_bits(wbits) -> int:
    """``wbits`` checked by the project's one rule (``limits``), named as the CLI names it."""
    return check_bits(wbits, "wbits")


@torch.no_grad()
def _tail_logits(model: nn.Module, start: int, x: torch.Tensor, layer_kwargs: dict) -> torch.Tensor:
    """Logits of the model from the input ``x`` of decoder layer ``start`` on."""
    for layer in models.decoder_layers(model)[start:]:
        x = models.call_layer(layer, x, layer_kwargs)
    return model.get_output_embeddings()(models.final_norm(model)(x)).float()


def _nll_sum(logp: torch.Tensor, input_ids: torch.Tensor) -> float:
    """Summed NLL of next-token prediction: position t predicts token t+1."""
    pred = logp[:, :-1]
    target = input_ids[:, 1:].to(pred.device)
    return -pred.gather(-1, target.unsqueeze(-1)).double().sum().item()


@torch.no_grad()
def layer_sensitivity(model: nn.Module, input_ids: torch.Tensor, wbits: int, group_size: int | None = None,
                      symmetric: bool = False, batch_size: int = 4, progress: bool = True) -> SensitivityResult:
    """Quantize each decoder layer alone with RTN and measure its error on ``input_ids`` (N, T).

    The model is unchanged afterwards (each layer's weights are restored exactly).  Raises
    ``models.UnsupportedModelError`` for an unsupported family and ``ValueError`` for bits outside
    2..8 or a bad group size.
    """
    wbits = _check_bits(wbits)
    group_size = check_group_size(group_size)
    layers = models.decoder_layers(model)          # the family check (clear error) comes first
    if input_ids.dim() != 2 or input_ids.shape[1] < 2:
        raise ValueError(f"input_ids must be (N, T) with T >= 2, got shape {tuple(input_ids.shape)}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    device = next(model.parameters()).device
    n, t = input_ids.shape
    ntok_pred = n * (t - 1)

    # fp inputs of every layer (and the output of the last), through the library's own layer calls
    x0, layer_kwargs = models.capture_layer0_inputs(model, input_ids, batch_size=batch_size)
    chunks = [slice(s, min(s + batch_size, n)) for s in range(0, n, batch_size)]
    inputs = [x0]
    for layer in layers:
        x = inputs[-1]
        inputs.append(torch.cat([models.call_layer(layer, x[c], layer_kwargs) for c in chunks]))

    fp_logp = []
    nll = 0.0
    for c in chunks:
        logp = torch.log_softmax(_tail_logits(model, len(layers), inputs[-1][c], layer_kwargs), dim=-1)
        fp_logp.append(logp)
        nll += _nll_sum(logp, input_ids[c])
    fp_ppl = math.exp(nll / ntok_pred)
    log.info("fp perplexity of the batch (%d x %d tokens): %.4f", n, t, fp_ppl)

    rows = []
    bar = range(len(layers))
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(bar, desc=f"layers (W{wbits} RTN)", unit="layer")
    for i in bar:
        layer = layers[i]
        linears = models.layer_linears(model, layer)
        saved = {name: lin.weight.detach().clone() for name, lin in linears.items()}
        try:
            for lin in linears.values():
                w = lin.weight.data
                g = layer_group_size(w.shape[1], group_size)
                lin.weight.data.copy_(ops.fake_quant_weight(w, wbits, group_size=g, symmetric=symmetric))
            y_q = torch.cat([models.call_layer(layer, inputs[i][c], layer_kwargs) for c in chunks])
            y_fp = inputs[i + 1]
            rel = (torch.linalg.vector_norm((y_q - y_fp).double())
                   / torch.linalg.vector_norm(y_fp.double())).item()
            rel_tok = (torch.linalg.vector_norm((y_q - y_fp).double(), dim=-1)
                       / torch.linalg.vector_norm(y_fp.double(), dim=-1)).mean().item()
            kl_sum, nll = 0.0, 0.0
            for c, ref in zip(chunks, fp_logp):
                logq = torch.log_softmax(_tail_logits(model, i, inputs[i][c], layer_kwargs), dim=-1)
                kl_tok = (ref.exp() * (ref - logq)).sum(-1).double()
                kl_sum += kl_tok.clamp_min(0.0).sum().item()   # per-token KL >= 0; clamp rounding only
                nll += _nll_sum(logq, input_ids[c])
        finally:
            for name, lin in linears.items():
                lin.weight.data.copy_(saved[name])
        ppl = math.exp(nll / ntok_pred)
        row = LayerSensitivity(i, rel, kl_sum / (n * t), ppl, ppl - fp_ppl, rel_tok)
        rows.append(row)
        log.debug("layer %d: rel %.4g kl %.4g ppl %.4f", i, row.rel_output_error, row.kl, row.ppl)
        if progress:
            bar.set_postfix(kl=f"{row.kl:.3g}", ppl=f"{row.ppl:.2f}")
    return SensitivityResult(rows, fp_ppl, wbits, group_size, bool(symmetric), n * t)


# ---- output -------------------------------------------------------------------------------------
def write_csv(result: SensitivityResult, path) -> Path:
    path = Path(path)
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        w.writeheader()
        for r in result.rows:
            d = asdict(r)
            w.writerow({k: (d[k] if k == "layer" else f"{d[k]:.6g}") for k in CSV_FIELDS})
    return path


def format_table(result: SensitivityResult) -> str:
    lines = [f"fp perplexity of the batch: {result.fp_ppl:.4f}",
             "| layer | rel. output error | per-token rel. error | KL (nats/token) | ppl | ppl increase |",
             "|---:|---:|---:|---:|---:|---:|"]
    for r in result.rows:
        lines.append(f"| {r.layer} | {r.rel_output_error:.4f} | {r.rel_output_error_tok:.4f} | {r.kl:.4g} "
                     f"| {r.ppl:.3f} | {r.ppl_increase:+.3f} |")
    return "\n".join(lines)


def plot(result: SensitivityResult, path, title: str) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    idx = [r.layer for r in result.rows]
    fig, (ax1, ax2) = plt.subplots(2, 1, sharex=True, figsize=(9, 6.5))
    ax1.plot(idx, [r.kl for r in result.rows], "o-", color="tab:red", label="KL(fp || quantized), nats/token")
    ax1.set_ylabel("KL (nats/token)", color="tab:red")
    tw = ax1.twinx()
    tw.plot(idx, [r.ppl_increase for r in result.rows], "s--", color="tab:blue", alpha=0.8,
            label=f"perplexity increase (fp {result.fp_ppl:.2f})")
    tw.set_ylabel("perplexity increase", color="tab:blue")
    if all(r.kl > 0 for r in result.rows):
        ax1.set_yscale("log")
    if all(r.ppl_increase > 0 for r in result.rows):
        tw.set_yscale("log")
    h1, l1 = ax1.get_legend_handles_labels()
    h2, l2 = tw.get_legend_handles_labels()
    ax1.legend(h1 + h2, l1 + l2, loc="upper center", fontsize=8)
    ax1.grid(alpha=0.3)
    ax1.set_title("end-to-end error, only this layer quantized", fontsize=9)
    wbar = 0.4
    ax2.bar([k - wbar / 2 for k in idx], [r.rel_output_error for r in result.rows], wbar, color="tab:green",
            label="||f_q(x) - f(x)|| / ||f(x)|| (whole batch)")
    ax2.bar([k + wbar / 2 for k in idx], [r.rel_output_error_tok for r in result.rows], wbar, color="tab:olive",
            label="same per token, averaged over tokens")
    ax2.set_ylabel("relative output error")
    ax2.set_xlabel("decoder layer")
    ax2.set_title("error of the layer's own output on its fp inputs", fontsize=9)
    ax2.legend(fontsize=8)
    ax2.grid(alpha=0.3, axis="y")
    ax2.set_xticks(idx if len(idx) <= 40 else idx[::2])
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)


def write_outputs(result: SensitivityResult, out_dir, title: str) -> dict:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    return {"csv": write_csv(result, out / "sensitivity.csv"),
            "png": plot(result, out / "sensitivity.png", title)}
