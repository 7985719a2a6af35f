"""experiments.finetune and funnel_jax.tasks: readers, features, errors, and small learnable
tasks for every head (tiny models, a few dozen steps each).

The "pretrained" model is a random tiny FunnelForPreTraining saved as a pretraining output
directory (final/ + tokenizer/), so every run goes through the --init path: backbone loaded,
head fresh. Each learnable dataset is made here from a rule the model must pick up (a keyword,
a token's identity); the thresholds are well above chance and stated in each test.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import jax
import numpy as np
import pytest

from experiments import finetune
from funnel_jax.tasks import DataError, EncodeSettings, get_task

WORDS = (
    "the a cat dog sat on mat big small red blue house tree car road ran fast slow quiet loud"
).split()
SPECIAL_WORDS = "great paris london bob smith where is it which ?".split()
TINY_MODEL = {
    "block_sizes": [1, 1],
    "num_decoder_layers": 1,
    "d_model": 32,
    "n_head": 2,
    "d_head": 16,
    "d_inner": 64,
    "hidden_dropout": 0.0,
    "attention_dropout": 0.0,
    "activation_dropout": 0.0,
}
# Fast settings shared by the learning runs (tiny model: a large learning rate).
FAST = {"learning_rate": 1e-3, "batch_size": 16, "no_progress": True, "seed": 0}


def _words(rng, k):
    return [rng.choice(WORDS) for _ in range(k)]


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """A pretraining output dir: final/ (random tiny FunnelForPreTraining + tokenizer files)
    and tokenizer/."""
    return make_pretrained_dir(tmp_path_factory.mktemp("pretrain_run"))


def make_pretrained_dir(root: Path) -> Path:
    """Write a pretraining output dir into `root` (see the `pretrained` fixture); also used by
    tests/test_finetune_reliability.py."""
    from funnel_jax.checkpoint import save_model_dir
    from funnel_jax.config import FunnelConfig
    from funnel_jax.models import FunnelForPreTraining, init_params
    from funnel_jax.tokenizer import FunnelTokenizer

    rng = random.Random(0)
    texts = [" ".join(rng.choice(WORDS + SPECIAL_WORDS) for _ in range(12)) for _ in range(300)]
    tok = FunnelTokenizer.train(iter(texts), vocab_size=200, min_frequency=1)
    tok.save_pretrained(root / "tokenizer")
    config = FunnelConfig(**TINY_MODEL, vocab_size=len(tok))
    module = FunnelForPreTraining(config=config)
    params = jax.jit(lambda k: init_params(module, k))(jax.random.PRNGKey(0))
    files = sorted((root / "tokenizer").iterdir())
    save_model_dir(root / "final", module, params, extra_files=files)
    return root


@pytest.fixture(scope="module")
def tokenizer(pretrained):
    from funnel_jax.tokenizer import FunnelTokenizer

    return FunnelTokenizer.from_pretrained(pretrained / "tokenizer")


# --------------------------------------------------------------------------- data makers


def write_sst2(d: Path, n_train=256, n_dev=64, seed=0):
    """SST-2 format; label 1 iff the sentence holds the word 'great'."""
    rng = random.Random(seed)
    d.mkdir(parents=True, exist_ok=True)
    for name, n in (("train.tsv", n_train), ("dev.tsv", n_dev)):
        lines = ["sentence\tlabel"]
        for i in range(n):
            ws = _words(rng, rng.randint(4, 10))
            if i % 2:
                ws.insert(rng.randint(0, len(ws)), "great")
            lines.append(f"{' '.join(ws)}\t{i % 2}")
        (d / name).write_text("\n".join(lines) + "\n")
    return d


def write_regression_csv(d: Path, seed=0):
    """Generic CSV with a text pair; score = number of 'great' in both texts (0..4) + noise."""
    rng = random.Random(seed)
    d.mkdir(parents=True, exist_ok=True)
    for name, n in (("train.csv", 320), ("dev.csv", 64)):
        lines = ["first,second,score"]
        for _ in range(n):
            k1, k2 = rng.randint(0, 2), rng.randint(0, 2)
            a, b = _words(rng, 5), _words(rng, 5)
            for _ in range(k1):
                a.insert(rng.randint(0, len(a)), "great")
            for _ in range(k2):
                b.insert(rng.randint(0, len(b)), "great")
            lines.append(f'"{" ".join(a)}","{" ".join(b)}",{k1 + k2 + rng.uniform(-0.2, 0.2):.3f}')
        (d / name).write_text("\n".join(lines) + "\n")
    return d


def write_multiple_choice(d: Path, seed=0):
    """4 choices; the right one ends with 'great'."""
    rng = random.Random(seed)
    d.mkdir(parents=True, exist_ok=True)
    for name, n in (("train.jsonl", 192), ("dev.jsonl", 48)):
        with open(d / name, "w") as f:
            for i in range(n):
                label = rng.randrange(4)
                choices = [" ".join(_words(rng, 3)) for _ in range(4)]
                choices[label] += " great"
                ex = {
                    "id": f"{name}-{i}",
                    "context": " ".join(_words(rng, 8)),
                    "question": "which ?",
                    "choices": choices,
                    "label": label,
                }
                f.write(json.dumps(ex) + "\n")
    return d


def write_conll(d: Path, seed=0):
    """'paris'/'london' are B-LOC, 'bob smith' is B-PER I-PER, the rest O."""
    rng = random.Random(seed)
    d.mkdir(parents=True, exist_ok=True)
    for name, n in (("train.txt", 200), ("valid.txt", 50)):
        with open(d / name, "w") as f:
            f.write("-DOCSTART- -X- -X- O\n\n")
            for _ in range(n):
                toks = []
                for w in _words(rng, rng.randint(5, 10)):
                    toks.append((w, "O"))
                    r = rng.random()
                    if r < 0.15:
                        toks.append((rng.choice(["paris", "london"]), "B-LOC"))
                    elif r < 0.25:
                        toks += [("bob", "B-PER"), ("smith", "I-PER")]
                for w, t in toks:
                    f.write(f"{w} NN B-NP {t}\n")
                f.write("\n")
    return d


def write_squad(d: Path, version="v2.0", n_train=300, n_dev=60, seed=0, max_words=40):
    """'where is it ?' -> the city in the context; v2.0: a quarter have no city (no answer)."""
    rng = random.Random(seed)
    d.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", n_train), ("dev", n_dev)):
        data = []
        for i in range(n):
            ws = _words(rng, rng.randint(10, max_words))
            has = version == "v1.1" or i % 4 != 0
            qa = {"id": f"{split}{i}", "question": "where is it ?", "answers": []}
            if has:
                pos = rng.randint(0, len(ws))
                city = rng.choice(["paris", "london"])
                ws.insert(pos, city)
                start = len(" ".join(ws[:pos])) + (1 if pos else 0)
                qa["answers"] = [{"text": city, "answer_start": start}]
            if version == "v2.0":
                qa["is_impossible"] = not has
            data.append({"title": "t", "paragraphs": [{"context": " ".join(ws), "qas": [qa]}]})
        (d / f"{split}-{version}.json").write_text(json.dumps({"version": version, "data": data}))
    return d


def ft(**flags):
    """finetune.run with flags as keywords: data_dir=x -> --data-dir x; True -> the bare flag."""
    argv = []
    for key, value in flags.items():
        argv.append("--" + key.replace("_", "-"))
        if value is not True:
            argv.append(str(value))
    return finetune.run(argv)


# --------------------------------------------------------------------------- learning runs


def test_glue_classification_learns_and_reloads(pretrained, tmp_path):
    data = write_sst2(tmp_path / "sst2")
    out = tmp_path / "out"
    res = ft(
        task="sst2",
        data_dir=data,
        init=pretrained,
        output_dir=out,
        epochs=3,
        max_seq_length=32,
        **FAST,
    )
    # Chance is 0.5 (balanced); the keyword rule is learnt.
    assert res["accuracy"] >= 0.85
    assert json.loads((out / "eval_results.json").read_text()) == res
    assert set(res) == {"accuracy"}
    lines = (out / "predictions.tsv").read_text().splitlines()
    assert lines[0] == "index\tprediction\tlabel" and len(lines) == 65
    history = [json.loads(x) for x in (out / "eval_history.jsonl").read_text().splitlines()]
    assert [h["step"] for h in history] == [16, 32, 48]  # every epoch of 256/16 steps
    assert max(h["accuracy"] for h in history) == res["accuracy"]
    cfg = json.loads((out / "train_config.json").read_text())
    assert cfg["preset"].endswith("configs/finetune/sst2.json")
    assert cfg["settings"]["learning_rate"] == 1e-3  # flag over preset
    assert cfg["settings"]["weight_decay"] == 0.01  # from the preset

    # best_model/ holds the best parameters and this task's head: evaluating it (no training)
    # reproduces the best score.
    again = ft(
        task="sst2",
        data_dir=data,
        init=out / "best_model",
        output_dir=tmp_path / "again",
        epochs=0,
        max_seq_length=32,
        no_progress=True,
    )
    assert again["accuracy"] == pytest.approx(res["accuracy"])
    assert (
        "head included"
        in json.loads((tmp_path / "again" / "train_config.json").read_text())["model"]
    )


def test_generic_regression_csv_learns(pretrained, tmp_path):
    data = write_regression_csv(tmp_path / "reg")
    out = tmp_path / "out"
    res = ft(
        task="regression",
        train_file=data / "train.csv",
        dev_file=data / "dev.csv",
        text_column="first",
        text_pair_column="second",
        label_column="score",
        init=pretrained,
        output_dir=out,
        epochs=4,
        max_seq_length=32,
        eval_every=40,
        **FAST,
    )
    assert set(res) == {"pearson", "spearmanr", "mse"}
    # An untrained model has correlation ~0; the count is learnt.
    assert res["spearmanr"] >= 0.7 and res["pearson"] >= 0.7
    steps = [json.loads(x)["step"] for x in (out / "eval_history.jsonl").read_text().splitlines()]
    assert steps == [40, 80]  # --eval-every 40 of 80 steps


def test_multiple_choice_learns(pretrained, tmp_path):
    data = write_multiple_choice(tmp_path / "mc")
    out = tmp_path / "out"
    res = ft(
        task="multiple_choice",
        data_dir=data,
        init=pretrained,
        output_dir=out,
        epochs=3,
        max_seq_length=32,
        grad_accum_steps=2,
        **FAST,
    )
    # Chance is 0.25 with 4 choices.
    assert res["accuracy"] >= 0.7
    first = json.loads((out / "predictions.jsonl").read_text().splitlines()[0])
    assert set(first) == {"id", "prediction", "label"}


def test_token_classification_learns(pretrained, tmp_path):
    data = write_conll(tmp_path / "conll")
    out = tmp_path / "out"
    res = ft(
        task="conll2003",
        data_dir=data,
        init=pretrained,
        output_dir=out,
        epochs=5,
        max_seq_length=32,
        **FAST,
    )
    # Predicting all 'O' gives entity F1 0; the rule is learnt.
    assert res["f1"] >= 0.8
    assert {"precision", "recall", "f1", "f1_LOC", "f1_PER"} <= set(res)
    sentence = (out / "predictions.txt").read_text().split("\n\n")[0].splitlines()
    assert all(len(line.split()) == 3 for line in sentence)  # word gold pred


def test_question_answering_v2_learns(pretrained, tmp_path):
    data = write_squad(tmp_path / "squad")
    out = tmp_path / "out"
    # Windows of 48 tokens with stride 8: the longer contexts are split.
    res = ft(
        task="squad_v2",
        data_dir=data,
        init=pretrained,
        output_dir=out,
        epochs=3,
        max_seq_length=48,
        doc_stride=8,
        max_query_length=8,
        max_answer_length=5,
        **FAST,
    )
    cfg = json.loads((out / "train_config.json").read_text())
    assert cfg["num_train_features"] > cfg["num_train_examples"]  # some questions have 2 windows
    assert cfg["settings"]["layerwise_lr_decay"] == 0.75  # from the squad_v2 preset
    # The preset's 1000 of 8000 warm-up steps become 12.5% of this shorter run.
    assert cfg["settings"]["warmup_ratio"] == 0.125 and cfg["settings"]["warmup_steps"] == 0
    assert {
        "exact_match",
        "f1",
        "HasAns_exact_match",
        "HasAns_f1",
        "NoAns_exact_match",
        "best_f1",
        "best_f1_thresh",
    } <= set(res)
    # Chance: ~1/30 positions for the answerable three quarters; the city is learnt, and
    # the unanswerable ones are recognised.
    assert res["HasAns_exact_match"] >= 70
    assert res["NoAns_exact_match"] >= 70
    preds = json.loads((out / "predictions.json").read_text())
    assert len(preds) == 60
    assert (out / "null_odds.json").is_file()
    assert (out / "best_model" / "config.json").is_file()


def test_classification_from_scratch_jsonl(tmp_path):
    """No --init: a model from --model-config and a vocabulary trained on the training text."""
    rng = random.Random(1)
    d = tmp_path / "data"
    d.mkdir()
    for name, n in (("train.jsonl", 240), ("dev.jsonl", 60)):
        with open(d / name, "w") as f:
            for i in range(n):
                ws = _words(rng, rng.randint(4, 9))
                label = ["neg", "pos", "meh"][i % 3]
                if label == "pos":
                    ws.insert(rng.randint(0, len(ws)), "great")
                elif label == "meh":
                    ws.insert(rng.randint(0, len(ws)), "okay")
                f.write(json.dumps({"review": " ".join(ws), "stars": label}) + "\n")
    cfg = tmp_path / "tiny.json"
    cfg.write_text(json.dumps(TINY_MODEL))
    out = tmp_path / "out"
    res = ft(
        task="classification",
        data_dir=d,
        text_column="review",
        label_column="stars",
        model_config=cfg,
        output_dir=out,
        epochs=4,
        max_seq_length=32,
        **FAST,
    )
    # 3 balanced classes: chance 1/3.
    assert res["accuracy"] >= 0.8
    train_cfg = json.loads((out / "train_config.json").read_text())
    assert train_cfg["labels"] == ["meh", "neg", "pos"]
    assert "trained on the training text" in train_cfg["tokenizer"]
    assert (out / "tokenizer" / "tokenizer.json").is_file()


def test_mnli_two_dev_sets_eval_only(pretrained, tmp_path):
    """--epochs 0 evaluates the init model; MNLI reports matched and mismatched."""
    d = tmp_path / "MNLI"
    d.mkdir()
    header = (
        "index\tpromptID\tpairID\tgenre\tsentence1_binary_parse\tsentence2_binary_parse\t"
        "sentence1_parse\tsentence2_parse\tsentence1\tsentence2"
    )
    labels = ["entailment", "neutral", "contradiction"]

    def rows(n, dev):
        out = [
            header
            + ("\tlabel1\tlabel2\tlabel3\tlabel4\tlabel5" if dev else "\tlabel1")
            + "\tgold_label"
        ]
        for i in range(n):
            lab = labels[i % 3]
            extra = [lab] * (5 if dev else 1)
            out.append(
                "\t".join(
                    [
                        str(i),
                        "1",
                        "1e",
                        "fiction",
                        "(x)",
                        "(y)",
                        "(X)",
                        "(Y)",
                        f'the "cat {i}',
                        "a dog",
                        *extra,
                        lab,
                    ]
                )
            )
        return "\n".join(out) + "\n"

    (d / "train.tsv").write_text(rows(9, False))
    (d / "dev_matched.tsv").write_text(rows(6, True))
    (d / "dev_mismatched.tsv").write_text(rows(7, True))
    out = tmp_path / "out"
    res = ft(
        task="mnli",
        data_dir=d,
        init=pretrained,
        output_dir=out,
        epochs=0,
        max_seq_length=32,
        no_progress=True,
    )
    assert set(res) == {"accuracy", "accuracy_mismatched"}
    assert len((out / "predictions.tsv").read_text().splitlines()) == 7
    assert len((out / "predictions_mismatched.tsv").read_text().splitlines()) == 8


# --------------------------------------------------------------------------- readers


GLUE_FILES = {
    # task: (train.tsv text, expected first example (text, pair, label))
    "cola": (
        "gj04\t1\t\tOur friends won't buy this \"analysis.\ngj04\t0\t*\tThey drank the pub.\n",
        ("Our friends won't buy this \"analysis.", None, "1"),
    ),
    "sst2": (
        "sentence\tlabel\nit 's a \"charming journey \t1\nbad\t0\n",
        ("it 's a \"charming journey ", None, "1"),
    ),
    "mrpc": (
        "\ufeffQuality\t#1 ID\t#2 ID\t#1 String\t#2 String\n1\t702876\t702977\tAmrozi "
        "accused\tReferring to him\n0\t1\t2\ta\tb\n",
        ("Amrozi accused", "Referring to him", "1"),
    ),
    "stsb": (
        "index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\t"
        "score\n0\tmain-captions\tMSRvid\t2012test\t0001\tnone\tnone\tA plane.\tAn air "
        "plane.\t5.000\n",
        ("A plane.", "An air plane.", 5.0),
    ),
    "qqp": (
        "id\tqid1\tqid2\tquestion1\tquestion2\tis_duplicate\n133273\t213221\t213222\tHow "
        "is it?\tWhat is it?\t0\n",
        ("How is it?", "What is it?", "0"),
    ),
    "mnli": (
        "index\tpromptID\tpairID\tgenre\tsentence1_binary_parse\tsentence2_binary_parse\t"
        "sentence1_parse\tsentence2_parse\tsentence1\tsentence2\tlabel1\tgold_label\n"
        "0\t31193\t31193n\tgovernment\t( a )\t( b )\t(ROOT a)\t(ROOT b)\tConceptually "
        "cream.\tProduct and geography.\tneutral\tneutral\n",
        ("Conceptually cream.", "Product and geography.", "neutral"),
    ),
    "qnli": (
        "index\tquestion\tsentence\tlabel\n0\tWhen?\tIn 1990.\tentailment\n",
        ("When?", "In 1990.", "entailment"),
    ),
    "rte": (
        "index\tsentence1\tsentence2\tlabel\n0\tDana Reeve died.\tChristopher Reeve had an "
        "accident.\tnot_entailment\n",
        ("Dana Reeve died.", "Christopher Reeve had an accident.", "not_entailment"),
    ),
    "wnli": (
        "index\tsentence1\tsentence2\tlabel\n0\tI stuck a pin.\tI stuck the pin.\t1\n",
        ("I stuck a pin.", "I stuck the pin.", "1"),
    ),
}


@pytest.mark.parametrize("name", sorted(GLUE_FILES))
def test_glue_readers_official_columns(name, tmp_path):
    text, (t, p, label) = GLUE_FILES[name]
    (tmp_path / "train.tsv").write_text(text, encoding="utf-8")
    task = get_task(name)
    examples = task.read(task.train_file(tmp_path))
    ex = examples[0]
    assert (ex.text, ex.pair, ex.label) == (t, p, label)
    assert ex.where.endswith("train.tsv:1" if name == "cola" else "train.tsv:2")
    expected_main = {"cola": "matthews_correlation", "stsb": "spearmanr"}.get(name, "accuracy")
    assert task.main_metric == expected_main


def test_qa_features_map_answers_and_decode(tokenizer, tmp_path):
    """Training labels point at the answer's tokens; decoding perfect logits gives it back."""
    data = write_squad(tmp_path / "sq", version="v1.1", n_train=40, n_dev=40, max_words=60)
    task = get_task("squad", doc_stride=6, max_query_length=4, max_answer_length=5)
    train = task.read(data / "train-v1.1.json")
    task.setup(train, {})
    settings = EncodeSettings.create(tokenizer, 32, tail_pad=1)
    feats = task.featurize(tokenizer, settings, train, train=True, chunk_size=7)
    assert len(feats) > len(train)  # long contexts need several windows
    # Evaluation features: the same windows, with the character offsets of the context tokens.
    eval_feats = task.featurize(tokenizer, settings, train, train=False)
    np.testing.assert_array_equal(eval_feats.arrays["input_ids"], feats.arrays["input_ids"])
    np.testing.assert_array_equal(eval_feats.meta["sample"], feats.meta["sample"])
    assert feats.arrays["input_ids"].shape[1] == 32
    assert (feats.arrays["attention_mask"][:, -1] == 0).all()  # the trailing pad
    found = set()
    offsets, sample = eval_feats.meta["offsets"], feats.meta["sample"]
    for i in range(len(feats)):
        s, e = feats.arrays["start_positions"][i], feats.arrays["end_positions"][i]
        ex = train[sample[i]]
        if s == 0:
            assert e == 0
            continue
        assert ex.context[offsets[i, s, 0] : offsets[i, e, 1]] == ex.answers[0]
        found.add(ex.id)
    assert found == {ex.id for ex in train}  # every answer is inside some window

    # One-hot logits at the labelled positions decode to the gold answers: EM 100.
    n, length = feats.arrays["input_ids"].shape
    start = np.full((n, length), -10.0, np.float32)
    end = np.full((n, length), -10.0, np.float32)
    start[np.arange(n), feats.arrays["start_positions"]] = 10.0
    end[np.arange(n), feats.arrays["end_positions"]] = 10.0
    scores, preds = task.evaluate(train, eval_feats, {"start_logits": start, "end_logits": end})
    assert scores["exact_match"] == 100.0 and scores["f1"] == 100.0
    assert preds["answers"][train[0].id] == train[0].answers[0]


def test_token_features_label_first_piece_only(tokenizer):
    task = get_task("token_classification")
    from funnel_jax.tasks.token_classification import TaggedSentence

    # 'greatness' is not in the tiny vocabulary as one piece.
    sents = [
        TaggedSentence(
            ["bob", "smith", "greatness", "paris"],
            ["B-PER", "I-PER", "O", "B-LOC"],
            "x:1",
            [1, 2, 3, 4],
        ),
    ]
    task.setup(sents, {})
    settings = EncodeSettings.create(tokenizer, 24)
    feats = task.featurize(tokenizer, settings, sents, train=True)
    pieces = [tokenizer.tokenize(w) for w in sents[0].words]
    assert len(pieces[2]) > 1
    labels = feats.arrays["labels"][0]
    expected = [-100]
    for tag, p in zip(sents[0].tags, pieces, strict=True):
        expected += [task.labels.index(tag)] + [-100] * (len(p) - 1)
    expected += [-100] * (24 - len(expected))
    assert labels.tolist() == expected
    ids = feats.arrays["input_ids"][0]
    assert ids[0] == tokenizer.cls_token_id
    n = 2 + sum(len(p) for p in pieces)
    assert ids[n - 1] == tokenizer.sep_token_id
    assert feats.arrays["token_type_ids"][0, :n].tolist() == [2] + [0] * (n - 1)


def test_pair_truncation_pops_longer_side(tokenizer):
    task = get_task("rte")
    from funnel_jax.tasks.classification import TextExample

    long_a = " ".join(["cat"] * 20)
    ex = [TextExample(long_a, "dog dog", "entailment", "x:1")]
    settings = EncodeSettings.create(tokenizer, 16, tail_pad=3)
    feats = task.featurize(tokenizer, settings, ex, train=True)
    row = feats.arrays["input_ids"][0]
    cat, dog = tokenizer.convert_tokens_to_ids(["cat", "dog"])
    # 13 content tokens: <cls> 8 x cat <sep> dog dog <sep>, then the 3 trailing pads.
    assert row.tolist()[:13] == [tokenizer.cls_token_id] + [cat] * 8 + [
        tokenizer.sep_token_id,
        dog,
        dog,
        tokenizer.sep_token_id,
    ]
    assert feats.arrays["attention_mask"][0].sum() == 13
    assert feats.arrays["token_type_ids"][0, :13].tolist() == [2] + [0] * 9 + [1] * 3


# --------------------------------------------------------------------------- malformed data


def _expect_data_error(tmp_path, args, *fragments):
    out = tmp_path / "never"
    with pytest.raises(DataError) as info:
        argv = [*args, "--output-dir", out, "--model-config", "small", "--no-progress"]
        finetune.run([str(a) for a in argv])
    msg = str(info.value)
    for frag in fragments:
        assert frag in msg, msg
    assert not out.exists()  # stopped before anything was written or trained
    return msg


def test_error_glue_missing_column(tmp_path):
    d = write_sst2(tmp_path / "d", n_train=4, n_dev=4)
    lines = (d / "train.tsv").read_text().splitlines()
    lines[2] = lines[2].split("\t")[0]  # line 3: the label field is gone
    (d / "train.tsv").write_text("\n".join(lines) + "\n")
    _expect_data_error(
        tmp_path,
        ["--task", "sst2", "--data-dir", d],
        f"{d / 'train.tsv'}:3:",
        "expected 2 tab-separated fields",
    )


def test_error_label_outside_label_set(tmp_path):
    d = write_sst2(tmp_path / "d", n_train=4, n_dev=4)
    lines = (d / "dev.tsv").read_text().splitlines()
    lines[3] = lines[3].rsplit("\t", 1)[0] + "\t2"
    (d / "dev.tsv").write_text("\n".join(lines) + "\n")
    _expect_data_error(
        tmp_path, ["--task", "sst2", "--data-dir", d], f"{d / 'dev.tsv'}:4:", "label '2'"
    )


def test_error_bad_json_line(tmp_path):
    d = tmp_path / "d"
    d.mkdir()
    (d / "train.jsonl").write_text(
        '{"text": "a", "label": "x"}\n{"text": "b", "label": "y"}\n{"text": "c", "label": \n'
    )
    (d / "dev.jsonl").write_text('{"text": "a", "label": "x"}\n')
    _expect_data_error(
        tmp_path,
        ["--task", "classification", "--data-dir", d],
        f"{d / 'train.jsonl'}:3:",
        "not valid JSON",
    )


def test_error_missing_named_column_and_unseen_label(tmp_path):
    d = tmp_path / "d"
    d.mkdir()
    (d / "train.csv").write_text("text,label\nnice,pos\nbad,neg\n")
    (d / "dev.csv").write_text("text,label\nok,pos\nmeh,neutral\n")
    _expect_data_error(
        tmp_path,
        ["--task", "classification", "--data-dir", d, "--text-column", "review"],
        f"{d / 'train.csv'}:2:",
        "no column 'review'",
    )
    _expect_data_error(
        tmp_path,
        ["--task", "classification", "--data-dir", d],
        f"{d / 'dev.csv'}:3:",
        "'neutral' does not occur in the training data",
    )


def test_error_conll_and_multiple_choice(tmp_path):
    d = write_conll(tmp_path / "c")
    text = (d / "valid.txt").read_text().splitlines()
    text[4] = "lonelyword"
    (d / "valid.txt").write_text("\n".join(text) + "\n")
    _expect_data_error(
        tmp_path,
        ["--task", "conll2003", "--data-dir", d],
        f"{d / 'valid.txt'}:5:",
        "expected a word and its tag",
    )
    text[4] = "paris NN B-NP B-CITY"
    (d / "valid.txt").write_text("\n".join(text) + "\n")
    _expect_data_error(
        tmp_path,
        ["--task", "conll2003", "--data-dir", d],
        f"{d / 'valid.txt'}:5:",
        "'B-CITY' does not occur",
    )

    m = write_multiple_choice(tmp_path / "m")
    lines = (m / "dev.jsonl").read_text().splitlines()
    bad = json.loads(lines[1])
    bad["label"] = 4
    lines[1] = json.dumps(bad)
    (m / "dev.jsonl").write_text("\n".join(lines) + "\n")
    _expect_data_error(
        tmp_path,
        ["--task", "race", "--data-dir", m],
        f"{m / 'dev.jsonl'}:2:",
        "label 4 is outside the 4 choices",
    )


def test_error_squad_answer_not_in_context(tmp_path):
    d = write_squad(tmp_path / "s", version="v1.1", n_train=5, n_dev=3)
    path = d / "train-v1.1.json"
    doc = json.loads(path.read_text())
    doc["data"][2]["paragraphs"][0]["qas"][0]["answers"][0]["text"] = "zz"
    path.write_text(json.dumps(doc, indent=1))
    line = next(i for i, t in enumerate(path.read_text().splitlines(), 1) if '"train2"' in t)
    _expect_data_error(
        tmp_path,
        ["--task", "squad", "--data-dir", d],
        f"{path}:{line}:",
        "'train2'",
        "is not at answer_start",
    )


def test_presets_cite_sources_and_load():
    names = {p.stem for p in finetune.PRESET_DIR.glob("*.json")}
    from funnel_jax.tasks import TASK_NAMES

    assert names == set(TASK_NAMES)
    for name in names:
        preset, _ = finetune.load_preset(name, None)  # known keys only
        raw = json.loads((finetune.PRESET_DIR / f"{name}.json").read_text())
        assert raw["_source"] and raw["task"] == name
    race, _ = finetune.load_preset("race", None)
    assert (race["max_steps"], race["batch_size"], race["learning_rate"]) == (24000, 16, 2e-5)
    sq, _ = finetune.load_preset("squad_v2", None)
    assert (sq["layerwise_lr_decay"], sq["max_steps"], sq["batch_size"]) == (0.75, 8000, 48)
    mnli, _ = finetune.load_preset("mnli", None)
    assert (mnli["batch_size"], mnli["epochs"], mnli["learning_rate"]) == (64, 3, 1e-5)


def test_convert_race_and_swag(tmp_path):
    from experiments import convert_race_swag

    race = tmp_path / "RACE"
    for split in ("train", "dev"):
        for level in ("high", "middle"):
            (race / split / level).mkdir(parents=True)
    article = {
        "id": "high7.txt",
        "article": "Tom went to the market. He bought apples.",
        "questions": ["Where did Tom go?", "Tom bought _ ."],
        "options": [["school", "market", "home", "park"], ["pears", "milk", "apples", "tea"]],
        "answers": ["B", "C"],
    }
    (race / "train" / "high" / "7.txt").write_text(json.dumps(article))
    (race / "train" / "middle" / "8.txt").write_text(json.dumps({**article, "id": "middle8.txt"}))
    (race / "dev" / "high" / "9.txt").write_text(json.dumps({**article, "answers": ["A", "D"]}))
    (race / "dev" / "middle" / "1.txt").write_text(json.dumps({**article, "answers": ["B", "B"]}))
    assert convert_race_swag.main(["race", str(race), str(tmp_path / "race_out")]) == 0
    lines = (tmp_path / "race_out" / "train.jsonl").read_text().splitlines()
    assert len(lines) == 4
    first = json.loads(lines[0])
    assert first == {
        "id": "high7-0",
        "context": article["article"],
        "question": "Where did Tom go?",
        "choices": ["school", "market", "home", "park"],
        "label": 1,
    }
    task = get_task("race")
    train = task.read(tmp_path / "race_out" / "train.jsonl")
    assert [ex.label for ex in train] == [1, 2, 1, 2]
    from funnel_jax.tasks.multiple_choice import join_question_choice

    assert join_question_choice(train[1].question, "apples") == "Tom bought apples ."

    swag = tmp_path / "swag"
    swag.mkdir()
    header = (
        ",video-id,fold-ind,startphrase,sent1,sent2,gold-source,"
        "ending0,ending1,ending2,ending3,label"
    )
    (swag / "train.csv").write_text(
        header
        + "\n0,lsmdc1,5,x,Someone opens the door.,He,gold,walks in.,flies.,sings.,sleeps.,0\n"
    )
    (swag / "val.csv").write_text(
        header + "\n0,lsmdc2,6,x,She sits.,She,gold,eats.,reads a book.,runs.,jumps.,1\n"
    )
    assert convert_race_swag.main(["swag", str(swag), str(tmp_path / "swag_out")]) == 0
    ex = json.loads((tmp_path / "swag_out" / "dev.jsonl").read_text())
    assert ex["context"] == "She sits." and ex["question"] == "She" and ex["label"] == 1
    assert ex["choices"] == ["eats.", "reads a book.", "runs.", "jumps."]

    # A bad label stops the conversion naming the file and line.
    (swag / "val.csv").write_text(header + "\n0,v,6,x,a,b,g,e0,e1,e2,e3,7\n")
    with pytest.raises(convert_race_swag.ConversionError, match=r"val\.csv:2: label 7"):
        list(convert_race_swag.swag_examples(swag / "val.csv"))
