"""`python -m pneumojax.data prepare|stats`: build the TFDS data set and look at it."""

from __future__ import annotations

import argparse
import json
import os
import sys

from pneumojax import cli, xla_cpu
from pneumojax.data import builder, sources, stats


def _format_report(report: dict) -> str:
    rows = [f"Prepared {report['name']} at {sources.display_name(report['path'])}",
            *stats.split_table(report["splits"])]
    rows.append(f"Files read: {report['files_read']}, written: {report['written']}, "
                f"rejected: {len(report['rejected'])}")
    rows += _rejection_rows(report["rejected"])
    rows += [f"  note: {n}" for n in report["notes"]]
    return "\n".join(rows)


def _rejection_rows(rejected: list[dict]) -> list[str]:
    """One row per file, or one per folder for its files rejected for the same reason: a
    misnamed folder of a thousand images is one row that names it."""
    groups: dict[tuple[str, str], list[str]] = {}
    for r in rejected:
        groups.setdefault((os.path.dirname(r["file"]), r["reason"]), []).append(r["file"])
    return [f"  rejected {files[0]}: {reason}" if len(files) == 1
            else f"  rejected {len(files)} files in {folder}/: {reason}"
            for (folder, reason), files in groups.items()]


def _parser() -> argparse.ArgumentParser:
    parser = cli.ArgumentParser(prog="python -m pneumojax.data", description=__doc__, examples=[
        "python -m pneumojax.data prepare --source synthetic",
        "python -m pneumojax.data prepare --source folder:PATH/chest_xray --image-size 224",
        "python -m pneumojax.data stats"])
    commands = parser.add_subparsers(dest="command", required=True, metavar="{prepare,stats}")
    what = "build chest_xray_pneumonia (TFDS) from a source"
    prep = commands.add_parser("prepare", help=what, description=what, examples=[
        "python -m pneumojax.data prepare --source folder:PATH/chest_xray",
        "python -m pneumojax.data prepare --source medmnist --data-dir PATH/tensorflow_datasets",
        "python -m pneumojax.data prepare --source synthetic --synthetic-count 200"])
    prep.add_argument("--source", required=True, metavar="SOURCE",
                      help="folder:PATH (Kaggle layout), medmnist (download), or synthetic")
    prep.add_argument("--data-dir", metavar="DIR", help="TFDS data dir (default: "
                      "$TFDS_DATA_DIR or ~/tensorflow_datasets)")
    prep.add_argument("--image-size", type=int, default=224, metavar="PIXELS",
                      help="side of the square images stored")
    prep.add_argument("--validation-fraction", type=float, default=0.1, metavar="FRACTION",
                      help="share of train patients held out as `validation`")
    prep.add_argument("--seed", type=int, default=0, help="seed of the validation split")
    prep.add_argument("--synthetic-count", type=int, default=1200, metavar="N",
                      help="train images for --source synthetic (test gets a quarter)")
    prep.add_argument("--holdout", default="", metavar="PREFIX",
                      help="hold out the train files whose names start with PREFIX as split "
                      "`holdout` (a sub-cohort never trained on), e.g. NORMAL2-")
    what = "counts, patients and duplicates per split"
    st = commands.add_parser("stats", help=what, description=what, examples=[
        "python -m pneumojax.data stats",
        "python -m pneumojax.data stats --name synthetic-224px --json"])
    st.add_argument("--data-dir", metavar="DIR", help="TFDS data dir (default: "
                    "$TFDS_DATA_DIR or ~/tensorflow_datasets)")
    st.add_argument("--name", help="one prepared config (default: all in the data dir)")
    st.add_argument("--json", action="store_true", help="print JSON instead of a table")
    return parser


def main(argv: list[str]) -> int:
    xla_cpu.set_flags()  # before JAX's backend starts
    args = _parser().parse_args(argv)
    if args.command == "prepare":
        report = builder.prepare(args.source, data_dir=args.data_dir, image_size=args.image_size,
                                 validation_fraction=args.validation_fraction, seed=args.seed,
                                 synthetic_count=args.synthetic_count, holdout=args.holdout)
        print(_format_report(report))
        return 0
    names = [args.name] if args.name else builder.prepared_names(args.data_dir)
    if not names:
        where = args.data_dir or builder.default_data_dir()
        raise cli.UserError(f"no prepared data sets in {where}; "
                            "run `python -m pneumojax.data prepare --source ...` first")
    results = [stats.dataset_stats(n, args.data_dir) for n in names]
    print(json.dumps(results, indent=1) if args.json else
          "\n\n".join(stats.format_stats(r) for r in results))
    return 0


if __name__ == "__main__":
    sys.exit(cli.run(main))
