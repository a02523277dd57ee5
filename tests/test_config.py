import glob
import os

import pytest

from sliderquant.config import QuantConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_presets_load_with_paper_defaults():
    paths = sorted(glob.glob(os.path.join(ROOT, "configs", "*.yaml")))
    names = {os.path.basename(p) for p in paths}
    assert {"w4a16.yaml", "w3a16.yaml", "w2a16.yaml", "w4a16g128.yaml", "w3a16g128.yaml",
            "w2a16g64.yaml"} <= names
    w2 = QuantConfig.from_yaml(os.path.join(ROOT, "configs", "w2a16.yaml"))
    assert (w2.wbits, w2.abits, w2.group_size, w2.epochs, w2.batch_size) == (2, 16, None, 60, 3)
    assert (w2.lwc_lr, w2.lora_lr, w2.scale_lr, w2.lora_rank) == (0.01, 5e-4, 0.0, 4)
    assert w2.quant_rates == [0.5, 1.0]
    g64 = QuantConfig.from_yaml(os.path.join(ROOT, "configs", "w2a16g64.yaml"))
    assert g64.group_size == 64
    assert QuantConfig.from_yaml(os.path.join(ROOT, "configs", "w3a16g128.yaml")).group_size == 128


def test_author_keys(tmp_path):
    p = tmp_path / "a.yaml"
    p.write_text("wbits: 2\nabits: 16\nepochs: 60\nbatch_size: 3\nnsamples: 128\n"
                 "num_layer: 2\nsliding_layer: 1\nfill_window_size: 4\nlora_rank: 4\n"
                 "quant_step: 4\nquant_rate: 0.5\nscale_lr: 0.0\nlora_lr: 0.0005\nlwc_lr: 0.01\n")
    c = QuantConfig.from_yaml(p)
    assert (c.window_size, c.stride, c.shallow_layers, c.deep_layers) == (2, 1, 4, 4)
    assert c.quant_rates == [0.25, 0.5, 0.75, 1.0]
    assert c.stage_epochs() == 15
    # learning rates are multiplied by the batch size, as in the authors' code
    assert c.optimizer_lrs() == pytest.approx({"lwc": 0.03, "lora": 0.0015, "scale": 0.0, "round": 0.0})
    # sliding_layer null means "same as num_layer" in the authors' code
    assert QuantConfig.from_dict({"num_layer": 3, "sliding_layer": None}).stride == 1
    assert QuantConfig.from_dict({"fill_window_size": None}).shallow_layers == 0


@pytest.mark.parametrize("data, key", [
    ({"wbitz": 2}, "wbitz"),
    ({"wbits": 0}, "wbits"),
    ({"wbits": "2"}, "wbits"),
    ({"group_size": -1}, "group_size"),
    ({"method": "awq"}, "method"),
    ({"quant_rates": [0.5]}, "quant_rates"),
    ({"quant_rates": [1.0, 0.5, 1.0]}, "quant_rates"),
    ({"lwc_lr": -1}, "lwc_lr"),
    ({"quant_rate": 1.5}, "quant_rate"),
    ({"quant_step": 0}, "quant_step"),
    ({"stride": 3, "window_size": 2}, "stride"),
    ({"batch_size": 0}, "batch_size"),
    ({"wbits": 1}, "wbits"),             # the kernels take 2..8; symmetric 1-bit zeroes every weight
    ({"wbits": 9}, "wbits"),
    ({"group_size": 0}, "group_size"),
    ({"group_size": True}, "group_size"),
    ({"abits": 4}, "abits"),             # weight-activation quantization is not implemented end to end
    ({"abits": 8}, "abits"),
    ({"abits": 17}, "abits"),
    ({"scale_lr": 0.001}, "scale_lr"),   # channel scales need folding into the producer (not implemented)
])
def test_errors_name_the_key(data, key):
    with pytest.raises(ValueError, match=key):
        QuantConfig.from_dict(data)


def test_yaml_error_names_file(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("epochs: -3\n")
    with pytest.raises(ValueError, match="bad.yaml.*epochs"):
        QuantConfig.from_yaml(p)


def test_fingerprint_changes_with_settings():
    a = QuantConfig()
    assert a.fingerprint() == QuantConfig().fingerprint()
    assert a.fingerprint() != a.replace(wbits=3).fingerprint()


def test_weight_activation_settings_are_refused_with_the_reason():
    """``abits < 16`` used to be accepted and reported as W4A4 while the saved model ran its
    activations in full precision; ``scale_lr > 0`` failed only after the whole calibration."""
    with pytest.raises(ValueError, match="abits.*16.*not implemented"):
        QuantConfig(abits=4)
    with pytest.raises(ValueError, match="scale_lr.*0.*not implemented"):
        QuantConfig(scale_lr=0.01)
    assert QuantConfig(abits=16, scale_lr=0.0).abits == 16


def test_yaml_refuses_w4a4(tmp_path):
    p = tmp_path / "w4a4.yaml"
    p.write_text("wbits: 4\nabits: 4\n")
    with pytest.raises(ValueError, match="w4a4.yaml.*abits"):
        QuantConfig.from_yaml(p)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_the_bit_widths_of_the_kernels_are_accepted(bits):
    assert QuantConfig(wbits=bits).wbits == bits


def test_group_size_uses_the_shared_check():
    """The same sentence as every other caller of ``limits.check_group_size``."""
    from sliderquant.limits import check_group_size
    with pytest.raises(ValueError) as ours:
        QuantConfig(group_size=-4)
    with pytest.raises(ValueError) as shared:
        check_group_size(-4)
    assert str(ours.value) == str(shared.value)
    assert QuantConfig(group_size=64).group_size == 64 and QuantConfig(group_size=None).group_size is None


def test_fast_presets_load_with_their_setting_and_the_budget_recipe():
    """configs/fast/: each file's bits and groups match its name, and each carries the measured
    small-budget recipe (docs/design/small-budget.md section 8); the paper presets carry none of it."""
    want = {"w3a16g64": (3, 64), "w2a16g64": (2, 64), "w4a16": (4, None), "w4a16g128": (4, 128)}
    paths = sorted(glob.glob(os.path.join(ROOT, "configs", "fast", "*.yaml")))
    assert {os.path.basename(p)[:-5] for p in paths} == set(want)
    for p in paths:
        c = QuantConfig.from_yaml(p)
        assert (c.wbits, c.group_size) == want[os.path.basename(p)[:-5]], p
        assert (c.method, c.abits, c.lwc_param, c.lwc_init, c.lwc_opt, c.round_opt) == (
            "sliderquant", 16, "linear", "search_act", "sign", "sign"), p
        assert c.round_lr > 0 and sum(c.epochs_per_stage) == c.epochs and (c.nsamples, c.seqlen) == (32, 256), p
    for p in glob.glob(os.path.join(ROOT, "configs", "*.yaml")):
        c = QuantConfig.from_yaml(p)
        assert (c.round_lr, c.lwc_param, c.lwc_init, c.epochs_per_stage) == (0.0, "sigmoid", "none", None), p
