"""models.conv: lax.conv_general_dilated's values and derivatives, by another route on CPU."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from pneumojax.models import conv

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


def _loss(fn, padding, strides):
    def loss(x, w):
        y = fn(x, w, strides, padding, dimension_numbers=SPEC)
        return jnp.sum(jnp.sin(y.astype(jnp.float32)))  # a cotangent that differs everywhere
    return loss


@pytest.mark.parametrize("case", CASES)
def test_values_gradients_and_jvp_match_lax(case):
    kernel, padding, strides = CASES[case]
    x, w = _operands(kernel)
    ours, ref = (_loss(f, padding, strides)
                 for f in (conv.conv_general_dilated, lax.conv_general_dilated))
    np.testing.assert_allclose(jax.jit(ours)(x, w), ref(x, w), rtol=1e-6)
    for got, want in zip(jax.jit(jax.grad(ours, (0, 1)))(x, w), jax.grad(ref, (0, 1))(x, w)):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    tx, tw = jnp.cos(x), 0.5 * jnp.cos(w)  # forward mode too: jvp, jacfwd, hessians
    np.testing.assert_allclose(jax.jvp(ours, (x, w), (tx, tw))[1],
                               jax.jvp(ref, (x, w), (tx, tw))[1], rtol=1e-5)


@pytest.mark.parametrize("case, taken", [("3x3 same", True), ("1x1", True),
                                         ("3x3 stride 2 (lax)", False)])
def test_cpu_path_transposes_inside_a_conditional_only_where_it_applies(case, taken):
    kernel, padding, strides = CASES[case]
    x, w = _operands(kernel)
    jaxpr = jax.make_jaxpr(jax.grad(_loss(conv.conv_general_dilated, padding, strides), 1))(x, w)
    assert ("cond[" in str(jaxpr)) is taken


def test_bfloat16_gradients_match_lax():
    x, w = _operands((3, 3), jnp.bfloat16)
    ours, ref = (_loss(f, "SAME", (1, 1))
                 for f in (conv.conv_general_dilated, lax.conv_general_dilated))
    for got, want in zip(jax.jit(jax.grad(ours, (0, 1)))(x, w),
                         jax.jit(jax.grad(ref, (0, 1)))(x, w)):
        assert got.dtype == want.dtype == jnp.bfloat16
        np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32),
                                   rtol=2e-2, atol=2e-2)


def test_other_layouts_go_to_lax_unchanged():
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.normal(size=(2, 4, 8, 8)), jnp.float32)  # NCHW
    w = jnp.asarray(rng.normal(size=(6, 4, 3, 3)), jnp.float32)  # OIHW
    got = conv.conv_general_dilated(x, w, (1, 1), "SAME")
    np.testing.assert_array_equal(got, lax.conv_general_dilated(x, w, (1, 1), "SAME"))
