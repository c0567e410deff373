"""experiments/profile_step.py: a tiny traced step names the compiled HLO's own kernels."""

import json
import pathlib
import sys

import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

from experiments import profile_step


def test_a_tiny_trace_records_the_steps_kernels_by_their_hlo_names(tmp_path):
    out, hlo = tmp_path / "profile.json", tmp_path / "step.hlo"
    profile_step.main(["--model", "deep_cnn", "--image-size", "32", "--batch", "2",
                       "--steps", "2", "--hlo", str(hlo), "--out", str(out)])
    (record,) = json.loads(out.read_text())
    assert record["model"] == "deep_cnn" and record["image_size"] == 32 and record["batch"] == 2
    assert record["step_ms"] > 0 and 0 < record["events_ms"]
    text = hlo.read_text()
    assert "ENTRY" in text
    named = [k for k in record["top"] if f"%{k} = " in text]
    assert named, f"no traced kernel is named in the compiled HLO: {list(record['top'])}"
    assert sum(record["by_kind"].values()) == pytest.approx(
        record["events_ms"], abs=0.05 * len(record["by_kind"]) + 0.1)  # each rounded to 0.1
