"""Shared pieces of the fine-tuning tasks: the data error, file readers that keep line numbers,
the Task interface, and the helpers that turn token ids into fixed-length model inputs."""

from __future__ import annotations

import csv
import dataclasses
import json
import logging
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

logger = logging.getLogger("funnel_jax")

CLS_TYPE_ID, A_TYPE_ID, B_TYPE_ID, PAD_TYPE_ID = 2, 0, 1, 0
IGNORE_INDEX = -100
MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids")


class DataError(ValueError):
    """Input data that cannot be used; the message starts with `file:line:` (or `file:`)."""


class SettingsError(ValueError):
    """Task settings that cannot work together (e.g. a window too short for the stride)."""


def where(path, lineno: int | None = None) -> str:
    return f"{path}:{lineno}" if lineno is not None else f"{path}"


# --------------------------------------------------------------------------- file readers


def read_text(path: str | os.PathLike) -> str:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"data file not found: {path}")
    if path.is_dir():
        raise DataError(f"{path}: is a directory, expected a data file")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e.reason} at byte offset {e.start})") from None
    if text.startswith("\ufeff"):
        text = text[1:]
    return text


@dataclasses.dataclass
class Row:
    """One record of a table or JSON Lines file: its fields and where it came from."""

    fields: dict[str, Any]
    path: str
    lineno: int

    @property
    def where(self) -> str:
        return where(self.path, self.lineno)

    def get(self, column: str, kind: str = "column") -> Any:
        if column not in self.fields:
            have = ", ".join(repr(k) for k in self.fields)
            raise DataError(f"{self.where}: no {kind} {column!r} (the record has {have})")
        return self.fields[column]

    def text(self, column: str) -> str:
        value = self.get(column)
        if not isinstance(value, str):
            raise DataError(
                f"{self.where}: {column!r} must be a string, got {type(value).__name__}"
            )
        return value


def _bad_line(path, lineno, msg, skip: bool, skipped: list) -> None:
    if not skip:
        raise DataError(f"{where(path, lineno)}: {msg}")
    skipped.append(f"{where(path, lineno)}: {msg}")


def _report_skipped(path, skipped: list) -> None:
    if skipped:
        logger.warning(
            "%s: skipped %d malformed line(s), e.g. %s", path, len(skipped), "; ".join(skipped[:3])
        )


def read_tsv(
    path: str | os.PathLike,
    columns: Sequence[str] | None = None,
    skip_malformed: bool = False,
) -> list[Row]:
    """A tab-separated file, split on tabs with no quoting (as the GLUE files need: their texts
    hold unbalanced quotes). `columns`: the names of a file without a header row; None: the
    first line is the header. A line with another number of fields is an error (or, with
    `skip_malformed`, skipped with a warning)."""
    text = read_text(path)
    lines = text.split("\n")
    rows: list[Row] = []
    skipped: list[str] = []
    header = list(columns) if columns is not None else None
    for lineno, line in enumerate(lines, 1):
        line = line.rstrip("\r")
        if not line.strip():
            continue
        fields = line.split("\t")
        if header is None:
            header = [f.strip() for f in fields]
            continue
        if len(fields) != len(header):
            _bad_line(
                path,
                lineno,
                f"expected {len(header)} tab-separated fields ({', '.join(header)}), "
                f"found {len(fields)}",
                skip_malformed,
                skipped,
            )
            continue
        rows.append(Row(dict(zip(header, fields, strict=True)), str(path), lineno))
    if header is None:
        raise DataError(f"{path}: the file is empty")
    _report_skipped(path, skipped)
    return rows


def read_csv(path: str | os.PathLike, skip_malformed: bool = False) -> list[Row]:
    """A comma-separated file with a header row (RFC 4180 quoting)."""
    text = read_text(path)
    reader = csv.reader(text.splitlines(keepends=True))
    rows: list[Row] = []
    skipped: list[str] = []
    header = None
    try:
        for fields in reader:
            lineno = reader.line_num
            if not fields or not any(f.strip() for f in fields):
                continue
            if header is None:
                header = [f.strip() for f in fields]
                continue
            if len(fields) != len(header):
                _bad_line(
                    path,
                    lineno,
                    f"expected {len(header)} comma-separated fields ({', '.join(header)}), "
                    f"found {len(fields)}",
                    skip_malformed,
                    skipped,
                )
                continue
            rows.append(Row(dict(zip(header, fields, strict=True)), str(path), lineno))
    except csv.Error as e:
        raise DataError(f"{where(path, reader.line_num)}: malformed CSV ({e})") from None
    if header is None:
        raise DataError(f"{path}: the file is empty")
    _report_skipped(path, skipped)
    return rows


def read_jsonl(path: str | os.PathLike, skip_malformed: bool = False) -> list[Row]:
    """JSON Lines: one JSON object per non-empty line."""
    text = read_text(path)
    rows: list[Row] = []
    skipped: list[str] = []
    for lineno, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            _bad_line(
                path,
                lineno,
                f"not valid JSON ({e.msg} at column {e.colno})",
                skip_malformed,
                skipped,
            )
            continue
        if not isinstance(obj, dict):
            _bad_line(
                path,
                lineno,
                f"expected a JSON object, got {type(obj).__name__}",
                skip_malformed,
                skipped,
            )
            continue
        rows.append(Row(obj, str(path), lineno))
    _report_skipped(path, skipped)
    return rows


def read_table(path: str | os.PathLike, skip_malformed: bool = False) -> list[Row]:
    """CSV, TSV or JSON Lines, chosen by the file suffix (.csv, .tsv/.txt, .jsonl/.json)."""
    suffix = Path(path).suffix.lower()
    if suffix == ".csv":
        rows = read_csv(path, skip_malformed)
    elif suffix in (".tsv", ".tab", ".txt"):
        rows = read_tsv(path, skip_malformed=skip_malformed)
    elif suffix in (".jsonl", ".json", ".ndjson"):
        rows = read_jsonl(path, skip_malformed)
    else:
        raise DataError(
            f"{path}: unknown table format {suffix!r}; use .csv, .tsv or .jsonl (JSON Lines)"
        )
    if not rows:
        raise DataError(f"{path}: no data rows")
    return rows


def find_file(directory: str | os.PathLike, candidates: Sequence[str], what: str) -> Path:
    directory = Path(directory)
    for name in candidates:
        p = directory / name
        if p.is_file():
            return p
    raise FileNotFoundError(f"{directory}: no {what} file (looked for {', '.join(candidates)})")


# --------------------------------------------------------------------------- features


@dataclasses.dataclass
class Features:
    """Model-ready arrays (first dimension = number of features) plus what the evaluation needs.

    arrays: the MODEL_INPUTS and the label arrays named as the model's loss arguments
    (`labels`, or `start_positions`/`end_positions`). meta: task-specific bookkeeping."""

    arrays: dict[str, np.ndarray]
    meta: dict[str, Any] = dataclasses.field(default_factory=dict)

    def __len__(self) -> int:
        return int(next(iter(self.arrays.values())).shape[0])

    @property
    def inputs(self) -> dict[str, np.ndarray]:
        return {k: self.arrays[k] for k in MODEL_INPUTS}


@dataclasses.dataclass(frozen=True)
class EncodeSettings:
    """How token ids become fixed-length rows.

    Each row is `max_seq_length` long; its content (with `<cls>`/`<sep>`) is at most
    `max_seq_length - tail_pad`, the rest is padding. `tail_pad` is `2**(n_blocks-1) - 1` for
    models that truncate at pooling (truncate_seq): the original fine-tuning code appends that
    many pads so that the pooling never drops a real token (funnel_jax.data.truncation_stride).
    """

    max_seq_length: int
    cls_id: int
    sep_id: int
    pad_id: int
    unk_id: int
    tail_pad: int = 0

    @property
    def content_length(self) -> int:
        return self.max_seq_length - self.tail_pad

    @classmethod
    def create(cls, tokenizer, max_seq_length: int, tail_pad: int = 0) -> EncodeSettings:
        out = cls(
            max_seq_length=int(max_seq_length),
            cls_id=int(tokenizer.cls_token_id),
            sep_id=int(tokenizer.sep_token_id),
            pad_id=int(tokenizer.pad_token_id),
            unk_id=int(tokenizer.unk_token_id),
            tail_pad=int(tail_pad),
        )
        if out.content_length < 8:
            raise SettingsError(
                f"max_seq_length={max_seq_length} leaves {out.content_length} tokens for the "
                f"text after the {tail_pad} trailing pads the model needs; use at least "
                f"{tail_pad + 8}"
            )
        return out


def token_ids(tokenizer, texts: Sequence[str], batch: int = 2048) -> list[list[int]]:
    """WordPiece ids of each text, no special tokens."""
    out: list[list[int]] = []
    for start in range(0, len(texts), batch):
        chunk = list(texts[start : start + batch])
        out.extend(tokenizer(chunk, add_special_tokens=False, return_tensors=None)["input_ids"])
    return out


def truncate_pair(a: list[int], b: list[int] | None, budget: int) -> tuple[list[int], list[int]]:
    """Pop tokens from the end of the longer sequence until both fit in `budget` (the
    original's `_truncate_seq_pair`; a single sequence is cut at the end)."""
    a = list(a)
    if b is None:
        return a[:budget], None
    b = list(b)
    while len(a) + len(b) > budget:
        if len(a) > len(b):
            a.pop()
        else:
            b.pop()
    return a, b


def build_row(settings: EncodeSettings, a: list[int], b: list[int] | None = None):
    """`<cls> a <sep> [b <sep>]` padded to max_seq_length: (ids, mask, types) int32 arrays.
    The caller has made it fit in settings.content_length."""
    ids = [settings.cls_id, *a, settings.sep_id]
    types = [CLS_TYPE_ID] + [A_TYPE_ID] * (len(a) + 1)
    if b is not None:
        ids += [*b, settings.sep_id]
        types += [B_TYPE_ID] * (len(b) + 1)
    n = len(ids)
    if n > settings.content_length:
        raise AssertionError(f"row of {n} tokens exceeds {settings.content_length}")
    length = settings.max_seq_length
    out_ids = np.full(length, settings.pad_id, np.int32)
    out_mask = np.zeros(length, np.int32)
    out_types = np.full(length, PAD_TYPE_ID, np.int32)
    out_ids[:n] = ids
    out_mask[:n] = 1
    out_types[:n] = types
    return out_ids, out_mask, out_types


def encode_pairs(
    tokenizer, settings: EncodeSettings, texts_a: Sequence[str], texts_b: Sequence[str] | None
) -> dict[str, np.ndarray]:
    """[N, L] input_ids / attention_mask / token_type_ids of single texts or pairs."""
    ids_a = token_ids(tokenizer, texts_a)
    ids_b = token_ids(tokenizer, texts_b) if texts_b is not None else [None] * len(ids_a)
    n = len(ids_a)
    out = {k: np.zeros((n, settings.max_seq_length), np.int32) for k in MODEL_INPUTS}
    n_special = 3 if texts_b is not None else 2
    for i, (a, b) in enumerate(zip(ids_a, ids_b, strict=True)):
        a, b = truncate_pair(a, b, settings.content_length - n_special)
        ids, mask, types = build_row(settings, a, b)
        out["input_ids"][i], out["attention_mask"][i], out["token_type_ids"][i] = ids, mask, types
    return out


# --------------------------------------------------------------------------- task interface


class Task:
    """A fine-tuning task: how to read its files, build features, and score predictions.

    Subclasses set `kind`, `model_class` (a name in funnel_jax.models.MODEL_CLASSES),
    `main_metric` and `label_keys`, and implement the methods below.
    """

    name: str = ""
    kind: str = ""
    model_class: str = ""
    main_metric: str = ""
    label_keys: tuple[str, ...] = ("labels",)
    # Metrics where lower is better would set this False.
    greater_is_better: bool = True

    # files
    def train_file(self, data_dir) -> Path:
        raise NotImplementedError

    def eval_files(self, data_dir) -> dict[str, Path]:
        """{name: path}: the first is the main dev set (metrics under their plain names); the
        others' metrics get a `_<name>` suffix."""
        raise NotImplementedError

    def read(self, path) -> list[Any]:
        raise NotImplementedError

    def setup(self, train_examples: list[Any], eval_examples: dict[str, list[Any]]) -> None:
        """Fix the label set from the training data (where not given) and check that every
        evaluation label belongs to it. Raises DataError naming the file and line."""

    def texts(self, examples: list[Any]) -> Iterator[str]:
        """The raw texts (to train a tokenizer on when there is none)."""
        raise NotImplementedError

    def config_overrides(self) -> dict[str, Any]:
        """num_labels / id2label / label2id / problem_type for the model config."""
        raise NotImplementedError

    def featurize(self, tokenizer, settings: EncodeSettings, examples, train: bool) -> Features:
        raise NotImplementedError

    def outputs(self, out) -> dict[str, Any]:
        """The arrays to keep from a model output (inside jit): e.g. {'logits': ...}."""
        return {"logits": out.logits}

    def evaluate(self, examples, features: Features, outputs: dict[str, np.ndarray]):
        """(metrics dict, predictions) for one evaluation set."""
        raise NotImplementedError

    def write_predictions(self, path_stem: Path, examples, predictions) -> Path:
        raise NotImplementedError

    # helpers
    def describe(self) -> str:
        return f"{self.name} ({self.kind}, {self.model_class}, main metric {self.main_metric})"
