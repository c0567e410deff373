"""The prediction CLI: JSON line per image, overlays, DICOM, and bad files that fail alone."""

import json

import numpy as np
from PIL import Image

from pneumojax import predict
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
