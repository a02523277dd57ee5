"""GGUF export for llama.cpp: our integer codes written as llama.cpp block types, no requantization.

A GGUF block of 32 weights along a row stores one fp16 scale (and, for Q4_1, one fp16 minimum) and
the 32 codes.  Our weight is ``(q - z) * s`` with one ``(s, z)`` per group of a row, so wherever a
group holds whole blocks (group a multiple of 32, or per channel on a row a multiple of 32) the
codes go in unchanged and only ``s`` and ``s * z`` are rounded to fp16:

    asymmetric, b <= 4   Q4_1   y = d * q + m          d = s, m = -s * z   (any z, even outside the code range)
    symmetric,  b <= 4   Q4_0   y = d * (c - 8)        c = q + 8, d = s
    symmetric,  b <= 8   Q8_0   y = d * c  (c int8)    c = q, d = s
    asymmetric, 5..8     Q8_0   c = q - z              only where every c fits int8, else the fallback type

2- and 3-bit grids are written as Q4_1 (or Q4_0) too: exact, 5 (4.5) bits a weight.
``low_bits="kquant"`` writes the tensors whose rows are multiples of 256 and groups multiples of 16
as K-quants fitted to our grid instead (``gguf_kquants``: smaller, not exact):

    asymmetric 2-bit     Q2_K   y = d * sc * c - dmin * m      2.625 bits a weight
    3-bit (either kind)  Q3_K   y = d * l * (c - 4)            3.4375 bits a weight; symmetric: no min

the others stay Q4_1/Q4_0 with a warning that says why, and the summary's ``fit_error`` records each
fitted tensor's relative RMS error against our weight.  A tensor no block type holds (a row not a
multiple of 32, a group that splits a block) is written dequantized as ``fallback_type`` (F16 or F32)
with a warning; ``strict=True`` refuses instead.

llama.cpp's Llama graph applies rotary embeddings to interleaved pairs, Hugging Face's to the two
halves of each head, so the rows of ``q_proj`` and ``k_proj`` are reordered within each head
(row ``2j + t`` of the GGUF head is row ``t * hd/2 + j`` of ours).  Only output rows move, so the
codes, scales and zero points move with their rows and nothing is requantized.  Norms are F32;
the embedding is ``embed_type`` (F16 by default); a tied LM head is not written (llama.cpp and
transformers then use ``token_embd``).  The tokenizer (SentencePiece or GPT-2 style byte-level BPE)
goes in as llama.cpp's vocabulary metadata, and ``general.quantized_by`` plus ``sliderquant.*`` keys
record the tool, method and settings.

The whole file is built in memory first; it is written beside the target under a temporary name
and renamed at the end, so a refusal or a failure leaves nothing behind.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile

import numpy as np
import torch

log = logging.getLogger(__name__)

# Hugging Face model_type -> llama.cpp architecture.  Mistral checkpoints are Llama graphs to llama.cpp.
ARCHITECTURES = {"llama": "llama", "mistral": "llama"}

# per-layer Hugging Face module -> llama.cpp tensor name (gguf-py's TENSOR_NAMES for MODEL_ARCH.LLAMA)
LAYER_TENSORS = {
    "input_layernorm": "attn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}

FLOAT_TYPES = ("f16", "f32")
EMBED_TYPES = ("f16", "f32", "q8_0")
LOW_BITS = ("q4_1", "kquant")
QK = 32   # weights per legacy block (Q4_0, Q4_1, Q8_0)
QK_K, K_SUB = 256, 16   # weights per K-quant super-block and sub-block
BITS_PER_WEIGHT = {"Q4_0": 4.5, "Q4_1": 5, "Q8_0": 8.5}


class GGUFExportError(ValueError):
    """The model or the options cannot be exported to GGUF; nothing was written."""


def export_gguf(model, out_path, tokenizer=None, *, embed_type: str = "f16", fallback_type: str = "f16",
                low_bits: str = "q4_1", strict: bool = False, tokenizer_pre: str | None = None,
                name: str | None = None) -> dict:
    """Write ``model`` (quantized by ``sliderquant.quantize``) as one GGUF file at ``out_path``.

    ``low_bits``: how 2- and 3-bit grids are written: ``"q4_1"`` exact (5 bits a weight), or
    ``"kquant"``: Q2_K (asymmetric 2-bit) / Q3_K (3-bit) fitted to the grid wherever rows are multiples
    of 256 and groups multiples of 16, the rest as with ``"q4_1"`` (see the module doc).

    Returns a summary: ``path``, ``file_size`` (bytes), ``architecture``, ``tensor_types``
    (GGUF name -> type), ``type_counts``, ``max_weight_error`` (GGUF name -> largest |difference|
    between gguf-py's dequantization of what was written and our weight; quantized linears only),
    ``fit_error`` (GGUF name -> relative RMS of that difference, for the fitted K-quant tensors),
    ``warnings``.
    """
    import gguf

    out_path = os.fspath(out_path)
    if os.path.isdir(out_path):
        raise GGUFExportError(f"export_gguf: {out_path} is a directory; give the path of a .gguf file")
    for opt, value, allowed in (("embed_type", embed_type, EMBED_TYPES), ("fallback_type", fallback_type, FLOAT_TYPES),
                                ("low_bits", low_bits, LOW_BITS)):
        if value not in allowed:
            raise GGUFExportError(f"export_gguf: {opt}={value!r} is not one of {', '.join(allowed)}")
    state = getattr(model, "sliderquant_state", None)
    if state is None:
        raise GGUFExportError("export_gguf: this model carries no sliderquant quantization state; "
                              "call sliderquant.quantize(model, ...) first (or load a sliderquant.save directory)")
    cfg = state["config"]
    wbits, symmetric = int(cfg["wbits"]), bool(cfg.get("symmetric", False))
    if not 2 <= wbits <= 8:
        raise GGUFExportError(f"export_gguf: {wbits}-bit codes cannot be written as GGUF blocks (2..8 bits)")
    arch, hp = _hyperparameters(model)
    warnings: list[str] = []
    if hp["sliding_window"] and hp["sliding_window"] < hp["context_length"]:
        warnings.append(f"sliding_window={hp['sliding_window']} is not written: llama.cpp's Llama graph attends "
                        f"over the whole context, the same as the model up to {hp['sliding_window']} tokens")
    vocab = _vocabulary(tokenizer, hp["vocab_size"], tokenizer_pre, warnings)
    tensors = _tensors(model, state, hp, embed_type, fallback_type, low_bits, strict, warnings)
    for w in warnings:
        log.warning("%s", w)

    parent = os.path.dirname(os.path.abspath(out_path))
    os.makedirs(parent, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(out_path)}.partial-", dir=parent)
    os.close(fd)
    try:
        writer = gguf.GGUFWriter(tmp, arch)
        _write_metadata(writer, gguf, arch, hp, cfg, tensors, name or _model_name(model))
        if vocab is not None:
            vocab(writer)
        for t in tensors:
            writer.add_tensor(t["name"], t["data"], raw_dtype=t["raw_dtype"])
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)      # mkstemp makes the file private; an export is an ordinary file
        os.replace(tmp, out_path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    types = {t["name"]: t["type"] for t in tensors}
    counts: dict[str, int] = {}
    for ty in types.values():
        counts[ty] = counts.get(ty, 0) + 1
    return {"path": out_path, "file_size": os.path.getsize(out_path), "architecture": arch,
            "tensor_types": types, "type_counts": counts,
            "max_weight_error": {t["name"]: t["error"] for t in tensors if t.get("error") is not None},
            "fit_error": {t["name"]: t["fit_error"] for t in tensors if t.get("fit_error") is not None},
            "warnings": warnings}


# ---- architecture ------------------------------------------------------------------------------------
def _hyperparameters(model) -> tuple[str, dict]:
    c = getattr(model, "config", None)
    model_type = getattr(c, "model_type", None)
    if model_type not in ARCHITECTURES:
        raise GGUFExportError(f"export_gguf: model type {model_type!r} is not supported; GGUF export writes "
                              f"the Llama-family architectures {', '.join(sorted(ARCHITECTURES))}")
    if getattr(c, "attention_bias", False) or getattr(c, "mlp_bias", False):
        raise GGUFExportError("export_gguf: linears with biases (attention_bias/mlp_bias) are not supported")
    if getattr(c, "hidden_act", "silu") != "silu":
        raise GGUFExportError(f"export_gguf: hidden_act {c.hidden_act!r}: llama.cpp's Llama graph uses silu")
    rope = getattr(c, "rope_parameters", None) or getattr(c, "rope_scaling", None) or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type != "default":
        raise GGUFExportError(f"export_gguf: rope_type {rope_type!r} is not supported (only unscaled rotary "
                              f"embeddings are written)")
    theta = rope.get("rope_theta", getattr(c, "rope_theta", None))
    if theta is None:
        raise GGUFExportError("export_gguf: the model config has no rope_theta")
    n_head, n_kv = c.num_attention_heads, getattr(c, "num_key_value_heads", None) or c.num_attention_heads
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // n_head
    if head_dim % 2:
        raise GGUFExportError(f"export_gguf: head_dim {head_dim} is odd; rotary pairs need an even head size")
    hp = {"context_length": c.max_position_embeddings, "embedding_length": c.hidden_size,
          "block_count": c.num_hidden_layers, "feed_forward_length": c.intermediate_size,
          "head_count": n_head, "head_count_kv": n_kv, "head_dim": head_dim,
          "rms_eps": float(c.rms_norm_eps), "rope_theta": float(theta), "vocab_size": c.vocab_size,
          "tied": bool(getattr(c, "tie_word_embeddings", False)),
          "sliding_window": getattr(c, "sliding_window", None)}
    return ARCHITECTURES[model_type], hp


def _model_name(model) -> str:
    c = model.config
    # not the model type: transformers' GGUF loader reads a "mistral" in general.name as a request for a
    # "mistral" gguf-py architecture, which does not exist (llama.cpp reads the file either way)
    return str(getattr(c, "_name_or_path", "") or getattr(c, "name_or_path", "") or "sliderquant export")


def permute_rows(a: np.ndarray, n_head: int) -> np.ndarray:
    """Rows of one q/k projection in llama.cpp's order: within each head, the halves interleaved
    (new row ``2j + t`` = old row ``t * hd/2 + j``).  Works on codes, scales, zeros and weights."""
    rows = a.shape[0]
    return a.reshape(n_head, 2, rows // n_head // 2, *a.shape[1:]).swapaxes(1, 2).reshape(a.shape)


# ---- tensors -----------------------------------------------------------------------------------------
def _tensors(model, state, hp, embed_type, fallback_type, low_bits, strict, warnings) -> list[dict]:
    from .. import models
    cfg = state["config"]
    codes = state["tensors"]
    layers = models.decoder_layers(model)
    prefix = next(n for n, m in model.named_modules() if m is layers)
    out = [_float_tensor("token_embd.weight", model.get_input_embeddings().weight, embed_type)]
    if not hp["tied"]:
        out.append(_float_tensor("output.weight", model.get_output_embeddings().weight, embed_type))
    out.append(_float_tensor("output_norm.weight", models.final_norm(model).weight, "f32"))
    fallbacks: dict[str, list[str]] = {}
    not_kquant: dict[str, list[str]] = {}
    for i, layer in enumerate(layers):
        for hf, gg in LAYER_TENSORS.items():
            name = f"blk.{i}.{gg}.weight"
            module = layer.get_submodule(hf)
            key = f"{prefix}.{i}.{hf}"
            if not hf.endswith("_proj"):
                out.append(_float_tensor(name, module.weight, "f32"))
                continue
            if f"{key}.qweight" not in codes:
                raise GGUFExportError(f"export_gguf: {key} has no codes in sliderquant_state; the state is "
                                      f"incomplete (re-run quantize, or load the sliderquant directory)")
            q, s, z = (codes[f"{key}.{p}"].detach().cpu() for p in ("qweight", "scales", "zeros"))
            n_head = {"attn_q": hp["head_count"], "attn_k": hp["head_count_kv"]}.get(gg)
            t, why = _quantized_tensor(name, q, s, z, cfg, low_bits, n_head)
            if t is None:
                if strict:
                    raise GGUFExportError(f"export_gguf: {name} ({key}) cannot be written as a GGUF block type: "
                                          f"{why} (strict=True refuses the {fallback_type.upper()} fallback)")
                weight = _dequantize(q, s, z)
                if n_head:
                    weight = permute_rows(weight, n_head)
                t = _float_tensor(name, weight, fallback_type)
                fallbacks.setdefault(f"{gg}: {why}", []).append(name)
            elif t.get("not_kquant"):
                not_kquant.setdefault(f"{t['type']} (exact, {BITS_PER_WEIGHT[t['type']]} bits a weight): "
                                      f"{t['not_kquant']}", []).append(name)
            out.append(t)
    for why, names in fallbacks.items():
        warnings.append(f"{len(names)} tensor(s) kept {fallback_type.upper()} (dequantized codes, larger file), "
                        f"{why}; e.g. {names[0]}")
    for why, names in not_kquant.items():
        warnings.append(f"low_bits='kquant': {len(names)} tensor(s) written as {why}; e.g. {names[0]}")
    return out


def _float_tensor(name: str, w, kind: str) -> dict:
    import gguf
    a = w.detach().float().cpu().numpy() if isinstance(w, torch.Tensor) else np.asarray(w, np.float32)
    if kind == "q8_0":
        if a.shape[-1] % QK:
            return _float_tensor(name, a, "f16")
        return {"name": name, "data": gguf.quants.quantize(a, gguf.GGMLQuantizationType.Q8_0),
                "raw_dtype": gguf.GGMLQuantizationType.Q8_0, "type": "Q8_0"}
    data = a.astype(np.float16 if kind == "f16" else np.float32)
    return {"name": name, "data": np.ascontiguousarray(data), "raw_dtype": None, "type": kind.upper()}


def _dequantize(q, s, z) -> np.ndarray:
    from ..quantizer import dequantize
    return dequantize(q, s, z).numpy()


def _kquant_type(wbits, symmetric, in_f, group):
    """``("Q2_K" | "Q3_K", None)`` where ``low_bits="kquant"`` fits a K-quant, else ``(None, reason)``."""
    if wbits == 2 and symmetric:
        return None, "Q2_K is fitted to asymmetric 2-bit grids only"
    if wbits not in (2, 3):
        return None, None
    if in_f % QK_K:
        return None, f"rows of {in_f} are not a multiple of the {QK_K}-weight K-quant super-block"
    if group % K_SUB:
        return None, f"groups of {group} split the {K_SUB}-weight K-quant sub-blocks"
    return ("Q2_K" if wbits == 2 else "Q3_K"), None


def _quantized_tensor(name, q, s, z, cfg, low_bits, n_head):
    """``(tensor dict, None)``, or ``(None, reason)`` when no block type holds these codes."""
    import gguf
    from gguf import GGMLQuantizationType as T
    wbits, symmetric = int(cfg["wbits"]), bool(cfg.get("symmetric", False))
    out_f, in_f = q.shape
    group = in_f // s.shape[1]
    kquant, not_kquant = _kquant_type(wbits, symmetric, in_f, group) if low_bits == "kquant" else (None, None)
    if kquant is None and in_f % QK:
        return None, f"rows of {in_f} are not a multiple of the {QK}-weight GGUF block"
    if kquant is None and group % QK:
        return None, f"groups of {group} split the {QK}-weight GGUF blocks"
    qn, sn, zn = q.numpy().astype(np.int32), s.numpy().astype(np.float64), z.numpy().astype(np.float64)
    if n_head:
        qn, sn, zn = permute_rows(qn, n_head), permute_rows(sn, n_head), permute_rows(zn, n_head)

    if kquant is not None:
        from .gguf_kquants import pack_q2_k, pack_q3_k
        data = (pack_q2_k if kquant == "Q2_K" else pack_q3_k)(qn, sn, zn)
        qtype = getattr(T, kquant)
    else:
        per_block = group // QK
        d = np.repeat(sn, per_block, axis=1)                  # (out, n_blocks): one scale per 32 weights
        zb = np.repeat(zn, per_block, axis=1)
        qb = qn.reshape(out_f, in_f // QK, QK)
        if wbits <= 4 and not symmetric:
            data, qtype = _pack_q4(qb, d, -d * zb, with_min=True), T.Q4_1
        elif wbits <= 4:
            data, qtype = _pack_q4(qb + 8, d, None, with_min=False), T.Q4_0
        else:
            c = qb - zb[..., None]
            if not np.all(c == np.round(c)) or c.min() < -128 or c.max() > 127:
                return None, f"{wbits}-bit asymmetric codes minus their zero points do not fit Q8_0's int8"
            data, qtype = _pack_q8_0(c.astype(np.int8), d), T.Q8_0
        if data is None:
            return None, "a scale or minimum overflows fp16"
    # the oracle is gguf-py's own dequantizer, not our packing: what llama.cpp will read back
    ours = _dequantize(q, s, z)
    if n_head:
        ours = permute_rows(ours, n_head)
    diff = gguf.quants.dequantize(data, qtype).astype(np.float64) - ours
    if not np.all(np.isfinite(diff)):
        return None, "a scale or minimum overflows fp16"
    t = {"name": name, "data": data, "raw_dtype": qtype, "type": qtype.name, "error": float(np.abs(diff).max())}
    if kquant is not None:
        t["fit_error"] = float(np.sqrt((diff ** 2).sum() / max((ours.astype(np.float64) ** 2).sum(), 1e-300)))
    elif not_kquant:
        t["not_kquant"] = not_kquant
    return t, None


def _fp16_bytes(x: np.ndarray):
    h = x.astype(np.float16)
    if not np.all(np.isfinite(h)):
        return None
    return h.view(np.uint8).reshape(*x.shape, 2)


def _pack_q4(codes: np.ndarray, d: np.ndarray, m, with_min: bool):
    """Q4_0/Q4_1 bytes (out, n_blocks * 18|20): fp16 d, [fp16 m], then 16 bytes whose low nibbles
    hold the block's first 16 codes and high nibbles the last 16."""
    c = codes.astype(np.uint8)
    nibbles = c[..., :16] | (c[..., 16:] << 4)
    parts = [_fp16_bytes(d)] + ([_fp16_bytes(m)] if with_min else []) + [nibbles]
    if any(p is None for p in parts):
        return None
    return np.concatenate(parts, axis=-1).reshape(codes.shape[0], -1)


def _pack_q8_0(codes: np.ndarray, d: np.ndarray):
    """Q8_0 bytes (out, n_blocks * 34): fp16 d, then the 32 codes as int8."""
    db = _fp16_bytes(d)
    if db is None:
        return None
    return np.concatenate([db, codes.view(np.uint8)], axis=-1).reshape(codes.shape[0], -1)


# ---- metadata ----------------------------------------------------------------------------------------
_FILE_TYPES = {"F32": "ALL_F32", "F16": "MOSTLY_F16", "Q4_0": "MOSTLY_Q4_0", "Q4_1": "MOSTLY_Q4_1",
               "Q8_0": "MOSTLY_Q8_0", "Q2_K": "MOSTLY_Q2_K", "Q3_K": "MOSTLY_Q3_K_S"}


def _write_metadata(w, gguf, arch, hp, cfg, tensors, name):
    from .. import __version__
    w.add_name(name)
    w.add_context_length(hp["context_length"])
    w.add_embedding_length(hp["embedding_length"])
    w.add_block_count(hp["block_count"])
    w.add_feed_forward_length(hp["feed_forward_length"])
    w.add_head_count(hp["head_count"])
    w.add_head_count_kv(hp["head_count_kv"])
    w.add_rope_dimension_count(hp["head_dim"])
    if hp["head_dim"] * hp["head_count"] != hp["embedding_length"]:
        w.add_key_length(hp["head_dim"])
        w.add_value_length(hp["head_dim"])
    w.add_layer_norm_rms_eps(hp["rms_eps"])
    w.add_rope_freq_base(hp["rope_theta"])
    w.add_vocab_size(hp["vocab_size"])
    # file type: the type that holds most of the quantized linears' weights
    sizes: dict[str, int] = {}
    for t in tensors:
        if t["name"].startswith("blk.") and not t["name"].endswith("norm.weight"):
            sizes[t["type"]] = sizes.get(t["type"], 0) + 1
    main = max(sizes, key=sizes.get)
    w.add_file_type(getattr(gguf.LlamaFileType, _FILE_TYPES[main]))
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    # provenance: who made the codes, how
    w.add_quantized_by(f"sliderquant {__version__}")
    w.add_string("sliderquant.version", __version__)
    w.add_string("sliderquant.method", str(cfg.get("method", "")))
    w.add_uint32("sliderquant.wbits", int(cfg["wbits"]))
    w.add_int32("sliderquant.group_size", -1 if cfg.get("group_size") is None else int(cfg["group_size"]))
    w.add_bool("sliderquant.symmetric", bool(cfg.get("symmetric", False)))
    w.add_string("sliderquant.config", json.dumps(cfg, sort_keys=True, default=str))


# ---- tokenizer ---------------------------------------------------------------------------------------
# token types of llama.cpp's vocabulary
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6


def _vocabulary(tokenizer, n_vocab: int, pre: str | None, warnings: list):
    """A function writing the tokenizer metadata, or None (no tokenizer).  Checks happen here,
    before anything is written."""
    if tokenizer is None:
        warnings.append("no tokenizer given: the GGUF has no vocabulary; llama.cpp needs one to load it "
                        "(pass tokenizer=...)")
        return None
    spm_file = getattr(tokenizer, "vocab_file", None)
    if spm_file and str(spm_file).endswith(".model") and os.path.isfile(spm_file):
        tokens, scores, types = _sentencepiece_vocab(tokenizer, spm_file, n_vocab)
        model_name, merges = "llama", None
    else:
        tokens, types, merges = _byte_bpe_vocab(tokenizer, n_vocab)
        scores, model_name = None, "gpt2"
        if pre is None:
            pre = _detect_pre(tokens)
            if pre is None:
                pre = "default"
                warnings.append("unknown BPE pre-tokenizer: wrote tokenizer.ggml.pre='default'; pass "
                                "tokenizer_pre=<llama.cpp's name for this vocabulary> for exact tokenization")
    probe = tokenizer("a")["input_ids"]
    specials = {k: getattr(tokenizer, f"{k}_token_id", None) for k in ("bos", "eos", "unk", "pad")}
    add_bos = specials["bos"] is not None and len(probe) > 0 and probe[0] == specials["bos"]
    add_eos = specials["eos"] is not None and len(probe) > 0 and probe[-1] == specials["eos"]
    template = getattr(tokenizer, "chat_template", None)

    def write(w):
        w.add_tokenizer_model(model_name)
        if model_name == "gpt2":
            w.add_tokenizer_pre(pre)
        w.add_token_list(tokens)
        if scores is not None:
            w.add_token_scores(scores)
        w.add_token_types(types)
        if merges is not None:
            w.add_token_merges(merges)
        for key, tid in specials.items():
            if tid is not None and 0 <= tid < n_vocab:
                getattr(w, f"add_{key}_token_id")(int(tid))
        w.add_add_bos_token(bool(add_bos))
        w.add_add_eos_token(bool(add_eos))
        if isinstance(template, str):
            w.add_chat_template(template)
    return write


def _pad(tokens: list, types: list, n_vocab: int, what: str):
    if len(tokens) > n_vocab:
        raise GGUFExportError(f"export_gguf: the tokenizer has {len(tokens)} tokens, more than the model's "
                              f"{n_vocab} embedding rows ({what})")
    for i in range(len(tokens), n_vocab):     # embedding rows no token uses
        tokens.append(f"[PAD{i}]")
        types.append(UNUSED)


def _sentencepiece_vocab(tokenizer, path, n_vocab):
    import sentencepiece as spm
    sp = spm.SentencePieceProcessor(model_file=str(path))
    tokens, scores, types = [], [], []
    for i in range(sp.vocab_size()):
        tokens.append(sp.id_to_piece(i))
        scores.append(float(sp.get_score(i)))
        types.append(UNKNOWN if sp.is_unknown(i) else CONTROL if sp.is_control(i) else
                     BYTE if sp.is_byte(i) else UNUSED if sp.is_unused(i) else NORMAL)
    for tid, tok in sorted(getattr(tokenizer, "added_tokens_decoder", {}).items()):
        if tid >= len(tokens):
            if tid != len(tokens):
                raise GGUFExportError(f"export_gguf: added token id {tid} leaves a gap in the vocabulary")
            tokens.append(str(tok))
            scores.append(0.0)
            types.append(CONTROL if getattr(tok, "special", False) else USER_DEFINED)
    _pad(tokens, types, n_vocab, "sentencepiece")
    scores += [0.0] * (len(tokens) - len(scores))
    return tokens, scores, types


def _byte_bpe_vocab(tokenizer, n_vocab):
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise GGUFExportError(f"export_gguf: tokenizer {type(tokenizer).__name__} is neither SentencePiece "
                              f"(with its .model file) nor a fast BPE tokenizer; GGUF export writes those two")
    spec = json.loads(backend.to_str())
    model = spec.get("model", {})
    pre = json.dumps(spec.get("pre_tokenizer"))
    if model.get("type") != "BPE" or "ByteLevel" not in pre:
        raise GGUFExportError(f"export_gguf: the tokenizer is a {model.get('type')} model with pre-tokenizer "
                              f"{pre[:80]}; GGUF export writes SentencePiece and GPT-2 style byte-level BPE")
    by_id: dict[int, tuple[str, int]] = {tid: (tok, NORMAL) for tok, tid in model["vocab"].items()}
    for added in spec.get("added_tokens", []):
        by_id[added["id"]] = (added["content"], CONTROL if added.get("special") else USER_DEFINED)
    size = max(by_id) + 1 if by_id else 0
    if size > n_vocab:
        raise GGUFExportError(f"export_gguf: the tokenizer has ids up to {size - 1}, beyond the model's "
                              f"{n_vocab} embedding rows")
    tokens, types = [], []
    for i in range(size):
        tok, ty = by_id.get(i, (f"[PAD{i}]", UNUSED))
        tokens.append(tok)
        types.append(ty)
    _pad(tokens, types, n_vocab, "BPE")
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    return tokens, types, merges


def _detect_pre(tokens: list) -> str | None:
    """llama.cpp's pre-tokenizer name for the vocabularies we know by their first tokens."""
    if len(tokens) == 49152 and tokens[:3] == ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]:
        return "smollm"
    return None
