"""Small pytree helpers shared by the optimizer and the sharding rules."""

from __future__ import annotations

import jax


def path_names(path) -> tuple[str, ...]:
    """A jax key path (from tree_flatten_with_path) as a tuple of plain names."""
    names = []
    for k in path:
        if isinstance(k, jax.tree_util.DictKey):
            names.append(str(k.key))
        elif isinstance(k, jax.tree_util.GetAttrKey):
            names.append(k.name)
        elif isinstance(k, jax.tree_util.SequenceKey):
            names.append(str(k.idx))
        else:
            names.append(str(k))
    return tuple(names)
