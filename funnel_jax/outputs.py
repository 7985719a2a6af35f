"""Output pytrees with the reference's field names (usable inside and outside jit)."""

from __future__ import annotations

from typing import Any

import flax.struct
import jax

Array = jax.Array
Tuple = tuple[Array, ...] | None


@flax.struct.dataclass
class FunnelOutput:
    """Base output. `last_hidden_state` [B, L, D] (FunnelModel) or [B, L_last, D] (base model)."""

    last_hidden_state: Array
    hidden_states: Tuple = None
    attentions: Tuple = None

    def __getitem__(self, key: str) -> Any:
        return getattr(self, key)


@flax.struct.dataclass
class FunnelForPreTrainingOutput:
    """`logits` [B, L]: replaced-token detection scores."""

    logits: Array
    loss: Array | None = None
    hidden_states: Tuple = None
    attentions: Tuple = None

    def __getitem__(self, key: str) -> Any:
        return getattr(self, key)


@flax.struct.dataclass
class FunnelLogitsOutput:
    """Masked LM [B, L, V], sequence classification [B, num_labels], multiple choice [B, C],
    token classification [B, L, num_labels]."""

    logits: Array
    loss: Array | None = None
    hidden_states: Tuple = None
    attentions: Tuple = None

    def __getitem__(self, key: str) -> Any:
        return getattr(self, key)


MaskedLMOutput = SequenceClassifierOutput = MultipleChoiceModelOutput = FunnelLogitsOutput
TokenClassifierOutput = FunnelLogitsOutput


@flax.struct.dataclass
class QuestionAnsweringModelOutput:
    """`start_logits`, `end_logits` [B, L]."""

    start_logits: Array
    end_logits: Array
    loss: Array | None = None
    hidden_states: Tuple = None
    attentions: Tuple = None

    def __getitem__(self, key: str) -> Any:
        return getattr(self, key)
