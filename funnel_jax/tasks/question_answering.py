"""Extractive question answering on SQuAD v1.1 / v2.0 JSON files.

Features: `<cls> question <sep> context window <sep>`; the question is cut to
`max_query_length` tokens, and a context longer than the window is split into overlapping
windows (`doc_stride` tokens shared by consecutive windows). Training labels are the token
positions of the answer's first and last character in the window (through the tokenizer's
character offsets), or `<cls>` (position 0) when the window does not contain the whole answer
or the question has none (v2.0).

Decoding (per question, over all its windows): the `n_best_size` best starts and ends of each
window, spans inside the context with end >= start and at most `max_answer_length` tokens,
scored by start + end logit; the text is the context between the span's character offsets.
v2.0: the null score is the smallest `<cls>` start + end over the windows; the answer is empty
when null score > best span score + `null_score_diff_threshold`, and the difference is the
no-answer score given to the official best-threshold search.
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path
from typing import Any

import numpy as np

from funnel_jax import metrics
from funnel_jax.tasks.common import (
    PAD_TYPE_ID,
    DataError,
    EncodeSettings,
    Features,
    SettingsError,
    Task,
    find_file,
    read_text,
)


@dataclasses.dataclass
class QAExample:
    id: str
    question: str
    context: str
    answers: list[str]  # gold texts (all of them, for evaluation)
    answer_starts: list[int]
    is_impossible: bool
    where: str


def _line_of(text: str, needle: str) -> int | None:
    pos = text.find(needle)
    return None if pos < 0 else text.count("\n", 0, pos) + 1


class QuestionAnsweringTask(Task):
    kind = "question_answering"
    model_class = "FunnelForQuestionAnswering"
    main_metric = "f1"
    label_keys = ("start_positions", "end_positions")

    def __init__(
        self,
        name: str = "question_answering",
        version: str | None = None,
        doc_stride: int = 128,
        max_query_length: int = 64,
        max_answer_length: int = 64,
        n_best_size: int = 20,
        null_score_diff_threshold: float = 0.0,
    ):
        self.name = name
        self.version = version  # None: detected from the data
        self.doc_stride = int(doc_stride)
        self.max_query_length = int(max_query_length)
        self.max_answer_length = int(max_answer_length)
        self.n_best_size = int(n_best_size)
        self.null_score_diff_threshold = float(null_score_diff_threshold)

    def _names(self, split):
        v = {"v1": ["v1.1"], "v2": ["v2.0"], None: ["v2.0", "v1.1"]}[self.version]
        return [f"{split}-{x}.json" for x in v] + [f"{split}.json"]

    def train_file(self, data_dir) -> Path:
        return find_file(data_dir, self._names("train"), "training")

    def eval_files(self, data_dir) -> dict[str, Path]:
        return {"": find_file(data_dir, self._names("dev"), "dev")}

    # ------------------------------------------------------------------ reading

    def read(self, path) -> list[QAExample]:
        text = read_text(path)
        try:
            doc = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None
        if not isinstance(doc, dict) or not isinstance(doc.get("data"), list):
            raise DataError(f'{path}: expected a SQuAD file: an object with a "data" list')

        def fail(where_path: str, msg: str, qid: str | None = None):
            line = _line_of(text, json.dumps(qid)) if qid is not None else None
            loc = f"{path}:{line}" if line else f"{path}"
            raise DataError(f"{loc}: {where_path}: {msg}")

        out: list[QAExample] = []
        seen: set[str] = set()
        for a, article in enumerate(doc["data"]):
            paragraphs = article.get("paragraphs") if isinstance(article, dict) else None
            if not isinstance(paragraphs, list):
                fail(f"data[{a}]", 'expected an object with a "paragraphs" list')
            for p, para in enumerate(paragraphs):
                at = f"data[{a}].paragraphs[{p}]"
                if not isinstance(para, dict) or not isinstance(para.get("context"), str):
                    fail(at, 'expected an object with a string "context"')
                if not isinstance(para.get("qas"), list):
                    fail(at, 'expected a "qas" list')
                context = para["context"]
                for q, qa in enumerate(para["qas"]):
                    qat = f"{at}.qas[{q}]"
                    if not isinstance(qa, dict):
                        fail(qat, "expected an object")
                    qid = qa.get("id")
                    if not isinstance(qid, str | int):
                        fail(qat, 'missing "id"')
                    qid = str(qid)
                    if qid in seen:
                        fail(qat, f"duplicate question id {qid!r}", qid)
                    seen.add(qid)
                    question = qa.get("question")
                    if not isinstance(question, str) or not question.strip():
                        fail(qat, f'question {qid!r}: missing or empty "question"', qid)
                    impossible = qa.get("is_impossible", False)
                    if not isinstance(impossible, bool):
                        fail(qat, f'question {qid!r}: "is_impossible" must be true or false', qid)
                    answers = qa.get("answers", [])
                    if not isinstance(answers, list):
                        fail(qat, f'question {qid!r}: "answers" must be a list', qid)
                    texts, starts = [], []
                    for k, ans in enumerate(answers):
                        if (
                            not isinstance(ans, dict)
                            or not isinstance(ans.get("text"), str)
                            or isinstance(ans.get("answer_start"), bool)
                            or not isinstance(ans.get("answer_start"), int)
                        ):
                            fail(
                                f"{qat}.answers[{k}]",
                                f'question {qid!r}: an answer needs a string "text" and an '
                                'int "answer_start"',
                                qid,
                            )
                        start = ans["answer_start"]
                        if not 0 <= start <= len(context) - len(ans["text"]):
                            fail(
                                f"{qat}.answers[{k}]",
                                f"question {qid!r}: answer_start {start} is outside the "
                                f"context ({len(context)} characters)",
                                qid,
                            )
                        texts.append(ans["text"])
                        starts.append(start)
                    if not impossible and not texts:
                        fail(
                            qat,
                            f'question {qid!r} has no answer and is not marked "is_impossible"',
                            qid,
                        )
                    if impossible:
                        texts, starts = [], []
                    line = _line_of(text, json.dumps(qid))
                    out.append(
                        QAExample(
                            qid,
                            question,
                            context,
                            texts,
                            starts,
                            impossible,
                            f"{path}:{line}" if line else f"{path} ({qat})",
                        )
                    )
        if not out:
            raise DataError(f"{path}: no questions")
        return out

    def setup(self, train_examples, eval_examples) -> None:
        any_impossible = any(
            ex.is_impossible for exs in [train_examples, *eval_examples.values()] for ex in exs
        )
        if self.version is None:
            self.version = "v2" if any_impossible else "v1"
        elif self.version == "v1" and any_impossible:
            bad = next(
                ex
                for exs in [train_examples, *eval_examples.values()]
                for ex in exs
                if ex.is_impossible
            )
            raise DataError(
                f"{bad.where}: question {bad.id!r} is unanswerable (SQuAD v2.0 data) but the "
                "task is SQuAD v1.1; use --task squad_v2"
            )
        for ex in train_examples:
            for text, start in zip(ex.answers[:1], ex.answer_starts[:1], strict=True):
                if ex.context[start : start + len(text)] != text:
                    raise DataError(
                        f"{ex.where}: question {ex.id!r}: the answer {text!r} is not at "
                        f"answer_start {start} of the context (found "
                        f"{ex.context[start : start + len(text)]!r})"
                    )

    def texts(self, examples):
        contexts = set()
        for ex in examples:
            yield ex.question
            if ex.context not in contexts:
                contexts.add(ex.context)
                yield ex.context

    def config_overrides(self) -> dict[str, Any]:
        return {
            "num_labels": 2,
            "id2label": {0: "start", 1: "end"},
            "label2id": {"start": 0, "end": 1},
            "problem_type": None,
        }

    # ------------------------------------------------------------------ features

    def _cut_questions(self, tokenizer, questions: list[str]) -> list[str]:
        """Questions longer than max_query_length tokens, cut at that token's end character."""
        enc = tokenizer(
            questions, add_special_tokens=False, return_offsets_mapping=True, return_tensors=None
        )
        out = []
        for q, offsets in zip(questions, enc["offset_mapping"], strict=True):
            if len(offsets) > self.max_query_length:
                q = q[: offsets[self.max_query_length - 1][1]]
            out.append(q)
        return out

    def featurize(
        self, tokenizer, settings: EncodeSettings, examples, train: bool, chunk_size: int = 1000
    ) -> Features:
        room = settings.content_length - 3 - self.max_query_length
        if room <= self.doc_stride:
            raise SettingsError(
                f"max_seq_length {settings.max_seq_length} leaves {room} context tokens per "
                f"window (after the {self.max_query_length}-token question, 3 special tokens and "
                f"{settings.tail_pad} trailing pads), which must exceed doc_stride "
                f"{self.doc_stride}: raise --max-seq-length or lower --doc-stride / "
                "--max-query-length"
            )
        chunks = [
            self._featurize_chunk(tokenizer, settings, examples, lo, lo + chunk_size, train)
            for lo in range(0, len(examples), chunk_size)
        ]
        arrays = {k: np.concatenate([c[0][k] for c in chunks]) for k in chunks[0][0]}
        meta = {k: np.concatenate([c[1][k] for c in chunks]) for k in chunks[0][1]}
        return Features(arrays, meta)

    def _featurize_chunk(self, tokenizer, settings, examples, lo, hi, train):
        """Features of examples[lo:hi]: (arrays, meta); meta["sample"] holds global indices.
        Eval features keep the context tokens' character offsets ((-1, -1) elsewhere)."""
        part = examples[lo:hi]
        questions = self._cut_questions(tokenizer, [ex.question.lstrip() for ex in part])
        enc = tokenizer(
            questions,
            [ex.context for ex in part],
            truncation="only_second",
            max_length=settings.content_length,
            stride=self.doc_stride,
            return_overflowing_tokens=True,
            return_offsets_mapping=True,
            padding="max_length",
        )
        n = enc["input_ids"].shape[0]
        length = settings.max_seq_length
        tail = length - enc["input_ids"].shape[1]
        arrays = {}
        for key, fill in (
            ("input_ids", settings.pad_id),
            ("attention_mask", 0),
            ("token_type_ids", PAD_TYPE_ID),
        ):
            arrays[key] = np.pad(
                enc[key].astype(np.int32), ((0, 0), (0, tail)), constant_values=fill
            )
        sample = np.asarray(enc["overflow_to_sample_mapping"], np.int64) + lo
        offsets = None if train else np.full((n, length, 2), -1, np.int32)
        starts = np.zeros(n, np.int32)
        ends = np.zeros(n, np.int32)
        for i in range(n):
            ctx = np.array([s == 1 for s in enc.encodings[i].sequence_ids])
            row_offsets = enc["offset_mapping"][i]
            if not train:
                offsets[i, : len(ctx)][ctx] = row_offsets[ctx]
                continue
            ex = examples[sample[i]]
            if ex.is_impossible or not ex.answers:
                continue
            start_char = ex.answer_starts[0]
            end_char = start_char + len(ex.answers[0])
            idx = np.flatnonzero(ctx)
            if len(idx) == 0:
                continue
            first, last = idx[0], idx[-1]
            if not (row_offsets[first, 0] <= start_char and row_offsets[last, 1] >= end_char):
                continue  # the answer is not (wholly) in this window: label <cls>
            s = first
            while s <= last and row_offsets[s, 0] <= start_char:
                s += 1
            e = last
            while e >= first and row_offsets[e, 1] >= end_char:
                e -= 1
            starts[i], ends[i] = s - 1, e + 1
        if train:
            arrays["start_positions"] = starts
            arrays["end_positions"] = ends
            return arrays, {"sample": sample}
        return arrays, {"sample": sample, "offsets": offsets}

    def outputs(self, out) -> dict[str, Any]:
        return {"start_logits": out.start_logits, "end_logits": out.end_logits}

    # ------------------------------------------------------------------ decoding

    def decode(self, examples, features: Features, outputs):
        """(best non-null answer, null score - best span score) for each question id."""
        start_all = np.asarray(outputs["start_logits"], np.float32)
        end_all = np.asarray(outputs["end_logits"], np.float32)
        sample, offsets = features.meta["sample"], features.meta["offsets"]
        by_example: dict[int, list[int]] = {}
        for i, s in enumerate(sample):
            by_example.setdefault(int(s), []).append(i)
        k = self.n_best_size
        answers, null_diff = {}, {}
        for e, ex in enumerate(examples):
            best_score, best_text = -np.inf, ""
            null_score = np.inf
            for i in by_example.get(e, []):
                start, end, off = start_all[i], end_all[i], offsets[i]
                null_score = min(null_score, float(start[0] + end[0]))
                valid = off[:, 0] >= 0
                if not valid.any():
                    continue
                s_masked = np.where(valid, start, -np.inf)
                e_masked = np.where(valid, end, -np.inf)
                top_s = np.argsort(-s_masked, kind="stable")[:k]
                top_e = np.argsort(-e_masked, kind="stable")[:k]
                length = top_e[None, :] - top_s[:, None] + 1
                ok = (
                    valid[top_s][:, None]
                    & valid[top_e][None, :]
                    & (length >= 1)
                    & (length <= self.max_answer_length)
                )
                if not ok.any():
                    continue
                scores = np.where(ok, start[top_s][:, None] + end[top_e][None, :], -np.inf)
                a, b = np.unravel_index(int(np.argmax(scores)), scores.shape)
                if scores[a, b] > best_score:
                    best_score = float(scores[a, b])
                    s_tok, e_tok = top_s[a], top_e[b]
                    best_text = ex.context[off[s_tok, 0] : off[e_tok, 1]]
            answers[ex.id] = best_text
            if np.isfinite(best_score) and np.isfinite(null_score):
                null_diff[ex.id] = null_score - best_score
            else:  # no valid span in any window: no answer
                null_diff[ex.id] = 1e9
        return answers, null_diff

    def evaluate(self, examples, features: Features, outputs):
        answers, null_diff = self.decode(examples, features, outputs)
        gold = {ex.id: ex.answers for ex in examples}
        version = self.version or "v1"
        if version == "v2":
            scores = metrics.squad_evaluate(
                gold,
                answers,
                na_probs=null_diff,
                version="v2",
                na_prob_thresh=self.null_score_diff_threshold,
            )
            final = {
                qid: ("" if null_diff[qid] > self.null_score_diff_threshold else text)
                for qid, text in answers.items()
            }
        else:
            scores = metrics.squad_evaluate(gold, answers, version="v1")
            final = answers
        return scores, {"answers": final, "null_odds": null_diff if version == "v2" else None}

    def write_predictions(self, path_stem: Path, examples, predictions) -> Path:
        path = path_stem.with_suffix(".json")
        with open(path, "w", encoding="utf-8") as f:
            json.dump(predictions["answers"], f, ensure_ascii=False, indent=1)
        if predictions.get("null_odds") is not None:
            odds = path.with_name(re.sub(r"^predictions", "null_odds", path.name))
            with open(odds, "w", encoding="utf-8") as f:
                json.dump(predictions["null_odds"], f, indent=1)
        return path
