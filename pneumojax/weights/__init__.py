"""ImageNet ResNet50 weights: the official files, fetched, verified, converted and cached.

The cache (`$PNEUMOJAX_CACHE`, default `~/.cache/pneumojax`) holds the downloaded file under
`downloads/` and its conversion as an orbax checkpoint under `weights/resnet50-<source>/`,
so training never re-converts and never needs torch or h5py once the cache is filled.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import shutil
import urllib.error
import urllib.request

import numpy as np
import orbax.checkpoint as ocp

from pneumojax.data import download


@dataclasses.dataclass(frozen=True)
class Source:
    url: str
    file_name: str
    family: str  # "torch" or "keras": naming and preprocessing of the file
    variant: str  # the ResNet50 topology the weights were trained with
    md5: str | None = None
    sha256: str | None = None  # None: taken from the hub's LFS metadata at download time
    top1: str = ""


SOURCES = {
    "keras": Source(
        "https://storage.googleapis.com/tensorflow/keras-applications/resnet/"
        "resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5",
        "resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5", "keras", "v1",
        md5="4d473c1dd8becc155b73f8504c6f6626", top1="74.9 %"),
    "torchvision-v1": Source(
        "https://download.pytorch.org/models/resnet50-0676ba61.pth", "resnet50-0676ba61.pth",
        "torch", "v1.5", sha256="0676ba61", top1="76.13 %"),
    "torchvision-v2": Source(
        "https://download.pytorch.org/models/resnet50-11ad3fa6.pth", "resnet50-11ad3fa6.pth",
        "torch", "v1.5", sha256="11ad3fa6", top1="80.86 %"),
    "timm-a1": Source(
        "https://huggingface.co/timm/resnet50.a1_in1k/resolve/main/model.safetensors",
        "resnet50.a1_in1k.safetensors", "torch", "v1.5", top1="see card"),
}


def cache_dir(override: str | os.PathLike | None = None) -> pathlib.Path:
    root = override or os.environ.get("PNEUMOJAX_CACHE") or "~/.cache/pneumojax"
    return pathlib.Path(root).expanduser()


def _source(name: str) -> Source:
    if name not in SOURCES:
        raise ValueError(f"unknown weight source {name!r}; choose from {', '.join(SOURCES)}")
    return SOURCES[name]


def _converted_dir(name: str, cache: str | os.PathLike | None) -> pathlib.Path:
    return cache_dir(cache) / "weights" / f"resnet50-{name}"


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args, **kwargs):
        return None


def hub_sha256(url: str, timeout: float = 30.0) -> str:
    """The SHA-256 the Hugging Face hub declares for an LFS file (its X-Linked-Etag header).

    The hub publishes no fixed digest for timm files, so the download is checked against
    the one it declares; pass a digest to `fetch` to pin a known file instead.
    """
    opener = urllib.request.build_opener(_NoRedirect)
    try:
        response = opener.open(urllib.request.Request(url, method="HEAD"), timeout=timeout)
        headers = response.headers
    except urllib.error.HTTPError as e:  # the hub answers 302 with the headers we want
        headers = e.headers
    except (urllib.error.URLError, OSError) as e:
        raise download.DownloadError(f"Could not reach {url}: {e}") from e
    etag = (headers.get("X-Linked-Etag") or "").strip('"')
    if len(etag) != 64:
        raise download.DownloadError(f"{url}: the hub declared no SHA-256 (X-Linked-Etag)")
    return etag


def fetch(name: str, *, cache: str | os.PathLike | None = None, sha256: str | None = None,
          progress: bool = True) -> pathlib.Path:
    """Downloads the official file of source `name`, verifies it, converts and caches it."""
    src = _source(name)
    dest = cache_dir(cache) / "downloads" / src.file_name
    hint = (f"Offline? Download {src.url} yourself, then run "
            f"`python -m pneumojax.weights convert PATH --source {name}`.")
    try:
        digest = sha256 or src.sha256 or (None if src.md5 else hub_sha256(src.url))
    except download.DownloadError as e:
        raise download.DownloadError(f"{e}\n{hint}") from e
    path = download.download(src.url, dest, md5=src.md5, sha256=digest, hint=hint,
                             progress=progress)
    return convert_file(path, name, cache=cache)


def convert_file(path: str | os.PathLike, name: str, *, cache: str | os.PathLike | None = None
            ) -> pathlib.Path:
    """Converts a weight file the user already has into the cache, as source `name`."""
    from pneumojax.weights import convert as conv

    src, path = _source(name), pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    tree = conv.from_keras_h5(path) if src.family == "keras" else conv.from_torch(
        conv.load_state_dict(path))
    out = _converted_dir(name, cache)
    staging = out.with_name(out.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    ckptr = ocp.StandardCheckpointer()
    ckptr.save(staging / "params", _string_keys(tree))
    ckptr.wait_until_finished()
    (staging / "source.json").write_text(json.dumps(dict(
        source=name, file=str(path), variant=src.variant,
        preprocessing=conv.PREPROCESSING[src.family]), indent=1))
    shutil.rmtree(out, ignore_errors=True)
    staging.rename(out)  # a reader never sees a half-written conversion
    return out


def is_cached(name: str, *, cache: str | os.PathLike | None = None) -> bool:
    return (_converted_dir(name, cache) / "source.json").exists()


def load(name: str, *, cache: str | os.PathLike | None = None) -> tuple[dict, dict, str]:
    """(backbone tree, preprocessing, variant) of a cached conversion."""
    _source(name)
    out = _converted_dir(name, cache)
    if not is_cached(name, cache=cache):
        raise FileNotFoundError(
            f"ImageNet weights {name!r} are not in the cache ({out}). Fetch them with:\n"
            f"    python -m pneumojax.weights fetch resnet50 --source {name}")
    meta = json.loads((out / "source.json").read_text())
    tree = ocp.StandardCheckpointer().restore(out / "params")
    preprocessing = {k: tuple(v) for k, v in meta["preprocessing"].items()}  # JSON gave lists
    return _int_keys(tree), preprocessing, meta["variant"]


def _string_keys(tree):
    """nnx lists index by int; orbax wants string keys."""
    if isinstance(tree, dict):
        return {str(k): _string_keys(v) for k, v in tree.items()}
    return np.asarray(tree)


def _int_keys(tree):
    if isinstance(tree, dict):
        return {int(k) if k.isdigit() else k: _int_keys(v) for k, v in tree.items()}
    return np.asarray(tree)
