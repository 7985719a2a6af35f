"""Dropout and the random bits of its keep masks.

Two ways to draw the bits, chosen by `FunnelConfig.dropout_rng` ("auto": "hash" on TPU,
"threefry" elsewhere, from `jax.default_backend()` when the step is traced):

- "threefry": `jax.random.bernoulli` on the layer's key (JAX's default): about a hundred
  integer ops per element (20 threefry rounds), which XLA must emit for every dropout site, in
  the forward and again in a rematerialized backward. On TPU these ops are most of the
  compiled train step.
- "hash": `hash_bits`, a counter-based hash of the element's index under the same per-layer
  key: two rounds of a 32-bit integer mixer per element (about 16 ops), plus one round per
  leading axis computed on the smaller broadcast shape. Like threefry it is a pure function
  of (key, global element index), so a mask is the same on any mesh and any process count
  (the partitioner slices the iotas). Its statistics are tested in tests/test_dropout.py; it
  is not a cryptographic generator, nor meant for anything but dropout masks.

The per-layer key comes from flax's `make_rng("dropout")`: a `fold_in` of the stream's key
per site. With a plain (threefry) stream key that is one scalar threefry per site; with the
key `dropout_key` returns (a key of `HASH_PRNG`, below) it is a hash as well, and so is
`nn.scan`'s `split` of the stream over stacked layers.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.extend
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from funnel_jax.config import DROPOUT_RNGS

Array = jax.Array


def resolve_dropout_rng(dropout_rng: str, platform: str | None = None) -> str:
    """ "threefry" or "hash" for a `FunnelConfig.dropout_rng`. "auto" picks "hash" on TPU, where
    it cuts the `large` step's compile by about 30%, and "threefry" on GPU, where the threefry
    custom kernel compiles faster than the hash fused into its consumers (BENCHMARKS.md,
    session 9) and on CPU. `platform` defaults to `jax.default_backend()`; a deviceless
    compile for another target passes the target's.
    """
    if dropout_rng not in DROPOUT_RNGS:
        raise ValueError(f"dropout_rng must be one of {DROPOUT_RNGS}, got {dropout_rng!r}")
    if dropout_rng != "auto":
        return dropout_rng
    return "hash" if (platform or jax.default_backend()) == "tpu" else "threefry"


# lowbias32 (C. Wellons, "Prospecting for hash functions"): an invertible uint32 -> uint32
# mixer with low avalanche bias.
_M1 = 0x7FEB352D
_M2 = 0x846CA68B
# Odd constants that keep a zero key, a zero row state or a zero column from mapping to the
# mixer's fixed point 0 (and the row key from equalling the row's first column).
_ROW_SEED = 0x9E3779B9
_ROW_KEY = 0x85EBCA6B


def _mix32(x: Array) -> Array:
    x = x ^ (x >> 16)
    x = x * jnp.uint32(_M1)
    x = x ^ (x >> 15)
    x = x * jnp.uint32(_M2)
    return x ^ (x >> 16)


def _key_words(key: Array) -> tuple[Array, Array]:
    """Two uint32 scalars from a typed or raw PRNG key."""
    if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        key = jax.random.key_data(key)
    words = jnp.ravel(key).astype(jnp.uint32)
    if words.shape[0] < 2:
        raise ValueError(
            f"hash_bits: a key of at least two uint32 words is needed, got {key.shape}"
        )
    return words[0], words[1]


def _hash_words(k0: Array, k1: Array, shape: tuple[int, ...]) -> Array:
    """uint32 bits of `shape` from the key words (k0, k1); see `hash_bits`."""
    if not shape:
        return _mix32(_mix32(k0 ^ jnp.uint32(_ROW_SEED)) + k1)
    ndim = len(shape)
    row = k0 ^ jnp.uint32(_ROW_SEED)
    for axis in range(ndim - 1):
        sub = tuple(d if a <= axis else 1 for a, d in enumerate(shape))
        row = _mix32(row + jax.lax.broadcasted_iota(jnp.uint32, sub, axis))
    row = jnp.broadcast_to(row, shape[:-1] + (1,))
    row_key = _mix32(row ^ k1 ^ jnp.uint32(_ROW_KEY))
    col = jax.lax.broadcasted_iota(jnp.uint32, shape, ndim - 1)
    return _mix32(_mix32(col + row) + row_key)


def hash_bits(key: Array, shape: tuple[int, ...]) -> Array:
    """uint32 bits of `shape`, each a function of `key` and its element's multi-index only.

    Every leading axis is folded into a per-row state by one mixing round on the broadcast
    shape [d0, .., dk, 1, .., 1]; the last axis then takes two rounds on the full shape, the
    second keyed by a mix of the row state (so rows whose states are close do not give
    shifted copies of each other). No 2**32 limit on the number of elements: the index is
    never linearised.
    """
    k0, k1 = _key_words(key)
    return _hash_words(k0, k1, tuple(int(d) for d in shape))


def hash_keep_mask(key: Array, keep_prob: float, shape: tuple[int, ...]) -> Array:
    """Bernoulli(keep_prob) booleans of `shape` from `hash_bits` (32-bit resolution)."""
    threshold = min(int(round((1.0 - keep_prob) * 2.0**32)), 2**32 - 1)
    return hash_bits(key, shape) >= jnp.uint32(threshold)


# --- the same hash as a JAX PRNG implementation, for the dropout rng stream ---------------
#
# Flax derives each dropout site's key from the stream's key with `fold_in` (and nn.scan with
# `split`), one scalar threefry each under the default implementation: about half of the
# threefry ops left in a train step once the per-element draws are hashed. A stream key of
# this implementation makes those derivations hashes too.

_FOLD_SEED = 0xC2B2AE35
_SPLIT_SEED = 0x27D4EB2F


def _impl_seed(seed: Array) -> Array:
    seed = jnp.asarray(seed)
    lo = seed.astype(jnp.uint32)
    hi = (seed >> 32).astype(jnp.uint32) if seed.dtype.itemsize == 8 else jnp.uint32(0)
    return _hash_words(lo, hi, (2,))


def _impl_split(key: Array, shape: tuple[int, ...]) -> Array:
    return _hash_words(key[0] ^ jnp.uint32(_SPLIT_SEED), key[1], (*shape, 2))


def _impl_fold_in(key: Array, data: Array) -> Array:
    row = _mix32(key[0] ^ jnp.uint32(_FOLD_SEED) ^ _mix32(jnp.asarray(data).astype(jnp.uint32)))
    return _hash_words(row, key[1], (2,))


def _impl_random_bits(key: Array, bit_width: int, shape: tuple[int, ...]) -> Array:
    if bit_width == 64:
        words = _hash_words(key[0], key[1], (*shape, 2)).astype(jnp.uint64)
        return (words[..., 0] << 32) | words[..., 1]
    bits = _hash_words(key[0], key[1], tuple(shape))
    return bits if bit_width == 32 else bits.astype(jnp.dtype(f"uint{bit_width}"))


HASH_PRNG = jax.extend.random.define_prng_impl(
    key_shape=(2,),
    seed=_impl_seed,
    split=_impl_split,
    random_bits=_impl_random_bits,
    fold_in=_impl_fold_in,
    name="funnel_hash",
    tag="fh",
)


def dropout_key(key: Array, dropout_rng: str = "hash") -> Array:
    """The key to pass as `rngs={"dropout": ...}` for a model whose config has `dropout_rng`.

    "hash" ("auto" on TPU): the key's first two words as a key of `HASH_PRNG`, so that flax's
    per-site fold-ins and nn.scan's splits are hashes as well; "threefry": `key` unchanged. A model
    with `dropout_rng="hash"` also accepts a plain key (its masks are hashed either way, only
    the per-site derivations then stay threefry), and the masks differ between the two.
    """
    if resolve_dropout_rng(dropout_rng) == "threefry":
        return key
    k0, k1 = _key_words(key)
    return jax.random.wrap_key_data(jnp.stack([k0, k1]), impl=HASH_PRNG)


class Dropout(nn.Module):
    """Inverted dropout (as nn.Dropout) whose keep mask is named "dropout_mask", so that a
    remat policy can keep it (`dots_no_batch_probs_masks`) instead of drawing its random bits
    again in the backward pass.

    rng: "threefry" (jax.random.bernoulli), "hash" (`hash_keep_mask`) or "auto"; see the
    module doc.
    """

    rate: float
    rng: str = "threefry"

    @nn.compact
    def __call__(self, x: Array, deterministic: bool) -> Array:
        if deterministic or self.rate == 0.0:
            return x
        if self.rate == 1.0:
            return jnp.zeros_like(x)
        keep_prob = 1.0 - self.rate
        key = self.make_rng("dropout")
        if resolve_dropout_rng(self.rng) == "hash":
            keep = hash_keep_mask(key, keep_prob, x.shape)
        else:
            keep = jax.random.bernoulli(key, keep_prob, x.shape)
        keep = checkpoint_name(keep, "dropout_mask")
        return jax.lax.select(keep, x / keep_prob, jnp.zeros_like(x))
