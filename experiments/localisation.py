r"""Does Grad-CAM point at the lesion? Localisation on synthetic phantoms whose masks are known.

    python experiments/localisation.py --widths 16,32 --count 640 --epochs 10 --pool-r 10 \
        --head lesion --lesion-weight 10            # the CI's goal test: trained on the masks
    python experiments/localisation.py              # the CI's labels-only model, ~1 min
    python experiments/localisation.py --widths 16,32 --count 1200 --epochs 15 --pool-r 10 --seed 0

Trains a DeepCNN on 64 px phantoms (`pneumojax.data.synthetic`: every PNEUMONIA image carries
1-3 consolidations and their masks) and, on the held-out PNEUMONIA images, scores each method
at each spatial stage with the measures of `pneumojax.localisation` (pointing, peak in mask,
peak distance, mass, ideal mass: defined there).

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

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # run as a script
from experiments import common
from pneumojax import gradcam, models, xla_cpu
from pneumojax.localisation import measure, phantom_config, trained_model

RESULTS = pathlib.Path(__file__).parent / "results" / "localisation.json"
KEY = ("widths", "hidden", "pool_r", "head", "lesion_weight", "count", "epochs", "image_size",
       "seed", "layer", "method", "device")


def main(argv: list[str] | None = None) -> None:
    xla_cpu.set_flags()  # before JAX's backend starts
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
                        help="> 0: train the lesion head on the masks too "
                        "(pneumojax.losses.lesion_loss)")
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
                  seed=args.seed, workdir=common.portable(workdir),
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
