"""Convert RACE and SWAG to the multiple-choice JSON Lines format of experiments.finetune.

    python -m experiments.convert_race_swag race path/to/RACE data/race
    python -m experiments.convert_race_swag race path/to/RACE data/race-high --levels high
    python -m experiments.convert_race_swag swag path/to/swagaf/data data/swag

Output, one question per line (funnel_jax/tasks/multiple_choice.py)::

    {"id": "...", "context": "...", "question": "...", "choices": ["...", ...], "label": 0}

RACE (https://www.cs.cmu.edu/~glai1/data/race/, `RACE.tar.gz`): the directory holds
`train/`, `dev/` and `test/`, each with `high/` and `middle/` subdirectories of one JSON file per
article (named like `12345.txt`)::

    {"id": "high12345.txt", "article": "...", "questions": ["...", ...],
     "options": [["...", "...", "...", "..."], ...], "answers": ["B", ...]}

Each question becomes a line: context = the article, question = the question (a blank `_` is
filled by each option at encoding time), choices = its four options, label = the answer letter
as an index (A=0). Writes train.jsonl, dev.jsonl and test.jsonl (the splits present), articles in
sorted file order; `--levels` picks high and/or middle (default both).

SWAG (https://github.com/rowanz/swagaf, `data/train.csv`, `data/val.csv`): CSV with the
columns `video-id, fold-ind, startphrase, sent1, sent2, gold-source, ending0..ending3, label`.
Each row becomes a line: context = sent1, question = sent2 (the start of the second sentence,
which each ending completes), choices = the four endings, label = `label`. Writes train.jsonl
(from train.csv) and dev.jsonl (from val.csv). SWAG's test.csv has no labels and is skipped.

Bad input stops the conversion with an error naming the file (and, for CSV, the line).
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from collections.abc import Iterator
from pathlib import Path

RACE_SPLITS = {"train": "train", "dev": "dev", "test": "test"}
SWAG_SPLITS = {"train": "train.csv", "dev": "val.csv"}
SWAG_COLUMNS = ("sent1", "sent2", "ending0", "ending1", "ending2", "ending3", "label")


class ConversionError(ValueError):
    """Input that cannot be converted; the message names the file (and line)."""


def race_examples(path: Path) -> Iterator[dict]:
    """The questions of one RACE article file."""
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ConversionError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None
    except UnicodeDecodeError as e:
        raise ConversionError(f"{path}: not UTF-8 ({e.reason})") from None
    for key in ("article", "questions", "options", "answers"):
        if key not in obj:
            raise ConversionError(f"{path}: no {key!r} field (has {sorted(obj)})")
    qs, opts, answers = obj["questions"], obj["options"], obj["answers"]
    if not (len(qs) == len(opts) == len(answers)):
        raise ConversionError(
            f"{path}: {len(qs)} questions, {len(opts)} option lists and {len(answers)} answers"
        )
    base = str(obj.get("id") or path.name)
    if base.endswith(".txt"):
        base = base[: -len(".txt")]
    for i, (q, options, answer) in enumerate(zip(qs, opts, answers, strict=True)):
        if not isinstance(options, list) or not all(isinstance(o, str) for o in options):
            raise ConversionError(f"{path}: options[{i}] is not a list of strings")
        if not isinstance(answer, str) or len(answer) != 1:
            raise ConversionError(f"{path}: answers[{i}] is {answer!r}, expected a letter")
        label = ord(answer.upper()) - ord("A")
        if not 0 <= label < len(options):
            raise ConversionError(
                f"{path}: answers[{i}] = {answer!r} but there are {len(options)} options"
            )
        yield {
            "id": f"{base}-{i}",
            "context": obj["article"],
            "question": q,
            "choices": options,
            "label": label,
        }


def convert_race(src: Path, dst: Path, levels=("high", "middle")) -> dict[str, int]:
    """Write dst/{train,dev,test}.jsonl from a RACE directory; returns questions per split."""
    counts = {}
    for split, sub in RACE_SPLITS.items():
        split_dir = src / sub
        if not split_dir.is_dir():
            continue
        files = []
        for level in levels:
            level_dir = split_dir / level
            if not level_dir.is_dir():
                raise ConversionError(f"{level_dir}: missing (expected RACE/{sub}/{level}/*.txt)")
            files.extend(sorted(p for p in level_dir.iterdir() if p.is_file()))
        if not files:
            raise ConversionError(f"{split_dir}: no article files")
        counts[split] = _write(
            dst / f"{split}.jsonl", (ex for f in files for ex in race_examples(f))
        )
    if not counts:
        raise ConversionError(f"{src}: no train/, dev/ or test/ directory (is this RACE?)")
    return counts


def swag_examples(path: Path) -> Iterator[dict]:
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f)
        missing = [c for c in SWAG_COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise ConversionError(
                f"{path}:1: missing column(s) {missing} (header: {reader.fieldnames})"
            )
        for row in reader:
            line = reader.line_num
            try:
                label = int(row["label"])
            except (TypeError, ValueError):
                raise ConversionError(
                    f"{path}:{line}: label {row['label']!r} is not an integer"
                ) from None
            if not 0 <= label < 4:
                raise ConversionError(f"{path}:{line}: label {label} is not in 0..3")
            choices = [row[f"ending{k}"] for k in range(4)]
            if any(c is None for c in choices + [row["sent1"], row["sent2"]]):
                raise ConversionError(f"{path}:{line}: too few fields")
            ex_id = row.get("fold-ind") or row.get("") or str(line)
            yield {
                "id": f"{path.stem}-{ex_id}",
                "context": row["sent1"],
                "question": row["sent2"],
                "choices": choices,
                "label": label,
            }


def convert_swag(src: Path, dst: Path) -> dict[str, int]:
    counts = {}
    for split, name in SWAG_SPLITS.items():
        path = src / name
        if path.is_file():
            counts[split] = _write(dst / f"{split}.jsonl", swag_examples(path))
    if not counts:
        raise ConversionError(f"{src}: neither train.csv nor val.csv (is this swagaf/data?)")
    return counts


def _write(path: Path, examples) -> int:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    n = 0
    with open(tmp, "w", encoding="utf-8") as f:
        for ex in examples:
            f.write(json.dumps(ex, ensure_ascii=False) + "\n")
            n += 1
    tmp.replace(path)
    return n


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m experiments.convert_race_swag",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("dataset", choices=("race", "swag"))
    p.add_argument("source", help="RACE directory, or SWAG's data directory")
    p.add_argument("output_dir")
    p.add_argument("--levels", default="high,middle", help="RACE: high, middle or both")
    args = p.parse_args(argv)
    src, dst = Path(args.source), Path(args.output_dir)
    if not src.is_dir():
        print(f"error: {src}: no such directory", file=sys.stderr)
        return 2
    try:
        if args.dataset == "race":
            levels = tuple(x.strip() for x in args.levels.split(",") if x.strip())
            bad = [x for x in levels if x not in ("high", "middle")]
            if bad or not levels:
                raise ConversionError(f"--levels: expected high and/or middle, got {args.levels!r}")
            counts = convert_race(src, dst, levels)
        else:
            counts = convert_swag(src, dst)
    except ConversionError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for split, n in counts.items():
        print(f"{dst / (split + '.jsonl')}: {n} questions")
    return 0


if __name__ == "__main__":
    sys.exit(main())
