"""FunnelConfig: one frozen dataclass that every module takes.

The fields are those of `transformers.FunnelConfig` (same names, same defaults), plus the
head fields (num_labels / id2label / label2id / problem_type) and a few implementation
options of this project that the reference does not have (marked below). `from_dict` reads a
`config.json` as `transformers` writes it; `to_dict` writes one it can read back.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from typing import Any

POOLING_TYPES = ("mean", "max")
ATTENTION_TYPES = ("relative_shift", "factorized")
HIDDEN_ACTS = ("gelu_new", "gelu", "gelu_fast", "gelu_python", "relu", "silu", "swish", "tanh")
PROBLEM_TYPES = (None, "regression", "single_label_classification", "multi_label_classification")
REMAT_POLICIES = (
    "none",
    "full",
    "dots",
    "dots_no_batch",
    "attention_scores",
    "dots_no_batch_probs",
    "dots_no_batch_probs_masks",
)
ATTENTION_IMPLS = ("einsum", "fused_bias")
DROPOUT_RNGS = ("threefry", "hash", "auto")  # funnel_jax/dropout.py


def _to_tuple(value, name: str) -> tuple[int, ...]:
    if isinstance(value, int):
        value = (value,)
    try:
        return tuple(int(v) for v in value)
    except (TypeError, ValueError):
        raise ValueError(f"FunnelConfig.{name} must be a list of ints, got {value!r}") from None


@dataclasses.dataclass(frozen=True)
class FunnelConfig:
    vocab_size: int = 30522
    block_sizes: tuple[int, ...] = (4, 4, 4)
    block_repeats: tuple[int, ...] | None = None
    num_decoder_layers: int = 2
    d_model: int = 768
    n_head: int = 12
    d_head: int = 64
    d_inner: int = 3072
    hidden_act: str = "gelu_new"
    hidden_dropout: float = 0.1
    attention_dropout: float = 0.1
    activation_dropout: float = 0.0
    initializer_range: float = 0.1
    initializer_std: float | None = None
    layer_norm_eps: float = 1e-9
    pooling_type: str = "mean"
    attention_type: str = "relative_shift"
    separate_cls: bool = True
    truncate_seq: bool = True
    pool_q_only: bool = True
    pad_token_id: int | None = None
    # Heads.
    num_labels: int = 2
    id2label: Mapping[int, str] | None = None
    label2id: Mapping[str, int] | None = None
    problem_type: str | None = None
    architectures: tuple[str, ...] | None = None
    # Implementation options of this project (not in the reference; they never change the maths).
    remat_policy: str = "none"  # rematerialisation of each layer: see funnel_jax/layers.py
    one_hot_embeddings: bool = False  # embedding lookup as a one-hot matmul (gather-free, for TPU)
    attention_impl: str = "einsum"  # "fused_bias": jax.nn.dot_product_attention with a bias
    # A block's same-shape layers as one nn.scan over parameters stored stacked (faster compiles;
    # funnel_jax/layer_stack.py). Off by default: the per-layer layout of transformers.
    scan_layers: bool = False
    # How dropout draws its keep masks: "threefry" (jax.random.bernoulli), "hash" (a
    # counter-based hash, far fewer ops to compile) or "auto" (hash on TPU); funnel_jax/dropout.py.
    # The pretraining objectives follow it for their per-element draws (which tokens to mask,
    # the generator sampling's Gumbel noise): funnel_jax/electra.py.
    dropout_rng: str = "threefry"

    def __post_init__(self):
        set_ = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731 (frozen dataclass)
        set_("block_sizes", _to_tuple(self.block_sizes, "block_sizes"))
        if self.block_repeats is None:
            set_("block_repeats", (1,) * len(self.block_sizes))
        else:
            set_("block_repeats", _to_tuple(self.block_repeats, "block_repeats"))
        if self.architectures is not None:
            set_("architectures", tuple(self.architectures))
        # Labels: id2label wins (as in transformers), keys become ints.
        if self.id2label is not None:
            id2label = {int(k): str(v) for k, v in dict(self.id2label).items()}
            set_("id2label", _FrozenDict(id2label))
            set_("num_labels", len(id2label))
        else:
            set_("id2label", _FrozenDict({i: f"LABEL_{i}" for i in range(int(self.num_labels))}))
        if self.label2id is None:
            set_("label2id", _FrozenDict({v: k for k, v in self.id2label.items()}))
        else:
            set_("label2id", _FrozenDict({str(k): int(v) for k, v in dict(self.label2id).items()}))
        self.validate()

    def validate(self) -> None:
        def fail(field: str, msg: str):
            raise ValueError(f"FunnelConfig.{field}: {msg} (got {getattr(self, field)!r})")

        if len(self.block_sizes) == 0:
            fail("block_sizes", "must name at least one block")
        if any(b <= 0 for b in self.block_sizes):
            fail("block_sizes", "every block needs at least one layer")
        if len(self.block_repeats) != len(self.block_sizes):
            fail(
                "block_repeats",
                f"must have one entry per block ({len(self.block_sizes)} blocks in block_sizes)",
            )
        if any(r <= 0 for r in self.block_repeats):
            fail("block_repeats", "every repeat count must be positive")
        for name in ("vocab_size", "d_model", "n_head", "d_head", "d_inner"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                fail(name, "must be a positive integer")
        if self.d_model % 2:
            fail("d_model", "must be even (the sinusoid splits it into sin and cos halves)")
        if self.num_decoder_layers < 0:
            fail("num_decoder_layers", "must be >= 0")
        for name in ("hidden_dropout", "attention_dropout", "activation_dropout"):
            if not 0.0 <= float(getattr(self, name)) < 1.0:
                fail(name, "must be in [0, 1)")
        if self.initializer_range <= 0:
            fail("initializer_range", "must be positive")
        if self.initializer_std is not None and self.initializer_std <= 0:
            fail("initializer_std", "must be positive or None")
        if self.layer_norm_eps <= 0:
            fail("layer_norm_eps", "must be positive")
        if self.pooling_type not in POOLING_TYPES:
            fail("pooling_type", f"must be one of {POOLING_TYPES}")
        if self.attention_type not in ATTENTION_TYPES:
            fail("attention_type", f"must be one of {ATTENTION_TYPES}")
        if self.hidden_act not in HIDDEN_ACTS:
            fail("hidden_act", f"must be one of {HIDDEN_ACTS}")
        if self.problem_type not in PROBLEM_TYPES:
            fail("problem_type", f"must be one of {PROBLEM_TYPES}")
        if self.num_labels <= 0:
            fail("num_labels", "must be positive")
        if self.pad_token_id is not None and not 0 <= self.pad_token_id < self.vocab_size:
            fail("pad_token_id", f"must be in [0, vocab_size={self.vocab_size})")
        if self.remat_policy not in REMAT_POLICIES:
            fail("remat_policy", f"must be one of {REMAT_POLICIES}")
        if self.attention_impl not in ATTENTION_IMPLS:
            fail("attention_impl", f"must be one of {ATTENTION_IMPLS}")
        if self.dropout_rng not in DROPOUT_RNGS:
            fail("dropout_rng", f"must be one of {DROPOUT_RNGS}")
        if not isinstance(self.scan_layers, bool):
            fail("scan_layers", f"must be true or false, got {self.scan_layers!r}")

    # Derived sizes.
    @property
    def num_blocks(self) -> int:
        return len(self.block_sizes)

    @property
    def num_hidden_layers(self) -> int:
        return sum(self.block_sizes)

    @property
    def hidden_size(self) -> int:
        return self.d_model

    def min_seq_len(self) -> int:
        """Shortest input for which every block after the first really pools.

        The reference skips pooling when the length is <= 2 (separate_cls) or <= 1 but its
        position tables still assume the pooling happened; we refuse such inputs instead.
        """
        length = 1
        while not _pools_every_block(self, length):
            length += 1
        return length

    def pooled_lengths(self, seq_len: int) -> tuple[int, ...]:
        """Sequence length seen by each block for an input of `seq_len` tokens."""
        lengths = [seq_len]
        for _ in range(1, self.num_blocks):
            lengths.append(pooled_length(self, lengths[-1]))
        return tuple(lengths)

    def replace(self, **changes) -> FunnelConfig:
        return dataclasses.replace(self, **changes)

    # Serialisation.
    @classmethod
    def from_dict(cls, d: Mapping[str, Any], **overrides) -> FunnelConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in dict(d).items() if k in names}
        # transformers' attribute_map aliases.
        if "hidden_size" in d and "d_model" not in d:
            kwargs["d_model"] = d["hidden_size"]
        if "num_attention_heads" in d and "n_head" not in d:
            kwargs["n_head"] = d["num_attention_heads"]
        kwargs.update(overrides)
        return cls(**kwargs)

    @classmethod
    def from_json_file(cls, path: str | os.PathLike, **overrides) -> FunnelConfig:
        try:
            with open(path, encoding="utf-8") as f:
                d = json.load(f)
        except FileNotFoundError:
            raise FileNotFoundError(f"config file not found: {path}") from None
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None
        if not isinstance(d, dict):
            raise ValueError(f"{path}: expected a JSON object, got {type(d).__name__}")
        return cls.from_dict(d, **overrides)

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str | os.PathLike,
        *,
        revision: str | None = None,
        cache_dir: str | os.PathLike | None = None,
        local_files_only: bool = False,
        token: str | bool | None = None,
        **overrides,
    ) -> FunnelConfig:
        """The config.json of a model directory or a Hugging Face Hub id (see funnel_jax.hub).

        For a Hub id only config.json is fetched; `overrides` replace fields.
        """
        from funnel_jax import hub

        directory = hub.resolve_config_dir(
            name_or_path,
            revision=revision,
            cache_dir=cache_dir,
            local_files_only=local_files_only,
            token=token,
        )
        path = directory / "config.json" if directory.is_dir() else directory
        return cls.from_json_file(path, **overrides)

    def to_dict(self) -> dict[str, Any]:
        d = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if isinstance(v, tuple):
                v = list(v)
            elif isinstance(v, Mapping):
                v = {str(k): val for k, val in v.items()}
            d[f.name] = v
        d["model_type"] = "funnel"
        d["tie_word_embeddings"] = True
        return d

    def to_json_file(self, path: str | os.PathLike) -> None:
        with open(path, "w", encoding="utf-8") as f:
            json.dump(self.to_dict(), f, indent=2, sort_keys=True)
            f.write("\n")


class _FrozenDict(dict):
    """A hashable dict, so that FunnelConfig stays hashable (flax modules hash their fields)."""

    def __hash__(self):
        return hash(tuple(sorted(self.items(), key=lambda kv: str(kv[0]))))

    def _readonly(self, *args, **kwargs):
        raise TypeError("FunnelConfig label maps are read-only; use config.replace(...)")

    __setitem__ = __delitem__ = update = pop = popitem = clear = setdefault = _readonly


def pooled_length(config: FunnelConfig, length: int) -> int:
    """Length after one pooling step (ceil mode), as the reference computes it."""
    if config.separate_cls:
        length = length if config.truncate_seq else length + 1
    return -(-length // 2)


def _pools_every_block(config: FunnelConfig, seq_len: int) -> bool:
    length = seq_len
    for _ in range(1, config.num_blocks):
        if length <= (2 if config.separate_cls else 1):
            return False
        length = pooled_length(config, length)
    return True
