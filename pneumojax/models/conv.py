"""`conv_general_dilated` for `nnx.Conv`: the same convolution, with a faster kernel gradient
on XLA:CPU.

Why: a kernel gradient is a convolution that sums over the batch, and XLA:CPU's convolutions
want the summed dimension innermost, so XLA transposes every layer's input from (N, H, W, C)
to (C, H, W, N). When that input is a batch norm + ReLU output, XLA fuses the normalisation
into the transpose: it recomputes it element by element in the transposed order. That is a
strided gather, about 3x slower than the plain transpose of the stored activation. For the
deep CNN's first block alone it took 363 ms of a 4.2 s step at 128 px (batch 64, 2-core Xeon;
the plain transpose takes 92 ms). Here the layer's input is transposed inside a `lax.cond`.
XLA fuses nothing across a conditional, so the transpose reads the stored activation. The deep
CNN's step at 128 px runs 7-9 % faster (the same step, A/B in one process).

Values and derivatives are those of `lax.conv_general_dilated` (tests/test_conv.py), in
forward and reverse mode: it is a `custom_jvp` whose tangent in the kernel is the same
convolution, with its input transposed in advance. It applies to stride-1, undilated,
ungrouped NHWC/HWIO convolutions on the CPU backend, so to every convolution of the CNNs
and most of ResNet50's; any other call goes straight to `lax.conv_general_dilated`.
"""

import functools

import jax
import jax.numpy as jnp
from jax import lax

_SPEC = ("NHWC", "HWIO", "NHWC")
Pads = tuple[tuple[int, int], ...]


def _conv(x: jax.Array, w: jax.Array, pads: Pads, precision) -> jax.Array:
    return lax.conv_general_dilated(x, w, (1, 1), pads, dimension_numbers=_SPEC,
                                    precision=precision)


def _batch_last(x: jax.Array) -> jax.Array:
    """(N, H, W, C) -> (C, H, W, N), as the plain transpose of the stored `x`.

    Both branches are the same transpose: the condition (a NaN in the first element) only
    has to be one XLA cannot fold, so that the conditional, and the fusion wall it is,
    stays.
    """
    def transpose(v: jax.Array) -> jax.Array:
        return jnp.transpose(v, (3, 1, 2, 0))
    return lax.cond(jnp.isnan(x[0, 0, 0, 0]), transpose, transpose, x)


@functools.partial(jax.custom_jvp, nondiff_argnums=(2, 3))
def _stride1_conv(x: jax.Array, w: jax.Array, pads: Pads, precision) -> jax.Array:
    return _conv(x, w, pads, precision)


@_stride1_conv.defjvp
def _stride1_conv_jvp(pads: Pads, precision, primals, tangents):
    x, w = primals
    dx, dw = tangents
    # out[n, h, w, o] = sum x[n, h+i, w+j, c] dw[i, j, c, o]: the same sum, reading x as
    # (C, H, W, N). Its transpose, the kernel gradient, then needs no transpose of x.
    dw_term = lax.conv_general_dilated(_batch_last(x), dw, (1, 1), pads,
                                       dimension_numbers=("CHWN", "HWIO", "NHWC"),
                                       precision=precision)
    return _conv(x, w, pads, precision), _conv(dx, w, pads, precision) + dw_term


def conv_general_dilated(lhs: jax.Array, rhs: jax.Array, window_strides, padding,
                         lhs_dilation=None, rhs_dilation=None, dimension_numbers=None,
                         feature_group_count: int = 1, batch_group_count: int = 1,
                         precision=None, preferred_element_type=None,
                         out_sharding=None) -> jax.Array:
    """`lax.conv_general_dilated`, taking the path above where it applies."""
    applies = (
        jax.default_backend() == "cpu" and lhs.ndim == 4
        and all(s == 1 for s in (*window_strides, *(lhs_dilation or ()), *(rhs_dilation or ())))
        and feature_group_count == 1 and batch_group_count == 1
        and preferred_element_type is None and out_sharding is None
        and lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
        == lax.conv_dimension_numbers(lhs.shape, rhs.shape, _SPEC))
    if not applies:
        return lax.conv_general_dilated(
            lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation, dimension_numbers,
            feature_group_count, batch_group_count, precision, preferred_element_type,
            out_sharding=out_sharding)
    if isinstance(padding, str):
        padding = lax.padtype_to_pads(lhs.shape[1:3], rhs.shape[:2], (1, 1), padding)
    return _stride1_conv(lhs, rhs, tuple((int(lo), int(hi)) for lo, hi in padding), precision)
