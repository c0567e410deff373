import os

import numpy as np
import pytest

from pneumojax.data import sources


@pytest.mark.parametrize("name, patient", [
    ("person1000_bacteria_2931.jpeg", "person1000"),
    ("person447_virus_921_1.jpeg", "person447"),
    ("IM-0115-0001.jpeg", "IM-0115"),
    ("IM-0429-0001-0002.jpeg", "IM-0429"),
    ("NORMAL2-IM-1427-0001.jpeg", "NORMAL2-IM-1427"),
    ("scan_0001.png", None),
])
def test_patient_id_follows_kermany_names(name, patient):
    assert sources.patient_id(name) == patient


def _candidates(patients: dict[str, tuple[int, int]], duplicate_of: dict[str, str] | None = None):
    """patients: id -> (label, number of images). duplicate_of: patient -> patient whose hash it
    reuses."""
    duplicate_of = duplicate_of or {}
    out = []
    for pid, (label, n) in patients.items():
        for k in range(n):
            h = f"{duplicate_of.get(pid, pid)}-{k}" if k == 0 else f"{pid}-{k}"
            out.append(sources.Candidate("train", label, pid, f"{pid}_{k}.jpeg", h, lambda: None))
    return out


def test_split_by_patient_is_disjoint_seeded_and_balanced():
    rng = np.random.default_rng(0)
    patients = {f"p{i}": (int(i % 4 != 0), int(rng.integers(1, 4))) for i in range(400)}
    cands = _candidates(patients)
    train, val = sources.split_by_patient(cands, 0.2, seed=3)
    assert len(train) + len(val) == len(cands)
    assert not {c.patient_id for c in train} & {c.patient_id for c in val}
    assert abs(len(val) / len(cands) - 0.2) < 0.03
    frac_normal = lambda cs: np.mean([c.label == 0 for c in cs])
    assert abs(frac_normal(val) - frac_normal(cands)) < 0.05
    again, _ = sources.split_by_patient(cands, 0.2, seed=3)
    other, _ = sources.split_by_patient(cands, 0.2, seed=4)
    assert [c.file_name for c in again] == [c.file_name for c in train]
    assert [c.file_name for c in other] != [c.file_name for c in train]


def test_split_by_patient_keeps_identical_files_on_one_side():
    patients = {f"p{i}": (1, 2) for i in range(50)}
    # Each odd patient's first image is byte-identical to the previous patient's.
    dup = {f"p{i}": f"p{i - 1}" for i in range(1, 50, 2)}
    for seed in range(5):
        train, val = sources.split_by_patient(_candidates(patients, dup), 0.3, seed)
        train_hashes = {c.content_hash for c in train}
        assert not train_hashes & {c.content_hash for c in val}


def test_split_by_patient_rejects_bad_fraction():
    with pytest.raises(ValueError, match="fraction"):
        sources.split_by_patient(_candidates({"p": (0, 1)}), 1.0, 0)


@pytest.mark.parametrize("raw, shown", [
    (b"IM-0001-0001.jpeg", "IM-0001-0001.jpeg"),
    ("Röntgen/IM-0001.jpeg".encode(), "Röntgen/IM-0001.jpeg"),  # UTF-8 is kept as it is
    (b"IM-\xff\xfe.jpeg", "IM-\\xff\\xfe.jpeg"),  # bytes that are not UTF-8
    (b"a\nb\tc.jpeg", "a\\nb\\tc.jpeg"),  # control characters would break a report's lines
])
def test_display_name_is_printable_utf8_on_one_line(raw, shown):
    name = sources.display_name(os.fsdecode(raw))
    assert name == shown and name.encode("utf-8") and name.isprintable()


def test_fingerprint_follows_names_sizes_and_times_without_reading(tmp_path, monkeypatch):
    image = tmp_path / "train/NORMAL/IM-0001-0001.jpeg"
    image.parent.mkdir(parents=True)
    image.write_bytes(b"x" * 10)
    source = f"folder:{tmp_path}"
    monkeypatch.setattr("builtins.open", None)  # stat only: any open would fail
    first = sources.fingerprint(source)
    assert first["files"] == 1 and sources.fingerprint(source) == first
    stamp = image.stat().st_mtime_ns
    os.utime(image, ns=(stamp, stamp + 1))
    touched = sources.fingerprint(source)
    os.truncate(image, 11)
    os.utime(image, ns=(stamp, stamp + 1))
    grown = sources.fingerprint(source)
    image.rename(image.with_name("IM-0002-0001.jpeg"))
    renamed = sources.fingerprint(source)
    assert len({first["sha256"], touched["sha256"], grown["sha256"], renamed["sha256"]}) == 4
    assert sources.fingerprint("synthetic") is None
