r"""Does Grad-CAM point at the lesion? Localisation on synthetic phantoms whose masks are known.

    python experiments/localisation.py --widths 16,32 --count 640 --epochs 10 --pool-r 10 \
        --head lesion --lesion-weight 10            # the CI's goal test: trained on the masks
    python experiments/localisation.py              # the CI's labels-only model, ~1 min
    python experiments/localisation.py --widths 16,32 --count 1200 --epochs 15 --pool-r 10 --seed 0

Trains a DeepCNN on 64 px phantoms (`pneumojax.data.synthetic`: every PNEUMONIA image carries
1-3 consolidations and their masks) and, on the held-out PNEUMONIA images, scores each method
at each spatial stage:

- pointing: the share of images whose map peaks inside a lesion mask dilated by half a
  feature cell (a peak can be placed no finer than a cell);
- peak_in_mask, peak_distance: the share whose peak lies inside the mask itself, and the mean
  distance in px from the peak to the nearest lesion pixel: near misses or wrong places;
- mass: the share of the map's sum inside the masks, and inside the dilated masks;
- ideal_mass: the mass of an ideal map at that grid, each cell its lesion fraction, upsampled
  the same way: a reference for what the grid allows (not a strict bound).

A map can be judged only against where its model looked: a model trained on labels alone
may put its lesion units a cell off the lesion, so the goals are tested on one whose logit
pools cell scores trained on the masks too (`--head lesion --lesion-weight 10`).
`tests/test_gradcam.py` runs the first two commands' models. Results merge into
experiments/results/localisation.json, one record per (model, data, stage, method).
"""

from __future__ import annotations

import argparse
import datetime
import pathlib
import sys

import jax
import ml_collections
import numpy as np
from scipy import ndimage

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # run as a script
from configs import deep_cnn
from experiments import common
from pneumojax import data, gradcam, models, train, workdirs

RESULTS = pathlib.Path(__file__).parent / "results" / "localisation.json"
KEY = ("widths", "hidden", "pool_r", "head", "lesion_weight", "count", "epochs", "image_size",
       "seed", "layer", "method", "device")


def phantom_config(data_dir: str | pathlib.Path, *, image_size: int = 64, count: int = 320,
                   widths: tuple[int, ...] = (8, 16, 16), hidden: int = 16, pool_r: float = 0.0,
                   head: str = "dense", lesion_weight: float = 0.0, epochs: float = 10.0,
                   seed: int = 0) -> ml_collections.ConfigDict:
    """configs/deep_cnn.py, narrowed and sized for phantoms: a quarter held out for validation
    (and as many again as test), and validation every 40 steps for the best checkpoint.
    `head="lesion"` with `lesion_weight` > 0 also trains on the lesion masks (models.cnn)."""
    c = deep_cnn.get_config()
    c.data.update(source="synthetic", data_dir=str(data_dir), image_size=image_size,
                  synthetic_count=count, validation_fraction=0.25)
    c.model.kwargs.update(widths=tuple(widths), hidden=hidden, pool_r=pool_r)
    if head != "dense":  # only then, so that the workdirs of earlier runs still match
        c.model.kwargs.head = head
    c.train.update(batch_size=32, eval_batch_size=64, epochs=epochs, learning_rate=3e-3,
                   eval_every=40, patience=100, seed=seed, lesion_weight=lesion_weight)
    return c


def trained_model(config: ml_collections.ConfigDict, workdir: str | pathlib.Path) -> dict:
    """Trains `config` in `workdir` (resuming, or reusing a finished run), then returns its
    best checkpoint, its default Grad-CAM stage, and the held-out phantoms (validation and
    test images, labels, masks). A workdir that holds another run is an error, not reused."""
    workdirs.check_config(workdir, config, fix="use another workdir")
    if not (pathlib.Path(workdir) / "summary.json").exists():
        train.train_and_evaluate(config, workdir)
    config, graphdef, state, meta, _ = train.restore(workdir)
    name, data_dir = train.prepare_data(config), config.data.data_dir
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
    method, on the PNEUMONIA images."""
    layer = layer or model["layer"]
    sick = model["labels"] == 1
    images, masks = model["images"][sick], model["masks"][sick]
    out = gradcam.cams(model["graphdef"], model["state"], images, layer=layer, method=method)
    maps, grid = np.asarray(out["maps"]), out["raw"].shape[1]
    size = images.shape[1]
    radius = max(1, size // grid // 2)
    dilated = np.stack([ndimage.binary_dilation(m, np.ones((3, 3)), iterations=radius)
                        for m in masks])
    cell = train.lesion_share(masks, (grid, grid))
    ideal = np.asarray(jax.image.resize(cell, masks.shape, "bilinear"))
    return dict(layer=layer, method=method, grid=grid, images=len(maps), radius=radius,
                auc=model["auc"], **peaks(maps, masks, dilated),
                mass=_mass(maps, masks), mass_dilated=_mass(maps, dilated),
                ideal_mass=_mass(ideal, masks), area=float(masks.mean()),
                area_dilated=float(dilated.mean()))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    ints = lambda s: tuple(int(v) for v in s.split(","))
    parser.add_argument("--widths", type=ints, default=(8, 16, 16))
    parser.add_argument("--hidden", type=int, default=16)
    parser.add_argument("--pool-r", type=float, default=0.0,
                        help="global pooling: 0 is the mean, r > 0 log-sum-exp (models.cnn)")
    parser.add_argument("--head", default="dense", choices=models.cnn.HEADS,
                        help="lesion: per-cell scores, pooled (models.cnn.DeepCNN)")
    parser.add_argument("--lesion-weight", type=float, default=0.0,
                        help="> 0: train the lesion head on the masks too (train.lesion_loss)")
    parser.add_argument("--count", type=int, default=320, help="phantoms, all splits")
    parser.add_argument("--epochs", type=float, default=10.0)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0, help="training seed")
    parser.add_argument("--layers", help="comma-separated stages (default: every spatial one)")
    parser.add_argument("--methods", default=",".join(gradcam.METHODS))
    parser.add_argument("--workdir", type=pathlib.Path, help="default: workdirs/localisation/...")
    parser.add_argument("--data-dir", type=pathlib.Path,
                        help="where the phantoms are prepared (default: WORKDIR/data)")
    parser.add_argument("--out", type=pathlib.Path, default=RESULTS)
    args = parser.parse_args(argv)
    tag = (f"w{'-'.join(map(str, args.widths))}_h{args.hidden}_r{args.pool_r:g}_n{args.count}"
           f"_e{args.epochs:g}_{args.image_size}px_s{args.seed}"
           + (f"_{args.head}_l{args.lesion_weight:g}" if args.head != "dense" else ""))
    workdir = args.workdir or common.ROOT / "workdirs" / "localisation" / tag
    config = phantom_config(args.data_dir or workdir / "data", image_size=args.image_size,
                            count=args.count, widths=args.widths, hidden=args.hidden,
                            pool_r=args.pool_r, head=args.head,
                            lesion_weight=args.lesion_weight, epochs=args.epochs, seed=args.seed)
    model = trained_model(config, workdir)
    layers = (args.layers.split(",") if args.layers
              else [f"block{i + 1}" for i in range(len(args.widths))])
    shared = dict(widths=list(args.widths), hidden=args.hidden, pool_r=args.pool_r,
                  head=args.head, lesion_weight=args.lesion_weight,
                  count=args.count, epochs=args.epochs, image_size=args.image_size,
                  seed=args.seed, workdir=str(workdir),
                  device=common.device_name(), commit=common.commit(),
                  date=datetime.date.today().isoformat())
    records = []
    print(f"{tag}: validation AUC {model['auc']:.4f}")
    for layer in layers:
        for method in args.methods.split(","):
            r = measure(model, layer=layer, method=method)
            records.append(dict(shared, **r))
            print(f"{layer} ({r['grid']}x{r['grid']}) {method:<9} pointing {r['pointing']:.3f} "
                  f"(in the mask {r['peak_in_mask']:.3f}, {r['peak_distance']:.1f} px off)  "
                  f"mass {r['mass']:.3f} (ideal {r['ideal_mass']:.3f})  "
                  f"dilated by {r['radius']} px: {r['mass_dilated']:.3f} of the mass in "
                  f"{r['area_dilated']:.3f} of the image")
    common.merge_results(args.out, records, KEY)
    print(f"written: {args.out}")


if __name__ == "__main__":
    main()
