"""models.norm.BatchNorm: nnx.BatchNorm's outputs, gradients and statistics, by another route."""

from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from pneumojax.models.norm import BatchNorm


def _pair(**kwargs) -> tuple[nnx.Module, nnx.Module]:
    """Ours and flax's, with the same non-trivial scale, bias and running statistics."""
    ours, flax = (cls(6, momentum=0.9, rngs=nnx.Rngs(0), **kwargs)
                  for cls in (BatchNorm, nnx.BatchNorm))
    rng = np.random.default_rng(0)
    scale, bias = rng.uniform(0.5, 2.0, 6), rng.normal(size=6)
    for bn in (ours, flax):
        bn.scale[...] = jnp.asarray(scale, jnp.float32)
        bn.bias[...] = jnp.asarray(bias, jnp.float32)
        bn.mean[...] = jnp.full(6, 0.1, jnp.float32)
        bn.var[...] = jnp.full(6, 2.0, jnp.float32)
    return ours, flax


def _batch() -> jax.Array:
    rng = np.random.default_rng(1)  # channels with offsets: the case where x * a and b cancel
    return jnp.asarray(rng.normal(size=(8, 5, 7, 6)) * 1.5 + np.arange(6) - 2, jnp.float32)


def test_training_matches_flax_outputs_gradients_and_running_statistics():
    x, g = _batch(), jnp.asarray(np.random.default_rng(2).normal(size=(8, 5, 7, 6)), jnp.float32)
    results = []
    for bn in _pair():
        graphdef, params, stats = nnx.split(bn, nnx.Param, nnx.BatchStat)

        def loss(params, x, stats=stats, graphdef=graphdef):
            module = nnx.merge(graphdef, params, stats, copy=True)
            y = module(x)
            return jnp.sum(y * g), (y, nnx.state(module, nnx.BatchStat))

        (_, (y, new_stats)), grads = jax.jit(
            jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(params, x)
        results.append((y, grads, new_stats))
    (y, grads, stats), (y_ref, grads_ref, stats_ref) = results
    np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)
    for got, want in zip(jax.tree.leaves((grads, stats)), jax.tree.leaves((grads_ref, stats_ref))):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("case, own_path", [
    ("train float32", True), ("eval", False), ("train bfloat16", False), ("mask", False)])
def test_only_float32_training_leaves_flax(case, own_path):
    bn = BatchNorm(6, dtype=jnp.bfloat16 if "bfloat16" in case else None, rngs=nnx.Rngs(0))
    x = _batch().astype(jnp.bfloat16 if "bfloat16" in case else jnp.float32)
    kwargs = {"mask": jnp.ones(x.shape, bool)} if case == "mask" else {}
    if case == "eval":
        bn.eval()
    with mock.patch.object(nnx.BatchNorm, "__call__", autospec=True,
                           side_effect=lambda self, *a, **k: jnp.zeros_like(x)) as flax_call:
        bn(x, **kwargs)
    assert flax_call.called is not own_path
