"""Data parallelism: 4 fake devices, and 2 processes joined by jax.distributed, match 1 device."""

import json
import pathlib
import socket
import subprocess
import sys

import numpy as np
import pytest

from tests.test_resume import ROOT, losses

STEPS_EPOCHS = "0.5"  # 3 steps of batch 8 on the 40-image train split


def run(tmp_path: pathlib.Path, name: str, data_dir, *extra, procs: int = 1) -> pathlib.Path:
    workdir = tmp_path / name
    cmd = lambda *more: [sys.executable, str(ROOT / "tests" / "train_worker.py"), "--workdir",
                         str(workdir), "--data-dir", str(data_dir), "--epochs", STEPS_EPOCHS,
                         *extra, *more]
    if procs == 1:
        subprocess.run(cmd(), cwd=ROOT, check=True, capture_output=True)
        return workdir
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    running = [subprocess.Popen(cmd("--coordinator", f"127.0.0.1:{port}", "--num-processes",
                                    str(procs), "--process-id", str(i)), cwd=ROOT,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
               for i in range(procs)]
    for p in running:
        out, _ = p.communicate(timeout=300)
        assert p.returncode == 0, out[-3000:]
    return workdir


@pytest.mark.slow
def test_four_devices_and_two_hosts_follow_the_one_device_loss(synthetic, tmp_path):
    one = losses(run(tmp_path, "one", synthetic[0]))
    four = losses(run(tmp_path, "four", synthetic[0], "--devices", "4"))
    hosts = losses(run(tmp_path, "hosts", synthetic[0], "--devices", "2", procs=2))
    assert [s for s, _ in one] == [1, 2, 3]
    for other in (four, hosts):
        assert [s for s, _ in other] == [1, 2, 3]
        np.testing.assert_allclose([v for _, v in other], [v for _, v in one], rtol=1e-4)
    config = json.loads((tmp_path / "four" / "config.json").read_text())
    assert config["train"]["batch_size"] == 8
