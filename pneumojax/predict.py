"""Predict single images or folders, with a Grad-CAM heat map for each.

    python -m pneumojax.predict --workdir workdirs/deep_cnn_cpu xray.jpeg scans/ --out heatmaps/

Prints one JSON line per image: file, probability of PNEUMONIA, label at the threshold chosen
on validation, that threshold, and the overlay PNG (image, heat map, contour). JPEG, PNG and
DICOM of any size or mode are read exactly as in training. A file that cannot be read gets a
line with its error while the rest still run; the exit status is 1 if any file failed. Only
regular files (or links to them) of at most `images.MAX_BYTES` are read: a FIFO, a device or
a folder without images is its path's error. No image among all the paths, or a wrong
--workdir, --checkpoint, --method or --layer, is one line and exit status 2 (cli.py).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import stat
import sys
from collections.abc import Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from pneumojax import cli, evaluate, gradcam, plots
from pneumojax.data import images

_FIX = f"give image files ({', '.join(sorted(images.IMAGE_SUFFIXES))}) or folders of them"


def collect(paths: Sequence[str | pathlib.Path]) -> list[pathlib.Path]:
    """Files as given, and what inside folders has an image suffix (hidden files skipped); a
    folder without any stays as itself, so that it gets its own error line."""
    files = []
    for p in map(pathlib.Path, paths):
        found = sorted(f for f in p.rglob("*") if not f.name.startswith(".")
                       and f.suffix.lower() in images.IMAGE_SUFFIXES
                       and not f.is_dir()) if p.is_dir() else []
        files += found or [p]  # a FIFO or device found here is reported, not skipped
    if all(f.is_dir() for f in files):
        raise cli.UserError(f"no image file in {', '.join(map(str, paths))}; {_FIX}")
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
        raise images.ImageError(path, f"a folder without image files; {_FIX}")
    if kind := images.special_file(mode):
        raise images.ImageError(path, f"{kind}, not a regular file, so not read; {_FIX}")
    return images.read_bytes(path)


def _load(path: pathlib.Path, size: int) -> tuple[np.ndarray, np.ndarray]:
    """(model input, overlay preview): decoded for the model exactly as in training, and
    natively for the overlay, of which only the preview is kept while the batch runs."""
    data = read_file(path)
    return (images.decode_grayscale(data, path, size=size),
            plots.preview(images.decode_grayscale(data, path)))


def _check_cam(graphdef: nnx.GraphDef, state: dict, size: int, *, layer: str, method: str) -> None:
    """Traces Grad-CAM once on an abstract batch, so that a wrong --method or --layer is one
    line naming the valid choices before any image is read."""
    if method not in gradcam.METHODS:
        raise cli.UserError(f"--method {method!r}: unknown; valid: {', '.join(gradcam.METHODS)}")
    batch = jax.ShapeDtypeStruct((1, size, size, 1), jnp.uint8)
    try:
        jax.eval_shape(lambda x: gradcam.cams(graphdef, state, x, layer=layer, method=method),
                       batch)
    except ValueError as e:
        raise cli.UserError(f"--layer {layer!r}: {e}") from e


def predict(workdir: str | pathlib.Path, paths: Sequence[str | pathlib.Path], *,
            out: str | pathlib.Path, method: str = gradcam.METHODS[0], layer: str | None = None,
            checkpoint: str = "best", batch_size: int = 16) -> Iterator[dict]:
    """One record per file, in order: a prediction with its overlay, or the file's error."""
    files = collect(paths)
    config, graphdef, state, meta, step = evaluate.restore(workdir, checkpoint)
    layer = layer or gradcam.config_layer(config)
    size, threshold = config.data.image_size, float(meta["threshold"])
    _check_cam(graphdef, state, size, layer=layer, method=method)
    out = pathlib.Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written = set()
    for start in range(0, len(files), batch_size):
        ok = []
        for f in files[start:start + batch_size]:
            try:
                ok.append((f, *_load(f, size)))
            except images.ImageError as e:
                yield {"file": str(f), "error": e.reason}
        if not ok:
            continue
        batch = jnp.asarray(np.stack([small for _, small, _ in ok]))
        result = gradcam.cams(graphdef, state, batch, layer=layer, method=method)
        for (f, _, shown), p, heat in zip(ok, np.asarray(result["probability"]),
                                          np.asarray(result["maps"])):
            label = "PNEUMONIA" if p >= threshold else "NORMAL"
            name = f"{f.stem}.{method}.png"
            while name in written:  # same stem in two folders
                name = f"{f.parent.name}_{name}"
            written.add(name)
            overlay = plots.heatmap_overlay(
                shown, heat, out / name,
                title=f"{f.name}: P(PNEUMONIA) = {p:.3f} -> {label} (threshold {threshold:.3f}, "
                      f"{method} at {layer}, step {step})")
            yield {"file": str(f), "probability": float(p), "label": label,
                   "threshold": threshold, "heatmap": str(overlay)}


def main(argv: list[str]) -> int:
    parser = cli.ArgumentParser(prog="python -m pneumojax.predict", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("inputs", nargs="+", help="image files or folders")
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--out", default="predictions", help="folder for the overlay PNGs")
    parser.add_argument("--method", default=gradcam.METHODS[0],
                        help=f"{', '.join(gradcam.METHODS)}; default {gradcam.METHODS[0]}: see "
                        "experiments/results/deletion.json")
    parser.add_argument("--layer", help="named stage (default: the last one with a grid of at "
                        "least 7x7 at the model's input size)")
    parser.add_argument("--checkpoint", default="best", help="best, latest or a step number")
    args = parser.parse_args(argv)
    failed = 0
    for record in predict(args.workdir, args.inputs, out=args.out, method=args.method,
                          layer=args.layer, checkpoint=args.checkpoint):
        failed += "error" in record
        print(json.dumps(record), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(cli.run(main))
