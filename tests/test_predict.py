"""The prediction CLI: JSON line per image, overlays, DICOM, and bad files that fail alone."""

import json
import os
import pathlib
import re

import numpy as np
import pytest
from PIL import Image

from pneumojax import cli, gradcam, inference, plots, predict, workdirs
from pneumojax.data import images
from tests.test_images import _dicom


def test_each_file_gets_a_line_and_an_overlay_and_a_bad_one_fails_alone(trained, tmp_path,
                                                                        capsys):
    folder = tmp_path / "in"
    folder.mkdir()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (300, 400), dtype=np.uint8)).save(folder / "a.png")
    ramp = np.tile(np.linspace(0, 4000, 96).astype(np.uint16), (80, 1))
    dcm = _dicom(folder, ramp, "MONOCHROME1")
    (folder / "broken.jpeg").write_text("not an image")
    (folder / ".DS_Store").write_bytes(b"\0")  # not an image suffix: not collected
    code = predict.main([str(folder), "--workdir", str(trained), "--out", str(tmp_path / "out"),
                         "--method", "gradcam++"])
    assert code == 1  # one file failed
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert {pathlib_name(r["file"]) for r in lines} == {"a.png", dcm.name, "broken.jpeg"}
    bad = [r for r in lines if "error" in r]
    assert len(bad) == 1 and "not a recognised image" in bad[0]["error"]
    summary = json.loads((trained / "summary.json").read_text())
    for line in lines:
        if "error" in line:
            continue
        assert 0 <= line["probability"] <= 1 and line["threshold"] == summary["threshold"]
        assert line["label"] == ("PNEUMONIA" if line["probability"] >= line["threshold"]
                                 else "NORMAL")
        with Image.open(line["heatmap"]) as im:
            assert im.size[0] > 600  # three panels: image, heat map, contour


def pathlib_name(path: str) -> str:
    return path.rsplit("/", 1)[-1]


def _error_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def test_fifos_devices_and_empty_folders_fail_alone_and_links_are_read(trained, tmp_path, capsys,
                                                                      no_hang):
    folder = tmp_path / "in"
    (folder / "empty_inside").mkdir(parents=True)  # inside a folder: nothing to report
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (300, 400), dtype=np.uint8)).save(folder / "a.png")
    Image.fromarray(rng.integers(0, 255, (40, 390), dtype=np.uint8)).save(folder / "wide.png")
    (folder / "link.png").symlink_to(folder / "a.png")
    os.mkfifo(folder / "pipe.png")
    (folder / "zero.png").symlink_to("/dev/zero")
    (tmp_path / "empty").mkdir()
    paths = [folder, tmp_path / "empty", "/dev/zero", folder / "pipe.png"]
    code = predict.main([*map(str, paths), "--workdir", str(trained),
                         "--out", str(tmp_path / "out")])
    assert code == 1  # some failed, some did not (README)
    records = {}
    for line in capsys.readouterr().out.splitlines():
        record = json.loads(line)
        records.setdefault(record["file"], []).append(record.get("error"))
    assert records[str(folder / "a.png")] == records[str(folder / "link.png")] == [None]
    assert records[str(folder / "wide.png")] == [None]
    pipe = records[str(folder / "pipe.png")]
    assert len(pipe) == 2 and all("FIFO" in e for e in pipe)  # found in the folder, and given
    assert "character device" in records[str(folder / "zero.png")][0]
    assert "character device" in records["/dev/zero"][0]
    assert "folder without image files" in records[str(tmp_path / "empty")][0]
    with Image.open(tmp_path / "out" / "wide.hirescam.png") as im:
        assert im.size[0] <= (3 * 3.2 * plots.MAX_ASPECT + 0.8) * plots.DPI


def test_only_regular_files_are_opened(tmp_path, monkeypatch, no_hang):
    monkeypatch.setattr(images, "read_bytes", lambda path: pytest.fail(f"{path} was opened"))
    os.mkfifo(tmp_path / "pipe.png")
    (tmp_path / "broken.png").symlink_to(tmp_path / "nowhere.png")
    for path, reason in ((tmp_path / "pipe.png", "named pipe (FIFO), not a regular file"),
                         (pathlib.Path("/dev/zero"), "character device, not a regular file"),
                         (tmp_path, "a folder without image files"),
                         (tmp_path / "broken.png", "cannot read file (No such file")):
        with pytest.raises(images.ImageError, match=re.escape(reason)):
            inference.read_file(path)


def test_a_regular_file_is_read_up_to_the_size_limit(tmp_path, monkeypatch):
    (tmp_path / "a.png").write_bytes(b"x" * 100)
    (tmp_path / "link.png").symlink_to(tmp_path / "a.png")
    assert inference.read_file(tmp_path / "link.png") == b"x" * 100
    monkeypatch.setattr(images, "MAX_BYTES", 99)
    with pytest.raises(images.ImageError, match="too large"):
        inference.read_file(tmp_path / "a.png")


def test_no_image_among_the_paths_is_one_line(trained, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "readme.txt").write_text("not an image")
    for paths in ([tmp_path / "empty"], [tmp_path / "empty", tmp_path / "notes"]):
        args = [*map(str, paths), "--workdir", str(trained), "--out", str(tmp_path / "out")]
        assert cli.run(predict.main, args) == 2
        assert "no image file in" in _error_line(capsys)


def test_a_wrong_method_or_layer_is_one_line_with_the_choices(trained, tmp_path, capsys):
    Image.new("L", (64, 64)).save(tmp_path / "a.png")
    base = [str(tmp_path / "a.png"), "--workdir", str(trained), "--out", str(tmp_path / "out")]
    assert cli.run(predict.main, [*base, "--layer", "nosuch"]) == 2
    line = _error_line(capsys)
    assert "--layer 'nosuch'" in line
    assert gradcam.config_layer(workdirs.load_config(trained)) in line
    assert cli.run(predict.main, [*base, "--method", "nosuch"]) == 2
    assert f"valid: {', '.join(gradcam.METHODS)}" in _error_line(capsys)
    assert capsys.readouterr().out == ""  # refused before any image was read
