"""Training: a pure jitted step over a ('data',) mesh, validation, checkpoints, early stopping.

The NNX model is split once into a graph definition and a state pytree; the hot loop is a
`jax.jit` function of plain pytrees, so no Python object graph is walked per step. The train
state is a dict {params, rest, opt_state, step}: `rest` holds batch-norm statistics and the
dropout RNG stream, and every per-step random number derives from (seed, step), so a resumed
run repeats an uninterrupted one bit for bit.
"""

from __future__ import annotations

import contextlib
import json
import math
import pathlib
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx
from tqdm import tqdm

from pneumojax import (checkpoint, cli, config_check, gradcam, metrics, models, plots, sharding,
                       transfer, workdirs)
from pneumojax import data as pdata
from pneumojax.data import augment, builder
from pneumojax.data.sources import CLASSES
from pneumojax.workdirs import load_config

State = dict[str, Any]


def _say(message: str) -> None:
    if jax.process_index() == 0:
        tqdm.write(message)


def create_model(config: ml_collections.ConfigDict, seed: int) -> nnx.Module:
    return models.create(config.model.name, in_channels=1, dtype=jnp.dtype(config.model.dtype),
                         rngs=nnx.Rngs(params=seed, dropout=seed + 1), **config.model.kwargs)


def build(config: ml_collections.ConfigDict, pretrained: bool = True) -> tuple[Any, Any, State]:
    """(train graphdef, eval graphdef, {params, rest}): the model split once, both modes.

    With `model.init = imagenet:SOURCE` the backbone starts from the cached ImageNet weights,
    folded to one input channel; `pretrained=False` skips that when a checkpoint follows.
    """
    model = create_model(config, config.train.seed)
    if pretrained and config.model.init != "scratch":
        _load_imagenet(model, config)
    model.eval()
    graphdef_eval = nnx.graphdef(model)
    model.train()
    graphdef_train, params, rest = nnx.split(model, nnx.Param, ...)
    return graphdef_train, graphdef_eval, dict(params=params, rest=rest)


def _load_imagenet(model: nnx.Module, config: ml_collections.ConfigDict) -> None:
    from pneumojax import weights
    from pneumojax.weights import convert

    name = config.model.init.partition(":")[2]  # config_check: imagenet:SOURCE with resnet50
    tree, preprocessing, variant = weights.load(name)
    if variant != config.model.kwargs.get("variant", "v1.5"):  # the cached file's own
        raise ValueError(f"{name} weights are ResNet50 {variant}; add "
                         f"--config.model.kwargs.variant={variant}")
    convert.load_into(model, *convert.to_grayscale(tree, preprocessing))


def train_graphdef(config: ml_collections.ConfigDict, frozen: frozenset[str]):
    """The train-mode graph with batch norm of the frozen groups in inference mode."""
    model = nnx.eval_shape(lambda: create_model(config, config.train.seed))
    model.train()
    transfer.freeze_batch_norm(model, frozen)
    return nnx.graphdef(model)


def restore(workdir: str | pathlib.Path, which: str | int = "best"
            ) -> tuple[ml_collections.ConfigDict, Any, State, dict, int]:
    """(config, eval graphdef, {params, rest, step}, checkpoint metadata, step) of a checkpoint.

    Only what inference needs is read, onto shapes computed abstractly: nothing is
    initialised twice and the optimizer state is not touched.
    """
    config = load_config(workdir)
    graphdef_eval = nnx.eval_shape(lambda: build(config, pretrained=False))[1]
    ckpt = checkpoint.Checkpointer(pathlib.Path(workdir) / "checkpoints", read_only=True)
    step = ckpt.resolve(which)
    like = jax.eval_shape(lambda: dict(build(config, pretrained=False)[2], step=jnp.int32(0)))
    state, meta = ckpt.restore(step, like, partial=True)
    ckpt.close()
    return config, graphdef_eval, state, meta, step


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


def weighted_bce(logits: jax.Array, labels: jax.Array, weights: jax.Array,
                 smoothing: float = 0.0) -> jax.Array:
    targets = labels.astype(jnp.float32) * (1 - smoothing) + smoothing / 2
    per_example = optax.sigmoid_binary_cross_entropy(logits, targets)
    w = weights[labels]
    return jnp.sum(w * per_example) / jnp.sum(w)


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
        raise ValueError("train.lesion_weight > 0 needs a model that scores cells "
                         "(deep_cnn with model.kwargs.head='lesion')")
    cells = intermediates["lesion_logits"]
    share = lesion_share(masks[..., 0], cells.shape[1:])
    return optax.sigmoid_binary_cross_entropy(cells.astype(jnp.float32), share).mean()


def make_train_step(graphdef_train, tx, config, weights: jax.Array,
                    frozen: frozenset[str] = frozenset()) -> Callable:
    """The pure train step, before jit: augment on device, forward, loss, grads, optax.

    Gradients are taken of the trainable parameters only: frozen ones are constants, so no
    backward pass runs through frozen layers below the lowest trainable one.
    """
    aug = augment.AugmentConfig(**config.data.augment)
    dtype = jnp.dtype(config.model.dtype)
    key = jax.random.key(config.train.seed)

    def train_step(state: State, images: jax.Array, labels: jax.Array,
                   lesion_masks: jax.Array | None = None) -> tuple[State, dict]:
        x = augment.augment_batch(images, jax.random.fold_in(key, state["step"]), aug,
                                  lesion_masks)
        x, masks = x if lesion_masks is not None else (x, None)

        trainable, fixed = transfer.split(state["params"], frozen)

        def loss_fn(trainable):
            # copy=True: fresh Variables in this trace; the split state holds the outer ones
            model = nnx.merge(graphdef_train, trainable, fixed, state["rest"], copy=True)
            logits, inter = model(x.astype(dtype))
            loss = weighted_bce(logits, labels, weights, config.train.label_smoothing)
            parts = {}
            if masks is not None:
                parts["lesion_loss"] = lesion_loss(inter, masks)
                loss += config.train.lesion_weight * parts["lesion_loss"]
            return loss, (nnx.state(model, nnx.Not(nnx.Param)), parts)

        (loss, (rest, parts)), grads = jax.value_and_grad(loss_fn, has_aux=True)(trainable)
        with jax.named_scope("optimizer"):  # labels its kernels in profiles (profile_step)
            updates, opt_state = tx.update(grads, state["opt_state"], trainable)
            params = nnx.merge_state(optax.apply_updates(trainable, updates), fixed)
        new = dict(params=params, rest=rest, opt_state=opt_state, step=state["step"] + 1)
        return new, {"loss": loss, "grad_norm": optax.tree.norm(grads), **parts}

    return train_step


def make_eval_step(graphdef_eval, config) -> Callable:
    """uint8 images -> P(PNEUMONIA), in inference mode, before jit."""
    dtype = jnp.dtype(config.model.dtype)

    def eval_step(state: State, images: jax.Array) -> jax.Array:
        model = nnx.merge(graphdef_eval, state["params"], state["rest"], copy=True)
        logits, _ = model(augment.to_float(images).astype(dtype))
        return jax.nn.sigmoid(logits)

    return eval_step


def jit_eval_step(graphdef_eval, config, mesh) -> Callable:
    """Batch sharded in, probabilities replicated out, so every host can read them all."""
    repl = sharding.replicated(mesh)
    return jax.jit(make_eval_step(graphdef_eval, config),
                   in_shardings=(repl, sharding.batch_sharded(mesh)), out_shardings=repl)


def predict(eval_step: Callable, state: State, source, mesh, batch_size: int
            ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(labels, probabilities, indices) for every example of a split, each exactly once.

    `eval_step` must return replicated probabilities; each host contributes its rows of the
    padded global batch, so all hosts end up with the same full arrays.
    """
    from jax.experimental import multihost_utils

    labels, probs, index = [], [], []
    for batch in pdata.eval_batches(source, batch_size=batch_size):
        images = sharding.global_batch({"image": batch["image"]}, mesh)["image"]
        p = np.asarray(eval_step(state, images))
        meta = {k: batch[k] for k in ("label", "valid", "index")}
        if jax.process_count() > 1:
            meta = multihost_utils.process_allgather(meta, tiled=True)
        valid = np.asarray(meta["valid"])
        labels.append(np.asarray(meta["label"])[valid])
        probs.append(p[valid])
        index.append(np.asarray(meta["index"])[valid])
    return np.concatenate(labels), np.concatenate(probs), np.concatenate(index)


class _Log:
    """metrics.jsonl: one JSON line per record, appended, so a resumed run continues it."""

    def __init__(self, path: pathlib.Path):
        self.path = path

    def write(self, record: dict) -> None:
        if jax.process_index() == 0:
            with self.path.open("a") as f:
                f.write(json.dumps(record) + "\n")

    def read(self) -> list[dict]:
        if not self.path.exists():
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines() if line]

    def truncate_after(self, step: int) -> None:
        """Drops records a killed run wrote after its last checkpoint; they are redone."""
        if jax.process_index() == 0 and self.path.exists():
            kept = [r for r in self.read() if r["step"] <= step]
            self.path.write_text("".join(json.dumps(r) + "\n" for r in kept))


def prepare_data(config: ml_collections.ConfigDict) -> str:
    """The config name of the data set `config.data` asks for, prepared first if it is not
    there with exactly these settings (split fraction, seed, synthetic count)."""
    d = config.data
    return pdata.ensure_prepared(d.source, data_dir=d.data_dir, image_size=d.image_size,
                                 validation_fraction=d.validation_fraction,
                                 seed=config.train.seed, synthetic_count=d.synthetic_count)


def check_classes(report: dict, source: str) -> None:
    """Both classes in the train and validation splits: without them nothing can be learnt, or
    ranked, and the run would fail only at its first evaluation."""
    for split, fix in (("train", "add images of both classes to the source"),
                       ("validation", "raise --config.data.validation_fraction, or add images")):
        counts = report["splits"][split]
        if missing := [c for c in CLASSES if not counts.get(c)]:
            raise cli.UserError(f"data.source={source!r}: the prepared {split} split "
                                f"({report['path']}) has no {' or '.join(missing)} images "
                                f"({counts}); {fix}")


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | pathlib.Path) -> State:
    """Trains `config` in `workdir`, resuming from its newest intact checkpoint if there is one.

    Before any work the config is checked (`config_check`) and the workdir claimed for this
    run (`workdirs`). Returns the final train state (of the last step, not the best checkpoint).
    """
    config_check.validate(config, devices=jax.device_count(), processes=jax.process_count())
    with workdirs.claim(workdir, config) as workdir, contextlib.ExitStack() as cleanup:
        _say(f"workdir: {workdir}")
        return _train(config, workdir, cleanup)


def _train(c: ml_collections.ConfigDict, workdir: pathlib.Path,
           cleanup: contextlib.ExitStack) -> State:
    """The run; what it opens is closed by `cleanup`, so Ctrl-C lets a checkpoint being
    written finish."""
    (workdir / "plots").mkdir(exist_ok=True)
    mesh = sharding.make_mesh(c.train.num_devices)
    lesions = c.train.lesion_weight > 0

    # Data: prepared once (by process 0 in a multi-host run), then read by every process.
    name = builder.config_name(c.data.source, c.data.image_size)
    if jax.process_index() == 0:
        name = prepare_data(c)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices("data prepared")
    report = builder.load_report(c.data.data_dir, name)
    check_classes(report, c.data.source)
    train_src = pdata.data_source(name, "train", data_dir=c.data.data_dir)
    val_src = pdata.data_source(name, "validation", data_dir=c.data.data_dir)
    steps_per_epoch = len(train_src) // c.train.batch_size
    if steps_per_epoch == 0:
        raise cli.UserError(f"config field train.batch_size={c.train.batch_size}: exceeds the "
                            f"{len(train_src)} training examples of {name}; set "
                            "--config.train.batch_size")
    total_steps = max(1, math.ceil(c.train.epochs * steps_per_epoch))
    eval_every = c.train.eval_every or steps_per_epoch

    # Model, optimizer and checkpoints; what trains depends on the epoch (train.freeze).
    _, graphdef_eval, fresh = build(c)
    tx, schedule = make_optimizer(c, steps_per_epoch, total_steps)
    weights = class_weights(report["splits"]["train"], c.train.class_weights)
    ckpt = checkpoint.Checkpointer(workdir / "checkpoints", keep=c.checkpoint.keep)
    cleanup.callback(ckpt.close)  # waits for a checkpoint being written
    repl = sharding.replicated(mesh)
    init_opt = lambda params, frozen: jax.device_put(
        tx.init(transfer.split(params, frozen)[0]), repl)
    fresh = jax.device_put(dict(fresh, step=jnp.int32(0)), repl)
    with_opt = lambda frozen: dict(fresh, opt_state=init_opt(fresh["params"], frozen))
    eval_step = jit_eval_step(graphdef_eval, c, mesh)
    batch_sh = sharding.batch_sharded(mesh)
    train_iter = None if c.data.device_resident else iter(pdata.train_dataset(
        train_src, batch_size=c.train.batch_size, seed=c.train.seed,
        num_workers=c.data.num_workers, lesion_mask=lesions))
    if train_iter is not None:
        cleanup.callback(train_iter.close)
    resident = (pdata.to_device(train_src, repl, lesion_mask=lesions) if c.data.device_resident
                else None)
    fields = ("image", "label", "lesion_mask") if lesions else ("image", "label")

    def compile_step(frozen: frozenset[str]) -> Callable[[State], tuple[State, dict]]:
        train_step = make_train_step(train_graphdef(c, frozen), tx, c, weights, frozen)
        if resident is not None:
            data_key = jax.random.key(c.train.seed + 2)

            def step_fn(state, resident):
                batch = pdata.device_batch(resident, data_key, state["step"],
                                           c.train.batch_size)
                return train_step(state, *(jax.lax.with_sharding_constraint(batch[k], batch_sh)
                                           for k in fields))
            jitted = jax.jit(step_fn, in_shardings=(repl, repl), out_shardings=(repl, repl),
                             donate_argnums=0)
            return lambda state: jitted(state, resident)
        jitted = jax.jit(lambda s, b: train_step(s, *(b[k] for k in fields)),
                         in_shardings=(repl, batch_sh), out_shardings=(repl, repl),
                         donate_argnums=0)
        return lambda state: jitted(state, sharding.global_batch(next(train_iter), mesh))

    def rephase(state: State, step: int, frozen: frozenset[str], next_step: Callable | None
                ) -> tuple[State, frozenset[str], Callable]:
        """The step function for `step`; at an unfreezing epoch the thawed groups get fresh
        optimizer state (the others keep theirs) and the step is compiled anew."""
        new = transfer.frozen_groups(c, step / steps_per_epoch)
        if next_step is not None and new == frozen:
            return state, frozen, next_step
        if new != frozen:
            fresh = init_opt(state["params"], new)
            state = dict(state, opt_state=transfer.graft(fresh, state["opt_state"]))
            _say(f"step {step}: frozen groups now {', '.join(sorted(new)) or 'none'}")
        return state, new, compile_step(new)

    # Resume: the newest intact checkpoint in the workdir, else from scratch (or ImageNet).
    log = _Log(workdir / "metrics.jsonl")
    resumed = ckpt.restore_latest(lambda meta: with_opt(frozenset(meta.get("frozen", ()))),
                                  data_iterator=train_iter)
    if resumed is None:
        frozen = transfer.frozen_groups(c, 0.0)
        state, start = with_opt(frozen), 0
        stopper = {"best_auc": -1.0, "best_step": 0, "evals_since_best": 0}
    else:
        start, state, meta, unreadable = resumed
        frozen, stopper = frozenset(meta.get("frozen", ())), meta["early_stopping"]
        _say((f"unreadable checkpoints set aside: {'; '.join(unreadable)}; " if unreadable
              else "") + f"resumed from the checkpoint at step {start} in {ckpt.directory}")
    log.truncate_after(start)  # a killed run's records after its last checkpoint are redone
    if start >= total_steps or stopper["evals_since_best"] > c.train.patience:
        _say(f"nothing to train: the run in {workdir} already finished; rewriting its summary")
    else:
        state = _loop(state, start, total_steps, eval_every, c, mesh, val_src, eval_step,
                      schedule, ckpt, log, stopper, train_iter, frozen, rephase)
    ckpt.wait()
    _finish(c, workdir, ckpt, state, graphdef_eval, eval_step, mesh, val_src, log, report)
    return state


def _loop(state, start, total_steps, eval_every, c, mesh, val_src, eval_step, schedule, ckpt,
          log, stopper, train_iter, frozen, rephase) -> State:
    # closed on the way out, even by Ctrl-C, so that the bar does not print after the line
    # that says how to resume
    with tqdm(total=total_steps, initial=start, desc="train", unit="step",
              disable=jax.process_index() != 0) as bar:
        next_step = None
        pending, tick = [], time.perf_counter()
        for step in range(start, total_steps):
            state, frozen, next_step = rephase(state, step, frozen, next_step)
            state, m = next_step(state)
            pending.append(m)
            done = step + 1
            is_eval = done % eval_every == 0 or done == total_steps
            if done % c.train.log_every == 0 or is_eval:
                values = jax.device_get(pending)
                losses = np.array([v["loss"] for v in values])
                if not np.isfinite(losses).all():
                    bad = done - len(values) + 1 + int(np.argmin(np.isfinite(losses)))
                    raise FloatingPointError(
                        f"non-finite training loss at step {bad}; stopping. The last good "
                        f"checkpoint (step {ckpt.latest_step()}) is intact in {ckpt.directory}")
                now = time.perf_counter()
                rate = len(values) * c.train.batch_size / (now - tick)
                means = {k: float(np.mean([v[k] for v in values])) for k in values[0]}
                record = dict(step=done, split="train", **means,  # loss, grad_norm, lesion_loss
                              learning_rate=float(schedule(done)), images_per_s=rate)
                log.write(record)
                bar.set_postfix(loss=f"{record['loss']:.4f}", img_s=f"{rate:.0f}")
                pending, tick = [], now
            bar.update(1)
            if is_eval:
                labels, probs, _ = predict(eval_step, state, val_src, mesh, c.train.eval_batch_size)
                val = metrics.classification_metrics(
                    labels, probs, metrics.choose_threshold(labels, probs, c.train.threshold))
                log.write(dict(step=done, split="validation", **val))
                if val["roc_auc"] > stopper["best_auc"]:
                    stopper.update(best_auc=val["roc_auc"], best_step=done, evals_since_best=0)
                else:
                    stopper["evals_since_best"] += 1
                meta = dict(step=done, validation=val, threshold=val["threshold"],
                            early_stopping=stopper, frozen=sorted(frozen))
                ckpt.save(done, state, meta, metrics={checkpoint.BEST_METRIC: val["roc_auc"]},
                          data_iterator=train_iter)
                bar.write(f"step {done}: validation roc_auc {val['roc_auc']:.4f} "
                          f"accuracy {val['accuracy']:.4f} (threshold {val['threshold']:.3f})")
                if stopper["evals_since_best"] > c.train.patience:
                    bar.write(f"early stop: no better validation ROC-AUC for "
                              f"{c.train.patience} evaluations")
                    break
                tick = time.perf_counter()
    return state


def patient_groups(source, indices: np.ndarray) -> np.ndarray:
    """Patient id per predicted example, for bootstraps that resample whole patients."""
    return np.array([source[int(i)]["patient_id"] for i in indices])


def _finish(c, workdir: pathlib.Path, ckpt, state, graphdef_eval, eval_step, mesh, val_src, log,
            report) -> None:
    """Scores the best checkpoint on validation: summary.json, plots and a Grad-CAM grid."""
    best = ckpt.resolve("best")
    best_state, meta = ckpt.restore(best, state)
    labels, probs, index = predict(eval_step, best_state, val_src, mesh,
                                   c.train.eval_batch_size)
    if jax.process_index() != 0:
        return
    thresholds = {"0.5": 0.5, "validation": meta["threshold"]}
    summary = dict(
        data=report["name"], best_step=best, threshold=meta["threshold"],
        threshold_criterion=c.train.threshold, early_stopping=meta["early_stopping"],
        validation=metrics.summarize(labels, probs, thresholds,
                                     groups=patient_groups(val_src, index)))
    train_records = [r for r in log.read() if r["split"] == "train"]
    if train_records:
        summary["images_per_s"] = float(np.median([r["images_per_s"] for r in train_records]))
    (workdir / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    out = workdir / "plots"
    plots.learning_curves(log.read(), out / "learning_curves.png")
    plots.roc({"validation": (labels, probs)}, out / "roc.png")
    plots.precision_recall({"validation": (labels, probs)}, out / "precision_recall.png")
    cm = metrics.confusion(labels, probs, meta["threshold"])
    plots.confusion_matrix(cm, out / "confusion_matrix.png",
                           title=f"validation, threshold {meta['threshold']:.3f} (step {best})")
    plots.threshold_sweep(labels, probs, out / "threshold_sweep.png", marked=thresholds)
    gradcam_grid(c, graphdef_eval, best_state, val_src, labels, probs, index, meta["threshold"],
                 out / "gradcam_validation.png", title=f"step {best}")


def gradcam_grid(config, graphdef_eval, state: State, source, labels: np.ndarray,
                 probs: np.ndarray, index: np.ndarray, threshold: float, path: pathlib.Path, *,
                 per_cell: int = 4, title: str = "") -> pathlib.Path:
    """Heat maps of validation images, `per_cell` from each confusion-matrix cell (TP, FN, FP,
    TN), the most confident first, so a reader sees the errors beside the successes.

    One row per cell, empty slots left blank; an empty cell's row is titled "no FN" etc. Each
    map (the default method of `gradcam.cams`) explains the predicted class at `threshold`:
    for a missed pneumonia, what the model took as evidence of NORMAL. Runs on this process's
    devices only, with a host copy of the (replicated) parameters, so process 0 can draw it
    alone.
    """
    predicted = probs >= threshold
    picks, titles = [], []
    for name, truth, pred in (("TP", 1, True), ("FN", 1, False), ("FP", 0, True),
                              ("TN", 0, False)):
        rows = np.flatnonzero((labels == truth) & (predicted == pred))
        rows = rows[np.argsort(-probs[rows] if pred else probs[rows], kind="stable")][:per_cell]
        picks += [*rows, *[-1] * (per_cell - len(rows))]  # -1: an empty slot keeps one row a cell
        empty = [""] * (per_cell - len(rows))
        if not len(rows):
            empty[0] = f"no {name}"  # a blank row says so, rather than looking like a glitch
        titles += [f"{name} p={probs[r]:.2f}" for r in rows] + empty
    picks = np.array(picks)
    params = jax.device_get({"params": state["params"], "rest": state["rest"]})
    layer = gradcam.config_layer(config)
    blank = np.full_like(source[int(index[0])]["image"], 255)  # white on white: invisible
    images = np.stack([source[int(index[r])]["image"] if r >= 0 else blank for r in picks])
    maps = np.zeros(images.shape[:3], np.float32)
    for target, rows in (("PNEUMONIA", (picks >= 0) & predicted[picks]),
                         ("NORMAL", (picks >= 0) & ~predicted[picks])):
        if rows.any():
            maps[rows] = gradcam.cams(graphdef_eval, params, images[rows], layer=layer,
                                      target=target)["maps"]
    return plots.image_grid(images, path, titles=titles, overlays=maps, ncols=per_cell,
                            title=f"{gradcam.METHODS[0]} at {layer} for the predicted class, "
                                  f"validation, threshold {threshold:.3f}"
                                  + (f", {title}" if title else ""))
