"""Stopped runs: SIGKILL mid-training and mid-checkpoint, Ctrl-C, a damaged checkpoint; then the
same command again."""

import json
import os
import pathlib
import shlex
import signal
import subprocess
import sys
import time

import numpy as np
import orbax.checkpoint as ocp
import pytest

from pneumojax import checkpoint, training
from tests.conftest import SYNTHETIC_COUNT, SYNTHETIC_SIZE, tiny_config

ROOT = pathlib.Path(__file__).resolve().parents[1]
EPOCHS = 12


def cli(workdir, data_dir) -> list[str]:
    """The exact command a user would re-run after a crash."""
    overrides = dict(
        model__kwargs__width=4, data__data_dir=str(data_dir), data__image_size=SYNTHETIC_SIZE,
        data__synthetic_count=SYNTHETIC_COUNT, data__validation_fraction=0.25,
        train__batch_size=8, train__eval_batch_size=16, train__epochs=float(EPOCHS),
        train__log_every=1, train__eval_every=3, train__patience=1000)
    return [sys.executable, "-m", "pneumojax.main", "--config", "configs/shallow_cnn.py",
            f"--workdir={workdir}",
            *(f"--config.{k.replace('__', '.')}={v}" for k, v in overrides.items())]


def worker(workdir, data_dir, *extra) -> list[str]:
    return [sys.executable, str(ROOT / "tests" / "train_worker.py"), "--workdir", str(workdir),
            "--data-dir", str(data_dir), "--epochs", str(EPOCHS), *extra]


def final_state(workdir: pathlib.Path) -> tuple[int, dict]:
    steps = sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
    last = workdir / "checkpoints" / str(steps[-1]) / "state"
    return steps[-1], ocp.PyTreeCheckpointer().restore(last)


def losses(workdir: pathlib.Path) -> list[tuple[int, float]]:
    lines = (workdir / "metrics.jsonl").read_text().splitlines()
    return [(r["step"], r["loss"]) for r in map(json.loads, lines) if r["split"] == "train"]


def assert_identical(a: dict, b: dict) -> None:
    import jax
    leaves_a, tree_a = jax.tree.flatten(a)
    leaves_b, tree_b = jax.tree.flatten(b)
    assert tree_a == tree_b
    for x, y in zip(leaves_a, leaves_b):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))  # bit for bit


def kill_when(proc: subprocess.Popen, ready, timeout: float = 240,
              sig: signal.Signals = signal.SIGKILL) -> None:
    deadline = time.time() + timeout
    while not ready():
        assert proc.poll() is None, "the run ended before it could be killed"
        assert time.time() < deadline, "timed out waiting for the moment to kill"
        time.sleep(0.05)
    proc.send_signal(sig)
    proc.wait(timeout=120)


def past_step(workdir: pathlib.Path, step: int):
    ckpts = workdir / "checkpoints"
    return lambda: ckpts.is_dir() and any(
        p.name.isdigit() and int(p.name) >= step for p in ckpts.iterdir())


@pytest.fixture(scope="module")
def reference(synthetic, tmp_path_factory):
    """An uninterrupted run of the same command."""
    workdir = tmp_path_factory.mktemp("uninterrupted")
    subprocess.run(cli(workdir, synthetic[0]), cwd=ROOT, check=True, capture_output=True)
    return workdir


@pytest.mark.slow
@pytest.mark.gpu
def test_sigkill_mid_training_then_the_same_command_resumes_bit_identically(
        synthetic, reference, tmp_path):
    proc = subprocess.Popen(cli(tmp_path, synthetic[0]), cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    kill_when(proc, past_step(tmp_path, 9))
    killed_at, _ = final_state(tmp_path)
    ref_step, ref_state = final_state(reference)
    assert killed_at < ref_step  # really mid-training
    done = subprocess.run(cli(tmp_path, synthetic[0]), cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "resumed from the checkpoint at step" in done.stderr + done.stdout
    step, state = final_state(tmp_path)
    assert step == ref_step
    assert_identical(state, ref_state)
    assert losses(tmp_path) == losses(reference)  # the log continues without gaps or repeats


@pytest.mark.slow
def test_a_kill_during_a_checkpoint_write_leaves_the_previous_one_usable(
        synthetic, reference, tmp_path):
    proc = subprocess.Popen(worker(tmp_path, synthetic[0], "--stall-on-save", "3"), cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    kill_when(proc, (tmp_path / "stalled").exists)
    ckpts = tmp_path / "checkpoints"
    assert [p for p in ckpts.iterdir() if "tmp" in p.name]  # a half-written checkpoint
    committed = sorted(int(p.name) for p in ckpts.iterdir() if p.name.isdigit())
    assert committed == [3, 6]  # the third save (step 9) never completed
    done = subprocess.run(worker(tmp_path, synthetic[0]), cwd=ROOT, capture_output=True,
                          text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    step, state = final_state(tmp_path)
    ref_step, ref_state = final_state(reference)
    assert step == ref_step
    assert_identical(state, ref_state)


@pytest.mark.slow
def test_ctrl_c_says_how_to_resume_and_the_same_command_resumes_bit_identically(
        synthetic, reference, tmp_path):
    workdir, command = tmp_path / "run", cli(tmp_path / "run", synthetic[0])
    with (tmp_path / "stderr").open("w") as stderr:
        # As from a terminal: Ctrl-C's default action, which a process started under nohup or
        # by a pytest-xdist worker would otherwise inherit as "ignored".
        proc = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=stderr,
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        kill_when(proc, past_step(workdir, 9), sig=signal.SIGINT)
    err = (tmp_path / "stderr").read_text()
    assert proc.returncode == 130 and "Traceback" not in err, err[-3000:]
    assert err.splitlines()[-1] == (
        "interrupted; to resume from the last checkpoint, run the same command: python -m "
        f"pneumojax.main {shlex.join(command[3:])}")
    stopped_at, _ = final_state(workdir)
    ref_step, ref_state = final_state(reference)
    assert stopped_at < ref_step
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    step, state = final_state(workdir)
    assert step == ref_step
    assert_identical(state, ref_state)
    assert losses(workdir) == losses(reference)


@pytest.mark.slow
@pytest.mark.parametrize("damage", ["truncated", "deleted"])
def test_a_damaged_latest_checkpoint_is_set_aside_and_the_one_before_resumes(
        synthetic, tmp_path, damage, capsys):
    config = tiny_config(synthetic[0], epochs=1.0)  # 5 steps, checkpoints at 3 and 5
    training.train_and_evaluate(config, tmp_path)
    last, intact = final_state(tmp_path)
    state = tmp_path / "checkpoints" / str(last) / "state"
    if damage == "truncated":
        manifest = state / "manifest.ocdbt"
        manifest.write_bytes(manifest.read_bytes()[: manifest.stat().st_size // 2])
    else:
        for file in (state / "d").iterdir():
            file.unlink()
    capsys.readouterr()
    training.train_and_evaluate(config, tmp_path)
    said = [line for line in capsys.readouterr().out.splitlines() if "resumed" in line]
    assert len(said) == 1 and said[0].startswith(
        f"unreadable checkpoints set aside: step {last} (now {last}.unreadable: ")
    assert said[0].endswith(f"resumed from the checkpoint at step 3 in {tmp_path}/checkpoints")
    assert (tmp_path / "checkpoints" / f"{last}.unreadable" / "state").is_dir()  # kept
    step, state = final_state(tmp_path)
    assert step == last
    assert_identical(state, intact)  # steps 4 and 5 redone, bit for bit


def test_ctrl_c_while_a_checkpoint_finalises_lets_it_finish_then_stops(tmp_path, monkeypatch):
    """orbax logs a KeyboardInterrupt inside its wait as a failed save, with a traceback; the
    Checkpointer holds Ctrl-C until the wait returns, then raises it."""
    ckpt = checkpoint.Checkpointer(tmp_path / "checkpoints")
    finished = []

    def wait_interrupted() -> None:
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.2)  # the signal's handler runs here, in the main thread
        finished.append(True)
    monkeypatch.setattr(ckpt.manager, "wait_until_finished", wait_interrupted)
    before = signal.getsignal(signal.SIGINT)  # Python's, or SIG_IGN under nohup or xdist
    with pytest.raises(KeyboardInterrupt):
        ckpt.wait()
    assert finished == [True]
    assert signal.getsignal(signal.SIGINT) == before
