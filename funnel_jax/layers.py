"""Funnel Transformer building blocks (Flax linen): embeddings, attention, FFN, encoder, decoder.

Dimension key (einsum letters):
  B batch, S query length, T key length, R relative positions, D d_model,
  N heads, H d_head, F d_inner, V vocab, K token-type classes (2).

Parameter names mirror `transformers.models.funnel` module names, and every parameter carries
logical axis names (`embed`, `heads`, `kv`, `mlp`, `vocab`, ...) for sharding.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from funnel_jax import attention_structure as structure
from funnel_jax import layer_stack
from funnel_jax.config import FunnelConfig
from funnel_jax.dropout import Dropout

Array = jax.Array
Dtype = Any


# --- initialisers (the reference's distributions) --------------------------------------------


def linear_std(config: FunnelConfig, fan_in: int, fan_out: int) -> float:
    """Reference Linear init: N(0, sqrt(1 / (fan_in + fan_out))) unless initializer_std is set."""
    if config.initializer_std is not None:
        return config.initializer_std
    return math.sqrt(1.0 / float(fan_in + fan_out))


def linear_init(config: FunnelConfig, fan_in: int, fan_out: int, axes: tuple):
    return nn.with_logical_partitioning(
        jax.nn.initializers.normal(linear_std(config, fan_in, fan_out)), axes
    )


def uniform_init(upper: float, axes: tuple):
    """U(0, upper): the reference's init of r_w_bias, r_r_bias, r_kernel, r_s_bias, seg_embed."""

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, 0.0, upper)

    return nn.with_logical_partitioning(init, axes)


def zeros_init(axes: tuple):
    return nn.with_logical_partitioning(jax.nn.initializers.zeros, axes)


def ones_init(axes: tuple):
    return nn.with_logical_partitioning(jax.nn.initializers.ones, axes)


ACTIVATIONS: dict[str, Callable[[Array], Array]] = {
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_fast": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_python": lambda x: jax.nn.gelu(x, approximate=False),
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
    "tanh": jnp.tanh,
}


def dense(config, features, fan_in, name, dtype, param_dtype, axes=("embed", "mlp"), bias=True):
    """A Linear layer: kernel [in, out] (transposed from torch's [out, in]), bias zeros."""
    return nn.Dense(
        features,
        use_bias=bias,
        dtype=dtype,
        param_dtype=param_dtype,
        kernel_init=linear_init(config, fan_in, features, axes),
        bias_init=zeros_init(axes[-1:]),
        dot_general=rows_dot_general,
        name=name,
    )


class LayerNorm(nn.Module):
    """LayerNorm computed in float32 whatever the compute dtype; returns `dtype`."""

    epsilon: float
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        y = nn.LayerNorm(
            epsilon=self.epsilon,
            dtype=jnp.float32,
            param_dtype=self.param_dtype,
            use_fast_variance=False,
            scale_init=ones_init(("norm",)),
            bias_init=zeros_init(("norm",)),
            name="ln",
        )(x.astype(jnp.float32))
        return y.astype(self.dtype)


# --- embeddings ----------------------------------------------------------------------------


class WordEmbeddings(nn.Module):
    """Token embedding table [V, D]; `attend` gives the tied output projection."""

    config: FunnelConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def setup(self):
        cfg = self.config
        std = 1.0 if cfg.initializer_std is None else cfg.initializer_std
        pad = cfg.pad_token_id

        def init(key, shape, dtype=jnp.float32):
            table = jax.random.normal(key, shape, dtype) * std
            return table if pad is None else table.at[pad].set(0)

        self.embedding = self.param(
            "embedding",
            nn.with_logical_partitioning(init, ("vocab", "embed")),
            (cfg.vocab_size, cfg.d_model),
            self.param_dtype,
        )

    def __call__(self, input_ids: Array) -> Array:
        """[B, L] int -> [B, L, D]."""
        table = self.embedding.astype(self.dtype)
        if self.config.one_hot_embeddings:
            one_hot = jax.nn.one_hot(input_ids, self.config.vocab_size, dtype=self.dtype)
            x = jnp.einsum("BLV,VD->BLD", one_hot, table)
        else:
            x = jnp.take(table, input_ids, axis=0)
        if self.config.pad_token_id is not None:
            # torch's Embedding(padding_idx=...) gives the padding row no gradient.
            is_pad = (input_ids == self.config.pad_token_id)[..., None]
            x = jnp.where(is_pad, jax.lax.stop_gradient(x), x)
        return x

    def attend(self, x: Array) -> Array:
        """[B, L, D] -> [B, L, V] logits against the embedding table."""
        return matmul_last(x, self.embedding.astype(self.dtype).T, 1)


class FunnelEmbeddings(nn.Module):
    config: FunnelConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def setup(self):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        self.word_embeddings = WordEmbeddings(self.config, **kw)
        self.layer_norm = LayerNorm(self.config.layer_norm_eps, **kw)
        self.dropout = Dropout(self.config.hidden_dropout, rng=self.config.dropout_rng)

    def __call__(self, input_ids=None, inputs_embeds=None, deterministic=True) -> Array:
        if inputs_embeds is None:
            inputs_embeds = self.word_embeddings(input_ids)
        x = self.layer_norm(inputs_embeds.astype(self.dtype))
        return self.dropout(x, deterministic=deterministic)


# --- attention -----------------------------------------------------------------------------


@flax.struct.dataclass
class AttentionInputs:
    """What one attention layer needs besides its hidden states.

    position: relative_shift: (r [R, D],); factorized: (phi [S, D], pi [S, D], psi [T, D],
      omega [T, D]).
    token_type_mat: [B, S, T] bool. attention_mask: [B, T] float (1 keep, 0 pad).
    cls_mask: [S, T] float or None.
    """

    position: tuple[Array, ...]
    token_type_mat: Array
    attention_mask: Array
    cls_mask: Array | None


def relative_shift(scores: Array, context_len: int, shift: int) -> Array:
    """[..., S, R] scores per relative distance -> [..., S, T] scores per key.

    A reshape trick (no gather): viewing the [S, R] block as [R, S] and dropping `shift` rows
    shifts each query row by one more position than the previous one.
    """
    *lead, s, r = scores.shape
    scores = scores.reshape(*lead, r, s)[..., shift:, :]
    scores = scores.reshape(*lead, s, r - shift)
    return scores[..., :context_len]


def heads_first(x: Array) -> Array:
    """[B, S, N, H] -> [N, B, S, H]."""
    return x.transpose(2, 0, 1, 3)


def matmul_last(x: Array, kernel: Array, contract: int, precision=None) -> Array:
    """Contract the last `contract` dims of x with the first `contract` dims of kernel, as one
    plain [rows, K] x [K, M] matrix product (reshapes are free, no transposes).

    Written as an einsum asking for another output order (heads first) or contracting (N, H),
    XLA's CPU backend transposes the weight (and often the input) on every call; at batch 1,
    length 128 those copies took as long as the matmuls themselves. Left as a [B, L, D] x
    [D, F] product (flax's nn.Dense), the weight gradient contracts over two dims (B, L) and
    the `small` train step took 7% longer (2345 vs 2161 ms, batch 8, length 128, 2-core CPU).
    """
    k_shape, out_shape = kernel.shape[:contract], kernel.shape[contract:]
    lead = x.shape[: x.ndim - contract]
    k = math.prod(k_shape)
    y = jnp.matmul(x.reshape(-1, k), kernel.reshape(k, -1), precision=precision)
    return y.reshape(*lead, *out_shape)


def rows_dot_general(x, kernel, dimension_numbers, precision=None, preferred_element_type=None):
    """nn.Dense's contraction (last dim of x with the kernel's first) as matmul_last."""
    if dimension_numbers != (((x.ndim - 1,), (0,)), ((), ())) or preferred_element_type:
        return jax.lax.dot_general(
            x, kernel, dimension_numbers, precision, preferred_element_type=preferred_element_type
        )
    return matmul_last(x, kernel, 1, precision)


class Projection(nn.Module):
    """x [..., *kernel_shape[:contract]] -> [..., *kernel_shape[contract:]] (+ bias returned
    separately), with named, logically partitioned params."""

    contract: int
    kernel_shape: tuple[int, ...]
    kernel_axes: tuple[str, ...]
    std: float
    bias_shape: tuple[int, ...] | None = None
    bias_axes: tuple[str, ...] = ()
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        init = nn.with_logical_partitioning(jax.nn.initializers.normal(self.std), self.kernel_axes)
        kernel = self.param("kernel", init, self.kernel_shape, self.param_dtype)
        y = matmul_last(x.astype(self.dtype), kernel.astype(self.dtype), self.contract)
        if self.bias_shape is None:
            return y
        bias = self.param("bias", zeros_init(self.bias_axes), self.bias_shape, self.param_dtype)
        return y, bias.astype(self.dtype)


def score_einsum(spec: str, a: Array, b: Array) -> Array:
    """An attention-score einsum accumulated and returned in float32 whatever the inputs'
    dtype: bf16 products summed (or rounded) to bf16 before the softmax lose about three
    significant digits of every score, which the softmax then exponentiates."""
    return jnp.einsum(spec, a, b, preferred_element_type=jnp.float32)


class FunnelRelMultiheadAttention(nn.Module):
    """Relative multi-head attention with the token-type term.

    The projections are plain matrix products giving [B, S, N, H]. On the einsum path the
    activations are then moved heads first, even before the batch ([N, B, S, H]): the
    positional score is one matmul per head with the batch folded into its rows
    ('NBSH,NRH->NBSR') and the relative shift is a reshape of contiguous [S, R] blocks. The
    fused path keeps [B, S, N, H] as it comes and builds its score bias directly in the
    [B, N, S, T] layout `jax.nn.dot_product_attention` takes, without transposing it.
    Every score term is accumulated in float32 (`score_einsum`).
    """

    config: FunnelConfig
    block_index: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(
        self,
        query: Array,
        key_value: Array,
        inputs: AttentionInputs,
        deterministic: bool = True,
        output_attentions: bool = False,
    ) -> tuple[Array, Array | None]:
        """query [B, S, D], key_value [B, T, D] -> ([B, S, D], probabilities [B, N, S, T])."""
        cfg = self.config
        n, h, d = cfg.n_head, cfg.d_head, cfg.d_model
        scale = 1.0 / (h**0.5)
        dt, pdt = self.dtype, self.param_dtype
        fused = cfg.attention_impl == "fused_bias" and not output_attentions
        if fused and not deterministic and cfg.attention_dropout > 0.0:
            raise ValueError(
                "FunnelConfig.attention_impl='fused_bias' does not apply with attention "
                "dropout: jax.nn.dot_product_attention has no dropout on the probabilities, "
                f"and attention_dropout={cfg.attention_dropout} with deterministic=False asks "
                "for it. Train with attention_dropout=0.0, or with attention_impl='einsum'."
            )
        std = linear_std(cfg, d, n * h)
        proj = dict(
            contract=1, kernel_shape=(d, n, h), kernel_axes=("embed", "heads", "kv"), std=std
        )
        kw = dict(dtype=dt, param_dtype=pdt)

        def param(name, shape, axes):
            p = self.param(name, uniform_init(cfg.initializer_range, axes), shape, pdt)
            return p.astype(dt)

        q_bsnh = Projection(**proj, name="q_head", **kw)(query) * scale
        k, k_bias = Projection(
            **proj,
            bias_shape=(n, h),
            bias_axes=("heads", "kv"),
            name="k_head",
            **kw,
        )(key_value)
        v, v_bias = Projection(
            **proj,
            bias_shape=(n, h),
            bias_axes=("heads", "kv"),
            name="v_head",
            **kw,
        )(key_value)
        k_bsnh, v_bsnh = k + k_bias, v + v_bias
        r_w_bias = param("r_w_bias", (n, h), ("heads", "kv"))
        r_r_bias = param("r_r_bias", (n, h), ("heads", "kv"))
        r_kernel = param("r_kernel", (d, n, h), ("embed", "heads", "kv"))
        r_s_bias = param("r_s_bias", (n, h), ("heads", "kv"))
        seg_embed = param("seg_embed", (2, n, h), ("segment", "heads", "kv"))

        # The query in the layout the scores are built from: [B, S, N, H] for the fused call
        # (scores [B, N, S, T]), [N, B, S, H] otherwise (scores [N, B, S, T]).
        q_spec, lead = ("BSNH", "BN") if fused else ("NBSH", "NB")
        q = q_bsnh if fused else heads_first(q_bsnh)

        def shifted(bias):  # q + bias * scale, bias [N, H]
            bias = bias * scale
            return q + (bias if fused else bias[:, None, None, :])

        context_len = key_value.shape[1]
        positional = self._positional(
            inputs.position, shifted(r_r_bias), r_kernel, context_len, q_spec, lead
        )
        # Token type: seg_embed[1] for the same segment (or <cls>), seg_embed[0] otherwise.
        tt_bias = score_einsum(f"{q_spec},KNH->{lead}SK", shifted(r_s_bias), seg_embed)
        same_type = inputs.token_type_mat[:, None] if fused else inputs.token_type_mat[None]
        token_type = jnp.where(same_type, tt_bias[..., 1:2], tt_bias[..., 0:1])
        bias = positional + token_type  # float32
        if inputs.cls_mask is not None:
            bias = bias * inputs.cls_mask.astype(jnp.float32)
        mask = inputs.attention_mask.astype(jnp.float32)
        mask_bias = -structure.MASK_INF * (1.0 - mask)[:, None, None, :]  # [B, 1, 1, T]
        if not fused:
            mask_bias = mask_bias[None, :, 0]  # [1, B, 1, T]

        if fused:
            # softmax((q + r_w_bias) k^T + bias) v in one fused call (cuDNN on GPU).
            attn = jax.nn.dot_product_attention(
                q_bsnh + r_w_bias * scale,
                k_bsnh,
                v_bsnh,
                bias=(bias + mask_bias).astype(dt),
                scale=1.0,
            )  # BSNH
            prob = None
        else:
            content = score_einsum("NBSH,NBTH->NBST", shifted(r_w_bias), heads_first(k_bsnh))
            score = content + bias + mask_bias
            prob = checkpoint_name(jax.nn.softmax(score, axis=-1).astype(dt), "attention_probs")
            prob = Dropout(cfg.attention_dropout, rng=cfg.dropout_rng)(
                prob, deterministic=deterministic
            )
            attn = jnp.einsum("NBST,NBTH->NBSH", prob, heads_first(v_bsnh))
            attn = attn.transpose(1, 2, 0, 3)  # BSNH

        out, out_bias = Projection(
            contract=2,
            kernel_shape=(n, h, d),
            kernel_axes=("heads", "kv", "embed"),
            std=linear_std(cfg, n * h, d),
            bias_shape=(d,),
            bias_axes=("embed",),
            name="post_proj",
            **kw,
        )(attn)
        out = Dropout(cfg.hidden_dropout, rng=cfg.dropout_rng)(
            out + out_bias, deterministic=deterministic
        )
        residual = query.astype(jnp.float32) + out.astype(jnp.float32)
        out = LayerNorm(cfg.layer_norm_eps, dtype=dt, param_dtype=pdt, name="layer_norm")(residual)
        return out, (prob.transpose(1, 0, 2, 3) if output_attentions else None)  # BNST

    def _positional(self, position, q_r, r_kernel, context_len: int, q_spec: str, lead: str):
        """Positional score, float32, [N, B, S, T] (lead 'NB') or [B, N, S, T] (lead 'BN');
        q_r = scaled query + r_r_bias * scale in the layout `q_spec` ('NBSH' or 'BSNH')."""
        dt = self.dtype
        if self.config.attention_type == "factorized":
            phi, pi, psi, omega = (p.astype(dt) for p in position)
            # Per-head query features [*lead, S, D] (a projection, kept in the compute dtype);
            # the two score products over D accumulate in float32.
            q_r_att = jnp.einsum(f"{q_spec},DNH->{lead}SD", q_r, r_kernel)
            return score_einsum(f"{lead}SD,TD->{lead}ST", q_r_att * phi, psi) + score_einsum(
                f"{lead}SD,TD->{lead}ST", q_r_att * pi, omega
            )
        (r,) = position
        shift = 2 if q_r.shape[2 if lead == "NB" else 1] != context_len else 1
        r_head = matmul_last(r.astype(dt), r_kernel, 1)  # RNH, no batch
        if lead == "NB":  # batch folded into the rows of one matmul per head
            scores = score_einsum("NBSH,NRH->NBSR", q_r, r_head.transpose(1, 0, 2))
        else:  # r broadcast over the batch so that (B, N) are the product's batch dims: the
            # scores come out [B, N, S, R] with no transpose (r is far smaller than them)
            r_b = jnp.broadcast_to(r_head, (q_r.shape[0], *r_head.shape))
            scores = score_einsum("BSNH,BRNH->BNSR", q_r, r_b)
        return relative_shift(scores, context_len, shift)


class FunnelPositionwiseFFN(nn.Module):
    config: FunnelConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array, deterministic: bool = True) -> Array:
        """[B, L, D] -> [B, L, D]."""
        cfg = self.config
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = dense(cfg, cfg.d_inner, cfg.d_model, "linear_1", axes=("embed", "mlp"), **kw)(x)
        h = ACTIVATIONS[cfg.hidden_act](h)
        h = Dropout(cfg.activation_dropout, rng=cfg.dropout_rng)(h, deterministic=deterministic)
        h = dense(cfg, cfg.d_model, cfg.d_inner, "linear_2", axes=("mlp", "embed"), **kw)(h)
        h = Dropout(cfg.hidden_dropout, rng=cfg.dropout_rng)(h, deterministic=deterministic)
        residual = x.astype(jnp.float32) + h.astype(jnp.float32)
        return LayerNorm(cfg.layer_norm_eps, name="layer_norm", **kw)(residual)


REMAT_POLICIES = {
    "full": None,  # save nothing, recompute everything
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
    "attention_scores": jax.checkpoint_policies.save_only_these_names("attention_probs"),
    # The weight matmuls' outputs and the attention probabilities (bf16 under bf16 compute) are
    # kept; layer norms, activations, dropout masks (their random bits) and the score matmuls
    # are recomputed in the backward pass.
    "dots_no_batch_probs": jax.checkpoint_policies.save_from_both_policies(
        jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
        jax.checkpoint_policies.save_only_these_names("attention_probs"),
    ),
    # The same, and the dropout keep masks (one byte per element): the backward pass draws no
    # random bits again.
    "dots_no_batch_probs_masks": jax.checkpoint_policies.save_from_both_policies(
        jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
        jax.checkpoint_policies.save_only_these_names("attention_probs", "dropout_mask"),
    ),
}


class FunnelLayer(nn.Module):
    config: FunnelConfig
    block_index: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, query, key_value, inputs, deterministic=True, output_attentions=False):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x, prob = FunnelRelMultiheadAttention(
            self.config, self.block_index, name="attention", **kw
        )(query, key_value, inputs, deterministic, output_attentions)
        x = nn.with_logical_constraint(x, ("batch", "length", "embed"))
        x = FunnelPositionwiseFFN(self.config, name="ffn", **kw)(x, deterministic)
        return nn.with_logical_constraint(x, ("batch", "length", "embed")), prob


def layer_class(config: FunnelConfig):
    """FunnelLayer, wrapped in nn.remat when config.remat_policy asks for it."""
    if config.remat_policy == "none":
        return FunnelLayer
    # Arguments after self: query, key_value, inputs, deterministic, output_attentions.
    # Inside nn.scan the loop already keeps XLA from merging the recomputation with the forward
    # (jax.checkpoint's docs), so prevent_cse, which costs fusion opportunities, is off there.
    return nn.remat(
        FunnelLayer,
        policy=REMAT_POLICIES[config.remat_policy],
        static_argnums=(4, 5),
        prevent_cse=not config.scan_layers,
    )


def scan_layers(
    parent: nn.Module,
    name: str,
    block_index: int,
    num_layers: int,
    repeats: int,
    hidden: Array,
    inputs: AttentionInputs,
    deterministic: bool,
    output_attentions: bool,
) -> tuple[Array, list[Array], list[Array | None]]:
    """Apply `num_layers` same-shape layers, each `repeats` times in a row, to hidden
    [B, L, D] as one `nn.scan` over parameters stored stacked under `name` (leading axis
    num_layers; funnel_jax/layer_stack.py maps them to and from one entry per layer).

    Called inside `parent`'s compact method. The program holds one layer body; each scan step
    draws its own dropout key (split_rngs), and the repeats inside a step draw distinct masks.
    Returns (hidden, [hidden after each call], [attention probabilities or None per call]),
    calls in order (layer 0 repeat 0, layer 0 repeat 1, ..., layer 1 repeat 0, ...).
    """
    cfg = parent.config

    def body(layer, h, inputs):
        hs, probs = [], []
        for _ in range(repeats):
            h, prob = layer(h, h, inputs, deterministic, output_attentions)
            hs.append(h)
            probs.append(prob)
        return h, (jnp.stack(hs), jnp.stack(probs) if output_attentions else None)

    scan = nn.scan(
        body,
        variable_axes={"params": 0, "intermediates": 0},
        split_rngs={"params": True, "dropout": True},
        in_axes=nn.broadcast,
        length=num_layers,
        metadata_params={nn.PARTITION_NAME: "layers"},
    )
    layer = layer_class(cfg)(
        cfg, block_index, dtype=parent.dtype, param_dtype=parent.param_dtype, name=name
    )
    hidden, (hs, probs) = scan(layer, hidden, inputs)
    calls = [(j, r) for j in range(num_layers) for r in range(repeats)]
    per_layer = [hs[j, r] for j, r in calls]
    per_prob = [None if probs is None else probs[j, r] for j, r in calls]
    return hidden, per_layer, per_prob


# --- encoder and decoder ------------------------------------------------------------------


class PositionEncoder(nn.Module):
    """Sinusoidal position inputs for attention, float32, with the reference's dropout."""

    config: FunnelConfig

    @nn.compact
    def __call__(self, kind: str, positions: list[int], deterministic: bool):
        d = self.config.d_model
        drop = Dropout(self.config.hidden_dropout, rng=self.config.dropout_rng)
        # Replicated on a mesh: a few [R, D/2] tables, computed on every device at no cost.
        # Left to the partitioner, they came out split along D (from the projection they
        # feed), and each concatenation of two halves became an all-to-all.
        sin, cos = (replicated(x) for x in structure.sinusoid(positions, d))
        if kind == "relative":  # r [R, D] over relative distances
            r = jnp.concatenate(
                [drop(sin, deterministic=deterministic), drop(cos, deterministic=deterministic)],
                axis=-1,
            )
            return (replicated(r),)
        if kind == "query":  # phi, pi [S, D]
            sin_d = drop(sin, deterministic=deterministic)
            cos_d = drop(cos, deterministic=deterministic)
            return tuple(
                replicated(jnp.concatenate(p, -1)) for p in ((sin_d, sin_d), (cos_d, cos_d))
            )
        # key side: psi, omega [T, D]
        return tuple(replicated(jnp.concatenate(p, -1)) for p in ((cos, sin), (-sin, cos)))


def replicated(x: Array) -> Array:
    """x, on every device when traced under a mesh with logical-axis rules (else as is)."""
    return nn.with_logical_constraint(x, (None,) * x.ndim)


class FunnelEncoder(nn.Module):
    config: FunnelConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(
        self, x, attention_mask, token_type_ids, deterministic=True, output_attentions=False
    ):
        """x [B, L, D], attention_mask [B, L], token_type_ids [B, L] ->
        (last hidden [B, L_last, D], all hidden states, all attention maps)."""
        cfg = self.config
        seq_len = x.shape[1]
        structure.check_seq_len(cfg, seq_len)
        factorized = cfg.attention_type == "factorized"
        positions = PositionEncoder(cfg, name="position_encoder")
        mask = attention_mask.astype(jnp.float32)
        tt_mat = structure.token_type_mat(token_type_ids)
        pos = list(range(seq_len))  # relative_shift: positions of the current tokens
        q_pos = k_pos = pos  # factorized: positions on the query and key sides
        if factorized:
            q_emb = positions("query", q_pos, deterministic)
            k_emb = positions("key", k_pos, deterministic)

        hidden = x
        all_hidden, all_attn = [x], []
        layer_cls = layer_class(cfg)
        layers: dict[str, nn.Module] = {}  # a layer is called block_repeats times

        def layer(b: int, name: str) -> nn.Module:
            if name not in layers:
                layers[name] = layer_cls(
                    cfg, b, dtype=self.dtype, param_dtype=self.param_dtype, name=name
                )
            return layers[name]

        for b, block_size in enumerate(cfg.block_sizes):
            pooling = b > 0
            if pooling:
                if not factorized:
                    pooled_pos = structure.stride_pool_pos(cfg, pos, b)
                    rel = structure.relative_pos(pos, 2 ** (b - 1), pooled_pos, shift=2)
                    r_pool = positions("relative", rel, deterministic)
                    pos = pooled_pos
                if cfg.pool_q_only:
                    q_pos = structure.stride_pool_list(cfg, q_pos)
                    tt_mat = structure.stride_pool(cfg, tt_mat, 1)
                else:
                    q_pos = k_pos = structure.stride_pool_list(cfg, q_pos)
                    tt_mat = structure.stride_pool(cfg, structure.stride_pool(cfg, tt_mat, 1), 2)
                    mask = structure.pool_tensor(cfg, mask, "min")
                if factorized:
                    q_emb = positions("query", q_pos, deterministic)
                    k_emb = positions("key", k_pos, deterministic)
                pooled_hidden = structure.pool_tensor(cfg, hidden, cfg.pooling_type)
            if not factorized:
                r_same = positions("relative", structure.relative_pos(pos, 2**b), deterministic)
            calls = [(i, r) for i in range(block_size) for r in range(cfg.block_repeats[b])]
            if pooling:  # the first call pools; it runs on its own
                (i, _), calls = calls[0], calls[1:]
                query = pooled_hidden
                key_value = hidden if cfg.pool_q_only else pooled_hidden
                s, t = query.shape[1], key_value.shape[1]
                if factorized:
                    position = q_emb + k_emb
                else:
                    position = r_pool if s != t else r_same
                inputs = self._inputs(position, tt_mat, mask, s, t)
                hidden, prob = layer(b, f"blocks_{b}_{i}")(
                    query, key_value, inputs, deterministic, output_attentions
                )
                if cfg.pool_q_only:
                    k_pos = structure.stride_pool_list(cfg, k_pos)
                    if factorized:
                        k_emb = positions("key", k_pos, deterministic)
                    tt_mat = structure.stride_pool(cfg, tt_mat, 2)
                    mask = structure.pool_tensor(cfg, mask, "min")
                all_hidden.append(hidden)
                all_attn.append(prob)
            if not calls:
                continue
            s = hidden.shape[1]
            inputs = self._inputs(q_emb + k_emb if factorized else r_same, tt_mat, mask, s, s)
            if cfg.scan_layers:
                first = layer_stack.first_scanned_layer(b)
                # In a pooling block the pooling layer's other repeats run on their own.
                for _ in range(cfg.block_repeats[b] - 1 if first else 0):
                    hidden, prob = layer(b, f"blocks_{b}_0")(
                        hidden, hidden, inputs, deterministic, output_attentions
                    )
                    all_hidden.append(hidden)
                    all_attn.append(prob)
                if block_size > first:
                    hidden, hs, probs = scan_layers(
                        self,
                        layer_stack.encoder_stack_name(b),
                        b,
                        block_size - first,
                        cfg.block_repeats[b],
                        hidden,
                        inputs,
                        deterministic,
                        output_attentions,
                    )
                    all_hidden += hs
                    all_attn += probs
                continue
            names = [f"blocks_{b}_{i}" for i, _ in calls]
            for name in names:
                hidden, prob = layer(b, name)(
                    hidden, hidden, inputs, deterministic, output_attentions
                )
                all_hidden.append(hidden)
                all_attn.append(prob)
        return hidden, tuple(all_hidden), tuple(all_attn)

    def _inputs(self, position, tt_mat, mask, s: int, t: int) -> AttentionInputs:
        cls = structure.cls_mask(s, t, jnp.float32) if self.config.separate_cls else None
        return AttentionInputs(
            position=position, token_type_mat=tt_mat, attention_mask=mask, cls_mask=cls
        )


def upsample(x: Array, stride: int, target_len: int, separate_cls: bool, truncate_seq: bool):
    """[B, L', D] -> [B, target_len, D] by repeating each token `stride` times (<cls> kept)."""
    if stride == 1:
        return x
    if separate_cls:
        cls, x = x[:, :1], x[:, 1:]
    b, n, d = x.shape  # repeat by broadcasting: no gather in the compiled program
    out = jnp.broadcast_to(x[:, :, None, :], (b, n, stride, d)).reshape(b, n * stride, d)
    if separate_cls:
        if truncate_seq:
            out = jnp.pad(out, ((0, 0), (0, stride - 1), (0, 0)))
        return jnp.concatenate([cls, out[:, : target_len - 1]], axis=1)
    return out[:, :target_len]


class FunnelDecoder(nn.Module):
    config: FunnelConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(
        self,
        final_hidden,
        first_block_hidden,
        attention_mask,
        token_type_ids,
        deterministic=True,
        output_attentions=False,
    ):
        """Upsample [B, L_last, D] to [B, L, D], add the first block's output, run the layers."""
        cfg = self.config
        seq_len = first_block_hidden.shape[1]
        up = upsample(
            final_hidden,
            2 ** (cfg.num_blocks - 1),
            seq_len,
            cfg.separate_cls,
            cfg.truncate_seq,
        )
        hidden = (up.astype(jnp.float32) + first_block_hidden.astype(jnp.float32)).astype(
            self.dtype
        )
        positions = PositionEncoder(cfg, name="position_encoder")
        pos = list(range(seq_len))
        if cfg.attention_type == "factorized":
            position = positions("query", pos, deterministic) + positions("key", pos, deterministic)
        else:
            position = positions("relative", structure.relative_pos(pos, 1), deterministic)
        inputs = AttentionInputs(
            position=position,
            token_type_mat=structure.token_type_mat(token_type_ids),
            attention_mask=attention_mask.astype(jnp.float32),
            cls_mask=structure.cls_mask(seq_len, seq_len, jnp.float32)
            if cfg.separate_cls
            else None,
        )
        all_hidden, all_attn = [hidden], []
        if cfg.scan_layers and cfg.num_decoder_layers:
            hidden, hs, probs = scan_layers(
                self,
                layer_stack.DECODER_STACK,
                0,
                cfg.num_decoder_layers,
                1,
                hidden,
                inputs,
                deterministic,
                output_attentions,
            )
            return hidden, tuple(all_hidden + hs), tuple(all_attn + probs)
        layer_cls = layer_class(cfg)
        for i in range(cfg.num_decoder_layers):
            layer = layer_cls(
                cfg, 0, dtype=self.dtype, param_dtype=self.param_dtype, name=f"layers_{i}"
            )
            hidden, prob = layer(hidden, hidden, inputs, deterministic, output_attentions)
            all_hidden.append(hidden)
            all_attn.append(prob)
        return hidden, tuple(all_hidden), tuple(all_attn)
