"""Training losses, chosen by name (`train.loss`) from `LOSSES`.

Each classification loss is `loss(logits (B,), labels (B,), weights (2,), smoothing) ->
scalar`: `labels` are int 0/1, or float soft targets in [0, 1] where mixup (`train.mixup`)
blends two examples. `weights` are per-class (inverse class frequency by default,
`train.class_weights`) and the mean is weighted by them, so a batch's loss does not depend on
its class mix; a soft target blends the two classes' weights as it blends the classes.
`smoothing` moves the targets towards 1/2 (label smoothing). A new loss is one function here
and one name in `LOSSES`; config_check offers the names.

The lesion loss is added to the classification loss when `train.lesion_weight > 0`.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax

Loss = Callable[[jax.Array, jax.Array, jax.Array, float], jax.Array]


def _targets(labels: jax.Array, smoothing: float) -> jax.Array:
    return labels.astype(jnp.float32) * (1 - smoothing) + smoothing / 2


def _weighted_mean(per_example: jax.Array, labels: jax.Array, weights: jax.Array) -> jax.Array:
    if jnp.issubdtype(labels.dtype, jnp.integer):
        w = weights[labels]
    else:  # mixup: lambda w[y_i] + (1 - lambda) w[y_j], since the target mixes y_i and y_j so
        w = weights[0] * (1 - labels) + weights[1] * labels
    return jnp.sum(w * per_example) / jnp.sum(w)


def weighted_bce(logits: jax.Array, labels: jax.Array, weights: jax.Array,
                 smoothing: float = 0.0) -> jax.Array:
    """Binary cross-entropy of the logit."""
    per_example = optax.sigmoid_binary_cross_entropy(logits, _targets(labels, smoothing))
    return _weighted_mean(per_example, labels, weights)


def focal(logits: jax.Array, labels: jax.Array, weights: jax.Array,
          smoothing: float = 0.0, gamma: float = 2.0) -> jax.Array:
    """Focal loss (Lin et al. 2017): cross-entropy scaled by (1 - p_t)^gamma, so the many
    examples the model already gets right weigh less than the hard ones. The class balance
    comes from `weights` (its alpha)."""
    per_example = optax.sigmoid_focal_loss(logits, _targets(labels, smoothing), gamma=gamma)
    return _weighted_mean(per_example, labels, weights)


LOSSES: dict[str, Loss] = {"bce": weighted_bce, "focal": focal}


def get(name: str) -> Loss:
    if name not in LOSSES:
        raise ValueError(f"unknown loss {name!r}; valid: {', '.join(LOSSES)}")
    return LOSSES[name]


def lesion_share(masks: jax.Array, grid: tuple[int, int]) -> jax.Array:
    """(B, H, W) masks -> (B, h, w): the share of each cell of an h x w grid that they cover.
    The lesion head's target, and the ideal map that localisation compares maps with."""
    (b, size_h, size_w), (h, w) = masks.shape, grid
    if size_h % h or size_w % w:
        raise ValueError(f"lesion masks of {(size_h, size_w)} px do not tile a {h}x{w} grid")
    masks = jnp.asarray(masks, jnp.float32)
    return masks.reshape(b, h, size_h // h, w, size_w // w).mean((2, 4))


def lesion_loss(intermediates: dict[str, jax.Array], masks: jax.Array) -> jax.Array:
    """Mean binary cross-entropy of the model's per-cell `lesion_logits` (B, h, w) against
    the share of each cell that (B, H, W, 1) float `masks` mark. A cell half covered by a
    lesion has target 0.5, so a cell's score grows with how much of it is lesion, and the
    strongest cell lies inside the lesion rather than on its rim."""
    if "lesion_logits" not in intermediates:
        raise ValueError("train.lesion_weight > 0 needs a model that scores cells (records "
                         "`lesion_logits`), e.g. deep_cnn with model.kwargs.head='lesion'")
    cells = intermediates["lesion_logits"]
    share = lesion_share(masks[..., 0], cells.shape[1:])
    return optax.sigmoid_binary_cross_entropy(cells.astype(jnp.float32), share).mean()
