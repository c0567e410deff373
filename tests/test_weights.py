"""Fetching, converting and caching ImageNet weights, against a server on 127.0.0.1 only."""

import dataclasses
import hashlib
import io
import socket

import numpy as np
import pytest
import torch

from configs import resnet50
from pneumojax import cli, weights
from pneumojax.training import step
from pneumojax.weights.__main__ import main
from pneumojax.weights import convert, resnet
from tests.test_weights_convert import torchvision_state_dict


@pytest.fixture(scope="module")
def pth_bytes() -> bytes:
    buf = io.BytesIO()
    torch.save({k: torch.from_numpy(v) for k, v in torchvision_state_dict().items()}, buf)
    return buf.getvalue()


@pytest.fixture
def local_sources(http_server, pth_bytes, monkeypatch, tmp_path):
    """The official sources, pointed at the local server, with the cache in tmp_path."""
    digest = hashlib.sha256(pth_bytes).hexdigest()
    http_server.files["/resnet50-test.pth"] = pth_bytes
    http_server.files["/cdn/model.safetensors"] = _safetensors_bytes()
    http_server.redirects["/timm/model.safetensors"] = (
        f"{http_server.base}/cdn/model.safetensors",
        {"X-Linked-Etag": f'"{hashlib.sha256(_safetensors_bytes()).hexdigest()}"'})
    sources = dict(weights.SOURCES["resnet50"])
    sources["torchvision-v2"] = dataclasses.replace(
        sources["torchvision-v2"], url=f"{http_server.base}/resnet50-test.pth", sha256=digest[:8])
    sources["timm-a1"] = dataclasses.replace(
        sources["timm-a1"], url=f"{http_server.base}/timm/model.safetensors")
    monkeypatch.setitem(weights.SOURCES, "resnet50", sources)
    monkeypatch.setenv("PNEUMOJAX_CACHE", str(tmp_path / "cache"))
    return http_server


def _safetensors_bytes() -> bytes:
    from safetensors.numpy import save
    return save(torchvision_state_dict(seed=1))


def test_fetch_verifies_converts_and_caches(local_sources, tmp_path, capsys):
    assert cli.run(main, ["fetch", "resnet50", "--source", "torchvision-v2"]) == 0
    assert "imagenet:torchvision-v2" in capsys.readouterr().out
    tree, preprocessing, variant = weights.load("resnet50", "torchvision-v2")
    expected = resnet.from_torch(torchvision_state_dict())
    np.testing.assert_array_equal(tree["layer4"][2]["conv3"]["kernel"],
                                  expected["layer4"][2]["conv3"]["kernel"])
    assert variant == "v1.5" and preprocessing == convert.PREPROCESSING["torch"]
    requests = len(local_sources.requests)
    assert cli.run(main, ["fetch", "resnet50", "--source", "torchvision-v2"]) == 0
    assert len(local_sources.requests) == requests  # the verified download is reused


def test_timm_is_checked_against_the_hubs_declared_sha256(local_sources):
    weights.fetch("resnet50", "timm-a1", progress=False)
    tree, _, _ = weights.load("resnet50", "timm-a1")
    expected = resnet.from_torch(torchvision_state_dict(seed=1))
    np.testing.assert_array_equal(tree["conv1"]["kernel"], expected["conv1"]["kernel"])
    with pytest.raises(weights.download.DownloadError, match="checksum|mismatch|expected"):
        # a pinned digest wins
        weights.fetch("resnet50", "timm-a1", sha256="0" * 64, progress=False)


def test_offline_fetch_names_the_url_and_the_convert_route(monkeypatch, tmp_path, capsys):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    sources = dict(weights.SOURCES["resnet50"])
    sources["keras"] = dataclasses.replace(sources["keras"], url=f"http://127.0.0.1:{port}/k.h5")
    monkeypatch.setitem(weights.SOURCES, "resnet50", sources)
    argv = ["fetch", "resnet50", "--source", "keras", "--cache-dir", str(tmp_path)]
    assert cli.run(main, argv) == 2
    err = capsys.readouterr().err
    assert f"127.0.0.1:{port}/k.h5" in err and "python -m pneumojax.weights convert" in err


def test_convert_a_file_the_user_has(pth_bytes, tmp_path):
    path = tmp_path / "resnet50-11ad3fa6.pth"
    path.write_bytes(pth_bytes)
    assert cli.run(main, ["convert", str(path), "--cache-dir", str(tmp_path / "c")]) == 0
    assert weights.is_cached("resnet50", "torchvision-v2", cache=tmp_path / "c")
    mystery = tmp_path / "mystery.bin"
    assert cli.run(main, ["convert", str(mystery), "--cache-dir", str(tmp_path)]) == 2


@pytest.mark.slow
def test_a_model_initialised_from_imagenet_gets_the_folded_weights(local_sources):
    weights.fetch("resnet50", "torchvision-v2", progress=False)
    c = resnet50.get_config()  # the real ResNet50 shapes, from torchvision's v2 weights
    c.data.image_size = 32
    _, state = step.init_model(c)
    tree, preprocessing, _ = weights.load("resnet50", "torchvision-v2")
    gray, gray_pre = convert.to_grayscale(tree, preprocessing)
    np.testing.assert_allclose(state["params"]["conv1"]["kernel"][...], gray["conv1"]["kernel"])
    np.testing.assert_allclose(state["rest"]["standardize"]["mean"][...], gray_pre["mean"])


@pytest.mark.slow
def test_missing_weights_or_a_wrong_variant_say_what_to_do(monkeypatch, tmp_path):
    monkeypatch.setenv("PNEUMOJAX_CACHE", str(tmp_path))
    c = resnet50.get_config("demo")
    c.model.init = "imagenet:keras"
    with pytest.raises(FileNotFoundError,
                       match="python -m pneumojax.weights fetch resnet50 --source keras"):
        step.init_model(c)
