"""Inference: a trained run, restored into one typed object that scores images, splits and files.

    from pneumojax import inference
    model = inference.load("workdirs/deep_cnn_cpu")        # best checkpoint; or "latest", a step
    preds = model.predict_files(["xray.jpeg", "scans/"])   # heat maps too (heatmaps=False skips)
    preds.probability, preds.label, preds.maps             # numpy arrays

Only what inference needs is read from the checkpoint, onto shapes computed abstractly: nothing
is initialised twice and the optimizer state is not touched. Each way a workdir or checkpoint
can be wrong is one `cli.UserError` naming the folder, file or step and the fix. evaluate,
predict, the experiments and the training-time Grad-CAM grid all score through this module, and
it imports nothing from training.
"""

from __future__ import annotations

import dataclasses
import functools
import pathlib
import stat
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from pneumojax import checkpoint, cli, gradcam, models, plots, sharding, workdirs
from pneumojax import data as pdata
from pneumojax.data import augment, images

State = dict[str, Any]  # {params, rest[, step, opt_state]}: a model split by nnx.split
LABELS = ("NORMAL", "PNEUMONIA")

_TRAIN_HINT = "give the folder that `python -m pneumojax.main --workdir DIR` wrote"
# What orbax and tensorstore raise for a damaged checkpoint: a missing item is a KeyError, a
# truncated JSON a ValueError, a garbled array file a ValueError or an OSError.
_DAMAGED = (OSError, ValueError, KeyError)
_FILES = f"give image files ({', '.join(sorted(images.IMAGE_SUFFIXES))}) or folders of them"


def create_model(config: ml_collections.ConfigDict, seed: int | None = None) -> nnx.Module:
    """The model `config.model` names, with one input channel (X-rays are grey), parameters
    drawn from `seed` (default `train.seed`)."""
    seed = config.train.seed if seed is None else seed
    return models.create(config.model.name, in_channels=1, dtype=jnp.dtype(config.model.dtype),
                         rngs=nnx.Rngs(params=seed, dropout=seed + 1), **config.model.kwargs)


def eval_model(config: ml_collections.ConfigDict) -> tuple[nnx.GraphDef, State]:
    """(eval-mode graph, abstract {params, rest}): the shapes a checkpoint restores onto."""
    def split() -> tuple[nnx.GraphDef, State]:
        model = create_model(config)
        model.eval()
        graphdef, params, rest = nnx.split(model, nnx.Param, ...)
        return graphdef, dict(params=params, rest=rest)
    graphdef, state = nnx.eval_shape(split)
    return graphdef, state


def make_eval_step(graphdef_eval: nnx.GraphDef, config: ml_collections.ConfigDict,
                   temperature: float = 1.0) -> Callable[[State, jax.Array], jax.Array]:
    """uint8 images -> P(PNEUMONIA) = sigmoid(logit / temperature), in inference mode, before
    jit; the temperature is the one fitted on validation (`metrics.fit_temperature`).

    The input is made as in training (`augment.model_input`, `data.intensity`); with
    `data.tta_views` > 1 the logit is the mean over `augment.tta_views`: averaged as logits,
    the scale that the temperature divides."""
    dtype = jnp.dtype(config.model.dtype)

    def eval_step(state: State, images_uint8: jax.Array) -> jax.Array:
        model = nnx.merge(graphdef_eval, state["params"], state["rest"], copy=True)
        x = augment.model_input(images_uint8, config.data.intensity)
        logits = jnp.mean(jnp.stack([model(v.astype(dtype))[0]
                                     for v in augment.tta_views(x, config.data.tta_views)]), 0)
        return jax.nn.sigmoid(logits / temperature)

    return eval_step


def jit_eval_step(graphdef_eval: nnx.GraphDef, config: ml_collections.ConfigDict,
                  mesh: jax.sharding.Mesh, temperature: float = 1.0
                  ) -> Callable[[State, jax.Array], jax.Array]:
    """Batch sharded in, probabilities replicated out, so every host can read them all."""
    repl = sharding.replicated(mesh)
    return jax.jit(make_eval_step(graphdef_eval, config, temperature),
                   in_shardings=(repl, sharding.batch_sharded(mesh)), out_shardings=repl)


def score_source(eval_step: Callable, state: State, source: Sequence[dict],
                 mesh: jax.sharding.Mesh, batch_size: int
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(labels, probabilities, indices) for every example of a split, each exactly once.

    `eval_step` must return replicated probabilities (`jit_eval_step`); each host contributes
    its rows of the padded global batch, so all hosts end up with the same full arrays.
    """
    from jax.experimental import multihost_utils

    labels, probs, index = [], [], []
    for batch in pdata.eval_batches(source, batch_size=batch_size):
        images_uint8 = sharding.global_batch({"image": batch["image"]}, mesh)["image"]
        p = np.asarray(eval_step(state, images_uint8))
        meta = {k: batch[k] for k in ("label", "valid", "index")}
        if jax.process_count() > 1:
            meta = multihost_utils.process_allgather(meta, tiled=True)
        valid = np.asarray(meta["valid"])
        labels.append(np.asarray(meta["label"])[valid])
        probs.append(p[valid])
        index.append(np.asarray(meta["index"])[valid])
    return np.concatenate(labels), np.concatenate(probs), np.concatenate(index)


@dataclasses.dataclass(frozen=True)
class Predictions:
    """What `Model.predict_files` returns: one row per file that could be read, in order."""
    files: list[str]
    probability: np.ndarray          # (N,) P(PNEUMONIA)
    label: np.ndarray                # (N,) "NORMAL" or "PNEUMONIA" at `threshold`
    threshold: float                 # chosen on validation during training
    maps: np.ndarray | None          # (N, H, W) heat maps in [0, 1] at the model's input size
    errors: dict[str, str]           # file -> why it could not be read


@dataclasses.dataclass(frozen=True)
class Prediction:
    """One file's result, as `Model.iter_files` yields it: an error, or the rest."""
    file: pathlib.Path
    data: bytes = b""                # the file as read, for a caller that draws it
    probability: float = float("nan")
    label: str = ""
    map: np.ndarray | None = None
    error: str = ""


@dataclasses.dataclass(frozen=True)
class Model:
    """A restored checkpoint, ready to score: `load` makes one."""
    config: ml_collections.ConfigDict
    graphdef: nnx.GraphDef           # eval mode
    state: State                     # {params, rest, step}
    threshold: float                 # chosen on validation when the checkpoint was saved
    temperature: float               # fitted on validation (1.0: not calibrated)
    step: int
    meta: dict                       # the checkpoint's metadata (validation metrics, ...)

    @functools.cached_property
    def _eval_step(self) -> Callable[[State, jax.Array], jax.Array]:
        return jax.jit(make_eval_step(self.graphdef, self.config, self.temperature))

    @property
    def image_size(self) -> int:
        return self.config.data.image_size

    @property
    def layer(self) -> str:
        """The default Grad-CAM stage (`gradcam.config_layer`)."""
        return gradcam.config_layer(self.config)

    def score(self, images_uint8: np.ndarray | jax.Array) -> np.ndarray:
        """P(PNEUMONIA) of uint8 (B, H, W, 1) images at the model's input size, on this
        process's devices (a notebook's), in batches of `train.eval_batch_size`."""
        size = self.config.train.eval_batch_size
        x = np.asarray(images_uint8)
        return np.concatenate([np.asarray(self._eval_step(self.state, x[i:i + size]))
                               for i in range(0, len(x), size)] or [np.zeros(0, np.float32)])

    def score_split(self, source: Sequence[dict], mesh: jax.sharding.Mesh | None = None
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """`score_source` over every device of `mesh` (default: all)."""
        mesh = mesh or sharding.make_mesh()
        state = jax.device_put(self.state, sharding.replicated(mesh))
        return score_source(jit_eval_step(self.graphdef, self.config, mesh, self.temperature),
                            state, source, mesh, self.config.train.eval_batch_size)

    def cams(self, images_uint8: np.ndarray | jax.Array, *, target: str = "PNEUMONIA",
             method: str = gradcam.METHODS[0], layer: str | None = None) -> dict[str, jax.Array]:
        """`gradcam.cams` of this model (default stage: `layer`)."""
        return gradcam.cams(self.graphdef, self.state, images_uint8, layer=layer or self.layer,
                            target=target, method=method, intensity=self.config.data.intensity)

    def check_cams(self, *, method: str, layer: str) -> None:
        """Traces Grad-CAM once on an abstract batch, so that a wrong method or layer is one
        line naming the valid choices before any image is read."""
        if method not in gradcam.METHODS:
            raise cli.UserError(f"--method {method!r}: unknown; valid: "
                                f"{', '.join(gradcam.METHODS)}")
        batch = jax.ShapeDtypeStruct((1, self.image_size, self.image_size, 1), jnp.uint8)
        try:
            jax.eval_shape(lambda x: gradcam.cams(self.graphdef, self.state, x, layer=layer,
                                                  method=method,
                                                  intensity=self.config.data.intensity), batch)
        except ValueError as e:
            raise cli.UserError(f"--layer {layer!r}: {e}") from e

    def iter_files(self, paths: Sequence[str | pathlib.Path], *, heatmaps: bool = True,
                   method: str = gradcam.METHODS[0], layer: str | None = None,
                   batch_size: int = 16) -> Iterator[Prediction]:
        """One `Prediction` per file of `paths` (folders searched, see `collect`), in order, a
        batch at a time: a file that cannot be read gets its error and the rest still run."""
        files = collect(paths)
        layer = layer or self.layer
        if heatmaps:
            self.check_cams(method=method, layer=layer)
        for start in range(0, len(files), batch_size):
            ok = []
            for f in files[start:start + batch_size]:
                try:
                    data = read_file(f)
                    ok.append((f, data, images.decode_grayscale(data, f, size=self.image_size)))
                except images.ImageError as e:
                    yield Prediction(f, error=e.reason)
            if not ok:
                continue
            batch = np.stack([x for _, _, x in ok])
            # `score`, not Grad-CAM's own forward pass: test-time views and the temperature
            # apply, so a file gets the probability that evaluate gives it
            probs = self.score(batch)
            maps = (np.asarray(self.cams(batch, method=method, layer=layer)["maps"]) if heatmaps
                    else [None] * len(ok))
            for (f, data, _), p, heat in zip(ok, probs, maps):
                yield Prediction(f, data, float(p), LABELS[int(p >= self.threshold)], heat)

    def predict_files(self, paths: Sequence[str | pathlib.Path], *, heatmaps: bool = True,
                      method: str = gradcam.METHODS[0], layer: str | None = None,
                      batch_size: int = 16) -> Predictions:
        """`iter_files`, gathered into arrays."""
        done, errors = [], {}
        for p in self.iter_files(paths, heatmaps=heatmaps, method=method, layer=layer,
                                 batch_size=batch_size):
            if p.error:
                errors[str(p.file)] = p.error
            else:
                done.append(p)
        size = (0, self.image_size, self.image_size)
        return Predictions(
            files=[str(p.file) for p in done],
            probability=np.array([p.probability for p in done], np.float32),
            label=np.array([p.label for p in done], dtype=f"<U{max(map(len, LABELS))}"),
            threshold=self.threshold,
            maps=(np.stack([p.map for p in done]) if done else np.zeros(size, np.float32))
            if heatmaps else None,
            errors=errors)


def gradcam_grid(model: Model, source: Sequence[dict], labels: np.ndarray, probs: np.ndarray,
                 index: np.ndarray, path: pathlib.Path, *, per_cell: int = 4, title: str = ""
                 ) -> pathlib.Path:
    """Heat maps of `source`'s images, `per_cell` from each confusion-matrix cell (TP, FN, FP,
    TN) at the model's threshold, the most confident first, so a reader sees the errors beside
    the successes. `labels`, `probs`, `index` are `score_source`'s.

    One row per cell, empty slots left blank; an empty cell's row is titled "no FN" etc. Each
    map (the default method of `gradcam.cams`) explains the predicted class: for a missed
    pneumonia, what the model took as evidence of NORMAL. Runs on this process's devices.
    """
    predicted = probs >= model.threshold
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
    blank = np.full_like(source[int(index[0])]["image"], 255)  # white on white: invisible
    batch = np.stack([source[int(index[r])]["image"] if r >= 0 else blank for r in picks])
    maps = np.zeros(batch.shape[:3], np.float32)
    for target, rows in (("PNEUMONIA", (picks >= 0) & predicted[picks]),
                         ("NORMAL", (picks >= 0) & ~predicted[picks])):
        if rows.any():
            maps[rows] = model.cams(batch[rows], target=target)["maps"]
    return plots.image_grid(batch, path, titles=titles, overlays=maps, ncols=per_cell,
                            title=f"{gradcam.METHODS[0]} at {model.layer} for the predicted "
                                  f"class, threshold {model.threshold:.3f}"
                                  + (f", {title}" if title else ""))


def load(workdir: str | pathlib.Path, checkpoint: str | int = "best") -> Model:
    """The checkpoint `checkpoint` ("best": highest validation ROC-AUC, "latest", or a step)
    of the run in `workdir`, restored for inference. Its config is read from the workdir
    alone (`workdirs.load_config`)."""
    workdir = pathlib.Path(workdir).expanduser()
    config = _read_config(workdir)
    directory = workdir / "checkpoints"
    step, steps = _resolve(directory, str(checkpoint))
    graphdef, like = eval_model(config)
    ckpt = _checkpointer(directory)
    try:
        state, meta = ckpt.restore(step, dict(like, step=jax.ShapeDtypeStruct((), jnp.int32)),
                                   partial=True)
    except _DAMAGED as e:
        raise _unreadable(directory / str(step), steps, e) from e
    finally:
        ckpt.close()
    return Model(config, graphdef, state, float(meta["threshold"]),
                 float(meta.get("temperature", 1.0)), step, meta)  # older runs: no temperature


def _read_config(workdir: pathlib.Path) -> ml_collections.ConfigDict:
    """A folder with a readable config.json; read first, so that a broken one is not blamed
    on the checkpoint read next."""
    if not workdir.is_dir():
        raise cli.UserError(f"--workdir {workdir}: no such folder; {_TRAIN_HINT}")
    if not (workdir / workdirs.CONFIG_FILE).is_file():
        raise cli.UserError(f"--workdir {workdir}: not a training run (no "
                            f"{workdirs.CONFIG_FILE}); {_TRAIN_HINT}")
    try:
        return workdirs.load_config(workdir)
    except (OSError, ValueError) as e:
        raise cli.UserError(f"{workdir / workdirs.CONFIG_FILE}: unreadable "
                            f"({type(e).__name__}: {e}); {_TRAIN_HINT}") from e


def _checkpointer(directory: pathlib.Path) -> checkpoint.Checkpointer:
    return checkpoint.Checkpointer(directory, read_only=True)


def _unreadable(folder: pathlib.Path, steps: list[int], error: Exception) -> cli.UserError:
    return cli.UserError(
        f"{folder}: checkpoint unreadable, corrupt or incomplete ({type(error).__name__}: "
        f"{error}); choose another with --checkpoint (saved steps: "
        f"{', '.join(map(str, steps))}) or train again")


def _resolve(directory: pathlib.Path, which: str) -> tuple[int, list[int]]:
    """(step that `which` names, every saved step), `which` checked against the saved steps."""
    ckpt = _checkpointer(directory)
    try:
        steps = ckpt.steps()
        if not steps:
            raise cli.UserError(f"{directory}: no checkpoints; a run saves one at each "
                                "validation (train.eval_every), so train longer or again")
        if which not in ("best", "latest") and not (which.isdigit() and int(which) in steps):
            raise cli.UserError(f"--checkpoint {which!r}: no such checkpoint in {directory}; "
                                f"use best, latest or a saved step: {', '.join(map(str, steps))}")
        if which == "best":  # it reads every step's metadata: name a broken one here
            for step in steps:
                try:
                    ckpt.meta(step)
                except _DAMAGED as e:
                    raise _unreadable(directory / str(step), steps, e) from e
        return ckpt.resolve(which), steps
    finally:
        ckpt.close()


def collect(paths: Sequence[str | pathlib.Path]) -> list[pathlib.Path]:
    """Files as given, and what inside folders has an image suffix (hidden files skipped); a
    folder without any stays as itself, so that it gets its own error."""
    files = []
    for p in map(pathlib.Path, paths):
        found = sorted(f for f in p.rglob("*") if not f.name.startswith(".")
                       and f.suffix.lower() in images.IMAGE_SUFFIXES
                       and not f.is_dir()) if p.is_dir() else []
        files += found or [p]  # a FIFO or device found here is reported, not skipped
    if all(f.is_dir() for f in files):
        raise cli.UserError(f"no image file in {', '.join(map(str, paths))}; {_FILES}")
    return files


def read_file(path: pathlib.Path) -> bytes:
    """The bytes of a regular file, a link to one followed (`images.read_bytes`, which caps
    the size at `images.MAX_BYTES`). A FIFO, device or folder is refused from its `stat`,
    never opened: opening a FIFO for reading waits for a writer."""
    try:
        mode = path.stat().st_mode
    except OSError as e:
        raise images.ImageError(path, f"cannot read file ({e.strerror or e})") from e
    if stat.S_ISDIR(mode):
        raise images.ImageError(path, f"a folder without image files; {_FILES}")
    if kind := images.special_file(mode):
        raise images.ImageError(path, f"{kind}, not a regular file, so not read; {_FILES}")
    return images.read_bytes(path)
