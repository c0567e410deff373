"""Commands run as stages within one time budget, each its own process with a limit and a log.

A lent accelerator comes for a fixed time: experiments/device_suite.py spends it on a plan of
stages (tests, training, benchmarks). Stages that only share the device run together as their
dependencies allow; those whose figures are timings run afterwards, one at a time. A stage that
fails or runs past its limit is recorded so (its whole process group killed), the stages that
need it are skipped, and the rest go on; stages finished by an earlier call are not run again.
"""

from __future__ import annotations

import concurrent.futures as cf
import dataclasses
import os
import pathlib
import signal
import subprocess
import time
from collections.abc import Callable


@dataclasses.dataclass
class Stage:
    """One process of a plan. `command` is built when the stage starts, so it can read what
    an earlier stage found (e.g. a benchmark's batch size)."""

    name: str
    command: Callable[[], list[str]]
    limit: float                    # seconds at most, within what the budget leaves
    exclusive: bool = False         # alone on the device: its figures are timings
    after: tuple[str, ...] = ()     # stages that must have finished ok first
    env: dict[str, str] = dataclasses.field(default_factory=dict)


def run_stage(stage: Stage, logs: pathlib.Path, env: dict, deadline: float,
              cwd: str | os.PathLike | None = None) -> dict:
    """Runs one stage to its end, its limit or `deadline` (`time.monotonic()`), whichever comes
    first; its output goes to `logs/NAME.log`. Skipped with less than 5 s left."""
    seconds = min(stage.limit, deadline - time.monotonic())
    log = logs / f"{stage.name}.log"
    if seconds < 5:
        return dict(status="skipped", reason="no time left in the budget", seconds=0.0)
    command = stage.command()
    start = time.monotonic()
    with log.open("w") as f:
        f.write(" ".join(command) + "\n")
        f.flush()
        proc = subprocess.Popen(command, cwd=cwd, stdout=f, stderr=subprocess.STDOUT,
                                env={**env, **stage.env}, start_new_session=True)
        try:
            rc = proc.wait(timeout=seconds)
            status = "ok" if rc == 0 else "failed"
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # the stage and whatever it started
            rc, status = proc.wait(), "timeout"
    return dict(status=status, rc=rc, seconds=round(time.monotonic() - start, 1),
                limit=round(seconds), log=f"logs/{log.name}", tail=_tail(log))


def _tail(log: pathlib.Path, lines: int = 4) -> list[str]:
    return [line[:300] for line in log.read_text(errors="replace").splitlines()[-lines:]]


def schedule(plan: list[Stage], logs: pathlib.Path, env: dict, deadline: float, done: dict,
             say: Callable[[str], None], cwd: str | os.PathLike | None = None) -> dict:
    """Each stage's result (`run_stage`'s), in the plan's order: shared stages run together as
    their dependencies allow, then each exclusive stage alone. `done` holds results of stages
    finished by an earlier call, which are not run again; `say` gets a line per start and end."""
    results = dict(done)

    def ready(stage: Stage) -> bool | None:
        """True to start, False to wait, None when a dependency did not finish ok."""
        states = [results.get(a, {}).get("status") for a in stage.after]
        if any(s not in (None, "ok") for s in states):
            return None
        return all(s == "ok" for s in states)

    shared = [s for s in plan if not s.exclusive and s.name not in results]
    with cf.ThreadPoolExecutor(max_workers=max(len(shared), 1)) as pool:
        futures: dict[cf.Future, Stage] = {}
        while shared or futures:
            for stage in list(shared):
                state = ready(stage)
                if state is None:
                    results[stage.name] = dict(status="skipped", reason=(
                        f"needs {', '.join(stage.after)}, which did not finish"), seconds=0.0)
                    shared.remove(stage)
                elif state:
                    say(f"start {stage.name}")
                    futures[pool.submit(run_stage, stage, logs, env, deadline, cwd)] = stage
                    shared.remove(stage)
            if not futures:
                break
            finished, _ = cf.wait(futures, return_when=cf.FIRST_COMPLETED)
            for future in finished:
                stage = futures.pop(future)
                results[stage.name] = future.result()
                say(_line(stage.name, results[stage.name]))
    for stage in plan:
        if stage.exclusive and stage.name not in results:
            say(f"start {stage.name}")
            results[stage.name] = run_stage(stage, logs, env, deadline, cwd)
            say(_line(stage.name, results[stage.name]))
    return {s.name: results[s.name] for s in plan}


def _line(name: str, r: dict) -> str:
    return f"{name}: {r['status']} in {r['seconds']:.0f} s" + (
        f" ({r['reason']})" if "reason" in r else "") + (
        "" if r["status"] == "ok" else "".join(f"\n    | {t}" for t in r.get("tail", [])))
