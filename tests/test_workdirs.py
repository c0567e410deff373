"""workdirs.claim: one run per workdir, one process at a time, refused before anything is
written. The runs here are stand-ins (a config.json and a committed step folder, which is all
`claim` reads); tests/test_main_hostile.py refuses real ones from the command line."""

import hashlib
import os
import pathlib
import signal
import socket
import subprocess
import sys

import pytest

from pneumojax import cli, workdirs
from tests.conftest import tiny_config

ROOT = pathlib.Path(__file__).resolve().parents[1]


def snapshot(folder: pathlib.Path) -> dict[str, tuple[str, int]]:
    """(content hash, mtime) of everything below `folder`."""
    return {str(p.relative_to(folder)): (hashlib.sha256(p.read_bytes()).hexdigest()
                                         if p.is_file() else "folder", p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*"))}


@pytest.fixture
def run(tmp_path) -> pathlib.Path:
    """A workdir as a run with one checkpoint leaves it."""
    workdir = tmp_path / "run"
    with workdirs.claim(workdir, tiny_config("/data")):
        (workdir / "checkpoints" / "3" / "state").mkdir(parents=True)
    return workdir


def refused(workdir, config) -> str:
    with pytest.raises(cli.UserError) as caught, workdirs.claim(workdir, config):
        pass
    assert "\n" not in str(caught.value)
    return str(caught.value)


def test_another_config_is_refused_naming_the_fields_and_nothing_is_written(run):
    before = snapshot(run)
    c = tiny_config("/data", epochs=3.0)
    c.model.kwargs.width = 8
    assert refused(run, c) == (
        f"--workdir {run} holds a run of another config (model.kwargs.width is 4 there, 8 "
        "here, train.epochs is 2.0 there, 3.0 here); resume it with its own config, or choose "
        "another --workdir")
    assert snapshot(run) == before


def test_the_same_config_resumes_and_the_harmless_fields_may_change(run, capsys):
    with workdirs.claim(run, tiny_config("/data")):
        pass
    c = tiny_config("/data", num_devices=1)
    c.checkpoint.keep = 5
    c.data.data_dir = "/moved"
    with workdirs.claim(run, c):
        pass
    assert "resuming with checkpoint.keep=5 (was 2), data.data_dir='/moved' (was '/data'), " \
        "train.num_devices=1 (was None)" in capsys.readouterr().out
    assert workdirs.load_config(run).checkpoint.keep == 5  # config.json says what runs now


def test_a_workdir_without_checkpoints_holds_nothing_to_resume(tmp_path):
    with workdirs.claim(tmp_path, tiny_config("/data")):
        pass
    with workdirs.claim(tmp_path, tiny_config("/data", epochs=5.0)):
        pass
    assert workdirs.load_config(tmp_path).train.epochs == 5.0


def test_a_second_run_is_refused_while_the_first_holds_the_workdir(tmp_path):
    with workdirs.claim(tmp_path, tiny_config("/data")):
        assert refused(tmp_path, tiny_config("/data")) == (
            f"--workdir {tmp_path}: another run is training in it (process {os.getpid()} on "
            f"{os.uname().nodename}); wait for it to end, or choose another --workdir")
    with workdirs.claim(tmp_path, tiny_config("/data")):  # released at the end of the block
        pass


def test_a_run_killed_by_sigkill_leaves_no_lock_behind(tmp_path):
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from pneumojax import workdirs; "
         "from tests.conftest import tiny_config; "
         f"cm = workdirs.claim({str(tmp_path)!r}, tiny_config('/data')); cm.__enter__(); "
         "print('held', flush=True); time.sleep(600)"],
        cwd=ROOT, stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline() == "held\n"
    assert "another run is training in it" in refused(tmp_path, tiny_config("/data"))
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    with workdirs.claim(tmp_path, tiny_config("/data")):
        pass


def test_a_file_or_a_folder_that_cannot_be_written_is_refused(tmp_path):
    file = tmp_path / "notes.txt"
    file.write_text("mine")
    assert refused(file, tiny_config("/data")) == (
        f"--workdir {file}: is a file, not a folder; choose another --workdir")
    assert file.read_text() == "mine"
    assert refused(file / "run", tiny_config("/data")).startswith(
        f"--workdir {file / 'run'}: cannot write there (Not a directory)")


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes in any folder")
def test_a_read_only_folder_is_refused(tmp_path):
    tmp_path.chmod(0o555)
    try:
        assert refused(tmp_path, tiny_config("/data")) == (
            f"--workdir {tmp_path}: cannot write there (Permission denied); choose a folder "
            "you can write in")
    finally:
        tmp_path.chmod(0o755)


@pytest.mark.skipif(not os.path.isdir("/sys/kernel"), reason="no sysfs")
def test_a_read_only_file_system_is_refused():
    assert refused("/sys/kernel", tiny_config("/data")).startswith(
        "--workdir /sys/kernel: cannot write there (")


def test_in_a_multi_host_run_every_process_stops_when_process_0_refuses(tmp_path):
    file = tmp_path / "notes.txt"
    file.write_text("mine")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    running = [subprocess.Popen(
        [sys.executable, str(ROOT / "tests" / "train_worker.py"), "--workdir", str(file),
         "--data-dir", str(tmp_path), "--coordinator", f"127.0.0.1:{port}", "--num-processes",
         "2", "--process-id", str(i)], cwd=ROOT, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True) for i in range(2)]
    outputs = [p.communicate(timeout=300)[0] for p in running]
    assert all(p.returncode != 0 for p in running)
    assert f"UserError: --workdir {file}: is a file, not a folder" in outputs[0]
    assert f"UserError: --workdir {file}: refused by process 0, whose error says why" in (
        outputs[1])
