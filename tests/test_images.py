"""Tests for pneumojax.data.images: every input is built in tmp_path."""

import io
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, JpegImagePlugin

from pneumojax.data import images
from pneumojax.data.images import ImageError, decode_grayscale, read_grayscale
from tests.conftest import dicom_dataset, png_bomb


def _xray_like(width: int, height: int) -> np.ndarray:
    """Smooth structure plus mild noise, so JPEG and resizing behave as on real scans."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    body = 120 + 60 * np.sin(x / width * 6) * np.cos(y / height * 4) + 40 * (y / height)
    noise = np.random.default_rng(0).normal(0, 4, (height, width))
    return np.clip(body + noise, 0, 255).astype(np.uint8)


def _save(path: Path, im: Image.Image, **kwargs) -> Path:
    im.save(path, **kwargs)
    return path


def _rejects(path: Path, reason: str) -> ImageError:
    with pytest.raises(ImageError) as info:
        read_grayscale(path)
    err = info.value
    assert err.path == path and str(path) in str(err) and reason in err.reason
    assert str(err) == f"{path}: {err.reason}"
    return err


def test_truncated_jpeg(tmp_path):
    whole = io.BytesIO()
    Image.fromarray(_xray_like(256, 256)).save(whole, "JPEG")
    path = tmp_path / "cut.jpeg"
    path.write_bytes(whole.getvalue()[: len(whole.getvalue()) // 2])
    _rejects(path, "truncated or corrupt image data")


def test_empty_file(tmp_path):
    path = tmp_path / "empty.png"
    path.write_bytes(b"")
    _rejects(path, "empty file (0 bytes)")


def test_text_named_jpeg(tmp_path):
    path = tmp_path / "notes.jpeg"
    path.write_text("not an image at all")
    _rejects(path, "not a recognised image")


def test_missing_file(tmp_path):
    _rejects(tmp_path / "gone.png", "cannot read file")


def test_one_pixel_rejected(tmp_path):
    path = _save(tmp_path / "dot.png", Image.new("L", (1, 1), 7))
    _rejects(path, "too small: 1x1 px; need at least 32 px on each side")


def test_png_bomb_rejected_from_header(tmp_path):
    path = tmp_path / "bomb.png"
    path.write_bytes(png_bomb())
    _rejects(
        path,
        "too large: 100000x100000 = 10,000,000,000 pixels exceeds the "
        "decompression-bomb limit of 89,478,485 pixels",
    )


def test_jpeg_bomb_rejected_from_header(tmp_path):
    buf = io.BytesIO()
    Image.new("L", (64, 48), 100).save(buf, "JPEG")
    data = bytearray(buf.getvalue())
    sof = data.index(b"\xff\xc0")
    data[sof + 5 : sof + 9] = struct.pack(">HH", 60_000, 50_000)  # height, width
    path = tmp_path / "bomb.jpg"
    path.write_bytes(bytes(data))
    _rejects(path, "too large: 50000x60000 = 3,000,000,000 pixels")


def test_other_formats_are_refused_unparsed(tmp_path):
    width, height = 20_000, 20_000  # A BMP bomb: no decoder but JPEG's and PNG's is trusted.
    info = struct.pack("<IiiHHIIiiII", 40, width, height, 1, 8, 0, 0, 0, 0, 0, 0)
    head = b"BM" + struct.pack("<IHHI", 14 + 40 + 1024, 0, 0, 14 + 40 + 1024)
    path = tmp_path / "bomb.png"
    path.write_bytes(head + info + bytes(1024))
    _rejects(path, "not a recognised image: not a JPEG, PNG or DICOM file (starts with b'BM")


def test_png_alpha_composited_over_black(tmp_path):
    rgba = np.zeros((40, 40, 4), np.uint8)
    rgba[..., :3] = 200
    rgba[:, :20, 3] = 255  # Opaque half keeps its grey.
    rgba[:, 20:, 3] = 128  # Half-transparent half darkens towards black.
    path = _save(tmp_path / "alpha.png", Image.fromarray(rgba, "RGBA"))
    out = read_grayscale(path)
    assert out.dtype == np.uint8 and out.shape == (40, 40)
    assert (out[:, :20] == 200).all()
    assert np.abs(out[:, 20:].astype(int) - round(200 * 128 / 255)).max() <= 1


def test_sixteen_bit_png_min_max_window(tmp_path):
    ramp = np.tile(np.linspace(0, 4095, 64).round().astype(np.uint16), (32, 1))  # 12-bit data.
    path = _save(tmp_path / "deep.png", Image.fromarray(ramp))
    assert Image.open(path).mode.startswith("I")
    out = read_grayscale(path)
    assert out.dtype == np.uint8 and out.min() == 0 and out.max() == 255
    np.testing.assert_array_equal(out, np.rint(ramp / 4095 * 255).astype(np.uint8))


def test_constant_sixteen_bit_gives_zeros(tmp_path):
    flat = np.full((32, 32), 1000, np.uint16)
    out = read_grayscale(_save(tmp_path / "flat.png", Image.fromarray(flat)))
    assert (out == 0).all()


def test_cmyk_jpeg_converted(tmp_path):
    im = Image.new("CMYK", (64, 64), (0, 0, 0, 0))  # White.
    im.paste((0, 0, 0, 255), (0, 0, 32, 64))  # Black left half.
    path = _save(tmp_path / "cmyk.jpg", im, quality=95)
    out = read_grayscale(path)
    assert out.shape == (64, 64)
    assert out[:, :24].mean() < 20 and out[:, 40:].mean() > 235


def test_grey_rgb_equals_l_exactly(tmp_path):
    grey = _xray_like(48, 40)
    rgb = _save(tmp_path / "rgb.png", Image.fromarray(np.stack([grey] * 3, -1)))
    np.testing.assert_array_equal(read_grayscale(rgb), grey)


def test_shapes_and_dtypes(tmp_path):
    path = _save(tmp_path / "a.png", Image.fromarray(_xray_like(50, 40)))
    native = read_grayscale(path)
    small = read_grayscale(path, size=32)
    assert native.shape == (40, 50) and native.dtype == np.uint8
    assert small.shape == (32, 32, 1) and small.dtype == np.uint8
    assert decode_grayscale(path.read_bytes(), path, size=64).shape == (64, 64, 1)


def test_jpeg_draft_close_to_full_decode(tmp_path, monkeypatch):
    path = _save(tmp_path / "big.jpeg", Image.fromarray(_xray_like(2000, 1600)), quality=90)
    full = Image.fromarray(read_grayscale(path))
    want = np.asarray(full.resize((224, 224), Image.Resampling.BILINEAR), np.float64)
    scales = []
    original = JpegImagePlugin.JpegImageFile.draft

    def spy(self, mode, size):
        result = original(self, mode, size)
        scales.append(self.decoderconfig[0])
        return result

    monkeypatch.setattr(JpegImagePlugin.JpegImageFile, "draft", spy)
    got = read_grayscale(path, size=224)[..., 0].astype(np.float64)
    assert scales == [4]  # min(2000 // 224, 1600 // 224) = 7 -> DCT scale 1/4.
    assert np.abs(got - want).mean() < 3


def test_landscape_squashed_to_square(tmp_path):
    path = _save(tmp_path / "wide.jpg", Image.fromarray(_xray_like(3000, 2000)))
    assert read_grayscale(path, size=128).shape == (128, 128, 1)


def test_exif_orientation_applied(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6  # Rotate 90 degrees clockwise on display.
    path = _save(tmp_path / "rot.jpg", Image.new("L", (64, 40), 90), exif=exif)
    assert read_grayscale(path).shape == (64, 40)


def test_header_parse_matches_pil(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 1
    im = Image.fromarray(_xray_like(70, 50))
    for kwargs in ({}, {"progressive": True}, {"exif": exif}):
        buf = io.BytesIO()
        im.save(buf, "JPEG", **kwargs)
        assert images._header_size(buf.getvalue()) == (70, 50)
    assert images._header_size(b"GIF89a" + bytes(20)) is None


def test_image_error_pickles():
    err = pickle.loads(pickle.dumps(ImageError("a/b.png", "empty file (0 bytes)")))
    assert (err.path, err.reason) == ("a/b.png", "empty file (0 bytes)")
    assert str(err) == "a/b.png: empty file (0 bytes)"


def test_suffixes():
    assert images.IMAGE_SUFFIXES == {".jpeg", ".jpg", ".png", ".dcm"}


def test_resize_matches_decoding_at_size():
    rng = np.random.default_rng(0)
    grey = rng.integers(0, 256, (90, 130), dtype=np.uint8)
    png = io.BytesIO()
    Image.fromarray(grey).save(png, format="PNG")
    decoded = images.decode_grayscale(png.getvalue(), "x.png", size=48)
    np.testing.assert_array_equal(images.resize(grey, 48), decoded)
    np.testing.assert_array_equal(images.resize(grey[:, :, None], 48), decoded)


def _dicom(tmp_path, pixels, photometric, window=None):
    from pydicom.uid import ExplicitVRLittleEndian

    ds = dicom_dataset(*pixels.shape, ExplicitVRLittleEndian, (16, 12), photometric)
    if window:
        ds.WindowCenter, ds.WindowWidth = window
    ds.PixelData = pixels.astype(np.uint16).tobytes()
    path = tmp_path / f"{photometric}.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path


def test_dicom_monochrome1_is_inverted_and_the_window_applied(tmp_path):
    ramp = np.tile(np.linspace(0, 4000, 64).astype(np.uint16), (48, 1))
    mono2 = read_grayscale(_dicom(tmp_path, ramp, "MONOCHROME2"))
    mono1 = read_grayscale(_dicom(tmp_path, ramp, "MONOCHROME1"))
    assert mono2.shape == (48, 64) and mono2[0, 0] == 0 and mono2[0, -1] == 255
    np.testing.assert_array_equal(mono1, 255 - mono2)  # bone bright in both
    windowed = read_grayscale(_dicom(tmp_path / "..", ramp, "MONOCHROME2", window=(1000, 500)))
    assert (windowed[:, ramp[0] < 700] == 0).all() and (windowed[:, ramp[0] > 1300] == 255).all()


def test_a_broken_dicom_names_the_file(tmp_path):
    path = tmp_path / "broken.dcm"
    path.write_bytes(b"\0" * 128 + b"DICM" + b"\x02\x00\x10\x00UI")
    _rejects(path, "unreadable DICOM")
