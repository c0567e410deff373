"""Hostile images are bounded before decoding: a few kilobytes never become gigabytes.

Each decoder's limits (pixels, aspect ratio, file size, a deflated DICOM's inflated size, the
size of a compressed frame inside a DICOM) are checked from headers; the three inputs an
independent review named are decoded in a fresh process whose peak memory is measured.
"""

import io
import json
import os
import pathlib
import struct
import subprocess
import sys
import zlib

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.uid import DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian, JPEGBaseline8Bit

from pneumojax.data import images
from tests.conftest import dicom_dataset

REPO = pathlib.Path(__file__).resolve().parents[1]
GB = 1 << 30


def _png(width: int, height: int) -> bytes:
    buf = io.BytesIO()
    Image.new("L", (width, height), 7).save(buf, "PNG", optimize=True)
    return buf.getvalue()


def _save(ds: pydicom.Dataset) -> bytes:
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def deflated_dicom_bomb(side: int = 20_000) -> bytes:
    """A deflated DICOM of side x side 8-bit zeros, about 400 KB, built without the pixels."""
    head = _save(dicom_dataset(side, side, DeflatedExplicitVRLittleEndian))
    meta_end = 144 + struct.unpack_from("<I", head, 140)[0]  # (0002,0000) group length
    body = _save(dicom_dataset(side, side, ExplicitVRLittleEndian))
    body = body[144 + struct.unpack_from("<I", body, 140)[0]:]
    deflate = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    out = [head[:meta_end], deflate.compress(body)]
    out.append(deflate.compress(b"\xe0\x7f\x10\x00OB\x00\x00" + struct.pack("<I", side * side)))
    zeros = bytes(1 << 24)
    for _ in range(side * side // len(zeros)):
        out.append(deflate.compress(zeros))
    out.append(deflate.compress(bytes(side * side % len(zeros))) + deflate.flush())
    return b"".join(out)


def dicom_at_the_pixel_limit() -> bytes:
    """A 16-bit DICOM of 9,400 x 9,400 px (just under the limit) with rescale and window: the
    most work a DICOM may ask of pydicom's float64 LUTs."""
    ds = dicom_dataset(9400, 9400, ExplicitVRLittleEndian)
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 12, 11
    ds.RescaleSlope, ds.RescaleIntercept = 1.5, -100
    ds.WindowCenter, ds.WindowWidth = 2000, 3000
    ds.PixelData = np.tile(np.arange(9400, dtype=np.uint16) % 4096, 9400).tobytes()
    return _save(ds)


def _jpeg(width: int, height: int, mode: str = "L") -> bytes:
    buf = io.BytesIO()
    Image.linear_gradient("L").resize((width, height)).convert(mode).save(buf, "JPEG")
    return buf.getvalue()


# Peak memory is the process's VmHWM: getrusage's ru_maxrss starts a child at its parent's
# peak on Linux (kept across exec), which hides what the decoding itself takes.
_MEASURE = """
import json, sys, time
from pneumojax.data import images
def peak():
    status = open("/proc/self/status").read()
    return int(status.split("VmHWM:")[1].split()[0]) * 1024
path, size = sys.argv[1], None if sys.argv[2] == "none" else int(sys.argv[2])
data = open(path, "rb").read()
base, start = peak(), time.perf_counter()
try:
    result = list(images.decode_grayscale(data, path, size=size).shape)
except images.ImageError as e:
    result = e.reason
print(json.dumps(dict(result=result, seconds=time.perf_counter() - start, grew=peak() - base)))
"""


def _measure(path: pathlib.Path, size: int | None) -> dict:
    """Decodes in a fresh process: (shape or rejection, seconds, growth of its peak memory)."""
    run = subprocess.run([sys.executable, "-c", _MEASURE, str(path), str(size).lower()],
                         capture_output=True, text=True, timeout=120, cwd=REPO, check=True)
    return json.loads(run.stdout)


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="needs Linux's /proc")
@pytest.mark.parametrize("make, size, expected", [
    (lambda: _png(80_000, 32), 224, "too elongated: 80000x32 px"),
    (lambda: _png(32, 80_000), None, "too elongated: 32x80000 px"),
    pytest.param(lambda: _jpeg(8000, 8000, "RGB"), None, [8000, 8000], marks=pytest.mark.slow),
    (lambda: _jpeg(8000, 8000, "RGB"), 224, [224, 224, 1]),
    (deflated_dicom_bomb, 224, "deflated DICOM that inflates to more than"),
    pytest.param(dicom_at_the_pixel_limit, 224, [224, 224, 1], marks=pytest.mark.slow),
], ids=["png-80000x32", "png-32x80000", "jpeg-8000", "jpeg-8000-at-224", "dicom-20000-deflated",
        "dicom-9400-16bit"])
def test_named_hostile_images_take_seconds_and_under_2_gb(tmp_path, make, size, expected):
    path = tmp_path / "image"
    path.write_bytes(make())
    got = _measure(path, size)
    if isinstance(expected, str):
        assert expected in got["result"]
    else:
        assert got["result"] == expected
    assert got["seconds"] < 10 and got["grew"] < 2 * GB, got


def test_pixel_count_and_aspect_are_checked_in_that_order():
    with pytest.raises(images.ImageError, match="too large: 200000x1000 = 200,000,000 pixels"):
        images.decode_grayscale(_png_header(200_000, 1000), "x.png")
    with pytest.raises(images.ImageError, match="too elongated: 100x1001 px.*10:1"):
        images.decode_grayscale(_png_header(100, 1001), "x.png")
    assert images.decode_grayscale(_png(32, 320), "x.png").shape == (320, 32)  # 10:1 is allowed


def _png_header(width: int, height: int) -> bytes:
    """A PNG signature and IHDR claiming width x height, nothing after: the header decides."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + struct.pack(">I", 13) + b"IHDR" + ihdr
            + struct.pack(">I", zlib.crc32(b"IHDR" + ihdr)))


def test_a_dicom_header_claiming_a_huge_frame_is_rejected_before_pixel_data_is_read():
    ds = dicom_dataset(20_000, 20_000, ExplicitVRLittleEndian)
    ds.PixelData = bytes(4096)  # the header lies; the decoder is never asked
    with pytest.raises(images.ImageError, match="too large: 20000x20000"):
        images.decode_grayscale(_save(ds), "lie.dcm")


def _jpeg_in_dicom(declared: int, sof: tuple[int, int]) -> bytes:
    """A JPEG-baseline DICOM declaring declared x declared px whose JPEG's SOF says `sof`."""
    jpeg = bytearray(_jpeg(64, 64))
    at = jpeg.index(b"\xff\xc0")
    jpeg[at + 5 : at + 9] = struct.pack(">HH", sof[1], sof[0])  # height, width
    ds = dicom_dataset(declared, declared, JPEGBaseline8Bit)
    ds.PixelData = pydicom.encaps.encapsulate([bytes(jpeg)])
    ds["PixelData"].VR = "OB"
    return _save(ds)


@pytest.mark.parametrize("sof, reason", [
    ((60_000, 50_000), "too large: 60000x50000"),
    ((100, 100), "compressed frame is 100x100 px but the DICOM header says 64x64"),
])
def test_a_compressed_dicom_frame_is_checked_by_its_own_header(sof, reason):
    with pytest.raises(images.ImageError, match=reason):
        images.decode_grayscale(_jpeg_in_dicom(64, sof), "frame.dcm")


def test_a_compressed_dicom_frame_that_tells_the_truth_decodes():
    image, notes = images.decode(_jpeg_in_dicom(64, (64, 64)), "ok.dcm")
    assert image.shape == (64, 64) and notes == []


def test_a_multi_frame_dicom_uses_its_first_frame_and_says_so():
    ds = dicom_dataset(40, 40, ExplicitVRLittleEndian)
    ds.NumberOfFrames = 3
    rows = np.repeat(np.arange(40, dtype=np.uint8)[:, None], 40, axis=1)  # a vertical ramp
    ds.PixelData = np.stack([rows, rows.T, rows.T]).tobytes()  # then two horizontal ones
    image, notes = images.decode(_save(ds), "cine.png")
    assert image.shape == (40, 40) and image[-1, 0] == 255 and image[0, -1] == 0
    assert notes == ["a DICOM file named .png; read as DICOM",
                     "3 frames (DICOM); the first frame is used"]


def test_a_file_over_the_byte_limit_is_not_read(tmp_path):
    path = tmp_path / "huge.png"
    with path.open("wb") as f:
        f.truncate(images.MAX_BYTES + 1)  # sparse: no disk, no memory
    with pytest.raises(images.ImageError, match="too large: .* bytes exceeds the limit"):
        images.read_grayscale(path)


def test_special_files_are_rejected_not_read(tmp_path, no_hang):
    os.mkfifo(tmp_path / "pipe.png")
    (tmp_path / "null.png").symlink_to("/dev/null")
    with pytest.raises(images.ImageError, match=r"a named pipe \(FIFO\), not a regular file"):
        images.read_grayscale(tmp_path / "pipe.png")
    with pytest.raises(images.ImageError, match="a character device, not a regular file"):
        images.read_grayscale(tmp_path / "null.png")
