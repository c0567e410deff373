r"""Score a checkpoint on images it has never seen.

    python -m pneumojax.evaluate --workdir workdirs/deep_cnn_cpu --data folder:PATH/chest_xray/test
    python -m pneumojax.evaluate --workdir DIR --checkpoint latest --data tfds:validation \
        --out v.json

`--data folder:PATH` reads a Kaggle-layout folder `PATH/{NORMAL,PNEUMONIA}/*` at any image size
(decoded and squashed exactly as `prepare` does); `--data tfds:SPLIT` reads a split of the data
set the run was trained on. Metrics come at threshold 0.5 and at the threshold chosen on
validation during training, each with a 95 % bootstrap interval over patients; a metric the
images cannot define (ROC-AUC of a folder of one class) is null, with the reason beside it.
A wrong workdir, checkpoint or folder is one line naming it, exit status 2 (cli.py).
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import pathlib
import re
import sys
from typing import Any

import jax
import ml_collections
import numpy as np

from pneumojax import checkpoint, cli, metrics, plots, sharding, train
from pneumojax import data as pdata
from pneumojax.data import builder, sources

_TRAIN_HINT = "give the folder that `python -m pneumojax.main --workdir DIR` wrote"
# What orbax and tensorstore raise for a damaged checkpoint: a missing item is a KeyError, a
# truncated JSON a ValueError, a garbled array file a ValueError or an OSError.
_DAMAGED = (OSError, ValueError, KeyError)


def _check_workdir(workdir: pathlib.Path) -> None:
    """A folder with a readable config.json; read here first so that a broken one is not
    blamed on the checkpoint that `train.restore` reads next."""
    if not workdir.is_dir():
        raise cli.UserError(f"--workdir {workdir}: no such folder; {_TRAIN_HINT}")
    if not (workdir / "config.json").is_file():
        raise cli.UserError(f"--workdir {workdir}: not a training run (no config.json); "
                            f"{_TRAIN_HINT}")
    try:
        train.load_config(workdir)
    except (OSError, ValueError) as e:
        raise cli.UserError(f"{workdir / 'config.json'}: unreadable ({type(e).__name__}: "
                            f"{e}); {_TRAIN_HINT}") from e


def _unreadable(folder: pathlib.Path, steps: list[int], error: Exception) -> cli.UserError:
    return cli.UserError(
        f"{folder}: checkpoint unreadable, corrupt or incomplete ({type(error).__name__}: "
        f"{error}); choose another with --checkpoint (saved steps: "
        f"{', '.join(map(str, steps))}) or train again")


def _resolve(directory: pathlib.Path, which: str) -> tuple[int, list[int]]:
    """(step that `which` names, every saved step), `which` checked against the saved steps."""
    ckpt = checkpoint.Checkpointer(directory, read_only=True)
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


def restore(workdir: str | pathlib.Path, which: str = "best"
            ) -> tuple[ml_collections.ConfigDict, Any, train.State, dict, int]:
    """`train.restore`, with each way a workdir or checkpoint can be wrong stated in one line
    that names the folder, file or step and the fix. Prediction restores through it too."""
    workdir = pathlib.Path(workdir).expanduser()
    _check_workdir(workdir)
    step, steps = _resolve(workdir / "checkpoints", str(which))
    try:
        return train.restore(workdir, step)
    except _DAMAGED as e:
        raise _unreadable(workdir / "checkpoints" / str(step), steps, e) from e


def load_images(spec: str, config) -> tuple[list[dict], list[str], list[str], list[dict]]:
    """(examples, file names, patient ids, rejected files) for `folder:PATH` or `tfds:SPLIT`."""
    kind, _, where = spec.partition(":")
    if kind == "folder":
        scan = sources.scan_class_folder(pathlib.Path(where).expanduser(), config.data.image_size)
        rejected = list(scan.rejected)
        decoded = sources.decode_all(next(iter(scan.candidates.values())), rejected)
        if not decoded:
            raise cli.UserError(f"{where}: none of its {len(rejected)} file(s) is a usable "
                                f"image, e.g. {rejected[0].file}: {rejected[0].reason}")
        examples = [{"image": image, "label": np.int32(c.label)} for c, image, _ in decoded]
        return (examples, [c.file_name for c, _, _ in decoded],
                [c.patient_id for c, _, _ in decoded], [dataclasses.asdict(r) for r in rejected])
    if kind == "tfds":
        name = builder.config_name(config.data.source, config.data.image_size)
        src = pdata.data_source(name, where, data_dir=config.data.data_dir)
        meta = [(ex["file_name"].decode(), ex["patient_id"].decode())
                for ex in (src[i] for i in range(len(src)))]  # one read per example
        return src, [f for f, _ in meta], [p for _, p in meta], []
    raise cli.UserError(f"--data {spec!r}: use folder:PATH or tfds:SPLIT")


def evaluate(workdir: str | pathlib.Path, data: str, *, checkpoint: str = "best",
             n_boot: int = 1000, out: str | pathlib.Path | None = None) -> dict:
    """Metrics of one checkpoint on one data set; writes JSON, predictions CSV and plots."""
    config, graphdef, state, meta, step = restore(workdir, checkpoint)
    examples, files, patients, rejected = load_images(data, config)
    mesh = sharding.make_mesh()
    state = jax.device_put(state, sharding.replicated(mesh))
    eval_step = train.jit_eval_step(graphdef, config, mesh)
    batch = config.train.eval_batch_size
    labels, probs, index = train.predict(eval_step, state, examples, mesh, batch)
    groups = np.asarray(patients)[index]
    thresholds = {"0.5": 0.5, "validation": meta["threshold"]}
    result = dict(workdir=str(workdir), checkpoint=step, data=data, n=int(len(labels)),
                  rejected=rejected,
                  metrics=metrics.summarize(labels, probs, thresholds, groups=groups,
                                            n_boot=n_boot))
    kind, _, where = data.partition(":")
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", f"{kind}-{pathlib.Path(where).name}")
    out = pathlib.Path(out) if out else pathlib.Path(workdir) / "eval" / f"{slug}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1, allow_nan=False) + "\n")  # strict JSON
    with out.with_suffix(".predictions.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["file", "patient", "label", "probability"])
        for i, y, p in zip(index, labels, probs):
            writer.writerow([files[i], patients[i], int(y), f"{p:.6f}"])
    stem = out.with_suffix("")
    plots.roc({data: (labels, probs)}, f"{stem}_roc.png")
    plots.precision_recall({data: (labels, probs)}, f"{stem}_precision_recall.png")
    plots.threshold_sweep(labels, probs, f"{stem}_threshold_sweep.png", marked=thresholds)
    for name, t in thresholds.items():
        plots.confusion_matrix(metrics.confusion(labels, probs, t),
                               f"{stem}_confusion_{name}.png",
                               title=f"{data}, threshold {t:.3f} ({name})")
    result["out"] = str(out)
    return result


def _metric_row(name: str, m: dict) -> str:
    if m[name] is None:
        return f"    {name:<12}n/a ({m['undefined'][name]})"
    interval = m["ci95"][name]
    ci = "" if interval is None else f"  [{interval[0]:.4f}, {interval[1]:.4f}]"
    return f"    {name:<12}{m[name]:.4f}{ci}"


def format_result(result: dict) -> str:
    rows = [f"{result['data']}: {result['n']} images, checkpoint step {result['checkpoint']}"
            + (f", {len(result['rejected'])} rejected" if result["rejected"] else "")]
    names = ["accuracy", "precision", "recall", "specificity", "f1", "roc_auc", "pr_auc"]
    for label, m in result["metrics"].items():
        rows.append(f"  threshold {m['threshold']:.3f} ({label})")
        rows += [_metric_row(k, m) for k in names]
        (tn, fp), (fn, tp) = m["confusion_matrix"]
        rows.append(f"    confusion   TN {tn}  FP {fp}  FN {fn}  TP {tp}")
    rows += [f"  rejected {r['file']}: {r['reason']}" for r in result["rejected"]]
    rows.append(f"written: {result['out']} (+ predictions CSV and plots beside it)")
    return "\n".join(rows)


def main(argv: list[str]) -> int:
    parser = cli.ArgumentParser(prog="python -m pneumojax.evaluate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--checkpoint", default="best", help="best, latest or a step number")
    parser.add_argument("--data", required=True, help="folder:PATH or tfds:SPLIT")
    parser.add_argument("--out", help="JSON file (default WORKDIR/eval/<data>.json)")
    parser.add_argument("--n-boot", type=int, default=1000, help="bootstrap resamples")
    args = parser.parse_args(argv)
    result = evaluate(args.workdir, args.data, checkpoint=args.checkpoint, n_boot=args.n_boot,
                      out=args.out)
    print(format_result(result))
    return 0


if __name__ == "__main__":
    sys.exit(cli.run(main))
