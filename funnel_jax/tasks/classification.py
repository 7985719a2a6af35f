"""Sequence classification and regression: the GLUE tasks and generic CSV / TSV / JSON Lines."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from funnel_jax import metrics
from funnel_jax.tasks.common import (
    DataError,
    EncodeSettings,
    Features,
    Row,
    Task,
    encode_pairs,
    find_file,
    read_table,
    read_tsv,
)


@dataclasses.dataclass
class TextExample:
    text: str
    pair: str | None
    label: Any  # str for classification, float for regression
    where: str  # file:line


@dataclasses.dataclass(frozen=True)
class GlueSpec:
    text: str
    pair: str | None
    label: str
    labels: tuple[str, ...] | None  # None: regression
    metrics: tuple[str, ...]
    main: str
    columns: tuple[str, ...] | None = None  # files without a header row (CoLA)
    dev_files: tuple[tuple[str, str], ...] = (("", "dev.tsv"),)


# Column names of the official GLUE files (https://gluebenchmark.com/tasks, as in
# GLUE's download script). CoLA's train/dev files have no header.
GLUE_TASKS: dict[str, GlueSpec] = {
    "cola": GlueSpec(
        "sentence",
        None,
        "label",
        ("0", "1"),
        ("matthews_correlation",),
        "matthews_correlation",
        columns=("source", "label", "original_label", "sentence"),
    ),
    "sst2": GlueSpec("sentence", None, "label", ("0", "1"), ("accuracy",), "accuracy"),
    "mrpc": GlueSpec(
        "#1 String", "#2 String", "Quality", ("0", "1"), ("accuracy", "f1"), "accuracy"
    ),
    "stsb": GlueSpec(
        "sentence1", "sentence2", "score", None, ("pearson", "spearmanr"), "spearmanr"
    ),
    "qqp": GlueSpec(
        "question1", "question2", "is_duplicate", ("0", "1"), ("accuracy", "f1"), "accuracy"
    ),
    "mnli": GlueSpec(
        "sentence1",
        "sentence2",
        "gold_label",
        ("contradiction", "entailment", "neutral"),
        ("accuracy",),
        "accuracy",
        dev_files=(("", "dev_matched.tsv"), ("mismatched", "dev_mismatched.tsv")),
    ),
    "qnli": GlueSpec(
        "question", "sentence", "label", ("entailment", "not_entailment"), ("accuracy",), "accuracy"
    ),
    "rte": GlueSpec(
        "sentence1",
        "sentence2",
        "label",
        ("entailment", "not_entailment"),
        ("accuracy",),
        "accuracy",
    ),
    "wnli": GlueSpec("sentence1", "sentence2", "label", ("0", "1"), ("accuracy",), "accuracy"),
}


def _parse_float(value: Any, where: str, column: str) -> float:
    try:
        out = float(value)
    except (TypeError, ValueError):
        raise DataError(
            f"{where}: label {column!r} must be a number for regression, got {value!r}"
        ) from None
    if not np.isfinite(out):
        raise DataError(f"{where}: label {column!r} is not finite ({value!r})")
    return out


def _label_str(value: Any) -> str:
    if isinstance(value, bool):
        return str(int(value))
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value).strip()


def _sort_labels(labels) -> list[str]:
    try:
        return sorted(labels, key=lambda s: (0, float(s), s))
    except ValueError:
        return sorted(labels)


class SequenceClassificationTask(Task):
    """One text or a pair -> one label (or a number: regression). Model: the base model (no
    decoder) with the classification head on `<cls>` (FunnelForSequenceClassification)."""

    kind = "classification"
    model_class = "FunnelForSequenceClassification"

    def __init__(
        self,
        name: str,
        text_column: str,
        pair_column: str | None,
        label_column: str,
        labels: Sequence[str] | None,
        regression: bool = False,
        metric_names: Sequence[str] | None = None,
        main_metric: str | None = None,
        header_columns: Sequence[str] | None = None,
        dev_files: Sequence[tuple[str, str]] = (),
        train_names: Sequence[str] = (),
        skip_malformed: bool = False,
    ):
        self.name = name
        self.text_column = text_column
        self.pair_column = pair_column
        self.label_column = label_column
        self.labels = list(labels) if labels is not None else None
        self.regression = regression
        if regression:
            self.kind = "regression"
            self.labels = None
        self.metric_names = tuple(metric_names) if metric_names else self._default_metrics()
        self.main_metric = main_metric or self.metric_names[0]
        self.header_columns = tuple(header_columns) if header_columns else None
        self._dev_files = tuple(dev_files)
        self._train_names = tuple(train_names)
        self.skip_malformed = skip_malformed

    def _default_metrics(self):
        if self.regression:
            return ("spearmanr", "pearson", "mse")
        if self.labels is not None and len(self.labels) == 2:
            return ("accuracy", "f1", "matthews_correlation")
        return ("accuracy",)

    # files
    def train_file(self, data_dir) -> Path:
        return find_file(data_dir, self._train_names, "training")

    def eval_files(self, data_dir) -> dict[str, Path]:
        return {name: Path(data_dir) / f for name, f in self._dev_files}

    def _rows(self, path) -> list[Row]:
        if self.name in GLUE_TASKS:  # the official files: TSV, header row except CoLA
            return read_tsv(path, self.header_columns, self.skip_malformed)
        return read_table(path, self.skip_malformed)

    def read(self, path) -> list[TextExample]:
        rows = self._rows(path)
        if not rows:
            raise DataError(f"{path}: no data rows")
        out = []
        for row in rows:
            text = row.text(self.text_column)
            pair = row.text(self.pair_column) if self.pair_column else None
            raw = row.get(self.label_column, "label column")
            if self.regression:
                label = _parse_float(raw, row.where, self.label_column)
            else:
                if raw is None or (isinstance(raw, str) and not raw.strip()):
                    raise DataError(f"{row.where}: empty label in column {self.label_column!r}")
                if not isinstance(raw, str | int | float | bool):
                    raise DataError(
                        f"{row.where}: label must be a string or a number, got {type(raw).__name__}"
                    )
                label = _label_str(raw)
                if self.labels is not None and label not in self.labels:
                    raise DataError(
                        f"{row.where}: label {label!r} is not one of the labels of "
                        f"{self.name} ({', '.join(self.labels)})"
                    )
            out.append(TextExample(text, pair, label, row.where))
        return out

    def setup(self, train_examples, eval_examples) -> None:
        if self.regression:
            return
        if self.labels is None:
            found = {ex.label for ex in train_examples}
            if len(found) < 2:
                raise DataError(
                    f"{train_examples[0].where.rsplit(':', 1)[0]}: the training data has "
                    f"{len(found)} distinct label(s) ({', '.join(sorted(found))}); "
                    "classification needs at least 2"
                )
            self.labels = _sort_labels(found)
            if self.metric_names == ("accuracy",) and len(self.labels) == 2:
                self.metric_names = self._default_metrics()
        known = set(self.labels)
        for examples in eval_examples.values():
            for ex in examples:
                if ex.label not in known:
                    raise DataError(
                        f"{ex.where}: label {ex.label!r} does not occur in the training data "
                        f"(labels: {', '.join(self.labels)})"
                    )

    def texts(self, examples):
        for ex in examples:
            yield ex.text
            if ex.pair is not None:
                yield ex.pair

    def config_overrides(self) -> dict[str, Any]:
        if self.regression:
            return {
                "num_labels": 1,
                "id2label": {0: "LABEL_0"},
                "label2id": {"LABEL_0": 0},
                "problem_type": "regression",
            }
        id2label = dict(enumerate(self.labels))
        return {
            "num_labels": len(self.labels),
            "id2label": id2label,
            "label2id": {v: k for k, v in id2label.items()},
            "problem_type": "single_label_classification",
        }

    def featurize(self, tokenizer, settings: EncodeSettings, examples, train: bool) -> Features:
        pairs = [ex.pair for ex in examples] if self.pair_column else None
        arrays = encode_pairs(tokenizer, settings, [ex.text for ex in examples], pairs)
        if self.regression:
            arrays["labels"] = np.array([ex.label for ex in examples], np.float32)
        else:
            index = {label: i for i, label in enumerate(self.labels)}
            arrays["labels"] = np.array([index[ex.label] for ex in examples], np.int32)
        return Features(arrays)

    def evaluate(self, examples, features: Features, outputs):
        logits = np.asarray(outputs["logits"], np.float64)
        gold = features.arrays["labels"]
        if self.regression:
            preds = logits[:, 0]
            values = {
                "pearson": metrics.pearson(preds, gold),
                "spearmanr": metrics.spearman(preds, gold),
                "mse": float(np.mean((preds - gold) ** 2)),
            }
        else:
            preds = logits.argmax(-1)
            values = {
                "accuracy": metrics.accuracy(preds, gold),
                "matthews_correlation": metrics.matthews_corrcoef(preds, gold),
            }
            if len(self.labels) == 2:
                values["f1"] = metrics.f1_score(preds, gold, positive=1)
        out = {k: values[k] for k in self.metric_names if k in values}
        return out, preds

    def write_predictions(self, path_stem: Path, examples, predictions) -> Path:
        path = path_stem.with_suffix(".tsv")
        with open(path, "w", encoding="utf-8") as f:
            f.write("index\tprediction\tlabel\n")
            for i, (ex, p) in enumerate(zip(examples, predictions, strict=True)):
                if self.regression:
                    f.write(f"{i}\t{float(p):.6f}\t{ex.label}\n")
                else:
                    f.write(f"{i}\t{self.labels[int(p)]}\t{ex.label}\n")
        return path

    def info(self) -> dict[str, Any]:
        return {"labels": self.labels, "metrics": list(self.metric_names)}


def glue_task(name: str, skip_malformed: bool = False) -> SequenceClassificationTask:
    spec = GLUE_TASKS[name]
    return SequenceClassificationTask(
        name=name,
        text_column=spec.text,
        pair_column=spec.pair,
        label_column=spec.label,
        labels=spec.labels,
        regression=spec.labels is None,
        metric_names=spec.metrics,
        main_metric=spec.main,
        header_columns=spec.columns,
        dev_files=spec.dev_files,
        train_names=("train.tsv",),
        skip_malformed=skip_malformed,
    )


GENERIC_TRAIN_NAMES = ("train.jsonl", "train.csv", "train.tsv", "train.json")
GENERIC_DEV_NAMES = ("dev.jsonl", "dev.csv", "dev.tsv", "validation.jsonl", "dev.json")


def generic_task(
    regression: bool,
    text_column: str = "text",
    pair_column: str | None = None,
    label_column: str = "label",
    labels: Sequence[str] | None = None,
    skip_malformed: bool = False,
) -> SequenceClassificationTask:
    task = SequenceClassificationTask(
        name="regression" if regression else "classification",
        text_column=text_column,
        pair_column=pair_column,
        label_column=label_column,
        labels=labels,
        regression=regression,
        train_names=GENERIC_TRAIN_NAMES,
        skip_malformed=skip_malformed,
    )
    task.eval_files = lambda data_dir: {"": find_file(data_dir, GENERIC_DEV_NAMES, "dev")}
    return task
