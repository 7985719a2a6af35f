"""Analytic model FLOPs: 2 * m * n * k for every matrix product the model computes.

Element-wise work (softmax, layer norm, activations, pooling) is left out, as is usual for
model FLOPs utilisation. A training step counts 3x the forward (backward = 2x forward).
"""

from __future__ import annotations

from funnel_jax import attention_structure as structure
from funnel_jax.config import FunnelConfig


def attention_flops(config: FunnelConfig, batch: int, s: int, t: int, rel_len: int) -> int:
    """One attention layer with s queries and t keys; rel_len relative positions."""
    d, nh = config.d_model, config.n_head * config.d_head
    flops = 2 * batch * s * d * nh  # q
    flops += 2 * 2 * batch * t * d * nh  # k, v
    flops += 2 * batch * s * t * nh  # q k^T
    if config.attention_type == "factorized":
        flops += 2 * batch * s * nh * d  # q r_kernel -> [B, S, N, D]
        flops += 2 * 2 * batch * config.n_head * s * t * d  # two [S, D] x [D, T] per head
    else:
        flops += 2 * rel_len * d * nh  # r_head (no batch dimension)
        flops += 2 * batch * s * rel_len * nh  # q r_head^T
    flops += 2 * batch * s * nh * 2  # token-type bias
    flops += 2 * batch * s * t * nh  # probabilities x v
    flops += 2 * batch * s * nh * d  # post_proj
    return flops


def ffn_flops(config: FunnelConfig, batch: int, s: int) -> int:
    return 2 * 2 * batch * s * config.d_model * config.d_inner


def layer_flops(config, batch, s, t, rel_len) -> int:
    return attention_flops(config, batch, s, t, rel_len) + ffn_flops(config, batch, s)


def encoder_flops(config: FunnelConfig, batch: int, seq_len: int) -> int:
    total = 0
    pos = list(range(seq_len))
    length = seq_len
    for b, size in enumerate(config.block_sizes):
        calls = size * config.block_repeats[b]
        if b > 0:
            pooled_pos = structure.stride_pool_pos(config, pos, b)
            rel = len(structure.relative_pos(pos, 2 ** (b - 1), pooled_pos, shift=2))
            new_len = len(structure.stride_pool_list(config, list(range(length))))
            t = length if config.pool_q_only else new_len
            r = rel if config.pool_q_only else len(structure.relative_pos(pooled_pos, 2**b))
            total += layer_flops(config, batch, new_len, t, r)
            calls -= 1
            pos, length = pooled_pos, new_len
        rel_same = len(structure.relative_pos(pos, 2**b))
        total += calls * layer_flops(config, batch, length, length, rel_same)
    return total


def decoder_flops(config: FunnelConfig, batch: int, seq_len: int) -> int:
    rel = len(structure.relative_pos(list(range(seq_len)), 1))
    return config.num_decoder_layers * layer_flops(config, batch, seq_len, seq_len, rel)


def model_flops(config: FunnelConfig, batch: int, seq_len: int, model: str = "base") -> int:
    """Forward FLOPs of `model` in {"base", "full", "pretraining", "masked_lm"}."""
    flops = encoder_flops(config, batch, seq_len)
    if config.one_hot_embeddings:
        flops += 2 * batch * seq_len * config.vocab_size * config.d_model
    if model == "base":
        return flops
    flops += decoder_flops(config, batch, seq_len)
    d = config.d_model
    if model == "pretraining":
        flops += 2 * batch * seq_len * d * d + 2 * batch * seq_len * d
    elif model == "masked_lm":
        flops += 2 * batch * seq_len * d * config.vocab_size
    return flops


def train_step_flops(config: FunnelConfig, batch: int, seq_len: int, model="pretraining") -> int:
    return 3 * model_flops(config, batch, seq_len, model)


def standard_transformer(config: FunnelConfig) -> FunnelConfig:
    """The same width and total depth, built from the same modules, without pooling."""
    depth = sum(s * r for s, r in zip(config.block_sizes, config.block_repeats, strict=True))
    return config.replace(block_sizes=(depth,), block_repeats=(1,))
