"""Losses of every head, with the reference's semantics (means over the counted elements)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

IGNORE_INDEX = -100


def cross_entropy(logits: jax.Array, labels: jax.Array, ignore_index: int = IGNORE_INDEX):
    """Mean softmax cross-entropy over labels != ignore_index. logits [..., C], labels [...].

    Unlike torch (NaN), a batch with every label ignored gives 0.
    """
    logits = logits.astype(jnp.float32)
    valid = labels != ignore_index
    safe = jnp.where(valid, labels, 0)
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, safe)
    count = jnp.sum(valid)
    return jnp.sum(jnp.where(valid, losses, 0.0)) / jnp.maximum(count, 1)


def masked_lm_loss(logits, labels):
    """logits [B, L, V], labels [B, L] with -100 on positions that are not predicted."""
    return cross_entropy(logits, labels)


def token_classification_loss(logits, labels):
    """logits [B, L, C], labels [B, L] with -100 ignored."""
    return cross_entropy(logits, labels)


def multiple_choice_loss(logits, labels):
    """logits [B, C], labels [B]."""
    return cross_entropy(logits, labels)


def infer_problem_type(num_labels: int, labels) -> str:
    if num_labels == 1:
        return "regression"
    if jnp.issubdtype(jnp.asarray(labels).dtype, jnp.integer):
        return "single_label_classification"
    return "multi_label_classification"


def sequence_classification_loss(logits, labels, num_labels: int, problem_type: str | None = None):
    """logits [B, num_labels]; labels [B] (ints, or floats for regression) or [B, num_labels]
    (multi-label 0/1 floats). problem_type None is inferred as `transformers` does."""
    problem_type = problem_type or infer_problem_type(num_labels, labels)
    logits = logits.astype(jnp.float32)
    if problem_type == "regression":
        labels = labels.astype(jnp.float32)
        if num_labels == 1:
            return jnp.mean((jnp.squeeze(logits) - jnp.squeeze(labels)) ** 2)
        return jnp.mean((logits - labels) ** 2)
    if problem_type == "single_label_classification":
        return cross_entropy(logits.reshape(-1, num_labels), labels.reshape(-1))
    if problem_type == "multi_label_classification":
        return jnp.mean(optax.sigmoid_binary_cross_entropy(logits, labels.astype(jnp.float32)))
    raise ValueError(f"unknown problem_type {problem_type!r}")


def question_answering_loss(start_logits, end_logits, start_positions, end_positions):
    """start/end logits [B, L], positions [B] (or [B, 1]). Positions outside [0, L) are clamped
    to L and ignored, as in the reference."""
    seq_len = start_logits.shape[1]
    start = jnp.clip(start_positions.reshape(-1), 0, seq_len)
    end = jnp.clip(end_positions.reshape(-1), 0, seq_len)
    start_loss = cross_entropy(start_logits, start, ignore_index=seq_len)
    end_loss = cross_entropy(end_logits, end, ignore_index=seq_len)
    return (start_loss + end_loss) / 2


def discriminator_loss(logits, labels, attention_mask=None):
    """ELECTRA replaced-token detection: BCE with logits, averaged over attention_mask == 1.

    logits [B, L], labels [B, L] (1 = replaced), attention_mask [B, L] or None (all tokens)."""
    losses = optax.sigmoid_binary_cross_entropy(
        logits.astype(jnp.float32), labels.astype(jnp.float32)
    )
    if attention_mask is None:
        return jnp.mean(losses)
    active = attention_mask == 1
    return jnp.sum(jnp.where(active, losses, 0.0)) / jnp.maximum(jnp.sum(active), 1)
