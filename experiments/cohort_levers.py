r"""Issue 22's levers, each measured on the new-cohort proxy (`pneumojax.cohort`) and on
validation: one training run per variant, a sub-cohort of train held out from all of them.

    python experiments/cohort_levers.py --source folder:PATH/chest_xray \
        --data folder:PATH/chest_xray/val
    python experiments/cohort_levers.py --variants baseline,equalize --set train.epochs=1

Every variant is `configs/deep_cnn.py:cpu` (or the config it names) with a few fields changed
and `data.holdout` set (default `IM-`: 597 NORMAL films of another numbering series, never
trained on nor used to choose anything). An ensemble variant averages the runs of other
variants. Writes experiments/results/cohort_levers.json (records replaced by name) and
cohort_levers.md. The official `test` split is never read. Workdirs are reused when finished
(WORKDIR_ROOT/NAME); `--retrain` starts over.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import sys

from absl import logging

from pneumojax import cohort, ensemble, xla_cpu
from pneumojax.workdirs import check_config

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # configs/, experiments/
from experiments.common import commit, device_name, merge_results, portable  # noqa: E402
from experiments.reproduce import (RESULTS, apply_override, load_config,  # noqa: E402
                                   parse_override, train_or_reuse)

BASE = "configs/deep_cnn.py:cpu"


@dataclasses.dataclass(frozen=True)
class Variant:
    name: str
    lever: str                                 # what it changes, for the table
    overrides: tuple[str, ...] = ()
    config: str = BASE
    members: tuple[str, ...] = ()              # an ensemble of other variants' runs


VARIANTS = (
    Variant("baseline", "none: `configs/deep_cnn.py:cpu` (64 px)"),
    Variant("resolution_96", "training resolution 96 px", ("data.image_size=96",)),
    # photometric augmentation aimed at acquisition shift: what `configs/deep_cnn.py:robust` is
    Variant("photometric", "photometric augmentation (exposure, contrast, gamma, blur, noise): "
            "`configs/deep_cnn.py:robust`", config="configs/deep_cnn.py:robust"),
    Variant("equalize", "histogram equalisation", ("data.intensity='equalize'",)),
    Variant("clahe", "CLAHE", ("data.intensity='clahe'",)),
    Variant("label_smoothing", "label smoothing 0.1", ("train.label_smoothing=0.1",)),
    Variant("mixup", "mixup, alpha 0.2", ("train.mixup=0.2",)),
    Variant("tta", "test-time augmentation, 5 views", ("data.tta_views=5",)),
    Variant("calibrated", "temperature scaling, threshold for prevalence 0.5",
            ("train.calibrate=True", "train.threshold='prevalence:0.5'")),
    Variant("seed1", "baseline, seed 1 (an ensemble member)", ("train.seed=1",)),
    Variant("seed2", "baseline, seed 2 (an ensemble member)", ("train.seed=2",)),
    Variant("ensemble3", "ensemble of 3 seeds", members=("baseline", "seed1", "seed2")),
    Variant("xception", "Xception from ImageNet, fine-tuned (128 px)",
            config="configs/xception.py:cpu"),
    # Levers together, and an ensemble of the configuration chosen (`:robust`).
    Variant("photometric_clahe", "photometric augmentation + CLAHE",
            ("data.intensity='clahe'",), config="configs/deep_cnn.py:robust"),
    Variant("photometric_equalize", "photometric augmentation + histogram equalisation",
            ("data.intensity='equalize'",), config="configs/deep_cnn.py:robust"),
    Variant("robust_seed1", "`:robust`, seed 1", ("train.seed=1",),
            config="configs/deep_cnn.py:robust"),
    Variant("robust_seed2", "`:robust`, seed 2", ("train.seed=2",),
            config="configs/deep_cnn.py:robust"),
    Variant("robust_ensemble3", "ensemble of 3 `:robust` seeds",
            members=("photometric", "robust_seed1", "robust_seed2")),
)


def config_of(v: Variant, args: argparse.Namespace):
    c = load_config(v.config)
    c.data.source, c.data.holdout = args.source, args.holdout
    for text in (*v.overrides, *args.set):
        _, field, value = parse_override(text)
        apply_override(c, field, value)
    return c


def run(v: Variant, args: argparse.Namespace, done: dict[str, dict]) -> dict:
    root = pathlib.Path(args.workdir_root)
    if v.members:
        workdirs = [root / m for m in v.members]
        missing = [m for m in v.members if m not in done]
        if missing:
            raise ValueError(f"variant {v.name}: run its members first ({', '.join(missing)})")
        info = dict(wall_s=sum(done[m]["wall_s"] or 0 for m in v.members), reused=True)
    else:
        workdirs, config = [root / v.name], config_of(v, args)
        if not args.retrain:
            check_config(workdirs[0], config, fix="pass --retrain to replace it")
        print(f"== {v.name}: {v.config} {' '.join(v.overrides)}", flush=True)
        info = train_or_reuse(config, workdirs[0], args.retrain)
    result = cohort.report(ensemble.load(workdirs), data=args.data, n_boot=args.n_boot)
    return dict(name=v.name, lever=v.lever, config=v.config, overrides=list(v.overrides),
                members=list(v.members), holdout=args.holdout, wall_s=info["wall_s"],
                device=info.get("device") or device_name(), commit=commit(),
                summary=result["summary"], report=result)


def _pct(x: float | None) -> str:
    return "—" if x is None else f"{100 * x:.1f}"


def _auc(x: float | None) -> str:
    return "—" if x is None else f"{x:.3f}"


def markdown(records: list[dict]) -> str:
    head = ["variant", "lever", "validation acc %", "validation AUC", "shifted AUC, mean",
            "shifted specificity %, mean", "shifted balanced acc %, mean",
            "shifted specificity %, worst (shift)", "holdout specificity %", "holdout AUC",
            "`val` acc %", "`val` AUC", "wall"]
    lines = ["# The levers on the new-cohort proxy", "",
             "Written by `python experiments/cohort_levers.py`; every run holds the sub-cohort "
             f"`{records[0]['holdout'] if records else ''}` out of train and validation. Shifts: "
             "the strong level of each of `pneumojax.shifts`, at the threshold frozen on "
             "validation. See docs/cohort.md for how far each column can be trusted.", "",
             "| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for r in records:
        s = r["summary"]
        strong, h = s["shifts"]["strong"], s["holdout"] or {}
        folder = next(iter(s["folders"].values()), {})
        cells = [r["name"], r["lever"], _pct(s["validation"]["accuracy"]),
                 _auc(s["validation"]["roc_auc"]), _auc(strong["roc_auc"]["mean"]),
                 _pct(strong["specificity"]["mean"]), _pct(strong["balanced_accuracy"]["mean"]),
                 f"{_pct(strong['specificity']['worst'])} "
                 f"({strong['specificity']['worst_shift']})",
                 _pct(h.get("specificity")), _auc(h.get("roc_auc_vs_validation_pneumonia")),
                 _pct(folder.get("accuracy")), _auc(folder.get("roc_auc")),
                 "—" if r["wall_s"] is None else f"{r['wall_s'] / 60:.1f} min"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    xla_cpu.set_flags()  # before JAX's backend starts
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", default="synthetic", help="folder:PATH | synthetic")
    parser.add_argument("--data", action="append", default=[], metavar="folder:PATH",
                        help="an extra labelled folder for the proxy, e.g. the `val` films")
    parser.add_argument("--holdout", default="IM-", help="file-name prefix held out")
    parser.add_argument("--variants", default=",".join(v.name for v in VARIANTS))
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                        help="a config field changed in every variant")
    parser.add_argument("--workdir-root", default="workdirs/cohort_levers")
    parser.add_argument("--retrain", action="store_true")
    parser.add_argument("--n-boot", type=int, default=500)
    parser.add_argument("--out", type=pathlib.Path, default=RESULTS)
    args = parser.parse_args(argv)
    logging.set_verbosity(logging.WARNING)
    by_name = {v.name: v for v in VARIANTS}
    if unknown := set(args.variants.split(",")) - set(by_name):
        print(f"error: --variants: unknown {', '.join(sorted(unknown))}", file=sys.stderr)
        return 2
    path = args.out / "cohort_levers.json"
    done = {r["name"]: r for r in (json.loads(path.read_text()) if path.exists() else [])}
    for name in args.variants.split(","):
        text = json.dumps(run(by_name[name], args, done))
        for place in (args.source, *args.data):  # the machine's layout stays out of the record
            text = text.replace(json.dumps(place)[1:-1], portable(place))
        record = dict(json.loads(text), source=portable(args.source),
                      data=[portable(d) for d in args.data])
        done[name] = record
        records = merge_results(path, [record], key=("name",))
        (args.out / "cohort_levers.md").write_text(markdown(records))
        print(cohort.format_report(record["report"]), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
