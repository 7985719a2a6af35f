"""Speed by construction: the compiled forward and backward never transpose a weight.

Written as head-major einsums ('BSD,DNH->NBSH'), the attention projections made XLA's CPU
backend transpose every q/k/v/r/post_proj kernel on every call (at batch 1, length 128 those
copies took as long as the matmuls); `layers.matmul_last` keeps them plain matrix products.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp

import funnel_jax as fj

TINY = dict(vocab_size=64, block_sizes=[1, 1, 1], d_model=32, n_head=4, d_head=8, d_inner=48)


def _computations(hlo: str) -> dict[str, str]:
    """{computation name: body} of compiled HLO text."""
    out, name, body = {}, None, []
    for line in hlo.splitlines():
        header = re.match(r"^(?:ENTRY )?%?([\w.\-]+) \(.*\{$", line)
        if header:
            name, body = header.group(1), []
        elif line == "}" and name:
            out[name] = "\n".join(body)
            name = None
        elif name:
            body.append(line)
    return out


def transposed_weights(hlo: str) -> set[str]:
    """Kernel parameters the program transposes: a transpose or copy of one, or a fusion that
    takes one and transposes inside."""
    comps = _computations(hlo)
    transposing = {n for n, body in comps.items() if " transpose(" in body}
    found = set()
    for line in hlo.splitlines():
        op = re.search(r"= \S+ (transpose|copy|fusion)\((.*?)\)(?:, |$)", line)
        if not op:
            continue
        kernels = {k for k in re.findall(r"%([\w.\-]+)", op.group(2)) if "kernel" in k}
        if not kernels:
            continue
        calls = re.search(r"calls=%?([\w.\-]+)", line)
        if op.group(1) == "transpose" or (calls and calls.group(1) in transposing):
            found |= kernels
        elif op.group(1) == "copy" and "transpose" in line:  # a copy that changes the layout
            found |= kernels
    return found


def _kernel_params(hlo: str) -> set[str]:
    return set(re.findall(r"%([\w.\-]*kernel[\w.\-]*) = \S+ parameter\(", hlo))


def _forward_hlo(module, params, ids) -> str:
    fn = jax.jit(lambda p, x: module.apply({"params": p}, x).last_hidden_state)
    return fn.lower(params, ids).compile().as_text()


def test_forward_and_backward_transpose_no_weight():
    module = fj.FunnelBaseModel(config=fj.FunnelConfig(**TINY))
    params = fj.init_params(module, jax.random.PRNGKey(0))
    ids = jnp.ones((2, 32), jnp.int32)
    hlo = _forward_hlo(module, params, ids)
    assert len(_kernel_params(hlo)) >= 3 * 5  # the check sees the weights by name
    assert not transposed_weights(hlo)

    def loss(p):
        return jnp.sum(module.apply({"params": p}, ids).last_hidden_state ** 2)

    hlo = jax.jit(jax.grad(loss)).lower(params).compile().as_text()
    assert not transposed_weights(hlo)


def test_head_major_einsum_transposes_the_weight():
    """The check above can fail: the einsum this project used before does transpose it."""
    kernel = {"q_head_kernel": jnp.ones((32, 4, 8))}
    x = jnp.ones((2, 32, 32))
    fn = jax.jit(lambda p, x: jnp.einsum("BSD,DNH->NBSH", x, p["q_head_kernel"]))
    hlo = fn.lower(kernel, x).compile().as_text()
    assert _kernel_params(hlo)
    assert transposed_weights(hlo)
