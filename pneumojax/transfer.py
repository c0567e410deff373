"""Transfer learning: which parameters train when, and how fast.

Parameters fall into groups: `stem`, `stage1`..`stage4`, `head` for ResNet50, `backbone` and
`head` for the CNNs. `train.freeze` picks what trains: `none`; `backbone` (feature
extraction: only the head); `progressive` (the head first, then `stage4`, `stage3`, ... at the
epochs in `train.unfreeze_epochs`). A frozen group is not differentiated at all: the train step
takes gradients of the trainable parameters only, so XLA computes no backward pass through
frozen layers below the lowest trainable one, and the optimizer holds state for trainable
parameters only. Batch norm in frozen groups runs in inference mode.
"""

from __future__ import annotations

from typing import Any

import jax
import ml_collections
import optax
from flax import nnx

RESNET_GROUPS = {"conv1": "stem", "bn1": "stem", "layer1": "stage1", "layer2": "stage2",
                 "layer3": "stage3", "layer4": "stage4", "head": "head"}
PROGRESSIVE_ORDER = ("stage4", "stage3", "stage2", "stage1", "stem")  # top down
FREEZE_MODES = ("none", "backbone", "progressive")
GROUPS = (*dict.fromkeys(RESNET_GROUPS.values()), "backbone")  # what train.lr_multipliers names


def group(path: tuple) -> str:
    """The group of a parameter, from its path in the model's state."""
    top = str(getattr(path[0], "key", path[0]))
    if top in RESNET_GROUPS:
        return RESNET_GROUPS[top]
    return "head" if top in ("head", "hidden", "lesion") else "backbone"


def frozen_groups(config: ml_collections.ConfigDict, epoch: float) -> frozenset[str]:
    """The groups that do not train at `epoch` (a pure function, so resuming needs nothing)."""
    mode = config.train.freeze
    if mode not in FREEZE_MODES:
        raise ValueError(f"train.freeze={mode!r}; choose from {', '.join(FREEZE_MODES)}")
    if mode == "none":
        return frozenset()
    backbone = frozenset(PROGRESSIVE_ORDER) | {"backbone"}
    if mode == "backbone":
        return backbone
    if config.model.name != "resnet50":
        raise ValueError("train.freeze='progressive' unfreezes ResNet50 stages; "
                         f"{config.model.name} has none")
    epochs = tuple(config.train.unfreeze_epochs)
    thawed = {g for g, e in zip(PROGRESSIVE_ORDER, epochs) if epoch >= e}
    return backbone - thawed


def split(params: nnx.State, frozen: frozenset[str]) -> tuple[nnx.State, nnx.State]:
    """(trainable, frozen) parameters."""
    return params.split(lambda path, _: group(path) not in frozen, ...)


def freeze_batch_norm(model: nnx.Module, frozen: frozenset[str]) -> None:
    """Frozen groups keep their running statistics: inference-mode batch norm there."""
    for name, g in RESNET_GROUPS.items():
        if g in frozen and hasattr(model, name):
            getattr(model, name).eval()
    if "backbone" in frozen:
        for name, sub in vars(model).items():
            if isinstance(sub, (nnx.Module, nnx.List)) and name not in ("head", "hidden"):
                sub.eval()


def optimizer(base: optax.GradientTransformation, config: ml_collections.ConfigDict
              ) -> optax.GradientTransformation:
    """`base`, then each group's updates scaled by `train.lr_multipliers` (discriminative LRs).

    The scales are stateless, so they add no optimizer state.
    """
    multipliers = dict(config.train.lr_multipliers)
    if unknown := set(multipliers) - set(GROUPS):
        raise ValueError(f"train.lr_multipliers has unknown groups {sorted(unknown)}; "
                         f"groups are {', '.join(GROUPS)}")
    labels = lambda params: jax.tree_util.tree_map_with_path(lambda p, _: group(p), params)
    return optax.chain(base, optax.multi_transform(
        {g: optax.scale(float(multipliers.get(g, 1.0))) for g in GROUPS}, labels))


def graft(new: Any, old: Any) -> Any:
    """`new` optimizer state, with every leaf that `old` also has (same path) taken from `old`.

    When a group unfreezes, its moments start at zero while the others keep theirs and the
    step count (and so the schedule) carries on.
    """
    old_leaves = {jax.tree_util.keystr(p): x for p, x in jax.tree_util.tree_leaves_with_path(old)}
    return jax.tree_util.tree_map_with_path(
        lambda p, x: old_leaves.get(jax.tree_util.keystr(p), x), new)
