"""Does a heat map point at the lesion? Localisation scores against known lesion masks.

The phantoms of `pneumojax.data.synthetic` carry their lesions' masks, so a map can be scored
where the truth is known. `measure` scores one stage and method on the held-out PNEUMONIA
phantoms of a model that `trained_model` trains (or reuses) from `phantom_config`:

- pointing: the share of images whose map peaks inside a lesion mask dilated by half a
  feature cell (a peak can be placed no finer than a cell);
- peak_in_mask, peak_distance: the share whose peak lies inside the mask itself, and the mean
  distance in px from the peak to the nearest lesion pixel: near misses or wrong places;
- mass: the share of the map's sum inside the masks, and inside the dilated masks;
- ideal_mass: the mass of an ideal map at that grid, each cell its lesion fraction, upsampled
  the same way: a reference for what the grid allows (not a strict bound).

experiments/localisation.py runs the study; tests/test_gradcam.py holds its goals.
"""

from __future__ import annotations

import pathlib

import jax
import ml_collections
import numpy as np
from scipy import ndimage

from pneumojax import data, defaults, gradcam, inference, losses, training, workdirs
from pneumojax.training.data import prepare_data


def phantom_config(data_dir: str | pathlib.Path, *, image_size: int = 64, count: int = 320,
                   widths: tuple[int, ...] = (8, 16, 16), hidden: int = 16, pool_r: float = 0.0,
                   head: str = "dense", lesion_weight: float = 0.0, epochs: float = 10.0,
                   seed: int = 0) -> ml_collections.ConfigDict:
    """configs/deep_cnn.py's DeepCNN (dropout 0.5), narrowed and sized for phantoms: a quarter
    held out for validation (and as many again as test), and validation every 40 steps for the
    best checkpoint. `head="lesion"` with `lesion_weight` > 0 also trains on the lesion masks
    (models.cnn)."""
    c = defaults.get_config()
    c.model.name = "deep_cnn"
    c.model.kwargs.update(widths=tuple(widths), dropout=0.5, hidden=hidden, pool_r=pool_r)
    if head != "dense":  # only then, so that the workdirs of earlier runs still match
        c.model.kwargs.head = head
    c.data.update(source="synthetic", data_dir=str(data_dir), image_size=image_size,
                  synthetic_count=count, validation_fraction=0.25)
    c.train.update(batch_size=32, eval_batch_size=64, epochs=epochs, learning_rate=3e-3,
                   eval_every=40, patience=100, seed=seed, lesion_weight=lesion_weight)
    return c


def trained_model(config: ml_collections.ConfigDict, workdir: str | pathlib.Path) -> dict:
    """Trains `config` in `workdir` (resuming, or reusing a finished run), then returns its
    best checkpoint, its default Grad-CAM stage, and the held-out phantoms (validation and
    test images, labels, masks). A workdir that holds another run is an error, not reused."""
    workdirs.check_config(workdir, config, fix="use another workdir")
    if not (pathlib.Path(workdir) / "summary.json").exists():
        training.train_and_evaluate(config, workdir)
    model = inference.load(workdir)
    config, graphdef, state, meta = model.config, model.graphdef, model.state, model.meta
    name, data_dir = prepare_data(config), config.data.data_dir
    examples = [e for split in ("validation", "test")
                for e in data.data_source(name, split, data_dir=data_dir, with_lesion_mask=True)]
    return dict(config=config, graphdef=graphdef, state=state,
                auc=meta["validation"]["roc_auc"],
                layer=gradcam.config_layer(config),
                images=np.stack([e["image"] for e in examples]),
                labels=np.array([e["label"] for e in examples]),
                masks=np.stack([e["lesion_mask"][..., 0] for e in examples]).astype(bool))


def _mass(maps: np.ndarray, region: np.ndarray) -> float:
    return float(np.mean((maps * region).sum((1, 2)) / np.maximum(maps.sum((1, 2)), 1e-12)))


def peaks(maps: np.ndarray, masks: np.ndarray, dilated: np.ndarray) -> dict:
    """Where each (B, H, W) map peaks against bool masks: pointing (in `dilated`),
    peak_in_mask, and peak_distance (mean px to the nearest mask pixel, 0 inside)."""
    peak = maps.reshape(len(maps), -1).argmax(1)
    at_peak = lambda a: a.reshape(len(a), -1)[np.arange(len(a)), peak]
    distance = np.stack([ndimage.distance_transform_edt(~m) for m in masks])
    return dict(pointing=float(at_peak(dilated).mean()), peak_in_mask=float(at_peak(masks).mean()),
                peak_distance=float(at_peak(distance).mean()))


def measure(model: dict, *, layer: str | None = None, method: str = gradcam.METHODS[0]) -> dict:
    """Pointing game, where the peaks fall, mass and the ideal map's mass for one stage and
    method, on the PNEUMONIA images of `trained_model`'s result."""
    layer = layer or model["layer"]
    sick = model["labels"] == 1
    images, masks = model["images"][sick], model["masks"][sick]
    out = gradcam.cams(model["graphdef"], model["state"], images, layer=layer, method=method)
    maps, grid = np.asarray(out["maps"]), out["raw"].shape[1]
    size = images.shape[1]
    radius = max(1, size // grid // 2)
    dilated = np.stack([ndimage.binary_dilation(m, np.ones((3, 3)), iterations=radius)
                        for m in masks])
    cell = losses.lesion_share(masks, (grid, grid))
    ideal = np.asarray(jax.image.resize(cell, masks.shape, "bilinear"))
    return dict(layer=layer, method=method, grid=grid, images=len(maps), radius=radius,
                auc=model["auc"], **peaks(maps, masks, dilated),
                mass=_mass(maps, masks), mass_dilated=_mass(maps, dilated),
                ideal_mass=_mass(ideal, masks), area=float(masks.mean()),
                area_dilated=float(dilated.mean()))
