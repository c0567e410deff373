"""Every command README.md and docs/ give runs as written, with its defaults, at small sizes.

Each command in their bash blocks must match one rule below: either how to run it here (PATH
and the other placeholders become a small folder of phantoms in the Kaggle layout, and only
what the command lets a user shrink is shrunk: counts, epochs, seconds, where output goes) and
what must come out, or why CI cannot run it and which test covers it instead. A command added
without a rule fails `test_every_readme_command_has_a_rule`; a rule no command uses fails
`test_every_rule_matches_a_command`. The commands CI does not run still name programs and flags
that exist (`test_docs_commands_use_programs_and_flags_that_exist`). The pages themselves are
checked too: every docs/ page linked from the README, every relative link resolving, no
development machine's path, and experiments/results/README.md naming every file there.
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
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")),
         ROOT / "experiments" / "results" / "README.md"]


def page_commands(page: pathlib.Path) -> list[str]:
    """The commands of a page's bash blocks: continuation lines joined, comments dropped, and
    `a && b` split into its two commands."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", page.read_text(), re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = re.split(r"\s#\s", line)[0].strip()
            commands += [" ".join(c.split()) for c in line.split(" && ") if c.strip()]
    return commands


def readme_commands() -> list[str]:
    """Every command of README.md and the pages it links to, once each, in order."""
    return list(dict.fromkeys(c for page in PAGES for c in page_commands(page)))


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
    Rule(r'python -m pytest( -m "not slow")? -n 2', not_run="this very suite"),
    Rule(r"tensorboard --logdir workdirs", not_run="TensorBoard is not a dependency; "
         "tests/test_tensorboard.py reads the event files back"),
    Rule(r"srun python -m pneumojax\.main .*", not_run="a SLURM cluster; tests/test_distributed.py"
         " runs two hosts on this machine"),
    Rule(r"python -m pneumojax\.main .*--coordinator-address=host0:1234 .*",
         not_run="a cluster of 4 hosts; tests/test_distributed.py runs two on this machine"),
    Rule(r"python -m pneumojax\.main --config configs/resnet50\.py:demo",
         ("--config.data.synthetic_count=48", "--config.train.epochs=1",
          "--config.data.data_dir={tmp}/tfds", "--workdir={tmp}/workdirs/demo"),
         says="workdir: "),
    Rule(r"python -m pneumojax\.main --config configs/deep_cnn\.py:cpu .*",
         ("--config.train.epochs=1", "--config.data.data_dir={tmp}/tfds"), says="workdir: "),
    Rule(r"python -m pneumojax\.main --config configs/deep_cnn\.py:robust .*",
         ("--config.train.epochs=1", "--config.data.data_dir={tmp}/tfds"), says="workdir: "),
    Rule(r"python -m pneumojax\.cohort .*", ("--n-boot=20",), says="strong shifts"),
    Rule(r"python -m pneumojax\.main --config configs/resnet50\.py "
         r"--config\.data\.source=folder:PATH/chest_xray",
         ("--config.data.data_dir={tmp}/tfds", "--workdir={tmp}/workdirs/imagenet",
          "--config.train.batch_size=8"),
         expect=2, says="python -m pneumojax.weights fetch resnet50 --source torchvision-v2"),
    Rule(r"python -m pneumojax\.main --config configs/xception\.py:cpu "
         r"--config\.data\.source=folder:PATH/chest_xray",
         ("--config.data.data_dir={tmp}/tfds", "--workdir={tmp}/workdirs/xception",
          "--config.train.batch_size=8"),
         expect=2, says="python -m pneumojax.weights fetch xception --source keras"),
    Rule(r"python -m pip download --no-deps pneumonia-model-package==0\.3\.0 -d wheels",
         not_run="downloads; .ci/run fetches the wheel for tests/test_xception.py"),
    Rule(r"python -m zipfile -e wheels/\S+ wheels/pmp",
         not_run="needs the wheel; tests/test_xception.py takes the same files out of it"),
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
    Rule(r"python -m pneumojax\.data prepare --source folder:\S+ --holdout NORMAL2-",
         not_run="the phantoms have no NORMAL2- series; tests/test_builder.py holds one out"),
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
    assert len(matches) == 1, f"the command {command!r} matches {len(matches)} rules"
    return matches[0]


def test_every_readme_command_has_a_rule():
    commands = readme_commands()
    assert len(commands) > 10
    for command in commands:
        rule_for(command)


def test_every_rule_matches_a_command():
    """A rule that no page's command matches any more hides a command that was dropped."""
    commands = readme_commands()
    unused = [r.pattern for r in RULES if not any(re.fullmatch(r.pattern, c) for c in commands)]
    assert not unused, f"rules without a command: {unused}"


def _sources(command: str) -> list[pathlib.Path] | None:
    """The source files of the program a command runs (None: not ours, e.g. pip or pytest)."""
    words = shlex.split(command.removeprefix("srun "))
    if words[:2] == ["python", "-m"] and words[2].startswith("pneumojax."):
        module = ROOT.joinpath(*words[2].split("."))
        files = sorted(module.glob("*.py")) if module.is_dir() else [module.with_suffix(".py")]
        return [*files, ROOT / "pneumojax" / "cli.py"]  # flags every scoring CLI shares
    if words[0] in ("python", "bash") and words[1].startswith("experiments/"):
        script = ROOT / words[1]
        return [script, *[p for p in [script.with_suffix(".py")] if p != script and p.exists()]]
    return None


def test_docs_commands_use_programs_and_flags_that_exist():
    """The commands CI does not run (studies of hours, clusters) must still name a program that
    exists and flags it defines: a renamed flag or script is caught here, not by a reader."""
    checked = 0
    for command in readme_commands():
        files = _sources(command)
        if files is None:
            continue
        missing = [str(f.relative_to(ROOT)) for f in files if not f.exists()]
        assert not missing, f"{command}: no {missing}"
        text = "".join(f.read_text() for f in files)
        for flag in re.findall(r"(?<!\S)--([a-z][\w.-]*)", command):
            name = flag.split("=")[0]
            if name.startswith("config."):  # a config field: the runnable commands check those
                continue
            spellings = {f'"--{name}"', f'"{name}"', f'"{name.replace("-", "_")}"'}
            assert any(s in text for s in spellings), f"{command}: --{name} is not defined"
        checked += 1
    assert checked > 20


DOCS = sorted((ROOT / "docs").glob("*.md"))


def test_every_docs_page_is_linked_from_the_readme():
    readme = (ROOT / "README.md").read_text()
    assert DOCS
    unlinked = [p.name for p in DOCS if f"](docs/{p.name}" not in readme]
    assert not unlinked, f"docs/ pages the README does not link to: {unlinked}"


def _anchors(page: pathlib.Path) -> set[str]:
    """GitHub's anchors of a page's headings (outside code blocks)."""
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-")
            for h in re.findall(r"^#+ (.*)$", text, re.M)}


def test_docs_relative_links_resolve():
    broken = []
    for page in PAGES:
        for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text()):
            if re.match(r"[a-z]+:", target):  # https:, mailto:
                continue
            path, _, anchor = target.partition("#")
            dest = (page.parent / path).resolve() if path else page
            if not dest.exists() or (anchor and dest.suffix == ".md"
                                     and anchor not in _anchors(dest)):
                broken.append(f"{page.relative_to(ROOT)}: {target}")
    assert not broken, broken


def _docstring(path: pathlib.Path) -> str:
    import ast
    return ast.get_docstring(ast.parse(path.read_text())) or ""


def test_no_file_names_a_development_machine_path():
    """Pages, code, configs, tests and results write PATH/chest_xray (and results files PATH/
    for any folder: experiments/common.portable), never where a developer's data or runs lay."""
    skip = {".git", ".venv", "workdirs", "node_modules", ".whl", ".gpudata"}
    files = [p for p in ROOT.rglob("*") if p.is_file() and not skip & set(p.relative_to(ROOT).parts)
             and p.suffix in {".py", ".md", ".json", ".sh", ".toml", ".txt", ".cfg", ".yaml"}
             and p != pathlib.Path(__file__).resolve()]
    found = [str(p.relative_to(ROOT)) for p in files
             if re.search(r"\.\./shared|shared/data|/work/", p.read_text(errors="replace"))]
    assert not found, f"a development machine's path in {found}: write PATH/chest_xray"


def test_docs_results_readme_names_every_results_file():
    folder = ROOT / "experiments" / "results"
    text = (folder / "README.md").read_text()
    unnamed = [p.name for p in sorted(folder.iterdir())
               if p.name != "README.md" and not p.name.startswith(".")
               and f"`{p.name}`" not in text]
    assert not unnamed, f"experiments/results/README.md does not say what {unnamed} are"


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
