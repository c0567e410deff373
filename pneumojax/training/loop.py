"""The training run: data, the step over a ('data',) mesh, validation, checkpoints, early
stopping, and the summary of the best checkpoint.

`train_and_evaluate(config, workdir)` checks the config, claims the workdir, resumes from its
newest intact checkpoint if there is one, and trains. What the loop carries from step to step
is one `Run` (what was built once) and one `Progress` (what changes); the step itself is built
by `pneumojax.training.step`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import pathlib
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import ml_collections
import numpy as np
from tqdm import tqdm

from pneumojax import (checkpoint, cli, config_check, inference, metrics, plots, sharding,
                       tensorboard, transfer, workdirs)
from pneumojax import data as pdata
from pneumojax.data import builder
from pneumojax.training import step as steps
from pneumojax.training.data import check_classes, prepare_data

State = inference.State
StepFn = Callable[[State], tuple[State, dict]]


def _say(message: str) -> None:
    if jax.process_index() == 0:
        tqdm.write(message)


class Log:
    """metrics.jsonl, one JSON line per record, appended so a resumed run continues it; each
    record also goes to TensorBoard (`WORKDIR/tensorboard`)."""

    def __init__(self, workdir: pathlib.Path):
        self.path = workdir / "metrics.jsonl"
        self.events = tensorboard.EventWriter(workdir / "tensorboard")

    def write(self, record: dict) -> None:
        if jax.process_index() == 0:
            with self.path.open("a") as f:
                f.write(json.dumps(record) + "\n")
        scalars = {k: v for k, v in record.items() if k not in ("step", "split")
                   and isinstance(v, (int, float)) and not isinstance(v, bool)}
        self.events.scalars(record["step"], scalars, prefix=record["split"])

    def read(self) -> list[dict]:
        if not self.path.exists():
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines() if line]

    def truncate_after(self, step: int) -> None:
        """Drops records a killed run wrote after its last checkpoint; they are redone."""
        if jax.process_index() == 0 and self.path.exists():
            kept = [r for r in self.read() if r["step"] <= step]
            self.path.write_text("".join(json.dumps(r) + "\n" for r in kept))


@dataclasses.dataclass
class Run:
    """What a run builds once: the config, where it writes, its data, its optimizer and the
    functions it calls."""
    config: ml_collections.ConfigDict
    workdir: pathlib.Path
    mesh: jax.sharding.Mesh
    report: dict                      # the prepared data set's report (counts, name, path)
    val_src: Sequence[dict]
    val_files: list[str]              # file name of each validation example, by index
    steps_per_epoch: int
    total_steps: int
    eval_every: int
    tx: Any                           # optax.GradientTransformation
    schedule: Callable[[int], Any]
    class_weights: jax.Array
    graphdef_eval: Any
    eval_step: Callable
    ckpt: checkpoint.Checkpointer
    log: Log
    train_iter: Any                   # grain iterator (host batches), or None if resident
    resident: pdata.DeviceData | None

    @property
    def fields(self) -> tuple[str, ...]:
        lesions = self.config.train.lesion_weight > 0
        return ("image", "label", "lesion_mask") if lesions else ("image", "label")

    def init_optimizer(self, params: Any, frozen: frozenset[str]) -> Any:
        return jax.device_put(self.tx.init(transfer.split(params, frozen)[0]),
                              sharding.replicated(self.mesh))

    def compile_step(self, frozen: frozenset[str]) -> StepFn:
        """The jitted step for these frozen groups, fed from the device-resident split or the
        host pipeline."""
        c = self.config
        train_step = steps.make_train_step(steps.train_graphdef(c, frozen), self.tx, c,
                                           self.class_weights, frozen)
        if self.resident is None:
            jitted = steps.jit_train_step(train_step, self.mesh, self.fields)
            return lambda state: jitted(state, sharding.global_batch(next(self.train_iter),
                                                                     self.mesh))
        repl, batch_sh = sharding.replicated(self.mesh), sharding.batch_sharded(self.mesh)
        data_key, fields = jax.random.key(c.train.seed + 2), self.fields

        def step_fn(state, resident):
            batch = pdata.device_batch(resident, data_key, state["step"], c.train.batch_size)
            return train_step(state, *(jax.lax.with_sharding_constraint(batch[k], batch_sh)
                                       for k in fields))
        jitted = jax.jit(step_fn, in_shardings=(repl, repl), out_shardings=(repl, repl),
                         donate_argnums=0)
        return lambda state: jitted(state, self.resident)

    def validate(self, state: State) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return inference.score_source(self.eval_step, state, self.val_src, self.mesh,
                                      self.config.train.eval_batch_size)


@dataclasses.dataclass
class Progress:
    """What changes as the run goes: the state, the frozen groups and the step function
    compiled for them, and early stopping's record."""
    state: State
    frozen: frozenset[str]
    best_auc: float = -1.0
    best_step: int = 0
    evals_since_best: int = 0
    step_fn: StepFn | None = None

    def stopper(self) -> dict:
        return dict(best_auc=self.best_auc, best_step=self.best_step,
                    evals_since_best=self.evals_since_best)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | pathlib.Path) -> State:
    """Trains `config` in `workdir`, resuming from its newest intact checkpoint if there is one.

    Before any work the config is checked (`config_check`) and the workdir claimed for this
    run (`workdirs`). Returns the final train state (of the last step, not the best checkpoint).
    """
    config_check.validate(config, devices=jax.device_count(), processes=jax.process_count())
    with workdirs.claim(workdir, config) as workdir, contextlib.ExitStack() as cleanup:
        _say(f"workdir: {workdir}")
        run = _setup(config, workdir, cleanup)
        progress, start = _resume(run)
        if start >= run.total_steps or progress.evals_since_best > config.train.patience:
            _say(f"nothing to train: the run in {workdir} already finished; rewriting its "
                 "summary")
        else:
            _train(run, progress, start)
        run.ckpt.wait()
        _finish(run, progress.state)
        return progress.state


def _setup(c: ml_collections.ConfigDict, workdir: pathlib.Path,
           cleanup: contextlib.ExitStack) -> Run:
    """Builds the run; what it opens is closed by `cleanup`, so Ctrl-C lets a checkpoint
    being written finish."""
    (workdir / "plots").mkdir(exist_ok=True)
    mesh = sharding.make_mesh(c.train.num_devices)
    lesions = c.train.lesion_weight > 0

    # Data: prepared once (by process 0 in a multi-host run), then read by every process.
    name = builder.config_name(c.data.source, c.data.image_size, c.data.holdout)
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

    tx, schedule = steps.make_optimizer(c, steps_per_epoch, total_steps)
    ckpt = checkpoint.Checkpointer(workdir / "checkpoints", keep=c.checkpoint.keep)
    cleanup.callback(ckpt.close)  # waits for a checkpoint being written
    log = Log(workdir)
    cleanup.callback(log.events.close)
    log.events.text(0, "config", f"```\n{c.to_json_best_effort(indent=1)}\n```")
    train_iter = None if c.data.device_resident else iter(pdata.train_dataset(
        train_src, batch_size=c.train.batch_size, seed=c.train.seed,
        num_workers=c.data.num_workers, lesion_mask=lesions))
    if train_iter is not None:
        cleanup.callback(train_iter.close)
    resident = (pdata.to_device(train_src, sharding.replicated(mesh), lesion_mask=lesions)
                if c.data.device_resident else None)
    graphdef_eval, _ = inference.eval_model(c)
    val_files = [val_src[i]["file_name"].decode() for i in range(len(val_src))]
    return Run(config=c, workdir=workdir, mesh=mesh, report=report, val_src=val_src,
               val_files=val_files,
               steps_per_epoch=steps_per_epoch, total_steps=total_steps,
               eval_every=c.train.eval_every or steps_per_epoch, tx=tx, schedule=schedule,
               class_weights=steps.class_weights(report["splits"]["train"],
                                                 c.train.class_weights),
               graphdef_eval=graphdef_eval,
               eval_step=inference.jit_eval_step(graphdef_eval, c, mesh), ckpt=ckpt, log=log,
               train_iter=train_iter, resident=resident)


def _resume(run: Run) -> tuple[Progress, int]:
    """(progress, first step): from the newest intact checkpoint in the workdir, else fresh
    (from scratch or ImageNet)."""
    c = run.config

    def fresh(frozen: frozenset[str], pretrained: bool) -> State:
        return steps.init_state(c, run.tx, frozen, run.mesh, pretrained)

    resumed = run.ckpt.restore_latest(lambda meta: fresh(frozenset(meta.get("frozen", ())),
                                                         False),
                                      data_iterator=run.train_iter)
    if resumed is None:
        frozen = transfer.frozen_groups(c, 0.0)
        progress, start = Progress(fresh(frozen, True), frozen), 0
    else:
        start, state, meta, unreadable = resumed
        progress = Progress(state, frozenset(meta.get("frozen", ())), **meta["early_stopping"])
        _say((f"unreadable checkpoints set aside: {'; '.join(unreadable)}; " if unreadable
              else "") + f"resumed from the checkpoint at step {start} in {run.ckpt.directory}")
    run.log.truncate_after(start)  # a killed run's records after its last checkpoint are redone
    return progress, start


def _rephase(run: Run, progress: Progress, step: int) -> None:
    """The step function for `step`; at an unfreezing epoch the thawed groups get fresh
    optimizer state (the others keep theirs) and the step is compiled anew."""
    new = transfer.frozen_groups(run.config, step / run.steps_per_epoch)
    if progress.step_fn is not None and new == progress.frozen:
        return
    if new != progress.frozen:
        state = progress.state
        fresh = run.init_optimizer(state["params"], new)
        progress.state = dict(state, opt_state=transfer.graft(fresh, state["opt_state"]))
        progress.frozen = new
        _say(f"step {step}: frozen groups now {', '.join(sorted(new)) or 'none'}")
    progress.step_fn = run.compile_step(new)


def _train(run: Run, progress: Progress, start: int) -> None:
    c = run.config
    # The bar is closed on the way out, even by Ctrl-C, so that it does not print after the
    # line that says how to resume.
    with tqdm(total=run.total_steps, initial=start, desc="train", unit="step",
              disable=jax.process_index() != 0) as bar:
        pending, tick = [], time.perf_counter()
        for step in range(start, run.total_steps):
            _rephase(run, progress, step)
            progress.state, m = progress.step_fn(progress.state)
            pending.append(m)
            done = step + 1
            is_eval = done % run.eval_every == 0 or done == run.total_steps
            if done % c.train.log_every == 0 or is_eval:
                record = _train_record(run, pending, done, tick)
                bar.set_postfix(loss=f"{record['loss']:.4f}",
                                img_s=f"{record['images_per_s']:.0f}")
                pending, tick = [], time.perf_counter()
            bar.update(1)
            if is_eval:
                if _evaluate(run, progress, done, bar):
                    break
                tick = time.perf_counter()


def _train_record(run: Run, pending: list[dict], done: int, since: float) -> dict:
    """Logs the mean of the steps since the last record (begun at `since`, a perf_counter);
    stops on a non-finite loss. Their rate is timed once their values are here: steps run
    asynchronously, so the loop's own clock only sees them dispatched."""
    values = jax.device_get(pending)
    seconds = time.perf_counter() - since
    losses = np.array([v["loss"] for v in values])
    if not np.isfinite(losses).all():
        bad = done - len(values) + 1 + int(np.argmin(np.isfinite(losses)))
        raise FloatingPointError(
            f"non-finite training loss at step {bad}; stopping. The last good checkpoint "
            f"(step {run.ckpt.latest_step()}) is intact in {run.ckpt.directory}")
    means = {k: float(np.mean([v[k] for v in values])) for k in values[0]}
    record = dict(step=done, split="train", **means,  # loss, grad_norm, lesion_loss
                  learning_rate=float(run.schedule(done)),
                  images_per_s=len(values) * run.config.train.batch_size / seconds)
    run.log.write(record)
    return record


def _evaluate(run: Run, progress: Progress, done: int, bar: tqdm) -> bool:
    """Validation, a checkpoint, and early stopping's verdict: True to stop.

    With `train.calibrate` a temperature is fitted on validation first, and the threshold is
    chosen on the calibrated probabilities; the checkpoint keeps both, and its calibrated
    validation predictions, so that thresholds over several runs need no data read again."""
    c = run.config
    labels, raw, index = run.validate(progress.state)
    temperature = metrics.fit_temperature(labels, raw) if c.train.calibrate else 1.0
    probs = metrics.apply_temperature(raw, temperature)
    val = metrics.classification_metrics(
        labels, probs, metrics.choose_threshold(labels, probs, c.train.threshold))
    fitted = dict(temperature=temperature, ece_before=metrics.calibration(labels, raw)["ece"],
                  ece_after=metrics.calibration(labels, probs)["ece"]) if c.train.calibrate else {}
    run.log.write(dict(step=done, split="validation", **val, **fitted))
    if val["roc_auc"] > progress.best_auc:
        progress.best_auc, progress.best_step, progress.evals_since_best = (
            val["roc_auc"], done, 0)
    else:
        progress.evals_since_best += 1
    predictions = dict(file=[run.val_files[int(i)] for i in index], label=labels.tolist(),
                       probability=np.round(np.asarray(probs, np.float64), 6).tolist())
    meta = dict(step=done, validation=val, threshold=val["threshold"], temperature=temperature,
                validation_predictions=predictions, early_stopping=progress.stopper(),
                frozen=sorted(progress.frozen))
    run.ckpt.save(done, progress.state, meta, metrics={checkpoint.BEST_METRIC: val["roc_auc"]},
                  data_iterator=run.train_iter)
    bar.write(f"step {done}: validation roc_auc {val['roc_auc']:.4f} "
              f"accuracy {val['accuracy']:.4f} (threshold {val['threshold']:.3f})")
    if progress.evals_since_best > c.train.patience:
        bar.write(f"early stop: no better validation ROC-AUC for {c.train.patience} "
                  "evaluations")
        return True
    return False


def _finish(run: Run, state: State) -> None:
    """Scores the best checkpoint on validation, with its temperature: summary.json, plots
    and a Grad-CAM grid."""
    c, ckpt = run.config, run.ckpt
    best = ckpt.resolve("best")
    best_state, meta = ckpt.restore(best, state)
    labels, raw, index = run.validate(best_state)
    temperature = float(meta.get("temperature", 1.0))  # checkpoints before calibration: none
    probs = metrics.apply_temperature(raw, temperature)
    if jax.process_index() != 0:
        return
    thresholds = {"0.5": 0.5, "validation": meta["threshold"]}
    groups = np.array([run.val_src[int(i)]["patient_id"] for i in index])
    summary = dict(
        data=run.report["name"], best_step=best, threshold=meta["threshold"],
        threshold_criterion=c.train.threshold, temperature=temperature,
        calibration={"before": metrics.calibration(labels, raw),
                     "after": metrics.calibration(labels, probs)},
        validation_prevalence=float(labels.mean()), early_stopping=meta["early_stopping"],
        validation=metrics.summarize(labels, probs, thresholds, groups=groups))
    log = run.log.read()
    if train_records := [r["images_per_s"] for r in log if r["split"] == "train"]:
        summary["images_per_s"] = float(np.median(train_records))
    (run.workdir / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    out = run.workdir / "plots"
    plots.learning_curves(log, out / "learning_curves.png")
    plots.roc({"validation": (labels, probs)}, out / "roc.png")
    plots.precision_recall({"validation": (labels, probs)}, out / "precision_recall.png")
    plots.confusion_matrix(metrics.confusion(labels, probs, meta["threshold"]),
                           out / "confusion_matrix.png",
                           title=f"validation, threshold {meta['threshold']:.3f} (step {best})")
    plots.threshold_sweep(labels, probs, out / "threshold_sweep.png", marked=thresholds)
    host = jax.device_get({"params": best_state["params"], "rest": best_state["rest"]})
    model = inference.Model(c, run.graphdef_eval, host, float(meta["threshold"]), temperature,
                            best, meta)
    grid = inference.gradcam_grid(model, run.val_src, labels, probs, index,
                                  out / "gradcam_validation.png",
                                  title=f"validation, step {best}")
    run.log.events.image(best, "validation/gradcam", grid)
