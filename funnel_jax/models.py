"""The Funnel model classes, with the reference's names, inputs and outputs.

Each is built as `Cls(config=config, dtype=..., param_dtype=...)` and used through
`init` / `apply`:

    out = module.apply({"params": params}, input_ids, attention_mask=..., token_type_ids=...,
                       deterministic=True, output_attentions=False, output_hidden_states=False)

Dropout (deterministic=False) draws from the rng stream named "dropout". Inputs are [B, L]
ints (multiple choice: [B, C, L]); `inputs_embeds` [B, L, D] replaces `input_ids`.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from funnel_jax import losses
from funnel_jax.config import FunnelConfig
from funnel_jax.dropout import Dropout
from funnel_jax.layers import (
    ACTIVATIONS,
    FunnelDecoder,
    FunnelEmbeddings,
    FunnelEncoder,
    dense,
    zeros_init,
)
from funnel_jax.outputs import (
    FunnelForPreTrainingOutput,
    FunnelLogitsOutput,
    FunnelOutput,
    QuestionAnsweringModelOutput,
)

Dtype = Any


def _prepare_inputs(config, input_ids, attention_mask, token_type_ids, inputs_embeds):
    """Check the inputs and fill the defaults the reference fills (mask of ones, type ids 0)."""
    if (input_ids is None) == (inputs_embeds is None):
        raise ValueError("pass exactly one of input_ids or inputs_embeds")
    if input_ids is not None:
        input_ids = jnp.asarray(input_ids)
        if input_ids.ndim != 2:
            raise ValueError(f"input_ids must be [batch, length], got shape {input_ids.shape}")
        if not jnp.issubdtype(input_ids.dtype, jnp.integer):
            raise TypeError(f"input_ids must be integers, got dtype {input_ids.dtype}")
        shape = input_ids.shape
    else:
        inputs_embeds = jnp.asarray(inputs_embeds)
        if inputs_embeds.ndim != 3 or inputs_embeds.shape[-1] != config.d_model:
            raise ValueError(
                f"inputs_embeds must be [batch, length, d_model={config.d_model}], "
                f"got shape {inputs_embeds.shape}"
            )
        shape = inputs_embeds.shape[:2]
    if attention_mask is None:
        attention_mask = jnp.ones(shape, jnp.float32)
    if token_type_ids is None:
        token_type_ids = jnp.zeros(shape, jnp.int32)
    for name, value in (("attention_mask", attention_mask), ("token_type_ids", token_type_ids)):
        if tuple(jnp.shape(value)) != tuple(shape):
            raise ValueError(
                f"{name} has shape {tuple(jnp.shape(value))} but the input has shape {tuple(shape)}"
            )
    return input_ids, jnp.asarray(attention_mask), jnp.asarray(token_type_ids), inputs_embeds


class _Module(nn.Module):
    config: FunnelConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @property
    def _kw(self):
        return dict(dtype=self.dtype, param_dtype=self.param_dtype)


class FunnelBaseModel(_Module):
    """Embeddings + encoder (no decoder). last_hidden_state is [B, L_last, D], pooled."""

    def setup(self):
        self.embeddings = FunnelEmbeddings(self.config, **self._kw)
        self.encoder = FunnelEncoder(self.config, **self._kw)

    def __call__(
        self,
        input_ids=None,
        attention_mask=None,
        token_type_ids=None,
        inputs_embeds=None,
        deterministic: bool = True,
        output_attentions: bool = False,
        output_hidden_states: bool = False,
    ) -> FunnelOutput:
        input_ids, attention_mask, token_type_ids, inputs_embeds = _prepare_inputs(
            self.config, input_ids, attention_mask, token_type_ids, inputs_embeds
        )
        x = self.embeddings(input_ids, inputs_embeds, deterministic)
        hidden, all_hidden, all_attn = self.encoder(
            x, attention_mask, token_type_ids, deterministic, output_attentions
        )
        return FunnelOutput(
            last_hidden_state=hidden,
            hidden_states=all_hidden if output_hidden_states else None,
            attentions=all_attn if output_attentions else None,
        )


class FunnelModel(_Module):
    """Embeddings + encoder + decoder. last_hidden_state is [B, L, D], full length."""

    def setup(self):
        self.embeddings = FunnelEmbeddings(self.config, **self._kw)
        self.encoder = FunnelEncoder(self.config, **self._kw)
        self.decoder = FunnelDecoder(self.config, **self._kw)

    def __call__(
        self,
        input_ids=None,
        attention_mask=None,
        token_type_ids=None,
        inputs_embeds=None,
        deterministic: bool = True,
        output_attentions: bool = False,
        output_hidden_states: bool = False,
    ) -> FunnelOutput:
        input_ids, attention_mask, token_type_ids, inputs_embeds = _prepare_inputs(
            self.config, input_ids, attention_mask, token_type_ids, inputs_embeds
        )
        x = self.embeddings(input_ids, inputs_embeds, deterministic)
        enc_hidden, enc_all_hidden, enc_attn = self.encoder(
            x, attention_mask, token_type_ids, deterministic, output_attentions
        )
        # As the reference: the residual is hidden state number block_sizes[0] (which, with
        # block_repeats[0] > 1, lies inside the first block).
        first_block_hidden = enc_all_hidden[self.config.block_sizes[0]]
        hidden, dec_all_hidden, dec_attn = self.decoder(
            enc_hidden,
            first_block_hidden,
            attention_mask,
            token_type_ids,
            deterministic,
            output_attentions,
        )
        return FunnelOutput(
            last_hidden_state=hidden,
            hidden_states=enc_all_hidden + dec_all_hidden if output_hidden_states else None,
            attentions=enc_attn + dec_attn if output_attentions else None,
        )


_FORWARD_DOC = "Same arguments as FunnelModel.__call__, plus the labels of the head's loss."


class FunnelDiscriminatorPredictions(_Module):
    @nn.compact
    def __call__(self, hidden):
        """[B, L, D] -> [B, L] logits."""
        cfg = self.config
        h = dense(cfg, cfg.d_model, cfg.d_model, "dense", axes=("embed", "mlp"), **self._kw)(hidden)
        h = ACTIVATIONS[cfg.hidden_act](h)
        logits = dense(cfg, 1, cfg.d_model, "dense_prediction", axes=("mlp", "labels"), **self._kw)(
            h
        )
        return logits[..., 0]


class FunnelForPreTraining(_Module):
    """ELECTRA discriminator: FunnelModel + two dense layers -> [B, L] replaced-token logits."""

    def setup(self):
        self.funnel = FunnelModel(self.config, **self._kw)
        self.discriminator_predictions = FunnelDiscriminatorPredictions(self.config, **self._kw)

    def __call__(
        self,
        input_ids=None,
        attention_mask=None,
        token_type_ids=None,
        inputs_embeds=None,
        labels=None,
        deterministic=True,
        output_attentions=False,
        output_hidden_states=False,
    ) -> FunnelForPreTrainingOutput:
        out = self.funnel(
            input_ids,
            attention_mask,
            token_type_ids,
            inputs_embeds,
            deterministic,
            output_attentions,
            output_hidden_states,
        )
        logits = self.discriminator_predictions(out.last_hidden_state)
        loss = None
        if labels is not None:
            loss = losses.discriminator_loss(logits, labels, attention_mask)
        return FunnelForPreTrainingOutput(logits, loss, out.hidden_states, out.attentions)


class TiedLMHead(_Module):
    """Output projection tied to the word embedding, plus its own bias [V]."""

    @nn.compact
    def __call__(self, hidden, embeddings):
        bias = self.param(
            "bias", zeros_init(("vocab",)), (self.config.vocab_size,), self.param_dtype
        )
        return embeddings.attend(hidden) + bias.astype(self.dtype)


class FunnelForMaskedLM(_Module):
    """FunnelModel + tied LM head -> [B, L, V]."""

    def setup(self):
        self.funnel = FunnelModel(self.config, **self._kw)
        self.lm_head = TiedLMHead(self.config, **self._kw)

    def __call__(
        self,
        input_ids=None,
        attention_mask=None,
        token_type_ids=None,
        inputs_embeds=None,
        labels=None,
        deterministic=True,
        output_attentions=False,
        output_hidden_states=False,
    ) -> FunnelLogitsOutput:
        out = self.funnel(
            input_ids,
            attention_mask,
            token_type_ids,
            inputs_embeds,
            deterministic,
            output_attentions,
            output_hidden_states,
        )
        logits = self.lm_head(out.last_hidden_state, self.funnel.embeddings.word_embeddings)
        loss = None if labels is None else losses.masked_lm_loss(logits, labels)
        return FunnelLogitsOutput(logits, loss, out.hidden_states, out.attentions)


class FunnelClassificationHead(_Module):
    num_outputs: int = 2

    @nn.compact
    def __call__(self, hidden, deterministic=True):
        """[B, D] -> [B, num_outputs]: linear_hidden -> tanh -> dropout -> linear_out."""
        cfg = self.config
        h = dense(
            cfg, cfg.d_model, cfg.d_model, "linear_hidden", axes=("embed", "mlp"), **self._kw
        )(hidden)
        h = Dropout(cfg.hidden_dropout, rng=cfg.dropout_rng)(
            jnp.tanh(h), deterministic=deterministic
        )
        return dense(
            cfg, self.num_outputs, cfg.d_model, "linear_out", axes=("mlp", "labels"), **self._kw
        )(h)


class FunnelForSequenceClassification(_Module):
    """FunnelBaseModel + classification head on the <cls> state -> [B, num_labels]."""

    def setup(self):
        self.funnel = FunnelBaseModel(self.config, **self._kw)
        self.classifier = FunnelClassificationHead(
            self.config, num_outputs=self.config.num_labels, **self._kw
        )

    def __call__(
        self,
        input_ids=None,
        attention_mask=None,
        token_type_ids=None,
        inputs_embeds=None,
        labels=None,
        deterministic=True,
        output_attentions=False,
        output_hidden_states=False,
    ) -> FunnelLogitsOutput:
        out = self.funnel(
            input_ids,
            attention_mask,
            token_type_ids,
            inputs_embeds,
            deterministic,
            output_attentions,
            output_hidden_states,
        )
        logits = self.classifier(out.last_hidden_state[:, 0], deterministic)
        loss = None
        if labels is not None:
            loss = losses.sequence_classification_loss(
                logits, labels, self.config.num_labels, self.config.problem_type
            )
        return FunnelLogitsOutput(logits, loss, out.hidden_states, out.attentions)


class FunnelForMultipleChoice(_Module):
    """Inputs [B, C, L] -> logits [B, C]."""

    def setup(self):
        self.funnel = FunnelBaseModel(self.config, **self._kw)
        self.classifier = FunnelClassificationHead(self.config, num_outputs=1, **self._kw)

    def __call__(
        self,
        input_ids=None,
        attention_mask=None,
        token_type_ids=None,
        inputs_embeds=None,
        labels=None,
        deterministic=True,
        output_attentions=False,
        output_hidden_states=False,
    ) -> FunnelLogitsOutput:
        ref = input_ids if input_ids is not None else inputs_embeds
        if ref is None or jnp.ndim(ref) < 3:
            raise ValueError(
                "FunnelForMultipleChoice takes input_ids of shape [batch, choices, length] "
                f"(inputs_embeds [batch, choices, length, d_model]); got shape {jnp.shape(ref)}"
            )
        num_choices = jnp.shape(ref)[1]

        def flat(x, nd):
            return None if x is None else jnp.reshape(x, (-1, *jnp.shape(x)[2 : 2 + nd]))

        out = self.funnel(
            flat(input_ids, 1),
            flat(attention_mask, 1),
            flat(token_type_ids, 1),
            flat(inputs_embeds, 2),
            deterministic,
            output_attentions,
            output_hidden_states,
        )
        logits = self.classifier(out.last_hidden_state[:, 0], deterministic)
        logits = logits.reshape(-1, num_choices)
        loss = None if labels is None else losses.multiple_choice_loss(logits, labels)
        return FunnelLogitsOutput(logits, loss, out.hidden_states, out.attentions)


class FunnelForTokenClassification(_Module):
    """FunnelModel + dropout + linear -> [B, L, num_labels]."""

    def setup(self):
        cfg = self.config
        self.funnel = FunnelModel(cfg, **self._kw)
        self.dropout = Dropout(cfg.hidden_dropout, rng=cfg.dropout_rng)
        self.classifier = dense(
            cfg, cfg.num_labels, cfg.d_model, "classifier", axes=("embed", "labels"), **self._kw
        )

    def __call__(
        self,
        input_ids=None,
        attention_mask=None,
        token_type_ids=None,
        inputs_embeds=None,
        labels=None,
        deterministic=True,
        output_attentions=False,
        output_hidden_states=False,
    ) -> FunnelLogitsOutput:
        out = self.funnel(
            input_ids,
            attention_mask,
            token_type_ids,
            inputs_embeds,
            deterministic,
            output_attentions,
            output_hidden_states,
        )
        hidden = self.dropout(out.last_hidden_state, deterministic=deterministic)
        logits = self.classifier(hidden)
        loss = None if labels is None else losses.token_classification_loss(logits, labels)
        return FunnelLogitsOutput(logits, loss, out.hidden_states, out.attentions)


class FunnelForQuestionAnswering(_Module):
    """FunnelModel + linear (num_labels = 2) -> start_logits, end_logits [B, L]."""

    def setup(self):
        cfg = self.config
        self.funnel = FunnelModel(cfg, **self._kw)
        self.qa_outputs = dense(
            cfg, cfg.num_labels, cfg.d_model, "qa_outputs", axes=("embed", "labels"), **self._kw
        )

    def __call__(
        self,
        input_ids=None,
        attention_mask=None,
        token_type_ids=None,
        inputs_embeds=None,
        start_positions=None,
        end_positions=None,
        deterministic=True,
        output_attentions=False,
        output_hidden_states=False,
    ) -> QuestionAnsweringModelOutput:
        out = self.funnel(
            input_ids,
            attention_mask,
            token_type_ids,
            inputs_embeds,
            deterministic,
            output_attentions,
            output_hidden_states,
        )
        logits = self.qa_outputs(out.last_hidden_state)
        start_logits, end_logits = logits[..., 0], logits[..., 1]
        loss = None
        if start_positions is not None and end_positions is not None:
            loss = losses.question_answering_loss(
                start_logits, end_logits, start_positions, end_positions
            )
        return QuestionAnsweringModelOutput(
            start_logits, end_logits, loss, out.hidden_states, out.attentions
        )


MODEL_CLASSES = {
    cls.__name__: cls
    for cls in (
        FunnelBaseModel,
        FunnelModel,
        FunnelForPreTraining,
        FunnelForMaskedLM,
        FunnelForSequenceClassification,
        FunnelForMultipleChoice,
        FunnelForTokenClassification,
        FunnelForQuestionAnswering,
    )
}


def get_model_class(name: str):
    try:
        return MODEL_CLASSES[name]
    except KeyError:
        raise ValueError(
            f"unknown model class {name!r}; expected one of {sorted(MODEL_CLASSES)}"
        ) from None


def dummy_inputs(module: nn.Module, batch: int = 1, seq_len: int | None = None):
    """Small int inputs of a valid shape for `init` / `jax.eval_shape`."""
    cfg = module.config
    seq_len = seq_len or max(cfg.min_seq_len(), 8)
    shape = (batch, 2, seq_len) if isinstance(module, FunnelForMultipleChoice) else (batch, seq_len)
    return jnp.zeros(shape, jnp.int32)


def init_params(module: nn.Module, rng: jax.Array, seq_len: int | None = None, unbox=True):
    """Fresh parameters with the reference's initial distributions (plain arrays by default)."""
    ids = dummy_inputs(module, seq_len=seq_len)
    params = jax.jit(lambda r: module.init({"params": r}, ids)["params"])(rng)
    return nn.meta.unbox(params) if unbox else params


def abstract_params(module: nn.Module, unbox=True):
    """Shapes and dtypes of the parameters (jax.ShapeDtypeStruct tree), nothing allocated."""
    boxed = jax.eval_shape(
        lambda: module.init({"params": jax.random.PRNGKey(0)}, dummy_inputs(module))["params"]
    )
    return nn.meta.unbox(boxed) if unbox else boxed
