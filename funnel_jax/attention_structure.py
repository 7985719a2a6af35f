"""Trace-time helpers for Funnel attention: positions, pooling, masks.

Everything that depends only on the sequence length (position lists, relative distances,
pooling schedules) is plain Python here, evaluated while tracing, so each input shape
compiles once and the compiled program holds no loop over tokens and no gather.

Dimension key:
  B batch, L / S / T sequence length (any / query / key side), D d_model.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from funnel_jax.config import FunnelConfig

CLS_TOKEN_TYPE_ID = 2
MASK_INF = 1e6


def inv_freq(d_model: int) -> jnp.ndarray:
    """[D/2] float32 frequencies, computed as the reference does."""
    freq_seq = jnp.arange(d_model // 2, dtype=jnp.float32)
    return 1.0 / (10000.0 ** (freq_seq / (d_model // 2)))


def sinusoid(positions, d_model: int) -> tuple[jnp.ndarray, jnp.ndarray]:
    """(sin, cos) of positions x frequencies, each [len(positions), D/2], always float32."""
    pos = jnp.asarray(np.asarray(positions, dtype=np.float32))
    angles = pos[:, None] * inv_freq(d_model)[None]
    return jnp.sin(angles), jnp.cos(angles)


# --- positions (Python lists of ints) -------------------------------------------------------


def stride_pool_pos(config: FunnelConfig, pos: list[int], block_index: int) -> list[int]:
    """Positions of the tokens kept after pooling into block `block_index` (relative_shift)."""
    if config.separate_cls:
        # <cls> is treated as the first token of the previous block of the first real block,
        # whose position is 1, hence 1 - 2**block_index.
        cls_pos = [1 - 2**block_index]
        rest = pos[1:-1] if config.truncate_seq else pos[1:]
        return cls_pos + rest[::2]
    return pos[::2]


def relative_pos(pos: list[int], stride: int, pooled_pos: list[int] | None = None, shift: int = 1):
    """Relative distances (descending) between query positions and key positions."""
    if pooled_pos is None:
        pooled_pos = pos
    ref_point = pooled_pos[0] - pos[0]
    num_remove = shift * len(pooled_pos)
    max_dist = ref_point + num_remove * stride
    min_dist = pooled_pos[0] - pos[-1]
    return list(range(max_dist, min_dist - 1, -stride))


def stride_pool_list(config: FunnelConfig, items: list) -> list:
    """The reference's `stride_pool` applied to a Python list (used for factorized positions)."""
    if config.separate_cls:
        items = items[:1] + items
        return items[:-1:2] if config.truncate_seq else items[::2]
    return items[::2]


def stride_pool(config: FunnelConfig, x: jnp.ndarray, axis: int) -> jnp.ndarray:
    """Keep one token per pooling window along `axis` (static slicing, no gather)."""
    axis %= x.ndim
    if config.separate_cls:
        x = jnp.concatenate([_slice(x, axis, 0, 1), x], axis=axis)
        if config.truncate_seq:
            return _slice(x, axis, 0, x.shape[axis] - 1, 2)
    return _slice(x, axis, 0, x.shape[axis], 2)


def _slice(x, axis, start, stop, step=1):
    idx = [slice(None)] * x.ndim
    idx[axis] = slice(start, stop, step)
    return x[tuple(idx)]


def pool_tensor(config: FunnelConfig, x: jnp.ndarray, mode: str) -> jnp.ndarray:
    """Pool [B, L] or [B, L, D] along L with windows of 2, stride 2, ceil mode.

    A trailing single element is kept alone, which equals pooling it with a copy of itself.
    """
    if config.separate_cls:
        suffix = x[:, :-1] if config.truncate_seq else x
        x = jnp.concatenate([x[:, :1], suffix], axis=1)
    length = x.shape[1]
    if length % 2:
        x = jnp.concatenate([x, x[:, -1:]], axis=1)
    pairs = x.reshape(x.shape[0], x.shape[1] // 2, 2, *x.shape[2:])
    if mode == "mean":
        return (pairs[:, :, 0] + pairs[:, :, 1]) / 2
    if mode == "max":
        return jnp.max(pairs, axis=2)
    if mode == "min":
        return jnp.min(pairs, axis=2)
    raise ValueError(f"pooling mode must be mean, max or min, got {mode!r}")


def cls_mask(seq_len: int, context_len: int, dtype) -> jnp.ndarray:
    """[S, T] mask that is 0 on row 0 and column 0 (<cls>), 1 elsewhere."""
    rows = jnp.arange(seq_len)[:, None] > 0
    cols = jnp.arange(context_len)[None, :] > 0
    return (rows & cols).astype(dtype)


def token_type_mat(token_type_ids: jnp.ndarray) -> jnp.ndarray:
    """[B, L, L] bool: same segment, or either token is <cls> (type 2)."""
    same = token_type_ids[:, :, None] == token_type_ids[:, None, :]
    is_cls = token_type_ids == CLS_TOKEN_TYPE_ID
    return same | is_cls[:, :, None] | is_cls[:, None, :]


def check_seq_len(config: FunnelConfig, seq_len: int) -> None:
    minimum = config.min_seq_len()
    if seq_len < minimum:
        raise ValueError(
            f"sequence length {seq_len} is too short for {config.num_blocks} blocks "
            f"(separate_cls={config.separate_cls}, truncate_seq={config.truncate_seq}): "
            f"every block after the first halves the sequence, so the minimum length is "
            f"{minimum}"
        )
