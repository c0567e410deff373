"""pneumojax.torch_twins, the PyTorch models experiments/bench_train.py races pneumojax's
against, and the benchmark itself as a user runs it."""

import json
import pathlib
import subprocess
import sys

import numpy as np
import pytest
from flax import nnx

from pneumojax import models

torch = pytest.importorskip("torch")
from pneumojax import torch_twins  # noqa: E402  (after the skip: torch is optional)

ROOT = pathlib.Path(__file__).resolve().parents[1]


def tiny(name: str) -> dict:
    return dict(getattr(models.MODELS[name], "TINY_KWARGS", {}))


@pytest.mark.parametrize("name,extra", [*((n, {}) for n in torch_twins.MODELS),
                                        ("resnet50", {"variant": "v1"})])
def test_each_twin_has_pneumojaxs_parameter_count(name, extra):
    kwargs = dict(tiny(name), **extra)
    # Abstract: shapes only, nothing initialised, so the test stays fast.
    ours = models.count_params(nnx.eval_shape(lambda: models.create(name, rngs=nnx.Rngs(0),
                                                                    **kwargs)))
    theirs = sum(p.numel() for p in torch_twins.create(name, **kwargs).parameters())
    assert theirs == ours


@pytest.mark.parametrize("r", [0.0, 10.0])
def test_the_twins_global_pool_is_pneumojaxs(r):
    x = np.random.default_rng(0).normal(size=(2, 5, 7, 3)).astype(np.float32)
    theirs = torch_twins.global_pool(torch.from_numpy(x).permute(0, 3, 1, 2), r)
    np.testing.assert_allclose(theirs.numpy(), models.cnn.global_pool(x, r), rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_bench_train_races_the_trainers_step_against_the_twin(tmp_path):
    out = tmp_path / "bench.json"
    subprocess.run([sys.executable, "experiments/bench_train.py", "--models", "shallow_cnn",
                    "--model-kwargs", json.dumps(tiny("shallow_cnn")), "--image-size", "32",
                    "--batch", "4", "--seconds", "0", "--rounds", "1", "--dtype", "bfloat16",
                    "--out", str(out)], cwd=ROOT, check=True, capture_output=True)
    records = json.loads(out.read_text())
    assert {r["framework"] for r in records} == {"pneumojax", "pytorch"}
    for r in records:  # the trainer's step without augmentation, in bf16, from scratch
        assert r["augment"] is False and r["dtype"] == "bfloat16" and r["images_per_s"] > 0
        assert r["model"] == "shallow_cnn" and r["image_size"] == 32 and r["batch"] == 4
