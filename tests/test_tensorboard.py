"""pneumojax.tensorboard: what is written comes back from the event files, read without
TensorFlow or TensorBoard."""

import io
import subprocess
import sys

import jax
import numpy as np
import pytest
from PIL import Image

from pneumojax import tensorboard


def _images(logdir) -> dict[str, list[tuple[int, Image.Image]]]:
    out = {}
    for event in tensorboard.read_events(logdir):
        for value in event.summary.value:
            if value.HasField("image"):
                png = value.image.encoded_image_string
                assert png.startswith(b"\x89PNG\r\n\x1a\n")
                image = Image.open(io.BytesIO(png))
                assert (image.width, image.height) == (value.image.width, value.image.height)
                out.setdefault(value.tag, []).append((event.step, image))
    return out


def test_scalars_come_back_with_their_tags_steps_and_values(tmp_path):
    with tensorboard.EventWriter(tmp_path / "tb") as writer:
        writer.scalars(1, {"loss": 0.75, "learning_rate": np.float32(1e-3)}, prefix="train")
        writer.scalars(2, {"loss": jax.numpy.array(0.5), "images_per_s": 812}, prefix="train")
        writer.scalars(2, {"auc": 0.9, "t_0.5": {"sensitivity": 0.8, "specificity": None}},
                       prefix="validation")
        writer.scalars(3, {"epoch": 1})
    scalars = tensorboard.read_scalars(tmp_path / "tb")
    assert scalars == {
        "train/loss": [(1, 0.75), (2, 0.5)],
        "train/learning_rate": [(1, pytest.approx(1e-3))],
        "train/images_per_s": [(2, 812.0)],
        "validation/auc": [(2, pytest.approx(0.9))],
        "validation/t_0.5/sensitivity": [(2, pytest.approx(0.8))],  # None is skipped
        "epoch": [(3, 1.0)],
    }


def test_images_come_back_as_pngs_of_their_size(tmp_path):
    rgba = np.random.default_rng(0).integers(0, 256, (30, 50, 4), dtype=np.uint8)
    Image.fromarray(rgba).save(tmp_path / "grid.png")  # as matplotlib saves the Grad-CAM grid
    grey = np.tile(np.arange(40, dtype=np.uint8)[None] * 6, (20, 1))
    with tensorboard.EventWriter(tmp_path / "tb") as writer:
        writer.image(5, "gradcam", tmp_path / "grid.png")
        writer.image(6, "gradcam", str(tmp_path / "grid.png"))
        writer.image(5, "inputs", grey)
        writer.image(5, "rgb", rgba[..., :3])
    images = _images(tmp_path / "tb")
    assert [step for step, _ in images["gradcam"]] == [5, 6]
    np.testing.assert_array_equal(np.asarray(images["gradcam"][0][1].convert("RGBA")), rgba)
    assert images["inputs"][0][1].size == (40, 20)
    np.testing.assert_array_equal(np.asarray(images["inputs"][0][1].convert("L")), grey)
    np.testing.assert_array_equal(np.asarray(images["rgb"][0][1].convert("RGB")), rgba[..., :3])


def test_a_value_that_is_not_a_number_or_image_is_refused(tmp_path):
    with tensorboard.EventWriter(tmp_path) as writer:
        with pytest.raises(TypeError, match="validation/ci95"):
            writer.scalars(0, {"ci95": (0.1, 0.2)}, prefix="validation")
        with pytest.raises(TypeError, match="uint8"):
            writer.image(0, "x", np.zeros((4, 4), np.float32))


def test_hosts_other_than_process_0_write_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr(jax, "process_index", lambda: 1)
    writer = tensorboard.EventWriter(tmp_path / "tb")
    writer.scalars(0, {"loss": 1.0})
    writer.image(0, "x", np.zeros((4, 4), np.uint8))
    writer.text(0, "config", "x")
    writer.close()
    assert not (tmp_path / "tb").exists()


def test_text_and_close_twice(tmp_path):
    writer = tensorboard.EventWriter(tmp_path)
    writer.text(0, "config", "model: resnet50")
    writer.close()
    writer.close()
    tags = [v.tag for e in tensorboard.read_events(tmp_path) for v in e.summary.value]
    assert any(t.startswith("config") for t in tags)


def test_neither_tensorflow_nor_tensorboard_is_imported(tmp_path):
    script = (f"import sys; from pneumojax import tensorboard as tb\n"
              f"with tb.EventWriter({str(tmp_path)!r}) as w: w.scalars(0, {{'a': 1.0}})\n"
              f"assert tb.read_scalars({str(tmp_path)!r}) == {{'a': [(0, 1.0)]}}\n"
              f"print(sorted({{m.split('.')[0] for m in sys.modules}} & "
              f"{{'tensorflow', 'tensorboard'}}))")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip() == "[]"
