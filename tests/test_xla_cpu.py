"""xla_cpu: the switch changes no value, each CPU kernel gives flax's values and derivatives,
and importing pneumojax changes no process-wide state."""

import json
import os
import subprocess
import sys
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax import lax

from pneumojax import models, xla_cpu
from pneumojax.xla_cpu import BatchNorm, batch_norm_train, max_pool2

# --- The switch ---------------------------------------------------------------------------------

TINY = {"deep_cnn": dict(widths=(4, 8, 8), hidden=8, dropout=0.0),
        "resnet50": dict(width=4, stage_sizes=(1, 1, 1, 1)),
        "xception": models.Xception.TINY_KWARGS}


def _train_step(name: str, on: bool) -> tuple[jax.Array, list[jax.Array], list[jax.Array], str]:
    """(loss, gradients, updated batch statistics, jaxpr) of a tiny model's training step,
    traced with the kernels on or off."""
    x = jnp.asarray(np.random.default_rng(4).random((2, 32, 32, 1)), jnp.float32)
    y = jnp.asarray([0.0, 1.0])
    graphdef, state = nnx.split(models.create(name, **TINY[name], rngs=nnx.Rngs(0)))

    def loss(m: nnx.Module) -> jax.Array:
        logits = m(x)[0]
        return jnp.mean(jax.nn.softplus(logits) - y * logits)

    def step(state: nnx.State):
        model = nnx.merge(graphdef, state)
        value, grads = nnx.value_and_grad(loss)(model)
        return value, grads, nnx.state(model, nnx.BatchStat)

    with xla_cpu.kernels(on):  # a fresh function each time, so a fresh trace
        traced = jax.jit(step).trace(state)
    value, grads, stats = traced.lower().compile()(state)
    return value, jax.tree.leaves(grads), jax.tree.leaves(stats), str(traced.jaxpr)


@pytest.mark.parametrize("name", [  # ResNet50 compiles for 20 s: the full tier only
    "deep_cnn", "xception", pytest.param("resnet50", marks=pytest.mark.slow)])
def test_the_switch_changes_no_value_or_gradient(name):
    """A train-mode loss, its gradients and the running statistics, with the kernels on and
    off: the same within float32 rounding, and only the `on` trace takes the custom paths."""
    on, off = _train_step(name, True), _train_step(name, False)
    # The convolution's custom_jvp leaves its conditional in the gradient's jaxpr; a grouped
    # convolution is left only where the depthwise kernel is off.
    marks = ("cond[", "name=batch_norm_train", "name=max_pool2")
    grouped = f"feature_group_count={TINY['xception']['widths'][1]}"
    assert [m in on[3] for m in marks] == [True, True, name == "deep_cnn"]
    assert not any(m in off[3] for m in marks)
    assert (grouped in off[3]) is (name == "xception") and grouped not in on[3]
    np.testing.assert_allclose(on[0], off[0], rtol=1e-5)
    # The tiny Xception ends on 1x1 maps, where train-mode batch norm over a batch of 2
    # amplifies rounding: its gradients agree to 3e-5 of their largest, the others' to 1e-5;
    # and gradients that are zero in exact arithmetic (a scale before a batch norm) are
    # rounding noise of 1e-8.
    scale = 1e-4 if name == "xception" else 1e-5
    for got, want in zip(on[1] + on[2], off[1] + off[2], strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-4,
                                   atol=max(scale * float(jnp.abs(want).max()), 1e-6))


def test_the_switch_reads_the_environment_unless_a_block_overrides_it(monkeypatch):
    monkeypatch.delenv(xla_cpu.ENV, raising=False)
    assert xla_cpu.enabled()
    for value, on in (("1", True), ("off", False), ("0", False)):
        monkeypatch.setenv(xla_cpu.ENV, value)
        assert xla_cpu.enabled() is on
    with xla_cpu.kernels(True):
        assert xla_cpu.enabled()
        with xla_cpu.kernels(False):
            assert not xla_cpu.enabled()
        assert xla_cpu.enabled()
    assert not xla_cpu.enabled()


def test_set_flags_adds_the_flag_once_and_only_with_the_switch_on(monkeypatch):
    monkeypatch.setattr(xla_cpu.metadata, "version", lambda name: xla_cpu._FLAG_JAXLIB + "9")
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=2")
    monkeypatch.setenv(xla_cpu.ENV, "0")
    xla_cpu.set_flags()
    assert os.environ["XLA_FLAGS"] == "--xla_force_host_platform_device_count=2"
    monkeypatch.setenv(xla_cpu.ENV, "1")
    xla_cpu.set_flags()
    xla_cpu.set_flags()
    assert os.environ["XLA_FLAGS"] == f"--xla_force_host_platform_device_count=2 {xla_cpu.FLAG}"
    monkeypatch.setattr(xla_cpu.metadata, "version", lambda name: "0.99.0")  # XLA would abort
    monkeypatch.delenv("XLA_FLAGS")
    xla_cpu.set_flags()
    assert "XLA_FLAGS" not in os.environ


def test_importing_pneumojax_changes_no_process_wide_state():
    """Every module imported, in a fresh process (after the libraries it uses, which set
    variables of their own): os.environ as before, absl's flags unparsed, and JAX's backend not
    started, so an entry point's XLA flags still take effect."""
    script = """
import importlib, json, os, pkgutil
import flax, grain, jax, optax, orbax.checkpoint, tensorflow_datasets
from absl import flags
before = dict(os.environ)
import pneumojax
for m in pkgutil.walk_packages(pneumojax.__path__, "pneumojax."):
    importlib.import_module(m.name)
changed = sorted(k for k in {*before, *os.environ} if before.get(k) != os.environ.get(k))
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=3"
print(json.dumps([changed, flags.FLAGS.is_parsed(), jax.device_count()]))
"""
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", xla_cpu.ENV)}
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                         text=True, timeout=120, check=True)
    assert json.loads(out.stdout.splitlines()[-1]) == [[], False, 3]


# --- Convolution --------------------------------------------------------------------------------

SPEC = ("NHWC", "HWIO", "NHWC")
CASES = {  # name: (kernel, padding, strides)
    "3x3 same": ((3, 3), "SAME", (1, 1)),
    "3x3 valid": ((3, 3), "VALID", (1, 1)),
    "3x3 uneven pads": ((3, 3), ((2, 0), (1, 1)), (1, 1)),
    "1x1": ((1, 1), "VALID", (1, 1)),
    "5x3 same": ((5, 3), "SAME", (1, 1)),
    "3x3 stride 2 (lax)": ((3, 3), ((1, 1), (1, 1)), (2, 2)),
}


def _operands(kernel, dtype=jnp.float32):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(3, 9, 11, 4)).astype(np.float32)
    w = rng.normal(size=(*kernel, 4, 5)).astype(np.float32)
    return jnp.asarray(x, dtype), jnp.asarray(w, dtype)


def _conv_loss(fn, padding, strides):
    def loss(x, w):
        y = fn(x, w, strides, padding, dimension_numbers=SPEC)
        return jnp.sum(jnp.sin(y.astype(jnp.float32)))  # a cotangent that differs everywhere
    return loss


@pytest.mark.parametrize("case", CASES)
def test_conv_values_gradients_and_jvp_match_lax(case):
    kernel, padding, strides = CASES[case]
    x, w = _operands(kernel)
    ours, ref = (_conv_loss(f, padding, strides)
                 for f in (xla_cpu.conv_general_dilated, lax.conv_general_dilated))
    np.testing.assert_allclose(jax.jit(ours)(x, w), ref(x, w), rtol=1e-6)
    for got, want in zip(jax.jit(jax.grad(ours, (0, 1)))(x, w), jax.grad(ref, (0, 1))(x, w)):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    tx, tw = jnp.cos(x), 0.5 * jnp.cos(w)  # forward mode too: jvp, jacfwd, hessians
    np.testing.assert_allclose(jax.jvp(ours, (x, w), (tx, tw))[1],
                               jax.jvp(ref, (x, w), (tx, tw))[1], rtol=1e-5)


@pytest.mark.parametrize("case, on, taken", [
    ("3x3 same", True, True), ("1x1", True, True), ("3x3 stride 2 (lax)", True, False),
    ("3x3 same", False, False)])
def test_conv_transposes_inside_a_conditional_only_where_it_applies(case, on, taken):
    kernel, padding, strides = CASES[case]
    x, w = _operands(kernel)
    with xla_cpu.kernels(on):
        jaxpr = jax.make_jaxpr(jax.grad(
            _conv_loss(xla_cpu.conv_general_dilated, padding, strides), 1))(x, w)
    assert ("cond[" in str(jaxpr)) is taken


def test_conv_bfloat16_gradients_match_lax():
    x, w = _operands((3, 3), jnp.bfloat16)
    ours, ref = (_conv_loss(f, "SAME", (1, 1))
                 for f in (xla_cpu.conv_general_dilated, lax.conv_general_dilated))
    for got, want in zip(jax.jit(jax.grad(ours, (0, 1)))(x, w),
                         jax.jit(jax.grad(ref, (0, 1)))(x, w)):
        assert got.dtype == want.dtype == jnp.bfloat16
        np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32),
                                   rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("padding", ["SAME", "VALID", ((2, 0), (1, 1))])
def test_depthwise_conv_values_and_gradients_match_lax(padding):
    rng = np.random.default_rng(2)
    x = jnp.asarray(rng.normal(size=(3, 9, 11, 6)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(3, 3, 1, 6)), jnp.float32)

    def loss(fn):
        return lambda x, w: jnp.sum(jnp.sin(fn(x, w, (1, 1), padding, dimension_numbers=SPEC,
                                                feature_group_count=6)))
    with xla_cpu.kernels(True):
        ours = jax.jit(jax.value_and_grad(loss(xla_cpu.conv_general_dilated), (0, 1)))
        assert "conv_general_dilated" not in str(jax.make_jaxpr(ours)(x, w))
        got = ours(x, w)
    want = jax.value_and_grad(loss(lax.conv_general_dilated), (0, 1))(x, w)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_conv_other_layouts_go_to_lax_unchanged():
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.normal(size=(2, 4, 8, 8)), jnp.float32)  # NCHW
    w = jnp.asarray(rng.normal(size=(6, 4, 3, 3)), jnp.float32)  # OIHW
    got = xla_cpu.conv_general_dilated(x, w, (1, 1), "SAME")
    np.testing.assert_array_equal(got, lax.conv_general_dilated(x, w, (1, 1), "SAME"))


def test_conv_is_nnx_conv_with_the_same_parameters():
    ours, flax = (cls(3, 5, (3, 3), rngs=nnx.Rngs(0)) for cls in (xla_cpu.Conv, nnx.Conv))
    assert isinstance(ours, nnx.Conv)
    assert jax.tree.structure(nnx.state(ours)) == jax.tree.structure(nnx.state(flax))
    for a, b in zip(jax.tree.leaves(nnx.state(ours)), jax.tree.leaves(nnx.state(flax))):
        np.testing.assert_array_equal(a, b)


# --- Batch norm ---------------------------------------------------------------------------------

def _bn_pair(**kwargs) -> tuple[nnx.Module, nnx.Module]:
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


def _bn_batch(offset: float = 2.0, dtype=jnp.float32) -> jax.Array:
    """Channels with means from -offset to 1.5 offset, standard deviation 1.5: where
    sum(g x) - mean sum(g) cancels."""
    rng = np.random.default_rng(1)
    return jnp.asarray(rng.normal(size=(8, 5, 7, 6)) * 1.5 + offset * (np.arange(6) - 2) / 2,
                       dtype)


def test_batch_norm_training_matches_flax_outputs_gradients_and_running_statistics():
    x, g = _bn_batch(), jnp.asarray(np.random.default_rng(2).normal(size=(8, 5, 7, 6)),
                                    jnp.float32)
    results = []
    for bn in _bn_pair():
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


def _bn_plain(x, scale, bias, epsilon):
    """batch_norm_train's forward, left to autodiff."""
    return batch_norm_train.fun(x, scale, bias, epsilon)


def _bn_loss(bn, x, scale, bias):
    """Reaches every output, the statistics too, through non-linear maps."""
    y, mean, var = bn(x, scale, bias, 1e-5)
    w = jnp.linspace(-1, 1, y.size, dtype=x.dtype).reshape(y.shape)
    return jnp.sum(jnp.tanh(y) * w) + jnp.sum(jnp.sin(mean)) + jnp.sum(jnp.sqrt(var))


@pytest.mark.parametrize("offset", [2.0, 60.0])
def test_batch_norm_gradients_stay_within_float32_rounding_of_float64(offset):
    """sum(g x) - mean sum(g) cancels, but at channel means up to 60x the standard deviation
    it costs no more than float32 rounding: within 2e-5 of float64, or of autodiff's error
    where the forward's own (fast variance) dominates."""
    rng = np.random.default_rng(3)
    scale, bias = rng.uniform(0.5, 2.0, 6), rng.normal(size=6)
    args32 = [_bn_batch(offset), jnp.asarray(scale, jnp.float32), jnp.asarray(bias, jnp.float32)]
    grad = lambda bn, args: jax.jit(jax.grad(lambda *a: _bn_loss(bn, *a), argnums=(0, 1, 2)))(
        *args)
    ours, autodiff = grad(batch_norm_train, args32), grad(_bn_plain, args32)
    with jax.enable_x64(True):
        exact = grad(_bn_plain, [jnp.asarray(a, jnp.float64) for a in args32])
    for got, ref, want in zip(ours, autodiff, exact):
        want = np.asarray(want)
        err, err_ref = (np.abs(np.asarray(v, np.float64) - want).max() / np.abs(want).max()
                        for v in (got, ref))
        assert err <= max(2 * err_ref, 2e-5), (err, err_ref)


@pytest.mark.parametrize("case, own_path", [
    ("train float32", True), ("eval", False), ("train bfloat16", False), ("mask", False),
    ("switch off", False)])
def test_batch_norm_leaves_flax_only_for_float32_training_with_the_switch_on(case, own_path):
    bn = BatchNorm(6, dtype=jnp.bfloat16 if "bfloat16" in case else None, rngs=nnx.Rngs(0))
    x = _bn_batch(dtype=jnp.bfloat16 if "bfloat16" in case else jnp.float32)
    kwargs = {"mask": jnp.ones(x.shape, bool)} if case == "mask" else {}
    if case == "eval":
        bn.eval()
    with mock.patch.object(nnx.BatchNorm, "__call__", autospec=True,
                           side_effect=lambda self, *a, **k: jnp.zeros_like(x)) as flax_call, \
            xla_cpu.kernels(case != "switch off"):
        bn(x, **kwargs)
    assert flax_call.called is not own_path


# --- Max-pool -----------------------------------------------------------------------------------

def test_max_pool2_matches_xla_values_and_gradients_with_ties_and_odd_sizes():
    # Small integers make tied maxima common: the gradient must go to the first, as XLA's.
    x = jnp.asarray(np.random.default_rng(0).integers(0, 4, (2, 7, 9, 3)).astype(np.float32))
    reference = lambda x: nnx.max_pool(x, (2, 2), strides=(2, 2))
    weigh = lambda pool: lambda x: (pool(x) * jnp.arange(1.0, pool(x).size + 1).reshape(
        pool(x).shape)).sum()
    np.testing.assert_array_equal(max_pool2(x), reference(x))
    np.testing.assert_array_equal(jax.grad(weigh(max_pool2))(x), jax.grad(weigh(reference))(x))


@pytest.mark.parametrize("args, on, taken", [
    (((2, 2), (2, 2)), True, True), (((2, 2), (2, 2)), False, False),
    (((2, 2), None), True, False), (((3, 3), (2, 2)), True, False)])
def test_max_pool_takes_max_pool2_only_for_2x2_stride_2_with_the_switch_on(args, on, taken):
    x = jnp.ones((1, 6, 6, 2))
    with xla_cpu.kernels(on):
        jaxpr = str(jax.make_jaxpr(lambda x: xla_cpu.max_pool(x, *args))(x))
        np.testing.assert_array_equal(xla_cpu.max_pool(x, *args), nnx.max_pool(x, *args))
    assert ("name=max_pool2" in jaxpr) is taken
