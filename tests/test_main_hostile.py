"""`python -m pneumojax.main` against a user's mistakes: each is one line on stderr and exit
status 2, before any work, and nothing already made is touched."""

import pathlib
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from pneumojax import cli, training, workdirs
from tests.conftest import tiny_config
from tests.test_resume import ROOT, cli as resume_command
from tests.test_workdirs import snapshot


def run_main(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pneumojax.main", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)


def assert_refused(done: subprocess.CompletedProcess, says: str) -> None:
    assert done.returncode == 2, done.stderr[-3000:]
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), done.stderr[-3000:]
    assert says in lines[0]


SLOW = pytest.mark.slow  # a process each: the fast tier keeps one case of each kind


@pytest.mark.parametrize("args,says", [
    (["--config.train.epoch=3"], "error: --config.train.epoch: train has no field 'epoch'; "
                                 "did you mean --config.train.epochs?"),
    pytest.param(["--config.trian.epochs=3"],
                 "the config has no field 'trian'; did you mean --config.train?", marks=SLOW),
    pytest.param(["--config.train.epochs=abc"],
                 "flag --config.train.epochs=abc: could not convert", marks=SLOW),
    (["--config.train.freeze=nonee"], "config field train.freeze='nonee': choose one of none, "
                                      "backbone, progressive; set --config.train.freeze"),
    pytest.param(["--config.train.threshold=sensitivity:2"],
                 "prevalence:<p>, e.g. sensitivity:0.95", marks=SLOW),
    pytest.param(["--config.model.init=imagenet:foo"],
                 "with SOURCE one of keras, torchvision-v1", marks=SLOW),
    pytest.param(["--config.train.batch_size=0"],
                 "train.batch_size=0: must be an integer, at least 1", marks=SLOW),
    (["--epochs=3"], "Unknown command line flag 'epochs'"),
    # Flags are spelled with dashes, as in every CLI here (tests/test_cli.py).
    pytest.param(["--num-processes=two"], "flag --num-processes=two: invalid literal for int()",
                 marks=SLOW),
    (["--coordinator_address=h:1"], "Did you mean: coordinator-address ?"),
    pytest.param(["leftover"], "unexpected arguments leftover", marks=SLOW),
])
def test_a_mistake_on_the_command_line_is_one_line_before_any_work(tmp_path, args, says):
    workdir = tmp_path / "run"
    assert_refused(run_main("--config", "configs/shallow_cnn.py", f"--workdir={workdir}", *args),
                   says)
    assert not workdir.exists()


def test_a_config_file_that_does_not_load_is_one_line(tmp_path):
    assert_refused(run_main("--config", "configs/deep_cnn.py:gpu"),
                   "--config configs/deep_cnn.py:gpu: unknown argument 'gpu'; use "
                   "configs/deep_cnn.py, :cpu or :robust")
    assert_refused(run_main("--config", "configs/nope.py", "--config.train.epochs=2"),
                   f"--config configs/nope.py: no such file {ROOT / 'configs/nope.py'}")


def test_debug_shows_the_traceback(tmp_path):
    done = run_main("--config", "configs/shallow_cnn.py", "--config.train.epoch=3", "--debug")
    assert done.returncode != 0 and "Traceback" in done.stderr
    assert "did you mean --config.train.epochs?" in done.stderr


def test_a_workdir_that_is_a_file_or_held_by_another_run_is_refused(tmp_path, synthetic):
    file = tmp_path / "notes.txt"
    file.write_text("mine")
    assert_refused(run_main(*resume_command(file, synthetic[0])[3:]),
                   f"--workdir {file}: is a file, not a folder; choose another --workdir")
    assert file.read_text() == "mine"
    with workdirs.claim(tmp_path / "held", tiny_config(synthetic[0])):
        assert_refused(run_main(*resume_command(tmp_path / "held", synthetic[0])[3:]),
                       "another run is training in it (process ")


@pytest.mark.skipif(not pathlib.Path("/sys/kernel").is_dir(), reason="no sysfs")
def test_a_workdir_that_cannot_be_written_is_refused(synthetic):
    assert_refused(run_main(*resume_command("/sys/kernel", synthetic[0])[3:]),
                   "--workdir /sys/kernel: cannot write there (")


@pytest.mark.slow
def test_a_workdir_holding_a_run_of_another_config_is_left_as_it_is(synthetic, tmp_path):
    training.train_and_evaluate(tiny_config(synthetic[0], epochs=1.0), tmp_path)
    before = snapshot(tmp_path)
    assert_refused(run_main(*resume_command(tmp_path, synthetic[0])[3:]),
                   f"--workdir {tmp_path} holds a run of another config (train.epochs is 1.0 "
                   "there, 12.0 here, train.patience is 100 there, 1000 here); resume it with "
                   "its own config, or choose another --workdir")
    assert snapshot(tmp_path) == before


@pytest.mark.slow
def test_a_train_split_of_one_class_stops_before_any_step(synthetic, tmp_path):
    folder = tmp_path / "xrays" / "train" / "NORMAL"
    folder.mkdir(parents=True)
    for i in range(12):
        pixels = np.random.default_rng(i).integers(0, 256, (40, 40), np.uint8)
        Image.fromarray(pixels).save(folder / f"IM-{i:04d}-0001.png")
    c = tiny_config(tmp_path / "tfds")
    c.data.source = f"folder:{tmp_path / 'xrays'}"
    with pytest.raises(cli.UserError, match=r"the prepared train split \(.*\) has no PNEUMONIA "
                                            r"images \(.*'PNEUMONIA': 0.*\); add images of both"):
        training.train_and_evaluate(c, tmp_path / "run")
    assert not (tmp_path / "run" / "metrics.jsonl").exists()
    assert not (tmp_path / "run" / "checkpoints").exists()
