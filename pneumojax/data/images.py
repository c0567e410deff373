"""The one place an image file becomes a grayscale uint8 array.

Every failure is an `ImageError` naming the file and the reason, so a bad file in a
folder of thousands is found from the message alone. Odd but decodable formats
(alpha, palette, CMYK, 16-bit) are converted rather than rejected, because public
chest X-ray sets mix them; what is odd but usable (a PNG named .jpeg, a second frame)
comes back as a note.

Hostile files are bounded before any pixel is decoded, from what the headers claim: the
file size, the width, height, pixel count and aspect ratio (PNG IHDR, JPEG SOF, DICOM
Rows and Columns and the size of the JPEG or JPEG 2000 frame inside), and the inflated
size of a deflated DICOM. A few kilobytes cannot make a decoder allocate gigabytes.
Only JPEG, PNG and DICOM are opened, so no other decoder's bounds need trusting.
"""

import io
import os
import pathlib
import stat
import struct
import zlib

import numpy as np
import pydicom
from PIL import Image, ImageOps, UnidentifiedImageError
from pydicom.pixels import apply_modality_lut, apply_voi_lut, pixel_array

MIN_SIDE: int = 32
MAX_PIXELS: int = 89_478_485  # PIL's default Image.MAX_IMAGE_PIXELS.
# Longer side over shorter. Radiographs stay within about 4:1 (long-leg films); a strip
# of 80,000 x 32 px is no X-ray, and squashing it to a square would leave nothing.
MAX_ASPECT: int = 10
MAX_BYTES: int = 4 * MAX_PIXELS  # A file, or a deflated DICOM once inflated: 4 B per pixel.
IMAGE_SUFFIXES: frozenset[str] = frozenset({".jpeg", ".jpg", ".png", ".dcm"})

_PIL_FORMATS = ("JPEG", "PNG")  # MPO, a JPEG with more frames, opens through JPEG.
_FORMAT_SUFFIXES = {"JPEG": (".jpeg", ".jpg"), "MPO": (".jpeg", ".jpg"), "PNG": (".png",),
                    "DICOM": (".dcm",)}
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_J2K_SIGNATURE = b"\xff\x4f\xff\x51"  # SOC then SIZ: a JPEG 2000 codestream, as DICOM holds it.
# SOFn markers carry the frame size; C4 (DHT), C8 (JPG) and CC (DAC) share the range. F7 is
# JPEG-LS's SOF55, same layout.
_JPEG_SOF = (frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}) | {0xF7}
_HIGH_BIT_MODES = ("I", "F", "I;16", "I;16B", "I;16L", "I;16N")
_ALPHA_MODES = ("RGBA", "RGBa", "LA", "PA")
_SPECIAL_FILES = ((stat.S_ISFIFO, "a named pipe (FIFO)"), (stat.S_ISSOCK, "a socket"),
                  (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"))
_PIL_ERRORS = (OSError, SyntaxError, ValueError, EOFError, struct.error)


class ImageError(ValueError):
    """An image file that cannot be used, with the file and the reason."""

    def __init__(self, path: str | os.PathLike, reason: str):
        # Both go to args so the error pickles back from grain worker processes.
        super().__init__(path, reason)
        self.path = path
        self.reason = reason

    def __str__(self) -> str:
        return f"{self.path}: {self.reason}"


def special_file(mode: int) -> str | None:
    """What a file of this `st_mode` is when it is not a regular file or a folder, e.g. a FIFO:
    such a file is never opened, since opening a FIFO for reading waits for a writer."""
    return next((kind for test, kind in _SPECIAL_FILES if test(mode)), None)


def read_bytes(path: str | os.PathLike) -> bytes:
    """A regular file's bytes, at most `MAX_BYTES`; anything else is an `ImageError`.

    Opened non-blocking, so a FIFO put in place of a file cannot hang the reader, and checked
    on the open descriptor, so a file swapped after a directory scan is caught too.
    """
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
        with os.fdopen(fd, "rb") as f:
            st = os.fstat(f.fileno())
            if kind := special_file(st.st_mode):
                raise ImageError(path, f"{kind}, not a regular file; not read")
            if st.st_size > MAX_BYTES:
                raise ImageError(path, f"too large: {st.st_size:,} bytes exceeds the limit of "
                                       f"{MAX_BYTES:,} bytes for one image")
            return f.read()
    except OSError as e:
        raise ImageError(path, f"cannot read file ({type(e).__name__}: {e.strerror})") from e


def _header_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) read from a PNG, JPEG or JPEG 2000 header, None if not found.

    PIL's own bomb check fires inside Image.open, before the size is visible to us,
    and its message gives no dimensions; reading the header first lets us reject with
    the full size before PIL builds anything.
    """
    if data.startswith(_PNG_SIGNATURE) and data[12:16] == b"IHDR" and len(data) >= 24:
        return struct.unpack(">II", data[16:24])
    if data.startswith(_J2K_SIGNATURE) and len(data) >= 24:
        xsiz, ysiz, x0, y0 = struct.unpack(">IIII", data[8:24])
        return xsiz - x0, ysiz - y0
    if not data.startswith(b"\xff\xd8"):
        return None
    i = 2
    while i + 9 <= len(data) and data[i] == 0xFF:
        marker = data[i + 1]
        if marker == 0xFF:  # Fill byte before a marker.
            i += 1
        elif 0xD0 <= marker <= 0xD7 or marker == 0x01:  # Markers without a length.
            i += 2
        elif marker in _JPEG_SOF:
            height, width = struct.unpack(">HH", data[i + 5 : i + 9])
            return width, height
        else:
            i += 2 + int.from_bytes(data[i + 2 : i + 4], "big")
    return None


def _check_size(name: str | os.PathLike, width: int, height: int) -> None:
    pixels = width * height
    if pixels > MAX_PIXELS:
        raise ImageError(
            name,
            f"too large: {width}x{height} = {pixels:,} pixels exceeds the "
            f"decompression-bomb limit of {MAX_PIXELS:,} pixels",
        )
    if min(width, height) < MIN_SIDE:
        raise ImageError(
            name, f"too small: {width}x{height} px; need at least {MIN_SIDE} px on each side"
        )
    if max(width, height) > MAX_ASPECT * min(width, height):
        raise ImageError(
            name, f"too elongated: {width}x{height} px, an aspect ratio above the limit of "
                  f"{MAX_ASPECT}:1; not a radiograph"
        )


def _window(im: Image.Image) -> Image.Image:
    """Linear min-max window of a 16/32-bit image to 0..255.

    A fixed shift (>> 8) would turn a 12-bit scan stored in 16 bits (max 4095) into
    0..15, nearly black; stretching each image's own range keeps its contrast whatever
    the bit depth. A constant image has no range and gives zeros.
    """
    return Image.fromarray(_to_uint8(np.array(im, dtype=np.float32)))


def _to_uint8(a: np.ndarray) -> np.ndarray:
    """Float values min-max scaled to uint8, in place in float32: at the pixel limit a float64
    copy per step would need gigabytes. NaN goes to 0, infinities to the ends."""
    a = np.asarray(a, dtype=np.float32)
    finite = np.isfinite(a)
    lo, hi = (a.min(), a.max()) if finite.all() else (
        (a[finite].min(), a[finite].max()) if finite.any() else (0.0, 0.0))
    a -= lo
    a *= 255.0 / (hi - lo) if hi > lo else 0.0
    np.rint(a, out=a)
    np.nan_to_num(a, copy=False, nan=0.0, posinf=255.0, neginf=0.0)
    return np.clip(a, 0, 255, out=a).astype(np.uint8)


def _rgb_to_l(im: Image.Image) -> Image.Image:
    """RGB to L; a grey image stored as RGB keeps its exact values."""
    a = np.asarray(im)
    if (a[..., 0] == a[..., 1]).all() and (a[..., 1] == a[..., 2]).all():
        return im.getchannel("R")
    return im.convert("L")


def _to_l(im: Image.Image) -> Image.Image:
    """Any decoded mode to 8-bit grayscale."""
    if im.mode == "L":
        return im
    if im.mode in _HIGH_BIT_MODES:
        return _window(im)
    if im.mode in _ALPHA_MODES or (im.mode == "P" and "transparency" in im.info):
        # Transparent areas become black: the background of an X-ray, not paper white.
        rgba = im.convert("RGBA")
        black = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        return _rgb_to_l(Image.alpha_composite(black, rgba).convert("RGB"))
    if im.mode == "1":
        return im.convert("L")
    return _rgb_to_l(im.convert("RGB"))  # RGB, CMYK, P, YCbCr, ...


def _notes(name: str | os.PathLike, fmt: str, frames: int) -> list[str]:
    """What a report should say about a usable file: a suffix that names another format, and
    which frame of several is used."""
    notes = []
    suffix = pathlib.PurePath(os.fspath(name)).suffix.lower()
    if suffix in IMAGE_SUFFIXES and suffix not in _FORMAT_SUFFIXES[fmt]:
        notes.append(f"a {fmt} file named {suffix}; read as {fmt}")
    if frames > 1:
        notes.append(f"{frames} frames ({fmt}); the first frame is used")
    return notes


def decode(data: bytes, name: str | os.PathLike, *, size: int | None = None
           ) -> tuple[np.ndarray, list[str]]:
    """Decode bytes -> (uint8 image, notes). size=None: (H, W) at native resolution. size=N:
    (N, N, 1), resized. The notes say what was odd but usable (see `_notes`).

    Resizing squashes to N x N, ignoring aspect ratio: the public Kermany train images
    were already squashed to 224 x 224 by a third party, so originals must be treated
    the same way or train and test differ. `name` is used in messages and for its suffix.
    """
    if size is not None and size < 1:
        raise ValueError(f"size must be a positive int or None, got {size}")
    if not data:
        raise ImageError(name, "empty file (0 bytes)")
    if _is_dicom(data):
        image, frames = _dicom_to_uint8(data, name)
        image = image if size is None else _squash(Image.fromarray(image), size)
        return image, _notes(name, "DICOM", frames)
    if (header := _header_size(data)) is not None:
        _check_size(name, *header)
    im = _open(data, name)
    _check_size(name, *im.size)  # Still before decoding: open reads the header only.
    notes = _notes(name, im.format, getattr(im, "n_frames", 1))
    if size is not None:
        # JPEG only: decode at 1/2, 1/4 or 1/8 DCT scale, still >= size on both sides;
        # several times faster for 2000 px originals. A no-op for other formats.
        im.draft("L", (size, size))
    try:
        im.load()  # First frame only; truncated data raises (LOAD_TRUNCATED_IMAGES off).
        im = ImageOps.exif_transpose(im)
    except _PIL_ERRORS as e:
        raise ImageError(name, f"truncated or corrupt image data ({type(e).__name__}: {e})") from e
    try:
        im = _to_l(im)
    except ValueError as e:  # A mode PIL decodes but cannot convert, e.g. LAB.
        raise ImageError(name, f"cannot convert mode {im.mode} to grayscale ({e})") from e
    return (np.array(im, dtype=np.uint8) if size is None else _squash(im, size)), notes


def _open(data: bytes, name: str | os.PathLike) -> Image.Image:
    """PIL's lazy open of a JPEG or PNG: the header is parsed, no pixel decoded."""
    try:
        return Image.open(io.BytesIO(data), formats=_PIL_FORMATS)
    except Image.DecompressionBombError as e:  # A size our header parse missed.
        raise ImageError(
            name, f"too large: exceeds the decompression-bomb limit of {MAX_PIXELS:,} pixels ({e})"
        ) from e
    except UnidentifiedImageError as e:
        raise ImageError(name, "not a recognised image: not a JPEG, PNG or DICOM file "
                               f"(starts with {data[:16]!r})") from e
    except _PIL_ERRORS as e:
        raise ImageError(name, f"not a recognised image ({type(e).__name__}: {e})") from e


def decode_grayscale(
    data: bytes, name: str | os.PathLike, *, size: int | None = None
) -> np.ndarray:
    """`decode` without its notes: the image alone."""
    return decode(data, name, size=size)[0]


def _is_dicom(data: bytes) -> bool:
    return data[128:132] == b"DICM"  # the Part 10 preamble is 128 bytes, then the magic


def _dicom_to_uint8(data: bytes, name: str | os.PathLike) -> tuple[np.ndarray, int]:
    """(first frame, number of frames) of a DICOM as a radiologist sees it: modality and VOI
    LUT (or window) applied, MONOCHROME1 inverted so bone is bright, then the displayed range
    mapped to 0..255."""
    try:
        ds = _dicom_dataset(data, name)
        frames = int(ds.get("NumberOfFrames") or 1)
        _check_size(name, int(ds.Columns), int(ds.Rows))
        if ds.file_meta.TransferSyntaxUID.is_encapsulated:
            _check_frame(name, pydicom.encaps.get_frame(ds.PixelData, 0, number_of_frames=frames),
                         (int(ds.Columns), int(ds.Rows)))
        pixels = pixel_array(ds, index=0)  # decodes the first frame only
        if pixels.ndim != 2:
            raise ImageError(name, f"DICOM pixel data of shape {pixels.shape}; "
                                   "expected grayscale frames")
        values = _displayed(pixels, ds)
    except ImageError:
        raise
    except Exception as e:  # pydicom raises many types for broken files
        raise ImageError(name, f"unreadable DICOM ({type(e).__name__}: {e})") from e
    scaled = _to_uint8(values)
    if ds.get("PhotometricInterpretation") == "MONOCHROME1":
        np.subtract(255, scaled, out=scaled)
    return scaled, frames


def _displayed(pixels: np.ndarray, ds: pydicom.Dataset, rows: int = 256) -> np.ndarray:
    """Modality then VOI LUT, as float32, a block of rows at a time: pydicom computes them in
    float64 with temporaries, 2.4 GB for one frame at the pixel limit if done whole. Both LUTs
    act on each pixel alone, so blocks give the same values."""
    out = np.empty(pixels.shape, np.float32)
    for start in range(0, len(pixels), rows):
        out[start:start + rows] = apply_voi_lut(apply_modality_lut(pixels[start:start + rows],
                                                                   ds), ds)
    return out


def _dicom_dataset(data: bytes, name: str | os.PathLike) -> pydicom.FileDataset:
    """The parsed data set, its pixel data still encoded. A deflated one is inflated once,
    with its output counted and capped, before pydicom inflates it without a limit."""
    fp = io.BytesIO(data)
    pydicom.filereader.read_preamble(fp, False)
    meta = pydicom.filereader.read_dataset(fp, is_implicit_VR=False, is_little_endian=True,
                                           stop_when=lambda tag, vr, length: tag.group != 2)
    if meta.get("TransferSyntaxUID") == pydicom.uid.DeflatedExplicitVRLittleEndian:
        inflater, rest, total = zlib.decompressobj(-zlib.MAX_WBITS), data[fp.tell():], 0
        while rest and total <= MAX_BYTES:
            total += len(inflater.decompress(rest, 1 << 24))
            rest = inflater.unconsumed_tail
        if total > MAX_BYTES:
            raise ImageError(name, f"too large: a deflated DICOM that inflates to more than "
                                   f"{MAX_BYTES:,} bytes, the limit for one image")
    return pydicom.dcmread(io.BytesIO(data))


def _check_frame(name: str | os.PathLike, frame: bytes, declared: tuple[int, int]) -> None:
    """The JPEG or JPEG 2000 frame's own size, which its decoder follows, not the DICOM's."""
    size = _header_size(frame)
    if size is None:
        return  # RLE and others: their decoders write into the Rows x Columns buffer.
    _check_size(name, *size)
    if size != declared:
        raise ImageError(name, f"its compressed frame is {size[0]}x{size[1]} px but the DICOM "
                               f"header says {declared[0]}x{declared[1]}")


def _squash(im: Image.Image, size: int) -> np.ndarray:
    im = im.resize((size, size), Image.Resampling.BILINEAR, reducing_gap=3.0)
    return np.array(im, dtype=np.uint8)[:, :, None]


def resize(image: np.ndarray, size: int) -> np.ndarray:
    """uint8 (H, W) or (H, W, 1) -> (size, size, 1), squashed exactly as decoding does."""
    return _squash(Image.fromarray(np.asarray(image, np.uint8).reshape(image.shape[:2])), size)


def read(path: str | os.PathLike, *, size: int | None = None) -> tuple[np.ndarray, list[str]]:
    """Read a file (see `read_bytes`) and decode it with `decode`: (image, notes)."""
    return decode(read_bytes(path), path, size=size)


def read_grayscale(path: str | os.PathLike, *, size: int | None = None) -> np.ndarray:
    """`read` without its notes: the image alone."""
    return read(path, size=size)[0]
