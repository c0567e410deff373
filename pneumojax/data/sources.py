"""Where examples come from: a Kaggle-layout folder, MedMNIST+ or the synthetic phantoms.

A source is scanned first (cheap: names, bytes, hashes) and decoded later, so that the
patient-disjoint validation split is decided before any pixels are written, and every file
read is accounted for as either written or rejected with its reason.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import pathlib
import re
from collections.abc import Callable

import numpy as np

from pneumojax.data import images

CLASSES = ("NORMAL", "PNEUMONIA")
# The Kaggle/Mendeley layout's own splits, kept under their own names. `validation` is ours.
SOURCE_SPLITS = ("train", "val", "test")

MEDMNIST_URL = "https://zenodo.org/records/10519652/files/pneumoniamnist_224.npz?download=1"
MEDMNIST_MD5 = "d6a3c71de1b945ea11211b03746c1fe1"
MEDMNIST_FILE = "pneumoniamnist_224.npz"

# Kermany file names carry the patient: personN_bacteria_M, IM-NNNN-MMMM, NORMAL2-IM-NNNN-MMMM.
# The NORMAL2- prefix marks a second numbering, so it stays part of the id.
_PATIENT_PATTERNS = (
    re.compile(r"^(person\d+)_(?:bacteria|virus)_\d+"),
    re.compile(r"^((?:NORMAL\d+-)?IM-\d+)-\d+"),
)


@dataclasses.dataclass(frozen=True)
class Rejection:
    file: str
    reason: str

    def __str__(self) -> str:
        return f"{self.file}: {self.reason}"


@dataclasses.dataclass
class Candidate:
    """One image that passed the scan; `load` decodes it (may raise images.ImageError)."""

    split: str
    label: int
    patient_id: str
    file_name: str
    content_hash: str
    load: Callable[[], tuple[np.ndarray, np.ndarray]]


@dataclasses.dataclass
class Scan:
    """What a source offers, per source split, and what it refused before decoding."""

    candidates: dict[str, list[Candidate]]
    rejected: list[Rejection]
    notes: list[str]
    files_seen: int


def patient_id(file_name: str) -> str | None:
    """The patient a Kermany file name belongs to, or None when the name has no known pattern."""
    stem = pathlib.PurePath(file_name).stem
    for pattern in _PATIENT_PATTERNS:
        if m := pattern.match(stem):
            return m.group(1)
    return None


def content_hash(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:32]


def scan(source: str, image_size: int, *, download_dir: pathlib.Path,
         synthetic_count: int = 1200, seed: int = 0) -> Scan:
    """Dispatches on the `--source` string: `folder:PATH`, `medmnist` or `synthetic`."""
    if source.startswith("folder:"):
        return scan_folder(pathlib.Path(source.removeprefix("folder:")).expanduser(), image_size)
    if source == "medmnist":
        from pneumojax.data import download

        hint = (f"Download {MEDMNIST_FILE} yourself and place it at "
                f"{download_dir / MEDMNIST_FILE}, or prepare from a folder with "
                "--source folder:PATH.")
        path = download.download(MEDMNIST_URL, download_dir / MEDMNIST_FILE, md5=MEDMNIST_MD5,
                                 hint=hint)
        return scan_medmnist(path, image_size)
    if source == "synthetic":
        return scan_synthetic(synthetic_count, image_size, seed)
    raise ValueError(f"unknown source {source!r}: use folder:PATH, medmnist or synthetic")


def scan_folder(root: pathlib.Path, image_size: int) -> Scan:
    """`root/{train,val,test}/{NORMAL,PNEUMONIA}/*`; any split may be missing."""
    return _scan(root, image_size, SOURCE_SPLITS)


def scan_class_folder(root: pathlib.Path, image_size: int) -> Scan:
    """`root/{NORMAL,PNEUMONIA}/*`, one set of images, e.g. a test set to evaluate on."""
    return _scan(root, image_size, None)


def _scan(root: pathlib.Path, image_size: int, splits: tuple[str, ...] | None) -> Scan:
    """With `splits=None` the folder is one split, named after the folder itself."""
    layout = ("ROOT/{train,val,test}/{NORMAL,PNEUMONIA}/*.jpeg" if splits
              else "ROOT/{NORMAL,PNEUMONIA}/*.jpeg")
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: no such folder (expected the Kaggle layout {layout})")
    candidates: dict[str, list[Candidate]] = {}
    rejected: list[Rejection] = []
    notes: list[str] = []
    files_seen = 0
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        files_seen += 1
        parts = path.relative_to(root).parts
        parts = parts if splits else (root.name, *parts)
        if reason := _layout_problem(parts, splits or (root.name,)):
            rejected.append(Rejection(str(path), reason))
            continue
        split, class_name = parts[0], parts[1]
        try:
            data = path.read_bytes()
        except OSError as e:
            rejected.append(Rejection(str(path), f"unreadable ({e.strerror or e})"))
            continue
        pid = patient_id(path.name)
        if pid is None:
            notes.append(f"{path}: no patient id in the file name; it counts as its own patient")
        candidates.setdefault(split, []).append(Candidate(
            split=split, label=CLASSES.index(class_name), patient_id=pid or path.stem,
            file_name=str(path.relative_to(root)), content_hash=content_hash(data),
            load=_decoder(path, image_size)))
    for split in splits or ():
        if (root / split).is_dir() and split not in candidates:
            notes.append(f"{root / split}: empty split, no images found; it is left out")
    if not candidates:
        raise ValueError(f"{root}: no images found in the layout {layout}; "
                         f"{len(rejected)} file(s) rejected")
    return Scan(candidates, rejected, notes, files_seen)


def _layout_problem(parts: tuple[str, ...], splits: tuple[str, ...]) -> str | None:
    name = parts[-1]
    if name.startswith(".") or "__MACOSX" in parts:
        return "stray system file, not an image"
    if parts[0] not in splits:
        return f"unknown split folder {parts[0]!r}; expected one of {', '.join(splits)}"
    if len(parts) != 3:
        return (f"not in a class folder; expected {parts[0]}/NORMAL/ or {parts[0]}/PNEUMONIA/"
                if len(parts) == 2 else "nested too deep; expected SPLIT/CLASS/FILE")
    if parts[1] not in CLASSES:
        return f"unknown class folder {parts[1]!r}; expected NORMAL or PNEUMONIA"
    if pathlib.PurePath(name).suffix.lower() not in images.IMAGE_SUFFIXES:
        return (f"not an image file (suffix {pathlib.PurePath(name).suffix or 'none'!r}; "
                f"expected one of {', '.join(sorted(images.IMAGE_SUFFIXES))})")
    return None


def _decoder(path: pathlib.Path, size: int):
    def load() -> tuple[np.ndarray, np.ndarray]:
        image = images.read_grayscale(path, size=size)
        return image, np.zeros_like(image)
    return load


def scan_medmnist(path: pathlib.Path, image_size: int) -> Scan:
    """MedMNIST+ has its own train/val/test but no patient ids: each image is its own patient."""
    try:
        arrays = np.load(path)
        splits = {s: (arrays[f"{s}_images"], arrays[f"{s}_labels"]) for s in SOURCE_SPLITS}
    except (OSError, ValueError, KeyError) as e:
        raise ValueError(f"{path}: not a MedMNIST npz file ({e})") from e
    candidates: dict[str, list[Candidate]] = {}
    for split, (imgs, labels) in splits.items():
        candidates[split] = [Candidate(
            split=split, label=int(labels[i].reshape(-1)[0]), patient_id=f"medmnist-{split}-{i}",
            file_name=f"{path.name}:{split}[{i}]", content_hash=content_hash(imgs[i].tobytes()),
            load=_resizer(imgs[i], image_size)) for i in range(len(imgs))]
    notes = [f"{path}: MedMNIST+ has no patient ids, so `validation` is split by image"]
    return Scan(candidates, [], notes, sum(len(c) for c in candidates.values()))


def _resizer(image: np.ndarray, size: int):
    def load() -> tuple[np.ndarray, np.ndarray]:
        out = images.resize(image, size)
        return out, np.zeros_like(out)
    return load


def scan_synthetic(count: int, image_size: int, seed: int) -> Scan:
    """Phantoms for `train` and a quarter as many for `test`, from disjoint seeds and patients."""
    from pneumojax.data import synthetic

    candidates: dict[str, list[Candidate]] = {}
    for split, n, split_seed in (("train", count, seed), ("test", max(count // 4, 1), seed + 1)):
        candidates[split] = []
        for ex in synthetic.examples(n, image_size, split_seed):
            candidates[split].append(Candidate(
                split=split, label=ex["label"], patient_id=f"{split}-{ex['patient_id']}",
                file_name=f"{split}/{ex['file_name']}",
                content_hash=content_hash(ex["image"].tobytes()),
                load=lambda ex=ex: (ex["image"], ex["mask"])))
    return Scan(candidates, [], [], sum(len(c) for c in candidates.values()))


def split_by_patient(candidates: list[Candidate], fraction: float, seed: int
                     ) -> tuple[list[Candidate], list[Candidate]]:
    """Carves a validation set out of train with no patient and no identical file on both sides.

    Patients linked by a byte-identical file form one group, so a duplicate cannot leak either.
    Groups are drawn per class until each class reaches `fraction`, keeping the class balance.
    """
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"validation fraction must be in (0, 1), got {fraction}")
    parent: dict[str, str] = {}

    def find(x: str) -> str:
        while parent.setdefault(x, x) != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    first_by_hash: dict[str, str] = {}
    for c in candidates:
        other = first_by_hash.setdefault(c.content_hash, c.patient_id)
        parent[find(c.patient_id)] = find(other)
    groups: dict[str, list[Candidate]] = {}
    for c in candidates:
        groups.setdefault(find(c.patient_id), []).append(c)
    rng = np.random.default_rng(seed)
    held_out: set[str] = set()
    for label in range(len(CLASSES)):
        keys = sorted(k for k, g in groups.items()
                      if round(np.mean([c.label for c in g])) == label)
        target = fraction * sum(len(groups[k]) for k in keys)
        taken = 0
        for i in rng.permutation(len(keys)):
            if taken >= target:
                break
            held_out.add(keys[i])
            taken += len(groups[keys[i]])
    train = [c for c in candidates if find(c.patient_id) not in held_out]
    validation = [c for c in candidates if find(c.patient_id) in held_out]
    return train, validation


def decode_all(candidates: list[Candidate], rejected: list[Rejection], desc: str = "Decoding"
               ) -> list[tuple[Candidate, np.ndarray, np.ndarray]]:
    """Decodes in a thread pool (PIL releases the GIL); failures go to `rejected`, in order.

    Everything is decoded before any split is written, so that a split whose files are all
    rejected can be left out (TFDS cannot write an empty split) and validation is carved from
    images that really exist. At the prepared size this is small: Kermany at 224 px is 0.3 GB.
    """
    from concurrent.futures import ThreadPoolExecutor

    from tqdm import tqdm

    def attempt(c: Candidate):
        try:
            return c.load()
        except images.ImageError as e:
            return e

    decoded = []
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        results = pool.map(attempt, candidates)
        for c, result in tqdm(zip(candidates, results), total=len(candidates), desc=desc,
                              unit=" images"):
            if isinstance(result, images.ImageError):
                rejected.append(Rejection(str(result.path), result.reason))
            else:
                decoded.append((c, *result))
    return decoded
