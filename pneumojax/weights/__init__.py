"""ImageNet weights (ResNet50, Xception): the official files, fetched, verified, converted
and cached.

`SOURCES[model][source]` is each published file. The cache (`$PNEUMOJAX_CACHE`, default
`~/.cache/pneumojax`) holds the downloaded file under `downloads/` and its conversion as an
orbax checkpoint under `weights/<model>-<source>/`, so training never re-converts and never
needs torch or h5py once the cache is filled.

A download keeps its final name only once its checksum matched, and a conversion is written
only after every name and shape fitted the model, to a staging folder swapped in whole. A wrong
or damaged file fails with one line and the cache stays as it was. A download that matched its
checksum but fails the model check stays in `downloads/`: each fetch verifies it again against
the digest in force, so a corrected digest or file replaces it, and no fetch caches its
conversion.
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

from pneumojax.cli import UserError
from pneumojax.data import download
from pneumojax.weights import convert as conv
from pneumojax.weights import resnet, xception


@dataclasses.dataclass(frozen=True)
class Source:
    url: str
    file_name: str
    family: str  # "torch" or "keras": how the file is read
    preprocessing: str  # what the weights expect (convert.PREPROCESSING)
    variant: str | None = None  # the ResNet50 topology the weights were trained with
    md5: str | None = None
    sha256: str | None = None  # None: taken from the hub's LFS metadata at download time
    top1: str = ""


_KERAS_APPS = "https://storage.googleapis.com/tensorflow/keras-applications/"
SOURCES: dict[str, dict[str, Source]] = {
    "resnet50": {
        "keras": Source(
            _KERAS_APPS + "resnet/resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5",
            "resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5", "keras", "caffe", "v1",
            md5="4d473c1dd8becc155b73f8504c6f6626", top1="74.9 %"),
        "torchvision-v1": Source(
            "https://download.pytorch.org/models/resnet50-0676ba61.pth",
            "resnet50-0676ba61.pth", "torch", "torch", "v1.5", sha256="0676ba61",
            top1="76.13 %"),
        "torchvision-v2": Source(
            "https://download.pytorch.org/models/resnet50-11ad3fa6.pth",
            "resnet50-11ad3fa6.pth", "torch", "torch", "v1.5", sha256="11ad3fa6",
            top1="80.86 %"),
        "timm-a1": Source(
            "https://huggingface.co/timm/resnet50.a1_in1k/resolve/main/model.safetensors",
            "resnet50.a1_in1k.safetensors", "torch", "torch", "v1.5", top1="see card"),
    },
    "xception": {
        "keras": Source(
            _KERAS_APPS + "xception/xception_weights_tf_dim_ordering_tf_kernels_notop.h5",
            "xception_weights_tf_dim_ordering_tf_kernels_notop.h5", "keras", "tf",
            md5="b0042744bf5b25fce3cb969f33bebb97", top1="79.0 %"),
    },
}
# Per model and family: file -> backbone tree (`submodel`: a backbone inside a Keras model).
_READERS = {
    ("resnet50", "torch"): lambda path, submodel: resnet.from_torch(conv.load_state_dict(path)),
    ("resnet50", "keras"): resnet.from_keras,
    ("xception", "keras"): xception.from_keras,
}


def cache_dir(override: str | os.PathLike | None = None) -> pathlib.Path:
    root = override or os.environ.get("PNEUMOJAX_CACHE") or "~/.cache/pneumojax"
    return pathlib.Path(root).expanduser()


def source_names() -> list[str]:
    """Every source name of any model, each once, in the order `SOURCES` declares them."""
    return list(dict.fromkeys(name for sources in SOURCES.values() for name in sources))


def source(model: str, name: str) -> Source:
    """`SOURCES[model][name]`, or one line naming the models and sources there are."""
    if model not in SOURCES:
        raise UserError(f"no ImageNet weights for model {model!r}; they exist for "
                        f"{', '.join(SOURCES)}")
    if name not in SOURCES[model]:
        raise UserError(f"unknown {model} weight source {name!r}; choose from "
                        f"{', '.join(SOURCES[model])}")
    return SOURCES[model][name]


def _converted_dir(model: str, name: str, cache: str | os.PathLike | None) -> pathlib.Path:
    return cache_dir(cache) / "weights" / f"{model}-{name}"


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


def fetch(model: str, name: str, *, cache: str | os.PathLike | None = None,
          sha256: str | None = None, progress: bool = True) -> pathlib.Path:
    """Downloads the official file of `model`'s source `name`, verifies it, converts and
    caches it."""
    src = source(model, name)
    dest = cache_dir(cache) / "downloads" / src.file_name
    hint = (f"Offline? Download {src.url} yourself, then run "
            f"`python -m pneumojax.weights convert PATH --model {model} --source {name}`.")
    try:
        digest = sha256 or src.sha256 or (None if src.md5 else hub_sha256(src.url))
    except download.DownloadError as e:
        raise download.DownloadError(f"{e}\n{hint}") from e
    path = download.download(src.url, dest, md5=src.md5, sha256=digest, hint=hint,
                             progress=progress)
    return convert_file(path, model, name, cache=cache)


def convert_file(path: str | os.PathLike, model: str, name: str, *,
                 cache: str | os.PathLike | None = None, submodel: str | None = None
                 ) -> pathlib.Path:
    """Converts a weight file the user already has into the cache, as `model`'s source
    `name`; `submodel` names the backbone inside a bigger saved Keras model.

    The file is read and checked against the model before the cache is touched.
    """
    src, path = source(model, name), pathlib.Path(path)
    tree = _read(path, model, name, src, submodel)
    out = _converted_dir(model, name, cache)
    _write_atomically(out, tree, dict(model=model, source=name, file=str(path),
                                      variant=src.variant,
                                      preprocessing=conv.PREPROCESSING[src.preprocessing]))
    return out


def _read(path: pathlib.Path, model: str, name: str, src: Source, submodel: str | None
          ) -> dict:
    """The backbone tree in `path`, or one line saying why it is not `name`'s weights."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    what = f"{model} {src.variant}" if src.variant else model
    try:
        tree = _READERS[model, src.family](path, submodel)
        conv.check(tree, model, **({"variant": src.variant} if src.variant else {}))
    except conv.WrongWeights as e:
        raise UserError(f"{path}: not the {what} weights that {name} publishes ({e}); "
                        f"convert the file from {src.url}, or pass the --source this one "
                        f"came from ({', '.join(SOURCES[model])})") from e
    return tree


def _write_atomically(out: pathlib.Path, tree: dict, meta: dict) -> None:
    """Writes the conversion beside `out` and swaps it in whole: a reader sees the old entry
    or the new one, and a failure (Ctrl-C included) leaves the old one and no staging files."""
    staging, old = out.with_name(out.name + ".partial"), out.with_name(out.name + ".old")
    for leftover in (staging, old):
        shutil.rmtree(leftover, ignore_errors=True)
    try:
        staging.mkdir(parents=True)
        ckptr = ocp.StandardCheckpointer()
        ckptr.save(staging / "params", _string_keys(tree))
        ckptr.wait_until_finished()
        (staging / "source.json").write_text(json.dumps(meta, indent=1))
        if out.exists():
            out.rename(old)
        staging.rename(out)
    except BaseException:
        if old.exists() and not out.exists():  # stopped between the two renames
            old.rename(out)
        shutil.rmtree(staging, ignore_errors=True)
        raise
    shutil.rmtree(old, ignore_errors=True)


def is_cached(model: str, name: str, *, cache: str | os.PathLike | None = None) -> bool:
    return (_converted_dir(model, name, cache) / "source.json").exists()


def load(model: str, name: str, *, cache: str | os.PathLike | None = None
         ) -> tuple[dict, dict, str | None]:
    """(backbone tree, preprocessing, variant) of a cached conversion."""
    source(model, name)
    out = _converted_dir(model, name, cache)
    if not is_cached(model, name, cache=cache):
        raise FileNotFoundError(
            f"ImageNet weights {model} {name!r} are not in the cache ({out}). Fetch them "
            f"with:\n    python -m pneumojax.weights fetch {model} --source {name}")
    try:
        meta = json.loads((out / "source.json").read_text())
        preprocessing = {k: tuple(v) for k, v in meta["preprocessing"].items()}  # JSON: lists
        tree = ocp.StandardCheckpointer().restore(out / "params")
        return _int_keys(tree), preprocessing, meta["variant"]
    except (OSError, ValueError, KeyError, AttributeError, TypeError) as e:
        raise UserError(f"{out}: the cached conversion is damaged ({type(e).__name__}: {e}); "
                        f"make it again with python -m pneumojax.weights fetch {model} "
                        f"--source {name}") from e


def _string_keys(tree):
    """nnx lists index by int; orbax wants string keys."""
    if isinstance(tree, dict):
        return {str(k): _string_keys(v) for k, v in tree.items()}
    return np.asarray(tree)


def _int_keys(tree):
    if isinstance(tree, dict):
        return {int(k) if k.isdigit() else k: _int_keys(v) for k, v in tree.items()}
    return np.asarray(tree)
