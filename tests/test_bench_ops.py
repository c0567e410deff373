"""experiments/bench_ops.py, run as the script it is: a tiny run records each of the deep CNN's
convolutions and batch norms, at each block's size, for both frameworks."""

import json
import pathlib
import subprocess
import sys

import pytest
from flax import nnx

from configs import deep_cnn
from pneumojax import models

pytest.importorskip("torch")
SCRIPT = pathlib.Path(__file__).resolve().parents[1] / "experiments" / "bench_ops.py"


@pytest.mark.slow
def test_a_tiny_run_records_every_layer_of_the_deep_cnn_for_both_frameworks(tmp_path):
    out = tmp_path / "ops.json"
    subprocess.run([sys.executable, str(SCRIPT), "--image-size", "16", "--batch", "2",
                    "--repeats", "1", "--out", str(out)], check=True, capture_output=True,
                   timeout=300)
    records = json.loads(out.read_text())
    widths = tuple(deep_cnn.get_config().model.kwargs.widths)
    model = nnx.eval_shape(lambda: models.create("deep_cnn", widths=widths, rngs=nnx.Rngs(0)))
    expected = []  # (op, shape): batch, side, channels in, channels out
    for i, block in enumerate(model.blocks, 1):
        side = 16 // 2 ** (i - 1)
        for j in (1, 2):
            c_in, c_out = getattr(block, f"conv{j}").kernel.shape[2:]
            expected += [(f"block{i}.conv{j}", [2, side, side, c_in, c_out]),
                         (f"block{i}.bn{j}+relu", [2, side, side, c_out, c_out])]
    assert sorted((r["op"], r["shape"], r["framework"]) for r in records) == sorted(
        (op, shape, f) for op, shape in expected for f in ("pneumojax", "pytorch"))
    assert all(r["ms"] > 0 for r in records)
