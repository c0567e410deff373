"""The data set a config asks for, prepared and checked before a run (or an experiment)
reads it."""

from __future__ import annotations

import ml_collections

from pneumojax import cli
from pneumojax import data as pdata
from pneumojax.data.sources import CLASSES


def prepare_data(config: ml_collections.ConfigDict) -> str:
    """The config name of the data set `config.data` asks for, prepared first if it is not
    there with exactly these settings (split fraction, seed, synthetic count, held-out
    sub-cohort)."""
    d = config.data
    return pdata.ensure_prepared(d.source, data_dir=d.data_dir, image_size=d.image_size,
                                 validation_fraction=d.validation_fraction,
                                 seed=d.split_seed, synthetic_count=d.synthetic_count,
                                 holdout=d.holdout)


def check_classes(report: dict, source: str) -> None:
    """Both classes in the train and validation splits: without them nothing can be learnt, or
    ranked, and the run would fail only at its first evaluation."""
    for split, fix in (("train", "add images of both classes to the source"),
                       ("validation", "raise --config.data.validation_fraction, or add images")):
        counts = report["splits"][split]
        if missing := [c for c in CLASSES if not counts.get(c)]:
            raise cli.UserError(f"data.source={source!r}: the prepared {split} split "
                                f"({report['path']}) has no {' or '.join(missing)} images "
                                f"({counts}); {fix}")
