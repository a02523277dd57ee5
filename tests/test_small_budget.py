"""The small-budget options (docs/algorithm.md section 11, design note docs/design/small-budget.md):
the learnable rounding offset V through the layer, the engine and the resume state.  The kernels
themselves are tested against the reference in test_kernels.py."""

import pytest
import torch
from torch import nn

import sliderquant
from sliderquant import ops, reference
from sliderquant.config import QuantConfig
from sliderquant.layers import QuantLinear
from sliderquant.quantizer import dequantize

from conftest import fast_config
from test_kernels import make_round_offset
from test_models import token_ids, tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")


def quant_linear(out_f=24, in_f=256, group=64, seed=0, **kw):
    g = torch.Generator().manual_seed(seed)
    lin = nn.Linear(in_f, out_f, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(out_f, in_f, generator=g) * 0.05)
    return QuantLinear(lin, 3, group, lora_rank=4, generator=g, **kw), g


# ---- the rounding offset V in QuantLinear ---------------------------------------------------------------

def test_round_offset_is_a_learned_parameter_of_its_own_group():
    ql, _ = quant_linear(round_offset=True)
    assert ql.round_offset.shape == (24, 256) and ql.round_offset.dtype == torch.float32
    assert torch.equal(ql.round_offset, torch.zeros(24, 256))          # starts at round-to-nearest
    assert ql.param_groups()["round"] == [ql.round_offset]
    assert "round_offset" in ql.learned_state()
    plain, _ = quant_linear()
    assert plain.round_offset is None and plain.param_groups()["round"] == []
    assert "round_offset" not in plain.learned_state()
    with torch.no_grad():
        ql.round_offset.uniform_(-2, 2)
    ql.project_()
    assert float(ql.round_offset.detach().abs().max()) == 0.5


def test_finalize_codes_equal_the_last_forward():
    """The folded codes are those of the training forward (C kernel) with V, LoRA and clipping."""
    ql, g = quant_linear(round_offset=True)
    with torch.no_grad():
        ql.lora_b.copy_(torch.randn(24, 4, generator=g) * 0.02)
        ql.lwc_upper.copy_(torch.randn(24, 4, generator=g) + 2)
        ql.lwc_lower.copy_(torch.randn(24, 4, generator=g) + 2)
        params = {k: getattr(ql, k) for k in ("lwc_upper", "lwc_lower", "lora_a", "lora_b")}
        ql.round_offset.copy_(make_round_offset(ql.weight, {**params, "lora_b": ql.lora_b * ql.lora_scaling},
                                                3, 64, False, seed=1))
        forward = ops.fake_quant_weight(ql.weight, **ql._qargs())
        plain = ops.fake_quant_weight(ql.weight, **{**ql._qargs(), "round_offset": None})
    assert not torch.equal(forward, plain)                               # V moved codes
    ql.finalize()
    assert ql.round_offset is None and ql.lwc_upper is None              # learned tensors are dropped
    codes = torch.round(forward.reshape(24, 4, 64) / ql.scales[..., None] + ql.zeros[..., None]).reshape(24, 256)
    assert torch.equal(codes.to(torch.int16), ql.qweight)
    torch.testing.assert_close(ql.weight, forward, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(dequantize(ql.qweight, ql.scales, ql.zeros), forward, rtol=1e-6, atol=1e-7)


def test_weight_qparams_apply_the_offset():
    w = torch.tensor([[-1.0, 0.0, 0.5, 1.0]])
    v = torch.tensor([[0.4, -0.4, -0.3, 0.2]])        # hand-computed in test_kernels.test_round_offset_hand_computed
    q, s, z = reference.weight_qparams(w, 2, round_offset=v)
    assert q.tolist() == [[1, 2, 2, 3]] and float(z) == 2.0
    torch.testing.assert_close(dequantize(q, s, z), ops.fake_quant_weight(w, 2, round_offset=v))


# ---- the engine -------------------------------------------------------------------------------------------

def fast(**kw):
    return fast_config("sliderquant", 4, wbits=3, **kw)


def test_round_offset_trains_and_folds_on_the_grid():
    ids = token_ids()
    plain = sliderquant.quantize(tiny_model("llama"), fast(), ids)
    with_v = sliderquant.quantize(tiny_model("llama"), fast(round_lr=0.01), ids)
    a, b = plain.sliderquant_state["tensors"], with_v.sliderquant_state["tensors"]
    moved = sum(int((a[k] != b[k]).sum()) for k in a if k.endswith("qweight"))
    assert moved > 0, "V changed no code"
    for k in b:
        if k.endswith("qweight"):
            assert 0 <= int(b[k].min()) and int(b[k].max()) <= 7
    assert with_v.sliderquant_state["config"]["round_lr"] == 0.01


class _Stop(Exception):
    pass


def test_resume_restores_the_round_offset_bitwise(tmp_path):
    """Stop after window 3, rerun in the same work directory: bitwise the weights of one run."""
    ids = token_ids()
    cfg = fast(round_lr=0.01)
    whole = sliderquant.quantize(tiny_model("llama"), cfg, ids)

    def stop(done, total, row):
        if done == 3:
            raise _Stop

    with pytest.raises(_Stop):
        sliderquant.quantize(tiny_model("llama"), cfg, ids, work_dir=str(tmp_path), on_window=stop)
    from sliderquant.checkpoint import read_state
    learned = read_state(str(tmp_path / "state.pt"))["learned"]
    v = learned["0.self_attn.q_proj"]["round_offset"]
    assert v.shape == (64, 64) and v.abs().max() <= 0.5 and v.abs().max() > 0
    resumed = sliderquant.quantize(tiny_model("llama"), cfg, ids, work_dir=str(tmp_path))
    a, b = whole.state_dict(), resumed.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


# ---- config -----------------------------------------------------------------------------------------------

def test_config_round_lr():
    assert QuantConfig().round_lr == 0.0
    assert QuantConfig(round_lr=0.002).optimizer_lrs()["round"] == pytest.approx(0.006)
    for bad in (-0.1, float("nan"), "0.1", True):
        with pytest.raises(ValueError, match="round_lr"):
            QuantConfig(round_lr=bad)
    for method in ("rtn", "gptq"):
        with pytest.raises(ValueError, match="round_lr: 0.01 only act on methods that train windows"):
            QuantConfig(method=method, round_lr=0.01)
    QuantConfig(method="omniquant", round_lr=0.01)
