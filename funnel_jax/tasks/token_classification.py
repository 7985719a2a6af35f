"""Token classification (named entities) from CoNLL-2003-style files.

One token per line, `token POS chunk NER` (any number of space- or tab-separated columns: the
first is the word, the last its tag), blank lines between sentences, `-DOCSTART-` lines
skipped. Tags may follow BIO (IOB2), IOB1 or IOBES; scores are seqeval's entity-level
precision / recall / F1 in its default mode (funnel_jax.metrics.entity_scores).

Words are split into WordPieces one by one; the tag goes to the first piece of each word and
-100 (ignored by the loss) to the others and to `<cls>`, `<sep>` and padding. A sentence longer
than the window is cut: its words past the cut are predicted `O`.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np

from funnel_jax import metrics
from funnel_jax.tasks.common import (
    A_TYPE_ID,
    CLS_TYPE_ID,
    IGNORE_INDEX,
    MODEL_INPUTS,
    DataError,
    EncodeSettings,
    Features,
    Task,
    find_file,
    logger,
    read_text,
    token_ids,
)


@dataclasses.dataclass
class TaggedSentence:
    words: list[str]
    tags: list[str]
    where: str  # file:line of the first word
    tag_lines: list[int]


def _valid_tag(tag: str) -> bool:
    if tag == "O":
        return True
    return len(tag) >= 3 and tag[0] in "BIES" and tag[1] == "-"


class TokenClassificationTask(Task):
    kind = "token_classification"
    model_class = "FunnelForTokenClassification"
    main_metric = "f1"

    def __init__(
        self,
        name: str = "token_classification",
        labels=None,
        train_names=("train.txt", "eng.train", "train.conll"),
        dev_names=("valid.txt", "dev.txt", "eng.testa", "dev.conll", "valid.conll"),
    ):
        self.name = name
        self.labels = list(labels) if labels else None
        self._train_names = tuple(train_names)
        self._dev_names = tuple(dev_names)

    def train_file(self, data_dir) -> Path:
        return find_file(data_dir, self._train_names, "training")

    def eval_files(self, data_dir) -> dict[str, Path]:
        return {"": find_file(data_dir, self._dev_names, "dev")}

    def read(self, path) -> list[TaggedSentence]:
        text = read_text(path)
        sentences: list[TaggedSentence] = []
        words, tags, lines, start = [], [], [], None

        def flush():
            nonlocal words, tags, lines, start
            if words:
                sentences.append(TaggedSentence(words, tags, f"{path}:{start}", lines))
            words, tags, lines, start = [], [], [], None

        for lineno, line in enumerate(text.split("\n"), 1):
            line = line.strip()
            if not line:
                flush()
                continue
            if line.startswith("-DOCSTART-"):
                flush()
                continue
            parts = line.split()
            if len(parts) < 2:
                raise DataError(
                    f"{path}:{lineno}: expected a word and its tag (e.g. 'EU NNP B-NP B-ORG'), "
                    f"found {len(parts)} column(s): {line!r}"
                )
            tag = parts[-1]
            if not _valid_tag(tag):
                raise DataError(
                    f"{path}:{lineno}: {tag!r} is not a tag of the form O, B-X, I-X, E-X or S-X"
                )
            if start is None:
                start = lineno
            words.append(parts[0])
            tags.append(tag)
            lines.append(lineno)
        flush()
        if not sentences:
            raise DataError(f"{path}: no sentences")
        return sentences

    def setup(self, train_examples, eval_examples) -> None:
        if self.labels is None:
            found = {t for s in train_examples for t in s.tags}
            # "O" first, then by entity type and prefix.
            self.labels = sorted(found, key=lambda t: (t != "O", t[2:], t[:1]))
            given = False
        else:
            given = True
        known = set(self.labels)
        checked = [train_examples, *eval_examples.values()] if given else eval_examples.values()
        for examples in checked:
            for s in examples:
                for tag, lineno in zip(s.tags, s.tag_lines, strict=True):
                    if tag not in known:
                        where = "the given --labels" if given else "the training data"
                        raise DataError(
                            f"{s.where.rsplit(':', 1)[0]}:{lineno}: tag {tag!r} does not occur "
                            f"in {where} (tags: {', '.join(self.labels)})"
                        )

    def texts(self, examples):
        for s in examples:
            yield " ".join(s.words)

    def config_overrides(self) -> dict[str, Any]:
        id2label = dict(enumerate(self.labels))
        return {
            "num_labels": len(self.labels),
            "id2label": id2label,
            "label2id": {v: k for k, v in id2label.items()},
            "problem_type": None,
        }

    def featurize(self, tokenizer, settings: EncodeSettings, examples, train: bool) -> Features:
        vocab = sorted({w for s in examples for w in s.words})
        pieces = dict(zip(vocab, token_ids(tokenizer, vocab), strict=True))
        index = {t: i for i, t in enumerate(self.labels)}
        n, length = len(examples), settings.max_seq_length
        arrays = {k: np.zeros((n, length), np.int32) for k in MODEL_INPUTS}
        arrays["input_ids"][:] = settings.pad_id
        labels = np.full((n, length), IGNORE_INDEX, np.int32)
        word_pos = np.full((n, length), -1, np.int32)  # word index at each word's first piece
        budget = settings.content_length - 1  # room before the final <sep>
        truncated = 0
        for i, s in enumerate(examples):
            ids = [settings.cls_id]
            for w, (word, tag) in enumerate(zip(s.words, s.tags, strict=True)):
                p = pieces[word] or [settings.unk_id]
                if len(ids) + len(p) > budget:
                    truncated += 1
                    break
                labels[i, len(ids)] = index[tag]
                word_pos[i, len(ids)] = w
                ids.extend(p)
            ids.append(settings.sep_id)
            arrays["input_ids"][i, : len(ids)] = ids
            arrays["attention_mask"][i, : len(ids)] = 1
            arrays["token_type_ids"][i, 0] = CLS_TYPE_ID
            arrays["token_type_ids"][i, 1 : len(ids)] = A_TYPE_ID
        if truncated:
            logger.warning(
                "%d of %d sentences are longer than %d tokens and were cut (their last words "
                "are %s)",
                truncated,
                n,
                settings.content_length,
                "not trained on" if train else "predicted 'O'",
            )
        arrays["labels"] = labels
        return Features(arrays, {"word_pos": word_pos})

    def outputs(self, out) -> dict[str, Any]:
        return {"predictions": out.logits.argmax(-1).astype("int32")}

    def evaluate(self, examples, features: Features, outputs):
        preds = np.asarray(outputs["predictions"])
        word_pos = features.meta["word_pos"]
        pred_tags = []
        for i, s in enumerate(examples):
            tags = ["O"] * len(s.words)
            for pos in np.flatnonzero(word_pos[i] >= 0):
                tags[word_pos[i, pos]] = self.labels[int(preds[i, pos])]
            pred_tags.append(tags)
        scores = metrics.entity_scores([s.tags for s in examples], pred_tags)
        return scores, pred_tags

    def write_predictions(self, path_stem: Path, examples, predictions) -> Path:
        path = path_stem.with_suffix(".txt")
        with open(path, "w", encoding="utf-8") as f:
            for s, tags in zip(examples, predictions, strict=True):
                for word, gold, pred in zip(s.words, s.tags, tags, strict=True):
                    f.write(f"{word} {gold} {pred}\n")
                f.write("\n")
        return path
