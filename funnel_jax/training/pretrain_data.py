"""The data of a pretraining run, built in one place, on one path for every corpus size.

data_dir = prepare_run_data(cfg, out_dir)          # prepared ArrayRecord shards (a directory)
train_iter, eval_batches = build_prepared_data(cfg.replace(data_dir=data_dir), model_cfg,
                                               process_index, process_count)
batch = next(train_iter)        # this process's rows of the global batch (numpy dict)
pos = train_iter.state()        # saved with each checkpoint; train_iter.restore(pos)
train_iter.num_tokens           # tokens of the training split (for the log line)

Every run reads prepared shards through funnel_jax.loader.PreparedBatches (train split shuffled
with the run's seed, eval split in order). Where they come from:
  - `data_dir` (`--data DIR`, made by experiments.prepare_data): read as it is;
  - `corpus` (`--corpus PATH...`): prepared into `<workdir>/data` first (funnel_jax.prepare);
  - neither (the embedded default): the standard-library corpus, prepared once into a cache
    (`$FUNNEL_JAX_CACHE`, else `$XDG_CACHE_HOME/funnel_jax`, else `~/.cache/funnel_jax`) under
    a key of its text and the preparation settings, then reused by every run.
Without a tokenizer the preparation trains the deterministic WordPiece vocabulary
(funnel_jax/vocab.py), so the same settings give the same files, hence the same run.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from pathlib import Path
from typing import Any

from funnel_jax import data as data_lib
from funnel_jax.training.config import PretrainConfig
from funnel_jax.training.files import ConfigError


def cache_root() -> Path:
    """Where the embedded corpus is prepared: $FUNNEL_JAX_CACHE, else
    $XDG_CACHE_HOME/funnel_jax, else ~/.cache/funnel_jax."""
    if os.environ.get("FUNNEL_JAX_CACHE"):
        return Path(os.environ["FUNNEL_JAX_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "funnel_jax"


def preparation_settings(cfg: PretrainConfig, model_cfg) -> dict[str, Any]:
    """The keyword arguments of prepare.prepare_corpus that a run's config decides (the
    tokenizer's directory, or the vocabulary to train)."""
    dcfg = cfg.data
    objective = dict(cfg.objective).get("name", "electra")
    settings: dict[str, Any] = dict(
        seq_len=dcfg.seq_len,
        truncate_stride=data_lib.truncation_stride(model_cfg),
        random_next_prob=dcfg.random_next_prob,
        eval_fraction=dcfg.eval_fraction,
        objective=objective,
        num_shards=int(dcfg.num_shards or 1),
    )
    if cfg.tokenizer:
        settings["tokenizer"] = cfg.tokenizer
    else:
        settings.update(vocab_size=dcfg.vocab_size, lowercase=dcfg.lowercase)
    return settings


@contextlib.contextmanager
def _file_lock(path: Path):
    """An exclusive lock on `path` (two runs on one machine preparing the same cache entry
    take turns; the second finds it complete)."""
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _stdlib_cache_entry(settings: dict[str, Any]) -> tuple[Path, list[str]]:
    """(cache directory of the embedded corpus under these settings, its documents)."""
    from funnel_jax import prepare

    docs = data_lib.stdlib_corpus()
    h = hashlib.sha256()
    key = dict(settings)
    if "tokenizer" in key:
        key["tokenizer"] = prepare.tokenizer_sha256(key["tokenizer"])
    h.update(json.dumps(key, sort_keys=True).encode())
    for d in docs:
        h.update(b"\0" + d.encode("utf-8"))
    return cache_root() / f"stdlib-{h.hexdigest()[:16]}", docs


def _prepare_once(cfg: PretrainConfig, out_dir: Path, settings: dict[str, Any], progress: bool):
    from funnel_jax import prepare

    if cfg.corpus:
        target = out_dir / "data"  # one run owns out_dir: no lock
        prepare.prepare_corpus(
            list(cfg.corpus),
            target,
            workers=cfg.data.prepare_workers,
            progress=progress,
            **settings,
        )
        return target
    root, docs = _stdlib_cache_entry(settings)
    target = root / "data"
    with _file_lock(root / ".lock"):
        if not (target / prepare.MANIFEST).is_file():
            corpus = prepare.write_corpus_file(docs, root / "corpus.txt")
            prepare.prepare_corpus(corpus, target, workers=0, progress=progress, **settings)
    return target


def prepare_run_data(
    cfg: PretrainConfig, out_dir: Path, model_cfg, *, progress: bool = True
) -> str:
    """The prepared directory a run reads (see the module docstring); prepared now if needed.

    On several processes process 0 prepares first and the others wait for it; then each
    process checks (or, on a host that does not share the directory, prepares) its own copy:
    the files are deterministic, so every copy is the same."""
    if cfg.data_dir is not None:
        return cfg.data_dir
    from funnel_jax import prepare

    settings = preparation_settings(cfg, model_cfg)
    try:
        import jax

        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            if jax.process_index() == 0:
                _prepare_once(cfg, out_dir, settings, progress)
            multihost_utils.sync_global_devices("funnel_jax prepare data")
        return str(_prepare_once(cfg, out_dir, settings, progress and jax.process_index() == 0))
    except prepare.PrepareError as e:
        raise ConfigError(f"preparing the corpus: {e}") from None


def build_prepared_data(cfg: PretrainConfig, model_cfg, process_index: int, process_count: int):
    """(PreparedBatches over the "train" split, cfg.data.eval_batches batches of the "eval"
    split) of this process. The manifest's seq_len and truncate stride must be the run's
    (data.seq_len, data.truncation_stride(model_cfg)) and its vocabulary must fit the model's:
    a ConfigError names the setting and both values."""
    from funnel_jax import loader

    kw = dict(
        global_batch=cfg.data.batch_size,
        process_index=process_index,
        process_count=process_count,
        seq_len=cfg.data.seq_len,
        truncate_stride=data_lib.truncation_stride(model_cfg),
        vocab_size=model_cfg.vocab_size,
    )
    try:
        train = loader.PreparedBatches(cfg.data_dir, split="train", seed=cfg.train.seed, **kw)
    except ValueError as e:
        raise ConfigError(f"--data {cfg.data_dir}: {e}") from None
    try:
        evalb = loader.PreparedBatches(cfg.data_dir, split="eval", seed=12345, shuffle=False, **kw)
    except ValueError as e:
        raise ConfigError(
            f"--data {cfg.data_dir}: {e} (prepare it with a larger eval_fraction, or lower "
            "data.batch_size)"
        ) from None
    try:
        eval_batches = evalb.take(cfg.data.eval_batches)
    finally:
        evalb.close()  # the eval batches are kept; its prefetch threads are not
    return train, eval_batches
