"""The one place an image file becomes a grayscale uint8 array.

Every failure is an `ImageError` naming the file and the reason, so a bad file in a
folder of thousands is found from the message alone. Odd but decodable formats
(alpha, palette, CMYK, 16-bit) are converted rather than rejected, because public
chest X-ray sets mix them.
"""

import io
import os
import struct
import warnings

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

MIN_SIDE: int = 32
MAX_PIXELS: int = 89_478_485  # PIL's default Image.MAX_IMAGE_PIXELS.
IMAGE_SUFFIXES: frozenset[str] = frozenset({".jpeg", ".jpg", ".png", ".dcm"})

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# SOFn markers carry the frame size; C4 (DHT), C8 (JPG) and CC (DAC) share the range.
_JPEG_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
_HIGH_BIT_MODES = ("I", "F", "I;16", "I;16B", "I;16L", "I;16N")
_ALPHA_MODES = ("RGBA", "RGBa", "LA", "PA")


class ImageError(ValueError):
    """An image file that cannot be used, with the file and the reason."""

    def __init__(self, path: str | os.PathLike, reason: str):
        # Both go to args so the error pickles back from grain worker processes.
        super().__init__(path, reason)
        self.path = path
        self.reason = reason

    def __str__(self) -> str:
        return f"{self.path}: {self.reason}"


def _header_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) read from a PNG or JPEG header, None if not found.

    PIL's own bomb check fires inside Image.open, before the size is visible to us,
    and its message gives no dimensions; reading the header first lets us reject with
    the full size before PIL builds anything.
    """
    if data.startswith(_PNG_SIGNATURE) and data[12:16] == b"IHDR" and len(data) >= 24:
        return struct.unpack(">II", data[16:24])
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


def _window(im: Image.Image) -> Image.Image:
    """Linear min-max window of a 16/32-bit image to 0..255.

    A fixed shift (>> 8) would turn a 12-bit scan stored in 16 bits (max 4095) into
    0..15, nearly black; stretching each image's own range keeps its contrast whatever
    the bit depth. A constant image has no range and gives zeros.
    """
    a = np.asarray(im, dtype=np.float64)
    finite = a[np.isfinite(a)]
    lo, hi = (finite.min(), finite.max()) if finite.size else (0.0, 0.0)
    scaled = (a - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(a)
    out = np.nan_to_num(np.rint(scaled), nan=0.0, posinf=255.0, neginf=0.0)
    return Image.fromarray(np.clip(out, 0, 255).astype(np.uint8))


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


def decode_grayscale(
    data: bytes, name: str | os.PathLike, *, size: int | None = None
) -> np.ndarray:
    """Decode bytes -> uint8. size=None: (H, W) at native resolution. size=N: (N, N, 1), resized.

    Resizing squashes to N x N, ignoring aspect ratio: the public Kermany train images
    were already squashed to 224 x 224 by a third party, so originals must be treated
    the same way or train and test differ. `name` is used only in error messages.
    """
    if size is not None and size < 1:
        raise ValueError(f"size must be a positive int or None, got {size}")
    if not data:
        raise ImageError(name, "empty file (0 bytes)")
    if _is_dicom(data):
        image = _dicom_to_uint8(data, name)
        return image if size is None else _squash(Image.fromarray(image), size)
    header = _header_size(data)
    if header is not None and header[0] * header[1] > MAX_PIXELS:
        _check_size(name, *header)  # Only the bomb limit; PIL's parsed size decides the rest.
    try:
        # Not thread-safe on Python < 3.14 (global filters), but only bombs are affected.
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageError(
            name, f"too large: exceeds the decompression-bomb limit of {MAX_PIXELS:,} pixels ({e})"
        ) from e
    except UnidentifiedImageError as e:
        raise ImageError(name, f"not a recognised image (starts with {data[:16]!r})") from e
    except (OSError, SyntaxError, ValueError, EOFError, struct.error) as e:
        raise ImageError(name, f"not a recognised image ({type(e).__name__}: {e})") from e
    _check_size(name, *im.size)
    if size is not None:
        # JPEG only: decode at 1/2, 1/4 or 1/8 DCT scale, still >= size on both sides;
        # several times faster for 2000 px originals. A no-op for other formats.
        im.draft("L", (size, size))
    try:
        im.load()  # First frame only; truncated data raises (LOAD_TRUNCATED_IMAGES off).
        im = ImageOps.exif_transpose(im)
    except (OSError, SyntaxError, ValueError, EOFError, struct.error) as e:
        raise ImageError(name, f"truncated or corrupt image data ({type(e).__name__}: {e})") from e
    try:
        im = _to_l(im)
    except ValueError as e:  # A mode PIL decodes but cannot convert, e.g. LAB.
        raise ImageError(name, f"cannot convert mode {im.mode} to grayscale ({e})") from e
    return np.array(im, dtype=np.uint8) if size is None else _squash(im, size)


def _is_dicom(data: bytes) -> bool:
    return data[128:132] == b"DICM"  # the Part 10 preamble is 128 bytes, then the magic


def _dicom_to_uint8(data: bytes, name: str | os.PathLike) -> np.ndarray:
    """DICOM as a radiologist sees it: modality and VOI LUT (or window) applied, MONOCHROME1
    inverted so bone is bright, then the displayed range mapped to 0..255."""
    try:
        import pydicom
        from pydicom.pixels import apply_modality_lut, apply_voi_lut
    except ImportError as e:
        raise ImageError(name, "DICOM needs pydicom: pip install pydicom") from e
    try:
        ds = pydicom.dcmread(io.BytesIO(data))
        pixels = ds.pixel_array
    except Exception as e:  # pydicom raises many types for broken files
        raise ImageError(name, f"unreadable DICOM ({type(e).__name__}: {e})") from e
    if pixels.ndim != 2:
        raise ImageError(name, f"DICOM pixel data of shape {pixels.shape}; expected one 2-D frame")
    _check_size(name, pixels.shape[1], pixels.shape[0])
    values = apply_voi_lut(apply_modality_lut(pixels, ds), ds).astype(np.float64)
    lo, hi = values.min(), values.max()
    scaled = (values - lo) / (hi - lo) if hi > lo else np.zeros_like(values)
    if ds.get("PhotometricInterpretation") == "MONOCHROME1":
        scaled = 1.0 - scaled
    return np.rint(scaled * 255).astype(np.uint8)


def _squash(im: Image.Image, size: int) -> np.ndarray:
    im = im.resize((size, size), Image.Resampling.BILINEAR, reducing_gap=3.0)
    return np.array(im, dtype=np.uint8)[:, :, None]


def resize(image: np.ndarray, size: int) -> np.ndarray:
    """uint8 (H, W) or (H, W, 1) -> (size, size, 1), squashed exactly as decoding does."""
    return _squash(Image.fromarray(np.asarray(image, np.uint8).reshape(image.shape[:2])), size)


def read_grayscale(path: str | os.PathLike, *, size: int | None = None) -> np.ndarray:
    """Read a file and decode it with `decode_grayscale`."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise ImageError(path, f"cannot read file ({type(e).__name__}: {e.strerror})") from e
    return decode_grayscale(data, path, size=size)
