"""EleutherAI's lm-evaluation-harness at every rank: the loaded model is handed to the harness's
`HFLM` once, and the rank is set between its runs (rank 0 = the base model, adapters off).

The harness is an optional extra (`pip install qdylora[lm-eval]`); offline it cannot download
task data, so local tasks come from task YAMLs in a directory (`include_path`), as the harness's
own `--include_path` takes them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional, Sequence

from ..core.model import QDyLoRAModel
from ..core.rank import at_rank
from ..errors import QDyLoRAError
from .choice import adds_bos

INSTALL = "pip install 'qdylora[lm-eval]' (or pip install lm-eval)"


CHOICE_TASK = """task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{prompt}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: gold
target_delimiter: "{delimiter}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
"""


def write_choice_task(rows: Sequence[dict], folder: str | Path, name: str) -> Path:
    """An lm-eval task over multiple-choice `rows` (any shape `choice` reads) that prompts and
    scores exactly as our `choice` metric does without a chat template: FOLDER/NAME.jsonl
    (question, choices, gold) and FOLDER/tasks/NAME.yaml. Returns the task directory, for
    `--lm-eval NAME --lm-eval-include DIR` (or the harness's own --include_path)."""
    import json

    from .choice import PROMPT, TARGET_DELIMITER, choice_questions

    folder = Path(folder)
    (folder / "tasks").mkdir(parents=True, exist_ok=True)
    data = (folder / f"{name}.jsonl").resolve()
    data.write_text("".join(json.dumps({"question": q.question, "choices": list(q.options), "gold": q.answer}) + "\n"
                            for q in choice_questions(rows)))
    prompt = PROMPT.replace("{question}", "{{question}}").replace("\n", "\\n")  # a YAML string, jinja field
    (folder / "tasks" / f"{name}.yaml").write_text(
        CHOICE_TASK.format(name=name, data=data, prompt=prompt, delimiter=TARGET_DELIMITER))
    return folder / "tasks"


def _harness():
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise QDyLoRAError(f"--lm-eval needs lm-evaluation-harness, which is not installed: {INSTALL}") from None
    return lm_eval, HFLM, TaskManager


def task_manager(tasks: Sequence[str], include: Optional[str | Path] = None):
    """The harness's TaskManager (with the task YAMLs under `include`), after checking every task
    name is one it knows."""
    _, _, TaskManager = _harness()
    if include is not None and not Path(include).is_dir():
        raise QDyLoRAError(f"--lm-eval-include {include} is not a directory of task YAML files")
    if include is not None:  # tasks all of your own: no need to index the harness's thousands (~15 s)
        mine = TaskManager(include_path=str(include), include_defaults=False)
        if set(tasks) <= set(mine.all_tasks):
            return mine
    manager = TaskManager(include_path=str(include) if include is not None else None)
    known = set(manager.all_tasks)
    unknown = [t for t in tasks if t not in known]
    if unknown:
        hint = "; --lm-eval-include DIR adds task YAMLs of your own" if include is None else f" (nor in {include})"
        raise QDyLoRAError(f"unknown lm-eval task {unknown[0]!r}: not a task of lm-evaluation-harness{hint}")
    return manager


def harness_at_ranks(model: QDyLoRAModel, tokenizer, tasks: Sequence[str], ranks: Sequence[int], *,
                     include: Optional[str | Path] = None, manager=None, limit: Optional[int] = None,
                     num_fewshot: Optional[int] = None, batch_size: int = 8,
                     on_rank: Optional[Callable[[int], None]] = None, with_stderr: bool = False,
                     ) -> tuple[dict[int, dict[str, dict[str, float]]], dict[str, dict[str, bool]]]:
    """({rank: {task: {metric: value}}}, {task: {metric: higher is better}}) of
    lm-evaluation-harness on `tasks` at each rank.

    The harness gets the model in memory (loaded and quantized once) and the tokenizer; a BOS
    token is put first exactly when the tokenizer puts one first, as training and our `choice`
    metric do. `limit` caps the documents per task (the harness's --limit); `manager` is a
    `task_manager(tasks, include)` made before (indexing the harness's tasks takes seconds).
    `with_stderr` adds the harness's standard error of each metric as "METRIC_stderr"."""
    lm_eval, HFLM, _ = _harness()
    manager = manager or task_manager(tasks, include)
    device = next(model.parameters()).device
    lm = HFLM(pretrained=model.model, tokenizer=tokenizer, batch_size=batch_size, device=str(device),
              add_bos_token=adds_bos(tokenizer))
    scores: dict[int, dict[str, dict[str, float]]] = {}
    higher: dict[str, dict[str, bool]] = {}
    for rank in ranks:
        with at_rank(model, rank):
            result = lm_eval.simple_evaluate(model=lm, tasks=list(tasks), task_manager=manager, limit=limit,
                                             num_fewshot=num_fewshot, log_samples=False, verbosity="ERROR")
        higher.update(result.get("higher_is_better", {}))
        scores[rank] = {task: _numbers(values, higher.get(task, {}), with_stderr)
                        for task, values in result["results"].items()}
        if on_rank is not None:
            on_rank(rank)
    return scores, higher


def _numbers(values: dict, metrics: dict[str, bool], with_stderr: bool = False) -> dict[str, float]:
    """A task's scores ("acc,none" -> "acc"; another filter: "exact_match[strict-match]"), only
    its metrics (no sample counts or labels; standard errors as "acc_stderr" if `with_stderr`)."""
    out = {}
    for key, value in values.items():
        metric, _, filt = key.partition(",")
        name = metric.removesuffix("_stderr") if with_stderr else metric
        if name in metrics and isinstance(value, (int, float)) and not isinstance(value, bool):
            out[metric if filt in ("", "none") else f"{name}[{filt}]{metric[len(name):]}"] = float(value)
    return out
