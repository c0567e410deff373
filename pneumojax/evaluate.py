r"""Score a checkpoint, or an ensemble of runs, on images it has never seen.

    python -m pneumojax.evaluate --workdir workdirs/deep_cnn_cpu --data folder:PATH/chest_xray/test
    python -m pneumojax.evaluate --workdir DIR --checkpoint latest --data tfds:validation \
        --out v.json
    python -m pneumojax.evaluate --workdir DIR_A --workdir DIR_B --data tfds:validation

`--data folder:PATH` reads a Kaggle-layout folder `PATH/{NORMAL,PNEUMONIA}/*` at any image size
(decoded and squashed exactly as `prepare` does); `--data tfds:SPLIT` reads a split of the data
set the run was trained on. Several `--workdir`s average their probabilities (`ensemble`).
Metrics come at threshold 0.5 and at the threshold chosen on validation, each with a 95 %
bootstrap interval over patients; a metric the images cannot define (ROC-AUC of a folder of
one class) is null, with the reason beside it.
A wrong workdir, checkpoint or folder is one line naming it, exit status 2 (cli.py).
"""

from __future__ import annotations

import csv
import json
import pathlib
import re
import sys

import numpy as np

from pneumojax import cli, ensemble, metrics, plots, xla_cpu

def evaluate(workdirs: ensemble.Workdirs, data: str, *, checkpoint: str = "best",
             n_boot: int = 1000, out: str | pathlib.Path | None = None) -> dict:
    """Metrics of one run, or the ensemble of several (`ensemble.load`), on one data set;
    writes JSON, predictions CSV and plots."""
    workdirs = ensemble.paths(workdirs)
    e = ensemble.load(workdirs, checkpoint)
    s = e.score(data)
    thresholds = {"0.5": 0.5, "validation": e.threshold}
    first = e.members[0]
    members = [dict(workdir=str(w), checkpoint=m.step, model=m.config.model.name,
                    image_size=m.image_size, temperature=m.temperature)
               for w, m in zip(workdirs, e.members)]
    result = dict(workdir=str(workdirs[0]), checkpoint=first.step, members=members,
                  description=e.describe(), data=data, n=int(len(s.labels)),
                  rejected=s.rejected,
                  metrics=metrics.summarize(s.labels, s.probs, thresholds,
                                            groups=np.asarray(s.patients), n_boot=n_boot))
    kind, _, where = data.partition(":")
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", f"{kind}-{pathlib.Path(where).name}")
    slug = slug if len(workdirs) == 1 else f"ensemble{len(workdirs)}-{slug}"
    out = pathlib.Path(out) if out else pathlib.Path(workdirs[0]) / "eval" / f"{slug}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1, allow_nan=False) + "\n")  # strict JSON
    with out.with_suffix(".predictions.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["file", "patient", "label", "probability"])
        for file, patient, y, p in zip(s.files, s.patients, s.labels, s.probs):
            writer.writerow([file, patient, int(y), f"{p:.6f}"])
    stem = out.with_suffix("")
    plots.roc({data: (s.labels, s.probs)}, f"{stem}_roc.png")
    plots.precision_recall({data: (s.labels, s.probs)}, f"{stem}_precision_recall.png")
    plots.threshold_sweep(s.labels, s.probs, f"{stem}_threshold_sweep.png", marked=thresholds)
    for name, t in thresholds.items():
        plots.confusion_matrix(metrics.confusion(s.labels, s.probs, t),
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
    rows = [f"{result['data']}: {result['n']} images, {result['description']}"
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
