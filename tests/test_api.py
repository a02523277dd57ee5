"""``save`` / ``load`` / ``apply_codes``: exact verification, atomic writes, GGUF models.

Oracles: the in-memory quantized model (its weights, codes and logits), files damaged by hand,
and transformers' own ``from_pretrained`` of the saved directory.
"""

import copy
import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

import sliderquant
from sliderquant import api
from sliderquant.config import QuantConfig

from conftest import fast_config as fast, require_smollm2_gguf
from test_models import tiny_model, token_ids

pytestmark = pytest.mark.usefixtures("one_thread")


def quantized(method="rtn", family="llama", dtype=torch.float32, **kw):
    model = tiny_model(family).to(dtype)
    calib = None if method == "rtn" else token_ids()
    return sliderquant.quantize(model, fast(method, **kw), calib)


def names(model):
    return [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and ".layers." in n]


# ---- exact verification ---------------------------------------------------------------------------------
@pytest.mark.parametrize("method, kw", [
    ("rtn", dict(wbits=8)), ("rtn", dict(wbits=3, symmetric=True, group_size=32)),
    ("gptq", dict(wbits=4, group_size=32)), ("gptq", dict(wbits=3, gptq_act_order=True)),
    ("sliderquant", dict(wbits=2)),
])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_round_trip_is_exact_for_every_method_and_dtype(tmp_path, method, kw, dtype):
    model = quantized(method, "qwen2", dtype, **kw)
    sliderquant.save(model, tmp_path / "out")
    loaded = sliderquant.load(tmp_path / "out")
    for name in names(model):
        w = model.get_submodule(name).weight
        assert torch.equal(loaded.get_submodule(name).weight.to(w.dtype), w), name
    # GPTQ's own w_hat is bitwise the dequantized codes (the check is the same for every method)
    t = model.sliderquant_state["tensors"]
    from sliderquant.quantizer import dequantize
    for name in names(model):
        q, s, z = (t[f"{name}.{k}"] for k in ("qweight", "scales", "zeros"))
        assert torch.equal(dequantize(q, s, z).to(dtype), model.get_submodule(name).weight), name
    # loading in another dtype than the saved one still verifies (the cast chain is the same)
    other = torch.bfloat16 if dtype == torch.float32 else torch.float32
    again = sliderquant.load(tmp_path / "out", dtype=other)
    assert again.get_submodule(names(model)[0]).weight.dtype == other


def _damage(directory, edit_tensors=None, edit_meta=None):
    path = os.path.join(directory, api.QUANT_TENSORS)
    if edit_tensors is not None:
        tensors = load_file(path)
        edit_tensors(tensors)
        save_file(tensors, path)
    if edit_meta is not None:
        mpath = os.path.join(directory, api.QUANT_META)
        meta = json.load(open(mpath))
        edit_meta(meta)
        json.dump(meta, open(mpath, "w"))


@pytest.fixture
def saved8(tmp_path):
    model = quantized("rtn", wbits=8)
    out = tmp_path / "out"
    sliderquant.save(model, out)
    return model, out


def test_one_code_step_is_refused(saved8):
    """An 8-bit code moved by one step on the largest weight: within the old ``rtol=1e-2``."""
    model, out = saved8
    name = "model.layers.1.mlp.down_proj"
    w = model.get_submodule(name).weight

    def bump(t):
        q = t[f"{name}.qweight"]
        i = int(w.abs().argmax())
        flat = q.view(-1)
        flat[i] += 1 if flat[i] < 255 else -1
    _damage(out, edit_tensors=bump)
    with pytest.raises(ValueError, match=f"weights of {name} do not equal its stored codes"):
        sliderquant.load(out)


def test_emptied_module_list_is_refused(saved8):
    _, out = saved8
    _damage(out, edit_meta=lambda m: m.update(modules=[]))
    with pytest.raises(ValueError, match="lists 0 quantized modules, the model has 21"):
        sliderquant.load(out)


def test_every_quantized_linear_must_have_codes(saved8):
    _, out = saved8
    name = "model.layers.2.self_attn.k_proj"

    def drop(t):
        for k in ("qweight", "scales", "zeros"):
            del t[f"{name}.{k}"]
    _damage(out, edit_tensors=drop, edit_meta=lambda m: m["modules"].remove(name))
    with pytest.raises(ValueError, match=f"lacks the codes of {name}"):
        sliderquant.load(out)


def test_codes_for_a_module_that_does_not_exist_are_refused(saved8):
    _, out = saved8

    def add(t):
        for k in ("qweight", "scales", "zeros"):
            t[f"model.layers.7.mlp.down_proj.{k}"] = t[f"model.layers.0.mlp.down_proj.{k}"].clone()
    _damage(out, edit_tensors=add)
    with pytest.raises(ValueError, match="codes for 'model.layers.7.mlp.down_proj', which is not"):
        sliderquant.load(out)


def test_codes_outside_the_grid_are_refused(tmp_path):
    model = quantized("rtn", wbits=3)
    sliderquant.save(model, tmp_path / "out")
    name = "model.layers.0.self_attn.q_proj"

    def off_grid(t):
        t[f"{name}.qweight"][0, 0] = 8
    _damage(tmp_path / "out", edit_tensors=off_grid)
    with pytest.raises(ValueError, match=r"codes outside \[0, 7\].*3-bit asymmetric"):
        sliderquant.load(tmp_path / "out")


@pytest.mark.parametrize("part, change, match", [
    ("scales", lambda t: t.half(), "scales is torch.float16"),
    ("zeros", lambda t: t[:, :0], r"zeros is torch.float32 \(96, 0\)"),
    ("scales", lambda t: torch.cat([t, t], 1), r"expected torch.float32 \(96, 1\)"),
    ("qweight", lambda t: t.int(), "qweight is torch.int32"),
    ("scales", lambda t: -t, "scales must be finite and positive"),
])
def test_wrong_scales_zeros_and_codes_dtypes_or_shapes_are_refused(saved8, part, change, match):
    _, out = saved8
    name = "model.layers.0.mlp.gate_proj"

    def edit(t):
        t[f"{name}.{part}"] = change(t[f"{name}.{part}"]).contiguous()
    _damage(out, edit_tensors=edit)
    with pytest.raises(ValueError, match=match):
        sliderquant.load(out)


# ---- atomic save and the rescue path ---------------------------------------------------------------------
def test_failed_save_leaves_nothing_half_written(tmp_path, monkeypatch):
    model = quantized("rtn")
    original = type(model).save_pretrained

    def breaks_midway(self, directory, **kw):
        original(self, directory, **kw)              # the model files are written...
        raise OSError("disk full")                   # ...then the disk fills up
    monkeypatch.setattr(type(model), "save_pretrained", breaks_midway)
    with pytest.raises(OSError, match="disk full"):
        sliderquant.save(model, tmp_path / "out")
    assert sorted(os.listdir(tmp_path)) == []        # no target, no temporary directory

    # an earlier output survives a failed overwrite untouched
    monkeypatch.setattr(type(model), "save_pretrained", original)
    sliderquant.save(model, tmp_path / "out")
    before = {f: open(tmp_path / "out" / f, "rb").read() for f in os.listdir(tmp_path / "out")}
    monkeypatch.setattr(type(model), "save_pretrained", breaks_midway)
    with pytest.raises(OSError):
        sliderquant.save(model, tmp_path / "out")
    assert sorted(os.listdir(tmp_path)) == ["out"]
    assert {f: open(tmp_path / "out" / f, "rb").read() for f in os.listdir(tmp_path / "out")} == before
    # and a successful overwrite replaces it as a whole
    monkeypatch.setattr(type(model), "save_pretrained", original)
    sliderquant.save(model, tmp_path / "out")
    sliderquant.load(tmp_path / "out")
    assert sorted(os.listdir(tmp_path)) == ["out"]


def test_save_refuses_a_directory_with_other_files(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="holds other files"):
        sliderquant.save(quantized("rtn"), tmp_path)
    assert os.listdir(tmp_path) == ["notes.txt"]


def test_saved_directory_has_the_usual_permissions(tmp_path):
    # built in a private temporary directory, but the output must be readable like any other
    old = os.umask(0o022)
    try:
        sliderquant.save(quantized("rtn"), tmp_path / "out")
    finally:
        os.umask(old)
    assert os.stat(tmp_path / "out").st_mode & 0o777 == 0o755
    for name in os.listdir(tmp_path / "out"):
        assert os.stat(tmp_path / "out" / name).st_mode & 0o777 == 0o644, name


def test_apply_codes_restores_the_quantized_model(tmp_path):
    model = quantized("sliderquant", wbits=3)
    api.write_codes(model, tmp_path / "rescue")
    assert sorted(os.listdir(tmp_path / "rescue")) == [api.QUANT_META, api.QUANT_TENSORS]
    fresh = api.apply_codes(tiny_model("llama"), tmp_path / "rescue")
    ids = token_ids()
    with torch.no_grad():
        assert torch.equal(fresh(ids).logits, model(ids).logits)
    sliderquant.save(fresh, tmp_path / "out")
    sliderquant.load(tmp_path / "out")
    with pytest.raises(ValueError, match="already quantized"):
        api.apply_codes(fresh, tmp_path / "rescue")


def test_on_window_reports_each_completed_window():
    calls = []
    model = tiny_model("llama")
    sliderquant.quantize(model, fast(epochs=1), token_ids(),
                         on_window=lambda done, total, row: calls.append((done, total, row["window"])))
    assert [c[0] for c in calls] == list(range(1, len(calls) + 1)) and calls[-1][0] == calls[-1][1]
    assert len(calls) == 8          # 3 layers: windows [0], [0,1], [1,2], [2] x 2 stages
    with pytest.raises(TypeError, match="on_window"):
        sliderquant.quantize(tiny_model("llama"), fast("rtn"), on_window="print")


# ---- a model loaded from GGUF (the README's own example) -------------------------------------------------
def test_smollm2_from_gguf_saves_and_loads(tmp_path, monkeypatch):
    """transformers marks a model it dequantized from GGUF as quantized and refuses to save it;
    ``save`` used to fail there after the whole calibration.  Real SmolLM2-135M GGUF, RTN W4 g64."""
    from sliderquant import cli, data
    require_smollm2_gguf()
    torch.set_num_threads(2)
    fp, tok = data.load_model("smollm2-135m")
    assert getattr(fp, "hf_quantizer", None) is not None      # what made save_pretrained refuse
    model = copy.deepcopy(fp)
    sliderquant.quantize(model, QuantConfig(method="rtn", wbits=4, group_size=64))
    marks = (model.hf_quantizer, model.config.quantization_config)
    sliderquant.save(model, tmp_path / "api", tokenizer=tok)
    assert (model.hf_quantizer, model.config.quantization_config) == marks    # put back after saving
    cfg = json.load(open(tmp_path / "api" / "config.json"))
    assert "quantization_config" not in cfg
    loaded = sliderquant.load(tmp_path / "api")
    ids = tok("Once upon a time there was a little robot", return_tensors="pt").input_ids
    with torch.no_grad():
        expected = model(ids).logits
        assert torch.equal(loaded(ids).logits, expected)

    # the CLI path of the README: quantize then save to --out (the model object comes from the
    # same GGUF load, so the file is read once)
    monkeypatch.setattr(data, "load_model", lambda *a, **k: (copy.deepcopy(fp), tok))
    rc = cli.main(["quantize", "--model", "smollm2-135m", "--method", "rtn", "--wbits", "4",
                   "--group-size", "64", "--out", str(tmp_path / "cli")])
    assert rc == 0
    from_cli = sliderquant.load(tmp_path / "cli")
    with torch.no_grad():
        assert torch.equal(from_cli(ids).logits, expected)
