"""ResNet50 with torchvision's exact topology, so ImageNet weights port mechanically.

Two variants behind one flag, each exact:

- "v1.5" (torchvision, timm): stride on the 3x3 conv; convs have no bias; BN eps 1e-5.
- "v1" (Keras `applications.ResNet50`): stride on the block's first 1x1 conv; every
  conv, the stem included, has a bias; BN eps 1.001e-5.

Padding is explicit and symmetric, never 'SAME': for a stride-2 conv XLA's 'SAME'
pads (2, 3) where torch pads (3, 3), which shifts every output by one pixel and
silently breaks parity with ported weights. The stem max-pool pads with -inf, as
torch does. BN momentum 0.1 in torch is `momentum=0.9` here.

Parameter names, torchvision state dict -> this model (kernels are transposed
OIHW -> HWIO, i.e. `w.transpose(2, 3, 1, 0)`):

    conv1.weight                       -> conv1.kernel
    bn1.{weight,bias}                  -> bn1.{scale,bias}
    bn1.{running_mean,running_var}     -> bn1.{mean,var}          (nnx.BatchStat)
    layerS.B.convK.weight              -> layerS[B].convK.kernel   (K = 1, 2, 3)
    layerS.B.bnK.*                     -> layerS[B].bnK.*          (as bn1 above)
    layerS.0.downsample.0.weight       -> layerS[0].downsample_conv.kernel
    layerS.0.downsample.1.*            -> layerS[0].downsample_bn.*
    fc.*                               -> not ported: `head` is a fresh 2048 -> 1 logit
    (no torch counterpart)             -> standardize.{mean,std}  (input preprocessing)

For "v1" (Keras) each conv also has `.bias`, e.g. conv2_block1_1_conv/bias ->
layer1[0].conv1.bias and conv2_block1_0_conv -> layer1[0].downsample_conv.
"""

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx
from jax.typing import DTypeLike

from pneumojax.models.cnn import Standardize, check_pool_r, global_pool
from pneumojax.models.stages import Intermediates, stage
from pneumojax.xla_cpu import BatchNorm, Conv, max_pool

VARIANTS = ("v1.5", "v1")
EXPANSION = 4
# Every nnx.Param except the classifier head: what ImageNet weights initialise.
BACKBONE = nnx.All(nnx.Param, nnx.Not(nnx.PathContains("head")))

# torch's conv weight init (kaiming_normal_, mode="fan_out", relu), untruncated.
_kaiming = nnx.initializers.variance_scaling(2.0, "fan_out", "normal")


class Bottleneck(nnx.Module):
    """1x1 reduce -> 3x3 -> 1x1 expand (x4), plus the shortcut; ReLU after the sum."""

    def __init__(
        self,
        c_in: int,
        planes: int,
        stride: int,
        *,
        variant: str,
        zero_init_residual: bool,
        dtype: DTypeLike,
        rngs: nnx.Rngs,
    ):
        v1 = variant == "v1"
        conv = dict(use_bias=v1, dtype=dtype, param_dtype=jnp.float32, kernel_init=_kaiming,
                    rngs=rngs)
        bn = dict(momentum=0.9, epsilon=1.001e-5 if v1 else 1e-5, dtype=dtype,
                  param_dtype=jnp.float32, rngs=rngs)
        c_out = planes * EXPANSION
        stride_1x1, stride_3x3 = (stride, 1) if v1 else (1, stride)
        self.conv1 = Conv(c_in, planes, (1, 1), strides=stride_1x1, padding="VALID", **conv)
        self.bn1 = BatchNorm(planes, **bn)
        self.conv2 = Conv(planes, planes, (3, 3), strides=stride_3x3, padding=((1, 1), (1, 1)),
                          **conv)
        self.bn2 = BatchNorm(planes, **bn)
        self.conv3 = Conv(planes, c_out, (1, 1), padding="VALID", **conv)
        # Zero scale makes each block start as the identity (Goyal et al., 2017).
        self.bn3 = BatchNorm(c_out, **bn, scale_init=(
            nnx.initializers.zeros_init() if zero_init_residual else nnx.initializers.ones_init()))
        self.downsample_conv: Conv | None
        self.downsample_bn: BatchNorm | None
        if stride != 1 or c_in != c_out:
            self.downsample_conv = Conv(c_in, c_out, (1, 1), strides=stride, padding="VALID",
                                        **conv)
            self.downsample_bn = BatchNorm(c_out, **bn)
        else:
            self.downsample_conv = self.downsample_bn = None

    def __call__(self, x: jax.Array) -> jax.Array:
        shortcut = x
        if self.downsample_conv is not None:
            shortcut = self.downsample_bn(self.downsample_conv(x))
        y = nnx.relu(self.bn1(self.conv1(x)))
        y = nnx.relu(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(y))
        return nnx.relu(y + shortcut)


class ResNet50(nnx.Module):
    """Stem, four bottleneck stages (`layer1`..`layer4`), global pooling (`pool_r`: see
    `global_pool`), one-logit `head`.

    `width` and `stage_sizes` exist for tiny test variants; the defaults are ResNet50.
    Stage s (1-based) has `width * 2**(s-1)` planes and outputs 4x that many channels.
    """

    # The contract of pneumojax.models: transfer groups, thawed top down by
    # train.freeze=progressive; a test-sized build.
    TRANSFER_GROUPS = {"conv1": "stem", "bn1": "stem", "layer1": "stage1", "layer2": "stage2",
                       "layer3": "stage3", "layer4": "stage4", "head": "head"}
    UNFREEZE_ORDER = ("stage4", "stage3", "stage2", "stage1", "stem")
    TINY_KWARGS = dict(width=4, stage_sizes=(1, 1, 1, 1))

    def __init__(
        self,
        *,
        in_channels: int = 1,
        variant: str = "v1.5",
        width: int = 64,
        stage_sizes: Sequence[int] = (3, 4, 6, 3),
        zero_init_residual: bool = False,
        pool_r: float = 0.0,
        input_mean: Sequence[float] = (0.5,),
        input_std: Sequence[float] = (0.25,),
        dtype: DTypeLike = jnp.float32,
        rngs: nnx.Rngs,
    ):
        if variant not in VARIANTS:
            raise ValueError(f"unknown ResNet variant {variant!r}; valid: {', '.join(VARIANTS)}")
        if len(stage_sizes) != 4:
            raise ValueError(f"ResNet50 has 4 stages, got stage_sizes={stage_sizes}")
        v1 = variant == "v1"
        self.pool_r = check_pool_r(pool_r)
        self.standardize = Standardize(in_channels, input_mean, input_std)
        self.conv1 = Conv(in_channels, width, (7, 7), strides=2, padding=((3, 3), (3, 3)),
                          use_bias=v1, dtype=dtype, param_dtype=jnp.float32,
                          kernel_init=_kaiming, rngs=rngs)
        self.bn1 = BatchNorm(width, momentum=0.9, epsilon=1.001e-5 if v1 else 1e-5,
                             dtype=dtype, param_dtype=jnp.float32, rngs=rngs)
        c_in = width
        stages = []
        for s, size in enumerate(stage_sizes):
            planes = width * 2**s
            blocks = []
            for b in range(size):
                stride = 2 if s > 0 and b == 0 else 1
                blocks.append(Bottleneck(c_in, planes, stride, variant=variant,
                                         zero_init_residual=zero_init_residual, dtype=dtype,
                                         rngs=rngs))
                c_in = planes * EXPANSION
            stages.append(nnx.List(blocks))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.head = nnx.Linear(c_in, 1, param_dtype=jnp.float32, rngs=rngs)

    def __call__(self, x: jax.Array) -> tuple[jax.Array, Intermediates]:
        out: Intermediates = {}
        x = nnx.relu(self.bn1(self.conv1(self.standardize(x))))
        x = stage(out, "stem", max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1))))
        for s, layer in enumerate((self.layer1, self.layer2, self.layer3, self.layer4)):
            for block in layer:
                x = block(x)
            x = stage(out, f"stage{s + 1}", x)
        x = stage(out, "pre_logits", global_pool(x, self.pool_r))
        return self.head(x)[:, 0].astype(jnp.float32), out

    @staticmethod
    def backbone_params(model: "ResNet50") -> int:
        """Trainable parameters that ImageNet weights cover: everything but `head`."""
        return sum(p.size for p in jax.tree.leaves(nnx.state(model, BACKBONE)))
