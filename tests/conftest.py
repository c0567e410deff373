"""Shared fixtures: a tiny prepared synthetic data set, and the real data when present."""

import http.server
import os
import pathlib
import signal
import struct
import threading
import zlib
from collections.abc import Iterator

import pytest

from configs import shallow_cnn
from pneumojax import data, xla_cpu

xla_cpu.set_flags()  # as the entry points do, before JAX's backend starts

# The real Kermany images, where a machine has them: PNEUMOJAX_REAL_DATA=PATH/chest_xray.
REAL_DATA = pathlib.Path(os.environ.get("PNEUMOJAX_REAL_DATA", "PATH/chest_xray"))
needs_real_data = pytest.mark.skipif(
    not (REAL_DATA / "train").is_dir(),
    reason=f"real chest X-rays not found at {REAL_DATA}; set PNEUMOJAX_REAL_DATA=PATH/chest_xray")

SYNTHETIC_COUNT = 64
SYNTHETIC_SIZE = 32


def tiny_config(data_dir, **train_overrides):
    """A ShallowCNN on the session's 32 px synthetic set: seconds per run on a CPU."""
    c = shallow_cnn.get_config()
    c.model.kwargs.width = 4
    c.data.data_dir = str(data_dir)
    c.data.image_size = SYNTHETIC_SIZE
    c.data.synthetic_count = SYNTHETIC_COUNT
    c.data.validation_fraction = 0.25
    c.train.batch_size = 8
    c.train.eval_batch_size = 16
    c.train.epochs = 2.0
    c.train.log_every = 1
    c.train.eval_every = 3
    c.train.patience = 100
    c.train.update(train_overrides)
    return c


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
        crc = struct.pack(">I", zlib.crc32(kind + body))
        return struct.pack(">I", len(body)) + kind + body + crc
    ihdr = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    idat = zlib.compress(b"\x00" * (side + 1))  # one row; the header alone must decide
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat)
            + chunk(b"IEND", b""))


class _Handler(http.server.BaseHTTPRequestHandler):
    """Serves `files` by path, with Range support; `mode` is one of range, no_range, cut, 404."""

    files: dict[str, bytes]
    redirects: dict[str, tuple[str, dict[str, str]]]  # path -> (location, extra headers)
    mode: str
    requests: list[tuple[str, str | None]]
    base: str

    def do_HEAD(self) -> None:
        self.do_GET(body=False)

    def do_GET(self, body: bool = True) -> None:
        self.requests.append((self.path, self.headers.get("Range")))
        if self.path in self.redirects:  # as the Hugging Face hub answers for LFS files
            location, headers = self.redirects[self.path]
            self.send_response(302)
            for k, v in {"Location": location, "Content-Length": "0", **headers}.items():
                self.send_header(k, v)
            self.end_headers()
            return
        payload = self.files.get(self.path)
        if payload is None or self.mode == "404":
            self.send_error(404)
            return
        start, range_header = 0, self.headers.get("Range")
        if range_header and self.mode != "no_range":
            start = int(range_header.removeprefix("bytes=").removesuffix("-"))
            if start >= len(payload):
                self.send_error(416)
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(payload) - 1}/{len(payload)}")
        else:
            self.send_response(200)
        data = payload[start:]
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if body:
            self.wfile.write(data[: len(data) // 2] if self.mode == "cut" else data)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def http_server() -> Iterator[type[_Handler]]:
    """A server on 127.0.0.1 only: downloads are tested without the internet."""
    handler = type("Handler", (_Handler,), {"files": {}, "redirects": {}, "mode": "range",
                                            "requests": []})
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    handler.base = f"http://127.0.0.1:{httpd.server_port}"
    thread = threading.Thread(target=httpd.serve_forever, args=(0.01,), daemon=True)
    thread.start()
    yield handler
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture(scope="session")
def trained(synthetic, tmp_path_factory) -> pathlib.Path:
    """The workdir of a finished tiny DeepCNN run (batch norm and dropout state included)."""
    from pneumojax import training
    workdir = tmp_path_factory.mktemp("trained")
    c = tiny_config(synthetic[0])
    c.model.name = "deep_cnn"
    c.model.kwargs = {"widths": (4, 4, 8, 8), "hidden": 8}
    training.train_and_evaluate(c, workdir)
    return workdir


@pytest.fixture
def no_hang():
    """Fails a test that blocks (as opening a FIFO for reading does) instead of hanging CI."""
    def timeout(signum, frame):
        raise TimeoutError("blocked for 120 s: was a FIFO opened?")
    previous = signal.signal(signal.SIGALRM, timeout)
    signal.alarm(120)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


def dicom_dataset(rows: int, cols: int, syntax: str, bits: tuple[int, int] = (8, 8),
                  photometric: str = "MONOCHROME2"):
    """A digital X-ray DICOM header of rows x cols, (allocated, stored) bits, pixels unset."""
    import pydicom
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"  # digital X-ray
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = syntax
    ds = pydicom.Dataset()
    ds.file_meta = meta
    ds.Rows, ds.Columns = rows, cols
    ds.SamplesPerPixel, ds.BitsAllocated, ds.BitsStored, ds.HighBit = 1, *bits, bits[1] - 1
    ds.PixelRepresentation, ds.PhotometricInterpretation = 0, photometric
    return ds
