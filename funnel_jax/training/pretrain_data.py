"""The data of a pretraining run, built in one place.

train_iter, eval_batches = build_pretrain_data(cfg, tokenizer, model_cfg, documents,
                                               process_index, process_count)
batch = next(train_iter)        # this process's rows of the global batch (numpy dict)
pos = train_iter.state()        # saved with each checkpoint; train_iter.restore(pos)
train_iter.num_tokens           # tokens of the training split (for the log line)

With `cfg.data_dir` (a directory of experiments.prepare_data) the batches are read from its
ArrayRecord shards by funnel_jax.loader.PreparedBatches (train split shuffled with the run's
seed, eval split in order); otherwise the documents are tokenized and packed in memory
(data.ShardedBatches).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from funnel_jax import data as data_lib
from funnel_jax.training.config import PretrainConfig
from funnel_jax.training.files import ConfigError


def build_pretrain_data(
    cfg: PretrainConfig,
    tokenizer,
    model_cfg,
    documents: Callable[[], Sequence[str]],
    process_index: int,
    process_count: int,
):
    """(train iterator, eval batches) of this process.

    With cfg.data_dir: the prepared directory's splits (`build_prepared_data`). Otherwise the
    documents are split into held-out and training ones, then into data.num_shards shards
    (default: one per process); this process tokenizes and packs only its own shards
    (data.ShardedBatches), so the global batches depend on num_shards only.
    """
    if cfg.data_dir is not None:
        return build_prepared_data(cfg, model_cfg, process_index, process_count)
    dcfg = cfg.data
    special = data_lib.SpecialIds.from_tokenizer(tokenizer)
    train_raw, eval_raw = data_lib.split_documents(documents(), dcfg.eval_fraction, seed=0)
    if not eval_raw:
        raise ConfigError("the corpus has a single document; it cannot hold out an eval set")
    num_shards = int(dcfg.num_shards or process_count)

    def shard_docs(raw):
        def docs(s):
            out = data_lib.tokenize_documents(
                tokenizer, raw[s::num_shards], vocab_size=model_cfg.vocab_size
            )
            if not out:
                raise ConfigError(f"data shard {s} of {num_shards} got no text after tokenization")
            return out

        return docs

    pack_kw = dict(
        seq_len=dcfg.seq_len,
        special=special,
        truncate_stride=data_lib.truncation_stride(model_cfg),
        random_next_prob=dcfg.random_next_prob,
        num_shards=num_shards,
        global_batch=dcfg.batch_size,
        process_index=process_index,
        process_count=process_count,
    )
    try:
        train_data = data_lib.ShardedBatches(shard_docs(train_raw), seed=cfg.train.seed, **pack_kw)
        eval_data = data_lib.ShardedBatches(
            shard_docs(eval_raw), seed=12345, shuffle=False, **pack_kw
        )
        eval_batches = eval_data.take(dcfg.eval_batches)
    except ValueError as e:
        if isinstance(e, ConfigError):
            raise
        raise ConfigError(
            f"{e}; for the held-out set raise data.eval_fraction or lower data.batch_size"
        ) from None
    return train_data, eval_batches


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
