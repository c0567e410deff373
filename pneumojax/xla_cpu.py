"""Speed for XLA:CPU, behind one switch: an XLA flag and four kernels, each exact.

The models build their convolutions, batch norms and max-pools from this module (`Conv`,
`BatchNorm`, `max_pool`). These are flax's own (`nnx.Conv`, `nnx.BatchNorm`, `nnx.max_pool`),
with the same parameters and state, so checkpoints and weight ports do not depend on the
switch. Where the switch is on and JAX's backend is the CPU, they take the kernels below; each
gives the values and gradients of what it replaces, up to float32 rounding
(tests/test_xla_cpu.py, a whole model's loss and gradients too). Anywhere else, GPUs and TPUs
included, they are exactly flax's.

The switch: the environment variable `PNEUMOJAX_CPU_KERNELS` (on unless it is `0`, `false`,
`off` or `no`), or `with xla_cpu.kernels(False):` in a test or a notebook. The kernels read it
when a model is traced, so a function jitted earlier keeps the path it was traced with. The XLA
flag is read once, when JAX's backend starts: importing pneumojax changes no process-wide
state, and the entry points (`python -m pneumojax.*`, the experiments) call `set_flags()` first.

Why, measured on a 2-core AVX-512 Xeon with jaxlib 0.10, training the deep CNN in float32
(experiments/bench_train.py; "A/B" is the same step with and without, in one process). It
started at 0.50x PyTorch's speed at 128 px; with items 1-4 it is ahead (docs/cpu-performance.md).

1. The XLA flag `--xla_cpu_experimental_ynn_fusion_type=-individual_convolution` (`set_flags`).
   jaxlib 0.10's XLA:CPU runs convolutions through YNNPACK, whose backward-filter (kernel
   gradient) convolutions ran 2-3.5x slower than XLA's own Eigen convolutions. Without them the
   deep CNN trains about 1.3x faster at 64 px and 1.7x at 128 px (4.2 to 7.25 img/s). The flag
   is set only for the jaxlib minor version it was measured with, because XLA aborts on flags it
   does not know, and it only touches XLA:CPU compilations.
2. `max_pool2`: the 2x2/2 max-pool's gradient as element-wise selects on strided slices, since
   XLA's `select_and_scatter` is slow on XLA:CPU. Alone, the gradient of a (64, 64, 64, 32)
   pool ran about 4x faster; the deep CNN's step 1.3x faster at 64 px.
3. `conv_general_dilated`: the kernel gradient's transpose behind a fusion wall. A kernel
   gradient is a convolution that sums over the batch, and XLA:CPU's convolutions want the
   summed dimension innermost, so XLA transposes every layer's input from (N, H, W, C) to
   (C, H, W, N). When that input is a batch norm + ReLU output, XLA fuses the normalisation into
   the transpose: it recomputes it element by element in the transposed order, a strided gather
   about 3x slower than the plain transpose of the stored activation. For the deep CNN's first
   block alone it took 363 ms of a 4.2 s step at 128 px (batch 64; the plain transpose takes
   92 ms). Here the layer's input is transposed inside a `lax.cond`, and XLA fuses nothing
   across a conditional. A/B: +7-9 % at 128 px, +8-18 % at 64 px.
4. `BatchNorm`: a hand-written backward pass for float32 training. Autodiff's backward of
   flax's batch norm sums `g * (x - mean)` over the batch; XLA:CPU runs such sums through
   YNNPACK, which cannot fuse the subtraction, so XLA writes `x - mean` out as one more
   full-size array per layer and reads it back. The backward here sums `g * x` and `g`, both
   already in memory, and subtracts `mean * sum(g)` afterwards: the trade flax itself makes for
   the forward variance by default (`E[x^2] - E[x]^2`, `use_fast_variance`). Its gradients stay
   within float32 rounding of float64's, and on the demo ResNet50 within 2e-6 of autodiff's, at
   initialisation and after training. A/B: +10 % at 128 px, +9 % at 64 px.
5. `depthwise_conv`: a depthwise convolution (one filter per channel, Xception's separable
   convs) as a sum of shifted products, one per kernel tap. XLA:CPU runs a grouped
   convolution with as many groups as channels through a generic path: at batch 32, a 3x3
   depthwise conv of (32, 45, 45, 128) took 1.03 s forward and 2.3 s with its gradients,
   the shifted products 17 ms and 0.28 s (8x; 60x forward); (32, 12, 12, 728): 0.90 s and
   89 ms with gradients. The sums are over the same products in another order, accumulated
   in float32.
"""

import contextlib
import contextvars
import functools
import os
from collections.abc import Iterator, Sequence
from importlib import metadata

import jax
import jax.numpy as jnp
from flax import nnx
from jax import lax

ENV = "PNEUMOJAX_CPU_KERNELS"
FLAG = "--xla_cpu_experimental_ynn_fusion_type=-individual_convolution"
_FLAG_JAXLIB = "0.10."  # the jaxlib minor version FLAG was measured with
_override: contextvars.ContextVar[bool | None] = contextvars.ContextVar("cpu_kernels",
                                                                        default=None)


# --- The switch ---------------------------------------------------------------------------------

def enabled() -> bool:
    """Whether the switch is on: `kernels(...)` if inside one, else `PNEUMOJAX_CPU_KERNELS`."""
    override = _override.get()
    if override is not None:
        return override
    return os.environ.get(ENV, "1").strip().lower() not in ("0", "false", "off", "no")


@contextlib.contextmanager
def kernels(on: bool) -> Iterator[None]:
    """Turns the kernels on or off for models traced inside the block (not the XLA flag)."""
    token = _override.set(bool(on))
    try:
        yield
    finally:
        _override.reset(token)


def _active() -> bool:
    return enabled() and jax.default_backend() == "cpu"


def set_flags() -> None:
    """Adds `FLAG` to `XLA_FLAGS` for entry points, unless the switch is off, `XLA_FLAGS`
    already sets it, or jaxlib is not the version it was measured with. Call it before JAX's
    backend starts (before the first array or device query); after that it has no effect."""
    flags = os.environ.get("XLA_FLAGS", "")
    if not enabled() or FLAG.partition("=")[0] in flags:
        return
    try:
        if not metadata.version("jaxlib").startswith(_FLAG_JAXLIB):
            return
    except metadata.PackageNotFoundError:
        return
    os.environ["XLA_FLAGS"] = f"{flags} {FLAG}".strip()


# --- Convolution (item 3) -----------------------------------------------------------------------

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
    """`lax.conv_general_dilated`, with the kernel gradient of item 3 where the kernels are on.

    The path is a `custom_jvp` whose tangent in the kernel is the same convolution with its
    input transposed in advance, so forward and reverse mode both hold. It takes stride-1,
    undilated, ungrouped NHWC/HWIO convolutions: every convolution of the CNNs and most of
    ResNet50's. Any other call is `lax.conv_general_dilated` itself.
    """
    if _is_depthwise(lhs, rhs, window_strides, lhs_dilation, rhs_dilation, dimension_numbers,
                     feature_group_count, batch_group_count, preferred_element_type,
                     out_sharding):
        return depthwise_conv(lhs, rhs, padding)
    applies = (
        _active() and lhs.ndim == 4
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


def _is_depthwise(lhs, rhs, window_strides, lhs_dilation, rhs_dilation, dimension_numbers,
                  feature_group_count, batch_group_count, preferred_element_type,
                  out_sharding) -> bool:
    """Item 5 applies: a stride-1, undilated NHWC/HWIO conv with one group per channel and
    one filter per group (kernel (kh, kw, 1, C))."""
    return (_active() and lhs.ndim == 4 and rhs.ndim == 4
            and all(s == 1 for s in (*window_strides, *(lhs_dilation or ()),
                                     *(rhs_dilation or ())))
            and feature_group_count == lhs.shape[3] == rhs.shape[3] > 1 and rhs.shape[2] == 1
            and batch_group_count == 1 and preferred_element_type is None
            and out_sharding is None
            and lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
            == lax.conv_dimension_numbers(lhs.shape, rhs.shape, _SPEC))


def depthwise_conv(x: jax.Array, w: jax.Array, padding) -> jax.Array:
    """out[n, h, w, c] = sum_ij xpad[n, h+i, w+j, c] w[i, j, 0, c]: item 5, differentiated by
    JAX (the gradients are shifted products and sums too)."""
    kh, kw = w.shape[:2]
    if isinstance(padding, str):
        padding = lax.padtype_to_pads(x.shape[1:3], (kh, kw), (1, 1), padding)
    (top, bottom), (left, right) = padding
    xp = jnp.pad(x, ((0, 0), (top, bottom), (left, right), (0, 0))).astype(jnp.float32)
    h, w_out = xp.shape[1] - kh + 1, xp.shape[2] - kw + 1
    taps = w.astype(jnp.float32)
    out = sum(xp[:, i:i + h, j:j + w_out, :] * taps[i, j, 0] for i in range(kh)
              for j in range(kw))
    return out.astype(jnp.result_type(x, w))


class Conv(nnx.Conv):
    """`nnx.Conv`, computed by `conv_general_dilated` above unless told otherwise."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("conv_general_dilated", conv_general_dilated)
        super().__init__(*args, **kwargs)


# --- Batch norm (item 4) ------------------------------------------------------------------------

def _statistics(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """flax's fast mean and variance over every axis but the last."""
    axes = tuple(range(x.ndim - 1))
    mean = x.mean(axes)
    return mean, jnp.maximum(0.0, (x * x).mean(axes) - mean * mean)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def batch_norm_train(x: jax.Array, scale: jax.Array, bias: jax.Array, epsilon: float
                     ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(y, batch mean, batch variance) of flax's training-mode batch norm over the last axis,
    flax's forward operation for operation, with item 4's backward pass."""
    mean, var = _statistics(x)
    return (x - mean) * (lax.rsqrt(var + epsilon) * scale) + bias, mean, var


def _bn_forward(x: jax.Array, scale: jax.Array, bias: jax.Array, epsilon: float
                ) -> tuple[tuple[jax.Array, ...], tuple[jax.Array, ...]]:
    y, mean, var = batch_norm_train(x, scale, bias, epsilon)
    return (y, mean, var), (x, mean, var, scale)


def _bn_backward(epsilon: float, residuals: tuple[jax.Array, ...],
                 cotangents: tuple[jax.Array, ...]) -> tuple[jax.Array, jax.Array, jax.Array]:
    x, mean, var, scale = residuals
    g, g_mean, g_var = cotangents
    axes, m = tuple(range(x.ndim - 1)), x.size // x.shape[-1]
    r = lax.rsqrt(var + epsilon)
    a = r * scale
    sum_g = g.sum(axes)
    sum_gxc = (g * x).sum(axes) - mean * sum_g  # sum of g * (x - mean)
    # y = (x - mean) * a + bias, through mean and var too: d mean / dx = 1 / m,
    # d var / dx = 2 (x - mean) / m where var > 0 (the variance is clipped at 0).
    coef_xc = -a * r * r * sum_gxc / m + jnp.where(var > 0, 2 * g_var / m, 0.0)
    dx = a * g + (g_mean / m - a * sum_g / m) + (x - mean) * coef_xc
    return dx, r * sum_gxc, sum_g


batch_norm_train.defvjp(_bn_forward, _bn_backward)


class BatchNorm(nnx.BatchNorm):
    """`nnx.BatchNorm`, whose float32 training step takes `batch_norm_train` where the kernels
    are on: training mode, float32 inputs computed in float32, the default feature axis, scale,
    bias and fast variance, no mask or `axis_name`. The running averages are updated as flax
    does. Every other call, evaluation included, is `nnx.BatchNorm.__call__` itself.
    """

    def __call__(self, x: jax.Array, use_running_average: bool | None = None, *,
                 mask: jax.Array | None = None) -> jax.Array:
        # The name scope labels its kernels, forward and backward, in profiles (profile_step).
        with jax.named_scope("batch_norm"):
            return self._normalise(x, use_running_average, mask)

    def _normalise(self, x: jax.Array, use_running_average: bool | None,
                   mask: jax.Array | None) -> jax.Array:
        if use_running_average is None:
            use_running_average = self.use_running_average
        applies = (
            use_running_average is False and mask is None and self.axis_name is None
            and _active() and x.dtype == jnp.float32
            and jnp.dtype(self.dtype or x.dtype) == jnp.float32
            and self.axis in (-1, x.ndim - 1) and self.use_fast_variance
            and self.scale is not None and self.bias is not None)
        if not applies:
            return super().__call__(x, use_running_average, mask=mask)
        y, mean, var = batch_norm_train(x, self.scale[...], self.bias[...], self.epsilon)
        for stat, batch in ((self.mean, mean), (self.var, var)):
            stat[...] = lax.stop_gradient(self.momentum * stat[...] + (1 - self.momentum) * batch)
        return y


# --- Max-pool (item 2) --------------------------------------------------------------------------

def _window(x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """The four corners of every 2x2 window, as strided slices (an odd last row/column drops)."""
    h, w = x.shape[1] // 2 * 2, x.shape[2] // 2 * 2
    return x[:, 0:h:2, 0:w:2], x[:, 0:h:2, 1:w:2], x[:, 1:h:2, 0:w:2], x[:, 1:h:2, 1:w:2]


@jax.custom_vjp
def max_pool2(x: jax.Array) -> jax.Array:
    """2x2/2 max-pool of (N, H, W, C); odd sizes drop the last row/column, as torch's
    MaxPool2d(2) does.

    The same values and gradients as `nnx.max_pool(x, (2, 2), strides=(2, 2))`: the
    gradient goes to the first maximum of each window in row-major order, as XLA's
    select_and_scatter and torch do, through element-wise selects (item 2).
    """
    a, b, c, d = _window(x)
    return jnp.maximum(jnp.maximum(a, b), jnp.maximum(c, d))


def _max_pool2_fwd(x: jax.Array) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
    y = max_pool2(x)
    return y, (x, y)


def _max_pool2_bwd(residuals: tuple[jax.Array, jax.Array], g: jax.Array) -> tuple[jax.Array]:
    x, y = residuals
    a, b, c, _ = _window(x)  # the last corner takes what the others do not
    # First maximum wins; if none compares equal (NaN), the last corner takes the gradient.
    take_a = a == y
    take_b = ~take_a & (b == y)
    take_c = ~(take_a | take_b) & (c == y)
    take_d = ~(take_a | take_b | take_c)
    ga, gb, gc, gd = (jnp.where(t, g, jnp.zeros_like(g)) for t in (take_a, take_b, take_c, take_d))
    n, h, w, ch = g.shape
    dx = jnp.stack([jnp.stack([ga, gb], axis=3), jnp.stack([gc, gd], axis=3)], axis=2)
    dx = dx.reshape(n, 2 * h, 2 * w, ch)
    return (jnp.pad(dx, ((0, 0), (0, x.shape[1] - 2 * h), (0, x.shape[2] - 2 * w), (0, 0))),)


max_pool2.defvjp(_max_pool2_fwd, _max_pool2_bwd)


def max_pool(inputs: jax.Array, window_shape: Sequence[int],
             strides: Sequence[int] | None = None, padding="VALID") -> jax.Array:
    """`nnx.max_pool`; a 2x2/2 unpadded pool of (N, H, W, C) takes `max_pool2` where the
    kernels are on."""
    if (_active() and inputs.ndim == 4 and tuple(window_shape) == (2, 2)
            and strides is not None and tuple(strides) == (2, 2)
            and isinstance(padding, str) and padding.upper() == "VALID"):
        return max_pool2(inputs)
    return nnx.max_pool(inputs, window_shape, strides=strides, padding=padding)
