"""models.norm: flax's batch norm with a hand-written backward pass, against flax's own."""

from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from pneumojax import models
from pneumojax.models.norm import BatchNorm, batch_norm_train


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


def _batch(offset: float = 2.0, dtype=jnp.float32) -> jax.Array:
    """Channels with means from -offset to 1.5 offset, standard deviation 1.5: where
    sum(g x) - mean sum(g) cancels."""
    rng = np.random.default_rng(1)
    return jnp.asarray(rng.normal(size=(8, 5, 7, 6)) * 1.5 + offset * (np.arange(6) - 2) / 2,
                       dtype)


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
    np.testing.assert_allclose(y, y_ref, rtol=1e-6, atol=1e-6)
    for got, want in zip(jax.tree.leaves((grads, stats)), jax.tree.leaves((grads_ref, stats_ref))):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def _plain(x, scale, bias, epsilon):
    """batch_norm_train's forward, left to autodiff."""
    return batch_norm_train.fun(x, scale, bias, epsilon)


def _loss(bn, x, scale, bias):
    """Reaches every output, the statistics too, through non-linear maps."""
    y, mean, var = bn(x, scale, bias, 1e-5)
    w = jnp.linspace(-1, 1, y.size, dtype=x.dtype).reshape(y.shape)
    return jnp.sum(jnp.tanh(y) * w) + jnp.sum(jnp.sin(mean)) + jnp.sum(jnp.sqrt(var))


@pytest.mark.parametrize("offset", [2.0, 60.0])
def test_gradients_stay_within_float32_rounding_of_float64(offset):
    """sum(g x) - mean sum(g) cancels, but at channel means up to 60x the standard deviation
    it costs no more than float32 rounding: within 2e-5 of float64, or of autodiff's error
    where the forward's own (fast variance) dominates."""
    rng = np.random.default_rng(3)
    scale, bias = rng.uniform(0.5, 2.0, 6), rng.normal(size=6)
    args32 = [_batch(offset), jnp.asarray(scale, jnp.float32), jnp.asarray(bias, jnp.float32)]
    grad = lambda bn, args: jax.jit(jax.grad(lambda *a: _loss(bn, *a), argnums=(0, 1, 2)))(*args)
    ours, autodiff = grad(batch_norm_train, args32), grad(_plain, args32)
    with jax.enable_x64(True):
        exact = grad(_plain, [jnp.asarray(a, jnp.float64) for a in args32])
    for got, ref, want in zip(ours, autodiff, exact):
        want = np.asarray(want)
        err, err_ref = (np.abs(np.asarray(v, np.float64) - want).max() / np.abs(want).max()
                        for v in (got, ref))
        assert err <= max(2 * err_ref, 2e-5), (err, err_ref)


def test_a_whole_models_gradients_match_flaxs_batch_norm(monkeypatch):
    """DeepCNN, every batch norm in training mode: the same gradients as with nnx.BatchNorm."""
    x = jnp.asarray(np.random.default_rng(4).random((4, 32, 32, 1)), jnp.float32)
    y = jnp.asarray([0.0, 1.0, 1.0, 0.0])

    def grads() -> list[jax.Array]:
        model = models.create("deep_cnn", widths=(4, 8, 8), hidden=8, dropout=0.0,
                              rngs=nnx.Rngs(0))

        def loss(m: nnx.Module) -> jax.Array:
            logits = m(x)[0]
            return jnp.mean(jax.nn.softplus(logits) - y * logits)

        return jax.tree.leaves(nnx.jit(nnx.grad(loss))(model))

    ours = grads()
    monkeypatch.setattr(BatchNorm, "__call__", nnx.BatchNorm.__call__)
    for got, want in zip(ours, grads(), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5 * float(jnp.abs(want).max()))


@pytest.mark.parametrize("case, own_path", [
    ("train float32", True), ("eval", False), ("train bfloat16", False), ("mask", False)])
def test_only_float32_training_leaves_flax(case, own_path):
    bn = BatchNorm(6, dtype=jnp.bfloat16 if "bfloat16" in case else None, rngs=nnx.Rngs(0))
    x = _batch(dtype=jnp.bfloat16 if "bfloat16" in case else jnp.float32)
    kwargs = {"mask": jnp.ones(x.shape, bool)} if case == "mask" else {}
    if case == "eval":
        bn.eval()
    with mock.patch.object(nnx.BatchNorm, "__call__", autospec=True,
                           side_effect=lambda self, *a, **k: jnp.zeros_like(x)) as flax_call:
        bn(x, **kwargs)
    assert flax_call.called is not own_path
