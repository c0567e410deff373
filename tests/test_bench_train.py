"""experiments/bench_train.py: the PyTorch twins match pneumojax's models, both steps run."""

import pathlib
import sys

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip("torch")
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent / "experiments"))

import bench_train
import torch_models

from pneumojax import models

TINY = {
    "shallow_cnn": dict(width=4),
    "deep_cnn": dict(widths=(4, 8, 8, 16), hidden=8),
    "resnet50": dict(width=4, stage_sizes=(1, 2, 1, 1)),
}


@pytest.mark.parametrize("name,kwargs", [
    *TINY.items(), ("resnet50", dict(TINY["resnet50"], variant="v1"))])
def test_torch_models_have_pneumojax_parameter_counts(name, kwargs):
    # Abstract: shapes only, nothing initialised, so the test stays fast.
    ours = models.count_params(nnx.eval_shape(lambda: models.create(name, rngs=nnx.Rngs(0),
                                                                    **kwargs)))
    theirs = sum(p.numel() for p in torch_models.create(name, **kwargs).parameters())
    assert theirs == ours


@pytest.mark.parametrize("r", [0.0, 10.0])
def test_torch_global_pool_is_pneumojaxs(r):
    x = np.random.default_rng(0).normal(size=(2, 5, 7, 3)).astype(np.float32)
    theirs = torch_models.global_pool(torch.from_numpy(x).permute(0, 3, 1, 2), r)
    np.testing.assert_allclose(theirs.numpy(), models.cnn.global_pool(x, r), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("framework", ["pneumojax", "pytorch"])
def test_measure_functions_run_and_return_rates(framework):
    c = bench_train.model_config("shallow_cnn", image_size=32, batch=4,
                                 model_kwargs=TINY["shallow_cnn"])
    step = (bench_train.pneumojax_step(c) if framework == "pneumojax"
            else bench_train.pytorch_step(c, "eager", "cpu"))
    step()
    assert bench_train.rate(step, 4, seconds=0.0, min_steps=2) > 0


def test_pneumojax_step_is_the_trainers_without_augmentation():
    c = bench_train.model_config("shallow_cnn", image_size=32, batch=4, dtype="bfloat16")
    assert c.data.augment.enabled is False and c.model.init == "scratch"
    assert jnp.dtype(c.model.dtype) == jnp.bfloat16
