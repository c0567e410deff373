r"""How a run may fare on a new cohort, measured without the test set: three proxies, one command.

    python -m pneumojax.cohort --workdir workdirs/deep_cnn_cpu
    python -m pneumojax.cohort --workdir A --workdir B --data folder:PATH/chest_xray/val \
        --out cohort.json

Issue 22: runs score about 97 % on validation (patients disjoint from train, same hospital) but
about 87 % on Kermany's test set, another cohort, where about 30 % of NORMAL films are called
PNEUMONIA. The test set stays held out; these parts stand in for it, at the threshold frozen on
validation (`ensemble.Ensemble.threshold`), each trusted only as far as stated:

(a) shifts: validation again under each acquisition shift of `pneumojax.shifts`, mild and
    strong. Synthetic and chosen by us: it ranks fragility (to exposure, blur, markers, ...),
    it does not predict another hospital's score. No intervals: the same images every time.
    A run trained with augment's gamma, blur or noise families has seen the like of some
    shifts (by other code, other draws): the report lists its photometric families.
(b) holdout: a sub-cohort of train held out as a whole (`--config.data.holdout=NORMAL2-` when
    training; split "holdout"), never trained on nor used to choose the threshold. Same
    hospital, another series of films: nearer to a new cohort than validation, not one. It may
    hold one class (NORMAL2- does), so it reports specificity, and the ROC-AUC of its NORMAL
    films against validation's PNEUMONIA films (95 % intervals over patients).
(c) folders (`--data folder:PATH`, repeatable), e.g. the 16 films of Kermany's `val` split, which
    come from the test cohort: the real thing, but 16 films give intervals too wide to rank
    runs by; they show a gross failure, nothing finer.

Writes JSON (default WORKDIR/eval/cohort.json of the first run) and prints a table. A wrong
workdir, checkpoint or folder is one line naming it, exit status 2 (cli.py).
"""

from __future__ import annotations

import json
import math
import pathlib
import sys
from collections.abc import Sequence

import numpy as np

from pneumojax import cli, ensemble, metrics, shifts, xla_cpu
from pneumojax.data import augment

SHIFT_METRICS = ("roc_auc", "accuracy", "sensitivity", "specificity", "balanced_accuracy")
SUMMARY_METRICS = ("roc_auc", "specificity", "balanced_accuracy")  # mean and worst over shifts
_HEADS = {"roc_auc": "AUC", "accuracy": "accuracy", "sensitivity": "sensitivity",
          "specificity": "specificity", "balanced_accuracy": "balanced"}  # the table's columns
FEW_FILMS = 100  # a folder smaller than this gets the warning that its intervals are wide


def _finite(x: float) -> float | None:
    return float(x) if math.isfinite(x) else None  # strict JSON: an undefined metric is null


def _bootstrapped(s: ensemble.Scored, threshold: float, n_boot: int) -> dict:
    """`metrics.summarize` at the frozen threshold, whole patients resampled."""
    m = metrics.summarize(s.labels, s.probs, {"frozen": threshold}, groups=s.patients,
                          n_boot=n_boot)["frozen"]
    spec, sens = m["specificity"], m["sensitivity"]
    m["balanced_accuracy"] = None if spec is None or sens is None else (spec + sens) / 2
    return m


def _rates(s: ensemble.Scored, threshold: float) -> dict:
    """`SHIFT_METRICS` at the frozen threshold, without intervals."""
    m = metrics.classification_metrics(s.labels, s.probs, threshold)
    m["balanced_accuracy"] = (m["sensitivity"] + m["specificity"]) / 2
    return {k: _finite(m[k]) for k in SHIFT_METRICS}


def _shifted(e: ensemble.Ensemble, names: Sequence[str], seed: int) -> dict:
    """{shift: {"severity": {level: value}, level: metrics}} on validation."""
    out = {}
    for name in names:
        out[name] = {"severity": dict(zip(shifts.LEVEL_NAMES, shifts.LEVELS[name]))}
        for i, level in enumerate(shifts.LEVEL_NAMES):
            transform = lambda x, name=name, i=i: shifts.apply(name, i, x, seed=seed)
            out[name][level] = _rates(e.score("tfds:validation", transform=transform),
                                      e.threshold)
    return out


def _holdout(e: ensemble.Ensemble, validation: ensemble.Scored, n_boot: int) -> dict:
    """Part (b), or {"skipped": why}."""
    prefix = e.members[0].config.data.get("holdout", "")
    if not prefix:
        return {"skipped": "the run held no sub-cohort out (data.holdout is empty); train with "
                           "--config.data.holdout=NORMAL2- to measure this part"}
    s = e.score("tfds:holdout")
    counts = np.bincount(s.labels, minlength=2)
    result = {"prefix": prefix, "n": int(len(s.labels)),
              "classes": {"NORMAL": int(counts[0]), "PNEUMONIA": int(counts[1])},
              "metrics": _bootstrapped(s, e.threshold, n_boot)}
    normal, pneumonia = s.labels == 0, validation.labels == 1
    versus = {"n_normal": int(normal.sum()), "n_pneumonia": int(pneumonia.sum()),
              "roc_auc": None, "ci95": None}
    if normal.any() and pneumonia.any():  # validation always holds PNEUMONIA; the cohort may not
        labels = np.r_[np.zeros(normal.sum(), np.int32), np.ones(pneumonia.sum(), np.int32)]
        probs = np.r_[s.probs[normal], validation.probs[pneumonia]]
        groups = ([f"holdout/{p}" for p, keep in zip(s.patients, normal) if keep]
                  + [f"validation/{p}" for p, keep in zip(validation.patients, pneumonia) if keep])
        versus["roc_auc"] = metrics.roc_auc(labels, probs)
        ci = metrics.bootstrap_intervals(labels, probs, e.threshold, n_boot=n_boot,
                                         groups=groups)["roc_auc"]
        versus["ci95"] = list(ci) if all(map(math.isfinite, ci)) else None
    else:
        versus["undefined"] = "the held-out sub-cohort holds no NORMAL film"
    result["normal_vs_validation_pneumonia"] = versus
    return result


def _folder(e: ensemble.Ensemble, spec: str, n_boot: int) -> dict:
    s = e.score(spec)
    n = int(len(s.labels))
    note = (f"only {n} images: intervals are wide; a gross failure shows, a ranking of runs "
            "does not" if n < FEW_FILMS else "")
    return {"n": n, "positives": int(s.labels.sum()), "rejected": s.rejected, "note": note,
            "metrics": _bootstrapped(s, e.threshold, n_boot)}


def _worst(part: dict, level: str) -> dict:
    """Mean and worst (with which shift) of `SUMMARY_METRICS` over the shifts at `level`."""
    out = {}
    for k in SUMMARY_METRICS:
        values = {name: r[level][k] for name, r in part.items() if r[level][k] is not None}
        worst = min(values, key=values.get) if values else None
        out[k] = {"mean": float(np.mean(list(values.values()))) if values else None,
                  "worst": values.get(worst), "worst_shift": worst}
    return out


def _summary(result: dict) -> dict:
    v, h = result["validation"]["metrics"], result["holdout"]
    return {
        "validation": {"roc_auc": v["roc_auc"], "accuracy": v["accuracy"]},
        "shifts": {level: _worst(result["shifts"], level) for level in shifts.LEVEL_NAMES},
        "holdout": None if "skipped" in h else {
            "specificity": h["metrics"]["specificity"],
            "roc_auc_vs_validation_pneumonia": h["normal_vs_validation_pneumonia"]["roc_auc"]},
        "folders": {spec: {"n": f["n"], "accuracy": f["metrics"]["accuracy"],
                           "roc_auc": f["metrics"]["roc_auc"]}
                    for spec, f in result["folders"].items()},
    }


def report(e: ensemble.Ensemble, data: Sequence[str] = (), *, n_boot: int = 1000,
           shift_names: Sequence[str] | None = None, seed: int = 0) -> dict:
    """The three parts and their summary, as a strict-JSON dict: clean validation, validation
    under `shift_names` (default every shift), the held-out sub-cohort, each `folder:PATH` of
    `data`. `seed` picks the shifts' random draws (the same for every run by default)."""
    names = list(shifts.SHIFTS if shift_names is None else shift_names)
    if unknown := [n for n in names if n not in shifts.SHIFTS]:
        raise cli.UserError(f"shift {unknown[0]!r}: unknown; valid: {', '.join(shifts.SHIFTS)}")
    validation = e.score("tfds:validation")
    result = {
        "model": e.describe(), "threshold": e.threshold, "n_boot": n_boot,
        "photometric_augmentation": sorted({f for m in e.members for f in augment.AugmentConfig(
            **m.config.data.augment).families("photometric")}),
        "validation": {"n": int(len(validation.labels)),
                       "metrics": _bootstrapped(validation, e.threshold, n_boot)},
        "shifts": _shifted(e, names, seed),
        "holdout": _holdout(e, validation, n_boot),
        "folders": {spec: _folder(e, spec, n_boot) for spec in data},
    }
    result["summary"] = _summary(result)
    return result


def _fmt(x: float | None, interval: Sequence[float] | None = None) -> str:
    text = "  n/a" if x is None else f"{x:.3f}"
    return text + (f" [{interval[0]:.3f}, {interval[1]:.3f}]" if interval else "")


def format_report(result: dict) -> str:
    """The table `main` prints."""
    v = result["validation"]["metrics"]
    rows = [result["model"],
            f"validation  n {result['validation']['n']}"
            f"  AUC {_fmt(v['roc_auc'], v['ci95']['roc_auc'])}"
            f"  accuracy {_fmt(v['accuracy'], v['ci95']['accuracy'])}"
            f"  specificity {_fmt(v['specificity'])}",
            f"  {'shift':<14}{'level':<8}" + "".join(f"{_HEADS[k]:>12}" for k in SHIFT_METRICS)]
    for name, r in result["shifts"].items():
        for level in shifts.LEVEL_NAMES:
            rows.append(f"  {name:<14}{level:<8}" + "".join(f"{_fmt(r[level][k]):>12}"
                                                          for k in SHIFT_METRICS))
    for level, s in result["summary"]["shifts"].items():
        rows.append(f"  {level} shifts: " + "; ".join(
            f"{k} mean {_fmt(m['mean'])}, worst {_fmt(m['worst'])} ({m['worst_shift']})"
            for k, m in s.items()))
    h = result["holdout"]
    if "skipped" in h:
        rows.append(f"holdout  skipped: {h['skipped']}")
    else:
        m, vs = h["metrics"], h["normal_vs_validation_pneumonia"]
        rows.append(f"holdout {h['prefix']!r}  n {h['n']} ({h['classes']['NORMAL']} NORMAL)  "
                    f"accuracy {_fmt(m['accuracy'], m['ci95']['accuracy'])}  "
                    f"specificity {_fmt(m['specificity'], m['ci95']['specificity'])}  "
                    f"AUC vs validation PNEUMONIA {_fmt(vs['roc_auc'], vs['ci95'])}")
    for spec, f in result["folders"].items():
        m = f["metrics"]
        rows.append(f"{spec}  n {f['n']}  accuracy {_fmt(m['accuracy'], m['ci95']['accuracy'])}"
                    f"  AUC {_fmt(m['roc_auc'], m['ci95']['roc_auc'])}"
                    + (f"  ({f['note']})" if f["note"] else "")
                    + (f"  {len(f['rejected'])} rejected" if f["rejected"] else ""))
    if "out" in result:
        rows.append(f"written: {result['out']}")
    return "\n".join(rows)


def main(argv: list[str]) -> int:
    xla_cpu.set_flags()  # before JAX's backend starts
    parser = cli.ArgumentParser(prog="python -m pneumojax.cohort", description=__doc__,
                                examples=[
        "python -m pneumojax.cohort --workdir workdirs/deep_cnn_cpu",
        "python -m pneumojax.cohort --workdir A --workdir B --data folder:PATH/chest_xray/val "
        "--out cohort.json"])
    parser.add_run_arguments()
    parser.add_argument("--data", action="append", default=[], metavar="folder:PATH",
                        help="a labelled folder of another cohort (repeatable; default: none)")
    parser.add_argument("--out", metavar="FILE",
                        help="JSON file (default: WORKDIR/eval/cohort.json of the first run)")
    parser.add_argument("--n-boot", type=int, default=1000, metavar="N",
                        help="bootstrap resamples")
    args = parser.parse_args(argv)
    if args.n_boot < 1:
        raise cli.UserError(f"--n-boot {args.n_boot}: give at least 1 resample")
    if bad := [d for d in args.data if not d.startswith("folder:")]:
        raise cli.UserError(f"--data {bad[0]!r}: use folder:PATH (validation and the holdout "
                            "split are scored anyway)")
    e = ensemble.load(args.workdir, checkpoint=args.checkpoint)
    result = {"workdirs": [str(w) for w in args.workdir], "checkpoint": args.checkpoint,
              **report(e, args.data, n_boot=args.n_boot)}
    out = pathlib.Path(args.out) if args.out else (
        pathlib.Path(args.workdir[0]).expanduser() / "eval" / "cohort.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1, allow_nan=False) + "\n")
    result["out"] = str(out)
    print(format_report(result))
    return 0


if __name__ == "__main__":
    sys.exit(cli.run(main))
