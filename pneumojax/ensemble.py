"""Several trained runs scored as one model: their probabilities averaged, the decision
threshold chosen again, on validation, for the average.

    from pneumojax import ensemble
    e = ensemble.load(["workdirs/deep_cnn_cpu", "workdirs/xception_cpu"])  # one works too
    s = e.score("folder:PATH/chest_xray/test")      # or "tfds:validation", "tfds:holdout"
    s.labels, s.probs, s.files, s.patients

Each member reads the images at its own input size, with its own intensity normalisation,
test-time views and temperature (all frozen in its config and checkpoint); rows are joined by
file name. The ensemble's threshold comes from the validation predictions each checkpoint
stores (no data is read again), with the first member's criterion, so evaluate, predict and the
experiments apply one frozen rule. Members must share the validation split (source, fraction,
split seed, held-out sub-cohort): a threshold chosen on images some member trained on would
flatter it. An ensemble of one is exactly that run.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
from collections.abc import Callable, Iterator, Sequence

import numpy as np

from pneumojax import cli, gradcam, inference, metrics
from pneumojax import data as pdata
from pneumojax.data import builder, sources

Transform = Callable[[np.ndarray], np.ndarray]  # uint8 (N, H, W, 1) -> the same shape
Workdirs = str | os.PathLike | Sequence[str | os.PathLike]  # one run, or several
_SPLIT_FIELDS = ("source", "validation_fraction", "split_seed", "holdout")


def load_images(spec: str, config) -> tuple[Sequence[dict], list[str], list[str], list[dict]]:
    """(examples, file names, patient ids, rejected files) of `folder:PATH` (a Kaggle-layout
    folder `PATH/{NORMAL,PNEUMONIA}/*`, decoded and squashed as `prepare` does) or `tfds:SPLIT`
    (a split of the data set the run was trained on), at the run's image size."""
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
        d = config.data
        name = builder.config_name(d.source, d.image_size, d.holdout)
        src = pdata.data_source(name, where, data_dir=d.data_dir)
        meta = [(ex["file_name"].decode(), ex["patient_id"].decode())
                for ex in (src[i] for i in range(len(src)))]  # one read per example
        return src, [f for f, _ in meta], [p for _, p in meta], []
    raise cli.UserError(f"--data {spec!r}: use folder:PATH or tfds:SPLIT")


@dataclasses.dataclass(frozen=True)
class Scored:
    """One data set scored: rows aligned across the arrays and lists."""
    labels: np.ndarray               # (N,) 0 NORMAL, 1 PNEUMONIA
    probs: np.ndarray                # (N,) P(PNEUMONIA), averaged over members
    files: list[str]
    patients: list[str]
    rejected: list[dict]             # {"file", "reason"} of files that could not be read


@dataclasses.dataclass(frozen=True)
class Ensemble:
    """Restored runs that score together; `load` makes one."""
    members: tuple[inference.Model, ...]
    threshold: float                 # chosen on validation for the averaged probabilities
    criterion: str                   # the rule that chose it (the first member's)

    def describe(self) -> str:
        runs = ", ".join(f"{m.config.model.name} {m.image_size} px (step {m.step}, T "
                         f"{m.temperature:.2f})" for m in self.members)
        what = "one run" if len(self.members) == 1 else f"mean of {len(self.members)} runs"
        return f"{what}: {runs}; threshold {self.threshold:.3f} ({self.criterion}, validation)"

    def score(self, data: str, transform: Transform | None = None) -> Scored:
        """Every readable image of `data` (`load_images`), each member at its own size with
        `transform` applied to its uint8 images first; rows in the first member's order, kept
        where every member could read the file."""
        first, *others = (_score(m, data, transform) for m in self.members)
        by_file = [dict(zip(s.files, s.probs)) for s in others]
        keep = [i for i, f in enumerate(first.files) if all(f in b for b in by_file)]
        return Scored(labels=first.labels[keep],
                      probs=np.mean([first.probs[keep], *([b[first.files[i]] for i in keep]
                                                         for b in by_file)], axis=0,
                                    dtype=np.float32),
                      files=[first.files[i] for i in keep],
                      patients=[first.patients[i] for i in keep], rejected=first.rejected)

    def iter_files(self, paths: Sequence[str | pathlib.Path], *, heatmaps: bool = True,
                   method: str = gradcam.METHODS[0], layer: str | None = None,
                   batch_size: int = 16) -> Iterator[inference.Prediction]:
        """`inference.Model.iter_files` of every member in step, probabilities averaged and
        labelled at the ensemble's threshold; the heat map is the first member's (at `layer`
        of its stages)."""
        streams = [m.iter_files(paths, heatmaps=heatmaps and i == 0, method=method,
                                layer=layer, batch_size=batch_size)
                   for i, m in enumerate(self.members)]
        for first, *others in zip(*streams):
            error = next((p.error for p in (first, *others) if p.error), "")
            if error:
                yield inference.Prediction(first.file, error=error)
                continue
            p = float(np.mean([q.probability for q in (first, *others)]))
            yield dataclasses.replace(first, probability=p,
                                      label=inference.LABELS[int(p >= self.threshold)])


def _score(m: inference.Model, data: str, transform: Transform | None) -> Scored:
    """One member on `data`, rows aligned with the files it read."""
    examples, files, patients, rejected = load_images(data, m.config)
    if transform is not None:
        images = transform(np.stack([ex["image"] for ex in _items(examples)]))
        examples = [{"image": x, "label": ex["label"]} for x, ex in zip(images, _items(examples))]
    labels, probs, index = m.score_split(examples)
    return Scored(labels=labels, probs=probs, files=[files[i] for i in index],
                  patients=[patients[i] for i in index], rejected=rejected)


def _items(examples: Sequence[dict]) -> Iterator[dict]:
    """Image and label of each example, parsing only those from a TFDS split."""
    source = pdata.ImageLabels(examples) if hasattr(examples, "data_source") else examples
    return (source[i] for i in range(len(source)))


def paths(workdirs: Workdirs) -> list[str | os.PathLike]:
    """One workdir as a list of one, several as they are."""
    return [workdirs] if isinstance(workdirs, str | os.PathLike) else list(workdirs)


def load(workdirs: Workdirs, checkpoint: str = "best") -> Ensemble:
    """The runs in `workdirs` (each at `checkpoint`) as one `Ensemble`."""
    workdirs = paths(workdirs)
    members = tuple(inference.load(w, checkpoint) for w in workdirs)
    if len(members) == 1:
        m = members[0]
        return Ensemble(members, m.threshold, m.config.train.threshold)
    first = members[0].config.data
    for w, m in zip(workdirs[1:], members[1:]):
        differ = [f for f in _SPLIT_FIELDS if m.config.data[f] != first[f]]
        if differ:
            raise cli.UserError(
                f"--workdir {w}: its validation split differs from {workdirs[0]}'s (data."
                f"{', data.'.join(differ)}), so no threshold can be chosen for the ensemble on "
                "images none of its members trained on; ensemble runs of one data set")
    labels, probs = _validation(members, workdirs)
    criterion = members[0].config.train.threshold
    return Ensemble(members, metrics.choose_threshold(labels, probs, criterion), criterion)


def _validation(members: Sequence[inference.Model], workdirs: Sequence[str | pathlib.Path]
                ) -> tuple[np.ndarray, np.ndarray]:
    """(labels, mean probability) on validation, from the predictions each checkpoint stored."""
    stored = []
    for w, m in zip(workdirs, members):
        if "validation_predictions" not in m.meta:
            raise cli.UserError(f"--workdir {w}: checkpoint step {m.step} stores no validation "
                                "predictions (it was trained before ensembles were), so no "
                                "ensemble threshold can be chosen; train it again")
        v = m.meta["validation_predictions"]
        stored.append((dict(zip(v["file"], v["probability"])), dict(zip(v["file"], v["label"]))))
    files = [f for f in stored[0][0] if all(f in probs for probs, _ in stored)]
    return (np.array([stored[0][1][f] for f in files], np.int32),
            np.mean([[probs[f] for f in files] for probs, _ in stored], axis=0))
