"""Test helpers: the `transformers` PyTorch reference built from the same config and weights."""

from __future__ import annotations

import numpy as np
import torch
import transformers

from funnel_jax import FunnelConfig, models
from funnel_jax.weights import params_to_state_dict, state_dict_to_params

TINY = dict(
    vocab_size=64,
    block_sizes=[2, 1, 2],
    d_model=16,
    n_head=2,
    d_head=8,
    d_inner=24,
    hidden_dropout=0.0,
    attention_dropout=0.0,
    activation_dropout=0.0,
)


def torch_config(**overrides) -> transformers.FunnelConfig:
    kw = dict(TINY)
    kw.update(overrides)
    return transformers.FunnelConfig(**kw)


def torch_model(class_name: str, tconfig: transformers.FunnelConfig, seed: int = 0):
    torch.manual_seed(seed)
    return getattr(transformers, class_name)(tconfig).eval()


def jax_twin(tmodel, class_name: str, dtype=np.float32):
    """The Flax module and params holding exactly the torch model's weights."""
    config = FunnelConfig.from_dict(tmodel.config.to_dict())
    module = models.get_model_class(class_name)(config=config, dtype=dtype, param_dtype=np.float32)
    state = {k: v.detach().numpy() for k, v in tmodel.state_dict().items()}
    return module, state_dict_to_params(state, module)


def sample_inputs(vocab_size: int, batch: int = 3, seq_len: int = 13, seed: int = 0):
    """A padded batch: row 0 one segment, row 1 a pair of segments, row 2 a padded pair."""
    rng = np.random.RandomState(seed)
    ids = rng.randint(0, vocab_size, (batch, seq_len)).astype(np.int64)
    token_type = np.zeros((batch, seq_len), np.int64)
    token_type[:, 0] = 2  # <cls>
    mask = np.ones((batch, seq_len), np.int64)
    if batch > 1:
        token_type[1:, seq_len // 2 :] = 1
    if batch > 2:
        mask[2, seq_len - 4 :] = 0
        ids[2, seq_len - 4 :] = 0
    return dict(input_ids=ids, attention_mask=mask, token_type_ids=token_type)


def to_torch(inputs: dict) -> dict:
    return {k: torch.as_tensor(v) for k, v in inputs.items()}


def max_abs(a, b) -> float:
    a = np.asarray(a, dtype=np.float64)
    b = b.detach().numpy().astype(np.float64) if isinstance(b, torch.Tensor) else np.asarray(b)
    assert a.shape == b.shape, f"shape {a.shape} != reference {b.shape}"
    return float(np.max(np.abs(a - b))) if a.size else 0.0


def torch_grads(tmodel) -> dict[str, np.ndarray]:
    return {
        name: p.grad.detach().numpy() for name, p in tmodel.named_parameters() if p.grad is not None
    }


def jax_grads_as_torch(grads, module) -> dict[str, np.ndarray]:
    return params_to_state_dict(grads, module)
