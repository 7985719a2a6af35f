"""Pretraining objectives: ELECTRA (generator + replaced-token detection) and plain MLM.

    obj = make_objective(config, ObjectiveConfig(name="electra"), special_ids, seq_len=128)
    params = obj.init(jax.random.PRNGKey(0))
    loss, metrics = obj.loss(params, batch, rng)   # the loss_fn of train_state.make_train_step
    module, export_params = obj.export(params)     # FunnelForPreTraining / FunnelForMaskedLM

ELECTRA as the original Funnel code trains it (tensorflow/pretrain.py, modeling.py):
- The generator has the discriminator's depth and d_head, with d_model, d_inner and n_head scaled
  by `generator_size` (0.25). It shares the discriminator's *whole input embedding*: the word
  table [V, D] *and* the embedding LayerNorm + dropout (the original runs the generator on
  `model.input_embedding(...)`, the discriminator's). Since the generator is narrower, its encoder
  starts with a learned projection D -> d_gen (`input_projection`, the original's
  `input_projection` for d_embed != d_model), and its MLM head (the original `lm_proj` + `lm_loss`)
  is dense d_gen -> D, activation, LayerNorm(D), then logits against the shared table plus a
  bias of its own. So the MLM output is tied to the same table "through a projection". Hence
  the generator is not a `FunnelForMaskedLM` (that head has no projection); its parameters are
  `params["generator"]`, and `params["discriminator"]` is exactly a FunnelForPreTraining tree.
- Targets: per sequence, round(mask_prob * #candidates) positions (at most `num_predict`)
  drawn uniformly among candidates = attention_mask 1 and not a special token (`<cls>`, `<sep>`,
  `<pad>`, `<mask>`, `<unk>`, ... are never targets). 80% of them become `<mask>`, 10% a random
  non-special token, 10% stay (`mask_token_prob`, `random_token_prob`). The original draws the
  random token from the whole vocabulary; we leave the special tokens out.
- Replacements are sampled from the generator with Gumbel-max (argmax(logits + Gumbel noise),
  no gradient through the sampling); the discriminator reads the input with every target
  position replaced by its sample; its label is 1 where the sample differs from the original
  token (transformers' convention; the original TF code uses the opposite sign).
- loss = generator MLM cross-entropy (mean over targets) + disc_weight (50) x discriminator BCE
  (mean over attention_mask == 1 tokens).
- Random draws (which tokens, the replacement kinds, the Gumbel noise) use JAX's threefry, or
  with the model's `dropout_rng` "hash" (or "auto" on TPU) the counter-based hash of
  funnel_jax/dropout.py, as the dropout masks do: a pure function of (key, element index), so
  the same on every mesh.

The MLM objective trains a FunnelForMaskedLM on the same masking (its head is applied to the
target positions only; same numbers as the full module, see tests).

Metrics: `mlm_loss` / `mlm_acc` (the generator's, or the MLM model's), `disc_loss`, `disc_acc`
(replaced-token detection accuracy over non-pad tokens), `replaced_frac`, `loss`; the detection
AUC is computed on the host from an eval batch's logits (`roc_auc`).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from funnel_jax.config import FunnelConfig
from funnel_jax.data import SpecialIds
from funnel_jax.dropout import dropout_key
from funnel_jax.layers import (
    ACTIVATIONS,
    FunnelDecoder,
    FunnelEmbeddings,
    FunnelEncoder,
    LayerNorm,
    WordEmbeddings,
    dense,
    matmul_last,
    zeros_init,
)
from funnel_jax.models import FunnelForMaskedLM, FunnelForPreTraining, FunnelModel, init_params

OBJECTIVES = ("electra", "mlm")


@dataclasses.dataclass(frozen=True)
class ObjectiveConfig:
    name: str = "electra"
    generator_size: float = 0.25  # generator d_model, d_inner, n_head = this x discriminator's
    disc_weight: float = 50.0
    mask_prob: float = 0.15
    mask_token_prob: float = 0.8
    random_token_prob: float = 0.1

    def __post_init__(self):
        def fail(name, msg):
            raise ValueError(f"ObjectiveConfig.{name}: {msg} (got {getattr(self, name)!r})")

        if self.name not in OBJECTIVES:
            fail("name", f"must be one of {OBJECTIVES}")
        if not 0.0 < self.generator_size <= 1.0:
            fail("generator_size", "must be in (0, 1]")
        if self.disc_weight < 0:
            fail("disc_weight", "must be >= 0")
        if not 0.0 < self.mask_prob < 1.0:
            fail("mask_prob", "must be in (0, 1)")
        for name in ("mask_token_prob", "random_token_prob"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                fail(name, "must be in [0, 1]")
        if self.mask_token_prob + self.random_token_prob > 1.0 + 1e-9:
            fail("random_token_prob", "mask_token_prob + random_token_prob must be <= 1")

    def replace(self, **changes) -> ObjectiveConfig:
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ObjectiveConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(k for k in d if k not in names and not k.startswith("_"))
        if unknown:
            raise ValueError(f"unknown objective setting(s) {unknown}; expected {sorted(names)}")
        return cls(**{k: v for k, v in d.items() if k in names})

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def generator_config(config: FunnelConfig, size: float) -> FunnelConfig:
    """The discriminator's config with d_model, d_inner and n_head scaled (int(x * size), as the
    original's get_generator_config); d_head and the depth unchanged."""
    scaled = {k: int(getattr(config, k) * size) for k in ("d_model", "d_inner", "n_head")}
    small = sorted(k for k, v in scaled.items() if v < 1)
    if small:
        raise ValueError(f"generator_size={size} makes the generator's {small} zero")
    if scaled["d_model"] % 2:
        raise ValueError(
            f"generator_size={size} gives an odd generator d_model={scaled['d_model']} "
            f"(from {config.d_model}); the sinusoids need it even"
        )
    return config.replace(architectures=None, **scaled)


# --------------------------------------------------------------------------- masking


def num_predictions(seq_len: int, mask_prob: float) -> int:
    """Static number of prediction slots per sequence (the original's num_predict)."""
    return max(1, math.ceil(mask_prob * seq_len))


def position_slots(positions: jax.Array, length: int) -> jax.Array:
    """[B, P] positions -> [B, P, L] bool, True where slot p holds position l (one-hot)."""
    return positions[..., None] == jnp.arange(length, dtype=positions.dtype)


def take_positions(x: jax.Array, positions: jax.Array) -> jax.Array:
    """x [B, L, ...] at positions [B, P] -> [B, P, ...], as a one-hot contraction (no gather).

    Exact: each output sums one x value with zeros (integers by a masked sum, floats by an
    einsum at HIGHEST precision, which TPUs would otherwise round to bf16)."""
    slots = position_slots(positions, x.shape[1])
    if jnp.issubdtype(x.dtype, jnp.integer) or x.dtype == bool:
        assert x.ndim == 2, x.shape
        return jnp.sum(jnp.where(slots, x[:, None, :], 0), axis=-1).astype(x.dtype)
    return jnp.einsum(
        "BPL,BL...->BP...", slots.astype(x.dtype), x, precision=jax.lax.Precision.HIGHEST
    )


def put_positions(ids: jax.Array, positions: jax.Array, values: jax.Array) -> jax.Array:
    """ids [B, L] with ids[b, positions[b, p]] = values[b, p] (the positions of a row are
    distinct), as a one-hot select (no scatter)."""
    slots = position_slots(positions, ids.shape[1])
    covered = jnp.any(slots, axis=1)
    new = jnp.sum(jnp.where(slots, values[..., None], 0), axis=1)
    return jnp.where(covered, new, ids).astype(ids.dtype)


def nth_regular_id(rank: jax.Array, special_ids) -> jax.Array:
    """The rank-th (0-based) id, ascending, of those not in `special_ids` (concrete ids, e.g.
    numpy): `setdiff1d(arange(V), special_ids)[rank]` by elementwise steps, not a gather."""
    token = rank
    for s in np.unique(np.asarray(special_ids)):  # ascending: each special below shifts it up
        token = token + (token >= int(s)).astype(rank.dtype)
    return token


def mask_tokens(
    rng: jax.Array,
    input_ids: jax.Array,
    attention_mask: jax.Array,
    *,
    special_ids: jax.Array,
    vocab_size: int,
    mask_id: int,
    mask_prob: float,
    mask_token_prob: float,
    random_token_prob: float,
    num_predict: int,
) -> dict[str, jax.Array]:
    """Draw the targets and build the masked input (see the module docstring).

    special_ids: the special ids, concrete (numpy; never targets, never random replacements).
    Returns masked_ids [B, L]; is_target [B, L] bool; positions [B, P] int32 (target positions
    first, P = num_predict); valid [B, P] bool (which slots are real targets);
    targets [B, P] (the original ids at those positions).

    No sort over the length and no gather or scatter: the targets are the P smallest of one
    uniform draw per candidate (`lax.top_k`, which returns them in the order a stable argsort
    would), and the reads and writes at the positions are one-hot selects.
    """
    r_pick, r_kind, r_rand = jax.random.split(rng, 3)
    batch, length = input_ids.shape
    special_ids = np.unique(np.asarray(special_ids))
    is_special = jnp.any(input_ids[..., None] == jnp.asarray(special_ids, input_ids.dtype), -1)
    candidate = (attention_mask == 1) & ~is_special
    n_cand = candidate.sum(-1)
    n_target = jnp.round(mask_prob * n_cand).astype(jnp.int32)
    n_target = jnp.where(n_cand > 0, jnp.maximum(n_target, 1), 0)
    n_target = jnp.minimum(n_target, num_predict)
    score = jnp.where(candidate, jax.random.uniform(r_pick, (batch, length)), 2.0)
    positions = jax.lax.top_k(-score, num_predict)[1].astype(jnp.int32)
    valid = jnp.arange(num_predict)[None, :] < n_target[:, None]
    targets = take_positions(input_ids, positions)
    u = jax.random.uniform(r_kind, positions.shape)
    to_mask = u < mask_token_prob
    to_random = (u >= mask_token_prob) & (u < mask_token_prob + random_token_prob)
    n_regular = vocab_size - special_ids.shape[0]
    rank = jax.random.randint(r_rand, positions.shape, 0, n_regular)
    random_tokens = nth_regular_id(rank, special_ids)
    new = jnp.where(to_mask, mask_id, jnp.where(to_random, random_tokens, targets))
    new = jnp.where(valid, new, targets).astype(input_ids.dtype)
    masked_ids = put_positions(input_ids, positions, new)
    is_target = jnp.any(position_slots(positions, length) & valid[..., None], axis=1)
    return {
        "masked_ids": masked_ids,
        "is_target": is_target,
        "positions": positions,
        "valid": valid,
        "targets": targets,
    }


def gumbel_sample(rng: jax.Array, logits: jax.Array) -> jax.Array:
    """argmax(logits + Gumbel noise) over the last axis, without gradient."""
    logits = jax.lax.stop_gradient(logits.astype(jnp.float32))
    return jnp.argmax(logits + jax.random.gumbel(rng, logits.shape, jnp.float32), axis=-1)


def roc_auc(scores, labels) -> float:
    """Area under the ROC curve by the rank-sum (Mann-Whitney) formula with average ranks for
    ties; nan when only one class is present."""
    scores = np.asarray(scores, np.float64).ravel()
    labels = np.asarray(labels).ravel().astype(bool)
    n_pos = int(labels.sum())
    n_neg = labels.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    _, inverse, counts = np.unique(scores, return_inverse=True, return_counts=True)
    avg_rank = np.cumsum(counts) - (counts - 1) / 2.0  # 1-based average rank of each value
    ranks = avg_rank[inverse]
    return float((ranks[labels].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


# --------------------------------------------------------------------------- generator


class FunnelGenerator(nn.Module):
    """ELECTRA generator on the discriminator's embedding output (see the module docstring).

    __call__(embeds [B, L, d_embed], table [V, d_embed], attention_mask, token_type_ids,
    positions [B, P] or None, deterministic) -> float32 logits [B, P (or L), V]."""

    config: FunnelConfig  # the generator's (already scaled)
    d_embed: int  # the discriminator's d_model
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(
        self, embeds, table, attention_mask, token_type_ids, positions=None, deterministic=True
    ):
        cfg = self.config
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = embeds.astype(self.dtype)
        if self.d_embed != cfg.d_model:
            x = dense(
                cfg, cfg.d_model, self.d_embed, "input_projection", axes=("embed", "mlp"), **kw
            )(x)
        hidden, all_hidden, _ = FunnelEncoder(cfg, name="encoder", **kw)(
            x, attention_mask, token_type_ids, deterministic
        )
        hidden, _, _ = FunnelDecoder(cfg, name="decoder", **kw)(
            hidden, all_hidden[cfg.block_sizes[0]], attention_mask, token_type_ids, deterministic
        )
        if positions is not None:
            hidden = take_positions(hidden, positions)
        h = dense(cfg, self.d_embed, cfg.d_model, "lm_proj", axes=("mlp", "embed"), **kw)(hidden)
        h = ACTIVATIONS[cfg.hidden_act](h)
        h = LayerNorm(cfg.layer_norm_eps, name="lm_layer_norm", **kw)(h)
        bias = self.param("lm_bias", zeros_init(("vocab",)), (cfg.vocab_size,), self.param_dtype)
        logits = matmul_last(h, table.astype(self.dtype).T, 1) + bias.astype(self.dtype)
        return logits.astype(jnp.float32)


# --------------------------------------------------------------------------- objectives


def _dropout_rngs(rng, deterministic, config: FunnelConfig):
    return None if deterministic else {"dropout": dropout_key(rng, config.dropout_rng)}


class _Objective:
    """Shared masking setup. Subclasses define init / _stats / export."""

    name = ""

    def __init__(
        self,
        config: FunnelConfig,
        objective: ObjectiveConfig,
        special: SpecialIds,
        seq_len: int,
        dtype=jnp.float32,
        param_dtype=jnp.float32,
    ):
        if special.vocab_size > config.vocab_size:
            raise ValueError(
                f"the tokenizer has {special.vocab_size} tokens but the model's vocab_size is "
                f"{config.vocab_size}"
            )
        bad = [i for i in special.all if not 0 <= i < config.vocab_size]
        if bad:
            raise ValueError(f"special token ids {bad} are outside vocab_size={config.vocab_size}")
        if seq_len < config.min_seq_len():
            raise ValueError(
                f"seq_len={seq_len} is too short for this model: with {config.num_blocks} blocks "
                f"it needs at least {config.min_seq_len()} tokens to pool"
            )
        self.config = config
        self.objective = objective
        self.special = special
        self.seq_len = int(seq_len)
        self.dtype = dtype
        self.param_dtype = param_dtype
        self.num_predict = num_predictions(seq_len, objective.mask_prob)
        self._special_ids = np.unique(np.asarray(special.all, np.int32))

    def mask(self, rng, batch):
        # With dropout_rng "hash" the masking's uniform draws are hashes too (HASH_PRNG).
        return mask_tokens(
            dropout_key(rng, self.config.dropout_rng),
            jnp.asarray(batch["input_ids"]),
            jnp.asarray(batch["attention_mask"]),
            special_ids=self._special_ids,
            vocab_size=self.config.vocab_size,
            mask_id=self.special.mask,
            mask_prob=self.objective.mask_prob,
            mask_token_prob=self.objective.mask_token_prob,
            random_token_prob=self.objective.random_token_prob,
            num_predict=self.num_predict,
        )

    def abstract_params(self):
        return jax.eval_shape(self.init, jax.random.PRNGKey(0))

    def _mlm_stats(self, logits, m) -> dict[str, jax.Array]:
        valid = m["valid"]
        targets = m["targets"]
        if self.config.one_hot_embeddings:  # gather-free, like the embedding lookup
            one_hot = jax.nn.one_hot(targets, logits.shape[-1], dtype=logits.dtype)
            ce = optax.softmax_cross_entropy(logits, one_hot)
        else:
            ce = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
        correct = jnp.argmax(logits, -1) == targets
        return {
            "mlm_loss_sum": jnp.sum(jnp.where(valid, ce, 0.0)),
            "mlm_correct": jnp.sum(valid & correct).astype(jnp.float32),
            "n_targets": jnp.sum(valid).astype(jnp.float32),
        }

    def loss(self, params, batch, rng, deterministic: bool = False):
        """(loss, metrics): the loss_fn of train_state.make_train_step."""
        stats, _ = self._stats(params, batch, rng, deterministic)
        metrics = metrics_from_stats(stats)
        return metrics["loss"], metrics

    def eval_step(self, params, batch, rng):
        """(summable stats, aux arrays) without dropout; jit it."""
        return self._stats(params, batch, rng, True)


class ElectraObjective(_Objective):
    name = "electra"

    def __init__(
        self, config, objective, special, seq_len, dtype=jnp.float32, param_dtype=jnp.float32
    ):
        super().__init__(config, objective, special, seq_len, dtype, param_dtype)
        self.generator_config = generator_config(config, objective.generator_size)
        kw = dict(dtype=dtype, param_dtype=param_dtype)
        self.discriminator = FunnelForPreTraining(config, **kw)
        self.embeddings = FunnelEmbeddings(config, **kw)
        self.generator = FunnelGenerator(self.generator_config, d_embed=config.d_model, **kw)

    def init(self, rng, unbox: bool = True):
        r_disc, r_gen = jax.random.split(rng)
        disc = init_params(self.discriminator, r_disc, seq_len=self.seq_len, unbox=unbox)
        length = self.seq_len
        embeds = jnp.zeros((1, length, self.config.d_model), self.dtype)
        table = jnp.zeros((self.config.vocab_size, self.config.d_model), self.param_dtype)
        ones = jnp.ones((1, length), jnp.int32)
        gen = self.generator.init({"params": r_gen}, embeds, table, ones, ones * 0, None)["params"]
        if unbox:
            gen = nn.meta.unbox(gen)
        return {"discriminator": disc, "generator": gen}

    def _stats(self, params, batch, rng, deterministic):
        r_mask, r_emb, r_gen, r_disc, r_sample = jax.random.split(rng, 5)
        ids = jnp.asarray(batch["input_ids"])
        am = jnp.asarray(batch["attention_mask"])
        tt = jnp.asarray(batch["token_type_ids"])
        m = self.mask(r_mask, batch)
        disc_params = params["discriminator"]
        emb_params = disc_params["funnel"]["embeddings"]
        embeds = self.embeddings.apply(
            {"params": emb_params},
            m["masked_ids"],
            None,
            deterministic,
            rngs=_dropout_rngs(r_emb, deterministic, self.config),
        )
        table = emb_params["word_embeddings"]["embedding"]
        gen_logits = self.generator.apply(
            {"params": params["generator"]},
            embeds,
            table,
            am,
            tt,
            m["positions"],
            deterministic,
            rngs=_dropout_rngs(r_gen, deterministic, self.config),
        )
        stats = self._mlm_stats(gen_logits, m)
        # [B, P, vocab] Gumbel noise: with dropout_rng "hash" a hash per element instead of
        # threefry's 20 rounds (on TPU a third of the fusion's estimated cycles; BENCHMARKS.md).
        r_sample = dropout_key(r_sample, self.config.dropout_rng)
        samples = gumbel_sample(r_sample, gen_logits).astype(ids.dtype)
        samples = jnp.where(m["valid"], samples, m["targets"])
        sampled_ids = put_positions(ids, m["positions"], samples)
        labels = ((sampled_ids != ids) & (am == 1)).astype(jnp.float32)
        disc_logits = self.discriminator.apply(
            {"params": disc_params},
            sampled_ids,
            am,
            tt,
            deterministic=deterministic,
            rngs=_dropout_rngs(r_disc, deterministic, self.config),
        ).logits.astype(jnp.float32)
        active = am == 1
        bce = optax.sigmoid_binary_cross_entropy(disc_logits, labels)
        correct = (disc_logits > 0) == (labels > 0.5)
        stats.update(
            disc_loss_sum=jnp.sum(jnp.where(active, bce, 0.0)),
            disc_correct=jnp.sum(active & correct).astype(jnp.float32),
            n_tokens=jnp.sum(active).astype(jnp.float32),
            n_replaced=jnp.sum(labels),
            disc_weight=jnp.asarray(self.objective.disc_weight, jnp.float32),
        )
        aux = {"disc_logits": disc_logits, "disc_labels": labels, "attention_mask": am}
        return stats, aux

    def export(self, params):
        """(FunnelForPreTraining module, its params): the discriminator to save."""
        return self.discriminator, params["discriminator"]


class MlmObjective(_Objective):
    name = "mlm"

    def __init__(
        self, config, objective, special, seq_len, dtype=jnp.float32, param_dtype=jnp.float32
    ):
        super().__init__(config, objective, special, seq_len, dtype, param_dtype)
        kw = dict(dtype=dtype, param_dtype=param_dtype)
        self.model = FunnelForMaskedLM(config, **kw)
        self.backbone = FunnelModel(config, **kw)
        self.word_embeddings = WordEmbeddings(config, **kw)

    def init(self, rng, unbox: bool = True):
        return init_params(self.model, rng, seq_len=self.seq_len, unbox=unbox)

    def logits_at(
        self,
        params,
        input_ids,
        attention_mask,
        token_type_ids,
        positions,
        deterministic=True,
        rng=None,
    ):
        """FunnelForMaskedLM's logits at `positions` [B, P] only: [B, P, V] float32."""
        hidden = self.backbone.apply(
            {"params": params["funnel"]},
            input_ids,
            attention_mask,
            token_type_ids,
            deterministic=deterministic,
            rngs=_dropout_rngs(rng, deterministic, self.config),
        ).last_hidden_state
        hidden = take_positions(hidden, positions)
        # FunnelForMaskedLM's TiedLMHead (embeddings.attend + bias), on these positions.
        logits = self.word_embeddings.apply(
            {"params": params["funnel"]["embeddings"]["word_embeddings"]}, hidden, method="attend"
        )
        logits = logits + params["lm_head"]["bias"].astype(logits.dtype)
        return logits.astype(jnp.float32)

    def _stats(self, params, batch, rng, deterministic):
        r_mask, r_drop = jax.random.split(rng)
        am = jnp.asarray(batch["attention_mask"])
        tt = jnp.asarray(batch["token_type_ids"])
        m = self.mask(r_mask, batch)
        logits = self.logits_at(
            params, m["masked_ids"], am, tt, m["positions"], deterministic, r_drop
        )
        return self._mlm_stats(logits, m), {"attention_mask": am}

    def export(self, params):
        return self.model, params


def make_objective(
    config: FunnelConfig,
    objective: ObjectiveConfig,
    special: SpecialIds,
    seq_len: int,
    dtype=jnp.float32,
    param_dtype=jnp.float32,
) -> _Objective:
    cls = ElectraObjective if objective.name == "electra" else MlmObjective
    return cls(config, objective, special, seq_len, dtype, param_dtype)


def metrics_from_stats(stats: Mapping[str, Any]) -> dict[str, Any]:
    """Means from summed stats (works on jax arrays in the step and numpy sums on the host)."""
    xp = jnp if any(isinstance(v, jax.Array) for v in stats.values()) else np
    n_t = xp.maximum(stats["n_targets"], 1.0)
    out = {"mlm_loss": stats["mlm_loss_sum"] / n_t, "mlm_acc": stats["mlm_correct"] / n_t}
    loss = out["mlm_loss"]
    if "disc_loss_sum" in stats:
        n = xp.maximum(stats["n_tokens"], 1.0)
        out["disc_loss"] = stats["disc_loss_sum"] / n
        out["disc_acc"] = stats["disc_correct"] / n
        out["replaced_frac"] = stats["n_replaced"] / n
        loss = loss + stats["disc_weight"] * out["disc_loss"]
    out["loss"] = loss
    return out


def evaluate(
    eval_step, params, batches: Iterable[Mapping[str, np.ndarray]], rng
) -> dict[str, float]:
    """Run a (jitted) `objective.eval_step` over batches; token-weighted means, plus the
    replaced-token detection AUC (`rtd_auc`) over every non-pad token (ELECTRA only)."""
    totals: dict[str, float] = {}
    scores, labels = [], []
    for i, batch in enumerate(batches):
        stats, aux = jax.device_get(eval_step(params, batch, jax.random.fold_in(rng, i)))
        for k, v in stats.items():
            if k == "disc_weight":
                totals[k] = float(v)
            else:
                totals[k] = totals.get(k, 0.0) + float(v)
        if "disc_logits" in aux:
            active = np.asarray(aux["attention_mask"]) == 1
            scores.append(np.asarray(aux["disc_logits"])[active])
            labels.append(np.asarray(aux["disc_labels"])[active])
    if not totals:
        raise ValueError("evaluate() got no batches")
    out = {k: float(v) for k, v in metrics_from_stats(totals).items()}
    if scores:
        out["rtd_auc"] = roc_auc(np.concatenate(scores), np.concatenate(labels))
    return out
