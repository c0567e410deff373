"""The TFDS builder `chest_xray_pneumonia`, and `prepare`, which builds it atomically.

One builder config per (source, image size), named e.g. `folder-chest_xray-224px`, so a data
directory can hold the synthetic demo, MedMNIST+ and real folders side by side. Images are raw
uint8 bytes in ArrayRecord files: TFDS's default would store uint8 as int64 lists, 4x slower to
read, and PNG/JPEG would put a decoder on the hot input path.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import re
import shutil
import uuid

import numpy as np
import tensorflow_datasets as tfds

from pneumojax.data import sources

NAME = "chest_xray_pneumonia"
VERSION = "1.0.0"
REPORT_FILE = "prepare_report.json"


def default_data_dir() -> pathlib.Path:
    """TFDS's own default, so `tfds.data_source` finds the data without arguments."""
    return pathlib.Path(os.environ.get("TFDS_DATA_DIR", "~/tensorflow_datasets")).expanduser()


def config_name(source: str, image_size: int) -> str:
    if source.startswith("folder:"):
        folder = pathlib.Path(source.removeprefix("folder:")).expanduser().resolve().name
        return f"folder-{re.sub(r'[^A-Za-z0-9_.]+', '_', folder) or 'root'}-{image_size}px"
    return f"{source}-{image_size}px"


@dataclasses.dataclass(eq=False)
class ChestXrayConfig(tfds.core.BuilderConfig):
    source: str = "synthetic"
    image_size: int = 224
    validation_fraction: float = 0.1
    seed: int = 0
    synthetic_count: int = 1200

    def settings(self) -> dict:
        """What decides the content; a prepared set with other settings is stale."""
        source = self.source
        if source.startswith("folder:"):
            source = "folder:" + str(pathlib.Path(source[7:]).expanduser().resolve())
        return dict(source=source, image_size=self.image_size,
                    validation_fraction=self.validation_fraction, seed=self.seed,
                    synthetic_count=self.synthetic_count if source == "synthetic" else None)


class ChestXrayPneumonia(tfds.core.GeneratorBasedBuilder):
    """Kermany et al. (2018) pediatric chest X-rays, NORMAL vs PNEUMONIA, any source."""

    VERSION = tfds.core.Version(VERSION)
    RELEASE_NOTES = {
        str(VERSION): "Raw uint8 images, lesion masks, patient ids and content hashes."}
    BUILDER_CONFIGS = [ChestXrayConfig(name=config_name("synthetic", 224))]

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.scan: sources.Scan | None = None
        self.written: dict[str, dict[str, int]] = {}

    def _info(self) -> tfds.core.DatasetInfo:
        size = self.builder_config.image_size
        return tfds.core.DatasetInfo(
            builder=self,
            description=f"Chest X-rays, NORMAL vs PNEUMONIA, from {self.builder_config.source}.",
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
        cfg = self.builder_config
        self.scan = sources.scan(cfg.source, cfg.image_size,
                                 download_dir=pathlib.Path(dl_manager.download_dir),
                                 synthetic_count=cfg.synthetic_count, seed=cfg.seed)
        splits = {}
        for name, candidates in self.scan.candidates.items():
            decoded = sources.decode_all(candidates, self.scan.rejected, desc=f"Decoding {name}")
            if decoded:
                splits[name] = decoded
            else:
                self.scan.notes.append(f"split {name!r}: every file was rejected; it is left out")
        if "train" in splits:
            splits["train"], splits["validation"] = self._carve_validation(splits["train"])
        return {name: self._generate_examples(name, items) for name, items in splits.items()}

    def _carve_validation(self, decoded: list) -> tuple[list, list]:
        cfg = self.builder_config
        _, held_out = sources.split_by_patient([c for c, _, _ in decoded],
                                               cfg.validation_fraction, cfg.seed)
        held = {id(c) for c in held_out}
        train = [d for d in decoded if id(d[0]) not in held]
        validation = [d for d in decoded if id(d[0]) in held]
        if not train or not validation:
            patients = len({c.patient_id for c, _, _ in decoded})
            raise ValueError(f"{cfg.source}: {patients} patient(s) in train are too few to carve "
                             f"a patient-disjoint validation split of {cfg.validation_fraction}")
        return train, validation

    def _generate_examples(self, split: str, decoded: list):
        counts = self.written.setdefault(split, dict.fromkeys(sources.CLASSES, 0))
        for c, image, mask in decoded:
            counts[sources.CLASSES[c.label]] += 1
            yield c.file_name, dict(image=image, lesion_mask=mask, label=c.label,
                                    patient_id=c.patient_id, file_name=c.file_name,
                                    content_hash=c.content_hash)


def dataset_dir(data_dir: pathlib.Path, name: str) -> pathlib.Path:
    return pathlib.Path(data_dir) / NAME / name / VERSION


def prepare(source: str, *, data_dir: str | os.PathLike | None = None, image_size: int = 224,
            validation_fraction: float = 0.1, seed: int = 0, synthetic_count: int = 1200) -> dict:
    """Builds the data set beside the current one, then swaps it in; returns the report.

    A failure at any point leaves the previously prepared version untouched and usable.
    """
    data_dir = pathlib.Path(data_dir) if data_dir else default_data_dir()
    config = _config(source, image_size, validation_fraction, seed, synthetic_count)
    final = dataset_dir(data_dir, config.name)
    recover(final)
    staging = data_dir / f".staging-{uuid.uuid4().hex[:8]}"
    try:
        builder = ChestXrayPneumonia(config=config, data_dir=staging, file_format="array_record")
        builder.download_and_prepare(download_dir=data_dir / "downloads")
        staged = dataset_dir(staging, config.name)
        report = _report(builder, final)
        (staged / REPORT_FILE).write_text(json.dumps(report, indent=1))
        _swap(staged, final)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return report


def ensure_prepared(source: str, *, data_dir: str | os.PathLike | None = None,
                    image_size: int = 224, validation_fraction: float = 0.1, seed: int = 0,
                    synthetic_count: int = 1200) -> str:
    """The config name of a prepared set with exactly these settings, preparing it if needed."""
    config = _config(source, image_size, validation_fraction, seed, synthetic_count)
    try:
        if load_report(data_dir, config.name)["settings"] == config.settings():
            return config.name
    except FileNotFoundError:
        pass
    return prepare(source, data_dir=data_dir, image_size=image_size,
                   validation_fraction=validation_fraction, seed=seed,
                   synthetic_count=synthetic_count)["name"]


def _config(source: str, image_size: int, validation_fraction: float, seed: int,
            synthetic_count: int) -> ChestXrayConfig:
    return ChestXrayConfig(name=config_name(source, image_size), source=source,
                           image_size=image_size, validation_fraction=validation_fraction,
                           seed=seed, synthetic_count=synthetic_count)


def _report(builder: ChestXrayPneumonia, final: pathlib.Path) -> dict:
    scan = builder.scan
    written = sum(sum(c.values()) for c in builder.written.values())
    if scan.files_seen != written + len(scan.rejected):  # every file read is accounted for
        raise RuntimeError(f"lost files: read {scan.files_seen}, wrote {written}, "
                           f"rejected {len(scan.rejected)}")
    return dict(name=builder.builder_config.name, path=str(final),
                settings=builder.builder_config.settings(), files_read=scan.files_seen,
                written=written, splits=builder.written,
                rejected=[dataclasses.asdict(r) for r in scan.rejected], notes=scan.notes)


def _swap(staged: pathlib.Path, final: pathlib.Path) -> None:
    """Two renames; `recover` repairs the instant between them if the process dies there."""
    final.parent.mkdir(parents=True, exist_ok=True)
    old = final.with_name(f".{final.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        final.rename(old)
    staged.rename(final)
    shutil.rmtree(old, ignore_errors=True)


def recover(final: pathlib.Path) -> None:
    old = final.with_name(f".{final.name}.old")
    if old.exists() and not final.exists():
        old.rename(final)


def load_report(data_dir: str | os.PathLike | None, name: str) -> dict:
    final = dataset_dir(pathlib.Path(data_dir) if data_dir else default_data_dir(), name)
    recover(final)
    path = final / REPORT_FILE
    if not path.exists():
        raise FileNotFoundError(f"{final}: no prepared data set here; run "
                                f"`python -m pneumojax.data prepare --source ...` first")
    return json.loads(path.read_text())


def prepared_names(data_dir: str | os.PathLike | None) -> list[str]:
    root = (pathlib.Path(data_dir) if data_dir else default_data_dir()) / NAME
    return sorted(p.parent.parent.name for p in root.glob(f"*/{VERSION}/{REPORT_FILE}"))
