"""What every experiment records beside its numbers: the device that ran it and the commit."""

from __future__ import annotations

import os
import pathlib
import platform
import subprocess

import jax

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _cpu_model() -> str:
    try:
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    except OSError:  # not Linux
        pass
    return platform.processor() or platform.machine()


def device_name() -> str:
    """The accelerator kind and count, or on a CPU its model and cores: timings mean nothing
    without it, and a CPU's `device_kind` is just "cpu"."""
    devices = jax.devices()
    if jax.default_backend() == "cpu":
        return f"{_cpu_model()}, {os.cpu_count()} cores"
    return f"{len(devices)}x {devices[0].device_kind}"


def commit() -> str:
    """The checkout's commit (12 hex digits), or "unknown" outside a git checkout."""
    try:
        out = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=ROOT,
                             capture_output=True, text=True, check=False)
    except OSError:  # no git
        return "unknown"
    return out.stdout.strip() or "unknown"
