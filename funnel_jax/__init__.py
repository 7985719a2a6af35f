"""funnel-jax: the Funnel Transformer in JAX/Flax, equal to the transformers reference."""

from funnel_jax import training
from funnel_jax.config import FunnelConfig
from funnel_jax.dropout import dropout_key
from funnel_jax.models import (
    MODEL_CLASSES,
    FunnelBaseModel,
    FunnelForMaskedLM,
    FunnelForMultipleChoice,
    FunnelForPreTraining,
    FunnelForQuestionAnswering,
    FunnelForSequenceClassification,
    FunnelForTokenClassification,
    FunnelModel,
    abstract_params,
    init_params,
)
from funnel_jax.training import finetune, pretrain
from funnel_jax.weights import from_pretrained, save_pretrained

__all__ = [
    "MODEL_CLASSES",
    "FunnelBaseModel",
    "FunnelConfig",
    "FunnelForMaskedLM",
    "FunnelForMultipleChoice",
    "FunnelForPreTraining",
    "FunnelForQuestionAnswering",
    "FunnelForSequenceClassification",
    "FunnelForTokenClassification",
    "FunnelModel",
    "abstract_params",
    "dropout_key",
    "finetune",
    "from_pretrained",
    "init_params",
    "pretrain",
    "save_pretrained",
    "training",
]

try:  # the tokenizer lands in its own module
    from funnel_jax.tokenizer import FunnelTokenizer  # noqa: F401

    __all__.append("FunnelTokenizer")
except ImportError:  # pragma: no cover
    pass
