"""Fine-tuning tasks: data readers, feature building and evaluation for every head.

    task = get_task("mrpc")
    train = task.read(task.train_file(glue_dir / "MRPC"))
    dev = {name: task.read(p) for name, p in task.eval_files(glue_dir / "MRPC").items()}
    task.setup(train, dev)                      # label set; checks dev labels
    settings = EncodeSettings.create(tokenizer, max_seq_length=128, tail_pad=3)
    feats = task.featurize(tokenizer, settings, train, train=True)
    ...
    scores, predictions = task.evaluate(dev[""], dev_feats, {"logits": logits})

Task names: the GLUE tasks (cola sst2 mrpc stsb qqp mnli qnli rte wnli), `classification` and
`regression` (CSV / TSV / JSON Lines with chosen columns), `multiple_choice` (and its presets
`race`, `swag`), `token_classification` (and `conll2003`), `question_answering` (SQuAD v1.1 or
v2.0, detected; `squad` and `squad_v2` fix the version). Every reader raises `DataError`
naming the file and line of the first bad record.
"""

from __future__ import annotations

from funnel_jax.tasks.classification import GLUE_TASKS, generic_task, glue_task
from funnel_jax.tasks.common import DataError, EncodeSettings, Features, SettingsError, Task
from funnel_jax.tasks.multiple_choice import MultipleChoiceTask
from funnel_jax.tasks.question_answering import QuestionAnsweringTask
from funnel_jax.tasks.token_classification import TokenClassificationTask

TASK_KINDS = {
    **{name: "classification" for name in GLUE_TASKS},
    "stsb": "regression",
    "classification": "classification",
    "regression": "regression",
    "multiple_choice": "multiple_choice",
    "race": "multiple_choice",
    "swag": "multiple_choice",
    "token_classification": "token_classification",
    "conll2003": "token_classification",
    "question_answering": "question_answering",
    "squad": "question_answering",
    "squad_v2": "question_answering",
}
TASK_NAMES = tuple(TASK_KINDS)


def get_task(
    name: str,
    *,
    text_column: str | None = None,
    text_pair_column: str | None = None,
    label_column: str | None = None,
    labels=None,
    max_qa_length: int = 128,
    doc_stride: int = 128,
    max_query_length: int = 64,
    max_answer_length: int = 64,
    n_best_size: int = 20,
    null_score_diff_threshold: float = 0.0,
    skip_malformed: bool = False,
) -> Task:
    """The task called `name` (see TASK_NAMES); the keyword options apply to the kinds that use
    them (columns and labels: `classification` / `regression`; labels also
    `token_classification`; QA windows: the question-answering tasks)."""
    key = name.lower().replace("-", "_")
    key = {"sst_2": "sst2", "sts_b": "stsb", "squad_v1": "squad", "squad2": "squad_v2"}.get(
        key, key
    )
    if key not in TASK_KINDS:
        raise SettingsError(f"unknown task {name!r}; expected one of {', '.join(TASK_NAMES)}")
    if key in GLUE_TASKS:
        return glue_task(key, skip_malformed=skip_malformed)
    if key in ("classification", "regression"):
        return generic_task(
            regression=key == "regression",
            text_column=text_column or "text",
            pair_column=text_pair_column,
            label_column=label_column or "label",
            labels=labels,
            skip_malformed=skip_malformed,
        )
    if TASK_KINDS[key] == "multiple_choice":
        return MultipleChoiceTask(key, max_qa_length=max_qa_length, skip_malformed=skip_malformed)
    if TASK_KINDS[key] == "token_classification":
        return TokenClassificationTask(key, labels=labels)
    version = {"squad": "v1", "squad_v2": "v2"}.get(key)
    return QuestionAnsweringTask(
        key,
        version=version,
        doc_stride=doc_stride,
        max_query_length=max_query_length,
        max_answer_length=max_answer_length,
        n_best_size=n_best_size,
        null_score_diff_threshold=null_score_diff_threshold,
    )


__all__ = [
    "TASK_KINDS",
    "TASK_NAMES",
    "DataError",
    "EncodeSettings",
    "Features",
    "MultipleChoiceTask",
    "QuestionAnsweringTask",
    "SettingsError",
    "Task",
    "TokenClassificationTask",
    "get_task",
]
