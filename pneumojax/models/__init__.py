"""Model registry. Every model shares one contract, so the trainer, Grad-CAM and
feature extraction never special-case an architecture:

- built as `Model(*, in_channels=1, dtype=jnp.float32, rngs=nnx.Rngs(...), **kwargs)`;
  `dtype` is the computation dtype, parameters are always float32;
- `model(x)` takes float32 (B, H, W, in_channels) images in [0, 1], any H, W >= 32,
  and returns `(logits, intermediates)`: float32 logits (B,) with sigmoid =
  P(PNEUMONIA), and an ordered dict of the named stage activations (B, h, w, c)
  followed by `pre_logits` (B, features), the very tensors the next stage consumes;
- `model.train()` / `model.eval()` switch BatchNorm and Dropout; dropout draws from
  the "dropout" stream of the `rngs` given at construction (else "default");
- inputs are standardised inside the model with `standardize.mean` / `.std`
  (`nnx.Variable`s, set by `input_mean` / `input_std`);
- `pool_r` sets the global pooling before the head: 0 (the default) is the mean,
  r > 0 log-sum-exp pooling, whose Grad-CAM maps are tighter (`cnn.global_pool`).
"""

import jax
from flax import nnx

from pneumojax.models.cnn import DeepCNN, ShallowCNN
from pneumojax.models.resnet import ResNet50

MODELS: dict[str, type[nnx.Module]] = {
    "shallow_cnn": ShallowCNN,
    "deep_cnn": DeepCNN,
    "resnet50": ResNet50,
}


def create(name: str, *, rngs: nnx.Rngs, **kwargs) -> nnx.Module:
    """Builds `MODELS[name](rngs=rngs, **kwargs)`, so a config names its model by string."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; valid names: {', '.join(sorted(MODELS))}")
    return MODELS[name](rngs=rngs, **kwargs)


def count_params(model: nnx.Module, kind: nnx.filterlib.Filter = nnx.Param) -> int:
    """Number of scalars in the variables matching `kind` (any nnx filter)."""
    return sum(leaf.size for leaf in jax.tree.leaves(nnx.state(model, kind)))


__all__ = ["MODELS", "DeepCNN", "ResNet50", "ShallowCNN", "count_params", "create"]
