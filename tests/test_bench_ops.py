"""experiments/bench_ops.py: its layer list is the deep CNN's, and a tiny run records both."""

import json
import pathlib
import sys

import pytest
from flax import nnx

pytest.importorskip("torch")
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

from configs import deep_cnn
from experiments import bench_ops
from pneumojax import models


def test_layers_are_the_deep_cnns_convolutions_and_batch_norms():
    widths = tuple(deep_cnn.get_config().model.kwargs.widths)
    model = nnx.eval_shape(lambda: models.create("deep_cnn", widths=widths, rngs=nnx.Rngs(0)))
    kernels = [(f"block{i}.conv{j}", getattr(block, f"conv{j}").kernel.shape[2:])
               for i, block in enumerate(model.blocks, 1) for j in (1, 2)]
    layers = bench_ops.layers(128, widths)
    assert [(op, (c_in, c_out)) for op, _, c_in, c_out in layers if "conv" in op] == kernels
    assert [side for op, side, _, _ in layers if op.endswith("conv1")] == [128, 64, 32, 16]
    assert all(c_in == c_out for op, _, c_in, c_out in layers if "bn" in op)


@pytest.mark.slow
def test_a_tiny_run_records_every_op_for_both_frameworks(tmp_path):
    out = tmp_path / "ops.json"
    bench_ops.main(["--image-size", "16", "--batch", "2", "--repeats", "1", "--out", str(out)])
    records = json.loads(out.read_text())
    ops = [op for op, *_ in bench_ops.layers(16, deep_cnn.get_config().model.kwargs.widths)]
    assert sorted((r["op"], r["framework"]) for r in records) == sorted(
        (op, f) for op in ops for f in ("pneumojax", "pytorch"))
    assert all(r["ms"] > 0 and r["shape"][0] == 2 for r in records)
