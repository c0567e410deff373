"""Predict single images or folders, with a Grad-CAM heat map for each.

    python -m pneumojax.predict --workdir workdirs/deep_cnn_cpu xray.jpeg scans/ --out heatmaps/
    python -m pneumojax.predict --workdir DIR_A --workdir DIR_B xray.jpeg   # an ensemble

Prints one JSON line per image: file, probability of PNEUMONIA, label at the threshold chosen
on validation, that threshold, and the overlay PNG (image, heat map, contour). Several
`--workdir`s average their probabilities (`ensemble`); the heat map is the first run's. JPEG,
PNG and DICOM of any size or mode are read exactly as in training. A file that cannot be read gets a
line with its error while the rest still run; the exit status is 1 if any file failed. Only
regular files (or links to them) of at most `images.MAX_BYTES` are read: a FIFO, a device or
a folder without images is its path's error. No image among all the paths, or a wrong
--workdir, --checkpoint, --method or --layer, is one line and exit status 2 (cli.py).
"""

from __future__ import annotations

import json
import pathlib
import sys
from collections.abc import Iterator, Sequence

from pneumojax import cli, ensemble, gradcam, inference, plots, xla_cpu
from pneumojax.data import images


def predict(workdirs: ensemble.Workdirs, paths: Sequence[str | pathlib.Path], *,
            out: str | pathlib.Path, method: str = gradcam.METHODS[0], layer: str | None = None,
            checkpoint: str = "best", batch_size: int = 16) -> Iterator[dict]:
    """One record per file, in order: a prediction with its overlay, or the file's error."""
    files = inference.collect(paths)  # no image at all: refused before the checkpoint is read
    model = ensemble.load(workdirs, checkpoint)
    layer = layer or model.members[0].layer
    out = pathlib.Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written = set()
    for p in model.iter_files(files, method=method, layer=layer, batch_size=batch_size):
        if p.error:
            yield {"file": str(p.file), "error": p.error}
            continue
        name = f"{p.file.stem}.{method}.png"
        while name in written:  # same stem in two folders
            name = f"{p.file.parent.name}_{name}"
        written.add(name)
        overlay = plots.heatmap_overlay(
            plots.preview(images.decode_grayscale(p.data, p.file)), p.map, out / name,
            title=f"{p.file.name}: P(PNEUMONIA) = {p.probability:.3f} -> {p.label} (threshold "
                  f"{model.threshold:.3f}, {method} at {layer}, step {model.members[0].step})")
        yield {"file": str(p.file), "probability": p.probability, "label": p.label,
               "threshold": model.threshold, "heatmap": str(overlay)}


def main(argv: list[str]) -> int:
    xla_cpu.set_flags()  # before JAX's backend starts
    parser = cli.ArgumentParser(prog="python -m pneumojax.predict", description=__doc__,
                                examples=[
        "python -m pneumojax.predict --workdir workdirs/deep_cnn_cpu xray.jpeg scans/ "
        "--out heatmaps/",
        "python -m pneumojax.predict --workdir DIR --method gradcam++ --layer block3 study.dcm"])
    parser.add_argument("inputs", nargs="+", metavar="INPUT", help="image files or folders")
    parser.add_run_arguments()
    parser.add_argument("--out", default="predictions", metavar="DIR",
                        help="folder for the overlay PNGs")
    parser.add_argument("--method", default=gradcam.METHODS[0], metavar="METHOD",
                        help=f"{', '.join(gradcam.METHODS)} (default: {gradcam.METHODS[0]}: see "
                        "experiments/results/deletion.json)")
    parser.add_argument("--layer", metavar="STAGE", help="named stage (default: the last one "
                        "with a grid of at least 7x7 at the model's input size)")
    args = parser.parse_args(argv)
    failed = 0
    for record in predict(args.workdir, args.inputs, out=args.out, method=args.method,
                          layer=args.layer, checkpoint=args.checkpoint):
        failed += "error" in record
        print(json.dumps(record), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(cli.run(main))
