"""Shared fixtures: a tiny prepared synthetic data set, and the real data when present."""

import os
import pathlib

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
