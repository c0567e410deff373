"""The TFDS builder end to end: sources in, ArrayRecords out, nothing lost, nothing leaked."""

import hashlib
import io
import pathlib
import socket

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from pneumojax import cli, data
from pneumojax.data import __main__ as data_cli
from pneumojax.data import builder, sources, stats
from tests.conftest import REAL_DATA, SYNTHETIC_COUNT, SYNTHETIC_SIZE, needs_real_data, png_bomb


def test_importing_registers_the_builder():
    assert tfds.builder_cls(builder.NAME) is data.ChestXrayPneumonia


def test_synthetic_round_trip_through_tfds_data_source(synthetic):
    data_dir, name = synthetic
    report = builder.load_report(data_dir, name)
    assert report["files_read"] == report["written"] == SYNTHETIC_COUNT + SYNTHETIC_COUNT // 4
    src = tfds.data_source(f"{builder.NAME}/{name}", split="validation", data_dir=str(data_dir))
    assert len(src) == sum(report["splits"]["validation"].values()) > 0
    ex = src[0]
    assert ex["image"].shape == ex["lesion_mask"].shape == (SYNTHETIC_SIZE, SYNTHETIC_SIZE, 1)
    assert ex["image"].dtype == np.uint8 and ex["label"] in (0, 1)
    assert "synthetic" in ex["file_name"].decode() and "synthetic" in ex["patient_id"].decode()
    masks = {int(e["label"]): e["lesion_mask"].any() for e in (src[i] for i in range(len(src)))}
    assert masks == {0: False, 1: True}  # lesion masks only on PNEUMONIA phantoms


def test_synthetic_splits_share_no_patient(synthetic):
    s = stats.dataset_stats(synthetic[1], synthetic[0])
    assert set(s["splits"]) == {"train", "validation", "test"}
    assert s["shared_patients"] == {} and s["cross_split_duplicates"] == []


def _jpeg(path: pathlib.Path, value: int = 128, mode: str = "L", size=(64, 48)) -> bytes:
    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    rng = np.random.default_rng(value)
    arr = rng.integers(0, 255, (size[1], size[0]), dtype=np.uint8)
    Image.fromarray(arr).convert(mode).save(buf, "JPEG")
    path.write_bytes(buf.getvalue())
    return buf.getvalue()


def _kaggle_folder(root: pathlib.Path) -> dict[str, str]:
    """Good images plus every kind of bad input; returns {bad file: expected reason}."""
    for i in range(6):
        _jpeg(root / "train/NORMAL" / f"IM-{i:04d}-0001.jpeg", i)
        _jpeg(root / "train/PNEUMONIA" / f"person{i}_bacteria_{i}.jpeg", 50 + i, mode="RGB")
    _jpeg(root / "test/PNEUMONIA/person99_virus_1.jpeg", 99)
    (root / "val/NORMAL").mkdir(parents=True)  # an empty split
    normal = root / "train/NORMAL"
    rgba = np.full((40, 40, 4), 200, np.uint8)
    Image.fromarray(rgba, "RGBA").save(normal / "IM-0100-0001.png")  # converted
    Image.fromarray(np.full((40, 40), 3000, np.uint16)).save(normal / "IM-0101-0001.png")
    Image.new("CMYK", (40, 40), (0, 0, 0, 128)).save(normal / "IM-0102-0001.jpeg")
    bad = {}
    whole = _jpeg(normal / "IM-0200-0001.jpeg", 7, size=(256, 256))
    (normal / "IM-0200-0001.jpeg").write_bytes(whole[: len(whole) // 2])
    bad["train/NORMAL/IM-0200-0001.jpeg"] = "truncated or corrupt"
    (normal / "IM-0201-0001.jpeg").write_bytes(b"")
    bad["train/NORMAL/IM-0201-0001.jpeg"] = "empty file"
    (normal / "IM-0202-0001.jpeg").write_text("hello")
    bad["train/NORMAL/IM-0202-0001.jpeg"] = "not a recognised image"
    Image.new("L", (1, 1)).save(normal / "IM-0203-0001.png")
    bad["train/NORMAL/IM-0203-0001.png"] = "too small"
    (normal / "IM-0204-0001.png").write_bytes(png_bomb())
    bad["train/NORMAL/IM-0204-0001.png"] = "decompression-bomb"
    (normal / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    bad["train/NORMAL/.DS_Store"] = "stray system file"
    _jpeg(root / "train/COVID/covid_1.jpeg", 5)
    bad["train/COVID/covid_1.jpeg"] = "unknown class folder 'COVID'"
    return bad


def test_folder_source_names_every_rejected_file_and_loses_none(tmp_path):
    root = tmp_path / "kaggle"
    bad = _kaggle_folder(root)
    report = data.prepare(f"folder:{root}", data_dir=tmp_path / "tfds", image_size=32,
                          validation_fraction=0.3)
    rejected = {r["file"]: r["reason"] for r in report["rejected"]}
    assert set(rejected) == {str(root / f) for f in bad}
    for f, reason in bad.items():
        assert reason in rejected[str(root / f)], rejected[str(root / f)]
    assert report["files_read"] == report["written"] + len(rejected) == 12 + 1 + 3 + len(bad)
    assert set(report["splits"]) == {"train", "validation", "test"}
    assert any("empty split" in n and "val" in n for n in report["notes"])
    names = set()
    for split in ("train", "validation"):
        src = data.data_source(report["name"], split, data_dir=tmp_path / "tfds")
        names |= {src[i]["file_name"].decode() for i in range(len(src))}
    assert {"train/NORMAL/IM-0100-0001.png", "train/NORMAL/IM-0101-0001.png",
            "train/NORMAL/IM-0102-0001.jpeg"} <= names  # odd formats converted, not rejected


def test_a_failed_prepare_leaves_the_previous_version_usable(tmp_path, monkeypatch):
    root = tmp_path / "kaggle"
    _kaggle_folder(root)
    data_dir = tmp_path / "tfds"
    first = data.prepare(f"folder:{root}", data_dir=data_dir, image_size=32)
    before = data.data_source(first["name"], "train", data_dir=data_dir)
    hashes = sorted(before[i]["content_hash"] for i in range(len(before)))

    def crash(*args, **kwargs):
        raise RuntimeError("disk full")
    monkeypatch.setattr(sources, "decode_all", crash)
    with pytest.raises(RuntimeError, match="disk full"):
        data.prepare(f"folder:{root}", data_dir=data_dir, image_size=32)
    after = data.data_source(first["name"], "train", data_dir=data_dir)
    assert sorted(after[i]["content_hash"] for i in range(len(after))) == hashes
    assert not list(data_dir.glob(".staging-*"))


def test_cli_prepare_then_stats(tmp_path, capsys):
    assert cli.run(data_cli.main, ["prepare", "--source", "synthetic", "--data-dir",
                                   str(tmp_path), "--image-size", "32",
                                   "--synthetic-count", "12"]) == 0
    out = capsys.readouterr().out
    assert "Files read: 15, written: 15, rejected: 0" in out
    assert cli.run(data_cli.main, ["stats", "--data-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "synthetic-32px" in out and "patients in more than one split: 0" in out


def test_cli_reports_a_missing_folder_without_a_traceback(tmp_path, capsys):
    assert cli.run(data_cli.main, ["prepare", "--source", f"folder:{tmp_path / 'nope'}",
                                   "--data-dir", str(tmp_path)]) == 2
    assert "nope: no such folder" in capsys.readouterr().err


def test_medmnist_is_downloaded_verified_cached_and_keeps_its_splits(tmp_path, http_server,
                                                                     monkeypatch):
    rng = np.random.default_rng(0)
    arrays = {}
    for split, n in (("train", 20), ("val", 4), ("test", 6)):
        arrays[f"{split}_images"] = rng.integers(0, 255, (n, 64, 64), dtype=np.uint8)
        arrays[f"{split}_labels"] = (np.arange(n) % 2).reshape(n, 1)
    npz = io.BytesIO()
    np.savez(npz, **arrays)
    http_server.files["/pneumoniamnist_224.npz"] = npz.getvalue()
    monkeypatch.setattr(sources, "MEDMNIST_URL", f"{http_server.base}/pneumoniamnist_224.npz")
    monkeypatch.setattr(sources, "MEDMNIST_MD5", hashlib.md5(npz.getvalue()).hexdigest())
    report = data.prepare("medmnist", data_dir=tmp_path, image_size=32, validation_fraction=0.25)
    counts = {s: sum(c.values()) for s, c in report["splits"].items()}
    assert counts["train"] + counts["validation"] == 20 and 4 <= counts["validation"] <= 6
    assert (counts["val"], counts["test"]) == (4, 6)
    assert (tmp_path / "downloads" / sources.MEDMNIST_FILE).read_bytes() == npz.getvalue()
    val = data.data_source(report["name"], "val", data_dir=tmp_path)
    by_name = {val[i]["file_name"].decode(): val[i] for i in range(len(val))}
    example = by_name[f"{sources.MEDMNIST_FILE}:val[1]"]
    assert example["label"] == 1 and example["image"].shape == (32, 32, 1)
    data.prepare("medmnist", data_dir=tmp_path, image_size=32, validation_fraction=0.25)
    assert len(http_server.requests) == 1  # the second prepare used the cache


def test_medmnist_offline_names_the_url_and_the_way_around(tmp_path, monkeypatch, capsys):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setattr(sources, "MEDMNIST_URL", f"http://127.0.0.1:{port}/x.npz")
    assert cli.run(data_cli.main, ["prepare", "--source", "medmnist",
                                   "--data-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert f"127.0.0.1:{port}/x.npz" in err and "place it at" in err


@needs_real_data
def test_real_data_splits_are_patient_disjoint(tmp_path):
    report = data.prepare(f"folder:{REAL_DATA}", data_dir=tmp_path, image_size=32)
    assert report["rejected"] == []
    s = stats.dataset_stats(report["name"], tmp_path)
    totals = {split: c["total"] for split, c in s["splits"].items()}
    assert totals["train"] + totals["validation"] == 5216 and totals["val"] == 16
    assert 0.08 < totals["validation"] / 5216 < 0.12
    assert s["shared_patients"] == {}  # no patient in two splits
    assert s["cross_split_duplicates"] == []  # and no identical file either


def test_ensure_prepared_reuses_matching_data_and_rebuilds_stale(tmp_path, monkeypatch):
    kwargs = dict(data_dir=tmp_path, image_size=32, synthetic_count=8)
    name = data.ensure_prepared("synthetic", **kwargs)
    calls = []
    real_prepare = builder.prepare
    monkeypatch.setattr(builder, "prepare",
                        lambda *a, **k: calls.append(k) or real_prepare(*a, **k))
    assert data.ensure_prepared("synthetic", **kwargs) == name and calls == []
    data.ensure_prepared("synthetic", **{**kwargs, "synthetic_count": 12})
    assert len(calls) == 1
    assert builder.load_report(tmp_path, name)["files_read"] == 15


def test_a_split_whose_files_are_all_rejected_is_left_out_with_a_note(tmp_path):
    root = tmp_path / "kaggle"
    _kaggle_folder(root)
    (root / "test/PNEUMONIA/person99_virus_1.jpeg").write_text("not a jpeg")
    report = data.prepare(f"folder:{root}", data_dir=tmp_path / "tfds", image_size=32)
    assert "test" not in report["splits"]
    assert any("'test'" in n and "every file was rejected" in n for n in report["notes"])


def test_too_few_patients_for_a_validation_split_is_a_clear_error(tmp_path):
    root = tmp_path / "kaggle"
    _jpeg(root / "train/NORMAL/IM-0001-0001.jpeg")
    with pytest.raises(ValueError, match="1 patient.* too few"):
        data.prepare(f"folder:{root}", data_dir=tmp_path / "tfds", image_size=32)


def test_holdout_moves_a_named_sub_cohort_out_of_train_and_validation(tmp_path):
    root = tmp_path / "kaggle"
    _kaggle_folder(root)
    for i in range(3):
        _jpeg(root / "train/NORMAL" / f"NORMAL2-IM-{i:04d}-0001.jpeg", 200 + i)
    report = data.prepare(f"folder:{root}", data_dir=tmp_path / "tfds", image_size=32,
                          holdout="NORMAL2-")
    assert report["name"].endswith("-32px-holdout_NORMAL2-")
    assert report["splits"]["holdout"] == {"NORMAL": 3, "PNEUMONIA": 0}
    names = lambda split: {ex["file_name"].decode().rpartition("/")[2] for ex in data.data_source(
        report["name"], split, data_dir=tmp_path / "tfds")}
    assert names("holdout") == {f"NORMAL2-IM-{i:04d}-0001.jpeg" for i in range(3)}
    assert not any(n.startswith("NORMAL2-") for s in ("train", "validation") for n in names(s))
    plain = data.prepare(f"folder:{root}", data_dir=tmp_path / "tfds", image_size=32)
    assert "holdout" not in plain["splits"] and plain["name"] != report["name"]
    with pytest.raises(cli.UserError, match="data.holdout='XYZ-': no train file"):
        data.prepare(f"folder:{root}", data_dir=tmp_path / "tfds", image_size=32, holdout="XYZ-")
