"""Model registry. Every model keeps one contract, so the trainer, transfer learning, Grad-CAM
and feature extraction never special-case an architecture; `contract.check(name)` verifies it
on a tiny input, and the tests run it over every registered model:

- built as `Model(*, in_channels=1, dtype=jnp.float32, rngs=nnx.Rngs(...), input_mean=...,
  input_std=..., pool_r=0.0, **kwargs)`; `dtype` is the computation dtype, parameters are
  always float32;
- `model(x)` takes float32 (B, H, W, in_channels) images in [0, 1], any H, W >= 32,
  and returns `(logits, intermediates)`: float32 logits (B,) with sigmoid =
  P(PNEUMONIA), and a dict of the named stages in the order computed: spatial activations
  (B, h, w, c) (per-cell scores may be (B, h, w)), then `pre_logits` (B, features), the tensor
  the last layer reads;
- each stage is recorded with `x = stages.stage(out, name, y)`, and the model goes on with
  the `x` it returns, so that a perturbation there (`stages.perturbed`) reaches the logits:
  Grad-CAM and the contract check take every stage's activation gradient that way. A stage
  recorded beside the computation (`out[name] = y`) has a zero gradient and is refused;
- `model.train()` / `model.eval()` switch BatchNorm and Dropout; dropout draws from
  the "dropout" stream of the `rngs` given at construction (else "default");
- convolutions, batch norms and max-pools are `Conv`, `BatchNorm` and `max_pool` from
  `pneumojax.xla_cpu`: flax's own, with exact XLA:CPU kernels behind one switch;
- inputs are standardised inside the model with `standardize.mean` / `.std`
  (`nnx.Variable`s, set by `input_mean` / `input_std`);
- `pool_r` sets the global pooling before the head: 0 (the default) is the mean,
  r > 0 log-sum-exp pooling, whose Grad-CAM maps are tighter (`cnn.global_pool`);
- transfer groups, declared on the class: `TRANSFER_GROUPS` maps every top-level attribute
  that holds parameters to a group, one of them `head`, and `UNFREEZE_ORDER` lists all the
  other groups, top down. `train.freeze=backbone` trains the head alone, `progressive` thaws
  `UNFREEZE_ORDER` in turn, `train.lr_multipliers` scales groups (`pneumojax.transfer`).
  A parameter's group is found from its top-level attribute, so one attribute name means
  one group throughout the registry (`register` refuses a conflict).

Optional class attributes: `LESION_KWARGS`, the constructor keywords under which the model
also records per-cell scores `lesion_logits` (B, h, w), which `train.lesion_weight` fits to
lesion masks; `TINY_KWARGS`, the keywords of a small instance that tests and
`contract.check` build. ImageNet weights (`model.init=imagenet:SOURCE`) exist for the models
that `pneumojax.weights.SOURCES` lists.

Adding a model is one registration, checked at once against the declarations:

    @models.register("vgg")
    class VGG(nnx.Module):
        TRANSFER_GROUPS = {"features": "backbone", "classifier": "head"}
        UNFREEZE_ORDER = ("backbone",)
        ...
"""

from collections.abc import Callable
from typing import TypeVar

import jax
from flax import nnx

from pneumojax.models import contract
from pneumojax.models.cnn import DeepCNN, ShallowCNN
from pneumojax.models.resnet import ResNet50
from pneumojax.models.xception import Xception

M = TypeVar("M", bound=type[nnx.Module])

MODELS: dict[str, type[nnx.Module]] = {}


def register(name: str) -> Callable[[M], M]:
    """Class decorator: `MODELS[name] = cls`, once its declarations pass
    `contract.declaration_problems` and agree with the registered models' groups."""
    def add(cls: M) -> M:
        if name in MODELS and MODELS[name] is not cls:
            raise ValueError(f"model name {name!r} is taken by {MODELS[name].__qualname__}")
        if problems := contract.declaration_problems(cls):
            raise contract.ContractError(f"{name}: {problems[0]}")
        MODELS[name] = cls
        try:
            transfer_groups()
        except ValueError:
            del MODELS[name]
            raise
        return cls
    return add


def get(name: str) -> type[nnx.Module]:
    """The class registered as `name`."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; valid names: {', '.join(sorted(MODELS))}")
    return MODELS[name]


def create(name: str, *, rngs: nnx.Rngs, **kwargs) -> nnx.Module:
    """Builds `MODELS[name](rngs=rngs, **kwargs)`, so a config names its model by string."""
    return get(name)(rngs=rngs, **kwargs)


def transfer_groups() -> dict[str, str]:
    """Top-level attribute -> transfer group, over every registered model's `TRANSFER_GROUPS`.

    Raises if two models put one attribute name in different groups: parameters are grouped
    by that name alone (a checkpoint's state does not say which model it belongs to).
    """
    merged: dict[str, tuple[str, str]] = {}  # attribute -> (group, the model that says so)
    for name, cls in MODELS.items():
        for attribute, group in cls.TRANSFER_GROUPS.items():
            other, by = merged.setdefault(attribute, (group, name))
            if other != group:
                raise ValueError(f"{name} puts attribute {attribute!r} in transfer group "
                                 f"{group!r}, {by} puts it in {other!r}; rename the attribute "
                                 "or the group")
    return {attribute: group for attribute, (group, _) in merged.items()}


def count_params(model: nnx.Module, kind: nnx.filterlib.Filter = nnx.Param) -> int:
    """Number of scalars in the variables matching `kind` (any nnx filter)."""
    return sum(leaf.size for leaf in jax.tree.leaves(nnx.state(model, kind)))


register("shallow_cnn")(ShallowCNN)
register("deep_cnn")(DeepCNN)
register("resnet50")(ResNet50)
register("xception")(Xception)

__all__ = ["MODELS", "DeepCNN", "ResNet50", "ShallowCNN", "Xception", "contract", "count_params",
           "create", "get", "register", "transfer_groups"]
