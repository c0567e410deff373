"""Predict single images or folders, with a Grad-CAM heat map for each.

    python -m pneumojax.predict --workdir workdirs/deep_cnn_cpu xray.jpeg scans/ --out heatmaps/

Prints one JSON line per image: file, probability of PNEUMONIA, label at the threshold chosen
on validation, that threshold, and the overlay PNG (image, heat map, contour). JPEG, PNG and
DICOM of any size or mode are read exactly as in training. A file that cannot be read gets a
line with its error while the rest still run; the exit status is 1 if any file failed.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
from collections.abc import Iterator, Sequence

import jax.numpy as jnp
import numpy as np
from PIL import Image

from pneumojax import gradcam, plots, train
from pneumojax.data import images


def collect(paths: Sequence[str | pathlib.Path]) -> list[pathlib.Path]:
    """Files as given, and the images (by suffix, hidden files skipped) inside folders."""
    files = []
    for p in map(pathlib.Path, paths):
        if p.is_dir():
            files += sorted(f for f in p.rglob("*") if f.is_file() and not f.name.startswith(".")
                            and f.suffix.lower() in images.IMAGE_SUFFIXES)
        else:
            files.append(p)
    return files


def predict(workdir: str | pathlib.Path, paths: Sequence[str | pathlib.Path], *,
            out: str | pathlib.Path, method: str = gradcam.METHODS[0], layer: str | None = None,
            checkpoint: str = "best", batch_size: int = 16) -> Iterator[dict]:
    """One record per file, in order: a prediction with its overlay, or the file's error."""
    config, graphdef, state, meta, step = train.restore(workdir, checkpoint)
    layer = layer or gradcam.config_layer(config)
    size, threshold = config.data.image_size, float(meta["threshold"])
    out = pathlib.Path(out)
    out.mkdir(parents=True, exist_ok=True)
    files, written = collect(paths), set()
    for start in range(0, len(files), batch_size):
        ok = []
        for f in files[start:start + batch_size]:
            try:  # decoded for the model exactly as in training; natively for the overlay
                ok.append((f, images.read_grayscale(f, size=size), images.read_grayscale(f)))
            except images.ImageError as e:
                yield {"file": str(f), "error": e.reason}
        if not ok:
            continue
        batch = jnp.asarray(np.stack([small for _, small, _ in ok]))
        result = gradcam.cams(graphdef, state, batch, layer=layer, method=method)
        for (f, _, native), p, heat in zip(ok, np.asarray(result["probability"]),
                                           np.asarray(result["maps"])):
            label = "PNEUMONIA" if p >= threshold else "NORMAL"
            name = f"{f.stem}.{method}.png"
            while name in written:  # same stem in two folders
                name = f"{f.parent.name}_{name}"
            written.add(name)
            heat = np.asarray(Image.fromarray(heat.astype(np.float32), "F").resize(
                (native.shape[1], native.shape[0]), Image.Resampling.BILINEAR))
            overlay = plots.heatmap_overlay(
                native, heat, out / name,
                title=f"{f.name}: P(PNEUMONIA) = {p:.3f} -> {label} (threshold {threshold:.3f}, "
                      f"{method} at {layer}, step {step})")
            yield {"file": str(f), "probability": float(p), "label": label,
                   "threshold": threshold, "heatmap": str(overlay)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pneumojax.predict", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("inputs", nargs="+", help="image files or folders")
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--out", default="predictions", help="folder for the overlay PNGs")
    parser.add_argument("--method", default=gradcam.METHODS[0], choices=gradcam.METHODS,
                        help="default hirescam: see experiments/results/deletion.json")
    parser.add_argument("--layer", help="named stage (default: the last one with a grid of at "
                        "least 7x7 at the model's input size)")
    parser.add_argument("--checkpoint", default="best", help="best, latest or a step number")
    args = parser.parse_args(argv)
    failed = 0
    try:
        for record in predict(args.workdir, args.inputs, out=args.out, method=args.method,
                              layer=args.layer, checkpoint=args.checkpoint):
            failed += "error" in record
            print(json.dumps(record), flush=True)
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
