"""Diagnostic behind examples/results/README.md: how far one window of OmniQuant-mode training moves
the reconstruction error of SmolLM2 layers 0 and 5 (W3A16 g128, 32 x 256 C4 tokens) at the budget of
the comparison (2 epochs, batch 1 = 64 steps), with LoRA, with 4x the epochs, with 5x the LWC lr.

    python examples/diagnose_budget.py
"""
import torch, contextlib, copy, time
torch.set_num_threads(1)
import torch.nn.functional as F
from sliderquant import data, models
from sliderquant.methods import common, windows
from sliderquant.config import QuantConfig
model, tok = data.load_model("smollm2-135m")
calib = data.get_calibration("c4", tok, 32, 256, seed=0)
layers = models.decoder_layers(model)
with torch.no_grad(): x0, kw = models.capture_layer0_inputs(model, calib)
x0 = x0.float(); amp = contextlib.nullcontext()
x5 = common.forward_layers(layers[:5], x0, kw, amp)
for cfgname in ["configs/w3a16g128.yaml"]:
  for (epochs, lwc_lr, rank) in [(2, 0.01, 0), (2, 0.01, 4), (8, 0.01, 0), (2, 0.05, 0)]:
    m = copy.deepcopy(model)
    L = models.decoder_layers(m)
    cfg = QuantConfig.from_yaml(cfgname).replace(method="omniquant", batch_size=1, epochs=epochs, lwc_lr=lwc_lr)
    q = common.wrap_layers(m, cfg, lwc=True, lora_rank=rank)
    for li in (0, 5):
        xin = x0 if li == 0 else x5
        block = L[li:li+1]
        with common.teacher_mode(q): target = common.forward_layers(block, xin, kw, amp)
        for d in q:
            for ql in d.values(): ql.quant_rate = 1.0
        before = windows.window_mse(block, xin, target, kw, amp)
        t = time.time()
        windows.train_window(block, q[li:li+1], xin, target, kw, cfg, epochs, amp, torch.Generator().manual_seed(0))
        after = windows.window_mse(block, xin, target, kw, amp)
        u = torch.sigmoid(q[li]["mlp.down_proj"].lwc_upper).mean().item()
        print(f"epochs={epochs} lwc_lr={lwc_lr} rank={rank} layer {li}: mse {before:.4g} -> {after:.4g} ({100*(1-after/before):.1f}% lower), mean sigmoid(u) down_proj {u:.3f}, {time.time()-t:.0f}s", flush=True)
