"""Transfer learning: which parameters train when, and how fast.

Each model declares its groups (`pneumojax.models`): `TRANSFER_GROUPS` maps its top-level
attributes to groups, one of them `head`, and `UNFREEZE_ORDER` lists the others top down
(ResNet50: `stage4`, `stage3`, `stage2`, `stage1`, `stem`; the CNNs: `backbone`). This module
reads those declarations and holds no names of its own; a parameter's group is that of its
top-level attribute across the registry (`models.transfer_groups`), so a checkpoint's state
is grouped without its model. `train.freeze` picks what trains:
`none`; `backbone` (feature extraction: only the head); `progressive` (the head first, then
the groups of `UNFREEZE_ORDER` in turn, at the epochs in `train.unfreeze_epochs`). A frozen
group is not differentiated at all: the train step takes gradients of the trainable
parameters only, so XLA computes no backward pass through frozen layers below the lowest
trainable one, and the optimizer holds state for trainable parameters only. Batch norm in
frozen groups runs in inference mode.
"""

from __future__ import annotations

from typing import Any

import jax
import ml_collections
import optax
from flax import nnx

from pneumojax import models
from pneumojax.models.contract import HEAD

FREEZE_MODES = ("none", "backbone", "progressive")


def groups() -> tuple[str, ...]:
    """Every group some registered model declares: what `train.lr_multipliers` may name."""
    return tuple(dict.fromkeys(models.transfer_groups().values()))


def group(path: tuple) -> str:
    """The group of a parameter, from its path in the model's state."""
    top = str(getattr(path[0], "key", path[0]))
    declared = models.transfer_groups()
    if top not in declared:
        raise ValueError(f"parameters under {top!r} are in no transfer group; declare {top!r} "
                         "in the model's TRANSFER_GROUPS (pneumojax.models)")
    return declared[top]


def frozen_groups(config: ml_collections.ConfigDict, epoch: float) -> frozenset[str]:
    """The groups that do not train at `epoch` (a pure function, so resuming needs nothing)."""
    mode = config.train.freeze
    if mode not in FREEZE_MODES:
        raise ValueError(f"train.freeze={mode!r}; choose from {', '.join(FREEZE_MODES)}")
    if mode == "none":
        return frozenset()
    cls = models.get(config.model.name)
    backbone = frozenset(cls.TRANSFER_GROUPS.values()) - {HEAD}
    if mode == "backbone":
        return backbone
    epochs = tuple(config.train.unfreeze_epochs)
    thawed = {g for g, e in zip(cls.UNFREEZE_ORDER, epochs) if epoch >= e}
    return backbone - thawed


def split(params: nnx.State, frozen: frozenset[str]) -> tuple[nnx.State, nnx.State]:
    """(trainable, frozen) parameters."""
    return nnx.split_state(params, lambda path, _: group(path) not in frozen, ...)


def freeze_batch_norm(model: nnx.Module, frozen: frozenset[str]) -> None:
    """Frozen groups keep their running statistics: inference-mode batch norm there."""
    for attribute, g in type(model).TRANSFER_GROUPS.items():
        if g in frozen and isinstance(sub := getattr(model, attribute, None), nnx.Module):
            sub.eval()


def optimizer(base: optax.GradientTransformation, config: ml_collections.ConfigDict
              ) -> optax.GradientTransformation:
    """`base`, then each group's updates scaled by `train.lr_multipliers` (discriminative LRs).

    The scales are stateless, so they add no optimizer state.
    """
    multipliers, known = dict(config.train.lr_multipliers), groups()
    if unknown := set(multipliers) - set(known):
        raise ValueError(f"train.lr_multipliers has unknown groups {sorted(unknown)}; "
                         f"groups are {', '.join(known)}")
    labels = lambda params: jax.tree_util.tree_map_with_path(lambda p, _: group(p), params)
    return optax.chain(base, optax.multi_transform(
        {g: optax.scale(float(multipliers.get(g, 1.0))) for g in known}, labels))


def graft(new: Any, old: Any) -> Any:
    """`new` optimizer state, with every leaf that `old` also has (same path) taken from `old`.

    When a group unfreezes, its moments start at zero while the others keep theirs and the
    step count (and so the schedule) carries on.
    """
    old_leaves = {jax.tree_util.keystr(p): x for p, x in jax.tree_util.tree_leaves_with_path(old)}
    return jax.tree_util.tree_map_with_path(
        lambda p, x: old_leaves.get(jax.tree_util.keystr(p), x), new)
