"""Small from-scratch CNN baselines, and the input standardiser every model starts with.

Both models follow the shared contract of `pneumojax.models`: float32 (B, H, W, C)
images in [0, 1] in, `(logits (B,), intermediates)` out. The body runs in `dtype`
(bf16 for mixed precision); pooling and the head run in float32, because they cost
nothing and a bf16 logit would quantise the loss. Parameters are always float32.
"""

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx
from jax.typing import DTypeLike

from pneumojax.models.conv import conv_general_dilated
from pneumojax.models.norm import BatchNorm
from pneumojax.models.stages import Intermediates, stage


class Standardize(nnx.Module):
    """(x - mean) / std per channel, with the constants stored in the model.

    They are plain `nnx.Variable`s, not `nnx.Param`s, so the optimizer never moves
    them, yet they travel with checkpoints: pretrained weights come with their own
    preprocessing and a model must not be restored with the wrong one.
    """

    def __init__(self, in_channels: int, mean: Sequence[float], std: Sequence[float]):
        mean_arr = jnp.broadcast_to(jnp.asarray(mean, jnp.float32), (in_channels,))
        std_arr = jnp.broadcast_to(jnp.asarray(std, jnp.float32), (in_channels,))
        self.mean = nnx.Variable(mean_arr)
        self.std = nnx.Variable(std_arr)

    def __call__(self, x: jax.Array) -> jax.Array:
        if x.shape[-1] != self.mean.shape[0]:
            raise ValueError(f"expected {self.mean.shape[0]} input channels, got shape {x.shape}")
        return (x.astype(jnp.float32) - self.mean[...]) / self.std[...]


def check_pool_r(pool_r: float) -> float:
    """A model's `pool_r`, checked at construction rather than at the first forward pass."""
    if not pool_r >= 0:
        raise ValueError(f"pool_r must be >= 0 (0 is the mean), got {pool_r}")
    return float(pool_r)


def global_pool(x: jax.Array, r: float = 0.0) -> jax.Array:
    """Spatial pooling in float32 (bf16 cannot hold a sum over thousands of positions).

    r = 0 is the mean. r > 0 is log-sum-exp pooling, (1/r) log mean exp(r x), which runs
    from the mean (r -> 0) to the max (r -> inf); ChestX-ray8 (Wang et al., 2017) found r = 10
    best for weakly supervised localisation. A mean pays a feature for spreading a small
    lesion's evidence over a wide area, which blurs its Grad-CAM maps; LSE's gradient is
    softmax(r x) over positions, so evidence counts where it is strongest.
    """
    x = x.astype(jnp.float32)
    if r == 0:
        return jnp.mean(x, axis=(1, 2))
    # Shifted by the max, so exp cannot overflow; expm1/log1p keep small r from cancelling.
    top = jax.lax.stop_gradient(jnp.max(x, axis=(1, 2), keepdims=True))
    spread = jnp.log1p(jnp.mean(jnp.expm1(r * (x - top)), axis=(1, 2))) / r
    return top[:, 0, 0] + spread


def _window(x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """The four corners of every 2x2 window, as strided slices (an odd last row/column drops)."""
    h, w = x.shape[1] // 2 * 2, x.shape[2] // 2 * 2
    return x[:, 0:h:2, 0:w:2], x[:, 0:h:2, 1:w:2], x[:, 1:h:2, 0:w:2], x[:, 1:h:2, 1:w:2]


@jax.custom_vjp
def max_pool2(x: jax.Array) -> jax.Array:
    """2x2/2 max-pool; odd sizes drop the last row/column, as torch's MaxPool2d(2) does.

    The same values and gradients as `nnx.max_pool(x, (2, 2), strides=(2, 2))`: the
    gradient goes to the first maximum of each window in row-major order, as XLA's
    select_and_scatter and torch do. Written as strided slices with a custom VJP of
    element-wise selects because select_and_scatter is slow on XLA:CPU: alone, the
    gradient of a (64, 64, 64, 32) pool ran ~4x faster this way, and the deep CNN's train
    step ~1.3x faster (64 px, 2-core Xeon).
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


class ShallowCNN(nnx.Module):
    """Three 3x3 conv + ReLU + 2x2 max-pool layers, widths (w, 2w, 4w), then global pooling
    (`pool_r`: see `global_pool`) and a logit.

    Deliberately without BatchNorm or dropout: the simplest baseline that can learn
    the task, against which the deeper models must earn their cost.
    """

    def __init__(
        self,
        *,
        in_channels: int = 1,
        width: int = 32,
        pool_r: float = 0.0,
        input_mean: Sequence[float] = (0.5,),
        input_std: Sequence[float] = (0.25,),
        dtype: DTypeLike = jnp.float32,
        rngs: nnx.Rngs,
    ):
        self.standardize = Standardize(in_channels, input_mean, input_std)
        widths = (width, 2 * width, 4 * width)
        self.pool_r = check_pool_r(pool_r)
        self.convs = nnx.List([
            nnx.Conv(c_in, c_out, (3, 3), padding="SAME", kernel_init=nnx.initializers.he_normal(),
                     dtype=dtype, param_dtype=jnp.float32,
                     conv_general_dilated=conv_general_dilated, rngs=rngs)
            for c_in, c_out in zip((in_channels, *widths[:-1]), widths)
        ])
        self.head = nnx.Linear(widths[-1], 1, param_dtype=jnp.float32, rngs=rngs)

    def __call__(self, x: jax.Array) -> tuple[jax.Array, Intermediates]:
        out: Intermediates = {}
        x = self.standardize(x)
        for i, conv in enumerate(self.convs):
            x = stage(out, f"block{i + 1}", max_pool2(nnx.relu(conv(x))))
        x = stage(out, "pre_logits", global_pool(x, self.pool_r))
        return self.head(x)[:, 0].astype(jnp.float32), out


class ConvBlock(nnx.Module):
    """Two 3x3 conv + BatchNorm + ReLU, then a 2x2 max-pool (the classic VGG-style block)."""

    def __init__(self, c_in: int, c_out: int, *, dtype: DTypeLike, rngs: nnx.Rngs):
        # No conv bias: the BatchNorm right after would cancel it.
        conv = dict(kernel_size=(3, 3), padding="SAME", use_bias=False, dtype=dtype,
                    param_dtype=jnp.float32, kernel_init=nnx.initializers.he_normal(),
                    conv_general_dilated=conv_general_dilated, rngs=rngs)
        bn = dict(momentum=0.9, dtype=dtype, param_dtype=jnp.float32, rngs=rngs)
        self.conv1 = nnx.Conv(c_in, c_out, **conv)
        self.bn1 = BatchNorm(c_out, **bn)
        self.conv2 = nnx.Conv(c_out, c_out, **conv)
        self.bn2 = BatchNorm(c_out, **bn)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = nnx.relu(self.bn1(self.conv1(x)))
        x = nnx.relu(self.bn2(self.conv2(x)))
        return max_pool2(x)


HEADS = ("dense", "lesion")


class DeepCNN(nnx.Module):
    """Four `ConvBlock`s, then a head.

    `head="dense"`: global pooling (`pool_r`: see `global_pool`), dense(hidden) + ReLU +
    Dropout and a logit. `pre_logits` is the hidden layer after its ReLU, before dropout, so
    feature extraction in eval mode and Grad-CAM see the same tensor the head reads.

    `head="lesion"`: a 1x1 conv scores every cell of the last block (`lesion_logits`,
    (B, h, w)), and the logit is their global pool, as in multiple-instance learning. The
    cells can then be trained on lesion masks (`train.lesion_weight`), which makes the
    model's evidence lie in the lesions by construction: the known answer a saliency method
    must recover. `hidden` and `dropout` are unused; `pre_logits` is the pooled last block.
    """

    def __init__(
        self,
        *,
        in_channels: int = 1,
        widths: Sequence[int] = (32, 64, 128, 256),
        hidden: int = 128,
        dropout: float = 0.5,
        pool_r: float = 0.0,
        head: str = "dense",
        input_mean: Sequence[float] = (0.5,),
        input_std: Sequence[float] = (0.25,),
        dtype: DTypeLike = jnp.float32,
        rngs: nnx.Rngs,
    ):
        if head not in HEADS:
            raise ValueError(f"unknown head {head!r}; valid: {', '.join(HEADS)}")
        self.standardize = Standardize(in_channels, input_mean, input_std)
        self.pool_r = check_pool_r(pool_r)
        self.blocks = nnx.List([
            ConvBlock(c_in, c_out, dtype=dtype, rngs=rngs)
            for c_in, c_out in zip((in_channels, *widths[:-1]), widths)
        ])
        self.head_type = head
        if head == "lesion":
            self.lesion = nnx.Conv(widths[-1], 1, (1, 1), param_dtype=jnp.float32, rngs=rngs)
            return
        self.hidden = nnx.Linear(widths[-1], hidden, kernel_init=nnx.initializers.he_normal(),
                                 param_dtype=jnp.float32, rngs=rngs)
        self.dropout = nnx.Dropout(dropout, rngs=rngs)
        self.head = nnx.Linear(hidden, 1, param_dtype=jnp.float32, rngs=rngs)

    def __call__(self, x: jax.Array) -> tuple[jax.Array, Intermediates]:
        out: Intermediates = {}
        x = self.standardize(x)
        for i, block in enumerate(self.blocks):
            x = stage(out, f"block{i + 1}", block(x))
        if self.head_type == "lesion":
            out["pre_logits"] = global_pool(x, self.pool_r)
            cells = stage(out, "lesion_logits", self.lesion(x.astype(jnp.float32))[..., 0])
            return global_pool(cells[..., None], self.pool_r)[:, 0], out
        x = stage(out, "pre_logits", nnx.relu(self.hidden(global_pool(x, self.pool_r))))
        return self.head(self.dropout(x))[:, 0].astype(jnp.float32), out
