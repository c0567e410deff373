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

import csv
import dataclasses
import json
import pathlib
import re
import sys

import numpy as np

from pneumojax import cli, inference, metrics, plots, xla_cpu
from pneumojax import data as pdata
from pneumojax.data import builder, sources

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
        name = builder.config_name(config.data.source, config.data.image_size,
                                   config.data.holdout)
        src = pdata.data_source(name, where, data_dir=config.data.data_dir)
        meta = [(ex["file_name"].decode(), ex["patient_id"].decode())
                for ex in (src[i] for i in range(len(src)))]  # one read per example
        return src, [f for f, _ in meta], [p for _, p in meta], []
    raise cli.UserError(f"--data {spec!r}: use folder:PATH or tfds:SPLIT")


def evaluate(workdir: str | pathlib.Path, data: str, *, checkpoint: str = "best",
             n_boot: int = 1000, out: str | pathlib.Path | None = None) -> dict:
    """Metrics of one checkpoint on one data set; writes JSON, predictions CSV and plots."""
    model = inference.load(workdir, checkpoint)
    examples, files, patients, rejected = load_images(data, model.config)
    labels, probs, index = model.score_split(examples)
    groups = np.asarray(patients)[index]
    thresholds = {"0.5": 0.5, "validation": model.threshold}
    result = dict(workdir=str(workdir), checkpoint=model.step, data=data, n=int(len(labels)),
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
    xla_cpu.set_flags()  # before JAX's backend starts
    parser = cli.ArgumentParser(prog="python -m pneumojax.evaluate", description=__doc__,
                                examples=[
        "python -m pneumojax.evaluate --workdir workdirs/deep_cnn_cpu "
        "--data folder:PATH/chest_xray/test",
        "python -m pneumojax.evaluate --workdir DIR --checkpoint latest --data tfds:validation "
        "--out v.json"])
    parser.add_run_arguments()
    parser.add_argument("--data", required=True, help="folder:PATH or tfds:SPLIT")
    parser.add_argument("--out", metavar="FILE",
                        help="JSON file (default: WORKDIR/eval/<data>.json)")
    parser.add_argument("--n-boot", type=int, default=1000, metavar="N",
                        help="bootstrap resamples")
    args = parser.parse_args(argv)
    result = evaluate(args.workdir, args.data, checkpoint=args.checkpoint, n_boot=args.n_boot,
                      out=args.out)
    print(format_result(result))
    return 0


if __name__ == "__main__":
    sys.exit(cli.run(main))
