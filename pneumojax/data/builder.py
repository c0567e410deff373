"""The TFDS builder `chest_xray_pneumonia`, and `prepare`, which builds it atomically.

One builder config per (source, image size[, held-out sub-cohort]), named e.g.
`folder-chest_xray-224px` (or `folder-chest_xray-64px-holdout_NORMAL2-`), so a data directory
can hold the synthetic demo, MedMNIST+, real folders and their held-out variants side by side.
Images are raw uint8 bytes in ArrayRecord files: TFDS's default would store uint8 as int64
lists, 4x slower to read, and PNG/JPEG would put a decoder on the hot input path.

A data directory holds:

    .staging-ID/                          a prepare at work (or the debris of a killed one)
    chest_xray_pneumonia/CONFIG/1.0.0     a symlink to the current build, swapped atomically
    chest_xray_pneumonia/CONFIG/.build-ID one prepared set with its report; never modified

A build is never changed once published, so a run reading one is not disturbed when another
run prepares the set again: it goes on reading its own build, report and splits alike. Every
process that reads a build holds a shared lock on it, and a killed prepare's staging folder is
held by no one, so the next prepare, stats or read deletes exactly what no live process holds.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import os
import pathlib
import re
import shutil
import sys
import uuid
from collections.abc import Callable, Iterator, Sequence

import numpy as np
import tensorflow_datasets as tfds

from pneumojax import cli
from pneumojax.data import images, sources

NAME = "chest_xray_pneumonia"
VERSION = "1.0.0"
REPORT_FILE = "prepare_report.json"
_STAGING = ".staging-"
_BUILD = ".build-"
_LOCK_FILE = ".lock"
# Per process: build folder -> descriptor holding its shared lock; link -> the build read.
_HELD: dict[str, int] = {}
_PINNED: dict[str, pathlib.Path] = {}


def default_data_dir() -> pathlib.Path:
    """TFDS's own default, so `tfds.data_source` finds the data without arguments."""
    return pathlib.Path(os.environ.get("TFDS_DATA_DIR", "~/tensorflow_datasets")).expanduser()


def config_name(source: str, image_size: int, holdout: str = "") -> str:
    suffix = f"-holdout_{re.sub(r'[^A-Za-z0-9_.-]+', '_', holdout)}" if holdout else ""
    if source.startswith("folder:"):
        folder = sources.folder_of(source).resolve().name
        return (f"folder-{re.sub(r'[^A-Za-z0-9_.]+', '_', folder) or 'root'}-{image_size}px"
                + suffix)
    return f"{source}-{image_size}px{suffix}"


def held_out(file_name: str, holdout: str) -> bool:
    """Whether a train file belongs to the held-out sub-cohort: its base name starts with the
    prefix (Kermany's NORMAL files come in two series, `IM-` and `NORMAL2-IM-`)."""
    return bool(holdout) and pathlib.PurePath(file_name).name.startswith(holdout)


@dataclasses.dataclass(eq=False)
class ChestXrayConfig(tfds.core.BuilderConfig):
    source: str = "synthetic"
    image_size: int = 224
    validation_fraction: float = 0.1
    seed: int = 0
    synthetic_count: int = 1200
    holdout: str = ""

    def settings(self) -> dict:
        """What decides the content; a prepared set with other settings is stale."""
        source = self.source
        if source.startswith("folder:"):
            source = "folder:" + str(sources.folder_of(source).resolve())
        return dict(source=source, image_size=self.image_size,
                    validation_fraction=self.validation_fraction, seed=self.seed,
                    synthetic_count=self.synthetic_count if source == "synthetic" else None,
                    # only when set, so that sets prepared before the field existed stay fresh
                    **({"holdout": self.holdout} if self.holdout else {}))


class ChestXrayPneumonia(tfds.core.GeneratorBasedBuilder):
    """Kermany et al. (2018) pediatric chest X-rays, NORMAL vs PNEUMONIA, any source.

    No BUILDER_CONFIGS: every config is made by `prepare` from its settings, and a listed one
    would make TFDS refuse a custom config of the same name (it did, for synthetic at 224 px).
    """

    VERSION = tfds.core.Version(VERSION)
    RELEASE_NOTES = {
        str(VERSION): "Raw uint8 images, lesion masks, patient ids and content hashes."}

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.scan: sources.Scan | None = None  # set by `prepare` before building
        self.written: dict[str, dict[str, int]] = {}

    def _info(self) -> tfds.core.DatasetInfo:
        size = self.builder_config.image_size
        source = sources.display_name(self.builder_config.source)
        return tfds.core.DatasetInfo(
            builder=self,
            description=f"Chest X-rays, NORMAL vs PNEUMONIA, from {source}.",
            features=tfds.features.FeaturesDict({
                "image": tfds.features.Tensor(shape=(size, size, 1), dtype=np.uint8,
                                              encoding="bytes"),
                # Zero except on synthetic PNEUMONIA phantoms; zlib makes the zeros free.
                "lesion_mask": tfds.features.Tensor(shape=(size, size, 1), dtype=np.uint8,
                                                    encoding="zlib"),
                "label": tfds.features.ClassLabel(names=sources.CLASSES),
                "patient_id": tfds.features.Text(),
                "file_name": tfds.features.Text(),
                "content_hash": tfds.features.Text(),
            }),
            supervised_keys=("image", "label"),
            homepage="https://data.mendeley.com/datasets/rscbjbr9sj/2",
            citation="Kermany et al., Cell 172(5):1122-1131, 2018.",
        )

    def _split_generators(self, dl_manager):
        splits = {}
        for name, candidates in self.scan.candidates.items():
            decoded = sources.decode_all(candidates, self.scan.rejected, desc=f"Decoding {name}",
                                         notes=self.scan.notes)
            if decoded:
                splits[name] = decoded
            else:
                self.scan.notes.append(f"split {name!r}: every file was rejected; it is left out")
        if "train" in splits:
            train, cohort = self._hold_out(splits["train"])
            splits["train"], splits["validation"] = self._carve_validation(train)
            if cohort:
                splits["holdout"] = cohort
        return {name: self._generate_examples(name, items) for name, items in splits.items()}

    def _hold_out(self, decoded: list) -> tuple[list, list]:
        """(train, sub-cohort): the files of `holdout` leave train before validation is carved,
        so a run never sees them and can be scored on a cohort it has not met."""
        prefix = self.builder_config.holdout
        cohort = [d for d in decoded if held_out(d[0].file_name, prefix)]
        if prefix and not cohort:
            raise cli.UserError(f"data.holdout={prefix!r}: no train file of "
                                f"{sources.display_name(self.builder_config.source)} has a name "
                                "starting with it; give a prefix such as NORMAL2- or IM-")
        return [d for d in decoded if not held_out(d[0].file_name, prefix)], cohort

    def _carve_validation(self, decoded: list) -> tuple[list, list]:
        cfg = self.builder_config
        _, held_out = sources.split_by_patient([c for c, _, _ in decoded],
                                               cfg.validation_fraction, cfg.seed)
        held = {id(c) for c in held_out}
        train = [d for d in decoded if id(d[0]) not in held]
        validation = [d for d in decoded if id(d[0]) in held]
        if not train or not validation:
            patients = len({c.patient_id for c, _, _ in decoded})
            raise ValueError(f"{sources.display_name(cfg.source)}: {patients} patient(s) in "
                             f"train are too few to carve a patient-disjoint validation split "
                             f"of {cfg.validation_fraction}")
        return train, validation

    def _generate_examples(self, split: str, decoded: list):
        counts = self.written.setdefault(split, dict.fromkeys(sources.CLASSES, 0))
        for c, image, mask in decoded:
            counts[sources.CLASSES[c.label]] += 1
            yield c.file_name, dict(image=image, lesion_mask=mask, label=c.label,
                                    patient_id=c.patient_id, file_name=c.file_name,
                                    content_hash=c.content_hash)


def dataset_dir(data_dir: pathlib.Path, name: str) -> pathlib.Path:
    """Where TFDS looks for the set: in a data dir, the symlink to the current build."""
    return pathlib.Path(data_dir) / NAME / name / VERSION


def prepare(source: str, *, data_dir: str | os.PathLike | None = None, image_size: int = 224,
            validation_fraction: float = 0.1, seed: int = 0, synthetic_count: int = 1200,
            holdout: str = "") -> dict:
    """Builds the data set beside the current one, then swaps it in; returns the report.

    A failure at any point, a kill included, leaves the previously prepared version untouched
    and usable. The source is scanned first, so a mistake in it is reported before TFDS starts.
    The folder's fingerprint is taken before it is read, so a change made while preparing
    shows as stale at the next `ensure_prepared`.
    """
    data_dir = _data_dir(data_dir)
    config = _config(source, image_size, validation_fraction, seed, synthetic_count, holdout)
    fingerprint = sources.fingerprint(source)
    scan = sources.scan(source, image_size, download_dir=data_dir / "downloads",
                        synthetic_count=synthetic_count, seed=seed)
    final = dataset_dir(data_dir, config.name)
    tidy(data_dir, config.name)
    with _staging(data_dir) as staging:
        builder = ChestXrayPneumonia(config=config, data_dir=staging, file_format="array_record")
        builder.scan = scan
        builder.download_and_prepare(download_dir=data_dir / "downloads")
        staged = dataset_dir(staging, config.name)
        report = _report(builder, final, fingerprint)
        (staged / REPORT_FILE).write_text(json.dumps(report, indent=1))
        _publish(staged, final)
    tidy(data_dir, config.name)
    return report


def ensure_prepared(source: str, *, data_dir: str | os.PathLike | None = None,
                    image_size: int = 224, validation_fraction: float = 0.1, seed: int = 0,
                    synthetic_count: int = 1200, holdout: str = "") -> str:
    """The config name of a prepared set with exactly these settings and made from the source
    as it is now, preparing it if needed; a set prepared before is redone with one line to
    stderr that says why, so no run reads data that no longer matches without saying so."""
    config = _config(source, image_size, validation_fraction, seed, synthetic_count, holdout)
    try:
        report = load_report(data_dir, config.name)
    except FileNotFoundError:
        report = None
    if report is not None:
        reason = stale(report, config)
        if reason is None:
            return config.name
        print(f"data: {config.name} {reason}; preparing it again", file=sys.stderr, flush=True)
    return prepare(source, data_dir=data_dir, image_size=image_size,
                   validation_fraction=validation_fraction, seed=seed,
                   synthetic_count=synthetic_count, holdout=holdout)["name"]


def stale(report: dict, config: ChestXrayConfig) -> str | None:
    """Why a prepared set's report no longer matches `config` and its source, or None."""
    now = config.settings()
    changed = [f"{k} {report['settings'].get(k)!r} -> {v!r}" for k, v in now.items()
               if report["settings"].get(k) != v]
    if changed:
        return f"was prepared with other settings ({', '.join(changed)})"
    then, current = report.get("fingerprint"), sources.fingerprint(config.source)
    if then != current:
        before = f"{then['files']} files then" if then else "no fingerprint recorded then"
        return (f"no longer matches {sources.display_name(config.source)}: its files changed "
                f"since it was prepared ({before}, {current['files']} now)")
    return None


def _data_dir(data_dir: str | os.PathLike | None) -> pathlib.Path:
    return pathlib.Path(data_dir) if data_dir else default_data_dir()


def _config(source: str, image_size: int, validation_fraction: float, seed: int,
            synthetic_count: int, holdout: str = "") -> ChestXrayConfig:
    """The config, after checking the settings a user gives (flags or `data.*` config fields)
    before anything is read."""
    sources.check(source)
    if image_size < images.MIN_SIDE:
        raise cli.UserError(f"image size {image_size}: must be at least {images.MIN_SIDE} px "
                            "(--image-size, or data.image_size)")
    if not 0.0 < validation_fraction < 1.0:
        raise cli.UserError(f"validation fraction {validation_fraction}: must be between 0 and 1 "
                            "(--validation-fraction, or data.validation_fraction)")
    if source == "synthetic" and synthetic_count < 1:
        raise cli.UserError(f"synthetic count {synthetic_count}: must be at least 1 "
                            "(--synthetic-count, or data.synthetic_count)")
    return ChestXrayConfig(name=config_name(source, image_size, holdout), source=source,
                           image_size=image_size, validation_fraction=validation_fraction,
                           seed=seed, synthetic_count=synthetic_count, holdout=holdout)


def _report(builder: ChestXrayPneumonia, final: pathlib.Path, fingerprint: dict | None) -> dict:
    scan = builder.scan
    written = sum(sum(c.values()) for c in builder.written.values())
    if scan.files_seen != written + len(scan.rejected):  # every file read is accounted for
        raise RuntimeError(f"lost files: read {scan.files_seen}, wrote {written}, "
                           f"rejected {len(scan.rejected)}")
    return dict(name=builder.builder_config.name, path=str(final),
                settings=builder.builder_config.settings(), fingerprint=fingerprint,
                files_read=scan.files_seen, written=written, splits=builder.written,
                rejected=[dataclasses.asdict(r) for r in scan.rejected],
                notes=scan.notes + _class_notes(builder.written))


def _class_notes(splits: dict[str, dict[str, int]]) -> list[str]:
    """A split without one of the classes: training cannot learn from it, and ROC-AUC is
    undefined on it."""
    notes = []
    for split, counts in splits.items():
        if missing := [c for c, n in counts.items() if n == 0]:
            present = ", ".join(f"{n} {c}" for c, n in counts.items() if n)
            notes.append(f"split {split!r} has no {' or '.join(missing)} images (only "
                         f"{present}): training needs both classes in 'train', and ROC-AUC "
                         "needs both in any split it is measured on")
    return notes


def _lock(folder: pathlib.Path, *, shared: bool, wait: bool) -> int | None:
    """A descriptor holding an flock on `folder`'s lock file, or None: when `wait` is False and
    another process holds a conflicting lock, or where the file system cannot lock (read-only,
    or no locks). On None nothing is deleted, and a reader reads unguarded."""
    try:
        fd = os.open(folder / _LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o666)
    except FileNotFoundError:
        raise  # the folder is gone: the caller decides
    except OSError:
        return None
    try:
        fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX)
                    | (0 if wait else fcntl.LOCK_NB))
    except OSError:  # BlockingIOError when held; others where locks are not supported
        os.close(fd)
        return None
    return fd


@contextlib.contextmanager
def _staging(data_dir: pathlib.Path) -> Iterator[pathlib.Path]:
    """A fresh folder to build in, locked while this process works in it, removed after."""
    staging = data_dir / f"{_STAGING}{uuid.uuid4().hex[:8]}"
    staging.mkdir(parents=True)
    fd = _lock(staging, shared=False, wait=True)
    try:
        yield staging
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        if fd is not None:
            os.close(fd)


def _publish(staged: pathlib.Path, final: pathlib.Path) -> None:
    """Moves the build beside the current one and points `final` at it in one rename.

    The new build is held (as by a reader) from before it is visible until this process ends,
    so no tidy can take it for debris in the instant before the link points at it.
    """
    fd = _lock(staged, shared=True, wait=True)
    build = final.with_name(f"{_BUILD}{uuid.uuid4().hex[:8]}")
    build.parent.mkdir(parents=True, exist_ok=True)
    staged.rename(build)
    if fd is not None:
        _HELD[str(build.resolve())] = fd
    link = staged.with_name("link")  # in the staging folder, which no one else touches
    link.symlink_to(build.name)
    if final.is_dir() and not final.is_symlink():  # a set prepared before builds had folders
        final.rename(final.with_name(f"{_BUILD}{uuid.uuid4().hex[:8]}"))
    os.replace(link, final)
    _PINNED[str(final.absolute())] = build.resolve()


def tidy(data_dir: pathlib.Path, name: str | None = None) -> None:
    """Deletes what no live process holds: killed prepares' staging folders and, for config
    `name`, builds the link no longer points at."""
    for staging in pathlib.Path(data_dir).glob(f"{_STAGING}*"):
        _delete_unheld(staging)
    if name is not None:
        final = dataset_dir(data_dir, name)
        for build in final.parent.glob(f"{_BUILD}*"):
            _delete_unheld(build, keep=lambda b=build: _current(final) == b.name)


def _current(final: pathlib.Path) -> str | None:
    return os.readlink(final) if final.is_symlink() else None


def _delete_unheld(folder: pathlib.Path, keep: Callable[[], bool] = lambda: False) -> None:
    """Deletes `folder` unless a process holds it or `keep()`, asked under the lock, says no."""
    try:
        fd = _lock(folder, shared=False, wait=False)
    except FileNotFoundError:  # another process deleted it first
        return
    if fd is None:
        return
    try:
        if not keep():
            shutil.rmtree(folder, ignore_errors=True)
    finally:
        os.close(fd)


def current_build(data_dir: str | os.PathLike | None, name: str) -> pathlib.Path:
    """The build of `name` this process reads: the one it read or published last, else the
    one the link points at now.

    One process sees one build throughout (its report, train and validation splits agree),
    even when another process publishes a new one meanwhile; it moves on only by preparing
    (which `ensure_prepared` does when the settings or the source no longer match). The build
    is held with a shared lock for the rest of the process, so no tidy deletes it while this
    process may read it (grain workers reopen its files long after the first read).
    """
    data_dir = _data_dir(data_dir)
    tidy(data_dir, name)
    final = dataset_dir(data_dir, name)
    if (pinned := _PINNED.get(str(final.absolute()))) is not None and pinned.exists():
        return pinned
    for _ in range(3):  # a build can be swapped out and deleted between resolve and lock
        build = final.resolve()
        if str(build) in _HELD:
            return _pin(final, build)
        if not (build / REPORT_FILE).exists():
            raise FileNotFoundError(f"{sources.display_name(final)}: no prepared data set here; "
                                    "run `python -m pneumojax.data prepare --source ...` first")
        with contextlib.suppress(FileNotFoundError):
            fd = _lock(build, shared=True, wait=True)
            if fd is None:  # a file system without locks: read unguarded
                return build
            if os.fstat(fd).st_nlink:  # zero once deleted
                _HELD[str(build)] = fd
                return _pin(final, build)
            os.close(fd)
    raise RuntimeError(f"{sources.display_name(final)}: replaced three times while being "
                       "opened; try again")


def _pin(final: pathlib.Path, build: pathlib.Path) -> pathlib.Path:
    """Remembers `build` as what this process reads through `final`; not a set prepared in
    place by older code, which is the link's own path and would follow any new link."""
    if build != final:
        _PINNED[str(final.absolute())] = build
    return build


def load_report(data_dir: str | os.PathLike | None, name: str) -> dict:
    """The prepare report of the build this process reads (see `current_build`)."""
    return json.loads((current_build(data_dir, name) / REPORT_FILE).read_text())


def read_split(data_dir: str | os.PathLike | None, name: str, split: str,
               decoders: dict | None = None) -> Sequence[dict]:
    """`tfds.data_source` of one split of the build this process reads (see `current_build`),
    which stays readable however often the set is prepared again meanwhile."""
    builder = tfds.builder_from_directory(current_build(data_dir, name))
    return builder.as_data_source(split, decoders=decoders)


def prepared_names(data_dir: str | os.PathLike | None) -> list[str]:
    data_dir = _data_dir(data_dir)
    tidy(data_dir)
    return sorted(p.parent.parent.name
                  for p in (data_dir / NAME).glob(f"*/{VERSION}/{REPORT_FILE}"))
