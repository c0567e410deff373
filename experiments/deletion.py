r"""Is Grad-CAM faithful? The deletion test on a trained run's images.

    python experiments/deletion.py --workdir workdirs/deep_cnn_cpu
    python experiments/deletion.py --workdir workdirs/deep_cnn_cpu \
        --data folder:PATH/chest_xray/val --out experiments/results/deletion_val.json

For every image: P(PNEUMONIA) as it is, with the 20 % of pixels that its PNEUMONIA Grad-CAM
ranks highest blurred, and with 20 % random pixels blurred (`pneumojax.gradcam.deletion`). A
faithful map makes the first drop larger than the second. Reported over all images and per
true class, with a 95 % bootstrap interval of the mean paired difference. Writes
experiments/results/deletion.json by default.
"""

from __future__ import annotations

import argparse
import datetime
import json
import pathlib
import sys

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # run as a script
from experiments import common
from pneumojax import data as pdata
from pneumojax import ensemble, gradcam, inference, xla_cpu

RESULTS = pathlib.Path(__file__).parent / "results" / "deletion.json"


def probabilities(workdir: str | pathlib.Path, data: str = "tfds:validation", *,
                  methods: tuple[str, ...] = gradcam.METHODS, layer: str | None = None,
                  fraction: float = 0.2, batch_size: int = 64, checkpoint: str = "best") -> dict:
    """Per method: labels and P(PNEUMONIA) original / salient-blurred / random-blurred. The
    random pixels depend only on the batch, so every method is compared with the same ones."""
    model = inference.load(workdir, checkpoint)
    config, graphdef, state, step = model.config, model.graphdef, model.state, model.step
    layer = layer or gradcam.config_layer(config)
    examples = ensemble.load_images(data, config)[0]
    out = {m: {k: [] for k in ("label", "original", "salient", "random")} for m in methods}
    for i, batch in enumerate(pdata.eval_batches(examples, batch_size=batch_size)):
        valid = np.asarray(batch["valid"])
        for method in methods:
            maps = gradcam.cams(graphdef, state, batch["image"], layer=layer, method=method,
                                intensity=config.data.intensity)["maps"]
            probs = gradcam.deletion(graphdef, state, batch["image"], maps, fraction=fraction,
                                     seed=i, intensity=config.data.intensity)
            out[method]["label"].append(np.asarray(batch["label"])[valid])
            for k, v in probs.items():
                out[method][k].append(np.asarray(v)[valid])
    return dict(step=step, layer=layer, methods={
        m: {k: np.concatenate(v) for k, v in columns.items()} for m, columns in out.items()})


def main(argv: list[str] | None = None) -> None:
    xla_cpu.set_flags()  # before JAX's backend starts
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--data", default="tfds:validation", help="tfds:SPLIT or folder:PATH")
    parser.add_argument("--methods", default=",".join(gradcam.METHODS))
    parser.add_argument("--layer", help="named stage (default: gradcam.default_layer)")
    parser.add_argument("--fraction", type=float, default=0.2)
    parser.add_argument("--out", type=pathlib.Path, default=RESULTS)
    args = parser.parse_args(argv)
    p = probabilities(args.workdir, args.data, methods=tuple(args.methods.split(",")),
                      layer=args.layer, fraction=args.fraction)
    record = dict(workdir=common.portable(args.workdir), data=common.portable(args.data),
                  checkpoint=p["step"],
                  layer=p["layer"], fraction=args.fraction,
                  device=common.device_name(), commit=common.commit(),
                  date=datetime.date.today().isoformat(),
                  results={m: gradcam.deletion_summary(v) for m, v in p["methods"].items()})
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=1) + "\n")
    print(f"{args.data}, checkpoint {p['step']}, layer {p['layer']}: mean drop of P(PNEUMONIA)")
    for method, result in record["results"].items():
        for name, r in result.items():
            lo, hi = r["difference_ci95"]
            print(f"{method:<10} {name:<10} n={r['n']:<5} salient {r['drop_salient']:+.4f}  "
                  f"random {r['drop_random']:+.4f}  difference {r['difference']:+.4f} "
                  f"[{lo:+.4f}, {hi:+.4f}]  salient larger in "
                  f"{100 * r['share_salient_larger']:.1f} %")
    print(f"written: {args.out}")


if __name__ == "__main__":
    main()
