"""Per-layer parameters stored stacked (`FunnelConfig.scan_layers`) <-> one entry per layer.

With scan_layers, a block's same-shape layers run as one `nn.scan` over parameters stored
with a leading layer axis, so the compiled program holds one layer body per block and the
optimizer sees one leaf per parameter kind and block instead of one per layer:

    encoder  blocks_{b}_{i}, i >= first_scanned_layer(b)  ->  blocks_{b}_stack  [n, ...]
    decoder  layers_{i}                                   ->  layers_stack      [n, ...]

Block 0 stacks all its layers; a later block's first layer pools (its query is shorter than
its keys, or its positions differ), so it keeps its own entry `blocks_{b}_0` and only layers
1.. are stacked. Entry j of a stack is layer first_scanned_layer(b) + j.

The `transformers` layout, and Orbax checkpoints of unrolled models, use the per-layer names;
`weights.py` converts at load and save time. Both directions copy values exactly (a stack and
an index), for numpy and jax arrays alike.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np

ENCODER, DECODER = "encoder", "decoder"
DECODER_STACK = "layers_stack"
_BLOCK_LAYER = re.compile(r"^blocks_(\d+)_(\d+)$")
_BLOCK_STACK = re.compile(r"^blocks_(\d+)_stack$")
_DECODER_LAYER = re.compile(r"^layers_(\d+)$")


def first_scanned_layer(block_index: int) -> int:
    """Index of the first layer of block `block_index` that the scan covers."""
    return 0 if block_index == 0 else 1


def encoder_stack_name(block_index: int) -> str:
    return f"blocks_{block_index}_stack"


def _stack(trees: list, where: str):
    def stack(*leaves):
        shapes = {tuple(np.shape(x)) for x in leaves}
        if len(shapes) != 1:
            raise ValueError(f"{where}: layers to stack have different shapes {sorted(shapes)}")
        if all(isinstance(x, np.ndarray) for x in leaves):
            return np.stack(leaves)
        return jnp.stack(leaves)

    return _tree_map(stack, *trees, where=where)


def _tree_map(fn, *trees, where: str):
    first = trees[0]
    if isinstance(first, Mapping):
        keys = set(first)
        for t in trees[1:]:
            if not isinstance(t, Mapping) or set(t) != keys:
                raise ValueError(f"{where}: layers to stack have different parameter names")
        return {k: _tree_map(fn, *(t[k] for t in trees), where=f"{where}/{k}") for k in first}
    return fn(*trees)


def _unstack(tree, index: int):
    if isinstance(tree, Mapping):
        return {k: _unstack(v, index) for k, v in tree.items()}
    return tree[index]


def _stack_count(tree) -> int:
    while isinstance(tree, Mapping):
        tree = next(iter(tree.values()))
    return int(np.shape(tree)[0])


def _stack_encoder(encoder: Mapping, where: str) -> dict:
    out, groups = {}, {}
    for name, value in encoder.items():
        m = _BLOCK_LAYER.match(name)
        if m and int(m.group(2)) >= first_scanned_layer(int(m.group(1))):
            groups.setdefault(int(m.group(1)), {})[int(m.group(2))] = value
        else:
            out[name] = value
    for b, layers in sorted(groups.items()):
        start = first_scanned_layer(b)
        order = sorted(layers)
        if order != list(range(start, start + len(order))):
            raise ValueError(f"{where}: block {b} has layers {order}; expected {start}.. in a row")
        out[encoder_stack_name(b)] = _stack([layers[i] for i in order], f"{where}/block {b}")
    return out


def _stack_decoder(decoder: Mapping, where: str) -> dict:
    out, layers = {}, {}
    for name, value in decoder.items():
        m = _DECODER_LAYER.match(name)
        if m:
            layers[int(m.group(1))] = value
        else:
            out[name] = value
    if layers:
        order = sorted(layers)
        if order != list(range(len(order))):
            raise ValueError(f"{where}: decoder layers {order}; expected 0.. in a row")
        out[DECODER_STACK] = _stack([layers[i] for i in order], f"{where}/decoder")
    return out


def _unstack_encoder(encoder: Mapping) -> dict:
    out = {}
    for name, value in encoder.items():
        m = _BLOCK_STACK.match(name)
        if not m:
            out[name] = value
            continue
        b = int(m.group(1))
        for j in range(_stack_count(value)):
            out[f"blocks_{b}_{first_scanned_layer(b) + j}"] = _unstack(value, j)
    return out


def _unstack_decoder(decoder: Mapping) -> dict:
    out = {}
    for name, value in decoder.items():
        if name != DECODER_STACK:
            out[name] = value
            continue
        for j in range(_stack_count(value)):
            out[f"layers_{j}"] = _unstack(value, j)
    return out


def stack_layers(params: Mapping) -> dict:
    """Per-layer params (any model or objective tree: every `encoder` and `decoder` in it)
    -> the scan_layers layout."""
    return _map_parts(params, _stack_encoder, _stack_decoder, "")


def unstack_layers(params: Mapping) -> dict:
    """The scan_layers layout -> one entry per layer (inverse of `stack_layers`)."""
    return _map_parts(
        params, lambda t, _: _unstack_encoder(t), lambda t, _: _unstack_decoder(t), ""
    )


def is_stacked(params: Any) -> bool:
    """Whether a params tree holds a layer stack anywhere."""
    if not isinstance(params, Mapping):
        return False
    return any(
        (isinstance(k, str) and (_BLOCK_STACK.match(k) or k == DECODER_STACK)) or is_stacked(v)
        for k, v in params.items()
    )


def _map_parts(tree, encoder_fn, decoder_fn, where: str):
    if not isinstance(tree, Mapping):
        return tree
    out = {}
    for key, value in tree.items():
        path = f"{where}/{key}" if where else str(key)
        if key == ENCODER and isinstance(value, Mapping):
            out[key] = encoder_fn(value, path)
        elif key == DECODER and isinstance(value, Mapping):
            out[key] = decoder_fn(value, path)
        else:
            out[key] = _map_parts(value, encoder_fn, decoder_fn, path)
    return out
