"""`python -m pneumojax.data prepare|stats` on hostile input: every file accounted for by name,
one line and exit status 2 for a user's mistake, and nothing already prepared damaged."""

import fcntl
import json
import os
import pathlib
import socket
import subprocess
import sys
import time

import pytest
from PIL import Image

from pneumojax import cli, data
from pneumojax.data import __main__ as data_cli
from pneumojax.data import builder, images
from tests.test_builder import _jpeg

REPO = pathlib.Path(__file__).resolve().parents[1]


def _good(root: pathlib.Path) -> None:
    """Six NORMAL and six PNEUMONIA patients in train, one test image: 13 files."""
    for i in range(6):
        _jpeg(root / "train/NORMAL" / f"IM-{i:04d}-0001.jpeg", i)
        _jpeg(root / "train/PNEUMONIA" / f"person{i}_bacteria_{i}.jpeg", 50 + i)
    _jpeg(root / "test/PNEUMONIA/person99_virus_1.jpeg", 99)


def _prepare(root: pathlib.Path, tmp_path: pathlib.Path) -> dict:
    return data.prepare(f"folder:{root}", data_dir=tmp_path / "tfds", image_size=32)


def _stored(report: dict, tmp_path: pathlib.Path) -> dict[str, dict]:
    """Every stored example by file name."""
    out = {}
    for split in report["splits"]:
        src = data.data_source(report["name"], split, data_dir=tmp_path / "tfds")
        out |= {ex["file_name"].decode(): ex for ex in (src[i] for i in range(len(src)))}
    return out


def _accounted(report: dict) -> bool:
    return report["files_read"] == report["written"] + len(report["rejected"])


def test_the_readme_prepare_works_at_the_default_224_px(tmp_path, capsys):
    argv = ["prepare", "--source", "synthetic", "--synthetic-count", "8",
            "--data-dir", str(tmp_path)]  # no --image-size: the default, 224
    assert cli.run(data_cli.main, argv) == 0
    out = capsys.readouterr().out
    assert "Prepared synthetic-224px" in out and "Files read: 10, written: 10" in out
    assert data.data_source("synthetic-224px", "train", data_dir=tmp_path)[0]["image"].shape == (
        224, 224, 1)
    assert data.ensure_prepared("synthetic", data_dir=tmp_path, synthetic_count=8) == (
        "synthetic-224px")


def test_names_that_are_not_utf8_are_prepared_escaped_and_printed_on_one_line(tmp_path, capsys):
    root = tmp_path / "kaggle"
    _good(root)
    normal = os.fsencode(root / "train/NORMAL")
    for raw, value in ((b"IM-0300-0001-\xff.jpeg", 30), (b"IM-0301-0001-\n.jpeg", 31),
                       (b"IM-0302-0001-\xfe.jpeg", 32), (b"IM-0302-0001-\\xfe.jpeg", 33)):
        _jpeg(pathlib.Path(os.fsdecode(os.path.join(normal, raw))), value)
    argv = ["prepare", "--source", f"folder:{root}", "--data-dir", str(tmp_path / "tfds"),
            "--image-size", "32"]
    assert cli.run(data_cli.main, argv) == 0  # printing the report did not fail on a name
    out = capsys.readouterr().out
    report = builder.load_report(tmp_path / "tfds", "folder-kaggle-32px")
    stored = _stored(report, tmp_path)
    assert {"train/NORMAL/IM-0300-0001-\\xff.jpeg", "train/NORMAL/IM-0301-0001-\\n.jpeg",
            "train/NORMAL/IM-0302-0001-\\xfe.jpeg"} <= set(stored)
    assert [r["file"] for r in report["rejected"]] == [
        f"{root}/train/NORMAL/IM-0302-0001-\\xfe.jpeg"]  # the raw twin of a literal name
    assert "rename it" in report["rejected"][0]["reason"] and _accounted(report)
    assert f"{root}/train/NORMAL/IM-0301-0001-\\n.jpeg: the file name is not printable" in out


def test_symlinked_folders_are_followed_and_special_files_rejected_unopened(
        tmp_path, no_hang, monkeypatch):
    elsewhere, root = tmp_path / "elsewhere", tmp_path / "kaggle"
    _good(elsewhere)
    (root / "train").mkdir(parents=True)
    for cls in ("NORMAL", "PNEUMONIA"):
        (root / "train" / cls).symlink_to(elsewhere / "train" / cls)  # linked class folders
    (root / "test").symlink_to(elsewhere / "test")  # a linked split folder
    (root / "val").symlink_to(root / "test")  # the same folder a second time
    normal = elsewhere / "train/NORMAL"
    (normal / "loop").symlink_to(".")
    (normal / "self.jpeg").symlink_to("self.jpeg")
    (normal / "gone.jpeg").symlink_to("missing.jpeg")
    (normal / "null.jpeg").symlink_to("/dev/null")
    os.mkfifo(normal / "pipe.jpeg")
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(normal / "sock.jpeg"))
    opened = []
    monkeypatch.setattr(images, "read_bytes",
                        lambda path, read=images.read_bytes: opened.append(path) or read(path))
    report = _prepare(root, tmp_path)
    sock.close()
    rejected = {r["file"].removeprefix(f"{root}/"): r["reason"] for r in report["rejected"]}
    assert rejected == {
        "train/NORMAL/gone.jpeg": "a broken symlink (its target missing.jpeg does not exist)",
        "train/NORMAL/loop": f"a symlink to a folder already read ({normal}): a loop or a second "
                             "copy; not followed",
        "train/NORMAL/null.jpeg": "a character device, not a regular file; not opened",
        "train/NORMAL/pipe.jpeg": "a named pipe (FIFO), not a regular file; not opened",
        "train/NORMAL/self.jpeg": "a symlink loop; not followed",
        "train/NORMAL/sock.jpeg": "a socket, not a regular file; not opened",
        "val": f"a symlink to a folder already read ({elsewhere / 'test'}): a loop or a second "
               "copy; not followed"}
    assert report["written"] == 13 and _accounted(report)
    assert not {p.name for p in opened} & {"null.jpeg", "pipe.jpeg", "sock.jpeg", "gone.jpeg"}


def test_a_suffix_that_lies_and_extra_frames_are_noted(tmp_path):
    root = tmp_path / "kaggle"
    _good(root)
    normal = root / "train/NORMAL"
    Image.new("L", (40, 40), 90).save(normal / "IM-0400-0001.jpeg", "PNG")
    Image.new("L", (40, 40), 90).save(normal / "IM-0401-0001.png", "JPEG")
    (normal / "IM-0402-0001.jpeg").write_text("hello")
    first, second = Image.new("L", (64, 64), 10), Image.new("L", (64, 64), 200)
    first.save(normal / "IM-0403-0001.jpeg", "MPO", save_all=True, append_images=[second])
    first.save(normal / "IM-0404-0001.png", "PNG", save_all=True, append_images=[second])
    report = _prepare(root, tmp_path)
    for note in ("IM-0400-0001.jpeg: a PNG file named .jpeg; read as PNG",
                 "IM-0401-0001.png: a JPEG file named .png; read as JPEG",
                 "IM-0403-0001.jpeg: 2 frames (MPO); the first frame is used",
                 "IM-0404-0001.png: 2 frames (PNG); the first frame is used"):
        assert f"{normal / note}" in report["notes"]
    assert [r["reason"] for r in report["rejected"]] == [
        "not a recognised image: not a JPEG, PNG or DICOM file (starts with b'hello')"]
    stored = _stored(report, tmp_path)
    for name in ("IM-0403-0001.jpeg", "IM-0404-0001.png"):  # the first frame, not the second
        assert abs(stored[f"train/NORMAL/{name}"]["image"].mean() - 10) < 3


def test_unrecognised_folders_are_named_with_the_names_expected(tmp_path, capsys):
    root = tmp_path / "kaggle"
    _good(root)
    for i in range(3):
        _jpeg(root / "train/Normal" / f"IM-05{i:02d}-0001.jpeg", i)
    _jpeg(root / "normal/IM-0600-0001.jpeg")
    argv = ["prepare", "--source", f"folder:{root}", "--data-dir", str(tmp_path / "tfds"),
            "--image-size", "32"]
    assert cli.run(data_cli.main, argv) == 0
    out = capsys.readouterr().out.splitlines()
    assert (f"  rejected 3 files in {root}/train/Normal/: unknown class folder 'Normal'; expected "
            "NORMAL or PNEUMONIA (names are case-sensitive: rename it to NORMAL)") in out
    assert (f"  rejected {root}/normal/IM-0600-0001.jpeg: unknown split folder 'normal'; "
            "expected train or val or test") in out


def test_a_source_pointed_at_one_split_says_where_to_point_it(tmp_path, capsys):
    root = tmp_path / "kaggle"
    _good(root)
    argv = ["prepare", "--source", f"folder:{root / 'train'}", "--data-dir", str(tmp_path)]
    assert cli.run(data_cli.main, argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no images found" in err
    assert "is a class folder, so point the source at the folder that holds train/" in err


def test_a_train_split_with_one_class_is_a_clear_note(tmp_path):
    root = tmp_path / "kaggle"
    for i in range(6):
        _jpeg(root / "train/PNEUMONIA" / f"person{i}_bacteria_{i}.jpeg", i)
    report = _prepare(root, tmp_path)
    assert report["splits"]["train"]["NORMAL"] == 0 < report["splits"]["train"]["PNEUMONIA"]
    assert any(n.startswith("split 'train' has no NORMAL images (only ")
               and "training needs both classes" in n for n in report["notes"])


def _hold(folder: pathlib.Path) -> int:
    """Locks `folder` as a prepare at work (or a reader) in another process would."""
    fd = os.open(folder / ".lock", os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_SH)
    return fd


def test_staging_left_by_a_killed_prepare_is_removed_by_stats(tmp_path, capsys):
    dead = tmp_path / ".staging-dead0001"
    (dead / builder.NAME).mkdir(parents=True)
    (dead / builder.NAME / "partial").write_text("half a build")
    assert cli.run(data_cli.main, ["stats", "--data-dir", str(tmp_path)]) == 2  # none yet
    assert not dead.exists()
    data.prepare("synthetic", data_dir=tmp_path, image_size=32, synthetic_count=8)
    dead.mkdir()
    live = tmp_path / ".staging-live0001"
    live.mkdir()
    fd = _hold(live)
    try:
        assert cli.run(data_cli.main, ["stats", "--data-dir", str(tmp_path)]) == 0
        assert not dead.exists() and live.exists()  # a prepare at work keeps its folder
    finally:
        os.close(fd)
    assert "synthetic-32px" in capsys.readouterr().out


def test_tidy_deletes_only_builds_no_one_reads_and_the_link_does_not_name(tmp_path):
    data.prepare("synthetic", data_dir=tmp_path, image_size=32, synthetic_count=8)
    final = builder.dataset_dir(tmp_path, "synthetic-32px")
    current = final.resolve()
    orphan, read = final.with_name(".build-orphan01"), final.with_name(".build-reader01")
    orphan.mkdir()
    read.mkdir()
    fd = _hold(read)
    try:
        builder.tidy(tmp_path, "synthetic-32px")
        assert not orphan.exists() and read.exists() and current.exists()
    finally:
        os.close(fd)


def test_a_reader_keeps_its_set_while_another_run_prepares_other_settings(tmp_path):
    kwargs = dict(data_dir=tmp_path, image_size=32, synthetic_count=24)
    name = data.ensure_prepared("synthetic", validation_fraction=0.1, **kwargs)
    lazy = data.data_source(name, "train", data_dir=tmp_path)  # opens its files on first read
    eager = data.data_source(name, "train", data_dir=tmp_path)
    before = [eager[i]["content_hash"] for i in range(len(eager))]
    data.ensure_prepared("synthetic", validation_fraction=0.5, **kwargs)  # a second run
    # A reader of the replaced folder read "index 19 out of bound 19" here; it reads its own.
    assert [lazy[i]["content_hash"] for i in range(len(lazy))] == before
    assert len(data.data_source(name, "train", data_dir=tmp_path)) < len(before)


def test_a_folder_changed_since_prepare_is_prepared_again_saying_so(tmp_path, capsys,
                                                                    monkeypatch):
    root = tmp_path / "kaggle"
    _good(root)
    kwargs = dict(data_dir=tmp_path / "tfds", image_size=32)
    name = data.ensure_prepared(f"folder:{root}", **kwargs)
    assert builder.load_report(tmp_path / "tfds", name)["fingerprint"]["files"] == 13
    calls = []
    prepare = builder.prepare
    monkeypatch.setattr(builder, "prepare", lambda *a, **k: calls.append(a) or prepare(*a, **k))
    capsys.readouterr()

    def says() -> list[str]:
        return [line for line in capsys.readouterr().err.splitlines()
                if line.startswith("data: ")]
    assert data.ensure_prepared(f"folder:{root}", **kwargs) == name and not calls
    assert says() == []
    _jpeg(root / "train/NORMAL/IM-0700-0001.jpeg", 70)  # a file added
    data.ensure_prepared(f"folder:{root}", **kwargs)
    assert says() == [f"data: {name} no longer matches folder:{root}: its files changed since "
                      "it was prepared (13 files then, 14 now); preparing it again"]
    stamp = (root / "test/PNEUMONIA/person99_virus_1.jpeg").stat().st_mtime_ns
    os.utime(root / "test/PNEUMONIA/person99_virus_1.jpeg", ns=(stamp, stamp + 10**9))
    data.ensure_prepared(f"folder:{root}", **kwargs)  # a file rewritten, same count
    assert len(says()) == 1 and len(calls) == 2
    data.ensure_prepared(f"folder:{root}", validation_fraction=0.3, **kwargs)
    assert says() == [f"data: {name} was prepared with other settings (validation_fraction 0.1 "
                      "-> 0.3); preparing it again"]


def test_the_module_exits_2_with_one_line_for_a_user_mistake(tmp_path):
    run = subprocess.run([sys.executable, "-m", "pneumojax.data", "prepare", "--source",
                          "synthetic", "--image-size", "16", "--data-dir", str(tmp_path)],
                         capture_output=True, text=True, cwd=REPO, timeout=300)
    assert run.returncode == 2 and run.stderr.splitlines() == [
        "error: image size 16: must be at least 32 px (--image-size, or data.image_size) "
        "(--debug shows the traceback)"]


@pytest.mark.slow
def test_a_prepare_killed_mid_build_leaves_the_old_set_and_no_debris(tmp_path, capsys):
    data.prepare("synthetic", data_dir=tmp_path, image_size=32, synthetic_count=8)
    run = subprocess.Popen([sys.executable, "-m", "pneumojax.data", "prepare", "--source",
                            "synthetic", "--image-size", "32", "--synthetic-count", "3000",
                            "--data-dir", str(tmp_path)], cwd=REPO,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not list(tmp_path.glob(".staging-*")) and time.monotonic() < deadline:
        time.sleep(0.05)  # the scan takes seconds; building in staging takes seconds more
    run.kill()
    run.wait()
    assert list(tmp_path.glob(".staging-*"))  # it was killed at work
    assert cli.run(data_cli.main, ["stats", "--data-dir", str(tmp_path)]) == 0
    assert not list(tmp_path.glob(".staging-*"))
    assert "train" in capsys.readouterr().out
    assert builder.load_report(tmp_path, "synthetic-32px")["files_read"] == 10  # the old set


def test_a_set_prepared_in_place_by_older_code_is_read_then_replaced_by_a_link(tmp_path):
    kwargs = dict(data_dir=tmp_path, image_size=32, synthetic_count=8)
    name = data.ensure_prepared("synthetic", **kwargs)
    final = builder.dataset_dir(tmp_path, name)
    build = final.resolve()
    final.unlink()
    build.rename(final)  # the layout before builds: the set itself at 1.0.0
    assert len(data.data_source(name, "train", data_dir=tmp_path)) > 0
    assert data.ensure_prepared("synthetic", **kwargs) == name  # still current: not redone
    data.prepare("synthetic", **{**kwargs, "seed": 1})
    assert final.is_symlink() and builder.load_report(tmp_path, name)["settings"]["seed"] == 1


@pytest.mark.slow
def test_a_run_keeps_one_build_while_another_process_prepares_other_settings(tmp_path):
    kwargs = dict(data_dir=tmp_path, image_size=32, synthetic_count=24)
    name = data.ensure_prepared("synthetic", **kwargs)
    report = builder.load_report(tmp_path, name)
    train = [ex["content_hash"] for ex in data.data_source(name, "train", data_dir=tmp_path)]
    subprocess.run([sys.executable, "-m", "pneumojax.data", "prepare", "--source", "synthetic",
                    "--image-size", "32", "--synthetic-count", "24", "--validation-fraction",
                    "0.5", "--data-dir", str(tmp_path)], cwd=REPO, check=True,
                   capture_output=True, timeout=300)
    other = builder.dataset_dir(tmp_path, name).resolve()
    assert builder.current_build(tmp_path, name) != other  # the link moved; this run did not
    assert builder.load_report(tmp_path, name) == report
    again = data.data_source(name, "train", data_dir=tmp_path)
    assert [ex["content_hash"] for ex in again] == train
    assert data.ensure_prepared("synthetic", **kwargs) == name
    assert json.loads((other / builder.REPORT_FILE).read_text())["settings"][
        "validation_fraction"] == 0.5
