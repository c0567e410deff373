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

from pneumojax.models.stages import Intermediates, stage
from pneumojax.xla_cpu import BatchNorm, Conv, max_pool


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


class ShallowCNN(nnx.Module):
    """Three 3x3 conv + ReLU + 2x2 max-pool layers, widths (w, 2w, 4w), then global pooling
    (`pool_r`: see `global_pool`) and a logit.

    Deliberately without BatchNorm or dropout: the simplest baseline that can learn
    the task, against which the deeper models must earn their cost.
    """

    # The contract of pneumojax.models: transfer groups, unfreezing order, a test-sized build.
    TRANSFER_GROUPS = {"convs": "backbone", "head": "head"}
    UNFREEZE_ORDER = ("backbone",)
    TINY_KWARGS = dict(width=4)

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
            Conv(c_in, c_out, (3, 3), padding="SAME", kernel_init=nnx.initializers.he_normal(),
                 dtype=dtype, param_dtype=jnp.float32, rngs=rngs)
            for c_in, c_out in zip((in_channels, *widths[:-1]), widths)
        ])
        self.head = nnx.Linear(widths[-1], 1, param_dtype=jnp.float32, rngs=rngs)

    def __call__(self, x: jax.Array) -> tuple[jax.Array, Intermediates]:
        out: Intermediates = {}
        x = self.standardize(x)
        for i, conv in enumerate(self.convs):
            x = stage(out, f"block{i + 1}", max_pool(nnx.relu(conv(x)), (2, 2), strides=(2, 2)))
        x = stage(out, "pre_logits", global_pool(x, self.pool_r))
        return self.head(x)[:, 0].astype(jnp.float32), out


class ConvBlock(nnx.Module):
    """Two 3x3 conv + BatchNorm + ReLU, then a 2x2 max-pool (the classic VGG-style block)."""

    def __init__(self, c_in: int, c_out: int, *, dtype: DTypeLike, rngs: nnx.Rngs):
        # No conv bias: the BatchNorm right after would cancel it.
        conv = dict(kernel_size=(3, 3), padding="SAME", use_bias=False, dtype=dtype,
                    param_dtype=jnp.float32, kernel_init=nnx.initializers.he_normal(), rngs=rngs)
        bn = dict(momentum=0.9, dtype=dtype, param_dtype=jnp.float32, rngs=rngs)
        self.conv1 = Conv(c_in, c_out, **conv)
        self.bn1 = BatchNorm(c_out, **bn)
        self.conv2 = Conv(c_out, c_out, **conv)
        self.bn2 = BatchNorm(c_out, **bn)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = nnx.relu(self.bn1(self.conv1(x)))
        x = nnx.relu(self.bn2(self.conv2(x)))
        return max_pool(x, (2, 2), strides=(2, 2))


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
    must recover. `hidden` and `dropout` are unused; `pre_logits` is the pooled cell score
    (B, 1), of which the logit is the one column.
    """

    # The contract of pneumojax.models; `hidden`, `head` and `lesion` all form the head group.
    TRANSFER_GROUPS = {"blocks": "backbone", "hidden": "head", "head": "head", "lesion": "head"}
    UNFREEZE_ORDER = ("backbone",)
    LESION_KWARGS = dict(head="lesion")  # records lesion_logits, for train.lesion_weight
    TINY_KWARGS = dict(widths=(4, 8), hidden=8)

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
            cells = stage(out, "lesion_logits", self.lesion(x.astype(jnp.float32))[..., 0])
            x = stage(out, "pre_logits", global_pool(cells[..., None], self.pool_r))
            return x[:, 0], out
        x = stage(out, "pre_logits", nnx.relu(self.hidden(global_pool(x, self.pool_r))))
        return self.head(self.dropout(x))[:, 0].astype(jnp.float32), out
