"""TensorBoard event files, through tensorboardX: no TensorFlow needed to write or read them.

    writer = EventWriter(workdir / "tensorboard")
    writer.scalars(step, {"loss": 0.31, "learning_rate": 1e-3}, prefix="train")
    writer.image(step, "gradcam", workdir / "gradcam.png")   # a PNG file or a uint8 array
    writer.close()

then `tensorboard --logdir workdirs`. Only process 0 writes (as only it writes
`metrics.jsonl`); on the other hosts every method does nothing. `read_events` and
`read_scalars` read the files back, for tests and notebooks, with the same library.
"""

from __future__ import annotations

import glob
import os
import struct
from collections.abc import Iterator, Mapping
from typing import Any

import jax
import numpy as np
from PIL import Image


class EventWriter:
    """One run's event files in `logdir` (created if missing); a no-op unless
    `jax.process_index() == 0`. Also a context manager that closes itself."""

    def __init__(self, logdir: str | os.PathLike):
        self.logdir = os.fspath(logdir)
        self._writer = None
        if jax.process_index() == 0:
            from tensorboardX import SummaryWriter  # imported here: hosts > 0 never need it

            # flush_secs: the events reach the disk within seconds, not tensorboardX's 2 minutes.
            self._writer = SummaryWriter(self.logdir, flush_secs=10)

    def scalars(self, step: int, values: Mapping[str, Any], prefix: str = "") -> None:
        """One scalar per number in `values`, tagged `prefix/name`; a nested dict's names join
        with `/`. A None (a metric the data cannot define) is skipped; anything else that is
        not a number (a string, a list) is a TypeError naming it."""
        if self._writer is None:
            return
        for tag, value in _flatten(values, prefix):
            self._writer.add_scalar(tag, value, int(step))

    def image(self, step: int, tag: str, image: str | os.PathLike | np.ndarray) -> None:
        """A PNG file, or a uint8 array (H, W) grey, (H, W, 1), (H, W, 3) RGB or (H, W, 4)
        RGBA, at its own size."""
        if self._writer is None:
            return
        array = _image_array(image)
        self._writer.add_image(tag, array, int(step), dataformats="HW" if array.ndim == 2
                               else "HWC")

    def text(self, step: int, tag: str, text: str) -> None:
        """Markdown text, e.g. the run's resolved config (shown under TensorBoard's Text tab)."""
        if self._writer is not None:
            self._writer.add_text(tag, text, int(step))

    def flush(self) -> None:
        if self._writer is not None:
            self._writer.flush()

    def close(self) -> None:
        """Writes what is pending and closes the file; calling it again does nothing."""
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def __enter__(self) -> EventWriter:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _flatten(values: Mapping[str, Any], prefix: str) -> Iterator[tuple[str, float]]:
    for name, value in values.items():
        tag = f"{prefix}/{name}" if prefix else str(name)
        if isinstance(value, Mapping):
            yield from _flatten(value, tag)
        elif value is not None:
            if isinstance(value, str | bytes) or np.ndim(value) != 0:
                raise TypeError(f"scalar {tag}: {value!r} is not a number")
            yield tag, float(value)


def _image_array(image: str | os.PathLike | np.ndarray) -> np.ndarray:
    if isinstance(image, str | os.PathLike):
        with Image.open(image) as png:
            mode = "L" if png.mode in ("1", "L", "I", "I;16") else (
                "RGBA" if png.mode in ("RGBA", "LA", "PA") or "transparency" in png.info
                else "RGB")
            return np.asarray(png.convert(mode))
    array = np.asarray(image)
    if array.dtype != np.uint8 or not (array.ndim == 2 or (array.ndim == 3
                                                          and array.shape[2] in (1, 3, 4))):
        raise TypeError(f"image: want a PNG path or a uint8 array (H, W) or (H, W, 1|3|4), got "
                        f"{array.dtype} {array.shape}")
    return array


def read_events(logdir: str | os.PathLike) -> Iterator[Any]:
    """The `Event` protos of every event file in `logdir`, file by file in name (time) order,
    each record's CRCs checked (TFRecord framing: length, its CRC, data, its CRC)."""
    from tensorboardX.proto import event_pb2
    from tensorboardX.record_writer import masked_crc32c

    for path in sorted(glob.glob(os.path.join(os.fspath(logdir), "*tfevents*"))):
        with open(path, "rb") as f:
            while header := f.read(12):
                length_bytes, length_crc = header[:8], struct.unpack("<I", header[8:])[0]
                data = f.read(struct.unpack("<Q", length_bytes)[0])
                data_crc = struct.unpack("<I", f.read(4))[0]
                if masked_crc32c(length_bytes) != length_crc or masked_crc32c(data) != data_crc:
                    raise ValueError(f"{path}: corrupt record at byte {f.tell()}")
                event = event_pb2.Event()
                event.ParseFromString(data)
                yield event


def read_scalars(logdir: str | os.PathLike) -> dict[str, list[tuple[int, float]]]:
    """tag -> [(step, value), ...] of every scalar in `logdir`, in the order written."""
    out: dict[str, list[tuple[int, float]]] = {}
    for event in read_events(logdir):
        for value in event.summary.value:
            if value.HasField("simple_value"):
                out.setdefault(value.tag, []).append((event.step, value.simple_value))
    return out
