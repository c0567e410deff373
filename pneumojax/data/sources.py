"""Where examples come from: a Kaggle-layout folder, MedMNIST+ or the synthetic phantoms.

A source is scanned first (cheap: names, bytes, hashes) and decoded later, so that the
patient-disjoint validation split is decided before any pixels are written, and every file
read is accounted for as either written or rejected with its reason.
"""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import os
import pathlib
import re
import stat
from collections.abc import Callable, Iterator

import numpy as np

from pneumojax import cli
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
    """One image that passed the scan; `load` decodes it into (image, lesion mask, notes), or
    raises images.ImageError."""

    split: str
    label: int
    patient_id: str
    file_name: str
    content_hash: str
    load: Callable[[], tuple[np.ndarray, np.ndarray, list[str]]]


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


def check(source: str) -> None:
    """A `--source` string (the config's `data.source`) is one of the three kinds."""
    if not source.startswith("folder:") and source not in ("medmnist", "synthetic"):
        raise cli.UserError(f"source {source!r}: unknown; use folder:PATH, medmnist or synthetic")


def scan(source: str, image_size: int, *, download_dir: pathlib.Path,
         synthetic_count: int = 1200, seed: int = 0) -> Scan:
    """Dispatches on the `--source` string: `folder:PATH`, `medmnist` or `synthetic`."""
    check(source)
    if source.startswith("folder:"):
        return scan_folder(folder_of(source), image_size)
    if source == "medmnist":
        from pneumojax.data import download

        hint = (f"Download {MEDMNIST_FILE} yourself and place it at "
                f"{download_dir / MEDMNIST_FILE}, or prepare from a folder with "
                "--source folder:PATH.")
        path = download.download(MEDMNIST_URL, download_dir / MEDMNIST_FILE, md5=MEDMNIST_MD5,
                                 hint=hint)
        return scan_medmnist(path, image_size)
    return scan_synthetic(synthetic_count, image_size, seed)


def scan_folder(root: pathlib.Path, image_size: int) -> Scan:
    """`root/{train,val,test}/{NORMAL,PNEUMONIA}/*`; any split may be missing."""
    return _scan(root, image_size, SOURCE_SPLITS)


def scan_class_folder(root: pathlib.Path, image_size: int) -> Scan:
    """`root/{NORMAL,PNEUMONIA}/*`, one set of images, e.g. a test set to evaluate on."""
    return _scan(root, image_size, None)


def display_name(path: str | os.PathLike) -> str:
    """A path as printable text: bytes that are not UTF-8 and control characters escaped.

    File names are bytes on POSIX; one that is not UTF-8 would crash TFDS's text features and
    any print, and a newline in one would split a one-line report.
    """
    text = os.fsencode(path).decode("utf-8", "backslashreplace")
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode() for c in text)


def fingerprint(source: str) -> dict | None:
    """Names, sizes and modification times of everything a `folder:` source holds, hashed
    (stat only, nothing read): a prepared set whose fingerprint differs from its folder's no
    longer matches it. None for the other sources, which their settings fix."""
    if not source.startswith("folder:"):
        return None
    root = _checked(folder_of(source), SOURCE_SPLITS)
    digest, files = hashlib.sha256(), 0
    for path, st, problem in _walk(root):
        files += 1
        state = f"{st.st_size} {st.st_mtime_ns}" if st else problem
        digest.update(os.fsencode(path.relative_to(root)) + b"\0" + state.encode() + b"\0")
    return {"files": files, "sha256": digest.hexdigest()}


def folder_of(source: str) -> pathlib.Path:
    """The folder a `folder:PATH` source names."""
    return pathlib.Path(source.removeprefix("folder:")).expanduser()


def _checked(root: pathlib.Path, splits: tuple[str, ...] | None) -> pathlib.Path:
    if not root.is_dir():
        raise FileNotFoundError(f"{display_name(root)}: no such folder (expected the Kaggle "
                                f"layout {_layout(splits)})")
    return root


def _layout(splits: tuple[str, ...] | None) -> str:
    return ("ROOT/{train,val,test}/{NORMAL,PNEUMONIA}/*.jpeg" if splits
            else "ROOT/{NORMAL,PNEUMONIA}/*.jpeg")


def _walk(root: pathlib.Path) -> Iterator[tuple[pathlib.Path, os.stat_result | None, str | None]]:
    """Everything under `root` that is not a folder, in name order: (path, stat, None) for a
    regular file, (path, stat or None, reason) for what cannot be an image.

    Symlinked folders are followed, each real folder once: a link back to one already read (a
    loop, or a second copy) is reported instead. Nothing is opened, so a FIFO cannot hang it.
    """
    seen: set[tuple[int, int]] = set()
    stack = [(root, os.stat(root))]
    while stack:
        folder, st = stack.pop()
        if (st.st_dev, st.st_ino) in seen:
            yield folder, None, (f"a symlink to a folder already read "
                                 f"({display_name(folder.resolve())}): a loop or a second copy; "
                                 "not followed")
            continue
        seen.add((st.st_dev, st.st_ino))
        try:
            entries = sorted(os.scandir(folder), key=lambda e: e.name)
        except OSError as e:
            yield folder, None, f"a folder that cannot be listed ({e.strerror})"
            continue
        subfolders = []
        for entry in entries:
            path = pathlib.Path(entry.path)
            try:
                st = entry.stat()  # follows symlinks
            except OSError as e:
                yield path, None, _broken_link(path, e)
                continue
            if stat.S_ISDIR(st.st_mode):
                subfolders.append((path, st))
            else:
                kind = images.special_file(st.st_mode)
                yield path, st, kind and f"{kind}, not a regular file; not opened"
        stack.extend(reversed(subfolders))


def _broken_link(path: pathlib.Path, error: OSError) -> str:
    if error.errno == errno.ELOOP:
        return "a symlink loop; not followed"
    if path.is_symlink() and error.errno == errno.ENOENT:
        return f"a broken symlink (its target {display_name(os.readlink(path))} does not exist)"
    return f"cannot be read ({error.strerror})"


def _scan(root: pathlib.Path, image_size: int, splits: tuple[str, ...] | None) -> Scan:
    """With `splits=None` the folder is one split, named after the folder itself."""
    root = _checked(root, splits)
    scan = Scan({}, [], [], 0)
    names: set[str] = set()  # file names as stored, which must be unique
    for path, _, problem in _walk(root):
        scan.files_seen += 1
        found = _candidate(root, path, problem, splits, image_size, names, scan.notes)
        if isinstance(found, Rejection):
            scan.rejected.append(found)
        else:
            scan.candidates.setdefault(found.split, []).append(found)
    for split in splits or ():
        if (root / split).is_dir() and split not in scan.candidates:
            scan.notes.append(f"{display_name(root / split)}: empty split, no images found; it "
                              "is left out")
    if not scan.candidates:
        first = f", the first: {scan.rejected[0]}" if scan.rejected else ""
        raise ValueError(f"{display_name(root)}: no images found in the layout "
                         f"{_layout(splits)}; {len(scan.rejected)} file(s) rejected{first}")
    return scan


def _candidate(root: pathlib.Path, path: pathlib.Path, problem: str | None,
               splits: tuple[str, ...] | None, image_size: int, names: set[str],
               notes: list[str]) -> Candidate | Rejection:
    """One file of a folder source, read and hashed, or the reason it cannot be used."""
    name, relative = display_name(path), path.relative_to(root)
    parts = relative.parts if splits else (root.name, *relative.parts)
    file_name = display_name(relative)
    if file_name in names:  # two names that differ only in their escaped bytes
        problem = f"its name reads as '{file_name}', as another file's does; rename it"
    if reason := problem or _layout_problem(parts, splits or (root.name,)):
        return Rejection(name, reason)
    try:
        data = images.read_bytes(path)
    except images.ImageError as e:
        return Rejection(name, e.reason)
    names.add(file_name)
    if file_name != str(relative):
        notes.append(f"{name}: the file name is not printable UTF-8 text; it is stored escaped, "
                     "as shown here")
    pid = patient_id(display_name(path.name))
    if pid is None:
        notes.append(f"{name}: no patient id in the file name; it counts as its own patient")
    return Candidate(split=parts[0], label=CLASSES.index(parts[1]),
                     patient_id=pid or display_name(path.stem), file_name=file_name,
                     content_hash=content_hash(data), load=_decoder(path, image_size))


def _layout_problem(parts: tuple[str, ...], splits: tuple[str, ...]) -> str | None:
    name = parts[-1]
    if name.startswith(".") or "__MACOSX" in parts:
        return "stray system file, not an image"
    if parts[0] not in splits:
        hint = (f"; {parts[0]} is a class folder, so point the source at the folder that holds "
                "train/ and test/" if parts[0] in CLASSES else "")
        return _unknown_folder("split", parts[0], splits) + hint
    if len(parts) != 3:
        return (f"not in a class folder; expected {parts[0]}/NORMAL/ or {parts[0]}/PNEUMONIA/"
                if len(parts) == 2 else "nested too deep; expected SPLIT/CLASS/FILE")
    if parts[1] not in CLASSES:
        return _unknown_folder("class", parts[1], CLASSES)
    if pathlib.PurePath(name).suffix.lower() not in images.IMAGE_SUFFIXES:
        return (f"not an image file (suffix {pathlib.PurePath(name).suffix or 'none'!r}; "
                f"expected one of {', '.join(sorted(images.IMAGE_SUFFIXES))})")
    return None


def _unknown_folder(kind: str, name: str, expected: tuple[str, ...]) -> str:
    """Names the folder and the names expected; a case slip gets the exact name."""
    same = [e for e in expected if e.lower() == name.lower()]
    return (f"unknown {kind} folder {display_name(name)!r}; expected {' or '.join(expected)}"
            + (f" (names are case-sensitive: rename it to {same[0]})" if same else ""))


def _decoder(path: pathlib.Path, size: int):
    def load() -> tuple[np.ndarray, np.ndarray, list[str]]:
        image, notes = images.read(path, size=size)
        return image, np.zeros_like(image), [f"{display_name(path)}: {n}" for n in notes]
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
    def load() -> tuple[np.ndarray, np.ndarray, list[str]]:
        out = images.resize(image, size)
        return out, np.zeros_like(out), []
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
                load=lambda ex=ex: (ex["image"], ex["mask"], [])))
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


def decode_all(candidates: list[Candidate], rejected: list[Rejection], desc: str = "Decoding",
               notes: list[str] | None = None) -> list[tuple[Candidate, np.ndarray, np.ndarray]]:
    """Decodes in a thread pool (PIL releases the GIL); failures go to `rejected` and what the
    decoders noticed (a PNG named .jpeg, a second frame) to `notes`, in order.

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
                rejected.append(Rejection(display_name(result.path), result.reason))
            else:
                image, mask, found = result
                decoded.append((c, image, mask))
                if notes is not None:
                    notes += found
    return decoded
