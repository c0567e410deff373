"""Hostile weight files through `python -m pneumojax.weights`: each is one line that names the
file, exit status 2, no traceback, and the cache exactly as it was.

Downloads come from a server on 127.0.0.1 only (the `http_server` fixture).
"""

import dataclasses
import hashlib
import io
import os
import pathlib
import pickle
import shutil
from collections.abc import Iterator

import numpy as np
import pytest
import torch

from pneumojax import cli, weights
from pneumojax.weights import resnet
from pneumojax.weights.__main__ import main
from tests.test_weights_convert import _Exploit, torchvision_state_dict

SOURCE = "torchvision-v2"


class Custom:
    """A class torch's safe loader does not know: a pickle holding it is refused."""


def run(argv: list[str], capsys) -> str:
    """The error line of a command that failed as a user's mistake must: status 2, one line
    (after a download's progress bar, if any), no traceback."""
    assert cli.run(main, argv) == 2
    *progress, line = capsys.readouterr().err.rstrip("\n").split("\n")
    assert line.startswith("error: ") and all("B/s" in p for p in progress), progress
    return line


def snapshot(root: pathlib.Path) -> dict[str, bytes]:
    """Every file under root, by relative path, byte for byte."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file()}


def torch_bytes(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def tensors(state_dict: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(np.asarray(v)) for k, v in state_dict.items()}


@pytest.fixture(scope="module")
def state_dict() -> dict[str, np.ndarray]:
    return torchvision_state_dict()


@pytest.fixture(scope="module")
def good_cache(state_dict, tmp_path_factory) -> pathlib.Path:
    """A cache holding a good conversion of torchvision-v2 (made once, copied per test)."""
    root = tmp_path_factory.mktemp("good")
    path = root / "resnet50-11ad3fa6.pth"
    path.write_bytes(torch_bytes(tensors(state_dict)))
    weights.convert_file(path, "resnet50", SOURCE, cache=root / "cache")
    return root / "cache"


@pytest.fixture
def cache(good_cache, tmp_path) -> pathlib.Path:
    return shutil.copytree(good_cache, tmp_path / "cache")


def wrong_files(state_dict: dict[str, np.ndarray]) -> Iterator[tuple[str, bytes, str]]:
    """(name, a .pth file's bytes, what the error must say), one file in memory at a time."""
    yield "random bytes", np.random.default_rng(0).bytes(4096), "refused as unsafe or corrupt"
    zeros = np.zeros((256, 1024, 1, 1), np.float32)
    resnet101 = {**state_dict, **{f"layer3.{b}.conv1.weight": zeros for b in range(6, 23)}}
    yield "resnet101", torch_bytes(tensors(resnet101)), "unexpected: layer3.10.conv1.kernel"
    vgg = {"features.0.weight": np.zeros((64, 3, 3, 3), np.float32)}
    yield "vgg", torch_bytes(tensors(vgg)), "not a ResNet50 state dict entry: 'features.0.weight'"
    ten_classes = {**state_dict, "fc.weight": np.zeros((10, 2048), np.float32),
                   "fc.bias": np.zeros(10, np.float32)}
    yield "ten-class head", torch_bytes(tensors(ten_classes)), "fc.weight is (10, 2048)"
    timm_head = {k.replace("fc.", "head.fc."): v for k, v in state_dict.items()}
    yield "timm head names", torch_bytes(tensors(timm_head)), "entry: 'head.fc.weight'"


@pytest.mark.slow
def test_a_wrong_file_never_replaces_a_good_conversion(cache, state_dict, tmp_path, capsys):
    before = snapshot(cache)
    for name, content, reason in wrong_files(state_dict):
        path = tmp_path / f"{name}.pth"
        path.write_bytes(content)
        err = run(["convert", str(path), "--source", SOURCE, "--cache-dir", str(cache)], capsys)
        assert str(path) in err and reason in err, (name, err)
        assert snapshot(cache) == before, name
    tree, _, _ = weights.load("resnet50", SOURCE, cache=cache)
    np.testing.assert_array_equal(tree["conv1"]["kernel"],
                                  resnet.from_torch(state_dict)["conv1"]["kernel"])


@pytest.fixture
def serve(http_server, monkeypatch):
    """serve(content) -> url: torchvision-v2 now comes from the local server, pinned to the
    digest of `content`, so that only the model check stands between it and the cache."""
    def serve(content: bytes) -> str:
        http_server.files["/resnet50.pth"] = content
        source = dataclasses.replace(weights.SOURCES["resnet50"][SOURCE],
                                     url=f"{http_server.base}/resnet50.pth",
                                     sha256=hashlib.sha256(content).hexdigest())
        monkeypatch.setitem(weights.SOURCES, "resnet50",
                            {**weights.SOURCES["resnet50"], SOURCE: source})
        return source.url
    serve.server = http_server
    return serve


@pytest.mark.slow
def test_a_fetched_wrong_file_never_replaces_a_good_conversion(cache, state_dict, serve,
                                                                capsys):
    before = snapshot(cache / "weights")
    for name, content, reason in wrong_files(state_dict):
        serve(content)
        err = run(["fetch", "resnet50", "--source", SOURCE, "--cache-dir", str(cache)], capsys)
        assert reason in err and "downloads/resnet50-11ad3fa6.pth" in err, (name, err)
        assert snapshot(cache / "weights") == before, name


def test_a_fetch_cut_short_is_resumed_and_never_trusted(tmp_path, state_dict, serve, capsys):
    content = torch_bytes(tensors(state_dict))
    url = serve(content)
    serve.server.mode = "cut"
    argv = ["fetch", "resnet50", "--source", SOURCE, "--cache-dir", str(tmp_path)]
    err = run(argv, capsys)
    assert url in err and "retry to resume" in err
    downloads = tmp_path / "downloads"
    assert [p.name for p in downloads.iterdir()] == ["resnet50-11ad3fa6.pth.partial"]
    assert not weights.is_cached("resnet50", SOURCE, cache=tmp_path)
    serve.server.mode = "range"
    assert cli.run(main, argv) == 0
    assert serve.server.requests[-1][1] == f"bytes={len(content) // 2}-"
    assert (downloads / "resnet50-11ad3fa6.pth").read_bytes() == content
    assert not (downloads / "resnet50-11ad3fa6.pth.partial").exists()


def save_then_stop(self, directory, *args, **kwargs):
    directory.mkdir(parents=True)
    (directory / "half-written").write_bytes(b"\0" * 100)
    raise KeyboardInterrupt


def stop_before_the_new_entry_moves_in(self, target):
    if self.name.endswith(".partial"):  # the old entry is already set aside
        raise KeyboardInterrupt
    return pathlib.Path(os.rename(self, target) or target)


@pytest.mark.parametrize("patch", [(weights.ocp.StandardCheckpointer, "save", save_then_stop),
                                   (pathlib.Path, "rename", stop_before_the_new_entry_moves_in)])
def test_a_conversion_cut_short_leaves_the_old_one_and_no_staging(patch, cache, tmp_path,
                                                                   monkeypatch, state_dict):
    before = snapshot(cache)
    path = tmp_path / "resnet50-11ad3fa6.pth"
    path.write_bytes(torch_bytes(tensors(state_dict)))
    monkeypatch.setattr(*patch)
    with pytest.raises(KeyboardInterrupt):
        weights.convert_file(path, "resnet50", SOURCE, cache=cache)
    assert snapshot(cache) == before
    assert sorted(p.name for p in (cache / "weights").iterdir()) == [f"resnet50-{SOURCE}"]


def cut_in_half(path: pathlib.Path) -> pathlib.Path:
    half = path.with_name("cut-" + path.name)
    content = path.read_bytes()
    half.write_bytes(content[: len(content) // 2])
    return half


def small_pth(path: pathlib.Path, zip_format: bool = True) -> pathlib.Path:
    torch.save({"conv1.weight": torch.ones(64, 3, 7, 7)}, path,
               _use_new_zipfile_serialization=zip_format)
    return path


def small_safetensors(path: pathlib.Path) -> pathlib.Path:
    from safetensors.numpy import save_file
    save_file({"conv1.weight": np.ones((64, 3, 7, 7), np.float32)}, str(path))
    return path


def small_h5(path: pathlib.Path) -> pathlib.Path:
    import h5py
    with h5py.File(path, "w") as f:
        f.create_dataset("conv1_conv/conv1_conv/kernel:0", data=np.ones((7, 7, 3, 64)))
    return path


@pytest.mark.parametrize("make, name, source", [
    (small_pth, "a.pth", SOURCE),
    (lambda p: small_pth(p, zip_format=False), "legacy.pth", SOURCE),
    (small_safetensors, "a.safetensors", "timm-a1"),
    (small_h5, "a.h5", "keras"),
])
def test_a_truncated_file_is_one_line_naming_it(make, name, source, cache, tmp_path, capsys):
    before = snapshot(cache)
    path = cut_in_half(make(tmp_path / name))
    err = run(["convert", str(path), "--model", "resnet50", "--source", source,
               "--cache-dir", str(cache)], capsys)
    assert str(path) in err and "truncated" in err and "download it again" in err
    assert snapshot(cache) == before


def reduce_to_system(path: pathlib.Path, marker: pathlib.Path) -> None:
    torch.save({"conv1.weight": torch.zeros(1), "x": _Exploit(str(marker))}, path)


def custom_class(path: pathlib.Path, marker: pathlib.Path) -> None:
    torch.save({"conv1.weight": torch.zeros(1), "x": Custom()}, path)


def bare_pickle(path: pathlib.Path, marker: pathlib.Path) -> None:
    path.write_bytes(pickle.dumps({"x": _Exploit(str(marker))}))  # not torch.save's format


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")  # torch, on the bare pickle
@pytest.mark.parametrize("make, reason", [
    (reduce_to_system, "refused as unsafe: loading it would import posix.system"),
    (custom_class, "refused as unsafe: loading it would import tests.test_weights_hostile.Custom"),
    (bare_pickle, "refused as unsafe or corrupt"),
])
def test_an_unsafe_pickle_is_refused_without_advice_to_load_it_anyway(
        make, reason, cache, tmp_path, capsys):
    path, marker = tmp_path / "evil.pth", tmp_path / "pwned"
    make(path, marker)
    before = snapshot(cache)
    err = run(["convert", str(path), "--source", SOURCE, "--cache-dir", str(cache)], capsys)
    assert str(path) in err and reason in err
    assert "weights_only" not in err and "False" not in err and "safe_globals" not in err
    assert not marker.exists() and snapshot(cache) == before
    with pytest.raises(pickle.UnpicklingError, match="weights_only"):  # what torch itself says
        torch.load(path, weights_only=True)


@pytest.mark.parametrize("argv, choices", [
    (["fetch", "resnet18", "--source", "keras"], ["resnet50", "xception"]),
    (["fetch", "resnet50", "--source", "imagenet"], list(weights.SOURCES["resnet50"])),
    (["fetch", "xception", "--source", "timm-a1"], ["unknown xception weight source", "keras"]),
    (["convert", "x.pth", "--source", "imagenet"], list(weights.SOURCES["resnet50"])),
    (["convert", "mystery.bin"], [*weights.SOURCES["resnet50"], "--model", "--source"]),
    (["frobnicate"], ["fetch", "convert", "list"]),
])
def test_an_unknown_name_is_one_line_with_the_choices(argv, choices, capsys):
    err = run(argv, capsys)
    assert all(c in err for c in choices), err


def test_an_unknown_source_in_a_config_lists_the_choices():
    with pytest.raises(cli.UserError,
                       match="unknown resnet50 weight source 'imagenet'; choose from keras"):
        weights.load("resnet50", "imagenet")
    with pytest.raises(cli.UserError, match="no ImageNet weights for model 'vgg'.*resnet50"):
        weights.load("vgg", "keras")


@pytest.mark.parametrize("damage", ["source.json", "params"])
def test_a_damaged_cache_entry_says_how_to_remake_it(damage, cache):
    target = cache / "weights" / f"resnet50-{SOURCE}" / damage
    if target.is_dir():
        shutil.rmtree(target)
    else:
        target.write_text("{")
    with pytest.raises(cli.UserError, match=f"damaged.*fetch resnet50 --source {SOURCE}"):
        weights.load("resnet50", SOURCE, cache=cache)
