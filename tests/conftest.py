"""Shared fixtures: a tiny prepared synthetic data set, and the real data when present."""

import os
import pathlib
import struct
import zlib

import pytest

from pneumojax import data

# The real Kermany images sit next to the project root on development machines and in CI only.
REAL_DATA = pathlib.Path(os.environ.get(
    "PNEUMOJAX_REAL_DATA",
    pathlib.Path(__file__).resolve().parents[1].parent / "shared" / "data" / "chest_xray"))
needs_real_data = pytest.mark.skipif(
    not (REAL_DATA / "train").is_dir(),
    reason=f"real chest X-rays not found at {REAL_DATA} (set PNEUMOJAX_REAL_DATA)")

SYNTHETIC_COUNT = 64
SYNTHETIC_SIZE = 32


@pytest.fixture(scope="session")
def synthetic(tmp_path_factory) -> tuple[pathlib.Path, str]:
    """(data_dir, config name) of a 32 px synthetic set: 64 train+validation, 16 test."""
    data_dir = tmp_path_factory.mktemp("tfds")
    report = data.prepare("synthetic", data_dir=data_dir, image_size=SYNTHETIC_SIZE,
                          synthetic_count=SYNTHETIC_COUNT, validation_fraction=0.25)
    return data_dir, report["name"]


def png_bomb(side: int = 100_000) -> bytes:
    """A PNG whose header claims side x side pixels, built without allocating them."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    ihdr = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    idat = zlib.compress(b"\x00" * (side + 1))  # one row; the header alone must decide
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat)
            + chunk(b"IEND", b""))
