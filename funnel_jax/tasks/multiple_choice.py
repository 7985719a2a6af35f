"""Multiple choice (RACE, SWAG, ...) from JSON Lines.

One example per line::

    {"id": "high1234-2", "context": "passage ...", "question": "Why did ...?",
     "choices": ["because ...", "...", "...", "..."], "label": 2}

`question` may be absent or empty (SWAG-style: the choice alone continues the context);
`id` is optional. `label` is the index of the right choice. Every example of a run must have
the same number of choices (the model takes [batch, choices, length]).

Each choice is encoded as the pair `<cls> context <sep> question+choice <sep>`: the question
and the choice are joined by a space, or, when the question holds a blank `_`, the choice fills
the blank (as the original RACE code, after XLNet, does). The second segment keeps at most
`max_qa_length` tokens (its end); the context is cut to fill the rest.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import numpy as np

from funnel_jax import metrics
from funnel_jax.tasks.common import (
    MODEL_INPUTS,
    DataError,
    EncodeSettings,
    Features,
    Task,
    build_row,
    find_file,
    read_jsonl,
    token_ids,
)


@dataclasses.dataclass
class ChoiceExample:
    id: str
    context: str
    question: str
    choices: list[str]
    label: int
    where: str


def join_question_choice(question: str, choice: str) -> str:
    question = question.strip()
    if "_" in question:
        return question.replace("_", choice.strip())
    return f"{question} {choice.strip()}".strip()


class MultipleChoiceTask(Task):
    kind = "multiple_choice"
    model_class = "FunnelForMultipleChoice"
    main_metric = "accuracy"

    def __init__(
        self,
        name: str = "multiple_choice",
        max_qa_length: int = 128,
        skip_malformed: bool = False,
        train_names=("train.jsonl",),
        dev_names=("dev.jsonl", "validation.jsonl", "val.jsonl"),
    ):
        self.name = name
        self.max_qa_length = int(max_qa_length)
        self.skip_malformed = skip_malformed
        self.num_choices: int | None = None
        self._train_names = tuple(train_names)
        self._dev_names = tuple(dev_names)

    def train_file(self, data_dir) -> Path:
        return find_file(data_dir, self._train_names, "training")

    def eval_files(self, data_dir) -> dict[str, Path]:
        return {"": find_file(data_dir, self._dev_names, "dev")}

    def read(self, path) -> list[ChoiceExample]:
        rows = read_jsonl(path, self.skip_malformed)
        if not rows:
            raise DataError(f"{path}: no data rows")
        out = []
        for row in rows:
            context = row.text("context")
            question = row.fields.get("question") or ""
            if not isinstance(question, str):
                raise DataError(
                    f"{row.where}: 'question' must be a string, got {type(question).__name__}"
                )
            choices = row.get("choices", "field")
            if (
                not isinstance(choices, list)
                or len(choices) < 2
                or not all(isinstance(c, str) for c in choices)
            ):
                raise DataError(f"{row.where}: 'choices' must be a list of at least 2 strings")
            label = row.get("label", "field")
            if isinstance(label, bool) or not isinstance(label, int):
                raise DataError(
                    f"{row.where}: 'label' must be the index of the right choice (an int), "
                    f"got {label!r}"
                )
            if not 0 <= label < len(choices):
                raise DataError(
                    f"{row.where}: label {label} is outside the {len(choices)} choices "
                    f"(0..{len(choices) - 1})"
                )
            ex_id = str(row.fields.get("id", row.where))
            out.append(ChoiceExample(ex_id, context, question, list(choices), label, row.where))
        return out

    def setup(self, train_examples, eval_examples) -> None:
        self.num_choices = len(train_examples[0].choices)
        for examples in [train_examples, *eval_examples.values()]:
            for ex in examples:
                if len(ex.choices) != self.num_choices:
                    raise DataError(
                        f"{ex.where}: {len(ex.choices)} choices, but the first training "
                        f"example ({train_examples[0].where}) has {self.num_choices}; every "
                        "example needs the same number"
                    )

    def texts(self, examples):
        for ex in examples:
            yield ex.context
            if ex.question:
                yield ex.question
            yield from ex.choices

    def config_overrides(self) -> dict[str, Any]:
        return {
            "num_labels": 1,
            "id2label": {0: "LABEL_0"},
            "label2id": {"LABEL_0": 0},
            "problem_type": None,
        }

    def featurize(self, tokenizer, settings: EncodeSettings, examples, train: bool) -> Features:
        c = self.num_choices or len(examples[0].choices)
        contexts = token_ids(tokenizer, [ex.context for ex in examples])
        seconds = token_ids(
            tokenizer,
            [join_question_choice(ex.question, ch) for ex in examples for ch in ex.choices],
        )
        n, length = len(examples), settings.max_seq_length
        arrays = {k: np.zeros((n, c, length), np.int32) for k in MODEL_INPUTS}
        budget = settings.content_length - 3
        max_b = max(1, min(self.max_qa_length, budget - 1))
        for i, ctx in enumerate(contexts):
            for j in range(c):
                b = seconds[i * c + j][-max_b:]
                a = ctx[: max(0, budget - len(b))]
                ids, mask, types = build_row(settings, a, b)
                arrays["input_ids"][i, j] = ids
                arrays["attention_mask"][i, j] = mask
                arrays["token_type_ids"][i, j] = types
        arrays["labels"] = np.array([ex.label for ex in examples], np.int32)
        return Features(arrays)

    def evaluate(self, examples, features: Features, outputs):
        preds = np.asarray(outputs["logits"]).argmax(-1)
        return {"accuracy": metrics.accuracy(preds, features.arrays["labels"])}, preds

    def write_predictions(self, path_stem: Path, examples, predictions) -> Path:
        path = path_stem.with_suffix(".jsonl")
        with open(path, "w", encoding="utf-8") as f:
            for ex, p in zip(examples, predictions, strict=True):
                f.write(json.dumps({"id": ex.id, "prediction": int(p), "label": ex.label}) + "\n")
        return path
