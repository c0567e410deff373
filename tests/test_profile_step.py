"""pneumojax.profiling, and experiments/profile_step.py, which applies it to the trainer's step:
a tiny traced step names the compiled HLO's own kernels; the largest batch that fits."""

import json
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest

from pneumojax import profiling

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_a_tiny_trace_records_the_steps_kernels_by_their_hlo_names(tmp_path):
    out, hlo = tmp_path / "profile.json", tmp_path / "step.hlo"
    proc = subprocess.run(
        [sys.executable, "experiments/profile_step.py", "--model", "deep_cnn", "--image-size",
         "32", "--batch", "2", "--steps", "2", "--hlo", str(hlo), "--out", str(out)],
        cwd=ROOT, env=dict(os.environ), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (record,) = json.loads(out.read_text())
    assert record["model"] == "deep_cnn" and record["image_size"] == 32 and record["batch"] == 2
    assert record["step_ms"] > 0 and 0 < record["events_ms"]
    text = hlo.read_text()
    assert "ENTRY" in text
    named = [k for k in record["top"] if f"%{k} = " in text]
    assert named, f"no traced kernel is named in the compiled HLO: {list(record['top'])}"
    assert sum(record["by_kind"].values()) == pytest.approx(
        record["events_ms"], abs=0.05 * len(record["by_kind"]) + 0.1)  # each rounded to 0.1


HLO = """HloModule jit_step

%fused_conv (p: f32[2]) -> f32[2] {
  %p = f32[2]{0} parameter(0)
  ROOT %convolution.1 = f32[2]{0} convolution(%p,%p), metadata={op_name="jvp(conv_general_dilated)"}
}

%fused_norm (p.1: f32[2]) -> f32[1] {
  %p.1 = f32[2]{0} parameter(0)
  ROOT %reduce.2 = f32[1]{0} reduce(%p.1), metadata={op_name="transpose(jvp(batch_norm))/add"}
}

ENTRY %main (a: f32[2]) -> f32[1] {
  %a = f32[2]{0} parameter(0)
  %input_fusion = f32[2]{0} fusion(%a), calls=%f, metadata={op_name="jit(augment_batch)/convert"}
  %conv_fusion.3 = f32[2]{0} fusion(%input_fusion), kind=kCustom, calls=%fused_conv
  %copy.4 = f32[2]{0} copy(%conv_fusion.3)
  %adam_fusion = f32[2]{0} fusion(%a), kind=kLoop, calls=%f, metadata={op_name="optimizer/mul"}
  %relu_fusion = f32[2]{0} fusion(%copy.4), kind=kLoop, calls=%f, metadata={op_name="max"}
  ROOT %norm_fusion = f32[1]{0} fusion(%relu_fusion), kind=kInput, calls=%fused_norm
}
"""


def test_kernels_are_sorted_by_the_name_stack_of_what_they_fuse():
    categories = profiling.hlo_categories(HLO)
    assert categories["convolution.1"] == "convolution"  # inside a fusion too
    assert {k: v for k, v in categories.items() if "_" in k or k.startswith("copy")} == {
        "input_fusion": "input", "conv_fusion.3": "convolution", "copy.4": "layout",
        "adam_fusion": "optimizer", "relu_fusion": "elementwise", "norm_fusion": "batch_norm"}


def test_the_largest_batch_is_the_line_through_two_probes_confirmed_by_running():
    fixed, per_image = 1000, 100
    step_bytes = lambda batch: fixed + per_image * batch
    found = profiling.largest_batch(step_bytes, cap=4096, limit=10_000)
    assert found["predicted"] == (9000 - fixed) // per_image == 80
    assert found["batch"] == 80 and found["bytes_per_image"] == per_image
    assert profiling.largest_batch(step_bytes, cap=64, limit=10_000)["batch"] == 64
    tried = []

    def make(batch):
        tried.append(batch)
        if batch > 20:
            raise RuntimeError("RESOURCE_EXHAUSTED: Out of memory allocating 123 bytes")
        return lambda: None

    assert profiling.fit(make, 80)[1] == 20 and tried == [80, 40, 20]
    with pytest.raises(ValueError):  # anything but running out of memory is not swallowed
        profiling.fit(lambda b: (_ for _ in ()).throw(ValueError("shape")), 8)


def test_step_bytes_grows_with_the_batch_on_this_device():
    step = jax.jit(lambda w, x: jnp.tanh(x @ w))
    w = jnp.ones((256, 256))
    small = profiling.step_bytes(step, w, jnp.ones((8, 256)))
    assert profiling.step_bytes(step, w, jnp.ones((128, 256))) > small > w.nbytes
    assert 0 < profiling.memory_limit()
