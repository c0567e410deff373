"""Xception (Chollet, 2017) with Keras's exact topology, so `keras.applications.Xception`'s
ImageNet weights port mechanically.

Entry flow: two plain 3x3 convs (`conv1` stride 2, `conv2`, both unpadded), then three
blocks (Keras's block2-4) of separable convs ending in a 3x3/2 max-pool, each added to a
strided 1x1 conv shortcut. Middle flow: eight blocks (block5-12) of three ReLU -> separable
conv -> batch norm units around the identity. Exit flow: block13 (as the entry blocks) and
block14 (two separable convs with ReLU after each, no shortcut).

Keras's conventions, kept so that the weights mean the same thing here:

- padding is TensorFlow's 'SAME' where Keras says so (XLA's 'SAME' is the same rule: the
  odd pixel goes after); `conv1` and `conv2` are 'VALID';
- a separable conv is a 3x3 depthwise conv then a 1x1 pointwise conv, no bias, nothing
  between them;
- batch norm has epsilon 1e-3 and momentum 0.99 (Keras's defaults);
- the ImageNet weights expect "tf" preprocessing, x / 127.5 - 1, i.e. mean 0.5 and std 0.5
  on [0, 1] images: one scalar for every channel, so folding `conv1` to one grey channel is
  exact (`pneumojax.weights.convert.to_grayscale`).

Any input of at least 32 px runs (Keras asks for 71, the smallest it tested); the stride
is 32, so 71-95 px leave a 2x2 final map and 299 px, Xception's own size, a 10x10 one.
Keras's layer names and this model's paths are mapped in `pneumojax.weights.xception`.
"""

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx
from jax.typing import DTypeLike

from pneumojax.models.cnn import Standardize, check_pool_r, global_pool
from pneumojax.models.stages import Intermediates, stage
from pneumojax.xla_cpu import BatchNorm, Conv, max_pool

# Output channels: conv1, conv2, block2, block3, block4 (= middle flow), block13, block14's two.
WIDTHS = (32, 64, 128, 256, 728, 1024, 1536, 2048)
MIDDLE_BLOCKS = 8


class SeparableUnit(nnx.Module):
    """Keras's SeparableConv2D (3x3 depthwise, then 1x1 pointwise, no bias) and its batch norm."""

    def __init__(self, c_in: int, c_out: int, *, dtype: DTypeLike, rngs: nnx.Rngs):
        conv = dict(use_bias=False, dtype=dtype, param_dtype=jnp.float32, rngs=rngs)
        self.depthwise = Conv(c_in, c_in, (3, 3), padding="SAME", feature_group_count=c_in,
                              **conv)
        self.pointwise = Conv(c_in, c_out, (1, 1), padding="VALID", **conv)
        self.bn = BatchNorm(c_out, momentum=0.99, epsilon=1e-3, dtype=dtype,
                            param_dtype=jnp.float32, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.bn(self.pointwise(self.depthwise(x)))


class Block(nnx.Module):
    """Separable units, each after a ReLU (but the first where `first_relu` is False), then:

    - `shortcut="conv"` (block2-4, block13): a 3x3/2 'SAME' max-pool, plus a 1x1/2 conv and
      batch norm of the block's input;
    - `shortcut="identity"` (block5-12): plus the block's input;
    - `shortcut=None` (block14): a ReLU after the last unit too, and nothing added.
    """

    def __init__(self, widths: Sequence[int], *, first_relu: bool, shortcut: str | None,
                 dtype: DTypeLike, rngs: nnx.Rngs):
        self.first_relu = first_relu
        self.shortcut = shortcut
        self.units = nnx.List([SeparableUnit(a, b, dtype=dtype, rngs=rngs)
                               for a, b in zip(widths[:-1], widths[1:])])
        self.shortcut_conv: Conv | None
        self.shortcut_bn: BatchNorm | None
        if shortcut != "conv":
            self.shortcut_conv = self.shortcut_bn = None
        else:
            self.shortcut_conv = Conv(widths[0], widths[-1], (1, 1), strides=2, padding="SAME",
                                      use_bias=False, dtype=dtype, param_dtype=jnp.float32,
                                      rngs=rngs)
            self.shortcut_bn = BatchNorm(widths[-1], momentum=0.99, epsilon=1e-3, dtype=dtype,
                                         param_dtype=jnp.float32, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        y = x
        for i, unit in enumerate(self.units):
            y = unit(nnx.relu(y) if i or self.first_relu else y)
        if self.shortcut is None:
            return nnx.relu(y)
        if self.shortcut == "identity":
            return y + x
        y = max_pool(y, (3, 3), strides=(2, 2), padding="SAME")
        return y + self.shortcut_bn(self.shortcut_conv(x))


class Xception(nnx.Module):
    """Stem (`conv1`, `conv2`), entry flow (`entry`), middle flow (`middle`), exit flow
    (`exit`), global pooling (`pool_r`: see `global_pool`), one-logit `head`.

    `widths` and `middle_blocks` exist for tiny test variants; the defaults are Xception's.
    """

    TRANSFER_GROUPS = {"conv1": "stem", "bn1": "stem", "conv2": "stem", "bn2": "stem",
                       "entry": "entry", "middle": "middle", "exit": "exit", "head": "head"}
    UNFREEZE_ORDER = ("exit", "middle", "entry", "stem")
    TINY_KWARGS = dict(widths=(4, 8, 8, 16, 16, 16, 24, 32), middle_blocks=1)

    def __init__(
        self,
        *,
        in_channels: int = 1,
        widths: Sequence[int] = WIDTHS,
        middle_blocks: int = MIDDLE_BLOCKS,
        pool_r: float = 0.0,
        input_mean: Sequence[float] = (0.5,),
        input_std: Sequence[float] = (0.5,),
        dtype: DTypeLike = jnp.float32,
        rngs: nnx.Rngs,
    ):
        if len(widths) != len(WIDTHS):
            raise ValueError(f"Xception takes {len(WIDTHS)} widths {WIDTHS}, got {widths}")
        w1, w2, w_b2, w_b3, w_mid, w_b13, w_b14a, w_b14b = widths
        self.pool_r = check_pool_r(pool_r)
        self.standardize = Standardize(in_channels, input_mean, input_std)
        conv = dict(padding="VALID", use_bias=False, dtype=dtype, param_dtype=jnp.float32,
                    rngs=rngs)
        bn = dict(momentum=0.99, epsilon=1e-3, dtype=dtype, param_dtype=jnp.float32, rngs=rngs)
        self.conv1 = Conv(in_channels, w1, (3, 3), strides=2, **conv)
        self.bn1 = BatchNorm(w1, **bn)
        self.conv2 = Conv(w1, w2, (3, 3), **conv)
        self.bn2 = BatchNorm(w2, **bn)
        block = dict(dtype=dtype, rngs=rngs)
        self.entry = nnx.List([
            Block((w2, w_b2, w_b2), first_relu=False, shortcut="conv", **block),
            Block((w_b2, w_b3, w_b3), first_relu=True, shortcut="conv", **block),
            Block((w_b3, w_mid, w_mid), first_relu=True, shortcut="conv", **block)])
        self.middle = nnx.List([
            Block((w_mid,) * 4, first_relu=True, shortcut="identity", **block)
            for _ in range(middle_blocks)])
        self.exit = nnx.List([
            Block((w_mid, w_mid, w_b13), first_relu=True, shortcut="conv", **block),
            Block((w_b13, w_b14a, w_b14b), first_relu=False, shortcut=None, **block)])
        self.head = nnx.Linear(w_b14b, 1, param_dtype=jnp.float32, rngs=rngs)

    def __call__(self, x: jax.Array) -> tuple[jax.Array, Intermediates]:
        out: Intermediates = {}
        x = nnx.relu(self.bn1(self.conv1(self.standardize(x))))
        x = stage(out, "stem", nnx.relu(self.bn2(self.conv2(x))))
        for i, block in enumerate(self.entry):
            x = stage(out, f"block{i + 2}", block(x))
        for block in self.middle:
            x = block(x)
        x = stage(out, "middle", x)
        for block in self.exit:
            x = block(x)
        x = stage(out, "exit", x)
        x = stage(out, "pre_logits", global_pool(x, self.pool_r))
        return self.head(x)[:, 0].astype(jnp.float32), out
