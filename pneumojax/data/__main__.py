"""`python -m pneumojax.data prepare|stats`: build the TFDS data set and look at it."""

from __future__ import annotations

import argparse
import json
import sys

from pneumojax.data import builder, stats
from pneumojax.data.download import DownloadError


def _format_report(report: dict) -> str:
    rows = [f"Prepared {report['name']} at {report['path']}", *stats.split_table(report["splits"])]
    rows.append(f"Files read: {report['files_read']}, written: {report['written']}, "
                f"rejected: {len(report['rejected'])}")
    rows += [f"  rejected {r['file']}: {r['reason']}" for r in report["rejected"]]
    rows += [f"  note: {n}" for n in report["notes"]]
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pneumojax.data", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    prep = commands.add_parser("prepare", help="build chest_xray_pneumonia from a source")
    prep.add_argument("--source", required=True,
                      help="folder:PATH (Kaggle layout), medmnist (download), or synthetic")
    prep.add_argument("--data-dir", help="TFDS data dir (default: $TFDS_DATA_DIR or "
                                         "~/tensorflow_datasets)")
    prep.add_argument("--image-size", type=int, default=224)
    prep.add_argument("--validation-fraction", type=float, default=0.1,
                      help="share of train patients held out as `validation`")
    prep.add_argument("--seed", type=int, default=0)
    prep.add_argument("--synthetic-count", type=int, default=1200,
                      help="train images for --source synthetic (test gets a quarter)")
    st = commands.add_parser("stats", help="counts, patients and duplicates per split")
    st.add_argument("--data-dir")
    st.add_argument("--name", help="one prepared config (default: all in the data dir)")
    st.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = parser.parse_args(argv)

    try:
        if args.command == "prepare":
            if args.image_size < 32:
                parser.error("--image-size must be at least 32")
            report = builder.prepare(args.source, data_dir=args.data_dir,
                                     image_size=args.image_size,
                                     validation_fraction=args.validation_fraction,
                                     seed=args.seed, synthetic_count=args.synthetic_count)
            print(_format_report(report))
            return 0
        names = [args.name] if args.name else builder.prepared_names(args.data_dir)
        if not names:
            where = args.data_dir or builder.default_data_dir()
            raise FileNotFoundError(f"no prepared data sets in {where}; "
                                    "run `python -m pneumojax.data prepare --source ...` first")
        results = [stats.dataset_stats(n, args.data_dir) for n in names]
        print(json.dumps(results, indent=1) if args.json else
              "\n\n".join(stats.format_stats(r) for r in results))
        return 0
    except (OSError, ValueError, DownloadError) as e:  # bad input: a message, not a traceback
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
