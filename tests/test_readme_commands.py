"""Every command README.md gives runs as written, with its defaults, at small sizes.

Each command in the README's bash blocks must match one rule below: either how to run it here
(PATH and the other placeholders become a small folder of phantoms in the Kaggle layout, and
only what the command lets a user shrink is shrunk: counts, epochs, seconds, where output goes)
and what must come out, or why CI cannot run it and which test covers it instead. A command
added to the README without a rule fails `test_every_readme_command_has_a_rule`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Callable

import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def readme_commands() -> list[str]:
    """The commands of README.md's bash blocks, continuation lines joined, comments dropped."""
    text = (ROOT / "README.md").read_text()
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = re.split(r"\s#\s", line)[0].strip()
            if line:
                commands.append(" ".join(line.split()))
    return commands


@dataclasses.dataclass(frozen=True)
class Rule:
    pattern: str                      # matched against the whole command
    extra: tuple[str, ...] = ()       # appended: only sizes, seconds and output places
    expect: int = 0                   # exit status
    says: str = ""                    # in the output
    not_run: str = ""                 # why CI does not run it, and what covers it


# {tmp}: the test's folder; PATH/chest_xray: phantoms there; workdirs/ and DIR: its own workdirs.
RULES = [
    Rule(r"python -m pip install .*", not_run="installation: .ci/run does it"),
    Rule(r"python -m pytest", not_run="this very suite"),
    Rule(r"srun python -m pneumojax\.main .*", not_run="a SLURM cluster; tests/test_distributed.py"
         " runs two hosts on this machine"),
    Rule(r"python -m pneumojax\.main .*--coordinator_address=host0:1234 .*",
         not_run="a cluster of 4 hosts; tests/test_distributed.py runs two on this machine"),
    Rule(r"python -m pneumojax\.main --config configs/resnet50\.py:demo",
         ("--config.data.synthetic_count=48", "--config.train.epochs=1",
          "--config.data.data_dir={tmp}/tfds", "--workdir={tmp}/workdirs/demo"),
         says="workdir: "),
    Rule(r"python -m pneumojax\.main --config configs/deep_cnn\.py:cpu .*",
         ("--config.train.epochs=1", "--config.data.data_dir={tmp}/tfds"), says="workdir: "),
    Rule(r"python -m pneumojax\.main --config configs/resnet50\.py "
         r"--config\.data\.source=folder:PATH/chest_xray",
         ("--config.data.data_dir={tmp}/tfds", "--workdir={tmp}/workdirs/imagenet",
          "--config.train.batch_size=8"),
         expect=2, says="python -m pneumojax.weights fetch resnet50 --source torchvision-v2"),
    Rule(r"python -m pneumojax\.weights fetch .*",
         not_run="downloads; tests/test_weights.py fetches from a server on 127.0.0.1"),
    Rule(r"python -m pneumojax\.weights convert .*",
         not_run="needs the published file; tests/test_weights.py converts one of random weights"),
    Rule(r"python -m pneumojax\.weights list", says="cache"),
    Rule(r"python -m pneumojax\.evaluate .*", ("--n-boot=20",), says="accuracy"),
    Rule(r"python -m pneumojax\.predict .*", says="probability"),
    Rule(r"python -m pneumojax\.data prepare --source synthetic",
         ("--synthetic-count=16", "--data-dir={tmp}/tfds"), says="synthetic-224px"),
    Rule(r"python -m pneumojax\.data prepare --source folder:\S+",
         ("--data-dir={tmp}/tfds",), says="Files read: 48, written: 48, rejected: 0"),
    Rule(r"python -m pneumojax\.data prepare --source medmnist",
         not_run="downloads; tests/test_builder.py prepares it from a server on 127.0.0.1"),
    Rule(r"python -m pneumojax\.data stats", ("--data-dir={tmp}/tfds",), says="validation"),
    Rule(r"python experiments/.*", not_run="a study or benchmark of minutes to hours; each "
         "script has its own test at tiny sizes (tests/test_bench_*.py, test_profile_step.py, "
         "test_reproduce.py, test_gradcam.py for deletion and localisation)"),
    Rule(r"bash experiments/device_prepare\.sh .*",
         not_run="downloads wheels into the checkout; run by hand before a GPU call"),
    Rule(r"bash experiments/device_suite\.sh --dry-run .*",
         not_run="tests/test_device_suite.py runs this dry run"),
]


def rule_for(command: str) -> Rule:
    matches = [r for r in RULES if re.fullmatch(r.pattern, command)]
    assert len(matches) == 1, f"README command {command!r} matches {len(matches)} rules"
    return matches[0]


def test_every_readme_command_has_a_rule():
    commands = readme_commands()
    assert len(commands) > 10
    for command in commands:
        rule_for(command)


@pytest.fixture(scope="module")
def place(tmp_path_factory) -> pathlib.Path:
    """A folder standing in for the repository root the README's commands run from (its
    configs/ linked): PATH/chest_xray (phantoms with Kermany-style names:
    train, val and test), a JPEG, a folder of scans and a DICOM study."""
    from pneumojax.data import synthetic
    from tests.test_images import _dicom

    tmp = tmp_path_factory.mktemp("readme")
    (tmp / "configs").symlink_to(ROOT / "configs")
    synthetic.write_folder(tmp / "PATH" / "chest_xray", {"train": 40, "val": 4, "test": 4})
    some = sorted((tmp / "PATH" / "chest_xray" / "test").rglob("*.jpeg"))
    shutil.copy(some[0], tmp / "xray.jpeg")
    (tmp / "scans").mkdir()
    for f in some[1:3]:
        shutil.copy(f, tmp / "scans" / f.name)
    ramp = np.tile(np.linspace(0, 4000, 96).astype(np.uint16), (80, 1))
    shutil.copy(_dicom(tmp, ramp, "MONOCHROME2"), tmp / "study.dcm")
    return tmp


def run(command: str, place: pathlib.Path) -> subprocess.CompletedProcess:
    rule = rule_for(command)
    args = shlex.split(command.replace("--workdir DIR", "--workdir workdirs/deep_cnn_cpu"))
    args += [a.format(tmp=place) for a in rule.extra]
    env = dict(os.environ, PNEUMOJAX_CACHE=str(place / "cache"),
               TFDS_DATA_DIR=str(place / "tfds"))
    # From a stand-in for the repository root (its configs/ linked), so that what a command
    # writes beside itself (workdirs/, predictions/) lands there, not in the checkout.
    return subprocess.run([sys.executable, *args[1:]], cwd=place, env=dict(
        env, PYTHONPATH=os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])),
        capture_output=True, text=True, timeout=900)


ORDER: list[Callable[[str], bool]] = [  # prepare first, training before what reads its workdir
    lambda c: " pneumojax.data " in c, lambda c: " pneumojax.main " in c,
    lambda c: True]


@pytest.mark.slow
def test_the_readme_commands_run_as_written(place):
    runnable = [c for c in readme_commands() if not rule_for(c).not_run]
    runnable.sort(key=lambda c: next(i for i, f in enumerate(ORDER) if f(c)))
    for command in runnable:
        rule, proc = rule_for(command), run(command, place)
        output = proc.stdout + proc.stderr
        assert proc.returncode == rule.expect, f"{command}\n{output[-3000:]}"
        assert rule.says in output, f"{command}\n{output[-3000:]}"
        assert "Traceback" not in output, f"{command}\n{output[-3000:]}"
    summary = json.loads((place / "workdirs" / "deep_cnn_cpu" / "summary.json").read_text())
    assert summary["validation"]
    assert sorted(p.name for p in (place / "heatmaps").iterdir())  # predict's overlays
