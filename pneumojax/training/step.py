"""The train step: augment on device, forward, loss, gradients, optax; pure, then jitted.

    from pneumojax.training import step
    train_step, state = step.build(config, mesh)           # jitted, and the state it starts from
    print(train_step.lower(state, batch).as_text())        # inspect what XLA receives

The NNX model is split once into a graph definition and a state pytree; the step is a function
of plain pytrees, so no Python object graph is walked per step. The train state is a dict
{params, rest, opt_state, step}: `rest` holds batch-norm statistics and the dropout RNG
stream, and every per-step random number derives from (seed, step), so a resumed run repeats
an uninterrupted one bit for bit.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx

from pneumojax import inference, losses, sharding, transfer
from pneumojax.data import augment

State = inference.State
Batch = dict[str, jax.Array]  # image (B, H, W, 1) uint8, label (B,) int32[, lesion_mask]
MIXUP_STREAM = 1  # folded into a step's key for mixup's draws, apart from augmentation's


def init_model(config: ml_collections.ConfigDict, pretrained: bool = True
               ) -> tuple[nnx.GraphDef, State]:
    """(eval graphdef, {params, rest}) of a fresh model. With `model.init = imagenet:SOURCE`
    the backbone starts from the cached ImageNet weights, folded to one input channel;
    `pretrained=False` skips that (a checkpoint follows)."""
    model = inference.create_model(config)
    if pretrained and config.model.init != "scratch":
        _load_imagenet(model, config)
    model.eval()
    graphdef_eval, params, rest = nnx.split(model, nnx.Param, ...)
    return graphdef_eval, dict(params=params, rest=rest)


def _load_imagenet(model: nnx.Module, config: ml_collections.ConfigDict) -> None:
    from pneumojax import weights
    from pneumojax.weights import convert

    name = config.model.init.partition(":")[2]  # config_check: imagenet:SOURCE
    tree, preprocessing, variant = weights.load(config.model.name, name)
    if variant and variant != config.model.kwargs.get("variant", "v1.5"):  # the file's own
        raise ValueError(f"{name} weights are ResNet50 {variant}; add "
                         f"--config.model.kwargs.variant={variant}")
    convert.load_into(model, *convert.to_grayscale(tree, preprocessing))


def train_graphdef(config: ml_collections.ConfigDict, frozen: frozenset[str]) -> nnx.GraphDef:
    """The train-mode graph with batch norm of the frozen groups in inference mode."""
    model = nnx.eval_shape(lambda: inference.create_model(config))
    model.train()
    transfer.freeze_batch_norm(model, frozen)
    return nnx.graphdef(model)


def make_optimizer(config: ml_collections.ConfigDict, steps_per_epoch: int, total_steps: int
                   ) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """AdamW with linear warm-up and cosine decay, after global-norm clipping."""
    t = config.train
    warmup = min(int(t.warmup_epochs * steps_per_epoch), total_steps - 1)
    schedule = optax.warmup_cosine_decay_schedule(
        0.0, t.learning_rate, warmup, total_steps, end_value=t.learning_rate * t.end_lr_factor)
    # No decay on biases and norm scales: only kernels (ndim > 1) are regularised.
    decay_mask = lambda params: jax.tree.map(lambda p: p.ndim > 1, params)
    tx = optax.chain(optax.clip_by_global_norm(t.grad_clip),
                     optax.adamw(schedule, weight_decay=t.weight_decay, mask=decay_mask))
    return transfer.optimizer(tx, config), schedule


def class_weights(counts: dict[str, int], enabled: bool) -> jax.Array:
    """Inverse class frequency, normalised so a balanced set gets (1, 1)."""
    n = np.array([counts["NORMAL"], counts["PNEUMONIA"]], np.float32)
    if not enabled:
        return jnp.ones(2)
    if (n == 0).any():
        raise ValueError(f"train split lacks a class: {counts}")
    return jnp.asarray(n.sum() / (2 * n))


def mixup(images: jax.Array, labels: jax.Array, key: jax.Array, alpha: float
          ) -> tuple[jax.Array, jax.Array]:
    """(images, float targets) of mixup (Zhang et al. 2018): each example blended with a
    partner from a permutation of the batch, lambda ~ Beta(alpha, alpha) per example.

    Blends with labels in proportion ask for scores that vary linearly between examples
    rather than a memorised confident score per image: a regulariser often said to help
    calibration and shifted cohorts, though not on this project's proxy (docs/cohort.md).
    Partners are gathered across the whole batch, however it is sharded (`out_sharding` keeps
    explicit sharding along B)."""
    perm_key, lam_key = jax.random.split(key)
    perm = jax.random.permutation(perm_key, images.shape[0])
    lam = jax.random.beta(lam_key, alpha, alpha, labels.shape)
    partner = lambda a: a.at[perm].get(out_sharding=jax.typeof(a).sharding)
    y = labels.astype(jnp.float32)
    blend = lam.reshape(-1, *[1] * (images.ndim - 1))
    return blend * images + (1 - blend) * partner(images), lam * y + (1 - lam) * partner(y)


def make_train_step(graphdef_train: nnx.GraphDef, tx: optax.GradientTransformation,
                    config: ml_collections.ConfigDict, weights: jax.Array,
                    frozen: frozenset[str] = frozenset()
                    ) -> Callable[..., tuple[State, dict[str, jax.Array]]]:
    """The pure train step, before jit: `(state, images, labels[, lesion_masks]) -> (state,
    metrics)`. With `train.mixup` > 0 the augmented batch is mixed (`mixup`) before the loss.

    Gradients are taken of the trainable parameters only: frozen ones are constants, so no
    backward pass runs through frozen layers below the lowest trainable one.
    """
    aug = augment.AugmentConfig(**config.data.augment)
    dtype = jnp.dtype(config.model.dtype)
    key = jax.random.key(config.train.seed)
    classify = losses.get(config.train.loss)

    def train_step(state: State, images: jax.Array, labels: jax.Array,
                   lesion_masks: jax.Array | None = None) -> tuple[State, dict]:
        step_key = jax.random.fold_in(key, state["step"])
        x = augment.augment_batch(images, step_key, aug, lesion_masks,
                                  intensity=config.data.intensity)
        x, masks = x if lesion_masks is not None else (x, None)
        targets = labels
        if config.train.mixup > 0:  # config_check: not with lesion masks, which it cannot mix
            x, targets = mixup(x, labels, jax.random.fold_in(step_key, MIXUP_STREAM),
                               config.train.mixup)

        trainable, fixed = transfer.split(state["params"], frozen)

        def loss_fn(trainable):
            # copy=True: fresh Variables in this trace; the split state holds the outer ones
            model = nnx.merge(graphdef_train, trainable, fixed, state["rest"], copy=True)
            logits, inter = model(x.astype(dtype))
            loss = classify(logits, targets, weights, config.train.label_smoothing)
            parts = {}
            if masks is not None:
                parts["lesion_loss"] = losses.lesion_loss(inter, masks)
                loss += config.train.lesion_weight * parts["lesion_loss"]
            return loss, (nnx.state(model, nnx.Not(nnx.Param)), parts)

        (loss, (rest, parts)), grads = jax.value_and_grad(loss_fn, has_aux=True)(trainable)
        with jax.named_scope("optimizer"):  # labels its kernels in profiles (profile_step)
            updates, opt_state = tx.update(grads, state["opt_state"], trainable)
            params = nnx.merge_state(optax.apply_updates(trainable, updates), fixed)
        new = dict(params=params, rest=rest, opt_state=opt_state, step=state["step"] + 1)
        return new, {"loss": loss, "grad_norm": optax.tree.norm(grads), **parts}

    return train_step


def init_state(config: ml_collections.ConfigDict, tx: optax.GradientTransformation,
               frozen: frozenset[str], mesh: jax.sharding.Mesh, pretrained: bool = True
               ) -> State:
    """A fresh train state, replicated over `mesh`: the optimizer holds state for the
    trainable groups only."""
    _, fresh = init_model(config, pretrained)
    opt_state = tx.init(transfer.split(fresh["params"], frozen)[0])
    return jax.device_put(dict(fresh, opt_state=opt_state, step=jnp.int32(0)),
                          sharding.replicated(mesh))


def jit_train_step(train_step: Callable, mesh: jax.sharding.Mesh, fields: tuple[str, ...]
                   ) -> Callable[[State, Batch], tuple[State, dict[str, jax.Array]]]:
    """`train_step` jitted over `mesh`: state replicated, the batch (a dict with `fields`)
    split along ('data',), the old state's buffers donated."""
    repl = sharding.replicated(mesh)
    return jax.jit(lambda s, b: train_step(s, *(b[k] for k in fields)),
                   in_shardings=(repl, sharding.batch_sharded(mesh)),
                   out_shardings=(repl, repl), donate_argnums=0)


def build(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh | None = None, *,
          class_counts: dict[str, int] | None = None, steps_per_epoch: int = 100,
          frozen: frozenset[str] = frozenset(), pretrained: bool = True
          ) -> tuple[Callable[[State, Batch], tuple[State, dict]], State]:
    """(jitted step over {image, label} batches, fresh state): the step the trainer runs, on
    its own, for a user to call, time, lower or profile. `class_counts` sets the class weights
    (default balanced); the schedule spans `config.train.epochs` of `steps_per_epoch`."""
    mesh = mesh or sharding.make_mesh(config.train.num_devices)
    total = max(1, int(config.train.epochs * steps_per_epoch))
    tx, _ = make_optimizer(config, steps_per_epoch, total)
    weights = class_weights(class_counts or {"NORMAL": 1, "PNEUMONIA": 1},
                            config.train.class_weights)
    train_step = make_train_step(train_graphdef(config, frozen), tx, config, weights, frozen)
    return (jit_train_step(train_step, mesh, ("image", "label")),
            init_state(config, tx, frozen, mesh, pretrained))
