"""CUDA check: the SliderQuant windows with the small-budget options on a GPU, through the pure-torch
path (the C kernels are CPU only), against the same run on the CPU (fp32 training): codes and logits.

    python examples/check_cuda.py        # from the repository root; needs a CUDA build of torch

Tiny random Llama of the tests, no downloads.  Last run: H100, torch 2.11.0+cu130, 0 of 92,160 codes
differ, logits within 3.6e-7.  It found that the clipping search built its grid on the CPU."""
import os, sys, time, torch
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))
import sliderquant
from test_models import tiny_model, token_ids
from conftest import fast_config
if not torch.cuda.is_available():
    sys.exit("check_cuda.py needs a CUDA build of torch and a GPU (torch.cuda.is_available() is False)")
print("torch", torch.__version__, "cuda", torch.cuda.is_available(), torch.cuda.get_device_name(0))
ids = token_ids()
kw = dict(round_lr=0.01, lwc_param="linear", lwc_init="search_act", lwc_opt="sign", round_opt="sign",
          lwc_lr=0.005, autocast="fp32")
res = {}
for dev in ("cpu", "cuda"):
    m = tiny_model("llama").to(dev)
    t = time.time()
    try:
        q = sliderquant.quantize(m, fast_config("sliderquant", 2, wbits=3, **kw), ids.to(dev))
    except Exception as e:
        import traceback; traceback.print_exc(); print(dev, "FAILED", type(e).__name__, e); sys.exit(1)
    st = q.sliderquant_state["tensors"]
    res[dev] = {k: v.detach().cpu() for k, v in st.items()}
    with torch.no_grad():
        logits = q(ids.to(dev)).logits.float().cpu()
    res[dev]["logits"] = logits
    print(dev, "ok", round(time.time() - t, 1), "s", "tensors", len(st), "device of first", next(iter(st.values())).device)
a, b = res["cpu"], res["cuda"]
codes = [k for k in a if k.endswith(".qweight")]
diff = sum(int((a[k] != b[k]).sum()) for k in codes); tot = sum(a[k].numel() for k in codes)
print("codes differing cpu vs cuda:", diff, "of", tot)
print("max |logit diff|:", float((a["logits"] - b["logits"]).abs().max()), "logit scale", float(a["logits"].abs().max()))
